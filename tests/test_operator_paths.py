"""What an operator meets on a real Debian host: tools outside PATH, the wrong user,
a mistyped set path, a base backup given to the logical restore, kept databases."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import connect, query, run_cli, seed_rich_database
from pgbackup import backup, pg
from pgbackup.errors import PgBackupError

DEBIAN_PATH = "/usr/local/bin:/usr/bin:/bin"  # what cron and a login shell have


def test_tools_are_found_in_the_servers_bin_directory(monkeypatch):
    monkeypatch.delenv("PGBACKUP_PG_BIN", raising=False)
    monkeypatch.setenv("PATH", DEBIAN_PATH)
    assert shutil.which("pg_verifybackup") is None, "Debian keeps pg_verifybackup off PATH"
    assert pg.tool("pg_verifybackup", 15) == "/usr/lib/postgresql/15/bin/pg_verifybackup"
    assert pg.tool("pg_dump").startswith("/usr/lib/postgresql/")
    with pytest.raises(PgBackupError, match=r"pg_verifybackup of PostgreSQL 99 or newer is not installed"):
        pg.tool("pg_verifybackup", 99)


def test_restore_base_runs_with_the_path_cron_has(cluster, key_file, tmp_path, recipient_file):
    env = {"PGBACKUP_PG_BIN": "", "PATH": DEBIAN_PATH}
    made = run_cli(
        "basebackup", "--dest", str(tmp_path / "b"), "--recipient", recipient_file, env=env, check=True
    )
    restored = run_cli(
        "restore-base",
        made.stdout.strip(),
        "--key-file",
        key_file,
        "--target-dir",
        str(tmp_path / "r"),
        env=env,
    )
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "r" / "PG_VERSION").read_text().strip() == "15"


@pytest.fixture
def postgres_owned(tmp_path):
    folder = tmp_path / "owned-by-postgres"
    folder.mkdir(mode=0o700)
    shutil.chown(folder, "postgres", "postgres")
    return folder


@pytest.mark.parametrize("command", ["backup", "basebackup", "prune"])
def test_writing_as_another_user_than_the_backup_directorys_is_refused(
    cluster, key_file, postgres_owned, command, recipient_file
):
    args = {
        "backup": [
            "backup",
            "--dest",
            str(postgres_owned),
            "--recipient",
            recipient_file,
            "--database",
            "postgres",
        ],
        "basebackup": ["basebackup", "--dest", str(postgres_owned), "--recipient", recipient_file],
        "prune": ["prune", "--dest", str(postgres_owned)],
    }[command]
    result = run_cli(*args)
    assert result.returncode == 3
    assert result.stderr.startswith(
        f"pgbackup: refused: {postgres_owned} belongs to postgres, and this is root: "
    )
    assert result.stderr.endswith(
        "as postgres (runuser -u postgres -- pgbackup ...), or files made now would break later runs\n"
    )
    assert os.listdir(postgres_owned) == []


def test_the_scheduled_run_as_root_is_refused_and_logged(
    cluster, key_file, postgres_owned, tmp_path, recipients, recipient_file
):
    settings = tmp_path / "run.json"
    settings.write_text(
        json.dumps(
            {
                "backup_dir": str(postgres_owned),
                "recipients": recipient_file,
                "log_file": str(tmp_path / "log"),
                "metrics_dir": str(tmp_path),
            }
        )
    )
    result = run_cli("run", "--settings", str(settings))
    assert result.returncode == 3
    assert "belongs to postgres, and this is root" in result.stderr
    assert "ERR refused:" in (tmp_path / "log").read_text()
    assert os.listdir(postgres_owned) == []


@pytest.fixture(scope="module")
def sets(cluster, key, tmp_path_factory, recipients):
    dest = tmp_path_factory.mktemp("paths")
    logical = backup.create_backup_set(str(dest), recipients, databases=["postgres"])
    return dest, logical


def test_a_set_that_does_not_exist_is_one_line_naming_those_that_do(sets, key_file):
    dest, logical = sets
    for command in (["verify"], ["restore"], ["restore-base", "--target-dir", str(dest / "never")]):
        result = run_cli(
            command[0], str(dest / "logical-20200101T000000Z"), "--key-file", key_file, *command[1:]
        )
        assert result.returncode == 1
        assert result.stderr == (
            f"pgbackup: error: backup set {dest}/logical-20200101T000000Z does not exist; "
            f"complete sets in {dest}, newest first: {logical['name']}\n"
        )


def test_a_bare_set_name_is_looked_up_in_the_backup_directory(sets, key_file):
    result = run_cli("verify", "logical-20200101T000000Z", "--key-file", key_file)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "/var/backups/postgresql/logical-20200101T000000Z does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_restore_of_a_base_backup_points_at_point_in_time_recovery(
    cluster, key_file, tmp_path, recipient_file
):
    base = run_cli(
        "basebackup", "--dest", str(tmp_path), "--recipient", recipient_file, check=True
    ).stdout.strip()
    result = run_cli("restore", base, "--key-file", key_file)
    assert result.returncode == 1
    assert "is a physical set (a base backup), not a dump" in result.stderr
    assert "pgbackup restore-base SET --target-dir DIR" in result.stderr
    assert "the start of a point-in-time recovery" in result.stderr


def test_kept_databases_are_listed_left_out_of_dumps_and_dropped_on_request(
    new_db, key_file, tmp_path, recipient_file
):
    app = new_db("app")
    seed_rich_database(app)
    dest = tmp_path / "b"
    first = run_cli(
        "backup", "--dest", str(dest), "--recipient", recipient_file, "--database", app, check=True
    )
    replaced = run_cli(
        "restore",
        first.stdout.strip(),
        "--key-file",
        key_file,
        "--database",
        app,
        "--force",
        "--json",
        check=True,
    )
    kept = json.loads(replaced.stdout)["databases"][0]["kept_previous_as"]
    assert kept.startswith(f"{app}_pre_restore_")
    listed = run_cli("list", "--dest", str(dest), check=True).stdout
    assert "databases kept by restore --force" in listed and kept in listed
    # A backup of every database leaves the kept copy out, and a restore's scratch
    # database (which that restore renames or drops)...
    scratch = "pgbackup_restore_99_0_20260101T000000Z"
    query("postgres", f'CREATE DATABASE "{scratch}"')
    everything = run_cli("backup", "--dest", str(dest), "--recipient", recipient_file, "--json", check=True)
    dumped = [database["name"] for database in json.loads(everything.stdout)["databases"]]
    assert app in dumped and kept not in dumped and scratch not in dumped
    query("postgres", f'DROP DATABASE "{scratch}"')
    # ...and it goes by name or by age, never another database.
    refused = run_cli("kept", "--database", app)
    assert refused.returncode == 3 and "not a database kept by restore --force" in refused.stderr
    dry = json.loads(run_cli("kept", "--drop-older-than", "0", "--dry-run", "--json", check=True).stdout)
    assert kept in dry["dropped"]
    assert run_cli("kept", "--drop-older-than", "0", check=True).stdout.startswith("dropped: ")
    assert query("postgres", "SELECT count(*) FROM pg_database WHERE datname = %s", (kept,)) == [(0,)]
    with connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (app,)).fetchone() == (1,)
