"""The restore stage: run a model over an image file or a folder of images, tiled when large.

Large images are cut into overlapping tiles, restored in batches, and blended
back with a window that ramps linearly over ``overlap`` pixels at every tile
edge, so seams fade instead of showing. Tile starts are multiples of the
model's ``size_multiple`` (its pooling grid) and the last tile along a side
ends at the image border, so every tile sees the pooling grid and the border
padding of the whole image: away from the seams a tiled restore of a
translation-equivariant model (the U-Net) then equals the whole-image restore
up to float rounding. Models with global operations (NAFNet's channel
attention pools over the whole input) see tile statistics instead, and differ
a little everywhere.

Memory: an image with a side above ``tile_above`` (2048 px by default) is tiled
even without ``tile``, and every tiled image goes through
:func:`restore_streaming`: it reads tiles from the decoded 8-bit image, keeps
only one row of tiles in float, and writes finished rows into a uint8 output
buffer. Peak memory is then about 7 bytes per pixel (the decoded input, 4 bytes
per pixel inside Pillow, plus the 3-byte output; then the output and Pillow's
copy of it while the PNG is encoded), plus ``tile x width`` floats and the
model's activations on one batch of tiles: it does not grow with the image
beyond that. Images restored whole need about 60 bytes per pixel (float input,
output, activations).

Every input goes through :func:`qtlib.data.intake.read_file`: a file that
cannot be used (empty, not an image, truncated, above ``max_pixels``) is
reported and skipped, and the run goes on.

Which weights restore: :func:`load_restorer` takes the STUDENT weights of a
``student`` checkpoint by default. Those are the weights the score conditioning
was trained on; the EMA copy in the same file trails them (``train.ema_decay``,
0.998 by default), so its score embedding, which starts at zero, is a damped
copy of the student's, and after short rounds its output barely changes with
the score.
``ema=True`` takes the EMA weights instead. A ``teacher`` checkpoint holds only
EMA weights and a ``pretrain`` checkpoint only its model weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from qtlib.data.decode import DEFAULT_MAX_PIXELS
from qtlib.data.intake import Intake, read_file
from qtlib.imageio import (
    IMAGE_EXTENSIONS,
    list_images,
    write_image,
    write_uint8,
)
from qtlib.models import CheckpointError, load_checkpoint, load_model, size_multiple
from qtlib.runtime import resolve_device

ScoreArg = float | torch.Tensor

#: Tile side used when an image is tiled because a side exceeds ``tile_above`` (and no ``tile`` was given).
DEFAULT_TILE = 512
#: Images with a side above this are tiled by default (bounded memory, see the module doc).
DEFAULT_TILE_ABOVE = 2048


@dataclass(frozen=True)
class RestoreResult:
    """What :func:`restore_path` wrote, and every input it could not use (with status and message)."""

    outputs: list[Path]
    seconds: float
    skipped: list[Intake] = field(default_factory=list)


def tile_spans(size: int, tile: int, overlap: int, multiple: int = 1) -> list[tuple[int, int]]:
    """(start, length) of the tiles along one side of length ``size``.

    Starts are multiples of ``multiple`` (the model's pooling grid), so each tile
    sees the same grid as the whole image. The stride is ``tile - overlap``
    rounded down to a multiple (at least ``multiple``); the last tile ends at
    ``size`` and is up to ``multiple - 1`` pixels longer than ``tile`` so it can
    start on the grid. Neighbours overlap by at least ``min(overlap, tile - multiple)``.
    """
    if tile >= size:
        return [(0, size)]
    stride = max(multiple, (tile - overlap) // multiple * multiple)
    last = (size - tile) // multiple * multiple
    starts = list(range(0, last, stride)) + [last]
    return [(s, tile) for s in starts[:-1]] + [(last, size - last)]


def blend_window(length: int, overlap: int, single: bool, device: torch.device | None = None) -> torch.Tensor:
    """1-D weights of a tile: ramping linearly from ~0 to 1 over ``overlap`` px at both ends, 1 inside.

    ``single`` (the only tile along this side) or ``overlap == 0`` gives all ones.
    Weights stay > 0, so pixels covered by one tile only are normalized exactly.
    """
    if single or overlap <= 0:
        return torch.ones(length, device=device)
    i = torch.arange(length, device=device, dtype=torch.float32)
    return (torch.minimum(i + 0.5, length - i - 0.5) / overlap).clamp(max=1.0)


@dataclass(frozen=True)
class Restorer:
    """A model loaded for restoring, with what its checkpoint says about it.

    Attributes:
        model: in eval mode; called as ``model(x, score)`` (an unconditioned model ignores the score).
        weights: ``"student"``, ``"EMA"`` or ``"model"`` (a pretrain checkpoint's only weights).
        kind: the checkpoint kind.
        conditioned: the output depends on the score (``model_config.conditioning.enabled``).
        top_score: scores above it give the same output as it (None when unconditioned).
    """

    model: nn.Module
    weights: str
    kind: str
    conditioned: bool
    top_score: float | None


def load_restorer(path: str | Path, ema: bool = False, device: str | torch.device = "cpu") -> Restorer:
    """Load a checkpoint for restoring: the student weights by default, the EMA weights with ``ema=True``.

    Args:
        path: a qtlib checkpoint (any kind).
        ema: take the EMA weights (``student`` and ``train-state`` checkpoints hold both; a
            ``teacher`` checkpoint holds only EMA weights, taken either way).
        device: where to put the model.

    Raises:
        CheckpointError: see :func:`~qtlib.models.load_checkpoint`; also ``ema=True`` for a
            checkpoint without EMA weights (``pretrain``).
    """
    ckpt = load_checkpoint(path)
    has_ema = ckpt.ema_state is not None or ckpt.kind == "teacher"
    if ema and not has_ema:
        raise CheckpointError(f"{path}: a {ckpt.kind!r} checkpoint holds no EMA weights")
    weights = "EMA" if ckpt.kind == "teacher" or ema else ("student" if ckpt.ema_state is not None else "model")
    cond = ckpt.model_config.conditioning
    model = load_model(path, use_ema=ema, device=device)
    return Restorer(model, weights, ckpt.kind, cond.enabled, float(cond.top_score) if cond.enabled else None)


def restore_tiled(
    model: nn.Module, image: torch.Tensor, score: float, tile: int, overlap: int = 32, batch_size: int = 1
) -> torch.Tensor:
    """Restore one ``(C, H, W)`` image tile by tile, blending overlaps; returns ``(C', H, W)``.

    Tiles of equal size are batched ``batch_size`` at a time.
    """
    if overlap < 0 or overlap >= tile:
        raise ValueError(f"overlap: expected 0 <= overlap < tile ({tile}), got {overlap}")
    _, h, w = image.shape
    m = size_multiple(model)
    ys, xs = tile_spans(h, tile, overlap, m), tile_spans(w, tile, overlap, m)
    by_size: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for y, th in ys:
        for x, tw in xs:
            by_size.setdefault((th, tw), []).append((y, x))
    out: torch.Tensor | None = None
    weight = torch.zeros((h, w), device=image.device)
    for (th, tw), corners in by_size.items():
        window = blend_window(th, overlap, len(ys) == 1, image.device)[:, None] * blend_window(
            tw, overlap, len(xs) == 1, image.device
        )
        for i in range(0, len(corners), batch_size):
            chunk = corners[i : i + batch_size]
            tiles = torch.stack([image[:, y : y + th, x : x + tw] for y, x in chunk])
            pred = model(tiles, torch.full((len(chunk),), float(score), device=image.device))
            if out is None:
                out = torch.zeros((pred.shape[1], h, w), device=pred.device, dtype=pred.dtype)
            for (y, x), p in zip(chunk, pred, strict=True):
                out[:, y : y + th, x : x + tw] += p * window
                weight[y : y + th, x : x + tw] += window
    assert out is not None
    return out / weight


def tile_for(height: int, width: int, tile: int | None, tile_above: int | None = DEFAULT_TILE_ABOVE) -> int | None:
    """The tile side for an image, or None to restore it whole.

    ``tile`` (when given) tiles every image with a side above it; otherwise an image with a
    side above ``tile_above`` is tiled at ``min(DEFAULT_TILE, tile_above)`` (None = never).
    """
    side = max(height, width)
    if tile is not None:
        return tile if side > tile else None
    if tile_above is not None and side > tile_above:
        return min(DEFAULT_TILE, tile_above)
    return None


def _tile_tensor(image: Image.Image | np.ndarray, y: int, x: int, th: int, tw: int) -> torch.Tensor:
    """One ``(3, th, tw)`` float tile of an 8-bit RGB image (a crop: the whole image is never converted)."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.crop((x, y, x + tw, y + th)), dtype=np.uint8)
    else:
        arr = image[y : y + th, x : x + tw]
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def restore_streaming(
    model: nn.Module,
    image: Image.Image | np.ndarray,
    score: float,
    tile: int,
    overlap: int = 32,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Restore an 8-bit RGB image tile by tile into a uint8 buffer, one row of tiles in float at a time.

    The same tiles and blend as :func:`restore_tiled` (equal up to float summation order),
    but memory beyond the input and the uint8 output is one row of tiles
    (``C x (tile + overlap) x W`` floats) and one batch of tiles through the model.

    Args:
        model: the restorer, on ``device``, in eval mode.
        image: an RGB Pillow image or an ``(H, W, 3)`` uint8 array.
        score: quality score; tile, overlap, batch_size: as :func:`restore_tiled`.
        device: where the tiles go.

    Returns:
        The ``(H, W, 3)`` uint8 restoration.
    """
    if overlap < 0 or overlap >= tile:
        raise ValueError(f"overlap: expected 0 <= overlap < tile ({tile}), got {overlap}")
    w, h = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
    m, dev = size_multiple(model), torch.device(device)
    ys, xs = tile_spans(h, tile, overlap, m), tile_spans(w, tile, overlap, m)
    out = np.empty((h, w, 3), dtype=np.uint8)
    rows = max(th for _, th in ys)  # one row of tiles; allocated once, the carried overlap shifted up
    acc, weight, lo = torch.zeros((3, rows, w), device=dev), torch.zeros((rows, w), device=dev), 0
    for r, (y, th) in enumerate(ys):
        wy = blend_window(th, overlap, len(ys) == 1, dev)
        for i in range(0, len(xs), batch_size):
            chunk = xs[i : i + batch_size]
            for size in sorted({tw for _, tw in chunk}):  # the last tile of a row may be wider
                part = [(x, tw) for x, tw in chunk if tw == size]
                tiles = torch.stack([_tile_tensor(image, y, x, th, tw) for x, tw in part]).to(dev)
                pred = model(tiles, torch.full((len(part),), float(score), device=dev)).float()
                window = wy[:, None] * blend_window(size, overlap, len(xs) == 1, dev)
                for (x, tw), p in zip(part, pred, strict=True):
                    acc[:, y - lo : y - lo + th, x : x + tw].addcmul_(p, window)
                    weight[y - lo : y - lo + th, x : x + tw] += window
                del tiles, pred
        done = (ys[r + 1][0] if r + 1 < len(ys) else h) - lo  # rows no later tile touches
        block = acc[:, :done].div_(weight[:done]).clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)
        out[lo : lo + done] = block.permute(1, 2, 0).cpu().numpy()
        carry = y + th - lo - done
        acc[:, :carry] = acc[:, done : done + carry].clone()
        weight[:carry] = weight[done : done + carry].clone()
        acc[:, carry:] = 0
        weight[carry:] = 0
        lo += done
    return out


def restore_tensor(
    model: nn.Module,
    x: torch.Tensor,
    score: ScoreArg = 7.0,
    tile: int | None = None,
    overlap: int = 32,
    batch_size: int = 1,
) -> torch.Tensor:
    """Restore a batch, tiling each image whose side exceeds ``tile``.

    Args:
        model: any built model, called as ``model(x, score)`` (an unconditioned one ignores the score).
        x: images on the model's device.
        score: one quality score (0..10) for all images, or one per image.
        tile: tile side in pixels; None = whole images.
        overlap: overlap of neighbouring tiles in pixels (blended).
        batch_size: tiles per forward pass.

    Shape:
        - x: (B, C, H, W); score: a number or (B,).
        - Output: (B, C', H, W), not clamped.
    """
    if x.ndim != 4:
        raise ValueError(f"x: expected shape (B, C, H, W), got {tuple(x.shape)}")
    scores = torch.as_tensor(score, dtype=torch.float32, device=x.device)
    if scores.numel() not in (1, x.shape[0]):
        raise ValueError(f"score: expected a number or shape ({x.shape[0]},), got {tuple(scores.shape)}")
    scores = scores.reshape(-1).expand(x.shape[0])
    if tile is None or (x.shape[-2] <= tile and x.shape[-1] <= tile):
        return model(x, scores)
    return torch.stack([
        restore_tiled(model, img, float(s), tile, overlap, batch_size) for img, s in zip(x, scores, strict=True)
    ])


def output_paths(src: Path, dst: Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs: a folder maps to the same relative names with suffix ``.png``.

    A single file goes to ``dst`` when ``dst`` ends in ``.png``, else into folder ``dst``.
    """
    if src.is_file():
        if dst.suffix.lower() in IMAGE_EXTENSIONS and dst.suffix.lower() != ".png":
            raise ValueError(f"{dst}: outputs are PNG files; name the output .png or give a folder")
        return [(src, dst if dst.suffix.lower() == ".png" else dst / f"{src.stem}.png")]
    files = list_images(src)
    if not files:
        raise FileNotFoundError(f"{src}: no images found")
    pairs = [(f, dst / f.relative_to(src).with_suffix(".png")) for f in files]
    seen: dict[Path, Path] = {}
    for f, out in pairs:
        if out in seen:
            raise ValueError(f"{f} and {seen[out]} would both be written to {out}")
        seen[out] = f
    return pairs


def _untiled_groups(
    items: Iterator[tuple[Path, Intake]], batch_size: int
) -> Iterator[list[tuple[Path, Intake]]]:
    """Group consecutive same-size images into batches of up to ``batch_size``."""
    group: list[tuple[Path, Intake]] = []
    for out, item in items:
        assert item.image is not None
        if group and (item.image.size != group[0][1].image.size or len(group) == batch_size):  # type: ignore[union-attr]
            yield group
            group = []
        group.append((out, item))
    if group:
        yield group


def restore_path(
    model: nn.Module,
    src: str | Path,
    dst: str | Path,
    score: float = 7.0,
    device: str | torch.device = "cpu",
    tile: int | None = None,
    overlap: int = 32,
    batch_size: int = 1,
    progress: bool = True,
    tile_above: int | None = DEFAULT_TILE_ABOVE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    report: Callable[[Intake], None] | None = None,
) -> RestoreResult:
    """Restore an image file or a folder (recursively) into PNGs with the same relative names.

    Args:
        model: the restorer (moved to ``device``; run in eval mode, its mode restored afterwards).
        src: an image file or a folder of images (any sizes, nested folders).
        dst: output folder (or a ``.png`` file when ``src`` is a file).
        score: quality score on the 0..10 scale (7 = the paper's top level).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        tile: tile every image with a side above this (None: see ``tile_above``).
        overlap: tile overlap in pixels, blended.
        batch_size: tiles (or same-size images) per forward pass.
        progress: show a tqdm bar.
        tile_above: without ``tile``, images with a side above this are tiled at
            ``min(DEFAULT_TILE, tile_above)`` px, streamed (None = restore every image whole).
        max_pixels: images with more pixels are skipped as ``too_large`` before decoding.
        report: called with each skipped input as it is skipped (e.g. to print its line).

    Returns:
        :class:`RestoreResult` with the written paths, the wall time and the skipped inputs.
    """
    src, dst = Path(src), Path(dst)
    if tile is not None and not 0 <= overlap < tile:
        raise ValueError(f"overlap: expected 0 <= overlap < tile ({tile}), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    pairs = output_paths(src, dst)
    clash = {p.resolve() for p, _ in pairs} & {o.resolve() for _, o in pairs}
    if clash:
        raise ValueError(f"{min(clash)}: output would overwrite an input; choose another output folder")
    dev = resolve_device(device)
    was_training = model.training
    model.to(dev).eval()
    start, written, skipped = time.perf_counter(), [], []

    def skip(item: Intake) -> None:
        skipped.append(item)
        if report is not None:
            report(item)

    def usable() -> Iterator[tuple[Path, Intake]]:
        """Decoded inputs to restore whole; tiled ones are restored and written here, as they come."""
        for path, out in pairs:
            item = read_file(path, max_pixels=max_pixels, digest=False)
            if not item.ok or item.image is None:
                skip(item)
                bar.update(1)
                continue
            t = tile_for(item.image.height, item.image.width, tile, tile_above)
            if t is None:
                yield out, item
                continue
            try:
                array = restore_streaming(model, item.image, score, t, min(overlap, t - 1), batch_size, dev)
            except (RuntimeError, ValueError) as exc:
                skip(_failed(path, exc))
            else:
                del item  # the decoded input goes before the output is encoded
                write_uint8(out, array)
                written.append(out)
            bar.update(1)

    try:
        with torch.inference_mode(), tqdm(total=len(pairs), unit="img", desc="restore", disable=not progress) as bar:
            for group in _untiled_groups(usable(), batch_size):
                try:
                    batch = torch.stack([item.tensor() for _, item in group]).to(dev)
                    restored = restore_tensor(model, batch, score).cpu()
                except (RuntimeError, ValueError) as exc:
                    for _, item in group:
                        skip(_failed(item.path, exc))
                else:
                    for (out, _), img in zip(group, restored, strict=True):
                        write_image(out, img)
                        written.append(out)
                bar.update(len(group))
    finally:
        model.train(was_training)
    return RestoreResult(outputs=written, seconds=time.perf_counter() - start, skipped=skipped)


def _failed(path: Path, exc: BaseException) -> Intake:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return Intake(path, "restore_failed", f"{type(exc).__name__}: {first}")
