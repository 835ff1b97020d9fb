"""Streaming transforms between a raw RDB and a stored artifact, in one pass and bounded memory.

Backup: raw reader -> (SHA-256 + RDB check) -> compress -> encrypt -> (SHA-256) -> temp file.
Unpack: stored reader -> (SHA-256) -> decrypt -> decompress -> (SHA-256 + RDB check) -> sink.
Each stage is a small file-like wrapper so the stages compose in any combination; nothing ever
holds more than a chunk or two of the file in memory.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyrage
import zstandard

from backupd.errors import IntegrityError, StorageError
from backupd.rdb import RdbChecker, RdbInfo

CHUNK = 1 << 20
TEMP_MARK = ".tmp-"


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Writable(Protocol):
    def write(self, data: bytes, /) -> Any: ...


Observer = Callable[[bytes], Any]


class ObservedReader(io.RawIOBase):
    """Passes every byte read through the observers (hashes, the RDB checker, a counter)."""

    def __init__(self, source: Readable, *observers: Observer) -> None:
        self._source = source
        self._observers = observers

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        data = self._source.read(CHUNK if size is None or size < 0 else size)
        if data:
            for observe in self._observers:
                observe(data)
        return data

    def readinto(self, buffer: Any, /) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class ObservedWriter(io.RawIOBase):
    """Passes every byte written through the observers, then to `target` (if any)."""

    def __init__(self, target: Writable | None, *observers: Observer) -> None:
        self._target = target
        self._observers = observers

    def writable(self) -> bool:
        return True

    def write(self, data: Any, /) -> int:
        chunk = bytes(data)
        for observe in self._observers:
            observe(chunk)
        if self._target is not None:
            self._target.write(chunk)
        return len(chunk)


class _ZlibReader(io.RawIOBase):
    """gzip compression as a reader, for symmetry with zstd's stream_reader."""

    def __init__(self, source: Readable, level: int) -> None:
        self._source = source
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, 31)
        self._buffer = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        size = CHUNK if size is None or size < 0 else size
        while len(self._buffer) < size and not self._done:
            data = self._source.read(CHUNK)
            if data:
                self._buffer += self._zlib.compress(data)
            else:
                self._buffer += self._zlib.flush()
                self._done = True
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    def readinto(self, buffer: Any, /) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _ZlibWriter(io.RawIOBase):
    """gzip decompression as a writer; `close()` insists on a complete stream."""

    def __init__(self, target: Writable) -> None:
        self._target = target
        self._zlib = zlib.decompressobj(31)

    def writable(self) -> bool:
        return True

    def write(self, data: Any, /) -> int:
        try:
            self._target.write(self._zlib.decompress(bytes(data)))
        except zlib.error as exc:
            raise IntegrityError(f"the gzip stream is corrupt: {exc}") from None
        return len(data)

    def finish(self) -> None:
        self._target.write(self._zlib.flush())
        if not self._zlib.eof or self._zlib.unused_data:
            raise IntegrityError("the gzip stream is truncated or has trailing data")


def compress_reader(source: Readable, compression: str, level: int) -> Readable:
    if compression == "zstd":
        threads = -1 if (os.cpu_count() or 1) > 1 else 0
        compressor = zstandard.ZstdCompressor(level=level, threads=threads)
        return compressor.stream_reader(source, read_size=CHUNK, closefd=False)  # type: ignore[arg-type]
    if compression == "gzip":
        return _ZlibReader(source, level)
    return source


def copy_stream(source: Readable, target: Writable) -> None:
    while chunk := source.read(CHUNK):
        target.write(chunk)


@dataclass(frozen=True)
class Digest:
    size: int
    sha256: str


class Counter:
    """SHA-256 and byte count of everything fed to it."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def __call__(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)

    def digest(self) -> Digest:
        return Digest(self.size, self._hash.hexdigest())


@dataclass(frozen=True)
class PackResult:
    raw: Digest
    stored: Digest
    rdb: RdbInfo


def pack(source: Readable, dest: Path, *, compression: str, level: int,
         recipients: Sequence[str]) -> PackResult:
    """Stream a raw RDB into the artifact `dest`, atomically: temp file, fsync, rename.

    The RDB is checked in the same pass; a snapshot that fails the check never becomes a file
    with a backup's name.
    """
    raw, stored, checker = Counter(), Counter(), RdbChecker()
    tmp = dest.with_name(f".{dest.name}{TEMP_MARK}{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "wb", buffering=CHUNK) as fh:
            reader = compress_reader(ObservedReader(source, raw, checker.update),
                                     compression, level)
            writer = ObservedWriter(fh, stored)
            if recipients:
                keys = [pyrage.x25519.Recipient.from_str(r) for r in recipients]
                pyrage.encrypt_io(reader, writer, keys)
            else:
                copy_stream(reader, writer)
            fh.flush()
            os.fsync(fh.fileno())
        rdb = checker.finish()
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise StorageError(f"cannot write {dest}: {exc.strerror or exc}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return PackResult(raw.digest(), stored.digest(), rdb)


@dataclass(frozen=True)
class UnpackResult:
    stored: Digest
    raw: Digest
    rdb: RdbInfo


def unpack(source: Readable, sink: Writable | None, *, compression: str, encrypted: bool,
           identities: Sequence[Any] = ()) -> UnpackResult:
    """Stream a stored artifact back to the raw RDB (into `sink`, or nowhere to only check it)."""
    stored, raw, checker = Counter(), Counter(), RdbChecker()
    reader = ObservedReader(source, stored)
    raw_writer = ObservedWriter(sink, raw, checker.update)
    zlib_writer: _ZlibWriter | None = None
    decompressor: Any = None
    writer: Writable = raw_writer
    if compression == "zstd":
        decompressor = zstandard.ZstdDecompressor().stream_writer(
            raw_writer, write_size=CHUNK, closefd=False)  # type: ignore[arg-type]
        writer = decompressor
    elif compression == "gzip":
        writer = zlib_writer = _ZlibWriter(raw_writer)
    try:
        if encrypted:
            if not identities:
                raise IntegrityError("the backup is encrypted and no identity was given")
            pyrage.decrypt_io(reader, writer, list(identities))
        else:
            copy_stream(reader, writer)
        if decompressor is not None:
            decompressor.flush()
        if zlib_writer is not None:
            zlib_writer.finish()
    except pyrage.DecryptError as exc:
        raise IntegrityError(f"cannot decrypt the backup (wrong identity or corrupt): {exc}") \
            from None
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"the zstd stream is corrupt: {exc}") from None
    return UnpackResult(stored.digest(), raw.digest(), checker.finish())


def load_identities(path: str) -> list[Any]:
    """age identities (AGE-SECRET-KEY-1...) from a key file as written by age-keygen."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StorageError(f"cannot read identity file {path}: {exc}") from None
    identities = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                identities.append(pyrage.x25519.Identity.from_str(line))
            except Exception:  # pyrage raises IdentityError; never echo the key text
                raise IntegrityError(f"identity file {path} holds a line that is not an "
                                     "age identity (AGE-SECRET-KEY-1...)") from None
    if not identities:
        raise IntegrityError(f"identity file {path} holds no age identity")
    return identities


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(dest: Path, data: bytes, mode: int = 0o600) -> None:
    """Write small files (manifests, state) so that a crash leaves the old file or the new one."""
    tmp = dest.with_name(f".{dest.name}{TEMP_MARK}{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with open(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: Path) -> None:
    path.unlink(missing_ok=True)
