"""A deterministic sample of key names and types, read from an RDB as it streams by.

A restore checks that these keys exist, with these types, in the Redis it restarted: a key
count alone does not notice other data of the same size. The reader only walks the opcodes
(SELECTDB, RESIZEDB, expire times, AUX, ...) and the type byte + key name of each entry,
skipping values by their lengths; where it meets a value it cannot skip (modules, streams,
hash field expiry) or spends its budget, it stops and the sample is what it has. It never
raises: sampling is a check on top, never a reason for a backup to fail.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from backupd.rdb import HEADER_SIZE

PER_DB = 8  # the first keys (without a TTL: they may expire before the check) of each db
LIMIT = 32
MAX_KEY_BYTES = 1024  # a longer name is skipped, not sampled
MAX_ENTRIES = 100_000  # entries walked in all; past that the sample is what it has
READ_SIZE = 1 << 20

_AUX, _FUNCTION2, _SELECTDB, _RESIZEDB = 0xFA, 0xF5, 0xFE, 0xFB
_EXPIRE_MS, _EXPIRE_S, _IDLE, _FREQ, _SLOT_INFO, _EOF = 0xFC, 0xFD, 0xF8, 0xF9, 0xF4, 0xFF

# RDB type byte -> (TYPE as Redis reports it, how the value is laid out)
_ONE_STRING = frozenset({0, 9, 10, 11, 12, 13, 16, 17, 20})
_TYPES = {0: "string", 1: "list", 2: "set", 3: "zset", 4: "hash", 5: "zset", 9: "hash",
          10: "list", 11: "set", 12: "zset", 13: "hash", 14: "list", 16: "hash", 17: "zset",
          18: "list", 20: "set"}


@dataclass(frozen=True)
class SampledKey:
    db: int
    name: bytes
    type: str

    @property
    def digest(self) -> str:
        """What the manifest records: the name is hashed (key names may say too much)."""
        return key_digest(self.db, self.name)


def key_digest(db: int, name: bytes) -> str:
    return hashlib.sha256(f"{db}:".encode() + name).hexdigest()[:32]


class _More(Exception):
    """Internal: the buffer ran out; wait for the next chunk."""


class KeySampler:
    """Feed the RDB's bytes in order (an Observer of pipeline.pack); read `keys` at the end.

    `dbs`: the databases that hold keys, when known (INFO keyspace): reading stops once the
    last of them has its sample, instead of walking the whole file."""

    def __init__(self, dbs: Iterable[int] | None = None) -> None:
        self.keys: list[SampledKey] = []
        self.done = False
        self.stopped = ""  # why it stopped early ("" = it reached its end)
        known = list(dbs) if dbs is not None else []
        self._last_db = max(known) if known else None
        self._buf = bytearray()
        self._pos = 0
        self._skip = 0
        self._db = 0
        self._in_db = 0
        self._entries = 0
        self._parser = self._parse()

    def __call__(self, chunk: bytes | memoryview) -> None:
        if self.done:
            return
        try:
            self._feed(bytes(chunk))
        except Exception as exc:  # never fail a backup over the sample
            self._stop(f"unreadable: {type(exc).__name__}")

    def _feed(self, data: bytes) -> None:
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            data = data[taken:]
            if not data:
                return
        del self._buf[: self._pos]
        self._pos = 0
        self._buf += data
        try:
            next(self._parser)
        except StopIteration:
            self.done = True

    def _stop(self, why: str) -> None:
        self.done, self.stopped = True, why

    # -- reading primitives (generators: `yield` waits for the next chunk) -------------------

    def _take(self, n: int) -> Generator[None, None, bytes]:
        while len(self._buf) - self._pos < n:
            yield
        data = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        return data

    def _skip_bytes(self, n: int) -> Generator[None, None, None]:
        available = len(self._buf) - self._pos
        if n <= available:
            self._pos += n
            return
        self._pos = len(self._buf)
        self._skip = n - available
        while self._skip:
            yield  # _feed drops the skipped bytes before the parser runs again

    def _length(self) -> Generator[None, None, tuple[int, bool]]:
        """A length, or (encoding, True) for a specially encoded string."""
        first = (yield from self._take(1))[0]
        kind = first >> 6
        if kind == 0:
            return first & 0x3F, False
        if kind == 1:
            return ((first & 0x3F) << 8) | (yield from self._take(1))[0], False
        if kind == 3:
            return first & 0x3F, True
        size = {0x80: 4, 0x81: 8}.get(first)
        if size is None:
            raise ValueError("bad length encoding")
        return int.from_bytes((yield from self._take(size)), "big"), False

    def _string(self, keep: int) -> Generator[None, None, bytes | None]:
        """A string: its bytes when it is plain and at most `keep` long, else skipped."""
        value, special = yield from self._length()
        if special:
            if value == 3:  # LZF: compressed length, uncompressed length, data
                compressed, _ = yield from self._length()
                yield from self._length()
                yield from self._skip_bytes(compressed)
                return None
            data = yield from self._take({0: 1, 1: 2, 2: 4}[value])
            return str(int.from_bytes(data, "little", signed=True)).encode() if keep else None
        if value <= keep:
            return (yield from self._take(value))
        yield from self._skip_bytes(value)
        return None

    def _strings(self, count: int) -> Generator[None, None, None]:
        for _ in range(count):
            yield from self._string(0)

    # -- the file ------------------------------------------------------------------------------

    def _parse(self) -> Generator[None, None, None]:
        yield from self._take(HEADER_SIZE)
        expires = False
        while True:
            op = (yield from self._take(1))[0]
            if op == _AUX:
                yield from self._strings(2)
            elif op == _FUNCTION2:
                yield from self._string(0)
            elif op == _SELECTDB:
                self._db, _ = yield from self._length()
                self._in_db = 0
                if self._last_db is not None and self._db > self._last_db:
                    return
            elif op == _RESIZEDB:
                yield from self._length()
                yield from self._length()
            elif op == _SLOT_INFO:
                for _ in range(3):
                    yield from self._length()
            elif op in (_EXPIRE_MS, _EXPIRE_S):
                yield from self._skip_bytes(8 if op == _EXPIRE_MS else 4)
                expires = True
            elif op == _IDLE:
                yield from self._length()
            elif op == _FREQ:
                yield from self._skip_bytes(1)
            elif op == _EOF:
                return
            elif op in _TYPES:
                name = yield from self._string(MAX_KEY_BYTES)
                if name is not None and not expires and self._in_db < PER_DB:
                    self.keys.append(SampledKey(self._db, name, _TYPES[op]))
                    self._in_db += 1
                expires = False
                if self._complete():
                    return
                yield from self._value(op)
            else:
                self._stop(f"opcode or type {op} not walked")
                return

    def _complete(self) -> bool:
        self._entries += 1
        if len(self.keys) >= LIMIT:
            return True
        if self._entries >= MAX_ENTRIES:
            self._stop(f"walked {MAX_ENTRIES} entries")
            return True
        return self._db == self._last_db and self._in_db >= PER_DB

    def _value(self, kind: int) -> Generator[None, None, None]:
        if kind in _ONE_STRING:
            yield from self._string(0)
            return
        count, _ = yield from self._length()
        for _ in range(count):
            if kind in (1, 2, 14):
                yield from self._string(0)
            elif kind == 4:
                yield from self._strings(2)
            elif kind == 5:
                yield from self._string(0)
                yield from self._skip_bytes(8)
            elif kind == 3:
                yield from self._string(0)
                size = (yield from self._take(1))[0]
                if size < 253:
                    yield from self._skip_bytes(size)
            else:  # 18: quicklist 2, each node: container kind, then a listpack string
                yield from self._length()
                yield from self._string(0)


def sample_file(fh: BinaryIO, dbs: Iterable[int] | None = None) -> KeySampler:
    """Sample an RDB file from its start (the restore side, on the staged copy)."""
    sampler = KeySampler(dbs)
    while not sampler.done and (chunk := fh.read(READ_SIZE)):
        sampler(chunk)
    return sampler
