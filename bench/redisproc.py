"""redis-server processes for the benchmark (the same pattern as tests/conftest.py)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               step: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)


def server_argv(port: int, data_dir: Path, *extra: str) -> list[str]:
    """redis-server as a backupd user would run it, minus automatic saves (the bench saves)."""
    return [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
            "--save", "", "--appendonly", "no", "--logfile", str(data_dir / "redis.log"),
            "--repl-diskless-sync-delay", "0", *extra]


def client(port: int, timeout: float = 600) -> redis.Redis:
    return redis.Redis(port=port, decode_responses=True, socket_timeout=timeout, protocol=2)


def answers(port: int) -> bool:
    """True while anything answers on the port (also -LOADING)."""
    try:
        conn = client(port, 5)
        try:
            conn.ping()
        finally:
            conn.close()
    except redis.exceptions.BusyLoadingError:
        return True
    except redis.exceptions.ConnectionError:
        return False
    return True


def loaded(port: int) -> bool:
    """True once the server answers PING and has finished loading its data."""
    try:
        conn = client(port, 5)
        try:
            return not int(conn.info("persistence")["loading"])
        finally:
            conn.close()
    except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
        return False


@dataclass
class RedisServer:
    dir: Path
    port: int = field(default_factory=free_port)
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300) -> float:
        """Start and wait until the data is loaded; returns the seconds that took."""
        self.dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        self.proc = subprocess.Popen(server_argv(self.port, self.dir, *self.extra),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._ready, timeout, f"redis-server on port {self.port} to load")
        return time.perf_counter() - started

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            log = self.dir / "redis.log"
            raise RuntimeError("redis-server exited: " + (log.read_text()[-2000:]
                                                           if log.exists() else ""))
        return loaded(self.port)

    def client(self) -> redis.Redis:
        return client(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
