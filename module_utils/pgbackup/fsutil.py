"""Durable files and advisory locks."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pwd
import shutil
import stat
import time

from .errors import BusyError, CorruptError, PgBackupError, RefusedError

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


def refuse_links(root: str, what: str):
    """Refuse a folder tree holding symbolic links (or that is one): a copy into it would
    write wherever they point. For destinations a person can plug in (an external drive)."""
    if os.path.islink(root):
        raise CorruptError(f"{what} {root} is a symbolic link; refusing to copy into it")
    for folder, subfolders, files in os.walk(root):
        for name in subfolders + files:
            if os.path.islink(os.path.join(folder, name)):
                raise CorruptError(
                    f"{what} holds a symbolic link, {os.path.join(folder, name)}; refusing to copy into it "
                    "(a copy would write wherever it points)"
                )


def require_owner(path: str, doing: str):
    """Refuse to write into a folder that belongs to another user: a backup made as root
    in the postgres user's backup directory works once, then every later run as postgres
    fails on the root-owned set, lock and metrics ("permission denied" each night)."""
    try:
        owner_uid = os.stat(path).st_uid
    except FileNotFoundError:
        return
    if owner_uid != os.geteuid():
        owner, me = _user_name(owner_uid), _user_name(os.geteuid())
        raise RefusedError(
            f"{path} belongs to {owner}, and this is {me}: {doing} as {owner} "
            f"(runuser -u {owner} -- pgbackup ...), or files made now would break later runs"
        )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def remove_tree(path: str):
    shutil.rmtree(path, ignore_errors=False)


def open_no_follow(path: str, flags: int, mode: int = 0o600, dir_fd: int | None = None) -> int:
    """os.open that never follows a symbolic link in the last component, and refuses
    anything but a regular file or directory: a set folder is hostile until checked,
    and a planted `.lock -> /var/lib/postgresql/15/main/standby.signal` must not make
    us create or open a file there."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as error:
        # ELOOP for a link; ENOTDIR for a link opened with O_DIRECTORY.
        if error.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(
            os.lstat(path, dir_fd=dir_fd).st_mode
        ):
            raise CorruptError(f"{path} is a symbolic link; refusing to follow it") from None
        raise
    kind = os.fstat(fd).st_mode
    if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
        os.close(fd)
        raise CorruptError(f"{path} is not a regular file or folder; refusing it")
    return fd


def check_set_folder(path: str):
    """Refuse a set folder that is a symbolic link or holds anything but regular files
    and plain sub-folders of regular files (a directory-format dump)."""
    if os.path.islink(path):
        raise CorruptError(f"backup set {path} is a symbolic link; refusing it")
    if not os.path.isdir(path):
        raise PgBackupError(f"backup set {path} does not exist")
    for entry in os.scandir(path):
        inner = os.scandir(entry.path) if entry.is_dir(follow_symlinks=False) else [entry]
        for item in inner:
            if not item.is_file(follow_symlinks=False):
                what = "a symbolic link" if item.is_symlink() else "not a regular file"
                raise CorruptError(f"backup set {path} holds {item.path}, which is {what}; refusing the set")


@contextlib.contextmanager
def hold(directory: str, exclusive: bool, wait: bool, what: str):
    """flock the directory's lock file: shared for readers, exclusive for writers.

    Verify and restore hold a set shared; prune must get it exclusive without
    waiting, so a set in use is never deleted under a reader. Neither the folder nor
    its lock file is followed if it is a symbolic link.
    """
    try:
        dir_fd = open_no_follow(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise describe_os_error(error, f"opening {directory}") from None
    try:
        try:
            fd = open_no_follow(LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600, dir_fd=dir_fd)
        except PermissionError:
            try:
                fd = open_no_follow(LOCK_NAME, os.O_RDONLY, dir_fd=dir_fd)
            except FileNotFoundError:
                fd = None
    finally:
        os.close(dir_fd)
    if fd is None:
        if exclusive:
            # A writer (prune) that cannot lock must not go ahead: a reader may hold it.
            raise BusyError(f"{what} cannot be locked (its folder is read-only); left alone")
        # A read-only copy of a set (an off-site mount) is read without the lock.
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


def is_abandoned(path: str, grace_seconds: float, now: float | None = None) -> bool:
    """Whether a leftover folder (.partial-, .restore-, .deleting-) belongs to no running
    process: older than grace_seconds and its lock free. Every pgbackup run holds the
    lock of the folder it works in for as long as it runs; the grace covers the moment
    between creating a folder and locking it."""
    now = time.time() if now is None else now
    try:
        if now - os.lstat(path).st_mtime < grace_seconds:
            return False
        with hold(path, exclusive=True, wait=False, what=path):
            return True
    except BusyError:
        return False
    except CorruptError:
        return True  # a planted link: no run owns it; the removal refuses it and says so
    except PgBackupError:
        return False  # not ours to open (another user's): not ours to remove
