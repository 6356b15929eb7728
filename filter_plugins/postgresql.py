"""Filters that render PostgreSQL configuration from Ansible data."""

from __future__ import annotations

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


class FilterModule:
    def filters(self):
        return {"postgresql_conf_value": postgresql_conf_value, "pg_hba_line": pg_hba_line}
