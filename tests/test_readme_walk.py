"""The README's "Pointing it at real servers", walked on the controller as a new user
would: copy the inventory, make a key, fill and encrypt the vault, and let the roles'
input checks read it. (The host side, a CA-issued certificate and an rclone remote,
is the Molecule `backup` scenario.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import ROOT, run_ansible


def readme_block() -> str:
    with open(os.path.join(ROOT, "README.md")) as handle:
        text = handle.read()
    section = text[text.index("## Pointing it at real servers") :]
    return re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_names_only_what_exists():
    block = readme_block()
    assert "make venv" in block and "make keygen KEY=" in block
    assert "--ask-vault-pass" in block and " -K" in block
    for path in re.findall(r"inventories/production\S*", block):
        assert os.path.exists(os.path.join(ROOT, path)), path
    copied = re.search(r"cp -r inventories/production (\S+)", block).group(1)
    # Every later command uses the copy, never the example.
    later = block[block.index("cp -r") + 1 :]
    assert "inventories/production" not in later.replace("inventories/production ", "")
    assert later.count(copied) >= 3


@pytest.fixture
def site(tmp_path):
    """The README's steps, in a scratch copy of the repository's inventories."""
    site = tmp_path / "inventories" / "site"
    shutil.copytree(os.path.join(ROOT, "inventories", "production"), site)
    vault = site / "group_vars" / "postgresql" / "vault.yml"
    shutil.copy(site / "group_vars" / "postgresql" / "vault.yml.example", vault)
    keys = {}
    for name in ("ops", "escrow"):
        key_file = tmp_path / f"{name}.key"
        made = subprocess.run(
            ["make", "-s", "-C", ROOT, "keygen", f"KEY={key_file}"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert made.returncode == 0, made.stdout + made.stderr
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        assert oct((tmp_path / f"{name}.key.pub").stat().st_mode & 0o777) == "0o644"
        keys[name] = {
            kind: next(
                line for line in (tmp_path / f"{name}.{kind}").read_text().splitlines() if line[0] != "#"
            )
            for kind in ("key", "key.pub")
        }
    values = yaml.safe_load(vault.read_text())
    # Throwaway values, as a user would type them in.
    values.update(
        {
            "vault_postgresql_admin_password": "admin-" + os.urandom(8).hex(),
            "vault_postgresql_replication_password": "replication-" + os.urandom(8).hex(),
            "vault_postgresql_backup_password": "backup-" + os.urandom(8).hex(),
            "vault_gdrive_shared_drive_id": "0AbCdEfGhIjK",
        }
    )
    password_file = tmp_path / "vault-password"
    password_file.write_text("the vault password\n")
    return {
        "dir": tmp_path,
        "site": site,
        "vault": vault,
        "values": values,
        "keys": keys,
        "password": password_file,
    }


def encrypt(site, **changes):
    site["vault"].write_text(yaml.safe_dump({**site["values"], **changes}))
    done = run_ansible(
        "ansible-vault", "encrypt", str(site["vault"]), "--vault-password-file", str(site["password"])
    )
    assert done.returncode == 0, done.stderr
    assert site["vault"].read_text().startswith("$ANSIBLE_VAULT;")


def check_inputs(site):
    """The roles' input checks on the first host of the copied inventory, run locally."""
    playbook = site["dir"] / "check.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "postgresql[0]",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "ansible.builtin.include_role": {
                                "name": "postgresql",
                                "tasks_from": "validate.yml",
                            }
                        },
                        {"ansible.builtin.include_role": {"name": "backup", "tasks_from": "validate.yml"}},
                    ],
                }
            ]
        )
    )
    return run_ansible(
        "ansible-playbook",
        "-i",
        str(site["site"]),
        str(playbook),
        "--vault-password-file",
        str(site["password"]),
        "-e",
        "ansible_connection=local",
    )


def set_recipients(site, lines):
    """Replace the example's placeholder lines of backup_recipients, as a user would."""
    main = site["site"] / "group_vars" / "postgresql" / "main.yml"
    text = main.read_text()
    placeholders = re.findall(r'^  - "PGBACKUP-PUBLIC-KEY-V2 replace-with[^"]*"$', text, re.MULTILINE)
    assert len(placeholders) == len(lines) == 2
    for placeholder, line in zip(placeholders, lines, strict=True):
        text = text.replace(placeholder, f'  - "{line}"')
    main.write_text(text)


def test_filled_keys_and_vault_pass_the_checks(site):
    set_recipients(site, [site["keys"]["ops"]["key.pub"], site["keys"]["escrow"]["key.pub"]])
    encrypt(site, vault_backup_private_keys=[site["keys"]["ops"]["key"]])
    result = check_inputs(site)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout + result.stderr


def test_the_examples_placeholder_keys_stop_the_play(site):
    encrypt(site)
    result = check_inputs(site)
    assert result.returncode != 0
    assert "backup_recipients is malformed" in " ".join(result.stdout.split())


def test_a_private_key_pasted_among_the_recipients_stops_the_play_unshown(site):
    set_recipients(site, [site["keys"]["ops"]["key.pub"], site["keys"]["ops"]["key"]])
    encrypt(site, vault_backup_private_keys=[site["keys"]["ops"]["key"]])
    result = check_inputs(site)
    assert result.returncode != 0
    assert "holds a private key" in " ".join(result.stdout.split())
    assert site["keys"]["ops"]["key"].split()[-1] not in result.stdout + result.stderr
