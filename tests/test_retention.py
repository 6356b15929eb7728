"""list and prune: ordered by the backup time in the manifests, and never too eager."""

from __future__ import annotations

import datetime
import json
import os
import time

import pytest
from conftest import run_cli
from pgbackup import backup, manifest, retention
from pgbackup.fsutil import hold

NOW = manifest.utc_now()


def make_set(dest, recipients, days_old: float, name: str | None = None, kind: str = "logical") -> str:
    """A real (globals-only) set whose sealed manifest says it is of `kind` and was taken
    days_old ago, under the matching folder name."""
    path = backup.create_backup_set(str(dest), recipients, databases=[])["path"]
    with open(os.path.join(path, "manifest.json")) as handle:
        record = json.load(handle)
    started = NOW - datetime.timedelta(days=days_old)
    final = os.path.join(str(dest), name or manifest.set_name(kind, started))
    record.update(
        kind=kind,
        name=os.path.basename(final),
        started_at=manifest.iso(started),
        finished_at=manifest.iso(started + datetime.timedelta(minutes=1)),
    )
    record.pop("mac")
    record.pop("seal")
    with open(os.path.join(path, "manifest.json"), "w") as handle:
        json.dump(manifest.seal(record, recipients), handle)
    os.rename(path, final)
    return os.path.basename(final)


@pytest.fixture
def dest(tmp_path, cluster):
    path = tmp_path / "backups"
    path.mkdir()
    return path


def names(dest):
    return sorted(entry["name"] for entry in retention.scan(str(dest)) if entry["status"] == "complete")


def test_keeps_young_sets_and_removes_old_ones(dest, recipients):
    young = [make_set(dest, recipients, days) for days in (0.1, 5, 29)]
    old = [make_set(dest, recipients, days) for days in (31, 45, 90)]
    report = retention.prune(str(dest), keep_days=30, min_keep=2, now=NOW)
    assert sorted(report["removed"]) == sorted(old)
    assert names(dest) == sorted(young)


def test_never_leaves_fewer_than_min_keep(dest, recipients):
    sets = [make_set(dest, recipients, days) for days in (40, 50, 60, 70)]
    report = retention.prune(str(dest), keep_days=30, min_keep=3, now=NOW)
    assert report["removed"] == [sets[3]]
    assert names(dest) == sorted(sets[:3])


def test_never_deletes_the_newest_set_even_when_everything_is_old(dest, recipients):
    sets = [make_set(dest, recipients, days) for days in (100, 200)]
    retention.prune(str(dest), keep_days=0, min_keep=1, now=NOW)
    assert names(dest) == [sets[0]]


def test_orders_by_manifest_time_not_by_folder_name(dest, recipients):
    # The folder name claims 2099, the manifest says 60 days ago: the manifest wins.
    misnamed_old = make_set(dest, recipients, 60, name="logical-20990101T000000Z")
    misnamed_new = make_set(dest, recipients, 1, name="logical-20000101T000000Z")
    listed = retention.scan(str(dest))
    assert [entry["name"] for entry in listed] == [misnamed_new, misnamed_old]
    assert retention.latest_complete(listed)["name"] == misnamed_new
    report = retention.prune(str(dest), keep_days=30, min_keep=1, now=NOW)
    assert report["removed"] == [misnamed_old]


def test_a_set_being_read_is_not_deleted(dest, recipients):
    keep = make_set(dest, recipients, 1)
    busy = make_set(dest, recipients, 90)
    with hold(os.path.join(str(dest), busy), exclusive=False, wait=True, what="test reader"):
        report = retention.prune(str(dest), keep_days=30, min_keep=1, now=NOW)
    assert report["held"] == [busy]
    assert names(dest) == sorted([keep, busy])
    assert retention.prune(str(dest), keep_days=30, min_keep=1, now=NOW)["removed"] == [busy]


def test_leftovers_of_interrupted_runs_go_after_a_day(dest, recipients):
    make_set(dest, recipients, 1)
    stale, fresh, running = (dest / f".partial-logical-2026010{n}T000000Z" for n in (1, 2, 3))
    for path in (stale, fresh, running):
        path.mkdir()
        (path / "globals.sql.enc.tmp").write_bytes(b"x")
    two_days_ago = time.time() - 2 * 86400
    os.utime(stale, (two_days_ago, two_days_ago))
    os.utime(running, (two_days_ago, two_days_ago))
    with hold(str(running), exclusive=True, wait=False, what="a running backup"):
        os.utime(running, (two_days_ago, two_days_ago))
        report = retention.prune(str(dest), keep_days=30, min_keep=1, now=NOW)
    assert report["leftovers_removed"] == [stale.name]
    assert not stale.exists() and fresh.exists() and running.exists()


def test_invalid_sets_are_reported_and_left_alone(dest, recipients):
    make_set(dest, recipients, 1)
    broken = dest / "logical-20200101T000000Z"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    report = retention.prune(str(dest), keep_days=0, min_keep=1, now=NOW)
    assert report["invalid"] == [broken.name]
    assert broken.exists()
    statuses = {entry["name"]: entry["status"] for entry in retention.scan(str(dest))}
    assert statuses[broken.name] == "invalid"


def test_dry_run_deletes_nothing(dest, recipients):
    sets = [make_set(dest, recipients, days) for days in (1, 90)]
    report = retention.prune(str(dest), keep_days=30, min_keep=1, dry_run=True, now=NOW)
    assert report["removed"] == [sets[1]]
    assert names(dest) == sorted(sets)


def test_cli_list_and_prune(dest, recipients):
    young, old = make_set(dest, recipients, 2), make_set(dest, recipients, 45)
    listed = json.loads(run_cli("list", "--dest", str(dest), "--json", check=True).stdout)
    assert [entry["name"] for entry in listed] == [young, old]
    dry = run_cli(
        "prune", "--dest", str(dest), "--keep-days", "30", "--min-keep", "1", "--dry-run", check=True
    )
    assert dry.stdout.startswith(f"would remove: {old}")
    assert names(dest) == sorted([young, old])
    done = json.loads(
        run_cli(
            "prune", "--dest", str(dest), "--keep-days", "30", "--min-keep", "1", "--json", check=True
        ).stdout
    )
    assert done["removed"] == [old]
    assert names(dest) == [young]


def test_prune_of_a_missing_directory_fails_clearly(tmp_path):
    result = run_cli("prune", "--dest", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert result.stderr == f"pgbackup: error: backup directory {tmp_path / 'nowhere'} does not exist\n"


@pytest.fixture
def mixed(dest, recipients):
    """Logical and physical sets of many ages, side by side as on a host."""
    ages = (1, 6, 13, 20, 27, 29.5, 31, 35, 45, 60, 90)
    return {
        kind: {age: make_set(dest, recipients, age, kind=kind) for age in ages}
        for kind in ("logical", "physical")
    }


def check_kind_pruned(dest, mixed, kind, keep_days, min_keep, removed, before):
    """Exactly the sets of `kind` past keep_days went (never leaving fewer than min_keep),
    and nothing of the other kind."""
    by_age = sorted(mixed[kind].items())
    expected = sorted(
        name for position, (age, name) in enumerate(by_age) if age > keep_days and position >= min_keep
    )
    assert sorted(removed) == expected
    assert set(names(dest)) == set(before) - set(expected), f"pruning {kind} sets touched other sets"


def cli_prune(dest, kind, keep_days, min_keep) -> dict:
    argv = [
        "prune",
        "--dest",
        str(dest),
        "--kind",
        kind,
        "--keep-days",
        str(keep_days),
        "--min-keep",
        str(min_keep),
    ]
    return json.loads(run_cli(*argv, "--json", check=True).stdout)


def test_cli_prune_applies_each_kind_policy_to_that_kind_only(dest, mixed):
    """The weekly physical run's policy (28 days, keep 2) must never reach the dumps."""
    before = names(dest)
    physical = cli_prune(dest, "physical", 28, 2)
    check_kind_pruned(dest, mixed, "physical", 28, 2, physical["removed"], before)
    before = names(dest)
    logical = cli_prune(dest, "logical", 30, 7)
    check_kind_pruned(dest, mixed, "logical", 30, 7, logical["removed"], before)
    assert mixed["logical"][29.5] in names(dest), "a 29.5-day-old dump is inside 30 days"


def test_module_prune_applies_each_kind_policy_to_that_kind_only(dest, mixed):
    from test_modules import ansible

    args = {"dest": str(dest), "kind": "physical", "keep_days": 28, "min_keep": 2}
    before = names(dest)
    planned, _ = ansible("backup_retention", args, check=True)
    assert len(names(dest)) == 22, "check mode deleted something"
    pruned, _ = ansible("backup_retention", args)
    assert not pruned.get("failed"), pruned
    assert sorted(pruned["removed"]) == sorted(planned["removed"])
    check_kind_pruned(dest, mixed, "physical", 28, 2, pruned["removed"], before)
    before = names(dest)
    logical, _ = ansible(
        "backup_retention", {"dest": str(dest), "kind": "logical", "keep_days": 30, "min_keep": 3}
    )
    check_kind_pruned(dest, mixed, "logical", 30, 3, logical["removed"], before)
