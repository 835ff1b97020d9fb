"""A throwaway redis-server that loads one RDB file: the engine of `backupd verify --drill`.

It listens on a unix socket in a private temp dir and on no TCP port (`--port 0`), so a drill
can run next to production without a port clash and without being reachable. The socket dir is
short and in the system temp dir because unix socket paths are limited to ~107 bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from backupd import polling
from backupd.errors import RestoreError
from backupd.servers import ServerId, from_version_output

VERSION_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOG_TAIL = 400
PR_SET_PDEATHSIG = 1  # linux/prctl.h
AOF_NAME = "appendonly.aof"  # the multi-part AOF a point-in-time restore loads


def server_identity(binary: str) -> ServerId:
    """`redis-server --version` -> Redis 7.0.15 (or Valkey 8.1.8); RestoreError when the
    binary cannot run."""
    if shutil.which(binary) is None:
        raise RestoreError(f"{binary!r} is not an executable on PATH (key 'verify.redis_server'); "
                           "the drill needs redis-server")
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=VERSION_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RestoreError(f"cannot run {binary} --version: {exc}") from None
    found = from_version_output(out.stdout)
    if found is None:
        raise RestoreError(f"{binary} --version printed no version: {out.stdout[:100]!r}")
    return found


@dataclass(frozen=True)
class Listen:
    """A TCP listener for a throwaway server that another server must reach (replicaof)."""

    host: str
    port: int
    password: str = field(repr=False)


@contextlib.contextmanager
def throwaway_server(binary: str, rdb: Path, timeout: float,
                     listen: Listen | None = None,
                     aof_dir: str | None = None) -> Iterator[redis.Redis]:
    """Start `binary` on `rdb` (its directory is the server's dir), yield a client once the
    data is loaded, and always stop the server and remove the socket dir. With `listen`, it
    also listens there, password-protected (the password goes in on stdin, not argv). With
    `aof_dir` it loads that multi-part AOF directory (beside `rdb`) instead, `rdb` being
    where a SAVE writes."""
    with tempfile.TemporaryDirectory(prefix="backupd-drill-") as sock_dir:
        sock = str(Path(sock_dir) / "redis.sock")
        log_file = rdb.parent / "redis-drill.log"
        tcp = ["--port", str(listen.port), "--bind", listen.host,
               "--repl-diskless-sync-delay", "0"] if listen else ["--port", "0"]
        argv = [binary, *(["-"] if listen else []), *tcp, "--unixsocket", sock,
                "--unixsocketperm", "700",
                "--dir", str(rdb.parent), "--dbfilename", rdb.name, "--save", "",
                *(["--appendonly", "yes", "--appenddirname", aof_dir,
                   "--appendfilename", AOF_NAME, "--aof-load-truncated", "no"]
                  if aof_dir else ["--appendonly", "no"]),
                "--daemonize", "no", "--logfile", str(log_file)]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if listen else subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=_dies_with(os.getpid()) if listen else None)
        if listen is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.write(f"requirepass {listen.password}\n".encode())
            with contextlib.suppress(OSError):
                proc.stdin.close()
        password = listen.password if listen else None
        client = redis.Redis(unix_socket_path=sock, decode_responses=True, protocol=2,
                             socket_timeout=30, password=password)
        try:
            _wait_loaded(proc, client, log_file, timeout)
            yield client
        finally:
            client.close()
            _stop(proc)


def _dies_with(parent: int) -> Callable[[], None]:
    """In the child before exec: a listening throwaway is killed when backupd dies (SIGKILL
    included), so that no copy of the data stays served on TCP by an orphan."""
    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # backupd died before the prctl
            os._exit(1)
    return arm


def _wait_loaded(proc: subprocess.Popen[bytes], client: redis.Redis, log_file: Path,
                 timeout: float) -> None:
    def loaded() -> bool:
        if proc.poll() is not None:
            raise RestoreError(f"the drill redis-server exited with status {proc.returncode} "
                               f"while loading: {_log_tail(log_file)}")
        try:
            return bool(client.ping()) and not int(client.info("persistence").get("loading", 0))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False  # not listening yet, or -LOADING (a ConnectionError subclass)

    polling.poll_until(loaded, time.monotonic() + timeout, lambda: RestoreError(
        f"the drill redis-server did not finish loading within {timeout:g}s "
        "(restore.start_timeout)"), first=0.02, longest=0.5)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # --save "": SIGTERM exits without writing anything
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


def _log_tail(log_file: Path) -> str:
    try:
        text = log_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-LOG_TAIL:] or "(empty log)"
