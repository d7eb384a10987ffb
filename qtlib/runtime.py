"""Small runtime helpers every stage shares: device choice and file identity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def resolve_device(device: str | torch.device, rank: int = 0) -> torch.device:
    """``auto`` = CUDA when available, else CPU; plain ``cuda`` means ``cuda:rank``.

    Raises:
        ValueError: CUDA was asked for but no CUDA device is available.
    """
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA device is available")
        if dev.index is None:
            return torch.device("cuda", rank)
    return dev


def file_hash(path: str | Path) -> str:
    """First 16 hex digits of a file's sha256 (a checkpoint's identity in ledgers and fingerprints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
