"""Verify a backup set, and restore it without ever losing what is there.

Nothing unverified ever becomes the live database. Each database is loaded into a
scratch database straight from the decrypting pipes (load.py: no plaintext on disk,
every chunk authenticated before pg_restore reads it) and renamed into place only
once every file of its dump checked out whole; any failure drops the scratch
database and leaves the target as it was. An existing non-empty target is replaced
only with --force, and is then kept under a new name rather than dropped. Globals
are checked whole in memory before psql runs them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import re
import subprocess
import threading

from . import manifest, pg, pgarchive
from .crypto import (
    VERSION_PUBLIC_KEY,
    DecryptedReader,
    KeyRing,
    check_binding,
    check_structure,
    put_until_stopped,
    read_header,
)
from .errors import CorruptError, PgBackupError, RefusedError
from .fsutil import check_set_folder, free_bytes, hold, open_no_follow
from .load import load_database
from .retention import scan

log = logging.getLogger("pgbackup")

_IDENTIFIER_BYTES = 63
# What a restore loads into: pgbackup_restore_<pid>_<number>_<UTC time>, renamed when
# done (<number>: the database's in the restore; "<number>e" names an empty target set
# aside to be dropped; restores before 2026-12 wrote no number).
SCRATCH_PREFIX = "pgbackup_restore_"
SCRATCH_NAME = re.compile(rf"{SCRATCH_PREFIX}\d+_(?:\d+e?_)?\d{{8}}T\d{{6}}Z")
# The first key of the advisory lock a restore holds on its scratch database's name.
SCRATCH_LOCK_CLASS = 0x70676272
# The files a directory archive's TOC may name (pg_backup_directory.c), and the lines
# of its large object lists.
_DATA_FILE = re.compile(r"\d+\.dat|blobs(_\d+)?\.toc")
_BLOB_LINE = re.compile(rb"(\d+) (blob_\d+\.dat)")
# A database replaced with --force is kept as <name>_pre_restore_<UTC time>.
KEPT_MARK = "_pre_restore_"
KEPT_NAME = re.compile(rf"{KEPT_MARK}(\d{{8}}T\d{{6}}Z)$")
# Where the backup role puts sets; a bare set name is looked up here.
DEFAULT_BACKUP_DIR = "/var/backups/postgresql"


class _Discard:
    def write(self, data):
        return len(data)


def _open_listed(set_path: str, entry: dict):
    path = os.path.join(set_path, entry["path"])
    try:
        return path, os.fdopen(open_no_follow(path, os.O_RDONLY), "rb")
    except FileNotFoundError:
        raise CorruptError(f"{path} is listed in the manifest but missing") from None


def _check_against_manifest(path: str, stats, entry: dict):
    if stats.sha256 != entry["sha256"] or stats.encrypted_bytes != entry["size"]:
        raise CorruptError(
            f"{path} does not match the manifest (SHA-256 or size differs): "
            "it was replaced by another file or altered"
        )
    if stats.plaintext_bytes is not None and stats.plaintext_bytes != entry["plaintext_size"]:
        raise CorruptError(
            f"{path} decrypts to {stats.plaintext_bytes} bytes; the manifest says {entry['plaintext_size']}"
        )


def _header_of_the_set(path: str, record: dict):
    """A check of a file's header: the set's format version and the set's key ids."""

    def check(header):
        expected_version = VERSION_PUBLIC_KEY if record["format_version"] == 2 else 1
        if header.version != expected_version or sorted(header.key_ids) != sorted(manifest.key_ids(record)):
            raise CorruptError(
                f"{path} is a version {header.version} file for key id(s) {', '.join(header.key_ids)}; "
                f"its set's manifest is version {record['format_version']} for "
                f"{', '.join(manifest.key_ids(record))}"
            )

    return check


class CheckedFile:
    """One file of a set, decrypted as it is read; finish() authenticates its end and
    checks its size and SHA-256 against the manifest."""

    def __init__(self, set_path: str, entry: dict, keys: KeyRing, record: dict):
        self.path, self._source = _open_listed(set_path, entry)
        self._entry = entry
        try:
            self._reader = DecryptedReader(
                self._source,
                keys,
                name=self.path,
                binding=manifest.binding(set_path, entry),
                check_header=_header_of_the_set(self.path, record),
            )
        except BaseException:
            self._source.close()
            raise

    def read(self, size: int) -> bytes:
        return self._reader.read(size)

    def blocks(self, size: int = 1 << 20):
        return iter(lambda: self._reader.read(size), b"")

    def finish(self) -> int:
        stats = self._reader.finish()
        _check_against_manifest(self.path, stats, self._entry)
        return stats.plaintext_bytes

    def close(self):
        self._reader.close()
        self._source.close()

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()


def decrypt_checked(set_path: str, entry: dict, keys: KeyRing, target, record: dict) -> int:
    """Decrypt one file of the set into target and check it against the manifest."""
    with CheckedFile(set_path, entry, keys, record) as plain:
        for block in plain.blocks():
            target.write(block)
        return plain.finish()


def read_checked(set_path: str, entry: dict, keys: KeyRing, record: dict) -> bytes:
    """A small file of the set (globals, a TOC), whole and checked, in memory."""
    target = io.BytesIO()
    decrypt_checked(set_path, entry, keys, target, record)
    return target.getvalue()


def check_file_structure(set_path: str, entry: dict, record: dict):
    """What a host without a private key can check of one file of a set: size and
    SHA-256 against the manifest, a header of the set's version written for this set,
    path and recipients, and every record framed up to one final record."""
    path, source = _open_listed(set_path, entry)
    with source:
        header, stats = check_structure(source, path, binding=manifest.binding(set_path, entry))
    _check_against_manifest(path, stats, entry)
    _header_of_the_set(path, record)(header)


def resolve_set(set_path: str) -> str:
    """The absolute path of a set named on the command line. A bare name that is not a
    folder here is looked up in the default backup directory; a set that does not exist
    is one clear line naming the sets that do."""
    if os.sep not in set_path and not os.path.lexists(set_path):
        in_default = os.path.join(DEFAULT_BACKUP_DIR, set_path)
        if os.path.lexists(in_default):
            return in_default
        set_path = in_default
    path = os.path.abspath(set_path)
    if os.path.lexists(path):
        if not os.path.islink(path) and not os.path.isdir(path):
            raise PgBackupError(f"{path} is a file, not a backup set folder")
        return path
    parent = os.path.dirname(path)
    try:
        there = [entry["name"] for entry in scan(parent) if entry["status"] == "complete"]
    except PgBackupError:
        raise PgBackupError(f"backup set {path} does not exist, nor does its folder {parent}") from None
    listing = ", ".join(there[:10]) + (f" and {len(there) - 10} more" if len(there) > 10 else "")
    raise PgBackupError(
        f"backup set {path} does not exist; "
        + (
            f"complete sets in {parent}, newest first: {listing}"
            if there
            else f"{parent} holds no complete set"
        )
    )


def open_set(set_path: str, keys: KeyRing | None, check_mac: bool = True) -> dict:
    """The manifest of a set whose folder holds nothing but plain files, bound to this
    folder, with its MAC checked by one of the keys (which reading a set needs);
    `check_mac=False` only for the check a host without a private key can make."""
    check_set_folder(set_path)
    record = manifest.load(set_path)
    if check_mac:
        if keys is None:
            raise PgBackupError(f"reading {set_path} needs its private key (--key-file)")
        manifest.check(record, keys, set_path)
    return record


def verify_set(set_path: str, keys: KeyRing | None = None) -> dict:
    """With keys: decrypt and authenticate every file of the set. Without (a database
    host holds only public keys): check every file's structure, size and hash against
    the manifest. Touches no database either way."""
    set_path = resolve_set(set_path)
    with hold(set_path, exclusive=False, wait=True, what=f"backup set {set_path}"):
        record = open_set(set_path, keys, check_mac=keys is not None)
        plaintext = 0
        count = 0
        for entry, _database in manifest.files_of(record):
            if keys is None:
                check_file_structure(set_path, entry, record)
                plaintext += entry["plaintext_size"]
            else:
                plaintext += decrypt_checked(set_path, entry, keys, _Discard(), record)
            count += 1
    log.info(
        "verified %s (%s): %d file(s), %d bytes of dump data",
        set_path,
        "decrypted" if keys is not None else "structure, sizes and hashes; no private key",
        count,
        plaintext,
    )
    return {
        "set": set_path,
        "name": record["name"],
        "files": count,
        "encrypted_bytes": record["total_size"],
        "plaintext_bytes": plaintext,
        "databases": [database["name"] for database in record["databases"]],
        "started_at": record["started_at"],
        "decrypted": keys is not None,
        "key_ids": manifest.key_ids(record),
    }


def _fit_identifier(base: str, suffix: str) -> str:
    """base + suffix cut to PostgreSQL's 63-byte identifier limit, suffix kept whole."""
    room = _IDENTIFIER_BYTES - len(suffix.encode())
    cut = base.encode()[:room].decode("utf-8", "ignore")
    return cut + suffix


def _preflight(targets: list[tuple[dict, str]], force: bool) -> dict[str, str]:
    """Check every target before anything is written; return each one's fate."""
    fates = {}
    with pg.connect() as conn:
        for _database, target in targets:
            if not pg.database_exists(conn, target):
                fates[target] = "create"
                continue
            objects = pg.user_object_count(target)
            if objects and not force:
                raise RefusedError(
                    f"database {target!r} exists and is not empty ({objects} relations or large objects); "
                    "restore under another name (--target-db) or pass --force to replace it "
                    "(the current database is kept under a new name)"
                )
            sessions = pg.sessions_after_grace(conn, target)
            if sessions:
                raise RefusedError(
                    f"database {target!r} is in use by {len(sessions)} session(s): {'; '.join(sessions)}; "
                    "stop its clients before restoring over it"
                )
            fates[target] = "keep-previous" if objects else "replace-empty"
    return fates


class DumpFiles:
    """One database's files in a set, as the loader (load.py) reads them: the table of
    contents, each data entry's plaintext for its pipe, and a record of which files
    have been checked whole, so that none is left unchecked before the swap."""

    def __init__(self, set_path: str, record: dict, database: dict, keys: KeyRing):
        self.set_path = set_path
        self.record = record
        self.keys = keys
        self.name = database["name"]
        self.is_directory = database["format"] == "directory"
        self._files = {entry.get("name", entry["path"]): entry for entry in database["files"]}
        if database["format"] not in ("custom", "directory") or (
            not self.is_directory and len(database["files"]) != 1
        ):
            raise CorruptError(
                f"the manifest of {set_path} says database {self.name!r} is a {database['format']!r} dump "
                f"of {len(database['files'])} file(s); pgbackup writes a custom dump as one file, or a "
                "directory dump; nothing was restored"
            )
        self._sizes = database.get("relation_bytes", {})
        self._checked: set[str] = set()
        self._lock = threading.Lock()
        self._blob_files: dict[int, list[tuple[str, str]]] = {}
        self._require_listed_sizes()

    def _require_listed_sizes(self):
        """Refuse a file moved from elsewhere, truncated or replaced before anything is
        loaded: its header and size are known up front, its hash only at its end."""
        for entry in self._files.values():
            path, source = _open_listed(self.set_path, entry)
            with source:
                header = read_header(source.read, path)
                check_binding(header, manifest.binding(self.set_path, entry), path)
                _header_of_the_set(path, self.record)(header)
                size = os.fstat(source.fileno()).st_size
            if size != entry["size"]:
                raise CorruptError(
                    f"{path} does not match the manifest: it is {size} bytes, the manifest says "
                    f"{entry['size']} (truncated, or replaced by another file); nothing was restored"
                )

    def _entry(self, file_name: str) -> dict:
        try:
            return self._files[file_name]
        except KeyError:
            raise CorruptError(
                f"the dump of {self.name!r} in {self.set_path} names {file_name} in its table of contents, "
                "and the set has no such file"
            ) from None

    def _mark_checked(self, file_name: str):
        with self._lock:
            self._checked.add(file_name)

    def _read_whole(self, file_name: str) -> bytes:
        data = read_checked(self.set_path, self._entry(file_name), self.keys, self.record)
        self._mark_checked(file_name)
        return data

    def table_of_contents(self) -> pgarchive.Archive:
        """The archive's header and entries (a directory set's toc.dat is checked whole
        first; a custom set's is read from the front of its stream)."""
        if self.is_directory:
            archive = pgarchive.read_archive(
                io.BytesIO(self._read_whole("toc.dat")).read, f"{self.name}/toc.dat"
            )
            if archive.compression:
                # Its data files would be .dat.gz; pgbackup dumps with --compress=0.
                raise CorruptError(
                    f"the dump of {self.name!r} in {self.set_path} says its data files are compressed, "
                    "which pgbackup never writes"
                )
            return archive
        (entry,) = self._files.values()
        with CheckedFile(self.set_path, entry, self.keys, self.record) as plain:
            return pgarchive.read_archive(plain.read, plain.path)

    def size_of(self, entry: pgarchive.Entry) -> int:
        """What loading an entry's data costs, roughly: its plaintext size in a
        directory set, the table's size at backup time as the manifest has it in a
        custom one (0 when unknown or small)."""
        if self.is_directory:
            return sum(self._files[name]["plaintext_size"] for name in self._file_names(entry))
        size = self._sizes.get(entry.catalog[1], 0) if isinstance(self._sizes, dict) else 0
        return size if isinstance(size, int) else 0

    def _listed_name(self, file_name: str) -> str:
        """A file name the archive gives, which must be a file of the set: never a path."""
        self._entry(file_name)
        return file_name

    def _data_file_name(self, entry: pgarchive.Entry) -> str:
        """An entry's data file, as the TOC names it: a plain name pg_dump would give,
        and a file of this set; anything else (a path, say) is refused."""
        name = entry.file_name or ""
        if not _DATA_FILE.fullmatch(name):
            raise CorruptError(
                f"the table of contents of {self.name!r} in {self.set_path} names {name[:80]!r} "
                "as a data file, which pg_dump never does"
            )
        return self._listed_name(name)

    def _blobs(self, entry: pgarchive.Entry) -> list[tuple[int, str]]:
        """(oid, file name) of each large object of a BLOBS entry, from its checked list,
        read as pg_restore reads it (a line each, "<oid> blob_<oid>.dat")."""
        if entry.dump_id not in self._blob_files:
            list_name = self._data_file_name(entry)
            toc = self._read_whole(list_name)
            objects = []
            for line in toc.split(b"\n"):
                if not line:
                    continue
                listed = _BLOB_LINE.fullmatch(line)
                if not listed or not 0 < int(listed.group(1)) < 2**32:
                    raise CorruptError(
                        f"{list_name} of {self.name!r} in {self.set_path} is not a large object list: "
                        f"{line[:80]!r}"
                    )
                objects.append((int(listed.group(1)), self._listed_name(listed.group(2).decode())))
            self._blob_files[entry.dump_id] = objects
        return self._blob_files[entry.dump_id]

    def _file_names(self, entry: pgarchive.Entry) -> list[str]:
        """A directory set's files that hold an entry's data."""
        if not entry.has_data:
            return []
        if entry.desc == "BLOBS":
            return [self._data_file_name(entry)] + [name for _, name in self._blobs(entry)]
        return [self._data_file_name(entry)]

    def _copy_chunks(self, file_name: str, archive: pgarchive.Archive, out):
        """A file's plaintext as the chunks of a custom archive's data, each authenticated
        before it is written, then the end of the data."""
        with self.open_checked(file_name) as plain:
            for block in plain.blocks():
                if block:  # a length of 0 would end the data
                    out.write(pgarchive.encode_integer(len(block), archive.int_size))
                    out.write(block)
            # A file whose end does not check out fails here; the load then stops and
            # its scratch database is dropped, whatever pg_restore made of it.
            plain.finish()
        out.write(pgarchive.encode_integer(0, archive.int_size))
        self._mark_checked(file_name)

    def feed_entry(self, entry: pgarchive.Entry, archive: pgarchive.Archive, out):
        """Write a directory set's entry to out (a pg_restore's standard input) as a custom
        archive's data block: a table's file, or each large object's with its oid."""
        if not entry.has_data:
            return
        out.write(pgarchive.data_block(archive, entry))
        if entry.desc != "BLOBS":
            self._copy_chunks(self._data_file_name(entry), archive, out)
            return
        for oid, name in self._blobs(entry):
            # pg_dump writes an Oid as a C int: one over 2^31 comes out negative.
            signed = oid if oid < 2**31 else oid - 2**32
            out.write(pgarchive.encode_integer(signed, archive.int_size))
            self._copy_chunks(name, archive, out)
        out.write(pgarchive.encode_integer(0, archive.int_size))

    def open_checked(self, file_name: str) -> CheckedFile:
        return CheckedFile(self.set_path, self._entry(file_name), self.keys, self.record)

    def dealer(self, entry: pgarchive.Entry, archive: pgarchive.Archive) -> Dealer:
        """A table whose data (uncompressed COPY text) to deal to several loaders."""
        if not pgarchive.is_copy_text(archive, entry):
            raise PgBackupError(
                f"entry {entry.dump_id} of {self.name!r} cannot be dealt: its data is not COPY text"
            )
        return Dealer(self, entry, archive)

    @contextlib.contextmanager
    def custom_blocks(self, archive: pgarchive.Archive, stop: threading.Event):
        """A custom set's file, decrypted from its start and read past its table of
        contents (`archive`, read before), with a scanner of its data blocks."""
        (file_name,) = self._files
        with self.open_checked(file_name) as plain:
            pgarchive.read_archive(plain.read, plain.path)
            yield plain, pgarchive.BlockScanner(plain.read, archive, plain.path, stop=stop)

    def feed_entries(self, entries, archive: pgarchive.Archive, out, stop: threading.Event, dealer=None):
        """Write the data blocks of `entries` to out (a pg_restore's standard input), in
        their order: a directory set's from its files; a custom set's from a stream of
        its file of this loader's own (the blocks of other entries skipped; the entries
        in the file's order); the dealt table's (if any) from the dealer."""
        with contextlib.ExitStack() as files:
            scanner = None
            for entry in entries:
                if stop.is_set():
                    return
                if not entry.has_data:
                    continue
                if dealer is not None and entry is dealer.entry:
                    dealer.take(out, stop)
                elif self.is_directory:
                    self.feed_entry(entry, archive, out)
                else:
                    if scanner is None:
                        _plain, scanner = files.enter_context(self.custom_blocks(archive, stop))
                    scanner.next_block(entry)
                    out.write(pgarchive.data_block(archive, entry))
                    for piece in scanner.body(entry):
                        out.write(piece)

    def feed_whole(self, target, stop: threading.Event, check_whole: bool = True):
        """Stream a custom archive whole into target (a pg_restore's standard input),
        each chunk authenticated before it is written. When pg_restore has what it needs
        and ends: check_whole, read on to check the whole file (final chunk, size,
        hash); else stop there, leaving that to the loader that reads furthest."""
        (file_name,) = self._files
        with self.open_checked(file_name) as plain:
            for block in plain.blocks():
                if stop.is_set():
                    return
                if target is not None:
                    try:
                        target.write(block)
                    except BrokenPipeError:
                        if not check_whole:
                            return
                        target = None
            plain.finish()
        self._mark_checked(file_name)

    def check_the_rest(self):
        """Decrypt and check every file of the dump that no loader has read whole."""
        for file_name, entry in self._files.items():
            if file_name not in self._checked:
                decrypt_checked(self.set_path, entry, self.keys, _Discard(), self.record)
                self._mark_checked(file_name)


class Dealer:
    """One table's data dealt to several pg_restore processes at once, so that the
    loaders that have finished their own tables share the largest one's COPY rather
    than wait for it. One thread decrypts the table's data and cuts it into pieces of
    whole rows; each loader takes the next piece when it is ready for one. A directory
    set's file is COPY text: a row ends in a raw newline (one inside a value is
    escaped). A custom set's table is found in the file's one stream and cut where a
    row's chunk ends (pgarchive.BlockScanner), and the thread reads on to the file's
    end. Pieces are taken in order, so the table's physical row order differs from the
    dump's only between neighbouring pieces. A directory set's file is checked whole
    (final chunk, size, hash) before its last piece is handed out; a custom set's, as
    the thread reads on past the table, and check() raises what failed there once the
    data is in. A failure before the table's end reaches every taker."""

    _END = object()
    _TABLE_END = object()
    # Pieces decrypted ahead of the loaders: memory is this many pieces of about a MiB.
    _AHEAD = 4
    PIECE_BYTES = 1 << 20

    def __init__(self, dump: DumpFiles, entry: pgarchive.Entry, archive: pgarchive.Archive):
        self._dump = dump
        self.entry = entry
        self._archive = archive
        self._pieces: queue.Queue = queue.Queue(maxsize=self._AHEAD)
        self._lock = threading.Lock()
        self._started = False
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.pieces_taken: list[int] = []

    def _start(self, stop: threading.Event):
        with self._lock:
            if not self._started:
                self._started = True
                self._thread = threading.Thread(
                    target=self._cut, args=(stop,), name="pgbackup-deal", daemon=True
                )
                self._thread.start()

    def _cut(self, stop: threading.Event):
        table_ended = False
        try:
            pieces = self._directory_pieces(stop) if self._dump.is_directory else self._custom_pieces(stop)
            held = None  # each piece waits for the next: a directory set's last, for the check
            for piece in pieces:
                if stop.is_set():
                    return
                if piece is self._TABLE_END:
                    break
                if held is not None:
                    put_until_stopped(self._pieces, held, stop)
                held = piece
            if held is not None:
                put_until_stopped(self._pieces, held, stop)
            put_until_stopped(self._pieces, self._END, stop)
            table_ended = True
            for _ in pieces:  # a custom set's file: read on to its end, and check it
                pass
        except BaseException as error:
            if table_ended:
                self._failure = error  # raised by check(), before the load ends
            else:
                put_until_stopped(self._pieces, error, stop)  # raised by every taker

    def check(self):
        """After the data phase: wait for the rest of a custom set's file to be read and
        checked, and raise what failed there."""
        if self._thread is not None:
            self._thread.join()
        if self._failure is not None:
            raise self._failure

    def _directory_pieces(self, stop: threading.Event):
        file_name = self._dump._data_file_name(self.entry)
        # pg_dump ends a table's data with the end-of-copy line and two empty lines
        # ("\\.\n\n\n"), after which the server ignores the rest of a COPY: never
        # cut inside them, or a loader would be given empty lines as rows.
        last_cut = self._dump._entry(file_name)["plaintext_size"] - len(b"\\.\n\n\n")
        with self._dump.open_checked(file_name) as plain:
            tail, read = bytearray(), 0  # a row longer than a block grows here
            for block in plain.blocks(self.PIECE_BYTES):
                if stop.is_set():
                    return
                end = block.rfind(b"\n", 0, max(last_cut - read, 0)) + 1
                read += len(block)
                if not end:
                    tail += block
                    continue
                yield b"".join((tail, memoryview(block)[:end]))  # one copy
                tail = bytearray(block[end:])
            plain.finish()
        self._dump._mark_checked(file_name)
        # A tail without its newline goes last, whole: COPY refuses it as it would
        # from pg_restore.
        if tail:
            yield bytes(tail)

    def _custom_pieces(self, stop: threading.Event):
        (file_name,) = self._dump._files
        with self._dump.custom_blocks(self._archive, stop) as (plain, scanner):
            scanner.next_block(self.entry)
            yield from scanner.rows(self.entry, self.PIECE_BYTES)
            yield self._TABLE_END
            while not stop.is_set() and plain.read(1 << 20):
                pass
            if stop.is_set():
                return
            plain.finish()
        self._dump._mark_checked(file_name)

    def take(self, out, stop: threading.Event):
        """Write the entry's data block to out (a pg_restore's standard input): the
        pieces this loader takes, as they come, then the end of the data."""
        self._start(stop)
        int_size = self._archive.int_size
        out.write(pgarchive.data_block(self._archive, self.entry))
        taken = 0
        while not stop.is_set():
            try:
                piece = self._pieces.get(timeout=0.2)
            except queue.Empty:
                continue
            if piece is self._END or isinstance(piece, BaseException):
                self._pieces.put(piece)  # for the other takers; the cutter has ended
                if piece is not self._END:
                    raise piece
                out.write(pgarchive.encode_integer(0, int_size))
                break
            if self._dump.is_directory:  # a custom set's pieces are chunks already
                out.write(pgarchive.encode_integer(len(piece), int_size))
            out.write(piece)
            taken += 1
        with self._lock:
            self.pieces_taken.append(taken)


def _restore_globals(set_path: str, record: dict, keys: KeyRing):
    """Roles and tablespaces, checked whole in memory first, then run by psql."""
    script = read_checked(set_path, record["globals"], keys, record)
    run = pg.ToolRun(
        [
            pg.tool("psql"),
            "--no-password",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=0",
            f"--dbname={pg.dbname_conninfo(pg.MAINTENANCE_DB)}",
            "--file=-",
        ],
        stdout=subprocess.DEVNULL,
        stdin=subprocess.PIPE,
    )
    try:
        run.process.stdin.write(script)
        run.process.stdin.close()
    except BrokenPipeError:
        pass
    text = run.finish("restoring the globals (roles, tablespaces)")
    # Roles that exist already (the one we log in as, at least) are expected.
    errors = [line for line in text.splitlines() if "ERROR:" in line and "already exists" not in line]
    if errors:
        raise PgBackupError(f"restoring the globals failed: {errors[0].strip()}")


def _plan(set_path: str, keys: KeyRing, databases: list[str] | None, target_db: str | None, force: bool):
    record = open_set(set_path, keys)
    if record["kind"] != "logical":
        raise PgBackupError(
            f"{set_path} is a {record['kind']} set (a base backup), not a dump: unpack it with "
            "`pgbackup restore-base SET --target-dir DIR`, the start of a point-in-time recovery"
        )
    selected = manifest.select_databases(record["databases"], databases, "in this backup set")
    if target_db is not None and len(selected) != 1:
        raise PgBackupError("--target-db needs exactly one --database to restore")
    targets = [(database, target_db or database["name"]) for database in selected]
    return record, selected, targets, _preflight(targets, force)


def plan_restore(
    set_path: str,
    keys: KeyRing,
    databases: list[str] | None = None,
    target_db: str | None = None,
    force: bool = False,
    check_space: bool = True,
) -> dict:
    """What restore_set would do, and whether it would refuse; writes nothing."""
    set_path = resolve_set(set_path)
    with hold(set_path, exclusive=False, wait=True, what=f"backup set {set_path}"):
        record, _selected, targets, fates = _plan(set_path, keys, databases, target_db, force)
        # As the restore does, but dropping nothing: every file's header and size, then
        # the space, counting what the abandoned scratch databases would free.
        for database, _target in targets:
            DumpFiles(set_path, record, database, keys)
        abandoned = _abandoned_scratch(drop=False)
        space = _server_space(targets, freed=sum(database["size_bytes"] for database in abandoned))
        if check_space:
            _require_server_space(space)
    return {
        "set": set_path,
        "name": record["name"],
        "databases": [
            {"database": database["name"], "target": target, "action": fates[target]}
            for database, target in targets
        ],
        "space": space,
        "would_drop": [database["database"] for database in abandoned],
    }


def restore_set(
    set_path: str,
    keys: KeyRing,
    databases: list[str] | None = None,
    target_db: str | None = None,
    jobs: int = 1,
    include_globals: bool = False,
    force: bool = False,
    check_space: bool = True,
) -> dict:
    """check_space=False: restore even where the server's free space is below the size
    the databases had at backup time (bloat included, so more than they may need)."""
    set_path = resolve_set(set_path)
    if jobs < 1:
        raise PgBackupError("--jobs must be at least 1")
    with hold(set_path, exclusive=False, wait=True, what=f"backup set {set_path}"):
        record, _selected, targets, fates = _plan(set_path, keys, databases, target_db, force)
        _abandoned_scratch(drop=True)
        # Every file's size is checked here, before anything is written anywhere.
        dumps = [DumpFiles(set_path, record, database, keys) for database, _target in targets]
        if check_space:
            _require_server_space(_server_space(targets))
        if include_globals:
            # Before the databases: their owners and grants name these roles.
            _restore_globals(set_path, record, keys)
            log.info("globals restored")
        results = _load_then_swap(dumps, targets, fates, jobs)
    return {"set": set_path, "name": record["name"], "globals": include_globals, "databases": results}


def _scratch_lock(conn, name: str, wait: bool) -> bool:
    """The advisory lock a restore holds, for as long as it works on a scratch database,
    on that database's name. wait=False: take it only if no session of the server holds
    it, in any database (advisory locks are per database, and a restore of `postgres`
    holds its locks from template1), on any host."""
    if wait:
        conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (SCRATCH_LOCK_CLASS, name))
        return True
    if not conn.execute(
        "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (SCRATCH_LOCK_CLASS, name)
    ).fetchone()[0]:
        return False
    held_elsewhere = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid = %s::oid AND objid = hashtext(%s)::oid AND objsubid = 2"
        " AND pid <> pg_backend_pid())",
        (SCRATCH_LOCK_CLASS, name),
    ).fetchone()[0]
    if held_elsewhere:
        _scratch_unlock(conn, name)
        return False
    return True


def _scratch_unlock(conn, name: str):
    conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (SCRATCH_LOCK_CLASS, name))


def _abandoned_scratch(drop: bool) -> list[dict]:
    """Scratch databases that restores killed mid-load left (SIGKILL, a host that went
    down): those whose lock no restore holds and which no session is in. drop: drop them,
    never failing the restore that looks (what cannot be dropped is said, and left).
    Returns those dropped, or that would be, with their sizes."""
    found = []
    with pg.connect() as conn:
        for database in pg.list_databases(conn):
            name = database["name"]
            if not SCRATCH_NAME.fullmatch(name) or not _scratch_lock(conn, name, wait=False):
                continue
            try:
                if pg.other_sessions(conn, name):
                    continue
                if drop:
                    pg.drop_database(conn, name)
                    log.warning("dropped %s, left by a restore that was killed while loading", name)
                found.append({"database": name, "size_bytes": database["size_bytes"]})
            except PgBackupError as error:
                log.warning("%s was left by a restore that was killed, and stays: %s", name, error)
            finally:
                _scratch_unlock(conn, name)
    return found


def _server_space(targets: list[tuple[dict, str]], freed: int = 0) -> dict:
    """What the restored databases need in the server's data directory, and what it has
    (plus `freed`, what dropping abandoned scratch databases would free): each as large
    as it was at backup time (the manifest's size_bytes), or as its dump's plaintext
    where an older set does not say. A replaced database is kept, so it frees nothing.
    data_directory and free_bytes are None where pgbackup cannot see the data directory
    (it runs on another host than the server)."""
    needed = sum(
        database["size_bytes"]
        if isinstance(database.get("size_bytes"), int)
        else sum(entry["plaintext_size"] for entry in database["files"])
        for database, _target in targets
    )
    with pg.connect() as conn:
        data_directory = pg.data_directory(conn)
    visible = bool(data_directory) and os.path.isdir(data_directory)
    return {
        "data_directory": data_directory if visible else None,
        "needed_bytes": needed,
        "free_bytes": free_bytes(data_directory) + freed if visible else None,
    }


def _require_server_space(space: dict):
    """Refuse before loading anything when the server's data directory cannot hold the
    restored databases (see _server_space); where it is not visible, say so and go on."""
    if space["free_bytes"] is None:
        log.info("the server's data directory is not visible from here: its free space was not checked")
        return
    if space["needed_bytes"] > space["free_bytes"]:
        raise RefusedError(
            f"not enough free space in {space['data_directory']} for the restored database(s): need "
            f"{space['needed_bytes']} bytes, have {space['free_bytes']} (their size at backup time, bloat "
            "included); nothing was restored. Free space, or restore anyway with --no-space-check"
        )


def _load_then_swap(dumps: list[DumpFiles], targets: list[tuple[dict, str]], fates: dict, jobs: int):
    """Load each database into a scratch database of its own; only once every one of them
    has loaded and checked out whole, rename them all into place in one transaction. A
    bad file anywhere in the set, or a failure of any kind, replaces nothing: the scratch
    databases are dropped and every target stays as it was."""
    suffix = manifest.compact_time(manifest.utc_now())
    names = [target for _database, target in targets]
    kept = _kept_names(names, fates, suffix)
    scratches: list[str] = []
    try:
        with contextlib.ExitStack() as connections:
            # Holds each scratch database's lock until it is renamed or dropped, so that no
            # other restore takes a live one for a killed one's (see _abandoned_scratch).
            # Locks only: a connection idle for hours may be gone by the end.
            guard = connections.enter_context(pg.connect())
            for number, (dump, (database, _target)) in enumerate(zip(dumps, targets, strict=True)):
                scratch = _scratch_name(number, suffix)
                _scratch_lock(guard, scratch, wait=True)
                with pg.connect() as conn:
                    pg.create_database(conn, scratch, database)
                scratches.append(scratch)
                load_database(dump, scratch, jobs)
            swap_db = pg.admin_db_for(*names)
            swap = connections.enter_context(pg.connect(swap_db))
            if swap_db != pg.MAINTENANCE_DB:
                # `postgres` is restored: the locks move to template1 (advisory locks are
                # per database), and the guard leaves `postgres`, whose rename it would stop.
                for scratch in scratches:
                    _scratch_lock(swap, scratch, wait=True)
                guard.close()
            return _swap_into_place(swap, scratches, targets, fates, kept, suffix)
    except BaseException:
        _drop_scratch(scratches)
        raise


def _scratch_name(number: int, suffix: str, emptied_target: bool = False) -> str:
    """A name SCRATCH_NAME matches, for this restore's database `number` (or, emptied_target,
    for the empty target it sets aside to drop)."""
    return _fit_identifier(f"{SCRATCH_PREFIX}{os.getpid()}_{number}{'e' if emptied_target else ''}_", suffix)


def _kept_names(names: list[str], fates: dict, suffix: str) -> dict[str, str]:
    """The name each target replaced with --force is kept under: <name>_pre_restore_<time>,
    cut to fit, with the database's number where two cut names would be the same."""
    kept = {}
    for number, target in enumerate(names):
        if fates[target] == "keep-previous":
            name = _fit_identifier(target, f"{KEPT_MARK}{suffix}")
            if name in kept.values():
                name = _fit_identifier(target, f"_{number}{KEPT_MARK}{suffix}")
            kept[target] = name
    return kept


def _drop_scratch(scratches: list[str]):
    """Drop a failed restore's scratch databases, ending their loaders' sessions, on a
    connection of its own (the one that failed may be gone). Never raises: the restore's
    own error is the one to report, and what stays is dropped by the next restore (see
    _abandoned_scratch)."""
    if not scratches:
        return
    try:
        with pg.connect() as conn:
            for scratch in scratches:
                try:
                    pg.drop_database(conn, scratch, force=True)
                except PgBackupError as error:
                    log.warning("%s stays, for the next restore to drop: %s", scratch, error)
    except PgBackupError as error:
        log.warning("%s stay, for the next restore to drop: %s", ", ".join(scratches), error)


# How long the swap waits for each database's lock (a CREATE DATABASE copying a target,
# a session logging in) before it gives up, replacing nothing.
SWAP_LOCK_TIMEOUT = "60s"


def _swap_into_place(
    conn,
    scratches: list[str],
    targets: list[tuple[dict, str]],
    fates: dict,
    kept: dict[str, str],
    suffix: str,
) -> list[dict]:
    """Rename every scratch database to its target in one transaction (ALTER DATABASE
    ... RENAME is transactional): all are in place, or none and the targets are as they
    were. A target replaced with --force is kept under another name; an empty one is
    renamed aside in the same transaction, and dropped after it."""
    for _database, target in targets:
        sessions = pg.sessions_after_grace(conn, target) if fates[target] != "create" else []
        if sessions:
            raise RefusedError(
                f"database {target!r} got open sessions during the restore ({'; '.join(sessions)}); "
                "nothing was replaced"
            )
    results, emptied = [], []
    try:
        with conn.transaction():
            conn.execute(f"SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'")
            for number, (scratch, (database, target)) in enumerate(zip(scratches, targets, strict=True)):
                if fates[target] == "keep-previous":
                    pg.rename_database(conn, target, kept[target])
                elif fates[target] == "replace-empty":
                    emptied.append(_scratch_name(number, suffix, emptied_target=True))
                    pg.rename_database(conn, target, emptied[-1])
                pg.rename_database(conn, scratch, target)
                results.append(
                    {"database": database["name"], "target": target, "kept_previous_as": kept.get(target)}
                )
    except PgBackupError as error:
        raise PgBackupError(f"{error}; nothing was replaced") from None
    for result in results:
        log.info(
            "database %s restored as %s%s",
            result["database"],
            result["target"],
            f" (previous one kept as {result['kept_previous_as']})" if result["kept_previous_as"] else "",
        )
    _drop_scratch(emptied)
    return results


def kept_databases() -> list[dict]:
    """Databases that restore --force kept aside, oldest first, with their age."""
    with pg.connect() as conn:
        names = [database["name"] for database in pg.list_databases(conn)]
    now = manifest.utc_now()
    kept = []
    for name in names:
        match = KEPT_NAME.search(name)
        if match:
            kept_at = manifest.parse_compact_time(match.group(1))
            kept.append(
                {
                    "name": name,
                    "kept_at": manifest.iso(kept_at),
                    "age_days": round((now - kept_at).total_seconds() / 86400, 1),
                }
            )
    return sorted(kept, key=lambda entry: entry["kept_at"])


def drop_kept(
    names: list[str] | None = None, older_than_days: float | None = None, dry_run: bool = False
) -> list[str]:
    """Drop databases kept by restore --force: the ones named, or those older than the
    given days. Only such databases: any other name is refused."""
    if names is None and older_than_days is None:
        raise PgBackupError("say which kept databases to drop: --database NAME or --older-than DAYS")
    kept = {entry["name"]: entry for entry in kept_databases()}
    unknown = [name for name in names or [] if name not in kept]
    if unknown:
        raise RefusedError(
            f"not a database kept by restore --force: {', '.join(unknown)} "
            f"(kept: {', '.join(kept) or 'none'})"
        )
    doomed = list(names or []) + [
        name
        for name, entry in kept.items()
        if older_than_days is not None and entry["age_days"] >= older_than_days and name not in (names or [])
    ]
    if not dry_run:
        with pg.connect() as conn:
            for name in doomed:
                pg.drop_database(conn, name)
                log.info("dropped %s, kept by an earlier restore --force", name)
    return doomed
