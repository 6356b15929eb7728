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

from .errors import CorruptError

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
