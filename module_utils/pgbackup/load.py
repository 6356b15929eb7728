"""Loading one database's dump into a (scratch) database through pipes.

In three phases, as `pg_restore --jobs` runs them: the schema before the data (one
pg_restore), the data (--jobs pg_restore processes side by side, each loading its
share of the tables, shared out by size), then indexes, constraints and the rest
(`pg_restore --jobs`). pg_restore reads a directory archive from a private folder
whose toc.dat and data files are named pipes, fed as the files are decrypted; a
custom archive's data is streamed whole into each loader's standard input, and
pg_restore skips the blocks of tables given to another loader.

No plaintext reaches the disk, and pg_restore reads only authenticated bytes; each
file's final chunk, size and hash are checked before its pipe is closed. Any failure
stops every pg_restore at once. The caller renames the loaded database into place
only after this returns, that is once every file of the dump has been checked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
import threading
import time

from . import pg, pgarchive

log = logging.getLogger("pgbackup")


class _Stopped(Exception):
    """The load is being stopped: a feeder gives up quietly."""


def load_database(dump, target: str, jobs: int):
    """Load `dump` (a restore.DumpFiles: the set's files of one database) into `target`."""
    try:
        archive, toc_bytes = dump.table_of_contents()
    except pgarchive.UnsupportedArchive as error:
        if dump.is_directory:
            raise
        # A newer pg_dump's archive: pg_restore still reads it, as one stream.
        log.warning("%s: loading it with one pg_restore reading the whole stream, without --jobs", error)
        with tempfile.TemporaryDirectory(prefix="pgbackup-restore-") as pipes:
            _Phase(f"pg_restore of database {dump.name!r}").run(
                [_custom_job(pipes, "whole", target, None, dump)]
            )
        dump.check_the_rest()
        return
    shares = _share_out(archive, dump, jobs)
    early = _indexes_of(archive, shares)
    sections = archive.sections()
    built_early = {entry.dump_id for own in early for entry in own}
    rest = [
        entry
        for entry in archive.entries
        if sections[entry.dump_id] == pgarchive.SECTION_POST_DATA and entry.dump_id not in built_early
    ]
    log.info(
        "loading %s into %s: schema, then data in %d loader(s), then indexes and constraints",
        dump.name,
        target,
        len(shares),
    )
    with tempfile.TemporaryDirectory(prefix="pgbackup-restore-") as pipes:
        _Phase(f"pg_restore of database {dump.name!r} (schema)").run(
            [_directory_job(pipes, "schema", toc_bytes, target, ["--section=pre-data"], None, dump)]
        )
        loaders = []
        # A schema without data (functions, views only) has nothing to share out.
        for number, share in enumerate(shares if archive.data_entries() else []):
            # A loader builds its own tables' indexes once their data is in, while the
            # others still load (what pg_restore --jobs overlaps).
            listed = share + early[number]
            if dump.is_directory:
                loaders.append(_directory_job(pipes, f"data-{number}", toc_bytes, target, [], listed, dump))
            else:
                loaders.append(_custom_job(pipes, f"data-{number}", target, listed, dump))
        if loaders:
            _Phase(f"pg_restore of database {dump.name!r} (data)").run(loaders)
        dump.check_the_rest()
        if rest:
            _Phase(f"pg_restore of database {dump.name!r} (indexes, constraints)").run(
                [_directory_job(pipes, "post-data", toc_bytes, target, [f"--jobs={jobs}"], rest, dump)]
            )


def _share_out(archive: pgarchive.Archive, dump, jobs: int) -> list[list[pgarchive.Entry]]:
    """The data section's entries shared among at most `jobs` loaders, largest first to
    the least loaded (sizes as the set knows them), each share in TOC order: a custom
    archive is read front to back. Entries without data (sequence values) go to the
    first loader."""
    with_data = [entry for entry in archive.data_entries() if entry.has_data]
    count = max(1, min(jobs, len(with_data)))
    shares: list[list[pgarchive.Entry]] = [[] for _ in range(count)]
    loads = [0] * count
    for entry in sorted(with_data, key=dump.size_of, reverse=True):
        least = loads.index(min(loads))
        shares[least].append(entry)
        loads[least] += max(dump.size_of(entry), 1)
    shares[0] += [entry for entry in archive.data_entries() if not entry.has_data]
    order = {entry.dump_id: index for index, entry in enumerate(archive.entries)}
    return [sorted(share, key=lambda entry: order[entry.dump_id]) for share in shares]


# Post-data entries a loader may build as soon as its own tables are loaded.
_OWN_TABLE_KINDS = ("INDEX", "CONSTRAINT")


def _indexes_of(
    archive: pgarchive.Archive, shares: list[list[pgarchive.Entry]]
) -> list[list[pgarchive.Entry]]:
    """For each share, the indexes and primary key or unique constraints that depend on
    nothing but its tables and the schema: the loader builds them after its data.
    Everything else of the post-data section (foreign keys, which need another table's
    key, triggers, comments) waits for the final pass."""
    by_id = {entry.dump_id: entry for entry in archive.entries}
    sections = archive.sections()

    def tables_of(entries):
        return {
            int(dependency)
            for entry in entries
            if entry.desc == "TABLE DATA"
            for dependency in entry.dependencies
            if dependency.isdigit() and getattr(by_id.get(int(dependency)), "desc", None) == "TABLE"
        }

    loaded = tables_of(archive.data_entries())
    found = []
    for share in shares:
        own = tables_of(share)
        early = []
        for entry in archive.entries:
            if sections[entry.dump_id] != pgarchive.SECTION_POST_DATA or entry.desc not in _OWN_TABLE_KINDS:
                continue
            dependencies = [int(d) for d in entry.dependencies if d.isdigit()]
            if len(dependencies) != len(entry.dependencies) or not own.intersection(dependencies):
                continue
            if all(
                d in own or (d in by_id and sections[d] == pgarchive.SECTION_PRE_DATA and d not in loaded)
                for d in dependencies
            ):
                early.append(entry)
        found.append(early)
    return found


def _list_file(folder: str, share: list[pgarchive.Entry]) -> str:
    path = os.path.join(folder, "list")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.writelines(f"{entry.dump_id}\n" for entry in share)
    return path


def _pg_restore(target: str, options: list[str]) -> list[str]:
    return [
        pg.tool("pg_restore"),
        "--no-password",
        "--exit-on-error",
        f"--dbname={pg.dbname_conninfo(target)}",
        *options,
    ]


class _Job:
    """One pg_restore and what feeds it."""

    def __init__(self, argv: list[str], feed, stdin=subprocess.DEVNULL):
        self.argv = argv
        self.feed = feed
        self.stdin = stdin
        self.run: pg.ToolRun | None = None
        # The named pipes its feeders wait on, blocked until pg_restore opens them (a
        # large object list and an object's file may be waited on at once).
        self._waiting: set[str] = set()
        self._lock = threading.Lock()
        self.released = False
        self._release_readers: list[int] = []

    def open_for_writing(self, path: str) -> int:
        """Open a named pipe for writing once pg_restore opens it for reading; _Stopped
        if the job is released instead (see release)."""
        with self._lock:
            if self.released:
                raise _Stopped
            self._waiting.add(path)
        try:
            descriptor = os.open(path, os.O_WRONLY)
        finally:
            with self._lock:
                self._waiting.discard(path)
        if self.released:
            os.close(descriptor)
            raise _Stopped
        return descriptor

    def release(self):
        """Unblock the feeders waiting on pipes that pg_restore will not open now (it
        ended, or the load is stopping): open their other ends ourselves."""
        with self._lock:
            self.released = True
            for path in self._waiting:
                with contextlib.suppress(OSError):
                    self._release_readers.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK))

    def close(self):
        for descriptor in self._release_readers:
            os.close(descriptor)
        self._release_readers = []


def _directory_job(pipes, name, toc_bytes, target, options, share, dump) -> _Job:
    """pg_restore of a directory archive whose files are named pipes: toc.dat, then the
    data files of `share` in its order (which pg_restore follows, given as a list);
    share None: no list, the entries `options` select (a section)."""
    folder = os.path.join(pipes, name)
    os.mkdir(folder, 0o700)
    os.mkfifo(os.path.join(folder, "toc.dat"), 0o600)
    for entry in share or []:
        for file_name in dump.pipe_names(entry):
            os.mkfifo(os.path.join(folder, file_name), 0o600)
    if share is not None:
        options = [*options, f"--use-list={_list_file(folder, share)}"]

    def feed(job: _Job, _stop: threading.Event):
        _write_pipe(os.path.join(folder, "toc.dat"), lambda out: out.write(toc_bytes), job)
        for entry in share or []:
            dump.feed_entry(
                entry, lambda file_name, fill: _write_pipe(os.path.join(folder, file_name), fill, job)
            )

    return _Job(_pg_restore(target, ["--format=directory", *options, folder]), feed)


def _custom_job(pipes, name, target, share, dump) -> _Job:
    """pg_restore of the whole custom archive from its standard input, restoring only
    `share` (in the archive's order) and skipping every other block; everything when
    share is None."""
    folder = os.path.join(pipes, name)
    os.mkdir(folder, 0o700)
    options = (
        ["--format=custom"]
        if share is None
        else ["--format=custom", f"--use-list={_list_file(folder, share)}"]
    )

    def feed(job: _Job, stop: threading.Event):
        dump.feed_whole(job.run.process.stdin, stop)

    return _Job(_pg_restore(target, options), feed, stdin=subprocess.PIPE)


def _write_pipe(path: str, fill, job: _Job):
    """Fill a named pipe once pg_restore opens it; _Stopped if pg_restore is gone."""
    with open(job.open_for_writing(path), "wb") as out:
        pg.widen_pipe(out)
        try:
            fill(out)
            out.flush()
        except BrokenPipeError:
            raise _Stopped from None


class _Phase:
    """pg_restore processes run side by side with their feeders; the first failure
    stops them all, and its cause (not the broken pipes it left) is what is raised."""

    def __init__(self, what: str):
        self.what = what
        self._stop = threading.Event()
        self._causes: list[BaseException] = []
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._jobs: list[_Job] = []

    def _fail(self, error: BaseException, cause: bool = True):
        """cause: an error of ours (a corrupt file) rather than a pg_restore that failed,
        perhaps because of it."""
        with self._lock:
            (self._causes if cause else self._errors).append(error)
        self._stop.set()
        for job in self._jobs:
            if job.run is not None:
                job.run.kill()
            job.release()

    def _feed(self, job: _Job):
        try:
            job.feed(job, self._stop)
        except _Stopped:
            pass
        except BaseException as error:
            # Once the load is stopping, a feeder's error (a pipe closed under it) is a
            # consequence, not the cause.
            self._fail(error, cause=not self._stop.is_set())
        finally:
            if job.run.process.stdin is not None:
                with contextlib.suppress(OSError):
                    job.run.process.stdin.close()

    def run(self, jobs: list[_Job]):
        self._jobs = jobs
        feeders = []
        try:
            # Every pg_restore starts before any feeding thread does (see ToolRun).
            for job in jobs:
                job.run = pg.ToolRun(job.argv, stdout=subprocess.DEVNULL, stdin=job.stdin, new_session=True)
            for job in jobs:
                feeder = threading.Thread(target=self._feed, args=(job,), name="pgbackup-feed", daemon=True)
                feeder.start()
                feeders.append(feeder)
            pending = list(jobs)
            while pending and not self._stop.is_set():
                for job in list(pending):
                    if job.run.process.poll() is None:
                        continue
                    pending.remove(job)
                    job.release()
                    failure = job.run.failure(self.what, wait_seconds=0)
                    if failure is not None:
                        self._fail(failure, cause=False)
                time.sleep(0.05)
            for feeder in feeders:
                feeder.join()
        except BaseException as error:
            self._fail(error)
            raise
        finally:
            for job in jobs:
                if job.run is not None and (self._causes or self._errors):
                    job.run.kill()
                job.close()
        # A corrupt file is the cause; pg_restore's complaint about its input ending
        # early is the consequence.
        if self._causes or self._errors:
            raise (self._causes or self._errors)[0]
