#!/usr/bin/python
"""Ansible module: prune pgbackup sets past their retention."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: backup_retention
short_description: Delete pgbackup sets older than the retention period, safely
description:
  - Orders the complete backup sets in O(dest) by the backup time in their manifests (not by
    folder name), then deletes those older than O(keep_days).
  - Never deletes the newest complete set, never leaves fewer than O(min_keep) complete sets,
    never deletes a set that a running verify or restore holds, and removes leftovers of
    interrupted backups (C(.partial-*)) once they are a day old.
  - Folders that look like sets but have no valid manifest are reported in RV(invalid) and left alone.
version_added: "0.1.0"
options:
  dest:
    description: Backup directory holding the sets.
    type: path
    required: true
  keep_days:
    description: Keep every set younger than this many days.
    type: int
    default: 30
  min_keep:
    description: Always keep at least this many of the newest complete sets.
    type: int
    default: 7
  kind:
    description: Which sets this retention applies to; logical and physical sets are kept separately.
    type: str
    choices: [logical, physical]
    default: logical
attributes:
  check_mode:
    support: full
    details: Reports what would be removed and removes nothing.
  diff_mode:
    support: none
author:
  - pgbackup project
"""

EXAMPLES = r"""
- name: Keep 30 days of backups, and never fewer than 7 sets
  backup_retention:
    dest: /var/backups/postgresql
    keep_days: 30
    min_keep: 7
  register: retention

- name: Pick the newest complete set for a restore
  ansible.builtin.set_fact:
    latest_set: "{{ retention.sets | pgbackup_latest_set }}"
"""

RETURN = r"""
removed:
  description: Sets deleted (or, in check mode, that would be).
  returned: always
  type: list
  elements: str
  sample: [logical-20261020T020000Z]
leftovers_removed:
  description: Incomplete leftovers deleted.
  returned: always
  type: list
  elements: str
  sample: [.partial-logical-20261101T020000Z]
kept:
  description: Complete sets kept.
  returned: always
  type: list
  elements: str
  sample: [logical-20261125T020000Z]
held:
  description: Sets past retention that were kept because a verify or restore was using them.
  returned: always
  type: list
  elements: str
  sample: []
invalid:
  description: Set-like folders without a valid manifest, left alone for a person to look at.
  returned: always
  type: list
  elements: str
  sample: []
sets:
  description: Every set after pruning, newest complete set first (as C(pgbackup list --json) prints).
  returned: always
  type: list
  elements: dict
  sample: [{"name": "logical-20261125T020000Z", "status": "complete", "started_at": "2026-11-25T02:00:00Z"}]
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.pgbackup import retention
from ansible.module_utils.pgbackup.errors import PgBackupError


def main():
    module = AnsibleModule(
        argument_spec={
            "dest": {"type": "path", "required": True},
            "keep_days": {"type": "int", "default": 30},
            "min_keep": {"type": "int", "default": 7},
            "kind": {"type": "str", "choices": ["logical", "physical"], "default": "logical"},
        },
        supports_check_mode=True,
    )
    params = module.params
    try:
        report = retention.prune(
            params["dest"],
            keep_days=params["keep_days"],
            min_keep=params["min_keep"],
            dry_run=module.check_mode,
            kind=params["kind"],
        )
        sets = retention.scan(params["dest"])
    except PgBackupError as error:
        module.fail_json(msg=str(error))
    report.pop("dry_run")
    module.exit_json(changed=bool(report["removed"] or report["leftovers_removed"]), sets=sets, **report)


if __name__ == "__main__":
    main()
