"""Base backups: taken through the same encryption, restored only into empty folders,
checked with pg_verifybackup, and a server really starts on the result."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile

import psycopg
import pytest
from conftest import query, run_cli
from pgbackup import physical, retention
from pgbackup.errors import CorruptError, RefusedError
from pgcluster import PG_BIN, as_cluster_owner, free_port


@pytest.fixture(scope="module")
def base_set(cluster, key, tmp_path_factory):
    query("postgres", "DROP TABLE IF EXISTS physical_probe")
    query(
        "postgres", "CREATE TABLE physical_probe AS SELECT g, md5(g::text) FROM generate_series(1, 50000) g"
    )
    dest = tmp_path_factory.mktemp("physical")
    return physical.create_base_backup(str(dest), key)


@pytest.fixture
def reachable(tmp_path):
    """A scratch folder the postgres user can reach (pytest's own are root-only)."""
    folder = tempfile.mkdtemp(prefix="pgbackup-physical-")
    os.chmod(folder, 0o755)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    yield pathlib.Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def restore_target(folder):
    return folder / "restored"


def test_base_backup_set_has_wal_positions_and_manifest(base_set):
    assert base_set["kind"] == "physical"
    assert base_set["wal"]["start_lsn"] and base_set["wal"]["end_lsn"]
    assert base_set["base"]["plaintext_size"] > 10_000_000
    assert os.stat(os.path.join(base_set["path"], "base.tar.enc")).st_mode & 0o777 == 0o600


def test_restored_copy_verifies_and_starts_with_the_data(base_set, key, reachable, cluster):
    target = restore_target(reachable)
    report = physical.restore_base(base_set["path"], key, str(target))
    assert report["target_dir"] == str(target)
    assert (target / "backup_manifest").exists() and (target / "PG_VERSION").exists()
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres:postgres", str(target)], check=True)
    port = free_port()
    as_cluster_owner(
        [
            f"{PG_BIN}/pg_ctl",
            "-D",
            str(target),
            "-w",
            "-l",
            str(reachable / "log"),
            "start",
            "-o",
            f"-p {port} -k /tmp -c listen_addresses=127.0.0.1 -c archive_mode=off",
        ]
    )
    try:
        with psycopg.connect(
            host="127.0.0.1", port=port, dbname="postgres", password=cluster["password"]
        ) as conn:
            assert conn.execute("SELECT count(*) FROM physical_probe").fetchone()[0] == 50000
    finally:
        as_cluster_owner([f"{PG_BIN}/pg_ctl", "-D", str(target), "-m", "immediate", "stop"])


def test_non_empty_target_is_refused_and_left_alone(base_set, key, tmp_path):
    target = restore_target(tmp_path)
    target.mkdir()
    (target / "PG_VERSION").write_text("precious\n")
    with pytest.raises(RefusedError, match="not empty"):
        physical.restore_base(base_set["path"], key, str(target))
    assert (target / "PG_VERSION").read_text() == "precious\n"


def test_corrupt_base_backup_leaves_no_half_restored_folder(base_set, key, tmp_path):
    damaged = tmp_path / "damaged-set"
    shutil.copytree(base_set["path"], damaged)
    path = damaged / "base.tar.enc"
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x10]))
    target = restore_target(tmp_path)
    with pytest.raises(CorruptError, match="failed authentication"):
        physical.restore_base(str(damaged), key, str(target))
    assert not target.exists()


def test_cli_basebackup_and_separate_retention(cluster, key_file, tmp_path):
    dest = tmp_path / "mixed"
    base = run_cli("basebackup", "--dest", str(dest), "--key-file", key_file, check=True).stdout.strip()
    logical = run_cli(
        "backup", "--dest", str(dest), "--key-file", key_file, "--database", "postgres", check=True
    ).stdout.strip()
    assert os.path.basename(base).startswith("physical-") and os.path.basename(logical).startswith("logical-")
    assert run_cli("verify", base, "--key-file", key_file, check=True).returncode == 0
    # min_keep counts each kind on its own: pruning logical sets never touches the base backup.
    report = retention.prune(str(dest), keep_days=0, min_keep=1, kind="logical")
    assert report["removed"] == []
    kinds = sorted(entry["kind"] for entry in retention.scan(str(dest)))
    assert kinds == ["logical", "physical"]
