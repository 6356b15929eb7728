"""Base backups: taken through the same encryption, restored only into empty folders,
checked with pg_verifybackup, and a server really starts on the result."""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import subprocess
import tarfile
import tempfile

import psycopg
import pytest
from conftest import query, run_cli
from pgbackup import crypto, manifest, physical, retention, sets
from pgbackup.errors import CorruptError, PgBackupError, RefusedError, WrongKeyError
from pgcluster import PG_BIN, as_cluster_owner, free_port


@pytest.fixture(scope="module")
def base_set(cluster, key, tmp_path_factory, recipients):
    query("postgres", "DROP TABLE IF EXISTS physical_probe")
    query(
        "postgres", "CREATE TABLE physical_probe AS SELECT g, md5(g::text) FROM generate_series(1, 50000) g"
    )
    dest = tmp_path_factory.mktemp("physical")
    return physical.create_base_backup(str(dest), recipients)


@pytest.fixture
def reachable(tmp_path):
    """A scratch folder the postgres user can reach (pytest's own are root-only)."""
    folder = tempfile.mkdtemp(prefix="pgbackup-physical-")
    os.chmod(folder, 0o755)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    yield pathlib.Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def restore_target(folder):
    return folder / "restored"


def test_base_backup_set_has_wal_positions_and_manifest(base_set):
    assert base_set["kind"] == "physical"
    assert base_set["wal"]["start_lsn"] and base_set["wal"]["end_lsn"]
    assert [part["path"] for part in base_set["base"]] == ["base.1.tar.enc", "base.2.tar.enc"]
    assert sum(part["plaintext_size"] for part in base_set["base"]) > 10_000_000
    for part in base_set["base"]:
        assert os.stat(os.path.join(base_set["path"], part["path"])).st_mode & 0o777 == 0o600


def test_restored_copy_verifies_and_starts_with_the_data(base_set, key, reachable, cluster):
    target = restore_target(reachable)
    report = physical.restore_base(base_set["path"], key, str(target))
    assert report["target_dir"] == str(target)
    assert (target / "backup_manifest").exists() and (target / "PG_VERSION").exists()
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres:postgres", str(target)], check=True)
    port = free_port()
    as_cluster_owner(
        [
            f"{PG_BIN}/pg_ctl",
            "-D",
            str(target),
            "-w",
            "-l",
            str(reachable / "log"),
            "start",
            "-o",
            f"-p {port} -k /tmp -c listen_addresses=127.0.0.1 -c archive_mode=off -c ssl=on"
            f" -c ssl_cert_file={cluster['base']}/server.crt -c ssl_key_file={cluster['base']}/server.key",
        ]
    )
    try:
        with psycopg.connect(
            host="127.0.0.1", port=port, dbname="postgres", password=cluster["password"]
        ) as conn:
            assert conn.execute("SELECT count(*) FROM physical_probe").fetchone()[0] == 50000
    finally:
        as_cluster_owner([f"{PG_BIN}/pg_ctl", "-D", str(target), "-m", "immediate", "stop"])


def test_non_empty_target_is_refused_and_left_alone(base_set, key, tmp_path):
    target = restore_target(tmp_path)
    target.mkdir()
    (target / "PG_VERSION").write_text("precious\n")
    with pytest.raises(RefusedError, match="not empty"):
        physical.restore_base(base_set["path"], key, str(target))
    assert (target / "PG_VERSION").read_text() == "precious\n"


def test_corrupt_base_backup_leaves_no_half_restored_folder(base_set, key, tmp_path):
    damaged = tmp_path / "damaged" / base_set["name"]
    shutil.copytree(base_set["path"], damaged)
    path = damaged / base_set["base"][1]["path"]
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x10]))
    target = restore_target(tmp_path)
    with pytest.raises(CorruptError, match="failed authentication"):
        physical.restore_base(str(damaged), key, str(target))
    assert not target.exists()


def test_wrong_key_is_refused_before_anything_is_unpacked(base_set, other_key_file, tmp_path):
    other = crypto.load_key(other_key_file)
    target = restore_target(tmp_path)
    with pytest.raises(WrongKeyError, match=r"needs the key with id .* but the key.s. given have id"):
        physical.restore_base(base_set["path"], other, str(target))
    assert not target.exists()


def test_truncated_part_leaves_no_half_restored_folder(base_set, key, tmp_path):
    damaged = tmp_path / "truncated" / base_set["name"]
    shutil.copytree(base_set["path"], damaged)
    part = damaged / base_set["base"][0]["path"]
    os.truncate(part, os.path.getsize(part) // 2)
    target = restore_target(tmp_path)
    with pytest.raises(CorruptError, match="truncated"):
        physical.restore_base(str(damaged), key, str(target))
    assert not target.exists()
    assert os.path.getsize(damaged / base_set["base"][1]["path"]) == base_set["base"][1]["size"]


def test_full_disk_is_refused_before_unpacking(base_set, key, tiny_disk):
    target = tiny_disk / "restored"
    with pytest.raises(PgBackupError, match="not enough free space"):
        physical.restore_base(base_set["path"], key, str(target))
    assert not target.exists()


def resealed_copy(base_set, key, folder, edit) -> str:
    """A copy of the set whose tars went through edit(member, data) -> (member, data) or
    None, then were encrypted and sealed again for the key: a base backup that is
    authentic to the stream but not what PostgreSQL's backup_manifest describes."""
    recipients = crypto.Recipients((key.public,))
    copy = folder / "resealed" / base_set["name"]
    shutil.copytree(base_set["path"], copy)
    record = manifest.load(str(copy))
    for part in record["base"]:
        plain, edited = folder / "part.tar", folder / "edited.tar"
        with open(copy / part["path"], "rb") as source, open(plain, "wb") as target:
            crypto.decrypt_stream(source, target, key, binding=manifest.binding(str(copy), part))
        with tarfile.open(plain) as original, tarfile.open(edited, "w", format=tarfile.GNU_FORMAT) as result:
            for member in original:
                data = original.extractfile(member).read() if member.isfile() else None
                kept = edit(member, data)
                if kept is not None:
                    result.addfile(kept[0], None if kept[1] is None else io.BytesIO(kept[1]))
        with open(edited, "rb") as source, open(copy / part["path"], "wb") as target:
            stats = crypto.encrypt_stream(source, target, recipients, manifest.binding(str(copy), part))
        part.update(size=stats.encrypted_bytes, plaintext_size=stats.plaintext_bytes, sha256=stats.sha256)
    record.pop("seal")
    with open(copy / manifest.MANIFEST_NAME, "w") as handle:
        json.dump(manifest.seal(record, recipients), handle)
    return str(copy)


def test_file_missing_from_the_base_tar_is_caught_by_pg_verifybackup(base_set, key, tmp_path):
    copy = resealed_copy(
        base_set, key, tmp_path, lambda member, data: None if member.name == "PG_VERSION" else (member, data)
    )
    target = restore_target(tmp_path)
    with pytest.raises(PgBackupError, match=r"pg_verifybackup.*PG_VERSION"):
        physical.restore_base(copy, key, str(target))
    assert not target.exists()


def test_verify_checksums_reads_the_restored_files_back(base_set, key, tmp_path):
    def alter_version_file(member, data):
        if member.name == "PG_VERSION":
            data = data.replace(b"1", b"9")  # same size, other bytes
        return member, data

    copy = resealed_copy(base_set, key, tmp_path, alter_version_file)
    # The default check is structural (files and sizes, WAL): the altered bytes pass it...
    quick = physical.restore_base(copy, key, str(tmp_path / "quick"))
    assert quick["checksums_verified"] is False
    # ...reading every file back against the backup_manifest checksums does not.
    target = tmp_path / "full"
    with pytest.raises(PgBackupError, match="checksum mismatch"):
        physical.restore_base(copy, key, str(target), verify_checksums=True)
    assert not target.exists()
    report = physical.restore_base(base_set["path"], key, str(tmp_path / "intact"), verify_checksums=True)
    assert report["checksums_verified"] is True


def test_cli_basebackup_and_separate_retention(cluster, key_file, tmp_path, recipient_file):
    dest = tmp_path / "mixed"
    base = run_cli(
        "basebackup", "--dest", str(dest), "--recipient", recipient_file, check=True
    ).stdout.strip()
    logical = run_cli(
        "backup", "--dest", str(dest), "--recipient", recipient_file, "--database", "postgres", check=True
    ).stdout.strip()
    assert os.path.basename(base).startswith("physical-") and os.path.basename(logical).startswith("logical-")
    assert run_cli("verify", base, "--key-file", key_file, check=True).returncode == 0
    # min_keep counts each kind on its own: pruning logical sets never touches the base backup.
    report = retention.prune(str(dest), keep_days=0, min_keep=1, kind="logical")
    assert report["removed"] == []
    kinds = sorted(entry["kind"] for entry in retention.scan(str(dest)))
    assert kinds == ["logical", "physical"]


def sample_tar() -> bytes:
    """A tar shaped like pg_basebackup's: each directory before what is in it, empty and
    multi-block files, and a name too long for ustar (an extension header first)."""
    buffer = io.BytesIO()

    def add(name: str, size: int | None = None):
        info = tarfile.TarInfo(name)
        if size is None:
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        else:
            info.size = size
            archive.addfile(info, io.BytesIO(os.urandom(size)))

    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        add("PG_VERSION", 3)
        add("base")
        add("base/1")
        for index, size in enumerate([0, 1, 511, 512, 513, 70_000, 1_000_000, 3]):
            add(f"base/1/{index}", size)
        add("pg_wal")
        add("pg_wal/" + "long-name-" * 20, 5000)
        add("global")
        add("global/pg_control", 8192)
    return buffer.getvalue()


def contents(tar_bytes: bytes) -> dict:
    """Member name -> file content (bytes), or "directory", in the order of the tar."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        return {m.name: archive.extractfile(m).read() if m.isfile() else "directory" for m in archive}


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("block", [1, 100, 512, 4096, 1 << 20])
def test_tar_splitter_deals_whole_members_into_valid_tars(parts, block):
    original = sample_tar()
    outputs = [io.BytesIO() for _ in range(parts)]
    splitter = physical.TarSplitter(outputs)
    for offset in range(0, len(original), block):
        splitter.write(original[offset : offset + block])
    splitter.close()
    merged = {}
    directories = {name for name, value in contents(original).items() if value == "directory"}
    for output in outputs:
        part = contents(output.getvalue())
        assert directories <= part.keys(), "every part has every directory"
        order = list(part)
        for name in part:
            parent = os.path.dirname(name)
            assert not parent or order.index(parent) < order.index(name), "a directory before its files"
        assert not (merged.keys() & part.keys()) - directories, "every file is in one part only"
        merged.update(part)
    assert merged == contents(original)
    assert splitter.members == len(merged)
    if parts > 1:
        assert all(len(contents(output.getvalue())) > len(directories) for output in outputs)


def test_tar_splitter_refuses_what_is_not_a_whole_tar():
    original = bytearray(sample_tar())
    with pytest.raises(PgBackupError, match="ended early"):
        splitter = physical.TarSplitter([io.BytesIO()])
        splitter.write(bytes(original[:3000]))
        splitter.close()
    original[148] ^= 0x01  # the first header's checksum
    with pytest.raises(PgBackupError, match="bad header checksum"):
        physical.TarSplitter([io.BytesIO()]).write(bytes(original))


def test_program_dying_mid_stream_is_reported_by_its_own_error(recipients, tmp_path):
    """When the program's output stops short, the error is the program's, not the tar's,
    and no file of the half-written backup is left behind."""
    tar_file = tmp_path / "sample.tar"
    tar_file.write_bytes(sample_tar())
    argv = [
        "sh",
        "-c",
        f"head -c 2000 {tar_file}; echo 'pg_basebackup: error: connection lost' >&2; exit 1",
    ]
    writer = sets.SetWriter(str(tmp_path), "physical-20261129T040000Z", recipients, 3, 1)
    with pytest.raises(PgBackupError, match="pg_basebackup failed: pg_basebackup: error: connection lost"):
        writer.stream_program(argv, ["a.enc", "b.enc"], "pg_basebackup", splitter=physical.TarSplitter)
    assert sorted(os.listdir(tmp_path)) == ["sample.tar"]
