"""The auth service's schema: what the selective restore, diff and inspect tests
load into a real server, and a brute-force view of a whole server to compare against."""

from __future__ import annotations

import json
from typing import cast

import redis

DAY = 86400


def seed(client: redis.Redis, clients: int = 20, users: int = 10, tokens: int = 5,
         states: int = 5) -> None:
    """oauth:client:* JSON strings; per user, tokens (30-day TTL), refresh tokens (1 year),
    an oauth:user_tokens:* set of their ids; login states with a 5-minute TTL."""
    pipe = client.pipeline(transaction=False)
    for c in range(clients):
        pipe.set(f"oauth:client:c{c}", json.dumps({"id": f"c{c}", "name": f"app {c}",
                                                    "redirect_uris": [f"https://a{c}.example/cb"]}))
    n = 0
    for u in range(users):
        ids = []
        for _ in range(tokens):
            pipe.set(f"oauth:token:t{n}", json.dumps({"user": f"u{u}", "scope": "read"}),
                     ex=30 * DAY)
            pipe.set(f"oauth:refresh:r{n}", f"t{n}", ex=365 * DAY)
            ids.append(f"t{n}")
            n += 1
        pipe.sadd(f"oauth:user_tokens:u{u}", *ids)
    for s in range(states):
        pipe.set(f"oauth:state:s{s}", "nonce", ex=300)
    pipe.execute()


def snapshot(client: redis.Redis, db: int = 0) -> dict[bytes, tuple[str, object, int]]:
    """Every key of a db, brute force: (type, value in canonical order, absolute expiry ms).
    Not the DUMP payload: a big set or hash is dumped in its hash table's order, which a
    reload changes. One pipeline per SCAN page: 100k keys one command at a time took minutes."""
    raw = redis.Redis(connection_pool=redis.ConnectionPool(
        **{**client.connection_pool.connection_kwargs, "db": db, "decode_responses": False}))
    out: dict[bytes, tuple[str, object, int]] = {}
    cursor = None
    while cursor != 0:
        cursor, page = raw.scan(cursor or 0, count=1000)
        keys = cast(list[bytes], page)  # decode_responses=False
        pipe = raw.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
        kinds = [kind.decode() for kind in pipe.execute()]
        for key, kind in zip(keys, kinds, strict=True):
            fetch(pipe, kind, key)
            pipe.execute_command("PEXPIRETIME", key)  # type: ignore[no-untyped-call]
        replies = iter(pipe.execute())
        for key, kind in zip(keys, kinds, strict=True):
            value, expiry = next(replies), next(replies)
            if kind != "none":  # gone between SCAN and TYPE
                out[key] = (kind, canonical(kind, value), int(expiry))
    raw.close()
    return out


def fetch(pipe: redis.client.Pipeline, kind: str, key: bytes) -> None:
    if kind == "string":
        pipe.get(key)
    elif kind == "set":
        pipe.smembers(key)
    elif kind == "hash":
        pipe.hgetall(key)
    elif kind == "zset":
        pipe.zrange(key, 0, -1, withscores=True)
    elif kind == "list":
        pipe.lrange(key, 0, -1)
    else:
        pipe.dump(key)


def canonical(kind: str, value: object) -> object:
    if kind == "set":
        return sorted(value)  # type: ignore[call-overload]
    if kind == "hash":
        return sorted(value.items())  # type: ignore[attr-defined]
    return value
