"""The WAL archive against a real PostgreSQL: `pgbackup wal-push` as its archive_command,
`pgbackup wal-fetch` as a restored copy's restore_command, and recovery to a named
restore point and to the end of the archive."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import psycopg
import pytest
from conftest import ROOT, run_cli
from pgbackup import archive, crypto, manifest, physical, pitr, retention, wal
from pgbackup.errors import PgBackupError
from pgcluster import PG_BIN, TempCluster, as_cluster_owner, free_port
from psycopg import sql


def _postgres_owned_folder(prefix: str) -> str:
    folder = tempfile.mkdtemp(prefix=prefix)
    os.chmod(folder, 0o750)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    return folder


# What a host runs pgbackup with: Debian's python3 and its cryptography and zstandard
# (the test's own interpreter may live where the postgres user cannot read).
HOST_PYTHON = "/usr/bin/python3"


def _pgbackup_command(*args: str) -> str:
    """The command line PostgreSQL runs, from this checkout (the role installs pgbackup)."""
    return f"env PYTHONPATH={ROOT}/module_utils {HOST_PYTHON} -m pgbackup " + " ".join(args)


@pytest.fixture(scope="module")
def keys():
    """A key pair the postgres user can read: the public key archives, the private key
    is what a restore brings for restore_command."""
    folder = _postgres_owned_folder("pgbackup-wal-keys-")
    path = os.path.join(folder, "ops.key")
    crypto.generate_key_pair(path)
    if os.geteuid() == 0:
        for name in (path, f"{path}.pub"):
            shutil.chown(name, "postgres", "postgres")
    yield {"private": path, "public": f"{path}.pub"}
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def archiving(keys):
    """A cluster whose archive_command is `pgbackup wal-push` into its own backup folder."""
    dest = _postgres_owned_folder("pgbackup-wal-dest-")
    server = TempCluster(
        settings={
            "fsync": "off",
            "archive_mode": "on",
            "wal_level": "replica",
        }
    )
    os.makedirs(server.base, exist_ok=True)
    server.start()
    command = _pgbackup_command("wal-push", "--dest", dest, "--recipient", keys["public"], "%p")
    with _connect(server) as conn:
        conn.execute(sql.SQL("ALTER SYSTEM SET archive_command = {}").format(sql.Literal(command)))
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield {"server": server, "dest": dest}
    finally:
        server.stop()
        shutil.rmtree(dest, ignore_errors=True)


def _connect(server, port=None):
    env = server.env
    return psycopg.connect(
        host=env["PGHOST"],
        port=port or env["PGPORT"],
        user="postgres",
        dbname="postgres",
        password=server.password,
        sslmode="verify-full",
        sslrootcert=env["PGSSLROOTCERT"],
        autocommit=True,
    )


@contextlib.contextmanager
def _libpq_env(server, **more):
    values = {**server.env, **more}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _switch_and_wait(server) -> str:
    """Close the current segment and wait (bounded) until the archiver has it."""
    with _connect(server) as conn:
        conn.execute("SELECT txid_current()")  # a switch needs some WAL since the last one
        name = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
        conn.execute("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            last, failed = conn.execute(
                "SELECT last_archived_wal, failed_count FROM pg_stat_archiver"
            ).fetchone()
            if last is not None and last >= name:
                assert failed == 0, _archiver_failure(server)
                return name
            time.sleep(0.2)
    raise AssertionError(f"{name} was not archived within 60 s: {_archiver_failure(server)}")


def _archiver_failure(server) -> str:
    with open(os.path.join(server.base, "server.log"), encoding="utf-8", errors="replace") as handle:
        return "".join(line for line in handle if "archive" in line)[-2000:]


def _system(server) -> str:
    return wal.system_identifier(server.data)


def test_archive_command_writes_encrypted_segments_and_never_plaintext(archiving):
    server = archiving["server"]
    with _connect(server) as conn:
        conn.execute(
            "CREATE TABLE archived_probe AS"
            " SELECT g, 'secret-row-' || g AS v FROM generate_series(1, 20000) g"
        )
    name = _switch_and_wait(server)
    path = wal.archived_path(archiving["dest"], _system(server), name)
    with open(path, "rb") as handle:
        content = handle.read()
    assert content.startswith(crypto.MAGIC)
    assert b"secret-row-" not in content
    assert os.stat(path).st_mode & 0o777 == 0o600
    leftovers = [
        entry
        for folder, _dirs, files in os.walk(archiving["dest"])
        for entry in files
        if entry.startswith(".")
    ]
    assert leftovers == []


@pytest.fixture
def segment_copy(archiving, tmp_path):
    """A real segment of the archiving cluster, copied out of its pg_wal as it is now."""
    with _connect(archiving["server"]) as conn:
        name = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
    copy = tmp_path / name
    shutil.copyfile(os.path.join(archiving["server"].data, "pg_wal", name), copy)
    return copy


@pytest.fixture
def dest(tmp_path):
    """A backup folder of the test's own for the archive pushed by hand."""
    folder = tmp_path / "backups"
    folder.mkdir()
    return folder


def _push(archiving, keys, dest, path, *extra, pgdata=None):
    return run_cli(
        "wal-push",
        str(path),
        "--dest",
        str(dest),
        "--recipient",
        keys["public"],
        "--pgdata",
        pgdata or archiving["server"].data,
        *extra,
    )


def _fetch(archiving, keys, dest, name, target, key=None):
    return run_cli(
        "wal-fetch",
        name,
        str(target),
        "--dest",
        str(dest),
        "--key-file",
        key or keys["private"],
        "--pgdata",
        archiving["server"].data,
    )


def test_same_content_twice_succeeds_other_content_is_refused_and_nothing_overwritten(
    archiving, keys, dest, segment_copy, tmp_path
):
    first = _push(archiving, keys, dest, segment_copy, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["status"] == "archived"
    archived = wal.archived_path(str(dest), _system(archiving["server"]), segment_copy.name)
    before = open(archived, "rb").read()
    again = _push(archiving, keys, dest, segment_copy, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "already archived"
    changed = tmp_path / "changed" / segment_copy.name
    changed.parent.mkdir()
    data = bytearray(segment_copy.read_bytes())
    data[-1] ^= 0xFF
    changed.write_bytes(bytes(data))
    refused = _push(archiving, keys, dest, changed)
    assert refused.returncode == 3
    assert "already archived" in refused.stderr and "other content" in refused.stderr
    assert open(archived, "rb").read() == before


def test_fetch_gives_back_the_exact_segment(archiving, keys, dest, segment_copy, tmp_path):
    assert _push(archiving, keys, dest, segment_copy).returncode == 0
    target = tmp_path / "RECOVERYXLOG"
    result = _fetch(archiving, keys, dest, segment_copy.name, target)
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == segment_copy.read_bytes()


def test_fetch_of_a_file_not_archived_fails_at_once_and_quietly(archiving, keys, dest, tmp_path):
    (dest / "wal").mkdir()  # an archive without that file
    target = tmp_path / "RECOVERYHISTORY"
    started = time.monotonic()
    result = _fetch(archiving, keys, dest, "000000FF.history", target)
    assert result.returncode == 1
    assert result.stderr == "" and result.stdout == ""
    assert not target.exists()
    assert time.monotonic() - started < 10


def test_fetch_with_the_wrong_key_fails_and_writes_nothing(
    archiving, keys, dest, segment_copy, other_key_file, tmp_path
):
    assert _push(archiving, keys, dest, segment_copy).returncode == 0
    target = tmp_path / "wal" / "RECOVERYXLOG"
    target.parent.mkdir()
    result = _fetch(archiving, keys, dest, segment_copy.name, target, key=other_key_file)
    assert result.returncode == 126 and "key" in result.stderr
    assert os.listdir(target.parent) == []


def test_a_file_renamed_within_the_archive_is_refused(archiving, keys, dest, segment_copy, tmp_path):
    assert _push(archiving, keys, dest, segment_copy).returncode == 0
    system = _system(archiving["server"])
    later = f"{segment_copy.name[:16]}{int(segment_copy.name[16:], 16) + 1:08X}"
    shutil.copyfile(
        wal.archived_path(str(dest), system, segment_copy.name), wal.archived_path(str(dest), system, later)
    )
    target = tmp_path / "wal" / "RECOVERYXLOG"
    target.parent.mkdir()
    result = _fetch(archiving, keys, dest, later, target)
    assert result.returncode == 126 and "renamed" in result.stderr
    assert os.listdir(target.parent) == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_archive_file_fails_fetch_and_writes_nothing(
    archiving, keys, dest, segment_copy, tmp_path, damage
):
    assert _push(archiving, keys, dest, segment_copy).returncode == 0
    archived = wal.archived_path(str(dest), _system(archiving["server"]), segment_copy.name)
    size = os.path.getsize(archived)
    if damage == "flip":
        with open(archived, "r+b") as handle:
            handle.seek(size // 2)
            byte = handle.read(1)
            handle.seek(size // 2)
            handle.write(bytes([byte[0] ^ 0x01]))
    else:
        os.truncate(archived, size - 100)
    target = tmp_path / "wal" / "RECOVERYXLOG"
    target.parent.mkdir()
    result = _fetch(archiving, keys, dest, segment_copy.name, target)
    assert result.returncode == 126, "above 125: PostgreSQL aborts recovery, never takes it for the end"
    assert ("failed authentication" if damage == "flip" else "truncated") in result.stderr
    assert os.listdir(target.parent) == []
    # A second push of the segment does not paper over the damage: it says so.
    again = _push(archiving, keys, dest, segment_copy)
    assert again.returncode == 1 if damage == "truncate" else again.returncode == 0


def test_a_segment_of_another_system_or_a_foreign_name_is_refused(
    archiving, keys, dest, segment_copy, cluster, tmp_path
):
    other = _push(archiving, keys, dest, segment_copy, pgdata=cluster["data"])
    assert other.returncode == 3 and "belongs to database system" in other.stderr
    foreign = tmp_path / "postgresql.conf"
    foreign.write_text("x")
    result = _push(archiving, keys, dest, foreign)
    assert result.returncode == 1 and "not a WAL file name" in result.stderr
    short = tmp_path / "short" / segment_copy.name
    short.parent.mkdir()
    short.write_bytes(segment_copy.read_bytes()[: 1 << 20])
    result = _push(archiving, keys, dest, short)
    assert result.returncode == 1 and "header says segments are" in result.stderr
    assert not os.path.exists(dest / "wal") or not any(
        files for _folder, _dirs, files in os.walk(dest / "wal")
    )


@pytest.fixture(scope="module")
def history(archiving, keys, tmp_path_factory):
    """A base backup, then rows in three batches with a restore point between each,
    every segment archived by the cluster's own archive_command."""
    server = archiving["server"]
    base_dest = tmp_path_factory.mktemp("bases")
    with _libpq_env(server):
        base = physical.create_base_backup(str(base_dest), crypto.load_recipients([keys["public"]]))
    before, xids, segments = {}, {}, {}
    with _connect(server) as conn:
        conn.execute("CREATE TABLE batches (batch int, n int)")
        for batch in (1, 2, 3):
            time.sleep(1.1)  # commits a second apart: a time target falls between them
            before[batch] = conn.execute("SELECT clock_timestamp()").fetchone()[0]
            time.sleep(0.1)
            with conn.transaction():
                xids[batch] = conn.execute("SELECT txid_current()").fetchone()[0]
                conn.execute("INSERT INTO batches SELECT %s, g FROM generate_series(1, 1000) g", (batch,))
            conn.execute("SELECT pg_create_restore_point(%s)", (f"after_batch_{batch}",))
            # Each batch in a segment of its own: the missing-segment case removes batch 2's.
            segments[batch] = _switch_and_wait(server)
    last = _switch_and_wait(server)
    return {
        "base": base,
        "base_dest": str(base_dest),
        "last_segment": last,
        "before": before,
        "xids": xids,
        "segments": segments,
        "base_sets": retention.scan(str(base_dest)),
    }


def _recover(archiving, keys, history, folder, settings: dict, archive=None) -> dict:
    """Restore the base into folder, recover it from the archive with `settings`, start it
    and wait (bounded) for the end of recovery; return what the copy holds."""
    target = folder / "data"
    physical.restore_base(history["base"]["path"], crypto.load_key_ring([keys["private"]]), str(target))
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres:postgres", str(folder)], check=True)
    fetch = _pgbackup_command(
        "wal-fetch", "--dest", archive or archiving["dest"], "--key-file", keys["private"], "%f %p"
    )
    lines = [f"restore_command = '{fetch}'", *(f"{name} = '{value}'" for name, value in settings.items())]
    with open(target / "postgresql.auto.conf", "a") as handle:
        handle.write("\n".join(lines) + "\n")
    (target / "recovery.signal").touch()
    port = free_port()
    base = archiving["server"].base
    as_cluster_owner(
        [
            f"{PG_BIN}/pg_ctl",
            "-D",
            str(target),
            "-w",
            "-t",
            "120",
            "-l",
            str(folder / "log"),
            "start",
            "-o",
            f"-p {port} -k /tmp -c listen_addresses=127.0.0.1 -c archive_mode=off -c ssl=on"
            f" -c ssl_cert_file={base}/server.crt -c ssl_key_file={base}/server.key",
        ],
        check=False,  # a recovery that stops early may stop before pg_ctl sees it up: judged below
    )
    try:
        with _libpq_env(archiving["server"], PGPORT=str(port), PGPASSWORD=archiving["server"].password):
            reached = pitr.wait_for_recovery(str(target), "promote", 120, log_file=str(folder / "log"))
        with _connect(archiving["server"], port=port) as conn:
            batches = dict(conn.execute("SELECT batch, count(*) FROM batches GROUP BY batch").fetchall())
        return {"batches": batches, "timeline": reached["timeline"], "log": (folder / "log").read_text()}
    finally:
        as_cluster_owner([f"{PG_BIN}/pg_ctl", "-D", str(target), "-m", "immediate", "stop"], check=False)


@pytest.fixture
def scratch():
    folder = _postgres_owned_folder("pgbackup-pitr-")
    os.chmod(folder, 0o755)
    yield pathlib.Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _plan(archiving, keys, history, kind, value="", dest=None):
    return pitr.plan(
        dest or archiving["dest"],
        crypto.load_key_ring([keys["private"]]),
        kind,
        value,
        base_sets=history["base_sets"],
    )


def test_recovery_to_a_named_restore_point_stops_there(archiving, keys, history, scratch):
    plan = _plan(archiving, keys, history, "name", "after_batch_2")
    assert plan["base_backup"] == history["base"]["name"]
    assert plan["settings"] == {
        "recovery_target_name": "after_batch_2",
        "recovery_target_timeline": "latest",
        "recovery_target_action": "promote",
    }
    result = _recover(archiving, keys, history, scratch, plan["settings"])
    assert result["batches"] == {1: 1000, 2: 1000}
    assert result["timeline"] == 2
    assert 'recovery stopping at restore point "after_batch_2"' in result["log"]


def test_recovery_to_a_time_stops_before_the_later_commits(archiving, keys, history, scratch):
    plan = _plan(archiving, keys, history, "time", history["before"][2].isoformat())
    result = _recover(archiving, keys, history, scratch, plan["settings"])
    assert result["batches"] == {1: 1000}


def test_recovery_to_a_transaction_includes_it_and_nothing_after(archiving, keys, history, scratch):
    plan = _plan(archiving, keys, history, "xid", str(history["xids"][2]))
    assert plan["settings"]["recovery_target_xid"] == str(history["xids"][2])
    result = _recover(archiving, keys, history, scratch, plan["settings"])
    assert result["batches"] == {1: 1000, 2: 1000}


def test_recovery_to_the_end_of_the_archive_has_every_row(archiving, keys, history, scratch):
    plan = _plan(archiving, keys, history, "latest")
    assert plan["window"]["last_segment"] >= history["last_segment"]
    assert pitr.parse_time(plan["window"]["latest_commit_time"]) >= history["before"][3]
    result = _recover(archiving, keys, history, scratch, plan["settings"])
    assert result["batches"] == {1: 1000, 2: 1000, 3: 1000}
    assert "archive recovery complete" in result["log"]


def test_targets_outside_the_window_are_refused_naming_it(archiving, keys, history):
    base_end = manifest.parse_iso(history["base"]["finished_at"])
    cases = [
        (
            "time",
            (base_end - datetime.timedelta(hours=1)).isoformat(),
            "before the earliest base backup ends",
        ),
        ("time", (history["before"][3] + datetime.timedelta(hours=1)).isoformat(), "after the last commit"),
        ("name", "no_such_point", "no restore point named no_such_point"),
        ("lsn", "FF/0", "after the end of the archive"),
    ]
    for kind, value, reason in cases:
        with pytest.raises(pitr.UnreachableError, match=reason) as refused:
            _plan(archiving, keys, history, kind, value)
        assert "reachable: from " in str(refused.value)
        assert history["base"]["wal"]["end_lsn"] in str(refused.value)


def test_a_missing_segment_is_named_and_targets_past_it_refused(archiving, keys, history, tmp_path):
    copy = tmp_path / "archive"
    shutil.copytree(archiving["dest"], copy)
    removed = history["segments"][2]
    os.unlink(wal.archived_path(str(copy), _system(archiving["server"]), removed))
    for kind, value in (("latest", ""), ("time", history["before"][3].isoformat())):
        with pytest.raises(pitr.UnreachableError, match=f"segment {removed} is missing"):
            _plan(archiving, keys, history, kind, value, dest=str(copy))
    plan = _plan(archiving, keys, history, "time", history["before"][1].isoformat(), dest=str(copy))
    assert plan["base_backup"] == history["base"]["name"]


def test_the_window_reaches_the_last_archived_segment_and_prune_keeps_what_the_base_needs(archiving, history):
    bases = retention.scan(history["base_dest"])
    system = _system(archiving["server"])
    (described,) = [
        item for item in wal.describe(archiving["dest"], bases) if item["system_identifier"] == system
    ]
    (window,) = described["windows"]
    assert window["base_backup"] == history["base"]["name"]
    assert window["timeline"] == 1
    assert window["latest_segment"] >= history["last_segment"]
    assert window["earliest_lsn"] == history["base"]["wal"]["end_lsn"]
    assert described["timelines"][0]["missing"] == []
    start = wal.parse_lsn(history["base"]["wal"]["start_lsn"]) // described["segment_bytes"]
    report = wal.prune(archiving["dest"], bases, dry_run=True)
    assert report["removed"], "segments before the base backup's start are prunable"
    assert all(wal.segment_number(name, described["segment_bytes"]) < start for name in report["removed"])
    assert report["kept_from"][system] == wal.segment_name(1, start, described["segment_bytes"])


def test_a_damaged_segment_stops_recovery_loudly_not_at_the_damage(archiving, keys, history, scratch):
    copy = scratch / "archive"
    shutil.copytree(archiving["dest"], copy)
    damaged = wal.archived_path(str(copy), _system(archiving["server"]), history["segments"][2])
    with open(damaged, "r+b") as handle:
        handle.seek(os.path.getsize(damaged) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))
    subprocess.run(["chown", "-R", "postgres:postgres", str(copy)], check=True)
    settings = {"recovery_target_timeline": "latest", "recovery_target_action": "promote"}
    with pytest.raises(PgBackupError, match="stopped during recovery") as stopped:
        _recover(archiving, keys, history, scratch, settings, archive=str(copy))
    assert (
        "failed authentication" in str(stopped.value) or "recovery must stop" in (scratch / "log").read_text()
    )


def _segments_of(archiving, keys, history, folder, count: int) -> list[str]:
    """The first `count` segments after the base backup, decrypted from the archive into
    a stand-in data directory's pg_wal (with pg_control), as PostgreSQL would hold them."""
    (folder / "global").mkdir(parents=True)
    (folder / "pg_wal" / "archive_status").mkdir(parents=True)
    shutil.copy(os.path.join(archiving["server"].data, "global", "pg_control"), folder / "global")
    system = _system(archiving["server"])
    names = sorted(
        item["name"]
        for item in wal.archived_files(archiving["dest"], system)
        if wal.SEGMENT_NAME.match(item["name"]) and item["name"] <= history["last_segment"]
    )[-count:]
    ring = crypto.load_key_ring([keys["private"]])
    for name in names:
        wal.fetch(name, str(folder / "pg_wal" / name), archiving["dest"], ring, system=system)
    return names


def test_push_ahead_archives_the_ready_files_and_answers_for_them_without_the_crypto_stack(
    archiving, keys, history, tmp_path
):
    stand_in = tmp_path / "data"
    names = _segments_of(archiving, keys, history, stand_in, 4)
    for name in names:
        (stand_in / "pg_wal" / "archive_status" / f"{name}.ready").touch()
    dest = tmp_path / "backups"
    dest.mkdir()
    push = ["wal-push", "--dest", str(dest), "--recipient", keys["public"], "--pgdata", str(stand_in)]
    first = run_cli(*push, "--push-ahead", "4", "--json", str(stand_in / "pg_wal" / names[0]), check=True)
    assert sorted(json.loads(first.stdout)["pushed_ahead"]) == names[1:]
    for name in names[1:]:
        answered = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "pgbackup", *push, str(stand_in / "pg_wal" / name)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "module_utils")},
            check=False,
        )
        assert answered.returncode == 0, answered.stderr
        assert "cryptography" not in answered.stderr, "answered from the note, without the crypto stack"
    notes = dest / "wal" / _system(archiving["server"]) / archive.AHEAD_FOLDER
    assert list(notes.iterdir()) == []
    ring = crypto.load_key_ring([keys["private"]])
    for name in names:
        target = tmp_path / f"back-{name}"
        wal.fetch(name, str(target), str(dest), ring, pgdata=str(stand_in))
        assert target.read_bytes() == (stand_in / "pg_wal" / name).read_bytes()


def test_a_note_that_does_not_match_the_file_is_not_trusted(archiving, keys, history, tmp_path):
    stand_in = tmp_path / "data"
    (name,) = _segments_of(archiving, keys, history, stand_in, 1)
    dest = tmp_path / "backups"
    dest.mkdir()
    note = dest / "wal" / _system(archiving["server"]) / archive.AHEAD_FOLDER / name
    note.parent.mkdir(parents=True)
    note.write_text("0" * 64)  # a note for other content: the file was never archived
    pushed = run_cli(
        "wal-push",
        "--dest",
        str(dest),
        "--recipient",
        keys["public"],
        "--pgdata",
        str(stand_in),
        str(stand_in / "pg_wal" / name),
        "--json",
        check=True,
    )
    assert json.loads(pushed.stdout)["status"] == "archived"


def test_fetch_ahead_serves_the_next_segments_from_the_spool(archiving, keys, history, tmp_path):
    stand_in = tmp_path / "data"
    (stand_in / "global").mkdir(parents=True)
    (stand_in / "pg_wal").mkdir()
    shutil.copy(os.path.join(archiving["server"].data, "global", "pg_control"), stand_in / "global")
    (stand_in / "recovery.signal").touch()  # the prefetcher works while recovery runs
    system = _system(archiving["server"])
    names = sorted(
        item["name"]
        for item in wal.archived_files(archiving["dest"], system)
        if wal.SEGMENT_NAME.match(item["name"])
    )[:4]
    fetch = [
        "wal-fetch",
        "--dest",
        archiving["dest"],
        "--key-file",
        keys["private"],
        "--pgdata",
        str(stand_in),
    ]
    target = stand_in / "pg_wal" / "RECOVERYXLOG"
    first = run_cli(*fetch, "--fetch-ahead", "4", names[0], str(target), check=True)
    assert first.returncode == 0
    spool = stand_in / "pg_wal" / archive.SPOOL_FOLDER
    deadline = time.monotonic() + 60
    while not set(names[1:]) <= {path.name for path in spool.iterdir()}:
        assert time.monotonic() < deadline, list(spool.iterdir())
        time.sleep(0.1)
    ring = crypto.load_key_ring([keys["private"]])
    for name in names[1:]:
        answered = run_cli(*fetch, name, str(target))
        assert answered.returncode == 0, answered.stderr
        expected = tmp_path / f"direct-{name}"
        wal.fetch(name, str(expected), archiving["dest"], ring, system=system)
        assert target.read_bytes() == expected.read_bytes()
    assert os.path.exists(keys["private"]), "the quick answer never takes an option's value for a file"
    missing = run_cli(*fetch, "0000000F.history", str(stand_in / "pg_wal" / "RECOVERYHISTORY"))
    assert missing.returncode == 1 and missing.stderr == ""
    assert os.path.exists(keys["private"])
    # Recovery ends: the prefetcher notices and goes (it holds the spool's lock until then).
    (stand_in / "recovery.signal").unlink()
    lock = os.open(spool / archive.SPOOL_LOCK, os.O_RDONLY)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the prefetcher outlived recovery"
                time.sleep(0.1)
    finally:
        os.close(lock)


def test_a_damaged_base_backup_is_refused_before_anything_is_touched(archiving, keys, history, tmp_path):
    copy = tmp_path / "bases"
    shutil.copytree(history["base_dest"], copy)
    (set_path,) = [path for path in copy.iterdir() if path.name.startswith("physical-")]
    part = set_path / history["base"]["base"][0]["path"]
    os.truncate(part, part.stat().st_size - 1)
    with pytest.raises(PgBackupError, match="its manifest says"):
        pitr.plan(
            archiving["dest"],
            crypto.load_key_ring([keys["private"]]),
            "latest",
            base_sets=retention.scan(str(copy)),
        )


def test_a_missing_archive_is_not_the_end_of_the_archive(archiving, keys, dest, tmp_path):
    """A backup directory that is not there (unmounted, mistyped) must stop recovery, not
    end it early as if every later segment had never been written."""
    for name in ("000000010000000000000002", "00000002.history"):
        result = _fetch(archiving, keys, dest, name, tmp_path / "RECOVERYXLOG")
        assert result.returncode == 126, result.stderr
        assert "no WAL archive" in result.stderr


def test_the_parent_timeline_past_its_switch_is_no_gap():
    """After a recovery back in time, timeline 1 goes on past the point timeline 2 left
    it: those files are never read on timeline 2's path and must not look like a hole."""
    size = 16 << 20
    switch = 5 * size + 0x100  # timeline 2 begins inside segment 5
    names = {wal.segment_name(1, number, size) for number in range(2, 11)}
    names |= {wal.segment_name(2, number, size) for number in (5, 6)}
    archive = pitr._Archive("", None, "1", [(1, switch), (2, None)], names, size, "", None)
    chain = archive.chain({"end": 2 * size + 0x28})
    assert chain["last"] == wal.segment_name(2, 6, size)
    assert chain["missing"] is None
    without_five = names - {wal.segment_name(2, 5, size)}
    holed = pitr._Archive("", None, "1", [(1, switch), (2, None)], without_five, size, "", None).chain(
        {"end": 2 * size + 0x28}
    )
    assert holed["missing"] == wal.segment_name(2, 5, size)
    assert holed["next_present"] == wal.segment_name(2, 6, size)


def test_two_partial_segments_of_one_name_are_both_kept(archiving, keys, dest, segment_copy, tmp_path):
    """A promoted standby and a recovery's end can each leave a .partial of one name:
    refusing the second would stop archiving for good, and recovery reads neither."""
    first = tmp_path / "first" / f"{segment_copy.name}.partial"
    second = tmp_path / "second" / f"{segment_copy.name}.partial"
    for path, last in ((first, 0x01), (second, 0x02)):
        path.parent.mkdir()
        data = bytearray(segment_copy.read_bytes())
        data[-1] = last
        path.write_bytes(bytes(data))
    assert _push(archiving, keys, dest, first).returncode == 0
    kept = _push(archiving, keys, dest, second, "--json")
    assert kept.returncode == 0, kept.stderr
    aside = json.loads(kept.stdout)["path"]
    assert os.path.basename(aside).startswith(f".{second.name}.")
    ring = crypto.load_key_ring([keys["private"]])
    system = _system(archiving["server"])
    wal.fetch(first.name, str(tmp_path / "back"), str(dest), ring, system=system)
    assert (tmp_path / "back").read_bytes() == first.read_bytes()
    assert _push(archiving, keys, dest, second).returncode == 0  # and again: already there


def test_prune_keeps_what_is_not_off_site_yet(archiving, history):
    bases = history["base_sets"]
    everything = wal.prune(archiving["dest"], bases, dry_run=True)
    assert everything["removed"]
    nothing_synced = wal.prune(archiving["dest"], bases, dry_run=True, archived_before=0)
    assert nothing_synced["removed"] == []


def test_a_full_disk_fails_the_push_loudly_and_leaves_nothing_half_written(
    archiving, keys, segment_copy, tiny_disk
):
    before = segment_copy.read_bytes()
    (tiny_disk / "wal").mkdir()
    # What else filled the disk (unbuffered: the write that fails holds nothing back).
    with open(tiny_disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"\0" * 4096)
    full = _push(archiving, keys, tiny_disk, segment_copy)
    assert full.returncode == 1
    assert "no space left on device" in full.stderr
    left = [name for _folder, _dirs, files in os.walk(tiny_disk / "wal") for name in files]
    assert left == [], "neither an archived file nor a temporary one"
    assert segment_copy.read_bytes() == before  # PostgreSQL keeps its segment and retries


def test_a_recovery_the_disk_cannot_hold_is_refused_before_anything_moves(
    archiving, keys, history, tiny_disk
):
    data_dir = tiny_disk / "main"
    data_dir.mkdir()
    with pytest.raises(PgBackupError, match="not enough free space"):
        pitr.plan(
            archiving["dest"],
            crypto.load_key_ring([keys["private"]]),
            "latest",
            base_sets=history["base_sets"],
            data_dir=str(data_dir),
        )
    assert data_dir.exists()
