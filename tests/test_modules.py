"""The Ansible faces, run through ansible itself against the real test cluster."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import ROOT, fingerprint, query, run_ansible, seed_rich_database
from pgbackup import retention


def ansible(module: str, args: dict, check: bool = False, verbose: bool = False):
    """Run one module on localhost with the project's ansible.cfg; return its result."""
    argv = ["localhost", "-i", "localhost,", "-c", "local", "-m", module, "-a", json.dumps(args)]
    argv += ["--check"] if check else []
    argv += ["-vvv"] if verbose else []
    completed = run_ansible(
        "ansible",
        *argv,
        env={
            "ANSIBLE_STDOUT_CALLBACK": "json",
            "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
            "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        },
        timeout=300,
    )
    try:
        output = json.loads(completed.stdout)
    except ValueError:
        pytest.fail(f"ansible printed no JSON: {completed.stdout}\n{completed.stderr}")
    return output["plays"][0]["tasks"][0]["hosts"]["localhost"], completed


@pytest.fixture
def app_db(new_db):
    name = new_db("mod")
    seed_rich_database(name)
    return name


def test_dump_check_mode_writes_nothing(app_db, key_file, tmp_path):
    result, _ = ansible(
        "pg_encrypted_dump",
        {"dest": str(tmp_path / "b"), "key_file": key_file, "databases": [app_db]},
        check=True,
    )
    assert result["changed"] is True
    assert result["databases"] == [app_db]
    assert not (tmp_path / "b").exists()


def test_dump_then_restore_through_modules(app_db, key, tmp_path, cluster):
    key_hex = key.material.hex()
    password = cluster["password"]
    dumped, completed = ansible(
        "pg_encrypted_dump",
        {"dest": str(tmp_path / "b"), "key": key_hex, "databases": [app_db], "login_password": password},
    )
    assert not dumped.get("failed"), (dumped.get("msg"), dumped.get("module_stderr"), dumped.get("exception"))
    assert dumped["changed"] is True and dumped["key_id"] == key.key_id
    assert key_hex not in completed.stdout and password not in completed.stdout
    assert os.path.isdir(dumped["path"])

    planned, _ = ansible(
        "pg_encrypted_restore",
        {"set_path": dumped["path"], "key": key_hex, "databases": [app_db], "target_db": app_db + "_m"},
        check=True,
    )
    assert planned["databases"] == [{"database": app_db, "target": app_db + "_m", "action": "create"}]
    assert query("postgres", "SELECT count(*) FROM pg_database WHERE datname = %s", (app_db + "_m",)) == [
        (0,)
    ]

    restored, _ = ansible(
        "pg_encrypted_restore",
        {
            "set_path": dumped["path"],
            "key": key_hex,
            "jobs": 2,
            "databases": [app_db],
            "target_db": app_db + "_m",
        },
    )
    assert restored["changed"] is True, restored
    assert fingerprint(app_db + "_m") == fingerprint(app_db)


def test_restore_refusal_is_a_clear_failure(app_db, key_file, tmp_path):
    dumped, _ = ansible(
        "pg_encrypted_dump", {"dest": str(tmp_path / "b"), "key_file": key_file, "databases": [app_db]}
    )
    refused, _ = ansible(
        "pg_encrypted_restore",
        {"set_path": dumped["path"], "key_file": key_file, "databases": [app_db]},
        check=True,
    )
    assert refused["failed"] is True
    assert "exists and is not empty" in refused["msg"]


def test_malformed_key_option_fails_before_writing(tmp_path):
    result, completed = ansible("pg_encrypted_dump", {"dest": str(tmp_path / "b"), "key": "not-a-key"})
    assert result["failed"] is True
    assert "malformed" in result["msg"]
    assert "not-a-key" not in completed.stdout
    assert not (tmp_path / "b").exists()


def test_retention_module_reports_honestly(key, tmp_path, cluster):
    from test_retention import make_set

    dest = tmp_path / "r"
    dest.mkdir()
    young, old = make_set(dest, key, 1), make_set(dest, key, 60)
    args = {"dest": str(dest), "keep_days": 30, "min_keep": 1}
    checked, _ = ansible("backup_retention", args, check=True)
    assert checked["changed"] is True and checked["removed"] == [old]
    assert sorted(os.listdir(dest)) == sorted([young, old])
    pruned, _ = ansible("backup_retention", args)
    assert pruned["changed"] is True and pruned["removed"] == [old]
    again, _ = ansible("backup_retention", args)
    assert again["changed"] is False and again["removed"] == []
    assert [entry["name"] for entry in again["sets"]] == [young]
    assert retention.latest_complete(again["sets"])["name"] == young


def test_role_key_check_refuses_what_the_hosts_refuse(key):
    """The backup role checks backup_key with the very function the hosts use."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pgbackup_filters", os.path.join(ROOT, "filter_plugins", "pgbackup.py")
    )
    filters = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(filters)
    problem = filters.FilterModule().filters()["pgbackup_key_problem"]
    assert "not a random key" in problem("0" * 64)
    assert "malformed" in problem("change me")
    assert problem(key.material.hex()) == ""
