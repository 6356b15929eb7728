"""Logical backups: pg_dumpall --globals-only plus pg_dump of each database.

A set is built in `<dest>/.partial-<name>/` and renamed to `<dest>/<name>/` only
after every file and the manifest are written and fsynced, so a set that `list`
calls complete is complete; an interrupted run leaves only a `.partial-` folder,
which prune removes after a day.
"""

from __future__ import annotations

import logging
import os
import re

from . import manifest, pg
from .crypto import Recipients, SymmetricKey
from .errors import PgBackupError
from .fsutil import fsync_dir
from .restore import KEPT_NAME, SCRATCH_NAME
from .sets import SetWriter, build_set

log = logging.getLogger("pgbackup")

FORMATS = ("custom", "directory")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60] or "_"


def _dump_directory(database: str, writer: SetWriter, stem: str, jobs: int, major: int) -> list[dict]:
    """pg_dump -Fd -j N into a private staging folder, then encrypt file by file."""
    staging = writer.path(f".staging-{stem}")
    pg.run_tool(
        [
            pg.tool("pg_dump", major),
            "--no-password",
            "--format=directory",
            f"--jobs={jobs}",
            "--compress=0",
            f"--file={staging}",
            f"--dbname={pg.dbname_conninfo(database)}",
        ],
        f"pg_dump of database {database!r}",
    )
    os.mkdir(writer.path(f"{stem}.dir"), 0o700)
    entries = []
    for name in sorted(os.listdir(staging)):
        plain_path = os.path.join(staging, name)
        with open(plain_path, "rb") as source:
            entry = writer.encrypt(f"{stem}.dir/{name}.enc", source)
        os.unlink(plain_path)
        entry["name"] = name
        entries.append(entry)
    os.rmdir(staging)
    fsync_dir(writer.path(f"{stem}.dir"))
    return entries


def plan(databases: list[str] | None = None) -> dict:
    """What a backup would cover, read from the server without writing anything."""
    with pg.connect() as conn:
        server = pg.server_info(conn)
        available = pg.list_databases(conn)
    if databases is None:
        # Databases an earlier restore --force kept aside are not backed up again by
        # default (name one with --database to include it), nor a restore's scratch
        # databases, which it renames or drops.
        available = [
            database
            for database in available
            if not KEPT_NAME.search(database["name"]) and not SCRATCH_NAME.fullmatch(database["name"])
        ]
    return {"server": server, "databases": manifest.select_databases(available, databases, "on the server")}


def create_backup_set(
    dest: str,
    to: Recipients | SymmetricKey,
    databases: list[str] | None = None,
    dump_format: str = "custom",
    jobs: int = 1,
    compression_level: int = 3,
    threads: int = 2,
) -> dict:
    """Dump globals and databases into a new set under dest, encrypted for `to` (the
    recipients' public keys); return its manifest."""
    if dump_format not in FORMATS:
        raise PgBackupError(f"unknown dump format {dump_format!r}; use one of {', '.join(FORMATS)}")
    if jobs < 1:
        raise PgBackupError("--jobs must be at least 1")
    if jobs > 1 and dump_format != "directory":
        raise PgBackupError("parallel dumps (--jobs > 1) need --format directory")
    planned = plan(databases)
    server, selected = planned["server"], planned["databases"]
    major = pg.major_of(server["version_num"])
    level = compression_level

    def fill(writer: SetWriter, record: dict):
        log.info("backup %s started: %d database(s), format %s", record["name"], len(selected), dump_format)
        record["role_passwords"] = server["reads_password_hashes"]
        globals_argv = [
            pg.tool("pg_dumpall", major),
            "--no-password",
            "--globals-only",
            f"--database={pg.dbname_conninfo(pg.MAINTENANCE_DB)}",
        ]
        if not server["reads_password_hashes"]:
            globals_argv.append("--no-role-passwords")
            log.warning(
                "the backup role cannot read pg_authid: roles are dumped without their password "
                "hashes (GRANT pg_read_all_data TO it, as the postgresql role does)"
            )
        (entry,), _ = writer.stream_program(globals_argv, ["globals.sql.enc"], "pg_dumpall --globals-only")
        record["globals"] = entry
        log.info("globals dumped: %d bytes", entry["size"])
        for index, database in enumerate(selected, start=1):
            stem = f"db-{index:03d}-{_safe_name(database['name'])}"
            # Read before the dump, for a restore to share out its loading by size.
            relation_bytes = pg.relation_sizes(database["name"])
            if dump_format == "custom":
                files, _ = writer.stream_program(
                    [
                        pg.tool("pg_dump", major),
                        "--no-password",
                        "--format=custom",
                        "--compress=0",
                        f"--dbname={pg.dbname_conninfo(database['name'])}",
                    ],
                    [f"{stem}.dump.enc"],
                    f"pg_dump of database {database['name']!r}",
                )
            else:
                files = _dump_directory(database["name"], writer, stem, jobs, major)
            record["databases"].append(
                {**database, "relation_bytes": relation_bytes, "format": dump_format, "files": files}
            )
            log.info("database %s dumped: %d bytes", database["name"], sum(f["size"] for f in files))

    return build_set(dest, "logical", to, server, level, threads, fill)
