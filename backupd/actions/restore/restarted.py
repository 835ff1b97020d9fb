"""Step 6, after the start: is the data Redis ended up with the backup?

`rdb_last_load_keys_loaded` is not enough: after an AOF load it counts the AOF's base only
(Redis 7.0, 8.2 and Valkey 8.1 alike). So the keys per database from INFO keyspace at the first
answer are compared with the manifest's `keys_per_db`, and sampled keys (backupd.rdb_keys, read
from the staged RDB) must exist with their types. Keys evicted right after the load (maxmemory)
are named as such. Any mismatch fails the restore, which is then rolled back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis

from backupd.actions.restore.swap import drift_allowed
from backupd.errors import RestoreError
from backupd.manifest import Manifest
from backupd.rdb_keys import SampledKey


def keyspace(info: Mapping[str, Any]) -> dict[str, int]:
    """Keys per database ("db0": n) from INFO."""
    return {db: int(stats.get("keys", 0)) for db, stats in info.items()
            if db.startswith("db") and db[2:].isdigit() and isinstance(stats, dict)}


def check_keyspace(info: Mapping[str, Any], manifest: Manifest) -> None:
    """Keys per database at the first answer against the manifest; only keys that had expired
    by the load (rdb_last_load_keys_expired) may be missing."""
    live, expected = keyspace(info), manifest.keys_per_db
    if manifest.keys and not expected:
        check_evictions(info)
        return  # a manifest without keys_per_db: only the total was checked (check_loaded)
    expired = int(info.get("rdb_last_load_keys_expired", 0))
    problems, missing, surplus = [], 0, False
    for db in sorted(set(live) | set(expected), key=lambda d: int(d[2:])):
        have, want = live.get(db, 0), expected.get(db, 0)
        if have == want or (not manifest.keys_exact and want and
                            abs(have - want) <= drift_allowed(want)):
            continue  # approximate: the manifest's count came from INFO after the fork
        problems.append(f"{db} has {have} keys, the backup {want}")
        missing += max(0, want - have)
        surplus = surplus or have > want
    check_evictions(info, problems)
    if problems and (surplus or missing > expired):
        raise RestoreError("Redis does not hold the backup after the restart: "
                           + "; ".join(problems) + f" ({expired} keys had expired by the load)")


def check_evictions(info: Mapping[str, Any], problems: Sequence[str] = ()) -> None:
    evicted = int(info.get("evicted_keys", 0))
    if evicted:
        raise RestoreError(
            f"Redis evicted {evicted} keys right after loading the backup (maxmemory "
            f"{info.get('maxmemory', '?')} bytes, policy {info.get('maxmemory_policy', '?')})"
            + (f": {'; '.join(problems)}" if problems else "")
            + "; raise maxmemory above the backup's memory")


def check_sample(client: redis.Redis, sample: Sequence[SampledKey]) -> int:
    """Each sampled key must exist with its type; returns how many were checked."""
    if not sample:
        return 0
    pipe = client.pipeline(transaction=False)
    for key in sample:
        pipe.select(key.db)
        pipe.type(key.name)
    replies = pipe.execute()[1::2]
    wrong = [f"db{key.db} {key.type} key #{n}: {got}" for n, (key, got) in
             enumerate(zip(sample, replies, strict=True), 1) if str(got) != key.type]
    if wrong:
        raise RestoreError(
            f"{len(wrong)} of {len(sample)} sampled keys of the backup are missing or of "
            f"another type after the restart ({'; '.join(wrong[:3])}): Redis loaded other "
            "data")
    return len(sample)
