"""The manifest of a backup set: what it holds, and proof that it was not altered."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import re

from .crypto import Key
from .errors import CorruptError, PgBackupError, WrongKeyError
from .fsutil import open_no_follow

MANIFEST_NAME = "manifest.json"
FORMAT = "pgbackup-set"
FORMAT_VERSION = 1
PARTIAL_PREFIX = ".partial-"
DELETING_PREFIX = ".deleting-"
# Plaintext staging of a restore, beside the set or in --staging-dir.
RESTORE_PREFIX = ".restore-"
# The file that marks a staging folder as pgbackup's own, for the leftover cleanup.
STAGING_MARK = ".pgbackup-staging"
SET_NAME = re.compile(r"^(logical|physical)-\d{8}T\d{6}Z(-\d+)?\Z")  # \Z: no trailing newline
_MAC_LABEL = b"pgbackup manifest mac v1"


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


# UTC time in names: set folders (`logical-20261125T020000Z`) and kept databases.
_COMPACT_TIME = "%Y%m%dT%H%M%SZ"


def compact_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime(_COMPACT_TIME)


def parse_compact_time(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, _COMPACT_TIME).replace(tzinfo=datetime.UTC)


def set_name(kind: str, moment: datetime.datetime) -> str:
    return f"{kind}-{compact_time(moment)}"


def time_of(name: str) -> datetime.datetime:
    """The start time a set's name carries (`kind-20261125T020000Z[-N]`)."""
    return parse_compact_time(name.split("-")[1])


def sequence(name: str) -> int:
    """Order of sets started in the same second: `kind-time` is 1, `kind-time-N` is N."""
    match = SET_NAME.match(name)
    return int(match.group(2)[1:]) if match and match.group(2) else 1


def _canonical(manifest: dict) -> bytes:
    body = {name: value for name, value in manifest.items() if name != "mac"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def seal(manifest: dict, key: Key) -> dict:
    """Add an HMAC over the manifest, so that files cannot be swapped along with it."""
    mac_key = hmac.new(key.material, _MAC_LABEL, hashlib.sha256).digest()
    manifest["mac"] = hmac.new(mac_key, _canonical(manifest), hashlib.sha256).hexdigest()
    return manifest


def load(set_path: str) -> dict:
    """The set's manifest, refused unless it describes this very folder: an older set
    copied over a newer one's name must not pass as the newer set."""
    path = os.path.join(set_path, MANIFEST_NAME)
    try:
        with os.fdopen(open_no_follow(path, os.O_RDONLY), encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        raise CorruptError(f"{set_path} has no {MANIFEST_NAME}: it is not a complete backup set") from None
    except (OSError, ValueError) as error:
        raise CorruptError(f"{path} cannot be read as JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptError(f"{path} is not a pgbackup manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorruptError(
            f"{path} has manifest version {manifest.get('format_version')}; expected {FORMAT_VERSION}"
        )
    check_binding(manifest, set_path)
    return manifest


def check_binding(manifest: dict, set_path: str):
    """Refuse a manifest that names another set, or a kind its folder name does not say."""
    folder = os.path.basename(os.path.normpath(set_path))
    named = SET_NAME.match(folder)
    if manifest.get("name") != folder or not named or manifest.get("kind") != named.group(1):
        raise CorruptError(
            f"{set_path}/{MANIFEST_NAME} describes set {manifest.get('name')!r} of kind "
            f"{manifest.get('kind')!r}, not this folder {folder!r}: a set was copied or renamed over "
            "another; restore it under its own name or not at all"
        )


def check(manifest: dict, key: Key, set_path: str):
    """Refuse a manifest made with another key, or altered since it was written."""
    if manifest.get("key_id") != key.key_id:
        raise WrongKeyError(
            f"backup set {set_path} was encrypted with key id {manifest.get('key_id')}, "
            f"but the key file given has key id {key.key_id}"
        )
    expected = seal(dict(manifest), key)["mac"]
    if not hmac.compare_digest(expected, str(manifest.get("mac", ""))):
        raise CorruptError(
            f"{set_path}/{MANIFEST_NAME} was altered after the backup (its MAC does not match)"
        )


def select_databases(available: list[dict], wanted: list[str] | None, where: str) -> list[dict]:
    """Pick databases by name, in the order asked. None means all; [] means none (globals
    only); a name not in `available` is an error that says `where` was looked at."""
    if wanted is None:
        return available
    by_name = {database["name"]: database for database in available}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise PgBackupError(
            f"database(s) not found {where}: {', '.join(missing)} (there: {', '.join(by_name) or 'none'})"
        )
    return [by_name[name] for name in wanted]


def files_of(manifest: dict):
    """Every encrypted file in the set, as (entry, database name or None)."""
    if manifest.get("globals"):
        yield manifest["globals"], None
    for entry in manifest.get("base", []):
        yield entry, None
    for database in manifest.get("databases", []):
        for entry in database["files"]:
            yield entry, database["name"]
