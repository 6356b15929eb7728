"""Every option of both faces (the CLI and the Ansible modules) reaches the core.

An option that is parsed and then dropped (as `prune --kind` once was) fails here: each
option is given a value of its own, not its default, and that value must arrive in the
call the face makes to the core (or, for connection options, in libpq's environment).
The core functions are replaced by recorders only in this file; what they do is tested
against a real PostgreSQL everywhere else.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import subprocess
import sys
import types

import pgbackup
import pytest
import yaml
from ansible.module_utils.testing import patch_module_args
from conftest import ROOT
from pgbackup import backup, cli, connection, crypto, physical, pitr, restore, retention, run, wal

# Options that only shape what is printed, after the core has answered.
PRESENTATION = {"json", "verbose", "help", "version"}
CORE_CALLS = [
    (backup, "create_backup_set"),
    (backup, "plan"),
    (physical, "create_base_backup"),
    (physical, "restore_base"),
    (restore, "verify_set"),
    (restore, "restore_set"),
    (restore, "plan_restore"),
    (retention, "scan"),
    (retention, "prune"),
    (run, "main"),
    (run, "check"),
    (restore, "kept_databases"),
    (restore, "drop_kept"),
    (crypto, "generate_key_pair"),
    (crypto, "encrypt_stream"),
    (crypto, "decrypt_stream"),
    (wal, "push_command"),
    (wal, "fetch_command"),
    (wal, "describe"),
    (wal, "prune"),
    (pitr, "plan"),
    (pitr, "wait_for_recovery"),
    (run, "fetch_offsite"),
    (run, "record_drill"),
]


class Reached(Exception):
    """Raised by a recorder: the face called the core with these arguments."""

    def __init__(self, args, kwargs):
        super().__init__("core reached")
        self.seen = repr((args, kwargs))


@pytest.fixture
def saved_environment():
    """The faces write libpq's variables into os.environ: put the test's own back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def recorders(monkeypatch, saved_environment):
    def recorder(*args, **kwargs):
        raise Reached(args, kwargs)

    for module, name in CORE_CALLS:
        monkeypatch.setattr(module, name, recorder)
    # Keys are the one thing a face resolves before calling the core: keep their source.
    for module in (crypto, connection):
        monkeypatch.setattr(module, "load_key_ring", lambda paths: f"<keys from {paths}>")
        monkeypatch.setattr(
            module, "load_recipients", lambda paths: types.SimpleNamespace(keys=[f"<recipient from {paths}>"])
        )
        monkeypatch.setattr(module, "parse_key", lambda raw, source, writing=False: f"<key {raw.decode()}>")
        monkeypatch.setattr(module, "parse_public_keys", lambda texts, source: [f"<recipient {texts}>"])
        monkeypatch.setattr(module, "KeyRing", lambda keys: f"<ring {list(keys)}>")
        monkeypatch.setattr(
            module, "recipients_of", lambda keys: types.SimpleNamespace(keys=keys, key_ids=keys)
        )


counter = itertools.count(7001)


def sentinel_for_action(action: argparse.Action):
    """A value for the option that is not its default, and a string to look for."""
    if isinstance(action, argparse._StoreTrueAction):
        return [], True, "True"
    if action.choices:
        value = next(choice for choice in action.choices if choice != action.default)
        return [value], value, repr(value)
    if action.type in (int, float, cli._positive, cli._seconds):
        number = next(counter)
        return [str(number)], number, str(number)
    text = f"/sentinel/{action.dest}-{next(counter)}"
    return [text], text, text


def subcommands():
    parser = cli.build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return commands.choices


def _exclusive_alternatives(sub) -> dict:
    """Options of a mutually exclusive group but its first: each is tried on its own."""
    return {
        action.dest: group._group_actions[0].dest
        for group in sub._mutually_exclusive_groups
        for action in group._group_actions[1:]
    }


def _command_line(name, sub, left_out) -> tuple[list[str], dict]:
    """argv giving every option of the subcommand but those left out a sentinel value,
    and per option the text its value must show in the core call (None for a flag)."""
    argv, expected = [name], {}
    for action in sub._actions:
        if action.dest in PRESENTATION or isinstance(action, argparse._HelpAction) or action.dest in left_out:
            continue
        words, _value, shown = sentinel_for_action(action)
        argv += [action.option_strings[-1], *words] if action.option_strings else words
        expected[action.dest] = None if isinstance(action, argparse._StoreTrueAction) else shown
    return argv, expected


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_cli_option_reaches_the_core(name, recorders):
    sub = subcommands()[name]
    alternatives = _exclusive_alternatives(sub)
    runs = [set(alternatives)] + [
        {first, *(other for other in alternatives if other != dest)} for dest, first in alternatives.items()
    ]
    for left_out in runs:
        argv, expected = _command_line(name, sub, left_out)
        args = cli.build_parser().parse_args(argv)
        with pytest.raises(Reached) as reached:
            args.handler(args)
        for dest, shown in expected.items():
            if shown is not None:
                assert shown in reached.value.seen, f"pgbackup {name}: --{dest} was parsed but not passed on"
            elif dest in alternatives or dest in alternatives.values():
                assert dest.removeprefix("target_") in reached.value.seen, f"pgbackup {name}: --{dest} lost"
        exclusive = set(alternatives) | set(alternatives.values())
        for dest in (dest for dest, shown in expected.items() if shown is None and dest not in exclusive):
            # A flag reaches the core if turning it off changes the call (a flag that is
            # one of a required choice was shown reaching it by the run that chose it).
            flipped = argparse.Namespace(**{**vars(args), dest: False})
            with pytest.raises(Reached) as without:
                args.handler(flipped)
            assert without.value.seen != reached.value.seen, f"pgbackup {name}: --{dest} changes nothing"


def load_module(name):
    # The modules import ansible.module_utils.pgbackup: the very package tested here.
    sys.modules.setdefault("ansible.module_utils.pgbackup", pgbackup)
    for sub in ("backup", "connection", "errors", "restore", "retention"):
        sys.modules.setdefault(
            f"ansible.module_utils.pgbackup.{sub}", importlib.import_module(f"pgbackup.{sub}")
        )
    spec = importlib.util.spec_from_file_location(
        f"module_{name}", os.path.join(ROOT, "library", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def module_spec(module):
    """The argument_spec main() builds, read back from its DOCUMENTATION."""
    return yaml.safe_load(module.DOCUMENTATION)["options"]


def sentinel_for_option(name, option):
    if option.get("choices"):
        value = next(choice for choice in option["choices"] if choice != option.get("default"))
        return value, repr(value)
    kind = option.get("type", "str")
    if kind == "bool":
        return not option.get("default", False), None
    if kind == "int":
        number = next(counter)
        return number, str(number)
    if kind == "list":
        text = f"sentinel-{name}-{next(counter)}"
        return [text], text
    text = f"/sentinel/{name}-{next(counter)}"
    return text, text


# Connection options reach libpq through the environment; an option missing from this
# map is treated as a core option above, and fails there if it is dropped.
CONNECTION_ENV = connection._LIBPQ_ENVIRONMENT


@pytest.mark.parametrize("name", ["pg_encrypted_dump", "pg_encrypted_restore", "backup_retention"])
@pytest.mark.parametrize("check_mode", [False, True])
@pytest.mark.parametrize("key_option", ["key_file", "key"])
def test_every_module_option_reaches_the_core(name, check_mode, key_option, recorders, monkeypatch):  # noqa: PLR0912
    module = load_module(name)
    options = module_spec(module)
    if key_option == "key" and "key" not in options:
        pytest.skip("this module takes no private key")
    for variable in CONNECTION_ENV.values():
        monkeypatch.delenv(variable, raising=False)
    params, expected, flags = {}, {}, []
    for option, spec in options.items():
        if option in {"key", "key_file"} and option != key_option:
            continue
        value, shown = sentinel_for_option(option, spec)
        if option == "key":
            value = shown = "ab" * 32
        params[option] = value
        if shown is None:
            flags.append(option)
        else:
            expected[option] = shown
    if check_mode:
        params["_ansible_check_mode"] = True
    with patch_module_args(params), pytest.raises(Reached) as reached:
        module.main()
    # Check mode plans; the options that only the real run uses are the run's (the dump's
    # plan reports the key id, which the face reads itself).
    plan_only = {
        "pg_encrypted_dump": {
            "format",
            "jobs",
            "compression_level",
            "threads",
            "dest",
            "recipients",
            "recipient_file",
        },
        "pg_encrypted_restore": {"jobs", "globals"},
    }.get(name, set())
    for option, shown in expected.items():
        if option in CONNECTION_ENV:
            assert os.environ.get(CONNECTION_ENV[option]) == str(params[option]), (
                f"{name}: {option} not in env"
            )
        elif not (check_mode and option in plan_only):
            assert shown in reached.value.seen, f"{name}: {option} was parsed but not passed on"
    for option in flags:
        if check_mode and option in plan_only:
            continue
        flipped = {**params, option: not params[option]}
        with patch_module_args(flipped), pytest.raises(Reached) as without:
            module.main()
        assert without.value.seen != reached.value.seen, f"{name}: {option} changes nothing"


def test_module_connection_defaults_to_verified_tls(recorders, monkeypatch):
    monkeypatch.delenv("PGSSLMODE", raising=False)
    module = load_module("pg_encrypted_dump")
    with patch_module_args({"dest": "/nowhere", "recipient_file": "/k.pub"}), pytest.raises(Reached):
        module.main()
    assert os.environ["PGSSLMODE"] == "verify-full"


def test_cli_defaults_to_verified_tls(tmp_path):
    """libpq's own default is `prefer`; the CLI asks for verify-full unless told otherwise."""
    code = (
        "import os, sys; from pgbackup import cli; cli.main(['list', '--dest', sys.argv[1]]);"
        " print(os.environ['PGSSLMODE'])"
    )
    env = {name: value for name, value in os.environ.items() if name != "PGSSLMODE"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        env={**env, "PYTHONPATH": os.path.join(ROOT, "module_utils")},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip().splitlines()[-1] == "verify-full"
