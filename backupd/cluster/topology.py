"""The cluster's slot map, read from the seeds: `CLUSTER SHARDS` (7.0+), `CLUSTER SLOTS` on
older servers. Per shard its primary, replicas, health and slot ranges; the cluster's epoch;
and the slots a primary is migrating or importing right now (only the node itself shows these,
in its own `CLUSTER NODES` line).

A node is reached at the address the cluster announces for it (`endpoint`, else `ip`), with
the seeds' credentials, TLS and timeouts (endpoint.at): the announced addresses must be
reachable from backupd (cluster-announce-ip / cluster-announce-hostname in containers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

from backupd import endpoint as ep
from backupd.cluster import slots as sl
from backupd.config import RedisConfig, parse_host_port
from backupd.endpoint import Endpoint
from backupd.errors import ClusterError, RedisUnavailable

log = structlog.get_logger("backupd.cluster")


@dataclass(frozen=True)
class Node:
    node_id: str
    host: str
    port: int
    role: str  # "master" or "replica"
    health: str = "online"  # CLUSTER SHARDS: online, failed, loading ("online" from SLOTS)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Shard:
    slots: list[sl.Range]
    primary: Node
    replicas: list[Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        """How messages name a shard: its slots and its primary."""
        return f"shard {sl.show(self.slots)} (primary {self.primary.address} " \
               f"{self.primary.node_id[:8]})"


@dataclass(frozen=True)
class Topology:
    shards: list[Shard]  # in slot order
    epoch: int  # cluster_current_epoch
    migrating: list[str] = field(default_factory=list)  # "slot 5 migrating to <id>"

    @property
    def covered(self) -> int:
        return sl.count(r for s in self.shards for r in s.slots)

    def slot_map(self) -> dict[tuple[sl.Range, ...], str]:
        """slot ranges -> primary node id: what must not change during a backup."""
        return {tuple(s.slots): s.primary.node_id for s in self.shards}

    def shape(self) -> list[tuple[sl.Range, ...]]:
        return [tuple(s.slots) for s in self.shards]

    def check_complete(self) -> None:
        missing = sl.gaps(r for s in self.shards for r in s.slots)
        if missing:
            raise ClusterError(f"the cluster does not cover every slot: slots "
                               f"{sl.show(missing)} have no primary ({self.covered} of "
                               f"{sl.SLOTS}); nothing is backed up until it does")
        if self.migrating:
            raise ClusterError("slots are being migrated: " + "; ".join(self.migrating[:5]))


def cluster_command(client: redis.Redis, *args: str) -> Any:
    """A CLUSTER subcommand's raw reply (redis-py's parsers reshape some of them)."""
    return client.execute_command("CLUSTER", *args)  # type: ignore[no-untyped-call]


def seed_endpoints(cfg: RedisConfig, env: Mapping[str, str] | None = None) -> list[Endpoint]:
    base = ep.direct(cfg, env)
    out = []
    for seed in cfg.cluster.seeds:
        host, port = parse_host_port(seed, "redis.cluster.seeds")
        out.append(ep.at(base, host, port, via=f"cluster seed {host}:{port}"))
    return out


def node_endpoint(base: Endpoint, node: Node, shard: Shard) -> Endpoint:
    role = "primary" if node.role == "master" else "replica"
    return ep.at(base, node.host, node.port, role="master" if node.role == "master" else "slave",
                 via=f"{role} {node.address} of shard {sl.show(shard.slots)}")


def read(seeds: Sequence[Endpoint]) -> Topology:
    """The slot map from the first seed that answers; RedisUnavailable naming every seed's
    error when none does."""
    errors = []
    for seed in seeds:
        client = seed.client()
        try:
            topology = _read_from(client, seed.tls is not None)
        except (redis.exceptions.RedisError, OSError) as exc:
            errors.append(f"{seed.where}: {exc}")
            continue
        finally:
            client.close()
        topology = _with_migrations(seeds[0], topology)
        log.debug("cluster_topology", shards=len(topology.shards), epoch=topology.epoch,
                  covered=topology.covered)
        return topology
    raise RedisUnavailable("no cluster seed answered: " + "; ".join(errors))


def _read_from(client: redis.Redis, tls: bool) -> Topology:
    info = cluster_command(client, "INFO")
    text = info if isinstance(info, str) else str(info)
    if "cluster_enabled:0" in text or "cluster_state" not in text:
        raise ClusterError("the seed is not a cluster node (cluster-enabled no)")
    epoch = 0
    for line in text.splitlines():
        if line.startswith("cluster_current_epoch:"):
            epoch = int(line.split(":", 1)[1])
    try:
        shards = _parse_shards(cluster_command(client, "SHARDS"), tls)
    except redis.exceptions.ResponseError as exc:
        if "unknown" not in str(exc).lower():
            raise
        shards = _parse_slots(cluster_command(client, "SLOTS"))
    return Topology(sorted(shards, key=lambda s: s.slots[0]), epoch)


def _pairs(flat: Any) -> dict[str, Any]:
    if isinstance(flat, dict):
        return {str(k): v for k, v in flat.items()}
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _node(raw: Any, tls: bool) -> Node:
    """A node of CLUSTER SHARDS, at its TLS port when backupd speaks TLS."""
    fields = _pairs(raw)
    host = str(fields.get("endpoint") or "")
    if host in ("", "?"):
        host = str(fields.get("ip", ""))
    ports = ("tls-port", "port") if tls else ("port", "tls-port")
    port = int(fields.get(ports[0]) or fields.get(ports[1]) or 0)
    return Node(str(fields["id"]), host, port, str(fields.get("role", "")),
                str(fields.get("health", "online")))


def _parse_shards(reply: Any, tls: bool) -> list[Shard]:
    shards = []
    for raw in reply:
        fields = _pairs(raw)
        flat = [int(v) for v in fields.get("slots", [])]
        ranges = sl.normalize((flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2))
        nodes = [_node(n, tls) for n in fields.get("nodes", [])]
        primaries = [n for n in nodes if n.role == "master"]
        if not ranges:
            continue  # a primary without slots (a new node, or one emptied by a reshard)
        if not primaries:
            raise ClusterError(f"slots {sl.show(ranges)} have no primary (failover running?)")
        shards.append(Shard(ranges, primaries[0], [n for n in nodes if n.role != "master"]))
    return shards


def _parse_slots(reply: Any) -> list[Shard]:
    """CLUSTER SLOTS: one entry per range, [start, end, primary, replica...]."""
    by_primary: dict[str, tuple[list[sl.Range], Node, list[Node]]] = {}
    for entry in reply:
        start, end, primary, *replicas = entry
        node = Node(str(primary[2]), str(primary[0]), int(primary[1]), "master")
        ranges, _, _ = by_primary.setdefault(node.node_id, ([], node, [
            Node(str(r[2]), str(r[0]), int(r[1]), "replica") for r in replicas]))
        ranges.append((int(start), int(end)))
    return [Shard(sl.normalize(r), node, reps) for r, node, reps in by_primary.values()]


def _with_migrations(base: Endpoint, topology: Topology) -> Topology:
    """Ask every primary for its own migrating/importing slots (`[slot->-id]`, `[slot-<-id]`
    in its `myself` line of CLUSTER NODES)."""
    found = []
    for shard in topology.shards:
        client = node_endpoint(base, shard.primary, shard).client()
        try:
            nodes = str(cluster_command(client, "NODES"))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise RedisUnavailable(f"{shard.name}: cannot read CLUSTER NODES: {exc}") from None
        finally:
            client.close()
        for line in nodes.splitlines():
            parts = line.split()
            if len(parts) > 2 and "myself" in parts[2].split(","):
                for slot in (p for p in parts[8:] if p.startswith("[")):
                    number, arrow, other = slot.strip("[]").partition("->-")
                    if not arrow:
                        number, _, other = slot.strip("[]").partition("-<-")
                        found.append(f"slot {number} is being imported by {shard.name} "
                                     f"from {other[:8]}")
                    else:
                        found.append(f"slot {number} is migrating from {shard.name} to "
                                     f"{other[:8]}")
    return Topology(topology.shards, topology.epoch, found)
