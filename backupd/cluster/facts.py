"""What a cluster backup's manifest records (`Manifest.cluster`): per shard its artifact,
node, slot ranges and key count, and for the whole the cluster's epoch and the time spread
between the shards' snapshots. Parsed as strictly as the rest of a manifest."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from backupd.cluster import slots as sl
from backupd.errors import IntegrityError

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NODE_ID = re.compile(r"[0-9a-f]{40}")
_SAMPLE_RE = re.compile(r"\d{1,5}:[a-z]{1,16}:[0-9a-f]{32}")


@dataclass(frozen=True)
class ShardFacts:
    index: int
    artifact: str
    node_id: str  # the node the snapshot came from
    primary_id: str  # the shard's primary when the backup started
    host: str
    port: int
    role: str  # of the node the snapshot came from: "master" or "replica"
    slots: list[list[int]]  # [[start, end], ...], inclusive
    keys: int
    raw_size: int
    raw_sha256: str
    stored_size: int
    stored_sha256: str
    rdb_version: int
    rdb_checksum: str
    version: str = ""  # the node's server version
    server: str = "redis"
    snapshot_at: float = 0.0  # unix time the node started sending its snapshot
    master_replid: str = ""  # the replication id and offset the snapshot is at
    master_repl_offset: int = 0
    key_sample: list[str] = field(default_factory=list)

    @property
    def ranges(self) -> list[sl.Range]:
        return [(a, b) for a, b in self.slots]


@dataclass(frozen=True)
class ClusterFacts:
    epoch: int  # cluster_current_epoch when the backup started
    spread_s: float  # last shard's snapshot start minus the first's
    slots_covered: int
    shards: list[ShardFacts]

    def shape(self) -> list[tuple[sl.Range, ...]]:
        return [tuple(s.ranges) for s in self.shards]


_SHARD_TYPES: dict[str, type | tuple[type, ...]] = {
    "index": int, "artifact": str, "node_id": str, "primary_id": str, "host": str, "port": int,
    "role": str, "keys": int, "raw_size": int, "raw_sha256": str, "stored_size": int,
    "stored_sha256": str, "rdb_version": int, "rdb_checksum": str, "version": str,
    "server": str, "snapshot_at": (int, float), "master_replid": str,
    "master_repl_offset": int,
}


def _typed(raw: dict[str, Any], types: dict[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for key, kind in types.items():
        if key not in raw:
            continue
        value = raw[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise IntegrityError(f"{where}: field {key!r} has the wrong type")
        out[key] = value
    return out


def parse(raw: Any, where: str, artifact_of: Any) -> ClusterFacts:
    """`artifact_of(index)` is the artifact name shard `index` must have."""
    if not isinstance(raw, dict) or not isinstance(raw.get("shards"), list) or not raw["shards"]:
        raise IntegrityError(f"{where}: field 'cluster' is malformed")
    top = _typed(raw, {"epoch": int, "spread_s": (int, float), "slots_covered": int}, where)
    shards = []
    for index, item in enumerate(raw["shards"]):
        at = f"{where}: cluster shard {index}"
        if not isinstance(item, dict):
            raise IntegrityError(f"{at} is not an object")
        values = _typed(item, _SHARD_TYPES, at)
        missing = [k for k in _SHARD_TYPES if k not in values and k not in
                   ("version", "server", "snapshot_at", "master_replid", "master_repl_offset")]
        if missing:
            raise IntegrityError(f"{at}: fields {missing} are missing")
        if values["index"] != index or values["artifact"] != artifact_of(index):
            raise IntegrityError(f"{at}: index or artifact name does not match")
        if not (_HEX64.fullmatch(values["raw_sha256"]) and _HEX64.fullmatch(
                values["stored_sha256"]) and _NODE_ID.fullmatch(values["node_id"])):
            raise IntegrityError(f"{at}: a digest or the node id is malformed")
        ranges = item.get("slots")
        if not isinstance(ranges, list) or not all(
                isinstance(r, list) and len(r) == 2 and all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 <= v < sl.SLOTS
                    for v in r) and r[0] <= r[1] for r in ranges):
            raise IntegrityError(f"{at}: field 'slots' is malformed")
        sample = item.get("key_sample", [])
        if not isinstance(sample, list) or not all(
                isinstance(v, str) and _SAMPLE_RE.fullmatch(v) for v in sample):
            raise IntegrityError(f"{at}: field 'key_sample' is malformed")
        shards.append(ShardFacts(slots=[list(r) for r in ranges], key_sample=sample, **values))
    return ClusterFacts(top.get("epoch", 0), float(top.get("spread_s", 0.0)),
                        top.get("slots_covered", 0), shards)
