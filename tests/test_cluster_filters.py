"""The filters that write what members of a cluster read: a standby's connection string
(libpq parses back exactly the values given, whatever quotes or spaces they hold) and
Patroni's parameters (PostgreSQL's own spelling of booleans)."""

from __future__ import annotations

import os
import sys

import psycopg
import pytest
from ansible.errors import AnsibleFilterError
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "filter_plugins"))
from postgresql import patroni_parameters, pg_conninfo, pg_slot_name, pgpass_line


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "with space",
        "it's",
        "back\\slash",
        "' host=attacker.example sslmode='disable",
        "trailing\\",
        "",
    ],
)
def test_libpq_reads_back_every_value_as_given(value):
    params = {"host": "pg-1", "application_name": value, "sslmode": "verify-full", "passfile": "/x/y"}
    assert psycopg.conninfo.conninfo_to_dict(pg_conninfo(params)) == params


def test_a_key_that_is_not_a_parameter_name_is_refused():
    with pytest.raises(AnsibleFilterError, match="not a connection parameter name"):
        pg_conninfo({"host=x sslmode": "disable"})


def test_patroni_parameters_spell_booleans_as_postgresql_does():
    settings = {"ssl": True, "hot_standby": False, "port": 5432, "archive_command": "pgbackup wal-push %p"}
    assert patroni_parameters(settings) == {
        "ssl": "on",
        "hot_standby": "off",
        "port": 5432,
        "archive_command": "pgbackup wal-push %p",
    }


def test_a_standbys_slot_name_is_one_postgresql_accepts():
    assert pg_slot_name("pg-repl-2") == "pg_repl_2"
    assert pg_slot_name("DB2.Example.internal") == "db2_example_internal"


@pytest.mark.parametrize("password", ["plain-password", "with:colon", "back\\slash", "both\\:x:\\", "*"])
def test_libpq_logs_in_with_the_password_a_pgpass_line_holds(cluster, tmp_path, password):
    """A real login through the passfile the filter writes, as the backup role, the
    standbys and the Zabbix agent use theirs."""
    role = "pgpass_probe"
    with psycopg.connect(autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(
            psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                psycopg.sql.Identifier(role), psycopg.sql.Literal(password)
            )
        )
    passfile = tmp_path / "pgpass"
    passfile.write_text(pgpass_line(["127.0.0.1", cluster["port"], "*", role, password]) + "\n")
    passfile.chmod(0o600)
    with psycopg.connect(
        host="127.0.0.1",
        port=cluster["port"],
        user=role,
        dbname="postgres",
        passfile=str(passfile),
        sslmode="require",
    ) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == role


def test_a_line_break_cannot_go_into_a_passfile():
    with pytest.raises(AnsibleFilterError, match="line break"):
        pgpass_line(["h", 5432, "*", "u", "pass\nword"])
