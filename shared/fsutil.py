"""Atomic file writes: a reader, a crash or a Ctrl-C never leaves a half-written file.

Every write goes to a temporary file in the target's directory (so the rename stays on one
filesystem), is fsynced, renamed over the target with :func:`os.replace` (atomic on POSIX
and Windows), and the directory is fsynced so that the rename itself survives a power
loss. If anything fails before the rename, the temporary file is removed and the target is
left as it was.

- :func:`atomic_write` for bytes in memory;
- :func:`atomic_path` for writers that need a path of their own (ONNX export, ``np.savez``);
- :func:`fsync_dir` for code that renames by itself (a streamed upload, a verified download).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write", "fsync_dir"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the renames and creations in directory ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):  # cannot open a directory here (Windows)
        return
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems cannot fsync a directory; nothing more can be done there.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``) atomically and durably."""
    with atomic_path(path, mode=mode) as tmp, open(tmp, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``.

    The caller writes the temporary path any way it likes. When the block exits without an
    exception the file is fsynced, renamed over ``target`` and the directory fsynced; on
    any exception, ``KeyboardInterrupt`` included, the temporary file is removed.
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, mode)  # mkstemp makes the file 0600; fchmod ignores the umask
        finally:
            os.close(fd)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
