"""The paper's ensemble loadable without downloads, for speed measurements only (scores are meaningless).

MUSIQ-KonIQ with random weights (``pyiqa``'s ``MUSIQ(pretrained=False)``), a
randomly initialised CLIP RN50 archive in OpenAI's format, and the real BRISQUE
file (rebuilt offline by ``qt weights prepare``) are placed in a fresh
``TORCH_HOME``; pyiqa then loads them through its ordinary code path, as
``tests/iqa_fixtures.py`` does. The architectures, and so the cost, are the real ones.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def install(home: Path) -> Path:
    """Fill ``home`` with the three members' files and point pyiqa and torch.hub at it; returns it.

    Raises:
        FileNotFoundError: BRISQUE's file is not in the current pyiqa cache (run ``qt weights prepare``).
    """
    import torch
    from pyiqa.archs import clip_model
    from pyiqa.archs.musiq_arch import MUSIQ
    from pyiqa.utils import download_util

    from qtlib.iqa import CATALOG
    from tests.iqa_fixtures import write_random_clip_archive

    (brisque,) = CATALOG["brisque"].weights
    src = brisque.path()
    if not src.is_file():
        raise FileNotFoundError(f"{src}: run `qt weights prepare` first (BRISQUE is rebuilt offline)")
    pyiqa_dir = home / "hub" / "pyiqa"
    pyiqa_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, pyiqa_dir / brisque.name)
    torch.manual_seed(0)
    (musiq,) = CATALOG["musiq"].weights
    torch.save(MUSIQ(pretrained=False).state_dict(), pyiqa_dir / musiq.name)
    (clip,) = CATALOG["clipiqa"].weights
    write_random_clip_archive(home / "hub" / "clip" / clip.name)
    os.environ["TORCH_HOME"] = str(home)
    download_util.DEFAULT_CACHE_DIR = str(pyiqa_dir)
    # a random archive cannot match OpenAI's SHA-256: read the cached file without the check
    clip_model._download = lambda url, root: os.path.join(root, os.path.basename(url))
    os.environ["HF_HUB_OFFLINE"] = "1"
    return home
