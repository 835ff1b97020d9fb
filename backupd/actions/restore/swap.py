"""Steps 4 to 6 and their undoing: quiesce and stop Redis, swap the files, start it and
check what it loaded; on failure, or with `--rollback`, put the previous files back."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import structlog

from backupd import checkpoints
from backupd.actions.restore.journal import (
    AFTER_SWAP,
    DONE,
    RESTARTING,
    SWAPPED,
    SWAPPING,
    Journal,
    staging_dirs,
)
from backupd.actions.restore.staging import Staged, remove_tree
from backupd.actions.restore.target import RedisLink, config_get, wait_ready
from backupd.config import RestoreConfig
from backupd.controllers.base import Controller, poll_until
from backupd.errors import (
    BackupdError,
    RestoreError,
)
from backupd.fsio import fsync_dir

log = structlog.get_logger("backupd.restore")


@dataclass
class Run:
    """Everything the destructive part needs, passed around as one object."""

    link: RedisLink
    controller: Controller
    cfg: RestoreConfig
    save_timeout: float
    data_dir: Path
    pre_dir: Path
    journal: Journal
    aof: bool


def read_config(client: redis.Redis, aof: bool) -> dict[str, str]:
    keys = ["save"] + (["auto-aof-rewrite-percentage", "appendonly"] if aof else [])
    return {key: config_get(client, key) for key in keys}


def quiesce(link: RedisLink, aof: bool, timeout: float, wait: bool = True,
            live: bool = False) -> None:
    """`CONFIG SET save ""` (and no automatic AOF rewrite), then wait for no child: a save or
    rewrite finishing later would rename its file over the restored one. `live` (files swapped
    while Redis runs): also AOF off, as Redis 8 rewrites its AOF manifest at shutdown, over the
    swapped-in one, naming an incr file that is gone: it would then refuse to start. The
    config's `appendonly yes` is back at the restart."""
    client = link.connect()
    try:
        with link.errors():
            client.config_set("save", "")
            if aof:
                client.config_set("auto-aof-rewrite-percentage", "0")
                if live:
                    client.config_set("appendonly", "no")
            if wait:
                poll_until(lambda: _no_child(client), timeout,
                           "the running save or AOF rewrite to finish (redis.save_timeout)")
    finally:
        client.close()
    log.info("restore_step", step=4, what='CONFIG SET save "" and no child process', aof=aof)


def _no_child(client: redis.Redis) -> bool:
    state: dict[str, Any] = client.info("persistence")
    return not any(int(state.get(k, 0)) for k in (
        "rdb_bgsave_in_progress", "aof_rewrite_in_progress", "aof_rewrite_scheduled"))


def _revert_config(link: RedisLink, journal: Journal) -> None:
    """Put the runtime config back when Redis was not restarted (same run_id)."""
    if not journal.config_before:
        return
    try:
        client = link.connect()
    except BackupdError:
        return
    try:
        with link.errors():
            if client.info("server").get("run_id") != journal.run_id_before:
                return
            for key, value in journal.config_before.items():
                client.config_set(key, value)
        log.info("config_restored", keys=sorted(journal.config_before))
    except BackupdError as exc:
        log.warning("config_restore_failed", error=str(exc))
    finally:
        client.close()


STALE_SUFFIX = ".stale"


def move_aside(run: Run) -> None:
    """Redis's files into the pre-restore dir. One that is there already was built from the
    safety snapshot (an AOF dir the running Redis no longer writes): the original is kept
    beside it as `<name>.stale`, and the rollback puts back the one built from the snapshot."""
    for name, existed in run.journal.entries.items():
        if existed and os.path.lexists(run.data_dir / name):
            aside = name + (STALE_SUFFIX if os.path.lexists(run.pre_dir / name) else "")
            os.rename(run.data_dir / name, run.pre_dir / aside)


def install(run: Run, staged: Staged) -> None:
    for name in staged.entries:
        os.rename(staged.dir / name, run.data_dir / name)
    fsync_dir(run.data_dir)
    fsync_dir(run.pre_dir)


def swap_in(run: Run, staged: Staged) -> None:
    """Step 5: previous files aside, new files in, both directories fsynced."""
    # Recorded again right before the move: what exists now is what must come back.
    run.journal.entries = {name: os.path.lexists(run.data_dir / name) for name in staged.entries}
    run.journal.advance(run.pre_dir, SWAPPING)
    move_aside(run)
    checkpoints.reached("restore-moved")
    install(run, staged)
    run.journal.advance(run.pre_dir, SWAPPED)
    log.info("restore_step", step=5, what="files swapped", entries=staged.entries,
             pre_restore_dir=str(run.pre_dir))


def put_back(run: Run) -> bool:
    """Undo step 5 from whatever point it reached; True when anything was moved."""
    changed = False
    after_swap = run.journal.state in (SWAPPING, *AFTER_SWAP, DONE)
    for name, existed in run.journal.entries.items():
        current, saved = run.data_dir / name, run.pre_dir / name
        if os.path.lexists(saved):
            if os.path.isdir(saved) or (os.path.isdir(current) and not os.path.islink(current)):
                remove_tree(current)
                os.rename(saved, current)
            else:
                # One rename over the restored file: a Redis that a restart policy starts right
                # now (a crash loop) finds one complete file or the other, never none (it would
                # come up empty and stay up).
                os.replace(saved, current)
            changed = True
        elif not existed and after_swap and os.path.lexists(current):
            remove_tree(current)  # restored (or written from restored data): not Redis's own
            changed = True
    fsync_dir(run.data_dir)
    return changed


def needs_put_back(run: Run) -> bool:
    after_swap = run.journal.state in (SWAPPING, *AFTER_SWAP, DONE)
    return any(os.path.lexists(run.pre_dir / name) or
               (not existed and after_swap and os.path.lexists(run.data_dir / name))
               for name, existed in run.journal.entries.items())


@dataclass(frozen=True)
class Loaded:
    keys: int
    loaded: int | None
    expired: int
    seconds: float


def drift_allowed(expected: int) -> int:
    """How far an approximate (INFO-based) key count may be from what the RDB held."""
    return max(100, expected // 100)


def check_loaded(info: Mapping[str, Any], expected: int, started: float,
                 exact: bool = True) -> Loaded:
    """Step 6: keys loaded at startup (+ those already expired) must equal the manifest's;
    the live key count may drift (clients write, keys expire) and is only a warning."""
    keys = sum(int(v.get("keys", 0)) for k, v in info.items()
               if k.startswith("db") and k[2:].isdigit() and isinstance(v, dict))
    seconds = round(time.monotonic() - started, 2)
    if "rdb_last_load_keys_loaded" not in info:  # Redis < 7.0
        if keys != expected:
            raise RestoreError(f"Redis has {keys} keys after the restart; the backup has "
                               f"{expected}")
        return Loaded(keys, None, 0, seconds)
    loaded = int(info["rdb_last_load_keys_loaded"])
    expired = int(info.get("rdb_last_load_keys_expired", 0))
    if loaded + expired != expected:
        if not exact and abs(loaded + expired - expected) <= drift_allowed(expected):
            # The manifest's count came from INFO a moment after the fork (several databases
            # on a busy server): a small difference is drift, not proof of a wrong load.
            log.warning("key_count_approximate", loaded=loaded, expired=expired,
                        manifest=expected, hint="the manifest's key count is approximate")
            return Loaded(keys, loaded, expired, seconds)
        raise RestoreError(f"Redis loaded {loaded} keys ({expired} already expired) after the "
                           f"restart; the backup's manifest says {expected}")
    if keys != loaded:
        log.warning("key_count_drift", loaded=loaded, now=keys,
                    hint="clients wrote or keys expired since the load")
    return Loaded(keys, loaded, expired, seconds)


# -- rollback ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolledBack:
    moved: bool
    started: bool
    keys: int | None
    differs: str = ""  # how Redis's keys per db differ from before the restore ("" = same)


def roll_back(run: Run, start: bool) -> RolledBack:
    """Put the previous files back and Redis on them, from any journal state; removes the
    pre-restore dir when done. Used after a failed step and by `--rollback`."""
    log.info("rollback_started", state=run.journal.state, pre_restore_dir=str(run.pre_dir))
    before_swap = run.journal.state not in (SWAPPING, *AFTER_SWAP, DONE)
    if before_swap or not needs_put_back(run):
        if before_swap:
            put_back(run)  # only an AOF dir built from the snapshot (snapshot_aof) is there
        started = _ensure_running(run, start)
        _revert_config(run.link, run.journal)
        return _finish_rollback(run, moved=False, started=started)
    if run.controller.swap_while_running:
        return _roll_back_live(run)
    answers = run.link.answers()
    # RESTARTING: a start was issued; a restart policy may be starting Redis again and again.
    if answers or run.controller.is_running() or run.journal.state == RESTARTING:
        if answers:
            _quiet_before_stop(run)
        _stop_for_rollback(run)
        checkpoints.reached("rollback-stopped")
    put_back(run)
    checkpoints.reached("rollback-put-back")
    started = False
    if run.journal.was_running or start:
        run.controller.start()
        _wait_ready(run, "")
        started = True
    return _finish_rollback(run, moved=True, started=started)


def _wait_ready(run: Run, not_run_id: str) -> dict[str, Any]:
    return wait_ready(run.link, not_run_id, run.cfg.start_timeout, run.cfg.answer_timeout)


def _roll_back_live(run: Run) -> RolledBack:
    """shutdown method: swap back while Redis runs, then SHUTDOWN NOSAVE NOW."""
    info = run.link.ready_info()
    if info is None:
        # Down or crash-looping on the restored files: the restart policy, if any, now
        # starts Redis on the previous ones.
        put_back(run)
        try:
            _wait_ready(run, "")
        except RestoreError as exc:
            log.warning("rollback_redis_down", error=str(exc), hint=run.controller.not_back_hint())
            return _finish_rollback(run, moved=True, started=False)
        return _finish_rollback(run, moved=True, started=True)
    if info.get("run_id") == run.journal.run_id_before:
        # Never shut down: memory still holds the previous data, which now matches the files.
        put_back(run)
        _revert_config(run.link, run.journal)
        return _finish_rollback(run, moved=True, started=True)
    quiesce(run.link, run.aof, run.save_timeout, live=True)
    put_back(run)
    run.controller.stop()
    _wait_ready(run, str(info.get("run_id", "")))
    return _finish_rollback(run, moved=True, started=True)


def _quiet_before_stop(run: Run) -> None:
    """No save on the way down: it would only write the restored data again."""
    try:
        quiesce(run.link, run.aof, run.save_timeout, wait=False)
    except BackupdError as exc:
        log.warning("rollback_quiesce_failed", error=str(exc))


def _stop_for_rollback(run: Run) -> None:
    try:
        run.controller.stop()
    except BackupdError as exc:
        if run.link.answers() or run.controller.is_running():
            raise
        log.warning("rollback_stop_failed_but_down", error=str(exc))


def _ensure_running(run: Run, start: bool) -> bool:
    if run.link.answers():
        return True
    if not (run.journal.was_running or start):
        return False
    run.controller.start()
    _wait_ready(run, "")
    return True


def _finish_rollback(run: Run, moved: bool, started: bool) -> RolledBack:
    keys, differs = None, ""
    if started:
        info = run.link.ready_info()
        per_db = None if info is None else {
            k: int(v.get("keys", 0)) for k, v in info.items()
            if k.startswith("db") and k[2:].isdigit() and isinstance(v, dict)}
        keys = None if per_db is None else sum(per_db.values())
        before = run.journal.keys_per_db_before
        if per_db is not None and before and per_db != before:
            differs = "; ".join(f"{db} has {per_db.get(db, 0)} keys, had {before.get(db, 0)}"
                                for db in sorted(set(per_db) | set(before))
                                if per_db.get(db, 0) != before.get(db, 0))
            log.warning("rollback_keys_differ", differs=differs)
        elif keys is not None and run.journal.keys_before is not None \
                and keys != run.journal.keys_before:
            log.warning("rollback_key_count_differs", keys=keys, before=run.journal.keys_before)
    for staging in staging_dirs(run.data_dir):
        remove_tree(staging)
    remove_tree(run.pre_dir)
    fsync_dir(run.data_dir)
    log.info("rollback_done", moved=moved, started=started, keys=keys)
    return RolledBack(moved, started, keys, differs)
