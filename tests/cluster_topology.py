"""A local Redis Cluster for tests: N primaries with one replica each, redis-server processes on
free loopback ports, each in its own directory, made with `redis-cli --cluster create`, with a
password (requirepass + masterauth). Torn down by `LocalCluster.stop`."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.conftest import PASSWORD, REDIS_SERVER, RedisServer, free_port, wait_until
from tests.topology import CA, TLSServer, tls_options

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
NODE_TIMEOUT_MS = 2000  # a failover takes a few seconds, not the default 15


class ClusterNode(RedisServer):
    """A RedisServer in cluster mode (its nodes.conf in its own directory; its bus on a free
    port of its own: the default, port + 10000, may be taken or above 65535)."""

    bus_port: int = 0

    def argv(self) -> list[str]:
        if not self.bus_port:
            self.bus_port = free_port()
        return [*super().argv(), "--cluster-enabled", "yes", "--cluster-port", str(self.bus_port),
                "--cluster-config-file", str(self.dir / "nodes.conf"),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--masterauth", PASSWORD,
                "--repl-diskless-sync-delay", "0", "--cluster-require-full-coverage", "yes"]


class TLSClusterNode(ClusterNode, TLSServer):
    """A cluster node on TLS only: clients, replication and the cluster bus."""


@dataclass
class LocalCluster:
    nodes: list[ClusterNode]

    @property
    def seeds(self) -> list[str]:
        return [f"127.0.0.1:{self.nodes[0].port}", f"127.0.0.1:{self.nodes[1].port}"]

    def node(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def primaries(self) -> list[ClusterNode]:
        """The running primaries, in slot order."""
        with self.any_client() as client:
            slots = client.execute_command("CLUSTER", "SLOTS")
        ports = [int(r[2][1]) for r in sorted(slots, key=lambda r: r[0])]
        return [self.node(p) for p in dict.fromkeys(ports)]

    def replica_of(self, primary: ClusterNode) -> ClusterNode:
        node_id = primary.client().execute_command("CLUSTER", "MYID")
        for node in self.running():
            info = node.client().info("replication")
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == primary.port:
                return node
        raise AssertionError(f"no replica of {primary.port} ({node_id})")

    def running(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def any_client(self) -> redis.Redis:
        return self.running()[0].client()

    def cluster_client(self) -> redis.RedisCluster:
        node = self.running()[0]
        return redis.RedisCluster(host="127.0.0.1", port=node.port, password=PASSWORD,
                                  decode_responses=True, socket_timeout=10, protocol=2,
                                  ssl=isinstance(node, TLSClusterNode), ssl_cert_reqs="none")

    def wait_ok(self, timeout: float = 60, replicas: int = 1) -> None:
        """Every running node says cluster_state:ok, sees the same slot owners and `replicas`
        replicas per shard, and every replica's link to its primary is up."""
        def ok() -> bool:
            views = set()
            for node in self.running():
                client = node.client()
                try:
                    if "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                        return False
                    views.add(tuple(sorted((r[0], r[1], r[2][1]) for r in
                                           client.execute_command("CLUSTER", "SLOTS"))))
                    shards = client.execute_command("CLUSTER", "SHARDS")
                    if any(len(shard[3]) < 1 + replicas for shard in shards if shard[1]):
                        return False  # a replica not known to this node yet
                    info = client.info("replication")
                    if info["role"] == "slave" and info.get("master_link_status") != "up":
                        return False
                finally:
                    client.close()
            return len(views) == 1
        wait_until(ok, timeout, "the cluster to agree and report cluster_state:ok")

    def flush(self) -> None:
        for primary in self.primaries():
            primary.client().flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster(root: Path, primaries: int = 3, replicas: int = 1,
                  binary: str = REDIS_SERVER, ca: CA | None = None) -> LocalCluster:
    """Start the nodes and join them into a cluster; the caller stops it (LocalCluster.stop).
    With `ca`: TLS only (tls-cluster, tls-replication), certificates from that CA."""
    nodes: list[ClusterNode] = []
    tls: list[str] = []
    try:
        pem = ca.issue("localhost") if ca is not None else None
        for i in range(primaries * (1 + replicas)):
            data = root / f"node{i}"
            data.mkdir(parents=True)
            port = free_port()
            if ca is not None and pem is not None:
                node: ClusterNode = TLSClusterNode(data, port, PASSWORD, [
                    *tls_options(ca, pem, port, auth_clients=False), "--tls-cluster", "yes",
                    "--tls-replication", "yes"], binary=binary)
                node.ca = ca
                tls = ["--tls", "--cacert", str(ca.pem.cert)]
            else:
                node = ClusterNode(data, port, PASSWORD, binary=binary)
            node.start()
            nodes.append(node)
        cluster = LocalCluster(nodes)
        created = subprocess.run(
            [REDIS_CLI, *tls, "--no-auth-warning", "-a", PASSWORD, "--cluster", "create",
             *[f"127.0.0.1:{n.port}" for n in nodes], "--cluster-replicas", str(replicas),
             "--cluster-yes"], capture_output=True, text=True, timeout=120, check=False)
        if created.returncode != 0:
            raise AssertionError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}"
                                 f"{created.stderr[-2000:]}")
        cluster.wait_ok(replicas=replicas)
        return cluster
    except BaseException:
        for node in nodes:
            node.stop()
        raise


@contextlib.contextmanager
def local_cluster(root: Path, primaries: int = 3,
                  binary: str = REDIS_SERVER) -> Iterator[LocalCluster]:
    cluster = start_cluster(root, primaries, binary=binary)
    try:
        yield cluster
    finally:
        cluster.stop()


def fill_cluster(cluster: LocalCluster, keys: int = 600, ttl_every: int = 3) -> None:
    """`keys` strings spread over every slot range, every `ttl_every`-th with a TTL, plus a
    hash-tagged group that must stay on one shard."""
    client = cluster.cluster_client()
    try:
        pipe = client.pipeline()
        for i in range(keys):
            if i % ttl_every == 0:
                pipe.set(f"key:{i}", f"value-{i}", ex=3600 + i)
            else:
                pipe.set(f"key:{i}", f"value-{i}")
        for i in range(10):
            pipe.set(f"{{user:7}}:field{i}", str(i))
        pipe.execute()
    finally:
        client.close()


def cluster_config(path: Path, cluster: LocalCluster, backup_dir: Path,
                   extra: str = "", redis_extra: str = "") -> Path:
    path.write_text(f"""
[redis]
source = "replication"
save_timeout = "60s"
connect_timeout = "3s"
read_timeout = "10s"
{redis_extra}

[redis.cluster]
seeds = {cluster.seeds!r}

[backup]
dir = "{backup_dir}"
{extra}
""".replace("'", '"'))
    return path
