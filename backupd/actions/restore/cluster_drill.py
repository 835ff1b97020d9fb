"""The drill of a cluster backup: each shard loaded into a throwaway redis-server, its key
count checked, and every key's hash slot checked against the slots the manifest says that
shard held (a shard file restored onto the wrong node would serve nothing)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from backupd.actions.restore.drill import DrillResult, drilled
from backupd.actions.restore.swap import check_loaded
from backupd.cluster import slots as sl
from backupd.config import Config
from backupd.errors import EXIT_INTEGRITY, EXIT_OK, RestoreError
from backupd.manifest import Manifest
from backupd.servers import ServerId
from backupd.storage.base import Storage

SCAN_COUNT = 1000
MISPLACED_SHOWN = 3


def drill_shards(config: Config, storage: Storage, manifest: Manifest,
                 identities: Sequence[Any], scratch_parent: Path | None,
                 server: ServerId) -> DrillResult:
    assert manifest.cluster is not None
    loaded_total = 0
    for shard, part in zip(manifest.cluster.shards, manifest.parts(), strict=True):
        with drilled(config, storage, part, identities, scratch_parent) as (client, started):
            info: dict[str, Any] = client.info("everything")
            misplaced, scanned = misplaced_keys(client, shard.ranges)
        where = f"shard {shard.index} (slots {sl.show(shard.ranges)})"
        try:
            loaded = check_loaded(info, part.keys, started, part.keys_exact)
        except RestoreError as exc:
            return DrillResult(False, EXIT_INTEGRITY, f"drill failed: {where}: {exc}")
        if misplaced:
            return DrillResult(False, EXIT_INTEGRITY, (
                f"drill failed: {where} holds {len(misplaced)} of {scanned} keys whose "
                f"hash slot is not among its slots, e.g. " + ", ".join(
                    f"{k[:40]!r} (slot {s})" for k, s in misplaced[:MISPLACED_SHOWN])))
        loaded_total += loaded.loaded if loaded.loaded is not None else loaded.keys
    return DrillResult(True, EXIT_OK, (
        f"drill ok: {server.label} loaded {len(manifest.cluster.shards)} shards, "
        f"{loaded_total} keys, every key in its shard's slots; the manifest says "
        f"{manifest.keys}"))


def misplaced_keys(client: redis.Redis, ranges: list[sl.Range]) -> tuple[list[tuple[str, int]],
                                                                           int]:
    """Keys (db 0) whose slot is outside `ranges`, and how many keys were scanned."""
    pool = client.connection_pool
    raw = redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class,
        **{**pool.connection_kwargs, "decode_responses": False}))
    misplaced, scanned = [], 0
    try:
        for key in raw.scan_iter(count=SCAN_COUNT):
            scanned += 1
            slot = sl.keyslot(key)
            if not sl.contains(ranges, slot):
                misplaced.append((key.decode(errors="replace"), slot))
    finally:
        raw.close()
    return misplaced, scanned
