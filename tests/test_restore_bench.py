"""Restore time versus Redis's own load time for the same RDB, in one run.

    BACKUPD_BENCH_RDB_MB=100 .venv/bin/python -m pytest -m slow -s tests/test_restore_bench.py

Fills a command-controlled Redis to about BACKUPD_BENCH_RDB_MB of RDB (values are hex of
random bytes, so zstd has real work), backs it up with the defaults (zstd level 3), restores
that backup onto the same server (a full-size pre-restore BGSAVE included), then stops Redis and
times a plain redis-server start on the restored dump.rdb until loading:0.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_restore import Service, backup, running_service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
VALUE_BYTES = 100  # random bytes per value, stored as 200 hex characters


def fill_to(service: Service, megabytes: int) -> int:
    keys = megabytes * 2**20 // (2 * VALUE_BYTES + 30)
    client = service.client()
    try:
        for start in range(0, keys, 5000):
            client.mset({f"bench:{i:010d}": os.urandom(VALUE_BYTES).hex()
                         for i in range(start, min(start + 5000, keys))})
    finally:
        client.close()
    return keys


def events(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def at(entries: list[dict[str, object]], predicate: Callable[[dict[str, object]], bool]) -> float:
    stamp = next(str(e["timestamp"]) for e in entries if predicate(e))
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    with running_service(tmp_path, stop_timeout=120) as svc:
        yield svc


def test_restore_time_versus_redis_load_time(tmp_path: Path, service: Service) -> None:
    megabytes = int(os.environ.get("BACKUPD_BENCH_RDB_MB", "100"))
    keys = fill_to(service, megabytes)
    config = service.config(tmp_path / "config.toml", tmp_path / "backups",
                            start_timeout="30m")
    t0 = time.monotonic()
    backup_id = backup(config)
    backup_s = time.monotonic() - t0

    t0 = time.monotonic()
    proc = run_cli("-c", str(config), "restore", backup_id, "--yes", timeout=3600)
    restore_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    log = events(proc.stderr)
    start = at(log, lambda e: e.get("step") == 2)
    staged = at(log, lambda e: e.get("step") == 1)
    snapshot = at(log, lambda e: e.get("what") == "pre-restore BGSAVE")
    stopped = at(log, lambda e: e.get("what") == "Redis stopped")
    done = at(log, lambda e: e.get("event") == "restore_done")

    rdb = service.dir / "dump.rdb"
    service.stop()
    t0 = time.monotonic()
    service.start()  # redis-server on the restored dump.rdb, until PING and loading:0
    load_s = time.monotonic() - t0
    reported = [line for line in (service.dir / "redis.log").read_text().splitlines()
                if "DB loaded from disk" in line][-1].rsplit(":", 1)[-1].strip()
    print(f"\nRDB {rdb.stat().st_size / 2**20:.0f} MiB, {keys} keys; backup {backup_s:.1f}s; "
          f"restore total {restore_s:.1f}s (CLI start to exit): stage+verify "
          f"{staged - start:.1f}s, pre-restore BGSAVE {snapshot - staged:.1f}s, "
          f"stop/swap/start/load/check {done - stopped:.1f}s; redis-server alone loading the "
          f"same dump.rdb: {load_s:.1f}s to ready (its log: {reported})")
