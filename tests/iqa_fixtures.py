"""Shared fixtures and helpers of the IQA tests (import the fixtures by name into a test module).

- ``prepared``: runs ``qt weights prepare``'s function once per session (needed
  anyway: BRISQUE and NIQE load only after it), returns pyiqa's cache folder.
- ``random_weight_cache``: a temporary ``TORCH_HOME`` holding MUSIQ-KonIQ with
  random weights, an OpenAI-format CLIP RN50 archive with random weights and the
  prepared BRISQUE file, so the paper ensemble's code path runs without internet.
  The only thing bypassed is the SHA-256 check of pyiqa's CLIP loader (a random
  archive cannot match OpenAI's hash); the file is read from the cache as usual.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.random_weights import (
    write_random_clip_archive,  # the one random CLIP RN50 builder
)
from qtlib.imageio import to_tensor


def natural_images(n: int = 4, size: int = 128, offset: int = 0) -> torch.Tensor:
    """``(n, 3, size, size)`` crops of photos that ship with scikit-image, in [0, 1]."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    crops = []
    for k in range(n):
        photo = photos[k % len(photos)]
        y = (37 * (k + offset)) % (photo.shape[0] - size)
        x = (53 * (k + offset)) % (photo.shape[1] - size)
        crops.append(to_tensor(np.ascontiguousarray(photo[y : y + size, x : x + size])))
    return torch.stack(crops)


@pytest.fixture(scope="session")
def prepared() -> Path:
    """BRISQUE and NIQE files in pyiqa's cache, verified against the published scores."""
    from qtlib.iqa import weights

    report = weights.prepare()
    assert all(f.verification.ok for f in report.files)
    return report.cache_dir


@pytest.fixture(scope="module")
def random_weight_cache(tmp_path_factory: pytest.TempPathFactory, prepared: Path) -> Iterator[Path]:
    """A temporary TORCH_HOME with random-weight MUSIQ-KonIQ and CLIP RN50 files plus the real BRISQUE file."""
    from pyiqa.archs import clip_model
    from pyiqa.archs.musiq_arch import MUSIQ
    from pyiqa.utils import download_util

    from qtlib.iqa import CATALOG

    home = tmp_path_factory.mktemp("torch_home")
    pyiqa_dir = home / "hub" / "pyiqa"
    pyiqa_dir.mkdir(parents=True)
    torch.manual_seed(0)
    (musiq_file,) = CATALOG["musiq"].weights
    torch.save(MUSIQ(pretrained=False).state_dict(), pyiqa_dir / musiq_file.name)
    (brisque_file,) = CATALOG["brisque"].weights
    shutil.copyfile(prepared / brisque_file.name, pyiqa_dir / brisque_file.name)
    (clip_file,) = CATALOG["clipiqa"].weights
    write_random_clip_archive(home / "hub" / "clip" / clip_file.name)

    def download_without_sha_check(url: str, root: str) -> str:
        return os.path.join(root, os.path.basename(url))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        mp.setattr(download_util, "DEFAULT_CACHE_DIR", str(pyiqa_dir))
        mp.setattr(clip_model, "_download", download_without_sha_check)
        yield home
