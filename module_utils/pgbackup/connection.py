"""What the Ansible modules share: connection options and key handling.

The modules pass connection settings to libpq through the environment of their
own process (and so of pg_dump and friends), never on a command line.
"""

from __future__ import annotations

import os

from .crypto import Key, load_key, parse_key

DEFAULT_SSLMODE = "verify-full"

CONNECTION_ARGUMENT_SPEC = {
    "login_host": {"type": "str"},
    "login_hostaddr": {"type": "str"},
    "login_port": {"type": "int"},
    "login_user": {"type": "str"},
    "login_password": {"type": "str", "no_log": True},
    "passfile": {"type": "path"},
    # verify-full, not libpq's `prefer`: a backup sends a password and receives every row.
    "ssl_mode": {
        "type": "str",
        "choices": ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"],
        "default": DEFAULT_SSLMODE,
    },
    "ssl_rootcert": {"type": "path"},
}

KEY_ARGUMENT_SPEC = {
    "key_file": {"type": "path", "no_log": False},
    "key": {"type": "str", "no_log": True},
}
KEY_MUTUALLY_EXCLUSIVE = [["key_file", "key"]]
KEY_REQUIRED_ONE_OF = [["key_file", "key"]]

_LIBPQ_ENVIRONMENT = {
    "login_host": "PGHOST",
    "login_hostaddr": "PGHOSTADDR",
    "login_port": "PGPORT",
    "login_user": "PGUSER",
    "login_password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "ssl_mode": "PGSSLMODE",
    "ssl_rootcert": "PGSSLROOTCERT",
}


def apply_connection_params(params: dict):
    for option, variable in _LIBPQ_ENVIRONMENT.items():
        if params.get(option) is not None:
            os.environ[variable] = str(params[option])


def key_from_params(params: dict, writing: bool = False) -> Key:
    """The key of a module's `key` or `key_file` option; `writing` for new backups,
    which refuse a key that is not random (reading old sets only warns)."""
    if params.get("key") is not None:
        return parse_key(params["key"].encode(), "the key given in the module's `key` option", writing)
    return load_key(params["key_file"], writing)
