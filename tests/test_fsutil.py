"""The one atomic-write helper: the target is either the old file or the new one, never a
half-written one, and a failed write leaves nothing behind."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from prunefleet.shared import fsutil
from prunefleet.shared.fsutil import atomic_path, atomic_write, fsync_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_replaces_the_content_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "state.json"
    atomic_write(target, b"old")
    atomic_write(target, b"new" * 100_000)
    assert target.read_bytes() == b"new" * 100_000
    assert _names(tmp_path) == ["state.json"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_the_mode_is_honoured_whatever_the_old_file_had(tmp_path, mode):
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    os.chmod(target, 0o666)
    atomic_write(target, b"secret", mode=mode)
    assert _mode(target) == mode
    with atomic_path(tmp_path / "model.onnx", mode=mode) as tmp:
        tmp.write_bytes(b"onnx")
    assert _mode(tmp_path / "model.onnx") == mode


def test_a_failing_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "trust.json"
    atomic_write(target, b"old")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["trust.json"]


def test_a_writer_that_raises_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "workload.npz"
    atomic_write(target, b"old")
    seen = []
    with pytest.raises(RuntimeError, match="exporter crashed"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target  # same directory: rename is atomic
        tmp.write_bytes(b"half a wor")
        seen.append(target.read_bytes())  # a reader meanwhile sees the old file
        raise RuntimeError("exporter crashed")
    assert seen == [b"old"]
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["workload.npz"]


def test_ctrl_c_inside_the_block_leaves_no_file_at_all(tmp_path):
    target = tmp_path / "new.onnx"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"new but incomp")
        raise KeyboardInterrupt
    assert _names(tmp_path) == []


def test_a_missing_directory_is_an_error_not_a_stray_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "nope" / "f", b"x")
    assert _names(tmp_path) == []


def test_fsync_dir_tolerates_a_filesystem_that_cannot_sync_directories(tmp_path, monkeypatch):
    fsync_dir(tmp_path)

    def einval(fd: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(fsutil.os, "fsync", einval)
    fsync_dir(tmp_path)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fsutil.os, "fsync", eio)
    with pytest.raises(OSError, match="Input/output"):
        fsync_dir(tmp_path)
