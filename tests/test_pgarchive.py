"""pg_dump archives read as restore reads them: against what pg_restore itself reads."""

from __future__ import annotations

import io
import os
import subprocess

import pytest
from conftest import seed_rich_database
from pgbackup import pgarchive
from pgbackup.errors import CorruptError
from pgcluster import PG_BIN


@pytest.fixture
def rich_archives(new_db, tmp_path):
    """A custom archive and a directory archive of the same database."""
    name = new_db("archive")
    seed_rich_database(name)
    custom, directory = tmp_path / "rich.dump", tmp_path / "rich.dir"
    for dump_format, path in (("custom", custom), ("directory", directory)):
        subprocess.run(
            [
                f"{PG_BIN}/pg_dump",
                "--no-password",
                f"--format={dump_format}",
                "--compress=0",
                f"--file={path}",
                name,
            ],
            check=True,
        )
    return custom, directory


def listing(path) -> list[str]:
    """pg_restore's table of contents of an archive, without the lines about the file."""
    text = subprocess.run(
        [f"{PG_BIN}/pg_restore", "--list", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return [line for line in text.splitlines() if line and not line.startswith(";")]


def listing_of_stdin(head: bytes) -> list[str]:
    text = subprocess.run(
        [f"{PG_BIN}/pg_restore", "--format=custom", "--list"],
        input=head,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [line for line in text.splitlines() if line and not line.startswith(";")]


def test_a_directory_archives_entries_become_a_custom_archive_pg_restore_reads_alike(rich_archives):
    custom, directory = rich_archives
    toc = (directory / "toc.dat").read_bytes()
    archive = pgarchive.read_archive(io.BytesIO(toc).read, "toc.dat")
    data = [entry for entry in archive.data_entries() if entry.has_data]
    assert {entry.desc for entry in data} >= {"TABLE DATA", "BLOBS"}
    assert listing_of_stdin(pgarchive.write_toc(archive)) == listing(custom) == listing(directory)


def test_a_custom_archive_written_to_a_pipe_is_written_back_byte_for_byte(rich_archives):
    """pg_dump writing to a pipe cannot go back to fill in data offsets: each entry with
    data says "offset not set", the others "no data", as write_toc writes them."""
    custom, _directory = rich_archives
    with open(custom, "rb") as handle:
        database = pgarchive.read_archive(handle.read, str(custom)).header_rest[7]
    piped = subprocess.run(
        [f"{PG_BIN}/pg_dump", "--no-password", "--format=custom", "--compress=0", database],
        check=True,
        capture_output=True,
    ).stdout
    stream = io.BytesIO(piped)
    archive = pgarchive.read_archive(stream.read, "piped")
    with_data = {entry.dump_id for entry in archive.entries if entry.has_data}
    assert with_data
    assert pgarchive.write_toc(archive, with_data=with_data) == piped[: stream.tell()]


def test_a_directory_toc_dat_is_written_back_byte_for_byte(rich_archives):
    _custom, directory = rich_archives
    toc = (directory / "toc.dat").read_bytes()
    archive = pgarchive.read_archive(io.BytesIO(toc).read, "toc.dat")
    named = {entry.file_name for entry in archive.entries if entry.has_data}
    assert named == set(os.listdir(directory)) - {"toc.dat"} - {
        name for name in os.listdir(directory) if name.startswith("blob_")
    }
    assert pgarchive.write_toc(archive, pgarchive.FORMAT_TOC_DAT) == toc


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: b"NOTPG" + raw[5:], "not a pg_dump archive"),
        (lambda raw: raw[:5] + bytes([1, 9, 0]) + raw[8:], "version 1.9.0"),
        (lambda raw: raw[:5] + bytes([2, 0, 0]) + raw[8:], "version 2.0.0"),
        (lambda raw: raw[:300], "ends inside its table of contents"),
        (lambda raw: raw[:10] + bytes([9]) + raw[11:], "neither custom nor directory"),
    ],
    ids=["magic", "too-old", "too-new", "truncated-toc", "format"],
)
def test_what_is_not_a_readable_archive_is_refused_clearly(rich_archives, damage, message):
    custom, _directory = rich_archives
    raw = damage(custom.read_bytes())
    with pytest.raises(CorruptError, match=message):
        pgarchive.read_archive(io.BytesIO(raw).read, "damaged.dump")


@pytest.mark.parametrize(
    "dependency", ["\u00b2", "12a", "9" * 4400, "-1"], ids=["superscript", "letters", "long", "sign"]
)
def test_a_dependency_that_is_not_a_dump_id_is_refused(rich_archives, dependency):
    """pg_dump writes each dependency as a dump id in decimal; anything else (a digit
    Python's isdigit takes and int() does not, a number too long to convert) is a
    corrupt or crafted table of contents, refused as such rather than a crash later."""
    custom, _directory = rich_archives
    archive = pgarchive.read_archive(io.BytesIO(custom.read_bytes()).read, "rich.dump")
    victim = next(entry for entry in archive.entries if entry.dependencies)
    victim.dependencies[0] = dependency
    crafted = pgarchive.write_toc(archive)
    with pytest.raises(CorruptError, match=rf"entry {victim.dump_id} depends on .*, not a dump id"):
        pgarchive.read_archive(io.BytesIO(crafted).read, "crafted.dump")


@pytest.fixture
def piped_archives(rich_archives):
    """The rich database with tables a scan for the end of COPY text must not be fooled
    by (rows whose length has a newline byte followed by a zero, rows shorter than a
    length, an empty table), dumped to a pipe as pgbackup dumps: with COPY, and with
    INSERTs (data that is not COPY text, walked chunk by chunk)."""
    custom, _directory = rich_archives
    with open(custom, "rb") as handle:
        database = pgarchive.read_archive(handle.read, str(custom)).header_rest[7]
    subprocess.run(
        [
            f"{PG_BIN}/psql",
            "--no-password",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            f"--dbname={database}",
            "-c",
            # Lengths 2560 to 2815 are 00 0A 00 00 little-endian after the sign byte:
            # a newline, then a zero, inside a chunk's length.
            "CREATE TABLE awkward AS SELECT g, repeat('y', 2550 + g % 200) || E'\\n' AS pad"
            " FROM generate_series(1, 3000) g;"
            " CREATE TABLE tiny AS SELECT g % 10 AS d FROM generate_series(1, 5000) g;"
            " CREATE TABLE nothing (x int);",
        ],
        check=True,
    )
    return [
        subprocess.run(
            [f"{PG_BIN}/pg_dump", "--no-password", "--format=custom", "--compress=0", *options, database],
            check=True,
            capture_output=True,
        ).stdout
        for options in ([], ["--inserts"])
    ]


def exact_rows(data: bytes, int_size: int = 4) -> int:
    """How many rows `data` holds, walked chunk by chunk (pg_dump writes one per row,
    and ends a table's with the end-of-copy line, which is no row); it must end where
    a chunk does."""
    position, count = 0, 0
    while position < len(data):
        assert data[position] == 0, "a chunk's length is never negative"
        start = position + 1 + int_size
        position = start + int.from_bytes(data[position + 1 : start], "little")
        count += data[start:position] != b"\\.\n\n\n"
    assert position == len(data), "a piece ends inside a chunk"
    return count


@pytest.mark.parametrize("read_bytes", [4096, 1 << 20])
def test_every_block_is_passed_on_byte_for_byte(piped_archives, read_bytes):
    """Each block read through the scanner, written back after its header, gives the
    archive pg_dump wrote, whatever the reads' size."""
    for piped in piped_archives:
        stream = io.BytesIO(piped)
        archive = pgarchive.read_archive(stream.read, "piped")
        scanner = pgarchive.BlockScanner(stream.read, archive, "piped", read_bytes=read_bytes)
        written = [piped[: stream.tell()]]
        for entry in archive.entries:
            if entry.has_data:
                scanner.next_block(entry)
                written.append(pgarchive.data_block(archive, entry))
                written.extend(scanner.body(entry))
        assert b"".join(written) == piped


def test_a_copy_tables_rows_are_cut_only_where_chunks_end(piped_archives):
    piped = piped_archives[0]
    stream = io.BytesIO(piped)
    archive = pgarchive.read_archive(stream.read, "piped")
    for tag, rows in (("awkward", 3000), ("tiny", 5000), ("nothing", 0)):
        stream.seek(0)
        pgarchive.read_archive(stream.read, "piped")
        scanner = pgarchive.BlockScanner(stream.read, archive, "piped", read_bytes=4096)
        (entry,) = [entry for entry in archive.entries if entry.desc == "TABLE DATA" and entry.tag == tag]
        scanner.next_block(entry)
        pieces = list(scanner.rows(entry, piece_bytes=8192))
        assert sum(map(exact_rows, pieces)) == rows
        if tag == "awkward":
            assert len(pieces) > 100, "cut every 8 kB or so"
            assert all(len(piece) >= 8192 for piece in pieces[:-1])
        if tag == "tiny":
            # Rows shorter than a length ("3\n"): the chunks are walked to cut them.
            assert len(pieces) > 3
            assert all(len(piece) >= 8192 for piece in pieces[:-1])


def test_a_table_without_rows_or_end_of_copy_line_has_an_empty_body(piped_archives):
    """pg_dump writes the end-of-copy line for an empty table too; a block with no
    chunk at all is read as empty, and the stream left just after it."""
    stream = io.BytesIO(piped_archives[0])
    archive = pgarchive.read_archive(stream.read, "piped")
    (entry,) = [entry for entry in archive.entries if entry.tag == "nothing" and entry.has_data]
    end = pgarchive.encode_integer(0, archive.int_size)
    stream = io.BytesIO(end + b"after")
    scanner = pgarchive.BlockScanner(stream.read, archive, "empty")
    assert list(scanner.body(entry)) == [end]
    assert scanner._take(5) == b"after"


def test_a_block_out_of_place_or_cut_short_is_refused(piped_archives):
    piped = piped_archives[0]
    stream = io.BytesIO(piped)
    archive = pgarchive.read_archive(stream.read, "piped")
    toc_end = stream.tell()
    first, second = [entry for entry in archive.entries if entry.has_data][:2]
    # The first block's header names another entry.
    forged = bytearray(piped)
    forged[toc_end + 1 : toc_end + 6] = pgarchive.encode_integer(second.dump_id, archive.int_size)
    stream = io.BytesIO(bytes(forged))
    pgarchive.read_archive(stream.read, "forged")
    with pytest.raises(CorruptError, match=f"where the table of contents puts entry {first.dump_id}'s"):
        pgarchive.BlockScanner(stream.read, archive, "forged").next_block(first)
    (awkward,) = [entry for entry in archive.entries if entry.tag == "awkward" and entry.has_data]
    stream = io.BytesIO(piped[: len(piped) // 2])
    pgarchive.read_archive(stream.read, "cut")
    scanner = pgarchive.BlockScanner(stream.read, archive, "cut", read_bytes=4096)
    with pytest.raises(CorruptError, match="the archive ends inside"):
        scanner.next_block(awkward)
        for _ in scanner.body(awkward):
            pass
