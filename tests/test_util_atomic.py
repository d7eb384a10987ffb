"""qtlib.util.atomic: temp sibling, fsync, os.replace; nothing left behind on error."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from qtlib.util.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    commit_file,
    default_file_mode,
    discard,
    make_temp,
    remove_path,
    remove_stale_temps,
    replace_dir,
)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_smoke_atomic_path_writes(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "table.bin"  # the folder is created
    with atomic_path(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".table.bin.") and tmp.is_file()
        tmp.write_bytes(b"abc")
        assert not out.exists()  # nothing visible before the commit
    assert out.read_bytes() == b"abc"
    assert sorted(p.name for p in out.parent.iterdir()) == ["table.bin"]


def test_atomic_write_bytes_and_text(tmp_path: Path) -> None:
    assert atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01") == tmp_path / "a.bin"
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "a.txt", "grüße\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "grüße\n"
    atomic_write_text(tmp_path / "a.txt", "second")  # replaces
    assert (tmp_path / "a.txt").read_text() == "second"


def test_suffix_is_kept_for_format_sniffing_writers(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "img.png", suffix=".png") as tmp:
        assert tmp.suffix == ".png"
        tmp.write_bytes(b"x")


def test_exception_leaves_no_file_and_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "x.parquet"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_exception_does_not_clobber_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    out.write_bytes(b"good")
    with pytest.raises(ValueError), atomic_path(out) as tmp:
        tmp.write_bytes(b"bad")
        raise ValueError
    assert out.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.mark.usefixtures("umask_022")
def test_permissions_follow_umask(tmp_path: Path) -> None:
    assert default_file_mode() == 0o644
    with atomic_path(tmp_path / "a") as tmp:
        assert _mode(tmp) == 0o600  # mkstemp's mode, until the commit
        tmp.write_bytes(b"1")
    assert _mode(tmp_path / "a") == 0o644
    atomic_write_text(tmp_path / "b", "1")
    assert _mode(tmp_path / "b") == 0o644
    # the same as a plain open() under the same umask
    (tmp_path / "c").write_text("1")
    assert _mode(tmp_path / "c") == _mode(tmp_path / "a")


def test_permissions_follow_a_stricter_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        assert default_file_mode() == 0o600
        atomic_write_bytes(tmp_path / "a", b"1")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a") == 0o600


def test_make_temp_commit_discard(tmp_path: Path) -> None:
    # The two halves, as a writer that stays open across calls (LedgerWriter) uses them.
    tmp = make_temp(tmp_path / "ledger.parquet")
    tmp.write_bytes(b"rows")
    assert commit_file(tmp, tmp_path / "ledger.parquet") == tmp_path / "ledger.parquet"
    assert not tmp.exists() and (tmp_path / "ledger.parquet").read_bytes() == b"rows"
    other = make_temp(tmp_path / "ledger.parquet")
    discard(other)
    discard(other)  # twice is fine
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.parquet"]


def test_replace_dir_swaps_a_non_empty_folder(tmp_path: Path) -> None:
    final, new = tmp_path / "images.zarr", tmp_path / ".images.zarr.partial"
    final.mkdir()
    (final / "old").write_text("old")
    new.mkdir()
    (new / "new").write_text("new")
    assert replace_dir(new, final) == final
    assert [p.name for p in final.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.zarr"]  # no .old, no .partial left


def test_replace_dir_into_empty_place(tmp_path: Path) -> None:
    new = tmp_path / ".d.partial"
    new.mkdir()
    replace_dir(new, tmp_path / "d")
    assert (tmp_path / "d").is_dir() and not new.exists()


def test_remove_path(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "d")
    remove_path(tmp_path / "link")  # the link only, not its target
    assert (tmp_path / "d" / "e").is_dir()
    for name in ("d", "f", "missing"):
        remove_path(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_remove_stale_temps_clears_what_a_killed_writer_left(tmp_path: Path) -> None:
    out = tmp_path / "shard_0.parquet"
    left = [make_temp(out), tmp_path / ".shard_0.parquet.partial", tmp_path / ".shard_0.parquet.old"]
    left[1].write_bytes(b"x")
    left[2].mkdir()
    keep = [out, tmp_path / "shard_0.parquet.partial", tmp_path / ".shard_1.parquet.abcdefgh.tmp",
            tmp_path / ".shard_0.parquet"]  # the output, a step checkpoint, another output's temp, no suffix
    for p in keep:
        p.write_bytes(b"y")
    assert sorted(remove_stale_temps(out)) == sorted(left)
    assert sorted(tmp_path.iterdir()) == sorted(keep)
    assert remove_stale_temps(tmp_path / "missing" / "x.pt") == []
