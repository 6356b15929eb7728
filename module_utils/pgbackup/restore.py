"""Verify a backup set, and restore it without ever losing what is there.

Restore is verify-then-write: every file it needs is decrypted and authenticated
into a private staging folder first, and the server is touched only after all of
them checked out. Each database is restored into a scratch database and renamed
into place at the end, so a failed restore leaves the target as it was; an
existing non-empty target is replaced only with --force, and is then kept under a
new name rather than dropped.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile

from . import manifest, pg
from .crypto import VERSION_PUBLIC_KEY, KeyRing, check_structure, decrypt_stream
from .errors import CorruptError, PgBackupError, RefusedError
from .fsutil import (
    check_set_folder,
    describe_os_error,
    hold,
    open_no_follow,
    remove_tree,
    require_free_space,
    require_owner,
)
from .retention import remove_leftovers, scan

log = logging.getLogger("pgbackup")

_IDENTIFIER_BYTES = 63
# A database replaced with --force is kept as <name>_pre_restore_<UTC time>.
KEPT_MARK = "_pre_restore_"
KEPT_NAME = re.compile(rf"{KEPT_MARK}(\d{{8}}T\d{{6}}Z)$")
# Where the backup role puts sets; a bare set name is looked up here.
DEFAULT_BACKUP_DIR = "/var/backups/postgresql"


class _Discard:
    def write(self, data):
        return len(data)


def _open_listed(set_path: str, entry: dict):
    path = os.path.join(set_path, entry["path"])
    try:
        return path, os.fdopen(open_no_follow(path, os.O_RDONLY), "rb")
    except FileNotFoundError:
        raise CorruptError(f"{path} is listed in the manifest but missing") from None


def _check_against_manifest(path: str, stats, entry: dict):
    if stats.sha256 != entry["sha256"] or stats.encrypted_bytes != entry["size"]:
        raise CorruptError(
            f"{path} does not match the manifest (SHA-256 or size differs): "
            "it was replaced by another file or altered"
        )
    if stats.plaintext_bytes is not None and stats.plaintext_bytes != entry["plaintext_size"]:
        raise CorruptError(
            f"{path} decrypts to {stats.plaintext_bytes} bytes; the manifest says {entry['plaintext_size']}"
        )


def _header_of_the_set(path: str, record: dict):
    """A check of a file's header: the set's format version and the set's key ids."""

    def check(header):
        expected_version = VERSION_PUBLIC_KEY if record["format_version"] == 2 else 1
        if header.version != expected_version or sorted(header.key_ids) != sorted(manifest.key_ids(record)):
            raise CorruptError(
                f"{path} is a version {header.version} file for key id(s) {', '.join(header.key_ids)}; "
                f"its set's manifest is version {record['format_version']} for "
                f"{', '.join(manifest.key_ids(record))}"
            )

    return check


def decrypt_checked(set_path: str, entry: dict, keys: KeyRing, target, record: dict) -> int:
    """Decrypt one file of the set into target and check it against the manifest."""
    path, source = _open_listed(set_path, entry)
    with source:
        stats = decrypt_stream(
            source,
            target,
            keys,
            name=path,
            binding=manifest.binding(set_path, entry),
            check_header=_header_of_the_set(path, record),
        )
    _check_against_manifest(path, stats, entry)
    return stats.plaintext_bytes


def check_file_structure(set_path: str, entry: dict, record: dict):
    """What a host without a private key can check of one file of a set: size and
    SHA-256 against the manifest, a header of the set's version written for this set,
    path and recipients, and every record framed up to one final record."""
    path, source = _open_listed(set_path, entry)
    with source:
        header, stats = check_structure(source, path, binding=manifest.binding(set_path, entry))
    _check_against_manifest(path, stats, entry)
    _header_of_the_set(path, record)(header)


def resolve_set(set_path: str) -> str:
    """The absolute path of a set named on the command line. A bare name that is not a
    folder here is looked up in the default backup directory; a set that does not exist
    is one clear line naming the sets that do."""
    if os.sep not in set_path and not os.path.lexists(set_path):
        in_default = os.path.join(DEFAULT_BACKUP_DIR, set_path)
        if os.path.lexists(in_default):
            return in_default
        set_path = in_default
    path = os.path.abspath(set_path)
    if os.path.lexists(path):
        if not os.path.islink(path) and not os.path.isdir(path):
            raise PgBackupError(f"{path} is a file, not a backup set folder")
        return path
    parent = os.path.dirname(path)
    try:
        there = [entry["name"] for entry in scan(parent) if entry["status"] == "complete"]
    except PgBackupError:
        raise PgBackupError(f"backup set {path} does not exist, nor does its folder {parent}") from None
    listing = ", ".join(there[:10]) + (f" and {len(there) - 10} more" if len(there) > 10 else "")
    raise PgBackupError(
        f"backup set {path} does not exist; "
        + (
            f"complete sets in {parent}, newest first: {listing}"
            if there
            else f"{parent} holds no complete set"
        )
    )


def open_set(set_path: str, keys: KeyRing | None, check_mac: bool = True) -> dict:
    """The manifest of a set whose folder holds nothing but plain files, bound to this
    folder, with its MAC checked by one of the keys (which reading a set needs);
    `check_mac=False` only for the check a host without a private key can make."""
    check_set_folder(set_path)
    record = manifest.load(set_path)
    if check_mac:
        if keys is None:
            raise PgBackupError(f"reading {set_path} needs its private key (--key-file)")
        manifest.check(record, keys, set_path)
    return record


def verify_set(set_path: str, keys: KeyRing | None = None) -> dict:
    """With keys: decrypt and authenticate every file of the set. Without (a database
    host holds only public keys): check every file's structure, size and hash against
    the manifest. Touches no database either way."""
    set_path = resolve_set(set_path)
    with hold(set_path, exclusive=False, wait=True, what=f"backup set {set_path}"):
        record = open_set(set_path, keys, check_mac=keys is not None)
        plaintext = 0
        count = 0
        for entry, _database in manifest.files_of(record):
            if keys is None:
                check_file_structure(set_path, entry, record)
                plaintext += entry["plaintext_size"]
            else:
                plaintext += decrypt_checked(set_path, entry, keys, _Discard(), record)
            count += 1
    log.info(
        "verified %s (%s): %d file(s), %d bytes of dump data",
        set_path,
        "decrypted" if keys is not None else "structure, sizes and hashes; no private key",
        count,
        plaintext,
    )
    return {
        "set": set_path,
        "name": record["name"],
        "files": count,
        "encrypted_bytes": record["total_size"],
        "plaintext_bytes": plaintext,
        "databases": [database["name"] for database in record["databases"]],
        "started_at": record["started_at"],
        "decrypted": keys is not None,
        "key_ids": manifest.key_ids(record),
    }


def _fit_identifier(base: str, suffix: str) -> str:
    """base + suffix cut to PostgreSQL's 63-byte identifier limit, suffix kept whole."""
    room = _IDENTIFIER_BYTES - len(suffix.encode())
    cut = base.encode()[:room].decode("utf-8", "ignore")
    return cut + suffix


def _preflight(targets: list[tuple[dict, str]], force: bool) -> dict[str, str]:
    """Check every target before anything is written; return each one's fate."""
    fates = {}
    with pg.connect() as conn:
        for _database, target in targets:
            if not pg.database_exists(conn, target):
                fates[target] = "create"
                continue
            objects = pg.user_object_count(target)
            if objects and not force:
                raise RefusedError(
                    f"database {target!r} exists and is not empty ({objects} relations or large objects); "
                    "restore under another name (--target-db) or pass --force to replace it "
                    "(the current database is kept under a new name)"
                )
            sessions = pg.sessions_after_grace(conn, target)
            if sessions:
                raise RefusedError(
                    f"database {target!r} is in use by {len(sessions)} session(s): {'; '.join(sessions)}; "
                    "stop its clients before restoring over it"
                )
            fates[target] = "keep-previous" if objects else "replace-empty"
    return fates


def _stage(
    set_path: str, record: dict, keys: KeyRing, staging: str, databases: list[dict], include_globals: bool
) -> dict:
    """Decrypt what the restore needs into staging; returns the staged paths."""
    staged = {}
    jobs = [(record["globals"], os.path.join(staging, "globals.sql"))] if include_globals else []
    for database in databases:
        if database["format"] == "directory":
            folder = os.path.join(staging, os.path.dirname(database["files"][0]["path"]))
            os.makedirs(folder, mode=0o700, exist_ok=True)
            staged[database["name"]] = folder
            jobs += [(entry, os.path.join(folder, entry["name"])) for entry in database["files"]]
        else:
            staged[database["name"]] = os.path.join(staging, database["files"][0]["path"])
            jobs.append((database["files"][0], staged[database["name"]]))
    for entry, path in jobs:
        try:
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as target:
                decrypt_checked(set_path, entry, keys, target, record)
        except OSError as error:
            raise describe_os_error(error, f"staging {entry['path']} in {staging}") from None
    if include_globals:
        staged[None] = os.path.join(staging, "globals.sql")
    return staged


def _restore_globals(path: str):
    text = pg.run_tool(
        [
            pg.tool("psql"),
            "--no-password",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=0",
            f"--dbname={pg.dbname_conninfo(pg.MAINTENANCE_DB)}",
            f"--file={path}",
        ],
        "restoring the globals (roles, tablespaces)",
    )
    # Roles that exist already (the one we log in as, at least) are expected.
    errors = [line for line in text.splitlines() if "ERROR:" in line and "already exists" not in line]
    if errors:
        raise PgBackupError(f"restoring the globals failed: {errors[0].strip()}")


def _plan(set_path: str, keys: KeyRing, databases: list[str] | None, target_db: str | None, force: bool):
    record = open_set(set_path, keys)
    if record["kind"] != "logical":
        raise PgBackupError(
            f"{set_path} is a {record['kind']} set (a base backup), not a dump: unpack it with "
            "`pgbackup restore-base SET --target-dir DIR`, the start of a point-in-time recovery"
        )
    selected = manifest.select_databases(record["databases"], databases, "in this backup set")
    if target_db is not None and len(selected) != 1:
        raise PgBackupError("--target-db needs exactly one --database to restore")
    targets = [(database, target_db or database["name"]) for database in selected]
    return record, selected, targets, _preflight(targets, force)


def plan_restore(
    set_path: str,
    keys: KeyRing,
    databases: list[str] | None = None,
    target_db: str | None = None,
    force: bool = False,
) -> dict:
    """What restore_set would do, and whether it would refuse; writes nothing."""
    set_path = resolve_set(set_path)
    with hold(set_path, exclusive=False, wait=True, what=f"backup set {set_path}"):
        record, _selected, targets, fates = _plan(set_path, keys, databases, target_db, force)
    return {
        "set": set_path,
        "name": record["name"],
        "databases": [
            {"database": database["name"], "target": target, "action": fates[target]}
            for database, target in targets
        ],
    }


def restore_set(
    set_path: str,
    keys: KeyRing,
    databases: list[str] | None = None,
    target_db: str | None = None,
    jobs: int = 1,
    include_globals: bool = False,
    force: bool = False,
    staging_dir: str | None = None,
) -> dict:
    set_path = resolve_set(set_path)
    if jobs < 1:
        raise PgBackupError("--jobs must be at least 1")
    with hold(set_path, exclusive=False, wait=True, what=f"backup set {set_path}"):
        record, selected, targets, fates = _plan(set_path, keys, databases, target_db, force)
        staging_parent = staging_dir or os.path.dirname(set_path)
        needed = sum(entry["plaintext_size"] for database in selected for entry in database["files"])
        if include_globals:
            needed += record["globals"]["plaintext_size"]
        require_owner(staging_parent, "restore (its staging folder goes there)")
        # Plaintext left by a restore that was killed goes before this one needs the space.
        for leftover in remove_leftovers(staging_parent, (manifest.RESTORE_PREFIX,)):
            log.warning("removed %s in %s, left by a restore that was killed", leftover, staging_parent)
        require_free_space(staging_parent, needed, "to stage the restore (choose another --staging-dir)")
        try:
            staging = tempfile.mkdtemp(prefix=manifest.RESTORE_PREFIX, dir=staging_parent)
            os.close(os.open(os.path.join(staging, manifest.STAGING_MARK), os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as error:
            raise describe_os_error(error, f"creating a staging folder in {staging_parent}") from None
        try:
            # Held for the whole restore: prune and later restores leave it alone, and
            # remove it once nothing holds it (a restore killed with SIGKILL).
            with hold(staging, exclusive=True, wait=False, what=f"restore staging {staging}"):
                staged = _stage(set_path, record, keys, staging, selected, include_globals)
                log.info("restore of %s: %d file set(s) verified and staged", set_path, len(staged))
                if include_globals:
                    _restore_globals(staged[None])
                    log.info("globals restored")
                results = [
                    _restore_database(database, target, staged[database["name"]], fates[target], jobs)
                    for database, target in targets
                ]
        finally:
            remove_tree(staging)
    return {"set": set_path, "name": record["name"], "globals": include_globals, "databases": results}


def _restore_database(database: dict, target: str, staged_path: str, fate: str, jobs: int) -> dict:
    suffix = manifest.compact_time(manifest.utc_now())
    scratch = _fit_identifier(f"pgbackup_restore_{os.getpid()}_", suffix)
    with pg.connect() as conn:
        pg.create_database(conn, scratch, database)
    try:
        pg.run_tool(
            [
                pg.tool("pg_restore"),
                "--no-password",
                "--exit-on-error",
                f"--jobs={jobs}",
                f"--dbname={pg.dbname_conninfo(scratch)}",
                staged_path,
            ],
            f"pg_restore of database {database['name']!r}",
        )
    except BaseException:
        with pg.connect() as conn:
            pg.drop_database(conn, scratch)
        raise
    kept_as = None
    with pg.connect(pg.admin_db_for(target)) as conn:
        try:
            sessions = pg.sessions_after_grace(conn, target) if fate != "create" else []
            if sessions:
                raise RefusedError(
                    f"database {target!r} got open sessions during the restore ({'; '.join(sessions)}); "
                    "nothing was replaced"
                )
            if fate == "keep-previous":
                kept_as = _fit_identifier(target, f"{KEPT_MARK}{suffix}")
                pg.rename_database(conn, target, kept_as)
            elif fate == "replace-empty":
                pg.drop_database(conn, target)
        except PgBackupError:
            pg.drop_database(conn, scratch)
            raise
        try:
            pg.rename_database(conn, scratch, target)
        except PgBackupError as error:
            raise PgBackupError(
                f"{error}; the restored data is in database {scratch!r}"
                + (f" and the previous one in {kept_as!r}" if kept_as else "")
            ) from None
    log.info(
        "database %s restored as %s%s",
        database["name"],
        target,
        f" (previous one kept as {kept_as})" if kept_as else "",
    )
    return {"database": database["name"], "target": target, "kept_previous_as": kept_as}


def kept_databases() -> list[dict]:
    """Databases that restore --force kept aside, oldest first, with their age."""
    with pg.connect() as conn:
        names = [database["name"] for database in pg.list_databases(conn)]
    now = manifest.utc_now()
    kept = []
    for name in names:
        match = KEPT_NAME.search(name)
        if match:
            kept_at = manifest.parse_compact_time(match.group(1))
            kept.append(
                {
                    "name": name,
                    "kept_at": manifest.iso(kept_at),
                    "age_days": round((now - kept_at).total_seconds() / 86400, 1),
                }
            )
    return sorted(kept, key=lambda entry: entry["kept_at"])


def drop_kept(
    names: list[str] | None = None, older_than_days: float | None = None, dry_run: bool = False
) -> list[str]:
    """Drop databases kept by restore --force: the ones named, or those older than the
    given days. Only such databases: any other name is refused."""
    if names is None and older_than_days is None:
        raise PgBackupError("say which kept databases to drop: --database NAME or --older-than DAYS")
    kept = {entry["name"]: entry for entry in kept_databases()}
    unknown = [name for name in names or [] if name not in kept]
    if unknown:
        raise RefusedError(
            f"not a database kept by restore --force: {', '.join(unknown)} "
            f"(kept: {', '.join(kept) or 'none'})"
        )
    doomed = list(names or []) + [
        name
        for name, entry in kept.items()
        if older_than_days is not None and entry["age_days"] >= older_than_days and name not in (names or [])
    ]
    if not dry_run:
        with pg.connect() as conn:
            for name in doomed:
                pg.drop_database(conn, name)
                log.info("dropped %s, kept by an earlier restore --force", name)
    return doomed
