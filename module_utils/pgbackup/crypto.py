"""The encrypted stream format: zstd compression, then chunked AES-256-GCM.

docs/backup-format.md describes the bytes; this module is the only code that writes
or reads them. Version 2 (what new files are written in) wraps each file's random key
for one or more X25519 public keys, so a host that writes backups holds no secret
that reads them; version 1 (one symmetric key) stays readable. Streams of any size
pass through in bounded memory (one chunk at a time), and every way a file can be
damaged (bit flips, truncation, reordered or spliced chunks, a file moved to another
set or name, a wrong key) ends in a PgBackupError naming the file and the fault.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import io
import logging
import os
import queue
import struct
import threading
from dataclasses import dataclass, field

from .errors import CorruptError, KeyFileError, PgBackupError, WrongKeyError

try:
    import zstandard
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )
except ImportError as missing:  # pragma: no cover - depends on the host
    IMPORT_ERROR: ImportError | None = missing
else:
    IMPORT_ERROR = None

MAGIC = b"PGBACKUP"
VERSION_SYMMETRIC = 1
VERSION_PUBLIC_KEY = 2
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
KEY_BYTES = 32
SALT_BYTES = 32
TAG_BYTES = 16
KEY_ID_BYTES = 8
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 1 << 24
MAX_BINDING_BYTES = 1024
MAX_RECIPIENTS = 32
ZSTD_JOB_BYTES = 2 << 20
RECORD_DATA = 0
RECORD_FINAL = 1

# Both versions begin with magic, version, compression, a 16-bit field (reserved in
# version 1, the binding's length in version 2) and the chunk size.
_HEADER_START = struct.Struct(">8sBBHI")
# Version 1 then: key id, salt; then a CRC-32 of everything before it.
_HEADER_V1_REST = struct.Struct(">8s32s")
# Version 2 then: ephemeral X25519 public key, recipient count, the binding, and per
# recipient its key id and the wrapped file secret; then the CRC-32.
_HEADER_V2_FIXED = struct.Struct(">32sB")
_WRAPPED_BYTES = KEY_BYTES + TAG_BYTES
_STANZA = struct.Struct(f">{KEY_ID_BYTES}s{_WRAPPED_BYTES}s")
_HEADER_CRC = struct.Struct(">I")
HEADER_BYTES = _HEADER_START.size + _HEADER_V1_REST.size + _HEADER_CRC.size  # version 1: 60
# Each record: kind (data or final) and ciphertext length, both authenticated.
_RECORD = struct.Struct(">BI")
_KEY_ID_LABEL = b"pgbackup key id v1"
_PUBLIC_KEY_ID_LABEL = b"pgbackup key id v2"
_FILE_KEY_LABEL = b"pgbackup file key v1"
_FILE_KEY_LABEL_V2 = b"pgbackup file key v2"
_WRAP_LABEL = b"pgbackup wrap v2"
_ZERO_NONCE = bytes(12)
PRIVATE_KEY_PREFIX = "PGBACKUP-PRIVATE-KEY-V2"
PUBLIC_KEY_PREFIX = "PGBACKUP-PUBLIC-KEY-V2"


def _raw_public(key) -> bytes:
    # public_bytes_raw() needs cryptography 40; Debian 12 ships 38.
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def require_crypto_libraries():
    if IMPORT_ERROR is not None:
        raise PgBackupError(
            f"a Python library pgbackup needs is missing ({IMPORT_ERROR}); "
            "install python3-cryptography and python3-zstandard"
        )


# ---- keys ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SymmetricKey:
    """A version 1 key: 256 bits that both write and read, and its public identifier."""

    material: bytes = field(repr=False)
    key_id: str

    @classmethod
    def from_bytes(cls, material: bytes) -> SymmetricKey:
        if len(material) != KEY_BYTES:
            raise KeyFileError(f"a key must be {KEY_BYTES} bytes, got {len(material)}")
        key_id = hmac.new(material, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]
        return cls(material, key_id)


@dataclass(frozen=True)
class PublicKey:
    """A version 2 recipient: what a host needs to write backups, and nothing more."""

    raw: bytes
    key_id: str

    @classmethod
    def from_bytes(cls, raw: bytes) -> PublicKey:
        require_crypto_libraries()
        if len(raw) != KEY_BYTES:
            raise KeyFileError(f"a public key must be {KEY_BYTES} bytes, got {len(raw)}")
        try:
            # A low-order point (all zeros, ...) would make every shared secret zero.
            X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
        except ValueError:
            raise KeyFileError("a public key is not a usable X25519 key (a low-order point)") from None
        return cls(raw, hashlib.sha256(_PUBLIC_KEY_ID_LABEL + raw).hexdigest()[:16])

    def text(self) -> str:
        return f"{PUBLIC_KEY_PREFIX} {self.raw.hex()}"


@dataclass(frozen=True)
class PrivateKey:
    """A version 2 private key: reads what was written for its public key."""

    material: bytes = field(repr=False)
    public: PublicKey

    @classmethod
    def from_bytes(cls, material: bytes) -> PrivateKey:
        require_crypto_libraries()
        if len(material) != KEY_BYTES:
            raise KeyFileError(f"a private key must be {KEY_BYTES} bytes, got {len(material)}")
        raw = _raw_public(X25519PrivateKey.from_private_bytes(material).public_key())
        return cls(material, PublicKey.from_bytes(raw))

    @classmethod
    def generate(cls) -> PrivateKey:
        require_crypto_libraries()
        generated = X25519PrivateKey.generate()
        return cls.from_bytes(generated.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def text(self) -> str:
        return f"{PRIVATE_KEY_PREFIX} {self.material.hex()}"


@dataclass(frozen=True)
class Recipients:
    """Whom new files are written for (format version 2): one or more public keys."""

    keys: tuple[PublicKey, ...]

    def __post_init__(self):
        if not self.keys:
            raise KeyFileError("no recipient: give at least one public key (`pgbackup keygen` makes a pair)")
        if len(self.keys) > MAX_RECIPIENTS:
            raise KeyFileError(f"at most {MAX_RECIPIENTS} recipients, got {len(self.keys)}")

    @property
    def key_ids(self) -> list[str]:
        return [key.key_id for key in self.keys]


class KeyRing:
    """The keys a reader holds, by key id: version 1 keys and version 2 private keys.
    A file or set names the key ids it needs; a ring without them says which."""

    def __init__(self, keys):
        self._by_id = {key.key_id: key for key in keys}

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._by_id)

    def _missing(self, what: str, needed: list[str]) -> WrongKeyError:
        return WrongKeyError(
            f"{what} needs the key with id {' or '.join(needed)}, but the key(s) given have "
            f"id {', '.join(self.key_ids) or 'none'}: add that key to the key ring"
        )

    def symmetric(self, key_id: str, what: str) -> SymmetricKey:
        key = self._by_id.get(key_id)
        if isinstance(key, SymmetricKey):
            return key
        raise self._missing(what, [key_id])

    def private(self, key_ids: list[str], what: str) -> PrivateKey:
        for key_id in key_ids:
            key = self._by_id.get(key_id)
            if isinstance(key, PrivateKey):
                return key
        raise self._missing(what, key_ids)


def _key_lines(raw: bytes, source: str) -> list[str]:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{source} is malformed: it is not text") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def parse_key(raw: bytes, source: str, writing: bool = False) -> SymmetricKey | PrivateKey | PublicKey:
    """A key as keygen writes it: a version 2 private or public key line
    (`PGBACKUP-PRIVATE-KEY-V2 <64 hex>`, `#` comments allowed), or a version 1 key of
    64 hexadecimal characters. A version 1 key that is not random (the old example's
    all-zero key) makes no new file; sets it encrypted stay readable, with a warning."""
    lines = _key_lines(raw, source)
    if len(lines) != 1:
        raise KeyFileError(f"{source} is malformed: expected one key line, found {len(lines)}")
    words = lines[0].split()
    prefix, value = (
        (words[0], words[1]) if len(words) == 2 else ("", words[0]) if len(words) == 1 else (None, "")
    )
    if prefix not in ("", PRIVATE_KEY_PREFIX, PUBLIC_KEY_PREFIX):
        # Never repeat the line: it may hold a private key with something after it.
        raise KeyFileError(
            f"{source} is malformed: expected `{PRIVATE_KEY_PREFIX} <64 hex>`, "
            f"`{PUBLIC_KEY_PREFIX} <64 hex>` or a version 1 key of 64 hex characters alone on its line"
        )
    if len(value) != 2 * KEY_BYTES:
        raise KeyFileError(
            f"{source} is malformed: expected {2 * KEY_BYTES} hexadecimal characters "
            f"(a 256-bit key), found {len(value)}"
        )
    try:
        material = binascii.unhexlify(value)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{source} is malformed: it is not hexadecimal") from None
    if prefix == PRIVATE_KEY_PREFIX:
        return PrivateKey.from_bytes(material)
    if prefix == PUBLIC_KEY_PREFIX:
        return PublicKey.from_bytes(material)
    if not is_strong_key(material):
        problem = (
            f"{source} is not a random key (it repeats a few byte values, like the example's "
            "all-zero key); make a key pair with `pgbackup keygen`"
        )
        if writing:
            raise KeyFileError(problem)
        logging.getLogger("pgbackup").warning("%s, and move to it: anyone can guess this one", problem)
    return SymmetricKey.from_bytes(material)


# 32 random bytes take about 30 distinct values; fewer than 16 happens by chance with a
# probability far below 1e-15, but always with an all-one-byte or patterned key.
_MIN_DISTINCT_KEY_BYTES = 16


def is_strong_key(material: bytes) -> bool:
    """False for keys a person typed or copied from an example, not drawn at random."""
    return len(set(material)) >= _MIN_DISTINCT_KEY_BYTES


def _read_key_file(path: str) -> tuple[bytes, int]:
    """A key file's content and mode."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4096), os.fstat(handle.fileno()).st_mode
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {path} does not exist (make a key pair with `pgbackup keygen`)"
        ) from None
    except OSError as error:
        raise KeyFileError(f"key file {path} cannot be read: {error.strerror}") from None


def load_key(path: str) -> SymmetricKey | PrivateKey:
    """A key that reads backups: a version 2 private key or a version 1 key. It decrypts
    every set made for it, so a file other users may read (or write) is refused."""
    raw, mode = _read_key_file(path)
    key = parse_key(raw, f"key file {path}")
    if isinstance(key, PublicKey):
        raise KeyFileError(
            f"key file {path} holds a public key (id {key.key_id}): it writes backups but cannot "
            "read them; give the private key file"
        )
    if mode & 0o077:
        raise KeyFileError(
            f"key file {path} has mode {mode & 0o777:04o}: other users may read it; "
            f"make it private with `chmod 600 {path}`"
        )
    return key


def _key_files(path: str, suffix: str) -> list[str]:
    """path itself, or the `*<suffix>` files of the folder it names (a key ring)."""
    if not os.path.isdir(path):
        return [path]
    names = sorted(name for name in os.listdir(path) if name.endswith(suffix) and not name.startswith("."))
    if not names:
        raise KeyFileError(f"key folder {path} holds no *{suffix} file")
    return [os.path.join(path, name) for name in names]


def load_key_ring(paths: list[str]) -> KeyRing:
    """The keys of these files, or of the `*.key` files in these folders."""
    return KeyRing(load_key(path) for given in paths for path in _key_files(given, ".key"))


def load_recipients(paths: list[str]) -> Recipients:
    """The public keys of these files, or of the `*.pub` files in these folders. A key
    that can read backups is refused here: the host that writes them must not hold one."""
    keys = []
    for given in paths:
        for path in _key_files(given, ".pub"):
            key = parse_key(_read_key_file(path)[0], f"recipient file {path}")
            if not isinstance(key, PublicKey):
                raise KeyFileError(
                    f"recipient file {path} holds a key that reads backups, not a public key; a host "
                    "that writes backups needs only the public key (the .pub file `pgbackup keygen` wrote)"
                )
            keys.append(key)
    return recipients_of(keys)


def recipients_of(keys) -> Recipients:
    """Recipients without repeats, in the order given."""
    unique = {key.key_id: key for key in keys}
    return Recipients(tuple(unique.values()))


def parse_public_keys(texts: list[str], source: str) -> list[PublicKey]:
    """Public keys given as text (`PGBACKUP-PUBLIC-KEY-V2 <64 hex>`), as the inventory holds them."""
    keys = []
    for index, text in enumerate(texts, start=1):
        key = parse_key(text.encode(), f"{source} #{index}")
        if not isinstance(key, PublicKey):
            raise KeyFileError(f"{source} #{index} is not a public key ({PUBLIC_KEY_PREFIX} <64 hex>)")
        keys.append(key)
    return keys


def _create_new(path: str, mode: int):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        return os.fdopen(fd, "w")
    except FileExistsError:
        raise KeyFileError(
            f"{path} already exists; refusing to overwrite a key that backups may need"
        ) from None
    except OSError as error:
        raise KeyFileError(f"cannot create {path}: {error.strerror}") from None


def generate_key_pair(path: str, public_path: str | None = None, comment: str = "") -> PrivateKey:
    """Write a new private key to path (mode 0600) and its public key to public_path
    (path + `.pub`, mode 0644); never overwrite either, and leave neither half of a pair
    behind when the other cannot be written."""
    key = PrivateKey.generate()
    public_path = public_path or f"{path}.pub"
    note = f" ({comment})" if comment else ""
    private_lines = [
        f"# pgbackup private key, key id {key.key_id}{note}",
        "# It reads every backup made for its public key. Keep it in the vault and",
        "# an escrow copy offline; lose every private key and you lose every backup.",
        key.text(),
    ]
    public_lines = [f"# pgbackup public key, key id {key.key_id}{note}", key.public.text()]
    written = []
    try:
        for target, mode, lines in ((public_path, 0o644, public_lines), (path, 0o600, private_lines)):
            with _create_new(target, mode) as handle:
                written.append(target)
                handle.write("\n".join(lines) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException:
        for target in written:
            os.unlink(target)
        raise
    return key


# ---- headers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    raw: bytes
    version: int
    compression: int
    chunk_bytes: int
    key_id: str | None = None  # version 1
    salt: bytes = b""  # version 1
    binding: str = ""  # version 2: "<set name>/<path in the set>"
    ephemeral: bytes = b""  # version 2
    stanzas: tuple[tuple[str, bytes], ...] = ()  # version 2: (key id, wrapped file secret)

    @property
    def key_ids(self) -> list[str]:
        return [self.key_id] if self.version == VERSION_SYMMETRIC else [key_id for key_id, _ in self.stanzas]

    @property
    def wrap_context(self) -> bytes:
        """Version 2: the header up to the end of the binding, bound into every wrap."""
        return self.raw[: len(self.raw) - _HEADER_CRC.size - len(self.stanzas) * _STANZA.size]


def _wrap_key(shared: bytes, ephemeral: bytes, recipient: bytes, context: bytes) -> AESGCM:
    wrap_key = HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=ephemeral + recipient, info=_WRAP_LABEL + context
    ).derive(shared)
    return AESGCM(wrap_key)


def wrap_secret(secret: bytes, ephemeral, recipients: Recipients, context: bytes) -> list[tuple[str, bytes]]:
    """The secret wrapped for each recipient: X25519 with a one-time key, HKDF, AES-GCM;
    `context` (what the secret protects) is bound into every wrap."""
    ephemeral_raw = _raw_public(ephemeral.public_key())
    stanzas = []
    for recipient in recipients.keys:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient.raw))
        sealed = _wrap_key(shared, ephemeral_raw, recipient.raw, context).encrypt(
            _ZERO_NONCE, secret, bytes.fromhex(recipient.key_id)
        )
        stanzas.append((recipient.key_id, sealed))
    return stanzas


def wrap_for(secret: bytes, recipients: Recipients, context: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The secret wrapped for each recipient under a new one-time key: (its public key, stanzas)."""
    require_crypto_libraries()
    ephemeral = X25519PrivateKey.generate()
    return _raw_public(ephemeral.public_key()), wrap_secret(secret, ephemeral, recipients, context)


def unwrap_secret(ephemeral: bytes, stanzas, keys: KeyRing, context: bytes, what: str) -> bytes:
    """The secret wrapped for a private key of the ring; a clear error when none fits."""
    require_crypto_libraries()
    ids = [key_id for key_id, _ in stanzas]
    if len(set(ids)) != len(ids):
        raise CorruptError(f"{what}: a key id is listed twice (writers never do: tampered with)")
    private = keys.private(ids, what)
    sealed = next(wrapped for key_id, wrapped in stanzas if key_id == private.key_id)
    try:
        shared = X25519PrivateKey.from_private_bytes(private.material).exchange(
            X25519PublicKey.from_public_bytes(ephemeral)
        )
        return _wrap_key(shared, ephemeral, private.public.raw, context).decrypt(
            _ZERO_NONCE, sealed, bytes.fromhex(private.key_id)
        )
    except (InvalidTag, ValueError):
        raise CorruptError(
            f"{what}: its key for id {private.key_id} fails authentication (tampered with or corrupted)"
        ) from None


def _with_crc(body: bytes) -> bytes:
    return body + _HEADER_CRC.pack(binascii.crc32(body))


def _build_header_v1(key: SymmetricKey, compression: int, chunk_bytes: int) -> Header:
    salt = os.urandom(SALT_BYTES)
    raw = _with_crc(
        _HEADER_START.pack(MAGIC, VERSION_SYMMETRIC, compression, 0, chunk_bytes)
        + _HEADER_V1_REST.pack(bytes.fromhex(key.key_id), salt)
    )
    return Header(raw, VERSION_SYMMETRIC, compression, chunk_bytes, key_id=key.key_id, salt=salt)


def _build_header_v2(recipients: Recipients, binding: str, compression: int, chunk_bytes: int):
    """The header and the file's secret, wrapped for every recipient."""
    encoded = binding.encode()
    if len(encoded) > MAX_BINDING_BYTES:
        raise PgBackupError(f"a file's name in its set is at most {MAX_BINDING_BYTES} bytes: {binding!r}")
    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = _raw_public(ephemeral.public_key())
    prefix = (  # the wrap context
        _HEADER_START.pack(MAGIC, VERSION_PUBLIC_KEY, compression, len(encoded), chunk_bytes)
        + _HEADER_V2_FIXED.pack(ephemeral_raw, len(recipients.keys))
        + encoded
    )
    secret = os.urandom(KEY_BYTES)
    stanzas = wrap_secret(secret, ephemeral, recipients, prefix)
    raw = _with_crc(
        prefix + b"".join(_STANZA.pack(bytes.fromhex(key_id), sealed) for key_id, sealed in stanzas)
    )
    header = Header(
        raw,
        VERSION_PUBLIC_KEY,
        compression,
        chunk_bytes,
        binding=binding,
        ephemeral=ephemeral_raw,
        stanzas=tuple(stanzas),
    )
    return header, secret


def read_header(read_exact, name: str) -> Header:
    """Read and check a header of either version, telling corruption apart from a
    foreign file. `read_exact(n)` returns n bytes, or fewer at the end of the file."""
    start = read_exact(_HEADER_START.size)
    if not start:
        raise CorruptError(f"{name} is empty (0 bytes): not a pgbackup encrypted file")
    if not start.startswith(MAGIC) and not MAGIC.startswith(start[: len(MAGIC)]):
        raise CorruptError(f"{name} is not a pgbackup encrypted file (unknown magic bytes)")
    if len(start) < _HEADER_START.size:
        raise CorruptError(f"{name} is truncated inside its header ({len(start)} bytes)")
    _magic, version, compression, field16, chunk_bytes = _HEADER_START.unpack(start)
    if version == VERSION_PUBLIC_KEY:
        fixed = read_exact(_HEADER_V2_FIXED.size)
        count = fixed[-1] if len(fixed) == _HEADER_V2_FIXED.size else 0
        # A damaged length or count cannot make a reader take more than a header's worth.
        rest_size = min(field16, MAX_BINDING_BYTES) + min(count, MAX_RECIPIENTS) * _STANZA.size
        expected = _HEADER_START.size + _HEADER_V2_FIXED.size + rest_size + _HEADER_CRC.size
    else:
        fixed, expected = b"", HEADER_BYTES
    raw = start + fixed + read_exact(expected - len(start) - len(fixed))
    if len(raw) < expected:
        raise CorruptError(f"{name} is truncated inside its header ({len(raw)} of {expected} bytes)")
    body, (crc,) = raw[: -_HEADER_CRC.size], _HEADER_CRC.unpack(raw[-_HEADER_CRC.size :])
    if binascii.crc32(body) != crc:
        if not start.startswith(MAGIC):
            raise CorruptError(f"{name} is not a pgbackup encrypted file (unknown magic bytes)")
        raise CorruptError(f"{name} has a corrupted header (checksum mismatch)")
    if version not in (VERSION_SYMMETRIC, VERSION_PUBLIC_KEY):
        raise CorruptError(
            f"{name} uses format version {version}; this pgbackup reads versions "
            f"{VERSION_SYMMETRIC} and {VERSION_PUBLIC_KEY}"
        )
    if compression not in (COMPRESSION_NONE, COMPRESSION_ZSTD) or not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise CorruptError(f"{name} has a header with unsupported parameters")
    if version == VERSION_SYMMETRIC:
        key_id, salt = _HEADER_V1_REST.unpack(raw[_HEADER_START.size : -_HEADER_CRC.size])
        return Header(raw, version, compression, chunk_bytes, key_id=key_id.hex(), salt=salt)
    return _header_v2(raw, compression, chunk_bytes, field16, name)


def _header_v2(raw: bytes, compression: int, chunk_bytes: int, binding_bytes: int, name: str) -> Header:
    fixed_end = _HEADER_START.size + _HEADER_V2_FIXED.size
    ephemeral, count = _HEADER_V2_FIXED.unpack(raw[_HEADER_START.size : fixed_end])
    if not 1 <= count <= MAX_RECIPIENTS or binding_bytes > MAX_BINDING_BYTES:
        raise CorruptError(f"{name} has a header with unsupported parameters")
    try:
        binding = raw[fixed_end : fixed_end + binding_bytes].decode()
    except UnicodeDecodeError:
        raise CorruptError(f"{name} has a header with unsupported parameters") from None
    stanzas = tuple(
        (key_id.hex(), sealed)
        for key_id, sealed in _STANZA.iter_unpack(raw[fixed_end + binding_bytes : -_HEADER_CRC.size])
    )
    return Header(
        raw,
        VERSION_PUBLIC_KEY,
        compression,
        chunk_bytes,
        binding=binding,
        ephemeral=ephemeral,
        stanzas=stanzas,
    )


def parse_header(raw: bytes, name: str) -> Header:
    """A header from bytes in hand (the reader's own check, and tests)."""
    source = io.BytesIO(raw)
    return read_header(source.read, name)


def _cipher_v1(key: SymmetricKey, header: Header):
    # The file key depends on the random salt and the whole header, so no two files
    # share a key and the counter nonces below never repeat under one key.
    file_key = HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=header.salt, info=_FILE_KEY_LABEL + header.raw
    ).derive(key.material)
    return AESGCM(file_key)


def _cipher_v2(secret: bytes, header: Header):
    # The whole header (its binding to a set and path included) goes into the file key:
    # a header edited to pass for another file's decrypts nothing.
    file_key = HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_FILE_KEY_LABEL_V2 + header.raw
    ).derive(secret)
    return AESGCM(file_key)


def check_binding(header: Header, expected: str | None, name: str):
    """Refuse a version 2 file whose header names another set or path than where it is."""
    if expected is not None and header.version == VERSION_PUBLIC_KEY and header.binding != expected:
        raise CorruptError(
            f"{name} was written as {header.binding!r}, not {expected!r}: a file moved between "
            "sets or renamed is refused"
        )


def _nonce(counter: int, kind: int) -> bytes:
    return struct.pack(">QxxxB", counter, kind)  # 96 bits: counter, zeros, kind


class HashingWriter(io.RawIOBase):
    """Pass writes through to a file object, counting bytes and hashing them."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.sha256 = hashlib.sha256()
        self.bytes_written = 0

    def writable(self):
        return True

    def write(self, data):
        self.target.write(data)
        self.sha256.update(data)
        self.bytes_written += len(data)
        return len(data)


@dataclass(frozen=True)
class StreamStats:
    plaintext_bytes: int | None  # None when only the structure was checked
    encrypted_bytes: int
    sha256: str


def _compressor(level: int, threads: int):
    # zstd's default job size for multi-threaded level 3 keeps over 150 MB in flight on
    # incompressible input; 2 MiB jobs bound it to tens of MB at the same speed.
    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=threads, job_size=ZSTD_JOB_BYTES if threads > 0 else 0
    )
    return zstandard.ZstdCompressor(compression_params=params).compressobj()


class EncryptingWriter:
    """A write-only stream: compresses, chunks and encrypts into `target`.

    `to` is whom the file is for: Recipients (version 2, the format new files are
    written in; `binding` names the file, `<set name>/<path in the set>`) or a
    SymmetricKey (version 1, kept for tests and benchmarks against old sets).
    `close()` writes the final chunk; a stream that was never closed has no final
    chunk and is rejected as truncated when read, which is what an interrupted
    backup should look like.
    """

    def __init__(
        self,
        target,
        to: Recipients | SymmetricKey,
        binding: str = "",
        compression_level: int = 3,
        threads: int = 2,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        require_crypto_libraries()
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise PgBackupError(f"chunk size must be between 1 and {MAX_CHUNK_BYTES} bytes")
        self._out = HashingWriter(target)
        self._chunk_bytes = chunk_bytes
        compression = COMPRESSION_ZSTD if compression_level > 0 else COMPRESSION_NONE
        if isinstance(to, Recipients):
            self._header, secret = _build_header_v2(to, binding, compression, chunk_bytes)
            self._cipher = _cipher_v2(secret, self._header)
        elif isinstance(to, SymmetricKey):
            self._header = _build_header_v1(to, compression, chunk_bytes)
            self._cipher = _cipher_v1(to, self._header)
        else:
            raise PgBackupError(f"cannot encrypt for {type(to).__name__}: give public keys (recipients)")
        self._compressor = (
            _compressor(compression_level, threads) if compression == COMPRESSION_ZSTD else None
        )
        self._pending = bytearray()
        self._counter = 0
        self.plaintext_bytes = 0
        self._closed = False
        self._out.write(self._header.raw)

    def write(self, data) -> int:
        if self._closed:
            raise PgBackupError("write to an encrypted stream after its final chunk")
        given = len(data)
        self.plaintext_bytes += given
        if self._compressor is not None:
            data = self._compressor.compress(data)
        self._pending += data
        while len(self._pending) >= self._chunk_bytes:
            self._seal(RECORD_DATA, bytes(self._pending[: self._chunk_bytes]))
            del self._pending[: self._chunk_bytes]
        return given

    def _seal(self, kind: int, plaintext: bytes):
        prefix = _RECORD.pack(kind, len(plaintext) + TAG_BYTES)
        sealed = self._cipher.encrypt(_nonce(self._counter, kind), plaintext, self._header.raw + prefix)
        self._out.write(prefix)
        self._out.write(sealed)
        self._counter += 1

    def close(self) -> StreamStats:
        if not self._closed:
            if self._compressor is not None:
                self._pending += self._compressor.flush()
            while len(self._pending) > self._chunk_bytes:
                self._seal(RECORD_DATA, bytes(self._pending[: self._chunk_bytes]))
                del self._pending[: self._chunk_bytes]
            self._seal(RECORD_FINAL, bytes(self._pending))
            self._pending.clear()
            self._closed = True
        return self.stats()

    def stats(self) -> StreamStats:
        return StreamStats(self.plaintext_bytes, self._out.bytes_written, self._out.sha256.hexdigest())


class _Records:
    """The records of an encrypted stream as read, hashed and counted; their structure
    (lengths, one final record, nothing after it) checked, their contents not."""

    def __init__(self, source, name: str, binding: str | None):
        self._source = source
        self._name = name
        self.sha256 = hashlib.sha256()
        self.encrypted_bytes = 0
        self.header = read_header(self._read_exact, name)
        check_binding(self.header, binding, name)
        self.counter = 0
        self.finished = False

    def _read_exact(self, size: int) -> bytes:
        data = self._source.read(size)
        while data is not None and 0 < len(data) < size:
            more = self._source.read(size - len(data))
            if not more:
                break
            data += more
        data = data or b""
        self.sha256.update(data)
        self.encrypted_bytes += len(data)
        return data

    def next_record(self) -> tuple[int, bytes, bytes]:
        """(kind, record prefix, sealed bytes) of the next record."""
        prefix = self._read_exact(_RECORD.size)
        if not prefix:
            raise CorruptError(
                f"{self._name} is truncated: it ends after chunk {self.counter} "
                "without the final-chunk marker"
            )
        if len(prefix) < _RECORD.size:
            raise CorruptError(f"{self._name} is truncated inside chunk {self.counter}")
        kind, length = _RECORD.unpack(prefix)
        if (
            kind not in (RECORD_DATA, RECORD_FINAL)
            or not TAG_BYTES <= length <= self.header.chunk_bytes + TAG_BYTES
        ):
            raise CorruptError(f"{self._name}: chunk {self.counter} has a corrupted record header")
        sealed = self._read_exact(length)
        if len(sealed) < length:
            raise CorruptError(f"{self._name} is truncated inside chunk {self.counter}")
        return kind, prefix, sealed

    def advance(self, kind: int):
        self.counter += 1
        if kind == RECORD_FINAL:
            self.finished = True
            if self._read_exact(1):
                raise CorruptError(f"{self._name} has data after its final chunk (spliced or corrupted)")

    def stats(self, plaintext_bytes: int | None = None) -> StreamStats:
        return StreamStats(plaintext_bytes, self.encrypted_bytes, self.sha256.hexdigest())


def check_structure(source, name: str, binding: str | None = None) -> tuple[Header, StreamStats]:
    """What a host without the private key can check of a file: its header, its binding
    to its set and path, and every record's framing up to one final record, with the
    size and SHA-256 of the whole. Contents are authenticated only by decrypting."""
    records = _Records(source, name, binding)
    while not records.finished:
        kind, _prefix, _sealed = records.next_record()
        records.advance(kind)
    return records.header, records.stats()


class _DecryptedChunks(io.RawIOBase):
    """The decrypted (still compressed) payload of an encrypted stream, as a raw reader."""

    def __init__(self, source, keys: KeyRing, name: str, binding: str | None, check_header=None):
        super().__init__()
        self._name = name
        self._records = _Records(source, name, binding)
        header = self.header = self._records.header
        if check_header is not None:
            check_header(header)
        if header.version == VERSION_PUBLIC_KEY:
            secret = unwrap_secret(header.ephemeral, header.stanzas, keys, header.wrap_context, name)
            self._cipher = _cipher_v2(secret, header)
        else:
            self._cipher = _cipher_v1(keys.symmetric(header.key_id, name), header)
        self._buffer = memoryview(b"")
        self._ahead = None

    def close(self):
        if self._ahead is not None:
            self._ahead.close()  # stops and joins the read-ahead thread
        super().close()

    def _next_chunk(self) -> bytes:
        kind, prefix, sealed = self._records.next_record()
        counter = self._records.counter
        try:
            plaintext = self._cipher.decrypt(_nonce(counter, kind), sealed, self.header.raw + prefix)
        except InvalidTag:
            raise CorruptError(
                f"{self._name}: chunk {counter} failed authentication "
                "(the file is corrupted, reordered or tampered with)"
            ) from None
        self._records.advance(kind)
        return plaintext

    def _next_payload(self) -> bytes:
        """The next non-empty plaintext, or b"" once the final chunk is authenticated."""
        while not self._records.finished:
            plaintext = self._next_chunk()
            if plaintext:
                return plaintext
        return b""

    @property
    def finished(self) -> bool:
        return self._records.finished

    def stats(self, plaintext_bytes: int) -> StreamStats:
        return self._records.stats(plaintext_bytes)

    def readable(self):
        return True

    def readinto(self, target) -> int:
        if self._ahead is None:
            self._ahead = read_ahead(self._next_payload)
        while not self._buffer:
            block = next(self._ahead, b"")
            if not block:
                return 0
            self._buffer = memoryview(block)
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size


def as_key_ring(keys) -> KeyRing:
    """A KeyRing from a ring or a single key (what tests and old callers hold)."""
    return keys if isinstance(keys, KeyRing) else KeyRing([keys])


class DecryptedReader:
    """The plaintext of an encrypted stream, pulled with read(size); every chunk is
    authenticated before its bytes are returned. Reading to the end is not enough to
    trust the whole: finish() authenticates the final chunk and returns the stats."""

    def __init__(self, source, keys, name: str = "stream", binding: str | None = None, check_header=None):
        require_crypto_libraries()
        self.name = name
        self._chunks = _DecryptedChunks(source, as_key_ring(keys), name, binding, check_header)
        if self._chunks.header.compression == COMPRESSION_ZSTD:
            self._reader = zstandard.ZstdDecompressor().stream_reader(
                self._chunks, read_size=self._chunks.header.chunk_bytes
            )
        else:
            self._reader = io.BufferedReader(self._chunks, buffer_size=self._chunks.header.chunk_bytes)
        self.plaintext_bytes = 0

    def read(self, size: int) -> bytes:
        """Up to size bytes; b"" at the end of the plaintext."""
        try:
            block = self._reader.read(size)
        except zstandard.ZstdError as error:
            raise CorruptError(f"{self.name}: the compressed payload is invalid ({error})") from None
        self.plaintext_bytes += len(block)
        return block

    def finish(self) -> StreamStats:
        """Check that the plaintext has ended with the encrypted stream's final chunk."""
        if self.read(1):
            raise CorruptError(f"{self.name}: there is more plaintext than the reader expected")
        # Reading to the end authenticates the final chunk even when zstd stopped early.
        if self._chunks.read(1) or not self._chunks.finished:
            raise CorruptError(f"{self.name}: the compressed payload ends before the encrypted stream does")
        return self._chunks.stats(self.plaintext_bytes)

    def close(self):
        self._chunks.close()

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()


def decrypt_stream(
    source,
    target,
    keys: KeyRing,
    name: str = "stream",
    binding: str | None = None,
    read_bytes: int = 1 << 20,
    check_header=None,
) -> StreamStats:
    """Decrypt (and decompress) `source` into `target`; every chunk is authenticated.
    `binding`, when given, is where the file must have been written for (version 2);
    `check_header(header)` may refuse the header before anything is decrypted.

    Plaintext is written as it is authenticated: a caller that must not act on
    unverified data holds back what it did with it until this returns.
    """
    with DecryptedReader(source, keys, name, binding, check_header) as reader:
        while True:
            block = reader.read(read_bytes)
            if not block:
                break
            target.write(block)
        return reader.finish()


def encrypt_stream(
    source,
    target,
    to: Recipients | SymmetricKey,
    binding: str = "",
    compression_level: int = 3,
    threads: int = 2,
    read_bytes: int = 1 << 20,
) -> StreamStats:
    """Encrypt everything readable from `source` into `target`."""
    writer = EncryptingWriter(target, to, binding, compression_level=compression_level, threads=threads)
    for block in read_ahead(lambda: source.read(read_bytes)):
        writer.write(block)
    return writer.close()


def read_ahead(next_block, depth: int = 4):
    """Yield what `next_block()` returns, produced by a helper thread a few blocks ahead,
    until it returns an empty block. Encrypting, it keeps the pipe from pg_dump flowing
    while a block is encrypted; decrypting, it reads, hashes and decrypts the next chunks
    while this thread decompresses and writes (both release the GIL)."""
    blocks: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            while not stop.is_set():
                block = next_block()
                put_until_stopped(blocks, block, stop)
                if not block:
                    return
        except BaseException as error:  # handed to the consumer, raised there
            put_until_stopped(blocks, error, stop)

    thread = threading.Thread(target=produce, name="pgbackup-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = blocks.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def put_until_stopped(blocks: queue.Queue, item, stop: threading.Event):
    """Put item in a bounded queue, waiting for room unless and until stop is set."""
    while not stop.is_set():
        try:
            blocks.put(item, timeout=0.2)
            return
        except queue.Full:
            continue
