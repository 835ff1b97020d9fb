"""The point-in-time link under faults, against a real Redis: a dropped link resumes with a
partial resync (one chain, contiguous offsets, the downtime reported); a backlog that no
longer has the offset starts a new chain at a new base (the gap reported); a silent link is
noticed and resumed; backupd SIGKILLed mid-segment, with a torn tail, keeps exactly what was
durable and resumes the same chain. A restore to a time after each fault is exact."""

from __future__ import annotations

import itertools
import json
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import redis

from backupd.storage import layout
from tests.conftest import PASSWORD, RedisServer, wait_until
from tests.faults.harness import cli, fault_case
from tests.faults.replproxy import repl_proxy
from tests.pitr import (
    Writer,
    check_moment,
    keys_of,
    metas,
    open_segments,
    pitr_config,
    start_link,
    stop,
)

BOUND = 1.5  # as tests/test_pitr_restore.py LOSS_BOUND


def _stamp(moment: float) -> str:
    return datetime.fromtimestamp(int(moment), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _bases(backups: Path) -> list[str]:
    return sorted(p.stem for p in backups.glob("*.json") if layout.manifest_id(p.name))


def _contiguous(found: list[dict[str, object]]) -> None:
    for a, b in itertools.pairwise(found):
        if a["base"] == b["base"]:
            assert int(str(b["first_offset"])) == int(str(a["last_offset"])) + 1, (a, b)


def _writes_for(writer: Writer, seconds: float) -> None:
    start = len(writer.writes)
    wait_until(lambda: len(writer.writes) > start and
               writer.writes[-1][1] - writer.writes[start][1] > seconds, 60, "writes")


def _restore_after(config: Path, server: RedisServer, writer: Writer, moment: int) -> None:
    ran = cli(config, "restore", "--to-time", _stamp(moment), "--yes", timeout=180)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    check_moment(writer.writes, keys_of(server.port), moment, BOUND)


def _report(config: Path) -> dict[str, list[dict[str, object]]]:
    ran = cli(config, "list", "--pitr", "--json")
    assert ran.returncode == 0, ran.stderr[-2000:]
    return json.loads(ran.stdout)  # type: ignore[no-any-return]


def _durable_after(backups: Path, moment: float) -> None:
    """Wait for a durable stamp after `moment` (in a committed segment or the open one's
    durable record)."""
    def newest() -> int:
        times = [int(str(m["last_time"])) for m in metas(backups)]
        times += [int(json.loads(p.read_text())["last_time"])
                  for p in (backups / "pitr").glob("*.progress")]
        return max(times, default=0)

    wait_until(lambda: newest() > moment + 1, 30, "a durable stamp after the last write")


def _kill_replica(server: RedisServer, client: redis.Redis | None = None) -> None:
    own = client or server.client()
    own.client_kill_filter(_type="replica")
    if client is None:
        own.close()


def test_a_dropped_link_resumes_the_chain(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    fault_case("pitr: the master drops the link; PSYNC continues the chain")
    server = redis_factory("--repl-diskless-sync-delay", "0", "--repl-backlog-size", "64mb")
    backups = tmp_path / "backups"
    config = pitr_config(tmp_path / "c.toml", server, backups)
    daemon = start_link(config, backups)
    writer = Writer(server.port).start()
    _writes_for(writer, 2)
    _kill_replica(server)
    wait_until(lambda: any(m["ended"] == "link down" for m in metas(backups)), 30, "link down")
    wait_until(lambda: open_segments(backups), 30, "the link back")
    _writes_for(writer, 2)
    writer.stop()
    last = writer.writes[-1][1]
    _durable_after(backups, last)
    stop(daemon)
    assert len(_bases(backups)) == 1  # no second full sync
    found = metas(backups)
    _contiguous(found)
    [chain] = _report(config)["chains"]
    assert any(g["why"] == "link down" for g in chain["gaps"])  # type: ignore[index]
    _restore_after(config, server, writer, int(last))


def test_a_lost_backlog_starts_a_new_chain(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    fault_case("pitr: the backlog no longer has the offset; new chain, gap reported")
    server = redis_factory("--repl-diskless-sync-delay", "0", "--repl-backlog-size", "16kb")
    backups = tmp_path / "backups"
    config = pitr_config(tmp_path / "c.toml", server, backups)
    daemon = start_link(config, backups)
    client = redis.Redis(port=server.port, password=PASSWORD, decode_responses=True,
                         protocol=2, single_connection_client=True)
    client.set("before", "x")
    client.config_set("requirepass", "locked-out-for-a-moment")  # the link cannot come back
    _kill_replica(server, client)
    wait_until(lambda: any(m["ended"] == "link down" for m in metas(backups)), 30, "link down")
    for start in range(0, 5000, 500):  # 1 MB: far past the 16 KB backlog
        client.mset({f"bulk:{i}": "v" * 200 for i in range(start, start + 500)})
    client.config_set("requirepass", PASSWORD)
    wait_until(lambda: len(_bases(backups)) == 2, 60, "the new base")
    wait_until(lambda: open_segments(backups), 30, "the new chain streaming")
    client.set("after", "y")
    moment = int(datetime.now(UTC).timestamp() + BOUND) + 1
    _durable_after(backups, moment)
    stop(daemon)
    chains = _report(config)["chains"]
    assert len(chains) == 2
    assert "backlog lost" in str(chains[1]["gaps"][0]["why"])  # type: ignore[index]
    ran = cli(config, "restore", "--to-time", _stamp(moment), "--yes", timeout=180)
    assert ran.returncode == 0, ran.stderr[-3000:]
    client = server.client()
    assert client.get("after") == "y" and client.dbsize() == 5002, ran.stdout + ran.stderr[-3000:]
    client.close()


def test_a_silent_link_is_noticed_and_resumed(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    fault_case("pitr: the link goes silent (no FIN); read_timeout; PSYNC resumes")
    server = redis_factory("--repl-diskless-sync-delay", "0", "--repl-backlog-size", "64mb")
    backups = tmp_path / "backups"
    with repl_proxy(server.port) as proxy:
        config = pitr_config(tmp_path / "c.toml", server, backups, port=proxy.port)
        config.write_text(config.read_text().replace('save_timeout = "60s"',
                                                     'save_timeout = "60s"\nread_timeout = "2s"'))
        daemon = start_link(config, backups)
        writer = Writer(server.port).start()
        _writes_for(writer, 1)
        proxy.after, proxy.mode = proxy.sent, "stall"
        wait_until(lambda: any(m["ended"] == "link down" for m in metas(backups)), 30,
                   "the silence noticed")
        proxy.mode = ""
        wait_until(lambda: open_segments(backups), 30, "the link back")
        _writes_for(writer, 1)
        writer.stop()
        last = writer.writes[-1][1]
        _durable_after(backups, last)
        stop(daemon)
    assert len(_bases(backups)) == 1
    _contiguous(metas(backups))
    cfg_direct = pitr_config(tmp_path / "direct.toml", server, backups)
    _restore_after(cfg_direct, server, writer, int(last))


def test_backupd_killed_mid_segment_keeps_only_what_was_durable(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    fault_case("pitr: backupd SIGKILLed mid-segment, torn tail; recovery and PSYNC")
    server = redis_factory("--repl-diskless-sync-delay", "0", "--repl-backlog-size", "64mb")
    backups = tmp_path / "backups"
    config = pitr_config(tmp_path / "c.toml", server, backups, segment="1h")
    daemon = start_link(config, backups)
    writer = Writer(server.port).start()
    wait_until(lambda: list((backups / "pitr").glob("*.progress")), 30, "a durable record")
    _writes_for(writer, 1)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.wait(10)
    [opened] = open_segments(backups)
    progress = json.loads(opened.with_suffix(".progress").read_text())
    with open(opened, "ab") as fh:
        fh.write(b"*3\r\n$3\r\nSET\r\n$4\r\ntorn")  # a write cut short
    daemon = start_link(config, backups)
    wait_until(lambda: any(m["ended"] == "backupd restart" for m in metas(backups)), 30,
               "the recovered segment")
    _writes_for(writer, 1)
    writer.stop()
    last = writer.writes[-1][1]
    _durable_after(backups, last)
    stop(daemon)
    found = metas(backups)
    [recovered] = [m for m in found if m["ended"] == "backupd restart"]
    assert recovered["size"] >= progress["size"]  # a later durable record, never less
    data = (backups / "pitr" / f"{opened.stem}.resp").read_bytes()
    assert len(data) == recovered["size"] and not data.endswith(b"torn")
    assert len(_bases(backups)) == 1
    _contiguous(found)
    _restore_after(config, server, writer, int(last))


def test_redis_client_is_not_confused_by_the_replica(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    """backupd counts as a replica (min-replicas-to-write): INFO shows it online."""
    server = redis_factory("--repl-diskless-sync-delay", "0", "--min-replicas-to-write", "1")
    backups = tmp_path / "backups"
    config = pitr_config(tmp_path / "c.toml", server, backups)
    daemon = start_link(config, backups)
    client = server.client()
    wait_until(lambda: client.info("replication").get("min_slaves_good_slaves") == 1, 30,
               "backupd counted as a good replica")
    client.set("accepted", "1")  # refused without a good replica (-NOREPLICAS)
    stop(daemon)
    wait_until(lambda: client.info("replication").get("connected_slaves") == 0, 30,
               "the replica gone")
    try:
        client.set("refused", "1")
        raise AssertionError("a write was accepted with no good replica")
    except redis.exceptions.ResponseError as exc:
        assert "NOREPLICAS" in str(exc)
    client.close()


def test_an_ack_interval_past_the_max_lag_keeps_backupd_out_of_the_count(
        tmp_path: Path, redis_factory: Callable[..., RedisServer]) -> None:
    """pitr.ack_interval above min-replicas-max-lag: connected and streaming, never counted."""
    server = redis_factory("--repl-diskless-sync-delay", "0", "--min-replicas-to-write", "1",
                           "--min-replicas-max-lag", "1")
    backups = tmp_path / "backups"
    config = pitr_config(tmp_path / "c.toml", server, backups, pitr='ack_interval = "20s"\n')
    daemon = start_link(config, backups)
    client = server.client()
    try:
        wait_until(lambda: client.info("replication").get("connected_slaves") == 1
                   and client.info("replication").get("min_slaves_good_slaves") == 0, 30,
                   "backupd connected but not a good replica")
        try:
            client.set("refused", "1")
            raise AssertionError("backupd was counted for min-replicas-to-write")
        except redis.exceptions.ResponseError as exc:
            assert "NOREPLICAS" in str(exc)
        assert client.info("replication")["connected_slaves"] == 1  # the link stays up
    finally:
        client.close()
        stop(daemon)
