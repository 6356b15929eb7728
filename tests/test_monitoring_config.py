"""The monitoring role's inputs and outputs that need no running service: scrape targets
from the inventory's groups, and the alert rules (rendered with the role's defaults:
each has a summary, a severity and a runbook link to a section that exists). promtool
tests the rules' behaviour in the Molecule scenario `monitoring`, where Prometheus is."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import sys

import jinja2
import pytest
import yaml
from ansible.errors import AnsibleFilterError
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "filter_plugins"))
from monitoring import monitoring_targets

ROLE = os.path.join(ROOT, "roles", "monitoring")


def test_each_topology_gets_its_cluster_label():
    groups = {
        "postgresql": ["solo", "ha-1", "ha-2", "db-a", "db-b"],
        "patroni": ["ha-1", "ha-2"],
        "postgresql_primary": ["db-a"],
        "postgresql_standby": ["db-b"],
    }
    hostvars = {
        "solo": {},
        "ha-1": {"patroni_scope": "accounts"},
        "ha-2": {"patroni_scope": "accounts", "patroni_restapi_port": 8443},
        "db-a": {},
        "db-b": {"monitoring_node_exporter_port": "9200"},
    }
    targets = {target["host"]: target for target in monitoring_targets(groups, hostvars)}
    assert sorted(targets) == ["db-a", "db-b", "ha-1", "ha-2", "solo"]
    assert {host: target["cluster"] for host, target in targets.items()} == {
        "solo": "solo",
        "ha-1": "accounts",
        "ha-2": "accounts",
        "db-a": "db-a",
        "db-b": "db-a",
    }
    assert [host for host, target in targets.items() if target["patroni"]] == ["ha-1", "ha-2"]
    assert targets["ha-2"]["patroni_port"] == 8443
    assert targets["db-b"]["node_exporter_port"] == 9200
    assert targets["solo"]["postgres_exporter_port"] == 9187


def test_an_explicit_cluster_name_wins_and_two_primaries_are_refused():
    groups = {"postgresql": ["a"], "postgresql_primary": ["a"]}
    assert monitoring_targets(groups, {"a": {"monitoring_cluster": "billing"}})[0]["cluster"] == "billing"
    with pytest.raises(AnsibleFilterError, match="a needs monitoring_cluster"):
        monitoring_targets({"postgresql_primary": ["a", "b"], "postgresql": ["a", "b"]}, {"a": {}, "b": {}})
    named = {"a": {"monitoring_cluster": "one"}, "b": {"monitoring_cluster": "two"}}
    two = monitoring_targets({"postgresql_primary": ["a", "b"], "postgresql": ["a", "b"]}, named)
    assert [target["cluster"] for target in two] == ["one", "two"]


def rendered_rules() -> dict:
    """The rules template rendered as Ansible does (its #jinja2 header: [[ ]] for
    Ansible's variables), with the role's defaults."""
    with open(os.path.join(ROLE, "defaults", "main.yml"), encoding="utf-8") as handle:
        defaults = yaml.safe_load(handle)
    with open(os.path.join(ROLE, "templates", "pgbackup-alerts.yml.j2"), encoding="utf-8") as handle:
        header, _, body = handle.read().partition("\n")
    assert header.startswith("#jinja2:") and "'[['" in header
    environment = jinja2.Environment(  # noqa: S701 - YAML, not HTML
        variable_start_string="[[", variable_end_string="]]", undefined=jinja2.StrictUndefined
    )
    # Defaults that refer to other roles' variables are not used by the rules.
    values = {name: value for name, value in defaults.items() if not str(value).startswith("{{")}
    return yaml.safe_load(environment.from_string(body).render(ansible_managed="managed", **values))


def runbook_anchors() -> set[str]:
    """GitHub's anchors of the runbook's headings: lower case, punctuation dropped."""
    with open(os.path.join(ROOT, "docs", "runbook.md"), encoding="utf-8") as handle:
        headings = re.findall(r"^#+ (.+)$", handle.read(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section():
    anchors = runbook_anchors()
    alerts = [rule for group in rendered_rules()["groups"] for rule in group["rules"] if "alert" in rule]
    assert len(alerts) == 17
    for rule in alerts:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        url = rule["annotations"]["runbook_url"]
        assert url == f"file:///usr/share/doc/pgbackup/runbook.md#{rule['alert'].lower()}"
        assert rule["alert"].lower() in anchors, f"docs/runbook.md has no section for {rule['alert']}"


def test_the_rule_tests_cover_every_alert():
    with open(os.path.join(ROLE, "files", "tests", "pgbackup-alerts.test.yml"), encoding="utf-8") as handle:
        tests = yaml.safe_load(handle)["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    alerts = {
        rule["alert"] for group in rendered_rules()["groups"] for rule in group["rules"] if "alert" in rule
    }
    assert tested == alerts


def zabbix_export() -> dict:
    with open(os.path.join(ROLE, "files", "zabbix", "pgbackup_templates.yaml"), encoding="utf-8") as handle:
        return yaml.safe_load(handle)["zabbix_export"]


def test_the_zabbix_templates_hold_together():
    """What an import would refuse or silently break: uuids, masters of dependent items,
    trigger expressions naming items their template has."""
    export = zabbix_export()
    assert export["version"] == "6.0"
    uuids = re.findall(r"uuid: ([0-9a-f]+)", yaml.safe_dump(export))
    assert all(len(uuid) == 32 for uuid in uuids) and len(set(uuids)) == len(uuids)
    keys = {
        template["template"]: {item["key"] for item in template["items"]} for template in export["templates"]
    }
    triggers = list(export.get("triggers", []))
    for template in export["templates"]:
        for item in template["items"]:
            if item.get("type") == "DEPENDENT":
                assert item["master_item"]["key"] in keys[template["template"]], item["key"]
            triggers += item.get("triggers", [])
    for trigger in triggers:
        named = re.findall(r"\(/([^/]+)/([^,)]+)", trigger["expression"])
        assert named, trigger["name"]
        for template, key in named:
            assert key in keys[template], (trigger["name"], key)
        assert trigger["priority"] in ("INFO", "WARNING", "AVERAGE", "HIGH", "DISASTER")


def test_zabbix_has_a_trigger_for_every_prometheus_alert_with_the_same_thresholds():
    export = zabbix_export()
    triggers = list(export["triggers"]) + [
        trigger
        for template in export["templates"]
        for item in template["items"]
        for trigger in item.get("triggers", [])
    ]
    anchors = {trigger["url"].rpartition("#")[2] for trigger in triggers}
    alerts = {rule["alert"].lower() for group in rendered_rules()["groups"] for rule in group["rules"]}
    assert anchors == alerts
    with open(os.path.join(ROLE, "defaults", "main.yml"), encoding="utf-8") as handle:
        defaults = yaml.safe_load(handle)
    (backups,) = [
        template for template in export["templates"] if template["template"] == "pgbackup_postgresql"
    ]
    macros = {macro["macro"]: macro["value"] for macro in backups["macros"]}
    assert (
        macros["{$PGBACKUP.LOGICAL.MAX_AGE}"]
        == f"{defaults['monitoring_alert_logical_backup_max_age_hours']}h"
    )
    assert (
        macros["{$PGBACKUP.PHYSICAL.MAX_AGE}"]
        == f"{defaults['monitoring_alert_physical_backup_max_age_hours']}h"
    )
    assert (
        macros["{$PGBACKUP.WAL.OFFSITE.MAX_AGE}"]
        == f"{defaults['monitoring_alert_wal_offsite_max_age_minutes']}m"
    )
    assert (
        macros["{$PGBACKUP.EXTERNAL.MAX_AGE}"]
        == f"{defaults['monitoring_alert_external_drive_max_age_hours']}h"
    )
    assert macros["{$PGBACKUP.VOLUME.FREE.MIN}"] == str(defaults["monitoring_alert_volume_free_percent"])
    assert macros["{$PGBACKUP.ARCHIVE.FAILING.FOR}"] == defaults["monitoring_alert_archive_failing_for"]
    assert macros["{$PGBACKUP.ARCHIVE.READY.MAX}"] == str(defaults["monitoring_alert_archive_ready_files"])
    assert macros["{$PGBACKUP.REPLICATION.LAG.BYTES}"] == str(
        defaults["monitoring_alert_replication_lag_bytes"]
    )
    assert macros["{$PGBACKUP.REPLICATION.LAG.SECONDS}"] == str(
        defaults["monitoring_alert_replication_lag_seconds"]
    )
    assert macros["{$PGBACKUP.RUNBOOK.URL}"] == defaults["monitoring_runbook_url"]


def patroni_health():
    path = os.path.join(ROLE, "files", "pgbackup-patroni-health")
    loader = importlib.machinery.SourceFileLoader("patroni_health", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("patroni_health", loader))
    loader.exec_module(module)
    return module


def test_patronis_state_becomes_figures_a_zabbix_item_takes():
    """Patroni 3.0's GET /patroni: `cluster_unlocked` appears only when true, `state` is
    a word; the template's items read 0/1 figures."""
    health = patroni_health()
    leader = {"state": "running", "role": "master", "timeline": 3, "xlog": {"location": 1}}
    assert health.figures(leader) == {"up": 1, "running": 1, "unlocked": 0, "role": "master"}
    orphan = {"state": "running", "role": "replica", "cluster_unlocked": True}
    assert health.figures(orphan) == {"up": 1, "running": 1, "unlocked": 1, "role": "replica"}
    assert health.figures({"state": "stopped", "role": "replica"})["running"] == 0
    down = health.main("https://127.0.0.1:1/patroni", ssl_default_ca())
    assert down["up"] == 0 and set(down) == {"up", "error"}


def ssl_default_ca():
    return "/etc/ssl/certs/ca-certificates.crt"


def test_zabbix_uuids_are_version_4_as_the_import_requires():
    uuids = re.findall(r"uuid: ([0-9a-f]+)", yaml.safe_dump(zabbix_export()))
    assert uuids and all(re.fullmatch(r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}", uuid) for uuid in uuids)
