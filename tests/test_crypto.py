"""The encrypted stream: round trips, and every kind of damage refused by name."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import struct
import subprocess

import pytest
from conftest import ROOT, run_cli
from pgbackup import crypto
from pgbackup.errors import CorruptError, KeyFileError, WrongKeyError

CHUNK = 4096  # small chunks so that tests cross many chunk boundaries cheaply
RECORD = 5  # kind byte + length


def encrypt(data: bytes, key, level=3, chunk=CHUNK) -> bytes:
    out = io.BytesIO()
    writer = crypto.EncryptingWriter(out, key, compression_level=level, threads=0, chunk_bytes=chunk)
    for start in range(0, len(data), 1000):
        writer.write(data[start : start + 1000])
    writer.close()
    return out.getvalue()


def decrypt(blob: bytes, key) -> bytes:
    out = io.BytesIO()
    crypto.decrypt_stream(io.BytesIO(blob), out, key, name="test.enc")
    return out.getvalue()


def records(blob: bytes):
    """(offset, kind, length) of each record after the header."""
    offset, found = crypto.HEADER_BYTES, []
    while offset < len(blob):
        kind, length = struct.unpack(">BI", blob[offset : offset + RECORD])
        found.append((offset, kind, length))
        offset += RECORD + length
    return found


@pytest.fixture
def incompressible():
    return os.urandom(5 * CHUNK + 123)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 200_000])
@pytest.mark.parametrize("level", [0, 3])
def test_round_trip_of_any_size(key, size, level):
    data = os.urandom(size // 2) + b"watch history " * (size // 28)
    data = data[:size]
    assert decrypt(encrypt(data, key, level=level), key) == data


def test_stats_report_sizes_and_hash_of_the_written_bytes(key):
    out = io.BytesIO()
    stats = crypto.encrypt_stream(io.BytesIO(b"x" * 100_000), out, key)
    import hashlib

    assert stats.plaintext_bytes == 100_000
    assert stats.encrypted_bytes == len(out.getvalue())
    assert stats.sha256 == hashlib.sha256(out.getvalue()).hexdigest()
    assert stats.encrypted_bytes < 1000, "zstd should shrink a repeated byte"


def test_ciphertext_differs_for_the_same_input(key):
    assert encrypt(b"same", key) != encrypt(b"same", key)


def test_wrong_key_names_both_key_ids(key, other_key_file):
    other = crypto.load_key(other_key_file)
    with pytest.raises(WrongKeyError, match=f"key id {key.key_id}.*key id {other.key_id}"):
        decrypt(encrypt(b"secret", key), other)


def test_empty_file_is_not_a_backup(key):
    with pytest.raises(CorruptError, match="is empty"):
        decrypt(b"", key)


def test_foreign_file_is_named_as_such(key):
    with pytest.raises(CorruptError, match="not a pgbackup encrypted file"):
        decrypt(b"PGDMP\x01\x0e\x00" + os.urandom(200), key)


@pytest.mark.parametrize("offset", [9, 12, 20, 40, crypto.HEADER_BYTES - 1])
def test_bit_flip_in_header_is_reported_as_corrupted_header(key, incompressible, offset):
    blob = bytearray(encrypt(incompressible, key))
    blob[offset] ^= 0x01
    with pytest.raises(CorruptError, match="corrupted header"):
        decrypt(bytes(blob), key)


def test_bit_flip_in_body_fails_authentication_of_that_chunk(key, incompressible):
    blob = bytearray(encrypt(incompressible, key, level=0))
    third = records(bytes(blob))[2]
    blob[third[0] + RECORD + 100] ^= 0x80
    with pytest.raises(CorruptError, match="chunk 2 failed authentication"):
        decrypt(bytes(blob), key)


def test_bit_flip_in_tag_fails_authentication(key, incompressible):
    blob = bytearray(encrypt(incompressible, key, level=0))
    offset, _kind, length = records(bytes(blob))[0]
    blob[offset + RECORD + length - 1] ^= 0x01
    with pytest.raises(CorruptError, match="chunk 0 failed authentication"):
        decrypt(bytes(blob), key)


def test_flipping_the_final_marker_is_detected(key, incompressible):
    blob = bytearray(encrypt(incompressible, key, level=0))
    last = records(bytes(blob))[-1]
    blob[last[0]] = crypto.RECORD_DATA
    with pytest.raises(CorruptError, match="failed authentication"):
        decrypt(bytes(blob), key)


def test_truncation_at_a_chunk_boundary_is_detected(key, incompressible):
    blob = encrypt(incompressible, key, level=0)
    last = records(blob)[-1]
    with pytest.raises(
        CorruptError, match=r"truncated: it ends after chunk 5 without the final-chunk marker"
    ):
        decrypt(blob[: last[0]], key)


@pytest.mark.parametrize("cut", [1, 3, 100])
def test_truncation_mid_chunk_is_detected(key, incompressible, cut):
    blob = encrypt(incompressible, key, level=0)
    second = records(blob)[1]
    with pytest.raises(CorruptError, match="truncated inside chunk 1"):
        decrypt(blob[: second[0] + cut], key)


def test_truncation_inside_the_header_is_detected(key):
    with pytest.raises(CorruptError, match="truncated inside its header"):
        decrypt(encrypt(b"abc", key)[:20], key)


def test_swapped_chunks_are_detected(key, incompressible):
    blob = encrypt(incompressible, key, level=0)
    (a, _, la), (b, _, lb) = records(blob)[1:3]
    first, second = blob[a : a + RECORD + la], blob[b : b + RECORD + lb]
    swapped = blob[:a] + second + first + blob[b + RECORD + lb :]
    with pytest.raises(CorruptError, match="chunk 1 failed authentication"):
        decrypt(swapped, key)


def test_chunk_spliced_from_another_file_is_detected(key, incompressible):
    one, two = encrypt(incompressible, key, level=0), encrypt(incompressible, key, level=0)
    offset, _, length = records(one)[1]
    spliced = one[:offset] + two[offset : offset + RECORD + length] + one[offset + RECORD + length :]
    with pytest.raises(CorruptError, match="chunk 1 failed authentication"):
        decrypt(spliced, key)


def test_data_after_the_final_chunk_is_detected(key):
    with pytest.raises(CorruptError, match="data after its final chunk"):
        decrypt(encrypt(b"abc", key) + b"\x00", key)


def test_oversized_record_length_is_rejected_before_reading(key, incompressible):
    blob = bytearray(encrypt(incompressible, key, level=0))
    offset = records(bytes(blob))[0][0]
    blob[offset + 1 : offset + RECORD] = struct.pack(">I", 1 << 30)
    with pytest.raises(CorruptError, match="corrupted record header"):
        decrypt(bytes(blob), key)


def test_unclosed_writer_reads_as_truncated(key):
    out = io.BytesIO()
    writer = crypto.EncryptingWriter(out, key, chunk_bytes=CHUNK, threads=0)
    writer.write(os.urandom(3 * CHUNK))
    with pytest.raises(CorruptError, match="without the final-chunk marker"):
        decrypt(out.getvalue(), key)


# ---- key files -----------------------------------------------------------------


def test_keygen_writes_a_private_key_and_never_overwrites(tmp_path):
    path = str(tmp_path / "k")
    key = crypto.generate_key_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert crypto.load_key(path) == key
    with pytest.raises(KeyFileError, match="already exists"):
        crypto.generate_key_file(path)
    assert crypto.load_key(path) == key


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "malformed"),
        (b"00" * 16, "malformed"),
        (b"zz" * 32, "not hexadecimal"),
        (b"00" * 33, "malformed"),
    ],
)
def test_bad_key_files_stop_the_run(tmp_path, content, message):
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=message):
        crypto.load_key(str(path))


WEAK_KEYS = [b"00" * 32, b"ff" * 32 + b"\n", b"0123456789abcdef" * 4]  # the first: vault.yml.example's


@pytest.mark.parametrize("content", WEAK_KEYS)
def test_a_key_that_is_not_random_makes_no_new_backup(tmp_path, content):
    path = tmp_path / "weak.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="is not a random key"):
        crypto.load_key(str(path), writing=True)
    result = run_cli("encrypt", "--key-file", str(path), stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and "is not a random key" in result.stderr


def test_sets_made_with_a_weak_key_stay_readable_with_a_warning(tmp_path, caplog):
    """Hosts that kept the example's key before it was refused can still restore."""
    weak = crypto.Key.from_bytes(bytes(32))
    sealed = io.BytesIO()
    crypto.encrypt_stream(io.BytesIO(b"rows of an old backup"), sealed, weak)
    path = tmp_path / "weak.key"
    path.write_bytes(WEAK_KEYS[0])
    path.chmod(0o600)
    with caplog.at_level("WARNING", logger="pgbackup"):
        key = crypto.load_key(str(path))
    assert "is not a random key" in caplog.text
    assert decrypt(sealed.getvalue(), key) == b"rows of an old backup"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_key_file_open_to_other_users_is_refused(key_file, tmp_path, mode):
    path = tmp_path / "loose.key"
    path.write_bytes(open(key_file, "rb").read())
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=f"has mode {mode:04o}: other users may read it"):
        crypto.load_key(str(path))
    path.chmod(0o600)
    assert crypto.load_key(str(path)).key_id == crypto.load_key(key_file).key_id


def test_example_key_of_the_inventory_is_refused():
    example = os.path.join(ROOT, "inventories", "production", "group_vars", "postgresql", "vault.yml.example")
    with open(example) as handle:
        value = re.search(r'^vault_backup_key: "(.*)"$', handle.read(), re.MULTILINE).group(1)
    with pytest.raises(KeyFileError, match="not a random key"):
        crypto.parse_key(value.encode(), "the example key", writing=True)


def test_missing_key_file_says_how_to_make_one(tmp_path):
    with pytest.raises(KeyFileError, match=r"does not exist.*keygen"):
        crypto.load_key(str(tmp_path / "absent.key"))


def test_key_id_is_stable_and_does_not_reveal_the_key(key):
    assert crypto.Key.from_bytes(key.material).key_id == key.key_id
    assert key.key_id not in key.material.hex()
    assert key.material.hex() not in repr(key)


# ---- the CLI face ---------------------------------------------------------------


def test_cli_encrypt_decrypt_round_trip(key_file, tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(os.urandom(100_000) + b"abc" * 50_000)
    enc = tmp_path / "enc"
    dec = tmp_path / "dec"
    with plain.open("rb") as src, enc.open("wb") as dst:
        run_cli("encrypt", "--key-file", key_file, stdin=src, stdout=dst, check=True)
    with enc.open("rb") as src, dec.open("wb") as dst:
        run_cli("decrypt", "--key-file", key_file, stdin=src, stdout=dst, check=True)
    assert dec.read_bytes() == plain.read_bytes()


def test_cli_with_malformed_key_fails_with_one_line(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("short\n")
    result = run_cli("backup", "--dest", str(tmp_path / "out"), "--key-file", str(bad))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("pgbackup: error: key file")
    assert not (tmp_path / "out").exists(), "nothing may be written before the key is known good"


# ---- the documented test vector ---------------------------------------------------


def _vector():
    with open(os.path.join(ROOT, "tests", "data", "test_vector.json")) as handle:
        return json.load(handle)


def test_documented_vector_decrypts():
    vector = _vector()
    key = crypto.Key.from_bytes(bytes.fromhex(vector["key_hex"]))
    assert key.key_id == vector["key_id"]
    assert decrypt(bytes.fromhex(vector["file_hex"]), key) == vector["plaintext"].encode()


def test_documented_vector_decrypts_from_the_spec_alone():
    """An independent reader written from docs/backup-format.md, not from crypto.py."""
    import zstandard
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    vector = _vector()
    blob = bytes.fromhex(vector["file_hex"])
    header = blob[:60]
    assert header[:8] == b"PGBACKUP"
    salt = header[24:56]
    file_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=salt, info=b"pgbackup file key v1" + header
    ).derive(bytes.fromhex(vector["key_hex"]))
    aead, offset, counter, payload = AESGCM(file_key), 60, 0, b""
    while True:
        kind, length = struct.unpack(">BI", blob[offset : offset + 5])
        nonce = counter.to_bytes(8, "big") + b"\x00\x00\x00" + bytes([kind])
        payload += aead.decrypt(
            nonce, blob[offset + 5 : offset + 5 + length], header + blob[offset : offset + 5]
        )
        offset, counter = offset + 5 + length, counter + 1
        if kind == 1:
            break
    assert offset == len(blob)
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    assert plain == vector["plaintext"].encode()
