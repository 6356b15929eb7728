"""The benchmark database: a streaming service's users, subscriptions and watch
history, generated once into a cluster under the work folder and reused."""

from __future__ import annotations

import os
import shutil

import psycopg
from common import DB, log
from pgcluster import TempCluster

GENERATOR_VERSION = "1"

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


def start_bench_cluster(workdir: str, scale: float, settings: dict | None = None) -> TempCluster:
    """Start the benchmark cluster, generating its data first if this scale is new."""
    os.makedirs(workdir, exist_ok=True)
    # One cluster per scale, kept: a run over several scales generates each once.
    cluster_dir = os.path.join(workdir, f"cluster-{scale:g}")
    marker = os.path.join(cluster_dir, f"generated-v{GENERATOR_VERSION}-scale-{scale}")
    if not os.path.exists(marker) and os.path.exists(cluster_dir):
        shutil.rmtree(cluster_dir)
    cluster = TempCluster(
        base=cluster_dir,
        settings={
            "shared_buffers": "512MB",
            "max_wal_size": "4GB",
            "maintenance_work_mem": "256MB",
            **(settings or {}),
        },
    ).start()
    os.environ.update(cluster.env)
    if not os.path.exists(marker):
        generate(scale)
        open(marker, "w").close()
    return cluster
