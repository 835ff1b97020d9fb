"""Walking a keyspace in bounded batches: SCAN per pattern and db, TYPE/PEXPIRETIME/MEMORY
USAGE and DUMP in pipelines, prefixes and TTL classes for reports.

Shared by the selective restore, `diff` and `inspect`. Key names and DUMP payloads are bytes
(a client with decode_responses would break on binary keys), and every batch is bounded by a
key count and by the values' estimated size, so one big hash is fetched on its own.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

SCAN_COUNT = 1000
BATCH_KEYS = 500
BATCH_BYTES = 8 << 20  # estimated value bytes fetched per pipeline
DEFAULT_SEPARATOR = ":"

# (upper bound in seconds, label) of the remaining TTL; keys without expiry are "none".
TTL_CLASSES = ((300, "<5m"), (3600, "<1h"), (86400, "<1d"), (30 * 86400, "<=30d"),
               (365 * 86400, "<=1y"))
TTL_LABELS = ("none", *(label for _, label in TTL_CLASSES), ">1y")


def bytes_client(client: redis.Redis, db: int) -> redis.Redis:
    """A client on the same server as `client` (same address, credentials, TLS), on `db`,
    that returns bytes: DUMP payloads are binary."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "db": db, "decode_responses": False}
    # from_pool: close() also disconnects the pool
    return redis.Redis.from_pool(redis.ConnectionPool(connection_class=pool.connection_class,
                                                      **kwargs))


def databases(info: dict[str, Any], only: int | None) -> list[int]:
    """The dbs with keys according to INFO keyspace (or just `only`)."""
    found = sorted(int(k[2:]) for k, v in info.items()
                   if k.startswith("db") and k[2:].isdigit() and isinstance(v, dict)
                   and int(v.get("keys", 0)))
    return [only] if only is not None else found


def scan(client: redis.Redis, pattern: str = "*") -> Iterator[list[bytes]]:
    """SCAN MATCH in pages; a key may appear twice (SCAN's guarantee), callers dedupe."""
    cursor = 0
    while True:
        cursor, keys = client.scan(cursor, match=pattern, count=SCAN_COUNT)
        if keys:
            yield [k if isinstance(k, bytes) else k.encode() for k in keys]
        if cursor == 0:
            return


@dataclass(frozen=True)
class KeyFacts:
    key: bytes
    type: str
    expire_at: int  # absolute unix ms; 0 = no expiry; -2 = gone
    size: int  # MEMORY USAGE estimate in bytes


def facts(client: redis.Redis, keys: Sequence[bytes], memory: bool = True) -> list[KeyFacts]:
    """TYPE, PEXPIRETIME (absolute ms, so no clock drift between the calls) and MEMORY USAGE."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
        pipe.execute_command("PEXPIRETIME", key)  # type: ignore[no-untyped-call]
        if memory:
            pipe.execute_command("MEMORY", "USAGE", key)  # type: ignore[no-untyped-call]
    replies = pipe.execute()
    step = 3 if memory else 2
    out = []
    for i, key in enumerate(keys):
        kind, expire = replies[i * step], int(replies[i * step + 1])
        size = int(replies[i * step + 2] or 0) if memory else 0
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        out.append(KeyFacts(key, kind, -2 if kind == "none" else max(expire, 0), size))
    return out


def batches(items: Iterable[KeyFacts], max_keys: int = BATCH_KEYS,
            max_bytes: int = BATCH_BYTES) -> Iterator[list[KeyFacts]]:
    """Group keys so a pipeline holds at most `max_keys` keys and about `max_bytes` of values;
    a key bigger than the budget gets a batch of its own."""
    batch: list[KeyFacts] = []
    size = 0
    for item in items:
        if batch and (len(batch) >= max_keys or size + item.size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item.size
    if batch:
        yield batch


def dump(client: redis.Redis, keys: Sequence[bytes]) -> list[bytes | None]:
    """DUMP payloads (None: the key is gone)."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.dump(key)
    return list(pipe.execute())


def prefix_of(key: bytes, separator: str = DEFAULT_SEPARATOR, depth: int = 0) -> str:
    """`oauth:client:abc` -> `oauth:client:`: everything before the last separator (depth 0),
    or the first `depth` parts; keys without a separator group under their own name's class
    `(no prefix)`."""
    name = display(key)
    parts = name.split(separator)
    if len(parts) == 1:
        return "(no prefix)"
    keep = len(parts) - 1 if depth <= 0 else min(depth, len(parts) - 1)
    return separator.join(parts[:keep]) + separator


def display(key: bytes) -> str:
    return key.decode("utf-8", errors="backslashreplace")


def ttl_class(expire_at: int, now_ms: int) -> str:
    """Remaining TTL bucket at `now_ms`: the same absolute expiry always gives the same class."""
    if expire_at <= 0:
        return "none"
    left = (expire_at - now_ms) / 1000
    for bound, label in TTL_CLASSES:
        if left < bound:
            return label
    return ">1y"


def matches(key: bytes, patterns: Sequence[str]) -> bool:
    """Client-side glob match (SCAN MATCH semantics for the usual * ? [..])."""
    name = display(key)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
