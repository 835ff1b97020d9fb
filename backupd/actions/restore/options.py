"""What the operator asked of a restore (`Options`) and how backupd talks to them (`Ui`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from backupd.errors import (
    UsageError,
)


@dataclass(frozen=True)
class Options:
    selector: str = "latest"
    source: str | None = None  # local | s3 | None: local if the backup is there, else s3
    before: datetime | None = None
    identity_file: str | None = None
    dry_run: bool = False
    yes: bool = False
    method: str | None = None
    start: bool = False
    force_memory: bool = False
    reshard: bool = False  # a cluster backup into a cluster of another shape
    to_time: datetime | None = None  # point in time (backupd/pitr); else as `before`


@dataclass(frozen=True)
class Ui:
    """How the action talks to the operator; the CLI wires it to click and the terminal."""

    echo: Callable[[str], None]
    confirm: Callable[[str], bool]
    interactive: bool  # stdin is a terminal: a confirmation can be asked
    progress: bool  # stderr is a terminal: draw a progress bar, else log lines


def require_confirmation_possible(opts_yes: bool, dry_run: bool, ui: Ui) -> None:
    if not (opts_yes or dry_run or ui.interactive):
        raise UsageError("restore replaces all data in Redis and there is no terminal to "
                         "confirm on: pass --yes (or --dry-run to only check)")
