"""The WAL archive: what PostgreSQL's archive_command hands over, kept encrypted.

`pgbackup wal-push %p` is the archive_command and `pgbackup wal-fetch %f %p` the
restore_command. Every file PostgreSQL archives (segments, timeline history files,
backup history files, partial segments) goes through the stream format version 2
(zstd, then AES-256-GCM with the file's secret wrapped for the recipients), so the
host that archives holds no key that reads the archive.

The archive lives under the backup directory, beside the base backups that need it:

    wal/<system identifier>/<timeline and log, 16 hex digits>/<segment>.enc
    wal/<system identifier>/<timeline>.history.enc

This module imports the crypto stack only where it encrypts or decrypts: PostgreSQL
runs `pgbackup wal-push` once per segment, and the answer for a segment pushed ahead
(see "pushing ahead" below) must cost a process start and a hash, not the imports.

One folder per system identifier: a cluster made anew (initdb, pg_upgrade) starts its
segment names over, and must not meet the old cluster's files. Each file is bound
(docs/backup-format.md) to `wal/<system identifier>/<name>` and to the SHA-256 of its
content, so a file renamed to another segment fails to decrypt, and a second push of
a name compares hashes without any key: the same content is success, other content a
loud refusal that overwrites nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import itertools
import logging
import os
import re
import struct
import time
import uuid

from .archive import (
    ARCHIVABLE,
    ARCHIVE_FOLDER,
    DEFAULT_COMPRESSION_LEVEL,
    DEFAULT_FETCH_AHEAD,
    DEFAULT_PUSH_AHEAD,
    SEGMENT_NAME,
    SPOOL_LOCK,
    SUFFIX,
    SYSTEM_ID,
    NotArchivedError,
    ahead_note,
    archive_root,
    archived_path,
    check_name,
    is_segment,
    prefetching_marker,
    spool_of,
    system_identifier,
    take_prefetched,
)
from .errors import CorruptError, PgBackupError, RefusedError
from .fsutil import describe_os_error, fsync_dir, open_no_follow

log = logging.getLogger("pgbackup")

READ_BYTES = 1 << 20
_BINDING = re.compile(
    r"^wal/(?P<system>[0-9]{1,20})/(?P<name>[0-9A-Za-z.]+) sha256=(?P<sha256>[0-9a-f]{64})$"
)
# The first page of every segment has the long header: flags, then (after the standard
# header, 24 bytes aligned) the system identifier, segment size and page size.
_XLP_LONG_HEADER = 0x0002
_PAGE_START = struct.Struct("=HHIQ")  # magic, info, timeline, page address
_LONG_HEADER = struct.Struct("=QII")  # system identifier, segment size, block size
_LONG_HEADER_OFFSET = 24
SEGMENT_HEAD_BYTES = _LONG_HEADER_OFFSET + _LONG_HEADER.size
PREFETCH_WORKERS = 2


def binding_of(system: str, name: str, sha256: str) -> str:
    return f"wal/{system}/{name} sha256={sha256}"


def parse_binding(binding: str, system: str, name: str, where: str) -> str:
    """The SHA-256 a file's binding names, once the binding is the one of that name
    in that system's archive."""
    found = _BINDING.fullmatch(binding or "")
    if not found or found.group("system") != system or found.group("name") != name:
        raise CorruptError(
            f"{where} was written as {binding!r}, not as {name} of system {system}: "
            "a file moved or renamed within the archive is refused"
        )
    return found.group("sha256")


def check_segment_head(head: bytes, size: int, name: str, system: str, where: str) -> int:
    """Refuse a segment that is not the one its name says, of this system; return its
    segment size. Checked on push (a wrong file never reaches the archive) and on fetch."""
    if len(head) < SEGMENT_HEAD_BYTES:
        raise CorruptError(f"{where} is too short to be a WAL segment ({size} bytes)")
    _magic, info, _timeline, page_address = _PAGE_START.unpack_from(head)
    segment_system, segment_size, _block_size = _LONG_HEADER.unpack_from(head, _LONG_HEADER_OFFSET)
    if not info & _XLP_LONG_HEADER:
        raise CorruptError(f"{where} does not begin with a WAL segment's long page header")
    if str(segment_system) != system:
        raise RefusedError(
            f"{where} belongs to database system {segment_system}, not to this server's {system}"
        )
    if segment_size < 1 << 20 or segment_size & (segment_size - 1) or size != segment_size:
        raise CorruptError(f"{where} is {size} bytes; its header says segments are {segment_size}")
    _timeline_hex, log_hex, segment_hex = SEGMENT_NAME.fullmatch(name[:24]).groups()
    expected = (int(log_hex, 16) << 32) + int(segment_hex, 16) * segment_size
    if page_address != expected:
        raise CorruptError(
            f"{where} holds WAL from {page_address >> 32:X}/{page_address & 0xFFFFFFFF:X}, "
            f"not the segment its name {name[:24]} says"
        )
    return segment_size


def archived_sha256(path: str, system: str, name: str) -> str | None:
    """The content hash of the archived file at path (None when there is none), after
    checking that it is whole: the header it was written under and every chunk's
    framing up to the final one. Needs no key."""
    try:
        fd = open_no_follow(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    from . import crypto  # noqa: PLC0415 - only where it encrypts (see the module's note)

    with os.fdopen(fd, "rb") as handle:
        header, _stats = crypto.check_structure(handle, path)
    return parse_binding(header.binding, system, name, path)


def _push_one(source: str, name: str, system: str, dest: str, to, compression_level: int) -> dict:
    try:
        # Read once, into memory: the hash in the header and the bytes encrypted are of
        # the very same copy, whatever happens to the file meanwhile.
        with open(source, "rb") as handle:
            content = handle.read()
        return _push_content(content, source, name, system, dest, to, compression_level)
    except OSError as error:
        raise describe_os_error(error, f"archiving {source}") from None


def _push_content(content, source, name, system, dest, to, compression_level) -> dict:
    sha256, size = hashlib.sha256(content).hexdigest(), len(content)
    if is_segment(name):
        check_segment_head(content[:SEGMENT_HEAD_BYTES], size, name, system, source)
    target = archived_path(dest, system, name)
    try:
        same = _same_as_archived(target, system, name, sha256)
    except RefusedError:
        if not name.endswith(".partial"):
            raise
        # Two partial segments of one name (a promoted standby's, a recovery's end) are
        # both kept: recovery never reads them, and refusing one would stop archiving.
        target = os.path.join(os.path.dirname(target), f".{name}.{sha256[:16]}{SUFFIX}")
        log.warning("%s was archived before with other content: this one is kept as %s", name, target)
        same = _same_as_archived(target, system, name, sha256)
    result = {"name": name, "path": target, "size": size, "sha256": sha256, "system_identifier": system}
    if same:
        log.info("%s was already archived with the same content", name)
        return {**result, "status": "already archived"}
    folder = os.path.dirname(target)
    _make_folders(dest, folder)
    temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        encrypted_bytes = _write_encrypted(
            content, temporary, to, binding_of(system, name, sha256), compression_level
        )
        try:
            # link, not rename: it never replaces a file another pusher put there meanwhile.
            os.link(temporary, target)
        except FileExistsError:
            if _same_as_archived(target, system, name, sha256):
                return {**result, "status": "already archived"}
            raise  # _same_as_archived raised for other content
        fsync_dir(folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    log.info("archived %s (%d bytes, %d encrypted)", name, size, encrypted_bytes)
    return {**result, "status": "archived", "encrypted_bytes": encrypted_bytes}


def _same_as_archived(target: str, system: str, name: str, sha256: str) -> bool:
    archived = archived_sha256(target, system, name)
    if archived is None:
        return False
    if archived != sha256:
        raise RefusedError(
            f"{name} is already archived at {target} with other content (SHA-256 {archived[:16]}..., "
            f"this one {sha256[:16]}...); nothing was overwritten. Two clusters with system "
            f"identifier {system} write to one archive, or the archive holds a file from a "
            "restored copy of this server: find out which before archiving goes on"
        )
    # A push killed between its link and the folder's fsync left a file that may not
    # survive a power cut: made durable before it is reported archived.
    fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(target))
    return True


def _make_folders(dest: str, folder: str):
    """Create the archive's folders (0700), each new one made durable in its parent."""
    if os.path.isdir(folder):
        return
    if not os.path.isdir(dest):
        raise PgBackupError(f"backup directory {dest} does not exist")
    missing = []
    path = folder
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for new in reversed(missing):
        try:
            os.mkdir(new, 0o700)
        except FileExistsError:
            pass
        except OSError as error:
            raise describe_os_error(error, f"creating {new}") from None
        fsync_dir(os.path.dirname(new))


def _write_encrypted(content, temporary: str, to, binding: str, compression_level: int) -> int:
    """Encrypt content into a new file, fsynced; its encrypted size."""
    from . import crypto  # noqa: PLC0415 - only where it encrypts (see the module's note)

    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        # One segment is small: zstd's worker threads would cost more than they give.
        writer = crypto.EncryptingWriter(out, to, binding, compression_level=compression_level, threads=0)
        view = memoryview(content)
        for start in range(0, len(view), READ_BYTES):
            writer.write(view[start : start + READ_BYTES])
        stats = writer.close()
        view.release()
        out.flush()
        os.fsync(out.fileno())
    return stats.encrypted_bytes


def fetch(name: str, target: str, dest: str, keys, pgdata: str = ".", system: str | None = None) -> dict:
    """Decrypt one archived file to `target` (restore_command's %p). A name the archive
    does not hold raises NotArchivedError: PostgreSQL asks for files that may not exist
    (the next timeline's history) and takes a failure as "not there"."""
    from . import crypto  # noqa: PLC0415 - only where it encrypts (see the module's note)

    check_name(name)
    system = system or system_identifier(pgdata)
    source = archived_path(dest, system, name)
    try:
        fd = open_no_follow(source, os.O_RDONLY)
    except FileNotFoundError:
        if not os.path.isdir(os.path.join(dest, ARCHIVE_FOLDER)):
            # An unmounted or wrong backup directory is not "the end of the archive".
            raise PgBackupError(
                f"there is no WAL archive in {dest} (is the backup directory there?)"
            ) from None
        raise NotArchivedError(f"{name} is not in the archive {archive_root(dest, system)}") from None
    except OSError as error:
        raise describe_os_error(error, f"reading {source}") from None
    expected = {}

    def check_header(header):
        expected["sha256"] = parse_binding(header.binding, system, name, source)

    folder = os.path.dirname(os.path.abspath(target))
    temporary = os.path.join(folder, f".{os.path.basename(target)}.pgbackup-{uuid.uuid4().hex[:12]}")
    try:
        with os.fdopen(fd, "rb") as handle:
            out_fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(out_fd, "wb") as out:
                hashing = crypto.HashingWriter(out)
                crypto.decrypt_stream(
                    handle, hashing, keys, name=source, check_header=check_header, read_bytes=READ_BYTES
                )
        if hashing.sha256.hexdigest() != expected["sha256"]:
            raise CorruptError(f"{source} decrypted to other content than its recorded SHA-256")
        if is_segment(name):
            with open(temporary, "rb") as handle:
                check_segment_head(
                    handle.read(SEGMENT_HEAD_BYTES), hashing.bytes_written, name, system, source
                )
        os.replace(temporary, target)
    except OSError as error:
        raise describe_os_error(error, f"restoring {name} to {target}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return {"name": name, "path": source, "target": target, "size": hashing.bytes_written}


# ---- the commands PostgreSQL runs --------------------------------------------------------


def _archive_settings(settings_path: str, dest, recipient_paths, compression_level, ahead) -> dict:
    """The archive's place, public keys, compression and push-ahead: as given, else from
    the run's settings file (what the backup role writes), so archive_command stays
    `pgbackup wal-push %p`. The file is read only when the archive or its keys are not
    given; without it, compression and push-ahead take their defaults."""
    settings = {"compression_level": DEFAULT_COMPRESSION_LEVEL, "wal": {"push_ahead": DEFAULT_PUSH_AHEAD}}
    if not dest or not recipient_paths:
        from . import run  # noqa: PLC0415 - the run's settings, only when needed

        settings = run.load_settings(settings_path)
    level = settings["compression_level"] if compression_level is None else compression_level
    return {
        "dest": dest or settings["backup_dir"],
        "recipients": recipient_paths or [settings["recipients"]],
        "compression_level": level,
        "push_ahead": settings["wal"]["push_ahead"] if ahead is None else ahead,
    }


def push_command(
    source: str,
    settings_path: str,
    dest: str | None = None,
    recipient_paths: list[str] | None = None,
    pgdata: str = ".",
    compression_level: int | None = None,
    ahead: int | None = None,
) -> dict:
    """`pgbackup wal-push`: push_with_ahead() with the options given or set."""
    from . import crypto  # noqa: PLC0415 - only where it encrypts (see the module's note)

    chosen = _archive_settings(settings_path, dest, recipient_paths, compression_level, ahead)
    return push_with_ahead(
        source,
        chosen["dest"],
        crypto.load_recipients(chosen["recipients"]),
        pgdata=pgdata,
        compression_level=chosen["compression_level"],
        ahead=chosen["push_ahead"],
    )


def fetch_command(
    name: str,
    target: str,
    settings_path: str,
    keys,
    dest: str | None = None,
    pgdata: str = ".",
    ahead: int = DEFAULT_FETCH_AHEAD,
) -> dict:
    """`pgbackup wal-fetch`: fetch_with_ahead() from the archive given or set. Every
    failure but NotArchivedError is a PgBackupError, which the command turns into an
    exit code that stops recovery."""
    try:
        if not dest:
            from . import run  # noqa: PLC0415 - the run's settings, only when needed

            dest = run.load_settings(settings_path)["backup_dir"]
        return fetch_with_ahead(name, target, dest, keys, pgdata=pgdata, ahead=ahead)
    except PgBackupError:
        raise
    except Exception as error:  # whatever it is, recovery must not take it for "not there"
        raise PgBackupError(f"restoring {name} failed: {type(error).__name__}: {error}") from error


# ---- fetching ahead --------------------------------------------------------------------
#
# Recovery asks restore_command for one segment at a time and replays it before asking
# for the next. `wal-fetch --fetch-ahead N` gives the asked segment, then leaves a
# background process that keeps up to N segments of its timeline decrypted ahead (two
# at a time) in a spool folder beside the target (in pg_wal), each checked in full (its
# hash, its header) before it is renamed into the spool. The next calls take their
# segment from there with a rename, or wait for the one being decrypted. One prefetcher
# runs at a time (it holds the spool's lock). It stops at the end of the archive, when
# recovery has ended (no recovery.signal), when PostgreSQL asks for a file it is not
# bringing (another timeline: the call says so in `.wanted`), or after a minute with
# nothing taken; what it leaves is removed by the next one, and by the restore
# playbook once recovery has ended.

WANTED_NOTE = ".wanted"
PREFETCH_IDLE_SECONDS = 60


def fetch_with_ahead(name: str, target: str, dest: str, keys, pgdata: str = ".", ahead: int = 0) -> dict:
    """fetch() of the asked file (from the spool when prefetched), then, for a segment,
    a background prefetcher for the segments after it on its timeline."""
    if take_prefetched(name, target):
        return {"name": name, "target": target, "prefetched": True}
    spool = spool_of(target)
    if os.path.isdir(spool):
        _write_small(os.path.join(spool, WANTED_NOTE), name)  # a running prefetcher is on another path
    result = fetch(name, target, dest, keys, pgdata=pgdata)
    if ahead > 1 and SEGMENT_NAME.fullmatch(name):
        plan = {
            "timeline": int(name[:8], 16),
            "first": segment_number(name, result["size"]) + 1,
            "segment_bytes": result["size"],
            "window": ahead,
        }
        try:
            _start_prefetcher(spool, plan, dest, keys, system_identifier(pgdata), pgdata)
        except (OSError, PgBackupError) as error:  # the asked file is in place: only speed is lost
            log.warning("prefetching after %s did not start: %s", name, error)
    return result


def _write_small(path: str, text: str):
    """A small file written whole under a temporary name, then renamed into place."""
    temporary = f"{path}.{uuid.uuid4().hex[:8]}"
    with open(
        os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="ascii"
    ) as handle:
        handle.write(text)
    os.replace(temporary, path)


def _start_prefetcher(spool: str, plan: dict, dest: str, keys, system: str, pgdata: str):
    """Fork the prefetcher, unless one runs (an earlier one that was told it is not
    wanted gets a moment to go). The caller returns at once: PostgreSQL replays while
    the prefetcher works."""
    os.makedirs(spool, mode=0o700, exist_ok=True)
    lock = os.open(os.path.join(spool, SPOOL_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + 1
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(lock)
                return
            time.sleep(0.02)
    for entry in os.listdir(spool):  # what an earlier prefetcher left is no use now
        if entry != SPOOL_LOCK:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(spool, entry))
    if os.fork() != 0:
        os.close(lock)  # the child holds the lock until it is done
        return
    try:
        os.setsid()
        # Not PostgreSQL's (or a caller's pipe's) to wait for: the child keeps no stdio.
        devnull = os.open(os.devnull, os.O_RDWR)
        for stream in (0, 1, 2):
            os.dup2(devnull, stream)
        _prefetch(spool, plan, dest, keys, system, pgdata)
    finally:
        os._exit(0)


def _prefetch(spool: str, plan: dict, dest: str, keys, system: str, pgdata: str):
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 - not on the quick answer's path

    number, in_flight, exhausted = plan["first"], {}, False
    last_taken, ready_before = time.monotonic(), set()
    with ThreadPoolExecutor(PREFETCH_WORKERS) as pool:
        while not _prefetch_done(spool, pgdata, last_taken, exhausted and not in_flight):
            ready = {entry for entry in os.listdir(spool) if SEGMENT_NAME.fullmatch(entry)}
            if ready_before - ready:  # PostgreSQL took some
                last_taken = time.monotonic()
            for name in [name for name, future in in_flight.items() if future.done()]:
                del in_flight[name]
            while not exhausted and len(ready) + len(in_flight) < plan["window"]:
                name = segment_name(plan["timeline"], number, plan["segment_bytes"])
                if not os.path.exists(archived_path(dest, system, name)):
                    exhausted = True  # the end of the archive
                    break
                os.close(os.open(prefetching_marker(spool, name), os.O_WRONLY | os.O_CREAT, 0o600))
                in_flight[name] = pool.submit(_prefetch_one, spool, name, dest, keys, system)
                number += 1
            ready_before = ready
            if _wanted_elsewhere(spool, set(ready) | set(in_flight)):
                break
            time.sleep(0.02)


def _prefetch_done(spool: str, pgdata: str, last_taken: float, finished: bool) -> bool:
    recovering = any(
        os.path.exists(os.path.join(pgdata, signal)) for signal in ("recovery.signal", "standby.signal")
    )
    return finished or not recovering or time.monotonic() - last_taken > PREFETCH_IDLE_SECONDS


def _wanted_elsewhere(spool: str, coming: set[str]) -> bool:
    try:
        with open(os.path.join(spool, WANTED_NOTE), encoding="ascii") as handle:
            wanted = handle.read(64)
    except OSError:
        return False
    return bool(wanted) and wanted not in coming


def _prefetch_one(spool: str, name: str, dest: str, keys, system: str):
    partial = prefetching_marker(spool, name)
    try:
        fetch(name, os.path.join(spool, name), dest, keys, system=system)
    except (PgBackupError, OSError):
        pass  # damaged or unreadable: the direct fetch of it says so, loudly
    finally:
        with contextlib.suppress(OSError):
            os.unlink(partial)


# ---- pushing ahead ---------------------------------------------------------------------
#
# PostgreSQL's archiver hands over one file at a time and waits for each. When it falls
# behind (a burst of writes), `wal-push --push-ahead N` archives the file asked for and
# up to N-1 more that are ready (pg_wal/archive_status/*.ready), side by side, and
# leaves a note for each extra one: its name and content hash, written only once its
# copy is durable. When PostgreSQL then asks for that file, the note answers: the file
# is hashed again and, if it matches, reported archived at the cost of a process start
# and a hash. A segment is still reported archived only once it is safely stored.

AHEAD_WORKERS = max(1, min(4, os.cpu_count() or 1))


def push_with_ahead(
    source: str, dest: str, to, pgdata: str = ".", compression_level: int = 3, ahead: int = 0
) -> dict:
    """Archive one file PostgreSQL hands to archive_command, and up to `ahead - 1` more
    that are ready, side by side. The asked file is reported archived (returns) only
    once its encrypted copy is fsynced under its final name, and the folder too; a name
    already archived with the same content succeeds, with other content RefusedError is
    raised and nothing overwritten. Only the asked file's outcome decides the result;
    an extra file that fails is left for PostgreSQL to ask for (and fail) on its own."""
    name = os.path.basename(source)
    check_name(name)
    system = system_identifier(pgdata)
    extras = _ready_files(pgdata, name)[: max(0, ahead - 1)]
    if not extras:
        return _push_one(source, name, system, dest, to, compression_level)
    status = os.path.join(pgdata, "pg_wal")
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 - not on the quick answer's path

    with ThreadPoolExecutor(AHEAD_WORKERS, thread_name_prefix="pgbackup-push") as pool:
        asked = pool.submit(_push_one, source, name, system, dest, to, compression_level)
        more = {
            extra: pool.submit(
                _push_one, os.path.join(status, extra), extra, system, dest, to, compression_level
            )
            for extra in extras
        }
        result = asked.result()
        noted = []
        for extra, future in more.items():
            try:
                done = future.result()
            except (PgBackupError, OSError) as error:
                log.warning("pushing %s ahead failed (it is archived when PostgreSQL asks): %s", extra, error)
                continue
            _write_note(dest, system, extra, done["sha256"])
            noted.append(extra)
    return {**result, "pushed_ahead": noted}


def _ready_files(pgdata: str, asked: str) -> list[str]:
    """Files PostgreSQL has marked ready to archive, other than the one asked for, in the
    order its archiver takes them: timeline history first, then oldest first."""
    try:
        names = os.listdir(os.path.join(pgdata, "pg_wal", "archive_status"))
    except OSError:
        return []
    ready = [
        entry[: -len(".ready")]
        for entry in names
        if entry.endswith(".ready")
        and ARCHIVABLE.fullmatch(entry[: -len(".ready")])
        and entry[: -len(".ready")] != asked
    ]
    return sorted(ready, key=lambda name: (not name.endswith(".history"), name))


def _write_note(dest: str, system: str, name: str, sha256: str):
    note = ahead_note(dest, system, name)
    os.makedirs(os.path.dirname(note), mode=0o700, exist_ok=True)
    _write_small(note, sha256)


# ---- what the archive holds: timelines, gaps, the recovery window, retention ----------

DEFAULT_SEGMENT_BYTES = 16 << 20


def parse_lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def segment_number(name: str, segment_bytes: int) -> int:
    _timeline, log_hex, segment_hex = SEGMENT_NAME.fullmatch(name[:24]).groups()
    return int(log_hex, 16) * ((1 << 32) // segment_bytes) + int(segment_hex, 16)


def segment_name(timeline: int, number: int, segment_bytes: int) -> str:
    per_log = (1 << 32) // segment_bytes
    return f"{timeline:08X}{number // per_log:08X}{number % per_log:08X}"


def _utc(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


def archived_files(dest: str, system: str) -> list[dict]:
    """The archive's files of one system: name, path, size, archived time. Only what
    push writes is listed: links, foreign names and temporary files are not."""
    root = archive_root(dest, system)
    found = []

    def add(entry):
        name = entry.name[: -len(SUFFIX)]
        if (
            entry.name.endswith(SUFFIX)
            and ARCHIVABLE.fullmatch(name)
            and entry.is_file(follow_symlinks=False)
        ):
            status = entry.stat(follow_symlinks=False)
            found.append({"name": name, "path": entry.path, "size": status.st_size, "mtime": status.st_mtime})

    for entry in os.scandir(root):
        if re.fullmatch(r"[0-9A-F]{16}", entry.name) and entry.is_dir(follow_symlinks=False):
            for inner in os.scandir(entry.path):
                if inner.name.startswith(entry.name):
                    add(inner)
        else:
            add(entry)
    return sorted(found, key=lambda item: item["name"])


def systems(dest: str) -> list[str]:
    root = os.path.join(dest, ARCHIVE_FOLDER)
    if not os.path.isdir(root) or os.path.islink(root):
        return []
    return sorted(
        entry.name
        for entry in os.scandir(root)
        if SYSTEM_ID.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
    )


def bases_of(base_sets: list[dict], system: str) -> list[dict]:
    """Complete physical sets (as retention.scan lists them, with their manifest's
    `wal` and `server`) of that system, oldest first, with start and end LSNs parsed."""
    bases = []
    for entry in base_sets:
        wal = entry.get("wal") or {}
        if entry.get("system_identifier") != system or not wal.get("start_lsn") or not wal.get("end_lsn"):
            continue
        bases.append(
            {
                "name": entry["name"],
                "path": entry.get("path"),
                "started_at": entry["started_at"],
                "finished_at": entry.get("finished_at"),
                "timeline": wal.get("timeline") or 1,
                "start": parse_lsn(wal["start_lsn"]),
                "end": parse_lsn(wal["end_lsn"]),
                "segment_bytes": entry.get("wal_segment_size") or DEFAULT_SEGMENT_BYTES,
                "plaintext_bytes": entry.get("plaintext_size"),
                "encrypted_bytes": entry.get("total_size"),
            }
        )
    return sorted(bases, key=lambda base: base["start"])


def describe(dest: str, base_sets: list[dict] | None = None) -> list[dict]:
    """Per system in the archive: its timelines (first and last segment, gaps) and the
    recovery window per timeline: from the end of the oldest base backup the archive
    continues from, to the end of the last segment reached without a gap. Read from
    names alone (no key needed), following each segment number to the newest timeline
    at or below the target that has it, as recovery does; the restore checks the real
    timeline history."""
    base_sets = _scanned(dest) if base_sets is None else base_sets
    report = []
    for system in systems(dest):
        files = archived_files(dest, system)
        bases = bases_of(base_sets, system)
        segment_bytes = bases[-1]["segment_bytes"] if bases else DEFAULT_SEGMENT_BYTES
        by_timeline: dict[int, dict[int, dict]] = {}
        for item in files:
            if SEGMENT_NAME.fullmatch(item["name"]):
                numbers = by_timeline.setdefault(int(item["name"][:8], 16), {})
                numbers[segment_number(item["name"], segment_bytes)] = item
        timelines = []
        for timeline, numbers in sorted(by_timeline.items()):
            ordered = sorted(numbers)
            gaps = [
                [
                    segment_name(timeline, before + 1, segment_bytes),
                    segment_name(timeline, after - 1, segment_bytes),
                ]
                for before, after in itertools.pairwise(ordered)
                if after != before + 1
            ]
            timelines.append(
                {
                    "timeline": timeline,
                    "first": numbers[ordered[0]]["name"],
                    "last": numbers[ordered[-1]]["name"],
                    "segments": len(ordered),
                    "missing": gaps,
                    "newest_archived_at": _utc(max(item["mtime"] for item in numbers.values())),
                }
            )
        report.append(
            {
                "system_identifier": system,
                "segment_bytes": segment_bytes,
                "files": len(files),
                "bytes": sum(item["size"] for item in files),
                "history": [item["name"] for item in files if item["name"].endswith(".history")],
                "timelines": timelines,
                "windows": [
                    window
                    for timeline in sorted(by_timeline)
                    if (window := _window(timeline, by_timeline, bases, segment_bytes)) is not None
                ],
                "base_backups": [base["name"] for base in bases],
            }
        )
    return report


def _segment_on(number: int, timeline: int, by_timeline: dict) -> dict | None:
    for candidate in sorted((tl for tl in by_timeline if tl <= timeline), reverse=True):
        if number in by_timeline[candidate]:
            return by_timeline[candidate][number]
    return None


def _window(timeline: int, by_timeline: dict, bases: list[dict], segment_bytes: int) -> dict | None:
    for base in bases:  # oldest first: the earliest reachable point
        if base["timeline"] > timeline:
            continue
        number = base["end"] // segment_bytes
        last = None
        while (item := _segment_on(number + 1, timeline, by_timeline)) is not None:
            last, number = item, number + 1
        if last is None or int(last["name"][:8], 16) != timeline:
            continue  # the archive does not reach this timeline from this base
        return {
            "timeline": timeline,
            "base_backup": base["name"],
            "earliest_lsn": format_lsn(base["end"]),
            "earliest_time": base["finished_at"],
            "latest_lsn": format_lsn((number + 1) * segment_bytes),
            "latest_segment": last["name"],
            "latest_archived_at": _utc(last["mtime"]),
        }
    return None


def prunable(names: list[str], bases: list[dict]) -> tuple[list[str], str]:
    """Of one system's archived names, those older than the start of the oldest kept base
    backup (`bases` as bases_of gives them, oldest first): segments, partial segments
    and backup history files whose segment number (on any timeline) comes before it. A
    restore from a kept base never reads them, and no later timeline does either: one
    branching before that point cannot be reached from it. Timeline history files are
    tiny and always kept. Returns them and the first segment kept."""
    oldest = bases[0]
    segment_bytes = oldest["segment_bytes"]
    keep_from = oldest["start"] // segment_bytes
    doomed = [
        name
        for name in names
        if ARCHIVABLE.fullmatch(name)
        and not name.endswith(".history")
        and segment_number(name, segment_bytes) < keep_from
    ]
    return doomed, segment_name(oldest["timeline"], keep_from, segment_bytes)


def _scanned(dest: str) -> list[dict]:
    from . import retention  # noqa: PLC0415 - retention reads manifests: the crypto stack

    return retention.scan(dest)


def prune(
    dest: str,
    base_sets: list[dict] | None = None,
    dry_run: bool = False,
    archived_before: float | None = None,
) -> dict:
    """Remove what prunable() names from the local archive, system by system. All WAL of
    a system with no base backup is kept (it cannot be replayed, but which base it
    belonged to is the operator's question), and said so."""
    base_sets = _scanned(dest) if base_sets is None else base_sets
    report = {"removed": [], "kept_from": {}, "systems_without_base": [], "dry_run": dry_run}
    for system in systems(dest):
        bases = bases_of(base_sets, system)
        if not bases:
            report["systems_without_base"].append(system)
            log.warning(
                "WAL of system %s kept: there is no base backup of that system to replay it on", system
            )
            continue
        files = {
            item["name"]: item["path"]
            for item in archived_files(dest, system)
            if archived_before is None or item["mtime"] <= archived_before
        }
        doomed, report["kept_from"][system] = prunable(sorted(files), bases)
        report["removed"] += doomed
        if dry_run:
            continue
        folders = set()
        for name in doomed:
            os.unlink(files[name])
            folders.add(os.path.dirname(files[name]))
        for folder in sorted(folders):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only once empty
            fsync_dir(os.path.dirname(folder) if not os.path.isdir(folder) else folder)
    log.info("WAL prune: %s %d files", "would remove" if dry_run else "removed", len(report["removed"]))
    return report


def local_archive(dest: str) -> dict:
    """The local archive at a glance, from one listing: how many files it holds, and when
    the newest was archived (None: nothing archived)."""
    times = [item["mtime"] for system in systems(dest) for item in archived_files(dest, system)]
    return {"files": len(times), "newest": max(times) if times else None}
