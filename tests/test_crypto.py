"""The encrypted stream, both format versions: round trips, and every kind of damage refused by name.

Every stream test runs twice, through the `version` fixture: for format version 2 (what new
files are written in: X25519 recipients, a per-file secret wrapped per recipient, a binding to
`<set name>/<path>` in the header) and for version 1 (one symmetric key; still readable, still
written by tests). Header offsets come from the byte tables of docs/backup-format.md.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import stat
import struct
import subprocess
import zlib
from dataclasses import dataclass

import pytest
from conftest import ROOT, run_cli, version1_key_file
from pgbackup import crypto
from pgbackup.errors import CorruptError, KeyFileError, PgBackupError, WrongKeyError

CHUNK = 4096  # small chunks so that tests cross many chunk boundaries cheaply
RECORD = 5  # kind byte + length
STANZA = 56  # key id (8) + wrapped file secret (48)
BINDING = "logical-20261125T020000Z/db-002-streaming.dump.enc"
AUTH_FAILED = r"fails authentication|failed authentication"  # at the key unwrap, or at a chunk


# ---- helpers ----------------------------------------------------------------------


def encrypt(data: bytes, to, level=3, chunk=CHUNK, binding=BINDING) -> bytes:
    out = io.BytesIO()
    writer = crypto.EncryptingWriter(
        out, to, binding=binding, compression_level=level, threads=0, chunk_bytes=chunk
    )
    for start in range(0, len(data), 1000):
        writer.write(data[start : start + 1000])
    writer.close()
    return out.getvalue()


def decrypt(blob: bytes, keys, binding=BINDING) -> bytes:
    out = io.BytesIO()
    crypto.decrypt_stream(io.BytesIO(blob), out, keys, name="test.enc", binding=binding)
    return out.getvalue()


def structure(blob: bytes, binding=BINDING):
    return crypto.check_structure(io.BytesIO(blob), "test.enc", binding=binding)


def header_length(blob: bytes) -> int:
    """The header's length, from its own bytes as docs/backup-format.md lays them out."""
    if blob[8] == crypto.VERSION_SYMMETRIC:
        return 60
    (binding_bytes,) = struct.unpack(">H", blob[10:12])
    return 49 + binding_bytes + STANZA * blob[48] + 4


def header_fields(blob: bytes) -> dict[str, int]:
    """An offset inside each field of the header."""
    if blob[8] == crypto.VERSION_SYMMETRIC:
        return {"compression": 9, "reserved": 11, "chunk size": 14, "key id": 20, "salt": 40, "crc": 59}
    stanzas = 49 + struct.unpack(">H", blob[10:12])[0]
    return {
        "compression": 9,
        "binding length": 11,
        "chunk size": 14,  # 4096 = 00 00 10 00: one flip keeps it a valid size
        "ephemeral key": 20,
        "recipient count": 48,
        "binding": 49 + 2,
        "stanza key id": stanzas + 3,
        "stanza wrapped secret": stanzas + 8 + 20,
        "crc": header_length(blob) - 1,
    }


def with_crc(blob: bytes | bytearray) -> bytes:
    """The blob with its header's CRC-32 recomputed (what a deliberate edit would do)."""
    blob = bytearray(blob)
    end = header_length(bytes(blob)) - 4
    blob[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(blob[:end])))
    return bytes(blob)


def records(blob: bytes):
    """(offset, kind, length) of each record after the header."""
    offset, found = header_length(blob), []
    while offset < len(blob):
        kind, length = struct.unpack(">BI", blob[offset : offset + RECORD])
        found.append((offset, kind, length))
        offset += RECORD + length
    return found


def write_key(path, text: str, mode=0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


@dataclass(frozen=True)
class Version:
    number: int
    to: object  # what a writer encrypts for: Recipients (2) or a SymmetricKey (1)
    key: object  # the one key that reads it: a PrivateKey (2) or the SymmetricKey (1)
    other: object  # a key of the same version that does not read it

    @property
    def keys(self) -> crypto.KeyRing:
        """What a reader holds (the CLI's --key-file makes a ring)."""
        return crypto.KeyRing([self.key])


@pytest.fixture(params=[2, 1], ids=["v2", "v1"])
def version(request, key, recipients, other_key_file, tmp_path):
    if request.param == crypto.VERSION_PUBLIC_KEY:
        return Version(2, recipients, key, crypto.load_key(other_key_file))
    mine = crypto.load_key(version1_key_file(tmp_path / "v1.key"))
    other = crypto.load_key(version1_key_file(tmp_path / "v1-other.key"))
    assert isinstance(mine, crypto.SymmetricKey)
    return Version(1, mine, mine, other)


def per_version(v1: list[str], v2: list[str]):
    """Parameters (version, name) for a test whose cases differ between the versions."""
    return [pytest.param(2, name, id=f"v2-{name}") for name in v2] + [
        pytest.param(1, name, id=f"v1-{name}") for name in v1
    ]


@pytest.fixture
def incompressible():
    return os.urandom(5 * CHUNK + 123)


@pytest.fixture
def pair(tmp_path):
    """Make another key pair; returns its private key."""

    def make(name):
        return crypto.generate_key_pair(str(tmp_path / f"{name}.key"))

    return make


# ---- round trips (both versions) ------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 200_000])
@pytest.mark.parametrize("level", [0, 3])
def test_round_trip_of_any_size(version, size, level):
    data = os.urandom(size // 2) + b"watch history " * (size // 28)
    data = data[:size]
    blob = encrypt(data, version.to, level=level)
    assert blob[8] == version.number
    assert decrypt(blob, version.keys) == data


def test_a_single_key_or_a_ring_reads(version):
    blob = encrypt(b"rows", version.to)
    assert decrypt(blob, version.key) == b"rows"
    assert decrypt(blob, crypto.KeyRing([version.other, version.key])) == b"rows"


def test_stats_report_sizes_and_hash_of_the_written_bytes(version):
    out = io.BytesIO()
    stats = crypto.encrypt_stream(io.BytesIO(b"x" * 100_000), out, version.to, binding=BINDING)
    assert stats.plaintext_bytes == 100_000
    assert stats.encrypted_bytes == len(out.getvalue())
    assert stats.sha256 == hashlib.sha256(out.getvalue()).hexdigest()
    assert stats.encrypted_bytes < 1000, "zstd should shrink a repeated byte"
    target = io.BytesIO()
    read = crypto.decrypt_stream(io.BytesIO(out.getvalue()), target, version.keys, binding=BINDING)
    assert (read.plaintext_bytes, read.encrypted_bytes, read.sha256) == (
        100_000,
        stats.encrypted_bytes,
        stats.sha256,
    )


def test_ciphertext_differs_for_the_same_input(version):
    one, two = encrypt(b"same", version.to), encrypt(b"same", version.to)
    assert one != two
    # a new salt (1) or a new one-time key and file secret (2) for every file
    assert one[: header_length(one) - 4] != two[: header_length(two) - 4]


def test_wrong_key_names_both_key_ids(version):
    blob = encrypt(b"secret", version.to)
    pattern = (
        f"needs the key with id {version.key.key_id}, but the key\\(s\\) given have id {version.other.key_id}"
    )
    with pytest.raises(WrongKeyError, match=pattern):
        decrypt(blob, version.other)


def test_a_key_of_the_other_version_is_a_wrong_key(version, tmp_path, key):
    blob = encrypt(b"secret", version.to)
    wrong = key if version.number == 1 else crypto.load_key(version1_key_file(tmp_path / "old.key"))
    with pytest.raises(WrongKeyError, match=f"needs the key with id {version.key.key_id}, .* {wrong.key_id}"):
        decrypt(blob, wrong)


def test_a_ring_with_keys_of_both_versions_reads_both(key, recipients, tmp_path):
    old = crypto.load_key(version1_key_file(tmp_path / "old.key"))
    ring = crypto.KeyRing([key, old])
    assert decrypt(encrypt(b"new set", recipients), ring) == b"new set"
    assert decrypt(encrypt(b"old set", old), ring) == b"old set"


def test_a_key_ring_folder_reads_both_versions(key_file, recipients, tmp_path):
    folder = tmp_path / "ring"
    folder.mkdir()
    old = crypto.load_key(version1_key_file(folder / "old.key"))
    write_key(folder / "ops.key", open(key_file).read())
    write_key(folder / "ops.key.pub", open(f"{key_file}.pub").read(), 0o644)  # not a *.key: skipped
    ring = crypto.load_key_ring([str(folder)])
    assert ring.key_ids == sorted([old.key_id, recipients.key_ids[0]])
    assert decrypt(encrypt(b"new", recipients), ring) == b"new"
    assert decrypt(encrypt(b"old", old), ring) == b"old"


def test_empty_file_is_not_a_backup(version):
    with pytest.raises(CorruptError, match="is empty"):
        decrypt(b"", version.keys)


def test_foreign_file_is_named_as_such(version):
    with pytest.raises(CorruptError, match="not a pgbackup encrypted file"):
        decrypt(b"PGDMP\x01\x0e\x00" + os.urandom(200), version.keys)


def test_an_unknown_format_version_is_named(version):
    blob = bytearray(encrypt(b"abc", version.to))
    blob[8] = 3  # a reader that does not know version 3 takes a 60-byte header, as version 1 has
    blob[56:60] = struct.pack(">I", zlib.crc32(bytes(blob[:56])))
    with pytest.raises(CorruptError, match="uses format version 3; this pgbackup reads versions 1 and 2"):
        decrypt(bytes(blob), version.keys)


# ---- damage (both versions) ---------------------------------------------------------

V1_FIELDS = ["compression", "reserved", "chunk size", "key id", "salt", "crc"]
V2_FIELDS = [
    "compression",
    "binding length",
    "chunk size",
    "ephemeral key",
    "recipient count",
    "binding",
    "stanza key id",
    "stanza wrapped secret",
    "crc",
]


@pytest.mark.parametrize(("version", "field"), per_version(V1_FIELDS, V2_FIELDS), indirect=["version"])
def test_bit_flip_in_header_is_reported_as_corrupted_header(version, incompressible, field):
    blob = bytearray(encrypt(incompressible, version.to))
    blob[header_fields(bytes(blob))[field]] ^= 0x01
    with pytest.raises(CorruptError, match="corrupted header"):
        decrypt(bytes(blob), version.keys)
    with pytest.raises(CorruptError, match="corrupted header"):
        structure(bytes(blob))


EDITABLE_V1 = ["compression", "reserved", "chunk size", "key id", "salt"]
EDITABLE_V2 = [
    "compression",
    "chunk size",
    "ephemeral key",
    "binding",
    "stanza key id",
    "stanza wrapped secret",
]


@pytest.mark.parametrize(("version", "field"), per_version(EDITABLE_V1, EDITABLE_V2), indirect=["version"])
def test_header_edited_with_its_crc_recomputed_decrypts_nothing(version, incompressible, field):
    """The CRC only tells damage from a foreign file; the header itself is authenticated."""
    blob = bytearray(encrypt(incompressible, version.to))
    blob[header_fields(bytes(blob))[field]] ^= 0x01
    edited = with_crc(blob)
    header = crypto.parse_header(edited[: header_length(edited)], "test.enc")  # the CRC passes
    if field.endswith("key id"):
        # the file now names a key nobody holds
        with pytest.raises(WrongKeyError, match="needs the key with id"):
            decrypt(edited, version.keys, binding=None)
        return
    with pytest.raises(CorruptError, match=AUTH_FAILED):
        decrypt(edited, version.keys, binding=header.binding if version.number == 2 else None)


def test_bit_flip_in_body_fails_authentication_of_that_chunk(version, incompressible):
    blob = bytearray(encrypt(incompressible, version.to, level=0))
    third = records(bytes(blob))[2]
    blob[third[0] + RECORD + 100] ^= 0x80
    with pytest.raises(CorruptError, match="chunk 2 failed authentication"):
        decrypt(bytes(blob), version.keys)


def test_bit_flip_in_tag_fails_authentication(version, incompressible):
    blob = bytearray(encrypt(incompressible, version.to, level=0))
    offset, _kind, length = records(bytes(blob))[0]
    blob[offset + RECORD + length - 1] ^= 0x01
    with pytest.raises(CorruptError, match="chunk 0 failed authentication"):
        decrypt(bytes(blob), version.keys)


def test_flipping_the_final_marker_is_detected(version, incompressible):
    blob = bytearray(encrypt(incompressible, version.to, level=0))
    last = records(bytes(blob))[-1]
    assert last[1] == crypto.RECORD_FINAL
    blob[last[0]] = crypto.RECORD_DATA
    with pytest.raises(CorruptError, match="chunk 5 failed authentication"):
        decrypt(bytes(blob), version.keys)


def test_marking_a_data_chunk_final_is_detected(version, incompressible):
    blob = bytearray(encrypt(incompressible, version.to, level=0))
    offset, _, _ = records(bytes(blob))[2]
    blob[offset] = crypto.RECORD_FINAL
    with pytest.raises(CorruptError, match="chunk 2 failed authentication"):
        decrypt(bytes(blob), version.keys)


def test_truncation_at_a_chunk_boundary_is_detected(version, incompressible):
    blob = encrypt(incompressible, version.to, level=0)
    last = records(blob)[-1]
    with pytest.raises(
        CorruptError, match=r"truncated: it ends after chunk 5 without the final-chunk marker"
    ):
        decrypt(blob[: last[0]], version.keys)


def test_a_header_alone_is_truncated(version):
    blob = encrypt(b"abc", version.to)
    with pytest.raises(CorruptError, match=r"truncated: it ends after chunk 0 without the final-chunk"):
        decrypt(blob[: header_length(blob)], version.keys)


@pytest.mark.parametrize("cut", [1, 3, 100])
def test_truncation_mid_chunk_is_detected(version, incompressible, cut):
    blob = encrypt(incompressible, version.to, level=0)
    second = records(blob)[1]
    with pytest.raises(CorruptError, match="truncated inside chunk 1"):
        decrypt(blob[: second[0] + cut], version.keys)


def header_cuts(blob: bytes) -> dict[str, int]:
    if blob[8] == crypto.VERSION_SYMMETRIC:
        return {"magic": 5, "start": 12, "key id": 20, "salt": 40, "crc": 58}
    stanzas = 49 + struct.unpack(">H", blob[10:12])[0]
    return {
        "magic": 5,
        "start": 12,
        "ephemeral key": 30,
        "binding": 49 + 2,
        "stanza": stanzas + 20,
        "crc": header_length(blob) - 2,
    }


@pytest.mark.parametrize(
    ("version", "where"),
    per_version(
        ["magic", "start", "key id", "salt", "crc"],
        ["magic", "start", "ephemeral key", "binding", "stanza", "crc"],
    ),
    indirect=["version"],
)
def test_truncation_inside_the_header_is_detected(version, where):
    blob = encrypt(b"abc", version.to)
    cut = blob[: header_cuts(blob)[where]]
    with pytest.raises(CorruptError, match="truncated inside its header"):
        decrypt(cut, version.keys)
    with pytest.raises(CorruptError, match="truncated inside its header"):
        structure(cut)


def test_swapped_chunks_are_detected(version, incompressible):
    blob = encrypt(incompressible, version.to, level=0)
    (a, _, la), (b, _, lb) = records(blob)[1:3]
    first, second = blob[a : a + RECORD + la], blob[b : b + RECORD + lb]
    swapped = blob[:a] + second + first + blob[b + RECORD + lb :]
    with pytest.raises(CorruptError, match="chunk 1 failed authentication"):
        decrypt(swapped, version.keys)


def test_chunk_spliced_from_another_file_is_detected(version, incompressible):
    one, two = encrypt(incompressible, version.to, level=0), encrypt(incompressible, version.to, level=0)
    offset, _, length = records(one)[1]
    assert records(two)[1][0] == offset
    spliced = one[:offset] + two[offset : offset + RECORD + length] + one[offset + RECORD + length :]
    with pytest.raises(CorruptError, match="chunk 1 failed authentication"):
        decrypt(spliced, version.keys)


def test_another_files_header_on_this_body_is_detected(version, incompressible):
    one, two = encrypt(incompressible, version.to, level=0), encrypt(incompressible, version.to, level=0)
    grafted = two[: header_length(two)] + one[header_length(one) :]
    with pytest.raises(CorruptError, match="chunk 0 failed authentication"):
        decrypt(grafted, version.keys)


def test_data_after_the_final_chunk_is_detected(version):
    with pytest.raises(CorruptError, match="data after its final chunk"):
        decrypt(encrypt(b"abc", version.to) + b"\x00", version.keys)


def test_oversized_record_length_is_rejected_before_reading(version, incompressible):
    blob = bytearray(encrypt(incompressible, version.to, level=0))
    offset = records(bytes(blob))[0][0]
    blob[offset + 1 : offset + RECORD] = struct.pack(">I", 1 << 30)
    with pytest.raises(CorruptError, match="chunk 0 has a corrupted record header"):
        decrypt(bytes(blob), version.keys)


@pytest.mark.parametrize("kind", [2, 0xFF])
def test_unknown_record_kind_is_rejected(version, kind):
    blob = bytearray(encrypt(b"abc", version.to))
    blob[header_length(bytes(blob))] = kind
    with pytest.raises(CorruptError, match="chunk 0 has a corrupted record header"):
        decrypt(bytes(blob), version.keys)


def test_unclosed_writer_reads_as_truncated(version):
    out = io.BytesIO()
    writer = crypto.EncryptingWriter(out, version.to, binding=BINDING, chunk_bytes=CHUNK, threads=0)
    writer.write(os.urandom(3 * CHUNK))
    with pytest.raises(CorruptError, match="without the final-chunk marker"):
        decrypt(out.getvalue(), version.keys)


# ---- what a host without a key can check (both versions) --------------------------------


def test_check_structure_passes_a_good_file_without_any_key(version, incompressible):
    out = io.BytesIO()
    written = crypto.encrypt_stream(io.BytesIO(incompressible), out, version.to, binding=BINDING)
    header, stats = structure(out.getvalue())
    assert header.version == version.number
    assert header.key_ids == [version.key.key_id]
    assert stats.plaintext_bytes is None, "only decrypting tells the plaintext size"
    assert (stats.encrypted_bytes, stats.sha256) == (written.encrypted_bytes, written.sha256)
    if version.number == 2:
        assert header.binding == BINDING
    # without an expected binding too
    assert structure(out.getvalue(), binding=None)[1] == stats


def test_check_structure_catches_truncation_appended_data_and_bad_lengths(version, incompressible):
    blob = encrypt(incompressible, version.to, level=0)
    found = records(blob)
    with pytest.raises(CorruptError, match="ends after chunk 5 without the final-chunk marker"):
        structure(blob[: found[-1][0]])
    with pytest.raises(CorruptError, match="truncated inside chunk 1"):
        structure(blob[: found[1][0] + 100])
    with pytest.raises(CorruptError, match="data after its final chunk"):
        structure(blob + b"\x00")
    for length in (1 << 30, CHUNK + crypto.TAG_BYTES + 1, crypto.TAG_BYTES - 1):
        damaged = bytearray(blob)
        damaged[found[2][0] + 1 : found[2][0] + RECORD] = struct.pack(">I", length)
        with pytest.raises(CorruptError, match="chunk 2 has a corrupted record header"):
            structure(bytes(damaged))


def test_check_structure_does_not_authenticate_contents_by_design(version, incompressible):
    """Framing only: a flipped ciphertext bit needs the key to be found."""
    blob = bytearray(encrypt(incompressible, version.to, level=0))
    offset, _, _ = records(bytes(blob))[3]
    blob[offset + RECORD + 7] ^= 0x04
    structure(bytes(blob))
    with pytest.raises(CorruptError, match="chunk 3 failed authentication"):
        decrypt(bytes(blob), version.keys)


# ---- version 2: recipients and bindings ------------------------------------------------


def test_a_set_for_two_recipients_decrypts_with_either_private_key_alone(key, pair, incompressible):
    escrow = pair("escrow")
    to = crypto.Recipients((key.public, escrow.public))
    blob = encrypt(incompressible, to)
    header, _ = structure(blob)
    assert header.key_ids == [key.key_id, escrow.key_id]
    assert header_length(blob) == 49 + len(BINDING) + 2 * STANZA + 4
    assert decrypt(blob, key) == incompressible
    assert decrypt(blob, escrow) == incompressible
    assert decrypt(blob, crypto.KeyRing([escrow, key])) == incompressible


def test_a_reader_holding_neither_private_key_is_told_which_it_needs(key, pair, tmp_path):
    escrow, stranger = pair("escrow"), pair("stranger")
    blob = encrypt(b"secret", crypto.Recipients((key.public, escrow.public)))
    old = crypto.load_key(version1_key_file(tmp_path / "old.key"))
    pattern = (
        f"test.enc needs the key with id {key.key_id} or {escrow.key_id}, but the key\\(s\\) given have id "
        f"{', '.join(sorted([stranger.key_id, old.key_id]))}: add that key to the key ring"
    )
    with pytest.raises(WrongKeyError, match=pattern):
        decrypt(blob, crypto.KeyRing([stranger, old]))
    with pytest.raises(WrongKeyError, match="have id none"):
        decrypt(blob, crypto.KeyRing([]))


def test_a_public_key_alone_reads_nothing(key, recipients):
    with pytest.raises(WrongKeyError, match=f"needs the key with id {key.key_id}"):
        decrypt(encrypt(b"secret", recipients), key.public)


def test_another_recipients_stanza_edited_fails_at_the_first_chunk(key, pair, incompressible):
    """The file key covers the whole header: a stanza the reader does not use still counts."""
    escrow = pair("escrow")
    blob = bytearray(encrypt(incompressible, crypto.Recipients((key.public, escrow.public))))
    escrow_stanza = 49 + len(BINDING) + STANZA
    blob[escrow_stanza + 8 + 5] ^= 0x01
    edited = with_crc(blob)
    with pytest.raises(CorruptError, match="chunk 0 failed authentication"):
        decrypt(edited, key)
    with pytest.raises(CorruptError, match=f"its key for id {escrow.key_id} fails authentication"):
        decrypt(edited, escrow)


@pytest.mark.parametrize(
    "expected",
    [
        "logical-20261126T020000Z/db-002-streaming.dump.enc",  # moved to another set
        "logical-20261125T020000Z/db-003-streaming.dump.enc",  # renamed within its set
        "",
    ],
)
def test_a_file_read_for_another_binding_is_refused(recipients, key, expected):
    blob = encrypt(b"rows", recipients)
    message = re.escape(
        f"test.enc was written as {BINDING!r}, not {expected!r}: "
        "a file moved between sets or renamed is refused"
    )
    with pytest.raises(CorruptError, match=message):
        decrypt(blob, key, binding=expected)
    with pytest.raises(CorruptError, match=message):
        structure(blob, binding=expected)  # no key needed
    with pytest.raises(CorruptError, match=message):
        decrypt(blob, crypto.KeyRing([]), binding=expected)  # refused before any key is looked for
    assert decrypt(blob, key, binding=None) == b"rows", "a lone decrypt checks no binding"


def test_a_version_1_file_has_no_binding_to_check(tmp_path):
    old = crypto.load_key(version1_key_file(tmp_path / "old.key"))
    blob = encrypt(b"rows", old, binding="ignored/for/version-1")
    assert crypto.parse_header(blob[:60], "test.enc").binding == ""
    assert decrypt(blob, old, binding="logical-x/anything") == b"rows"


@pytest.mark.parametrize(
    "new_binding",
    [
        BINDING.replace("20261125", "20261126"),  # same length: only the binding and the CRC change
        BINDING.replace("streaming", "accounts-and-streaming"),  # longer: its length field too
        "",
    ],
)
def test_a_binding_edited_with_its_crc_recomputed_fails(recipients, key, incompressible, new_binding):
    blob = encrypt(incompressible, recipients)
    old, new = BINDING.encode(), new_binding.encode()
    start = blob[:10] + struct.pack(">H", len(new)) + blob[12:49]  # the binding's length at offset 10
    edited = with_crc(start + new + blob[49 + len(old) :])
    header, _ = structure(edited, binding=new_binding)  # the framing checks out ...
    assert header.binding == new_binding
    # ... but the binding is in every wrap's context: the file secret does not unwrap
    with pytest.raises(CorruptError, match=f"its key for id {key.key_id} fails authentication"):
        decrypt(edited, key, binding=new_binding)


def test_a_binding_is_utf8_and_at_most_1024_bytes(recipients, key):
    unicode = "logical-20261125T020000Z/db-004-zuschauer-視聴者.dump.enc"
    blob = encrypt(b"rows", recipients, binding=unicode)
    assert structure(blob, binding=unicode)[0].binding == unicode
    assert decrypt(blob, key, binding=unicode) == b"rows"
    longest = "x" * crypto.MAX_BINDING_BYTES
    assert decrypt(encrypt(b"rows", recipients, binding=longest), key, binding=longest) == b"rows"
    with pytest.raises(PgBackupError, match="at most 1024 bytes"):
        encrypt(b"rows", recipients, binding=longest + "x")


def test_a_writer_is_given_public_keys_not_a_key_that_reads(key):
    for wrong in (key, key.public):
        with pytest.raises(PgBackupError, match=r"cannot encrypt for .*give public keys"):
            crypto.EncryptingWriter(io.BytesIO(), wrong)


def test_recipients_number_one_to_32(pair):
    with pytest.raises(KeyFileError, match="no recipient"):
        crypto.Recipients(())
    publics = tuple(crypto.PrivateKey.generate().public for _ in range(crypto.MAX_RECIPIENTS + 1))
    with pytest.raises(KeyFileError, match="at most 32 recipients"):
        crypto.Recipients(publics)
    readers = [crypto.PrivateKey.generate() for _ in range(crypto.MAX_RECIPIENTS)]
    blob = encrypt(b"rows", crypto.Recipients(tuple(reader.public for reader in readers)))
    assert decrypt(blob, readers[-1]) == b"rows"


# ---- key files ------------------------------------------------------------------------


def test_keygen_writes_a_private_and_a_public_key_and_never_overwrites(tmp_path):
    path = str(tmp_path / "ops.key")
    saved = os.umask(0o077)  # the CLI's umask: the public key must still come out 0644
    try:
        key = crypto.generate_key_pair(path, comment="operations, 2026")
    finally:
        os.umask(saved)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(f"{path}.pub").st_mode) == 0o644
    assert crypto.load_key(path) == key
    assert crypto.load_recipients([f"{path}.pub"]).keys == (key.public,)
    private_text, public_text = open(path).read(), open(f"{path}.pub").read()
    assert key.material.hex() not in public_text
    assert f"key id {key.key_id} (operations, 2026)" in private_text
    assert f"key id {key.key_id} (operations, 2026)" in public_text
    with pytest.raises(KeyFileError, match="already exists; refusing to overwrite"):
        crypto.generate_key_pair(path)
    assert (open(path).read(), open(f"{path}.pub").read()) == (private_text, public_text)


def test_keygen_writes_the_public_key_where_asked(tmp_path):
    path, public = str(tmp_path / "escrow.key"), str(tmp_path / "elsewhere.pub")
    key = crypto.generate_key_pair(path, public)
    assert not os.path.exists(f"{path}.pub")
    assert crypto.load_recipients([public]).key_ids == [key.key_id]


def test_keygen_refusing_an_existing_public_key_leaves_no_private_key(tmp_path):
    path = tmp_path / "ops.key"
    write_key(tmp_path / "ops.key.pub", "PGBACKUP-PUBLIC-KEY-V2 " + "ab" * 32 + "\n", 0o644)
    with pytest.raises(KeyFileError, match="already exists"):
        crypto.generate_key_pair(str(path))
    assert not path.exists(), "a private key without its public key was left behind"


def test_cli_keygen_writes_both_files_and_never_overwrites(tmp_path):
    path = str(tmp_path / "ops.key")
    result = run_cli("keygen", "--key-file", path, "--comment", "ops", check=True)
    key = crypto.load_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(f"{path}.pub").st_mode) == 0o644
    assert key.public.text() in result.stdout and key.key_id in result.stdout
    assert key.material.hex() not in result.stdout + result.stderr
    again = run_cli("keygen", "--key-file", path)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert crypto.load_key(path) == key


def test_load_recipients_refuses_a_key_that_reads_backups(key_file, tmp_path):
    old = version1_key_file(tmp_path / "old.key")
    for path in (key_file, old):
        with pytest.raises(KeyFileError, match="a host that writes backups needs only the public key"):
            crypto.load_recipients([path])


def test_load_recipients_takes_files_and_folders_without_repeats(key, recipient_file, pair, tmp_path):
    folder = tmp_path / "recipients"
    folder.mkdir()
    escrow = pair("escrow")
    write_key(folder / "escrow.pub", escrow.public.text() + "\n", 0o644)
    write_key(folder / "ops.pub", open(recipient_file).read(), 0o644)
    write_key(folder / "ops.key", key.text() + "\n")  # not a *.pub: never read
    to = crypto.load_recipients([recipient_file, str(folder)])
    assert to.key_ids == [key.key_id, escrow.key_id]


def test_load_key_refuses_a_public_key(recipient_file, tmp_path):
    with pytest.raises(KeyFileError):
        crypto.load_key(recipient_file)  # as keygen wrote it (0644)
    private_mode = write_key(tmp_path / "copy.pub", open(recipient_file).read())
    with pytest.raises(
        KeyFileError, match=r"holds a public key .* cannot read them; give the private key file"
    ):
        crypto.load_key(private_mode)


def test_load_key_names_a_public_key_file_as_such(recipient_file):
    with pytest.raises(KeyFileError, match="holds a public key"):
        crypto.load_key(recipient_file)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "malformed: expected one key line, found 0"),
        (b"# only a comment\n", "malformed: expected one key line, found 0"),
        (b"00" * 16, "malformed: expected 64 hexadecimal characters"),
        (b"zz" * 32, "not hexadecimal"),
        (b"00" * 33, "malformed"),
        (b"PGBACKUP-PRIVATE-KEY-V2 " + b"ab" * 16, "malformed: expected 64 hexadecimal characters"),
        (b"PGBACKUP-PRIVATE-KEY-V2 " + b"zz" * 32, "not hexadecimal"),
        (
            b"PGBACKUP-SECRET-KEY-V2 " + b"ab" * 32,
            "is malformed: expected `PGBACKUP-PRIVATE-KEY-V2 <64 hex>`",
        ),
        (b"PGBACKUP-PRIVATE-KEY-V2 " + b"ab" * 32 + b"\n" + b"cd" * 32, "expected one key line, found 2"),
        ("Schlüssel".encode(), "malformed: it is not text"),
    ],
)
def test_bad_key_files_stop_the_run(tmp_path, content, message):
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=message):
        crypto.load_key(str(path))


def test_comments_around_the_key_line_are_allowed(key, tmp_path):
    path = write_key(tmp_path / "k", f"# ops key\n\n  {key.text()}  \n# escrow copy in the safe\n")
    assert crypto.load_key(path) == key


def test_a_malformed_key_line_does_not_echo_the_private_key(key):
    with pytest.raises(KeyFileError) as caught:
        crypto.parse_key(f"{key.text()} # ops key\n".encode(), "vault_backup_private_keys #1")
    assert key.material.hex() not in str(caught.value)


def test_a_degenerate_public_key_is_refused_with_a_clear_error(tmp_path):
    path = write_key(tmp_path / "zero.pub", "PGBACKUP-PUBLIC-KEY-V2 " + "00" * 32 + "\n", 0o644)
    with pytest.raises(PgBackupError):
        to = crypto.load_recipients([path])
        crypto.EncryptingWriter(io.BytesIO(), to, binding=BINDING)


WEAK_KEYS = [b"00" * 32, b"ff" * 32 + b"\n", b"0123456789abcdef" * 4]  # the first: the old example's


@pytest.mark.parametrize("content", WEAK_KEYS)
def test_a_version_1_key_that_is_not_random_makes_no_new_backup(content):
    with pytest.raises(KeyFileError, match=r"is not a random key .* make a key pair with `pgbackup keygen`"):
        crypto.parse_key(content, "weak.key", writing=True)


@pytest.mark.parametrize("content", WEAK_KEYS)
def test_sets_made_with_a_weak_key_stay_readable_with_a_warning(tmp_path, caplog, content):
    """Hosts that kept the old example's key before it was refused can still restore."""
    weak = crypto.SymmetricKey.from_bytes(bytes.fromhex(content.decode().strip()))
    sealed = encrypt(b"rows of an old backup", weak)
    path = tmp_path / "weak.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with caplog.at_level("WARNING", logger="pgbackup"):
        key = crypto.load_key(str(path))
    assert "is not a random key" in caplog.text and "anyone can guess this one" in caplog.text
    assert key == weak
    assert decrypt(sealed, key) == b"rows of an old backup"


def test_a_random_version_1_key_reads_without_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="pgbackup"):
        key = crypto.load_key(version1_key_file(tmp_path / "old.key"))
    assert isinstance(key, crypto.SymmetricKey) and not caplog.text


@pytest.mark.parametrize("kind", ["private", "version 1"])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_key_file_open_to_other_users_is_refused(key_file, tmp_path, mode, kind):
    source = key_file if kind == "private" else version1_key_file(tmp_path / "old.key")
    path = tmp_path / "loose.key"
    path.write_bytes(open(source, "rb").read())
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=f"has mode {mode:04o}: other users may read it"):
        crypto.load_key(str(path))
    path.chmod(0o600)
    assert crypto.load_key(str(path)).key_id == crypto.load_key(source).key_id


def test_a_public_key_file_may_be_world_readable(recipient_file):
    assert stat.S_IMODE(os.stat(recipient_file).st_mode) == 0o644
    assert len(crypto.load_recipients([recipient_file]).keys) == 1


def test_example_private_key_of_the_inventory_is_refused():
    example = os.path.join(ROOT, "inventories", "production", "group_vars", "postgresql", "vault.yml.example")
    with open(example) as handle:
        text = handle.read()
    assert "0" * 64 not in text, "the old all-zero example key is gone"
    section = re.search(r"^vault_backup_private_keys:\n((?:  - .*\n)+)", text, re.MULTILINE)
    lines = re.findall(r'^  - "(.*)"$', section.group(1), re.MULTILINE)
    assert lines and all(line.startswith(crypto.PRIVATE_KEY_PREFIX + " ") for line in lines)
    for line in lines:
        with pytest.raises(KeyFileError, match=r"the example key is malformed: expected 64 hexadecimal"):
            crypto.parse_key(line.encode(), "the example key")


def test_missing_key_file_says_how_to_make_one(tmp_path):
    with pytest.raises(KeyFileError, match=r"does not exist.*keygen"):
        crypto.load_key(str(tmp_path / "absent.key"))
    with pytest.raises(KeyFileError, match=r"does not exist.*keygen"):
        crypto.load_recipients([str(tmp_path / "absent.key.pub")])


def test_key_ids_are_stable_and_do_not_reveal_the_key(key, key_file, recipients, tmp_path):
    # version 2: the id of the public key, the same from either file of the pair
    assert crypto.PrivateKey.from_bytes(key.material).key_id == key.key_id
    assert crypto.load_key(key_file).key_id == key.key_id == key.public.key_id == recipients.key_ids[0]
    assert key.key_id == hashlib.sha256(b"pgbackup key id v2" + key.public.raw).hexdigest()[:16]
    assert key.key_id not in key.material.hex()
    assert key.material.hex() not in repr(key) and key.material.hex() not in str(key)
    # version 1: an HMAC of the key
    old = crypto.load_key(version1_key_file(tmp_path / "old.key"))
    assert crypto.SymmetricKey.from_bytes(old.material) == old
    assert old.key_id == hmac.new(old.material, b"pgbackup key id v1", hashlib.sha256).hexdigest()[:16]
    assert old.key_id not in old.material.hex()
    assert old.material.hex() not in repr(old) and old.material.hex() not in str(old)


# ---- the CLI face ---------------------------------------------------------------


def test_cli_encrypt_decrypt_round_trip(key_file, recipient_file, tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(os.urandom(100_000) + b"abc" * 50_000)
    enc, dec = tmp_path / "enc", tmp_path / "dec"
    with plain.open("rb") as src, enc.open("wb") as dst:
        run_cli(
            "encrypt", "--recipient", recipient_file, "--name", BINDING, stdin=src, stdout=dst, check=True
        )
    header, _ = structure(enc.read_bytes())
    assert header.version == 2 and header.binding == BINDING
    with enc.open("rb") as src, dec.open("wb") as dst:
        run_cli("decrypt", "--key-file", key_file, "--name", BINDING, stdin=src, stdout=dst, check=True)
    assert dec.read_bytes() == plain.read_bytes()
    with enc.open("rb") as src, dec.open("wb") as dst:
        run_cli("decrypt", "--key-file", key_file, stdin=src, stdout=dst, check=True)
    assert dec.read_bytes() == plain.read_bytes()


def test_cli_decrypt_refuses_another_name_and_another_key(key_file, recipient_file, other_key_file, tmp_path):
    enc = tmp_path / "enc"
    with enc.open("wb") as dst:
        run_cli(
            "encrypt",
            "--recipient",
            recipient_file,
            "--name",
            BINDING,
            stdin=subprocess.DEVNULL,
            stdout=dst,
            check=True,
        )
    with enc.open("rb") as src:
        moved = run_cli("decrypt", "--key-file", key_file, "--name", "logical-other/x.enc", stdin=src)
    assert moved.returncode == 1 and moved.stdout == ""
    assert moved.stderr.count("\n") == 1
    assert moved.stderr.startswith("pgbackup: error: standard input was written as")
    assert "moved between sets or renamed" in moved.stderr
    with enc.open("rb") as src:
        wrong = run_cli("decrypt", "--key-file", other_key_file, stdin=src)
    key_id = crypto.load_key(key_file).key_id
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1
    assert f"needs the key with id {key_id}" in wrong.stderr


@pytest.mark.parametrize("bad", ["short", "private key", "version 1 key"])
def test_cli_with_malformed_recipient_fails_with_one_line(tmp_path, key_file, bad):
    if bad == "short":
        path = write_key(tmp_path / "bad.pub", "short\n", 0o644)
        message = "is malformed"
    else:
        path = key_file if bad == "private key" else version1_key_file(tmp_path / "old.key")
        message = "needs only the public key"
    result = run_cli("backup", "--dest", str(tmp_path / "out"), "--recipient", path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"pgbackup: error: recipient file {path}")
    assert message in result.stderr
    assert not (tmp_path / "out").exists(), "nothing may be written before the key is known good"


# ---- the documented test vector (version 1) -----------------------------------------------


def _vector():
    import json

    with open(os.path.join(ROOT, "tests", "data", "test_vector.json")) as handle:
        return json.load(handle)


def test_documented_vector_decrypts():
    vector = _vector()
    key = crypto.SymmetricKey.from_bytes(bytes.fromhex(vector["key_hex"]))
    assert key.key_id == vector["key_id"]
    blob = bytes.fromhex(vector["file_hex"])
    assert decrypt(blob, key) == vector["plaintext"].encode()
    assert decrypt(blob, crypto.KeyRing([key]), binding="logical-x/y") == vector["plaintext"].encode()


def test_documented_v2_vector_decrypts_with_either_key():
    import json

    with open(os.path.join(ROOT, "tests", "data", "test_vector_v2.json")) as handle:
        vector = json.load(handle)
    blob = bytes.fromhex(vector["file_hex"])
    for line, public_line, key_id in zip(
        vector["private_keys"], vector["public_keys"], vector["key_ids"], strict=True
    ):
        key = crypto.parse_key(line.encode(), "vector")
        assert key.key_id == key_id and key.public.text() == public_line
        assert decrypt(blob, key, binding=vector["binding"]) == vector["plaintext"].encode()


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
