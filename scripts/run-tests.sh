#!/usr/bin/env bash
# Every test, from nothing: host packages, venv, Docker daemon, test image, then the
# lint, unit and molecule stages. Prints each stage with its time; stops at the first
# failure; stops the Docker daemon at the end if this run started it.
set -uo pipefail
cd "$(dirname "$0")/.."

trap 'scripts/dockerd.sh stop' EXIT

run_stage() {
    local name="$1"; shift
    local start=$SECONDS
    echo "==== stage: $name"
    if "$@"; then
        echo "==== stage: $name passed in $((SECONDS - start)) s"
    else
        echo "==== stage: $name FAILED after $((SECONDS - start)) s"
        exit 1
    fi
}

total=$SECONDS
run_stage prepare  make -s prepare
run_stage lint     make -s lint
run_stage unit     make -s unit
run_stage molecule make -s molecule
echo "==== all stages passed in $((SECONDS - total)) s"
