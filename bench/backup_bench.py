#!/usr/bin/env python3
"""pgbackup against the peer tools, side by side in one run, on one database.

    make bench                                            # 1.5 GB of dump data, generated once
    .venv/bin/python bench/backup_bench.py --scale 0.1,1,3   # how time grows with size
    .venv/bin/python bench/backup_bench.py --scale 0.1       # a quick look

The database looks like a streaming service's: users, subscriptions and watch
history, with uuids, timestamps, random text and jsonb (pgbench's tables compress
about 40x and would hide the cost of compression). It is generated once per scale
into a cluster under --workdir and reused by later runs.

Backups compared: `pgbackup backup` (custom format, and directory format with 2
jobs), `pg_dump -Fc`, `pg_dump -Fc | gpg --symmetric --cipher-algo AES256`, the
plain C pipeline `pg_dump -Fc -Z0 | zstd -T2 -3 | openssl enc -aes-256-ctr`, and
`pg_dump -Fc -Z0 > /dev/null` (pg_dump's own floor). Restores: `pgbackup restore
--jobs 2` of the custom and of the directory set (decrypting into pg_restore's
pipes, every byte authenticated) against `pg_restore -j 2` of the unencrypted
`pg_dump -Fc` file. Peak RSS is that of the largest single process. Every case
runs after `sync`, --repeat times; the median is reported.

--format-versions adds format version 1 (one symmetric key, kept readable) beside
version 2 (public keys, what hosts write), run in turns: the key wrap is once per
file, so the two should not differ beyond noise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from common import (
    DB,
    ROOT,
    describe_machine,
    measure,
    measure_alternating,
    parse_arguments,
    pgbackup,
    run_record,
    save_results,
    size_of,
)
from dataset import drop, row_counts, start_bench_cluster
from pgbackup import crypto
from pgcluster import PG_BIN


def run(args, scale: float) -> dict:
    workdir = args.workdir
    cluster = start_bench_cluster(workdir, scale)
    out = tempfile.mkdtemp(prefix="run-", dir=workdir)
    try:
        key_file = os.path.join(out, "bench.key")
        crypto.generate_key_pair(key_file)
        version1_key_file = os.path.join(out, "bench-v1.key")
        with open(os.open(version1_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
            handle.write(os.urandom(crypto.KEY_BYTES).hex() + "\n")
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

        def backup_case(label, shell, output, reset=""):
            result = measure(label, shell, out, reset=reset)
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
        directory = os.path.join(out, "sets-directory")
        results["pgbackup_directory"] = backup_case(
            "pgbackup backup (directory, 2 jobs)",
            pgbackup(
                "backup",
                "--dest",
                directory,
                "--recipient",
                f"{key_file}.pub",
                "--database",
                DB,
                "--format directory --jobs 2",
            ),
            directory,
            reset=f"rm -rf {directory}",
        )
        # Format version 2 (what hosts write) against version 1, in turns: they differ by
        # one key wrap per file, so only alternating runs can tell them apart from drift.
        # Version 1 sets are no longer written by the CLI: the core call, as it was.
        custom, version1 = os.path.join(out, "sets-custom"), os.path.join(out, "sets-v1")
        format_cases = [
            (
                "pgbackup backup (custom)",
                pgbackup("backup", "--dest", custom, "--recipient", f"{key_file}.pub", "--database", DB),
                f"rm -rf {custom}",
            ),
        ]
        if args.format_versions:
            format_cases.append(
                (
                    "pgbackup backup (custom, format version 1)",
                    f"PYTHONPATH={ROOT}/module_utils {sys.executable} -c "
                    "'import sys; from pgbackup import backup, crypto; "
                    "backup.create_backup_set(sys.argv[1], crypto.load_key(sys.argv[2]), databases=[sys.argv[3]])' "
                    f"{version1} {version1_key_file} {DB}",
                    f"rm -rf {version1}",
                )
            )
        for label, result, dest in zip(
            ("pgbackup_custom", "pgbackup_custom_v1"),
            measure_alternating(format_cases, out),
            (custom, version1),
            strict=False,
        ):
            results[label] = result | {"output_bytes": size_of(dest)}

        source_counts = row_counts(DB)
        restored_ok = measure_restores(args, out, key_file, version1_key_file, results, source_counts)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        cluster.stop(remove=False)

    for result in results.values():
        result["mb_per_s"] = plain_bytes / 1e6 / result["wall_s"]

    def ratio(case, reference):
        return results[case]["wall_s"] / results[reference]["wall_s"]

    ratios = {
        "pgbackup_custom / pg_dump -Fc": ratio("pgbackup_custom", "pg_dump"),
        "pgbackup_custom / C pipeline": ratio("pgbackup_custom", "c_pipeline"),
        "pgbackup_directory / C pipeline": ratio("pgbackup_directory", "c_pipeline"),
        "pgbackup_custom size / pg_dump -Fc size": results["pgbackup_custom"]["output_bytes"]
        / results["pg_dump"]["output_bytes"],
        "pgbackup restore (custom) / pg_restore -j 2": ratio("pgbackup_restore", "pg_restore"),
        "pgbackup restore (directory) / pg_restore -j 2": ratio("pgbackup_restore_directory", "pg_restore"),
    }
    if args.format_versions:
        # The same set of data written and read in both formats, in this one run.
        ratios["format v2 / v1 backup"] = ratio("pgbackup_custom", "pgbackup_custom_v1")
        ratios["format v2 / v1 restore"] = ratio("pgbackup_restore", "pgbackup_restore_v1")
    return run_record(
        scale,
        dump_bytes_uncompressed=plain_bytes,
        source_rows=source_counts,
        restore_rows_match=restored_ok,
        results=results,
        ratios=ratios,
    )


def measure_restores(args, out, key_file, version1_key_file, results, source_counts) -> bool:
    """pg_restore of the plain dump, then pgbackup restore of each set, in turns; whether
    the last restore holds the source's rows."""
    drop("restore_pg", "restore_pgbackup")
    results["pg_restore"] = measure(
        "pg_restore -j 2 (unencrypted pg_dump -Fc)",
        f"{PG_BIN}/createdb -T template0 restore_pg && {PG_BIN}/pg_restore --no-password -j 2"
        f" -d restore_pg {out}/plain.dump",
        out,
        reset=f"{PG_BIN}/dropdb --if-exists restore_pg",
    )

    def first_set(folder):
        return os.path.join(out, folder, sorted(os.listdir(os.path.join(out, folder)))[0])

    def restore_case(label, set_path, key):
        return (
            f"pgbackup restore --jobs 2 ({label})",
            pgbackup(
                "restore",
                set_path,
                "--key-file",
                key,
                "--database",
                DB,
                "--target-db",
                "restore_pgbackup",
                "--jobs",
                "2",
            ),
            f"{PG_BIN}/dropdb --if-exists restore_pgbackup",
        )

    restores = [
        restore_case("custom set", first_set("sets-custom"), key_file),
        restore_case("directory set", first_set("sets-directory"), key_file),
    ]
    if args.format_versions:
        restores.append(restore_case("custom set, format version 1", first_set("sets-v1"), version1_key_file))
    for label, result in zip(
        ("pgbackup_restore", "pgbackup_restore_directory", "pgbackup_restore_v1"),
        measure_alternating(restores, out),
        strict=False,
    ):
        results[label] = result
    # The last restore of the turns: each set restores the same rows.
    restored_ok = row_counts("restore_pgbackup") == source_counts
    drop("restore_pg", "restore_pgbackup")
    return restored_ok


def report(data: dict):
    print()
    print(describe_machine(data))
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
    args = parse_arguments(
        __doc__,
        lambda parser: parser.add_argument(
            "--format-versions", action="store_true", help="format version 1 beside 2, in turns"
        ),
    )
    runs = []
    for scale in args.scale:
        data = run(args, scale)
        report(data)
        save_results("backup", data)
        runs.append(data)
    if len(runs) > 1:
        print()
        print(f"{'scale':>6} {'dump GB':>8} " + " ".join(f"{name[:34]:>34}" for name in runs[0]["ratios"]))
        for data in runs:
            print(
                f"{data['scale']:6g} {data['dump_bytes_uncompressed'] / 1e9:8.2f} "
                + " ".join(f"{value:33.2f}x" for value in data["ratios"].values())
            )
    return 0 if all(data["restore_rows_match"] for data in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
