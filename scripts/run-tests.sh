#!/usr/bin/env bash
# Every test, from nothing: host packages, venv, Docker daemon, test image, then the
# lint, unit and molecule stages. Prints each stage with its time; stops at the first
# failure; stops the Docker daemon at the end if this run started it.
set -uo pipefail
cd "$(dirname "$0")/.."

trap 'scripts/dockerd.sh stop' EXIT

mkdir -p .cache
# Output goes through a pipe (tee): pytest would cut its summary lines at 80 columns,
# and Python would hold back prints until a buffer fills.
export COLUMNS=200 PYTHONUNBUFFERED=1

# Each stage's output also goes to .cache/<stage>.log. After a failure, the lines that
# say why (pytest's failed tests and their assertions, Ansible's fatal tasks) are
# repeated last, where a CI system that keeps only the tail still shows them.
run_stage() {
    local name="$1"; shift
    local start=$SECONDS log=".cache/$name.log"
    echo "==== stage: $name"
    if "$@" 2>&1 | tee "$log"; then
        echo "==== stage: $name passed in $((SECONDS - start)) s"
    else
        echo "==== stage: $name FAILED after $((SECONDS - start)) s; why, from $log:"
        sed 's/\x1b\[[0-9;]*m//g' "$log" \
            | grep -E -A2 '(^|│ *)(FAILED|ERROR)( *$| [^-])|(^|│ )E {3}|\.py:[0-9]+: [A-Za-z]*(Error|Exception)|fatal: \[' \
            | grep -v -x -e '--' | tail -n 24 | cut -c1-400
        exit 1
    fi
}

total=$SECONDS
run_stage prepare  make -s prepare
run_stage lint     make -s lint
run_stage unit     make -s unit
run_stage molecule make -s molecule
echo "==== all stages passed in $((SECONDS - total)) s"
