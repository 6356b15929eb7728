"""Building a backup set, whatever its kind: the one place that makes sets durable.

A set is written in `<dest>/.partial-<name>/`, under an exclusive lock, and renamed
to `<dest>/<name>/` only after every file and the sealed manifest are fsynced; on any
failure the partial folder is removed, so a set that `list` calls complete is complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import subprocess

from . import __version__, manifest, pg
from .crypto import Key, encrypt_stream
from .fsutil import describe_os_error, fsync_dir, hold, remove_tree, write_json_atomic

log = logging.getLogger("pgbackup")

READ_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031


def encrypt_file(path: str, source, key: Key, level: int, threads: int) -> dict:
    """Stream `source` into a private encrypted file at path, via a temporary name."""
    tmp = f"{path}.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as raw:
        stats = encrypt_stream(
            source, raw, key, compression_level=level, threads=threads, read_bytes=READ_BYTES
        )
        raw.flush()
        os.fsync(raw.fileno())
    os.rename(tmp, path)
    return {"size": stats.encrypted_bytes, "plaintext_size": stats.plaintext_bytes, "sha256": stats.sha256}


def stream_program_to_file(
    argv: list[str], path: str, key: Key, level: int, threads: int, what: str
) -> tuple[dict, str]:
    """Run a program (pg_dump, pg_basebackup) and stream its stdout into an encrypted
    file; return the file's manifest entry and the program's stderr."""
    run = pg.ToolRun(argv, stdout=subprocess.PIPE)
    try:
        # A bigger pipe means fewer wake-ups between the program and us.
        with contextlib.suppress(OSError):
            fcntl.fcntl(run.process.stdout.fileno(), _F_SETPIPE_SZ, READ_BYTES)
        entry = encrypt_file(path, run.process.stdout, key, level, threads)
        run.process.stdout.close()
        return entry, run.finish(what)
    except BaseException:
        run.kill()
        if os.path.exists(f"{path}.tmp"):
            os.unlink(f"{path}.tmp")
        raise


def _unique_name(dest: str, kind: str, started) -> str:
    base = manifest.set_name(kind, started)
    name, suffix = base, 1
    while os.path.exists(os.path.join(dest, name)) or os.path.exists(
        os.path.join(dest, manifest.PARTIAL_PREFIX + name)
    ):
        suffix += 1
        name = f"{base}-{suffix}"
    return name


def build_set(dest: str, kind: str, key: Key, server: dict, level: int, fill) -> dict:
    """Make a new set of `kind` in dest. `fill(folder, record)` writes the files and
    adds their entries to the record; this function makes the result durable."""
    try:
        os.makedirs(dest, mode=0o700, exist_ok=True)
    except OSError as error:
        raise describe_os_error(error, f"creating backup directory {dest}") from None
    started = manifest.utc_now()
    name = _unique_name(dest, kind, started)
    partial = os.path.join(dest, manifest.PARTIAL_PREFIX + name)
    final = os.path.join(dest, name)
    record = {
        "format": manifest.FORMAT,
        "format_version": manifest.FORMAT_VERSION,
        "kind": kind,
        "name": name,
        "pgbackup_version": __version__,
        "host": socket.gethostname(),
        "started_at": manifest.iso(started),
        "server": {field: value for field, value in server.items() if field != "superuser"},
        "key_id": key.key_id,
        "compression": {"algorithm": "zstd" if level > 0 else "none", "level": level},
        "databases": [],
    }
    try:
        os.mkdir(partial, 0o700)
        with hold(partial, exclusive=True, wait=False, what=f"backup set {partial}"):
            fill(partial, record)
            record["finished_at"] = manifest.iso(manifest.utc_now())
            record["total_size"] = sum(entry["size"] for entry, _ in manifest.files_of(record))
            record["complete"] = True
            fsync_dir(partial)
            write_json_atomic(os.path.join(partial, manifest.MANIFEST_NAME), manifest.seal(record, key))
            os.rename(partial, final)
            fsync_dir(dest)
    except OSError as error:
        _discard(partial)
        raise describe_os_error(error, f"writing backup set {partial}") from None
    except BaseException:
        _discard(partial)
        raise
    record["path"] = final
    log.info("%s backup %s complete: %d bytes in %s", kind, name, record["total_size"], final)
    return record


def _discard(partial: str):
    if os.path.isdir(partial):
        try:
            remove_tree(partial)
        except OSError as error:
            log.warning("could not remove the incomplete set %s: %s", partial, error)
