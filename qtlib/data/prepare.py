"""Image intake (``qt prepare``): a folder of images -> a Zarr store + a Parquet manifest.

``prepare_images`` turns every file with an image extension under a folder into
one manifest row, and every usable one into one row of ``images.zarr`` (RGB).
Its geometry is ``data.geometry``: ``native`` keeps each image at its own size
(downscaled to ``data.max_side`` when larger; one array per image), ``square``
resizes the shorter side to ``data.size`` (bicubic, antialiased) and
center-crops. ``prepare_paired`` does the same for a ``degraded/`` + ``clean/``
folder (or an alias, :data:`PAIRED_LAYOUTS`), with both stores in the same row
order and geometry. Outputs are written under temp names and swapped in at the end.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from qtlib.config.types import DataConfig
from qtlib.data.decode import Decoded, fit_square
from qtlib.data.intake import read_file
from qtlib.data.store import (
    PerImageWriter,
    StoreWriter,
    commit_path,
    remove_path,
    staging_path,
    write_parquet,
)
from qtlib.imageio import IMAGE_EXTENSIONS, list_images

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
        ("mode", pa.string()),
        ("transform", pa.string()),
        ("index", pa.int64()),
        ("status", pa.string()),
        ("message", pa.string()),
    ]
)

PAIRED_SCHEMA = pa.schema(
    [
        *MANIFEST_SCHEMA,
        ("clean_path", pa.string()),
        ("clean_sha256", pa.string()),
        ("clean_mode", pa.string()),
    ]
)

#: The folder names of a paired set, as (degraded, clean), in the order they are looked for. The first
#: is qtlib's own; the others are the common spellings of restoration data sets (input/target as in
#: Snow100K-style releases, lq/gt as in BasicSR). Exactly one layout may be present under a folder.
PAIRED_LAYOUTS: tuple[tuple[str, str], ...] = (("degraded", "clean"), ("input", "target"), ("lq", "gt"))

GEOMETRY = (
    "EXIF orientation applied; converted to 8-bit RGB (alpha composited on white, 16-bit scaled by 1/257); "
    "shorter side resized to size (Pillow bicubic, antialiased; large JPEGs decoded at 1/2..1/8 first, "
    "both sides kept >= 2*size); center crop to size x size"
)


class NoUsableImagesError(ValueError):
    """``qt prepare`` found no usable image; the message gives the counts per status."""


@dataclass(frozen=True)
class PrepareResult:
    """Outcome of :func:`prepare_images`."""

    n_ok: int
    n_skipped: int
    store: Path
    manifest: Path
    status_counts: dict[str, int]


@dataclass(frozen=True)
class PairedResult:
    """Outcome of :func:`prepare_paired`; ``clean`` is None for a test set without ground truth."""

    n_ok: int
    n_skipped: int
    degraded: Path
    clean: Path | None
    manifest: Path
    status_counts: dict[str, int]


def image_id(rel_path: str) -> str:
    """Deterministic id of an input file: the first 16 hex digits of sha1 of its relative posix path."""
    return hashlib.sha1(rel_path.encode("utf-8")).hexdigest()[:16]


def list_inputs(in_dir: Path, exclude: Path | None = None) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every file with an image extension under ``in_dir``, sorted.

    Files under ``exclude`` (an output folder inside the input) are left out.
    """
    if not in_dir.is_dir():
        raise FileNotFoundError(f"{in_dir}: {'not a folder' if in_dir.exists() else 'no such folder'}")
    exclude = exclude.resolve() if exclude is not None else None
    out = []
    for path in list_images(in_dir):
        if exclude is not None and path.resolve().is_relative_to(exclude):
            continue
        out.append((path.relative_to(in_dir).as_posix(), path))
    return out


def _decode_file(path: Path, cfg: DataConfig, draft: bool) -> Decoded:
    # Native images are decoded at full size, so the recorded transform is the only resize.
    draft = draft and cfg.geometry == "square"
    return read_file(path, cfg.min_size, cfg.max_pixels, draft_size=2 * cfg.size if draft else None).decoded()


def _row(rel: str, shown_path: str, decoded: Decoded) -> dict[str, Any]:
    width, height = decoded.orig_size if decoded.orig_size else (-1, -1)
    return {
        "id": image_id(rel),
        "path": shown_path,
        "sha256": decoded.sha256,
        "orig_width": width,
        "orig_height": height,
        "mode": decoded.mode,
        "transform": "",
        "index": -1,
        "status": decoded.status,
        "message": decoded.message,
    }


def fit_native(img: Image.Image, max_side: int = 0) -> tuple[np.ndarray, str]:
    """The image at its own size, downscaled only when its longer side exceeds ``max_side`` (0 = never).

    Returns:
        The ``(H, W, 3)`` uint8 array and the transform: ``"none"``, or e.g.
        ``"resize 4000x3000->1600x1200 (max_side 1600, bicubic, antialiased)"``.
    """
    width, height = img.size
    if not max_side or max(width, height) <= max_side:
        return np.asarray(img, dtype=np.uint8).copy(), "none"
    scale = max_side / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    # Pillow widens the filter support when downscaling, which is what antialiasing means here.
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return (np.asarray(img, dtype=np.uint8).copy(),
            f"resize {width}x{height}->{new_w}x{new_h} (max_side {max_side}, bicubic, antialiased)")


def _fit(decoded: Decoded, cfg: DataConfig) -> tuple[np.ndarray, str]:
    assert decoded.image is not None
    if cfg.geometry == "native":
        array, geometry = fit_native(decoded.image, cfg.max_side)
    else:
        array, geometry = fit_square(decoded.image, cfg.size)
    return array, "; ".join([*decoded.steps, geometry])


def _writer(final: Path, capacity: int, cfg: DataConfig) -> StoreWriter | PerImageWriter:
    """The store writer of ``data.geometry``: one N x 3 x S x S array, or one array per image."""
    return PerImageWriter(final) if cfg.geometry == "native" else StoreWriter(final, capacity, cfg.size)


def _flag_duplicates(rows: list[dict[str, Any]]) -> None:
    """Note identical files (kept: the user decides), so train/test leaks are visible."""
    first: dict[str, str] = {}
    for row in rows:
        digest = row["sha256"]
        if not digest:
            continue
        if digest in first:
            note = f"same bytes as {first[digest]}"
            row["message"] = f"{row['message']}; {note}" if row["message"] else note
        else:
            first[digest] = row["path"]


def _empty_message(in_dir: Path, rows: list[dict[str, Any]]) -> str:
    counts = Counter(row["status"] for row in rows)
    summary = ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))
    examples = "; ".join(f"{row['path']}: {row['message']}" for row in rows[:3])
    return f"{in_dir}: no usable images among {len(rows)} files ({summary}); e.g. {examples}"


NATIVE_GEOMETRY = (
    "EXIF orientation applied; converted to 8-bit RGB (alpha composited on white, 16-bit scaled by 1/257); "
    "native size, or longer side resized to max_side when larger (Pillow bicubic, antialiased); no crop"
)


def _store_attributes(cfg: DataConfig, source: str) -> dict[str, Any]:
    if cfg.geometry == "native":
        transform = {"geometry": "native", "max_side": cfg.max_side, "min_size": cfg.min_size,
                     "steps": NATIVE_GEOMETRY}
    else:
        transform = {"geometry": "square", "size": cfg.size, "min_size": cfg.min_size, "steps": GEOMETRY}
    return {"transform": transform, "source": source}


def prepare_images(in_dir: str | Path, out_dir: str | Path, cfg: DataConfig) -> PrepareResult:
    """Turn a folder of images into ``OUT/images.zarr`` and ``OUT/manifest.parquet``.

    Args:
        in_dir: folder searched recursively for jpg/jpeg/png/bmp/tif/tiff/webp (any case).
        out_dir: output folder (created); may lie inside ``in_dir``, its files are skipped.
        cfg: ``data`` section of the config (``size``, ``min_size``).

    Returns:
        A :class:`PrepareResult`.

    Raises:
        FileNotFoundError: ``in_dir`` is not a folder.
        NoUsableImagesError: no file gave a usable image (existing outputs are left untouched).
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    files = list_inputs(in_dir, exclude=out_dir)
    if not files:
        raise NoUsableImagesError(f"{in_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found (recursive)")
    out_dir.mkdir(parents=True, exist_ok=True)
    store, manifest = out_dir / "images.zarr", out_dir / "manifest.parquet"
    writer = _writer(store, len(files), cfg)
    try:
        rows = []
        for rel, path in files:
            decoded = _decode_file(path, cfg, draft=True)
            rows.append(_row(rel, rel, decoded))
            if decoded.status == "ok":
                array, rows[-1]["transform"] = _fit(decoded, cfg)
                rows[-1]["index"] = writer.append(rows[-1]["id"], array)
        if not writer.ids:
            raise NoUsableImagesError(_empty_message(in_dir, rows))
        _flag_duplicates(rows)
        writer.close(_store_attributes(cfg, "manifest.parquet"))
        write_parquet(staging_path(manifest), rows, MANIFEST_SCHEMA)
        commit_path(writer.tmp, store)
        commit_path(staging_path(manifest), manifest)
    finally:
        writer.abort()
        remove_path(staging_path(manifest))
    counts = dict(sorted(Counter(row["status"] for row in rows).items()))
    n_ok = counts.get("ok", 0)
    return PrepareResult(n_ok, len(rows) - n_ok, store, manifest, counts)


@dataclass(frozen=True)
class _Pair:
    """A degraded file and its clean partner, matched by relative path without extension."""

    degraded: tuple[str, Path] | None
    clean: tuple[str, Path] | None
    status: str = ""
    message: str = ""


def _stem_key(rel: str) -> str:
    return rel[: -len(Path(rel).suffix)] if Path(rel).suffix else rel


def _group(files: list[tuple[str, Path]]) -> dict[str, list[tuple[str, Path]]]:
    groups: dict[str, list[tuple[str, Path]]] = {}
    for item in files:
        groups.setdefault(_stem_key(item[0]), []).append(item)
    return groups


def paired_layout(in_dir: str | Path) -> tuple[str, str]:
    """The (degraded, clean) folder names of a paired set: the one :data:`PAIRED_LAYOUTS` entry whose
    degraded folder exists under ``in_dir``.

    Raises:
        FileNotFoundError: none is present (the message lists every accepted layout).
        ValueError: more than one is present (which one is meant is not guessed).
    """
    in_dir = Path(in_dir)
    found = [(d, c) for d, c in PAIRED_LAYOUTS if (in_dir / d).is_dir()]
    accepted = ", ".join(f"{d}/ + {c}/" for d, c in PAIRED_LAYOUTS)
    if not found:
        raise FileNotFoundError(f"{in_dir}: no paired layout found; expected one of {accepted}")
    if len(found) > 1:
        names = ", ".join(f"{d}/" for d, _ in found)
        raise ValueError(f"{in_dir}: several paired layouts at once ({names}); keep one of {accepted}")
    return found[0]


def match_pairs(degraded: list[tuple[str, Path]], clean: list[tuple[str, Path]] | None,
                names: tuple[str, str] = PAIRED_LAYOUTS[0]) -> list[_Pair]:
    """Match degraded and clean files by relative path without extension (``a/x.jpg`` <-> ``a/x.png``).

    ``clean=None`` means there is no clean folder (a test set without ground
    truth): every degraded file is a pair of its own. ``names`` are the two folder
    names, for the messages.
    """
    deg_name, clean_name = names
    if clean is None:
        return [_Pair(item, None) for item in degraded]
    deg_groups, clean_groups = _group(degraded), _group(clean)
    pairs = []
    for key in sorted(deg_groups.keys() | clean_groups.keys()):
        d, c = deg_groups.get(key, []), clean_groups.get(key, [])
        if len(d) > 1 or len(c) > 1:
            names = ", ".join(rel for rel, _ in d + c)
            pairs += [_Pair(item, None, "ambiguous", f"one name, several files: {names}") for item in d]
            pairs += [_Pair(None, item, "ambiguous", f"one name, several files: {names}") for item in c if not d]
        elif not c:
            pairs.append(_Pair(d[0], None, "no_clean", f"no {clean_name}/{key}.* for this degraded image"))
        elif not d:
            pairs.append(_Pair(None, c[0], "no_degraded", f"no {deg_name}/{key}.* for this clean image"))
        else:
            pairs.append(_Pair(d[0], c[0]))
    return pairs


def _pair_status(pair: _Pair, deg: Decoded | None, cln: Decoded | None) -> tuple[str, str]:
    if pair.status:
        return pair.status, pair.message
    assert deg is not None
    if deg.status != "ok":
        return deg.status, f"degraded: {deg.message}"
    if cln is None:
        return "ok", ""
    if cln.status != "ok":
        return cln.status, f"clean: {cln.message}"
    assert deg.image is not None and cln.image is not None
    if deg.image.size != cln.image.size:
        (dw, dh), (cw, ch) = deg.image.size, cln.image.size
        return "size_mismatch", f"degraded {dw}x{dh} vs clean {cw}x{ch} (after EXIF orientation)"
    return "ok", ""


def _paired_row(pair: _Pair, deg: Decoded | None, cln: Decoded | None, names: tuple[str, str]) -> dict[str, Any]:
    main = deg if deg is not None else cln
    assert main is not None
    rel = pair.degraded[0] if pair.degraded else pair.clean[0]  # type: ignore[index]
    row = _row(rel, f"{names[0]}/{rel}" if pair.degraded else "", main)
    row["clean_path"] = f"{names[1]}/{pair.clean[0]}" if pair.clean else ""
    row["clean_sha256"] = cln.sha256 if cln else ""
    row["clean_mode"] = cln.mode if cln else ""
    row["status"], row["message"] = _pair_status(pair, deg, cln)
    return row


def prepare_paired(
    in_dir: str | Path, out_dir: str | Path, cfg: DataConfig, require_clean: bool = True
) -> PairedResult:
    """Turn ``IN/degraded`` + ``IN/clean`` into ``OUT/degraded.zarr``, ``OUT/clean.zarr`` and a manifest.

    The folders may also be named ``input/`` + ``target/`` or ``lq/`` + ``gt/``
    (:data:`PAIRED_LAYOUTS`); the manifest's paths keep the names found.

    Files are matched by relative path without extension; both images of a pair
    must have the same size and get the same geometry, and row ``i`` of both
    stores is the same pair. Ids come from the path relative to ``degraded/``
    (so they equal those of ``prepare_images(IN/degraded)``). JPEG draft decoding
    is not used here, so both sides are decoded at full resolution.

    Args:
        in_dir: folder with ``degraded/`` and (unless ``require_clean`` is False) ``clean/``.
        out_dir: output folder (created).
        cfg: ``data`` section of the config.
        require_clean: False for a test set whose ``clean/`` may be absent; then only
            ``degraded.zarr`` is written (and a stale ``clean.zarr`` is removed).

    Returns:
        A :class:`PairedResult`.

    Raises:
        FileNotFoundError: ``degraded/`` (or a required ``clean/``) is missing.
        NoUsableImagesError: no usable pair.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    layout = paired_layout(in_dir)
    deg_name, clean_name = layout
    has_clean = (in_dir / clean_name).is_dir()
    if require_clean and not has_clean:
        raise FileNotFoundError(f"{in_dir}: expected {deg_name}/ and {clean_name}/ folders; {clean_name}/ is missing")
    degraded = list_inputs(in_dir / deg_name, exclude=out_dir)
    clean = list_inputs(in_dir / clean_name, exclude=out_dir) if has_clean else None
    pairs = match_pairs(degraded, clean, layout)
    if not pairs:
        raise NoUsableImagesError(f"{in_dir}/{deg_name}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"degraded": out_dir / "degraded.zarr", "clean": out_dir / "clean.zarr"}
    manifest = out_dir / "manifest.parquet"
    names = ["degraded", "clean"] if has_clean else ["degraded"]
    writers = {name: _writer(paths[name], len(pairs), cfg) for name in names}
    try:
        rows = [_prepare_pair(pair, cfg, writers, layout) for pair in pairs]
        if not writers["degraded"].ids:
            raise NoUsableImagesError(_empty_message(in_dir, rows))
        _flag_duplicates(rows)
        for writer in writers.values():
            writer.close(_store_attributes(cfg, "manifest.parquet"))
        write_parquet(staging_path(manifest), rows, PAIRED_SCHEMA)
        for name, writer in writers.items():
            commit_path(writer.tmp, paths[name])
        if not has_clean:
            remove_path(paths["clean"])
        commit_path(staging_path(manifest), manifest)
    finally:
        for writer in writers.values():
            writer.abort()
        remove_path(staging_path(manifest))
    counts = dict(sorted(Counter(row["status"] for row in rows).items()))
    n_ok = counts.get("ok", 0)
    clean_store = paths["clean"] if has_clean else None
    return PairedResult(n_ok, len(rows) - n_ok, paths["degraded"], clean_store, manifest, counts)


def _prepare_pair(pair: _Pair, cfg: DataConfig, writers: dict[str, StoreWriter],
                  names: tuple[str, str]) -> dict[str, Any]:
    """Decode one pair, write it to the stores if usable, return its manifest row."""
    deg = _decode_file(pair.degraded[1], cfg, draft=False) if pair.degraded else None
    cln = _decode_file(pair.clean[1], cfg, draft=False) if pair.clean else None
    row = _paired_row(pair, deg, cln, names)
    if row["status"] != "ok":
        return row
    assert deg is not None
    array, row["transform"] = _fit(deg, cfg)
    row["index"] = writers["degraded"].append(row["id"], array)
    if cln is not None:
        clean_array, _ = _fit(cln, cfg)
        writers["clean"].append(row["id"], clean_array)
    return row
