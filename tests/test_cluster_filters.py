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
from postgresql import patroni_parameters, pg_conninfo, pg_slot_name


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
