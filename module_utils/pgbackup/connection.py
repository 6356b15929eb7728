"""What the Ansible modules share: connection options and key handling.

The modules pass connection settings to libpq through the environment of their
own process (and so of pg_dump and friends), never on a command line.
"""

from __future__ import annotations

import os

from .crypto import (
    KeyRing,
    PublicKey,
    Recipients,
    load_key_ring,
    load_recipients,
    parse_key,
    parse_public_keys,
    recipients_of,
)
from .errors import KeyFileError

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

# Reading sets: a private key (or a version 1 key), as a file, a key ring folder or text.
KEY_ARGUMENT_SPEC = {
    "key_file": {"type": "path", "no_log": False},
    "key": {"type": "str", "no_log": True},
}
KEY_MUTUALLY_EXCLUSIVE = [["key_file", "key"]]
KEY_REQUIRED_ONE_OF = [["key_file", "key"]]
# Writing sets: public keys only, as text or files (a folder of *.pub files). Public keys
# are no secret, but a private key pasted here by mistake must not reach Ansible's output.
RECIPIENT_ARGUMENT_SPEC = {
    "recipients": {"type": "list", "elements": "str", "no_log": True},
    "recipient_file": {"type": "path"},
}
RECIPIENT_REQUIRED_ONE_OF = [["recipients", "recipient_file"]]

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


def keys_from_params(params: dict) -> KeyRing:
    """The keys of a module's `key` (text) or `key_file` (a file or key ring folder)."""
    if params.get("key") is not None:
        key = parse_key(params["key"].encode(), "the key given in the module's `key` option")
        if isinstance(key, PublicKey):
            raise KeyFileError(
                f"the module's `key` option holds a public key (id {key.key_id}): it cannot read "
                "backups; give a private key"
            )
        return KeyRing([key])
    return load_key_ring([params["key_file"]])


def recipients_from_params(params: dict) -> Recipients:
    """Whom a module's new set is for: `recipients` (public key lines) and `recipient_file`."""
    keys = list(load_recipients([params["recipient_file"]]).keys) if params.get("recipient_file") else []
    return recipients_of(keys + parse_public_keys(params.get("recipients") or [], "recipients"))
