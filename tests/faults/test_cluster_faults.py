"""Cluster backups under faults: a primary killed while its snapshot is due, a failover during
the backup, slots migrating during the backup. Each shard's snapshot is held open by the
primary's repl-diskless-sync-delay, so that the fault lands while the backup runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster_topology import (
    ClusterNode,
    LocalCluster,
    cluster_config,
    fill_cluster,
    local_cluster,
)
from tests.conftest import PASSWORD, REPO, last_line, run_cli, wait_until

HOLD_S = 4  # the held primary's diskless delay: the window in which the fault lands


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster of its own: these tests kill nodes and fail them over."""
    with local_cluster(tmp_path / "cluster") as made:
        fill_cluster(made)
        yield made


def start_backup(config: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")}
    env["REDIS_PASSWORD"] = PASSWORD
    return subprocess.Popen([sys.executable, "-m", "backupd", "--log-format", "json", "-c",
                             str(config), "backup"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def hold_and_start(cluster: LocalCluster, held: ClusterNode,
                   config: Path) -> subprocess.Popen[str]:
    """Start a backup and return once `held` has the backup's sync waiting on its delay."""
    client = held.client()
    client.config_set("repl-diskless-sync-delay", str(HOLD_S))
    before = int(client.info("replication")["connected_slaves"])
    proc = start_backup(config)
    wait_until(lambda: int(client.info("replication")["connected_slaves"]) > before, 30,
               "the backup's sync to wait on the held primary")
    return proc


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    assert PASSWORD not in out + err
    return proc.returncode, out, err


def cli(config: Path, *args: str) -> tuple[int, str, str]:
    proc = run_cli("-c", str(config), *args)
    return proc.returncode, proc.stdout, proc.stderr


def manifests(backups: Path) -> list[str]:
    return sorted(p.name for p in backups.glob("*.json"))


def test_a_primary_killed_during_the_backup_commits_nothing(cluster: LocalCluster,
                                                            tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    config = cluster_config(tmp_path / "c.toml", cluster, backups)
    victim = cluster.primaries()[1]
    proc = hold_and_start(cluster, victim, config)
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    victim.proc = None
    code, _, err = finish(proc)
    assert code == 1
    assert f"primary 127.0.0.1:{victim.port}" in err and "nothing was committed" in err, err
    assert manifests(backups) == []
    assert any(".shard-" in name for name in os.listdir(backups))  # the others' leftovers
    cluster.wait_ok(replicas=0)  # its replica took over
    code, out, err = cli(config, "backup")
    assert code == 0, err
    manifest = json.loads((backups / f"{last_line(out)}.json").read_text())
    assert manifest["cluster"]["slots_covered"] == 16384
    assert sorted(n for n in os.listdir(backups) if ".shard-" in n) == sorted(
        s["artifact"] for s in manifest["cluster"]["shards"])  # leftovers removed


def test_a_failover_during_the_backup_never_leaves_a_gap(cluster: LocalCluster,
                                                         tmp_path: Path) -> None:
    """A primary that becomes a replica closes its replicas' links, the backup's sync among
    them: the backup fails naming the shard (a snapshot from a node that held the slots at
    its start would be kept, with a warning; see cluster_backup._compare)."""
    backups = tmp_path / "backups"
    config = cluster_config(tmp_path / "c.toml", cluster, backups)
    old = cluster.primaries()[0]
    replica = cluster.replica_of(old)
    proc = hold_and_start(cluster, old, config)
    replica.client().execute_command("CLUSTER", "FAILOVER")
    wait_until(lambda: replica.client().info("replication")["role"] == "master", 30,
               "the replica to take over")
    code, _, err = finish(proc)
    assert code == 1, err
    assert f"primary 127.0.0.1:{old.port}" in err and "nothing was committed" in err, err
    assert manifests(backups) == []
    cluster.wait_ok()
    code, out, err = cli(config, "backup")
    assert code == 0, err
    manifest = json.loads((backups / f"{last_line(out)}.json").read_text())
    shard = manifest["cluster"]["shards"][0]
    assert (shard["port"], shard["role"]) == (replica.port, "master")
    code, out, err = cli(config, "verify", "--drill")
    assert code == 0 and "610 keys" in out, out + err


def test_a_failover_after_a_shards_snapshot_is_kept_with_a_warning(
        cluster: LocalCluster, tmp_path: Path) -> None:
    """Shard 0's snapshot is complete when its primary fails over (shard 1 still waits): the
    snapshot is of the node that held the slots at its start, the backup is committed."""
    backups = tmp_path / "backups"
    config = cluster_config(tmp_path / "c.toml", cluster, backups)
    first, held = cluster.primaries()[:2]
    replica = cluster.replica_of(first)
    proc = hold_and_start(cluster, held, config)
    wait_until(lambda: list(backups.glob("*.shard-000.rdb.zst")), 30, "shard 0's artifact")
    replica.client().execute_command("CLUSTER", "FAILOVER")
    wait_until(lambda: cluster.primaries()[0].port == replica.port, 30,
               "the failover to show in the slot map")
    code, out, err = finish(proc)
    assert code == 0, err
    manifest = json.loads((backups / f"{last_line(out)}.json").read_text())
    assert manifest["cluster"]["shards"][0]["port"] == first.port
    assert any("failed over during the backup" in w for w in manifest["warnings"])
    code, out, err = cli(config, "verify", "--drill")
    assert code == 0 and "610 keys" in out, out + err


def test_a_slot_migrating_during_the_backup_is_refused(cluster: LocalCluster,
                                                       tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    config = cluster_config(tmp_path / "c.toml", cluster, backups)
    source, target = cluster.primaries()[:2]
    source_id = source.client().execute_command("CLUSTER", "MYID")
    target_id = target.client().execute_command("CLUSTER", "MYID")
    proc = hold_and_start(cluster, source, config)
    target.client().execute_command("CLUSTER", "SETSLOT", 7, "IMPORTING", source_id)
    source.client().execute_command("CLUSTER", "SETSLOT", 7, "MIGRATING", target_id)
    code, _, err = finish(proc)
    assert code == 1 and "slots started migrating during the backup" in err, err
    assert "slot 7" in err and manifests(backups) == []
    code, _, err = cli(config, "backup")  # still migrating: refused up front
    assert code == 1 and "slots are being migrated" in err, err
    for node in (source, target):
        node.client().execute_command("CLUSTER", "SETSLOT", 7, "STABLE")
    code, _, err = cli(config, "backup")
    assert code == 0, err


def test_slots_moved_during_the_backup_are_refused(cluster: LocalCluster,
                                                   tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    config = cluster_config(tmp_path / "c.toml", cluster, backups)
    source, target = cluster.primaries()[:2]
    target_id = target.client().execute_command("CLUSTER", "MYID")
    client = source.client()
    empty = next(s for s in range(5461) if not client.execute_command(
        "CLUSTER", "COUNTKEYSINSLOT", s))
    proc = hold_and_start(cluster, source, config)
    for node in cluster.primaries():  # an empty slot moves at once
        node.client().execute_command("CLUSTER", "SETSLOT", empty, "NODE", target_id)
    code, _, err = finish(proc)
    assert code == 1 and "the slot map changed during the backup" in err, err
    assert manifests(backups) == []
