"""How Redis is stopped and started for a restore: one small protocol, three methods.

The order of operations lives in `backupd.actions.restore`; a controller only knows how to stop
and start its Redis and, where it can tell, whether it is running. The one difference in order
is `swap_while_running`: the `shutdown` method cannot start Redis itself, so the files are swapped
in while Redis runs and the shutdown makes the restart policy load them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from backupd import polling
from backupd.errors import RestoreError

Probe = Callable[[], bool]  # True while Redis answers PING

POLL_MIN, POLL_MAX = 0.01, 0.02  # each poll late is restore downtime; a poll costs ~0.1 ms


class Controller(Protocol):
    name: str
    swap_while_running: bool  # True: swap first, then stop() restarts Redis (shutdown method)

    def describe(self) -> str:
        """One line for the plan and the prompt; never contains secrets."""
        ...

    def check(self) -> None:
        """Raise ConfigError/RestoreError when the method cannot work (dry-run and step 2)."""
        ...

    def is_running(self) -> bool | None:
        """Whether Redis's process or container runs; None when only Redis itself can tell."""
        ...

    def server_version(self) -> str | None:
        """The Redis version when Redis is down but the method knows it (an image's env)."""
        ...

    def stop(self) -> None:
        """Stop Redis and return once it is down (for `shutdown`: once it was told to exit)."""
        ...

    def start(self) -> None:
        """Start Redis (or nothing, when a restart policy does it); do not wait for loading."""
        ...

    def not_back_hint(self) -> str:
        """What to tell the operator when Redis does not answer after start()."""
        ...


def poll_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `done` at the restore's pace until it holds; RestoreError naming `what` after
    `timeout`."""
    polling.poll_until(
        done, time.monotonic() + timeout,
        lambda: RestoreError(f"timed out after {timeout:g}s waiting for {what}"),
        first=POLL_MIN, longest=POLL_MAX)
