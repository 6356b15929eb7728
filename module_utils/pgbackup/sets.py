"""Building a backup set, whatever its kind: the one place that makes sets durable.

A set is written in `<dest>/.partial-<name>/`, under an exclusive lock, and renamed
to `<dest>/<name>/` only after every file and the sealed manifest are fsynced; on any
failure the partial folder is removed, so a set that `list` calls complete is complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess

from . import __version__, manifest, pg
from .crypto import EncryptingWriter, Recipients, SymmetricKey, read_ahead
from .errors import PgBackupError
from .fsutil import describe_os_error, fsync_dir, hold, remove_tree, require_owner, write_json_atomic

log = logging.getLogger("pgbackup")

READ_BYTES = 1 << 20


class EncryptedFile:
    """A private (0600) encrypted file, written under a temporary name: commit() fsyncs
    it and renames it into place, discard() removes what was written. `binding` is the
    name it is written as (`<set name>/<path in the set>`), sealed into its header."""

    def __init__(self, path: str, to: Recipients | SymmetricKey, binding: str, level: int, threads: int):
        self.path = path
        self._tmp = f"{path}.tmp"
        self._raw = open(os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")  # noqa: SIM115
        try:
            self._writer = EncryptingWriter(self._raw, to, binding, compression_level=level, threads=threads)
        except BaseException:
            self.discard()
            raise

    def write(self, data) -> int:
        return self._writer.write(data)

    def commit(self) -> dict:
        """The file's manifest entry, once it is durable under its own name."""
        stats = self._writer.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.rename(self._tmp, self.path)
        return {
            "size": stats.encrypted_bytes,
            "plaintext_size": stats.plaintext_bytes,
            "sha256": stats.sha256,
        }

    def discard(self):
        self._raw.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)


class SetWriter:
    """Writes the files of one set: into its `.partial-` folder, each sealed for the
    set's recipients and bound to its final name and its path in the set."""

    def __init__(self, folder: str, name: str, to: Recipients | SymmetricKey, level: int, threads: int):
        self.folder = folder
        self.name = name
        self._to = to
        self._level = level
        self._threads = threads

    def path(self, relative: str) -> str:
        return os.path.join(self.folder, relative)

    def file(self, relative: str) -> EncryptedFile:
        return EncryptedFile(
            self.path(relative), self._to, f"{self.name}/{relative}", self._level, self._threads
        )

    def encrypt(self, relative: str, source) -> dict:
        """Stream `source` into the set's file `relative`; its manifest entry."""
        target = self.file(relative)
        try:
            for block in read_ahead(lambda: source.read(READ_BYTES)):
                target.write(block)
            return {"path": relative, **target.commit()}
        except BaseException:
            target.discard()
            raise

    def stream_program(
        self, argv: list[str], relatives: list[str], what: str, splitter=None
    ) -> tuple[list[dict], str]:
        """Run a program (pg_dump, pg_basebackup) and stream its stdout into the set's
        files: one, or as many as `relatives` with `splitter(files)` dealing the output
        out to them. Returns the files' manifest entries and the program's stderr."""
        run = pg.ToolRun(argv, stdout=subprocess.PIPE)
        files: list[EncryptedFile] = []
        try:
            files.extend(self.file(relative) for relative in relatives)
            sink = splitter(files) if splitter else files[0]
            for block in read_ahead(lambda: run.process.stdout.read(READ_BYTES)):
                sink.write(block)
            if splitter:
                sink.close()
            run.process.stdout.close()
            # The program's verdict first: a dump that failed is never committed.
            stderr = run.finish(what)
            entries = [
                {"path": relative, **target.commit()}
                for relative, target in zip(relatives, files, strict=True)
            ]
            return entries, stderr
        except BaseException as error:
            # Output that stops short is most often the program failing: say why it did.
            failure = run.failure(what) if isinstance(error, PgBackupError) else None
            run.kill()
            for target in files:
                target.discard()
            if failure:
                raise failure from None
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


def build_set(
    dest: str, kind: str, to: Recipients | SymmetricKey, server: dict, level: int, threads: int, fill
) -> dict:
    """Make a new set of `kind` in dest, for `to` (the recipients' public keys; a
    version 1 key for tests). `fill(writer, record)` writes the files with a SetWriter
    and adds their entries to the record; this function makes the result durable."""
    require_owner(dest, "make backups")
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
        **manifest.key_fields(to),
        "kind": kind,
        "name": name,
        "pgbackup_version": __version__,
        "host": socket.gethostname(),
        "started_at": manifest.iso(started),
        "server": {
            field: value
            for field, value in server.items()
            if field not in ("superuser", "reads_password_hashes")
        },
        "compression": {"algorithm": "zstd" if level > 0 else "none", "level": level},
        "databases": [],
    }
    try:
        os.mkdir(partial, 0o700)
        with hold(partial, exclusive=True, wait=False, what=f"backup set {partial}"):
            fill(SetWriter(partial, name, to, level, threads), record)
            record["finished_at"] = manifest.iso(manifest.utc_now())
            record["total_size"] = sum(entry["size"] for entry, _ in manifest.files_of(record))
            record["complete"] = True
            fsync_dir(partial)
            write_json_atomic(os.path.join(partial, manifest.MANIFEST_NAME), manifest.seal(record, to))
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
