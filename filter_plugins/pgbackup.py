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


# What a key given as text must be: a recipient (public), or a key that reads sets
# (a private key, or a format version 1 key for the sets made before version 2).
_KEY_KINDS = {"public": (crypto.PublicKey,), "reading": (crypto.PrivateKey, crypto.SymmetricKey)}


def pgbackup_key_problem(text, kind: str = "public", name: str = "backup_recipients") -> str:
    """Why a key from the inventory cannot be used as a `kind` key ("" when it can), by
    the very parser the hosts use. The message never repeats the key's material."""
    try:
        key = crypto.parse_key(str(text).encode(), name)
    except crypto.KeyFileError as error:
        return str(error)
    if isinstance(key, _KEY_KINDS[kind]):
        return ""
    if isinstance(key, crypto.PrivateKey) and kind == "public":
        return (
            f"{name} holds a private key (id {key.key_id}): it reads every backup and must not reach "
            "a database host; give its public key (the .pub line) here and keep the private key in the vault"
        )
    if isinstance(key, crypto.SymmetricKey) and kind == "public":
        return (
            f"{name} holds a format version 1 key (id {key.key_id}): new backups are written for public "
            "keys (`make keygen`); keep this one in the vault's private keys to restore old sets"
        )
    return f"{name} holds a public key (id {key.key_id}); a private key is needed here"


def pgbackup_keys_problem(texts, kind: str = "public", name: str = "backup_recipients") -> str:
    """The first problem pgbackup_key_problem finds in a list of keys ("" when none)."""
    return next(
        (problem for problem in (pgbackup_key_problem(text, kind, name) for text in texts) if problem), ""
    )


def pgbackup_key_id(text) -> str:
    """The key id of a key given as text (public, private or version 1)."""
    try:
        return crypto.parse_key(str(text).encode(), "key").key_id
    except crypto.KeyFileError as error:
        raise AnsibleFilterError(f"pgbackup_key_id: {error}") from None


def pgbackup_key_report(sets_by_host: dict, vault_keys: list, recipients: list) -> dict:
    """What key rotation needs to know, over every host of the play: which sets no key in
    the vault reads (a set needs any one of its keys), which vault keys some set still
    needs, and which none does. `sets_by_host` maps a host to its `pgbackup list --json`."""
    vault = {pgbackup_key_id(text) for text in vault_keys}
    recipient_ids = [pgbackup_key_id(text) for text in recipients]
    needed: dict[str, list[tuple[str, str]]] = {}
    unreadable = []
    for host, sets in sorted(sets_by_host.items()):
        for entry in sets:
            if entry.get("status") != "complete":
                continue
            ids = entry.get("key_ids") or []
            for key_id in ids:
                needed.setdefault(key_id, []).append((entry["started_at"], f"{host}:{entry['name']}"))
            if not vault.intersection(ids):
                unreadable.append(f"{host}:{entry['name']} (keys {', '.join(ids)})")
    lines = [f"new sets are written for {', '.join(recipient_ids)}"]
    for key_id in sorted(needed, key=lambda key_id: -len(needed[key_id])):
        where = needed[key_id]
        held = "in the vault" if key_id in vault else "NOT in the vault (escrow?)"
        lines.append(f"key {key_id} ({held}) reads {len(where)} set(s), the newest {max(where)[1]}")
    retire = sorted(vault - set(needed) - set(recipient_ids))
    lines += [
        f"key {key_id} reads no set on these hosts: remove it from the vault once the off-site "
        "copies (kept backup_offsite_keep_days) that need it are gone too"
        for key_id in retire
    ]
    lines += [
        f"WARNING: no key in the vault reads {entry}: only an escrow key restores it" for entry in unreadable
    ]
    lines += [
        f"recipient {key_id} has no private key in the vault (an escrow key kept offline?)"
        for key_id in recipient_ids
        if key_id not in vault
    ]
    return {
        "lines": lines,
        "unreadable": unreadable,
        "retire": retire,
        "needed": {key_id: [name for _, name in sorted(where)] for key_id, where in needed.items()},
    }


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
            "pgbackup_keys_problem": pgbackup_keys_problem,
            "pgbackup_key_id": pgbackup_key_id,
            "pgbackup_key_report": pgbackup_key_report,
            "pgbackup_cron_problem": pgbackup_cron_problem,
            "pgbackup_unknown_variables": pgbackup_unknown_variables,
        }
