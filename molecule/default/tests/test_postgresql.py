"""The live server on one node: settings in force, TLS and scram-sha-256 only."""

import re
import time

import pytest

testinfra_hosts = ["postgresql"]


@pytest.fixture(scope="module")
def lab_vars(host):
    return host.ansible.get_variables()


def sql(host, query):
    """Run a query as the postgres OS user over the Unix socket (peer auth)."""
    result = host.run("runuser -u postgres -- psql -XAtq -c %s", query)
    assert result.rc == 0, result.stderr
    return result.stdout.strip()


def tcp_login(host, user, password, conninfo, query="SELECT 1"):
    return host.run(
        "PGPASSWORD=%s psql -XAtq %s -c %s",
        password,
        f"user={user} dbname=postgres connect_timeout=5 {conninfo}",
        query,
    )


def test_service_is_running_and_enabled(host):
    service = host.service("postgresql@15-main")
    assert service.is_running
    assert service.is_enabled


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("archive_mode", "on"),
        ("wal_level", "replica"),
        ("ssl", "on"),
        ("password_encryption", "scram-sha-256"),
        ("data_checksums", "on"),
        ("archive_timeout", "1min"),
        ("log_connections", "on"),
        ("log_checkpoints", "on"),
        ("hot_standby", "on"),
    ],
)
def test_setting_is_live(host, setting, expected):
    assert sql(host, f"SHOW {setting}") == expected


def test_no_setting_waits_for_a_restart(host):
    assert sql(host, "SELECT count(*) FROM pg_settings WHERE pending_restart") == "0"


def test_hba_has_no_trust_or_md5(host):
    rules = sql(host, "SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE error IS NULL")
    assert set(rules.split()) <= {"scram-sha-256", "peer", "reject"}
    assert sql(host, "SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL") == "0"


def test_roles_store_scram_verifiers(host, lab_vars):
    for user in ("dba", "replicator", "pgbackup"):
        verifier = sql(host, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'")
        assert verifier.startswith("SCRAM-SHA-256$"), user


def test_scram_login_over_verified_tls_works(host, lab_vars):
    result = tcp_login(
        host,
        "pgbackup",
        lab_vars["postgresql_backup_password"],
        "host=localhost sslmode=verify-full sslrootcert=/etc/postgresql/ssl/server.crt",
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    assert result.rc == 0, result.stderr
    assert result.stdout.strip() == "t"


def test_superusers_log_in_over_the_local_socket_only(host, lab_vars):
    password = lab_vars["postgresql_admin_password"]
    over_tcp = tcp_login(
        host, "dba", password, "host=localhost sslmode=verify-full sslrootcert=/etc/postgresql/ssl/server.crt"
    )
    assert over_tcp.rc != 0
    assert "rejects connection" in over_tcp.stderr
    over_socket = tcp_login(host, "dba", password, "host=/var/run/postgresql")
    assert over_socket.rc == 0, over_socket.stderr


def test_superusers_and_the_backup_role_cannot_replicate_or_log_in_from_the_network(host, lab_vars):
    """From the node's own network address (samenet), not loopback (TLS without the name
    check: the point here is pg_hba, not the certificate)."""
    address = host.check_output("hostname -I").split()[0]
    assert not address.startswith("127.")
    tls = f"host={address} sslmode=require"
    for user, password in (
        ("dba", lab_vars["postgresql_admin_password"]),
        ("pgbackup", lab_vars["postgresql_backup_password"]),
    ):
        for database in ("dbname=postgres", "dbname=replication replication=true"):
            refused = tcp_login(host, user, password, f"{tls} {database}", "IDENTIFY_SYSTEM")
            assert refused.rc != 0, (user, database)
            assert re.search(r"pg_hba.conf rejects (replication )?connection", refused.stderr), refused.stderr
    # The replication role still streams from the network: standbys need it.
    streams = tcp_login(
        host,
        "replicator",
        lab_vars["postgresql_replication_password"],
        f"{tls} dbname=replication replication=true",
        "IDENTIFY_SYSTEM",
    )
    assert streams.rc == 0, streams.stderr


def test_login_without_tls_is_refused(host, lab_vars):
    result = tcp_login(
        host, "pgbackup", lab_vars["postgresql_backup_password"], "host=127.0.0.1 sslmode=disable"
    )
    assert result.rc != 0
    assert "no encryption" in result.stderr


def test_wrong_password_is_refused(host):
    result = tcp_login(host, "pgbackup", "not-the-password", "host=127.0.0.1 sslmode=require")
    assert result.rc != 0
    assert "password authentication failed" in result.stderr


def test_legacy_md5_password_cannot_log_in(host):
    # A role whose stored password is an md5 hash cannot pass scram-sha-256.
    sql(host, "DROP ROLE IF EXISTS legacy_md5")
    sql(host, "SET password_encryption = 'md5'; CREATE ROLE legacy_md5 LOGIN PASSWORD 'legacy-password'")
    try:
        assert sql(host, "SELECT rolpassword FROM pg_authid WHERE rolname = 'legacy_md5'").startswith("md5")
        result = tcp_login(host, "legacy_md5", "legacy-password", "host=127.0.0.1 sslmode=require")
        assert result.rc != 0
        assert "password authentication failed" in result.stderr
    finally:
        sql(host, "DROP ROLE legacy_md5")


def _archived(host, segment: str) -> str:
    system = sql(host, "SELECT system_identifier FROM pg_control_system()")
    return f"/var/backups/postgresql/wal/{system}/{segment[:16]}/{segment}.enc"


def test_completed_wal_segments_are_archived_encrypted(host):
    before = int(sql(host, "SELECT archived_count FROM pg_stat_archiver"))
    segment = sql(
        host,
        "CREATE TABLE IF NOT EXISTS archive_probe(x text); INSERT INTO archive_probe VALUES ('plain-probe-text');"
        " SELECT pg_walfile_name(pg_switch_wal())",
    ).splitlines()[-1]
    archived = host.file(_archived(host, segment))
    deadline = time.monotonic() + 30
    while not archived.exists and time.monotonic() < deadline:
        time.sleep(1)
    assert archived.exists, f"{segment} was not archived within 30 s"
    assert archived.user == "postgres" and archived.mode == 0o600
    assert host.run("head -c 8 %s", archived.path).stdout == "PGBACKUP"
    assert host.run("grep -c plain-probe-text %s", archived.path).stdout.strip() == "0"
    assert int(sql(host, "SELECT archived_count FROM pg_stat_archiver")) > before
    assert sql(host, "SELECT failed_count FROM pg_stat_archiver") == "0"


def test_archive_refuses_to_overwrite_a_segment_with_other_content(host):
    # The archive_command must fail (so PostgreSQL retries) rather than overwrite: a copy
    # of the current segment taken before it is full differs from what gets archived.
    segment = sql(host, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    copy = host.run(
        "runuser -u postgres -- sh -c 'mkdir -p /tmp/early && cp /var/lib/postgresql/15/main/pg_wal/%s /tmp/early/'",
        segment,
    )
    assert copy.rc == 0, copy.stderr
    sql(host, "INSERT INTO archive_probe VALUES ('more'); SELECT pg_switch_wal()")
    archived = host.file(_archived(host, segment))
    deadline = time.monotonic() + 30
    while not archived.exists and time.monotonic() < deadline:
        time.sleep(1)
    before = host.run("sha256sum %s", archived.path).stdout
    early = host.run(
        "runuser -u postgres -- sh -c 'cd /var/lib/postgresql/15/main && /usr/local/bin/pgbackup wal-push /tmp/early/%s'",
        segment,
    )
    assert early.rc != 0
    assert "other content" in early.stderr and "nothing was overwritten" in early.stderr
    assert host.run("sha256sum %s", archived.path).stdout == before


def test_private_key_is_private(host):
    key = host.file("/etc/postgresql/ssl/server.key")
    assert key.user == "postgres"
    assert key.mode == 0o600
