"""The scheduled backup, run as cron runs it, checked the way an operator would."""

import contextlib
import json
import os
import re
import subprocess
import sys

import pytest

testinfra_hosts = ["pg-backup-1"]

BACKUP_DIR = "/var/backups/postgresql"
LOG = "/var/log/pgbackup/pgbackup.log"
METRICS = "/var/lib/pgbackup/metrics/pgbackup_logical.prom"
RECIPIENTS = "/etc/pgbackup/recipients"
# Where format version 1 kept its symmetric key (prepare.yml plants one, as on an upgraded host).
VERSION1_KEY = "/etc/pgbackup/backup.key"
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SETTINGS = "/etc/pgbackup/run.json"
RUN_LOCK = f"{BACKUP_DIR}/.run.lock"
# cron's environment: a bare PATH, no terminal.
AS_CRON = (
    "runuser -u postgres -- env -i PATH=/usr/bin:/bin HOME=/var/lib/postgresql SHELL=/bin/sh LOGNAME=postgres"
)


@pytest.fixture(scope="module")
def offsite(host):
    return host.get_host("docker://offsite-1")


@pytest.fixture(scope="module")
def password(host):
    return host.ansible.get_variables()["postgresql_backup_password"]


def psql(host, query, db="postgres"):
    result = host.run("runuser -u postgres -- psql -XAtq -d %s -c %s", db, query)
    assert result.rc == 0, result.stderr
    return result.stdout.strip()


def scheduled_run(host, kind="logical", settings=None):
    """The run as cron runs it; settings stands in for /etc/pgbackup/run.json."""
    chosen = f" --settings {settings}" if settings else ""
    return host.run(f"{AS_CRON} /usr/local/bin/pgbackup run {kind}{chosen}")


def edit_settings(host, source, target, **changes):
    """A copy of the run's settings with some values changed (nested dicts merged)."""
    result = host.run(
        "python3 -c %s %s %s %s",
        "import json, sys\n"
        "settings = json.load(open(sys.argv[1]))\n"
        "for name, value in json.loads(sys.argv[3]).items():\n"
        "    if isinstance(value, dict): settings[name].update(value)\n"
        "    else: settings[name] = value\n"
        "json.dump(settings, open(sys.argv[2], 'w'))\n",
        source,
        target,
        json.dumps(changes),
    )
    assert result.rc == 0, result.stderr
    host.run("chown root:postgres %s && chmod 0640 %s", target, target)


def complete_sets(host):
    listed = host.run("runuser -u postgres -- pgbackup list --dest %s --json", BACKUP_DIR)
    assert listed.rc == 0, listed.stderr
    return [entry for entry in json.loads(listed.stdout) if entry["status"] == "complete"]


LOGICAL_STATUS = 'pgbackup_last_run_status{kind="logical"}'


def metric(host, name, path=METRICS):
    """A series' value; name as the file writes it: name{label="value",...}."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", host.file(path).content_string, re.MULTILINE)
    assert match, f"{name} missing from {path}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def first_run(host):
    """Seed a database big enough that pg_dump runs for a moment, then run the backup once
    as cron would, sampling `ps` during the run."""
    host.run("rm -rf %s/* %s/.partial-*", BACKUP_DIR, BACKUP_DIR)
    host.run("runuser -u postgres -- truncate -s 0 %s", LOG)
    psql(host, "DROP DATABASE IF EXISTS streaming")
    psql(host, "CREATE DATABASE streaming")
    psql(
        host,
        "CREATE TABLE watch_history AS SELECT g AS id, gen_random_uuid() AS user_id, md5(g::text) AS title,"
        " now() - g * interval '1 second' AS started_at FROM generate_series(1, 1500000) g",
        db="streaming",
    )
    run = host.run(
        f"( {AS_CRON} /usr/local/bin/pgbackup run logical > /tmp/run.out 2>&1; echo $? > /tmp/run.rc ) &"
        " for i in $(seq 1 600); do ps -eo args >> /tmp/ps.samples; [ -s /tmp/run.rc ] && break; sleep 0.05; done;"
        " wait; cat /tmp/run.rc"
    )
    samples = host.file("/tmp/ps.samples").content_string
    output = host.file("/tmp/run.out").content_string
    host.run("rm -f /tmp/ps.samples /tmp/run.rc /tmp/run.out")
    return {"rc": int(run.stdout.strip().splitlines()[-1]), "ps": samples, "output": output}


def test_scheduled_run_succeeds(host, first_run):
    assert first_run["rc"] == 0, (first_run["output"], host.file(LOG).content_string)


def test_a_complete_set_with_a_manifest_exists(host, first_run):
    sets = complete_sets(host)
    assert len(sets) == 1
    assert set(sets[0]["databases"]) == {"postgres", "streaming"}
    assert host.file(f"{sets[0]['path']}/manifest.json").exists


@pytest.fixture(scope="module")
def private_keys(host):
    """The lab's private keys, as the vault holds them: the operations key, and the escrow
    key kept apart. Neither is ever installed by site.yml."""
    variables = host.ansible.get_variables()
    return {"ops": variables["backup_private_keys"][0], "escrow": variables["lab_escrow_private_key"]}


def unlogged(host, user="root"):
    """The host through `docker exec`: the commands that carry a lab private key go this
    way, because Ansible (testinfra's usual way in) logs every command it runs to the
    journal, as PAM does the command line of runuser, and the test that searches the
    host for keys would find the tests' own."""
    return host.get_host(f"docker://{user}@pg-backup-1")


@contextlib.contextmanager
def key_on_tmpfs(host, key_text):
    """A private key on the host for one check, as the restore playbook installs it."""
    direct = unlogged(host)
    direct.run("install -d -m 0700 -o postgres /run/pgbackup-test-key")
    direct.run(
        "printf '%%s\\n' %s | install -m 0400 -o postgres /dev/stdin /run/pgbackup-test-key/one.key", key_text
    )
    try:
        yield "/run/pgbackup-test-key/one.key"
    finally:
        direct.run("rm -rf /run/pgbackup-test-key")


def test_the_host_checks_each_set_without_a_key_and_either_private_key_decrypts_it(
    host, first_run, private_keys
):
    path = complete_sets(host)[0]["path"]
    checked = host.run("runuser -u postgres -- pgbackup verify %s", path)
    assert checked.rc == 0, checked.stderr
    assert "structure, sizes and hashes; decrypting needs the private key of" in checked.stdout
    for name, key_text in private_keys.items():
        with key_on_tmpfs(host, key_text) as key_file:
            result = host.run("runuser -u postgres -- pgbackup verify %s --key-file %s", path, key_file)
        assert result.rc == 0, (name, result.stderr)
        assert "decrypted and authenticated" in result.stdout


def playbook(name, *extra):
    """A playbook of playbooks/ as an operator runs it, from the controller."""
    return subprocess.run(  # noqa: PLW1510 - callers check the exit code
        [
            os.path.join(os.path.dirname(sys.executable), "ansible-playbook"),
            "-i",
            os.environ["MOLECULE_INVENTORY_FILE"],
            os.path.join(REPOSITORY, "playbooks", name),
            "--limit",
            "pg-backup-1",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPOSITORY,
    )


def no_key_left(host):
    return host.run("ls -d /run/pgbackup-restore-keys /run/pgbackup-restore-keys-ansible").rc != 0


def test_the_restore_playbook_restores_a_set_and_takes_its_key_away(host, first_run, private_keys):
    request = json.dumps({"restore_databases": ["streaming"], "restore_target_db": "streaming_check"})
    done = playbook("restore.yml", "-e", request)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert psql(host, "SELECT count(*) FROM watch_history", db="streaming_check") == "1500000"
        assert no_key_left(host)
        for key_text in private_keys.values():
            assert key_text.split()[-1] not in done.stdout + done.stderr
        # Again onto the database that now exists, without restore_force: refused, and the key still goes.
        refused = playbook("restore.yml", "-e", request)
        assert refused.returncode != 0
        assert "exists and is not empty" in refused.stdout + refused.stderr
        assert no_key_left(host)
    finally:
        psql(host, "DROP DATABASE IF EXISTS streaming_check")


def test_no_file_on_the_host_decrypts_a_set(host, first_run, private_keys):
    """What a SQL superuser (pg_read_file, COPY TO PROGRAM: the postgres OS user) or a
    shell as postgres can read holds no private key, and no version 1 key is left."""
    assert not host.file(VERSION1_KEY).exists, "the version 1 key of an upgraded host must be removed"
    for key_text in private_keys.values():
        material = key_text.split()[-1]
        found = unlogged(host, "postgres").run(
            "grep -rlsF %s /etc /var /srv /opt /home /root /tmp /run /usr/local /mnt",
            material,
        )
        assert found.stdout == "", found.stdout
        # Nor anywhere at all, whoever may read it (the restore playbook removed its copy).
        everywhere = unlogged(host).run(
            "grep -rlsF %s / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev", material
        )
        assert everywhere.stdout == "", everywhere.stdout
    readable = psql(
        host,
        "SELECT coalesce(string_agg(name, ' '), '') FROM pg_ls_dir('/etc/pgbackup') AS name"
        " WHERE name <> 'recipients' AND pg_read_file('/etc/pgbackup/' || name) LIKE '%PGBACKUP-PRIVATE-KEY%'",
    )
    assert readable == ""
    decrypting = host.run(
        "for f in $(find /etc/pgbackup /var/lib/postgresql -type f -readable); do"
        " runuser -u postgres -- pgbackup verify %s --key-file $f >/dev/null 2>&1 && echo $f; done; true",
        complete_sets(host)[0]["path"],
    )
    assert decrypting.stdout.strip() == ""


def checksums(target, folder):
    """sha256 of every file of a set folder, by relative path (the lock file is not part of a set)."""
    result = target.run("cd %s && sha256sum $(find . -type f ! -name .lock | sort)", folder)
    assert result.rc == 0, result.stderr
    return result.stdout


def test_offsite_copy_has_the_same_files_and_checksums(host, offsite, first_run):
    newest = complete_sets(host)[0]
    remote = checksums(offsite, f"/srv/offsite/pg-backup-1/{newest['name']}")
    assert checksums(host, newest["path"]) == remote
    assert "manifest.json" in remote and ".enc" in remote


def test_every_event_is_logged_and_metrics_say_success(host, first_run):
    log = host.file(LOG).content_string
    for event in (
        "run started",
        "backup written",
        "verify passed",
        "prune (logical sets",
        "off-site copy",
        "run finished",
    ):
        assert event in log, event
    assert metric(host, LOGICAL_STATUS) == 0
    assert metric(host, 'pgbackup_last_success_timestamp_seconds{kind="logical",repository="local"}') > 0
    assert metric(host, 'pgbackup_last_success_timestamp_seconds{kind="logical",repository="offsite"}') > 0
    journal = host.run("journalctl -t pgbackup-run --no-pager -q")
    assert "run finished" in journal.stdout


def test_no_password_in_the_log_or_in_ps(host, first_run, password):
    assert "pg_dump" in first_run["ps"], "ps was not sampled while pg_dump ran"
    assert password not in first_run["ps"]
    assert password not in host.file(LOG).content_string
    assert host.run("grep -rl %s /var/backups/postgresql /var/log/pgbackup", password).rc == 1


@pytest.mark.parametrize(
    ("path", "mode", "owner"),
    [
        (BACKUP_DIR, 0o700, "postgres"),
        (RECIPIENTS, 0o750, "root"),
        ("/etc/pgbackup/pgpass", 0o600, "postgres"),
        ("/var/lib/pgbackup/rclone/rclone.conf", 0o600, "postgres"),
        ("/etc/pgbackup/offsite_ed25519", 0o600, "postgres"),
    ],
)
def test_permissions(host, first_run, path, mode, owner):
    target = host.file(path)
    assert target.mode == mode
    assert target.user == owner


def test_set_files_are_private(host, first_run):
    path = complete_sets(host)[0]["path"]
    assert host.file(path).mode == 0o700
    modes = host.run("find %s -type f -printf '%%m %%p\\n'", path).stdout.split("\n")
    assert all(line.startswith("600 ") for line in modes if line), modes


def test_the_backup_verifies_a_ca_issued_certificate_by_the_hosts_name(host, first_run):
    settings = json.loads(host.file(SETTINGS).content_string)
    assert settings["connection"]["login_host"] == "pg-backup-1"
    assert settings["connection"]["login_hostaddr"] == "127.0.0.1"
    assert settings["connection"]["ssl_mode"] == "verify-full"
    assert settings["connection"]["ssl_rootcert"] == "/etc/postgresql/ssl/root.crt"
    issuer = host.run("openssl x509 -in /etc/postgresql/ssl/server.crt -noout -issuer -subject").stdout
    assert "issuer=CN = pgbackup test CA" in issuer and "subject=CN = pg-backup-1" in issuer
    checked = host.run(f"{AS_CRON} /usr/local/bin/pgbackup check --replication")
    assert checked.rc == 0, checked.stderr
    assert "over TLS" in checked.stdout and "replication connection accepted" in checked.stdout
    # The certificate is not for localhost: the self-signed path's name would be refused.
    wrong = host.run(
        f"{AS_CRON} env PGHOST=localhost PGHOSTADDR=127.0.0.1 PGPASSFILE=/etc/pgbackup/pgpass PGUSER=pgbackup"
        " PGSSLMODE=verify-full PGSSLROOTCERT=/etc/postgresql/ssl/root.crt psql -XAtq -d postgres -c 'SELECT 1'"
    )
    assert wrong.rc != 0 and "does not match host name" in wrong.stderr


def test_cron_runs_the_backup_at_two(host):
    crontab = host.run("crontab -l -u postgres").stdout
    assert re.search(r"^0 2 \* \* \* /usr/local/bin/pgbackup run logical$", crontab, re.MULTILINE), crontab
    assert not host.file("/usr/local/sbin/pgbackup-run").exists


def test_second_run_at_the_same_moment_is_refused_and_counted_as_failed(host, first_run):
    before = len(complete_sets(host))
    result = host.run(
        "runuser -u postgres -- flock %s sh -c %s",
        RUN_LOCK,
        f"{AS_CRON.replace('runuser -u postgres -- ', '')} /usr/local/bin/pgbackup run logical",
    )
    assert result.rc == 75
    assert f"another backup run holds {RUN_LOCK}" in host.file(LOG).content_string
    assert metric(host, LOGICAL_STATUS) == 1
    assert len(complete_sets(host)) == before


def test_the_run_lock_is_out_of_other_users_reach(host, first_run):
    lock = host.file(RUN_LOCK)
    assert lock.user == "postgres" and lock.mode == 0o600
    assert host.file(BACKUP_DIR).mode == 0o700
    # Another local user can neither create nor hold it.
    assert host.run("runuser -u nobody -- flock -n %s true", RUN_LOCK).rc != 0


def test_metrics_are_readable_by_the_exporter_and_backups_are_not(host, first_run):
    assert host.file(METRICS).mode == 0o644
    # The exporter runs as its own unprivileged user: `nobody` stands in for it.
    readable = host.run("runuser -u nobody -- cat %s", METRICS)
    assert readable.rc == 0 and "pgbackup_last_run_status" in readable.stdout
    assert host.run("runuser -u nobody -- ls %s", BACKUP_DIR).rc != 0
    assert host.run("runuser -u nobody -- cat /var/lib/pgbackup/rclone/rclone.conf").rc != 0


def test_prune_removes_only_what_it_should(host, first_run):
    # Fake eight older sets by copying the real one under old dates (min_keep is 3 here).
    source = complete_sets(host)[0]["path"]
    fake = {}
    for days in (10, 20, 31, 40, 50, 60, 70, 80):
        result = host.run(
            "runuser -u postgres -- python3 -c %s %s %s",
            "import datetime, json, shutil, sys\n"
            "src, days = sys.argv[1], int(sys.argv[2])\n"
            "when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days)\n"
            "dst = '/var/backups/postgresql/logical-' + when.strftime('%Y%m%dT%H%M%SZ')\n"
            "shutil.copytree(src, dst)\n"
            "manifest = json.load(open(dst + '/manifest.json'))\n"
            "manifest['started_at'] = when.strftime('%Y-%m-%dT%H:%M:%SZ')\n"
            "manifest['name'] = dst.rsplit('/', 1)[1]\n"
            "json.dump(manifest, open(dst + '/manifest.json', 'w'))\n"
            "print(dst.rsplit('/', 1)[1])",
            source,
            str(days),
        )
        assert result.rc == 0, result.stderr
        fake[days] = result.stdout.strip()
    assert scheduled_run(host).rc == 0, host.file(LOG).content_string
    names = {entry["name"] for entry in complete_sets(host)}
    for days in (10, 20):  # within 30 days
        assert fake[days] in names
    for days in (31, 40, 50, 60, 70, 80):  # past retention, and enough newer sets remain
        assert fake[days] not in names
    assert len(names) == 4  # the two real runs and the two young fakes


def test_dead_remote_fails_the_sync_but_keeps_the_local_set(host, offsite, first_run):
    before = {entry["name"] for entry in complete_sets(host)}
    offsite.run("systemctl stop ssh.socket ssh.service")
    try:
        result = scheduled_run(host)
    finally:
        offsite.run("systemctl start ssh.service")
    assert result.rc == 1
    after = complete_sets(host)
    new = [entry for entry in after if entry["name"] not in before]
    assert len(new) == 1, "the run's own set must be kept"
    assert before <= {entry["name"] for entry in after}, "no earlier set may be lost"
    verify = host.run("runuser -u postgres -- pgbackup verify %s", new[0]["path"])
    assert verify.rc == 0
    log = host.file(LOG).content_string
    assert re.search(
        r"ERR off-site copy to offsite:/srv/offsite/pg-backup-1 failed: .*; local sets are kept", log
    )
    assert metric(host, LOGICAL_STATUS) == 1


def test_database_down_fails_loudly_instead_of_skipping(host, first_run):
    host.run("systemctl stop postgresql@15-main")
    try:
        result = scheduled_run(host)
    finally:
        host.run("systemctl start postgresql@15-main")
    assert result.rc == 1
    assert "cannot tell whether this node should run the backup" in host.file(LOG).content_string
    assert metric(host, LOGICAL_STATUS) == 1


def test_weekly_physical_backup_runs_verifies_and_goes_offsite(host, offsite, first_run):
    crontab = host.run("crontab -l -u postgres").stdout
    assert re.search(r"^0 4 \* \* 0 /usr/local/bin/pgbackup run physical$", crontab, re.MULTILINE), crontab
    result = scheduled_run(host, "physical")
    assert result.rc == 0, host.file(LOG).content_string
    listed = json.loads(host.run("runuser -u postgres -- pgbackup list --dest %s --json", BACKUP_DIR).stdout)
    physical = [entry for entry in listed if entry.get("kind") == "physical"]
    assert len(physical) == 1
    verify = host.run("runuser -u postgres -- pgbackup verify %s", physical[0]["path"])
    assert verify.rc == 0, verify.stderr
    name = physical[0]["name"]
    for part in ("base.1.tar.enc", "base.2.tar.enc"):
        assert offsite.file(f"/srv/offsite/pg-backup-1/{name}/{part}").exists
    physical_metrics = "/var/lib/pgbackup/metrics/pgbackup_physical.prom"
    assert metric(host, 'pgbackup_last_run_status{kind="physical"}', physical_metrics) == 0


def test_external_drive_is_skipped_unmounted_and_filled_when_mounted(host, first_run):
    assert "external drive copy skipped: /mnt/external is not mounted" in host.file(LOG).content_string
    host.run("mkdir -p /mnt/external")
    mounted = host.run("mount -t tmpfs -o size=2g tmpfs /mnt/external && chown postgres: /mnt/external")
    assert mounted.rc == 0, mounted.stderr
    try:
        assert scheduled_run(host).rc == 0, host.file(LOG).content_string
        assert "external drive copy to /mnt/external done" in host.file(LOG).content_string
        newest = complete_sets(host)[0]
        assert checksums(host, newest["path"]) == checksums(
            host, f"/mnt/external/postgresql/{newest['name']}"
        )
    finally:
        host.run("umount /mnt/external")


STANDBY = "/var/lib/postgresql/standby-test"
STANDBY_SETTINGS = "/etc/pgbackup/standby-test.json"
STANDBY_PASSFILE = "/etc/pgbackup/standby-test.pgpass"


@pytest.fixture(scope="module")
def standby(host, first_run):
    """A real hot standby of this node's cluster, streaming from it on port 5433, and a
    settings file that points the scheduled run at it (own sets, metrics; no off-site)."""
    host.run("rm -rf %s /tmp/standby-sets /tmp/standby-metrics", STANDBY)
    cloned = host.run(
        "runuser -u postgres -- env PGHOST=pg-backup-1 PGHOSTADDR=127.0.0.1 PGUSER=pgbackup"
        " PGPASSFILE=/etc/pgbackup/pgpass PGSSLMODE=verify-full PGSSLROOTCERT=/etc/postgresql/ssl/root.crt"
        " pg_basebackup --pgdata=%s --write-recovery-conf --wal-method=stream --checkpoint=fast",
        STANDBY,
    )
    assert cloned.rc == 0, cloned.stderr
    # Configured like the primary (its conf.d: TLS, wal settings), on its own port.
    host.run(
        "printf '%%s\\n' \"include_dir = '/etc/postgresql/15/main/conf.d'\" 'port = 5433'"
        " \"hba_file = '/etc/postgresql/15/main/pg_hba.conf'\" 'archive_mode = off'"
        " \"unix_socket_directories = '/var/run/postgresql'\" > %s/postgresql.conf",
        STANDBY,
    )
    started = host.run(
        "runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D %s -l %s/log -w start", STANDBY, STANDBY
    )
    assert started.rc == 0, started.stdout + host.run("cat %s/log", STANDBY).stdout
    host.run("install -d -o postgres -m 0700 /tmp/standby-sets /tmp/standby-metrics")
    # libpq matches passfile lines by port too.
    host.run(
        "install -o postgres -m 0600 /dev/null %s && sed -E '/^#/!s/^([^:]*):5432:/\\1:5433:/'"
        " /etc/pgbackup/pgpass > %s",
        STANDBY_PASSFILE,
        STANDBY_PASSFILE,
    )
    edit_settings(
        host,
        SETTINGS,
        STANDBY_SETTINGS,
        connection={"login_port": 5433, "passfile": STANDBY_PASSFILE},
        backup_dir="/tmp/standby-sets",
        lock_file="/tmp/standby-sets/.run.lock",
        metrics_dir="/tmp/standby-metrics",
        offsite={"target": ""},
        external_drive="",
    )
    yield
    host.run("runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D %s -m fast stop", STANDBY)
    host.run(
        "rm -rf %s %s %s /tmp/standby-sets /tmp/standby-metrics", STANDBY, STANDBY_SETTINGS, STANDBY_PASSFILE
    )


def run_with(host, settings, run_on):
    """The scheduled run with the settings file and backup_run_on given."""
    edit_settings(host, settings, settings, run_on=run_on)
    return scheduled_run(host, settings=settings)


def standby_status(host):
    return metric(host, LOGICAL_STATUS, "/tmp/standby-metrics/pgbackup_logical.prom")


def test_standby_leaves_the_backup_to_the_primary(host, standby):
    assert psql(host, "SELECT count(*) FROM pg_stat_replication") == "1"
    result = run_with(host, STANDBY_SETTINGS, "primary")
    assert result.rc == 0, host.file(LOG).content_string
    assert "this node is a standby; the primary runs the backup" in host.file(LOG).content_string
    assert standby_status(host) == 2
    # Nothing but the run's own lock file.
    assert host.run("ls -A /tmp/standby-sets").stdout.split() == [".run.lock"]


def test_a_chosen_replica_runs_the_backup_and_the_primary_does_not(host, standby):
    result = run_with(host, STANDBY_SETTINGS, "replica")
    assert result.rc == 0, host.file(LOG).content_string
    assert standby_status(host) == 0
    listed = json.loads(
        host.run("runuser -u postgres -- pgbackup list --dest /tmp/standby-sets --json").stdout
    )
    assert [entry["status"] for entry in listed] == ["complete"]
    verify = host.run("runuser -u postgres -- pgbackup verify %s", listed[0]["path"])
    assert verify.rc == 0, verify.stderr
    manifest = json.loads(host.file(f"{listed[0]['path']}/manifest.json").content_string)
    assert manifest["server"]["in_recovery"] is True
    assert "streaming" in [database["name"] for database in manifest["databases"]]
    # The same setting on the primary: not its turn.
    sets_before = len(complete_sets(host))
    host.run("cp -p %s /etc/pgbackup/primary-test.json", SETTINGS)
    try:
        result = run_with(host, "/etc/pgbackup/primary-test.json", "replica")
    finally:
        host.run("rm -f /etc/pgbackup/primary-test.json")
    assert result.rc == 0
    assert "this node is the primary; a replica runs the backup" in host.file(LOG).content_string
    assert metric(host, LOGICAL_STATUS) == 2
    assert len(complete_sets(host)) == sets_before


def test_key_rotation_adds_a_recipient_and_says_which_sets_need_which_key(
    host, first_run, private_keys, tmp_path
):
    """A new operations key replaces the old one on the hosts; the report shows the old
    key still needed by the older sets, and the new set readable with the new key."""
    made = subprocess.run(
        [sys.executable, "-m", "pgbackup", "keygen", "--key-file", str(tmp_path / "ops-2027.key")],
        env={**os.environ, "PYTHONPATH": os.path.join(REPOSITORY, "module_utils")},
        capture_output=True,
        text=True,
        check=True,
    )
    new_public = made.stdout.strip().splitlines()[-1]
    new_private = (tmp_path / "ops-2027.key").read_text().strip().splitlines()[-1]
    variables = host.ansible.get_variables()
    escrow_public = variables["backup_recipients"][1]
    overrides = tmp_path / "rotation.json"
    overrides.write_text(
        json.dumps(
            {
                "backup_recipients": [new_public, escrow_public],
                "backup_private_keys": [private_keys["ops"], new_private],
            }
        )
    )
    overrides.chmod(0o600)
    older = {entry["name"] for entry in complete_sets(host)}
    rotated = playbook("rotate_keys.yml", "-e", f"@{overrides}")
    try:
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        newest = complete_sets(host)[0]
        assert newest["name"] not in older
        installed = host.run("ls %s", RECIPIENTS).stdout.split()
        assert sorted(installed) == sorted(f"{key_id}.pub" for key_id in newest["key_ids"])
        # The sets list their key ids sorted: the escrow key is in both, the operations
        # key is the one that differs (not the first, which depends on the random ids).
        before = next(entry for entry in complete_sets(host) if entry["name"] in older)
        (new_id,) = set(newest["key_ids"]) - set(before["key_ids"])
        (old_id,) = set(before["key_ids"]) - set(newest["key_ids"])
        report = " ".join(rotated.stdout.split())
        assert f"key {old_id} (in the vault) reads" in report
        assert (
            f"key {new_id} (in the vault) reads 1 set(s), the newest pg-backup-1:{newest['name']}" in report
        )
        assert new_private.split()[-1] not in rotated.stdout + rotated.stderr
        with key_on_tmpfs(host, new_private) as key_file:
            result = host.run(
                "runuser -u postgres -- pgbackup verify %s --key-file %s", newest["path"], key_file
            )
        assert result.rc == 0, result.stderr
    finally:
        # Back to the inventory's own recipients for whatever runs next.
        back = playbook("rotate_keys.yml", "-e", '{"rotate_keys_backup_now": false}')
        assert back.returncode == 0, back.stdout
