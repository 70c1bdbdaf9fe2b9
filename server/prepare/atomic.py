"""Atomic file writes: a reader (or a Ctrl-C) never sees a half-written file.

Every write goes to a temporary file in the target's directory, is flushed and fsynced, then
renamed over the target with :func:`os.replace` (atomic on POSIX and Windows). If anything
fails or is interrupted before the rename, the temporary file is removed and the target is
left as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target``.

    The caller writes the temporary path (any way it likes); when the block exits without an
    exception the file is fsynced and renamed over ``target``. On any exception, including
    ``KeyboardInterrupt``, the temporary file is deleted.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, _default_mode(target))
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def _default_mode(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o777  # keep the mode of the file being replaced
    except FileNotFoundError:
        return 0o644


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def _fsync_dir(path: Path) -> None:
    """Persist a rename (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
