"""The manifest of a backup set: what it holds, and proof that it was not altered."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import re

from . import crypto
from .crypto import KeyRing, Recipients, SymmetricKey
from .errors import CorruptError, PgBackupError
from .fsutil import open_no_follow

MANIFEST_NAME = "manifest.json"
FORMAT = "pgbackup-set"
# Version 1: files and MAC under one symmetric key; version 2: public-key wrapped.
FORMAT_VERSIONS = (1, 2)
PARTIAL_PREFIX = ".partial-"
DELETING_PREFIX = ".deleting-"
# Plaintext staging of a restore, beside the set or in --staging-dir.
RESTORE_PREFIX = ".restore-"
# The file that marks a staging folder as pgbackup's own, for the leftover cleanup.
STAGING_MARK = ".pgbackup-staging"
SET_NAME = re.compile(r"^(logical|physical)-\d{8}T\d{6}Z(-\d+)?\Z")  # \Z: no trailing newline
_MAC_LABEL = b"pgbackup manifest mac v1"
_MAC_LABEL_V2 = b"pgbackup manifest mac v2"


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


def key_fields(to: Recipients | SymmetricKey) -> dict:
    """The manifest fields that say whom a new set is for, and so its format version."""
    if isinstance(to, Recipients):
        return {"format_version": 2, "recipients": to.key_ids}
    return {"format_version": 1, "key_id": to.key_id}


def key_ids(manifest: dict) -> list[str]:
    """The ids of the keys that read a set: any one of them is enough."""
    found = [manifest.get("key_id")] if manifest.get("format_version") == 1 else manifest.get("recipients")
    return list(found) if isinstance(found, list) else []


def _context(manifest: dict) -> bytes:
    # The seal is bound to the set's kind and name: moved or renamed, it checks out no more.
    return f"pgbackup manifest v2\0{manifest.get('kind')}\0{manifest.get('name')}".encode()


def _mac(mac_key: bytes, manifest: dict) -> str:
    return hmac.new(mac_key, _canonical(manifest), hashlib.sha256).hexdigest()


def _mac_key_v2(secret: bytes, manifest: dict) -> bytes:
    return hmac.new(secret, _MAC_LABEL_V2 + _context(manifest), hashlib.sha256).digest()


def seal(manifest: dict, to: Recipients | SymmetricKey) -> dict:
    """Add a MAC over the manifest, so that files cannot be swapped or dropped along with
    it. Version 2: the MAC key is random, wrapped for the recipients like a file's key,
    so only a private key checks it (and a host that writes sets holds none)."""
    if isinstance(to, SymmetricKey):
        mac_key = hmac.new(to.material, _MAC_LABEL, hashlib.sha256).digest()
    else:
        secret = os.urandom(crypto.KEY_BYTES)
        ephemeral, stanzas = crypto.wrap_for(secret, to, _context(manifest))
        manifest["seal"] = {
            "ephemeral": ephemeral.hex(),
            "keys": [{"key_id": key_id, "wrapped": wrapped.hex()} for key_id, wrapped in stanzas],
        }
        mac_key = _mac_key_v2(secret, manifest)
    manifest["mac"] = _mac(mac_key, manifest)
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
    if manifest.get("format_version") not in FORMAT_VERSIONS:
        raise CorruptError(
            f"{path} has manifest version {manifest.get('format_version')}; this pgbackup reads "
            f"{' and '.join(map(str, FORMAT_VERSIONS))}"
        )
    check_binding(manifest, set_path)
    check_shape(manifest, path)
    return manifest


_KEY_ID = re.compile(r"^[0-9a-f]{16}\Z")
# A file's path in its set: `name` or `folder/name`, plain names only (no `..`, no
# absolute path), so that nothing a manifest says can reach outside the set or staging.
_SET_PATH = re.compile(r"^(?!\.\.?(/|\Z))[A-Za-z0-9_.-]+(/(?!\.\.?\Z)[A-Za-z0-9_.-]+)?\Z")
_FILE_NAME = re.compile(r"^(?!\.\.?\Z)[A-Za-z0-9_.-]+\Z")


def check_shape(manifest: dict, path: str):
    """Refuse a manifest whose fields have the wrong types or whose paths would leave
    the set: it is read before anything authenticates it (list, prune, the host's check)."""

    def refuse(what: str):
        raise CorruptError(f"{path} is damaged or hostile: {what}")

    ids = key_ids(manifest) if isinstance(manifest.get("recipients", []), list) else None
    if not ids or not all(isinstance(key_id, str) and _KEY_ID.match(key_id) for key_id in ids):
        refuse("its key ids are not 16 hex digits")
    if manifest.get("format_version") == 2 and not isinstance(manifest.get("seal"), dict):
        refuse("it has no seal")
    if not isinstance(manifest.get("databases", []), list) or not isinstance(manifest.get("base", []), list):
        refuse("its lists of files are not lists")
    for database in manifest.get("databases", []):
        if not isinstance(database, dict) or not isinstance(database.get("name"), str):
            refuse("a database entry has no name")
        if not isinstance(database.get("files"), list) or not database["files"]:
            refuse(f"database {database['name']!r} lists no files")
    for entry, _database in files_of(manifest):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("path"), str)
            or not _SET_PATH.match(entry["path"])
        ):
            refuse(f"a file path is not a plain path inside the set: {str(entry)[:80]!r}")
        if "name" in entry and not (isinstance(entry["name"], str) and _FILE_NAME.match(entry["name"])):
            refuse(f"a file name is not a plain name: {str(entry['name'])[:80]!r}")
        if not all(isinstance(entry.get(field), int) for field in ("size", "plaintext_size")):
            refuse(f"{entry['path']} has no sizes")
        if not isinstance(entry.get("sha256"), str):
            refuse(f"{entry['path']} has no hash")


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


def check(manifest: dict, keys: KeyRing, set_path: str):
    """Refuse a manifest none of the keys can check, or altered since it was written."""
    what = f"backup set {set_path}"
    keys = crypto.as_key_ring(keys)
    if manifest.get("format_version") == 1:
        key = keys.symmetric(manifest.get("key_id"), what)
        expected = _mac(hmac.new(key.material, _MAC_LABEL, hashlib.sha256).digest(), manifest)
    else:
        try:
            sealed = manifest["seal"]
            ephemeral = bytes.fromhex(sealed["ephemeral"])
            stanzas = [(entry["key_id"], bytes.fromhex(entry["wrapped"])) for entry in sealed["keys"]]
            if not all(isinstance(key_id, str) and _KEY_ID.match(key_id) for key_id, _ in stanzas):
                raise ValueError("key id")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CorruptError(f"{set_path}/{MANIFEST_NAME} has a damaged seal") from None
        try:
            secret = crypto.unwrap_secret(ephemeral, stanzas, keys, _context(manifest), what)
        except CorruptError:
            # The seal is bound to the set's kind and name: renamed, it no longer opens.
            raise CorruptError(
                f"{set_path}/{MANIFEST_NAME} was altered after the backup (its seal does not open "
                "under this name and kind, or was damaged)"
            ) from None
        expected = _mac(_mac_key_v2(secret, manifest), manifest)
    if not hmac.compare_digest(expected, str(manifest.get("mac", ""))):
        raise CorruptError(
            f"{set_path}/{MANIFEST_NAME} was altered after the backup (its MAC does not match)"
        )


def binding(set_path: str, entry: dict) -> str:
    """What a file of the set was written as: `<set name>/<path in the set>`."""
    return f"{os.path.basename(os.path.normpath(set_path))}/{entry['path']}"


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
