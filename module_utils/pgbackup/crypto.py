"""The encrypted stream format: zstd compression, then chunked AES-256-GCM.

docs/backup-format.md describes the bytes; this module is the only code that writes
or reads them. Streams of any size pass through in bounded memory (one chunk at a
time), and every way a file can be damaged (bit flips, truncation, reordered or
spliced chunks, a wrong key) ends in a PgBackupError naming the file and the fault.
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
from dataclasses import dataclass

from .errors import CorruptError, KeyFileError, PgBackupError, WrongKeyError

try:
    import zstandard
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError as missing:  # pragma: no cover - depends on the host
    IMPORT_ERROR: ImportError | None = missing
else:
    IMPORT_ERROR = None

MAGIC = b"PGBACKUP"
FORMAT_VERSION = 1
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
KEY_BYTES = 32
SALT_BYTES = 32
TAG_BYTES = 16
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 1 << 24
ZSTD_JOB_BYTES = 2 << 20
RECORD_DATA = 0
RECORD_FINAL = 1

# magic, version, compression, reserved, chunk size, key id, salt; then a CRC-32.
_HEADER_BODY = struct.Struct(">8sBBHI8s32s")
_HEADER_CRC = struct.Struct(">I")
HEADER_BYTES = _HEADER_BODY.size + _HEADER_CRC.size
# Each record: kind (data or final) and ciphertext length, both authenticated.
_RECORD = struct.Struct(">BI")
_KEY_ID_LABEL = b"pgbackup key id v1"
_FILE_KEY_LABEL = b"pgbackup file key v1"


def require_crypto_libraries():
    if IMPORT_ERROR is not None:
        raise PgBackupError(
            f"a Python library pgbackup needs is missing ({IMPORT_ERROR}); "
            "install python3-cryptography and python3-zstandard"
        )


@dataclass(frozen=True)
class Key:
    """A 256-bit master key and its public identifier."""

    material: bytes
    key_id: str

    @classmethod
    def from_bytes(cls, material: bytes) -> Key:
        if len(material) != KEY_BYTES:
            raise KeyFileError(f"a key must be {KEY_BYTES} bytes, got {len(material)}")
        key_id = hmac.new(material, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]
        return cls(material, key_id)

    def __repr__(self):
        return f"Key(key_id={self.key_id!r})"


def load_key(path: str, writing: bool = False) -> Key:
    """Read a key file: 64 hexadecimal characters, optionally followed by a newline.

    Anything else stops the run: there is never a fallback to no encryption. A key
    file that other users may read (or write) is refused: it decrypts every backup.
    """
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if mode & 0o077:
                raise KeyFileError(
                    f"key file {path} has mode {mode & 0o777:04o}: other users may read it; "
                    f"make it private with `chmod 600 {path}`"
                )
            raw = handle.read(256)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist (create one with `pgbackup keygen`)") from None
    except OSError as error:
        raise KeyFileError(f"key file {path} cannot be read: {error.strerror}") from None
    return parse_key(raw, f"key file {path}", writing)


def parse_key(raw: bytes, source: str, writing: bool = False) -> Key:
    """A key as written by keygen: 64 hexadecimal characters, surrounding space ignored.

    A key that is not random (the example's all-zero key) makes no new backup; sets it
    already encrypted stay readable, with a warning, so they can still be restored."""
    text = raw.strip()
    if len(text) != 2 * KEY_BYTES:
        raise KeyFileError(
            f"{source} is malformed: expected {2 * KEY_BYTES} hexadecimal characters "
            f"(a 256-bit key), found {len(text)} bytes"
        )
    try:
        material = binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{source} is malformed: it is not hexadecimal") from None
    if not is_strong_key(material):
        problem = (
            f"{source} is not a random key (it repeats a few byte values, like the example's "
            "all-zero key); make one with `pgbackup keygen`"
        )
        if writing:
            raise KeyFileError(problem)
        logging.getLogger("pgbackup").warning("%s, and move to it: anyone can guess this one", problem)
    return Key.from_bytes(material)


# 32 random bytes take about 30 distinct values; fewer than 16 happens by chance with a
# probability far below 1e-15, but always with an all-one-byte or patterned key.
_MIN_DISTINCT_KEY_BYTES = 16


def is_strong_key(material: bytes) -> bool:
    """False for keys a person typed or copied from an example, not drawn at random."""
    return len(set(material)) >= _MIN_DISTINCT_KEY_BYTES


def generate_key_file(path: str) -> Key:
    """Write a new random key to path with mode 0600; never overwrite an existing file."""
    key = Key.from_bytes(os.urandom(KEY_BYTES))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(
            f"key file {path} already exists; refusing to overwrite a key that backups may need"
        ) from None
    except OSError as error:
        raise KeyFileError(f"cannot create key file {path}: {error.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(binascii.hexlify(key.material) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    return key


@dataclass(frozen=True)
class Header:
    raw: bytes
    compression: int
    chunk_bytes: int
    key_id: str
    salt: bytes


def _build_header(key: Key, compression: int, chunk_bytes: int) -> Header:
    salt = os.urandom(SALT_BYTES)
    body = _HEADER_BODY.pack(
        MAGIC, FORMAT_VERSION, compression, 0, chunk_bytes, bytes.fromhex(key.key_id), salt
    )
    raw = body + _HEADER_CRC.pack(binascii.crc32(body))
    return Header(raw, compression, chunk_bytes, key.key_id, salt)


def parse_header(raw: bytes, name: str) -> Header:
    """Check and decode a header, telling corruption apart from a foreign file."""
    if not raw:
        raise CorruptError(f"{name} is empty (0 bytes): not a pgbackup encrypted file")
    if len(raw) < HEADER_BYTES:
        if not MAGIC.startswith(raw[: len(MAGIC)]):
            raise CorruptError(f"{name} is not a pgbackup encrypted file (unknown magic bytes)")
        raise CorruptError(f"{name} is truncated inside its header ({len(raw)} of {HEADER_BYTES} bytes)")
    body, (crc,) = raw[: _HEADER_BODY.size], _HEADER_CRC.unpack(raw[_HEADER_BODY.size : HEADER_BYTES])
    magic, version, compression, _reserved, chunk_bytes, key_id, salt = _HEADER_BODY.unpack(body)
    if binascii.crc32(body) != crc:
        if magic != MAGIC:
            raise CorruptError(f"{name} is not a pgbackup encrypted file (unknown magic bytes)")
        raise CorruptError(f"{name} has a corrupted header (checksum mismatch)")
    if version != FORMAT_VERSION:
        raise CorruptError(
            f"{name} uses format version {version}; this pgbackup reads version {FORMAT_VERSION}"
        )
    if compression not in (COMPRESSION_NONE, COMPRESSION_ZSTD) or not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise CorruptError(f"{name} has a header with unsupported parameters")
    return Header(raw[:HEADER_BYTES], compression, chunk_bytes, key_id.hex(), salt)


def _file_cipher(key: Key, header: Header):
    # The file key depends on the random salt and the whole header, so no two files
    # share a key and the counter nonces below never repeat under one key.
    file_key = HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=header.salt, info=_FILE_KEY_LABEL + header.raw
    ).derive(key.material)
    return AESGCM(file_key)


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
    plaintext_bytes: int
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

    `close()` writes the final chunk; a stream that was never closed has no final
    chunk and is rejected as truncated when read, which is what an interrupted
    backup should look like.
    """

    def __init__(
        self,
        target,
        key: Key,
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
        self._header = _build_header(key, compression, chunk_bytes)
        self._cipher = _file_cipher(key, self._header)
        self._compressor = (
            _compressor(compression_level, threads) if compression == COMPRESSION_ZSTD else None
        )
        self._pending = bytearray()
        self._counter = 0
        self.plaintext_bytes = 0
        self._closed = False
        self._out.write(self._header.raw)

    def write(self, data) -> int:
        self.plaintext_bytes += len(data)
        if self._compressor is not None:
            data = self._compressor.compress(data)
        self._pending += data
        while len(self._pending) >= self._chunk_bytes:
            self._seal(RECORD_DATA, bytes(self._pending[: self._chunk_bytes]))
            del self._pending[: self._chunk_bytes]
        return len(data)

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


class _DecryptedChunks(io.RawIOBase):
    """The decrypted (still compressed) payload of an encrypted stream, as a raw reader."""

    def __init__(self, source, key: Key, name: str):
        super().__init__()
        self._source = source
        self._name = name
        self.sha256 = hashlib.sha256()
        self.encrypted_bytes = 0
        header_raw = self._read_exact(HEADER_BYTES)
        self.header = parse_header(header_raw, name)
        if self.header.key_id != key.key_id:
            raise WrongKeyError(
                f"{name} was encrypted with key id {self.header.key_id}, "
                f"but the key file given has key id {key.key_id}"
            )
        self._cipher = _file_cipher(key, self.header)
        self._counter = 0
        self._buffer = memoryview(b"")
        self._finished = False
        self._ahead = None

    def close(self):
        if self._ahead is not None:
            self._ahead.close()  # stops and joins the read-ahead thread
        super().close()

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

    def _next_chunk(self) -> bytes:
        prefix = self._read_exact(_RECORD.size)
        if not prefix:
            raise CorruptError(
                f"{self._name} is truncated: it ends after chunk {self._counter} "
                "without the final-chunk marker"
            )
        if len(prefix) < _RECORD.size:
            raise CorruptError(f"{self._name} is truncated inside chunk {self._counter}")
        kind, length = _RECORD.unpack(prefix)
        if (
            kind not in (RECORD_DATA, RECORD_FINAL)
            or not TAG_BYTES <= length <= self.header.chunk_bytes + TAG_BYTES
        ):
            raise CorruptError(f"{self._name}: chunk {self._counter} has a corrupted record header")
        sealed = self._read_exact(length)
        if len(sealed) < length:
            raise CorruptError(f"{self._name} is truncated inside chunk {self._counter}")
        try:
            plaintext = self._cipher.decrypt(_nonce(self._counter, kind), sealed, self.header.raw + prefix)
        except InvalidTag:
            raise CorruptError(
                f"{self._name}: chunk {self._counter} failed authentication "
                "(the file is corrupted, reordered or tampered with)"
            ) from None
        self._counter += 1
        if kind == RECORD_FINAL:
            self._finished = True
            if self._source.read(1):
                raise CorruptError(f"{self._name} has data after its final chunk (spliced or corrupted)")
        return plaintext

    def _next_payload(self) -> bytes:
        """The next non-empty plaintext, or b"" once the final chunk is authenticated."""
        while not self._finished:
            plaintext = self._next_chunk()
            if plaintext:
                return plaintext
        return b""

    @property
    def finished(self) -> bool:
        return self._finished

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


def decrypt_stream(source, target, key: Key, name: str = "stream", read_bytes: int = 1 << 20) -> StreamStats:
    """Decrypt (and decompress) `source` into `target`; every chunk is authenticated.

    Plaintext is written as it is authenticated: a caller that must not act on
    unverified data writes to a staging file and uses it only once this returns.
    """
    require_crypto_libraries()
    chunks = _DecryptedChunks(source, key, name)
    plaintext_bytes = 0
    if chunks.header.compression == COMPRESSION_ZSTD:
        reader = zstandard.ZstdDecompressor().stream_reader(chunks, read_size=chunks.header.chunk_bytes)
    else:
        reader = io.BufferedReader(chunks, buffer_size=chunks.header.chunk_bytes)
    try:
        while True:
            block = reader.read(read_bytes)
            if not block:
                break
            plaintext_bytes += len(block)
            target.write(block)
        # Reading to the end authenticates the final chunk even when zstd stopped early.
        if chunks.read(1) or not chunks.finished:
            raise CorruptError(f"{name}: the compressed payload ends before the encrypted stream does")
    except zstandard.ZstdError as error:
        raise CorruptError(f"{name}: the compressed payload is invalid ({error})") from None
    finally:
        chunks.close()
    return StreamStats(plaintext_bytes, chunks.encrypted_bytes, chunks.sha256.hexdigest())


def encrypt_stream(
    source, target, key: Key, compression_level: int = 3, threads: int = 2, read_bytes: int = 1 << 20
) -> StreamStats:
    """Encrypt everything readable from `source` into `target`."""
    writer = EncryptingWriter(target, key, compression_level=compression_level, threads=threads)
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
                _put(blocks, block, stop)
                if not block:
                    return
        except BaseException as error:  # handed to the consumer, raised there
            _put(blocks, error, stop)

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


def _put(blocks: queue.Queue, item, stop: threading.Event):
    while not stop.is_set():
        try:
            blocks.put(item, timeout=0.2)
            return
        except queue.Full:
            continue
