#!/usr/bin/python
"""Ansible module: an encrypted logical backup set, made by the pgbackup core."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pg_encrypted_dump
short_description: Make an encrypted, verified logical backup set of a PostgreSQL server
description:
  - Dumps the globals (C(pg_dumpall --globals-only)) and each database (C(pg_dump)) into a new
    date-stamped backup set under O(dest), compressed with zstd and encrypted with AES-256-GCM
    for the public keys of O(recipients); the host needs no key that reads backups.
  - The set is written under a temporary name and renamed only once every file and its
    C(manifest.json) are on disk, so a failed run never leaves a set that looks complete.
  - The same code runs as the C(pgbackup backup) command on database hosts.
version_added: "0.1.0"
options:
  dest:
    description: Backup directory; the set is a new folder in it. Created with mode 0700 if missing.
    type: path
    required: true
  recipients:
    description:
      - Public keys the set is encrypted for, each C(PGBACKUP-PUBLIC-KEY-V2 <64 hex>) as
        C(pgbackup keygen) writes it to the C(.pub) file. Any one of the matching private keys
        reads the set; the host that writes it needs none of them.
    type: list
    elements: str
  recipient_file:
    description: A public key file, or a folder of C(*.pub) files; added to O(recipients).
    type: path
  databases:
    description: Databases to dump. Omit for every database that accepts connections; C([]) dumps only the globals.
    type: list
    elements: str
  format:
    description: C(pg_dump) format. V(directory) allows parallel dumps with O(jobs).
    type: str
    choices: [custom, directory]
    default: custom
  jobs:
    description: Parallel C(pg_dump) jobs; needs O(format=directory) above 1.
    type: int
    default: 1
  compression_level:
    description: zstd level; 0 stores uncompressed (still encrypted).
    type: int
    default: 3
  threads:
    description: zstd worker threads.
    type: int
    default: 2
  login_host:
    description: Server host (libpq C(PGHOST)). Defaults to libpq's own default.
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
    description: Role to log in as (C(PGUSER)).
    type: str
  login_password:
    description: Password, passed to libpq through the environment, never on a command line. Prefer O(passfile).
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
    details: Connects and lists what would be dumped; writes nothing.
  diff_mode:
    support: none
notes:
  - Needs C(pg_dump) and C(pg_dumpall) of the server's major version or newer, and the Python
    libraries psycopg, cryptography and zstandard on the target.
author:
  - pgbackup project
"""

EXAMPLES = r"""
- name: Back up every database now
  pg_encrypted_dump:
    dest: /var/backups/postgresql
    recipient_file: /etc/pgbackup/recipients
    login_host: localhost
    login_user: pgbackup
    passfile: /etc/pgbackup/pgpass
    ssl_mode: verify-full
  register: backup

- name: Parallel dump of one large database
  pg_encrypted_dump:
    dest: /var/backups/postgresql
    recipients: "{{ backup_recipients }}"
    databases: [streaming]
    format: directory
    jobs: 4
"""

RETURN = r"""
path:
  description: Path of the new backup set.
  returned: success, not in check mode
  type: str
  sample: /var/backups/postgresql/logical-20261125T020000Z
name:
  description: Name of the new set.
  returned: success, not in check mode
  type: str
  sample: logical-20261125T020000Z
databases:
  description: Databases dumped (or, in check mode, that would be).
  returned: always
  type: list
  elements: str
  sample: [postgres, streaming]
total_size:
  description: Bytes of encrypted files in the set.
  returned: success, not in check mode
  type: int
  sample: 734003200
key_ids:
  description: Ids of the public keys the set is encrypted for; any one of their private keys reads it.
  returned: always
  type: list
  elements: str
  sample: [8f8223f5b3dae670, 0ed3a662a235baa0]
server_version:
  description: Version of the server dumped.
  returned: always
  type: str
  sample: "15.14 (Debian 15.14-0+deb12u1)"
started_at:
  description: UTC time the backup began.
  returned: success, not in check mode
  type: str
  sample: "2026-11-25T02:00:00Z"
finished_at:
  description: UTC time the backup ended.
  returned: success, not in check mode
  type: str
  sample: "2026-11-25T02:03:10Z"
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.pgbackup import backup
from ansible.module_utils.pgbackup.connection import (
    CONNECTION_ARGUMENT_SPEC,
    RECIPIENT_ARGUMENT_SPEC,
    RECIPIENT_REQUIRED_ONE_OF,
    apply_connection_params,
    recipients_from_params,
)
from ansible.module_utils.pgbackup.errors import PgBackupError


def main():
    argument_spec = {
        **CONNECTION_ARGUMENT_SPEC,
        **RECIPIENT_ARGUMENT_SPEC,
        "dest": {"type": "path", "required": True},
        "databases": {"type": "list", "elements": "str"},
        "format": {"type": "str", "choices": list(backup.FORMATS), "default": "custom"},
        "jobs": {"type": "int", "default": 1},
        "compression_level": {"type": "int", "default": 3},
        "threads": {"type": "int", "default": 2},
    }
    module = AnsibleModule(
        argument_spec=argument_spec,
        required_one_of=RECIPIENT_REQUIRED_ONE_OF,
        supports_check_mode=True,
    )
    params = module.params
    apply_connection_params(params)
    try:
        recipients = recipients_from_params(params)
        if module.check_mode:
            plan = backup.plan(params["databases"])
            module.exit_json(
                changed=True,
                databases=[database["name"] for database in plan["databases"]],
                key_ids=recipients.key_ids,
                server_version=plan["server"]["version"],
            )
        record = backup.create_backup_set(
            params["dest"],
            recipients,
            databases=params["databases"],
            dump_format=params["format"],
            jobs=params["jobs"],
            compression_level=params["compression_level"],
            threads=params["threads"],
        )
    except PgBackupError as error:
        module.fail_json(msg=str(error))
    module.exit_json(
        changed=True,
        path=record["path"],
        name=record["name"],
        databases=[database["name"] for database in record["databases"]],
        total_size=record["total_size"],
        key_ids=record["recipients"],
        server_version=record["server"]["version"],
        started_at=record["started_at"],
        finished_at=record["finished_at"],
    )


if __name__ == "__main__":
    main()
