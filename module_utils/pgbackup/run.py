"""The scheduled run, as cron calls it: `pgbackup run [logical|physical]`.

One run: take the run lock, decide whether this node's turn it is, make a set, verify
it, prune, copy it off-site (rclone) and to an external drive, and write metrics for
Prometheus's textfile collector. Every event is one line in the log file and in
syslog/journald (tag pgbackup-run). The settings come from one JSON file written by the
backup role; it holds no secret (the password is in the passfile). The host holds only
the recipients' public keys: it writes sets it cannot read, and checks each new set as
far as that allows (structure, sizes and hashes of every file against the manifest).

Exit codes: 0 done (or not this node's turn), 1 a step failed, 75 another run holds
the lock. A run that fails, or finds the lock taken, says so in the metrics too, so a
stuck lock or a failing night shows on a dashboard rather than only in a log.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import json
import logging
import os
import socket
import subprocess
import syslog
import time

from . import archive as archive_layout
from . import backup, crypto, manifest, metrics, pg, physical, restore, retention, wal
from .connection import CONNECTION_ARGUMENT_SPEC, apply_connection_params
from .errors import PgBackupError, RefusedError
from .fsutil import open_no_follow, refuse_links, require_owner

log = logging.getLogger("pgbackup.run")

KINDS = ("logical", "physical")  # the kinds of set
# What `pgbackup run` does: a set of a kind, or the WAL archive's off-site copy.
RUN_KINDS = (*KINDS, "wal")
WAL_LOCK_NAME = ".wal-run.lock"
EXIT_OK, EXIT_FAILED, EXIT_BUSY = 0, 1, 75
STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = metrics.STATUS_OK, metrics.STATUS_FAILED, metrics.STATUS_SKIPPED
# The WAL run's record of what it has copied off-site; the WAL prune reads it back.
WAL_OFFSITE_THROUGH = "pgbackup_wal_offsite_synced_through_timestamp_seconds"
RUN_ON = ("primary", "replica", "any")
SYSLOG_TAG = "pgbackup-run"
STANDARD_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
# Leftovers, lock files and restore staging never leave the host: every name that is
# not a complete set starts with a dot (rclone filter syntax; matched at any depth).
NOT_COPIED = ("--exclude", ".*", "--exclude", ".*/**")

DEFAULTS = {
    "connection": {},
    "run_on": "primary",
    "backup_dir": None,
    "recipients": None,  # a public key file, or a folder of *.pub files
    "lock_file": None,  # default: <backup_dir>/.run.lock
    "compression_level": wal.DEFAULT_COMPRESSION_LEVEL,
    "logical": {"format": "custom", "jobs": 1, "databases": [], "keep_days": 30, "min_keep": 7},
    "physical": {"parts": 2, "keep_days": 28, "min_keep": 2},
    # wal-push archives up to this many ready WAL files per call when PostgreSQL falls behind.
    "wal": {"push_ahead": wal.DEFAULT_PUSH_AHEAD},
    "offsite": {"target": "", "keep_days": 90, "rclone_config": ""},
    "external_drive": "",
    "log_file": "/var/log/pgbackup/pgbackup.log",
    "metrics_dir": "/var/lib/pgbackup/metrics",
}
# Connection settings a run takes: libpq's, but never a password.
CONNECTION_KEYS = set(CONNECTION_ARGUMENT_SPEC) - {"login_password"}


def load_settings(path: str) -> dict:
    """The run's settings: the file's values over DEFAULTS; unknown names are refused,
    so a misspelt setting is an error, not a silently ignored line."""
    try:
        with open(path, encoding="utf-8") as handle:
            given = json.load(handle)
    except FileNotFoundError:
        raise PgBackupError(f"settings file {path} does not exist (the backup role writes it)") from None
    except (OSError, ValueError) as error:
        raise PgBackupError(f"settings file {path} cannot be read: {error}") from None
    if not isinstance(given, dict):
        raise PgBackupError(f"settings file {path} must hold a JSON object")
    settings = _merge(DEFAULTS, given, path, "")
    for required in ("backup_dir", "recipients"):
        if not settings[required]:
            raise PgBackupError(f"settings file {path} does not set {required}")
    # An empty value means "libpq's default", as if the setting were absent.
    settings["connection"] = {
        name: value for name, value in settings["connection"].items() if value not in ("", None)
    }
    unknown = set(settings["connection"]) - CONNECTION_KEYS
    if unknown:
        raise PgBackupError(
            f"settings file {path}: unknown connection setting(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(CONNECTION_KEYS))} (passwords belong in the passfile)"
        )
    if settings["run_on"] not in RUN_ON:
        raise PgBackupError(f"settings file {path}: run_on must be one of {', '.join(RUN_ON)}")
    settings["lock_file"] = settings["lock_file"] or os.path.join(settings["backup_dir"], ".run.lock")
    return settings


def _merge(defaults: dict, given: dict, path: str, where: str) -> dict:
    unknown = set(given) - set(defaults)
    if unknown:
        raise PgBackupError(
            f"settings file {path}: unknown setting(s) {', '.join(where + name for name in sorted(unknown))}"
        )
    merged = dict(defaults)
    for name, value in given.items():
        default = defaults[name]
        # A setting takes the type of its default (None: a path or text); bool is not int.
        expected = str if default is None else type(default)
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise PgBackupError(
                f"settings file {path}: {where}{name} must be {expected.__name__}, "
                f"not {type(value).__name__} ({value!r})"
            )
        nested = isinstance(default, dict) and default  # "connection" is free-form
        merged[name] = _merge(default, value, path, f"{where}{name}.") if nested else value
    return merged


class EventLog(logging.Handler):
    """One line per event in the log file and in syslog, whatever part of pgbackup
    reports it: `<UTC time> pgbackup-run[<run id>] <LEVEL> <message>`."""

    def __init__(self, path: str, run_id: str):
        super().__init__(logging.INFO)
        self.path = path
        self.run_id = run_id
        syslog.openlog(SYSLOG_TAG, syslog.LOG_PID, syslog.LOG_USER)

    def emit(self, record: logging.LogRecord):
        message = " ".join(self.format(record).split())  # one line, whatever the message held
        level = {"WARNING": "WARNING", "ERROR": "ERR", "CRITICAL": "ERR"}.get(record.levelname, "INFO")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        line = f"{stamp} {SYSLOG_TAG}[{self.run_id}] {level} {message}\n"
        try:
            with open(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640), "a") as handle:
                handle.write(line)
        except OSError:
            self.handleError(record)
        priority = {"ERR": syslog.LOG_ERR, "WARNING": syslog.LOG_WARNING}.get(level, syslog.LOG_INFO)
        syslog.syslog(priority, message)


@contextlib.contextmanager
def run_lock(path: str):
    """The lock that keeps runs from overlapping, in a folder only the backup user can
    write: in a world-writable one (/run/lock) any local user could hold it and stop
    every backup. Yields None once this run holds it, or, when another run holds it, the
    note that run wrote (its pid, host and start time)."""
    folder = os.path.dirname(os.path.abspath(path))
    mode = os.stat(folder).st_mode
    if mode & 0o022:
        raise PgBackupError(
            f"the run lock's folder {folder} is writable by other users (mode {mode & 0o777:04o}), who "
            "could hold the lock and stop every backup; put backup_lock_file in the backup directory"
        )
    fd = open_no_follow(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "no note"
            return
        os.ftruncate(fd, 0)
        note = f"pid {os.getpid()} on {socket.gethostname()} since {manifest.iso(manifest.utc_now())}\n"
        os.pwrite(fd, note.encode(), 0)
        yield None
    finally:
        os.close(fd)


def _rclone(config: str, *args: str, what: str) -> str:
    argv = ["rclone", *(["--config", config] if config else []), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    except OSError as error:
        raise PgBackupError(f"{what} failed: cannot start rclone: {error.strerror}") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if "ERROR" in line or "Failed" in line] or lines
        raise PgBackupError(f"{what} failed: {(errors or [f'exit code {done.returncode}'])[0].strip()}")
    return done.stdout


def offsite_keeps(names: list[str], settings: dict, now: datetime.datetime) -> set[str]:
    """The sets the off-site copy holds: of each kind, the newest `min_keep` (that kind's
    local minimum) whatever their age, and every one younger than offsite.keep_days
    (0: all). The same rule picks what is copied and what is deleted there, so a set
    deleted off-site is never copied back (no churn), and failing backups never leave
    the remote without its newest sets."""
    keep_days = settings["offsite"]["keep_days"]
    kept = set()
    for kind in KINDS:
        sets = sorted(
            (name for name in names if manifest.SET_NAME.match(name) and name.startswith(f"{kind}-")),
            key=lambda name: (manifest.time_of(name), manifest.sequence(name)),
            reverse=True,
        )
        for position, name in enumerate(sets):
            young = keep_days == 0 or now - manifest.time_of(name) < datetime.timedelta(days=keep_days)
            if position < settings[kind]["min_keep"] or young:
                kept.add(name)
    return kept


def remote_path(target: str, name: str) -> str:
    """target/name for an rclone target: `remote:` is the remote's root, where a slash
    would make the path absolute (sftp, local)."""
    return f"{target}{name}" if target.endswith(":") else f"{target.rstrip('/')}/{name}"


def copy_offsite(settings: dict, set_path: str):
    """Copy the sets the remote should hold (never deleting there because something is
    missing here), check the new set arrived intact, then apply the remote's retention."""
    offsite = settings["offsite"]
    target, config = offsite["target"], offsite["rclone_config"]
    now = manifest.utc_now()
    local = [
        entry["name"] for entry in retention.scan(settings["backup_dir"]) if entry["status"] == "complete"
    ]
    wanted = sorted(offsite_keeps(local, settings, now) | {os.path.basename(set_path)})
    # One ordered filter list: nothing that is not a set, then only the wanted sets.
    filters = [
        word
        for rule in ("- .*", "- .*/**", *(f"+ /{name}/**" for name in wanted), "- **")
        for word in ("--filter", rule)
    ]
    _rclone(
        config,
        "copy",
        settings["backup_dir"],
        target,
        "--checksum",
        *filters,
        what=f"off-site copy to {target}",
    )
    _rclone(
        config,
        "check",
        set_path,
        remote_path(target, os.path.basename(set_path)),
        "--one-way",
        *NOT_COPIED,
        what=f"checking the off-site copy of {os.path.basename(set_path)}",
    )
    log.info("off-site copy to %s verified (%d sets wanted there)", target, len(wanted))
    try:
        listed = json.loads(
            _rclone(config, "lsjson", "--dirs-only", target, what="listing the off-site sets")
        )
        there = [item["Name"] for item in listed]
        keep = offsite_keeps(there, settings, now)
        doomed = sorted(name for name in there if manifest.SET_NAME.match(name) and name not in keep)
        for name in doomed:
            _rclone(config, "purge", remote_path(target, name), what=f"deleting {name} off-site")
        log.info("off-site retention: removed %s", ", ".join(doomed) or "nothing")
        if os.path.basename(set_path).startswith("physical-"):
            prune_wal_offsite(settings, sorted(keep & set(there)))
    except (PgBackupError, ValueError, KeyError) as error:
        log.warning("off-site retention failed: %s", error)


def copy_to_drive(settings: dict) -> bool:
    """The external-drive copy, made only when the drive is mounted (False: it was not)."""
    drive = settings["external_drive"]
    if not os.path.ismount(drive):
        log.info("external drive copy skipped: %s is not mounted", drive)
        return False
    # Whoever plugs in the drive controls what is on it: rclone would write through a
    # planted link (postgresql -> /var/lib/postgresql/15/main) as the postgres user.
    refuse_links(os.path.join(drive, "postgresql"), "the external drive's backup folder")
    _rclone(
        settings["offsite"]["rclone_config"],
        "copy",
        settings["backup_dir"],
        os.path.join(drive, "postgresql"),
        "--checksum",
        *NOT_COPIED,
        what=f"external drive copy to {drive}",
    )
    log.info("external drive copy to %s done", drive)
    return True


def _turn(run_on: str) -> str | None:
    """Why this node should not run the backup now (None: it should). Decided at run
    time on every node, so a failover moves the backups along with the primary."""
    try:
        with pg.connect() as conn:
            in_recovery = conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
    except PgBackupError as error:
        raise PgBackupError(
            f"cannot tell whether this node should run the backup (server unreachable): {error}"
        ) from None
    if run_on == "primary" and in_recovery:
        return "this node is a standby; the primary runs the backup"
    if run_on == "replica" and not in_recovery:
        return "this node is the primary; a replica runs the backup"
    return None


def _make_set(settings: dict, kind: str, recipients: crypto.Recipients) -> dict:
    level = settings["compression_level"]
    if kind == "physical":
        return physical.create_base_backup(
            settings["backup_dir"], recipients, compression_level=level, parts=settings["physical"]["parts"]
        )
    logical = settings["logical"]
    return backup.create_backup_set(
        settings["backup_dir"],
        recipients,
        databases=logical["databases"] or None,
        dump_format=logical["format"],
        jobs=logical["jobs"],
        compression_level=level,
    )


STATUS_WORDS = {STATUS_OK: "ok", STATUS_FAILED: "failed", STATUS_SKIPPED: "skipped"}


def scheduled_run(settings: dict, kind: str, summary: dict | None = None) -> int:
    """One scheduled run; its exit code. Assumes the event log is already attached.
    `summary`, if given, receives what the run did (status, message, set, size)."""
    summary = {} if summary is None else summary
    started = time.monotonic()
    # What the steps did: the set, its size, and each repository's result.
    outcome = {"set_bytes": 0, "set": None, "repositories": {}}
    # The WAL copy runs every few minutes: it must not wait behind a night's backup.
    lock_file = (
        os.path.join(settings["backup_dir"], WAL_LOCK_NAME) if kind == "wal" else settings["lock_file"]
    )
    try:
        with run_lock(lock_file) as holder:
            if holder is not None:
                summary.update(status="busy", message=f"another backup run holds {lock_file} ({holder})")
                _write_metrics(settings, kind, STATUS_FAILED, started, outcome)
                log.error(
                    "another backup run holds %s (%s); this run did nothing. A lock held for longer "
                    "than a run takes is stuck: find that process",
                    lock_file,
                    holder,
                )
                return EXIT_BUSY
            log.info("%s run started on %s", kind, socket.gethostname())
            steps = _wal_steps if kind == "wal" else functools.partial(_steps, kind=kind)
            status, message = steps(settings, outcome=outcome)
    except PgBackupError as error:
        status, message = STATUS_FAILED, str(error)
    except Exception as error:  # whatever it was, the run failed and must say so
        status, message = STATUS_FAILED, f"the run stopped on an unexpected {type(error).__name__}: {error}"
    _write_metrics(settings, kind, status, started, outcome)
    (log.error if status == STATUS_FAILED else log.info)("%s", message)
    summary.update(
        status=STATUS_WORDS[status],
        message=message,
        kind=kind,
        set=outcome["set"],
        name=os.path.basename(outcome["set"]) if outcome["set"] else None,
        encrypted_bytes=outcome["set_bytes"],
        offsite_copied=outcome["repositories"].get("offsite") == STATUS_OK,
        duration_seconds=round(time.monotonic() - started, 1),
    )
    return EXIT_FAILED if status == STATUS_FAILED else EXIT_OK


def _write_metrics(settings: dict, kind: str, status: int, started: float, outcome: dict):
    """Metrics of every run, whatever happened: each file on its own, so one that cannot
    be written (or a set folder that cannot be read) costs only its own figures. A
    failure is logged, never raised."""
    folder = settings["metrics_dir"]
    duration = time.monotonic() - started
    sets = None
    if kind != "wal" and outcome["set"] is not None:
        sets = _logged("reading the sets for the metrics", lambda: retention.scan(settings["backup_dir"]))
    extra = {}
    if "wal_newest" in outcome:
        through = outcome.get("wal_offsite_through")
        if through is None:
            through = metrics.MetricsFile(folder, "wal").load().get(WAL_OFFSITE_THROUGH)
        extra = {
            "pgbackup_wal_newest_archived_timestamp_seconds": int(outcome["wal_newest"] or 0),
            # Only with an off-site copy: without one there is no lag to alert on.
            WAL_OFFSITE_THROUGH: int(through) if settings["offsite"]["target"] else None,
            "pgbackup_wal_archive_files": outcome.get("wal_files", 0),
        }
    set_bytes = outcome["set_bytes"] if outcome["set"] else None
    _logged(
        f"writing the metrics in {folder}",
        lambda: metrics.record_run(
            folder,
            kind,
            status,
            duration,
            outcome["repositories"],
            set_bytes=set_bytes,
            sets=sets,
            extra=extra,
        ),
    )
    volumes = {"local": settings["backup_dir"]}
    if settings["external_drive"] and os.path.ismount(settings["external_drive"]):
        volumes["external"] = settings["external_drive"]
    _logged(f"writing the volume metrics in {folder}", lambda: metrics.record_volumes(folder, volumes))
    if kind != "logical":
        _logged(
            f"writing the recovery window in {folder}",
            lambda: metrics.record_recovery_window(folder, wal.describe(settings["backup_dir"], sets)),
        )


def _logged(doing: str, step):
    """step()'s result, or None with an error in the log: metrics never fail a run."""
    try:
        return step()
    except Exception as error:  # whatever it was, the run's own result stands
        text = error.strerror if isinstance(error, OSError) and error.strerror else error
        log.error("%s failed: %s", doing, text)
        return None


def _wal_steps(settings: dict, outcome: dict) -> tuple[int, str]:
    """`pgbackup run wal`: copy the local WAL archive off-site. Every node whose archive
    holds files copies them (a former primary's last segments too); the copy never
    changes a file already there, so two nodes cannot overwrite each other."""
    dest = settings["backup_dir"]
    local = wal.local_archive(dest)
    outcome["wal_newest"], outcome["wal_files"] = local["newest"], local["files"]
    if outcome["wal_newest"] is None:
        return STATUS_OK, "WAL run: nothing archived on this node"
    if not settings["offsite"]["target"]:
        return STATUS_OK, f"WAL run: {outcome['wal_files']} files archived locally; no off-site target"
    outcome["repositories"]["offsite"] = STATUS_FAILED
    try:
        copy_wal_offsite(settings)
    except PgBackupError as error:
        return STATUS_FAILED, f"{error}; the local archive is untouched"
    outcome["repositories"]["offsite"] = STATUS_OK
    outcome["wal_offsite_through"] = outcome["wal_newest"]
    return STATUS_OK, (
        "WAL archive copied off-site through "
        + datetime.datetime.fromtimestamp(outcome["wal_newest"], datetime.UTC).isoformat(timespec="seconds")
    )


def copy_wal_offsite(settings: dict):
    """rclone copy of the archive: new files only (an archived file never changes, and
    --immutable fails rather than replace one that differs there), hashes compared."""
    offsite = settings["offsite"]
    _rclone(
        offsite["rclone_config"],
        "copy",
        os.path.join(settings["backup_dir"], wal.ARCHIVE_FOLDER),
        remote_path(offsite["target"], wal.ARCHIVE_FOLDER),
        "--checksum",
        "--immutable",
        *NOT_COPIED,
        what=f"off-site copy of the WAL archive to {offsite['target']}",
    )


def remote_base_sets(settings: dict, names: list[str]) -> list[dict]:
    """The off-site base backups among names, described from their manifests there as
    `pgbackup list` describes local ones. A manifest that cannot be read or makes no
    sense raises: whoever acts on the list (retention, a restore) must not guess."""
    offsite = settings["offsite"]
    described = []
    for name in sorted(
        name for name in names if name.startswith("physical-") and manifest.SET_NAME.match(name)
    ):
        text = _rclone(
            offsite["rclone_config"],
            "cat",
            remote_path(offsite["target"], f"{name}/{manifest.MANIFEST_NAME}"),
            what=f"reading the manifest of {name} off-site",
        )
        try:
            record = json.loads(text)
            entry = retention.describe_set(name, remote_path(offsite["target"], name), record)
            manifest.parse_iso(entry["started_at"])
            wal.parse_lsn(entry["wal"]["start_lsn"])
            wal.parse_lsn(entry["wal"]["end_lsn"])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise PgBackupError(f"the manifest of {name} off-site cannot be used: {error!r}") from None
        if not record.get("complete") or entry["kind"] != "physical":
            raise PgBackupError(f"{name} off-site is not a complete base backup")
        described.append(entry)
    return described


def prune_wal_offsite(settings: dict, kept_sets: list[str]):
    """The local archive's retention rule, applied off-site: per system, WAL older than
    the start of the oldest base backup kept there is removed; a system without a base
    backup there keeps all of its WAL. A manifest there that cannot be read stops the
    pruning (keeping everything)."""
    offsite = settings["offsite"]
    target, config = offsite["target"], offsite["rclone_config"]
    try:
        base_sets = remote_base_sets(settings, kept_sets)
    except PgBackupError as error:
        log.warning("off-site WAL retention skipped: %s", error)
        return
    archive = remote_path(target, wal.ARCHIVE_FOLDER)
    try:
        listed = _rclone(config, "lsf", "--dirs-only", archive, what="listing the off-site WAL archive")
    except PgBackupError:
        return  # nothing archived off-site yet
    removed = 0
    for folder in listed.split():
        system = folder.rstrip("/")
        bases = wal.bases_of(base_sets, system) if archive_layout.SYSTEM_ID.fullmatch(system) else []
        if not bases:
            continue
        files = _rclone(
            config,
            "lsf",
            "-R",
            "--files-only",
            f"{archive}/{system}",
            what=f"listing off-site WAL of {system}",
        ).split()
        # Names from the remote are used in paths: only the archive's own layout counts.
        names = {
            path.rpartition("/")[2][: -len(wal.SUFFIX)]: path
            for path in files
            if archive_layout.relative_path_is_archived(path)
        }
        doomed, _kept_from = wal.prunable(sorted(names), bases)
        for name in doomed:
            _rclone(
                config, "deletefile", f"{archive}/{system}/{names[name]}", what=f"deleting {name} off-site"
            )
        removed += len(doomed)
    log.info("off-site WAL retention: removed %d files", removed)


def fetch_offsite(
    settings_path: str, set_names: list[str], archive: bool, catalog: bool, latest_kind: str | None = None
) -> dict:
    """For a restore on a host that lost its backups: copy the WAL archive back from the
    off-site copy (new files only), describe the base backups there, and copy sets back
    (each into a leftover-named folder first, renamed once whole)."""
    settings = prepare(settings_path)
    offsite = settings["offsite"]
    target, config, dest = offsite["target"], offsite["rclone_config"], settings["backup_dir"]
    if not target:
        raise PgBackupError("no off-site target is set (backup_offsite_target)")
    report = {"sets": [], "catalog": [], "wal_files": None}
    if archive:
        _rclone(
            config,
            "copy",
            remote_path(target, wal.ARCHIVE_FOLDER),
            os.path.join(dest, wal.ARCHIVE_FOLDER),
            "--immutable",
            *NOT_COPIED,
            what=f"copying the WAL archive back from {target}",
        )
        report["wal_files"] = wal.local_archive(dest)["files"]
    if catalog:
        listed = json.loads(
            _rclone(config, "lsjson", "--dirs-only", target, what="listing the off-site sets")
        )
        report["catalog"] = remote_base_sets(settings, [item["Name"] for item in listed])
    set_names = list(set_names)
    if latest_kind:
        listed = json.loads(
            _rclone(config, "lsjson", "--dirs-only", target, what="listing the off-site sets")
        )
        names = [item["Name"] for item in listed if manifest.SET_NAME.match(item["Name"])]
        names = [name for name in names if name.startswith(f"{latest_kind}-")]
        if not names:
            raise PgBackupError(f"no {latest_kind} set off-site in {target}")
        set_names.append(max(names, key=lambda name: (manifest.time_of(name), manifest.sequence(name))))
    for name in set_names:
        if not manifest.SET_NAME.match(name):
            raise PgBackupError(f"{name!r} is not a set name")
        final = os.path.join(dest, name)
        if not os.path.exists(final):
            partial = os.path.join(dest, manifest.PARTIAL_PREFIX + name)
            _rclone(
                config, "copy", remote_path(target, name), partial, what=f"copying {name} back from {target}"
            )
            os.rename(partial, final)
        restore.verify_set(final)  # structure, sizes and hashes against its manifest
        report["sets"].append(final)
    return report


def _steps(settings: dict, kind: str, outcome: dict) -> tuple[int, str]:
    """The run's steps, in order; (status, closing message). A step that fails stops
    the run only when what follows depends on it."""
    try:
        not_my_turn = _turn(settings["run_on"])
        if not_my_turn:
            return STATUS_SKIPPED, not_my_turn
    except PgBackupError as error:
        return STATUS_FAILED, str(error)
    outcome["repositories"]["local"] = STATUS_FAILED
    try:
        recipients = crypto.load_recipients([settings["recipients"]])
        record = _make_set(settings, kind, recipients)
    except PgBackupError as error:
        return STATUS_FAILED, f"{kind} backup failed: {error}; earlier sets are untouched"
    set_path = outcome["set"] = record["path"]
    outcome["set_bytes"] = record["total_size"]
    log.info("backup written: %s (%d bytes encrypted)", set_path, record["total_size"])
    try:
        report = restore.verify_set(set_path)
    except PgBackupError as error:
        return STATUS_FAILED, f"verify FAILED for {set_path}: {error}"
    outcome["repositories"]["local"] = STATUS_OK
    log.info(
        "verify passed: %s: OK (%d files, %d bytes; structure, sizes and hashes: no private key here)",
        set_path,
        report["files"],
        report["plaintext_bytes"],
    )
    failed = False
    for step in (_prune, _prune_wal, _offsite, _drive):
        try:
            step(settings, kind, set_path, outcome)
        except PgBackupError as error:
            log.error("%s", error)
            failed = True
        except Exception as error:  # one step's surprise must not skip the others
            log.error(
                "%s stopped on an unexpected %s: %s", step.__name__.strip("_"), type(error).__name__, error
            )
            failed = True
    if failed:
        return (
            STATUS_FAILED,
            f"run finished with errors: {set_path} was made and verified, but a later step failed",
        )
    return STATUS_OK, f"run finished: {set_path}"


def _prune(settings: dict, kind: str, _set_path: str, _outcome: dict):
    policy = settings[kind]
    try:
        pruned = retention.prune(
            settings["backup_dir"], keep_days=policy["keep_days"], min_keep=policy["min_keep"], kind=kind
        )
    except PgBackupError as error:
        raise PgBackupError(f"prune failed: {error}") from None
    log.info(
        "prune (%s sets, %d days, at least %d): removed %s; kept %d",
        kind,
        policy["keep_days"],
        policy["min_keep"],
        ", ".join(pruned["removed"] + pruned["leftovers_removed"]) or "nothing",
        len(pruned["kept"]),
    )


def _prune_wal(settings: dict, kind: str, _set_path: str, _outcome: dict):
    """After the base backups' retention: the WAL none of the kept ones needs, and only
    what is off-site already (when there is an off-site copy), so a failing off-site
    copy never costs the off-site base backups their WAL. A physical set that cannot be
    read (whose WAL needs are unknown) stops the pruning."""
    if kind != "physical":
        return
    try:
        sets = retention.scan(settings["backup_dir"])
        unreadable = [
            entry["name"]
            for entry in sets
            if entry["status"] != "complete" and entry["name"].startswith("physical-")
        ]
        if unreadable:
            log.warning(
                "WAL prune skipped: %s cannot be read, so what WAL it needs is unknown", ", ".join(unreadable)
            )
            return
        archived_before = None
        if settings["offsite"]["target"]:
            # What the WAL runs have copied off-site, as their metrics record it.
            archived_before = (
                metrics.MetricsFile(settings["metrics_dir"], "wal").load().get(WAL_OFFSITE_THROUGH)
            )
        wal.prune(settings["backup_dir"], sets, archived_before=archived_before)
    except (PgBackupError, OSError) as error:
        raise PgBackupError(f"WAL prune failed: {error}") from None


def _offsite(settings: dict, _kind: str, set_path: str, outcome: dict):
    if settings["offsite"]["target"]:
        outcome["repositories"]["offsite"] = STATUS_FAILED
        try:
            copy_offsite(settings, set_path)
        except PgBackupError as error:
            raise PgBackupError(f"{error}; local sets are kept") from None
        outcome["repositories"]["offsite"] = STATUS_OK


def _drive(settings: dict, _kind: str, _set_path: str, outcome: dict):
    if settings["external_drive"]:
        outcome["repositories"]["external"] = STATUS_FAILED
        copied = copy_to_drive(settings)
        outcome["repositories"]["external"] = STATUS_OK if copied else STATUS_SKIPPED


def record_drill(settings_path: str, result: str, rto_seconds, rpo_seconds) -> metrics.MetricsFile:
    """`pgbackup drill-record`: a recovery drill's result (passed or failed) into the
    run's metrics folder."""
    if result not in ("passed", "failed"):
        raise PgBackupError(f"a drill's result is passed or failed, not {result!r}")
    settings = load_settings(settings_path)
    return metrics.record_drill(settings["metrics_dir"], result == "passed", rto_seconds, rpo_seconds)


def prepare(settings_path: str) -> dict:
    """The run's settings, with libpq's environment and PATH set from them as cron needs."""
    settings = load_settings(settings_path)
    # cron gives a bare PATH; rclone and the PostgreSQL tools live in these.
    known = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join(known + [d for d in STANDARD_PATH if d not in known])
    apply_connection_params(settings["connection"])  # PGSSLMODE's default: cli.main
    os.environ.setdefault("PGCONNECT_TIMEOUT", "15")
    return settings


# What a failed connection means for the settings an operator controls.
_HINTS = (
    ("certificate verify failed", "backup_pg_ssl_rootcert must be the CA that issued the server certificate"),
    ("does not match host name", "backup_pg_host must be a name the server certificate carries"),
    ("root certificate file", "backup_pg_ssl_rootcert names a file that does not exist"),
    (
        "no pg_hba.conf entry for replication",
        "pg_hba.conf needs a replication entry for the backup role "
        "from the address it connects from (backup_pg_hostaddr)",
    ),
    (
        "no pg_hba.conf entry",
        "pg_hba.conf needs an entry for the backup role from the address it connects from",
    ),
    ("must be superuser or replication role", "the backup role needs REPLICATION for base backups"),
    ("SSL error", "backup_pg_ssl_rootcert must be the CA that issued the server certificate"),
    ("password authentication failed", "the passfile's password does not match the role's"),
)


def _hinted(error: str) -> str:
    hint = next((hint for marker, hint in _HINTS if marker in error), None)
    return f"{error} ({hint})" if hint else error


def check(settings_path: str, replication: bool) -> dict:
    """`pgbackup check`: connect exactly as the scheduled run will (and, for base backups,
    as pg_basebackup will) and say plainly what is wrong. The backup role runs it at
    deploy time, so a certificate or pg_hba mistake fails the playbook, not the night."""
    settings = prepare(settings_path)
    try:
        with pg.connect() as conn:
            row = conn.execute(
                "SELECT current_user, pg_is_in_recovery(), coalesce((SELECT ssl FROM pg_stat_ssl"
                " WHERE pid = pg_backend_pid()), false), current_setting('server_version'),"
                " current_setting('server_version_num')::int"
            ).fetchone()
    except PgBackupError as error:
        raise PgBackupError(_hinted(str(error))) from None
    report = {
        "user": row[0],
        "in_recovery": row[1],
        "tls": row[2],
        "server_version": row[3],
        "replication": None,
    }
    if replication:
        psql = pg.tool("psql", pg.major_of(row[4]))
        try:
            pg.run_tool(
                [psql, "--no-password", "-XAtq", "--dbname=replication=true", "-c", "IDENTIFY_SYSTEM"],
                "a replication connection (as pg_basebackup makes)",
            )
        except PgBackupError as error:
            raise PgBackupError(_hinted(str(error))) from None
        report["replication"] = True
    report["backup_dir"] = settings["backup_dir"]
    return report


def main(settings_path: str, kind: str, summary: dict | None = None) -> int:
    """`pgbackup run`: settings, environment and event log, then the run."""
    if kind not in RUN_KINDS:
        raise PgBackupError(f"unknown run kind {kind!r}; use one of {', '.join(RUN_KINDS)}")
    settings = prepare(settings_path)
    run_id = f"{datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%SZ')}-{os.getpid()}"
    events = EventLog(settings["log_file"], run_id)
    core = logging.getLogger("pgbackup")
    core.addHandler(events)
    core.setLevel(logging.INFO)
    try:
        for folder in (settings["backup_dir"], settings["metrics_dir"]):
            require_owner(folder, "run the scheduled backup")
        return scheduled_run(settings, kind, summary)
    except RefusedError as error:
        log.error("refused: %s", error)
        raise
    finally:
        core.removeHandler(events)
