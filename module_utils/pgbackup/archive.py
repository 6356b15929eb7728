"""The WAL archive's layout, and the answers PostgreSQL gets without the crypto stack.

PostgreSQL runs archive_command and restore_command once per WAL file. The common
answers need no key and no decryption: a file a push-ahead already archived (its note
matches), a file the prefetcher already decrypted (it is in the spool), a file the
archive does not have. __main__ gives them from here before the command line tool and
its imports (cryptography, zstandard, psycopg) are loaded; this module imports nothing
heavier than the standard library. What the names and folders are is defined here
once, for wal.py too (docs/backup-format.md, "The WAL archive").
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import struct
import time
from types import SimpleNamespace

from .errors import CorruptError, PgBackupError

ARCHIVE_FOLDER = "wal"
SUFFIX = ".enc"
READ_BYTES = 1 << 20


class NotArchivedError(PgBackupError):
    """The archive has no such file: restore_command's expected, quiet answer."""


SEGMENT_NAME = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
# What archive_command is given: segments, partial segments a promoted standby
# leaves, backup history files, timeline history files. Nothing else is archived.
ARCHIVABLE = re.compile(
    r"^(?P<segment>[0-9A-F]{24})(?:\.partial|\.[0-9A-F]{8}\.backup)?$|^(?P<timeline>[0-9A-F]{8})\.history$"
)

SYSTEM_ID = re.compile(r"^[0-9]{1,20}$")


def check_name(name: str) -> re.Match:
    """The name as PostgreSQL gives it to archive_command; anything else is refused (a
    name is used in a path, and the archive is shared by every cluster that writes it)."""
    found = ARCHIVABLE.fullmatch(name)
    if not found:
        raise PgBackupError(
            f"{name!r} is not a WAL file name PostgreSQL archives "
            "(a segment, .partial, .backup or .history file)"
        )
    return found


def is_segment(name: str) -> bool:
    return SEGMENT_NAME.fullmatch(name) is not None or name.endswith(".partial")


def system_identifier(pgdata: str) -> str:
    """The database system identifier, from the data directory's pg_control: its first
    field, in the machine's byte order (as PostgreSQL writes it)."""
    path = os.path.join(pgdata, "global", "pg_control")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
    except OSError as error:
        raise PgBackupError(
            f"cannot read the system identifier from {path} ({error.strerror}): run from the "
            "data directory, as archive_command and restore_command are, or give --pgdata"
        ) from None
    if len(raw) != 8:
        raise CorruptError(f"{path} is too short to be a pg_control file")
    return str(struct.unpack("=Q", raw)[0])


def archive_root(dest: str, system: str) -> str:
    if not SYSTEM_ID.fullmatch(system):
        raise PgBackupError(f"{system!r} is not a system identifier")
    return os.path.join(dest, ARCHIVE_FOLDER, system)


def archived_path(dest: str, system: str, name: str) -> str:
    """Where a file of that name lives: segments by timeline and log (256 segments of
    16 MB per folder), timeline history files at the top."""
    found = check_name(name)
    root = archive_root(dest, system)
    if found.group("segment"):
        return os.path.join(root, name[:16], name + SUFFIX)
    return os.path.join(root, name + SUFFIX)


def relative_path_is_archived(path: str) -> bool:
    """Whether a path inside one system's archive folder (as a remote lists it) is one
    push writes: `<16 hex>/<segment name>.enc`, or `<timeline>.history.enc` at the top."""
    folder, _, file = path.rpartition("/")
    if not file.endswith(SUFFIX):
        return False
    found = ARCHIVABLE.fullmatch(file[: -len(SUFFIX)])
    if not found:
        return False
    if found.group("segment"):
        return folder == file[:16]
    return folder == ""


def hash_file(path: str) -> str:
    """The SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


SPOOL_FOLDER = ".pgbackup-prefetch"
SPOOL_LOCK = ".lock"
# How long a call waits for a segment the prefetcher is decrypting right now.
PREFETCH_WAIT_SECONDS = 120


def prefetching_marker(spool: str, name: str) -> str:
    """The mark of a segment the prefetcher is decrypting (hidden: never a WAL name)."""
    return os.path.join(spool, f".{name}.prefetching")


def spool_of(target: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(target)), SPOOL_FOLDER)


def take_prefetched(name: str, target: str) -> bool:
    """Move a prefetched file into place; wait for one being decrypted while its
    prefetcher runs. False when there is none (then it is fetched directly)."""
    if not ARCHIVABLE.fullmatch(name):
        return False  # a name is joined to a path: only what PostgreSQL archives
    spool = spool_of(target)
    ready = os.path.join(spool, name)
    deadline = time.monotonic() + PREFETCH_WAIT_SECONDS
    while True:
        try:
            os.replace(ready, target)
            return True
        except FileNotFoundError:
            pass
        except OSError:
            return False
        if not os.path.exists(prefetching_marker(spool, name)) or not _prefetcher_running(spool):
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _prefetcher_running(spool: str) -> bool:
    try:
        fd = os.open(os.path.join(spool, SPOOL_LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def is_archived(name: str, dest: str, pgdata: str = ".") -> bool:
    """False only when the archive is there and has no file of that name (a cheap look:
    no key, no decryption); any doubt is True, and the full fetch says what is wrong."""
    try:
        os.lstat(archived_path(dest, system_identifier(pgdata), name))
    except FileNotFoundError:
        return not os.path.isdir(os.path.join(dest, ARCHIVE_FOLDER))
    except (OSError, PgBackupError):
        return True
    return True


AHEAD_FOLDER = ".pushed-ahead"
DEFAULT_PUSH_AHEAD = 8
DEFAULT_FETCH_AHEAD = 8
DEFAULT_COMPRESSION_LEVEL = 3


def ahead_note(dest: str, system: str, name: str) -> str:
    return os.path.join(archive_root(dest, system), AHEAD_FOLDER, name)


def pushed_ahead(source: str, dest: str, pgdata: str = ".") -> bool:
    """Whether an earlier push-ahead archived exactly this file; the note is used up.
    Any doubt (no note, another hash, an unreadable note) answers False: then the file
    is pushed the ordinary way, which compares with the archive itself."""
    name = os.path.basename(source)
    if not ARCHIVABLE.fullmatch(name):
        return False
    try:
        note = ahead_note(dest, system_identifier(pgdata), name)
        with open(note, encoding="ascii") as handle:
            recorded = handle.read(64)
        if recorded != hash_file(source):
            return False
        os.unlink(note)
    except (OSError, PgBackupError, UnicodeDecodeError):
        return False
    return True


DEFAULT_SETTINGS_FILE = "/etc/pgbackup/run.json"


# Every option wal-push and wal-fetch take, as cli.py declares them: an option this
# parser did not know would have its value taken for a file name.
_VALUED = (
    "--dest",
    "--pgdata",
    "--settings",
    "--recipient",
    "--compression-level",
    "--push-ahead",
    "--key-file",
    "--fetch-ahead",
)
_FLAGS = ("--json", "-v", "--verbose")


def _parse(argv: list[str], positionals: list[str]):
    """The options a quick answer needs, and the backup directory; None when unsure
    (an option it does not know, a positional too many or too few)."""
    values: dict[str, str] = {}
    given: list[str] = []
    words = iter(argv)
    for word in words:
        option, equals, inline = word.partition("=")
        if option in _VALUED:
            value = inline if equals else next(words, None)
            if value is None:
                return None
            values[option] = value
        elif word in _FLAGS:
            continue
        elif word.startswith("-"):
            return None
        else:
            given.append(word)
    if len(given) != len(positionals):
        return None
    args = SimpleNamespace(
        **dict(zip(positionals, given, strict=True)),
        pgdata=values.get("--pgdata", "."),
        settings=values.get("--settings", os.environ.get("PGBACKUP_SETTINGS", DEFAULT_SETTINGS_FILE)),
    )
    dest = values.get("--dest")
    if not dest:
        try:
            with open(args.settings, encoding="utf-8") as handle:
                dest = json.load(handle).get("backup_dir")
        except (OSError, ValueError, AttributeError):
            return None
    if not isinstance(dest, str) or not dest:
        return None
    return args, dest


def answered_ahead(argv: list[str]) -> bool:
    """True when the file was pushed ahead and is unchanged; anything else (bad options,
    no note) leaves the answer to the full command."""
    parsed = _parse(argv, ["path"])
    return parsed is not None and pushed_ahead(parsed[0].path, parsed[1], parsed[0].pgdata)


def answered_fetch(argv: list[str]) -> int | None:
    """0 when a prefetched file was moved into place, 1 when the archive has no such
    file; None leaves the answer to the full command."""
    parsed = _parse(argv, ["name", "target"])
    if parsed is None:
        return None
    args, dest = parsed
    if take_prefetched(args.name, args.target):
        return 0
    return None if is_archived(args.name, dest, args.pgdata) else 1
