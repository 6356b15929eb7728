#!/usr/bin/python
"""Ansible module: verify an encrypted backup set, then restore it safely."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_encrypted_restore
short_description: Verify and restore a pgbackup logical backup set
description:
  - Checks the set's manifest, and each file's header and size, before the server is touched;
    writes no plaintext to disk. Each database loads into a scratch database of its own straight
    from the decrypting pipes, every chunk authenticated before pg_restore reads it.
  - The scratch databases are renamed into place together, in one transaction, only once every
    file has checked out whole (final chunk, size and SHA-256). A set with a bad file anywhere,
    or any other failure, replaces no database and leaves every target as it was.
  - With O(globals=true) the roles and tablespaces are restored first, before the databases
    load (their owners and grants name them); a bad database file found later does not undo them.
  - An existing non-empty target database is refused unless O(force=true); it is then kept under
    a new name (C(<name>_pre_restore_<time>)), never dropped. A target with open sessions is
    always refused.
version_added: "0.1.0"
options:
  set_path:
    description: Path of the backup set (a folder with C(manifest.json)).
    type: path
    required: true
  key_file:
    description:
      - A private key file (C(pgbackup keygen) writes one), or a key ring folder of C(*.key) files;
        the set names the key id it needs. Version 1 sets take their 64-hex-character key file.
    type: path
  key:
    description:
      - The text of a private key file (from the vault). Exclusive with O(key_file). Prefer
        O(key_file) on a tmpfs, as C(playbooks/restore.yml) does.
    type: str
  databases:
    description: Databases to restore from the set. Omit for all; C([]) with O(globals=true) restores only the globals.
    type: list
    elements: str
  target_db:
    description: Restore the one database in O(databases) under this name instead.
    type: str
  jobs:
    description: Parallel C(pg_restore) jobs.
    type: int
    default: 1
  globals:
    description: Restore roles and tablespaces first (existing roles are kept).
    type: bool
    default: false
  force:
    description: Replace an existing non-empty database; the current one is kept under a new name.
    type: bool
    default: false
  space_check:
    description:
      - Refuse when the server's data directory has less free space than the databases took at
        backup time (bloat included). V(false) restores anyway.
    type: bool
    default: true
  login_host:
    description: Server host (C(PGHOST)).
    type: str
  login_hostaddr:
    description:
      - IP address to connect to (C(PGHOSTADDR)); O(login_host) is then only the name the server
        certificate is checked against. Lets a host reach itself over loopback with a certificate
        issued for its real name.
    type: str
  login_port:
    description: Server port (C(PGPORT)).
    type: int
  login_user:
    description: Role to log in as; it needs to create databases (C(PGUSER)).
    type: str
  login_password:
    description: Password, passed through the environment, never on a command line.
    type: str
  passfile:
    description: libpq password file (C(PGPASSFILE)).
    type: path
  ssl_mode:
    description:
      - libpq C(sslmode). V(verify-full) by default, not libpq's V(prefer) (ignored over a Unix socket).
      - With V(verify-full), O(ssl_rootcert) names the CA (or CA bundle) that issued the server certificate.
    type: str
    choices: [disable, allow, prefer, require, verify-ca, verify-full]
    default: verify-full
  ssl_rootcert:
    description: CA certificate to verify the server with (C(PGSSLROOTCERT)).
    type: path
attributes:
  check_mode:
    support: full
    details: Checks the manifest and key, each file's header and size, the targets (existing, empty, in use) and the server's free space, and reports the plan; decrypts nothing and writes nothing.
  diff_mode:
    support: none
author:
  - pgbackup project
"""

EXAMPLES = r"""
- name: Restore one database beside the live one, to compare
  pg_encrypted_restore:
    set_path: /var/backups/postgresql/logical-20261125T020000Z
    key_file: /run/pgbackup-restore/keys
    databases: [streaming]
    target_db: streaming_restored
    jobs: 2

- name: Rebuild a cluster from scratch
  pg_encrypted_restore:
    set_path: "{{ latest.path }}"
    key: "{{ vault_backup_private_keys[0] }}"
    globals: true
"""

RETURN = r"""
set:
  description: Absolute path of the set.
  returned: always
  type: str
  sample: /var/backups/postgresql/logical-20261125T020000Z
name:
  description: Name of the set.
  returned: always
  type: str
  sample: logical-20261125T020000Z
databases:
  description: One item per database; C(kept_previous_as) names the database that was replaced, if any.
    In check mode C(action) says what would happen (V(create), V(replace-empty), V(keep-previous)).
  returned: always
  type: list
  elements: dict
  sample: [{"database": "streaming", "target": "streaming_restored", "kept_previous_as": null}]
space:
  description:
    - The space the databases took at backup time (C(needed_bytes)), and the free space in the server's
      data directory (C(free_bytes)) counting what dropping C(would_drop) frees. C(data_directory) and
      C(free_bytes) are null where the data directory is not visible from the host the module runs on.
    - Returned whatever O(space_check) says; with it, check mode fails as the restore would when space is short.
  returned: check mode
  type: dict
  sample: {"data_directory": "/var/lib/postgresql/15/main", "needed_bytes": 1610612736, "free_bytes": 42949672960}
would_drop:
  description: Scratch databases left by restores that were killed, which the restore would drop first.
  returned: check mode
  type: list
  elements: str
  sample: []
globals:
  description: Whether the globals were restored.
  returned: success, not in check mode
  type: bool
  sample: false
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.pgbackup import restore
from ansible.module_utils.pgbackup.connection import (
    CONNECTION_ARGUMENT_SPEC,
    KEY_ARGUMENT_SPEC,
    KEY_MUTUALLY_EXCLUSIVE,
    KEY_REQUIRED_ONE_OF,
    apply_connection_params,
    keys_from_params,
)
from ansible.module_utils.pgbackup.errors import PgBackupError


def main():
    argument_spec = {
        **CONNECTION_ARGUMENT_SPEC,
        **KEY_ARGUMENT_SPEC,
        "set_path": {"type": "path", "required": True},
        "databases": {"type": "list", "elements": "str"},
        "target_db": {"type": "str"},
        "jobs": {"type": "int", "default": 1},
        "globals": {"type": "bool", "default": False},
        "force": {"type": "bool", "default": False},
        "space_check": {"type": "bool", "default": True},
    }
    module = AnsibleModule(
        argument_spec=argument_spec,
        mutually_exclusive=KEY_MUTUALLY_EXCLUSIVE,
        required_one_of=KEY_REQUIRED_ONE_OF,
        supports_check_mode=True,
    )
    params = module.params
    apply_connection_params(params)
    try:
        keys = keys_from_params(params)
        # What is restored where: the plan (check mode) and the restore decide it alike.
        selection = {name: params[name] for name in ("databases", "target_db", "force")}
        if module.check_mode:
            plan = restore.plan_restore(
                params["set_path"], keys, **selection, check_space=params["space_check"]
            )
            module.exit_json(changed=True, **plan)
        report = restore.restore_set(
            params["set_path"],
            keys,
            **selection,
            jobs=params["jobs"],
            include_globals=params["globals"],
            check_space=params["space_check"],
        )
    except PgBackupError as error:
        module.fail_json(msg=str(error))
    module.exit_json(changed=True, **report)


if __name__ == "__main__":
    main()
