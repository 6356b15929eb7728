"""Prometheus text-format metrics for node exporter's textfile collector: what each
scheduled run did, per kind (logical, physical, WAL) and per repository (the local
backup directory, the off-site copy, the external drive), the backup volume's space,
the point-in-time recovery window, and the last recovery drill.

One file per concern, each written whole under a temporary name and renamed, so a
scrape never reads half a file and two runs of different kinds never rewrite each
other's figures. Every family is described once, in FAMILIES: node exporter refuses a
family that two files describe differently. No secret is ever in a metric (the files
are readable by the exporter's user)."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import re
import tempfile
import time

FAMILIES = {
    "pgbackup_last_run_timestamp_seconds": "When the scheduled run of this kind last ran on this node.",
    "pgbackup_last_run_status": (
        "Result of the last run of this kind: 0 succeeded, 1 failed (or found the run lock taken), "
        "2 skipped (another node's turn)."
    ),
    "pgbackup_last_run_duration_seconds": "Length of the last run of this kind.",
    "pgbackup_last_attempt_timestamp_seconds": "When a run last tried to put a copy in this repository.",
    "pgbackup_last_status": (
        "Result of the last attempt at this repository: 0 succeeded, 1 failed, 2 skipped (drive not mounted)."
    ),
    "pgbackup_last_success_timestamp_seconds": (
        "When a copy last reached this repository intact (local: made and verified; off-site: copied "
        "and checked; external: copied)."
    ),
    "pgbackup_last_set_size_bytes": "Encrypted size of the newest set a run of this kind made.",
    "pgbackup_newest_set_timestamp_seconds": (
        "Start of the newest complete set of this kind in the local repository (0: none)."
    ),
    "pgbackup_sets": "Complete sets of this kind in the local repository.",
    "pgbackup_wal_newest_archived_timestamp_seconds": (
        "When the newest WAL file in the local archive was archived (0: none yet)."
    ),
    "pgbackup_wal_offsite_synced_through_timestamp_seconds": (
        "Every WAL file archived up to this time is off-site (the off-site copy's lag)."
    ),
    "pgbackup_wal_archive_files": "WAL files in the local archive.",
    "pgbackup_recovery_window_start_timestamp_seconds": (
        "Earliest time a point-in-time recovery can reach from the local repository: the end of the "
        "oldest base backup the archive continues from without a gap (0: no window)."
    ),
    "pgbackup_recovery_window_end_timestamp_seconds": (
        "Latest: when the last WAL file of that unbroken chain was archived (0: no window)."
    ),
    "pgbackup_volume_free_bytes": "Space left for backups on the repository's filesystem.",
    "pgbackup_volume_size_bytes": "Size of the repository's filesystem.",
    "pgbackup_drill_last_run_timestamp_seconds": "When a recovery drill last ran.",
    "pgbackup_drill_last_status": "Result of the last recovery drill: 0 passed, 1 failed.",
    "pgbackup_drill_last_success_timestamp_seconds": "When a recovery drill last passed.",
    "pgbackup_drill_rto_seconds": "Time the last passing drill took to restore (its recovery time).",
    "pgbackup_drill_rpo_seconds": "Data the last passing drill could not recover, as time (its RPO).",
}
STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = 0, 1, 2
# The files' names; a run of one kind writes only its own.
FILE_NAMES = ("logical", "physical", "wal", "volume", "recovery_window", "drill")
LEGACY_FILES = ("pgbackup.prom",)  # the logical run's file before it carried labels
_SERIES = re.compile(r"^([a-z_]+)(\{.*\})? (\S+)$")


def series(name: str, **labels: str) -> str:
    """A series' text: name{label="value",...}, labels sorted, values escaped."""
    if name not in FAMILIES:
        raise ValueError(f"{name} is not a pgbackup metric")
    if not labels:
        return name
    pairs = ",".join(f'{key}="{_escaped(str(value))}"' for key, value in sorted(labels.items()))
    return f"{name}{{{pairs}}}"


def _escaped(value: str) -> str:
    """A label value as the text format wants it: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsFile:
    """One .prom file: its previous series (so a figure the run did not touch, such as
    the last success before today's failure, is kept), changed with set(), written whole."""

    def __init__(self, folder: str, name: str):
        if name not in FILE_NAMES:
            raise ValueError(f"unknown metrics file {name!r}")
        self.folder = folder
        self.path = os.path.join(folder, f"pgbackup_{name}.prom")
        self.values: dict[str, float] = {}

    def load(self) -> MetricsFile:
        """Read back what the file holds; lines of unknown families are dropped."""
        self.values = {}
        with contextlib.suppress(OSError), open(self.path, encoding="utf-8") as handle:
            for line in handle:
                found = _SERIES.match(line.rstrip("\n"))
                if found and found.group(1) in FAMILIES:
                    with contextlib.suppress(ValueError):
                        self.values[found.group(1) + (found.group(2) or "")] = float(found.group(3))
        return self

    def get(self, name: str, default: float = 0, **labels: str) -> float:
        return self.values.get(series(name, **labels), default)

    def set(self, name: str, value: float, **labels: str):
        self.values[series(name, **labels)] = value

    def text(self) -> str:
        by_family: dict[str, list[str]] = {}
        for key in sorted(self.values):
            by_family.setdefault(key.partition("{")[0], []).append(key)
        lines = []
        for family in sorted(by_family):
            lines += [f"# HELP {family} {FAMILIES[family]}", f"# TYPE {family} gauge"]
            lines += [f"{key} {_number(self.values[key])}" for key in by_family[family]]
        return "".join(f"{line}\n" for line in lines)

    @contextlib.contextmanager
    def locked(self):
        """Held from load() to write(): two runs changing one file (a WAL run and a
        logical run finding the lock taken) do not lose each other's figures."""
        fd = os.open(
            os.path.join(self.folder, f".{os.path.basename(self.path)}.lock"), os.O_RDWR | os.O_CREAT, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self.load()
        finally:
            os.close(fd)

    def write(self):
        """Under a temporary name of its own (hidden, not *.prom: the collector reads only
        those), then renamed; 0644, as the exporter runs as another user."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{os.path.basename(self.path)}.", suffix=".tmp")
        try:
            with open(fd, "w", encoding="utf-8") as handle:
                os.fchmod(handle.fileno(), 0o644)
                handle.write(self.text())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def record_run(
    folder: str,
    kind: str,
    status: int,
    duration: float,
    repositories: dict[str, int],
    set_bytes: int | None = None,
    sets: list[dict] | None = None,
    extra: dict[str, float] | None = None,
    now: float | None = None,
) -> MetricsFile:
    """A run's figures into its kind's file. repositories: the status of each copy the
    run attempted (local, offsite, external); sets: the local repository's scan, for the
    newest set of this kind; extra: unlabelled figures of the kind (the WAL run's)."""
    now = int(time.time() if now is None else now)
    with MetricsFile(folder, kind).locked() as metrics:
        _record_run(metrics, kind, now, status, duration, repositories, set_bytes, sets, extra)
        metrics.write()
    if kind == "logical":
        for legacy in LEGACY_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, legacy))
    return metrics


def _record_run(metrics, kind, now, status, duration, repositories, set_bytes, sets, extra):
    metrics.set("pgbackup_last_run_timestamp_seconds", now, kind=kind)
    metrics.set("pgbackup_last_run_status", status, kind=kind)
    metrics.set("pgbackup_last_run_duration_seconds", round(duration, 3), kind=kind)
    for repository, result in repositories.items():
        metrics.set("pgbackup_last_attempt_timestamp_seconds", now, kind=kind, repository=repository)
        metrics.set("pgbackup_last_status", result, kind=kind, repository=repository)
        if result == STATUS_OK:
            metrics.set("pgbackup_last_success_timestamp_seconds", now, kind=kind, repository=repository)
        elif series("pgbackup_last_success_timestamp_seconds", kind=kind, repository=repository) not in (
            metrics.values
        ):
            # Present from the first attempt, so "never succeeded" is an old success.
            metrics.set("pgbackup_last_success_timestamp_seconds", 0, kind=kind, repository=repository)
    if set_bytes is not None:
        metrics.set("pgbackup_last_set_size_bytes", set_bytes, kind=kind)
    if sets is not None:
        mine = [entry for entry in sets if entry.get("status") == "complete" and entry.get("kind") == kind]
        newest = max((_epoch(entry["started_at"]) or 0 for entry in mine), default=0)
        metrics.set("pgbackup_newest_set_timestamp_seconds", newest, kind=kind)
        metrics.set("pgbackup_sets", len(mine), kind=kind)
    for name, value in (extra or {}).items():
        if value is None:  # no longer measured: gone, not frozen
            metrics.values.pop(series(name), None)
        else:
            metrics.set(name, value)


def record_volumes(folder: str, paths: dict[str, str]):
    """Free and total space of each repository's filesystem (statvfs: what the backup
    user may still write), rewritten whole by every run."""
    metrics = MetricsFile(folder, "volume")
    for repository, path in paths.items():
        stats = os.statvfs(path)
        metrics.set("pgbackup_volume_free_bytes", stats.f_bavail * stats.f_frsize, repository=repository)
        metrics.set("pgbackup_volume_size_bytes", stats.f_blocks * stats.f_frsize, repository=repository)
    metrics.write()


def record_recovery_window(folder: str, described: list[dict]):
    """The window of the system and timeline archived most recently, from wal.describe()
    (a former system's archive, kept after a restore, does not count); 0 and 0 when no
    base backup has its WAL."""
    windows = [window for system in described for window in system["windows"]]
    newest = max(windows, key=lambda window: _epoch(window["latest_archived_at"]) or 0, default=None)
    metrics = MetricsFile(folder, "recovery_window")
    # A manifest's time nothing else checks: one that does not parse is no window.
    start = (_epoch(newest.get("earliest_time")) or 0) if newest else 0
    end = (_epoch(newest["latest_archived_at"]) or 0) if newest else 0
    metrics.set("pgbackup_recovery_window_start_timestamp_seconds", start)
    metrics.set("pgbackup_recovery_window_end_timestamp_seconds", end if start else 0)
    metrics.write()


def record_drill(folder: str, passed: bool, rto_seconds: float | None, rpo_seconds: float | None, now=None):
    """A recovery drill's result; the figures of the last passing drill are kept when
    one fails."""
    now = int(time.time() if now is None else now)
    with MetricsFile(folder, "drill").locked() as metrics:
        _record_drill(metrics, now, passed, rto_seconds, rpo_seconds)
        metrics.write()
    return metrics


def _record_drill(metrics, now, passed, rto_seconds, rpo_seconds):
    metrics.set("pgbackup_drill_last_run_timestamp_seconds", now)
    metrics.set("pgbackup_drill_last_status", STATUS_OK if passed else STATUS_FAILED)
    if passed:
        metrics.set("pgbackup_drill_last_success_timestamp_seconds", now)
        if rto_seconds is not None:
            metrics.set("pgbackup_drill_rto_seconds", round(rto_seconds, 3))
        if rpo_seconds is not None:
            metrics.set("pgbackup_drill_rpo_seconds", round(rpo_seconds, 3))
    elif series("pgbackup_drill_last_success_timestamp_seconds") not in metrics.values:
        metrics.set("pgbackup_drill_last_success_timestamp_seconds", 0)


def _epoch(text) -> int | None:
    """Seconds since the epoch of a manifest's or the archive's UTC time (Z or +00:00);
    None for anything else (a manifest is read from a folder anyone may have written)."""
    try:
        moment = datetime.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)).timestamp())
