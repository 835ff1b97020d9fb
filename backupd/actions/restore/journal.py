"""The restore journal and the directories it lives in: written before anything stops and
updated at each step, so that a killed restore is found later and can be undone."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog

from backupd import checkpoints
from backupd import manifest as mf
from backupd.actions.restore.target import safe_name, scan_dir
from backupd.errors import (
    RestoreError,
)
from backupd.fsio import write_atomic

log = structlog.get_logger("backupd.restore")

STAGING_PREFIX = ".backupd-restore-"
PRE_PREFIX = ".backupd-pre-restore-"
JOURNAL = "restore.json"
JOURNAL_FORMAT = 1
STAMP = "%Y%m%dT%H%M%SZ"

# Journal states, in order. A journal that is not DONE marks an interrupted restore.
QUIESCING, STOPPING, SWAPPING, SWAPPED, RESTARTING, DONE = (
    "quiescing", "stopping", "swapping", "swapped", "restarting", "done")
AFTER_SWAP = (SWAPPED, RESTARTING)


@dataclass
class Journal:
    """The state of one restore, in its pre-restore dir; the basis of `--rollback`."""

    backup_id: str
    started_at: str
    method: str
    state: str
    was_running: bool
    run_id_before: str
    keys_before: int | None
    expected_keys: int
    entries: dict[str, bool]  # name in data_dir -> whether Redis had that file before
    config_before: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    keys_per_db_before: dict[str, int] = field(default_factory=dict)
    finished_at: str = ""  # when it reached DONE: a later --rollback discards writes since
    aof: bool | None = None  # appendonly at runtime before the restore (None: older journal)
    format: int = JOURNAL_FORMAT

    def save(self, pre_dir: Path) -> None:
        write_atomic(pre_dir / JOURNAL, (json.dumps(asdict(self), indent=2) + "\n").encode())
        checkpoints.reached(f"restore-{self.state}")

    def advance(self, pre_dir: Path, state: str) -> None:
        self.state = state
        if state == DONE:
            self.finished_at = mf.format_time(mf.now_utc())
        self.save(pre_dir)
        log.info("restore_state", state=state, pre_restore_dir=str(pre_dir))

    @classmethod
    def load(cls, pre_dir: Path) -> Journal:
        try:
            raw = json.loads((pre_dir / JOURNAL).read_bytes())
            journal = cls(**raw)
        except (OSError, ValueError, TypeError) as exc:
            raise RestoreError(f"cannot read the restore journal in {pre_dir}: {exc}") from None
        if not isinstance(journal.entries, dict) or not all(
                isinstance(k, str) and isinstance(v, bool) for k, v in journal.entries.items()):
            raise RestoreError(f"the restore journal in {pre_dir} is malformed")
        if not isinstance(journal.keys_per_db_before, dict) or not all(
                isinstance(v, int) for v in journal.keys_per_db_before.values()) or \
                journal.aof not in (None, True, False):
            raise RestoreError(f"the restore journal in {pre_dir} is malformed")
        for name in journal.entries:
            safe_name(name)
        return journal


def new_pre_dir(data_dir: Path) -> Path:
    stamp = mf.now_utc().strftime(STAMP)
    for n in range(100):
        path = data_dir / f"{PRE_PREFIX}{stamp}{f'-{n}' if n else ''}"
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:
            continue
    raise RestoreError(f"cannot create a pre-restore directory in {data_dir}")


def pre_dirs(data_dir: Path) -> list[Path]:
    """Pre-restore dirs with a journal, newest first."""
    found = [p for p in scan_dir(data_dir) if p.name.startswith(PRE_PREFIX) and p.is_dir()
             and (p / JOURNAL).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def staging_dirs(data_dir: Path) -> list[Path]:
    return [p for p in scan_dir(data_dir) if p.name.startswith(STAGING_PREFIX) and p.is_dir()]
