"""The stream shapes the pipeline, the codecs and the storages pass bytes through."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any, Protocol

CHUNK = 1 << 20


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> Any: ...


Observer = Callable[[bytes], Any]


class RawReader(io.RawIOBase):
    """A raw binary stream defined by its `read` alone: this adds `readinto`, so that it can
    sit under io.BufferedReader or be handed to code that reads into its own buffers."""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        raise NotImplementedError

    def readinto(self, buffer: Any, /) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


class ObservedReader(RawReader):
    """Passes every byte read through the observers (hashes, the RDB checker, a counter)."""

    def __init__(self, source: Readable, *observers: Observer) -> None:
        self._source = source
        self._observers = observers

    def read(self, size: int = -1, /) -> bytes:
        data = self._source.read(CHUNK if size is None or size < 0 else size)
        if data:
            for observe in self._observers:
                observe(data)
        return data


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


class Chunks:
    """Chunks from `next_chunk` (None at the end), consumed one by one (`for chunk in ...`) or as
    a byte stream (`read(n)`, which is how pyrage reads: 8 KiB at a time)."""

    def __init__(self, next_chunk: Callable[[], bytes | None]) -> None:
        self._next_chunk = next_chunk
        self._chunk = b""  # being read(), from _pos on
        self._pos = 0
        self._ended = False

    def _next(self) -> bytes | None:
        chunk = None if self._ended else self._next_chunk()
        self._ended = chunk is None
        return chunk

    def __iter__(self) -> Iterator[bytes]:
        if self._pos < len(self._chunk):
            yield self._chunk[self._pos:]
        self._chunk, self._pos = b"", 0
        while (chunk := self._next()) is not None:
            yield chunk

    def read(self, size: int = -1, /) -> bytes:
        while self._pos >= len(self._chunk):
            chunk = self._next()
            if chunk is None:
                return b""
            self._chunk, self._pos = chunk, 0
        end = len(self._chunk) if size is None or size < 0 else self._pos + size
        data = self._chunk[self._pos:end]
        self._pos += len(data)
        return data


def fan_out(*observers: Observer) -> Observer:
    def observe(data: bytes) -> None:
        for each in observers:
            each(data)
    return observe


def copy_stream(source: Readable, target: Writable) -> None:
    while chunk := source.read(CHUNK):
        target.write(chunk)
