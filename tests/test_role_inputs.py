"""The roles' input checks, run by ansible-playbook itself: values that cannot work
fail the play with a message naming the variable; a misspelt name is a warning that
names the variable most likely meant."""

from __future__ import annotations

import os

import pytest
import yaml
from conftest import ROOT, run_ansible

PUBLIC = "PGBACKUP-PUBLIC-KEY-V2 dd8ed7ff60680e3c3d0125e333c85e550bf0b30872c789feb518bbd8ee380375"
PRIVATE_HEX = "70d75ab8f06c26df66c8b839a5f1ba4e7acbbb708ffe2791ebe5e7474bc14754"
GOOD = {"backup_recipients": [PUBLIC], "backup_pg_password": "x"}


def validate(tmp_path, role="backup", **variables):
    playbook = tmp_path / "validate.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars": {**GOOD, **variables},
                    "tasks": [{"ansible.builtin.include_role": {"name": role, "tasks_from": "validate.yml"}}],
                }
            ]
        )
    )
    return run_ansible("ansible-playbook", "-i", "localhost,", "-c", "local", str(playbook))


def test_good_inputs_pass_quietly(tmp_path):
    result = validate(
        tmp_path,
        backup_cron_minute="0,30",
        backup_cron_hour="*/2",
        backup_cron_day="1-15",
        backup_cron_month="jan-jun",
        backup_cron_weekday="mon-fri",
    )
    assert result.returncode == 0, result.stdout
    assert "[WARNING]" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"backup_keep_days": -1}, "backup_keep_days is -1; it must be 0 or more."),
        ({"backup_min_keep": 0}, "backup_min_keep is 0; it must be 1 or more."),
        ({"backup_physical_min_keep": 0}, "backup_physical_min_keep is 0; it must be 1 or more."),
        ({"backup_offsite_keep_days": -5}, "backup_offsite_keep_days is -5; it must be 0 or more."),
        ({"backup_cron_hour": "24"}, "backup_cron_hour: cron hour '24' is not valid"),
        ({"backup_cron_minute": "*/0"}, "backup_cron_minute: cron minute '*/0' is not valid"),
        ({"backup_cron_weekday": "8"}, "backup_cron_weekday: cron weekday '8' is not valid"),
        ({"backup_physical_cron_hour": "5-3"}, "backup_physical_cron_hour: cron hour '5-3' is not valid"),
        ({"backup_recipients": []}, "Set backup_recipients to one or more public keys"),
        ({"backup_recipients": [PUBLIC, "PGBACKUP-PUBLIC-KEY-V2 12"]}, "expected 64 hexadecimal characters"),
        ({"backup_key": "ab" * 32}, "are format version 1's symmetric key"),
        ({"backup_key_file": "/etc/pgbackup/old.key"}, "are format version 1's symmetric key"),
    ],
)
def test_values_that_cannot_work_fail_with_the_variables_name(tmp_path, variables, message):
    result = validate(tmp_path, **variables)
    assert result.returncode != 0
    assert message in " ".join(result.stdout.split())


def test_a_private_key_among_the_recipients_is_refused_and_never_shown(tmp_path):
    result = validate(tmp_path, backup_recipients=[PUBLIC, f"PGBACKUP-PRIVATE-KEY-V2 {PRIVATE_HEX}"])
    assert result.returncode != 0
    assert "holds a private key" in " ".join(result.stdout.split())
    assert PRIVATE_HEX not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("role", "typo", "meant"),
    [
        ("backup", "backup_keep_dayz", "backup_keep_days"),
        ("postgresql", "postgresql_max_conections", "postgresql_max_connections"),
    ],
)
def test_a_misspelt_variable_is_a_warning_naming_the_one_meant(tmp_path, role, typo, meant):
    extra = (
        {
            "postgresql_admin_password": "a" * 12,
            "postgresql_replication_password": "b" * 12,
            "postgresql_backup_password": "c" * 12,
            "postgresql_hba_entries": [],
        }
        if role == "postgresql"
        else {}
    )
    result = validate(tmp_path, role=role, **{typo: 5}, **extra)
    assert result.returncode == 0, result.stdout
    output = " ".join((result.stdout + result.stderr).split())
    assert f"[WARNING]: {typo} is not a variable of this role; did you mean {meant}?" in output


def test_the_lab_inventory_works_with_plain_ansible(tmp_path):
    """After `make lab`, `ansible-playbook -i inventories/lab ...` finds the lab's generated
    secrets in Molecule's folder for the lab scenario, without Molecule's environment."""
    secrets = tmp_path / ".cache" / "molecule" / os.path.basename(ROOT) / "lab"
    secrets.mkdir(parents=True)
    (secrets / "offsite_ed25519").write_text("the-lab-key")
    (secrets / "offsite_known_hosts").write_text("the-known-hosts")
    outside_molecule = {name: None for name in os.environ if name.startswith("MOLECULE_")}
    result = run_ansible(
        "ansible",
        "-i",
        "inventories/lab",
        "pg-lab-1",
        "-m",
        "ansible.builtin.debug",
        "-a",
        "msg={{ rclone_files | map(attribute='content') | join('+') }}",
        env={**outside_molecule, "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the-lab-key +the-known-hosts" in " ".join(result.stdout.split())
