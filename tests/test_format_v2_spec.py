"""An independent version 2 reader written from docs/backup-format.md alone, not from crypto.py.

Only `cryptography` (X25519, HKDF-SHA256, AES-GCM), `hmac` and `zstandard` are used, so the page
and the code that wrote tests/data/test_vector_v2.json (stream and sealed manifest) cannot drift
apart unnoticed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import zlib

import pytest
import zstandard
from conftest import ROOT
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

VECTOR = os.path.join(ROOT, "tests", "data", "test_vector_v2.json")
STRANGER = X25519PrivateKey.from_private_bytes(bytes(range(200, 232)))  # a key the vector was not written for


def _vector():
    with open(VECTOR, encoding="utf-8") as handle:
        return json.load(handle)


def _hkdf(ikm, salt, info):
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def private_key(line):
    tag, hexkey = line.split()
    assert tag == "PGBACKUP-PRIVATE-KEY-V2" and len(hexkey) == 64
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hexkey))


def public_bytes(key):
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(public):
    return hashlib.sha256(b"pgbackup key id v2" + public).digest()[:8]


def parse_header(blob):
    """The header table, byte by byte; returns the fields and the header's length."""
    assert blob[:8] == b"PGBACKUP"
    version, compression, b_len, chunk_size = struct.unpack(">BBHI", blob[8:16])
    assert version == 2 and compression in (0, 1)
    assert b_len <= 1024 and 0 < chunk_size <= 16 * 1024 * 1024
    ephemeral, recipients = blob[16:48], blob[48]
    assert 1 <= recipients <= 32
    binding = blob[49 : 49 + b_len].decode("utf-8")
    stanzas_at = 49 + b_len
    stanzas = [
        (blob[at : at + 8], blob[at + 8 : at + 56])
        for at in range(stanzas_at, stanzas_at + 56 * recipients, 56)
    ]
    end = stanzas_at + 56 * recipients
    (crc,) = struct.unpack(">I", blob[end : end + 4])
    assert crc == zlib.crc32(blob[:end]), "corrupted header"
    fields = {"compression": compression, "chunk_size": chunk_size, "ephemeral": ephemeral}
    fields |= {"binding": binding, "stanzas": stanzas, "context": blob[:stanzas_at]}
    return fields, end + 4


def unwrap(fields, key):
    """The file secret from the first stanza naming `key`; InvalidTag if it does not authenticate."""
    mine = key_id(public_bytes(key))
    for kid, wrapped in fields["stanzas"]:
        if kid == mine:
            shared = key.exchange(X25519PublicKey.from_public_bytes(fields["ephemeral"]))
            salt = fields["ephemeral"] + public_bytes(key)
            wrap_key = _hkdf(shared, salt, b"pgbackup wrap v2" + fields["context"])
            return AESGCM(wrap_key).decrypt(b"\x00" * 12, wrapped, kid)
    needed = ", ".join(kid.hex() for kid, _ in fields["stanzas"])
    raise LookupError(f"no private key for this file; it needs one of {needed}")


def records(blob, key):
    """Yield each record's plaintext as it authenticates; exactly one final record, last."""
    fields, offset = parse_header(blob)
    header = blob[:offset]
    aead = AESGCM(_hkdf(unwrap(fields, key), None, b"pgbackup file key v2" + header))
    counter = 0
    while True:
        assert offset + 5 <= len(blob), "truncated without the final-chunk marker"
        kind, length = struct.unpack(">BI", blob[offset : offset + 5])
        assert kind in (0, 1) and 16 <= length <= fields["chunk_size"] + 16
        assert offset + 5 + length <= len(blob), f"truncated inside chunk {counter}"
        nonce = counter.to_bytes(8, "big") + b"\x00\x00\x00" + bytes([kind])
        yield aead.decrypt(nonce, blob[offset + 5 : offset + 5 + length], header + blob[offset : offset + 5])
        offset, counter = offset + 5 + length, counter + 1
        if kind == 1:
            break
    assert offset == len(blob), "data after its final chunk"


def decrypt(blob, key):
    fields, _ = parse_header(blob)
    payload = b"".join(records(blob, key))
    if fields["compression"] == 1:
        payload = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    return payload


def test_header_parses_per_the_table():
    vector = _vector()
    blob = bytes.fromhex(vector["file_hex"])
    fields, _ = parse_header(blob)
    assert fields["binding"] == vector["binding"]
    assert fields["chunk_size"] == vector["chunk_size"] and fields["compression"] == 1
    assert [kid.hex() for kid, _ in fields["stanzas"]] == vector["key_ids"]
    pairs = zip(vector["private_keys"], vector["public_keys"], vector["key_ids"], strict=True)
    for line, public_line, kid in pairs:
        public = public_bytes(private_key(line))
        assert public_line == "PGBACKUP-PUBLIC-KEY-V2 " + public.hex()
        assert key_id(public).hex() == kid


@pytest.mark.parametrize("index", [0, 1])
def test_each_private_key_decrypts_the_vector(index):
    vector = _vector()
    key = private_key(vector["private_keys"][index])
    assert decrypt(bytes.fromhex(vector["file_hex"]), key) == vector["plaintext"].encode()


def test_edited_binding_fails_at_the_key():
    vector = _vector()
    blob = bytearray.fromhex(vector["file_hex"])
    blob[49 + vector["binding"].index("2026")] ^= 0x01  # same length, another set: "2026" -> "3026"
    crc_at = 49 + len(vector["binding"]) + 56 * len(vector["key_ids"])
    blob[crc_at : crc_at + 4] = struct.pack(">I", zlib.crc32(bytes(blob[:crc_at])))
    fields, _ = parse_header(bytes(blob))
    assert fields["binding"] != vector["binding"]
    for line in vector["private_keys"]:
        with pytest.raises(InvalidTag):
            next(records(bytes(blob), private_key(line)))


def test_flipped_bit_fails_that_record():
    vector = _vector()
    blob = bytearray.fromhex(vector["file_hex"])
    _, offset = parse_header(bytes(blob))
    (first_length,) = struct.unpack(">I", blob[offset + 1 : offset + 5])
    second = offset + 5 + first_length
    blob[second + 5 + 3] ^= 0x10  # a ciphertext bit of record 1
    reader = records(bytes(blob), private_key(vector["private_keys"][0]))
    assert len(next(reader)) == vector["chunk_size"]  # record 0 still authenticates
    with pytest.raises(InvalidTag):
        next(reader)


def test_unrelated_key_has_no_stanza():
    vector = _vector()
    blob = bytes.fromhex(vector["file_hex"])
    assert key_id(public_bytes(STRANGER)).hex() not in vector["key_ids"]
    with pytest.raises(LookupError, match=" needs one of " + ", ".join(vector["key_ids"])):
        decrypt(blob, STRANGER)


def seal_context(manifest):
    return "\0".join(["pgbackup manifest v2", manifest["kind"], manifest["name"]]).encode("utf-8")


def unseal(manifest, key):
    """The set secret: the seal's stanzas are unwrapped exactly as a file's, with the manifest context."""
    seal = manifest["seal"]
    stanzas = [(bytes.fromhex(entry["key_id"]), bytes.fromhex(entry["wrapped"])) for entry in seal["keys"]]
    fields = {"ephemeral": bytes.fromhex(seal["ephemeral"]), "stanzas": stanzas}
    return unwrap(fields | {"context": seal_context(manifest)}, key)


def manifest_mac(manifest, key):
    context = seal_context(manifest)
    mac_key = hmac.new(unseal(manifest, key), b"pgbackup manifest mac v2" + context, hashlib.sha256).digest()
    body = {field: value for field, value in manifest.items() if field != "mac"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    # The host holds non-ASCII text: lowercase escapes, and a surrogate pair for the emoji.
    assert canonical.isascii() and b"\\u8996" in canonical and b"\\u00e9" in canonical
    assert b"\\ud83c\\udfac" in canonical
    return hmac.new(mac_key, canonical, hashlib.sha256).hexdigest()


def test_manifest_lists_the_vector_keys():
    vector = _vector()
    manifest = vector["manifest"]
    assert manifest["format_version"] == 2 and manifest["recipients"] == vector["key_ids"]
    assert [entry["key_id"] for entry in manifest["seal"]["keys"]] == vector["key_ids"]
    assert all(len(entry["wrapped"]) == 96 for entry in manifest["seal"]["keys"])
    assert len(bytes.fromhex(manifest["seal"]["ephemeral"])) == 32


@pytest.mark.parametrize("index", [0, 1])
def test_each_private_key_checks_the_manifest_mac(index):
    vector = _vector()
    key = private_key(vector["private_keys"][index])
    manifest = vector["manifest"]
    assert len(unseal(manifest, key)) == 32
    assert hmac.compare_digest(manifest_mac(manifest, key), manifest["mac"])


@pytest.mark.parametrize("index", [0, 1])
def test_edited_manifest_fails_the_mac(index):
    vector = _vector()
    manifest = vector["manifest"] | {"started_at": "2026-11-25T02:00:01Z"}
    key = private_key(vector["private_keys"][index])
    assert manifest_mac(manifest, key) != manifest["mac"]


@pytest.mark.parametrize("field, value", [("name", "logical-20261126T020000Z"), ("kind", "physical")])
def test_seal_is_bound_to_kind_and_name(field, value):
    vector = _vector()
    manifest = vector["manifest"] | {field: value}
    for line in vector["private_keys"]:
        with pytest.raises(InvalidTag):
            unseal(manifest, private_key(line))


def test_unrelated_key_has_no_seal_stanza():
    vector = _vector()
    with pytest.raises(LookupError, match=" needs one of " + ", ".join(vector["key_ids"])):
        unseal(vector["manifest"], STRANGER)
