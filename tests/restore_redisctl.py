"""Stand-ins for what stops and starts Redis in production, for the restore tests.

    start PIDFILE [--fail-once MARKER] [--hang MARKER] -- ARGV...
        Like `systemctl start`: run redis-server ARGV daemonized with PIDFILE and return.
        --fail-once: exit 3 without starting if MARKER does not exist yet (then create it).
        --hang: write our pid to MARKER and sleep (a start that never returns).
    stop PIDFILE
        Like `systemctl stop`: SIGTERM the pid in PIDFILE and wait until it is gone.
        Succeeds when nothing runs.
    supervise PIDFILE [--once] -- ARGV...
        Like a container restart policy: run redis-server ARGV in the foreground and start it
        again whenever it exits, until SIGTERM. --once: do not restart (policy "no").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DEADLINE = 20.0


def start(pidfile: Path, argv: list[str], fail_once: Path | None, hang: Path | None) -> int:
    if fail_once is not None and not fail_once.exists():
        fail_once.write_text("failed once\n")
        print("simulated start failure", file=sys.stderr)
        return 3
    if hang is not None:
        hang.write_text(str(os.getpid()))
        time.sleep(DEADLINE * 3)
        return 4
    full = [*argv, "--daemonize", "yes", "--pidfile", str(pidfile)]
    return subprocess.run(full, check=False).returncode


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie nobody reaped has exited


def stop(pidfile: Path) -> int:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return 0  # not running
    if not _alive(pid):
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + DEADLINE
    while _alive(pid):
        if time.monotonic() > deadline:
            print(f"pid {pid} did not exit", file=sys.stderr)
            return 1
        time.sleep(0.02)
    return 0


def supervise(pidfile: Path, argv: list[str], once: bool) -> int:
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, on_term)
    pidfile.write_text(str(os.getpid()))
    while not stopping:
        child = subprocess.Popen(argv)
        child.wait()
        if once:
            break
    return 0


def main(args: list[str]) -> int:
    command, pidfile, rest = args[0], Path(args[1]), args[2:]
    argv = rest[rest.index("--") + 1:] if "--" in rest else []
    options = rest[: rest.index("--")] if "--" in rest else rest

    def option(name: str) -> Path | None:
        return Path(options[options.index(name) + 1]) if name in options else None

    if command == "start":
        return start(pidfile, argv, option("--fail-once"), option("--hang"))
    if command == "stop":
        return stop(pidfile)
    if command == "supervise":
        return supervise(pidfile, argv, "--once" in options)
    print(f"unknown command {command}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
