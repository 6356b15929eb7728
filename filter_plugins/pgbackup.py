"""Filters over pgbackup results, backed by the same core the modules use."""

from __future__ import annotations

import difflib
import os
import sys

from ansible.errors import AnsibleFilterError
from ansible.utils.display import Display

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
        crypto.parse_key(str(key_hex).encode(), "backup_key", writing=True)
    except crypto.KeyFileError as error:
        return str(error)
    return ""


CRON_RANGES = {"minute": (0, 59), "hour": (0, 23), "day": (1, 31), "month": (1, 12), "weekday": (0, 7)}
CRON_NAMES = {
    "month": ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
    "weekday": ["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
}


def pgbackup_cron_problem(value, field: str) -> str:
    """Why a cron field cannot work ("" when it can): `*`, numbers, ranges, steps and
    lists, each within the field's range (minute 0-59, hour 0-23, day 1-31, ...)."""
    low, high = CRON_RANGES[field]
    names = CRON_NAMES.get(field, [])

    def number(text: str) -> int:
        if text.lower() in names:
            return names.index(text.lower()) + (1 if field == "month" else 0)
        if not text.isdigit():
            raise ValueError(text)
        found = int(text)
        if not low <= found <= high:
            raise ValueError(text)
        return found

    text = str(value).strip()
    try:
        for item in text.split(","):
            span, _, step = item.partition("/")
            if step and (not step.isdigit() or int(step) < 1):
                raise ValueError(item)
            if span != "*":
                first, _, last = span.partition("-")
                if last and number(first) > number(last):
                    raise ValueError(item)
                number(first)
    except ValueError:
        return f"cron {field} {text!r} is not valid: use *, numbers {low}-{high}, ranges, steps or lists"
    return ""


def pgbackup_unknown_variables(names, known, prefix: str) -> list:
    """Variables in a role's namespace that the role does not know, each with the name
    it most likely meant; each is also shown as a warning."""
    known = set(known)
    unknown = sorted(name for name in names if name.startswith(prefix) and name not in known)
    found = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        message = f"{name} is not a variable of this role" + (f"; did you mean {close[0]}?" if close else "")
        Display().warning(message)
        found.append(message)
    return found


class FilterModule:
    def filters(self):
        return {
            "pgbackup_latest_set": pgbackup_latest_set,
            "pgbackup_key_problem": pgbackup_key_problem,
            "pgbackup_cron_problem": pgbackup_cron_problem,
            "pgbackup_unknown_variables": pgbackup_unknown_variables,
        }
