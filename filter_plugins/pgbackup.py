"""Filters over pgbackup results, backed by the same core the modules use."""

from __future__ import annotations

import os
import sys

from ansible.errors import AnsibleFilterError

# The core lives in module_utils/ beside this folder; one copy of the logic.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "module_utils"))

from pgbackup import crypto, retention


def pgbackup_latest_set(sets):
    """The newest complete set from `backup_retention`'s `sets` or `pgbackup list --json`."""
    if not isinstance(sets, list):
        raise AnsibleFilterError("pgbackup_latest_set expects a list of sets")
    latest = retention.latest_complete(sets)
    if latest is None:
        raise AnsibleFilterError("pgbackup_latest_set: there is no complete backup set")
    return latest


def pgbackup_key_problem(key_hex) -> str:
    """Why a key from the vault cannot be used ("" when it can), by the very check the
    hosts apply: 64 hex characters, and random (not the example's all-zero key)."""
    try:
        crypto.parse_key(str(key_hex).encode(), "backup_key")
    except crypto.KeyFileError as error:
        return str(error)
    return ""


class FilterModule:
    def filters(self):
        return {"pgbackup_latest_set": pgbackup_latest_set, "pgbackup_key_problem": pgbackup_key_problem}
