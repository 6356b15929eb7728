"""Filters that render PostgreSQL configuration from Ansible data."""

from __future__ import annotations

import re

from ansible.errors import AnsibleFilterError


def postgresql_conf_value(value):
    """Render one postgresql.conf value: booleans as on/off, numbers bare, text quoted."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    if value is None:
        raise AnsibleFilterError("postgresql_conf_value: a setting has no value (None)")
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def pg_hba_line(entry):
    """Render one pg_hba.conf line from a dict with type, database, user, address, method."""
    try:
        fields = [entry["type"], entry["database"], entry["user"]]
        if entry["type"] != "local":
            fields.append(entry["address"])
        fields.append(entry["method"])
    except KeyError as missing:
        raise AnsibleFilterError(f"pg_hba_line: entry {entry!r} lacks the key {missing}") from None
    line = "  ".join(str(field) for field in fields)
    options = entry.get("options")
    return f"{line}  {options}" if options else line


def pg_conninfo(params: dict) -> str:
    """A libpq connection string from a dict: every value quoted, quotes and backslashes
    escaped, so a value with spaces or quotes stays one value."""
    parts = []
    for key, value in params.items():
        if not str(key).isidentifier():
            raise AnsibleFilterError(f"pg_conninfo: {key!r} is not a connection parameter name")
        text = str(value).replace("\\", "\\\\").replace("'", "\\'")
        parts.append(f"{key}='{text}'")
    return " ".join(parts)


def pg_slot_name(host: str) -> str:
    """The physical replication slot of a standby, from its host name: slot names allow
    lower-case letters, digits and underscores only. The primary creates the slot and
    the standby streams through it by this one name."""
    return re.sub(r"[^a-z0-9_]", "_", str(host).lower())


def pgpass_line(fields) -> str:
    """One passfile line from [host, port, database, user, password]: backslash and colon
    escaped in every field (libpq's rule), so a password holding either is read back as
    given. A line break cannot be written in a passfile and is refused."""
    if not isinstance(fields, (list, tuple)) or len(fields) != 5:
        raise AnsibleFilterError("pgpass_line: give [host, port, database, user, password]")
    if any("\n" in str(field) or "\r" in str(field) for field in fields):
        raise AnsibleFilterError("pgpass_line: a passfile field cannot hold a line break")
    return ":".join(str(field).replace("\\", "\\\\").replace(":", "\\:") for field in fields)


def patroni_parameters(settings: dict) -> dict:
    """Server settings as Patroni's `postgresql.parameters` want them: booleans as
    on/off (Patroni passes values to PostgreSQL as text), the rest unchanged."""
    return {
        name: ("on" if value else "off") if isinstance(value, bool) else value
        for name, value in settings.items()
    }


class FilterModule:
    def filters(self):
        return {
            "postgresql_conf_value": postgresql_conf_value,
            "pg_hba_line": pg_hba_line,
            "pg_conninfo": pg_conninfo,
            "pg_slot_name": pg_slot_name,
            "pgpass_line": pgpass_line,
            "patroni_parameters": patroni_parameters,
        }
