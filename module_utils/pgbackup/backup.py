"""Logical backups: pg_dumpall --globals-only plus pg_dump of each database.

A set is built in `<dest>/.partial-<name>/` and renamed to `<dest>/<name>/` only
after every file and the manifest are written and fsynced, so a set that `list`
calls complete is complete; an interrupted run leaves only a `.partial-` folder,
which prune removes after a day.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import subprocess

from . import __version__, manifest, pg
from .crypto import EncryptingWriter, Key
from .errors import PgBackupError
from .fsutil import describe_os_error, fsync_dir, hold, remove_tree, write_json_atomic

log = logging.getLogger("pgbackup")

FORMATS = ("custom", "directory")
READ_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60] or "_"


def _encrypt_file(path: str, source, key: Key, level: int, threads: int) -> dict:
    """Stream `source` into an encrypted file at path, via a temporary name."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as raw:
        writer = EncryptingWriter(raw, key, compression_level=level, threads=threads)
        while True:
            block = source.read(READ_BYTES)
            if not block:
                break
            writer.write(block)
        stats = writer.close()
        raw.flush()
        os.fsync(raw.fileno())
    os.rename(tmp, path)
    return {"size": stats.encrypted_bytes, "plaintext_size": stats.plaintext_bytes, "sha256": stats.sha256}


def _dump_to_file(argv: list[str], path: str, key: Key, level: int, threads: int, what: str) -> dict:
    """Run a dump program and stream its stdout straight into an encrypted file."""
    run = pg.ToolRun(argv, stdout=subprocess.PIPE)
    try:
        # A bigger pipe means fewer wake-ups between pg_dump and us.
        with contextlib.suppress(OSError):
            fcntl.fcntl(run.process.stdout.fileno(), _F_SETPIPE_SZ, READ_BYTES)
        entry = _encrypt_file(path, run.process.stdout, key, level, threads)
        run.process.stdout.close()
        run.finish(what)
        return entry
    except BaseException:
        run.kill()
        if os.path.exists(f"{path}.tmp"):
            os.unlink(f"{path}.tmp")
        raise


def _dump_directory(
    database: str, staging: str, target_dir: str, key: Key, level: int, threads: int, jobs: int
) -> list[dict]:
    """pg_dump -Fd -j N into a private staging folder, then encrypt file by file."""
    pg.run_tool(
        [
            pg.tool("pg_dump"),
            "--no-password",
            "--format=directory",
            f"--jobs={jobs}",
            "--compress=0",
            f"--file={staging}",
            f"--dbname={database}",
        ],
        f"pg_dump of database {database!r}",
    )
    os.mkdir(target_dir, 0o700)
    entries = []
    for name in sorted(os.listdir(staging)):
        plain_path = os.path.join(staging, name)
        with open(plain_path, "rb") as source:
            entry = _encrypt_file(os.path.join(target_dir, f"{name}.enc"), source, key, level, threads)
        os.unlink(plain_path)
        entry["path"] = os.path.join(os.path.basename(target_dir), f"{name}.enc")
        entry["name"] = name
        entries.append(entry)
    os.rmdir(staging)
    fsync_dir(target_dir)
    return entries


def _unique_set_name(dest: str, started) -> str:
    base = manifest.set_name("logical", started)
    name, suffix = base, 1
    while os.path.exists(os.path.join(dest, name)) or os.path.exists(
        os.path.join(dest, manifest.PARTIAL_PREFIX + name)
    ):
        suffix += 1
        name = f"{base}-{suffix}"
    return name


def plan(databases: list[str] | None = None) -> dict:
    """What a backup would cover, read from the server without writing anything."""
    with pg.connect() as conn:
        server = pg.server_info(conn)
        available = pg.list_databases(conn)
    return {"server": server, "databases": _select(available, databases)}


def _select(available: list[dict], wanted: list[str] | None) -> list[dict]:
    if wanted is None:  # None means every database; [] means globals only
        return available
    by_name = {database["name"]: database for database in available}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise PgBackupError(f"database(s) not found on the server: {', '.join(missing)}")
    return [by_name[name] for name in wanted]


def create_backup_set(
    dest: str,
    key: Key,
    databases: list[str] | None = None,
    dump_format: str = "custom",
    jobs: int = 1,
    compression_level: int = 3,
    threads: int = 2,
) -> dict:
    """Dump globals and databases into a new encrypted set under dest; return its manifest."""
    if dump_format not in FORMATS:
        raise PgBackupError(f"unknown dump format {dump_format!r}; use one of {', '.join(FORMATS)}")
    if jobs < 1:
        raise PgBackupError("--jobs must be at least 1")
    if jobs > 1 and dump_format != "directory":
        raise PgBackupError("parallel dumps (--jobs > 1) need --format directory")
    try:
        os.makedirs(dest, mode=0o700, exist_ok=True)
    except OSError as error:
        raise describe_os_error(error, f"creating backup directory {dest}") from None

    started = manifest.utc_now()
    with pg.connect() as conn:
        server = pg.server_info(conn)
        selected = _select(pg.list_databases(conn), databases)

    name = _unique_set_name(dest, started)
    partial = os.path.join(dest, manifest.PARTIAL_PREFIX + name)
    os.mkdir(partial, 0o700)
    log.info("backup %s started: %d database(s), format %s", name, len(selected), dump_format)
    try:
        with hold(partial, exclusive=True, wait=False, what=f"backup set {partial}"):
            record = _write_set(
                partial, name, started, server, selected, key, dump_format, jobs, compression_level, threads
            )
            final = os.path.join(dest, name)
            os.rename(partial, final)
            fsync_dir(dest)
    except OSError as error:
        _discard(partial)
        raise describe_os_error(error, f"writing backup set {partial}") from None
    except BaseException:
        _discard(partial)
        raise
    record["path"] = final
    log.info("backup %s complete: %d bytes in %s", name, record["total_size"], final)
    return record


def _discard(partial: str):
    if os.path.isdir(partial):
        try:
            remove_tree(partial)
        except OSError as error:
            log.warning("could not remove the incomplete set %s: %s", partial, error)


def _write_set(partial, name, started, server, selected, key, dump_format, jobs, level, threads) -> dict:
    record = {
        "format": manifest.FORMAT,
        "format_version": manifest.FORMAT_VERSION,
        "kind": "logical",
        "name": name,
        "pgbackup_version": __version__,
        "host": socket.gethostname(),
        "started_at": manifest.iso(started),
        "server": {key_: value for key_, value in server.items() if key_ != "superuser"},
        "key_id": key.key_id,
        "compression": {"algorithm": "zstd" if level > 0 else "none", "level": level},
        # Only a superuser can read password hashes; others dump roles without them.
        "role_passwords": server["superuser"],
        "databases": [],
    }
    globals_argv = [
        pg.tool("pg_dumpall"),
        "--no-password",
        "--globals-only",
        f"--database={pg.MAINTENANCE_DB}",
    ]
    if not server["superuser"]:
        globals_argv.append("--no-role-passwords")
        log.warning("not a superuser: roles are dumped without their password hashes")
    entry = _dump_to_file(
        globals_argv,
        os.path.join(partial, "globals.sql.enc"),
        key,
        level,
        threads,
        "pg_dumpall --globals-only",
    )
    record["globals"] = {"path": "globals.sql.enc", **entry}
    log.info("globals dumped: %d bytes", entry["size"])

    for index, database in enumerate(selected, start=1):
        stem = f"db-{index:03d}-{_safe_name(database['name'])}"
        if dump_format == "custom":
            path = f"{stem}.dump.enc"
            entry = _dump_to_file(
                [
                    pg.tool("pg_dump"),
                    "--no-password",
                    "--format=custom",
                    "--compress=0",
                    f"--dbname={database['name']}",
                ],
                os.path.join(partial, path),
                key,
                level,
                threads,
                f"pg_dump of database {database['name']!r}",
            )
            files = [{"path": path, **entry}]
        else:
            files = _dump_directory(
                database["name"],
                os.path.join(partial, f".staging-{stem}"),
                os.path.join(partial, f"{stem}.dir"),
                key,
                level,
                threads,
                jobs,
            )
        record["databases"].append({**database, "format": dump_format, "files": files})
        log.info("database %s dumped: %d bytes", database["name"], sum(f["size"] for f in files))

    record["finished_at"] = manifest.iso(manifest.utc_now())
    record["total_size"] = sum(entry["size"] for entry, _ in manifest.files_of(record))
    record["complete"] = True
    fsync_dir(partial)
    write_json_atomic(os.path.join(partial, manifest.MANIFEST_NAME), manifest.seal(record, key))
    return record
