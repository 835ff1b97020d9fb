"""`backupd run` as a real process against a real redis-server: runs, metrics, health, signals.

Every wait polls with a deadline (conftest.wait_until); the schedule is `every = "1s"`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import filelock
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    PASSWORD,
    S3_ENV,
    S3_KEY_ID,
    S3_SECRET,
    RedisServer,
    fill,
    free_port,
    run_cli,
    s3_section,
    wait_until,
    write_config,
)
from tests.faults.s3proxy import FaultProxy
from tests.httpcapture import CaptureServer

TOKEN = "tok-5ecret-hook-0a1b2c"
KEYS = 1001  # conftest.fill: 1000 strings and a hash


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    config: Path
    backups: Path
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"event": "<not json>", "line": line})
        return out

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event]

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                        timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def metric(self, name: str, **labels: str) -> float:
        """One sample from /metrics (the server is up before `daemon_started` is logged)."""
        text = self.get("/metrics")[1].decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    return float(sample.value)
        raise AssertionError(f"{name}{labels} not in /metrics")

    def healthz(self) -> tuple[int, dict[str, Any]]:
        code, body = self.get("/healthz")
        return code, json.loads(body)

    def signal_and_wait(self, sig: int = signal.SIGTERM, timeout: float = 15) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - started

    def manifests(self) -> list[str]:
        return sorted(p.name for p in self.backups.glob("*.json") if not p.name.startswith("."))

    def temp_files(self) -> list[str]:
        return [p.name for p in self.backups.iterdir() if ".tmp-" in p.name]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def start(server: RedisServer, schedule: str = "", extra: str = "") -> Daemon:
        port = free_port()
        backups = tmp_path / "backups"
        config = write_config(tmp_path / "config.toml", server, backups, extra=f"""
[schedule]
cron = ""
every = "1s"
{schedule}

[metrics]
listen = "127.0.0.1:{port}"
max_age = "1m"
{extra}
""")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("BACKUPD_") and k != "REDIS_PASSWORD"}
        env["REDIS_PASSWORD"] = PASSWORD
        log = tmp_path / f"daemon-{len(started)}.log"
        with open(log, "wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "backupd", "--log-format", "json", "-c", str(config),
                 "run"], stdout=sink, stderr=subprocess.STDOUT, env=env)
        daemon = Daemon(proc, config, backups, port, log)
        started.append(daemon)
        wait_until(lambda: daemon.logged("daemon_started") or proc.poll() is not None, 15,
                   "the daemon to start")
        assert proc.poll() is None, daemon.output()
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)


def assert_no_secrets(daemon: Daemon) -> None:
    text = daemon.output()
    assert PASSWORD not in text
    assert TOKEN not in text
    assert not daemon.logged("<not json>"), "every output line is a JSON log event"


def test_scheduled_backups_metrics_health_and_clean_stop(
        redis_server: RedisServer, start_daemon: Any) -> None:
    fill(redis_server)
    with CaptureServer() as hooks:
        daemon = start_daemon(redis_server, extra=f"""
[notify]
webhook_url = "{hooks.url}/hook/{TOKEN}"
on_success = true
healthchecks_url = "{hooks.url}/ping/{TOKEN}"
timeout = "5s"
""")
        wait_until(lambda: daemon.metric("backupd_backups_total", outcome="success") >= 2, 20,
                   "two scheduled backups")
        assert len(daemon.manifests()) >= 2
        assert [e["fits"] for e in daemon.logged("drill_server")] == [True]  # 7.0 drills 7.0
        assert daemon.metric("backupd_backup_keys") == KEYS
        assert daemon.metric("backupd_backup_size_bytes", kind="raw") > 0
        assert daemon.metric("backupd_backup_duration_seconds_count") >= 2
        assert daemon.metric("backupd_last_success_timestamp_seconds") > time.time() - 60
        assert daemon.metric("backupd_build_info") == 1

        code, body = daemon.healthz()
        assert code == 200, body
        assert body["status"] == "ok"
        assert body["next_run"] is not None
        checked = run_cli("-c", str(daemon.config), "health")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.startswith("healthy (ok)")

        successes = [r.json() for r in hooks.received("POST", f"/hook/{TOKEN}")]
        assert successes[0]["event"] == "backup_success"
        assert successes[0]["backup_id"] + ".json" in daemon.manifests()
        assert successes[0]["keys"] == KEYS
        assert hooks.received("GET", f"/ping/{TOKEN}/start")
        assert hooks.received("GET", f"/ping/{TOKEN}")

        code, took = daemon.signal_and_wait(signal.SIGTERM)
    assert code == 0, daemon.output()
    assert took < 10
    assert daemon.temp_files() == []
    assert daemon.logged("daemon_stopped")
    stopped = run_cli("-c", str(daemon.config), "health")
    assert stopped.returncode == 1
    assert "unhealthy (stopped)" in stopped.stdout
    assert_no_secrets(daemon)


def test_failed_runs_are_counted_notified_and_survived(
        redis_server: RedisServer, start_daemon: Any) -> None:
    fill(redis_server)
    redis_server.stop()
    dead_ping = f"http://127.0.0.1:{free_port()}/ping/{TOKEN}"
    with CaptureServer() as hooks:
        daemon = start_daemon(redis_server, extra=f"""
[notify]
webhook_url = "{hooks.url}/hook/{TOKEN}"
healthchecks_url = "{dead_ping}"
timeout = "2s"
""")
        wait_until(lambda: daemon.metric("backupd_backups_total", outcome="failure") >= 2, 20,
                   "two failed runs")
        assert daemon.proc.poll() is None
        [first, *_] = [r.json() for r in hooks.received("POST", f"/hook/{TOKEN}")]
        assert first["event"] == "backup_failure"
        assert first["error_type"] == "RedisUnavailable"
        assert first["error"]
        code, body = daemon.healthz()  # max_age 1m has not passed since the first due run
        assert (code, body["status"]) == (200, "starting")
        assert body["last_error"]["message"] == first["error"]
        assert daemon.logged("notification_failed")  # the dead healthchecks URL, masked

        redis_server.start()
        wait_until(lambda: daemon.metric("backupd_backups_total", outcome="success") >= 1, 20,
                   "a successful run once Redis is back")
        assert daemon.healthz()[1]["status"] == "ok"
        code, _ = daemon.signal_and_wait(signal.SIGTERM)
    assert code == 0, daemon.output()
    assert_no_secrets(daemon)


def slow_down(server: RedisServer, micros_per_key: int) -> None:
    client = server.client()
    client.config_set("rdb-key-save-delay", micros_per_key)
    client.close()


def test_overlapping_run_is_skipped_and_sigterm_lets_the_backup_finish(
        redis_server: RedisServer, start_daemon: Any) -> None:
    fill(redis_server)
    slow_down(redis_server, 2500)  # ~2.5 s per backup, runs every second
    daemon = start_daemon(redis_server, schedule='shutdown_grace = "30s"')
    wait_until(lambda: daemon.metric("backupd_skipped_runs_total", reason="overlap") >= 1, 15,
               "an overlapping run to be skipped")
    assert daemon.logged("run_skipped")
    wait_until(lambda: daemon.healthz()[1]["running"], 15, "a backup in progress")
    before = len(daemon.logged("run_succeeded"))
    code, _ = daemon.signal_and_wait(signal.SIGTERM, timeout=30)
    assert code == 0, daemon.output()
    [requested] = daemon.logged("shutdown_requested")
    assert requested["backup_running"] is True
    assert len(daemon.logged("run_succeeded")) == before + 1  # finished within the grace
    assert daemon.temp_files() == []
    assert_no_secrets(daemon)


def assert_nothing_half_written(daemon: Daemon) -> None:
    """Only committed backups (manifest + artifact) and backupd's own dot files remain."""
    names = {p.name for p in daemon.backups.iterdir()}
    artifacts = {n for n in names if not n.startswith(".") and not n.endswith(".json")}
    committed = {n.split(".")[0] for n in names if n.endswith(".json")}
    assert {a.split(".")[0] for a in artifacts} <= committed
    lock = filelock.FileLock(daemon.backups / ".backupd.lock", timeout=0)
    lock.acquire()  # the kernel released the dead daemon's flock
    lock.release()


def test_grace_expiry_exits_0_without_waiting(redis_server: RedisServer,
                                              start_daemon: Any) -> None:
    fill(redis_server)
    slow_down(redis_server, 30000)  # ~30 s: far beyond the grace
    daemon = start_daemon(redis_server, schedule='run_on_start = true\nshutdown_grace = "1s"')
    wait_until(lambda: daemon.logged("bgsave_requested"), 15, "the backup to start")
    code, took = daemon.signal_and_wait(signal.SIGTERM)
    assert code == 0, daemon.output()
    assert took < 6
    assert daemon.logged("shutdown_grace_expired")
    assert daemon.manifests() == []
    assert_nothing_half_written(daemon)


def test_grace_expiry_aborts_the_open_s3_upload(
        redis_server: RedisServer, start_daemon: Any, moto_endpoint: str, bucket: str,
        proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup whose streamed upload hangs when the grace expires: the process exits without
    waiting, but first aborts the multipart upload, which would otherwise stay in the bucket,
    invisible and billed."""
    client = redis_server.client()
    for i in range(12):  # incompressible: the artifact spans more than one part
        client.set(f"blob:{i}", os.urandom(1 << 20))
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    proxy.arm("stall", "multipart-part", times=None, stall=60)
    daemon = start_daemon(redis_server, schedule='run_on_start = true\nshutdown_grace = "1s"',
                          extra=s3_section(proxy.url, bucket))
    wait_until(lambda: daemon.logged("backup_done") and "multipart-part" in proxy.ops(), 30,
               "the local commit, with a part stuck on its way to S3")
    code, took = daemon.signal_and_wait(signal.SIGTERM)
    assert code == 0, daemon.output()
    assert took < 8 and daemon.logged("shutdown_grace_expired")
    assert "multipart-abort" in proxy.ops("forwarded")
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                      aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert_no_secrets(daemon)


def test_second_signal_exits_at_once(redis_server: RedisServer, start_daemon: Any) -> None:
    fill(redis_server)
    slow_down(redis_server, 30000)
    daemon = start_daemon(redis_server, schedule='run_on_start = true\nshutdown_grace = "60s"')
    wait_until(lambda: daemon.logged("bgsave_requested"), 15, "the backup to start")
    daemon.proc.send_signal(signal.SIGINT)
    wait_until(lambda: daemon.logged("shutdown_requested"), 10, "the first signal to be seen")
    code, took = daemon.signal_and_wait(signal.SIGTERM)
    assert code == 0, daemon.output()
    assert took < 5
    assert daemon.logged("second_signal")
    assert_nothing_half_written(daemon)


@pytest.mark.parametrize(("toml", "key"), [
    ('[schedule]\ncron = "0 3 * * 8"', "schedule.cron"),
    ('[schedule]\ntimezone = "Mars/Olympus_Mons"', "schedule.timezone"),
    ('[schedule]\nevery = "0s"', "schedule.every"),
    ('[schedule]\ndrill = "sundays"', "schedule.drill"),
    (f'[notify]\nwebhook_url = "file:///{TOKEN}"', "notify.webhook_url"),
])
def test_bad_config_exits_2_at_start_up(tmp_path: Path, toml: str, key: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[redis]\ndata_dir = "{tmp_path / "data"}"\n'
                      f'[backup]\ndir = "{tmp_path / "backups"}"\n{toml}\n')
    result = run_cli("-c", str(config), "run", timeout=30)
    assert result.returncode == 2, result.stderr
    assert key in result.stderr
    assert TOKEN not in result.stderr + result.stdout
    assert not (tmp_path / "backups").exists()  # nothing started


def test_metrics_port_in_use_fails_start_up(tmp_path: Path, redis_server: RedisServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "config.toml", redis_server, tmp_path / "backups",
                              extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        result = run_cli("-c", str(config), "run", timeout=30)
    assert result.returncode == 1, result.stderr
    assert "cannot listen on metrics.listen" in result.stderr
