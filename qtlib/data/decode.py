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
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from qtlib.imageio import to_rgb_image

STATUSES: dict[str, str] = {
    "ok": "usable; stored in the array",
    "not_image": "an image extension, but not an image Pillow can identify",
    "truncated": "the file ends before the image data does",
    "unreadable": "identified as an image, but decoding failed",
    "too_large": "more pixels than Pillow's decompression-bomb limit",
    "too_small": "shorter side below data.min_size",
    "unsupported_mode": "a pixel mode with no conversion to RGB",
    "no_clean": "paired data: a degraded image without a clean partner",
    "no_degraded": "paired data: a clean image without a degraded partner",
    "ambiguous": "paired data: two files share one name without extension",
    "size_mismatch": "paired data: degraded and clean differ in size",
}

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


def file_digest(data: bytes) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(data).hexdigest()


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


def decode_image(data: bytes, min_size: int = 1, draft_size: int | None = None) -> Decoded:
    """Decode image bytes into an oriented RGB image, or a failure status.

    Args:
        data: the file's bytes.
        min_size: images whose shorter side is below this get ``too_small`` (checked before decoding).
        draft_size: for JPEG, let libjpeg decode at a reduced scale that keeps both
            sides >= this many pixels (much faster for large photos); None = full size.

    Returns:
        A :class:`Decoded` with ``status`` one of :data:`STATUSES`.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated files would pass as images")
    digest = file_digest(data)
    mode, size = "", None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            mode, size = img.mode, (img.width, img.height)
            if min(size) < min_size:
                message = f"shorter side {min(size)} px < data.min_size {min_size}"
                return Decoded("too_small", message, digest, mode, size)
            img, load_note = _load(img, draft_size)
    except UnidentifiedImageError:
        return Decoded("not_image", "Pillow cannot identify this file as an image", digest)
    except Image.DecompressionBombError as exc:
        return Decoded("too_large", str(exc), digest)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return Decoded(_failure_status(exc), f"{type(exc).__name__}: {exc}", digest, mode, size)
    img, orient_note = _orient(img)
    try:
        rgb, convert_note = to_rgb_image(img)
    except ValueError as exc:
        return Decoded("unsupported_mode", f"mode {mode}: {exc}", digest, mode, size)
    steps = tuple(s for s in (load_note, orient_note, convert_note) if s)
    return Decoded("ok", "", digest, mode, size, rgb, steps)


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
