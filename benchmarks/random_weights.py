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

from torch import nn


class _Holder(nn.Module):
    """A TorchScript-able node that only carries tensors (the layout of OpenAI's CLIP archives)."""

    def forward(self, x):  # noqa: D102 - never called
        return x


def write_random_clip_archive(path: Path, seed: int = 0) -> None:
    """A random CLIP RN50 as a TorchScript archive whose state_dict pyiqa's loader rebuilds.

    Used by the GPU benchmarks and by tests/iqa_fixtures.py (so it imports no pytest).
    """
    import torch
    from pyiqa.archs.clip_model import CLIP

    torch.manual_seed(seed)
    model = CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12)  # RN50's dimensions
    root = _Holder()
    for key, value in model.state_dict().items():
        *parents, leaf = key.split(".")
        node = root
        for name in parents:
            if not hasattr(node, name):
                node.add_module(name, _Holder())
            node = getattr(node, name)
        node.register_buffer(leaf, value.detach().half().clone())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(root).save(str(path))


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
