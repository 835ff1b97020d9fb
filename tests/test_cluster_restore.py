"""Cluster restores on local clusters: the same shape (3 primaries + 3 replicas) and, with
--reshard, a 4-primary cluster; every key back on the shard that owns its slot, with its
TTL (absolute expiry) and value."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from backupd.actions.restore.cluster import _restore_batch, shape_difference
from backupd.cluster import slots as sl
from backupd.cluster.facts import ShardFacts
from backupd.errors import ClusterError
from backupd.keyspace import KeyFacts, bytes_client
from tests.cluster_topology import LocalCluster, cluster_config, fill_cluster, start_cluster
from tests.conftest import PASSWORD, RedisServer, last_line, run_cli, write_config
from tests.seed import snapshot


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster,
                                                                           LocalCluster]]:
    root = tmp_path_factory.mktemp("clusters")
    three = start_cluster(root / "three")
    try:
        four = start_cluster(root / "four", primaries=4, replicas=0)
        try:
            fill_cluster(three)
            yield three, four
        finally:
            four.stop()
    finally:
        three.stop()


def cli(config: Path, *args: str) -> tuple[int, str, str]:
    proc = run_cli("-c", str(config), *args)
    assert PASSWORD not in proc.stdout + proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def contents(cluster: LocalCluster) -> dict[bytes, tuple[str, object, int]]:
    """Every key of every primary: type, value, absolute expiry in ms."""
    out: dict[bytes, tuple[str, object, int]] = {}
    for primary in cluster.primaries():
        out.update(snapshot(primary.client()))
    return out


def misplaced(cluster: LocalCluster) -> list[tuple[int, bytes]]:
    """(port, key) of every key held by a primary that does not own its slot."""
    wrong = []
    with cluster.any_client() as client:
        slot_map = client.execute_command("CLUSTER", "SLOTS")
    for primary in cluster.primaries():
        ranges = [(r[0], r[1]) for r in slot_map if r[2][1] == primary.port]
        raw = bytes_client(primary.client(), 0)
        wrong += [(primary.port, k) for k in raw.scan_iter(count=1000)
                  if not sl.contains(ranges, sl.keyslot(k))]
        raw.close()
    return wrong


def test_restore_same_shape_puts_every_key_back_and_resyncs_replicas(
        clusters: tuple[LocalCluster, LocalCluster], tmp_path: Path) -> None:
    three, _ = clusters
    backups = tmp_path / "backups"
    config = cluster_config(tmp_path / "c.toml", three, backups)
    before = contents(three)
    code, out, err = cli(config, "backup")
    assert code == 0, err
    backup_id = last_line(out)
    client = three.cluster_client()
    client.delete("key:1", "key:2")
    client.set("key:3", "changed")
    client.expire("key:4", 5)
    client.set("written-after", "x")
    client.close()
    code, out, err = cli(config, "restore", backup_id, "--dry-run")
    assert code == 0 and "same shape" in out and "nothing was changed" in out, err
    assert contents(three) != before
    code, out, err = cli(config, "restore", backup_id, "--yes")
    assert code == 0, err
    assert f"restored {len(before)} keys of backup {backup_id} into 3 shards" in out
    assert contents(three) == before
    assert misplaced(three) == []
    for primary in three.primaries():
        replica = three.replica_of(primary)
        assert replica.client().dbsize() == primary.client().dbsize()
    safety = out.split("the data before: backup ")[1].split()[0]
    manifest = json.loads((backups / f"{safety}.json").read_text())
    assert manifest["tag"] == f"before-restore {backup_id}"
    assert manifest["keys"] == len(before) - 2 + 1  # as it was: two deleted, one written


def test_reshard_into_four_primaries_puts_each_key_on_its_slots_shard(
        clusters: tuple[LocalCluster, LocalCluster], tmp_path: Path) -> None:
    three, four = clusters
    backups = tmp_path / "backups"
    source = cluster_config(tmp_path / "three.toml", three, backups)
    code, out, err = cli(source, "backup")
    assert code == 0, err
    backup_id = last_line(out)
    expected = contents(three)
    target = cluster_config(tmp_path / "four.toml", four, backups)
    code, out, err = cli(target, "restore", backup_id, "--yes")
    assert code == 1 and "different shape" in err and "0-5460" in err and "0-4095" in err, err
    assert "--reshard" in err
    code, out, err = cli(target, "restore", backup_id, "--reshard", "--dry-run")
    assert code == 0 and "--reshard: every key to the primary of its slot" in out, err
    assert contents(four) == {}
    code, out, err = cli(target, "restore", backup_id, "--reshard", "--yes")
    assert code == 0, err
    assert f"restored {len(expected)} keys of backup {backup_id} into 4 shards" in out
    assert contents(four) == expected
    assert misplaced(four) == []
    assert all(p.client().dbsize() for p in four.primaries())  # every shard got its part


def test_a_cluster_backup_is_refused_by_a_single_server_restore(
        clusters: tuple[LocalCluster, LocalCluster], tmp_path: Path,
        redis_server: RedisServer) -> None:
    three, _ = clusters
    backups = tmp_path / "backups"
    code, out, err = cli(cluster_config(tmp_path / "c.toml", three, backups), "backup")
    assert code == 0, err
    single = write_config(tmp_path / "single.toml", redis_server, backups,
                          '[restore]\nmethod = "shutdown"\n')
    redis_server.client().set("untouched", "1")
    code, _, err = cli(single, "restore", last_line(out), "--yes")
    assert code == 2 and "is a cluster backup (3 shards)" in err, err
    assert redis_server.client().get("untouched") == "1"


def test_a_key_sent_to_a_node_without_its_slot_stops_the_restore(
        clusters: tuple[LocalCluster, LocalCluster], redis_server: RedisServer) -> None:
    _, four = clusters
    holder = bytes_client(redis_server.client(), 0)
    holder.set(b"foo", b"1")  # slot 12182: the fourth primary's
    node = bytes_client(four.primaries()[0].client(), 0)
    shard = ShardFacts(0, "x", "0" * 40, "0" * 40, "", 0, "master", [[0, 5460]], 1, 0, "", 0,
                       "", 10, "ok")
    with pytest.raises(ClusterError, match="slot map changed during the restore"):
        _restore_batch(holder, node, [KeyFacts(b"foo", "string", 0, 0)], shard)
    assert shape_difference([((0, 9),)], [((0, 9),)]) == ""
