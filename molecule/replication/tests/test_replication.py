"""A primary and a hot standby (the replication role), checked as an operator would:
rows reach the standby, it refuses writes, the lag is visible, commits wait for it when
asked to, and site.yml rebuilds a broken standby but never a promoted one."""

import os
import sys
import time
import uuid

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "_shared")
)
from lab import AS_CRON, lab_variable, playbook, psql

testinfra_hosts = ["docker://pg-repl-1"]

DATA_DIR = "/var/lib/postgresql/15/main"
# The PostgreSQL play of site.yml (the backup play is not what these tests are about).
SITE = "playbooks/postgresql.yml"


@pytest.fixture(scope="module")
def standby(host):
    return host.get_host("docker://pg-repl-2")


def wait_for(check, seconds, what):
    """Poll check() until it is true, at most `seconds`; the time it took."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if check():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {seconds} s")


def streaming(standby) -> bool:
    result = standby.run("runuser -u postgres -- psql -XAtq -c 'SELECT status FROM pg_stat_wal_receiver'")
    return result.rc == 0 and result.stdout.strip() == "streaming"


def write_and_wait(host, standby) -> tuple[str, float]:
    """A new row on the primary; the seconds until the standby returns it."""
    mark = uuid.uuid4().hex
    psql(host, "CREATE TABLE IF NOT EXISTS marks (mark text PRIMARY KEY, at timestamptz DEFAULT now())")
    psql(host, f"INSERT INTO marks (mark) VALUES ('{mark}')")
    took = wait_for(
        lambda: psql(standby, f"SELECT count(*) FROM marks WHERE mark = '{mark}'") == "1",
        30,
        f"row {mark} on the standby",
    )
    return mark, took


def test_a_row_written_on_the_primary_is_read_on_the_standby(host, standby):
    _, took = write_and_wait(host, standby)
    print(f"\nrow visible on the standby {took * 1000:.0f} ms after the commit")


def test_the_standby_refuses_writes(standby):
    result = standby.run(
        "runuser -u postgres -- psql -XAtq -c %s", "INSERT INTO marks (mark) VALUES ('nope')"
    )
    assert result.rc != 0
    assert "read-only transaction" in result.stderr
    assert psql(standby, "SELECT pg_is_in_recovery()") == "t"


def test_lag_is_reported_on_both_sides(host, standby):
    write_and_wait(host, standby)
    row = psql(
        host,
        "SELECT application_name, state, sync_state, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), "
        "coalesce(extract(epoch FROM replay_lag), 0) FROM pg_stat_replication",
    )
    name, state, sync_state, lag_bytes, lag_seconds = row.split("|")
    assert (name, state, sync_state) == ("pg-repl-2", "streaming", "async")
    assert int(lag_bytes) >= 0 and float(lag_seconds) < 10
    delay = psql(standby, "SELECT coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)")
    print(
        f"\nlag: {lag_bytes} bytes, replay lag {float(lag_seconds) * 1000:.0f} ms; standby replay delay {delay} s"
    )


def test_the_standby_streams_over_verified_tls_through_its_slot(host, standby):
    assert (
        psql(host, "SELECT bool_and(s.ssl) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)") == "t"
    )
    assert psql(host, "SELECT active FROM pg_replication_slots WHERE slot_name = 'pg_repl_2'") == "t"
    conninfo = psql(standby, "SHOW primary_conninfo")
    assert "sslmode='verify-full'" in conninfo and "passfile=" in conninfo
    password = lab_variable("postgresql_replication_password")
    assert password not in conninfo
    assert password not in standby.run("ps -eo args").stdout
    assert password not in standby.run("cat /var/lib/postgresql/15/main/postgresql.auto.conf").stdout
    passfile = standby.file("/var/lib/postgresql/.pgpass-replication")
    assert passfile.user == "postgres" and passfile.mode == 0o600


def test_the_scheduled_backup_runs_on_the_primary_only(host, standby):
    on_standby = standby.run(f"{AS_CRON} /usr/local/bin/pgbackup run logical")
    assert on_standby.rc == 0, on_standby.stderr
    assert "standby" in standby.file("/var/log/pgbackup/pgbackup.log").content_string
    assert standby.run("ls /var/backups/postgresql | grep -c logical").stdout.strip() in ("", "0")
    on_primary = host.run(f"{AS_CRON} /usr/local/bin/pgbackup run logical")
    assert on_primary.rc == 0, on_primary.stderr
    assert int(host.run("ls /var/backups/postgresql | grep -c logical").stdout) == 1


def test_synchronous_commits_wait_for_the_standby_when_asked(host, standby):
    done = playbook(SITE, variables={"replication_synchronous": True}, timeout=600)
    try:
        assert done.returncode == 0, done.output
        assert psql(host, "SHOW synchronous_standby_names") == 'ANY 1 ("pg-repl-2")'
        assert psql(host, "SELECT sync_state FROM pg_stat_replication") == "quorum"
        standby.run("systemctl stop postgresql@15-main")
        # With the standby gone, a commit does not return (bounded by `timeout`)...
        waited = host.run(
            "timeout 5 runuser -u postgres -- psql -XAtq -c \"INSERT INTO marks (mark) VALUES ('waits')\""
        )
        assert waited.rc == 124, waited.stdout + waited.stderr
        # ...until the standby is back and has it.
        standby.run("systemctl start postgresql@15-main")
        wait_for(
            lambda: psql(standby, "SELECT count(*) FROM marks WHERE mark = 'waits'") == "1",
            60,
            "the waiting row",
        )
    finally:
        standby.run("systemctl start postgresql@15-main")
        back = playbook(SITE, timeout=600)
    assert back.returncode == 0, back.output
    assert psql(host, "SHOW synchronous_standby_names") == ""


def test_a_standby_with_an_emptied_data_directory_is_rebuilt(host, standby):
    standby.run("systemctl stop postgresql@15-main")
    standby.run(f"rm -rf {DATA_DIR}")
    done = playbook(SITE, timeout=600)
    assert done.returncode == 0, done.output
    assert streaming(standby)
    write_and_wait(host, standby)
    again = playbook(SITE, timeout=600)
    assert again.returncode == 0 and again.changed() == 0, again.output


def test_a_standby_host_holding_another_servers_data_is_refused(host, standby):
    """Put in the standby group by mistake: a server of its own, with a table in the
    postgres database (as small as the package's empty cluster otherwise)."""
    standby.run("systemctl stop postgresql@15-main")
    standby.run(f"mv {DATA_DIR} {DATA_DIR}.test-aside")
    try:
        made = standby.run(f"runuser -u postgres -- /usr/lib/postgresql/15/bin/initdb -D {DATA_DIR}")
        assert made.rc == 0, made.stderr
        standby.run("systemctl start postgresql@15-main")
        psql(standby, "CREATE TABLE precious (id int)")
        refused = playbook(SITE, timeout=600)
        assert refused.returncode != 0
        assert "another server, with data" in refused.output
        assert psql(standby, "SELECT to_regclass('precious') IS NOT NULL") == "t"
    finally:
        standby.run("systemctl stop postgresql@15-main")
        standby.run(f"rm -rf {DATA_DIR} && mv {DATA_DIR}.test-aside {DATA_DIR}")
        standby.run("systemctl start postgresql@15-main")
    wait_for(lambda: streaming(standby), 60, "the standby streaming again")


def test_a_promoted_standby_is_never_overwritten_unless_asked(host, standby):
    psql(standby, "SELECT pg_promote()")
    wait_for(lambda: psql(standby, "SELECT pg_is_in_recovery()") == "f", 30, "promotion")
    psql(standby, "CREATE TABLE only_on_the_promoted (id int)")
    refused = playbook(SITE, timeout=600)
    assert refused.returncode != 0
    assert "was promoted" in refused.output
    assert psql(standby, "SELECT to_regclass('only_on_the_promoted') IS NOT NULL") == "t"

    rebuilt = playbook(SITE, variables={"replication_replace_data": True}, timeout=600)
    assert rebuilt.returncode == 0, rebuilt.output
    assert streaming(standby)
    assert psql(standby, "SELECT to_regclass('only_on_the_promoted') IS NULL") == "t"
    kept = standby.run(f"ls -d {DATA_DIR}.replaced-*").stdout.split()
    assert len(kept) == 1 and standby.file(f"{kept[0]}/PG_VERSION").exists
    write_and_wait(host, standby)
