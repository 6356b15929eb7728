"""`pgbackup run`, the scheduled run, as cron calls it: a real PostgreSQL, real rclone.

The off-site remote is an rclone `local` remote (a folder standing in for Drive); a dead
remote is an sftp remote on a loopback port nobody listens on.
"""

from __future__ import annotations

import calendar
import datetime
import fcntl
import json
import os
import re
import shutil
import stat
import time

import pytest
from conftest import run_cli
from pgbackup import manifest, retention
from pgbackup import run as scheduled
from pgcluster import free_port
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture
def site(cluster, recipient_file, tmp_path):
    """A host's layout: backup dir (0700), log, metrics, rclone config, settings."""
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o700)
    (tmp_path / "metrics").mkdir()
    remote = tmp_path / "remote"
    rclone_config = tmp_path / "rclone.conf"
    rclone_config.write_text(
        f"[offsite]\ntype = local\n\n[dead]\ntype = sftp\nhost = 127.0.0.1\nport = {free_port()}\n"
        "user = nobody\nkey_file = /nonexistent\n"
    )
    settings = {
        "connection": {
            "login_host": "127.0.0.1",
            "login_port": cluster["port"],
            "login_user": "postgres",
            "passfile": cluster["env"]["PGPASSFILE"],
            "ssl_mode": "verify-full",
            "ssl_rootcert": cluster["env"]["PGSSLROOTCERT"],
        },
        "backup_dir": str(backups),
        "recipients": recipient_file,
        "logical": {"databases": ["postgres"], "keep_days": 30, "min_keep": 2},
        "offsite": {"target": f"offsite:{remote}", "keep_days": 90, "rclone_config": str(rclone_config)},
        "log_file": str(tmp_path / "pgbackup.log"),
        "metrics_dir": str(tmp_path / "metrics"),
    }
    path = tmp_path / "run.json"

    def write(**changes):
        merged = json.loads(json.dumps(settings))
        for name, value in changes.items():
            if isinstance(value, dict):
                merged.setdefault(name, {}).update(value)
            else:
                merged[name] = value
        path.write_text(json.dumps(merged))
        return merged

    write()
    return {"dir": tmp_path, "backups": backups, "remote": remote, "settings": path, "write": write}


def run(site, kind="logical"):
    # cron's environment: no libpq variables, only the settings file.
    env = {name: "" for name in ("PGHOST", "PGPORT", "PGUSER", "PGPASSFILE", "PGSSLMODE", "PGSSLROOTCERT")}
    return run_cli("run", kind, "--settings", str(site["settings"]), env=env)


def log_text(site):
    return (site["dir"] / "pgbackup.log").read_text()


def metrics(site, kind="logical"):
    """The series of a run kind's metrics file, parsed as Prometheus does (the official
    client's parser), keyed "name" or "name:repository"."""
    text = (site["dir"] / "metrics" / f"pgbackup_{kind}.prom").read_text()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("kind", kind) == kind, sample
            key = sample.name + (f":{labels.pop('repository')}" if "repository" in labels else "")
            assert not labels, sample
            values[key] = sample.value
    return values


def complete(site, kind="logical"):
    return [
        entry
        for entry in retention.scan(str(site["backups"]))
        if entry["status"] == "complete" and entry["kind"] == kind
    ]


def files_of(folder):
    return sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, _dirs, names in os.walk(folder)
        for name in names
    )


def test_a_run_backs_up_verifies_prunes_copies_and_reports(site, key_file):
    """The run holds only the public key (site's settings); the private key reads the
    off-site copy."""
    result = run(site)
    assert result.returncode == 0, (result.stderr, log_text(site))
    (made,) = complete(site)
    # Off-site: the set and nothing that is not a set (no lock files, no run lock).
    assert files_of(site["remote"]) == [
        f"{made['name']}/{name}" for name in files_of(made["path"]) if name != ".lock"
    ]
    assert run_cli("verify", str(site["remote"] / made["name"]), "--key-file", key_file).returncode == 0
    log = log_text(site)
    for event in (
        "logical run started",
        "backup written",
        "verify passed",
        "structure, sizes and hashes: no private key here",
        "prune (logical",
        "off-site copy",
        "run finished:",
    ):
        assert event in log, event
    assert all(
        re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ pgbackup-run\[\S+\] (INFO|WARNING|ERR) ", line)
        for line in log.splitlines()
    )
    values = metrics(site)
    assert values["pgbackup_last_run_status"] == 0
    assert values["pgbackup_last_status:local"] == values["pgbackup_last_status:offsite"] == 0
    assert values["pgbackup_last_success_timestamp_seconds:local"] > 0
    assert values["pgbackup_last_success_timestamp_seconds:offsite"] > 0
    assert values["pgbackup_last_set_size_bytes"] == made["total_size"]
    assert values["pgbackup_sets"] == 1
    assert values["pgbackup_newest_set_timestamp_seconds"] == calendar.timegm(
        time.strptime(made["started_at"], "%Y-%m-%dT%H:%M:%SZ")
    )
    volume = (site["dir"] / "metrics" / "pgbackup_volume.prom").read_text()
    (family,) = [
        family for family in text_string_to_metric_families(volume) if family.name.endswith("free_bytes")
    ]
    (sample,) = family.samples
    assert sample.labels == {"repository": "local"}
    assert abs(sample.value - shutil.disk_usage(site["backups"]).free) < 64 * 1024 * 1024
    metrics_file = site["dir"] / "metrics" / "pgbackup_logical.prom"
    assert stat.S_IMODE(metrics_file.stat().st_mode) == 0o644  # the exporter runs as another user
    assert stat.S_IMODE(os.stat(site["backups"] / ".run.lock").st_mode) == 0o600


def test_a_physical_run_prunes_only_physical_sets(site):
    assert run(site).returncode == 0
    assert run(site).returncode == 0
    site["write"](physical={"keep_days": 0, "min_keep": 1})
    for _ in range(2):
        result = run(site, "physical")
        assert result.returncode == 0, log_text(site)
    assert len(complete(site, "physical")) == 1, "physical retention keeps 1"
    assert len(complete(site, "logical")) == 2, "a physical run must not prune dumps"
    physical_metrics = metrics(site, "physical")
    assert physical_metrics["pgbackup_last_run_status"] == 0
    assert physical_metrics["pgbackup_sets"] == 1


def test_not_this_nodes_turn_is_a_skip_not_a_failure(site):
    site["write"](run_on="replica")
    result = run(site)
    assert result.returncode == 0
    assert "this node is the primary; a replica runs the backup" in log_text(site)
    assert metrics(site)["pgbackup_last_run_status"] == 2
    assert complete(site) == []


def test_a_dead_server_fails_loudly(site):
    site["write"](connection={"login_port": free_port()})
    result = run(site)
    assert result.returncode == 1
    assert "cannot tell whether this node should run the backup (server unreachable)" in log_text(site)
    assert metrics(site)["pgbackup_last_run_status"] == 1


def test_a_wrong_password_names_the_cause_and_the_fix(site, tmp_path):
    """libpq says what failed on its first line and where the password came from on the
    next: the log keeps both, and check names the setting to fix."""
    wrong = tmp_path / "wrong-pgpass"
    wrong.write_text("*:*:*:postgres:not-the-password\n")
    wrong.chmod(0o600)
    site["write"](connection={"passfile": str(wrong)})
    assert run(site).returncode == 1
    logged = log_text(site)
    assert 'password authentication failed for user "postgres"' in logged
    assert f'password retrieved from file "{wrong}"' in logged
    assert metrics(site)["pgbackup_last_run_status"] == 1
    result = check(site)
    assert result.returncode == 1
    assert "(the passfile's password does not match the role's)" in result.stderr


def test_a_held_lock_is_a_visible_failure(site):
    assert run(site).returncode == 0
    before = metrics(site)
    lock = os.open(site["backups"] / ".run.lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.pwrite(lock, b"pid 4242 on elsewhere since 2026-11-28T02:00:00Z\n", 0)
        result = run(site)
    finally:
        os.close(lock)
    assert result.returncode == 75
    assert re.search(
        r" ERR another backup run holds \S+/\.run\.lock \(pid 4242 on elsewhere since", log_text(site)
    )
    after = metrics(site)
    assert after["pgbackup_last_run_status"] == 1
    assert (
        after["pgbackup_last_success_timestamp_seconds:local"]
        == before["pgbackup_last_success_timestamp_seconds:local"]
    )
    assert len(complete(site)) == 1


def test_a_lock_anyone_could_hold_is_refused(site, tmp_path):
    shared = tmp_path / "shared-lock-dir"
    shared.mkdir()
    shared.chmod(0o1777)
    site["write"](lock_file=str(shared / "pgbackup.lock"))
    result = run(site)
    assert result.returncode == 1
    assert "writable by other users" in result.stderr
    assert complete(site) == []


def test_a_dead_remote_fails_the_run_but_keeps_every_set(site, key_file):
    assert run(site).returncode == 0
    before = metrics(site)
    site["write"](offsite={"target": "dead:backups"})
    result = run(site)
    assert result.returncode == 1
    sets = complete(site)
    assert len(sets) == 2
    assert run_cli("verify", sets[0]["path"], "--key-file", key_file).returncode == 0
    assert re.search(r" ERR off-site copy to dead:backups failed: .*; local sets are kept", log_text(site))
    after = metrics(site)
    assert after["pgbackup_last_run_status"] == 1
    assert after["pgbackup_last_status:local"] == 0, "the set itself was made and verified"
    assert after["pgbackup_last_status:offsite"] == 1
    assert (
        after["pgbackup_last_attempt_timestamp_seconds:offsite"]
        >= before["pgbackup_last_success_timestamp_seconds:offsite"]
    )
    assert (
        after["pgbackup_last_success_timestamp_seconds:offsite"]
        == before["pgbackup_last_success_timestamp_seconds:offsite"]
    )


def test_the_external_drive_is_skipped_unmounted_and_filled_when_mounted(site, tiny_disk, tmp_path, new_db):
    unmounted = tmp_path / "not-a-mount"
    unmounted.mkdir()
    small = new_db("drive")  # the drive is a 256 KiB tmpfs
    site["write"](external_drive=str(unmounted), logical={"databases": [small]})
    assert run(site).returncode == 0
    assert f"external drive copy skipped: {unmounted} is not mounted" in log_text(site)
    skipped = metrics(site)
    assert skipped["pgbackup_last_status:external"] == 2
    assert skipped["pgbackup_last_success_timestamp_seconds:external"] == 0
    site["write"](external_drive=str(tiny_disk), logical={"databases": [small]})
    assert run(site).returncode == 0, log_text(site)
    assert f"external drive copy to {tiny_disk} done" in log_text(site)
    copied = metrics(site)
    assert copied["pgbackup_last_status:external"] == 0
    assert copied["pgbackup_last_success_timestamp_seconds:external"] > 0
    volume = (site["dir"] / "metrics" / "pgbackup_volume.prom").read_text()
    assert f'pgbackup_volume_size_bytes{{repository="external"}} {256 * 1024}' in volume
    newest = complete(site)[0]
    assert files_of(tiny_disk / "postgresql" / newest["name"]) == [
        name for name in files_of(newest["path"]) if name != ".lock"
    ]


def test_a_misspelt_setting_is_an_error_not_ignored(site):
    site["write"](logical={"keep_dayz": 3})
    result = run(site)
    assert result.returncode == 1
    assert "unknown setting(s) logical.keep_dayz" in result.stderr
    site["write"](connection={"login_password": "secret"})
    result = run(site)
    assert "unknown connection setting(s) login_password" in result.stderr


def check(site, *extra):
    env = {name: "" for name in ("PGHOST", "PGPORT", "PGUSER", "PGPASSFILE", "PGSSLMODE", "PGSSLROOTCERT")}
    return run_cli("check", "--settings", str(site["settings"]), *extra, env=env)


def test_check_connects_as_the_run_will(site):
    result = check(site, "--replication")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("connected as postgres over TLS to PostgreSQL 15")
    assert result.stdout.strip().endswith("replication connection accepted")


def test_check_connects_by_the_certificates_name_over_loopback(site):
    """A certificate issued for the host's name, the connection over 127.0.0.1: libpq
    checks `host` against the certificate and connects to `hostaddr`."""
    site["write"](connection={"login_host": "localhost", "login_hostaddr": "127.0.0.1"})
    assert check(site, "--replication").returncode == 0
    site["write"](connection={"login_host": "db1.example.internal", "login_hostaddr": "127.0.0.1"})
    result = check(site)
    assert result.returncode == 1
    assert "backup_pg_host must be a name the server certificate carries" in result.stderr


def test_check_names_the_setting_behind_a_certificate_failure(site, tmp_path):
    from pgcluster import write_ca_and_server_certificate

    other = tmp_path / "other-ca"
    other.mkdir()
    foreign = write_ca_and_server_certificate(str(other), ca_name="another CA")["ca.crt"]
    site["write"](connection={"ssl_rootcert": foreign})
    result = check(site)
    assert result.returncode == 1
    assert "certificate verify failed" in result.stderr
    assert "backup_pg_ssl_rootcert must be the CA that issued the server certificate" in result.stderr
    assert result.stderr.count("\n") == 1


def remote_sets(site):
    return sorted(name for name in os.listdir(site["remote"]) if not name.startswith("."))


def test_offsite_retention_keeps_the_newest_and_never_copies_back(site, recipients):
    from test_retention import make_set

    site["write"](logical={"keep_days": 400, "min_keep": 2}, physical={"min_keep": 1})
    ages = {age: make_set(site["backups"], recipients, age) for age in (1, 50, 100, 120)}
    old_base = make_set(site["backups"], recipients, 100, kind="physical")
    assert run(site).returncode == 0, log_text(site)
    newest = complete(site)[0]["name"]
    # Off-site keeps 90 days, and at least 2 dumps and 1 base backup of any age.
    assert remote_sets(site) == sorted([newest, ages[1], ages[50], old_base])
    # A shorter off-site limit: the 50-day set goes there, and stays gone, while the
    # host still keeps it (400 days locally).
    site["write"](
        logical={"keep_days": 400, "min_keep": 2}, physical={"min_keep": 1}, offsite={"keep_days": 30}
    )
    for _ in range(2):
        assert run(site).returncode == 0, log_text(site)
        assert ages[50] not in remote_sets(site)
        assert ages[50] in [entry["name"] for entry in complete(site)]
    assert "off-site retention: removed" in log_text(site)


def test_offsite_retention_never_empties_the_remote_when_everything_is_old():
    now = manifest.utc_now()
    names = [manifest.set_name("logical", now - datetime.timedelta(days=days)) for days in (100, 120, 150)]
    settings = {"offsite": {"keep_days": 30}, "logical": {"min_keep": 2}, "physical": {"min_keep": 2}}
    assert scheduled.offsite_keeps(names, settings, now) == set(names[:2])
    assert scheduled.offsite_keeps([*names, "not-a-set", ".partial-x"], settings, now) == set(names[:2])
    settings["offsite"]["keep_days"] = 0
    assert scheduled.offsite_keeps(names, settings, now) == set(names)


def test_a_planted_link_on_the_external_drive_is_refused(site, tiny_disk, tmp_path, new_db):
    victim = tmp_path / "data-directory"
    victim.mkdir()
    (tiny_disk / "postgresql").symlink_to(victim)
    site["write"](external_drive=str(tiny_disk), logical={"databases": [new_db("planted")]})
    result = run(site)
    assert result.returncode == 1
    assert "the external drive's backup folder" in log_text(site) and "symbolic link" in log_text(site)
    assert list(victim.iterdir()) == [], "nothing may be written through the link"
    assert metrics(site)["pgbackup_last_run_status"] == 1


def test_a_setting_of_the_wrong_type_is_a_clear_error(site):
    site["write"](logical={"keep_days": "30"})
    result = run(site)
    assert result.returncode == 1
    assert result.stderr == (
        f"pgbackup: error: settings file {site['settings']}: logical.keep_days must be int, not str ('30')\n"
    )


def test_an_unexpected_error_in_one_step_fails_the_run_but_not_the_others(site, monkeypatch, caplog):
    """Whatever goes wrong in prune, the off-site copy still runs and the metrics say failed.
    (The one test here that breaks the core on purpose: a step raising what it never should.)"""

    def broken_prune(*_args, **_kwargs):
        raise RuntimeError("disk gremlin")

    monkeypatch.setattr(retention, "prune", broken_prune)
    saved = dict(os.environ)  # prepare() sets libpq's variables as cron needs them
    try:
        settings = scheduled.prepare(str(site["settings"]))
        summary = {}
        with caplog.at_level("INFO", logger="pgbackup"):
            assert scheduled.scheduled_run(settings, "logical", summary) == 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert summary["status"] == "failed" and summary["offsite_copied"] is True
    assert "prune stopped on an unexpected RuntimeError: disk gremlin" in caplog.text
    assert "off-site copy to" in caplog.text
    assert metrics(site)["pgbackup_last_run_status"] == 1


def test_remote_paths_at_a_remotes_root():
    assert scheduled.remote_path("gdrive:", "logical-x") == "gdrive:logical-x"
    assert scheduled.remote_path("gdrive:pg/db1", "logical-x") == "gdrive:pg/db1/logical-x"
    assert scheduled.remote_path("gdrive:pg/db1/", "logical-x") == "gdrive:pg/db1/logical-x"
