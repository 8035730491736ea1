"""Files that are either whole or absent, and locks that die with their process.

Invariants:
- `atomic_write` leaves the target either as it was or complete with the new content: the data is
  written to a temp file beside it (`.tmp-<name>-<random>`), flushed and fsynced, then renamed over
  the target, and the folder is fsynced so the rename itself survives a power cut. A failure
  removes the temp file.
- `file_lock` is an OS lock (flock through `filelock`) on a lock file: the kernel releases it when
  the holder dies, however it dies, so a crash never leaves it held. Each call opens its own
  descriptor, so it orders threads of one process as well as processes.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside `path` durable (a no-op where folders cannot be opened)."""
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


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def temp_path_beside(target: Path) -> Path:
    return target.parent / f"{TMP_PREFIX}{target.name}-{secrets.token_hex(4)}"


def atomic_write(target: Path, data: bytes | str | Callable[[Path], None], *, mode: int | None = None,
                 before_replace: Callable[[], None] | None = None) -> None:
    """Replace `target` with `data` (bytes, text, or a function that writes the temp path it is given),
    durably and all at once. `mode` sets the file's permission bits before it becomes visible;
    `before_replace` runs between the fsync and the rename (crash tests hook in there)."""
    target = Path(target)
    tmp = temp_path_beside(target)
    try:
        if callable(data):
            data(tmp)
            fsync_file(tmp)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            fd = os.open(tmp, flags, 0o600 if mode is not None else 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


class LockBusy(Exception):
    """`file_lock(..., wait=False)` found the lock held by someone else."""


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive OS lock on `path` (created if missing) for the block. With wait=False, raise
    LockBusy at once when it is held; with a timeout, raise LockBusy after that many seconds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh, non-singleton, non-thread-local lock object per call: its own descriptor, so two
    # threads of this process exclude each other like two processes do.
    lock = FileLock(path, thread_local=False, is_singleton=False, preserve_lock_file=True)
    try:
        lock.acquire(timeout=(0 if not wait else (-1 if timeout is None else timeout)))
    except Timeout:
        raise LockBusy(f"{path.name} is held by another run") from None
    try:
        yield
    finally:
        lock.release()
