"""Decode one image file into an oriented 8-bit RGB image, or say why it cannot be used.

The statuses are data (:data:`STATUSES`), so the manifest, the CLI and the
README describe the same codes. Decoding never relies on Pillow's lenient mode:
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` stays False and every image is fully
loaded, so a truncated file is reported instead of silently padded with grey.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from qtlib.imageio import to_rgb_image

STATUSES: dict[str, str] = {
    "ok": "usable; stored in the array",
    "empty": "a zero-byte file",
    "not_image": "an image extension, but not an image Pillow can identify",
    "truncated": "the file ends before the image data does",
    "unreadable": "identified as an image, but decoding failed",
    "too_large": "more pixels than the decompression-bomb limit (--max-pixels, data.max_pixels)",
    "too_small": "shorter side below data.min_size",
    "unsupported_mode": "a pixel mode with no conversion to RGB",
    "no_clean": "paired data: a degraded image without a clean partner",
    "no_degraded": "paired data: a clean image without a degraded partner",
    "ambiguous": "paired data: two files share one name without extension",
    "size_mismatch": "paired data: degraded and clean differ in size",
}

#: Pillow's own decompression-bomb limit (it raises above twice ``Image.MAX_IMAGE_PIXELS``): 178,956,970 pixels.
DEFAULT_MAX_PIXELS = 178_956_970

# EXIF orientation tag values -> what exif_transpose does, for the transform record.
_ORIENTATION = {
    2: "mirror",
    3: "rotate 180",
    4: "flip",
    5: "transpose",
    6: "rotate 270",
    7: "transverse",
    8: "rotate 90",
}


@dataclass(frozen=True)
class Decoded:
    """The outcome of decoding one file.

    ``image`` is an oriented RGB Pillow image when ``status == "ok"``, else None.
    ``orig_size`` is (width, height) as stored in the file (before orientation).
    ``steps`` lists what was done to reach ``image`` (orientation, conversion).
    """

    status: str
    message: str
    sha256: str
    mode: str = ""
    orig_size: tuple[int, int] | None = None
    image: Image.Image | None = None
    steps: tuple[str, ...] = field(default_factory=tuple)


def file_digest(data: bytes | Path) -> str:
    """Hex sha256 of a file's bytes (given as bytes, or a path read in chunks)."""
    if isinstance(data, Path):
        with open(data, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    return hashlib.sha256(data).hexdigest()


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Switch Pillow's global bomb check off for one open: :func:`decode_image` checks ``max_pixels`` itself."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def too_large_message(width: int, height: int, max_pixels: int) -> str:
    """The ``too_large`` message: the size, the limit, and how to raise it."""
    return (f"{width}x{height} = {width * height:,} pixels is above the limit of {max_pixels:,} pixels "
            "(decompression-bomb guard); raise it with --max-pixels (data.max_pixels for qt prepare)")


def _failure_status(exc: BaseException) -> str:
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "truncated" in text or "broken data stream" in text:
        return "truncated"
    return "unreadable"


def _load(img: Image.Image, draft_size: int | None) -> tuple[Image.Image, str]:
    """Fully load an opened image (optionally at a reduced JPEG scale); return it and a note."""
    size = img.size
    notes = []
    if draft_size is not None and img.format == "JPEG":
        # libjpeg decodes at 1/2, 1/4 or 1/8 directly; both sides stay >= draft_size.
        img.draft(img.mode, (draft_size, draft_size))
        if img.size != size:
            notes.append(f"jpeg decode at 1/{round(size[0] / img.size[0])}")
    if getattr(img, "n_frames", 1) > 1:
        notes.append(f"first of {img.n_frames} frames")
    img.load()
    return img, "; ".join(notes)


def _orient(img: Image.Image) -> tuple[Image.Image, str]:
    try:
        orientation = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a corrupt EXIF block must not lose the image
        return img, "exif unreadable, orientation ignored"
    if orientation not in _ORIENTATION:
        return img, ""
    oriented = ImageOps.exif_transpose(img)
    return oriented, f"exif orientation {orientation} ({_ORIENTATION[orientation]})"


def decode_image(
    data: bytes | Path,
    min_size: int = 1,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    digest: bool = True,
) -> Decoded:
    """Decode image bytes (or a file, read lazily) into an oriented RGB image, or a failure status.

    Args:
        data: the file's bytes, or its path (then the file is not held in memory as bytes).
        min_size: images whose shorter side is below this get ``too_small`` (checked before decoding).
        draft_size: for JPEG, let libjpeg decode at a reduced scale that keeps both
            sides >= this many pixels (much faster for large photos); None = full size.
        max_pixels: images with more pixels get ``too_large`` (checked on the header, before decoding).
        digest: compute the sha256 (False: ``sha256`` is '').

    Returns:
        A :class:`Decoded` with ``status`` one of :data:`STATUSES`.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated files would pass as images")
    sha = file_digest(data) if digest else ""
    if (data.stat().st_size if isinstance(data, Path) else len(data)) == 0:
        return Decoded("empty", "zero-byte file", sha)
    mode, size = "", None
    try:
        with warnings.catch_warnings(), _own_pixel_limit():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
            mode, size = img.mode, (img.width, img.height)
            if size[0] * size[1] > max_pixels:
                return Decoded("too_large", too_large_message(*size, max_pixels), sha, mode, size)
            if min(size) < min_size:
                message = f"{size[0]}x{size[1]}: shorter side {min(size)} px is below the minimum of {min_size} px"
                return Decoded("too_small", message, sha, mode, size)
            img, load_note = _load(img, draft_size)
    except UnidentifiedImageError:
        return Decoded("not_image", "Pillow cannot identify this file as an image", sha)
    except Image.DecompressionBombError as exc:  # a plugin's own check (not expected with the limit off)
        return Decoded("too_large", f"{exc}; raise the limit with --max-pixels", sha)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return Decoded(_failure_status(exc), f"{type(exc).__name__}: {exc}", sha, mode, size)
    img, orient_note = _orient(img)
    try:
        rgb, convert_note = to_rgb_image(img)
    except ValueError as exc:
        return Decoded("unsupported_mode", f"mode {mode}: {exc}", sha, mode, size)
    steps = tuple(s for s in (load_note, orient_note, convert_note) if s)
    return Decoded("ok", "", sha, mode, size, rgb, steps)


def fit_square(img: Image.Image, size: int) -> tuple[np.ndarray, str]:
    """Aspect-preserving resize (shorter side -> ``size``, bicubic, antialiased) then center crop.

    Args:
        img: an RGB Pillow image.
        size: output side.

    Returns:
        The ``(size, size, 3)`` uint8 array and the transform, e.g.
        ``"resize 640x480->85x64; crop (10,0)"`` (crop offset as (left, top)).
    """
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    steps = []
    if (new_w, new_h) != (width, height):
        # Pillow widens the filter support when downscaling, which is what antialiasing means here.
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        steps.append(f"resize {width}x{height}->{new_w}x{new_h}")
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
        steps.append(f"crop ({left},{top})")
    return np.asarray(img, dtype=np.uint8).copy(), "; ".join(steps) or "none"
