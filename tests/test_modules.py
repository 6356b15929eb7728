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


def test_dump_check_mode_writes_nothing(app_db, recipient_file, key, tmp_path):
    result, _ = ansible(
        "pg_encrypted_dump",
        {"dest": str(tmp_path / "b"), "recipient_file": recipient_file, "databases": [app_db]},
        check=True,
    )
    assert result["changed"] is True
    assert result["databases"] == [app_db] and result["key_ids"] == [key.key_id]
    assert not (tmp_path / "b").exists()


def test_dump_then_restore_through_modules(app_db, key, tmp_path, cluster):
    """Public keys as the inventory gives them to the dump; the private key as the vault
    gives it to the restore, never shown in Ansible's output."""
    key_text = key.text()
    password = cluster["password"]
    dumped, completed = ansible(
        "pg_encrypted_dump",
        {
            "dest": str(tmp_path / "b"),
            "recipients": [key.public.text()],
            "databases": [app_db],
            "login_password": password,
        },
    )
    assert not dumped.get("failed"), (dumped.get("msg"), dumped.get("module_stderr"), dumped.get("exception"))
    assert dumped["changed"] is True and dumped["key_ids"] == [key.key_id]
    assert password not in completed.stdout
    assert os.path.isdir(dumped["path"])

    planned, _ = ansible(
        "pg_encrypted_restore",
        {"set_path": dumped["path"], "key": key_text, "databases": [app_db], "target_db": app_db + "_m"},
        check=True,
    )
    assert planned["databases"] == [{"database": app_db, "target": app_db + "_m", "action": "create"}]
    assert query("postgres", "SELECT count(*) FROM pg_database WHERE datname = %s", (app_db + "_m",)) == [
        (0,)
    ]

    restored, restored_output = ansible(
        "pg_encrypted_restore",
        {
            "set_path": dumped["path"],
            "key": key_text,
            "jobs": 2,
            "databases": [app_db],
            "target_db": app_db + "_m",
        },
    )
    assert restored["changed"] is True, restored
    assert fingerprint(app_db + "_m") == fingerprint(app_db)
    assert key.material.hex() not in completed.stdout + restored_output.stdout


def test_restore_refusal_is_a_clear_failure(app_db, key_file, recipient_file, tmp_path):
    dumped, _ = ansible(
        "pg_encrypted_dump",
        {"dest": str(tmp_path / "b"), "recipient_file": recipient_file, "databases": [app_db]},
    )
    refused, _ = ansible(
        "pg_encrypted_restore",
        {"set_path": dumped["path"], "key_file": key_file, "databases": [app_db]},
        check=True,
    )
    assert refused["failed"] is True
    assert "exists and is not empty" in refused["msg"]


def test_malformed_or_private_recipient_fails_before_writing(key, tmp_path):
    result, _ = ansible("pg_encrypted_dump", {"dest": str(tmp_path / "b"), "recipients": ["not-a-key"]})
    assert result["failed"] is True
    assert "malformed" in result["msg"]
    # A private key where a public one belongs: refused, and never echoed back.
    result, completed = ansible(
        "pg_encrypted_dump", {"dest": str(tmp_path / "b"), "recipients": [key.text()]}
    )
    assert result["failed"] is True and "is not a public key" in result["msg"]
    assert key.material.hex() not in completed.stdout
    assert not (tmp_path / "b").exists()


def test_retention_module_reports_honestly(recipients, tmp_path, cluster):
    from test_retention import make_set

    dest = tmp_path / "r"
    dest.mkdir()
    young, old = make_set(dest, recipients, 1), make_set(dest, recipients, 60)
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
    """The backup role checks backup_recipients (and the restore playbook the private
    keys) with the very parser the hosts use, and never repeats a key in its message."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pgbackup_filters", os.path.join(ROOT, "filter_plugins", "pgbackup.py")
    )
    filters = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(filters)
    problem = filters.FilterModule().filters()["pgbackup_key_problem"]
    assert "malformed" in problem("change me")
    assert problem(key.public.text()) == ""
    for wrong in (key.text(), "0" * 64):
        message = problem(wrong)
        assert "not reach a database host" in message or "format version 1 key" in message
        assert wrong.split()[-1] not in message
    assert problem(key.text(), "reading") == ""
    assert "private key is needed" in problem(key.public.text(), "reading")


def test_the_rotation_report_says_which_sets_no_vault_key_reads():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pgbackup_filters", os.path.join(ROOT, "filter_plugins", "pgbackup.py")
    )
    filters = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(filters)
    report = filters.FilterModule().filters()["pgbackup_key_report"]
    from pgbackup import crypto

    old, new, escrow = (crypto.PrivateKey.generate() for _ in range(3))

    def made(name, started, *keys):
        return {
            "status": "complete",
            "name": name,
            "started_at": started,
            "key_ids": [k.key_id for k in keys],
        }

    sets = {
        "db1": [
            made("logical-2", "2026-11-02T02:00:00Z", new, escrow),
            made("logical-1", "2026-11-01T02:00:00Z", old, escrow),
        ],
        "db2": [made("logical-0", "2026-10-01T02:00:00Z", old, escrow)],
    }
    out = report(sets, [new.text()], [new.public.text(), escrow.public.text()])
    assert out["unreadable"] == [
        f"db1:logical-1 (keys {old.key_id}, {escrow.key_id})",
        f"db2:logical-0 (keys {old.key_id}, {escrow.key_id})",
    ]
    assert f"key {new.key_id} (in the vault) reads 1 set(s), the newest db1:logical-2" in out["lines"]
    assert out["retire"] == []
    out = report(sets, [new.text(), old.text()], [new.public.text(), escrow.public.text()])
    assert out["unreadable"] == [] and out["needed"][old.key_id] == ["db2:logical-0", "db1:logical-1"]
    gone = {"db1": [made("logical-2", "2026-11-02T02:00:00Z", new, escrow)]}
    assert report(gone, [new.text(), old.text()], [new.public.text()])["retire"] == [old.key_id]
    for line in out["lines"]:
        assert old.material.hex() not in line and new.material.hex() not in line


def test_a_public_key_given_as_the_restore_key_is_a_clear_failure(key, tmp_path):
    result, _ = ansible(
        "pg_encrypted_restore", {"set_path": str(tmp_path), "key": key.public.text(), "databases": ["x"]}
    )
    assert result["failed"] is True and "holds a public key" in result["msg"]
