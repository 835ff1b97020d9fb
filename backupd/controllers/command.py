"""The `command` method: operator-supplied argv lists (systemctl, kubectl, a script).

Commands run without a shell (no quoting surprises, nothing interpolated) and with
`restore.command_timeout`. Their output goes to a temporary file rather than a pipe: a start
command that leaves a daemon behind holding the pipe open would otherwise block us until the
timeout. A stop command returning is not proof that Redis is down (systemctl may return early),
so stop() then waits until Redis no longer answers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import IO

from backupd.config import RestoreConfig
from backupd.controllers.base import Probe, poll_until
from backupd.errors import ConfigError, RestoreError

OUTPUT_TAIL = 300


class CommandController:
    name = "command"
    swap_while_running = False

    def __init__(self, cfg: RestoreConfig, answers: Probe) -> None:
        self.cfg = cfg
        self.answers = answers

    def describe(self) -> str:
        return (f"command: stop with {_show(self.cfg.stop_command)}, "
                f"start with {_show(self.cfg.start_command)}")

    def check(self) -> None:
        for key, argv in (("restore.stop_command", self.cfg.stop_command),
                          ("restore.start_command", self.cfg.start_command)):
            if not argv:
                raise ConfigError(f"restore.method is 'command' but key {key!r} is empty "
                                  '(expected an argv list, e.g. ["systemctl", "stop", "redis"])')
            if shutil.which(argv[0]) is None:
                raise ConfigError(f"key {key!r}: {argv[0]!r} is not an executable "
                                  "(not found on PATH, or not executable)")

    def is_running(self) -> bool | None:
        return None

    def server_version(self) -> str | None:
        return None

    def stop(self) -> None:
        run_command(self.cfg.stop_command, self.cfg.command_timeout, "stop")
        poll_until(lambda: not self.answers(), self.cfg.stop_timeout,
                   "Redis to stop answering after the stop command (restore.stop_timeout)")

    def start(self) -> None:
        run_command(self.cfg.start_command, self.cfg.command_timeout, "start")

    def not_back_hint(self) -> str:
        return ("check the start command and the Redis log; restore.start_timeout bounds how "
                "long loading may take")


def run_command(argv: list[str], timeout: float, what: str) -> None:
    """Run one argv list; RestoreError with its exit status and the tail of its output."""
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=output,
                                  stderr=subprocess.STDOUT, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RestoreError(f"the {what} command {_show(argv)} did not finish within "
                               f"{timeout:g}s (restore.command_timeout)") from None
        except OSError as exc:
            raise RestoreError(f"the {what} command {_show(argv)} could not run: "
                               f"{exc.strerror or exc}") from None
        if proc.returncode != 0:
            raise RestoreError(f"the {what} command {_show(argv)} exited with status "
                               f"{proc.returncode}: {_tail(output)}")


def _tail(output: IO[bytes]) -> str:
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - OUTPUT_TAIL))
    text = output.read().decode("utf-8", "replace").strip()
    lines = text.splitlines()
    return lines[-1] if lines else "(no output)"


def _show(argv: list[str]) -> str:
    """The program name only: arguments may hold tokens or passwords."""
    return f"{os.path.basename(argv[0])!r} ({len(argv) - 1} arguments)" if argv else "(none)"
