"""Physical backups: pg_basebackup in tar format, with the WAL it needs, streamed
through the same compression and encryption as the dumps.

The base tar carries PostgreSQL's own backup_manifest, so a restored copy is checked
with pg_verifybackup before anyone starts a server on it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import subprocess

from . import pg
from .crypto import KeyRing, Recipients, SymmetricKey
from .errors import PgBackupError, RefusedError
from .fsutil import describe_os_error, hold, remove_tree, require_free_space
from .restore import decrypt_checked, open_set, resolve_set
from .sets import SetWriter, build_set

log = logging.getLogger("pgbackup")

_LSN = re.compile(r"write-ahead log (start|end) point: (\S+)(?: on timeline (\d+))?")
TAR_BLOCK = 512


def base_file(part: int) -> str:
    return f"base.{part}.tar.enc"


def create_base_backup(
    dest: str, to: Recipients | SymmetricKey, compression_level: int = 3, threads: int = 2, parts: int = 2
) -> dict:
    """Take a base backup into a new `physical-<time>` set under dest.

    pg_basebackup's tar is dealt out, file by file, into `parts` encrypted tars, so that
    a restore can decrypt, decompress and unpack them side by side (as pgBackRest does
    with process-max). Each part's zstd gets all the threads: the stream is serial, so
    only one part is being written at any moment.
    """
    if parts < 1:
        raise PgBackupError("a base backup needs at least one part")
    with pg.connect() as conn:
        server = pg.server_info(conn)

    def fill(writer: SetWriter, record: dict):
        log.info("base backup %s started (%d part(s))", record["name"], parts)
        argv = [
            pg.tool("pg_basebackup", pg.major_of(server["version_num"])),
            "--no-password",
            "--pgdata=-",
            "--format=tar",
            "--wal-method=fetch",
            "--checkpoint=fast",
            "--verbose",
            f"--label=pgbackup {record['name']}",
        ]
        names = [base_file(part) for part in range(1, parts + 1)]
        record["base"], stderr = writer.stream_program(argv, names, "pg_basebackup", splitter=TarSplitter)
        points = {kind: (lsn, timeline) for kind, lsn, timeline in _LSN.findall(stderr)}
        start_lsn, timeline = points.get("start", (None, ""))
        end_lsn, _ = points.get("end", (None, ""))
        record["wal"] = {
            "start_lsn": start_lsn,
            "end_lsn": end_lsn,
            "timeline": int(timeline) if timeline else None,
        }

    return build_set(dest, "physical", to, server, compression_level, threads, fill)


class TarSplitter:
    """Deals the members of one tar stream out to several writers, each member whole
    (with any extension headers before it) to the writer that has had the fewest bytes,
    so every writer receives a valid tar of its own. Header checksums are checked: a
    stream that is not a tar fails the backup rather than being split wrongly.

    Directories go to every writer. The tars that unpack the parts run side by side in
    one folder, and GNU tar fails a file whose missing parent another tar creates in
    between ("Cannot open: No such file or directory"); with its own entry for every
    directory, each tar has made (or found) the parent before it opens a file there.
    """

    _EXTENSIONS = (b"L", b"K", b"x", b"g")  # long names, pax: belong to the next member

    def __init__(self, writers: list):
        self._writers = writers
        self._sizes = [0] * len(writers)
        self._header = bytearray()
        self._held = bytearray()  # extension headers and their data, until their member
        self._holding = 0  # bytes of extension data still to hold
        self._current = 0  # index of the writer receiving the current member's data
        self._remaining = 0  # bytes of the current member's data still to pass on
        self._ended = False
        self.members = 0

    def write(self, data) -> int:
        view = memoryview(data)
        while view:
            if self._remaining:
                size = min(self._remaining, len(view))
                self._writers[self._current].write(view[:size])
                self._sizes[self._current] += size
                self._remaining -= size
                view = view[size:]
            elif self._holding:
                size = min(self._holding, len(view))
                self._held += view[:size]
                self._holding -= size
                view = view[size:]
            elif self._ended:
                if any(view):
                    raise PgBackupError("pg_basebackup's tar has data after its end-of-archive marker")
                break
            else:
                size = TAR_BLOCK - len(self._header)
                self._header += view[:size]
                view = view[size:]
                if len(self._header) == TAR_BLOCK:
                    self._next_header(bytes(self._header))
                    self._header.clear()
        return len(data)

    def _next_header(self, header: bytes):
        if not any(header):
            self._ended = True
            return
        stored = header[148:156].split(b"\0")[0].strip()
        computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if not stored or int(stored, 8) != computed:
            raise PgBackupError(
                f"pg_basebackup's tar is corrupt: bad header checksum at member {self.members + 1}"
            )
        padded = -(-_tar_size(header) // TAR_BLOCK) * TAR_BLOCK
        if header[156:157] in self._EXTENSIONS:
            self._held += header
            self._holding = padded
            return
        self.members += 1
        member = bytes(self._held) + header
        self._held.clear()
        if header[156:157] == b"5":  # a directory: no data, and every part needs it
            for writer in self._writers:
                writer.write(member)
            return
        self._current = self._sizes.index(min(self._sizes))
        self._writers[self._current].write(member)
        self._remaining = padded

    def close(self):
        """End every writer's tar; raise if the stream stopped inside a member."""
        if self._remaining or self._holding or self._header or self._held or not self._ended:
            raise PgBackupError(
                "pg_basebackup's tar stream ended early (inside a file, or without its end marker)"
            )
        for writer in self._writers:
            writer.write(bytes(2 * TAR_BLOCK))


def _tar_size(header: bytes) -> int:
    field = header[124:136]
    if field[0] & 0x80:  # base-256, for members of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0")[0].strip() or b"0", 8)


def restore_base(set_path: str, keys: KeyRing, target_dir: str, verify_checksums: bool = False) -> dict:
    """Unpack a base backup into an empty (or new) folder, then pg_verifybackup it.

    Every byte handed to tar is authenticated on the way (AES-GCM per chunk, SHA-256 of
    the file against the sealed manifest), so by default pg_verifybackup checks what
    the stream cannot: every file of PostgreSQL's backup_manifest present with its size,
    and the WAL the backup needs there and parseable. verify_checksums also reads every
    restored file back against the manifest's checksums (a second full read; for drills).

    The target must be empty, so nothing existing is ever overwritten; on any failure
    the partly written target is removed again.
    """
    set_path = resolve_set(set_path)
    target_dir = os.path.abspath(target_dir)
    with hold(set_path, exclusive=False, wait=True, what=f"backup set {set_path}"):
        record = open_set(set_path, keys)
        if record.get("kind") != "physical":
            raise PgBackupError(
                f"{set_path} is a {record.get('kind')} set; restore-base needs a physical one"
            )
        if os.path.exists(target_dir) and os.listdir(target_dir):
            raise RefusedError(
                f"target directory {target_dir} is not empty; restore a base backup into a new folder"
            )
        require_free_space(
            os.path.dirname(target_dir),
            sum(part["plaintext_size"] for part in record["base"]),
            "to unpack the base backup",
        )
        created = not os.path.exists(target_dir)
        try:
            os.makedirs(target_dir, mode=0o700, exist_ok=True)
            _unpack(set_path, record, keys, target_dir)
            checks = [] if verify_checksums else ["--skip-checksums"]
            pg.run_tool(
                [
                    pg.tool("pg_verifybackup", pg.major_of(record["server"].get("version_num"))),
                    "--quiet",
                    *checks,
                    target_dir,
                ],
                f"pg_verifybackup of the restored {target_dir}",
            )
        except OSError as error:
            _clear(target_dir, created)
            raise describe_os_error(error, f"unpacking into {target_dir}") from None
        except BaseException:
            _clear(target_dir, created)
            raise
    log.info("base backup %s restored into %s and verified", record["name"], target_dir)
    return {
        "set": set_path,
        "name": record["name"],
        "target_dir": target_dir,
        "wal": record.get("wal"),
        "checksums_verified": verify_checksums,
    }


def _unpack(set_path: str, record: dict, keys: KeyRing, target_dir: str):
    """Each part through its own tar, side by side; the first failure stops them all."""
    parts = record["base"]
    tars: list[pg.ToolRun] = []
    pool = concurrent.futures.ThreadPoolExecutor(len(parts), thread_name_prefix="pgbackup-unpack")
    try:
        for _ in parts:
            # 1 MiB records read whole: tar's default 10 KiB reads cost more CPU than the writes.
            tars.append(
                pg.ToolRun(
                    [
                        "tar",
                        "--extract",
                        "--file=-",
                        f"--blocking-factor={pg.PIPE_BYTES // TAR_BLOCK}",
                        "--read-full-records",
                        f"--directory={target_dir}",
                    ],
                    stdin=subprocess.PIPE,
                )
            )
        feeds = [
            pool.submit(_feed, set_path, record, part, keys, tar)
            for part, tar in zip(parts, tars, strict=True)
        ]
        concurrent.futures.wait(feeds, return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = next((feed for feed in feeds if feed.done() and feed.exception()), None)
        if failed is not None:
            raise failed.exception()
        for part, tar in zip(parts, tars, strict=True):
            tar.finish(f"unpacking {part['path']}")
    except BaseException:
        for tar in tars:
            tar.kill()  # the other feeds stop at their next write
        raise
    finally:
        pool.shutdown(wait=True)


def _feed(set_path: str, record: dict, part: dict, keys: KeyRing, tar: pg.ToolRun):
    try:
        decrypt_checked(set_path, part, keys, tar.process.stdin, record)
        tar.process.stdin.close()
    except BrokenPipeError:
        # tar stopped reading: its own error says why (a full disk, a damaged archive).
        failure = tar.failure(f"unpacking {part['path']}")
        if failure:
            raise failure from None
        raise


def _clear(target_dir: str, created: bool):
    if not os.path.isdir(target_dir):
        return
    if created:
        remove_tree(target_dir)
        return
    for name in os.listdir(target_dir):
        child = os.path.join(target_dir, name)
        if os.path.isdir(child) and not os.path.islink(child):
            remove_tree(child)
        else:
            os.unlink(child)
