"""What a database, a set folder or a tool can throw at pgbackup, against a real server.

Database names are hostile (a name can be a connection string), set folders are hostile
(they can hold symbolic links, or another set's manifest), tools fail, runs are killed
with SIGKILL, and clients are still disconnecting when a restore starts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psycopg
import pytest
from conftest import ROOT, connect, query, run_cli
from pgbackup import backup, crypto, manifest, pg, physical, restore, retention
from pgbackup.errors import CorruptError, PgBackupError, RefusedError
from pgbackup.sets import SetWriter


class RecordingServer:
    """A TCP listener on another loopback address that records every connection: where
    a hostile database name would send the backup's credentials."""

    def __init__(self, address="127.0.0.2"):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.address, self.port = self.sock.getsockname()
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                continue
            with client:
                client.settimeout(1)
                try:
                    self.received.append(client.recv(65536) or b"<connected>")
                except OSError:
                    self.received.append(b"<connected>")

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def trap():
    server = RecordingServer()
    yield server
    server.close()


def hostile_names(trap):
    return [
        f"hostaddr={trap.address} port={trap.port} sslmode=disable",
        f"postgresql://{trap.address}:{trap.port}/postgres?sslmode=disable",
        "it's quoted",
        "back\\slash \\' mixed",
        "with space=and equals",
        "dbname='postgres'",
    ]


@pytest.fixture
def hostile_dbs(cluster, trap):
    names = hostile_names(trap)
    with connect() as conn:
        for name in names:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    for index, name in enumerate(names):
        query(name, f"CREATE TABLE marker AS SELECT {index} AS which, %s::text AS name", (name,))
    yield names
    with connect() as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname = ANY(%s) OR datname LIKE 'restored_%%'", (names,)
        )
        for (name,) in rows.fetchall():
            conn.execute(
                psycopg.sql.SQL("DROP DATABASE {} WITH (FORCE)").format(psycopg.sql.Identifier(name))
            )


def test_database_names_are_never_connection_strings(hostile_dbs, trap, key, tmp_path, recipients):
    record = backup.create_backup_set(str(tmp_path / "b"), recipients, databases=hostile_dbs)
    assert trap.received == [], "a database name sent a connection elsewhere"
    assert [database["name"] for database in record["databases"]] == hostile_dbs
    restore.verify_set(record["path"], key)
    for index, name in enumerate(hostile_dbs):
        restore.restore_set(record["path"], key, databases=[name], target_db=f"restored_{index}")
        assert query(f"restored_{index}", "SELECT which, name FROM marker") == [(index, name)]
    # Restoring over the hostile names themselves (empty them first: a plain replace).
    for name in hostile_dbs:
        query(name, "DROP TABLE marker")
    report = restore.restore_set(record["path"], key, databases=hostile_dbs)
    assert [item["target"] for item in report["databases"]] == hostile_dbs
    for index, name in enumerate(hostile_dbs):
        assert query(name, "SELECT which, name FROM marker") == [(index, name)]
    assert trap.received == []


def test_database_names_through_the_cli_and_directory_format(
    hostile_dbs, trap, key_file, tmp_path, recipient_file
):
    made = run_cli(
        "backup",
        "--dest",
        str(tmp_path / "b"),
        "--recipient",
        recipient_file,
        "--format",
        "directory",
        "--jobs",
        "2",
        *[word for name in hostile_dbs[:2] for word in ("--database", name)],
        check=True,
    )
    set_path = made.stdout.strip()
    run_cli(
        "restore",
        set_path,
        "--key-file",
        key_file,
        "--database",
        hostile_dbs[0],
        "--target-db",
        "restored_cli",
        "--globals",
        check=True,
    )
    assert query("restored_cli", "SELECT name FROM marker") == [(hostile_dbs[0],)]
    assert trap.received == []


# ---- set folders are hostile ---------------------------------------------------------


@pytest.fixture(scope="module")
def small_set(cluster, key, tmp_path_factory, recipients):
    return backup.create_backup_set(str(tmp_path_factory.mktemp("small")), recipients, databases=["postgres"])


def copy_of(small_set, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir(exist_ok=True)
    path = folder / small_set["name"]
    shutil.copytree(small_set["path"], path)
    return path


@pytest.fixture
def victim(tmp_path):
    """Where a planted link points: nothing may be created or opened there."""
    folder = tmp_path / "live-data-directory"
    folder.mkdir()
    return folder / "standby.signal"


@pytest.mark.parametrize("command", ["verify", "restore", "restore-base", "prune", "list"])
def test_a_planted_lock_link_creates_nothing_where_it_points(small_set, key, tmp_path, victim, command):
    path = copy_of(small_set, tmp_path)
    lock = path / ".lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(victim)
    if command == "verify":
        with pytest.raises(CorruptError, match="symbolic link"):
            restore.verify_set(str(path), key)
    elif command == "restore":
        with pytest.raises(CorruptError, match="symbolic link"):
            restore.restore_set(str(path), key, databases=["postgres"], target_db="never_made")
    elif command == "restore-base":
        with pytest.raises(CorruptError, match="symbolic link"):
            physical.restore_base(str(path), key, str(tmp_path / "target"))
    else:
        # prune and list do not follow it either: the set is reported, not used.
        listed = {entry["name"]: entry for entry in retention.scan(str(path.parent))}
        assert listed[path.name]["status"] == "invalid"
        assert "symbolic link" in listed[path.name]["reason"]
        if command == "prune":
            report = retention.prune(str(path.parent), keep_days=0, min_keep=1)
            assert path.name in report["invalid"]
    assert not victim.exists()
    assert lock.is_symlink()


def test_a_set_folder_that_is_a_link_is_refused(small_set, key, tmp_path):
    real = copy_of(small_set, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = elsewhere / small_set["name"]
    link.symlink_to(real)
    with pytest.raises(CorruptError, match="symbolic link"):
        restore.verify_set(str(link), key)
    listed = retention.scan(str(elsewhere))
    assert [(entry["name"], entry["status"]) for entry in listed] == [(small_set["name"], "invalid")]
    retention.prune(str(elsewhere), keep_days=0, min_keep=1)
    assert real.exists() and link.is_symlink()


@pytest.mark.parametrize("planted", ["fifo", "file-link", "device-like-dir-link"])
def test_a_set_folder_holding_unexpected_entries_is_refused(small_set, key, tmp_path, planted):
    path = copy_of(small_set, tmp_path)
    if planted == "fifo":
        os.mkfifo(path / "extra")
    elif planted == "file-link":
        target = path / small_set["databases"][0]["files"][0]["path"]
        os.replace(target, tmp_path / "moved")
        target.symlink_to(tmp_path / "moved")
    else:
        (path / "sub").symlink_to("/etc")
    with pytest.raises(CorruptError, match=r"which is (not a regular file|a symbolic link)"):
        restore.verify_set(str(path), key)


def test_an_older_set_copied_over_a_newer_name_is_refused(cluster, key, tmp_path, recipients):
    dest = tmp_path / "b"
    older = backup.create_backup_set(str(dest), recipients, databases=["postgres"])
    time.sleep(1.1)
    newer = backup.create_backup_set(str(dest), recipients, databases=["postgres"])
    shutil.rmtree(newer["path"])
    shutil.copytree(older["path"], newer["path"])
    with pytest.raises(
        CorruptError, match=f"describes set '{older['name']}'.*not this folder '{newer['name']}'"
    ):
        restore.verify_set(newer["path"], key)
    with pytest.raises(CorruptError, match="not this folder"):
        restore.restore_set(newer["path"], key, databases=["postgres"], target_db="never_made")
    statuses = {entry["name"]: entry["status"] for entry in retention.scan(str(dest))}
    assert statuses == {older["name"]: "complete", newer["name"]: "invalid"}


def test_a_logical_set_renamed_as_physical_is_refused(small_set, key, tmp_path):
    path = copy_of(small_set, tmp_path)
    renamed = path.parent / small_set["name"].replace("logical-", "physical-")
    path.rename(renamed)
    with pytest.raises(CorruptError, match="not this folder"):
        physical.restore_base(str(renamed), key, str(tmp_path / "target"))


# ---- tools fail with their own words -------------------------------------------------


@pytest.fixture
def limited_role(cluster, new_db):
    """A role that may log in but not read one table, nor stream a base backup."""
    database = new_db("limited")
    with connect() as conn:
        conn.execute("DROP ROLE IF EXISTS limited_backup")
        conn.execute("CREATE ROLE limited_backup LOGIN PASSWORD 'limited-password'")
    query(database, "CREATE TABLE secret AS SELECT 1 AS x; REVOKE ALL ON secret FROM PUBLIC")
    yield {"PGUSER": "limited_backup", "PGPASSWORD": "limited-password"}, database
    with connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        conn.execute("DROP ROLE limited_backup")


def test_pg_dump_failure_reaches_the_user_in_its_own_words(limited_role, key_file, tmp_path, recipient_file):
    env, database = limited_role
    result = run_cli(
        "backup",
        "--dest",
        str(tmp_path / "b"),
        "--recipient",
        recipient_file,
        "--database",
        database,
        env=env,
    )
    assert result.returncode == 1
    assert "pg_dump of database" in result.stderr
    assert "permission denied for table secret" in result.stderr
    assert "seek of closed file" not in result.stderr and "Traceback" not in result.stderr
    assert not [name for name in os.listdir(tmp_path / "b") if not name.startswith(".")]


def test_pg_basebackup_failure_reaches_the_user_in_its_own_words(
    limited_role, key_file, tmp_path, recipient_file
):
    env, _database = limited_role
    result = run_cli("basebackup", "--dest", str(tmp_path / "b"), "--recipient", recipient_file, env=env)
    assert result.returncode == 1
    assert "pg_basebackup failed" in result.stderr
    assert "must be superuser or replication role" in result.stderr
    assert "seek of closed file" not in result.stderr and "Traceback" not in result.stderr


def test_pg_dumpall_failure_reaches_the_user_in_its_own_words(cluster, recipients, tmp_path):
    argv = [
        pg.tool("pg_dumpall"),
        "--no-password",
        "--globals-only",
        f"--database={pg.dbname_conninfo('no_such_db')}",
    ]
    with pytest.raises(
        PgBackupError,
        match=r"pg_dumpall --globals-only failed: pg_dumpall: error: could not connect to database .*no_such",
    ):
        SetWriter(str(tmp_path), "logical-20261125T020000Z", recipients, 3, 1).stream_program(
            argv, ["globals.sql.enc"], "pg_dumpall --globals-only"
        )
    assert not os.listdir(tmp_path)


# ---- plaintext left by killed runs -----------------------------------------------------


def test_scratch_database_of_a_killed_restore_is_dropped_by_the_next_one(cluster, small_set, key_file):
    """A restore killed while loading leaves its scratch database (its plaintext went
    through pipes only). The next restore drops it: no restore holds its lock and no
    session is in it. It keeps one whose lock a live restore holds (from any host, and
    from template1 as a restore of `postgres` does: advisory locks are per database), and
    one a session is still in."""
    # Named as scratch databases are now, and (abandoned, live_elsewhere) as they were
    # before they were numbered.
    abandoned, live_elsewhere = (f"pgbackup_restore_{pid}_20260101T000000Z" for pid in (11, 14))
    live, busy = (f"pgbackup_restore_{pid}_0_20260101T000000Z" for pid in (12, 13))
    for name in (abandoned, live, busy, live_elsewhere):
        query("postgres", f'CREATE DATABASE "{name}"')
    try:
        with (
            psycopg.connect(dbname="postgres", autocommit=True) as restoring,
            psycopg.connect(dbname="template1", autocommit=True) as restoring_postgres,
            psycopg.connect(dbname=busy),
        ):
            restoring.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (restore.SCRATCH_LOCK_CLASS, live))
            restoring_postgres.execute(
                "SELECT pg_advisory_lock(%s, hashtext(%s))", (restore.SCRATCH_LOCK_CLASS, live_elsewhere)
            )
            # The plan (check mode) names what the restore would drop, and drops nothing.
            plan = restore.plan_restore(
                small_set["path"],
                crypto.load_key(key_file),
                databases=["postgres"],
                target_db="restored_after_kill",
            )
            assert plan["would_drop"] == [abandoned]
            assert abandoned in [row[0] for row in query("postgres", "SELECT datname FROM pg_database")]
            argv = ["restore", small_set["path"], "--key-file", key_file, "--database", "postgres"]
            result = run_cli("--verbose", *argv, "--target-db", "restored_after_kill")
            assert result.returncode == 0, result.stderr
            assert f"dropped {abandoned}, left by a restore that was killed while loading" in result.stderr
            names = [row[0] for row in query("postgres", "SELECT datname FROM pg_database")]
            assert abandoned not in names
            assert live in names and busy in names and live_elsewhere in names
    finally:
        for name in (abandoned, live, busy, live_elsewhere, "restored_after_kill"):
            query("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_restore_stopped_mid_load_leaves_nothing_the_next_cannot_clear(
    cluster, key_file, new_db, recipients, tmp_path, stop
):
    """pgbackup stopped in a table's COPY: no loader stays in the scratch database.
    SIGTERM: it drops the scratch database on its way out. SIGKILL: the next restore
    drops it. Either way the next restore restores."""
    name = new_db("killed")
    # A directory set of two tables, the larger loaded first.
    query(name, "CREATE TABLE bulk AS SELECT g, md5(g::text) AS filler FROM generate_series(1, 400000) g")
    query(name, "CREATE TABLE small AS SELECT g FROM generate_series(1, 10) g")
    made = backup.create_backup_set(
        str(tmp_path / "b"), recipients, databases=[name], dump_format="directory"
    )
    argv = ["restore", made["path"], "--key-file", key_file, "--database", name, "--target-db", name + "_x"]
    killed = subprocess.Popen(
        [sys.executable, "-m", "pgbackup", *argv],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    loading = (
        "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'COPY %%' AND datname LIKE 'pgbackup_restore_%%'"
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not query("postgres", loading):
        assert killed.poll() is None, killed.stderr.read()
        time.sleep(0.01)
    assert query("postgres", loading), "the restore was never seen loading"
    killed.send_signal(stop)
    assert killed.wait(timeout=30) == (143 if stop == signal.SIGTERM else -signal.SIGKILL), (
        killed.stderr.read()
    )
    scratch = "SELECT 1 FROM pg_database WHERE datname LIKE 'pgbackup_restore_%%'"
    if stop == signal.SIGTERM:
        assert not query("postgres", scratch), "the restore left its scratch database on SIGTERM"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and query(
        "postgres", "SELECT 1 FROM pg_stat_activity WHERE datname LIKE 'pgbackup_restore_%%'"
    ):
        time.sleep(0.1)
    assert not query("postgres", "SELECT 1 FROM pg_stat_activity WHERE datname LIKE 'pgbackup_restore_%%'"), (
        "a loader outlived the restore that started it"
    )
    result = run_cli("--verbose", *argv)
    assert result.returncode == 0, result.stderr
    assert ("left by a restore that was killed while loading" in result.stderr) == (stop == signal.SIGKILL)
    # --verbose tells the operator where a restore's time went, phase by phase (this
    # database has nothing after its data).
    for phase in ("schema", "data"):
        assert f"({phase}): done in " in result.stderr, result.stderr
    assert not query("postgres", scratch)
    query("postgres", f'DROP DATABASE IF EXISTS "{name}_x"')


def test_loaders_die_with_the_process_that_started_them(tmp_path):
    """The kernel kills a program started in a session of its own (pg_restore, which
    may wait on a pipe forever) when the pgbackup process that started it dies, even
    by SIGKILL, when no cleanup can run."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pgbackup import pg; run = pg.ToolRun(['sleep', '120'], new_session=True); "
            "print(run.process.pid, flush=True); time.sleep(120)",
        ],
        env=cli_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(parent.stdout.readline())
    os.kill(child, 0)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the program outlived the pgbackup process that started it")


def cli_env():
    return {**os.environ, "PYTHONPATH": os.path.join(ROOT, "module_utils")}


def test_prune_removes_abandoned_leftovers_of_every_kind(cluster, small_set, key, tmp_path):
    dest = copy_of(small_set, tmp_path).parent
    aged = time.time() - retention.LEFTOVER_GRACE_SECONDS - 1
    for name in (
        ".partial-logical-20260101T000000Z",
        ".restore-abc",
        ".deleting-logical-x",
        ".restore-young",
    ):
        (dest / name).mkdir()
        (dest / name / "plaintext.dump").write_bytes(b"rows")
        (dest / name / manifest.STAGING_MARK).write_bytes(b"")
        if name != ".restore-young":
            os.utime(dest / name, (aged, aged))
    report = retention.prune(str(dest), keep_days=30, min_keep=1)
    assert sorted(report["leftovers_removed"]) == [
        ".deleting-logical-x",
        ".partial-logical-20260101T000000Z",
        ".restore-abc",
    ]
    assert sorted(name for name in os.listdir(dest) if name.startswith(".")) == [".restore-young"]


# ---- clients that are still leaving ---------------------------------------------------


@pytest.fixture
def emptied_target(cluster, small_set, new_db):
    return new_db("leaving")


def test_a_session_that_is_ending_does_not_block_the_restore(small_set, key, emptied_target):
    conn = psycopg.connect(dbname=emptied_target, autocommit=True, application_name="closing-soon")
    closer = threading.Timer(1.0, conn.close)
    closer.start()
    try:
        report = restore.restore_set(small_set["path"], key, databases=["postgres"], target_db=emptied_target)
    finally:
        closer.join()
    assert report["databases"][0]["target"] == emptied_target


def test_a_session_that_stays_is_named_in_the_refusal(small_set, key, emptied_target, monkeypatch):
    monkeypatch.setattr(pg, "SESSION_GRACE_SECONDS", 0.5)
    with psycopg.connect(dbname=emptied_target, autocommit=True, application_name="streaming-api"):
        started = time.monotonic()
        with pytest.raises(
            RefusedError, match=r"in use by 1 session\(s\): pid \d+ \(streaming-api, 127\.0\.0\.1\)"
        ):
            restore.restore_set(small_set["path"], key, databases=["postgres"], target_db=emptied_target)
        assert time.monotonic() - started < 10
    assert manifest.SET_NAME.match(small_set["name"])


def test_leftover_cleanup_touches_only_pgbackups_own_folders(tmp_path):
    """--staging-dir may be a shared folder: another user's `.restore-*`, or one without
    pgbackup's mark, is never removed, however old."""
    shared = tmp_path / "shared"
    shared.mkdir()
    aged = time.time() - retention.LEFTOVER_GRACE_SECONDS - 1
    ours, unmarked, foreign = (
        shared / name for name in (".restore-ours", ".restore-photos", ".restore-theirs")
    )
    for folder in (ours, unmarked, foreign):
        folder.mkdir()
        (folder / "data").write_text("x")
    for folder in (ours, foreign):
        (folder / manifest.STAGING_MARK).write_text("")
    shutil.chown(foreign, "nobody")
    for folder in (ours, unmarked, foreign):
        os.utime(folder, (aged, aged))
    assert retention.remove_leftovers(str(shared), (manifest.RESTORE_PREFIX,)) == [".restore-ours"]
    assert sorted(os.listdir(shared)) == [".restore-photos", ".restore-theirs"]


def test_prune_leaves_a_set_it_cannot_lock(cluster, key, recipients):
    """A read-only set folder without a lock file: prune cannot know that nobody reads it,
    so it keeps it (and does not rename it into a half-deleted leftover). Run as `nobody`,
    for whom the read-only folder really is read-only."""
    dest = tempfile.mkdtemp(prefix="pgbackup-readonly-")
    try:
        older = backup.create_backup_set(dest, recipients, databases=[])["name"]
        newer = backup.create_backup_set(dest, recipients, databases=[])["name"]
        os.unlink(os.path.join(dest, older, ".lock"))
        # The core as installed on a host (root-owned, readable by all), run by that user.
        library = os.path.join(dest, ".lib")
        shutil.copytree(os.path.join(ROOT, "module_utils", "pgbackup"), os.path.join(library, "pgbackup"))
        subprocess.run(["chmod", "-R", "a+rX", library], check=True)
        subprocess.run(["chown", "-R", "nobody", dest], check=True)
        os.chmod(os.path.join(dest, older), 0o555)
        result = subprocess.run(
            [
                "runuser",
                "-u",
                "nobody",
                "--",
                "/usr/bin/python3",
                "-m",
                "pgbackup",
                "prune",
                "--dest",
                dest,
                "--keep-days",
                "0",
                "--min-keep",
                "1",
                "--json",
            ],
            env={**os.environ, "PYTHONPATH": library},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["held"] == [older] and report["removed"] == []
        assert sorted(os.listdir(dest)) == sorted([".lib", older, newer])
    finally:
        os.chmod(os.path.join(dest, older), 0o755)
        shutil.rmtree(dest)


def test_a_file_given_as_the_set_is_one_clear_line(tmp_path, key_file):
    afile = tmp_path / "notes.txt"
    afile.write_text("not a set")
    for command in (["verify"], ["restore-base", "--target-dir", str(tmp_path / "t")]):
        result = run_cli(command[0], str(afile), "--key-file", key_file, *command[1:])
        assert result.returncode == 1
        assert result.stderr == f"pgbackup: error: {afile} is a file, not a backup set folder\n"
