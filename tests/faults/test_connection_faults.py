"""Faults of the way Redis is reached: a sentinel down (one, or all), a failover in the middle of
a backup, a TLS handshake that never completes. Each ends in a backup from one server or a clean,
prompt failure: never a hang, never a backup that mixes two servers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import RedisServer, unzstd, wait_until
from tests.faults import harness
from tests.faults.harness import (
    cli,
    complete_local,
    fault_case,
    last_event,
    leftovers,
    populate,
    set_save_delay,
    spawn,
)
from tests.topology import CA, MASTER_NAME, SentinelSetup, sentinel_config, sentinel_topology

MARK = b"written-after-the-failover"


@pytest.fixture
def topo(tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> Iterator[SentinelSetup]:
    with sentinel_topology(tmp_path, redis_factory, keys=10) as setup:
        yield setup


def test_one_sentinel_down_is_survived_and_recorded(tmp_path: Path, topo: SentinelSetup) -> None:
    fault_case("one of three sentinels down")
    topo.sentinels[1].stop()
    ran = cli(sentinel_config(tmp_path, topo), "backup")
    assert ran.returncode == 0, ran.stderr[-3000:]
    (manifest,) = complete_local(tmp_path / "backups").values()
    assert manifest["sentinel"]["answered"] == 2
    assert manifest["sentinel"]["unreachable"] == topo.hosts[1]
    assert manifest["redis"]["port"] == topo.master.port


def test_all_sentinels_down_fails_promptly_and_clearly(tmp_path: Path,
                                                       topo: SentinelSetup) -> None:
    fault_case("every sentinel down")
    for sentinel in topo.sentinels:
        sentinel.stop()
    started = time.monotonic()
    ran = cli(sentinel_config(tmp_path, topo), "backup")
    assert ran.returncode == 1
    assert time.monotonic() - started < 20
    harness.no_traceback(ran.stderr)
    assert f"no sentinel answered about master '{MASTER_NAME}'" in ran.stderr
    assert complete_local(tmp_path / "backups") == {}


@pytest.mark.parametrize("demoted", [False, True], ids=["promoted", "old-master-demoted"])
def test_failover_during_a_backup_never_mixes_servers(tmp_path: Path, topo: SentinelSetup,
                                                      demoted: bool) -> None:
    """The master is failed over while its BGSAVE runs: the backup completes from the server it
    started on (its data, its run_id), or fails cleanly; the next backup is the new master's.
    `demoted`: the old master is already a replica of the new one (it resyncs from it, and
    that data lands in its dump file) before the backup goes on."""
    fault_case(f"failover during a backup ({'old master demoted' if demoted else 'promoted'})")
    old = topo.master
    populate(old.port, 20_000, 48, random_values=True)
    wait_until(lambda: topo.replica.client().dbsize() >= 20_000, 20, "the replica to sync")
    old_run_id = old.client().info("server")["run_id"]
    set_save_delay(old.port, -1)  # a save of ~1.6 s
    config = sentinel_config(tmp_path, topo)
    marker = tmp_path / "paused"
    spawned = spawn(config, "backup", env={"BACKUPD_PAUSE_AT": "snapshot",
                                           "BACKUPD_PAUSE_FILE": str(marker)})
    wait_until(lambda: marker.exists() or spawned.proc.poll() is not None, 30,
               "the backup to request its BGSAVE")
    assert spawned.proc.poll() is None, spawned.output()
    new = topo.failover()
    client = new.client()
    client.set(MARK, "1")
    client.close()
    if demoted:
        wait_until(lambda: old.client().info("replication")["role"] == "slave", 30,
                   "the old master to be reconfigured as a replica")
    marker.unlink()
    code = spawned.wait(90)
    _out, err = spawned.output()
    harness.no_traceback(err)
    backups = tmp_path / "backups"
    if code == 0:
        (manifest,) = complete_local(backups).values()
        assert manifest["redis"]["run_id"] == old_run_id
        assert manifest["redis"]["port"] == old.port
        assert MARK not in unzstd((backups / manifest["artifact"]).read_bytes())
    else:
        assert code == 1, err[-3000:]
        assert complete_local(backups) == {}
        assert leftovers(backups) == []
        error = str(last_event(err).get("error", ""))
        assert "role" in error or "snapshot" in error or "save" in error, error
    if demoted:
        assert code == 1, "a demoted master's dump is the new master's data: no backup"
    set_save_delay(old.port, 0)
    ran = cli(config, "backup")
    assert ran.returncode == 0, ran.stderr[-3000:]
    latest = max(complete_local(backups).values(), key=lambda m: m["id"])
    assert latest["redis"]["port"] == new.port
    assert MARK in unzstd((backups / latest["artifact"]).read_bytes())


def test_tls_handshake_stall_is_bounded_by_connect_timeout(tmp_path: Path) -> None:
    """A server that accepts TCP and never answers the TLS hello: redis.connect_timeout fires
    (named), not read_timeout, and nothing hangs."""
    fault_case("TLS handshake stall")
    ca = CA(tmp_path / "pki")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    try:
        path = tmp_path / "c.toml"
        path.write_text(f'[redis]\nhost = "127.0.0.1"\nport = {port}\ntls = true\n'
                        f'tls_ca_file = "{ca.pem.cert}"\nconnect_timeout = "1s"\n'
                        f'read_timeout = "60s"\ndata_dir = "{tmp_path}/d"\n'
                        f'[backup]\ndir = "{tmp_path}/b"\n')
        started = time.monotonic()
        ran = cli(path, "backup")
        took = time.monotonic() - started
        assert ran.returncode == 1, ran.stderr[-3000:]
        harness.no_traceback(ran.stderr)
        error = str(last_event(ran.stderr).get("error", ""))
        assert "redis.connect_timeout 1s" in error and "read_timeout" not in error, error
        assert took < 15, f"the stall took {took:.1f}s to notice"
        assert accepted, "the stalled server was never reached"
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
