#!/usr/bin/env python3
"""pgbackup against the peer tools, side by side in one run, on one database.

    make bench                              # about 1.5 GB of dump data, generated once
    .venv/bin/python bench/backup_bench.py --scale 0.1   # a quick look

The database looks like a streaming service's: users, subscriptions and watch
history, with uuids, timestamps, random text and jsonb (pgbench's tables compress
about 40x and would hide the cost of compression). It is generated once into a
cluster under --workdir and reused by later runs.

Backups compared: `pgbackup backup` (custom format, and directory format with 2
jobs), `pg_dump -Fc`, `pg_dump -Fc | gpg --symmetric --cipher-algo AES256`, the
plain C pipeline `pg_dump -Fc -Z0 | zstd -T2 -3 | openssl enc -aes-256-ctr`, and
`pg_dump -Fc -Z0 > /dev/null` (pg_dump's own floor). Restores: `pgbackup restore
--jobs 2` (which verifies every byte first) against `pg_restore -j 2` of the
unencrypted `pg_dump -Fc` file. Peak RSS is that of the largest single process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "module_utils"))

import psycopg  # noqa: E402
from pgbackup import crypto  # noqa: E402
from pgcluster import PG_BIN, TempCluster  # noqa: E402

GENERATOR_VERSION = "1"
DB = "streaming"

SCHEMA = """
CREATE TABLE users (
    id uuid PRIMARY KEY, user_no int NOT NULL, email text NOT NULL, display_name text,
    country char(2), created_at timestamptz, last_login timestamptz, profile jsonb);
CREATE TABLE subscriptions (
    id bigserial PRIMARY KEY, user_id uuid NOT NULL, plan text, status text,
    started_at timestamptz, renews_at timestamptz, price numeric(6,2), payment_token text);
CREATE TABLE watch_history (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, user_id uuid NOT NULL, title_id int,
    episode int, device text, started_at timestamptz, watched_seconds int, completed boolean,
    client jsonb);
"""

FILL = [
    """INSERT INTO users
       SELECT gen_random_uuid(), g, 'u' || g || '.' || substr(md5(random()::text), 1, 8) || '@example.com',
              initcap(substr(md5(random()::text), 1, 6)) || ' ' || initcap(substr(md5(random()::text), 1, 9)),
              (ARRAY['US','DE','FR','JP','BR','IN','GB','CA','MX','ES'])[1 + floor(random() * 10)::int],
              now() - random() * interval '5 years', now() - random() * interval '30 days',
              jsonb_build_object('lang', (ARRAY['en','de','fr','ja','pt'])[1 + floor(random() * 5)::int],
                                 'autoplay', random() < 0.5, 'maturity', floor(random() * 5)::int,
                                 'avatar', md5(random()::text))
       FROM generate_series(1, %(users)s) g""",
    """CREATE UNIQUE INDEX users_user_no ON users (user_no)""",
    """INSERT INTO subscriptions (user_id, plan, status, started_at, renews_at, price, payment_token)
       SELECT u.id, (ARRAY['basic','standard','premium','family'])[1 + floor(random() * 4)::int],
              (ARRAY['active','active','active','paused','cancelled'])[1 + floor(random() * 5)::int],
              s, s + interval '1 month', (ARRAY[7.99, 12.99, 17.99, 22.99])[1 + floor(random() * 4)::int],
              md5(random()::text) || md5(random()::text)
       FROM users u, LATERAL (SELECT now() - random() * interval '3 years' AS s) t
       WHERE random() < 1.2 - (u.user_no %% 5) * 0.1""",
    """INSERT INTO watch_history (user_id, title_id, episode, device, started_at, watched_seconds, completed, client)
       SELECT u.id, 1 + floor(random() * 50000)::int, 1 + floor(random() * 24)::int,
              (ARRAY['tv','phone','tablet','browser','console'])[1 + floor(random() * 5)::int],
              now() - random() * interval '2 years', floor(random() * 7200)::int, random() < 0.4,
              jsonb_build_object('ip', '10.' || floor(random() * 255)::int || '.' || floor(random() * 255)::int
                                       || '.' || floor(random() * 255)::int,
                                 'app', 'v' || floor(random() * 9)::int || '.' || floor(random() * 30)::int,
                                 'kbps', floor(random() * 16000)::int)
       FROM generate_series(1, %(watch)s) g JOIN users u ON u.user_no = 1 + (g::bigint * 7919) %% %(users)s""",
    """CREATE UNIQUE INDEX users_email ON users (email)""",
    """CREATE INDEX subscriptions_user ON subscriptions (user_id)""",
    """CREATE INDEX watch_history_user_time ON watch_history (user_id, started_at)""",
    """ALTER TABLE subscriptions ADD FOREIGN KEY (user_id) REFERENCES users (id)""",
    """ALTER TABLE watch_history ADD FOREIGN KEY (user_id) REFERENCES users (id)""",
    """VACUUM ANALYZE""",
]


def log(message: str):
    print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def generate(scale: float):
    users, watch = int(1_000_000 * scale), int(7_000_000 * scale)
    log(f"generating {DB}: {users} users, {watch} watch_history rows (once; reused by later runs)")
    with psycopg.connect(dbname="postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")
        conn.execute(f"CREATE DATABASE {DB}")
    with psycopg.connect(dbname=DB, autocommit=True) as conn:
        conn.execute(SCHEMA)
        for statement in FILL:
            conn.execute(statement, {"users": users, "watch": watch})


def measure(name: str, shell: str, workdir: str) -> dict:
    """Run a shell command under GNU time: wall seconds and the largest process's RSS."""
    timing = os.path.join(workdir, "time.out")
    subprocess.run(
        ["/usr/bin/time", "-f", "%e %M", "-o", timing, "bash", "-o", "pipefail", "-c", shell],
        check=True,
        env=os.environ,
    )
    with open(timing) as handle:
        wall, rss_kb = handle.read().split()[-2:]
    result = {"name": name, "wall_s": float(wall), "peak_rss_mb": int(rss_kb) / 1024}
    log(f"{name}: {result['wall_s']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB")
    return result


def size_of(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


def pgbackup(*args: str) -> str:
    return f"PYTHONPATH={ROOT}/module_utils {sys.executable} -m pgbackup {' '.join(args)}"


def drop(*names: str):
    with psycopg.connect(dbname="postgres", autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def row_counts(dbname: str) -> dict:
    with psycopg.connect(dbname=dbname) as conn:
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("users", "subscriptions", "watch_history")
        }


def machine() -> dict:
    model = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        memory_kb = int(handle.readline().split()[1])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def run(args) -> dict:
    workdir = args.workdir
    os.makedirs(workdir, exist_ok=True)
    cluster_dir = os.path.join(workdir, "cluster")
    marker = os.path.join(cluster_dir, f"generated-v{GENERATOR_VERSION}-scale-{args.scale}")
    if not os.path.exists(marker) and os.path.exists(cluster_dir):
        shutil.rmtree(cluster_dir)
    cluster = TempCluster(
        base=cluster_dir,
        settings={"shared_buffers": "512MB", "max_wal_size": "4GB", "maintenance_work_mem": "256MB"},
    ).start()
    os.environ.update(cluster.env)
    out = tempfile.mkdtemp(prefix="run-", dir=workdir)
    try:
        if not os.path.exists(marker):
            generate(args.scale)
            open(marker, "w").close()
        key_file = os.path.join(out, "bench.key")
        crypto.generate_key_file(key_file)
        passphrase = os.path.join(out, "passphrase")
        with open(passphrase, "w") as handle:
            handle.write(os.urandom(32).hex())
        os.chmod(passphrase, 0o600)
        dump = f"{PG_BIN}/pg_dump --no-password"

        results = {}
        floor = measure("pg_dump -Fc -Z0 > /dev/null", f"{dump} -Fc -Z0 {DB} > /dev/null", out)
        plain_bytes = int(
            subprocess.run(
                f"{dump} -Fc -Z0 {DB} | wc -c",
                shell=True,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        results["floor"] = floor | {"output_bytes": None}

        def backup_case(label, shell, output):
            result = measure(label, shell, out)
            result["output_bytes"] = size_of(output)
            return result

        results["pg_dump"] = backup_case(
            "pg_dump -Fc", f"{dump} -Fc {DB} > {out}/plain.dump", f"{out}/plain.dump"
        )
        results["gpg"] = backup_case(
            "pg_dump -Fc | gpg AES256",
            f"{dump} -Fc {DB} | gpg --batch --yes --pinentry-mode loopback --passphrase-file {passphrase}"
            f" --symmetric --cipher-algo AES256 -o {out}/gpg.dump.gpg",
            f"{out}/gpg.dump.gpg",
        )
        results["c_pipeline"] = backup_case(
            "pg_dump -Fc -Z0 | zstd -T2 -3 | openssl aes-256-ctr",
            f"{dump} -Fc -Z0 {DB} | zstd -q -T2 -3 | openssl enc -aes-256-ctr -pbkdf2 -pass file:{passphrase}"
            f" -out {out}/c.dump.zst.enc",
            f"{out}/c.dump.zst.enc",
        )
        for label, extra in (("custom", ""), ("directory", "--format directory --jobs 2")):
            dest = os.path.join(out, f"sets-{label}")
            results[f"pgbackup_{label}"] = backup_case(
                f"pgbackup backup ({label}{', 2 jobs' if extra else ''})",
                pgbackup("backup", "--dest", dest, "--key-file", key_file, "--database", DB, extra),
                dest,
            )

        source_counts = row_counts(DB)
        drop("restore_pg", "restore_pgbackup")
        results["pg_restore"] = measure(
            "pg_restore -j 2 (unencrypted pg_dump -Fc)",
            f"{PG_BIN}/createdb -T template0 restore_pg && {PG_BIN}/pg_restore --no-password -j 2"
            f" -d restore_pg {out}/plain.dump",
            out,
        )
        custom_set = os.path.join(out, "sets-custom", sorted(os.listdir(os.path.join(out, "sets-custom")))[0])
        results["pgbackup_restore"] = measure(
            "pgbackup restore --jobs 2 (verify, decrypt, restore)",
            pgbackup(
                "restore",
                custom_set,
                "--key-file",
                key_file,
                "--database",
                DB,
                "--target-db",
                "restore_pgbackup",
                "--jobs",
                "2",
            ),
            out,
        )
        restored_ok = row_counts("restore_pgbackup") == source_counts
        drop("restore_pg", "restore_pgbackup")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        cluster.stop(remove=False)

    for result in results.values():
        result["mb_per_s"] = plain_bytes / 1e6 / result["wall_s"]
    ratios = {
        "pgbackup_custom / pg_dump -Fc": results["pgbackup_custom"]["wall_s"] / results["pg_dump"]["wall_s"],
        "pgbackup_custom / C pipeline": results["pgbackup_custom"]["wall_s"]
        / results["c_pipeline"]["wall_s"],
        "pgbackup_directory / C pipeline": results["pgbackup_directory"]["wall_s"]
        / results["c_pipeline"]["wall_s"],
        "pgbackup_custom size / pg_dump -Fc size": results["pgbackup_custom"]["output_bytes"]
        / results["pg_dump"]["output_bytes"],
        "pgbackup restore / pg_restore -j 2": results["pgbackup_restore"]["wall_s"]
        / results["pg_restore"]["wall_s"],
    }
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "scale": args.scale,
        "dump_bytes_uncompressed": plain_bytes,
        "source_rows": source_counts,
        "restore_rows_match": restored_ok,
        "results": results,
        "ratios": ratios,
    }


def report(data: dict):
    print()
    print(
        f"machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, {data['machine']['memory_gb']} GB"
    )
    print(
        f"database: {data['dump_bytes_uncompressed'] / 1e9:.2f} GB of uncompressed pg_dump output, "
        f"rows {data['source_rows']}"
    )
    print(f"{'case':56} {'wall s':>8} {'MB/s':>8} {'output MB':>10} {'peak RSS MB':>12}")
    for result in data["results"].values():
        size = f"{result['output_bytes'] / 1e6:.0f}" if result.get("output_bytes") else "-"
        print(
            f"{result['name']:56} {result['wall_s']:8.1f} {result['mb_per_s']:8.0f} {size:>10} "
            f"{result['peak_rss_mb']:12.0f}"
        )
    print()
    for name, value in data["ratios"].items():
        print(f"{name:45} {value:6.2f}x")
    print(f"restored row counts match the source: {data['restore_rows_match']}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 is about 1.5 GB of dump data")
    parser.add_argument("--workdir", default="/var/tmp/pgbackup-bench", help="cluster and scratch space")
    args = parser.parse_args()
    data = run(args)
    report(data)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"backup-{data['when'].replace(':', '')}.json")
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)
    print(f"saved {path}")
    return 0 if data["restore_rows_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
