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
