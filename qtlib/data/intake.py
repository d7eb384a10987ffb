"""One intake path for every command that reads user images (qt prepare, score, restore, degrade).

:func:`read_file` turns one path into an :class:`Intake`: a status from
:data:`~qtlib.data.decode.STATUSES` (``ok``, ``empty``, ``not_image``,
``truncated``, ``too_small``, ``too_large``, ``unreadable``, ...), a one-line
message that names the file and the problem, and the oriented RGB image when
usable. It never raises for a bad file, so a folder run goes on past it;
:func:`summary` gives the closing line and :func:`exit_code` the rule every
command follows: non-zero only when no file was usable.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qtlib.data.decode import DEFAULT_MAX_PIXELS, Decoded, decode_image
from qtlib.imageio import to_tensor

OK = "ok"


@dataclass(frozen=True)
class Intake:
    """The outcome of reading one image file.

    Attributes:
        path: the file.
        status: ``"ok"`` or a failure code of :data:`~qtlib.data.decode.STATUSES`.
        message: why it failed (``""`` when ok).
        image: the oriented 8-bit RGB Pillow image when ok, else None.
        sha256: hex digest of the file ('' when it could not be read).
        mode: Pillow mode as stored; orig_size: (width, height) as stored, or None.
        steps: what was done to reach ``image`` (orientation, conversion).
    """

    path: Path
    status: str
    message: str = ""
    image: Image.Image | None = None
    sha256: str = ""
    mode: str = ""
    orig_size: tuple[int, int] | None = None
    steps: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def line(self) -> str:
        """``PATH: STATUS: message`` (one line)."""
        return f"{self.path}: {self.status}: {' '.join(self.message.split())}"

    def tensor(self) -> torch.Tensor:
        """The image as a ``(3, H, W)`` float32 tensor in [0, 1] (only when ok)."""
        if self.image is None:
            raise ValueError(f"{self.path}: no image ({self.status})")
        return to_tensor(np.asarray(self.image, dtype=np.uint8))

    def decoded(self) -> Decoded:
        """The same outcome as a :class:`~qtlib.data.decode.Decoded` (what ``qt prepare`` consumes)."""
        return Decoded(self.status, self.message, self.sha256, self.mode, self.orig_size, self.image, self.steps)


def read_file(
    path: str | Path,
    min_size: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    digest: bool = True,
) -> Intake:
    """Read one image file; never raises for a bad or unreadable file.

    Args:
        path: the file.
        min_size: shorter sides below this give ``too_small``.
        max_pixels: more pixels than this give ``too_large`` (checked on the header, before decoding).
        draft_size: JPEG only, decode at a reduced scale keeping both sides >= this (None = full size).
        digest: compute the sha256 of the file (False: ``sha256`` is '').

    Returns:
        An :class:`Intake`; ``image`` is set only when ``status == "ok"``.
    """
    path = Path(path)
    try:
        decoded = decode_image(path, min_size, draft_size, max_pixels, digest)
    except OSError as exc:
        return Intake(path, "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}")
    return Intake(path, decoded.status, decoded.message, decoded.image, decoded.sha256, decoded.mode,
                  decoded.orig_size, decoded.steps)


def counts(results: Iterable[Intake]) -> dict[str, int]:
    """Files per status, ``ok`` first, then the failures by name."""
    c = Counter(r.status for r in results)
    return {k: c[k] for k in sorted(c, key=lambda s: (s != OK, s))}


def summary(results: Iterable[Intake], verb: str = "usable") -> str:
    """``"5 files: 3 usable, 2 skipped (not_image: 1, truncated: 1)"``."""
    c = counts(results)
    total, ok = sum(c.values()), c.get(OK, 0)
    bad = ", ".join(f"{k}: {v}" for k, v in c.items() if k != OK)
    return f"{total} file{'s' * (total != 1)}: {ok} {verb}, {total - ok} skipped" + (f" ({bad})" if bad else "")


def exit_code(n_usable: int) -> int:
    """The rule of every intake command: exit 1 only when nothing was usable."""
    return 0 if n_usable > 0 else 1
