"""Durable files and advisory locks."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil

from .errors import BusyError, PgBackupError

LOCK_NAME = ".lock"


def fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, data, mode: int = 0o600):
    """Write JSON under a temporary name, fsync it, then rename it into place."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def describe_os_error(error: OSError, doing: str) -> PgBackupError:
    """Turn an OSError into an operator's message; a full disk says so plainly."""
    if error.errno == errno.ENOSPC:
        return PgBackupError(f"no space left on device while {doing}")
    if error.errno == errno.EDQUOT:
        return PgBackupError(f"disk quota exceeded while {doing}")
    return PgBackupError(f"{doing} failed: {error.strerror or error}")


def free_bytes(path: str) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def require_free_space(path: str, needed: int, purpose: str):
    """Refuse before writing anything when path's filesystem cannot hold `needed` bytes."""
    available = free_bytes(path)
    if needed > available:
        raise PgBackupError(
            f"not enough free space in {path} {purpose}: need {needed} bytes, have {available}"
        )


def remove_tree(path: str):
    shutil.rmtree(path, ignore_errors=False)


@contextlib.contextmanager
def hold(directory: str, exclusive: bool, wait: bool, what: str):
    """flock the directory's lock file: shared for readers, exclusive for writers.

    Verify and restore hold a set shared; prune must get it exclusive without
    waiting, so a set in use is never deleted under a reader.
    """
    path = os.path.join(directory, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except PermissionError:
        # A read-only copy of a set (an off-site mount) cannot be deleted by prune
        # either, so reading it without the lock is safe.
        fd = os.open(path, os.O_RDONLY) if os.path.exists(path) else None
    if fd is None:
        yield
        return
    try:
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            raise BusyError(f"{what} is in use by another pgbackup process") from None
        yield
    finally:
        os.close(fd)
