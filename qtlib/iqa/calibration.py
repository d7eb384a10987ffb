"""pyiqa's published calibration values and the reference images that ship in its wheel.

The pyiqa wheel installs five distorted images (``ResultsCalibra/dist_dir``) and
their references (``ResultsCalibra/ref_dir``) as a top-level folder of
site-packages; it does NOT ship ``ResultsCalibra/calibration_summary.csv``. The
values below are that file's rows ``<metric>(ours)`` (pyiqa's own
implementation) as published in the IQA-PyTorch repository (github.com/chaofengc/
IQA-PyTorch, ``ResultsCalibra/calibration_summary.csv``, commit 065c2b73).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pyiqa

CALIBRATION_IMAGES: tuple[str, ...] = ("I03.bmp", "I04.bmp", "I06.bmp", "I08.bmp", "I19.bmp")

# metric -> scores of CALIBRATION_IMAGES, in that order (full-reference metrics
# compare dist_dir/<img> against ref_dir/<img>).
PUBLISHED: dict[str, tuple[float, ...]] = {
    "brisque": (94.6452, -0.1082, 1.0759, 5.1423, 66.8381),
    "niqe": (15.6538, 3.6549, 3.2342, 3.1921, 9.0722),
    "piqe": (100.0, 21.6242, 35.8646, 41.147, 76.9485),
    "entropy": (6.9511, 6.9661, 7.5309, 7.5565, 5.7629),
    "musiq": (12.4773, 75.7764, 73.7459, 75.4604, 38.0248),
    "psnr": (21.1136, 20.9872, 27.0139, 23.3002, 21.6186),
    "ssim": (0.6997, 0.9978, 0.9989, 0.9671, 0.6522),
}

TOLERANCE = 0.05


def calibration_dir() -> Path:
    """The ``ResultsCalibra`` folder installed by the pyiqa wheel.

    Raises:
        FileNotFoundError: when the installed pyiqa does not ship it.
    """
    candidates: list[Path] = []
    try:
        files = importlib.metadata.files("pyiqa") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.parts[:2] == ("ResultsCalibra", "dist_dir"):
            candidates.append(Path(str(entry.locate())).parent.parent)
            break
    candidates.append(Path(pyiqa.__file__).resolve().parent.parent / "ResultsCalibra")
    for folder in candidates:
        if all((folder / "dist_dir" / name).is_file() for name in CALIBRATION_IMAGES):
            return folder
    raise FileNotFoundError(
        "pyiqa's calibration images (ResultsCalibra/dist_dir/I03.bmp ...) are not installed next to pyiqa"
    )


def calibration_images(kind: str = "dist_dir") -> list[Path]:
    """Paths of the five calibration images (``kind``: ``dist_dir`` or ``ref_dir``), in published order."""
    if kind not in ("dist_dir", "ref_dir"):
        raise ValueError(f"kind: expected 'dist_dir' or 'ref_dir', got {kind!r}")
    folder = calibration_dir() / kind
    return [folder / name for name in CALIBRATION_IMAGES]
