"""`backupd run` SIGKILLed during scheduled backups: the same invariants as for `backupd backup`.

The daemon runs a backup every second; it is killed at named stages (the crash hook fires in
its worker thread and takes the whole process down) and at random moments. After each kill
the backups are consistent and the lock is free, and a new daemon goes on backing up.
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RedisServer, free_port, wait_until, write_config
from tests.faults import harness
from tests.faults.harness import (
    STATS,
    Spawned,
    assert_consistent,
    deadline_wait,
    leftovers,
    populate,
    set_save_delay,
    spawn,
)


def daemon_config(tmp_path: Path, server: RedisServer) -> Path:
    return write_config(tmp_path / "daemon.toml", server, tmp_path / "backups", f"""
[retention]
keep_last = 2
keep_hourly = 0
keep_daily = 0
keep_weekly = 0
keep_monthly = 0

[schedule]
cron = ""
every = "1s"
run_on_start = true
shutdown_grace = "5s"

[metrics]
listen = "127.0.0.1:{free_port()}"
""")


def events(spawned: Spawned) -> list[dict[str, object]]:
    found = []
    for text in (spawned.out.read_text(errors="replace"), spawned.err.read_text(errors="replace")):
        for line in text.splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def logged(spawned: Spawned, event: str) -> int:
    return sum(1 for e in events(spawned) if e.get("event") == event)


@pytest.mark.slow
def test_kill_daemon_during_scheduled_backups(tmp_path: Path,
                                              redis_factory: Callable[..., RedisServer]) -> None:
    seed = int(os.environ.get("BACKUPD_FAULT_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"daemon kill seed: {seed}")
    rng = random.Random(seed)
    server = redis_factory()
    populate(server.port, 20_000, 48, random_values=True)
    config = daemon_config(tmp_path, server)
    backups = tmp_path / "backups"
    logs = tmp_path / "logs"

    for stage in ("snapshot", "copy", "compress", "manifest", "committed", "prune"):
        daemon = spawn(config, "run", env=harness.crash_env(stage), logs=logs)
        # The first scheduled backups run at once and every second: the stage is reached
        # (prune: once two backups exist) and the hook kills the daemon.
        assert daemon.wait(60) == -signal.SIGKILL, daemon.output()
        daemon.output()
        harness.killed_at(stage)
        STATS["daemon_kills"] += 1
        assert_consistent(config, backups)

    set_save_delay(server.port, -2)  # ~1 s saves: random kills land in every phase
    for _ in range(6):
        daemon = spawn(config, "run", logs=logs)

        def started(d: Spawned = daemon) -> bool:
            return logged(d, "bgsave_requested") > 0 or d.proc.poll() is not None

        wait_until(started, 20, "a scheduled backup to start")
        deadline_wait(daemon.proc, rng.uniform(0.0, 2.0))
        assert daemon.proc.poll() is None, daemon.output()
        daemon.kill()
        STATS["daemon_kills"] += 1
        harness.no_traceback(*daemon.output())
        assert_consistent(config, backups)

    set_save_delay(server.port, 0)
    daemon = spawn(config, "run", logs=logs)
    try:
        wait_until(lambda: logged(daemon, "run_succeeded") >= 2, 30,
                   "two scheduled backups after the kills")
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    out, err = daemon.output()
    harness.no_traceback(out, err)
    assert leftovers(backups) == [], leftovers(backups)
    assert len(assert_consistent(config, backups)["local"]) == 2
