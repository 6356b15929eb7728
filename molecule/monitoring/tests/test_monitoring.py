"""Monitoring as an operator meets it: Prometheus scrapes the backup metrics and the
postgres exporter (which logs in over TLS as the read-only role), the alert rules pass
promtool's tests where they are installed, and a failing backup reaches the on-call
by mail and webhook within a bounded, printed time. The tests run in order."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "_shared")
)
from lab import AS_CRON, REPOSITORY, lab_variable, psql, wait_for

testinfra_hosts = ["docker://pg-mon-1"]

ZABBIX_TEMPLATES = os.path.join(
    REPOSITORY, "roles", "monitoring", "files", "zabbix", "pgbackup_templates.yaml"
)
RULES_TEST = os.path.join(REPOSITORY, "roles", "monitoring", "files", "tests", "pgbackup-alerts.test.yml")
# Scrape and evaluation every 5 s, group_wait 5 s (host_vars/mon-1.yml): a failure's
# alert must reach both receivers within this.
NOTIFY_WITHIN = 90
QUERY = """
import json, sys, urllib.parse, urllib.request
url = "http://localhost:9090/api/v1/" + sys.argv[1] + "?" + urllib.parse.urlencode({"query": sys.argv[2]})
print(json.dumps(json.load(urllib.request.urlopen(url, timeout=10))["data"]))
"""


@pytest.fixture(scope="module")
def mon(host):
    return host.get_host("docker://mon-1")


@pytest.fixture(scope="module")
def sink(host):
    return host.get_host("docker://sink-mon-1")


def prometheus(mon, expr, api="query"):
    result = mon.run("python3 -c %s %s %s", QUERY, api, expr)
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def values(mon, expr) -> dict:
    """{instance or '': value} of an instant query."""
    return {
        sample["metric"].get("instance", ""): float(sample["value"][1])
        for sample in prometheus(mon, expr)["result"]
    }


def backup(host, kind="logical"):
    return host.run(f"{AS_CRON} /usr/local/bin/pgbackup run {kind}")


@pytest.fixture(scope="module")
def good_backup(host, mon):
    """Every kind of run once, and a drill's record: each metrics file exists."""
    for kind in ("physical", "wal", "logical"):
        result = backup(host, kind)
        assert result.rc == 0, (kind, result.stderr)
    drill = host.run(f"{AS_CRON} /usr/local/bin/pgbackup drill-record passed --rto 42.5 --rpo 0")
    assert drill.rc == 0, drill.stderr
    return result


# Zabbix: the agent queried over its own protocol by Zabbix's Python library, from the
# sink (a Server= the agent allows), as a Zabbix server would.
AGENT_GET = (
    "import json, sys; from zabbix_utils import Getter; "
    "agent = Getter(host='pg-mon-1', port=10050, timeout=10); "
    "print(json.dumps({key: agent.get(key).value for key in sys.argv[1:]}))"
)


def zabbix_template(name):
    with open(ZABBIX_TEMPLATES, encoding="utf-8") as handle:
        export = yaml.safe_load(handle)["zabbix_export"]
    (template,) = [template for template in export["templates"] if template["template"] == name]
    return template


def agent_items(sink, template) -> dict:
    """Every item of the template as a Zabbix server would get it: the agent's keys
    (their macros expanded with the template's defaults) asked over the agent protocol,
    and the dependent items computed from them by their preprocessing step."""
    macros = {macro["macro"]: macro["value"] for macro in template.get("macros", [])}

    def expanded(key):
        for macro, value in macros.items():
            key = key.replace(macro, value)
        return key

    agent_keys = [
        item["key"] for item in template["items"] if item.get("type", "ZABBIX_PASSIVE") == "ZABBIX_PASSIVE"
    ]
    answer = sink.run(
        "/opt/zabbix-utils/bin/python -c %s " + " ".join(["%s"] * len(agent_keys)),
        AGENT_GET,
        *[expanded(key) for key in agent_keys],
    )
    assert answer.rc == 0, answer.stderr
    raw = json.loads(answer.stdout)
    values = {key: raw[expanded(key)] for key in agent_keys}
    for item in template["items"]:
        if item.get("type") != "DEPENDENT":
            continue
        master = values[item["master_item"]["key"]]
        (step,) = item["preprocessing"]
        if step["type"] == "PROMETHEUS_PATTERN":
            values[item["key"]] = prometheus_pattern(master, step["parameters"][0])
        else:
            assert step["type"] == "JSONPATH" and step["parameters"][0].startswith("$."), step
            values[item["key"]] = json.loads(master).get(step["parameters"][0][2:])
    return values


def prometheus_pattern(text, pattern):
    """The value of the one series a Prometheus pattern (name{label="value",...}) selects."""
    name, _, labels = pattern.partition("{")
    wanted = dict(part.split("=", 1) for part in labels.rstrip("}").split(",") if part)
    wanted = {key: value.strip('"') for key, value in wanted.items()}
    found = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(key) == value for key, value in wanted.items())
    ]
    return found[0] if len(found) == 1 else None


def test_prometheus_scrapes_the_backup_success(host, mon, good_backup):
    """The run's metric, through node exporter's textfile collector, in Prometheus with
    the inventory's names: instance and cluster."""
    expr = 'pgbackup_last_run_status{kind="logical",job="node",instance="pg-mon-1",cluster="pg-mon-1"}'
    assert wait_for(lambda: values(mon, expr).get("pg-mon-1") == 0, 60, "the success in Prometheus")
    success = values(mon, 'pgbackup_last_success_timestamp_seconds{kind="logical",repository="local"}')
    assert time.time() - success["pg-mon-1"] < 120
    assert values(mon, 'pgbackup_sets{kind="logical"}')["pg-mon-1"] >= 1
    assert values(mon, 'pgbackup_volume_free_bytes{repository="local"}')["pg-mon-1"] > 0
    assert values(mon, "node_textfile_scrape_error")["pg-mon-1"] == 0


def test_the_postgres_exporter_reads_the_server_over_tls_as_the_monitoring_role(host, mon):
    assert wait_for(lambda: values(mon, "pg_up").get("pg-mon-1") == 1, 60, "pg_up")
    user = "pgmonitor"  # postgresql_monitoring_user's default
    sessions = psql(
        host,
        "SELECT s.ssl, a.client_addr IS NOT NULL FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
        f"WHERE a.usename = '{user}'",
    )
    assert sessions and set(sessions.split()) == {"t|t"}, sessions
    assert (
        psql(
            host, f"SELECT rolsuper OR rolreplication OR rolbypassrls FROM pg_roles WHERE rolname = '{user}'"
        )
        == "f"
    )
    assert psql(host, f"SELECT pg_has_role('{user}', 'pg_monitor', 'member')") == "t"
    assert psql(host, f"SELECT pg_has_role('{user}', 'pg_read_all_data', 'member')") == "f"
    # The role's own queries, and the archiver's figures from the built-in ones.
    assert values(mon, "pg_standby_in_recovery")["pg-mon-1"] == 0
    assert "pg-mon-1" in values(mon, "pg_archiver_ready_files")
    psql(host, "SELECT pg_switch_wal() FROM (SELECT txid_current()) AS written")
    assert wait_for(
        lambda: values(mon, "pg_stat_archiver_archived_count").get("pg-mon-1", 0) > 0,
        60,
        "an archived WAL file",
    )
    # The password is in a file only the exporter's user reads: not in argv or environment.
    password = lab_variable("postgresql_monitoring_password")
    passfile = host.file("/etc/prometheus/postgres-exporter.pass")
    assert (passfile.user, passfile.group, passfile.mode) == ("root", "prometheus", 0o640)
    pid = host.run("systemctl show -p MainPID --value prometheus-postgres-exporter").stdout.strip()
    exposed = host.run("cat /proc/%s/cmdline /proc/%s/environ", pid, pid)
    assert exposed.rc == 0 and password not in exposed.stdout


def test_every_alert_rule_is_loaded_and_passes_its_promtool_tests(mon, tmp_path):
    rules = prometheus(mon, "", api="rules")
    alerts = {
        rule["name"] for group in rules["groups"] for rule in group["rules"] if rule["type"] == "alerting"
    }
    assert len(alerts) == 17, alerts
    # The tests are written for the role's default thresholds (the lab shortens a wait):
    # the template rendered with them, as Ansible renders it, beside the tests.
    rendered = tmp_path / "pgbackup-alerts.yml"
    subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "ansible"),
            "localhost", "-c", "local", "-i", "localhost,", "-m", "ansible.builtin.template",
            "-a", f"src={REPOSITORY}/roles/monitoring/templates/pgbackup-alerts.yml.j2 dest={rendered}",
            "-e", f"@{REPOSITORY}/roles/monitoring/defaults/main.yml",
            "-e", f"ansible_python_interpreter={sys.executable}",
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    mon.run("rm -rf /var/tmp/promtool && mkdir -p /var/tmp/promtool/rules /var/tmp/promtool/tests")
    # Not under /tmp: docker cp cannot write into the container's tmpfs.
    subprocess.run(["docker", "cp", str(rendered), "mon-1:/var/tmp/promtool/rules/"], check=True)
    subprocess.run(["docker", "cp", RULES_TEST, "mon-1:/var/tmp/promtool/tests/"], check=True)
    result = mon.run("cd /var/tmp/promtool/tests && promtool test rules pgbackup-alerts.test.yml")
    assert result.rc == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


READ_ALL = (
    "import glob, json, sys; "
    "print(json.dumps([json.load(open(path)) for path in sorted(glob.glob(sys.argv[1] + '/*.json'))]))"
)


def test_the_zabbix_agent_serves_every_item_of_the_template(sink):
    """After the good runs: every item of pgbackup_postgresql has a value, the backup
    figures agree with the metrics files, and PostgreSQL's health came over TLS as the
    read-only role (an error would be the agent's text, not JSON)."""
    values = agent_items(sink, zabbix_template("pgbackup_postgresql"))
    missing = sorted(
        key for key, value in values.items() if value is None or str(value).startswith("ZBX_NOTSUPPORTED")
    )
    assert missing == [], missing
    assert values["pgbackup.logical.last_run_status"] == 0
    assert values["pgbackup.physical.last_run_status"] == 0
    assert time.time() - values["pgbackup.logical.offsite.last_success"] < 600
    assert values["pgbackup.drill.last_status"] == 0
    assert values["pgbackup.pg.in_recovery"] == 0
    assert values["pgbackup.pg.archiver.archived"] > 0
    assert values["pgbackup.volume.free"] > 0


def test_pgadmin_gets_every_database_host_without_a_password(mon):
    servers = json.loads(mon.file("/usr/share/doc/pgbackup/pgadmin-servers.json").content_string)["Servers"]
    assert [server["Name"] for server in servers.values()] == ["pg-mon-1"]
    (server,) = servers.values()
    assert server["Group"] == "pg-mon-1" and server["Host"] == "pg-mon-1" and server["Port"] == 5432
    assert server["ConnectionParameters"]["sslmode"] == "verify-full"
    assert server["Username"] == "pgmonitor"
    assert "password" not in json.dumps(servers).lower()


def received(sink, kind, since) -> list[dict]:
    """What the sink recorded after `since` (epoch seconds), oldest first."""
    listing = sink.run("python3 -c %s %s", READ_ALL, f"/var/lib/sink/{kind}")
    assert listing.rc == 0, listing.stderr
    return [record for record in json.loads(listing.stdout) if record["received_at"] >= since]


def test_a_failed_backup_reaches_mail_and_webhook(host, mon, sink):
    """A wrong password (the role's, changed on the server): the run fails, the metric
    says so, and PgBackupRunFailed reaches both receivers; then a good run resolves it."""
    password = lab_variable("postgresql_backup_password")
    psql(host, "ALTER ROLE pgbackup PASSWORD 'not-the-passfiles-one'")
    try:
        failed = backup(host)
        failed_at = time.time()
        assert failed.rc == 1
        assert "password authentication failed" in host.file("/var/log/pgbackup/pgbackup.log").content_string

        def firing(kind):
            for record in received(sink, kind, failed_at - 1):
                text = record.get("body") or record.get("content")
                if "PgBackupRunFailed" in text and "firing" in text.lower():
                    return record
            return None

        webhook = wait_for(lambda: firing("webhook"), NOTIFY_WITHIN, "the alert at the webhook")
        mail = wait_for(lambda: firing("mail"), NOTIFY_WITHIN, "the alert by mail")
        # Zabbix reads the same file: the same failure.
        zabbix = agent_items(sink, zabbix_template("pgbackup_postgresql"))
        assert zabbix["pgbackup.logical.last_run_status"] == 1
    finally:
        psql(host, f"ALTER ROLE pgbackup PASSWORD '{password}'")
    posted = json.loads(webhook["body"])
    (alert,) = [alert for alert in posted["alerts"] if alert["labels"]["alertname"] == "PgBackupRunFailed"]
    assert alert["labels"]["instance"] == "pg-mon-1" and alert["labels"]["kind"] == "logical"
    assert alert["annotations"]["runbook_url"].endswith("/runbook.md#pgbackuprunfailed")
    assert mail["to"] == ["dba@sink-mon-1.lab"]
    print(
        f"\nFailed backup to notification: webhook {webhook['received_at'] - failed_at:.1f} s, "
        f"mail {mail['received_at'] - failed_at:.1f} s (scrape and evaluation every 5 s, group_wait 5 s)"
    )

    assert backup(host).rc == 0
    recovered_at = time.time()

    def resolved():
        return any(
            alert["labels"]["alertname"] == "PgBackupRunFailed" and alert["status"] == "resolved"
            for record in received(sink, "webhook", recovered_at - 1)
            for alert in json.loads(record["body"])["alerts"]
        )

    wait_for(resolved, NOTIFY_WITHIN + 30, "the resolved notice")
