#!/usr/bin/env bash
# start: start dockerd detached when no daemon answers, and remember that we did.
# stop:  stop the daemon only if `start` started it.
set -euo pipefail

state_dir="${PGBACKUP_CACHE:-$(cd "$(dirname "$0")/.." && pwd)/.cache}"
pid_file="$state_dir/dockerd.pid"
log_file="$state_dir/dockerd.log"
mkdir -p "$state_dir"

case "${1:-}" in
start)
    if docker info >/dev/null 2>&1; then
        exit 0
    fi
    echo "dockerd: starting (log: $log_file)"
    setsid dockerd >"$log_file" 2>&1 </dev/null &
    echo $! >"$pid_file"
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && exit 0
        sleep 1
    done
    echo "dockerd: no answer after 60 s; last lines of $log_file:" >&2
    tail -n 20 "$log_file" >&2
    exit 1
    ;;
stop)
    [ -f "$pid_file" ] || exit 0
    pid="$(cat "$pid_file")"
    rm -f "$pid_file"
    if kill -0 "$pid" 2>/dev/null; then
        echo "dockerd: stopping the daemon this run started (pid $pid)"
        kill "$pid"
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
