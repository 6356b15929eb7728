"""Listing backup sets and pruning old ones.

Sets are ordered by the backup time in their manifests, never by folder name or
mtime. Prune never deletes the newest complete set, never leaves fewer than
`min_keep` complete sets, never deletes a set a verify or restore holds, and
removes interrupted leftovers (`.partial-*`) only once they are a day old.
"""

from __future__ import annotations

import datetime
import logging
import os

from . import manifest
from .errors import BusyError, CorruptError, PgBackupError
from .fsutil import fsync_dir, hold, remove_tree

log = logging.getLogger("pgbackup")

LEFTOVER_AGE = datetime.timedelta(days=1)


def scan(dest: str) -> list[dict]:
    """Every set-like folder in dest: complete sets newest first, then the rest."""
    if not os.path.isdir(dest):
        raise PgBackupError(f"backup directory {dest} does not exist")
    complete, other = [], []
    for name in sorted(os.listdir(dest)):
        path = os.path.join(dest, name)
        if not os.path.isdir(path):
            continue
        if name.startswith((manifest.PARTIAL_PREFIX, manifest.DELETING_PREFIX)):
            other.append(
                {"name": name, "path": path, "status": "incomplete", "mtime": os.path.getmtime(path)}
            )
            continue
        if not manifest.SET_NAME.match(name):
            continue
        try:
            record = manifest.load(path)
            started = manifest.parse_iso(record["started_at"])
            if not record.get("complete"):
                raise CorruptError("not marked complete")
        except (CorruptError, KeyError, ValueError) as error:
            other.append(
                {
                    "name": name,
                    "path": path,
                    "status": "invalid",
                    "reason": str(error),
                    "mtime": os.path.getmtime(path),
                }
            )
            continue
        complete.append(
            {
                "name": name,
                "path": path,
                "status": "complete",
                "kind": record.get("kind"),
                "started_at": record["started_at"],
                "finished_at": record.get("finished_at"),
                "databases": [database["name"] for database in record.get("databases", [])],
                "total_size": record.get("total_size"),
                "key_id": record.get("key_id"),
                "_started": started,
            }
        )
    complete.sort(key=lambda entry: entry["_started"], reverse=True)
    for entry in complete:
        del entry["_started"]
    return complete + other


def latest_complete(sets: list[dict]) -> dict | None:
    """The newest complete set of a scan() result (or of `pgbackup list --json`)."""
    candidates = [entry for entry in sets if entry.get("status") == "complete"]
    if not candidates:
        return None
    return max(candidates, key=lambda entry: manifest.parse_iso(entry["started_at"]))


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

    for entry in sets:
        if entry["status"] == "invalid":
            report["invalid"].append(entry["name"])
        elif entry["status"] == "incomplete":
            age = now - datetime.datetime.fromtimestamp(entry["mtime"], datetime.UTC)
            if age >= LEFTOVER_AGE and _remove(dest, entry, dry_run):
                report["leftovers_removed"].append(entry["name"])
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
