"""The header and table of contents of a pg_dump archive, read from a stream.

A restore feeds pg_restore's standard input, never a plaintext file (nor a named
pipe: pg_restore 15.20 and later refuse a directory archive's files unless they are
regular files). It needs to know which entries carry data, to share them among
parallel loaders, and it writes custom archives of its own: the same header and
entries, followed by the data of the entries one loader restores, taken from a
directory set's files. Both archive formats share this layout (pg_backup_archiver.c,
ReadHead and ReadToc); they differ in one format byte and in each entry's
format-specific field: a custom archive's data offset, a directory archive's data
file name. Data blocks are those of pg_backup_custom.c, uncompressed (pgbackup dumps
with --compress=0 and compresses as it encrypts).

Archive versions 1.12 to 1.16 are read: what pg_dump 9.6 to 18 write.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import CorruptError, PgBackupError

MAGIC = b"PGDMP"
FORMAT_CUSTOM = 1
# A directory archive's toc.dat carries the tar format's code (pg_backup_directory.c).
FORMAT_TOC_DAT = 3
OLDEST_VERSION = (1, 12, 0)
NEWEST_VERSION = (1, 16, 0)
# A custom archive's data state (ReadOffset).
OFFSET_POS_NOT_SET = 1
OFFSET_POS_SET = 2
OFFSET_NO_DATA = 3
# A custom archive's data block kinds (BLK_DATA, BLK_BLOBS).
BLOCK_DATA = 1
BLOCK_BLOBS = 3
# teSection
SECTION_NONE, SECTION_PRE_DATA, SECTION_DATA, SECTION_POST_DATA = 1, 2, 3, 4
# Sane bounds, so that a corrupt length is an error rather than a huge allocation.
_MAX_STRING = 1 << 30
_MAX_ENTRIES = 50_000_000


class UnsupportedArchive(CorruptError):
    """An archive this reader does not know (another version or format)."""


@dataclass
class Entry:
    """One TOC entry; `fields` holds everything between the desc and the format-specific
    part as read, so that writing it back is byte for byte what was read."""

    dump_id: int
    had_dumper: int
    catalog: tuple[str, str]
    tag: str
    desc: str
    section: int
    fields: list = field(default_factory=list)
    dependencies: list[str] = field(default_factory=list)
    has_data: bool = False
    file_name: str | None = None

    @property
    def qualified_name(self) -> str:
        """schema.name, for messages (the namespace field; catalog holds oids)."""
        namespace = self.fields[3] if len(self.fields) > 3 else None
        return f"{namespace}.{self.tag}" if isinstance(namespace, str) and namespace else str(self.tag)

    @property
    def copy_statement(self) -> str | None:
        """The COPY ... FROM stdin a TABLE DATA entry's rows are loaded with (its data is
        then COPY text, a row to a line); None for data of another kind (INSERTs)."""
        statement = self.fields[2] if len(self.fields) > 2 else None
        return statement if isinstance(statement, str) and statement.startswith("COPY ") else None


@dataclass
class Archive:
    version: tuple[int, int, int]
    int_size: int
    off_size: int
    archive_format: int
    compression: int
    compression_is_byte: bool
    header_rest: list = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)

    def sections(self) -> dict[int, int]:
        """Each entry's section as `pg_restore --section` sees it: an entry of no section
        (a comment, an ACL) belongs to the section of the entry before it."""
        current, found = SECTION_PRE_DATA, {}
        for entry in self.entries:
            if entry.section != SECTION_NONE:
                current = entry.section
            found[entry.dump_id] = current
        return found

    def data_entries(self) -> list[Entry]:
        """The data section's entries, in TOC order (which is a custom archive's block
        order): the ones with data to load and the ones without (SEQUENCE SET)."""
        return [entry for entry in self.entries if entry.section == SECTION_DATA]


class _Reader:
    def __init__(self, read, name: str):
        self._read = read
        self.name = name
        self.int_size = 4
        self.consumed = 0

    def exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            more = self._read(size - len(data))
            if not more:
                raise CorruptError(f"{self.name}: the archive ends inside its table of contents")
            data += more
        self.consumed += size
        return data

    def byte(self) -> int:
        return self.exact(1)[0]

    def integer(self) -> int:
        raw = self.exact(1 + self.int_size)
        value = int.from_bytes(raw[1:], "little")
        return -value if raw[0] else value

    def string(self) -> str | None:
        length = self.integer()
        if length < 0:
            return None
        if length > _MAX_STRING:
            raise CorruptError(f"{self.name}: a string of {length} bytes in the table of contents")
        return self.exact(length).decode("utf-8", "surrogateescape")


def read_archive(read, name: str) -> Archive:
    """Read the header and TOC of a custom archive or of a directory archive's toc.dat
    through `read(size)`, leaving the stream at the first data block."""
    reader = _Reader(read, name)
    if reader.exact(5) != MAGIC:
        raise UnsupportedArchive(f"{name} is not a pg_dump archive (no PGDMP magic)")
    version = (reader.byte(), reader.byte(), reader.byte())
    if not OLDEST_VERSION <= version <= NEWEST_VERSION:
        raise UnsupportedArchive(
            f"{name} is a pg_dump archive of version {'.'.join(map(str, version))}; this pgbackup reads "
            f"{'.'.join(map(str, OLDEST_VERSION[:2]))} to {'.'.join(map(str, NEWEST_VERSION[:2]))}"
        )
    reader.int_size = reader.byte()
    if not 1 <= reader.int_size <= 8:
        raise CorruptError(f"{name}: integer size {reader.int_size} in the archive header")
    off_size = reader.byte()
    archive_format = reader.byte()
    if archive_format not in (FORMAT_CUSTOM, FORMAT_TOC_DAT):
        raise UnsupportedArchive(f"{name}: archive format {archive_format} is neither custom nor directory")
    compression_is_byte = version >= (1, 15, 0)
    compression = reader.byte() if compression_is_byte else reader.integer()
    # Creation time (7 integers), database name, server and pg_dump versions.
    header_rest = [reader.integer() for _ in range(7)] + [reader.string() for _ in range(3)]
    archive = Archive(
        version, reader.int_size, off_size, archive_format, compression, compression_is_byte, header_rest
    )
    count = reader.integer()
    if not 0 <= count <= _MAX_ENTRIES:
        raise CorruptError(f"{name}: {count} entries in the table of contents")
    for _ in range(count):
        dump_id = reader.integer()
        had_dumper = reader.integer()
        catalog = (reader.string(), reader.string())
        tag, desc = reader.string(), reader.string()
        section = reader.integer()
        # defn, dropStmt, copyStmt, namespace, tablespace, tableam (1.14), relkind (1.16),
        # owner, "false" (the old WITH OIDS flag)
        fields = [reader.string() for _ in range(5)]
        if version >= (1, 14, 0):
            fields.append(reader.string())
        if version >= (1, 16, 0):
            fields.append(reader.integer())
        fields += [reader.string(), reader.string()]
        dependencies = []
        while (dependency := reader.string()) is not None:
            # pg_dump writes each as a dump id in decimal ("%d").
            if not (dependency.isascii() and dependency.isdigit() and len(dependency) <= 10):
                raise CorruptError(f"{name}: entry {dump_id} depends on {dependency[:40]!r}, not a dump id")
            dependencies.append(dependency)
        entry = Entry(dump_id, had_dumper, catalog, tag, desc, section, fields, dependencies)
        if archive_format == FORMAT_CUSTOM:
            flag = reader.byte()
            reader.exact(off_size)
            entry.has_data = flag in (OFFSET_POS_NOT_SET, OFFSET_POS_SET)
        else:
            entry.file_name = reader.string() or None
            entry.has_data = entry.file_name is not None
        archive.entries.append(entry)
    return archive


class _Writer:
    def __init__(self, int_size: int):
        self.int_size = int_size
        self.parts: list[bytes] = []

    def byte(self, value: int):
        self.parts.append(bytes((value,)))

    def integer(self, value: int):
        self.parts.append(encode_integer(value, self.int_size))

    def string(self, value: str | None):
        if value is None:
            self.integer(-1)
            return
        raw = value.encode("utf-8", "surrogateescape")
        self.integer(len(raw))
        self.parts.append(raw)


def encode_integer(value: int, int_size: int) -> bytes:
    """An integer as pg_dump writes one (WriteInt): a sign byte, then the magnitude."""
    return bytes((1 if value < 0 else 0,)) + abs(value).to_bytes(int_size, "little")


def data_file_name(archive: Archive, entry: Entry) -> str | None:
    """The name pg_dump gives an entry's data file in a directory archive."""
    if not entry.has_data:
        return None
    if entry.desc == "BLOBS":
        return f"blobs_{entry.dump_id}.toc" if archive.version >= (1, 16, 0) else "blobs.toc"
    return f"{entry.dump_id}.dat"


def write_toc(archive: Archive, archive_format: int = FORMAT_CUSTOM, with_data=frozenset()) -> bytes:
    """The archive's header and table of contents, every entry as it was read.

    FORMAT_CUSTOM: the start of a custom archive for pg_restore's standard input, the
    entries in `with_data` marked as having data that follows (in the order pg_restore
    asks for it: see data_block), every other entry as having none. FORMAT_TOC_DAT: a
    directory archive's toc.dat, each data entry naming its file.
    """
    out = _Writer(archive.int_size)
    out.parts.append(MAGIC + bytes(archive.version))
    for value in (archive.int_size, archive.off_size, archive_format):
        out.byte(value)
    if archive.compression_is_byte:
        out.byte(archive.compression)
    else:
        out.integer(archive.compression)
    for value in archive.header_rest[:7]:
        out.integer(value)
    for value in archive.header_rest[7:]:
        out.string(value)
    out.integer(len(archive.entries))
    for entry in archive.entries:
        out.integer(entry.dump_id)
        out.integer(entry.had_dumper)
        out.string(entry.catalog[0])
        out.string(entry.catalog[1])
        out.string(entry.tag)
        out.string(entry.desc)
        out.integer(entry.section)
        for value in entry.fields:
            (out.integer if isinstance(value, int) else out.string)(value)
        for dependency in entry.dependencies:
            out.string(dependency)
        out.string(None)
        if archive_format == FORMAT_TOC_DAT:
            out.string(entry.file_name or data_file_name(archive, entry) or "")
        else:
            out.byte(OFFSET_POS_NOT_SET if entry.dump_id in with_data else OFFSET_NO_DATA)
            out.parts.append(bytes(archive.off_size))
    return b"".join(out.parts)


def data_block(archive: Archive, entry: Entry) -> bytes:
    """The start of an entry's data block in a custom archive (_readBlockHeader): its
    kind and dump id. Chunks follow, each its length (encode_integer) then its bytes,
    and a length of 0 ends the data (so an empty chunk is never written); a large
    object block holds, per object, its oid and its chunks with their end, and ends
    with an oid of 0."""
    return bytes((BLOCK_BLOBS if entry.desc == "BLOBS" else BLOCK_DATA,)) + encode_integer(
        entry.dump_id, archive.int_size
    )


class BlockScanner:
    """The data blocks of an uncompressed custom archive, read from a stream after its
    table of contents (read_archive), passed on or skipped in pieces of about a MiB:
    a block, a table's data, can be gigabytes.

    Each block must be where the table of contents puts it (its entries with data, in
    order), or the stream is refused. The end of a table's COPY text is found without
    walking its rows, each its own chunk (pg_dump -Z0 writes one per row): COPY text
    holds no NUL byte and a raw newline only at a row's end, so a newline followed by
    the zero length that ends the data (int_size + 1 zero bytes) is that end and can be
    nothing else. Any other block is walked chunk by chunk.
    """

    def __init__(self, read, archive: Archive, name: str, read_bytes: int = 1 << 20, stop=None):
        """stop: a threading.Event; once set, the next read raises instead."""
        self._read = read
        self._stop = stop
        self._archive = archive
        self.name = name
        self._read_bytes = read_bytes
        self._buffer = bytearray()
        self._position = 0  # the first byte not yet passed on or skipped
        self._blocks = iter([entry for entry in archive.entries if entry.has_data])
        self._size = 1 + archive.int_size  # of an integer: a sign byte, then its magnitude

    def _more(self) -> int | None:
        """Read on, first dropping what was passed on; how many bytes were dropped (the
        buffer's indexes move down by that much), or None at the end of the stream."""
        dropped = 0
        if self._position >= self._read_bytes:
            # A few bytes before the position stay: an end mark's newline may be there.
            dropped = self._position - self._size
            del self._buffer[:dropped]
            self._position -= dropped
        if self._stop is not None and self._stop.is_set():
            raise PgBackupError(f"{self.name}: stopped reading")
        block = self._read(self._read_bytes)
        if not block:
            return None
        self._buffer += block
        return dropped

    def _need(self, size: int, what: str):
        while len(self._buffer) - self._position < size:
            if self._more() is None:
                raise CorruptError(f"{self.name}: the archive ends inside {what}")

    def _integer(self, what: str) -> int:
        self._need(self._size, what)
        raw = self._take(self._size)
        value = int.from_bytes(raw[1:], "little")
        return -value if raw[0] else value

    def _take(self, size: int) -> bytes:
        # Through a view: slicing the bytearray itself would copy the piece twice.
        with memoryview(self._buffer) as view:
            piece = bytes(view[self._position : self._position + size])
        self._position += size
        return piece

    def next_block(self, entry: Entry):
        """Read on to `entry`'s block, skipping the blocks before it, and past its header."""
        for expected in self._blocks:
            what = f"the data of entry {expected.dump_id}"
            self._need(1, what)
            kind = self._take(1)[0]
            found = self._integer(what)
            wanted = BLOCK_BLOBS if expected.desc == "BLOBS" else BLOCK_DATA
            if (kind, found) != (wanted, expected.dump_id):
                raise CorruptError(
                    f"{self.name}: a data block of kind {kind} for entry {found} where the table of "
                    f"contents puts entry {expected.dump_id}'s"
                )
            if expected is entry:
                return
            for _ in self.body(expected):
                pass
        raise CorruptError(f"{self.name}: entry {entry.dump_id} has no data block after this point")

    def body(self, entry: Entry):
        """The rest of the block just entered (next_block), its end included, in pieces."""
        if is_copy_text(self._archive, entry):
            yield from self.rows(entry)
        else:
            yield from self._walked(entry.desc == "BLOBS")
        yield encode_integer(0, self._archive.int_size)

    def _walked(self, blobs: bool):
        """A block's chunks (of large objects, each object's oid, chunks and end), walked
        one by one; the zero that ends the block is consumed, not passed on."""
        pieces: list[bytes] = []
        held = 0
        while True:
            if blobs:
                oid = self._integer("a large object's oid")
                if oid == 0:
                    break
                pieces.append(encode_integer(oid, self._archive.int_size))
            while (length := self._integer("a chunk's length")) != 0:
                if length < 0:
                    raise CorruptError(f"{self.name}: a chunk of length {length}")
                self._need(length, "a chunk")
                pieces += (encode_integer(length, self._archive.int_size), self._take(length))
                held += length
                if held >= self._read_bytes:
                    yield b"".join(pieces)
                    pieces, held = [], 0
            if not blobs:
                break
            pieces.append(encode_integer(0, self._archive.int_size))
        if pieces:
            yield b"".join(pieces)

    def rows(self, entry: Entry, piece_bytes: int | None = None):
        """A COPY table's chunks, in pieces; the end of its data is consumed, not passed
        on. piece_bytes: each piece at least that large (but the last) and ending where
        a chunk ends, so that loaders given some each frame them as their own data;
        None: pieces cut anywhere."""
        size = self._size
        end_mark = b"\n" + bytes(size)
        self._need(size, f"the data of entry {entry.dump_id}")
        if not any(self._buffer[self._position : self._position + size]):
            self._position += size  # no rows
            return
        # Where the newline of an end mark may be: after the first chunk's length.
        lowest = self._position + size
        searched = lowest
        while True:
            found = self._buffer.find(end_mark, max(lowest, searched - len(end_mark) + 1))
            if found >= 0:
                if found + 1 > self._position:
                    yield self._take(found + 1 - self._position)
                self._need(size, f"the end of the data of entry {entry.dump_id}")
                self._position += size
                return
            searched = len(self._buffer)
            if searched - self._position >= (piece_bytes or self._read_bytes):
                # An end mark may begin in the buffer's last bytes: never pass them on.
                cut = self._last_chunk_end(piece_bytes) if piece_bytes else searched - len(end_mark) + 1
                if cut > self._position:
                    yield self._take(cut - self._position)
            dropped = self._more()
            if dropped is None:
                raise CorruptError(f"{self.name}: the archive ends inside the data of entry {entry.dump_id}")
            lowest, searched = max(lowest - dropped, 0), searched - dropped

    def _last_chunk_end(self, piece_bytes: int) -> int:
        """A place in the buffer, piece_bytes or more past the position, where one chunk
        of COPY text ends and the next begins; the position when there is none yet.
        Found from the end without walking: a newline, then a zero sign byte, and no
        zero byte in the int_size + 1 bytes before the newline (a newline inside a
        chunk's length has that length's sign byte, a zero, at most int_size bytes
        before it). Rows shorter than that leave no such place: then the chunks are
        walked from the position, which is where one begins."""
        size = self._size
        lowest = self._position + max(piece_bytes, size + 1)
        end = len(self._buffer)
        for _ in range(16):
            newline = self._buffer.rfind(b"\n\x00", lowest, end)
            if newline < 0:
                if end == len(self._buffer):
                    return self._position  # nothing to tell yet (a long row): read on
                break
            if self._buffer.find(b"\x00", newline - size, newline) < 0:
                return newline + 1
            end = newline + 1
        position, goal, available = self._position, self._position + piece_bytes, len(self._buffer)
        while position < goal and position + size <= available:
            following = (
                position + size + int.from_bytes(self._buffer[position + 1 : position + size], "little")
            )
            if self._buffer[position] or following == position + size or following > available:
                break  # a negative length, the end of the data, or a chunk not read yet
            position = following
        return position if position >= goal else self._position


def is_copy_text(archive: Archive, entry: Entry) -> bool:
    """Whether an entry's data is COPY text, uncompressed: rows that end in a newline."""
    return entry.desc == "TABLE DATA" and entry.copy_statement is not None and not archive.compression
