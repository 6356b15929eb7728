#!/usr/bin/env python3
"""`pgbackup basebackup` against pgBackRest, side by side in one run, on one cluster.

    .venv/bin/python bench/basebackup_bench.py             # the ~1.5 GB-dump database
    .venv/bin/python bench/basebackup_bench.py --scale 0.1

pgBackRest runs as configured in the issue: Debian's package, compress-type=zst,
compress-level=3, repo1-cipher-type=aes-256-cbc, process-max=2, start-fast. Also timed:
the plain pipeline `pg_basebackup -Ft -D - | zstd -T2 -3 | openssl enc -aes-256-ctr`.
Restores go into a new empty folder. pgbackup's restore includes pg_verifybackup: by
default its structural check (-s: files, sizes, WAL), and once more with
--verify-checksums, which reads every restored file back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from common import (
    describe_machine,
    log,
    measure,
    parse_arguments,
    pgbackup,
    run_record,
    save_results,
    size_of,
)
from dataset import start_bench_cluster
from pgbackup import crypto
from pgcluster import PG_BIN

STANZA = "bench"


def as_postgres(command: str) -> str:
    return f"runuser -u postgres -- {command}" if os.geteuid() == 0 else command


def postgres_folder(parent: str, name: str) -> str:
    path = os.path.join(parent, name)
    os.makedirs(path, mode=0o700)
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")
    return path


def run(args) -> dict:
    work = os.path.abspath(args.workdir)
    out = tempfile.mkdtemp(prefix="base-", dir=os.makedirs(work, exist_ok=True) or work)
    os.chmod(out, 0o755)  # noqa: S103 - pgBackRest runs as postgres and must reach its folders
    conf = os.path.join(out, "pgbackrest.conf")
    cluster = start_bench_cluster(
        work,
        args.scale[0],
        settings={
            "archive_mode": "on",
            "archive_command": f"'pgbackrest --config={conf} --stanza={STANZA} archive-push %p'",
        },
    )
    try:
        repo = postgres_folder(out, "repo")
        spool = postgres_folder(out, "spool")
        with open(conf, "w") as handle:
            handle.write(
                f"[global]\nrepo1-path={repo}\nrepo1-cipher-type=aes-256-cbc\n"
                f"repo1-cipher-pass={os.urandom(24).hex()}\ncompress-type=zst\ncompress-level=3\n"
                f"process-max=2\nstart-fast=y\nlog-level-console=warn\nlog-level-file=off\n"
                f"lock-path={spool}\nspool-path={spool}\n\n"
                f"[{STANZA}]\npg1-path={cluster.data}\npg1-port={cluster.port}\npg1-socket-path={cluster.socket_dir}\n"
                f"pg1-user=postgres\n"
            )
        # pgBackRest logs in over the socket as postgres; scram needs a passfile it can read.
        passfile = os.path.join(spool, "pgpass")
        with open(passfile, "w") as handle:
            handle.write(f"*:*:*:postgres:{cluster.password}\n")
        os.chmod(passfile, 0o600)
        if os.geteuid() == 0:
            for path in (conf, passfile):
                shutil.chown(path, "postgres", "postgres")
        pgbackrest = as_postgres(f"env PGPASSFILE={passfile} pgbackrest --config={conf} --stanza={STANZA}")
        subprocess.run(f"{pgbackrest} stanza-create", shell=True, check=True)

        key_file = os.path.join(out, "bench.key")
        crypto.generate_key_pair(key_file)
        passphrase = os.path.join(out, "passphrase")
        with open(passphrase, "w") as handle:
            handle.write(os.urandom(32).hex())
        data_bytes = size_of(cluster.data)
        log(f"cluster data directory: {data_bytes / 1e9:.2f} GB")

        results = {}
        results["pgbackrest"] = measure(
            "pgBackRest backup --type=full", f"{pgbackrest} backup --type=full", out
        )
        # The size of the newest backup in the repository, not of every repeat.
        info = json.loads(
            subprocess.run(
                f"{pgbackrest} info --output=json", shell=True, check=True, capture_output=True, text=True
            ).stdout
        )
        results["pgbackrest"]["output_bytes"] = info[0]["backup"][-1]["info"]["repository"]["delta"]
        results["c_pipeline"] = measure(
            "pg_basebackup -Ft -D - | zstd -T2 -3 | openssl aes-256-ctr",
            f"{PG_BIN}/pg_basebackup --no-password -D - -Ft -X fetch --checkpoint=fast | zstd -q -T2 -3"
            f" | openssl enc -aes-256-ctr -pbkdf2 -pass file:{passphrase} -out {out}/base.tar.zst.enc",
            out,
        )
        results["c_pipeline"]["output_bytes"] = size_of(f"{out}/base.tar.zst.enc")
        dest = os.path.join(out, "sets")
        results["pgbackup"] = measure(
            "pgbackup basebackup",
            pgbackup("basebackup", "--dest", dest, "--recipient", f"{key_file}.pub"),
            out,
            reset=f"rm -rf {dest}",
        )
        results["pgbackup"]["output_bytes"] = size_of(dest)

        restored = os.path.join(out, "restore-pgbackrest")
        results["pgbackrest_restore"] = measure(
            "pgBackRest restore",
            f"{pgbackrest} --pg1-path={restored} restore",
            out,
            reset=f"rm -rf {restored} && mkdir -m 0700 {restored} && chown postgres: {restored}",
        )
        shutil.rmtree(restored)
        set_path = os.path.join(dest, sorted(os.listdir(dest))[0])
        restore_base = pgbackup(
            "restore-base", set_path, "--key-file", key_file, "--target-dir", f"{out}/restore-pgbackup"
        )
        results["pgbackup_restore"] = measure(
            "pgbackup restore-base (pg_verifybackup -s)",
            restore_base,
            out,
            reset=f"rm -rf {out}/restore-pgbackup",
        )
        results["pgbackup_restore_checksums"] = measure(
            "pgbackup restore-base --verify-checksums",
            f"{restore_base} --verify-checksums",
            out,
            reset=f"rm -rf {out}/restore-pgbackup",
        )
        shutil.rmtree(f"{out}/restore-pgbackup")
        results["c_restore"] = measure(
            "openssl -d | zstd -d | tar -x",
            f"mkdir {out}/restore-c && openssl enc -d -aes-256-ctr -pbkdf2 -pass file:{passphrase}"
            f" -in {out}/base.tar.zst.enc | zstd -q -d | tar -x -C {out}/restore-c",
            out,
            reset=f"rm -rf {out}/restore-c",
        )
    finally:
        cluster.stop(remove=False)
        shutil.rmtree(out, ignore_errors=True)

    ratios = {
        "pgbackup backup / pgBackRest backup": results["pgbackup"]["wall_s"]
        / results["pgbackrest"]["wall_s"],
        "pgbackup restore / pgBackRest restore": results["pgbackup_restore"]["wall_s"]
        / results["pgbackrest_restore"]["wall_s"],
        "pgbackup backup / C pipeline": results["pgbackup"]["wall_s"] / results["c_pipeline"]["wall_s"],
    }
    return run_record(args.scale[0], data_directory_bytes=data_bytes, results=results, ratios=ratios)


def report(data: dict):
    print()
    print(describe_machine(data))
    print(f"cluster: {data['data_directory_bytes'] / 1e9:.2f} GB data directory")
    print(f"{'case':52} {'wall s':>8} {'output MB':>10} {'peak RSS MB':>12}")
    for result in data["results"].values():
        size = f"{result['output_bytes'] / 1e6:.0f}" if result.get("output_bytes") else "-"
        print(f"{result['name']:52} {result['wall_s']:8.1f} {size:>10} {result['peak_rss_mb']:12.0f}")
    print()
    for name, value in data["ratios"].items():
        print(f"{name:42} {value:6.2f}x")


def main():
    data = run(parse_arguments(__doc__))
    report(data)
    save_results("basebackup", data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
