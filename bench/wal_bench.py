#!/usr/bin/env python3
"""The WAL archive against pgBackRest 2.45, side by side in one run, on one cluster.

    .venv/bin/python bench/wal_bench.py                 # at least 1 GB of WAL
    .venv/bin/python bench/wal_bench.py --wal-mb 200 --scale 0.1   # a quick look

1. Archive throughput. The cluster (the streaming-service database of backup_bench.py)
   writes at least --wal-mb of WAL from a realistic workload; the segments are copied
   into a stand-in data directory with their archive_status/*.ready files, and each
   tool archives them the way PostgreSQL's archiver calls archive_command: one file per
   call, in order, the .ready renamed .done after each success. pgBackRest: Debian's
   2.45, compress-type=zst level 3, repo1-cipher-type=aes-256-cbc, synchronous and
   asynchronous (archive-async, process-max=2). pgbackup: zstd level 3, AES-256-GCM,
   one file per call and with --push-ahead 8 (each call archives up to 8 ready files
   side by side; each is reported archived only once durable, as pgBackRest's async).
2. Point-in-time recovery: a base backup taken before the workload is restored and all
   of that WAL replayed to the end (promote), timed from an empty folder to a server
   open for writes: `pgbackrest restore` (+ archive-get, synchronous and asynchronous
   with prefetch) against `pgbackup restore-base` + `pgbackup wal-fetch`.
3. The archiver under pgbench at full speed with `pgbackup wal-push --push-ahead 8` as
   archive_command: pg_stat_archiver's failures and the largest backlog of ready files.

Everything runs as the postgres user, with Debian's python3 (as on hosts).
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import common
import psycopg
from common import (
    ROOT,
    describe_machine,
    log,
    measure,
    run_record,
    save_results,
    size_of,
)
from dataset import start_bench_cluster
from pgbackup import crypto
from pgcluster import PG_BIN, free_port

STANZA = "bench"
HOST_PGBACKUP = f"env PYTHONPATH={ROOT}/module_utils /usr/bin/python3 -m pgbackup"


def as_postgres(command: str) -> str:
    return f"runuser -u postgres -- bash -c {shlex.quote(command)}" if os.geteuid() == 0 else command


def postgres_folder(parent: str, name: str) -> str:
    path = os.path.join(parent, name)
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")
    return path


def chown_tree(path: str):
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres:postgres", path], check=True)


def parse():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=0.3, help="the database (1.0: about 1.5 GB of dump)")
    parser.add_argument("--wal-mb", type=int, default=1100, help="WAL the workload writes (default 1100)")
    parser.add_argument("--workdir", default="/var/tmp/pgbackup-bench")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case; the median is reported")
    parser.add_argument("--pgbench-seconds", type=int, default=60)
    args = parser.parse_args()
    common.REPEAT = args.repeat
    return args


def write_workload(cluster, wal_mb: int) -> int:
    """Rows like the service's own until wal_mb of WAL is written; the bytes written."""
    with psycopg.connect(dbname="streaming", autocommit=True) as conn:
        start = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        conn.execute("DROP TABLE IF EXISTS wal_load")
        conn.execute("CREATE TABLE wal_load (LIKE watch_history)")
        written = 0
        while written < wal_mb << 20:
            conn.execute("INSERT INTO wal_load SELECT * FROM watch_history ORDER BY random() LIMIT 200000")
            conn.execute("UPDATE wal_load SET watched_seconds = watched_seconds + 1 WHERE random() < 0.2")
            written = conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (start,)).fetchone()[0]
        conn.execute("SELECT pg_switch_wal()")
    return int(written)


def wait_archived(cluster, timeout=600):
    with psycopg.connect(dbname="postgres", autocommit=True) as conn:
        conn.execute("SELECT txid_current()")
        target = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
        conn.execute("SELECT pg_switch_wal()")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = conn.execute("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver").fetchone()[0]
            if last >= target:
                return
            time.sleep(0.5)
    raise RuntimeError("the staging archive_command fell behind")


def pgbackrest_conf(path: str, repo: str, spool: str, pg_path: str, cluster, asynchronous: bool):
    with open(path, "w") as handle:
        handle.write(
            f"[global]\nrepo1-path={repo}\nrepo1-cipher-type=aes-256-cbc\n"
            f"repo1-cipher-pass={CIPHER_PASS}\ncompress-type=zst\ncompress-level=3\n"
            f"process-max=2\nstart-fast=y\nlog-level-console=warn\nlog-level-file=off\n"
            f"lock-path={spool}\nspool-path={spool}\narchive-check=n\n"
            + ("archive-async=y\narchive-get-queue-max=256MiB\n" if asynchronous else "")
            + f"\n[{STANZA}]\npg1-path={pg_path}\npg1-port={cluster.port}\npg1-socket-path={cluster.socket_dir}\n"
            "pg1-user=postgres\n"
        )
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


CIPHER_PASS = os.urandom(24).hex()


def stand_in_data_dir(out: str, cluster, segments: list[str]) -> str:
    """A folder PostgreSQL's archiver would see: pg_control, PG_VERSION, the segments
    and a .ready file for each."""
    fake = os.path.join(out, "archiving")
    os.makedirs(os.path.join(fake, "global"))
    os.makedirs(os.path.join(fake, "pg_wal", "archive_status"))
    shutil.copy(os.path.join(cluster.data, "global", "pg_control"), os.path.join(fake, "global"))
    shutil.copy(os.path.join(cluster.data, "PG_VERSION"), fake)
    for path in segments:
        shutil.copy(path, os.path.join(fake, "pg_wal"))
        open(os.path.join(fake, "pg_wal", "archive_status", os.path.basename(path) + ".ready"), "w").close()
    chown_tree(fake)
    return fake


def archiver_loop(fake: str, command: str) -> str:
    """The archiver's calls, one file at a time, in its order."""
    status = f"{fake}/pg_wal/archive_status"
    return as_postgres(
        f"cd {fake} && for ready in $(ls {status} | grep '\\.ready$' | sort); do f=${{ready%.ready}};"
        f" {command} pg_wal/$f || exit 1; mv {status}/$ready {status}/$f.done; done"
    )


def reset_ready(fake: str, clear: str) -> str:
    status = f"{fake}/pg_wal/archive_status"
    return (
        f"{clear}; for done in $(ls {status} | grep '\\.done$'); do mv {status}/$done {status}/${{done%.done}}.ready;"
        " done"
    )


def write_script(path: str, body: str):
    with open(path, "w") as handle:
        handle.write(f"#!/bin/sh\n{body}\n")
    os.chmod(path, 0o755)  # noqa: S103 - PostgreSQL runs it as postgres


def recovery_case(name, restore: str, restored: str, port: int, cluster, out: str) -> dict:
    """Restore into an empty folder, start it, wait until recovery has replayed all WAL
    and promoted: the whole of it timed."""
    folder = os.path.dirname(restored)
    start = (
        f"{PG_BIN}/pg_ctl -D {restored} -w -t 3600 -l {folder}/server.log start -o"
        f" '-p {port} -k {folder} -c listen_addresses= -c archive_mode=off -c shared_buffers=512MB"
        f" -c max_wal_size=4GB -c recovery_target_action=promote'"
    )
    wait = (
        f'until [ "$(PGPASSWORD={cluster.password} psql -XAtq -h {folder} -p {port} -U postgres -d postgres'
        " -c 'SELECT pg_is_in_recovery()' 2>/dev/null)\" = f ]; do sleep 0.2; done"
    )
    stop = as_postgres(f"{PG_BIN}/pg_ctl -D {restored} -m immediate stop >/dev/null 2>&1 || true")
    result = measure(
        name,
        as_postgres(f"{restore} && {start} >/dev/null && {wait}"),
        out,
        reset=f"{stop}; rm -rf {restored}; {as_postgres(f'mkdir -m 0700 {restored}')}",
    )
    subprocess.run(["bash", "-c", stop], check=False)
    shutil.rmtree(restored, ignore_errors=True)
    return result


def run(args) -> dict:
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    out = tempfile.mkdtemp(prefix="wal-", dir=work)
    os.chmod(out, 0o755)  # noqa: S103 - the postgres user works in here
    stage = postgres_folder(out, "stage")
    pg_folder = postgres_folder(out, "pg")  # restored servers, their sockets and logs
    # archive_command given at start cannot be changed by ALTER SYSTEM: it runs a script
    # this bench rewrites (a copy into the stage first, pgbackup under pgbench later).
    archive_script = os.path.join(out, "archive.sh")
    write_script(archive_script, f'exec cp "$1" {stage}/"$2"')
    cluster = start_bench_cluster(
        work,
        args.scale,
        settings={"archive_mode": "on", "archive_command": f"'{archive_script} %p %f'", "wal_keep_size": "0"},
    )
    results, figures = {}, {}
    try:
        repo, spool = postgres_folder(out, "repo"), postgres_folder(out, "spool")
        dest = postgres_folder(out, "pgbackup")
        conf_db, conf_sync, conf_async = (
            os.path.join(out, name) for name in ("db.conf", "sync.conf", "async.conf")
        )
        pgbackrest_conf(conf_db, repo, spool, cluster.data, cluster, asynchronous=False)
        passfile = os.path.join(spool, "pgpass")
        with open(passfile, "w") as handle:
            handle.write(f"*:*:*:postgres:{cluster.password}\n")
        os.chmod(passfile, 0o600)
        chown_tree(spool)
        pgbackrest_db = f"env PGPASSFILE={passfile} pgbackrest --config={conf_db} --stanza={STANZA}"
        subprocess.run(as_postgres(f"{pgbackrest_db} stanza-create"), shell=True, check=True)
        key_file = os.path.join(out, "bench.key")
        crypto.generate_key_pair(key_file)
        chown_tree(key_file)
        chown_tree(f"{key_file}.pub")

        log("base backups (before the workload)")
        subprocess.run(as_postgres(f"{pgbackrest_db} backup --type=full"), shell=True, check=True)
        env_cluster = " ".join(
            f"{name}={value}" for name, value in cluster.env.items() if name != "PGPASSFILE"
        )
        subprocess.run(
            as_postgres(
                f"env {env_cluster} PGPASSWORD={cluster.password} {HOST_PGBACKUP} basebackup --dest {dest}"
                f" --recipient {key_file}.pub"
            ),
            shell=True,
            check=True,
        )
        log(f"workload: writing at least {args.wal_mb} MB of WAL")
        figures["wal_bytes"] = write_workload(cluster, args.wal_mb)
        wait_archived(cluster)
        segments = sorted(glob.glob(os.path.join(stage, "0" * 7 + "1" + "?" * 16)))
        figures["segments"] = len(segments)
        log(f"{figures['wal_bytes'] / 1e6:.0f} MB of WAL in {len(segments)} segments")
        fake = stand_in_data_dir(out, cluster, segments)
        pgbackrest_conf(conf_sync, repo, spool, fake, cluster, asynchronous=False)
        pgbackrest_conf(conf_async, repo, spool, fake, cluster, asynchronous=True)
        results.update(
            push_benchmark(fake, repo, dest, (conf_sync, conf_async), key_file, len(segments), out)
        )
        results.update(recovery_benchmark(dest, key_file, (conf_db, conf_async), pg_folder, cluster, out))
        figures["pgbench"] = archiver_under_pgbench(
            cluster, dest, key_file, archive_script, args.pgbench_seconds
        )
    finally:
        cluster.stop(remove=False)
        shutil.rmtree(out, ignore_errors=True)
    ratios = {
        "push: pgbackup one per call / pgBackRest sync": results["pgbackup_push"]["wall_s"]
        / results["pgbackrest_push"]["wall_s"],
        "push: pgbackup push-ahead / pgBackRest sync": results["pgbackup_push_ahead"]["wall_s"]
        / results["pgbackrest_push"]["wall_s"],
        "push: pgbackup push-ahead / pgBackRest async": results["pgbackup_push_ahead"]["wall_s"]
        / results["pgbackrest_push_async"]["wall_s"],
        "pitr: pgbackup / pgBackRest sync": results["pgbackup_pitr"]["wall_s"]
        / results["pgbackrest_pitr"]["wall_s"],
        "pitr: pgbackup / pgBackRest async": results["pgbackup_pitr"]["wall_s"]
        / results["pgbackrest_pitr_async"]["wall_s"],
    }
    return run_record(args.scale, results=results, ratios=ratios, **figures)


def push_benchmark(fake, repo, dest, confs, key_file, segments: int, out) -> dict:
    """Each tool archives the same segments as PostgreSQL's archiver would have it."""
    conf_sync, conf_async = confs
    results = {}
    # The async spool remembers what it pushed (.ok files): cleared with the repository.
    spool = os.path.join(os.path.dirname(repo), "spool")
    clear_repo = as_postgres(f"rm -rf {repo}/archive/{STANZA}/*-*/ {spool}/archive")
    clear_dest = as_postgres(f"rm -rf {dest}/wal")
    cases = [
        (
            "pgbackrest_push",
            "pgBackRest archive-push",
            f"pgbackrest --config={conf_sync} --stanza={STANZA} archive-push",
            clear_repo,
        ),
        (
            "pgbackrest_push_async",
            "pgBackRest archive-push (async, process-max=2)",
            f"pgbackrest --config={conf_async} --stanza={STANZA} archive-push",
            clear_repo,
        ),
        (
            "pgbackup_push",
            "pgbackup wal-push (one file per call)",
            f"{HOST_PGBACKUP} wal-push --dest {dest} --recipient {key_file}.pub --push-ahead 1",
            clear_dest,
        ),
        (
            "pgbackup_push_ahead",
            "pgbackup wal-push --push-ahead 8",
            f"{HOST_PGBACKUP} wal-push --dest {dest} --recipient {key_file}.pub --push-ahead 8",
            clear_dest,
        ),
    ]
    for key, name, command, clear in cases:
        results[key] = measure(name, archiver_loop(fake, command), out, reset=reset_ready(fake, clear))
        results[key]["per_segment_ms"] = results[key]["wall_s"] / segments * 1000
    results["pgbackrest_push"]["output_bytes"] = size_of(os.path.join(repo, "archive"))
    results["pgbackup_push_ahead"]["output_bytes"] = size_of(os.path.join(dest, "wal"))
    # Leave pgBackRest's archive filled by its synchronous push (the async spool is per host).
    subprocess.run(["bash", "-c", reset_ready(fake, clear_repo)], check=True)
    subprocess.run(["bash", "-c", archiver_loop(fake, cases[0][2])], check=True)

    return results


def recovery_benchmark(dest, key_file, confs, pg_folder, cluster, out) -> dict:
    """From an empty folder to a server promoted at the end of the WAL, each tool."""
    conf_db, conf_async = confs
    results = {}
    port = free_port()
    restored = os.path.join(pg_folder, "data")
    set_path = glob.glob(os.path.join(dest, "physical-*"))[0]
    for key, name, conf in (
        ("pgbackrest_pitr", "pgBackRest restore + archive-get", conf_db),
        ("pgbackrest_pitr_async", "pgBackRest restore + archive-get (async prefetch)", conf_async),
    ):
        results[key] = recovery_case(
            name,
            f"pgbackrest --config={conf} --stanza={STANZA} --pg1-path={restored} restore --type=default",
            restored,
            port,
            cluster,
            out,
        )
    fetch = f"{HOST_PGBACKUP} wal-fetch --dest {dest} --key-file {key_file} %f %p"
    results["pgbackup_pitr"] = recovery_case(
        "pgbackup restore-base + wal-fetch",
        f"{HOST_PGBACKUP} restore-base {set_path} --key-file {key_file} --target-dir {restored}"
        f" >/dev/null && echo \"restore_command = '{fetch}'\" >> {restored}/postgresql.auto.conf"
        f" && touch {restored}/recovery.signal",
        restored,
        port,
        cluster,
        out,
    )
    return results


def archiver_under_pgbench(cluster, dest: str, key_file: str, archive_script: str, seconds: int) -> dict:
    """pgbench's bulk load (the most WAL per second this machine writes), then its
    read-write run at full speed, with pgbackup as archive_command: the archiver's
    failures, its largest backlog of ready files, and how long it took to drain."""
    write_script(
        archive_script,
        f'exec {HOST_PGBACKUP} wal-push --dest {dest} --recipient {key_file}.pub --push-ahead 8 "$1"',
    )
    status = os.path.join(cluster.data, "pg_wal", "archive_status")
    with psycopg.connect(dbname="postgres", autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS pgbench_load")
        conn.execute("CREATE DATABASE pgbench_load")
        before = conn.execute("SELECT archived_count, failed_count FROM pg_stat_archiver").fetchone()
        wal_start = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        started = time.monotonic()
        backlog = []
        for argv in (
            ["-i", "-q", "-s", "50"],
            ["-c", "4", "-j", "2", "-T", str(seconds)],
        ):
            load = subprocess.Popen(
                [f"{PG_BIN}/pgbench", *argv, "pgbench_load"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            while load.poll() is None:
                backlog.append(sum(name.endswith(".ready") for name in os.listdir(status)))
                time.sleep(0.5)
            output = load.stdout.read()
        elapsed = time.monotonic() - started
        wal = conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (wal_start,)).fetchone()[0]
        drained = time.monotonic()
        while (
            sum(name.endswith(".ready") for name in os.listdir(status)) and time.monotonic() - drained < 300
        ):
            time.sleep(0.5)
        after = conn.execute("SELECT archived_count, failed_count FROM pg_stat_archiver").fetchone()
    tps = next((line.split("=")[1].split()[0] for line in output.splitlines() if line.startswith("tps")), "?")
    figures = {
        "seconds": round(elapsed, 1),
        "tps": tps,
        "wal_mb": round(int(wal) / 1e6),
        "wal_mb_per_s": round(int(wal) / elapsed / 1e6, 1),
        "archived": after[0] - before[0],
        "failures": after[1] - before[1],
        "max_backlog_files": max(backlog or [0]),
        "drained_after_s": round(time.monotonic() - drained, 1),
    }
    log(f"archiver under pgbench: {figures}")
    return figures


def report(data: dict):
    print()
    print(describe_machine(data))
    print(f"WAL: {data['wal_bytes'] / 1e6:.0f} MB in {data['segments']} segments")
    print(f"{'case':52} {'wall s':>8} {'ms/segment':>11} {'peak RSS MB':>12}")
    for result in data["results"].values():
        per = f"{result['per_segment_ms']:.0f}" if "per_segment_ms" in result else "-"
        print(f"{result['name']:52} {result['wall_s']:8.1f} {per:>11} {result['peak_rss_mb']:12.0f}")
    print()
    for name, value in data["ratios"].items():
        print(f"{name:48} {value:6.2f}x")
    print(f"archiver under pgbench: {data['pgbench']}")


def main():
    data = run(parse())
    report(data)
    save_results("wal", data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
