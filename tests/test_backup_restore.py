"""Backup, verify and restore against a real PostgreSQL: the operator's checklist."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, connect, fingerprint, query, reseal, run_cli, seed_rich_database
from pgbackup import backup, crypto, load, manifest, pgarchive, restore, retention
from pgbackup.errors import CorruptError, PgBackupError, RefusedError, WrongKeyError


def only_set(dest) -> str:
    sets = [entry for entry in retention.scan(str(dest)) if entry["status"] == "complete"]
    assert len(sets) == 1, sets
    return sets[0]["path"]


def databases_named(prefix: str) -> list[str]:
    return [
        row[0]
        for row in query("postgres", "SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",))
    ]


@pytest.fixture
def rich_db(new_db):
    name = new_db("rich")
    seed_rich_database(name)
    return name


@pytest.fixture
def rich_set(rich_db, key, tmp_path, recipients):
    record = backup.create_backup_set(str(tmp_path / "backups"), recipients, databases=[rich_db])
    return rich_db, record["path"]


def dump_of(database, key, tmp_path, recipients, dump_format, folder="b"):
    """A one-database set's dump as the loader reads it, and its table of contents."""
    path = backup.create_backup_set(
        str(tmp_path / folder), recipients, databases=[database], dump_format=dump_format
    )["path"]
    record = manifest.load(path)
    dump = restore.DumpFiles(path, record, record["databases"][0], key)
    return dump, dump.table_of_contents()


# ---- round trips -------------------------------------------------------------------


@pytest.mark.parametrize(("dump_format", "jobs"), [("custom", 1), ("directory", 2)])
def test_round_trip_keeps_schemas_large_objects_unicode_and_grants(
    rich_db, key, tmp_path, dump_format, jobs, recipients
):
    before = fingerprint(rich_db)
    record = backup.create_backup_set(
        str(tmp_path / "b"), recipients, databases=[rich_db], dump_format=dump_format, jobs=jobs
    )
    result = restore.restore_set(
        record["path"], key, databases=[rich_db], target_db=rich_db + "_copy", jobs=2
    )
    assert result["databases"] == [
        {"database": rich_db, "target": rich_db + "_copy", "kept_previous_as": None}
    ]
    assert fingerprint(rich_db + "_copy") == before
    assert before["large_objects"] and before["grants"] and before["schema_owner"] == [("app_owner",)]


@pytest.mark.parametrize("dump_format", ["custom", "directory"])
def test_every_entry_after_the_data_is_restored_once_early_or_in_the_final_pass(
    rich_db, key, tmp_path, recipients, dump_format
):
    """Each loader builds its own tables' indexes and keys; everything else after the data
    (foreign keys between two tables both ways, a partitioned table's index and its
    attachments, a trigger and its comment, a materialized view's refresh, an event
    trigger) is left to the final pass, whose pg_restore --jobs orders it."""
    dump, archive = dump_of(rich_db, key, tmp_path, recipients, dump_format)
    loads, final_pass, _dealt = load.plan_load(archive, dump, jobs=2)
    assert len(loads) == 2
    early = [entry for listed in loads for entry in listed if entry.section != pgarchive.SECTION_DATA]
    assert {entry.desc for entry in early} == {"INDEX", "CONSTRAINT"}
    assert {
        "FK CONSTRAINT",
        "INDEX ATTACH",
        "TRIGGER",
        "COMMENT",
        "MATERIALIZED VIEW DATA",
        "EVENT TRIGGER",
    } <= {entry.desc for entry in final_pass}
    sections = archive.sections()
    post_data = [
        entry.dump_id for entry in archive.entries if sections[entry.dump_id] == pgarchive.SECTION_POST_DATA
    ]
    assert sorted(entry.dump_id for entry in early + final_pass) == sorted(post_data)


# Rows a cut at the wrong byte would break: escaped newlines, tabs and backslashes in
# text, multibyte characters, NULLs, jsonb, a long value now and then, and rows of
# 2560 to 2815 bytes, whose chunk length in a custom archive holds a newline byte.
_AWKWARD_ROWS = """
    INSERT INTO plays (title, note, detail)
    SELECT 'tïtle ' || g || E'\\n' || md5(g::text),
           CASE WHEN g % 7 = 0 THEN NULL ELSE E'line one\\nline two\\ttab \\\\ backslash ' || g END,
           jsonb_build_object('g', g, 'text', E'a\\nb', 'pad', repeat('x', CASE WHEN g % 997 = 0 THEN 5000
                                                                  WHEN g % 13 = 0 THEN 2500 ELSE 40 END))
    FROM generate_series(1, ROWS) g
"""


def _plays(dbname):
    return query(dbname, "SELECT count(*), md5(string_agg(p::text, '|' ORDER BY id)) FROM plays p")


@pytest.mark.parametrize("dump_format", ["custom", "directory"])
def test_the_largest_table_is_dealt_to_every_loader_row_for_row(
    new_db, key, tmp_path, recipients, monkeypatch, caplog, dump_format
):
    """The largest table's file is cut into pieces of whole rows, each taken by the
    loader ready for one, after its own tables and their indexes; the loader whose share
    it was then builds its key and index. The restored table holds the same rows, byte
    for byte, with its foreign key checked. With the table alone, both loaders take
    pieces of it."""
    source = new_db("dealt")
    query(
        source,
        "CREATE TABLE titles (id int PRIMARY KEY, name text);"
        " INSERT INTO titles SELECT g, 'title ' || g FROM generate_series(1, 1000) g;"
        " CREATE TABLE plays (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " title_id int REFERENCES titles (id) DEFAULT 1, title text, note text, detail jsonb);"
        " CREATE INDEX plays_title ON plays (title_id, title)",
    )
    query(source, _AWKWARD_ROWS.replace("ROWS", "40000"))
    monkeypatch.setattr(load, "DEAL_MIN_BYTES", 1 << 20)
    dump, archive = dump_of(source, key, tmp_path, recipients, dump_format)
    loads, final_pass, dealt = load.plan_load(archive, dump, jobs=2)
    assert (dealt.desc, dealt.tag) == ("TABLE DATA", "plays")
    assert len(loads) == 2
    after = [listed[listed.index(dealt) + 1 :] for listed in loads]
    for listed in loads:
        before = listed[: listed.index(dealt)]
        assert [entry.tag for entry in before] == ["titles", "titles titles_pkey"] or not [
            entry for entry in before if entry.has_data
        ], "each loader's own tables, then their indexes, then the dealt table"
    assert sorted(sorted(entry.tag for entry in built) for built in after) == [
        [],
        ["plays plays_pkey", "plays_title"],
    ], "the dealt table's key and index, built by one loader after its part"
    assert [entry.desc for entry in final_pass] == ["FK CONSTRAINT"]

    caplog.set_level("INFO", logger="pgbackup")
    restore.restore_set(dump.set_path, key, databases=[source], target_db=source + "_copy", jobs=2)
    taken = [
        list(
            map(
                int,
                re.search(r"public.plays: pieces taken by each loader: ([\d, ]+)", message)
                .group(1)
                .split(", "),
            )
        )
        for message in caplog.messages
        if "pieces taken by each loader" in message
    ]
    # Two loaders; which takes how many depends on who is ready first.
    assert len(taken) == 1 and len(taken[0]) == 2 and sum(taken[0]) >= 4, caplog.messages
    assert _plays(source + "_copy") == _plays(source)
    assert fingerprint_indexes(source + "_copy") == fingerprint_indexes(source)
    with pytest.raises(Exception, match="violates foreign key"):
        query(source + "_copy", "INSERT INTO plays (title_id) VALUES (999999)")
    # One table alone: both loaders take pieces of it.
    query(
        source,
        "DROP TABLE plays; DROP TABLE titles;"
        " CREATE TABLE plays (id int PRIMARY KEY, title text, note text, detail jsonb)",
    )
    query(
        source,
        _AWKWARD_ROWS.replace("INSERT INTO plays (", "INSERT INTO plays (id, ")
        .replace("SELECT 'tïtle", "SELECT g, 'tïtle")
        .replace("ROWS", "30000"),
    )
    path = backup.create_backup_set(
        str(tmp_path / "one"), recipients, databases=[source], dump_format=dump_format
    )["path"]
    caplog.clear()
    restore.restore_set(path, key, databases=[source], target_db=source + "_one", jobs=2)
    assert _plays(source + "_one") == _plays(source)
    assert any(re.search(r"pieces taken by each loader: [1-9]\d*, [1-9]", m) for m in caplog.messages), (
        caplog.messages
    )


@pytest.mark.parametrize("short_of_the_end", [1, 2, 3, 5, 6])
def test_a_dealt_file_is_never_cut_inside_its_end_of_copy_lines(
    new_db, key, tmp_path, recipients, monkeypatch, short_of_the_end
):
    """pg_dump ends a table's data with "\\.", then two empty lines, which the server
    ignores only after that line: a piece that began with them would load empty rows.
    Pieces read so that one would end a few bytes short of the file's end."""
    source = new_db("ending")
    query(source, "CREATE TABLE plays (id int, title text)")
    query(source, "INSERT INTO plays SELECT g, md5(g::text) FROM generate_series(1, 2000) g")
    dump, archive = dump_of(source, key, tmp_path, recipients, "directory")
    (entry,) = [entry for entry in archive.entries if entry.desc == "TABLE DATA"]
    size = dump.size_of(entry)
    monkeypatch.setattr(restore.Dealer, "PIECE_BYTES", size - short_of_the_end)
    pieces = list(dump.dealer(entry, archive)._directory_pieces(threading.Event()))
    assert b"".join(pieces).endswith(b"\\.\n\n\n") and len(b"".join(pieces)) == size
    assert len(pieces) > 1 and all(piece.endswith(b"\n") for piece in pieces)
    assert not [piece for piece in pieces if piece.startswith(b"\n")], pieces[1:]


def fingerprint_indexes(dbname):
    return query(
        dbname,
        "SELECT pg_get_indexdef(indexrelid), indisprimary FROM pg_index"
        " WHERE indrelid::regclass::text IN ('plays', 'titles') ORDER BY 1",
    )


def test_manifest_describes_the_set(rich_set, key):
    rich_db, path = rich_set
    record = manifest.load(path)
    manifest.check(record, key, path)
    assert record["complete"] is True
    assert record["format_version"] == 2 and record["recipients"] == [key.key_id]
    assert record["server"]["version"].startswith(os.environ.get("PGBACKUP_TEST_PG_VERSION", "15"))
    assert [database["name"] for database in record["databases"]] == [rich_db]
    assert record["role_passwords"] is True
    assert manifest.parse_iso(record["started_at"]) <= manifest.parse_iso(record["finished_at"])
    for entry, _ in manifest.files_of(record):
        assert os.path.getsize(os.path.join(path, entry["path"])) == entry["size"]
        assert len(entry["sha256"]) == 64
    assert os.stat(path).st_mode & 0o777 == 0o700
    for name in os.listdir(path):
        assert os.stat(os.path.join(path, name)).st_mode & 0o777 == 0o600, name


def test_backup_files_are_not_plaintext(rich_set):
    _, path = rich_set
    for name in os.listdir(path):
        if name.endswith(".enc"):
            data = open(os.path.join(path, name), "rb").read()
            assert data.startswith(b"PGBACKUP")
            assert b"example.org" not in data and b"CREATE" not in data


def test_globals_round_trip_restores_roles(rich_set, key, recipients):
    _, path = rich_set
    with connect() as conn:
        conn.execute("DROP ROLE IF EXISTS globals_probe")
        conn.execute("CREATE ROLE globals_probe LOGIN PASSWORD 'probe-password'")
    record = backup.create_backup_set(os.path.dirname(path) + "-g", recipients, databases=[])
    query("postgres", "DROP ROLE globals_probe")
    restore.restore_set(record["path"], key, databases=[], include_globals=True)
    rows = query(
        "postgres",
        "SELECT rolcanlogin, rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid"
        " WHERE rolname = 'globals_probe'",
    )
    assert rows == [(True, True)]


def test_verify_passes_and_touches_no_database(rich_set, key):
    _, path = rich_set
    before = query("postgres", "SELECT count(*) FROM pg_database")
    report = restore.verify_set(path, key)
    assert report["files"] == 2
    assert report["plaintext_bytes"] > report["encrypted_bytes"] / 2
    assert query("postgres", "SELECT count(*) FROM pg_database") == before


# ---- refusals: nothing existing is lost ----------------------------------------------


def test_restore_refuses_an_existing_non_empty_database(rich_set, key):
    rich_db, path = rich_set
    query(rich_db, "INSERT INTO billing.subscriptions (plan, price) VALUES ('newer-than-backup', 1)")
    before = fingerprint(rich_db)
    with pytest.raises(RefusedError, match="exists and is not empty"):
        restore.restore_set(path, key, databases=[rich_db])
    assert fingerprint(rich_db) == before
    assert databases_named("pgbackup_restore_") == []


def test_force_replaces_but_keeps_the_previous_database(rich_set, key):
    rich_db, path = rich_set
    query(rich_db, "INSERT INTO billing.subscriptions (plan, price) VALUES ('newer-than-backup', 1)")
    result = restore.restore_set(path, key, databases=[rich_db], force=True)
    kept = result["databases"][0]["kept_previous_as"]
    assert kept and kept.startswith(rich_db + "_pre_restore_")
    assert query(rich_db, "SELECT count(*) FROM billing.subscriptions WHERE plan = 'newer-than-backup'") == [
        (0,)
    ]
    assert query(kept, "SELECT count(*) FROM billing.subscriptions WHERE plan = 'newer-than-backup'") == [
        (1,)
    ]


def test_restore_onto_a_live_database_is_refused_even_with_force(rich_set, key):
    rich_db, path = rich_set
    before = fingerprint(rich_db)
    with connect(rich_db), pytest.raises(RefusedError, match="in use"):  # an application session
        restore.restore_set(path, key, databases=[rich_db], force=True)
    assert fingerprint(rich_db) == before
    assert databases_named("pgbackup_restore_") == []


def test_empty_existing_database_is_replaced(rich_set, key, new_db):
    _, path = rich_set
    rich_db = rich_set[0]
    empty = new_db("empty")
    restore.restore_set(path, key, databases=[rich_db], target_db=empty)
    assert fingerprint(empty) == fingerprint(rich_db)


def test_failed_restore_leaves_no_scratch_database(rich_set, key, tmp_path):
    rich_db, path = rich_set
    with connect() as conn:
        conn.execute("ALTER ROLE app_owner RENAME TO app_owner_gone")
    try:
        with pytest.raises(PgBackupError, match="pg_restore of database"):
            restore.restore_set(path, key, databases=[rich_db], target_db=rich_db + "_x")
    finally:
        query("postgres", "ALTER ROLE app_owner_gone RENAME TO app_owner")
    assert databases_named(rich_db + "_x") == []
    assert databases_named("pgbackup_restore_") == []


def test_without_pidfd_the_load_polls_and_still_restores_and_fails_cleanly(rich_set, key, monkeypatch):
    """A kernel before Linux 5.3 has no pidfd_open: each load phase then polls its
    pg_restore processes, with the same result and the same clean failure."""
    rich_db, path = rich_set
    refused = []

    def no_pidfd(pid, flags=0):
        refused.append(pid)
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    restore.restore_set(path, key, databases=[rich_db], target_db=rich_db + "_polled", jobs=2)
    assert refused, "the load asked for a pidfd"
    assert fingerprint(rich_db + "_polled") == fingerprint(rich_db)
    with connect() as conn:
        conn.execute("ALTER ROLE app_owner RENAME TO app_owner_gone")
    try:
        with pytest.raises(PgBackupError, match="pg_restore of database"):
            restore.restore_set(path, key, databases=[rich_db], target_db=rich_db + "_x", jobs=2)
    finally:
        query("postgres", "ALTER ROLE app_owner_gone RENAME TO app_owner")
    assert databases_named(rich_db + "_x") == []
    assert databases_named("pgbackup_restore_") == []


# ---- damaged sets: refused before anything is written -----------------------------------


def _damage_and_restore_over(rich_db, path, key, damage):
    """Damage the set, then try a forced restore over the live database."""
    damage(path)
    before = fingerprint(rich_db)
    with pytest.raises((CorruptError, WrongKeyError)) as failure:
        restore.restore_set(path, key, databases=[rich_db], force=True)
    assert fingerprint(rich_db) == before, "the target database must be untouched"
    assert databases_named("pgbackup_restore_") == []
    assert databases_named(rich_db + "_pre_restore_") == []
    assert not [name for name in os.listdir(os.path.dirname(path)) if name.startswith(".restore-")]
    with pytest.raises((CorruptError, WrongKeyError)):
        restore.verify_set(path, key)
    return str(failure.value)


def _dump_file(path):
    return os.path.join(path, next(name for name in sorted(os.listdir(path)) if name.startswith("db-")))


def _flip(offset):
    def damage(path):
        target = _dump_file(path)
        with open(target, "r+b") as handle:
            handle.seek(offset if offset >= 0 else os.path.getsize(target) + offset)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0x04]))

    return damage


def _truncate(keep):
    def damage(path):
        target = _dump_file(path)
        size = os.path.getsize(target)
        os.truncate(target, keep if keep >= 0 else size + keep)

    return damage


def _keep_only_the_header(path):
    target = _dump_file(path)
    with open(target, "rb") as handle:
        header = crypto.read_header(handle.read, target)
    os.truncate(target, len(header.raw))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_flip(30), "corrupted header"),
        (_flip(200), "chunk 0 failed authentication"),
        (_flip(-1), "failed authentication"),
        (_truncate(-1), "truncated, or replaced by another file"),
        (_truncate(0), "is empty"),
        (_keep_only_the_header, "truncated, or replaced by another file"),
    ],
    ids=["header-bit", "body-bit", "tag-bit", "truncated-mid-chunk", "emptied", "header-only"],
)
def test_damaged_file_is_refused_and_target_untouched(rich_set, key, damage, message):
    rich_db, path = rich_set
    assert message in _damage_and_restore_over(rich_db, path, key, damage)


def test_file_from_another_set_is_refused(rich_db, key, tmp_path, recipients):
    first = backup.create_backup_set(str(tmp_path / "b"), recipients, databases=[rich_db])["path"]
    time.sleep(1.1)
    second = backup.create_backup_set(str(tmp_path / "b"), recipients, databases=[rich_db])["path"]

    def swap(path):
        shutil.copyfile(_dump_file(second), _dump_file(path))

    assert "moved between sets or renamed" in _damage_and_restore_over(rich_db, first, key, swap)


def test_a_file_written_anew_for_the_same_place_is_refused(rich_set, key, recipients):
    """Someone with the public key writes a valid file under the very name and binding:
    the manifest's hash (sealed by its MAC) still tells it apart."""
    rich_db, path = rich_set

    def forge(set_path):
        target = _dump_file(set_path)
        binding = f"{os.path.basename(set_path)}/{os.path.basename(target)}"
        with open(target, "wb") as handle:
            crypto.encrypt_stream(io.BytesIO(b"PGDMP forged rows"), handle, recipients, binding=binding)

    assert "does not match the manifest" in _damage_and_restore_over(rich_db, path, key, forge)


def test_altered_manifest_is_refused(rich_set, key):
    rich_db, path = rich_set

    def edit(set_path):
        record = json.load(open(os.path.join(set_path, "manifest.json")))
        record["started_at"] = "2099-01-01T00:00:00Z"
        json.dump(record, open(os.path.join(set_path, "manifest.json"), "w"))

    assert "was altered" in _damage_and_restore_over(rich_db, path, key, edit)


def test_missing_file_is_refused(rich_set, key):
    rich_db, path = rich_set
    assert "missing" in _damage_and_restore_over(rich_db, path, key, lambda p: os.unlink(_dump_file(p)))


def test_wrong_key_is_refused_with_both_key_ids(rich_set, key, other_key_file):
    rich_db, path = rich_set
    other = crypto.load_key(other_key_file)
    before = fingerprint(rich_db)
    with pytest.raises(
        WrongKeyError,
        match=f"needs the key with id {key.key_id}, but the key.s. given have id {other.key_id}",
    ):
        restore.restore_set(path, other, databases=[rich_db], force=True)
    assert fingerprint(rich_db) == before


# ---- interrupted runs, full disk, dead server -----------------------------------------------


def test_killed_backup_leaves_no_complete_set(new_db, recipient_file, tmp_path):
    big = new_db("big")
    query(
        big,
        "CREATE TABLE t AS SELECT g, md5(g::text) || repeat('x', 200) AS pad"
        " FROM generate_series(1, 400000) g",
    )
    dest = tmp_path / "b"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "module_utils"))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgbackup",
            "backup",
            "--dest",
            str(dest),
            "--recipient",
            recipient_file,
            "--database",
            big,
            "--compression-level",
            "19",
            "--threads",
            "0",
        ],
        env=env,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
        name.endswith(".tmp") for _, _, files in os.walk(dest) for name in files
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    sets = retention.scan(str(dest))
    assert [entry["status"] for entry in sets] == ["incomplete"]
    listed = run_cli("list", "--dest", str(dest), "--json", check=True)
    assert [entry["status"] for entry in json.loads(listed.stdout)] == ["incomplete"]


def test_full_disk_fails_clearly_and_keeps_earlier_sets(rich_db, key, tiny_disk, recipients):
    small = backup.create_backup_set(str(tiny_disk), recipients, databases=[])
    with pytest.raises(PgBackupError, match="no space left on device"):
        backup.create_backup_set(str(tiny_disk), recipients, databases=[rich_db], compression_level=0)
    sets = retention.scan(str(tiny_disk))
    assert [entry["name"] for entry in sets] == [small["name"]], "no partial set is left behind"
    restore.verify_set(small["path"], key)


def test_restore_is_refused_when_the_server_lacks_the_space(rich_set, key, recipients):
    """The database at backup time was larger than the server's free space: refused
    before any database is created, naming both figures."""
    rich_db, path = rich_set

    def too_large(record):
        record["databases"][0]["size_bytes"] = 1 << 60

    reseal(path, recipients, too_large)
    # The plan (the module's check mode) says so first, and tells both figures when told
    # not to check.
    with pytest.raises(RefusedError, match=r"not enough free space in .* need 1152921504606846976 bytes"):
        restore.plan_restore(path, key, databases=[rich_db], target_db=rich_db + "_y")
    space = restore.plan_restore(path, key, databases=[rich_db], target_db=rich_db + "_y", check_space=False)[
        "space"
    ]
    assert space["needed_bytes"] == 1 << 60 and 0 < space["free_bytes"] < 1 << 60
    with pytest.raises(
        RefusedError, match=r"not enough free space in .* need 1152921504606846976 bytes"
    ) as refused:
        restore.restore_set(path, key, databases=[rich_db], target_db=rich_db + "_y")
    assert "--no-space-check" in str(refused.value)
    assert databases_named(rich_db + "_y") == []
    assert databases_named("pgbackup_restore_") == []
    # The operator who knows the bloat it counts restores anyway.
    restore.restore_set(path, key, databases=[rich_db], target_db=rich_db + "_y", check_space=False)
    assert fingerprint(rich_db + "_y") == fingerprint(rich_db)


@pytest.mark.parametrize(
    ("dump_format", "dealt"), [("custom", False), ("custom", True), ("directory", False), ("directory", True)]
)
def test_a_failure_in_the_last_chunk_of_the_last_table_leaves_the_target_untouched(
    rich_db, key, tmp_path, recipients, dump_format, dealt, monkeypatch, caplog
):
    """The largest table's file (loaded last to finish) fails in its final chunk, after
    its rows went into the scratch database: the scratch database is dropped and the
    database restored over (with --force) is as it was."""
    # Random text, several encrypted chunks long even compressed: the file fails late.
    query(
        rich_db,
        "CREATE TABLE bulky AS SELECT g, md5(random()::text) || md5(random()::text) AS filler"
        " FROM generate_series(1, 80000) g",
    )
    jobs = 2 if dump_format == "directory" else 1
    if dealt:
        # The bulky table is dealt to both loaders (restore.Dealer): the failure reaches
        # both, after both have loaded pieces of it (a custom set's, when the dealer
        # reads on to the file's end, or the loader of a later table).
        monkeypatch.setattr(load, "DEAL_MIN_BYTES", 1 << 20)
    path = backup.create_backup_set(
        str(tmp_path / "b"), recipients, databases=[rich_db], dump_format=dump_format, jobs=jobs
    )["path"]
    record = json.load(open(os.path.join(path, manifest.MANIFEST_NAME)))
    files = record["databases"][0]["files"]
    largest = max(files, key=lambda entry: entry["plaintext_size"])
    assert largest["size"] > 2 * crypto.DEFAULT_CHUNK_BYTES
    target = os.path.join(path, largest["path"])
    with open(target, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0x01]))
    before = fingerprint(rich_db)
    caplog.set_level("INFO", logger="pgbackup")
    with pytest.raises(CorruptError, match=r"chunk \d+ failed authentication") as failure:
        restore.restore_set(path, key, databases=[rich_db], force=True, jobs=2)
    assert int(re.search(r"chunk (\d+) failed", str(failure.value)).group(1)) >= 2
    assert dealt == any("table public.bulky dealt to all of them" in message for message in caplog.messages)
    assert fingerprint(rich_db) == before
    assert databases_named("pgbackup_restore_") == []
    assert databases_named(rich_db + "_pre_restore_") == []


@pytest.fixture
def two_database_set(rich_db, new_db, tmp_path, recipients):
    """A set of two databases, both to be restored over with --force."""
    second = new_db("second")
    query(
        second, "CREATE TABLE plays AS SELECT g AS id, md5(g::text) AS title FROM generate_series(1, 5000) g"
    )
    record = backup.create_backup_set(str(tmp_path / "two"), recipients, databases=[rich_db, second])
    for name in (rich_db, second):
        query(name, "CREATE TABLE newer_than_backup (x int)")
    return record["path"], [rich_db, second]


def _untouched(names, rich_before):
    """Every database as it was: each still has the table made after the backup (a
    restored one would not), none was kept aside, no scratch database is left."""
    for name in names:
        assert query(name, "SELECT to_regclass('newer_than_backup') IS NOT NULL") == [(True,)], name
        assert databases_named(name + "_pre_restore_") == []
    assert fingerprint(names[0]) == rich_before
    assert databases_named("pgbackup_restore_") == []


def test_a_bad_file_in_the_last_database_replaces_none_of_them(two_database_set, key):
    """The set's last database fails its final chunk after the first loaded whole:
    the first is not swapped in either (the set is restored whole or not at all)."""
    path, names = two_database_set
    record = json.load(open(os.path.join(path, manifest.MANIFEST_NAME)))
    last = record["databases"][-1]["files"][-1]
    with open(os.path.join(path, last["path"]), "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0x01]))
    before = fingerprint(names[0])
    with pytest.raises(CorruptError, match="failed authentication"):
        restore.restore_set(path, key, force=True, jobs=2)
    _untouched(names, before)


def test_the_swap_into_place_is_all_or_nothing(two_database_set, key, monkeypatch):
    """A session that reaches the last target between the check for sessions and the
    renames stops that rename: the first database's renames, done a moment before in
    the same transaction, are undone with it."""
    path, names = two_database_set
    arrived = contextlib.ExitStack()
    monkeypatch.setattr(restore.pg, "sessions_after_grace", lambda conn, name: [])
    loading = restore.load_database

    def load_then_a_session_arrives(dump, target, jobs):
        loading(dump, target, jobs)
        if dump.name == names[-1]:
            arrived.enter_context(connect(names[-1]))

    monkeypatch.setattr(restore, "load_database", load_then_a_session_arrives)
    before = fingerprint(names[0])
    with arrived, pytest.raises(PgBackupError, match=r"being accessed by other users.*nothing was replaced"):
        restore.restore_set(path, key, force=True, jobs=2)
    _untouched(names, before)


def test_kept_names_of_long_targets_are_distinct():
    """Two targets whose names share the part that fits before _pre_restore_<time>."""
    names = ["customer_portal_production_report_" + region for region in ("eu", "us")]
    kept = restore._kept_names(names, dict.fromkeys(names, "keep-previous"), "20261202T020000Z")
    assert len(set(kept.values())) == 2
    for name in kept.values():
        assert len(name.encode()) <= 63 and restore.KEPT_NAME.search(name), name


@pytest.mark.parametrize("dump_format", ["custom", "directory"])
def test_a_database_without_data_restores(new_db, key, tmp_path, recipients, dump_format):
    """Functions and views only: nothing to share out among loaders."""
    name = new_db("nodata")
    query(name, "CREATE FUNCTION answer() RETURNS int LANGUAGE sql AS 'SELECT 42'")
    query(name, "CREATE VIEW answers AS SELECT answer() AS value")
    path = backup.create_backup_set(
        str(tmp_path / "b"), recipients, databases=[name], dump_format=dump_format
    )["path"]
    restore.restore_set(path, key, databases=[name], target_db=name + "_copy", jobs=2)
    assert query(name + "_copy", "SELECT value FROM answers") == [(42,)]


def test_a_data_file_name_that_is_a_path_is_refused_before_any_pipe_is_made(
    rich_db, key, tmp_path, recipients
):
    """A set written with the public key (or a copy altered where it is kept) whose
    table of contents names a path as a table's data file: refused, and nothing is
    made where it points."""
    path = backup.create_backup_set(
        str(tmp_path / "b"), recipients, databases=[rich_db], dump_format="directory"
    )["path"]
    record = json.load(open(os.path.join(path, manifest.MANIFEST_NAME)))
    toc_entry = next(entry for entry in record["databases"][0]["files"] if entry["name"] == "toc.dat")
    plain = restore.read_checked(path, toc_entry, key, record)
    archive = pgarchive.read_archive(io.BytesIO(plain).read, "toc.dat")
    victim = tmp_path / "escaped.dat"
    next(entry for entry in archive.entries if entry.desc == "TABLE DATA").file_name = str(victim)

    def rewrite(record):
        entry = next(entry for entry in record["databases"][0]["files"] if entry["name"] == "toc.dat")
        encrypted = io.BytesIO()
        binding = manifest.binding(path, entry)
        crypto.encrypt_stream(
            io.BytesIO(pgarchive.write_toc(archive, pgarchive.FORMAT_TOC_DAT)),
            encrypted,
            recipients,
            binding=binding,
        )
        with open(os.path.join(path, entry["path"]), "wb") as handle:
            handle.write(encrypted.getvalue())
        entry["size"] = len(encrypted.getvalue())
        entry["sha256"] = hashlib.sha256(encrypted.getvalue()).hexdigest()
        entry["plaintext_size"] = len(pgarchive.write_toc(archive, pgarchive.FORMAT_TOC_DAT))

    reseal(path, recipients, rewrite)
    with pytest.raises(CorruptError, match="which pg_dump never does"):
        restore.restore_set(path, key, databases=[rich_db], target_db=rich_db + "_never")
    assert not victim.exists()
    assert databases_named(rich_db + "_never") == []
    assert databases_named("pgbackup_restore_") == []


def test_a_custom_archive_of_a_version_it_does_not_know_loads_as_one_stream(
    rich_set, key, monkeypatch, caplog
):
    """A newer pg_dump's archive: pgbackup cannot share its tables out, and pg_restore
    loads it whole from the stream."""
    rich_db, path = rich_set
    monkeypatch.setattr(pgarchive, "NEWEST_VERSION", (1, 13, 0))
    with caplog.at_level("WARNING", logger="pgbackup"):
        restore.restore_set(path, key, databases=[rich_db], target_db=rich_db + "_stream", jobs=2)
    assert "loading it with one pg_restore reading the whole stream" in caplog.text
    assert fingerprint(rich_db + "_stream") == fingerprint(rich_db)


@pytest.mark.parametrize("dump_format", ["custom", "directory"])
def test_a_restore_writes_no_plaintext_file(rich_db, key_file, tmp_path, recipients, dump_format):
    """While the CLI restores, no regular file appears in its temporary folder or beside
    the set but pg_restore's lists of entry numbers and the files keeping its error
    messages: the dump goes through pipes."""
    jobs = 2 if dump_format == "directory" else 1
    path = backup.create_backup_set(
        str(tmp_path / "b"), recipients, databases=[rich_db], dump_format=dump_format, jobs=jobs
    )["path"]
    scratch_tmp = tmp_path / "tmp"
    scratch_tmp.mkdir()
    watched = [str(scratch_tmp), os.path.dirname(path)]

    def regular_files() -> dict[str, int]:
        found = {}
        for folder in watched:
            for parent, _dirs, names in os.walk(folder):
                for name in names:
                    with contextlib.suppress(FileNotFoundError):
                        status = os.lstat(os.path.join(parent, name))
                        if stat.S_ISREG(status.st_mode):
                            found[os.path.join(parent, name)] = status.st_size
        return found

    before = regular_files()
    argv = ["restore", path, "--key-file", key_file, "--database", rich_db, "--target-db", rich_db + "_piped"]
    restoring = subprocess.Popen(
        [sys.executable, "-m", "pgbackup", *argv, "--jobs", "2"],
        env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "module_utils"), "TMPDIR": str(scratch_tmp)},
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 120
    while restoring.poll() is None and time.monotonic() < deadline:
        for name, size in regular_files().items():
            if name not in before:
                shown = os.path.relpath(name, tmp_path)
                seen[shown] = max(size, seen.get(shown, 0))
        time.sleep(0.005)
    assert restoring.wait(timeout=5) == 0, restoring.stderr.read()
    assert fingerprint(rich_db + "_piped") == fingerprint(rich_db)
    assert seen, "the watch saw none of the restore's files: it cannot have looked"
    # Python's check that the temporary folder is writable writes 4 bytes ("blat").
    assert all(
        os.path.basename(name) == "list" or os.path.basename(name).startswith("pgbackup-stderr-") or size <= 4
        for name, size in seen.items()
    ), seen


def test_dead_server_fails_with_a_clear_message(recipient_file, tmp_path):
    result = run_cli(
        "backup", "--dest", str(tmp_path / "b"), "--recipient", recipient_file, env={"PGPORT": "1"}
    )
    assert result.returncode == 1
    assert result.stderr.startswith("pgbackup: error: cannot connect to database 'postgres'")
    assert result.stderr.count("\n") == 1
    assert not any(os.scandir(tmp_path / "b")) if (tmp_path / "b").exists() else True


def test_unknown_database_is_refused(key, tmp_path, recipients):
    with pytest.raises(PgBackupError, match="not found on the server: nope"):
        backup.create_backup_set(str(tmp_path / "b"), recipients, databases=["nope"])


# ---- the CLI ---------------------------------------------------------------------------


def test_cli_backup_verify_restore(rich_db, key_file, tmp_path, recipient_file):
    dest = str(tmp_path / "cli")
    made = run_cli(
        "backup", "--dest", dest, "--recipient", recipient_file, "--database", rich_db, "--json", check=True
    )
    path = json.loads(made.stdout)["path"]
    verified = run_cli("verify", path, "--key-file", key_file, check=True)
    assert re.search(
        r": OK \(2 files, \d+ bytes encrypted, \d+ bytes of dump data; decrypted and authenticated\)$",
        verified.stdout.strip(),
    )
    refused = run_cli("restore", path, "--key-file", key_file, "--database", rich_db)
    assert refused.returncode == 3
    assert refused.stderr.startswith("pgbackup: refused: database") and refused.stderr.count("\n") == 1
    run_cli(
        "restore",
        path,
        "--key-file",
        key_file,
        "--database",
        rich_db,
        "--target-db",
        rich_db + "_cli",
        "--jobs",
        "2",
        check=True,
    )
    assert fingerprint(rich_db + "_cli") == fingerprint(rich_db)


def test_cli_verify_of_corrupt_set_exits_non_zero(rich_set, key_file):
    _, path = rich_set
    _flip(500)(path)
    result = run_cli("verify", path, "--key-file", key_file)
    assert result.returncode == 1
    assert "failed authentication" in result.stderr and result.stderr.count("\n") == 1


def test_restoring_every_database_includes_the_maintenance_database(rich_db, key, tmp_path, recipients):
    """A disaster restore takes all databases, `postgres` (the one we connect to) too."""
    query("postgres", "CREATE TABLE IF NOT EXISTS maintenance_probe (x int)")
    query("postgres", "INSERT INTO maintenance_probe VALUES (42)")
    record = backup.create_backup_set(str(tmp_path / "all"), recipients, databases=["postgres", rich_db])
    query("postgres", "INSERT INTO maintenance_probe VALUES (43)")
    result = restore.restore_set(record["path"], key, force=True, jobs=2)
    kept = {item["target"]: item["kept_previous_as"] for item in result["databases"]}
    assert set(kept) == {"postgres", rich_db}
    assert query("postgres", "SELECT array_agg(x ORDER BY x) FROM maintenance_probe") == [([42],)]
    assert query(kept["postgres"], "SELECT array_agg(x ORDER BY x) FROM maintenance_probe") == [([42, 43],)]
    query("postgres", "DROP TABLE maintenance_probe")
    for previous in kept.values():
        query("template1", f'DROP DATABASE "{previous}"')
