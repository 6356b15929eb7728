"""What the scenarios' tests share: SQL on a lab host, and playbooks run from the
controller as an operator runs them. Tests import it with
sys.path.insert(0, <molecule/_shared>)."""

import json
import os
import re
import subprocess
import sys
import time

import yaml

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# cron's environment: a bare PATH, no terminal.
AS_CRON = (
    "runuser -u postgres -- env -i PATH=/usr/bin:/bin HOME=/var/lib/postgresql SHELL=/bin/sh LOGNAME=postgres"
)


def lab_variable(name):
    """A variable of the lab inventory's group_vars (the lab's throwaway secrets)."""
    with open(os.path.join(REPOSITORY, "inventories", "lab", "group_vars", "all", "main.yml")) as file:
        return yaml.safe_load(file)[name]


def wait_for(check, seconds, what):
    """Poll check() every second until it returns something true (returned), at most
    `seconds`; then fail naming what did not happen and the last thing check() said.
    A check that fails (a command that timed out while a cluster changes) is tried
    again, as one that returned nothing is."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < seconds:
        try:
            value = check()
        except (AssertionError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            value, last = None, f"{type(error).__name__}: {error}"
        else:
            last = repr(value)
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"{what}: not within {seconds} s; last: {last[:2000] if last else None}")


def psql(host, query, db="postgres"):
    """One query as the postgres user over the local socket; its output, trimmed."""
    result = host.run("runuser -u postgres -- psql -XAtq -v ON_ERROR_STOP=1 -d %s -c %s", db, query)
    assert result.rc == 0, f"{host.backend.get_hostname()}: {query}: {result.stderr}"
    return result.stdout.strip()


class Done:
    """A finished ansible-playbook: its exit code, its output on one line (results are
    printed as JSON, whose long messages stay whole), and its recap's counts."""

    def __init__(self, completed: subprocess.CompletedProcess):
        self.returncode = completed.returncode
        self.output = " ".join((completed.stdout + completed.stderr).split())

    def slowest(self, count=5) -> list[str]:
        """The slowest tasks, as ansible.posix.profile_tasks timed them ("name: 12.3s")."""
        timed = re.findall(r"(\S[^=]*?) -{3,} (\d+\.\d+)s", self.output.split("=" * 20)[-1])
        ranked = sorted(timed, key=lambda item: float(item[1]), reverse=True)[:count]
        return [f"{name.strip(' =')}: {seconds}s" for name, seconds in ranked]

    def changed(self) -> int:
        """Tasks reported changed, summed over the hosts of the recap."""
        return sum(int(part.split("=")[1]) for part in self.output.split() if part.startswith("changed="))


def playbook(path, *extra, limit=None, timeout=900, variables=None) -> Done:
    """ansible-playbook on the scenario's inventory; path is relative to the repository."""
    command = [
        os.path.join(os.path.dirname(sys.executable), "ansible-playbook"),
        "-i",
        os.environ["MOLECULE_INVENTORY_FILE"],
        os.path.join(REPOSITORY, path),
    ]
    if limit:
        command += ["--limit", limit]
    if variables:
        command += ["-e", json.dumps(variables)]
    completed = subprocess.run(  # noqa: PLW1510 - callers check the exit code
        [*command, *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPOSITORY,
        env={
            **os.environ,
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
            "ANSIBLE_NOCOLOR": "1",
            # Each task's time, for the tests that report where a restore spends it.
            "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
            "PROFILE_TASKS_TASK_OUTPUT_LIMIT": "all",
        },
    )
    return Done(completed)
