"""Atomic file and folder writes: a reader sees the old complete file or the new one, never half.

Every writer builds its output under a temporary name in the destination's
own folder (so the final ``os.replace`` is a rename within one filesystem,
which POSIX makes atomic), fsyncs it, and renames it into place only once
complete. On error the temporary is removed and an existing file is left
untouched.

Example:
    >>> from qtlib.util.atomic import atomic_path
    >>> with atomic_path("out/table.parquet") as tmp:  # doctest: +SKIP
    ...     frame.to_parquet(tmp)

Only the standard library is imported here: this module sits below every stage.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "commit_file",
    "default_file_mode",
    "discard",
    "make_temp",
    "remove_path",
    "remove_stale_temps",
    "replace_dir",
]


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    # os.umask can only be read by setting it; between the two calls another
    # thread's new files would get mode 0666/0777. Linux reports it read-only.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file now: ``0o666 & ~umask``.

    Returns:
        The permission bits, e.g. ``0o644`` under umask ``0o022``.
    """
    return 0o666 & ~_current_umask()


def make_temp(path: str | Path, suffix: str = ".tmp") -> Path:
    """Create an empty, uniquely named temporary file next to ``path`` (parents created).

    Args:
        path: the final destination.
        suffix: end of the temporary's name; pass ``path.suffix`` for writers
            that choose the format from the extension (Pillow).

    Returns:
        The temporary's path, ``.NAME.<random><suffix>`` in ``path``'s folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    return Path(tmp)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; a no-op where folders cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and all of Windows) refuse fsync on a folder
    finally:
        os.close(fd)


def commit_file(tmp: str | Path, path: str | Path) -> Path:
    """Give ``tmp`` the umask's mode, fsync it and rename it onto ``path``.

    Args:
        tmp: a finished temporary in ``path``'s folder (from :func:`make_temp`).
        path: the destination; an existing file there is replaced.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    tmp, path = Path(tmp), Path(path)
    # mkstemp creates 0600; the final file should look as if open() had made it.
    os.chmod(tmp, default_file_mode())
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def discard(tmp: str | Path) -> None:
    """Remove a temporary file if it is there (after a failed write)."""
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    Args:
        path: the final destination (its folder is created if needed).
        suffix: end of the temporary's name (see :func:`make_temp`).

    Returns:
        A context manager yielding the temporary :class:`~pathlib.Path`
        (an empty file already exists there; writers may overwrite it).

    Example:
        >>> with atomic_path(out) as tmp:  # doctest: +SKIP
        ...     torch.save(state, tmp)
    """
    tmp = make_temp(path, suffix)
    try:
        yield tmp
        commit_file(tmp, path)
    finally:
        discard(tmp)  # a no-op after a successful commit (the name is gone)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def remove_path(path: str | Path) -> None:
    """Remove a file, symlink or folder tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Move a finished folder ``tmp`` onto ``final``, replacing the folder there.

    A folder cannot replace a non-empty folder in one rename, so the old one is
    first renamed aside (``.NAME.old``), then removed: at every moment either
    the old or the new complete folder exists under some name. The files inside
    are not fsynced: a Zarr store holds one file per chunk, and syncing each
    would cost more than writing the store.

    Args:
        tmp: the complete new folder, in ``final``'s parent folder.
        final: the destination.

    Returns:
        ``final`` as a :class:`~pathlib.Path`.
    """
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    remove_path(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    remove_path(old)
    return final


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove what a killed writer of ``path`` left beside it; returns what was removed.

    A SIGKILL skips every ``finally``, so a writer's temporaries stay behind:
    ``.NAME.<8 random chars>...`` (:func:`make_temp`), ``.NAME.partial`` (a
    staged store) and ``.NAME.old`` (:func:`replace_dir`). They are never read as
    outputs, but they litter a results folder. Call this only where nothing else
    writes ``path`` at the same time (a Snakemake job owns its outputs). A step
    checkpoint ``NAME.partial`` (no leading dot) is not touched.

    Args:
        path: an output file or folder.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(partial|old|[a-z0-9_]{{8}}.*)")
    stale = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    for p in stale:
        remove_path(p)
    return stale
