"""Restores that were interrupted: reported by every run until resolved, and settled before
a new restore starts."""

from __future__ import annotations

from pathlib import Path

import structlog

from backupd.actions.restore import live_journal
from backupd.actions.restore.journal import AFTER_SWAP, DONE, Journal, pre_dirs, staging_dirs
from backupd.actions.restore.staging import remove_tree
from backupd.actions.restore.target import RedisLink
from backupd.config import Config
from backupd.errors import (
    RestoreError,
)

log = structlog.get_logger("backupd.restore")


def interrupted(data_dir: Path) -> list[tuple[Path, Journal]]:
    found = []
    for pre in pre_dirs(data_dir):
        journal = Journal.load(pre)
        if journal.state != DONE:
            found.append((pre, journal))
    return found


def describe_interrupted(pre: Path, journal: Journal) -> str:
    text = (f"an interrupted restore of backup {journal.backup_id} (started "
            f"{journal.started_at}, method {journal.method}, stopped at step "
            f"'{journal.state}') left Redis's previous files in {pre}. To undo it and put the "
            "previous data back: `backupd restore --rollback`.")
    if journal.state in AFTER_SWAP:
        text += (" The restored files are in place: once Redis runs with them and has loaded "
                 f"{journal.expected_keys} keys, the next `backupd restore` records the "
                 "restore as complete.")
    return text


def report_interrupted(config: Config) -> list[str]:
    """For `backupd run` and `backupd backup`: one error line per interrupted restore."""
    data_dir = config.redis.data_dir  # "" with the replication source: no file restores
    messages = [describe_interrupted(pre, journal)
                for pre, journal in (interrupted(Path(data_dir)) if data_dir else [])]
    for message in messages:
        log.error("interrupted_restore", message=message)
    return messages + live_journal.report(config)


def settle_leftovers(data_dir: Path, link: RedisLink) -> None:
    """Before a new restore: complete a restore that in fact succeeded, refuse while one needs
    `--rollback`, and remove staging dirs of restores that never reached step 4."""
    for pre, journal in interrupted(data_dir):
        if journal.state in AFTER_SWAP and _completed(link, journal):
            journal.advance(pre, DONE)
            log.warning("interrupted_restore_completed", backup=journal.backup_id,
                        pre_restore_dir=str(pre))
            continue
        raise RestoreError(describe_interrupted(pre, journal))
    for staging in staging_dirs(data_dir):
        log.warning("leftover_staging_removed", dir=str(staging),
                    reason="a restore stopped before changing anything")
        remove_tree(staging)


def _completed(link: RedisLink, journal: Journal) -> bool:
    info = link.ready_info()
    if info is None or info.get("run_id") == journal.run_id_before:
        return False
    loaded = int(info.get("rdb_last_load_keys_loaded", -1))
    return loaded + int(info.get("rdb_last_load_keys_expired", 0)) == journal.expected_keys


def prune_pre_dirs(data_dir: Path, keep: Path) -> list[str]:
    """Keep the last pre-restore copy only; older completed ones are removed."""
    removed = []
    for pre in pre_dirs(data_dir):
        if pre != keep and Journal.load(pre).state == DONE:
            remove_tree(pre)
            removed.append(pre.name)
    return removed
