"""The header and table of contents of a pg_dump archive, read from a stream.

A restore feeds pg_restore from pipes, never from a plaintext file: it needs to know
which entries carry data (to share them among parallel loaders) and, for a custom
archive, a directory archive's `toc.dat` holding the same entries (the one form that
`pg_restore --jobs` reads from a pipe, since a directory archive's TOC is read once,
up front). Both archive formats share this layout (pg_backup_archiver.c, ReadHead
and ReadToc); they differ in one format byte and in each entry's format-specific
field: a custom archive's data offset, a directory archive's data file name.

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
        self.parts.append(bytes((1 if value < 0 else 0,)) + abs(value).to_bytes(self.int_size, "little"))

    def string(self, value: str | None):
        if value is None:
            self.integer(-1)
            return
        raw = value.encode("utf-8", "surrogateescape")
        self.integer(len(raw))
        self.parts.append(raw)


def data_file_name(archive: Archive, entry: Entry) -> str | None:
    """The name pg_dump gives an entry's data file in a directory archive."""
    if not entry.has_data:
        return None
    if entry.desc == "BLOBS":
        return f"blobs_{entry.dump_id}.toc" if archive.version >= (1, 16, 0) else "blobs.toc"
    return f"{entry.dump_id}.dat"


def directory_toc(archive: Archive) -> bytes:
    """The archive as a directory archive's toc.dat: every entry as it was, each data
    entry naming the file pg_dump would have written for it."""
    out = _Writer(archive.int_size)
    out.parts.append(MAGIC + bytes(archive.version))
    for value in (archive.int_size, archive.off_size, FORMAT_TOC_DAT):
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
        out.string(entry.file_name or data_file_name(archive, entry) or "")
    return b"".join(out.parts)
