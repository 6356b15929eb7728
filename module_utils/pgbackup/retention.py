"""Listing backup sets and pruning old ones.

Sets are ordered by the backup time in their manifests, never by folder name or
mtime. Prune never deletes the newest complete set, never leaves fewer than
`min_keep` complete sets, never deletes a set a verify or restore holds, and
removes the leftovers of killed runs (`.partial-*` sets being written, `.restore-*`
plaintext staging, `.deleting-*`) once no running process holds them.
"""

from __future__ import annotations

import datetime
import logging
import os

from . import manifest
from .errors import BusyError, CorruptError, PgBackupError
from .fsutil import check_set_folder, fsync_dir, hold, is_abandoned, remove_tree, require_owner

log = logging.getLogger("pgbackup")

# A leftover must be this old, and its lock free, before it is removed: the gap
# between a run creating its folder and locking it is far shorter.
LEFTOVER_GRACE_SECONDS = 600
LEFTOVER_PREFIXES = (manifest.PARTIAL_PREFIX, manifest.DELETING_PREFIX, manifest.RESTORE_PREFIX)


def scan(dest: str) -> list[dict]:
    """Every set-like folder in dest: complete sets newest first, then the rest."""
    if not os.path.isdir(dest):
        raise PgBackupError(f"backup directory {dest} does not exist")
    complete, other = [], []
    for name in sorted(os.listdir(dest)):
        path = os.path.join(dest, name)
        if os.path.islink(path):
            if manifest.SET_NAME.match(name) or name.startswith(LEFTOVER_PREFIXES):
                other.append({"name": name, "path": path, "status": "invalid", "reason": "a symbolic link"})
            continue
        if not os.path.isdir(path):
            continue
        if name.startswith(LEFTOVER_PREFIXES):
            other.append(
                {"name": name, "path": path, "status": "incomplete", "mtime": os.path.getmtime(path)}
            )
            continue
        if not manifest.SET_NAME.match(name):
            continue
        try:
            check_set_folder(path)
            record = manifest.load(path)
            manifest.parse_iso(record["started_at"])  # a malformed time makes the set invalid
            if not record.get("complete"):
                raise CorruptError("not marked complete")
        except (CorruptError, KeyError, ValueError) as error:
            other.append(
                {
                    "name": name,
                    "path": path,
                    "status": "invalid",
                    "reason": str(error),
                }
            )
            continue
        complete.append(describe_set(name, path, record))
    complete.sort(key=newest_first_key, reverse=True)
    return complete + other


def describe_set(name: str, path: str, record: dict) -> dict:
    """What a listing says of a complete set, from its manifest (here or off-site)."""
    return {
        "name": name,
        "path": path,
        "status": "complete",
        "kind": record.get("kind"),
        "started_at": record["started_at"],
        "finished_at": record.get("finished_at"),
        "databases": [database["name"] for database in record.get("databases", [])],
        "total_size": record.get("total_size"),
        "format_version": record.get("format_version"),
        "key_ids": manifest.key_ids(record),
        # What the WAL archive's window and retention need of a base backup.
        "system_identifier": record.get("server", {}).get("system_identifier"),
        "wal_segment_size": record.get("server", {}).get("wal_segment_size"),
        "wal": record.get("wal"),
        "server_version_num": record.get("server", {}).get("version_num"),
        "plaintext_size": sum(part.get("plaintext_size", 0) for part in record.get("base", [])) or None,
    }


def newest_first_key(entry: dict):
    """Sort key of a set by age. Sets of one second share a start time; the folder's -N
    suffix says which came later."""
    return manifest.parse_iso(entry["started_at"]), manifest.sequence(entry["name"])


def latest_complete(sets: list[dict]) -> dict | None:
    """The newest complete set of a scan() result (or of `pgbackup list --json`)."""
    candidates = [entry for entry in sets if entry.get("status") == "complete"]
    if not candidates:
        return None
    return max(candidates, key=newest_first_key)


def prune(
    dest: str,
    keep_days: int,
    min_keep: int,
    dry_run: bool = False,
    now: datetime.datetime | None = None,
    kind: str = "logical",
) -> dict:
    if keep_days < 0 or min_keep < 1:
        raise PgBackupError("prune needs --keep-days >= 0 and --min-keep >= 1")
    if not dry_run:
        require_owner(dest, "prune")
    now = now or manifest.utc_now()
    cutoff = now - datetime.timedelta(days=keep_days)
    sets = scan(dest)
    # Each kind has its own retention: weekly base backups must not count as dumps.
    complete = [entry for entry in sets if entry["status"] == "complete" and entry["kind"] == kind]
    report = {
        "kept": [],
        "removed": [],
        "held": [],
        "leftovers_removed": [],
        "invalid": [],
        "dry_run": dry_run,
    }

    for position, entry in enumerate(complete):
        young = manifest.parse_iso(entry["started_at"]) >= cutoff
        if position < min_keep or young:
            report["kept"].append(entry["name"])
            continue
        if _remove(dest, entry, dry_run):
            report["removed"].append(entry["name"])
        else:
            report["held"].append(entry["name"])
            report["kept"].append(entry["name"])

    report["invalid"] = [entry["name"] for entry in sets if entry["status"] == "invalid"]
    report["leftovers_removed"] = remove_leftovers(dest, dry_run=dry_run, now=now.timestamp())
    if report["invalid"]:
        log.warning("left alone, not valid sets (check them by hand): %s", ", ".join(report["invalid"]))
    if not dry_run and (report["removed"] or report["leftovers_removed"]):
        fsync_dir(dest)
    log.info(
        "prune %s: kept %d, removed %d, leftovers removed %d, held %d",
        dest,
        len(report["kept"]),
        len(report["removed"]),
        len(report["leftovers_removed"]),
        len(report["held"]),
    )
    return report


def _remove(dest: str, entry: dict, dry_run: bool) -> bool:
    """Delete a set unless someone holds it. The rename first makes the deletion
    atomic to readers: a half-deleted set never looks complete."""
    try:
        with hold(entry["path"], exclusive=True, wait=False, what=entry["name"]):
            if dry_run:
                return True
            doomed = entry["path"]
            if not entry["name"].startswith(manifest.DELETING_PREFIX):
                doomed = os.path.join(dest, manifest.DELETING_PREFIX + entry["name"].lstrip("."))
                os.rename(entry["path"], doomed)
            remove_tree(doomed)
            log.info("removed %s", entry["name"])
            return True
    except BusyError:
        log.info("kept %s: it is in use", entry["name"])
        return False
    except CorruptError as error:
        log.warning("left %s alone: %s", entry["name"], error)
        return False


def remove_leftovers(
    folder: str, prefixes=LEFTOVER_PREFIXES, dry_run: bool = False, now: float | None = None
) -> list[str]:
    """Remove the leftovers of killed runs in folder (sets half written, plaintext restore
    staging, half-deleted sets) that no running process holds; their names."""
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.startswith(prefixes) or os.path.islink(path) or not os.path.isdir(path):
            continue
        # Only what pgbackup made, as this user: --staging-dir may be a shared folder
        # where another user's `.restore-photos` is none of our business.
        if os.lstat(path).st_uid != os.geteuid():
            continue
        if name.startswith(manifest.RESTORE_PREFIX) and not os.path.isfile(
            os.path.join(path, manifest.STAGING_MARK)
        ):
            continue
        if is_abandoned(path, LEFTOVER_GRACE_SECONDS, now) and _remove(
            folder, {"name": name, "path": path}, dry_run
        ):
            removed.append(name)
    return removed


def key_usage(dest: str) -> list[dict]:
    """Which complete sets in dest each key id reads, newest set first: what key
    rotation must keep until the last set that needs a key has aged out."""
    usage: dict[str, dict] = {}
    for entry in scan(dest):
        if entry["status"] != "complete":
            continue
        for key_id in entry["key_ids"]:
            item = usage.setdefault(key_id, {"key_id": key_id, "sets": 0, "newest": entry, "oldest": entry})
            item["sets"] += 1
            item["oldest"] = entry  # scan lists newest first
    return [
        {
            "key_id": item["key_id"],
            "sets": item["sets"],
            "newest_set": item["newest"]["name"],
            "newest_started_at": item["newest"]["started_at"],
            "oldest_set": item["oldest"]["name"],
            "oldest_started_at": item["oldest"]["started_at"],
        }
        for item in sorted(usage.values(), key=lambda item: newest_first_key(item["newest"]), reverse=True)
    ]
