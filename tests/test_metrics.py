"""The metrics files, read back with Prometheus's own text-format parser (the official
client's): names, labels, escaping, what a failure keeps, the recovery window, the
drill's record. The scheduled runs that write them are tested in test_run.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat

import pytest
from conftest import run_cli
from pgbackup import metrics
from prometheus_client.parser import text_string_to_metric_families

DAY = 86400


def parsed(path) -> dict:
    """{(name, frozenset(labels)): value}, and every family's HELP as FAMILIES says it."""
    values = {}
    for family in text_string_to_metric_families(open(path, encoding="utf-8").read()):
        assert family.documentation == metrics.FAMILIES[family.name], family.name
        assert family.type == "gauge"
        for sample in family.samples:
            values[sample.name, frozenset(sample.labels.items())] = sample.value
    return values


def labels(**given):
    return frozenset(given.items())


def test_a_label_value_cannot_break_out_of_its_series(tmp_path):
    hostile = 'x"} 1\npgbackup_sets{kind="forged'
    written = metrics.MetricsFile(str(tmp_path), "logical")
    written.set("pgbackup_sets", 3, kind=hostile)
    written.write()
    assert parsed(written.path) == {("pgbackup_sets", labels(kind=hostile)): 3}
    assert metrics.MetricsFile(str(tmp_path), "logical").load().get("pgbackup_sets", kind=hostile) == 3


def test_only_known_families_are_written_or_read_back(tmp_path):
    with pytest.raises(ValueError, match="not a pgbackup metric"):
        metrics.series("pgbackup_made_up")
    path = tmp_path / "pgbackup_wal.prom"
    path.write_text(
        "# HELP pgbackup_wal_last_run_status old\npgbackup_wal_last_run_status 0\ngarbage line\n"
        "pgbackup_wal_archive_files 12\npgbackup_wal_archive_files{broken 3\n"
    )
    loaded = metrics.MetricsFile(str(tmp_path), "wal").load()
    assert loaded.values == {"pgbackup_wal_archive_files": 12}


def test_a_failed_run_keeps_the_last_success_and_says_when_it_tried(tmp_path):
    folder = str(tmp_path)
    metrics.record_run(folder, "logical", 0, 12.5, {"local": 0, "offsite": 0}, set_bytes=100, now=1000)
    metrics.record_run(folder, "logical", 1, 3.25, {"local": 0, "offsite": 1}, now=2000)
    values = parsed(tmp_path / "pgbackup_logical.prom")
    assert values["pgbackup_last_run_status", labels(kind="logical")] == 1
    assert values["pgbackup_last_run_timestamp_seconds", labels(kind="logical")] == 2000
    assert values["pgbackup_last_run_duration_seconds", labels(kind="logical")] == 3.25
    success = "pgbackup_last_success_timestamp_seconds"
    assert values[success, labels(kind="logical", repository="local")] == 2000
    assert values[success, labels(kind="logical", repository="offsite")] == 1000
    assert values["pgbackup_last_status", labels(kind="logical", repository="offsite")] == 1
    assert (
        values["pgbackup_last_attempt_timestamp_seconds", labels(kind="logical", repository="offsite")]
        == 2000
    )
    assert values["pgbackup_last_set_size_bytes", labels(kind="logical")] == 100, "kept: no set made"


def test_a_repository_that_never_succeeded_shows_as_never(tmp_path):
    """Present from the first failed attempt, as 0, so an age alert fires at once
    rather than a series being absent."""
    metrics.record_run(str(tmp_path), "physical", 1, 1.0, {"local": 1}, now=5000)
    values = parsed(tmp_path / "pgbackup_physical.prom")
    assert values["pgbackup_last_success_timestamp_seconds", labels(kind="physical", repository="local")] == 0


def test_the_newest_set_and_the_count_are_of_the_runs_kind_only(tmp_path):
    sets = [
        {"status": "complete", "kind": "logical", "started_at": "2026-11-27T02:00:00Z"},
        {"status": "complete", "kind": "logical", "started_at": "2026-11-28T02:00:00Z"},
        {"status": "complete", "kind": "physical", "started_at": "2026-11-29T02:00:00Z"},
        {"status": "incomplete", "kind": "logical", "started_at": "2026-11-30T02:00:00Z"},
    ]
    metrics.record_run(str(tmp_path), "logical", 0, 1.0, {"local": 0}, sets=sets)
    values = parsed(tmp_path / "pgbackup_logical.prom")
    assert values["pgbackup_sets", labels(kind="logical")] == 2
    assert values["pgbackup_newest_set_timestamp_seconds", labels(kind="logical")] == 1795831200


def test_files_are_whole_world_readable_and_the_old_name_goes(tmp_path):
    (tmp_path / "pgbackup.prom").write_text("pgbackup_last_run_status 0\n")
    os.umask(0o077)
    try:
        written = metrics.record_run(str(tmp_path), "logical", 0, 1.0, {"local": 0})
    finally:
        os.umask(0o022)
    assert stat.S_IMODE(os.stat(written.path).st_mode) == 0o644
    assert sorted(name for name in os.listdir(tmp_path) if not name.startswith(".")) == [
        "pgbackup_logical.prom"
    ]


def test_the_recovery_window_is_the_most_recently_archived_chain(tmp_path):
    described = [
        {
            "windows": [
                {"earliest_time": "2026-11-01T00:00:00Z", "latest_archived_at": "2026-11-10T00:00:00+00:00"}
            ]
        },
        {
            "windows": [
                {"earliest_time": "2026-11-20T00:00:00Z", "latest_archived_at": "2026-11-28T12:00:00+00:00"},
                {"earliest_time": "2026-11-25T00:00:00Z", "latest_archived_at": "2026-11-26T00:00:00+00:00"},
            ]
        },
    ]
    metrics.record_recovery_window(str(tmp_path), described)
    values = parsed(tmp_path / "pgbackup_recovery_window.prom")
    assert values["pgbackup_recovery_window_start_timestamp_seconds", labels()] == 1795132800
    assert (
        values["pgbackup_recovery_window_end_timestamp_seconds", labels()] == 1795132800 + 8 * DAY + DAY / 2
    )
    metrics.record_recovery_window(str(tmp_path), [{"windows": []}])
    values = parsed(tmp_path / "pgbackup_recovery_window.prom")
    assert set(values.values()) == {0}


def test_the_volume_file_reports_each_repository(tmp_path):
    metrics.record_volumes(str(tmp_path), {"local": str(tmp_path)})
    values = parsed(tmp_path / "pgbackup_volume.prom")
    size = values["pgbackup_volume_size_bytes", labels(repository="local")]
    free = values["pgbackup_volume_free_bytes", labels(repository="local")]
    stats = os.statvfs(tmp_path)
    assert size == stats.f_blocks * stats.f_frsize
    assert 0 < free <= size


def test_a_failed_drill_keeps_the_last_passing_figures(tmp_path):
    folder = str(tmp_path)
    metrics.record_drill(folder, True, 41.5, 60, now=1000)
    metrics.record_drill(folder, False, 999, 999, now=2000)
    values = parsed(tmp_path / "pgbackup_drill.prom")
    assert values["pgbackup_drill_last_status", labels()] == 1
    assert values["pgbackup_drill_last_run_timestamp_seconds", labels()] == 2000
    assert values["pgbackup_drill_last_success_timestamp_seconds", labels()] == 1000
    assert values["pgbackup_drill_rto_seconds", labels()] == 41.5
    assert values["pgbackup_drill_rpo_seconds", labels()] == 60


def test_drill_record_from_the_command_line(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {"backup_dir": str(tmp_path), "recipients": str(tmp_path / "x.pub"), "metrics_dir": str(tmp_path)}
        )
    )
    for bad in ("-1", "nan", "inf", "soon"):
        result = run_cli("drill-record", "passed", "--rto", bad, "--settings", str(settings))
        assert result.returncode == 2, bad
        assert "--rto" in result.stderr
    assert not (tmp_path / "pgbackup_drill.prom").exists()
    result = run_cli("drill-record", "failed", "--settings", str(settings), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["result"] == "failed"
    values = parsed(tmp_path / "pgbackup_drill.prom")
    assert values["pgbackup_drill_last_status", labels()] == 1
    assert values["pgbackup_drill_last_success_timestamp_seconds", labels()] == 0


def test_a_window_time_that_does_not_parse_is_no_window(tmp_path):
    described = [{"windows": [{"earliest_time": 12, "latest_archived_at": "2026-11-28T12:00:00+00:00"}]}]
    metrics.record_recovery_window(str(tmp_path), described)
    values = parsed(tmp_path / "pgbackup_recovery_window.prom")
    assert set(values.values()) == {0}


def _hammer(folder, kind, rounds):
    for number in range(rounds):
        metrics.record_run(folder, kind, 0, float(number), {"local": 0}, now=1000 + number)
        metrics.record_volumes(folder, {"local": folder})


def test_runs_writing_at_once_never_leave_a_torn_or_lost_file(tmp_path):
    """A WAL run and a logical run finding the lock taken write the same files at the
    same moment: every file always parses, each run's last figures are there, and no
    temporary file is left."""
    folder = str(tmp_path)
    workers = [
        multiprocessing.Process(target=_hammer, args=(folder, kind, 150))
        for kind in ("logical", "logical", "wal")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert sorted(name for name in os.listdir(tmp_path) if not name.startswith(".")) == [
        "pgbackup_logical.prom",
        "pgbackup_volume.prom",
        "pgbackup_wal.prom",
    ]
    assert (
        parsed(tmp_path / "pgbackup_logical.prom")[
            "pgbackup_last_run_timestamp_seconds", labels(kind="logical")
        ]
        == 1149
    )
    assert (
        parsed(tmp_path / "pgbackup_wal.prom")["pgbackup_last_run_timestamp_seconds", labels(kind="wal")]
        == 1149
    )
    assert parsed(tmp_path / "pgbackup_volume.prom")
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []
