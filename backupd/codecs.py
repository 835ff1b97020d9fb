"""Compression and encryption adapters the pipeline streams through: gzip as a reader and a
writer (zstd has its own, zstd_frames.py), pyrage with our exceptions kept, age identities."""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyrage

from backupd.errors import IntegrityError, StorageError
from backupd.streams import CHUNK, RawReader, Readable, Writable


class ZlibReader(RawReader):
    """gzip compression as a reader, for symmetry with zstd's stream_reader."""

    def __init__(self, source: Readable, level: int) -> None:
        self._source = source
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, 31)
        self._buffer = b""
        self._done = False

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


class ZlibWriter(io.RawIOBase):
    """gzip decompression as a writer; `finish()` insists on a complete stream."""

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


class _Relayed:
    """A stream handed to pyrage, which turns any exception raised while it reads or writes
    into its own EncryptError/DecryptError, keeping only the text: this keeps the original."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.error: BaseException | None = None

    def read(self, size: int = -1, /) -> bytes:
        try:
            data: bytes = self._stream.read(size)
        except BaseException as exc:
            self.error = exc
            raise
        return data

    def write(self, data: bytes, /) -> Any:
        try:
            return self._stream.write(data)
        except BaseException as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            flush = getattr(self._stream, "flush", None)
            if flush is not None:
                flush()
        except BaseException as exc:
            self.error = exc
            raise


def through_pyrage(call: Callable[..., Any], source: Readable, target: Writable,
                   keys: list[Any]) -> None:
    """pyrage's encrypt_io/decrypt_io, raising what our own streams raised (a snapshot to read
    again, a full disk, a corrupt zstd stream) as itself rather than as a pyrage error."""
    reader, writer = _Relayed(source), _Relayed(target)
    try:
        call(reader, writer, keys)
    except Exception:
        error = reader.error or writer.error
        if error is not None:
            raise error from None
        raise


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
