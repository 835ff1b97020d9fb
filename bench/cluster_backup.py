"""`python -m bench.cluster_backup`: `backupd backup` of a 3-primary Redis Cluster against
`backupd backup` of its biggest shard alone (both redis.source = "replication"), alternately
(the row "cluster backup vs the slowest shard" of docs/benchmarks.md; target <= 1.2x), and
the same cluster one shard at a time (`redis.cluster.parallel = 1`).

`--key-save-delay US` sets each primary's `rdb-key-save-delay` (microseconds of sleep per key
its save child writes): every shard's snapshot then takes wall time without taking this
machine's CPU, as a shard on its own host does, so the ratio shows what the cluster backup's
orchestration costs, not the three primaries competing for two cores.

Each primary is filled with DEBUG POPULATE under a hash tag of its own slots (so every key
is where the cluster would put it); shard 0 gets the most data, so its single backup is the
slowest shard's."""

from __future__ import annotations

import argparse
import subprocess
from functools import partial
from pathlib import Path

from backupd.cluster.slots import keyslot
from bench.measure import Contender, Series, alternate, clear_dir
from bench.redisproc import REDIS_CLI, RedisServer, client, free_port, wait_until
from bench.scenarios import BACKUPD, Lab

VALUE_BYTES = 512
SMALLER = 0.8  # the other shards' size relative to shard 0's


def start_cluster(lab: Lab, primaries: int) -> list[RedisServer]:
    nodes = []
    for i in range(primaries):
        directory = lab.path(f"cluster-node{i}")
        clear_dir(directory)
        node = RedisServer(directory, extra=(
            "--cluster-enabled", "yes", "--cluster-config-file", str(directory / "nodes.conf"),
            "--cluster-port", str(free_port()), "--enable-debug-command", "yes"))
        node.start()
        nodes.append(node)
    subprocess.run([REDIS_CLI, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
                    "--cluster-replicas", "0", "--cluster-yes"], check=True,
                   capture_output=True, timeout=120)
    wait_until(lambda: all("cluster_state:ok" in str(client(n.port).execute_command(
        "CLUSTER", "INFO")) for n in nodes), 60, "cluster_state:ok")
    return nodes


def fill(nodes: list[RedisServer], mib: int) -> None:
    """Shard 0 gets `mib` MiB of values, the others SMALLER of it, each under a hash tag
    whose slot it owns."""
    for index, node in enumerate(nodes):
        conn = client(node.port)
        ranges = [(r[0], r[1]) for r in conn.execute_command("CLUSTER", "SLOTS")
                  if r[2][1] == node.port]
        tag = next(f"{{s{t}}}" for t in range(100000)
                   if any(a <= keyslot(f"s{t}".encode()) <= b for a, b in ranges))
        count = int(mib * (1 if index == 0 else SMALLER) * (1 << 20) / VALUE_BYTES)
        conn.execute_command("DEBUG", "POPULATE", count, tag, VALUE_BYTES)
        conn.close()


def config(path: Path, backups: Path, body: str, compression: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[redis]\nsource = "replication"\nsave_timeout = "10m"\n{body}\n'
                    f'[backup]\ndir = "{backups}"\ncompression = "{compression}"\n'
                    f'compression_level = {3 if compression == "zstd" else 0}\n')
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_backup", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=100, help="MiB of values in shard 0")
    parser.add_argument("--primaries", type=int, default=3)
    parser.add_argument("--compression", default="zstd", choices=("zstd", "none"))
    parser.add_argument("--key-save-delay", type=int, default=0, metavar="US",
                        help="rdb-key-save-delay of every primary (see the module)")
    args = parser.parse_args(argv)
    lab = Lab(args.runs)
    nodes = start_cluster(lab, args.primaries)
    try:
        fill(nodes, args.mib)
        for node in nodes:
            conn = client(node.port)
            conn.config_set("rdb-key-save-delay", args.key_save_delay)
            conn.close()
        seeds = ", ".join(f'"127.0.0.1:{n.port}"' for n in nodes[:2])
        whole_dir, one_dir = lab.path("backups-cluster"), lab.path("backups-shard0")
        whole = config(lab.path("config", "cluster.toml"), whole_dir,
                       f"\n[redis.cluster]\nseeds = [{seeds}]\n", args.compression)
        serial_dir = lab.path("backups-serial")
        serial = config(lab.path("config", "serial.toml"), serial_dir,
                        f"\n[redis.cluster]\nseeds = [{seeds}]\nparallel = 1\n",
                        args.compression)
        one = config(lab.path("config", "shard0.toml"), one_dir,
                     f'host = "127.0.0.1"\nport = {nodes[0].port}\ndata_dir = "/nonexistent"\n',
                     args.compression)
        contenders = [
            Contender(Series("backupd backup (cluster)", f"{args.primaries} shards"),
                      partial(lab.measure, [*BACKUPD, "-c", str(whole), "backup"]),
                      partial(clear_dir, whole_dir)),
            Contender(Series("backupd backup (shard 0 alone)", "the slowest shard"),
                      partial(lab.measure, [*BACKUPD, "-c", str(one), "backup"]),
                      partial(clear_dir, one_dir)),
            Contender(Series("backupd backup (cluster, parallel = 1)", "one shard at a time"),
                      partial(lab.measure, [*BACKUPD, "-c", str(serial), "backup"]),
                      partial(clear_dir, serial_dir))]
        alternate(args.runs, contenders)
        cluster, shard, one_by_one = (c.series for c in contenders)
        print(f"[bench] cluster of {args.primaries} ({args.mib} MiB in shard 0, "
              f"{args.compression}, rdb-key-save-delay {args.key_save_delay}): cluster "
              f"{cluster.median():.2f}s (rss {cluster.median('rss_mib'):.0f} MiB) vs shard 0 "
              f"{shard.median():.2f}s (rss {shard.median('rss_mib'):.0f} MiB): ratio "
              f"{cluster.median() / shard.median():.2f}; runs "
              f"{[round(v, 2) for v in cluster.values()]} vs "
              f"{[round(v, 2) for v in shard.values()]}; parallel = 1 "
              f"{one_by_one.median():.2f}s {[round(v, 2) for v in one_by_one.values()]}")
    finally:
        for node in nodes:
            node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
