"""Reading, writing and listing images as float tensors in [0, 1].

One place for the conventions every stage shares: tensors are ``(3, H, W)``
float32 in [0, 1]; files are read with Pillow (EXIF orientation honoured,
converted to RGB) and written as 8-bit PNG (or by extension).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from qtlib.util.atomic import atomic_path
from qtlib.util.checks import check_shape

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive), sorted by relative path; a file is returned as itself."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 array -> ``(3, H, W)`` float32 tensor in [0, 1]."""
    check_shape(array, ["H", "W", 3], "array")
    if array.dtype != np.uint8:
        raise ValueError(f"array: expected (H, W, 3) uint8, got {array.shape} {array.dtype}")
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float().div_(255.0)


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the stores hold them: clamped, NaN/inf -> 0, rounded to uint8 (any shape, same device)."""
    return images.clamp(0, 1).nan_to_num(0.0).mul(255.0).round().to(torch.uint8)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float tensor in [0, 1] -> ``(H, W, 3)`` uint8 array (rounded, clamped)."""
    check_shape(image, [3, "H", "W"], "image")
    arr = image.detach().float().clamp(0, 1).mul(255.0).round().to(torch.uint8)
    return arr.permute(1, 2, 0).cpu().numpy()


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file as a ``(3, H, W)`` float tensor in [0, 1] (RGB, EXIF-oriented)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        rgb, _ = to_rgb_image(img)  # 16-bit keeps its range, transparency goes on white
        return to_tensor(np.asarray(rgb))


def write_image(path: str | Path, image: torch.Tensor) -> None:
    """Write a ``(3, H, W)`` tensor in [0, 1] atomically (temp file + rename); format from the suffix."""
    path = Path(path)
    # The temporary keeps the real suffix: Pillow picks the format from it.
    with atomic_path(path, suffix=path.suffix) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp)


def write_uint8(path: str | Path, array: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 array atomically; format from the suffix (no float copy of the image)."""
    check_shape(array, ["H", "W", 3], "array")
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        Image.fromarray(array).save(tmp)


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scale_wide_ints(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit L, keeping the full range (Pillow's convert would clip at 255)."""
    arr = np.asarray(img)
    if img.mode == "F":
        # Float images carry no range; [0, 1] is the common convention, else assume [0, 255].
        top = 1.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 255.0
        out = np.clip(np.nan_to_num(arr.astype(np.float64)) / top * 255.0, 0, 255)
    else:
        # I;16* are 16-bit by definition; mode I (32-bit) is assumed to hold 16-bit data too.
        out = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.round(out).astype(np.uint8))


def to_rgb_image(img: Image.Image) -> tuple[Image.Image, str]:
    """Convert a loaded Pillow image of any common mode to 8-bit RGB.

    Rules: transparency (RGBA, LA, PA, palette or grey with a transparent
    colour) is composited on white; 16-bit and 32-bit grey keep their full range
    (divided by 257, not clipped); CMYK, YCbCr, palette, 1-bit and grey use
    Pillow's conversion. ICC profiles are not applied.

    Args:
        img: a loaded Pillow image.

    Returns:
        The RGB image and a short note of the conversion ("" when it already was RGB).

    Raises:
        ValueError: the mode has no conversion to RGB (e.g. LAB without a profile).
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img, ""
    if mode.startswith("I") or mode == "F":
        note = "(/257)" if mode.startswith("I") else "(float scaled to 0-255)"
        return _scale_wide_ints(img).convert("RGB"), f"{mode}->RGB {note}"
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        return _composite_on_white(img), f"{mode}->RGB (alpha composited on white)"
    return img.convert("RGB"), f"{mode}->RGB"
