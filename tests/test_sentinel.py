"""Replicas and Sentinel on real servers: replica honesty, discovery before each backup and
restore, a failover between backups, a sentinel down, and a restore that holds the failover
off and checks that the replicas resynced."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSWORD, RedisServer, fill, last_line, run_cli, wait_until
from tests.topology import (
    CA,
    MASTER_NAME,
    SentinelSetup,
    sentinel_config,
    sentinel_topology,
    stop_all,
    tls_sentinel_setup,
)

CTL = Path(__file__).with_name("restore_redisctl.py")


@pytest.fixture
def topo(tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> Iterator[SentinelSetup]:
    with sentinel_topology(tmp_path, redis_factory) as setup:
        yield setup


def backup(config: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = run_cli("-c", str(config), "backup", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert PASSWORD not in proc.stdout + proc.stderr
    manifest: dict[str, Any] = json.loads(
        (config.parent / "backups" / f"{last_line(proc.stdout)}.json").read_text())
    return manifest


def count_keys(server: RedisServer) -> int:
    client = server.client()
    try:
        return sum(int(db["keys"]) for db in client.info("keyspace").values())
    finally:
        client.close()


# -- replica honesty (no Sentinel) -------------------------------------------------------------


def direct_config(tmp_path: Path, server: RedisServer) -> Path:
    path = tmp_path / "direct.toml"
    path.write_text(f'[redis]\nhost = "127.0.0.1"\nport = {server.port}\n'
                    f'data_dir = "{server.dir}"\nconnect_timeout = "3s"\n'
                    f'[backup]\ndir = "{tmp_path / "backups"}"\n')
    return path


def test_a_replica_backup_records_role_link_and_lag(tmp_path: Path, topo: SentinelSetup) -> None:
    manifest = backup(direct_config(tmp_path, topo.replica))
    repl = manifest["replication"]
    assert repl["role"] == "replica"
    assert repl["master_link_status"] == "up"
    assert repl["master"] == f"127.0.0.1:{topo.master.port}"
    assert isinstance(repl["lag_bytes"], int) and repl["lag_bytes"] >= 0
    assert manifest["keys"] == 401 and manifest["warnings"] == []


def test_a_replica_with_its_master_link_down_is_refused(tmp_path: Path,
                                                        topo: SentinelSetup) -> None:
    for sentinel in topo.sentinels:  # no failover: the replica just loses its master
        sentinel.stop()
    topo.master.stop()
    wait_until(lambda: topo.replica.client().info("replication")["master_link_status"] == "down",
               20, "the replica to notice")
    config = direct_config(tmp_path, topo.replica)
    refused = run_cli("-c", str(config), "backup")
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert "master_link_status:down" in refused.stderr
    assert "redis.allow_stale_replica" in refused.stderr
    assert not (tmp_path / "backups").exists() or not list((tmp_path / "backups").glob("*.json"))
    manifest = backup(config, env={"BACKUPD_REDIS__ALLOW_STALE_REPLICA": "true"})
    assert manifest["replication"]["master_link_status"] == "down"
    assert any("master_link_status:down" in w for w in manifest["warnings"])


# -- Sentinel ------------------------------------------------------------------------------------


def test_config_check_shows_the_resolved_master(tmp_path: Path, topo: SentinelSetup) -> None:
    proc = run_cli("-c", str(sentinel_config(tmp_path, topo)), "config", "check")
    assert proc.returncode == 0, proc.stderr
    assert f"# target: master {MASTER_NAME} = 127.0.0.1:{topo.master.port} via 3 sentinels" \
        in proc.stdout


def test_backups_follow_the_master_across_a_failover(tmp_path: Path,
                                                     topo: SentinelSetup) -> None:
    config = sentinel_config(tmp_path, topo)
    first = backup(config)
    assert first["redis"]["port"] == topo.master.port
    assert first["sentinel"]["master"] == f"127.0.0.1:{topo.master.port}"
    assert first["sentinel"]["agreeing"] == 3 and first["replication"]["role"] == "master"
    new = topo.failover()
    assert new is topo.replica
    client = new.client()
    client.set("written-after-failover", "1")
    client.close()
    second = backup(config)
    assert second["redis"]["port"] == new.port
    assert second["sentinel"]["master"] == f"127.0.0.1:{new.port}"
    assert second["keys"] == 402


def test_prefer_replica_backs_up_a_healthy_replica(tmp_path: Path, topo: SentinelSetup) -> None:
    manifest = backup(sentinel_config(tmp_path, topo, 'prefer = "replica"'))
    assert manifest["redis"]["port"] == topo.replica.port
    assert manifest["replication"]["role"] == "replica"
    assert manifest["replication"]["master_link_status"] == "up"


def test_prefer_replica_falls_back_to_the_master_without_a_healthy_one(
        tmp_path: Path, topo: SentinelSetup) -> None:
    topo.replica.stop()
    proc = run_cli("-c", str(sentinel_config(tmp_path, topo, 'prefer = "replica"')), "backup")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"event": "no_healthy_replica"' in proc.stderr
    manifest = json.loads((tmp_path / "backups" / f"{last_line(proc.stdout)}.json").read_text())
    assert manifest["redis"]["port"] == topo.master.port
    assert manifest["replication"]["role"] == "master"


def test_sentinels_with_their_own_password(tmp_path: Path,
                                           redis_factory: Callable[..., RedisServer]) -> None:
    secret = "sentinel-Secret-pw-0815"
    with sentinel_topology(tmp_path, redis_factory, password=secret) as topo:
        config = sentinel_config(tmp_path, topo, extra="")
        text = config.read_text().replace(f'master_name = "{MASTER_NAME}"',
                                          f'master_name = "{MASTER_NAME}"\n'
                                          'password_env = "SENTINEL_PASSWORD"')
        config.write_text(text)
        refused = run_cli("-c", str(config), "backup")
        assert refused.returncode == 1
        assert "no sentinel answered" in refused.stderr
        assert "redis.sentinel.username/password_env/password_file" in refused.stderr
        wrong = run_cli("-c", str(config), "backup", env={"SENTINEL_PASSWORD": "wrong-pw"})
        assert wrong.returncode == 1 and "wrong-pw" not in wrong.stderr + wrong.stdout
        manifest = backup(config, env={"SENTINEL_PASSWORD": secret})
        assert manifest["sentinel"]["agreeing"] == 3
        assert secret not in json.dumps(manifest)


def test_sentinels_and_servers_over_tls(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    topo = tls_sentinel_setup(tmp_path, ca)
    try:
        fill(topo.master, 200)
        topo.wait_settled()
        config = sentinel_config(tmp_path, topo, f'tls = true\ntls_ca_file = "{ca.pem.cert}"')
        config.write_text(config.read_text().replace(
            f'master_name = "{MASTER_NAME}"', f'master_name = "{MASTER_NAME}"\ntls = true'))
        manifest = backup(config)
        assert manifest["sentinel"]["agreeing"] == 3
        assert manifest["redis"]["port"] == topo.master.port and manifest["keys"] == 201
        check = run_cli("-c", str(config), "config", "check")
        assert "via 3 sentinels (TLS, certificate checked for '127.0.0.1')" in check.stdout
    finally:
        stop_all(topo)


def test_an_unknown_master_name_is_a_config_error(tmp_path: Path, topo: SentinelSetup) -> None:
    config = sentinel_config(tmp_path, topo)
    proc = run_cli("-c", str(config), "backup",
                   env={"BACKUPD_REDIS__SENTINEL__MASTER_NAME": "nosuch"})
    assert proc.returncode == 2
    assert "redis.sentinel.master_name" in proc.stderr


# -- restore under Sentinel ----------------------------------------------------------------------


def restore_section(server: RedisServer) -> str:
    pidfile = server.dir / f"redis-{server.port}.pid"
    # Redis stays down for 3 s at least: without the hold-off (down-after 2 s), the sentinels
    # would fail the master over to the healthy replica meanwhile.
    slow = "import subprocess, sys, time; time.sleep(3); sys.exit(subprocess.call(sys.argv[1:]))"
    start = [sys.executable, "-c", slow, sys.executable, str(CTL), "start", str(pidfile), "--",
             *server.argv()]
    stop = [sys.executable, str(CTL), "stop", str(pidfile)]
    return (f'[restore]\nmethod = "command"\nstart_timeout = "30s"\n'
            f"stop_command = {json.dumps(stop)}\nstart_command = {json.dumps(start)}\n")


def down_after(topo: SentinelSetup) -> list[int]:
    out = []
    for sentinel in topo.sentinels:
        with sentinel.client() as client:
            out.append(int(client.sentinel_master(MASTER_NAME)["down-after-milliseconds"]))
    return out


@pytest.fixture
def restorable(tmp_path: Path, topo: SentinelSetup) -> Iterator[tuple[SentinelSetup, Path]]:
    """The master as a service: its pidfile for the stop command (a restart here would be
    failed over), a start command that runs it daemonized."""
    master = topo.master
    assert master.proc is not None
    pidfile = master.dir / f"redis-{master.port}.pid"
    pidfile.write_text(f"{master.proc.pid}\n")
    config = sentinel_config(tmp_path, topo, extra=restore_section(master))
    try:
        yield topo, config
    finally:
        subprocess.run([sys.executable, str(CTL), "stop", str(pidfile)], check=False,
                       timeout=30)


def test_restore_and_rollback_hold_the_failover_off_and_check_the_replicas(
        restorable: tuple[SentinelSetup, Path]) -> None:
    topo, config = restorable
    manifest = backup(config)
    client = topo.master.client()
    for i in range(50):
        client.set(f"after-backup:{i}", "x")
    client.close()
    wait_until(lambda: count_keys(topo.replica) == 451, 10, "the replica to have the new keys")
    proc = run_cli("-c", str(config), "restore", manifest["id"], "--yes", timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert '"event": "failover_held_off"' in proc.stderr
    assert f"replica 127.0.0.1:{topo.replica.port} resynced to the restored data (401 keys" \
        in proc.stdout
    assert count_keys(topo.master) == 401 and count_keys(topo.replica) == 401
    assert all(s.master()[1] == topo.master.port for s in topo.sentinels)  # no failover
    assert down_after(topo) == [2000, 2000, 2000]  # put back
    rolled = run_cli("-c", str(config), "restore", "--rollback", "--yes", timeout=180)
    assert rolled.returncode == 0, rolled.stderr[-4000:]
    assert count_keys(topo.master) == 451
    assert all(s.master()[1] == topo.master.port for s in topo.sentinels)
    assert down_after(topo) == [2000, 2000, 2000]


def test_a_dry_run_shows_the_sentinel_plan(restorable: tuple[SentinelSetup, Path]) -> None:
    topo, config = restorable
    manifest = backup(config)
    proc = run_cli("-c", str(config), "restore", manifest["id"], "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"sentinel master {MASTER_NAME} = 127.0.0.1:{topo.master.port} via 3 sentinels; " \
           "failover held off" in proc.stdout
    assert down_after(topo) == [2000, 2000, 2000]  # a dry run changes nothing


def test_a_restore_into_a_replica_is_refused(tmp_path: Path, topo: SentinelSetup) -> None:
    manifest = backup(direct_config(tmp_path, topo.master))
    client = topo.master.client()
    client.set("after-backup", "1")
    client.close()
    wait_until(lambda: count_keys(topo.replica) == 402, 10, "the replica to have the new key")
    proc = run_cli("-c", str(direct_config(tmp_path, topo.replica)), "restore", manifest["id"],
                   "--yes")
    assert proc.returncode == 1
    assert "the target Redis is a replica" in proc.stderr
    assert count_keys(topo.replica) == 402


def test_restore_refused_without_hold_off(restorable: tuple[SentinelSetup, Path]) -> None:
    topo, config = restorable
    manifest = backup(config)
    proc = run_cli("-c", str(config), "restore", manifest["id"], "--yes",
                   env={"BACKUPD_REDIS__SENTINEL__FAILOVER_HOLD_OFF": "0s"})
    assert proc.returncode == 1
    assert "redis.sentinel.failover_hold_off" in proc.stderr
    assert count_keys(topo.master) == 401


def test_restore_needs_a_majority_of_sentinels(restorable: tuple[SentinelSetup, Path]) -> None:
    topo, config = restorable
    manifest = backup(config)
    topo.sentinels[0].stop()
    topo.sentinels[1].stop()
    proc = run_cli("-c", str(config), "restore", manifest["id"], "--yes")
    assert proc.returncode == 1
    assert "only 1 of 3 sentinels confirm" in proc.stderr
    assert "nothing was changed" in proc.stderr
