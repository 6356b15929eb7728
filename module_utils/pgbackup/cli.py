"""The on-host command line: `pgbackup SUBCOMMAND ...`, as cron and operators call it.

Exit 0 on success; on failure one line `pgbackup: error: ...` on stderr and a
non-zero exit. Connection settings come from libpq's environment and passfile:
there is deliberately no password option.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from . import __version__, archive, backup, crypto, physical, pitr, restore, retention, run, wal
from .connection import DEFAULT_SSLMODE
from .errors import BusyError, PgBackupError, RefusedError

EXIT_FAILURE = 1
EXIT_REFUSED = 3
EXIT_BUSY = 4
# What restore_command answers for anything but a missing file: above 125, so that
# PostgreSQL aborts recovery instead of taking the failure for the end of the archive.
EXIT_STOP_RECOVERY = 126


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError("must be a number of seconds, 0 or more")
    return value


def _print(result, as_json: bool, human: str):
    print(json.dumps(result, indent=2, sort_keys=True) if as_json else human)


def cmd_keygen(args):
    key = crypto.generate_key_pair(args.key_file, args.public_file, args.comment)
    public_file = args.public_file or f"{args.key_file}.pub"
    print(
        f"wrote a new private key to {args.key_file} and its public key to {public_file} "
        f"(key id {key.key_id}).\n"
        "Database hosts get only the public key; keep the private key in the vault and an escrow "
        "copy offline: lose every private key and you lose every backup.\n"
        f"{key.public.text()}"
    )


def _keys(args) -> crypto.KeyRing:
    return crypto.load_key_ring(args.key_file)


def _recipients(args) -> crypto.Recipients:
    return crypto.load_recipients(args.recipient)


def cmd_encrypt(args):
    crypto.encrypt_stream(
        sys.stdin.buffer,
        sys.stdout.buffer,
        _recipients(args),
        binding=args.name,
        compression_level=args.compression_level,
        threads=args.threads,
    )
    sys.stdout.buffer.flush()


def cmd_decrypt(args):
    crypto.decrypt_stream(
        sys.stdin.buffer, sys.stdout.buffer, _keys(args), name="standard input", binding=args.name
    )
    sys.stdout.buffer.flush()


def cmd_backup(args):
    record = backup.create_backup_set(
        args.dest,
        _recipients(args),
        databases=args.database or None,
        dump_format=args.format,
        jobs=args.jobs,
        compression_level=args.compression_level,
        threads=args.threads,
    )
    _print(record, args.json, record["path"])


def cmd_basebackup(args):
    record = physical.create_base_backup(
        args.dest,
        _recipients(args),
        compression_level=args.compression_level,
        threads=args.threads,
        parts=args.parts,
    )
    _print(record, args.json, record["path"])


def cmd_restore_base(args):
    report = physical.restore_base(
        args.set, _keys(args), args.target_dir, verify_checksums=args.verify_checksums
    )
    _print(report, args.json, f"{report['name']} restored into {report['target_dir']} and verified")


def cmd_verify(args):
    report = restore.verify_set(args.set, _keys(args) if args.key_file else None)
    how = (
        "decrypted and authenticated"
        if report["decrypted"]
        else "structure, sizes and hashes; decrypting needs the private key of "
        + " or ".join(report["key_ids"])
    )
    _print(
        report,
        args.json,
        f"{report['set']}: OK ({report['files']} files, {report['encrypted_bytes']} bytes encrypted, "
        f"{report['plaintext_bytes']} bytes of dump data; {how})",
    )


def _stop_on_sigterm(_signum, _frame):
    raise SystemExit(128 + signal.SIGTERM)


def cmd_restore(args):
    # Stopped by the service manager or an operator: drop the scratch databases and end
    # the loaders on the way out, as on any failure.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    report = restore.restore_set(
        args.set,
        _keys(args),
        databases=args.database or None,
        target_db=args.target_db,
        jobs=args.jobs,
        include_globals=args.globals,
        force=args.force,
        check_space=not args.no_space_check,
    )
    lines = [
        f"{item['database']} -> {item['target']}"
        + (f" (previous database kept as {item['kept_previous_as']})" if item["kept_previous_as"] else "")
        for item in report["databases"]
    ]
    _print(report, args.json, "\n".join(lines) or "globals restored")


def cmd_list(args):
    sets = retention.scan(args.dest)
    human = "\n".join(
        f"{entry['name']}  {entry['status']}"
        + (
            f"  {entry['started_at']}  {entry['total_size']} bytes encrypted"
            f"  key {'|'.join(entry['key_ids'])}"
            f"  {','.join(entry['databases'])}"
            if entry["status"] == "complete"
            else f"  {entry.get('reason', '')}".rstrip()
        )
        for entry in sets
    )
    _print(sets, args.json, human or f"no backup sets in {args.dest}")
    if not args.json:
        for line in _window_lines(wal.describe(args.dest, sets)):
            print(line)
        # The databases restore --force kept aside, if the server can be asked.
        try:
            print(_kept_summary(restore.kept_databases()))
        except PgBackupError as error:
            print(f"(databases kept by restore --force: unknown, {error})")


def _kept_summary(kept: list[dict]) -> str:
    if not kept:
        return "no databases kept by restore --force"
    rows = "\n".join(
        f"  {entry['name']}  kept {entry['kept_at']} ({entry['age_days']} days)" for entry in kept
    )
    return f"databases kept by restore --force (drop with `pgbackup kept --drop ...`):\n{rows}"


def cmd_kept(args):
    if args.database is None and args.drop_older_than is None:
        kept = restore.kept_databases()
        _print(kept, args.json, _kept_summary(kept))
        return
    dropped = restore.drop_kept(args.database, args.drop_older_than, dry_run=args.dry_run)
    verb = "would drop" if args.dry_run else "dropped"
    _print(
        {"dropped": dropped, "dry_run": args.dry_run}, args.json, f"{verb}: {', '.join(dropped) or 'nothing'}"
    )


def cmd_keys(args):
    usage = retention.key_usage(args.dest)
    human = "\n".join(
        f"key {item['key_id']}: {item['sets']} set(s), "
        f"newest {item['newest_set']}, oldest {item['oldest_set']}"
        for item in usage
    )
    _print(usage, args.json, human or f"no complete backup sets in {args.dest}")


def cmd_prune(args):
    report = retention.prune(
        args.dest, keep_days=args.keep_days, min_keep=args.min_keep, dry_run=args.dry_run, kind=args.kind
    )
    verb = "would remove" if args.dry_run else "removed"
    human = (
        f"{verb}: {', '.join(report['removed'] + report['leftovers_removed']) or 'nothing'}; "
        f"kept {len(report['kept'])}"
    )
    _print(report, args.json, human)


def cmd_run(args):
    summary = {}
    code = run.main(args.settings, args.kind, summary)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    return code


def cmd_drill_record(args):
    recorded = run.record_drill(args.settings, args.result, args.rto, args.rpo)
    _print(
        {"metrics": recorded.path, "result": args.result},
        args.json,
        f"drill {args.result}: recorded in {recorded.path}",
    )


def cmd_check(args):
    report = run.check(args.settings, args.replication)
    _print(
        report,
        args.json,
        f"connected as {report['user']} over {'TLS' if report['tls'] else 'a Unix socket'} to PostgreSQL "
        f"{report['server_version']}"
        + ("; replication connection accepted" if report["replication"] else ""),
    )


def cmd_wal_push(args):
    result = wal.push_command(
        args.path,
        args.settings,
        dest=args.dest,
        recipient_paths=args.recipient,
        pgdata=args.pgdata,
        compression_level=args.compression_level,
        ahead=args.push_ahead,
    )
    if args.json:  # quiet otherwise: PostgreSQL logs what archive_command prints
        _print(result, True, "")


def cmd_wal_fetch(args):
    try:
        wal.fetch_command(
            args.name,
            args.target,
            args.settings,
            _keys(args),
            dest=args.dest,
            pgdata=args.pgdata,
            ahead=args.fetch_ahead,
        )
    except wal.NotArchivedError as error:
        # PostgreSQL asks for files that may not exist (the next timeline's history):
        # a quiet failure is the answer it expects.
        logging.getLogger("pgbackup").info("%s", error)
        return EXIT_FAILURE
    except PgBackupError as error:
        # Any other failure must stop recovery: PostgreSQL takes exit codes up to 125 as
        # "no such file" and would end recovery there, short of its target, silently.
        print(f"pgbackup: error: {error}; recovery must stop here", file=sys.stderr)
        return EXIT_STOP_RECOVERY
    return 0


def cmd_pitr_wait(args):
    report = pitr.wait_for_recovery(args.data_dir, args.action, args.timeout, log_file=args.log_file)
    _print(
        report,
        args.json,
        f"recovery reached {report['reached_lsn']} (last commit replayed {report['last_replayed_commit']}) "
        f"on timeline {report['timeline']} after {report['waited_seconds']} s",
    )


def _window_lines(systems: list[dict]) -> list[str]:
    lines = []
    for system in systems:
        lines.append(
            f"WAL archive of system {system['system_identifier']}: {system['files']} files, "
            f"{system['bytes']} bytes encrypted"
        )
        for timeline in system["timelines"]:
            gaps = "".join(f"; MISSING {first}..{last}" for first, last in timeline["missing"])
            lines.append(
                f"  timeline {timeline['timeline']}: {timeline['first']} .. {timeline['last']} "
                f"({timeline['segments']} segments, newest archived {timeline['newest_archived_at']}){gaps}"
            )
        for window in system["windows"]:
            lines.append(
                f"  recovery window on timeline {window['timeline']}: from {window['earliest_lsn']} "
                f"({window['earliest_time']}, end of {window['base_backup']}) to {window['latest_lsn']} "
                f"(segment {window['latest_segment']}, archived {window['latest_archived_at']})"
            )
        if not system["windows"]:
            lines.append("  no recovery window: no base backup that the archived WAL continues from")
    return lines


def cmd_wal_list(args):
    systems = wal.describe(args.dest)
    _print(systems, args.json, "\n".join(_window_lines(systems)) or f"no WAL archive in {args.dest}")


def cmd_wal_prune(args):
    report = wal.prune(args.dest, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    kept = ", ".join(f"{system} from {name}" for system, name in report["kept_from"].items())
    _print(report, args.json, f"{verb} {len(report['removed'])} WAL files; kept {kept or 'everything'}")


def cmd_pitr_plan(args):
    kind, value = next(
        (kind, getattr(args, f"target_{kind}"))
        for kind in pitr.TARGET_KINDS
        if getattr(args, f"target_{kind}") not in (None, False)
    )
    found = pitr.plan(
        args.dest,
        _keys(args),
        kind,
        "" if value is True else value,
        base_name=args.base,
        action=args.action,
        timeline=args.timeline,
        offsite_settings=args.settings if args.offsite else None,
        data_dir=args.data_dir,
    )
    window = found["window"]
    settings_text = ", ".join(f"{name}={setting}" for name, setting in sorted(found["settings"].items()))
    _print(
        found,
        args.json,
        f"target: {kind} {'' if value is True else value}\n"
        f"base backup: {found['base_backup']} (ends at {found['base_end_lsn']}, "
        f"finished {found['base_finished_at']})\n"
        f"recovery settings: {settings_text}\n"
        f"reachable: {window['earliest_time']} .. {window['latest_commit_time']} "
        f"(WAL to {window['latest_lsn']}, timeline {window['timeline']})",
    )


def cmd_fetch_set(args):
    if not args.name and not args.latest:
        raise PgBackupError("name the sets to copy back, or give --latest logical|physical")
    report = run.fetch_offsite(
        args.settings, args.name, archive=False, catalog=False, latest_kind=args.latest
    )
    _print(report, args.json, "\n".join(report["sets"]))


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - one statement per option
    parser = argparse.ArgumentParser(prog="pgbackup", description="Encrypted, verified PostgreSQL backups.")
    parser.add_argument("--version", action="version", version=f"pgbackup {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, handler, help_text):
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(handler=handler)
        return sub

    def key_option(sub, required=True):
        sub.add_argument(
            "--key-file",
            action="append",
            required=required,
            help="a private key file, or a key ring folder of *.key files (repeat); "
            "a version 1 set takes its 64-hex-character key file",
        )

    def recipient_option(sub):
        sub.add_argument(
            "--recipient",
            action="append",
            required=True,
            help="a public key file, or a folder of *.pub files, to encrypt for (repeat)",
        )

    def settings_option(sub):
        sub.add_argument(
            "--settings",
            default=os.environ.get("PGBACKUP_SETTINGS", archive.DEFAULT_SETTINGS_FILE),
            help=f"the run's settings (JSON; default $PGBACKUP_SETTINGS or {archive.DEFAULT_SETTINGS_FILE})",
        )

    def compression_options(sub):
        sub.add_argument(
            "--compression-level", type=int, default=3, help="zstd level, 0 for none (default 3)"
        )
        sub.add_argument("--threads", type=int, default=2, help="zstd worker threads (default 2)")

    sub = command("keygen", cmd_keygen, "write a new key pair (private 0600, public 0644; never overwrites)")
    sub.add_argument("--key-file", required=True, help="the private key file to write")
    sub.add_argument("--public-file", help="the public key file to write (default: KEY_FILE.pub)")
    sub.add_argument("--comment", default="", help="a note written beside the key, e.g. its purpose and date")
    sub = command("encrypt", cmd_encrypt, "encrypt standard input to standard output")
    recipient_option(sub)
    sub.add_argument("--name", default="", help="the name the file is bound to (checked by decrypt --name)")
    compression_options(sub)
    sub = command("decrypt", cmd_decrypt, "decrypt standard input to standard output")
    key_option(sub)
    sub.add_argument("--name", help="refuse a file written under another name (encrypt --name)")

    sub = command("backup", cmd_backup, "dump globals and databases into a new encrypted set")
    sub.add_argument("--dest", required=True, help="backup directory; the set is a new folder in it")
    recipient_option(sub)
    sub.add_argument("--database", action="append", help="a database to dump (repeat); default: all")
    sub.add_argument("--format", choices=backup.FORMATS, default="custom", help="pg_dump format")
    sub.add_argument("--jobs", type=_positive, default=1, help="parallel pg_dump jobs (directory format)")
    compression_options(sub)
    sub.add_argument("--json", action="store_true", help="print the manifest as JSON")

    sub = command("basebackup", cmd_basebackup, "pg_basebackup (tar, with its WAL) into a new encrypted set")
    sub.add_argument("--dest", required=True, help="backup directory; the set is a new folder in it")
    recipient_option(sub)
    compression_options(sub)
    sub.add_argument(
        "--parts",
        type=int,
        default=2,
        help="files the base tar is split into, written and restored side by side (default 2)",
    )
    sub.add_argument("--json", action="store_true", help="print the manifest as JSON")

    sub = command("restore-base", cmd_restore_base, "unpack a base backup into an empty folder and verify it")
    sub.add_argument("set", help="path of the physical backup set")
    key_option(sub)
    sub.add_argument("--target-dir", required=True, help="new or empty folder to unpack into")
    sub.add_argument(
        "--verify-checksums",
        action="store_true",
        help="also read every restored file back against the backup_manifest checksums",
    )
    sub.add_argument("--json", action="store_true")

    sub = command(
        "verify",
        cmd_verify,
        "decrypt and check every file of a set (without --key-file: structure, sizes and hashes)",
    )
    sub.add_argument("set", help="path of the backup set")
    key_option(sub, required=False)
    sub.add_argument("--json", action="store_true")

    sub = command("restore", cmd_restore, "verify a set, then restore it")
    sub.add_argument("set", help="path of the backup set")
    key_option(sub)
    sub.add_argument("--database", action="append", help="a database to restore (repeat); default: all")
    sub.add_argument("--target-db", help="restore the one --database under this name")
    sub.add_argument(
        "--jobs",
        type=_positive,
        default=1,
        help="loaders side by side (pg_restore processes), and pg_restore --jobs for the indexes",
    )
    sub.add_argument("--globals", action="store_true", help="restore roles and tablespaces first")
    sub.add_argument(
        "--force",
        action="store_true",
        help="replace an existing non-empty database (it is kept under a new name)",
    )
    sub.add_argument(
        "--no-space-check",
        action="store_true",
        help="restore even where the server's free space is below the databases' size at backup time",
    )
    sub.add_argument("--json", action="store_true")

    sub = command("list", cmd_list, "list backup sets, newest first")
    sub.add_argument("--dest", required=True)
    sub.add_argument("--json", action="store_true")

    sub = command("keys", cmd_keys, "which key ids the sets need: what key rotation must keep")
    sub.add_argument("--dest", required=True)
    sub.add_argument("--json", action="store_true")

    sub = command("prune", cmd_prune, "delete sets past retention")
    sub.add_argument("--dest", required=True)
    sub.add_argument("--keep-days", type=int, default=30, help="keep sets younger than this (default 30)")
    sub.add_argument(
        "--min-keep", type=_positive, default=7, help="always keep this many newest sets (default 7)"
    )
    sub.add_argument(
        "--kind",
        choices=["logical", "physical"],
        default="logical",
        help="which sets this retention applies to (default logical)",
    )
    sub.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    sub.add_argument("--json", action="store_true")

    def archive_options(sub):
        sub.add_argument("--dest", help="backup directory holding wal/ (default: the run's settings)")
        settings_option(sub)
        sub.add_argument(
            "--pgdata", default=".", help="data directory (default: the current one, as PostgreSQL runs it)"
        )

    sub = command("wal-push", cmd_wal_push, "archive_command: archive one WAL file, encrypted (%%p)")
    sub.add_argument("path", help="the file PostgreSQL gives (%%p)")
    archive_options(sub)
    sub.add_argument(
        "--recipient", action="append", help="public key file or folder (default: the run's settings)"
    )
    sub.add_argument("--compression-level", type=int, help="zstd level (default: the run's settings)")
    sub.add_argument(
        "--push-ahead",
        type=int,
        help="archive up to this many ready files per call, side by side (default: the run's settings)",
    )
    sub.add_argument("--json", action="store_true")

    sub = command("wal-fetch", cmd_wal_fetch, "restore_command: restore one archived WAL file (%%f %%p)")
    sub.add_argument("name", help="the file PostgreSQL asks for (%%f)")
    sub.add_argument("target", help="where PostgreSQL wants it (%%p)")
    archive_options(sub)
    sub.set_defaults(compression_level=None)
    key_option(sub)
    sub.add_argument(
        "--fetch-ahead",
        type=int,
        default=archive.DEFAULT_FETCH_AHEAD,
        help=f"decrypt up to this many following segments in the background "
        f"(default {archive.DEFAULT_FETCH_AHEAD}; 1: none)",
    )

    sub = command("wal-list", cmd_wal_list, "the WAL archive: timelines, gaps and the recovery window")
    sub.add_argument("--dest", required=True)
    sub.add_argument("--json", action="store_true")

    sub = command("wal-prune", cmd_wal_prune, "delete WAL older than the oldest kept base backup needs")
    sub.add_argument("--dest", required=True)
    sub.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    sub.add_argument("--json", action="store_true")

    sub = command(
        "pitr-plan",
        cmd_pitr_plan,
        "point-in-time recovery: the base backup for a target, checked against the archive",
    )
    sub.add_argument("--dest", required=True, help="backup directory with the base backups and wal/")
    key_option(sub)
    targets = sub.add_mutually_exclusive_group(required=True)
    targets.add_argument("--target-time", help="a time (2026-11-28 14:05:00+00; no zone: UTC)")
    targets.add_argument("--target-name", help="a restore point (pg_create_restore_point)")
    targets.add_argument("--target-lsn", help="a WAL position (0/3000148)")
    targets.add_argument("--target-xid", help="a transaction id: recovery stops after its commit")
    targets.add_argument("--target-immediate", action="store_true", help="the end of the base backup")
    targets.add_argument("--target-latest", action="store_true", help="the end of the archive")
    sub.add_argument("--base", help="this base backup, not the one the target chooses")
    sub.add_argument(
        "--timeline", type=_positive, help="follow this timeline (default: the newest, as recovery does)"
    )
    sub.add_argument(
        "--offsite",
        action="store_true",
        help="copy the WAL archive back from the off-site copy and choose among the base backups there",
    )
    settings_option(sub)
    sub.add_argument("--data-dir", help="the data directory to be replaced: its free space is checked")
    sub.add_argument(
        "--action",
        choices=["promote", "pause", "shutdown"],
        default="promote",
        help="at the target (default promote)",
    )
    sub.add_argument("--json", action="store_true")

    sub = command("fetch-set", cmd_fetch_set, "copy sets back from the off-site copy, and check them")
    sub.add_argument("name", nargs="*", help="set names")
    sub.add_argument("--latest", choices=run.KINDS, help="also the newest set of this kind there")
    settings_option(sub)
    sub.add_argument("--json", action="store_true")

    sub = command("pitr-wait", cmd_pitr_wait, "wait until a point-in-time recovery has reached its target")
    sub.add_argument("--data-dir", required=True, help="the recovering server's data directory")
    sub.add_argument("--action", choices=["promote", "pause"], default="promote")
    sub.add_argument("--timeout", type=_positive, default=3600, help="seconds (default 3600)")
    sub.add_argument("--log-file", help="the server's log, whose end a failure shows")
    sub.add_argument("--json", action="store_true")

    sub = command("check", cmd_check, "connect as the scheduled run will, and say what is wrong")
    settings_option(sub)
    sub.add_argument("--replication", action="store_true", help="also open a replication connection")
    sub.add_argument("--json", action="store_true")

    sub = command(
        "drill-record", cmd_drill_record, "record a recovery drill's result and RTO/RPO in the metrics"
    )
    sub.add_argument("result", choices=["passed", "failed"])
    sub.add_argument("--rto", type=_seconds, help="seconds the drill's restore took")
    sub.add_argument("--rpo", type=_seconds, help="seconds of data the drill could not recover")
    settings_option(sub)
    sub.add_argument("--json", action="store_true")

    sub = command("kept", cmd_kept, "list, or drop, the databases restore --force kept aside")
    sub.add_argument("--database", action="append", help="drop this kept database (repeat)")
    sub.add_argument(
        "--drop-older-than", type=float, metavar="DAYS", help="drop kept databases this old or older"
    )
    sub.add_argument("--dry-run", action="store_true", help="say what would be dropped, drop nothing")
    sub.add_argument("--json", action="store_true")

    sub = command(
        "run",
        cmd_run,
        "the scheduled run (cron): lock, node check, backup, verify, prune, copies, metrics",
    )
    sub.add_argument(
        "kind",
        nargs="?",
        choices=run.RUN_KINDS,
        default="logical",
        help="a logical or physical set, or wal: the WAL archive's off-site copy (default logical)",
    )
    settings_option(sub)
    sub.add_argument("--json", action="store_true", help="print what the run did (the log has every step)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Backups hold every row of every table: nothing pgbackup creates is for others.
    os.umask(0o077)
    # Verified TLS unless the caller says otherwise (libpq's own default is `prefer`);
    # libpq ignores it over a Unix socket.
    os.environ.setdefault("PGSSLMODE", DEFAULT_SSLMODE)
    # Progress with --verbose; warnings and errors always (cron mails what reaches stderr).
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.INFO if args.verbose else logging.WARNING)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s pgbackup %(levelname)s %(message)s",
        handlers=[to_stderr],
    )
    try:
        code = args.handler(args)
    except RefusedError as error:
        print(f"pgbackup: refused: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except BusyError as error:
        print(f"pgbackup: busy: {error}", file=sys.stderr)
        return EXIT_BUSY
    except PgBackupError as error:
        print(f"pgbackup: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("pgbackup: error: interrupted", file=sys.stderr)
        return 130
    return code or 0
