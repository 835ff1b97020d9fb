"""Waiting for a condition that another process makes true: one loop with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable


def poll_until(done: Callable[[], bool], deadline: float, timed_out: Callable[[], Exception],
               *, first: float, longest: float) -> None:
    """Call `done` until it holds, pausing `first` seconds, doubling up to `longest`; raise
    `timed_out()` once time.monotonic() passes `deadline`. `done` may raise to stop early."""
    delay = first
    while not done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise timed_out()
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, longest)
