"""A real PostgreSQL for the unit tests: initdb in a temporary folder, on loopback.

The cluster uses scram-sha-256 for every TCP login, and the tests reach it the way
cron does on a host: libpq environment plus a passfile, never a password on argv.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid

import psycopg
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "module_utils"))

from pgbackup import crypto, manifest  # noqa: E402
from pgcluster import TempCluster  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    try:
        server = TempCluster(settings={"fsync": "off"}).start()
    except RuntimeError as error:
        pytest.fail(str(error))
    saved = {name: os.environ.get(name) for name in [*server.env, "PGPASSWORD", "PGDATABASE"]}
    os.environ.pop("PGPASSWORD", None)
    os.environ.pop("PGDATABASE", None)
    os.environ.update(server.env)
    try:
        yield {
            "port": server.port,
            "env": server.env,
            "data": server.data,
            "base": server.base,
            "password": server.password,
        }
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def connect(dbname="postgres"):
    with psycopg.connect(dbname=dbname, autocommit=True) as conn:
        yield conn


def query(dbname, statement, params=None):
    with connect(dbname) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else None


@pytest.fixture
def new_db(cluster):
    """Make uniquely named databases; drop them (and restore leftovers) afterwards."""
    made = []

    def make(prefix="db"):
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        query("postgres", f'CREATE DATABASE "{name}"')
        made.append(name)
        return name

    yield make
    with connect() as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE NOT datistemplate AND datname <> 'postgres'"
        )
        for (name,) in rows.fetchall():
            if any(name.startswith(base) for base in made) or name.startswith("pgbackup_restore_"):
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def key_file(tmp_path_factory):
    """The private key that reads the tests' sets (its public key is beside it, .pub)."""
    path = str(tmp_path_factory.mktemp("keys") / "backup.key")
    crypto.generate_key_pair(path)
    return path


@pytest.fixture(scope="session")
def recipient_file(key_file):
    """The public key the tests' sets are written for, as a host holds it."""
    return f"{key_file}.pub"


@pytest.fixture(scope="session")
def key(key_file):
    return crypto.load_key(key_file)


@pytest.fixture(scope="session")
def recipients(recipient_file):
    return crypto.load_recipients([recipient_file])


@pytest.fixture
def other_key_file(tmp_path):
    path = str(tmp_path / "other.key")
    crypto.generate_key_pair(path)
    return path


def version1_key_file(path) -> str:
    """A format version 1 key file (sets made before version 2 still restore with it)."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(os.urandom(crypto.KEY_BYTES).hex() + "\n")
    return str(path)


def reseal(path, recipients, edit):
    """The set's manifest edited by edit(record) and sealed again, as its writer would:
    what someone who holds the public key and can write to the backup storage can do."""
    manifest_path = os.path.join(path, manifest.MANIFEST_NAME)
    with open(manifest_path) as handle:
        record = json.load(handle)
    edit(record)
    for field in ("seal", "mac"):
        record.pop(field)
    with open(manifest_path, "w") as handle:
        json.dump(manifest.seal(record, recipients), handle)


def run_cli(*args, check=False, env=None, timeout=300, stdin=None, stdout=subprocess.PIPE):
    """Run `python -m pgbackup` as cron would, from the repository's module_utils.
    stdin and stdout may be open files (encrypt, decrypt); stdout is captured otherwise."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.path.join(ROOT, "module_utils")
    full_env.update(env or {})
    result = subprocess.run(  # noqa: PLW1510 - callers check the exit code
        [sys.executable, "-m", "pgbackup", *args],
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"pgbackup {' '.join(args)} failed: {result.stderr}")
    return result


def run_ansible(tool: str, *args, env=None, timeout=120):
    """Run one of the venv's Ansible programs (ansible, ansible-playbook, ansible-vault)
    from the repository with its ansible.cfg, as a user at the controller would.
    env adds variables; a value of None removes one."""
    full_env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    return subprocess.run(  # noqa: PLW1510 - callers check the exit code
        [os.path.join(os.path.dirname(sys.executable), tool), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=timeout,
    )


def seed_rich_database(dbname: str):
    """Several schemas, large objects, unicode, an extra role with grants."""
    with connect() as conn:
        for role in ("app_owner", "app_reader"):
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'role-password-{role}'")
    with connect(dbname) as conn:
        conn.execute("""
            CREATE SCHEMA accounts AUTHORIZATION app_owner;
            CREATE SCHEMA billing;
            CREATE TABLE accounts.users (id uuid PRIMARY KEY, email text UNIQUE NOT NULL,
                                         display_name text, profile jsonb, created_at timestamptz);
            CREATE TABLE billing.subscriptions (id bigserial PRIMARY KEY,
                                                user_id uuid REFERENCES accounts.users(id),
                                                plan text, price numeric(8,2));
            CREATE INDEX subscriptions_plan ON billing.subscriptions (plan);
            CREATE VIEW billing.revenue AS
                SELECT plan, sum(price) AS total FROM billing.subscriptions GROUP BY plan;
            GRANT USAGE ON SCHEMA billing TO app_reader;
            GRANT SELECT ON billing.subscriptions TO app_reader;
            COMMENT ON TABLE accounts.users IS 'Zuschauer — 視聴者 — зрители';
            -- A partitioned table (its indexes attached to the partitions'), a trigger
            -- with a comment: post-data entries that depend on one another.
            CREATE TABLE billing.plays (user_id uuid NOT NULL REFERENCES accounts.users(id),
                                        played_on date NOT NULL, seconds int,
                                        PRIMARY KEY (user_id, played_on)) PARTITION BY RANGE (played_on);
            CREATE TABLE billing.plays_2026 PARTITION OF billing.plays
                FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
            CREATE TABLE billing.plays_2027 PARTITION OF billing.plays
                FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
            CREATE INDEX plays_seconds ON billing.plays (seconds);
            CREATE FUNCTION billing.no_null_price() RETURNS trigger LANGUAGE plpgsql
                AS $$BEGIN NEW.price := coalesce(NEW.price, 0); RETURN NEW; END$$;
            CREATE TRIGGER subscriptions_price BEFORE INSERT ON billing.subscriptions
                FOR EACH ROW EXECUTE FUNCTION billing.no_null_price();
            COMMENT ON TRIGGER subscriptions_price ON billing.subscriptions IS 'prices are never null';
            -- Two tables whose foreign keys point at each other, and a materialized view.
            CREATE TABLE billing.plans (code text PRIMARY KEY, default_offer int);
            CREATE TABLE billing.offers (id int PRIMARY KEY,
                                         plan text NOT NULL REFERENCES billing.plans(code));
            ALTER TABLE billing.plans ADD FOREIGN KEY (default_offer) REFERENCES billing.offers(id);
            CREATE MATERIALIZED VIEW billing.plan_counts AS
                SELECT plan, count(*) AS subscribers FROM billing.subscriptions GROUP BY plan;
        """)
        conn.execute("""
            INSERT INTO accounts.users
            SELECT gen_random_uuid(), 'user' || g || '@example.org',
                   'Zoë ' || g || ' 🎬 名前', jsonb_build_object('lang', 'ja', 'n', g), now()
            FROM generate_series(1, 2000) g;
            INSERT INTO billing.subscriptions (user_id, plan, price)
            SELECT id, CASE WHEN random() < 0.5 THEN 'basic' ELSE 'premium' END, 9.99 FROM accounts.users;
            INSERT INTO billing.plays
            SELECT id, date '2026-06-01' + (random() * 400)::int, (random() * 7200)::int FROM accounts.users;
            INSERT INTO billing.plans VALUES ('basic', NULL), ('premium', NULL);
            INSERT INTO billing.offers VALUES (1, 'basic'), (2, 'premium');
            UPDATE billing.plans SET default_offer = CASE code WHEN 'basic' THEN 1 ELSE 2 END;
            REFRESH MATERIALIZED VIEW billing.plan_counts;
        """)
        # Last: an event trigger logging DDL, which a restore must create only after the
        # keys, indexes and triggers (else the log fills with the restore's own commands).
        conn.execute("""
            CREATE SCHEMA audit;
            CREATE TABLE audit.ddl_log (command text);
            CREATE FUNCTION audit.log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$BEGIN
                INSERT INTO audit.ddl_log SELECT command_tag FROM pg_event_trigger_ddl_commands();
            END$$;
        """)
        conn.execute("SELECT lo_from_bytea(0, convert_to(repeat('poster-bytes ', 10000), 'UTF8'))")
        # An oid over 2^31: pg_dump writes it as a negative C int.
        conn.execute("SELECT lo_from_bytea(3000000001, convert_to(repeat('trailer ', 5000), 'UTF8'))")
        # (Not REFRESH MATERIALIZED VIEW: pg_restore --jobs itself may run that beside it.)
        conn.execute(
            "CREATE EVENT TRIGGER log_ddl ON ddl_command_end"
            " WHEN TAG IN ('ALTER TABLE', 'CREATE INDEX', 'CREATE TRIGGER', 'COMMENT')"
            " EXECUTE FUNCTION audit.log_ddl()"
        )


def fingerprint(dbname: str) -> dict:
    """What a faithful restore must reproduce."""
    with connect(dbname) as conn:

        def one(statement):
            return conn.execute(statement).fetchall()

        return {
            "users": one("SELECT id, email, display_name, profile FROM accounts.users ORDER BY id"),
            "subscriptions": one("SELECT user_id, plan, price FROM billing.subscriptions ORDER BY user_id"),
            "revenue": one("SELECT * FROM billing.revenue ORDER BY plan"),
            "comment": one("SELECT obj_description('accounts.users'::regclass)"),
            "schema_owner": one(
                "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'accounts'"
            ),
            "grants": one(
                "SELECT grantee, privilege_type FROM information_schema.role_table_grants"
                " WHERE table_schema = 'billing' AND grantee = 'app_reader'"
            ),
            "large_objects": one(
                "SELECT oid::bigint, md5(lo_get(oid)) FROM pg_largeobject_metadata ORDER BY 1"
            ),
            # Indexes, keys and foreign keys: what the restore builds after the data.
            "indexes": one(
                "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"
                " AND n.nspname NOT LIKE 'pg_toast%'"
                " ORDER BY 1"
            ),
            "triggers": one(
                "SELECT pg_get_triggerdef(oid), obj_description(oid, 'pg_trigger') FROM pg_trigger"
                " WHERE NOT tgisinternal ORDER BY 1"
            ),
            # Partitions, and partitioned indexes attached to their partitions' indexes.
            "inheritance": one(
                "SELECT inhrelid::regclass::text, inhparent::regclass::text FROM pg_inherits ORDER BY 1"
            ),
            "ddl_logged": one("SELECT command, count(*) FROM audit.ddl_log GROUP BY 1 ORDER BY 1"),
            "event_triggers": one("SELECT evtname, evtevent, evtenabled FROM pg_event_trigger ORDER BY 1"),
            "plan_counts": one("SELECT * FROM billing.plan_counts ORDER BY 1"),
            "plays": one("SELECT count(*), sum(seconds), min(played_on) FROM billing.plays"),
            "constraints": one(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)"
                " ORDER BY 1, 2"
            ),
        }


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB filesystem, for full-disk tests (needs root to mount)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(  # noqa: PLW1510 - the result is checked below
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.fail(f"this test needs root to mount a small tmpfs: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)
