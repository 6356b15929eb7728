"""Point-in-time recovery as an operator runs it: playbooks/restore.yml against a server
whose WAL pgbackup archives (encrypted, copied off-site). The tests run in order: each
restore starts from what the one before left, as on a bad day."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

testinfra_hosts = ["pg-pitr-1"]

HOST = "pg-pitr-1"
BACKUP_DIR = "/var/backups/postgresql"
DATA_DIR = "/var/lib/postgresql/15/main"
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
AS_CRON = (
    "runuser -u postgres -- env -i PATH=/usr/bin:/bin HOME=/var/lib/postgresql SHELL=/bin/sh LOGNAME=postgres"
)
BATCH_ROWS = 1000


def psql(host, query):
    result = host.run("runuser -u postgres -- psql -XAtq -v ON_ERROR_STOP=1 -c %s", query)
    assert result.rc == 0, result.stderr
    return result.stdout.strip()


def batches(host) -> dict:
    rows = psql(host, "SELECT batch, count(*) FROM events GROUP BY batch ORDER BY batch")
    return {int(batch): int(count) for batch, count in (line.split("|") for line in rows.splitlines())}


def timeline(host) -> int:
    return int(psql(host, "SELECT timeline_id FROM pg_control_checkpoint()"))


def has_table(host, name) -> bool:
    return psql(host, f"SELECT to_regclass('{name}') IS NOT NULL") == "t"


class Done:
    """A finished ansible-playbook: its exit code, and its output on one line (results
    are printed as JSON, whose long messages stay whole)."""

    def __init__(self, completed: subprocess.CompletedProcess):
        self.returncode = completed.returncode
        self.output = " ".join((completed.stdout + completed.stderr).split())


def ansible(path, *extra, timeout=900) -> Done:
    completed = subprocess.run(  # noqa: PLW1510 - callers check the exit code
        [
            os.path.join(os.path.dirname(sys.executable), "ansible-playbook"),
            "-i",
            os.environ["MOLECULE_INVENTORY_FILE"],
            path,
            "--limit",
            HOST,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPOSITORY,
        env={**os.environ, "ANSIBLE_CALLBACK_RESULT_FORMAT": "json"},
    )
    return Done(completed)


def restore(*extra, label: str, **variables) -> Done:
    """playbooks/restore.yml in pitr mode with these variables; prints the RTO it reports."""
    done = ansible(
        os.path.join(REPOSITORY, "playbooks", "restore.yml"),
        "-e",
        json.dumps({"restore_mode": "pitr", **variables}),
        *extra,
    )
    found = re.search(r"restore done in ([0-9.]+) s", done.output)
    print(f"\nRTO {label}: {found.group(1) if found else 'n/a'} s (restore.yml, rc {done.returncode})")
    return done


def wait_archived(host):
    """Close the current segment and wait (bounded) until the archiver has it."""
    segment = psql(host, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    psql(host, "SELECT pg_switch_wal()")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        last = psql(host, "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
        if last >= segment:
            assert psql(host, "SELECT failed_count FROM pg_stat_archiver") == "0"
            return segment
        time.sleep(1)
    raise AssertionError(f"{segment} not archived within 60 s")


def run(host, kind):
    result = host.run(f"{AS_CRON} /usr/local/bin/pgbackup run {kind}")
    assert result.rc == 0, result.stdout + result.stderr
    return result


def no_key_left(host) -> bool:
    return host.run("ls -d /run/pgbackup-restore-keys").rc != 0


def untouched(host, before: dict):
    assert psql(host, "SELECT pg_is_in_recovery()") == "f"
    assert batches(host) == before["batches"] and timeline(host) == before["timeline"]
    assert no_key_left(host)
    assert not host.file("/etc/postgresql/15/main/conf.d/90-pgbackup-recovery.conf").exists


@pytest.fixture(scope="module")
def history(host):
    """A base backup, then three batches with a restore point after each, the mistake
    (a dropped table) between batches two and three, every segment archived and off-site."""
    psql(host, "CREATE TABLE events (batch int, n int, at timestamptz DEFAULT clock_timestamp())")
    psql(host, "CREATE TABLE precious AS SELECT g FROM generate_series(1, 500) g")
    run(host, "physical")
    segments, marks = {}, {}
    for batch in (1, 2, 3):
        time.sleep(1)
        if batch == 3:
            marks["before_drop"] = psql(host, "SELECT clock_timestamp()")
            time.sleep(1)
            psql(host, "DROP TABLE precious")
        psql(host, f"INSERT INTO events (batch, n) SELECT {batch}, g FROM generate_series(1, {BATCH_ROWS}) g")
        psql(host, f"SELECT pg_create_restore_point('after_batch_{batch}')")
        segments[batch] = wait_archived(host)
    run(host, "logical")  # a dump too, copied off-site like the base backup
    run(host, "wal")
    assert batches(host) == {1: BATCH_ROWS, 2: BATCH_ROWS, 3: BATCH_ROWS}
    return {"segments": segments, **marks}


def test_the_archive_is_off_site_and_its_lag_is_reported(host, history):
    offsite = host.get_host("docker://offsite-pitr-1")
    system = psql(host, "SELECT system_identifier FROM pg_control_system()")
    remote = offsite.run("find /srv/offsite/pg-pitr-1/wal/%s -name '*.enc'", system).stdout.split()
    assert any(history["segments"][3] in path for path in remote)
    metrics = host.file("/var/lib/pgbackup/metrics/pgbackup_wal.prom").content_string
    values = dict(line.split() for line in metrics.splitlines() if not line.startswith("#"))
    assert values['pgbackup_last_run_status{kind="wal"}'] == "0"
    assert values['pgbackup_last_status{kind="wal",repository="offsite"}'] == "0"
    synced = float(values["pgbackup_wal_offsite_synced_through_timestamp_seconds"])
    newest = float(values["pgbackup_wal_newest_archived_timestamp_seconds"])
    assert newest > 0 and synced == newest
    print(
        f"\nWAL off-site: synced through the newest archived file; {values['pgbackup_wal_archive_files']} files"
    )


def test_check_mode_prints_the_plan_and_changes_nothing(host, history):
    before = {"batches": batches(host), "timeline": timeline(host)}
    done = restore("--check", label="check mode", restore_target="latest", restore_confirm=True)
    assert done.returncode == 0, done.output
    assert "check mode: nothing was changed" in done.output
    assert "base backup: physical-" in done.output
    untouched(host, before)


def test_a_restore_without_confirmation_changes_nothing(host, history):
    before = {"batches": batches(host), "timeline": timeline(host)}
    done = restore(label="unconfirmed", restore_target="latest")
    assert done.returncode != 0
    assert "restore_confirm=true" in done.output
    untouched(host, before)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ({"restore_target_time": "2000-01-01 00:00:00+00"}, "before the earliest base backup ends"),
        ({"restore_target_time": "2099-01-01 00:00:00+00"}, "after the last commit in the archive"),
        ({"restore_target_name": "no_such_point"}, "no restore point named no_such_point"),
    ],
)
def test_unreachable_targets_fail_naming_the_window_and_touch_nothing(host, history, target, reason):
    before = {"batches": batches(host), "timeline": timeline(host)}
    done = restore(label=f"refused ({reason})", restore_confirm=True, **target)
    assert done.returncode != 0
    assert reason in done.output and "reachable: from" in done.output
    untouched(host, before)


def test_a_missing_segment_fails_naming_it_and_touches_nothing(host, history):
    before = {"batches": batches(host), "timeline": timeline(host)}
    missing = history["segments"][2]
    path = host.check_output("find %s/wal -name %s.enc", BACKUP_DIR, missing)
    host.run("mv %s %s.aside", path, path)
    try:
        done = restore(
            label="refused (gap)", restore_target_time=history["before_drop"], restore_confirm=True
        )
    finally:
        host.run("mv %s.aside %s", path, path)
    assert done.returncode != 0
    assert f"segment {missing} is missing" in done.output
    untouched(host, before)


def test_restore_to_just_before_the_drop(host, history):
    done = restore(label="before the drop", restore_target_time=history["before_drop"], restore_confirm=True)
    assert done.returncode == 0, done.output
    assert batches(host) == {1: BATCH_ROWS, 2: BATCH_ROWS}
    assert has_table(host, "precious") and psql(host, "SELECT count(*) FROM precious") == "500"
    assert timeline(host) == 2
    assert psql(host, "SELECT pg_is_in_recovery()") == "f"
    psql(host, "CREATE TABLE written_after_recovery (x int)")  # open for writes
    kept = host.run("ls -d %s.pre-pitr-*", DATA_DIR).stdout.split()
    assert len(kept) == 1 and host.file(f"{kept[0]}/PG_VERSION").exists
    assert no_key_left(host)
    assert not host.file("/etc/postgresql/15/main/conf.d/90-pgbackup-recovery.conf").exists


def test_restore_to_the_end_of_the_original_timeline_brings_every_row_back(host, history):
    done = restore(label="latest", restore_target="latest", restore_target_timeline=1, restore_confirm=True)
    assert done.returncode == 0, done.output
    assert batches(host) == {1: BATCH_ROWS, 2: BATCH_ROWS, 3: BATCH_ROWS}
    assert not has_table(host, "precious")  # dropped on timeline 1, as it was
    assert timeline(host) == 3
    assert no_key_left(host)


def test_a_recovery_that_fails_midway_puts_the_old_data_directory_back(host, history):
    before = {"batches": batches(host), "timeline": timeline(host)}
    damaged = history["segments"][2]
    path = host.check_output("find %s/wal -name %s.enc", BACKUP_DIR, damaged)
    host.run("cp -p %s /root/segment.orig", path)
    host.run(
        "python3 -c %s %s",
        "import sys; f = open(sys.argv[1], 'r+b'); f.seek(-5000, 2); b = f.read(1); f.seek(-5000, 2);"
        " f.write(bytes([b[0] ^ 1]))",
        path,
    )
    try:
        done = restore(
            label="failed midway", restore_target="latest", restore_target_timeline=1, restore_confirm=True
        )
    finally:
        host.run("cp -p /root/segment.orig %s", path)
    assert done.returncode != 0
    assert "Point-in-time recovery failed" in done.output
    assert "previous data directory is back" in done.output
    untouched(host, before)
    assert host.run("ls -d %s.failed-pitr-*", DATA_DIR).rc == 0


def test_a_lost_host_comes_back_from_the_off_site_copy_alone(host, history):
    psql(host, "CREATE TABLE last_words AS SELECT 'archived before the loss'::text AS note")
    wait_archived(host)
    run(host, "wal")  # the archive's off-site copy, as cron makes it every few minutes
    # The host loses its cluster, its backups and its archive; site.yml makes a new one.
    assert host.run("pg_dropcluster --stop 15 main").rc == 0
    host.run(f"rm -rf {BACKUP_DIR}/* {BACKUP_DIR}/.[!.]* {DATA_DIR}.pre-pitr-* {DATA_DIR}.failed-pitr-*")
    converged = ansible(os.path.join(REPOSITORY, "site.yml"))
    assert converged.returncode == 0, converged.output[-3000:]
    assert not has_table(host, "events")
    done = restore(
        label="lost host, from off-site",
        restore_source="offsite",
        restore_target="latest",
        restore_confirm=True,
    )
    assert done.returncode == 0, done.output
    assert batches(host) == {1: BATCH_ROWS, 2: BATCH_ROWS, 3: BATCH_ROWS}
    assert psql(host, "SELECT note FROM last_words") == "archived before the loss"
    assert no_key_left(host)
    # The logical mode, from the off-site copy too: the night's dump beside the server.
    logical = ansible(
        os.path.join(REPOSITORY, "playbooks", "restore.yml"),
        "-e",
        json.dumps(
            {
                "restore_source": "offsite",
                "restore_databases": ["postgres"],
                "restore_target_db": "postgres_from_dump",
            }
        ),
    )
    assert logical.returncode == 0, logical.output
    count = host.run(
        "runuser -u postgres -- psql -XAtq -d postgres_from_dump -c 'SELECT count(*) FROM events'"
    )
    assert count.stdout.strip() == str(3 * BATCH_ROWS)
    assert no_key_left(host)
