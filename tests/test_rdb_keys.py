"""The key sample read from real RDB files (backupd/rdb_keys.py)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import pytest

from backupd import manifest as mf
from backupd.errors import IntegrityError
from backupd.rdb_keys import LIMIT, PER_DB, KeySampler, key_digest, sample_file
from tests.conftest import RedisServer


def dump(server: RedisServer) -> bytes:
    client = server.client()
    try:
        client.save()
    finally:
        client.close()
    return (server.dir / "dump.rdb").read_bytes()


@pytest.mark.matrix
def test_sample_walks_every_type_and_database(redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory()
    client = server.client()
    client.set("ttl-first", "x", ex=3600)  # volatile keys are never sampled
    client.set("12345", "int-encoded name")
    client.hset("big-hash", mapping={f"f{i}": "v" * 100 for i in range(600)})  # hashtable
    client.hset("small-hash", mapping={"a": "1"})
    client.rpush("list", *[f"item-{i}" for i in range(3000)])  # quicklist
    client.sadd("big-set", *[f"m{i}" for i in range(600)])
    client.sadd("int-set", 1, 2, 3)
    client.zadd("big-zset", {f"z{i}": i for i in range(600)})
    client.set("long-value", "y" * 200_000)  # LZF-compressed
    for db in (3, 9):
        client.select(db)
        for i in range(20):
            client.set(f"db{db}-key-{i}", i)
    client.close()
    data = dump(server)
    sampler = KeySampler()
    for start in range(0, len(data), 777):  # odd chunk sizes: every primitive crosses a chunk
        sampler(data[start:start + 777])
    assert sampler.done and sampler.stopped == ""
    by_db = {db: [(k.name, k.type) for k in sampler.keys if k.db == db] for db in (0, 3, 9)}
    assert len(by_db[0]) == PER_DB and len(by_db[3]) == len(by_db[9]) == PER_DB
    assert len(sampler.keys) <= LIMIT
    names = {name for name, _ in by_db[0]}
    assert b"ttl-first" not in names
    assert dict(by_db[0]) == {b"12345": "string", b"big-hash": "hash", b"small-hash": "hash",
                              b"list": "list", b"big-set": "set", b"int-set": "set",
                              b"big-zset": "zset", b"long-value": "string"}
    assert sample_file(io.BytesIO(data)).keys == sampler.keys  # deterministic
    assert sample_file(io.BytesIO(data), dbs=[0]).keys == sampler.keys[:PER_DB]


def test_sample_stops_at_what_it_cannot_walk(redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory()
    client = server.client()
    client.set("before", "1")
    client.xadd("a-stream", {"f": "v"})
    client.close()
    data = dump(server)
    sampler = sample_file(io.BytesIO(data))
    assert sampler.done and "not walked" in sampler.stopped
    assert [k.name for k in sampler.keys] in ([], [b"before"])
    broken = KeySampler()
    broken(data[:30] + b"\x00" * 64)  # garbage: it stops, never raises
    broken(b"\xff" * 100)
    assert not broken.keys or broken.done


def test_manifest_key_sample_and_memory_fields() -> None:
    """Manifests without the new fields still parse; a malformed sample is refused."""
    backup_id = mf.new_id(mf.now_utc())
    old = {"id": backup_id, "created_at": "2026-01-02T03:00:00Z", "raw_size": 10,
           "raw_sha256": "a" * 64, "stored_size": 10, "stored_sha256": "b" * 64,
           "compression": "none", "encryption": "none",
           "artifact": mf.artifact_name(backup_id, "none", False), "redis": {"version": "7.0.15"}}
    parsed = mf.parse(json.dumps(old).encode())
    assert parsed.key_sample == [] and parsed.redis.used_memory == 0
    sample = [f"0:hash:{key_digest(0, b'k')}"]
    new = {**old, "key_sample": sample,
           "redis": {"used_memory": 123, "maxmemory_policy": "allkeys-lru"}}
    parsed = mf.parse(json.dumps(new).encode())
    assert parsed.key_sample == sample and parsed.redis.used_memory == 123
    assert mf.parse(parsed.to_json()) == parsed
    for bad in (["0:hash:plain-key-name"], [f"x:hash:{key_digest(0, b'k')}"], [3]):
        with pytest.raises(IntegrityError, match="key_sample"):
            mf.parse(json.dumps({**old, "key_sample": bad}).encode())
    with pytest.raises(IntegrityError, match="'redis' is malformed"):
        mf.parse(json.dumps({**old, "redis": {"used_memory": "lots"}}).encode())
