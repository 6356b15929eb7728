"""What the benchmarks share: the test cluster, timing under GNU time, machine facts."""

from __future__ import annotations

import argparse
import compileall
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

import psycopg

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "module_utils"))

DB = "streaming"


def log(message: str):
    print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


# How many times each case runs; the median wall time is reported. Set by --repeat.
REPEAT = 1


def _timed_run(shell: str, workdir: str, reset: str) -> tuple[float, int]:
    """One run under GNU time, after `reset`, a checkpoint and `sync` (untimed): wall
    seconds and the largest single process's RSS in KiB."""
    timing = os.path.join(workdir, "time.out")
    if reset:
        subprocess.run(["bash", "-c", reset], check=True)
    # Each run starts with no dirty pages of the one before still being written back:
    # neither the server's (a checkpoint the last run's WAL left due would land in this
    # one) nor the kernel's.
    if "PGHOST" in os.environ:
        with psycopg.connect(dbname="postgres", autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    subprocess.run(["sync"], check=True)
    subprocess.run(
        ["/usr/bin/time", "-f", "%e %M", "-o", timing, "bash", "-o", "pipefail", "-c", shell],
        check=True,
        env=os.environ,
    )
    with open(timing) as handle:
        wall, rss_kb = handle.read().split()[-2:]
    return float(wall), int(rss_kb)


def _result(name: str, walls: list[float], peak_kb: int) -> dict:
    result = {
        "name": name,
        "wall_s": statistics.median(walls),
        "runs_s": walls,
        "peak_rss_mb": peak_kb / 1024,
    }
    log(
        f"{name}: {result['wall_s']:.1f} s (runs: {', '.join(f'{w:.1f}' for w in walls)}), "
        f"peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    return result


def measure(name: str, shell: str, workdir: str, reset: str = "") -> dict:
    """Run a shell command REPEAT times: the median wall seconds and the largest single
    process's RSS. `reset`, if given, runs untimed before each run, and so does `sync`."""
    runs = [_timed_run(shell, workdir, reset) for _ in range(REPEAT)]
    return _result(name, [wall for wall, _ in runs], max(rss for _, rss in runs))


def measure_alternating(cases: list[tuple[str, str, str]], workdir: str) -> list[dict]:
    """Cases (name, shell, reset) run in turns, REPEAT rounds, the order reversed every
    other round (A B, B A, A B, ...): the machine's drift (page cache, writeback, other
    load) falls on each alike, which comparing two nearly equal cases needs."""
    walls: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    peaks = dict.fromkeys(walls, 0)
    for round_number in range(REPEAT):
        for name, shell, reset in cases if round_number % 2 == 0 else reversed(cases):
            wall, rss = _timed_run(shell, workdir, reset)
            walls[name].append(wall)
            peaks[name] = max(peaks[name], rss)
    return [_result(name, walls[name], peaks[name]) for name, _, _ in cases]


def size_of(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


def pgbackup(*args: str) -> str:
    """The pgbackup CLI as a shell command, run from this checkout."""
    return f"PYTHONPATH={ROOT}/module_utils {sys.executable} -m pgbackup {' '.join(args)}"


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


def _scales(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def parse_arguments(description: str, add_options=None) -> argparse.Namespace:
    """The options every benchmark takes, and a benchmark's own (add_options(parser));
    sets REPEAT from --repeat."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if add_options is not None:
        add_options(parser)
    parser.add_argument(
        "--scale",
        type=_scales,
        default=[1.0],
        help="1.0 is about 1.5 GB of dump data; several, comma-separated, run one after another",
    )
    parser.add_argument("--workdir", default="/var/tmp/pgbackup-bench", help="cluster and scratch space")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case; the median is reported")
    args = parser.parse_args()
    global REPEAT  # noqa: PLW0603 - one setting for the whole run, read by measure()
    REPEAT = args.repeat
    _compile_like_hosts()
    return args


def _compile_like_hosts():
    """pgbackup's bytecode written once, and read by every timed run, as on a host (the
    backup role compiles it in its handler): a shell that sets PYTHONDONTWRITEBYTECODE
    would otherwise have each run compile every module again (about 0.05 s a run)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(os.path.join(ROOT, "module_utils", "pgbackup"), quiet=1)


def run_record(scale: float, **figures) -> dict:
    """What a run saves: when, on which machine, at which scale, and its figures."""
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "scale": scale,
        **figures,
    }


def describe_machine(data: dict) -> str:
    facts = data["machine"]
    return f"machine: {facts['cpu']}, {facts['cores']} cores, {facts['memory_gb']} GB"


def save_results(kind: str, data: dict) -> str:
    """Keep a run's figures in bench/results/ (not committed) and say where."""
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"{kind}-{data['when'].replace(':', '')}.json")
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)
    print(f"saved {path}")
    return path
