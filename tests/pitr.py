"""Helpers of the point-in-time tests: a config with [pitr], a writer that records when each
write was sent and acknowledged, and readings of the segment directory."""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.conftest import PASSWORD, RedisServer, wait_until, write_config
from tests.faults.harness import Spawned, spawn


def pitr_config(path: Path, server: RedisServer, backups: Path, extra: str = "",
                segment: str = "3s", port: int | None = None, pitr: str = "") -> Path:
    """[pitr] on, the replicaof restore method (the restarted Redis is restored live)."""
    cfg = write_config(path, server, backups,
                       f'[pitr]\nenabled = true\nsegment = "{segment}"\nmax_lag = "10s"\n{pitr}'
                       '[metrics]\nlisten = ""\n'
                       '[restore]\nmethod = "replicaof"\nstart_timeout = "20s"\n' + extra)
    if port is not None:
        cfg.write_text(cfg.read_text().replace(f"port = {server.port}", f"port = {port}", 1))
    return cfg


def segment_dir(backups: Path) -> Path:
    return backups / "pitr"


def metas(backups: Path) -> list[dict[str, object]]:
    """Committed segments' metadata, by our own reading, in stream order."""
    found = [json.loads(p.read_text()) for p in segment_dir(backups).glob("*.json")]
    return sorted(found, key=lambda m: (str(m["replid"]), int(str(m["first_offset"]))))


def open_segments(backups: Path) -> list[Path]:
    return sorted(segment_dir(backups).glob("*.open"))


def start_link(config: Path, backups: Path) -> Spawned:
    """`backupd run` with the link up and one stamp durable."""
    daemon = spawn(config, "run")
    wait_until(lambda: open_segments(backups) or metas(backups), 60, "the first segment")
    return daemon


def stop(daemon: Spawned) -> None:
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.wait(60)


@dataclass
class Writer:
    """SETs w:<n> as fast as one connection goes; records (sent, acknowledged, key)."""

    port: int
    writes: list[tuple[float, float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Writer:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        client = redis.Redis(port=self.port, password=PASSWORD, socket_timeout=5, protocol=2)
        n = 0
        while not self._stop.is_set():
            key = f"w:{n}"
            sent = time.time()
            try:
                client.set(key, "v" * 200)
            except redis.exceptions.RedisError:
                return  # Redis was killed: this write is not acknowledged
            self.writes.append((sent, time.time(), key))
            n += 1
            if n % 500 == 0:
                with client.pipeline(transaction=True) as tx:  # transactions too
                    tx.set(f"tx:{n}:a", "1").set(f"tx:{n}:b", "2").execute()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def keys_of(port: int, pattern: str = "w:*") -> set[str]:
    client = redis.Redis(port=port, password=PASSWORD, decode_responses=True, protocol=2)
    try:
        return set(client.scan_iter(pattern, count=5000))
    finally:
        client.close()


def check_moment(writes: list[tuple[float, float, str]], present: set[str], moment: int,
                 bound: float) -> float:
    """Every write acknowledged before moment - bound is there, none sent at or after the
    moment; returns how long before the moment the newest missing acknowledged write was
    (the measured loss, 0 when none)."""
    after = {k for sent, _, k in writes if sent >= moment}
    assert not present & after, f"writes after {moment} restored: {sorted(present & after)[:5]}"
    missing = [moment - acked for _, acked, k in writes if acked < moment and k not in present]
    lost = max(missing, default=0.0)
    assert lost <= bound, f"a write acknowledged {lost:.3f}s before {moment} is missing"
    return lost
