"""Loading one database's dump into a (scratch) database through pipes.

In three phases, as `pg_restore --jobs` runs them: the schema before the data (one
pg_restore), the data (--jobs pg_restore processes side by side, each loading its
share of the tables, shared out by size, and building their indexes once loaded),
then foreign keys, triggers and the rest (one `pg_restore --jobs`, which orders them
by its restore passes and never runs two that lock the same table at once). The
largest table, when large, is dealt a piece of rows at a time to every loader, each
taking part once its own share is loaded (restore.Dealer): without that, a restore
spends most of its time on that one table's single COPY, as pg_restore --jobs does.
The schema and the data phases' pg_restore read a custom archive from standard
input: a directory set's entries become one, written here (pgarchive) from its
decrypted files. A custom set streams whole into each data loader, which skips the
blocks of tables given to another; when a table is dealt, each loader is given its
own blocks alone, found in its stream of the file (pgarchive.BlockScanner). The
final pass needs no data and a file it can seek and reopen: its header and entries
alone, in memory (memfd), never on disk. (pg_restore 15.20 and later refuse named
pipes in a directory archive.)

No plaintext reaches the disk (the lists of entries each pg_restore restores are the
only files), and pg_restore reads only authenticated bytes. A directory set's file is
checked whole (final chunk, size, hash) before its data ends; a custom set's, by the
loader that reads furthest, or by the dealer, which reads it to its end; any file
still unchecked after the data is checked before the final pass. Any failure stops
every pg_restore at once. The caller renames the loaded database into place only
after this returns, that is once every file of the dump has been checked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import subprocess
import tempfile
import threading
import time

from . import pg, pgarchive
from .errors import PgBackupError

log = logging.getLogger("pgbackup")


def load_database(dump, target: str, jobs: int):
    """Load `dump` (a restore.DumpFiles: the set's files of one database) into `target`."""
    try:
        archive = dump.table_of_contents()
    except pgarchive.UnsupportedArchive as error:
        if dump.is_directory:
            raise
        # A newer pg_dump's archive: pg_restore still reads it, as one stream.
        log.warning("%s: loading it with one pg_restore reading the whole stream, without --jobs", error)
        with tempfile.TemporaryDirectory(prefix="pgbackup-restore-") as lists:
            _Phase(f"pg_restore of database {dump.name!r}").run(
                [_custom_job(lists, "whole", target, None, dump)]
            )
        dump.check_the_rest()
        return
    loads, final_pass, dealt = plan_load(archive, dump, jobs)
    dealer = dump.dealer(dealt, archive) if dealt is not None else None
    log.info(
        "loading %s into %s: schema, then data in %d loader(s)%s%s",
        dump.name,
        target,
        len(loads),
        f", table {dealt.qualified_name} dealt to all of them" if dealt is not None else "",
        ", then foreign keys and the rest" if final_pass else "",
    )
    with tempfile.TemporaryDirectory(prefix="pgbackup-restore-") as lists:
        _Phase(f"pg_restore of database {dump.name!r} (schema)").run(
            [_schema_job(lists, "schema", archive, target, ["--section=pre-data"], None)]
        )
        # Of a custom set's loaders, each decrypting the file from its start, only the one
        # that reads furthest reads on to its end to check it: the others stop once
        # their pg_restore has its tables, rather than decrypt the rest beside it.
        order = {entry.dump_id: index for index, entry in enumerate(archive.entries)}
        furthest = max(
            range(len(loads)),
            key=lambda number: max(
                (order[entry.dump_id] for entry in loads[number] if entry.has_data), default=-1
            ),
            default=None,
        )
        loaders = [
            _blocks_job(lists, f"data-{number}", archive, target, listed, dump, dealer)
            if dump.is_directory or dealer is not None
            else _custom_job(lists, f"data-{number}", target, listed, dump, check_whole=number == furthest)
            for number, listed in enumerate(loads)
        ]
        if loaders:
            _Phase(f"pg_restore of database {dump.name!r} (data)").run(loaders)
        if dealer is not None:
            dealer.check()
            log.info(
                "%s: pieces taken by each loader: %s",
                dealt.qualified_name,
                ", ".join(map(str, dealer.pieces_taken)),
            )
        dump.check_the_rest()
        if final_pass:
            with _in_memory(pgarchive.write_toc(archive)) as toc:
                _Phase(f"pg_restore of database {dump.name!r} (foreign keys, triggers and the rest)").run(
                    [_final_pass_job(lists, toc, target, final_pass, jobs)]
                )


# The largest table is dealt to every loader (see restore.Dealer) when its data is at
# least this large (a directory set's file, a custom set's table at backup time);
# below it, one COPY is soon done.
DEAL_MIN_BYTES = 64 << 20


def plan_load(
    archive: pgarchive.Archive, dump, jobs: int
) -> tuple[list[list[pgarchive.Entry]], list[pgarchive.Entry], pgarchive.Entry | None]:
    """What each pg_restore after the schema's restores: the data loaders' lists (a share
    of the tables, then their indexes, built once their data is in while the others
    still load, as pg_restore --jobs overlaps them); the final pass's entries; and the
    table dealt to every loader, if any.

    Each loader takes part in the dealt table's COPY last, once its own tables and
    their indexes are in; the loader whose share it was then builds its indexes. So
    no loader waits on a lock of the dealt table with work of its own still to do: a
    loader that comes to it after the last piece is gone still runs its (empty) COPY,
    which waits for those index builds, but has nothing after it."""
    # A schema without data (functions, views only) has nothing to share out.
    shares = _share_out(archive, dump, jobs) if archive.data_entries() else []
    dealt = _dealt_table(archive, dump, jobs, shares)
    if dealt is None:
        own_tables, dealt_indexes = shares, []
    else:
        shares += [[] for _ in range(jobs - len(shares))]
        own_tables = [[entry for entry in share if entry is not dealt] for share in shares]
        (dealt_indexes,) = _indexes_of(archive, [[dealt]])
    early = _indexes_of(archive, own_tables)
    sections = archive.sections()
    built_early = {entry.dump_id for own in [*early, dealt_indexes] for entry in own}
    final_pass = [
        entry
        for entry in archive.entries
        if sections[entry.dump_id] == pgarchive.SECTION_POST_DATA and entry.dump_id not in built_early
    ]
    loads = []
    for share, tables, own in zip(shares, own_tables, early, strict=True):
        loads.append(tables + own)
        if dealt is not None:
            loads[-1] += [dealt, *(dealt_indexes if any(entry is dealt for entry in share) else [])]
    return loads, final_pass, dealt


def _dealt_table(archive, dump, jobs: int, shares: list[list[pgarchive.Entry]]) -> pgarchive.Entry | None:
    """The table whose COPY every loader shares: the largest, when it is large enough
    to be worth it and its data is COPY text, which can be cut between rows."""
    if jobs < 2:
        return None
    largest = max(
        (entry for share in shares for entry in share if entry.has_data), key=dump.size_of, default=None
    )
    if (
        largest is None
        or not pgarchive.is_copy_text(archive, largest)
        or dump.size_of(largest) < DEAL_MIN_BYTES
    ):
        return None
    return largest


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
            if getattr(by_id.get(int(dependency)), "desc", None) == "TABLE"
        }

    loaded = tables_of(archive.data_entries())
    found = []
    for share in shares:
        own = tables_of(share)
        early = []
        for entry in archive.entries:
            if sections[entry.dump_id] != pgarchive.SECTION_POST_DATA or entry.desc not in _OWN_TABLE_KINDS:
                continue
            # Dump ids in decimal: pgarchive.read_archive refuses anything else.
            dependencies = [int(d) for d in entry.dependencies]
            if not own.intersection(dependencies):
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
    """One pg_restore reading a custom archive from its standard input, and what feeds it:
    feed(stdin, stop) writes the archive."""

    def __init__(self, argv: list[str], feed, pass_fds: tuple[int, ...] = ()):
        self.argv = argv
        self.feed = feed
        self.pass_fds = pass_fds
        self.run: pg.ToolRun | None = None


def _listed(folder: str, name: str, share: list[pgarchive.Entry] | None) -> list[str]:
    """--use-list for `share` (in its order, which pg_restore follows), in a folder of
    its own; nothing when share is None (all the entries the options select)."""
    if share is None:
        return []
    own = os.path.join(folder, name)
    os.mkdir(own, 0o700)
    return [f"--use-list={_list_file(own, share)}"]


def _schema_job(folder, name, archive, target, options, share) -> _Job:
    """pg_restore of entries without data: the archive's header and entries alone."""
    head = pgarchive.write_toc(archive)

    def feed(stdin, _stop: threading.Event):
        stdin.write(head)

    return _Job(_pg_restore(target, ["--format=custom", *options, *_listed(folder, name, share)]), feed)


def _blocks_job(folder, name, archive, target, share, dump, dealer=None) -> _Job:
    """pg_restore of `share`: the archive's header and entries, then the data of the
    share's entries in its order (DumpFiles.feed_entries), of the dealt table the
    pieces this loader takes (dealer: a restore.Dealer)."""
    head = pgarchive.write_toc(archive, with_data={entry.dump_id for entry in share if entry.has_data})

    def feed(stdin, stop: threading.Event):
        stdin.write(head)
        dump.feed_entries(share, archive, stdin, stop, dealer)

    return _Job(_pg_restore(target, ["--format=custom", *_listed(folder, name, share)]), feed)


@contextlib.contextmanager
def _in_memory(data: bytes):
    """A file descriptor of an anonymous file in memory holding data (memfd)."""
    descriptor = os.memfd_create("pgbackup-toc", os.MFD_CLOEXEC)
    try:
        with open(descriptor, "wb", closefd=False) as memory:
            memory.write(data)
        yield descriptor
    finally:
        os.close(descriptor)


def _final_pass_job(folder, toc: int, target, entries, jobs: int) -> _Job:
    """pg_restore --jobs of entries without data, from the archive's header and entries
    in memory (toc: a memfd), which it and its workers open as /proc/self/fd/N."""
    if not os.path.isdir("/proc/self/fd"):
        raise PgBackupError(
            "restore needs /proc mounted: the final pg_restore reads its table of contents there"
        )
    options = ["--format=custom", f"--jobs={jobs}", *_listed(folder, "final-pass", entries)]

    def feed(_stdin, _stop: threading.Event):
        pass

    return _Job(_pg_restore(target, [*options, f"/proc/self/fd/{toc}"]), feed, pass_fds=(toc,))


def _custom_job(folder, name, target, share, dump, check_whole: bool = True) -> _Job:
    """pg_restore of the whole custom archive from its standard input, restoring only
    `share` (in the archive's order) and skipping every other block; everything when
    share is None. check_whole: see DumpFiles.feed_whole."""

    def feed(stdin, stop: threading.Event):
        dump.feed_whole(stdin, stop, check_whole=check_whole)

    return _Job(_pg_restore(target, ["--format=custom", *_listed(folder, name, share)]), feed)


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

    def _feed(self, job: _Job):
        stdin = job.run.process.stdin
        try:
            job.feed(stdin, self._stop)
        except BrokenPipeError:
            # pg_restore ended before it read all it was given: its own error says why.
            if not self._stop.is_set():
                failure = job.run.failure(self.what, wait_seconds=30)
                self._fail(
                    failure
                    or PgBackupError(f"{self.what} failed: pg_restore ended before reading all its input"),
                    cause=False,
                )
        except BaseException as error:
            # Once the load is stopping, a feeder's error (a pipe closed under it) is a
            # consequence, not the cause.
            self._fail(error, cause=not self._stop.is_set())
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def _wait(self, jobs: list[_Job], exits: dict[int, _Job]):
        """Until every pg_restore has ended, or the phase is stopping; a failed one
        stops the others."""
        pending = list(jobs)
        while pending and not self._stop.is_set():
            _wait_for_an_exit([descriptor for descriptor, job in exits.items() if job in pending])
            for job in list(pending):
                if job.run.process.poll() is None:
                    continue
                pending.remove(job)
                failure = job.run.failure(self.what, wait_seconds=0)
                if failure is not None:
                    self._fail(failure, cause=False)

    def run(self, jobs: list[_Job]):
        self._jobs = jobs
        started = time.monotonic()
        feeders = []
        exits: dict[int, _Job] = {}
        try:
            # Every pg_restore starts before any feeding thread does (see ToolRun).
            for job in jobs:
                job.run = pg.ToolRun(
                    job.argv,
                    stdout=subprocess.DEVNULL,
                    stdin=subprocess.PIPE,
                    new_session=True,
                    pass_fds=job.pass_fds,
                )
            # Opened before any feeder can reap a process, so each pid is still its own.
            exits = _exit_descriptors(jobs)
            for job in jobs:
                feeder = threading.Thread(target=self._feed, args=(job,), name="pgbackup-feed", daemon=True)
                feeder.start()
                feeders.append(feeder)
            self._wait(jobs, exits)
            for feeder in feeders:
                feeder.join()
        except BaseException as error:
            self._fail(error)
            raise
        finally:
            for descriptor in exits:
                os.close(descriptor)
            for job in jobs:
                if job.run is not None and (self._causes or self._errors):
                    job.run.kill()
        # A corrupt file is the cause; pg_restore's complaint about its input ending
        # early is the consequence.
        if self._causes or self._errors:
            raise (self._causes or self._errors)[0]
        log.info("%s: done in %.1f s", self.what, time.monotonic() - started)


def _exit_descriptors(jobs: list[_Job]) -> dict[int, _Job]:
    """A pidfd for each job's pg_restore, readable once it has ended: a phase of a small
    database takes milliseconds, and polling would add its interval to each of the three.
    Empty where the kernel has no pidfd_open (before Linux 5.3): then the phase polls."""
    exits: dict[int, _Job] = {}
    try:
        for job in jobs:
            exits[os.pidfd_open(job.run.process.pid)] = job
    except (AttributeError, OSError):
        for descriptor in exits:
            os.close(descriptor)
        return {}
    return exits


def _wait_for_an_exit(descriptors: list[int]):
    """Until one of the processes behind descriptors ends; a second at most, so that a
    stop asked by a feeder is seen even if a killed process lingers."""
    if descriptors:
        select.select(descriptors, [], [], 1.0)
    else:
        time.sleep(0.05)
