"""`backupd restore` of a cluster backup into the cluster of `[redis.cluster] seeds`.

How the keys get in: each shard's backup is loaded into a throwaway redis-server (the drill's)
and its keys are written into the target's primaries with `RESTORE key <absolute expiry>
payload ABSTTL REPLACE`, in pipelined batches (the selective restore's machinery:
keyspace.scan/facts/dump, loaded.open_backup), each key sent to the primary that owns its slot
in the target's slot map (client-side cluster routing; a MOVED/ASK reply means the slot map
changed under the restore, which then stops). The replicas follow through replication, and the
restore waits until each one has caught up.

Why not files or REPLICAOF: a cluster node refuses REPLICAOF, and a file swap needs every
node's data volume and a stop/start per node (with nodes.conf kept). RESTORE works on the live
cluster with only the network and an ACL (+restore +flushall +scan...), and the same code
serves both shapes:

- same shape (the target's shards hold exactly the backup's slot ranges): the preflight
  compares the slot maps and refuses a different shape, naming the difference;
- `--reshard`: any target shape covering all 16384 slots; keys land wherever the target's
  slot map puts them.

Before the first write, the target's data is backed up (a cluster backup, tag `before-restore
<id>`) unless it is empty, and then each primary is flushed: the target ends up holding
exactly the backup's keys (those that have not expired).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import structlog

from backupd import keyspace, polling, servers, source
from backupd.actions.backup import backup_lock
from backupd.actions.restore.loaded import open_backup, throwaway_identity
from backupd.actions.restore.options import Options, Ui, require_confirmation_possible
from backupd.actions.restore.selective import check_payload_fits
from backupd.actions.restore.staging import Selected, identities_for, select_backup
from backupd.cluster import slots as sl
from backupd.cluster import topology as tp
from backupd.cluster.facts import ShardFacts
from backupd.config import Config
from backupd.endpoint import Endpoint
from backupd.errors import (
    BackupdError,
    ClusterError,
    RedisAuthError,
    RedisUnavailable,
    RestoreError,
    UsageError,
)
from backupd.manifest import Manifest

log = structlog.get_logger("backupd.restore.cluster")
SYNC_POLL = 0.05
PROBE_PAYLOAD = b"\x00\x00" + b"\xff" * 8  # RDB version 0, a CRC64 that is not its own
RESTORE_GRANTS = "+flushall +restore +dbsize +time ~*"


@dataclass
class _Target:
    """The target cluster: its slot map and a bytes client per primary."""

    topology: tp.Topology
    base: Endpoint
    clients: dict[str, redis.Redis] = field(default_factory=dict)  # node id -> db 0, bytes
    owner: list[str] = field(default_factory=list)  # slot -> primary node id

    def open(self) -> None:
        self.owner = [""] * sl.SLOTS
        for shard in self.topology.shards:
            for start, end in shard.slots:
                self.owner[start:end + 1] = [shard.primary.node_id] * (end - start + 1)
            live = source.connect_endpoint(tp.node_endpoint(self.base, shard.primary, shard))
            self.clients[shard.primary.node_id] = keyspace.bytes_client(live, 0)
            live.close()

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def primaries(self) -> list[tuple[tp.Shard, redis.Redis]]:
        return [(s, self.clients[s.primary.node_id]) for s in self.topology.shards]


@dataclass
class _Written:
    keys: int = 0
    expired: int = 0
    per_node: dict[str, int] = field(default_factory=dict)


def restore_cluster(config: Config, opts: Options, ui: Ui, reshard: bool,
                    env: Mapping[str, str] | None = None) -> int:
    """Plan, and unless --dry-run, put the cluster backup into the target cluster."""
    if not config.redis.cluster.enabled:
        raise UsageError("--reshard restores a cluster backup into a cluster: set "
                         "[redis.cluster] seeds")
    if opts.method or opts.start:
        raise UsageError("a cluster restore writes keys into the running cluster: it takes "
                         "no --method or --start")
    require_confirmation_possible(opts.yes, opts.dry_run, ui)
    selected = select_backup(config, opts.selector, opts.before, opts.source, env)
    m = selected.manifest
    if m.cluster is None:
        raise UsageError(f"backup {m.id} is not a cluster backup; [redis.cluster] seeds "
                         "restores only cluster backups")
    identities = identities_for(m, opts.identity_file)
    seeds = tp.seed_endpoints(config.redis, env)
    topology = tp.read(seeds)
    topology.check_complete()
    difference = shape_difference(m.cluster.shape(), topology.shape())
    if difference and not reshard:
        raise RestoreError(f"the target cluster has a different shape than backup {m.id}: "
                           f"{difference}; nothing was changed. Restore with --reshard to write "
                           "every key through the target's slot map")
    target = _Target(topology, seeds[0])
    try:
        with _redis_errors():
            return _restore_into(config, opts, ui, selected, identities, target, difference,
                                 env)
    finally:
        target.close()


@contextlib.contextmanager
def _redis_errors() -> Iterator[None]:
    try:
        yield
    except redis.exceptions.NoPermissionError as exc:
        raise RedisAuthError(f"the ACL user lacks a permission for the cluster restore: {exc}. "
                             f"Grant, on every node: {RESTORE_GRANTS} (README \"Redis "
                             "Cluster\")") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise RedisUnavailable(f"lost a connection to the target cluster: {exc}") from None
    except redis.exceptions.ResponseError as exc:
        raise RestoreError(f"the target cluster answered with an error: {exc}") from None


def _restore_into(config: Config, opts: Options, ui: Ui, selected: Selected,
                  identities: Sequence[Any], target: _Target, difference: str,
                  env: Mapping[str, str] | None) -> int:
    m, topology = selected.manifest, target.topology
    target.open()
    _check_servers(config, m, target)
    present = sum(int(c.dbsize()) for _, c in target.primaries())
    ui.echo(plan_text(selected, topology, difference, present, opts.dry_run))
    if opts.dry_run:
        return 0
    if not opts.yes and not ui.confirm(
            f"Replace all {present} keys of the cluster with the {m.keys} keys of backup "
            f"{m.id}?"):
        raise RestoreError("restore cancelled; nothing was changed")
    _probe_restore(target)
    with backup_lock(Path(config.backup.dir)):
        safety = _safety_backup(config, m, present, env)
        try:
            for _, client in target.primaries():
                client.flushall()
            written = _write_all(config, selected, identities, target, ui)
            _wait_replicas(config, target)
        except (BackupdError, redis.exceptions.RedisError) as exc:
            if not safety:
                raise
            raise RestoreError(f"{exc}; the cluster's data from before this restore is backup "
                               f"{safety} (backupd restore {safety})") from None
    total = sum(int(c.dbsize()) for _, c in target.primaries())
    if total != written.keys:
        raise RestoreError(f"the cluster holds {total} keys after the restore, {written.keys} "
                           "were written (clients wrote meanwhile?)")
    ui.echo(f"restored {written.keys} keys of backup {m.id} into {len(topology.shards)} "
            f"shards ({written.expired} expired, skipped); replicas in sync"
            + (f"; the data before: backup {safety}" if safety else ""))
    return 0


def shape_difference(backup: Sequence[tuple[sl.Range, ...]],
                     target: Sequence[tuple[sl.Range, ...]]) -> str:
    """"" when the target's shards hold exactly the backup's slot ranges, else what differs."""
    if sorted(backup) == sorted(target):
        return ""
    missing = [sl.show(s) for s in backup if s not in target]
    extra = [sl.show(s) for s in target if s not in backup]
    return (f"the backup has {len(backup)} shards, the target {len(target)}; the backup's "
            f"shards {missing} have no shard with the same slots in the target (it has "
            f"{extra})")


def _check_servers(config: Config, m: Manifest, target: _Target) -> None:
    """The throwaway's DUMP payloads must load on every target primary."""
    throwaway = throwaway_identity(config, m.rdb_version)
    for shard, client in target.primaries():
        try:
            info = client.info("server")
        except redis.exceptions.RedisError as exc:
            raise RedisUnavailable(f"{shard.name}: {exc}") from None
        check_payload_fits(throwaway, config.verify.redis_server,
                           servers.from_info({str(k): v for k, v in info.items()}))


def _probe_restore(target: _Target) -> None:
    """RESTORE of a key of each primary's slots with a payload no server accepts: refused
    for its checksum when the ACL allows it, with NOPERM when not; nothing is written."""
    for shard, client in target.primaries():
        tag = next(f"{{p{n}}}" for n in range(1 << 20)
                   if sl.contains(shard.slots, sl.keyslot(f"p{n}".encode())))
        try:
            client.execute_command("RESTORE", f"backupd:probe:{tag}", 0,  # type: ignore[no-untyped-call]
                                   PROBE_PAYLOAD)
        except redis.exceptions.NoPermissionError:
            raise
        except redis.exceptions.ResponseError:
            continue  # the bogus payload refused: RESTORE of that key is allowed
        client.delete(f"backupd:probe:{tag}")  # not expected: the payload cannot load


def _safety_backup(config: Config, m: Manifest, present: int,
                   env: Mapping[str, str] | None) -> str:
    """A cluster backup of the target before it is flushed (none when it is empty)."""
    if not present:
        return ""
    from backupd.actions.cluster_backup import run_cluster_backup

    safety = run_cluster_backup(config, trigger="restore", tag=f"before-restore {m.id}", env=env)
    log.info("cluster_restore_safety_backup", id=safety.id, keys=safety.keys)
    return safety.id


def _write_all(config: Config, selected: Selected, identities: Sequence[Any], target: _Target,
               ui: Ui) -> _Written:
    assert selected.manifest.cluster is not None
    written = _Written()
    for shard, part in zip(selected.manifest.cluster.shards, selected.manifest.parts(),
                           strict=True):
        with open_backup(config, Selected(selected.storage, part, selected.locations),
                         identities, ui.progress) as loaded:
            tw = keyspace.bytes_client(loaded.client, 0)
            try:
                _write_shard(shard, tw, target, written)
            finally:
                tw.close()
        log.info("cluster_restore_shard_done", shard=shard.index, keys=written.keys)
    return written


def _write_shard(shard: ShardFacts, tw: redis.Redis, target: _Target, written: _Written) -> None:
    seen: set[bytes] = set()
    for page in keyspace.scan(tw):
        fresh = [k for k in dict.fromkeys(page) if k not in seen]
        seen.update(fresh)
        by_node: dict[str, list[keyspace.KeyFacts]] = {}
        for item in keyspace.facts(tw, fresh, memory=False):
            by_node.setdefault(target.owner[sl.keyslot(item.key)], []).append(item)
        for node_id, items in by_node.items():
            now_ms = _now_ms(target.clients[node_id])
            live = [i for i in items if not (i.expire_at == -2 or 0 < i.expire_at <= now_ms)]
            written.expired += len(items) - len(live)
            _restore_batch(tw, target.clients[node_id], live, shard)
            written.keys += len(live)
            written.per_node[node_id] = written.per_node.get(node_id, 0) + len(live)


def _restore_batch(tw: redis.Redis, node: redis.Redis, items: list[keyspace.KeyFacts],
                   shard: ShardFacts) -> None:
    payloads = keyspace.dump(tw, [i.key for i in items])
    pipe = node.pipeline(transaction=False)
    for item, payload in zip(items, payloads, strict=True):
        if payload is None:
            raise RestoreError(f"key {keyspace.display(item.key)} vanished from the throwaway "
                               "server (it expired while the restore ran)")
        args = ("RESTORE", item.key, item.expire_at, payload, "ABSTTL", "REPLACE")
        pipe.execute_command(*args)  # type: ignore[no-untyped-call]
    for item, reply in zip(items, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(reply, redis.exceptions.ResponseError):
            text = str(reply)
            if isinstance(reply, redis.exceptions.AskError):  # MovedError is one too
                raise ClusterError(f"the target's slot map changed during the restore (key "
                                   f"{keyspace.display(item.key)}: {text}); the cluster holds "
                                   "part of the backup: run the restore again")
            raise RestoreError(f"the target refused key {keyspace.display(item.key)} of "
                               f"backup shard {shard.index}: {text}")


def _now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _wait_replicas(config: Config, target: _Target) -> None:
    """Each primary's replicas have received everything the restore wrote."""
    deadline = time.monotonic() + config.restore.start_timeout
    for shard, client in target.primaries():
        info = client.info("replication")
        offset = int(info.get("master_repl_offset", 0))
        replicas = [v for k, v in info.items() if str(k).startswith("slave") and
                    isinstance(v, dict)]

        def synced(primary: redis.Redis = client, count: int = len(replicas),
                   wanted: int = offset) -> bool:
            now = primary.info("replication")
            got = [v for k, v in now.items() if str(k).startswith("slave") and
                   isinstance(v, dict)]
            return len(got) >= count and all(int(r.get("offset", 0)) >= wanted for r in got)

        late = RestoreError(f"{shard.name}: its replicas did not catch up within "
                            f"restore.start_timeout {config.restore.start_timeout:g}s; the "
                            "primary holds the restored data")
        polling.poll_until(synced, deadline, _raiser(late), first=SYNC_POLL, longest=0.5)


def _raiser(error: Exception) -> Callable[[], Exception]:
    return lambda: error


def plan_text(selected: Selected, topology: tp.Topology, difference: str, present: int,
              dry_run: bool) -> str:
    m = selected.manifest
    assert m.cluster is not None
    head = "Cluster restore plan (dry run: nothing was changed)" if dry_run \
        else "Cluster restore plan"
    lines = [head,
             f"  backup   {m.id} [{selected.storage.name}] created {m.created_at}, {m.keys} "
             f"keys in {len(m.cluster.shards)} shards (snapshots {m.cluster.spread_s:g}s "
             "apart)",
             f"  target   {len(topology.shards)} shards, {present} keys now (replaced; backed "
             "up first)" if present else f"  target   {len(topology.shards)} shards, empty",
             "  method   " + ("--reshard: every key to the primary of its slot" if difference
                              else "same shape: each shard's keys to the primary of the same "
                                   "slots") + ", RESTORE ... ABSTTL, replicas follow"]
    for shard in m.cluster.shards:
        owners = sorted({s.primary.address for s in topology.shards
                         if _overlaps(s.slots, shard.ranges)})
        lines.append(f"  shard {shard.index} slots {sl.show(shard.ranges)}: {shard.keys} keys "
                     f"-> {', '.join(owners)}")
    return "\n".join(lines)


def _overlaps(a: list[sl.Range], b: list[sl.Range]) -> bool:
    return any(x0 <= y1 and y0 <= x1 for x0, x1 in a for y0, y1 in b)
