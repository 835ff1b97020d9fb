"""`backupd backup` of a Redis Cluster: one snapshot per shard, one manifest for all.

Every shard's snapshot comes over the replication protocol (replication.ReplicationStream)
from its primary, or from a replica in sync with `redis.prefer = "replica"`, several shards at
once (`redis.cluster.parallel`), each packed (RDB check, compression, encryption) into its own
artifact. The backup is committed by one manifest, written last, only when every shard's
artifact is complete and verified, the shards cover all 16384 slots, and the slot map read
after the snapshots is the one read before (a slot that moved, or is moving, in between
could be in two shards or in none). Otherwise nothing is committed: the shards' artifacts
are leftovers that the next run removes, and the error names the shard.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from backupd import __version__, checkpoints, replication, source
from backupd import manifest as mf
from backupd.actions import backup as single
from backupd.cluster import slots as sl
from backupd.cluster import topology as tp
from backupd.cluster.facts import ClusterFacts, ShardFacts
from backupd.config import Config
from backupd.discovery import check_replica
from backupd.endpoint import Endpoint
from backupd.errors import BackupdError, ClusterError, StorageError
from backupd.manifest import Manifest, RedisFacts
from backupd.pipeline import PackResult, pack
from backupd.rdb_keys import KeySampler
from backupd.storage import layout
from backupd.storage.base import Listing
from backupd.storage.local import LocalStorage

log = structlog.get_logger("backupd.cluster_backup")


@dataclass(frozen=True)
class _Plan:
    index: int
    shard: tp.Shard
    node: tp.Node
    endpoint: Endpoint
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _ShardTaken:
    plan: _Plan
    artifact: str
    packed: PackResult
    server: source.ServerInfo
    keys: int
    keys_exact: bool
    sample: list[str]
    snapshot_at: float
    facts: dict[str, Any]


def run_cluster_backup(config: Config, *, trigger: str = "manual", tag: str = "",
                       env: Mapping[str, str] | None = None,
                       listing: Listing | None = None) -> Manifest:
    """Take one cluster backup into the local directory; returns its committed manifest.
    The caller holds `backup_lock` on the backup directory (`listing`: the directory's, taken
    under it; listed here when not given)."""
    started = time.monotonic()
    single.check_tag(tag)
    single.yield_cpu(config.backup.niceness)
    storage = LocalStorage(Path(config.backup.dir))
    listing = storage.listing() if listing is None else listing
    single.clean_leftovers(storage, listing)
    existing = listing.manifests
    previous = existing[0] if existing else None
    seeds = tp.seed_endpoints(config.redis, env)
    before = tp.read(seeds)
    before.check_complete()
    plans = [_plan(i, shard, seeds[0], config) for i, shard in enumerate(before.shards)]
    backup_id, moment = single.next_id(mf.now_utc(), previous)
    log.info("cluster_backup_started", id=backup_id, shards=len(plans), epoch=before.epoch,
             nodes=[p.node.address for p in plans])
    taken = _take_all(plans, backup_id, storage, config)
    after = tp.read(seeds)
    warnings = _compare(before, after)
    manifest = _manifest(backup_id, moment, trigger, tag, taken, before, config,
                         warnings + [w for p in plans for w in p.warnings], previous,
                         round(time.monotonic() - started, 3))
    for part in manifest.parts():
        single.check_stored(storage, part)
    checkpoints.reached("manifest")
    try:
        storage.write_manifest(manifest)
    except StorageError:
        if not storage.manifest_path(manifest.id).exists():
            for part in manifest.parts():
                storage.artifact_path(part).unlink(missing_ok=True)
        raise
    checkpoints.reached("committed")
    for warning in manifest.warnings:
        log.warning("backup_anomaly", id=manifest.id, warning=warning)
    assert manifest.cluster is not None
    log.info("backup_done", id=manifest.id, keys=manifest.keys, shards=len(plans),
             raw_size=manifest.raw_size, stored_size=manifest.stored_size,
             spread_s=manifest.cluster.spread_s, duration_s=manifest.duration_s)
    return manifest


def _plan(index: int, shard: tp.Shard, base: Endpoint, config: Config) -> _Plan:
    """Which node of the shard gives its snapshot: a replica in sync when asked for, else the
    primary (with a warning when a replica was asked for)."""
    primary = _Plan(index, shard, shard.primary, tp.node_endpoint(base, shard.primary, shard))
    if config.redis.prefer != "replica":
        return primary
    why = "it has no replica"
    for node in shard.replicas:
        if node.health != "online":
            why = f"replica {node.address} is {node.health}"
            continue
        endpoint = tp.node_endpoint(base, node, shard)
        try:
            client = source.connect_endpoint(endpoint)
            try:
                with source.redis_errors(endpoint.cfg, True):
                    info = client.info("replication")
            finally:
                client.close()
            check_replica(info, config.redis, endpoint.where)
        except BackupdError as exc:  # StaleReplica too
            why = str(exc)
            continue
        return _Plan(index, shard, node, endpoint)
    note = f"{shard.name}: backed up from the primary, no replica in sync ({why})"
    log.warning("cluster_replica_unavailable", shard=sl.show(shard.slots), why=why)
    return _Plan(index, shard, shard.primary, primary.endpoint, [note])


def _take_all(plans: list[_Plan], backup_id: str, storage: LocalStorage,
              config: Config) -> list[_ShardTaken]:
    """Every shard's snapshot, `redis.cluster.parallel` at a time; all of them run to their
    end, then the first failure is raised (naming its shard), and the others' artifacts
    stay as leftovers of an uncommitted backup."""
    workers = max(1, min(config.redis.cluster.parallel, len(plans)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard") as pool:
        futures = [pool.submit(_take_shard, plan, backup_id, storage, config) for plan in plans]
        results: list[_ShardTaken] = []
        failures: list[BaseException] = []
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as exc:  # raised below, once the others ended
                failures.append(exc)
    if failures:
        log.warning("cluster_backup_failed", id=backup_id, failed=len(failures),
                    of=len(plans), leftovers="removed by the next run")
        raise failures[0]
    return results


def _take_shard(plan: _Plan, backup_id: str, storage: LocalStorage,
                config: Config) -> _ShardTaken:
    single.yield_cpu(config.backup.niceness)
    try:
        return _snapshot(plan, backup_id, storage, config)
    except BackupdError as exc:
        raise type(exc)(f"{plan.shard.name}, node {plan.node.address}: {exc}; nothing was "
                        "committed") from None


def _snapshot(plan: _Plan, backup_id: str, storage: LocalStorage,
              config: Config) -> _ShardTaken:
    endpoint = plan.endpoint
    client = source.connect_endpoint(endpoint)
    try:
        with source.redis_errors(endpoint.cfg, True):
            node_id = str(tp.cluster_command(client, "MYID"))
            server = source.server_info(client, endpoint.cfg)
        _check_node(plan, node_id, str(server.persistence.get("role", "")))
        facts, _ = source.replication(client, endpoint)
    finally:
        client.close()
    name = layout.shard_artifact_name(backup_id, plan.index, config.backup.compression,
                                      bool(config.backup.age_recipients))
    stream = replication.ReplicationStream(endpoint)
    snapshot_at = time.time()
    try:
        sampler = KeySampler([0])
        packed = pack(stream, storage.dir / name, compression=config.backup.compression,
                      level=config.backup.compression_level,
                      recipients=config.backup.age_recipients, observe=sampler)
    finally:
        stream.close()
    keys_per_db, exact = single.count_keys(stream.head, server.keys_per_db)
    return _ShardTaken(plan, name, packed, server, sum(keys_per_db.values()), exact,
                       single.sample_of(sampler), snapshot_at,
                       {**facts, **stream.facts(server.persistence)})


def _check_node(plan: _Plan, node_id: str, role: str) -> None:
    """The address still belongs to the node the slot map named, in the role it named."""
    expected = "master" if plan.node.role == "master" else "slave"
    if node_id != plan.node.node_id or role != expected:
        raise ClusterError(f"{plan.node.address} is node {node_id[:8]} with role:{role}, the "
                           f"slot map said {plan.node.node_id[:8]} as "
                           f"{plan.node.role} (a failover under way?)")


def _compare(before: tp.Topology, after: tp.Topology) -> list[str]:
    """Refuse when slots moved or are moving (ClusterError); a failover with the same slots
    is a warning: each snapshot came from the node that held the slots at its start."""
    if after.migrating:
        raise ClusterError("slots started migrating during the backup ("
                           + "; ".join(after.migrating[:3]) + "); nothing was committed, the "
                           "next run takes a new backup")
    if after.shape() != before.shape():
        old, new = set(before.shape()), set(after.shape())
        gone = [sl.show(s) for s in before.shape() if s not in new]
        came = [sl.show(s) for s in after.shape() if s not in old]
        raise ClusterError(f"the slot map changed during the backup: shards {gone} are now "
                           f"{came}; nothing was committed, the next run takes a new backup")
    warnings = []
    old_map = before.slot_map()
    for ranges, primary in after.slot_map().items():
        if old_map[ranges] != primary:
            warnings.append(f"shard {sl.show(ranges)} failed over during the backup (primary "
                            f"{old_map[ranges][:8]} -> {primary[:8]}): its snapshot is from "
                            "the node that held the slots when the backup started")
    return warnings


def _manifest(backup_id: str, moment: datetime, trigger: str, tag: str,
              taken: list[_ShardTaken], before: tp.Topology, config: Config,
              warnings: list[str], previous: Manifest | None, duration: float) -> Manifest:
    shards = [ShardFacts(
        index=t.plan.index, artifact=t.artifact, node_id=t.plan.node.node_id,
        primary_id=t.plan.shard.primary.node_id, host=t.plan.node.host, port=t.plan.node.port,
        role=t.plan.node.role, slots=[list(r) for r in t.plan.shard.slots], keys=t.keys,
        raw_size=t.packed.raw.size, raw_sha256=t.packed.raw.sha256,
        stored_size=t.packed.stored.size, stored_sha256=t.packed.stored.sha256,
        rdb_version=t.packed.rdb.version, rdb_checksum=t.packed.rdb.checksum,
        version=t.server.facts.version, server=t.server.facts.server,
        snapshot_at=round(t.snapshot_at, 3), key_sample=t.sample,
        master_replid=str(t.facts.get("master_replid", "")),
        master_repl_offset=int(t.facts.get("master_repl_offset") or 0)) for t in taken]
    starts = [t.snapshot_at for t in taken]
    cluster = ClusterFacts(epoch=before.epoch, spread_s=round(max(starts) - min(starts), 3),
                           slots_covered=before.covered, shards=shards)
    keys = sum(s.keys for s in shards)
    raw_size = sum(s.raw_size for s in shards)
    first: RedisFacts = taken[0].server.facts
    newest = max(taken, key=lambda t: t.packed.rdb.version)
    checksums = {s.rdb_checksum for s in shards}
    return Manifest(
        id=backup_id, created_at=mf.format_time(moment), trigger=trigger, tag=tag,
        redis=RedisFacts(version=newest.server.facts.version, server=newest.server.facts.server,
                         host=first.host, port=first.port, role="cluster",
                         used_memory=sum(t.server.facts.used_memory for t in taken),
                         maxmemory_policy=first.maxmemory_policy),
        rdb_version=newest.packed.rdb.version,
        rdb_checksum="ok" if checksums == {"ok"} else sorted(checksums - {"ok"})[0],
        keys=keys, keys_per_db={"db0": keys}, keys_exact=all(t.keys_exact for t in taken),
        key_sample=[],
        raw_size=raw_size, raw_sha256=mf.cluster_digest([s.raw_sha256 for s in shards]),
        stored_size=sum(s.stored_size for s in shards),
        stored_sha256=mf.cluster_digest([s.stored_sha256 for s in shards]),
        compression=config.backup.compression,
        encryption="age" if config.backup.age_recipients else "none",
        artifact=shards[0].artifact, age_recipients=list(config.backup.age_recipients),
        duration_s=duration, backupd_version=__version__,
        warnings=warnings + single.anomalies(keys, raw_size, previous),
        upload="pending" if config.s3.enabled else "none", source="replication",
        replication={}, cluster=cluster)

