"""Format version 2 at the level of sets: a host writes backups it cannot read, any
recipient's private key restores them, version 1 sets keep restoring, every file is
bound to its set and path, and the backup role (no superuser) dumps every role with
its password hash."""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid

import psycopg
import pytest
from conftest import connect, fingerprint, query, reseal, run_cli, seed_rich_database, version1_key_file
from pgbackup import backup, crypto, manifest, restore, retention
from pgbackup.errors import CorruptError, WrongKeyError


@pytest.fixture(scope="module")
def escrow_key_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("escrow") / "escrow.key")
    crypto.generate_key_pair(path)
    return path


@pytest.fixture(scope="module")
def app_db(cluster):
    name = f"keys_{uuid.uuid4().hex[:8]}"
    query("postgres", f'CREATE DATABASE "{name}"')
    seed_rich_database(name)
    yield name
    with connect() as conn:
        for (found,) in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (name + "%",)
        ).fetchall():
            conn.execute(f'DROP DATABASE "{found}" WITH (FORCE)')


@pytest.fixture(scope="module")
def two_recipient_set(app_db, key_file, escrow_key_file, tmp_path_factory):
    """A set made by the CLI as a host makes it: with the two public keys only."""
    dest = tmp_path_factory.mktemp("two")
    made = run_cli(
        "backup",
        "--dest",
        str(dest),
        "--recipient",
        f"{key_file}.pub",
        "--recipient",
        f"{escrow_key_file}.pub",
        "--database",
        app_db,
        check=True,
    )
    return made.stdout.strip()


def restore_copy(set_path, key_path, app_db, suffix):
    return run_cli(
        "restore", set_path, "--key-file", key_path, "--database", app_db, "--target-db", f"{app_db}_{suffix}"
    )


def test_either_recipient_restores_a_set_and_a_stranger_is_told_which_keys(
    two_recipient_set, app_db, key_file, escrow_key_file, other_key_file, key
):
    escrow = crypto.load_key(escrow_key_file)
    for key_path, suffix in ((key_file, "ops"), (escrow_key_file, "escrow")):
        done = restore_copy(two_recipient_set, key_path, app_db, suffix)
        assert done.returncode == 0, done.stderr
        assert fingerprint(f"{app_db}_{suffix}") == fingerprint(app_db)
    refused = restore_copy(two_recipient_set, other_key_file, app_db, "other")
    assert refused.returncode == 1
    assert f"needs the key with id {key.key_id} or {escrow.key_id}" in refused.stderr
    assert refused.stderr.count("\n") == 1


def test_the_host_check_needs_no_private_key(two_recipient_set, key, escrow_key_file):
    """What the scheduled run checks: every file's structure, size and hash."""
    escrow = crypto.load_key(escrow_key_file)
    checked = run_cli("verify", two_recipient_set, check=True)
    assert f"decrypting needs the private key of {key.key_id} or {escrow.key_id}" in checked.stdout
    listed = run_cli("list", "--dest", os.path.dirname(two_recipient_set), check=True)
    assert f"key {key.key_id}|{escrow.key_id}" in listed.stdout


def damaged_copy(set_path, folder, name=None):
    copy = os.path.join(folder, name or os.path.basename(set_path))
    shutil.copytree(set_path, copy)
    return copy


def dump_file(set_path):
    return os.path.join(set_path, next(n for n in sorted(os.listdir(set_path)) if n.startswith("db-")))


def test_the_host_check_catches_damage_without_a_key(two_recipient_set, tmp_path):
    cut = damaged_copy(two_recipient_set, tmp_path / "cut")
    os.truncate(dump_file(cut), os.path.getsize(dump_file(cut)) - 7)
    with pytest.raises(CorruptError, match="truncated"):
        restore.verify_set(cut)
    grown = damaged_copy(two_recipient_set, tmp_path / "grown")
    with open(dump_file(grown), "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(CorruptError, match="data after its final chunk"):
        restore.verify_set(grown)


def test_a_renamed_set_is_refused_with_or_without_the_key(two_recipient_set, key, tmp_path):
    """Renamed, with its manifest's name edited to match: the files still say where they
    were written, so even the host's check refuses it; with the key the MAC does too."""
    later = manifest.set_name("logical", manifest.parse_iso("2030-01-01T00:00:00Z"))
    renamed = damaged_copy(two_recipient_set, tmp_path, later)
    record = json.load(open(os.path.join(renamed, manifest.MANIFEST_NAME)))
    record["name"] = later
    json.dump(record, open(os.path.join(renamed, manifest.MANIFEST_NAME), "w"))
    with pytest.raises(CorruptError, match="moved between sets or renamed"):
        restore.verify_set(renamed)
    with pytest.raises(CorruptError, match="was altered after the backup"):
        restore.verify_set(renamed, key)


def test_a_database_dropped_from_the_manifest_is_caught_by_the_seal(two_recipient_set, key, tmp_path):
    """The one edit the host cannot see (it holds no key to check the seal): a restore
    or a drill, which have the key, refuse it."""
    edited = damaged_copy(two_recipient_set, tmp_path)
    record = json.load(open(os.path.join(edited, manifest.MANIFEST_NAME)))
    record["databases"] = []
    json.dump(record, open(os.path.join(edited, manifest.MANIFEST_NAME), "w"))
    assert restore.verify_set(edited)["files"] == 1  # the globals, all the host can check
    with pytest.raises(CorruptError, match="was altered after the backup"):
        restore.verify_set(edited, key)


def test_version_1_sets_still_restore_from_a_key_ring(app_db, key_file, tmp_path):
    """A set made before version 2, with the old symmetric key: restored from a key ring
    folder holding the old key and the new private key, and reported by key id."""
    ring = tmp_path / "ring"
    ring.mkdir(mode=0o700)
    old_key = crypto.load_key(version1_key_file(ring / "old.key"))
    shutil.copy(key_file, ring / "ops.key")
    old_set = backup.create_backup_set(str(tmp_path / "b"), old_key, databases=[app_db])
    assert old_set["format_version"] == 1 and old_set["key_id"] == old_key.key_id
    done = restore_copy(old_set["path"], str(ring), app_db, "v1")
    assert done.returncode == 0, done.stderr
    assert fingerprint(f"{app_db}_v1") == fingerprint(app_db)
    without = restore_copy(old_set["path"], key_file, app_db, "v1_missing")
    assert without.returncode == 1 and f"needs the key with id {old_key.key_id}" in without.stderr
    # The host's check reads version 1 sets too, still without any key.
    assert restore.verify_set(old_set["path"])["key_ids"] == [old_key.key_id]


def test_the_key_report_says_which_sets_need_which_key(recipients, key, tmp_path):
    dest = tmp_path / "b"
    old_key = crypto.load_key(version1_key_file(tmp_path / "old.key"))
    old = backup.create_backup_set(str(dest), old_key, databases=[])
    new = backup.create_backup_set(str(dest), recipients, databases=[])
    usage = {item["key_id"]: item for item in retention.key_usage(str(dest))}
    assert usage[old_key.key_id]["newest_set"] == old["name"] and usage[old_key.key_id]["sets"] == 1
    assert usage[key.key_id]["newest_set"] == new["name"]
    shown = run_cli("keys", "--dest", str(dest), check=True).stdout
    assert f"key {old_key.key_id}: 1 set(s), newest {old['name']}" in shown


def test_a_set_cannot_be_written_with_a_key_that_reads_it(key_file, tmp_path):
    """A host is given public keys only: a private (or version 1) key file as a
    recipient is refused before anything is written."""
    for wrong in (key_file, version1_key_file(tmp_path / "old.key")):
        result = run_cli("backup", "--dest", str(tmp_path / "b"), "--recipient", wrong)
        assert result.returncode == 1
        assert "needs only the public key" in result.stderr
    assert not (tmp_path / "b").exists()


# ---- complete globals without a superuser -------------------------------------------


@pytest.fixture
def backup_role(cluster, tmp_path):
    """A role as the postgresql role makes the backup role: no superuser, pg_read_all_data
    and pg_monitor; with a passfile of its own."""
    name, password = f"bk_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with connect() as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN NOSUPERUSER PASSWORD '{password}'")
        conn.execute(f"GRANT pg_read_all_data, pg_monitor TO {name}")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:{cluster['port']}:*:{name}:{password}\n")
    passfile.chmod(0o600)
    yield {"name": name, "env": {"PGUSER": name, "PGPASSFILE": str(passfile)}}
    query("postgres", f"DROP ROLE {name}")


def globals_of(set_path, key):
    record = manifest.load(set_path)
    out = io.BytesIO()
    with open(os.path.join(set_path, record["globals"]["path"]), "rb") as source:
        crypto.decrypt_stream(source, out, key, binding=manifest.binding(set_path, record["globals"]))
    return record, out.getvalue().decode()


def test_the_backup_role_dumps_every_role_with_its_password_hash(
    cluster, backup_role, recipient_file, key, tmp_path
):
    probe, secret = f"probe_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    query("postgres", f"CREATE ROLE {probe} LOGIN PASSWORD '{secret}'")
    try:
        made = run_cli(
            "backup",
            "--dest",
            str(tmp_path / "b"),
            "--recipient",
            recipient_file,
            "--database",
            "postgres",
            env=backup_role["env"],
            check=True,
        ).stdout.strip()
        record, dumped = globals_of(made, key)
        assert record["role_passwords"] is True
        assert f"CREATE ROLE {probe};" in dumped and "SCRAM-SHA-256$" in dumped
        # The server is lost: the role is gone. Restoring the globals brings it back able to log in.
        query("postgres", f"DROP ROLE {probe}")
        restore.restore_set(made, key, databases=[], include_globals=True)
        with psycopg.connect(dbname="postgres", user=probe, password=secret, passfile="/nonexistent") as conn:
            assert conn.execute("SELECT current_user").fetchone() == (probe,)
        # And the backup role is still no superuser: it cannot read the server's files or write.
        with psycopg.connect(
            dbname="postgres", user=backup_role["name"], passfile=backup_role["env"]["PGPASSFILE"]
        ) as conn:
            assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (
                False,
            )
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT pg_read_file('/etc/hostname')")
        with (
            psycopg.connect(
                dbname="postgres", user=backup_role["name"], passfile=backup_role["env"]["PGPASSFILE"]
            ) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(f"ALTER ROLE {probe} PASSWORD 'taken-over'")
    finally:
        query("postgres", f"DROP ROLE IF EXISTS {probe}")


def test_a_role_that_cannot_read_pg_authid_dumps_roles_without_hashes(
    cluster, backup_role, recipients, key, tmp_path, monkeypatch, caplog
):
    query("postgres", f"REVOKE pg_read_all_data FROM {backup_role['name']}")
    for name, value in backup_role["env"].items():
        monkeypatch.setenv(name, value)
    record = backup.create_backup_set(str(tmp_path / "b"), recipients, databases=[])
    _, dumped = globals_of(record["path"], key)
    assert record["role_passwords"] is False and "SCRAM-SHA-256$" not in dumped
    assert "roles are dumped without their password hashes" in caplog.text


def test_a_wrong_key_on_an_old_set_names_both_ids(tmp_path, key):
    old_key = crypto.load_key(version1_key_file(tmp_path / "old.key"))
    old_set = backup.create_backup_set(str(tmp_path / "b"), old_key, databases=[])
    with pytest.raises(WrongKeyError, match=f"needs the key with id {old_key.key_id}.*have id {key.key_id}"):
        restore.verify_set(old_set["path"], key)


# ---- what anyone with a public key can write: the reader's defences ---------------------


@pytest.fixture
def forged_set(cluster, recipients):
    """Make a set with the public key only, as someone who holds it and can write to the
    backup storage could make it, with its manifest edited by edit(record) and re-sealed."""

    def forge(dest, edit):
        made = backup.create_backup_set(str(dest), recipients, databases=[])
        reseal(made["path"], recipients, edit)
        return made["path"]

    return forge


@pytest.mark.parametrize(
    "path", ["../../escaped.sql", "/etc/passwd", "..", "db.dir/../../x", "a/b/c", "globals.sql.enc\n"]
)
def test_a_manifest_path_outside_the_set_is_refused_before_anything_is_read(forged_set, key, tmp_path, path):
    def edit(record):
        record["globals"]["path"] = path

    forged = forged_set(tmp_path / "b", edit)
    for attempt in (lambda: restore.verify_set(forged), lambda: restore.verify_set(forged, key)):
        with pytest.raises(CorruptError, match="not a plain path inside the set"):
            attempt()
    assert [entry["status"] for entry in retention.scan(str(tmp_path / "b"))] == ["invalid"]
    assert not (tmp_path / "escaped.sql").exists()


def test_a_directory_dump_file_name_that_climbs_out_of_staging_is_refused(forged_set, key, tmp_path):
    def edit(record):
        record["databases"] = [
            {
                "name": "x",
                "format": "directory",
                "files": [dict(record["globals"], name="../../../escaped.txt")],
            }
        ]

    forged = forged_set(tmp_path / "b", edit)
    with pytest.raises(CorruptError, match="not a plain name"):
        restore.restore_set(forged, key, databases=["x"], target_db="never_made")
    assert not (tmp_path.parent / "escaped.txt").exists()


@pytest.mark.parametrize(
    ("dump_format", "file_count", "refusal"),
    [
        ("custom", 0, "database 'x' lists no files"),
        ("custom", 2, r"'custom' dump of 2 file\(s\).*nothing was restored"),
        ("tar", 1, r"'tar' dump of 1 file\(s\).*nothing was restored"),
    ],
)
def test_a_dump_whose_files_do_not_fit_its_format_is_refused_before_loading(
    forged_set, key, tmp_path, dump_format, file_count, refusal
):
    """pgbackup writes a custom dump as one file; a manifest saying otherwise (or naming a
    format it never writes) is refused before any database is created."""

    def edit(record):
        record["databases"] = [
            {"name": "x", "format": dump_format, "files": [dict(record["globals"])] * file_count}
        ]

    forged = forged_set(tmp_path / "b", edit)
    databases_before = query("postgres", "SELECT datname FROM pg_database ORDER BY 1")
    with pytest.raises(CorruptError, match=refusal):
        restore.restore_set(forged, key, databases=["x"], target_db="never_made")
    assert query("postgres", "SELECT datname FROM pg_database ORDER BY 1") == databases_before


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("recipients", 5),
        ("recipients", [["a"]]),
        ("recipients", ["not-hex"]),
        ("seal", None),
        ("databases", {}),
    ],
)
def test_a_manifest_with_fields_of_the_wrong_type_is_invalid_not_a_traceback(
    forged_set, tmp_path, field, value
):
    forged = forged_set(tmp_path / "b", lambda record: None)
    record = json.load(open(os.path.join(forged, manifest.MANIFEST_NAME)))
    record[field] = value
    json.dump(record, open(os.path.join(forged, manifest.MANIFEST_NAME), "w"))
    listed = run_cli("list", "--dest", str(tmp_path / "b"), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [entry["status"] for entry in json.loads(listed.stdout)] == ["invalid"]
    checked = run_cli("verify", forged)
    assert checked.returncode == 1 and checked.stderr.startswith("pgbackup: error:")
    assert "Traceback" not in checked.stderr and checked.stderr.count("\n") == 1
    assert run_cli("keys", "--dest", str(tmp_path / "b")).returncode == 0


def test_a_key_id_listed_twice_in_a_seal_is_refused(forged_set, key, tmp_path):
    forged = forged_set(tmp_path / "b", lambda record: None)
    record = json.load(open(os.path.join(forged, manifest.MANIFEST_NAME)))
    record["seal"]["keys"] = record["seal"]["keys"] * 2
    json.dump(record, open(os.path.join(forged, manifest.MANIFEST_NAME), "w"))
    with pytest.raises(CorruptError, match="was altered after the backup"):
        restore.verify_set(forged, key)


def test_the_documented_manifest_vector_checks_out_with_either_key():
    vector = json.load(open(os.path.join(os.path.dirname(__file__), "data", "test_vector_v2.json")))
    record = vector["manifest"]
    for text in vector["private_keys"]:
        manifest.check(dict(record), crypto.parse_key(text.encode(), "vector"), f"/x/{record['name']}")
    with pytest.raises(CorruptError, match="was altered"):
        manifest.check(
            dict(record, started_at="2099-01-01T00:00:00Z"), crypto.parse_key(text.encode(), "v"), "/x"
        )


def test_row_level_security_does_not_stop_the_backup_role(
    cluster, backup_role, recipient_file, key, tmp_path
):
    """pg_dump refuses a table whose policies apply to the role dumping it: the backup
    role has BYPASSRLS, as the postgresql role makes it."""
    name = f"rls_{uuid.uuid4().hex[:8]}"
    query("postgres", f'CREATE DATABASE "{name}"')
    try:
        with connect(name) as conn:
            conn.execute("CREATE TABLE watch_history (user_name text, title text)")
            conn.execute("INSERT INTO watch_history VALUES ('zoe', 'a film'), ('ann', 'a series')")
            conn.execute("ALTER TABLE watch_history ENABLE ROW LEVEL SECURITY")
            conn.execute("CREATE POLICY own_rows ON watch_history USING (user_name = current_user)")
        refused = run_cli(
            "backup",
            "--dest",
            str(tmp_path / "a"),
            "--recipient",
            recipient_file,
            "--database",
            name,
            env=backup_role["env"],
        )
        assert refused.returncode == 1 and "row-level security" in refused.stderr
        query("postgres", f"ALTER ROLE {backup_role['name']} BYPASSRLS")
        made = run_cli(
            "backup",
            "--dest",
            str(tmp_path / "b"),
            "--recipient",
            recipient_file,
            "--database",
            name,
            env=backup_role["env"],
            check=True,
        ).stdout.strip()
        restore.restore_set(made, key, databases=[name], target_db=name + "_copy")
        assert query(name + "_copy", "SELECT count(*) FROM watch_history") == [(2,)]
    finally:
        with connect() as conn:
            for database in (name, name + "_copy"):
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
