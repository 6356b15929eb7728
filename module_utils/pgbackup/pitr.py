"""Point-in-time recovery: which base backup, which WAL, and whether the target can be
reached at all, decided before anything is touched.

`plan()` answers for a target (a time, a restore point's name, an LSN, a transaction
id, `immediate` or `latest`): the base backup that precedes it (the newest one that
does, not simply the newest), the timeline recovery follows, every archived segment
from that base onwards present without a gap up to the target, and the window the
archive can reach. A target before the earliest base, after the end of the archive or
beyond a missing segment is refused with the reason and the reachable window. Where
only the WAL says where a target is (a restore point, a transaction, the last commit)
the segments are decrypted to a scratch folder, one at a time, and read with
pg_waldump; nothing else reads WAL.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time

from . import manifest, pg, restore, retention, run, wal
from .errors import PgBackupError
from .fsutil import free_bytes, require_free_space

log = logging.getLogger("pgbackup")

TARGET_KINDS = ("time", "name", "lsn", "xid", "immediate", "latest")
# Bounds the scan for a restore point or transaction: a week of busy WAL.
MAX_SCANNED_SEGMENTS = 20000
_RECORD = re.compile(
    r"tx:\s+(?P<xid>\d+), lsn: (?P<lsn>[0-9A-F]+/[0-9A-F]+), .*desc: "
    r"(?P<what>COMMIT|ABORT|RESTORE_POINT)(?: (?P<rest>.*))?$"
)
_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?) UTC")


class UnreachableError(PgBackupError):
    """The target lies outside what the backups and the archive can reach."""


def parse_time(text: str) -> datetime.datetime:
    """A target time as an operator writes it; without a zone it is UTC."""
    try:
        value = datetime.datetime.fromisoformat(text.strip().replace(" UTC", "+00:00").replace("Z", "+00:00"))
    except ValueError:
        raise PgBackupError(f"recovery target time {text!r} is not a time (2026-11-28 14:05:00+00)") from None
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def _check_target(kind: str, value: str):
    if kind not in TARGET_KINDS:
        raise PgBackupError(f"recovery target kind {kind!r}: use one of {', '.join(TARGET_KINDS)}")
    if kind in ("immediate", "latest"):
        return
    if not value:
        raise PgBackupError(f"a recovery target {kind} needs a value")
    if kind == "time":
        parse_time(value)
    elif kind == "lsn":
        try:
            wal.parse_lsn(value)
        except ValueError:
            raise PgBackupError(f"recovery target LSN {value!r} is not an LSN (0/3000148)") from None
    elif kind == "xid" and not value.isdigit():
        raise PgBackupError(f"recovery target xid {value!r} is not a transaction id")
    elif kind == "name" and (len(value) > 63 or "'" in value or "\n" in value):
        raise PgBackupError("a restore point name has at most 63 characters, no quote and no line break")


# ---- timelines ---------------------------------------------------------------------


def read_histories(dest: str, system: str, keys, scratch: str) -> dict[int, list[tuple[int, int]]]:
    """Every archived timeline history of the system: {timeline: [(ancestor, its end LSN)...]}."""
    histories = {}
    for item in wal.archived_files(dest, system):
        if not item["name"].endswith(".history"):
            continue
        timeline = int(item["name"][:8], 16)
        target = os.path.join(scratch, item["name"])
        wal.fetch(item["name"], target, dest, keys, system=system)
        entries = []
        with open(target, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 2 and fields[0].isdigit():
                    entries.append((int(fields[0]), wal.parse_lsn(fields[1])))
        os.unlink(target)
        histories[timeline] = entries
    return histories


def timeline_path(timeline: int, histories: dict) -> list[tuple[int, int | None]]:
    """The timelines recovery walks to reach `timeline`: [(timeline, end LSN or None)]."""
    return [*histories.get(timeline, []), (timeline, None)]


def _on_path(base: dict, path: list) -> bool:
    """Whether the base lies on that path before its timeline ended there."""
    return any(tli == base["timeline"] and (end is None or end > base["end"]) for tli, end in path)


def _timeline_for(number: int, path: list, segment_bytes: int) -> int:
    """Which timeline's file recovery reads for a segment number: the newest timeline on
    the path that began at or before that segment (as PostgreSQL's XLogFileReadAnyTLI)."""
    begin = 0
    chosen = path[0][0]
    for tli, end in path:
        if begin // segment_bytes <= number:
            chosen = tli
        if end is not None:
            begin = end
    return chosen


# ---- the archive as recovery reads it -------------------------------------------------


class _Archive:
    """One system's archive along one timeline path, with the keys to read it."""

    def __init__(self, dest, keys, system, path, present, segment_bytes, scratch, major):
        self.dest, self.keys, self.system = dest, keys, system
        self.path, self.present, self.segment_bytes = path, present, segment_bytes
        self.scratch, self.major = scratch, major

    def name_at(self, number: int) -> str:
        return wal.segment_name(
            _timeline_for(number, self.path, self.segment_bytes), number, self.segment_bytes
        )

    def chain(self, base: dict) -> dict:
        """From the base backup on, the segments recovery reads, up to the first one
        missing; and whether the archive holds a segment of the path after that gap."""
        number = base["end"] // self.segment_bytes + 1  # the base carries its WAL up to its end
        last = None
        while (name := self.name_at(number)) in self.present:
            last, number = name, number + 1
        # Only a file recovery would read counts: the parent timeline's segments past the
        # switch are on the path's timelines but never read, and are no sign of a gap.
        beyond = sorted(
            other
            for other in self.present
            if wal.SEGMENT_NAME.fullmatch(other)
            and (later := wal.segment_number(other, self.segment_bytes)) > number
            and other == self.name_at(later)
        )
        return {
            "last": last,
            "end_lsn": (number if last else base["end"] // self.segment_bytes + 1) * self.segment_bytes,
            "missing": name if beyond else None,
            "next_present": beyond[0] if beyond else None,
        }

    def scan(self, names: list[str]):
        """Decrypt segments one at a time, in the order given, and yield each one's
        COMMIT, ABORT and RESTORE_POINT records as pg_waldump reads them."""
        waldump = pg.tool("pg_waldump", self.major)
        for name in names:
            target = os.path.join(self.scratch, name)
            wal.fetch(name, target, self.dest, self.keys, system=self.system)
            try:
                # pg_waldump ends each lone segment with an error about the next record:
                # expected, and its exit code says nothing more.
                done = subprocess.run(
                    [waldump, "--path", self.scratch, name],
                    capture_output=True,
                    check=False,
                    env={**os.environ, "TZ": "UTC"},
                )
            except OSError as error:
                raise PgBackupError(f"cannot run pg_waldump: {error.strerror}") from None
            finally:
                os.unlink(target)
            lines = done.stdout.decode("utf-8", "replace").splitlines()
            yield [found.groupdict() for line in lines if (found := _RECORD.search(line))]

    def backwards(self, last: str, stop: int, limit: int) -> list[str]:
        """Archived segment names from `last` back to segment number `stop`, at most `limit`."""
        number = wal.segment_number(last, self.segment_bytes)
        names = []
        while number >= stop and len(names) < limit:
            name = self.name_at(number)
            if name in self.present:
                names.append(name)
            number -= 1
        return names

    def last_commit(self, chain: dict, first_base: dict) -> datetime.datetime | None:
        """The time of the last commit the chain holds: its segments are read from the
        end back (a quiet database may have none in the last few) to the first base."""
        if not chain["last"]:
            return None
        stop = first_base["start"] // self.segment_bytes
        for records in self.scan(self.backwards(chain["last"], stop, MAX_SCANNED_SEGMENTS)):
            times = [
                moment
                for record in records
                if record["what"] == "COMMIT" and (moment := _commit_time(record))
            ]
            if times:
                return max(times)
        return None

    def find(self, kind: str, value: str, chain: dict, first_base: dict) -> int | None:
        """The LSN of a restore point or of a transaction's end, scanning back from the
        end of the chain to the earliest base (bounded). A restore point name found more
        than once is refused: recovery stops at the first after its base, which the plan
        cannot know for certain without choosing for the operator."""
        if not chain["last"]:
            return None
        stop = first_base["start"] // self.segment_bytes
        found = []
        for records in self.scan(self.backwards(chain["last"], stop, MAX_SCANNED_SEGMENTS)):
            for record in reversed(records):
                if (
                    kind == "name"
                    and record["what"] == "RESTORE_POINT"
                    and (record["rest"] or "").strip() == value
                ):
                    found.append(wal.parse_lsn(record["lsn"]))
                if kind == "xid" and record["what"] in ("COMMIT", "ABORT") and record["xid"] == value:
                    return wal.parse_lsn(record["lsn"])
        if len(found) > 1:
            places = ", ".join(wal.format_lsn(lsn) for lsn in sorted(found))
            raise UnreachableError(
                f"the restore point {value} was made {len(found)} times (at {places}); "
                "give the one you mean as restore_target_lsn"
            )
        return found[0] if found else None


def _commit_time(record: dict) -> datetime.datetime | None:
    found = _TIME.match(record.get("rest") or "")
    if not found:
        return None
    return datetime.datetime.fromisoformat(found.group(1)).replace(tzinfo=datetime.UTC)


# ---- the plan -----------------------------------------------------------------------


def plan(
    dest: str,
    keys,
    kind: str,
    value: str = "",
    base_name: str | None = None,
    action: str = "promote",
    base_sets: list[dict] | None = None,
    timeline: int | None = None,
    offsite_settings: str | None = None,
    data_dir: str | None = None,
) -> dict:
    """What a point-in-time recovery to that target needs, or UnreachableError saying why
    it cannot be reached and what can. Reads the sets' manifests, the timeline histories
    and, where the target needs it, WAL; writes nothing but its scratch folder, which it
    removes. With offsite_settings (the run's settings file) the WAL archive is first
    copied back from the off-site copy and the base backups are those there; with
    data_dir, the free space the restore needs beside it is checked."""
    _check_target(kind, value)
    if action not in ("promote", "pause", "shutdown"):
        raise PgBackupError(f"recovery_target_action {action!r}: use promote, pause or shutdown")
    if kind == "latest" and action != "promote":
        # Without a target PostgreSQL ignores recovery_target_action and promotes.
        raise PgBackupError(
            f"recovery_target_action {action} needs a target: latest always ends promoted "
            "(give a time, name, LSN or xid to pause at)"
        )
    if offsite_settings:
        base_sets = run.fetch_offsite(offsite_settings, [], archive=True, catalog=True)["catalog"]
    sets = base_sets if base_sets is not None else retention.scan(dest)
    physical = [
        entry for entry in sets if entry.get("status") == "complete" and entry.get("kind") == "physical"
    ]
    if base_name:
        physical = [entry for entry in physical if entry["name"] == base_name]
        if not physical:
            raise PgBackupError(f"no complete base backup named {base_name} in {dest}")
    if not physical:
        raise UnreachableError(f"no complete base backup in {dest}: point-in-time recovery needs one")
    newest = max(physical, key=retention.newest_first_key)
    system = newest.get("system_identifier")
    bases = wal.bases_of(physical, system)
    if not bases:
        raise UnreachableError(f"the base backups in {dest} do not record their WAL positions")
    present = (
        {item["name"] for item in wal.archived_files(dest, system)} if system in wal.systems(dest) else set()
    )
    scratch = tempfile.mkdtemp(prefix=".pitr-scan-", dir=dest)
    try:
        histories = read_histories(dest, system, keys, scratch)
        newest_timeline = max([1, *histories])
        if timeline is not None and timeline not in (1, *histories):
            raise UnreachableError(
                f"timeline {timeline} is not in the archive (it holds timelines 1 to {newest_timeline})"
            )
        path = timeline_path(timeline or newest_timeline, histories)
        bases = [base for base in bases if _on_path(base, path)]
        if not bases:
            raise UnreachableError(f"no base backup lies on the history of timeline {path[-1][0]}")
        version = newest.get("server_version_num")
        archive = _Archive(
            dest,
            keys,
            system,
            path,
            present,
            bases[-1]["segment_bytes"],
            scratch,
            pg.major_of(version) if version else None,
        )
        found = _decide(archive, bases, kind, value, action, "latest" if timeline is None else str(timeline))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not offsite_settings:
        _check_base(found["base_path"], keys)
    if data_dir:
        found["space"] = check_space(found, data_dir, dest, fetched=bool(offsite_settings))
    return found


def _check_base(set_path: str, keys):
    """Before anything is stopped: the base backup's manifest authenticated with the keys
    and each of its files there with its recorded size (restore-base then checks every
    byte as it unpacks; an off-site set is checked in full when it is copied back)."""
    record = restore.open_set(set_path, keys)
    for part in record.get("base", []):
        path = os.path.join(set_path, part["path"])
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != part["size"]:
            found = "missing" if size is None else f"{size} bytes"
            raise PgBackupError(
                f"base backup {set_path}: {part['path']} is {found}, its manifest says {part['size']} bytes;"
                " choose another with restore_base"
            )


def _decide(archive: _Archive, bases: list[dict], kind: str, value: str, action: str, timeline: str) -> dict:
    newest = bases[-1]
    # The chain that reaches furthest: the newest base's, unless nothing was archived
    # after it yet (then an older base's reaches as far, through the newest one's WAL).
    chain = max((archive.chain(base) for base in bases), key=lambda each: each["end_lsn"])
    end_time = archive.last_commit(chain, bases[0])
    window = {
        "earliest_time": bases[0]["finished_at"],
        "earliest_lsn": wal.format_lsn(bases[0]["end"]),
        "latest_commit_time": end_time.isoformat() if end_time else None,
        "latest_lsn": wal.format_lsn(chain["end_lsn"]),
        "last_segment": chain["last"],
        "timeline": archive.path[-1][0],
    }
    gap = _gap_text(chain) if chain["missing"] else None

    def refuse(reason: str):
        raise UnreachableError(
            f"{reason}; reachable: from {window['earliest_time']} ({window['earliest_lsn']}, the end of the "
            f"earliest base backup) to {window['latest_commit_time'] or 'the end of the archive'} (the last "
            f"commit archived; WAL to {window['latest_lsn']} on timeline {window['timeline']})"
        )

    settings = {"recovery_target_timeline": timeline}
    if kind in ("latest", "immediate"):
        if gap and kind == "latest":
            refuse(f"{gap}: recovery would stop there, short of the latest point")
        if kind == "immediate":
            settings["recovery_target"] = "immediate"
        chosen = newest
    elif kind == "time":
        moment = parse_time(value)
        chosen = _newest_before(bases, lambda base: manifest.parse_iso(base["finished_at"]) <= moment)
        if chosen is None:
            refuse(f"{moment.isoformat()} is before the earliest base backup ends")
        if end_time is None or moment > end_time:
            refuse(
                f"{gap}: {moment.isoformat()} is after it"
                if gap
                else f"{moment.isoformat()} is after the last commit in the archive"
            )
        before_gap = archive.chain(chosen)
        if before_gap["missing"]:
            reached = archive.last_commit(before_gap, bases[0])
            if reached is None or moment > reached:
                refuse(f"{_gap_text(before_gap)}: {moment.isoformat()} is after it")
        settings["recovery_target_time"] = moment.isoformat()
    else:
        chosen = _by_position(archive, bases, chain, kind, value, refuse)
        settings[_POSITION_SETTINGS[kind]] = value
    settings["recovery_target_action"] = action
    log.info("point-in-time recovery to %s %s: from base backup %s", kind, value, chosen["name"])
    return {
        "system_identifier": archive.system,
        "target": {"kind": kind, "value": value},
        "base_backup": chosen["name"],
        "base_path": chosen["path"] or os.path.join(archive.dest, chosen["name"]),
        "base_end_lsn": wal.format_lsn(chosen["end"]),
        "base_finished_at": chosen["finished_at"],
        "base_plaintext_bytes": chosen["plaintext_bytes"],
        "base_encrypted_bytes": chosen["encrypted_bytes"],
        "settings": settings,
        "window": window,
    }


_POSITION_SETTINGS = {
    "lsn": "recovery_target_lsn",
    "name": "recovery_target_name",
    "xid": "recovery_target_xid",
}


def _gap_text(chain: dict) -> str:
    return f"segment {chain['missing']} is missing from the archive (it goes on at {chain['next_present']})"


def _by_position(archive: _Archive, bases: list[dict], chain: dict, kind: str, value: str, refuse) -> dict:
    """The base for a target at a WAL position: an LSN, or a restore point or transaction
    whose position only the WAL says."""
    if kind == "lsn":
        target_lsn = wal.parse_lsn(value)
    else:
        target_lsn = archive.find(kind, value, chain, bases[0])
        if target_lsn is None:
            what = f"restore point named {value}" if kind == "name" else f"commit of transaction {value}"
            refuse(f"no {what} in the archived WAL after a base backup")
    where = f"the target {kind} {value} ({wal.format_lsn(target_lsn)})"
    chosen = _newest_before(bases, lambda base: base["end"] <= target_lsn)
    if chosen is None:
        refuse(f"{where} is before the earliest base backup ends")
    if target_lsn > chain["end_lsn"]:
        refuse(
            f"{_gap_text(chain)}: {where} is after it"
            if chain["missing"]
            else f"{where} is after the end of the archive"
        )
    before_gap = archive.chain(chosen)
    if before_gap["missing"] and target_lsn >= before_gap["end_lsn"]:
        refuse(f"{_gap_text(before_gap)}: {where} is after it")
    return chosen


def _newest_before(bases: list[dict], fits) -> dict | None:
    candidates = [base for base in bases if fits(base)]
    return candidates[-1] if candidates else None


# Room for the WAL recovery writes beside the restored base (max_wal_size's default).
WAL_HEADROOM_BYTES = 1 << 30


def check_space(found: dict, data_dir: str, dest: str, fetched: bool) -> dict:
    """Refuse, before anything is stopped or moved, a restore the disks cannot hold: the
    old data directory stays beside the restored one (renamed on its own filesystem),
    and a base backup copied back from off-site needs room in the backup directory."""
    parent = os.path.dirname(os.path.abspath(data_dir.rstrip("/")))
    needed = (found["base_plaintext_bytes"] or 0) + WAL_HEADROOM_BYTES
    require_free_space(parent, needed, "for the restored data directory beside the old one")
    report = {"data_dir_parent": parent, "needed_bytes": needed, "free_bytes": free_bytes(parent)}
    if fetched:
        require_free_space(dest, found["base_encrypted_bytes"] or 0, "to copy the base backup back")
    return report


def recovery_settings(plan_: dict, restore_command: str) -> str:
    """The plan's recovery settings as postgresql.conf lines (values are checked in
    _check_target: no quote reaches them)."""
    lines = [f"restore_command = '{restore_command}'"]
    lines += [f"{name} = '{setting}'" for name, setting in sorted(plan_["settings"].items())]
    return "\n".join(lines) + "\n"


# ---- waiting for the end of recovery ------------------------------------------------------


def _postmaster_alive(data_dir: str) -> bool:
    """Whether the postmaster of data_dir runs: its pid file names a live process."""
    try:
        with open(os.path.join(data_dir, "postmaster.pid"), encoding="ascii", errors="replace") as handle:
            pid = int(handle.readline().strip() or 0)
        if pid <= 0:
            return False
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _log_tail(log_file: str | None, lines: int = 15) -> str:
    if not log_file:
        return ""
    try:
        with open(log_file, encoding="utf-8", errors="replace") as handle:
            tail = handle.readlines()[-lines:]
    except OSError:
        return ""
    return "; the server's log ends: " + " | ".join(line.strip() for line in tail)


_STARTING = (
    "starting up",
    "not yet accepting connections",
    "Connection refused",
    "No such file or directory",
)


def wait_for_recovery(
    data_dir: str, action: str, timeout: float, log_file: str | None = None, poll: float = 1.0
) -> dict:
    """Wait (up to timeout seconds) until recovery has reached its target: promoted, or
    paused there. A server that stops on the way (a target it could not reach, a WAL
    file that failed to decrypt) fails at once, with the end of its log."""
    started = time.monotonic()
    while True:
        waited = time.monotonic() - started
        if not _postmaster_alive(data_dir):
            raise PgBackupError(f"the server of {data_dir} stopped during recovery{_log_tail(log_file)}")
        try:
            with pg.connect() as conn:
                row = conn.execute(
                    "SELECT pg_is_in_recovery(),"
                    " CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() END"
                ).fetchone()
                done = (action == "promote" and not row[0]) or (action == "pause" and row[1] == "paused")
                if done:
                    return _reached(conn, row[0], waited)
        except pg.driver().OperationalError:
            # The connection went away in the middle of the question: the loop's next
            # look at the postmaster says whether the server stopped.
            time.sleep(0.5)
            continue
        except PgBackupError as error:
            # Refused while starting up is the wait; a server that went away meanwhile is
            # the loop's next question; anything else (authentication) is an error.
            if not any(sign in str(error) for sign in _STARTING):
                time.sleep(0.5)
                if _postmaster_alive(data_dir):
                    raise
                continue
        if waited > timeout:
            raise PgBackupError(
                f"recovery has not reached its target after {int(waited)} s (restore_recovery_timeout); "
                f"the server still runs: look at its log{_log_tail(log_file)}"
            )
        time.sleep(poll)


def _reached(conn, in_recovery: bool, waited: float) -> dict:
    # pg_walfile_name() refuses to run during recovery: a paused server tells its
    # timeline by its last restartpoint.
    if in_recovery:
        statement = (
            "SELECT pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp(),"
            " (SELECT timeline_id FROM pg_control_checkpoint())"
        )
    else:
        statement = (
            "SELECT pg_current_wal_lsn()::text, pg_last_xact_replay_timestamp(),"
            " ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
        )
    lsn, replayed_at, timeline = conn.execute(statement).fetchone()
    return {
        "in_recovery": in_recovery,
        "reached_lsn": lsn,
        "last_replayed_commit": replayed_at.isoformat() if replayed_at else None,
        "timeline": timeline,
        "waited_seconds": round(waited, 1),
    }
