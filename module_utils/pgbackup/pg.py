"""Talking to PostgreSQL: queries through psycopg, tools through subprocess.

Connection settings come from libpq's environment (PGHOST, PGPORT, PGUSER,
PGPASSFILE, PGSSLMODE, ...) and the passfile; no password is ever put on a
command line, where `ps` would show it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from .errors import PgBackupError

MAINTENANCE_DB = "postgres"
# Where to stand while dropping or renaming the maintenance database itself.
FALLBACK_MAINTENANCE_DB = "template1"
# Where Debian installs each major version's programs.
DEBIAN_PG_ROOT = "/usr/lib/postgresql"
# Pipe size asked for programs whose output or input streams through us.
PIPE_BYTES = 1 << 20
# How long a restore waits for sessions that are ending before it calls a database in use.
SESSION_GRACE_SECONDS = 5.0


def dbname_conninfo(name: str) -> str:
    """A database name as a libpq connection string that can only mean that name.

    libpq's tools (pg_dump --dbname, psql, pg_restore, pg_dumpall --database) expand a
    dbname containing `=` or starting with `postgresql://` into connection settings, so a
    database named `hostaddr=... sslmode=disable` would send the backup role's password
    to another server. Quoted as `dbname='...'`, the value is only ever a name.
    """
    escaped = name.replace("\\", "\\\\").replace("'", "\\'")
    return f"dbname='{escaped}'"


def admin_db_for(*targets: str) -> str:
    """The database to connect to for CREATE/DROP/ALTER DATABASE on the `targets`."""
    return FALLBACK_MAINTENANCE_DB if MAINTENANCE_DB in targets else MAINTENANCE_DB


def tool(name: str, major: int | None = None) -> str:
    """Path of a PostgreSQL program, found the way Debian's own packaging lays them out:

    PGBACKUP_PG_BIN if set; else the bin directory of the server's major version
    (/usr/lib/postgresql/<major>/bin), or of the newest installed one at or above it,
    since pg_verifybackup and friends are not on PATH on Debian; else PATH.
    """
    bin_dir = os.environ.get("PGBACKUP_PG_BIN")
    if bin_dir:
        candidates = [os.path.join(bin_dir, name)]
    else:
        installed = sorted(
            (int(version) for version in _listdir(DEBIAN_PG_ROOT) if version.isdigit()), reverse=True
        )
        ordered = [major] if major in installed else []
        ordered += [version for version in installed if major is None or version > major]
        candidates = [os.path.join(DEBIAN_PG_ROOT, str(version), "bin", name) for version in ordered]
        candidates.append(shutil.which(name) or "")
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    where = bin_dir or f"{DEBIAN_PG_ROOT}/<version>/bin and PATH"
    wanted = f" of PostgreSQL {major} or newer" if major and not bin_dir else ""
    raise PgBackupError(f"{name}{wanted} is not installed (looked in {where})")


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def major_of(version_num: int | None) -> int | None:
    """The major version of a server_version_num (150014 -> 15)."""
    return version_num // 10000 if version_num else None


def driver():
    """psycopg, imported on first use: commands that never connect (decrypt, verify,
    restore-base, and the WAL commands that run per segment) start faster without it."""
    try:
        import psycopg  # noqa: PLC0415
        import psycopg.sql  # noqa: PLC0415
    except ImportError as missing:  # pragma: no cover - depends on the host
        raise PgBackupError(
            f"the Python library psycopg is missing ({missing}); install python3-psycopg"
        ) from None
    return psycopg


@contextlib.contextmanager
def connect(dbname: str = MAINTENANCE_DB):
    psycopg = driver()
    try:
        conn = psycopg.connect(
            dbname=dbname, autocommit=True, connect_timeout=15, application_name="pgbackup"
        )
    except psycopg.OperationalError as error:
        # Every line: libpq puts the cause first ("password authentication failed")
        # and may add where the password came from after it.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise PgBackupError(
            f"cannot connect to database {dbname!r}: {'; '.join(lines) or repr(error)}"
        ) from None
    try:
        yield conn
    finally:
        conn.close()


def server_info(conn) -> dict:
    row = conn.execute(
        "SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
        " (SELECT system_identifier FROM pg_control_system()), pg_is_in_recovery(),"
        " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),"
        " has_table_privilege('pg_catalog.pg_authid', 'SELECT'),"
        " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')"
    ).fetchone()
    return {
        "version": row[0],
        "version_num": row[1],
        "system_identifier": str(row[2]),
        "in_recovery": row[3],
        "superuser": row[4],
        # Password hashes are in pg_authid: superusers read it, and so does a member
        # of pg_read_all_data, as the postgresql role makes the backup role.
        "reads_password_hashes": row[5],
        "wal_segment_size": row[6],
    }


def list_databases(conn) -> list[dict]:
    """Databases a backup covers: every one that accepts connections, but templates,
    with their size where this role may connect (what a restore needs on disk)."""
    rows = conn.execute(
        "SELECT d.datname, pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding),"
        " d.datcollate, d.datctype,"
        " CASE WHEN has_database_privilege(d.oid, 'CONNECT') THEN pg_database_size(d.oid) END"
        " FROM pg_database d WHERE d.datallowconn AND NOT d.datistemplate ORDER BY d.datname"
    ).fetchall()
    return [
        {
            "name": name,
            "owner": owner,
            "encoding": encoding,
            "collate": collate,
            "ctype": ctype,
            "size_bytes": size,
        }
        for name, owner, encoding, collate, ctype, size in rows
    ]


# Tables below this size are left out of a set's list of sizes: they weigh nothing in
# how a restore shares out the loading, and a schema may have thousands of them.
RELATION_SIZE_FLOOR = 1 << 20
RELATION_SIZE_LIMIT = 10_000


def relation_sizes(dbname: str) -> dict[str, int]:
    """The largest tables' sizes by oid: what a restore shares out among its loaders."""
    with connect(dbname) as conn:
        rows = conn.execute(
            "SELECT c.oid::text, pg_table_size(c.oid) AS size FROM pg_class c"
            " WHERE c.relkind IN ('r', 'm') AND pg_table_size(c.oid) >= %s"
            " ORDER BY size DESC LIMIT %s",
            (RELATION_SIZE_FLOOR, RELATION_SIZE_LIMIT),
        ).fetchall()
    return dict(rows)


def data_directory(conn) -> str | None:
    """The server's data directory, if this role may see it (superuser or
    pg_read_all_settings); None otherwise."""
    row = conn.execute("SELECT setting FROM pg_settings WHERE name = 'data_directory'").fetchone()
    return row[0] if row else None


def database_exists(conn, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def role_exists(conn, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None


def other_sessions(conn, name: str) -> list[str]:
    """Client sessions on a database, each as "pid N (application, client address)".
    Autovacuum workers do not count: PostgreSQL cancels them itself when the database
    is renamed or dropped."""
    rows = conn.execute(
        "SELECT pid, coalesce(nullif(application_name, ''), 'no application name'),"
        " coalesce(host(client_addr), 'local socket') FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        " ORDER BY pid",
        (name,),
    ).fetchall()
    return [f"pid {pid} ({application}, {address})" for pid, application, address in rows]


def sessions_after_grace(conn, name: str) -> list[str]:
    """Sessions still on a database after waiting a bounded time (SESSION_GRACE_SECONDS)
    for those that are ending: a client that has just disconnected leaves its backend
    for a moment."""
    deadline = time.monotonic() + SESSION_GRACE_SECONDS
    while True:
        sessions = other_sessions(conn, name)
        if not sessions or time.monotonic() >= deadline:
            return sessions
        time.sleep(0.1)


def user_object_count(dbname: str) -> int:
    """Relations outside the system schemas plus large objects: zero means empty."""
    with connect(dbname) as conn:
        return conn.execute(
            "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            "        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"
            "          AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp\\_%%')"
            "     + (SELECT count(*) FROM pg_largeobject_metadata)"
        ).fetchone()[0]


def create_database(conn, name: str, like: dict):
    """Create an empty database with the encoding, locale and owner of the dumped one."""
    owner = like.get("owner")
    if owner and not role_exists(conn, owner):
        raise PgBackupError(
            f"role {owner!r}, owner of database {like['name']!r}, does not exist; "
            "restore the globals first (--globals)"
        )
    sql = driver().sql
    statement = sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
        sql.Identifier(name),
        sql.Literal(like["encoding"]),
        sql.Literal(like["collate"]),
        sql.Literal(like["ctype"]),
    )
    if owner:
        statement = statement + sql.SQL(" OWNER {}").format(sql.Identifier(owner))
    _admin(conn, statement, f"creating database {name!r}")


def drop_database(conn, name: str, force: bool = False):
    """force: end the sessions still in it first (PostgreSQL 13 and later), for a
    scratch database whose loaders were just killed."""
    sql = driver().sql
    statement = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
    if force:
        statement = statement + sql.SQL(" WITH (FORCE)")
    _admin(conn, statement, f"dropping database {name!r}")


def rename_database(conn, old: str, new: str):
    sql = driver().sql
    _admin(
        conn,
        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)),
        f"renaming database {old!r} to {new!r}",
    )


def _admin(conn, statement, doing: str):
    try:
        conn.execute(statement)
    except driver().Error as error:
        raise PgBackupError(f"{doing} failed: {str(error).strip().splitlines()[0]}") from None


class ToolRun:
    """A PostgreSQL client program whose stderr is kept for the error message.

    The stderr text is read once, when the program has ended, and kept: every later
    question about the failure (finish, failure, kill) answers from it, so the tool's own
    message always reaches the operator.
    """

    def __init__(
        self,
        argv: list[str],
        stdout=None,
        stdin=subprocess.DEVNULL,
        new_session: bool = False,
        pass_fds: tuple[int, ...] = (),
    ):
        """new_session: the program and any processes it forks (pg_restore --jobs)
        form a process group of their own, which kill() ends as a whole, and the
        kernel kills the program if pgbackup dies first (SIGKILL included): a loader
        must not go on writing into a scratch database nobody will check (its own forked
        workers do not inherit that: one finishes its statement, and the next restore
        drops the scratch database once no session is left in it). pass_fds:
        descriptors the program inherits (as /proc/self/fd/N)."""
        self.argv = argv
        # Unnamed where the filesystem allows (O_TMPFILE); the prefix names it otherwise.
        self._stderr = tempfile.TemporaryFile(prefix="pgbackup-stderr-")  # noqa: SIM115 - lives as long as the process
        self._stderr_text: str | None = None
        self._stderr_lock = threading.Lock()
        self._group = new_session
        try:
            self.process = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=self._stderr,
                start_new_session=new_session,
                pass_fds=pass_fds,
                preexec_fn=_die_with_parent() if new_session else None,  # noqa: PLW1509 - no threads run yet
            )
        except OSError as error:
            self._stderr.close()
            raise PgBackupError(f"cannot start {argv[0]}: {error.strerror}") from None
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                widen_pipe(pipe)

    def stderr_text(self) -> str:
        """What the program wrote to stderr; final once the program has ended."""
        with self._stderr_lock:  # a loader's failure may be read by two threads at once
            if self._stderr_text is not None:
                return self._stderr_text
            self._stderr.seek(0)
            text = self._stderr.read().decode("utf-8", "replace")
            if self.process.poll() is not None:
                self._stderr_text = text
                self._stderr.close()
            return text

    def finish(self, what: str) -> str:
        """Wait for the program; raise with its own error line if it failed."""
        code = self.process.wait()
        text = self.stderr_text()
        if code != 0:
            raise self._error(what, code, text)
        return text

    def failure(self, what: str, wait_seconds: float = 5) -> PgBackupError | None:
        """The program's own error if it has failed (or fails within wait_seconds)."""
        try:
            code = self.process.wait(timeout=wait_seconds)
        except subprocess.TimeoutExpired:
            return None
        return self._error(what, code, self.stderr_text()) if code != 0 else None

    @staticmethod
    def _error(what: str, code: int, text: str) -> PgBackupError:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        # The first complaint is the cause; tar's closing "Exiting with failure status"
        # and the like only summarise it.
        causes = [line for line in lines if "error:" in line.lower() or "fatal:" in line.lower()]
        causes += [line for line in lines if "exiting with failure status" not in line.lower()]
        detail = (causes or lines or [f"exit code {code}"])[0]
        return PgBackupError(f"{what} failed: {detail}")

    def kill(self):
        # The processes first, then their pipes: a thread writing into one sees the
        # program gone (EPIPE), not its pipe closed under it.
        if self.process.poll() is None:
            if self._group:
                # pg_restore --jobs's workers too; the leader is not reaped yet, so the
                # group's id is still its own.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None and not pipe.closed:
                with contextlib.suppress(OSError, ValueError):
                    pipe.close()
        self.stderr_text()


_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """A preexec_fn asking the kernel to SIGKILL the child when its parent dies,
    resolved here in the parent (the child must not import or load anything)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def ask():
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return ask


def widen_pipe(pipe):
    """Give a pipe 1 MiB instead of 64 KiB: far fewer wake-ups between the program and
    us when gigabytes go through it (half the system time of a base backup restore)."""
    with contextlib.suppress(OSError):  # an older kernel or a lower pipe-max-size
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def run_tool(argv: list[str], what: str) -> str:
    run = ToolRun(argv, stdout=subprocess.DEVNULL)
    return run.finish(what)
