"""Physical backups: pg_basebackup in tar format, with the WAL it needs, streamed
through the same compression and encryption as the dumps.

The base tar carries PostgreSQL's own backup_manifest, so a restored copy is checked
with pg_verifybackup before anyone starts a server on it.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess

from . import pg
from .crypto import Key
from .errors import PgBackupError, RefusedError
from .fsutil import describe_os_error, hold, remove_tree, require_free_space
from .restore import decrypt_checked, open_set
from .sets import build_set, stream_program_to_file

log = logging.getLogger("pgbackup")

BASE_FILE = "base.tar.enc"
_LSN = re.compile(r"write-ahead log (start|end) point: (\S+)(?: on timeline (\d+))?")


def create_base_backup(dest: str, key: Key, compression_level: int = 3, threads: int = 2) -> dict:
    """Take a base backup into a new `physical-<time>` set under dest."""
    with pg.connect() as conn:
        server = pg.server_info(conn)

    def fill(folder: str, record: dict):
        log.info("base backup %s started", record["name"])
        argv = [
            pg.tool("pg_basebackup"),
            "--no-password",
            "--pgdata=-",
            "--format=tar",
            "--wal-method=fetch",
            "--checkpoint=fast",
            "--verbose",
            f"--label=pgbackup {record['name']}",
        ]
        entry, stderr = stream_program_to_file(
            argv, os.path.join(folder, BASE_FILE), key, compression_level, threads, "pg_basebackup"
        )
        record["base"] = {"path": BASE_FILE, **entry}
        points = {kind: (lsn, timeline) for kind, lsn, timeline in _LSN.findall(stderr)}
        start_lsn, timeline = points.get("start", (None, ""))
        end_lsn, _ = points.get("end", (None, ""))
        record["wal"] = {
            "start_lsn": start_lsn,
            "end_lsn": end_lsn,
            "timeline": int(timeline) if timeline else None,
        }

    return build_set(dest, "physical", key, server, compression_level, fill)


def restore_base(set_path: str, key: Key, target_dir: str) -> dict:
    """Unpack a base backup into an empty (or new) folder, then pg_verifybackup it.

    The target must be empty, so nothing existing is ever overwritten; on any failure
    the partly written target is removed again.
    """
    set_path = os.path.abspath(set_path)
    target_dir = os.path.abspath(target_dir)
    with hold(set_path, exclusive=False, wait=True, what=f"backup set {set_path}"):
        record = open_set(set_path, key)
        if record.get("kind") != "physical":
            raise PgBackupError(
                f"{set_path} is a {record.get('kind')} set; restore-base needs a physical one"
            )
        if os.path.exists(target_dir) and os.listdir(target_dir):
            raise RefusedError(
                f"target directory {target_dir} is not empty; restore a base backup into a new folder"
            )
        require_free_space(
            os.path.dirname(target_dir), record["base"]["plaintext_size"], "to unpack the base backup"
        )
        created = not os.path.exists(target_dir)
        try:
            os.makedirs(target_dir, mode=0o700, exist_ok=True)
            _unpack(set_path, record["base"], key, target_dir)
            pg.run_tool(
                [pg.tool("pg_verifybackup"), "--quiet", target_dir],
                f"pg_verifybackup of the restored {target_dir}",
            )
        except OSError as error:
            _clear(target_dir, created)
            raise describe_os_error(error, f"unpacking into {target_dir}") from None
        except BaseException:
            _clear(target_dir, created)
            raise
    log.info("base backup %s restored into %s and verified", record["name"], target_dir)
    return {"set": set_path, "name": record["name"], "target_dir": target_dir, "wal": record.get("wal")}


def _unpack(set_path: str, entry: dict, key: Key, target_dir: str):
    tar = pg.ToolRun(["tar", "--extract", "--file=-", f"--directory={target_dir}"], stdin=subprocess.PIPE)
    try:
        decrypt_checked(set_path, entry, key, tar.process.stdin)
        tar.process.stdin.close()
        tar.finish(f"unpacking {entry['path']}")
    except BaseException:
        tar.kill()
        raise


def _clear(target_dir: str, created: bool):
    if not os.path.isdir(target_dir):
        return
    if created:
        remove_tree(target_dir)
        return
    for name in os.listdir(target_dir):
        child = os.path.join(target_dir, name)
        if os.path.isdir(child) and not os.path.islink(child):
            remove_tree(child)
        else:
            os.unlink(child)
