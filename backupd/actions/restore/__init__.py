"""`backupd restore`: replace a Redis server's data with a backup, safely, and undo it.

Order of operations (issue 4; shared/notes/redis.md sections 2-4), nothing destructive before 4:

1. Fetch the artifact into `<data_dir>/.backupd-restore-<id>` (same filesystem as Redis's files,
   so the swap is a rename) while checking SHA-256, decrypting, decompressing and checking the
   RDB CRC and header in the same pass.
2. Ask Redis (INFO, CONFIG GET) for its version, file names, AOF state and key count; refuse an
   RDB newer than the server can load, before anything stops.
3. Prepare the files: the RDB as `dbfilename` and, with AOF on, a fresh AOF directory whose base
   is the backup (Redis with appendonly loads only the AOF), owned like the existing files.
4. `CONFIG SET save ""` (so no shutdown save can overwrite the new files), wait until no child
   runs, stop Redis with the configured method.
5. Move the current files aside into `.backupd-pre-restore-<time>`, rename the new ones in,
   fsync the directory.
6. Start Redis, wait (bounded) for PING and loading:0, check the key count against the manifest.
7. On failure in 4-6, put the previous files back and start Redis again.

The `shutdown` method swaps before stopping (Redis restarts itself through its restart policy).

A journal (`restore.json` in the pre-restore directory) is written before step 4 and updated at
each step, so a killed restore is found later and `backupd restore --rollback` can undo it from
any point: it knows which original files existed, what the runtime config was, and whether Redis
was running.

For a running RDB-only server the pre-restore copy is first refreshed with a BGSAVE (the same
handshake as a backup): Redis is stopped with saving disabled, so without it a rollback would
bring back the last save rather than the data Redis held. The BGSAVE also proves that
`redis.data_dir` is Redis's data volume (the dump file must change).

This module runs the steps in order (`restore`, `rollback`); the steps live beside it:
`options` (what was asked, the terminal), `target` (the Redis side, step 2), `staging` (steps 1
and 3), `journal` (the journal and its directories), `swap` (steps 4-6 and their undoing),
`leftovers` (interrupted restores) and `drill` (`backupd verify --drill`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import structlog

from backupd import checkpoints, discovery, source
from backupd import manifest as mf
from backupd.actions.backup import backup_lock
from backupd.actions.restore.journal import (
    DONE,
    PRE_PREFIX,
    QUIESCING,
    RESTARTING,
    STAGING_PREFIX,
    STOPPING,
    Journal,
    new_pre_dir,
    pre_dirs,
    staging_dirs,
)
from backupd.actions.restore.leftovers import (
    describe_interrupted,
    interrupted,
    prune_pre_dirs,
    settle_leftovers,
)
from backupd.actions.restore.options import Options, Ui, require_confirmation_possible
from backupd.actions.restore.staging import (
    Owner,
    Selected,
    Staged,
    check_owner_possible,
    check_space,
    data_owner,
    fetch_and_check,
    identities_for,
    remove_tree,
    select_backup,
    stage,
)
from backupd.actions.restore.swap import (
    Loaded,
    Run,
    check_loaded,
    quiesce,
    read_config,
    roll_back,
    swap_in,
)
from backupd.actions.restore.target import (
    RedisLink,
    Target,
    check_target,
    check_version,
    inspect_target,
    wait_ready,
)
from backupd.config import Config
from backupd.controllers.base import Controller
from backupd.controllers.factory import make_controller
from backupd.errors import (
    BackupdError,
    RestoreError,
)

log = structlog.get_logger("backupd.restore")


log = structlog.get_logger("backupd.restore")


@dataclass
class Context:
    config: Config
    opts: Options
    ui: Ui
    data_dir: Path
    link: RedisLink
    controller: Controller
    method: str
    env: Mapping[str, str] | None = None


def _context(config: Config, opts: Options, ui: Ui, env: Mapping[str, str] | None) -> Context:
    method = opts.method or config.restore.method
    link = RedisLink(config.redis, env)
    controller = make_controller(method, config.restore, answers=link.answers,
                                 connect=link.connect)
    return Context(config, opts, ui, Path(config.redis.data_dir), link, controller, method, env)


def restore(config: Config, opts: Options, ui: Ui,
            env: Mapping[str, str] | None = None) -> int:
    """Run `backupd restore`; returns the exit code (0), raises BackupdError otherwise."""
    if (opts.method or config.restore.method) == "replicaof":
        from backupd.actions.restore.live import restore_live

        return restore_live(config, opts, ui, env)
    require_confirmation_possible(opts.yes, opts.dry_run, ui)
    ctx = _context(config, opts, ui, env)
    lock: contextlib.AbstractContextManager[None] = (
        contextlib.nullcontext() if opts.dry_run else backup_lock(Path(config.backup.dir)))
    with lock:
        if opts.dry_run:
            leftovers = [describe_interrupted(p, j) for p, j in interrupted(ctx.data_dir)]
        else:
            settle_leftovers(ctx.data_dir, ctx.link)
            leftovers = []
        selected = select_backup(config, opts.selector, opts.before, opts.source, env)
        identities = identities_for(selected.manifest, opts.identity_file)
        prepared = _prepare(ctx, selected)
        if opts.dry_run:
            fetch_and_check(selected, None, identities, ui.progress)
            ui.echo(plan_text(ctx, selected, prepared, leftovers))
            return 0
        staged = stage(selected, prepared.target, ctx.data_dir, identities, prepared.owner,
                       ui.progress)
        checkpoints.reached("restore-staged")
        try:
            check_version(selected.manifest, staged.rdb_version, prepared.target,
                          ctx.controller, ctx.data_dir)
            if not opts.yes and not ui.confirm(prompt_text(ctx, selected, prepared)):
                raise RestoreError("restore cancelled; nothing was changed")
            with _failover_held_off(ctx):
                _replace(ctx, selected, prepared, staged)
        finally:
            remove_tree(staged.dir)
    return 0


@dataclass(frozen=True)
class Prepared:
    target: Target
    owner: Owner
    version_note: str
    snapshot: bool
    space: int


def _failover_held_off(ctx: Context) -> contextlib.AbstractContextManager[None]:
    """Under Sentinel the master is stopped only while the sentinels hold a failover off."""
    if not ctx.config.redis.sentinel.enabled:
        return contextlib.nullcontext()
    return discovery.failover_held_off(ctx.config.redis, ctx.env,
                                       ctx.config.restore.start_timeout)


def _prepare(ctx: Context, selected: Selected) -> Prepared:
    """Step 2 and every check that needs no download; nothing changes here."""
    discovery.require_hold_off(ctx.config.redis)
    ctx.controller.check()
    target = inspect_target(ctx.link, ctx.controller, ctx.data_dir)
    check_target(target)
    if ctx.controller.swap_while_running and not target.answers:
        raise RestoreError("Redis is not answering, and the shutdown method needs a running "
                           "Redis to shut down; start Redis, or use --method command|docker")
    note = check_version(selected.manifest, selected.manifest.rdb_version, target,
                         ctx.controller, ctx.data_dir)
    _check_data_dir(ctx.data_dir, target)
    owner = data_owner(ctx.data_dir, target)
    check_owner_possible(owner)
    snapshot = target.answers and not target.aof
    space = check_space(ctx.data_dir, selected.manifest, target, snapshot)
    log.info("restore_step", step=2, what="target checked", redis=target.version or "down",
             keys=target.keys, aof=target.aof, method=ctx.method, version_check=note)
    return Prepared(target, owner, note, snapshot, space)


def _check_data_dir(data_dir: Path, target: Target) -> None:
    if not data_dir.is_dir():
        raise RestoreError(f"redis.data_dir {data_dir} is not a directory")
    if target.answers and target.aof and not (data_dir / target.aof_dir).is_dir():
        raise RestoreError(f"Redis has appendonly on, but {data_dir} has no {target.aof_dir}/: "
                           "is redis.data_dir the Redis data volume?")


def _replace(ctx: Context, selected: Selected, prepared: Prepared, staged: Staged) -> None:
    """Steps 4-7."""
    target = prepared.target
    if prepared.snapshot:
        _safety_snapshot(ctx)
        checkpoints.reached("restore-snapshot")
    keys_before, config_before = _current_state(ctx, target)
    pre_dir = new_pre_dir(ctx.data_dir)
    journal = Journal(
        backup_id=selected.manifest.id, started_at=mf.format_time(mf.now_utc()),
        method=ctx.method, state=QUIESCING, was_running=target.running,
        run_id_before=target.run_id, keys_before=keys_before,
        expected_keys=selected.manifest.keys,
        entries={name: os.path.lexists(ctx.data_dir / name) for name in staged.entries},
        config_before=config_before, pid=os.getpid())
    journal.save(pre_dir)
    run = Run(ctx.link, ctx.controller, ctx.config.restore, ctx.config.redis.save_timeout,
              ctx.data_dir, pre_dir, journal, target.aof)
    started = time.monotonic()
    should_start = target.running or ctx.opts.start
    try:
        _stop_and_swap(run, target, staged, should_start)
    except (BackupdError, OSError) as exc:
        _fail(ctx, run, selected, exc)
    if not should_start:
        _finish(ctx, run, selected, None)
        return
    try:
        info = wait_ready(ctx.link, target.run_id, ctx.config.restore.start_timeout)
        loaded = check_loaded(info, selected.manifest.keys, started,
                              selected.manifest.keys_exact)
    except BackupdError as exc:
        if ctx.controller.swap_while_running and ctx.link.ready_info() is None:
            raise RestoreError(_not_back_text(ctx, run, selected, exc)) from None
        _fail(ctx, run, selected, exc)
    _finish(ctx, run, selected, loaded)
    if ctx.config.redis.sentinel.enabled:
        for line in discovery.replicas_resynced(ctx.config.redis, ctx.env, ctx.link.endpoint,
                                                loaded.keys, ctx.config.restore.start_timeout):
            ctx.ui.echo(line)


def _safety_snapshot(ctx: Context) -> None:
    client = ctx.link.connect()
    try:
        with source.snapshot(client, ctx.link.cfg, ctx.data_dir) as snap:
            log.info("restore_step", step=4, what="pre-restore BGSAVE", path=str(snap.path),
                     size=snap.size)
    finally:
        client.close()


def _current_state(ctx: Context, target: Target) -> tuple[int | None, dict[str, str]]:
    if not target.answers:
        return None, {}
    client = ctx.link.connect()
    try:
        with ctx.link.errors():
            return source.server_info(client, ctx.link.cfg).keys, read_config(
                client, target.aof)
    finally:
        client.close()


def _stop_and_swap(run: Run, target: Target, staged: Staged, should_start: bool) -> None:
    if target.answers:
        quiesce(run.link, target.aof, run.save_timeout, live=run.controller.swap_while_running)
    if run.controller.swap_while_running:
        swap_in(run, staged)
        run.journal.advance(run.pre_dir, RESTARTING)
        run.controller.stop()
        log.info("restore_step", step=6, what="SHUTDOWN NOSAVE NOW sent; waiting for restart")
        return
    if target.running:
        run.journal.advance(run.pre_dir, STOPPING)
        run.controller.stop()
        checkpoints.reached("restore-stopped")
        log.info("restore_step", step=4, what="Redis stopped", method=run.controller.name)
    swap_in(run, staged)
    if should_start:
        run.journal.advance(run.pre_dir, RESTARTING)
        run.controller.start()
        checkpoints.reached("restore-started")
        log.info("restore_step", step=6, what="Redis started; waiting for load")


def _fail(ctx: Context, run: Run, selected: Selected, cause: BaseException) -> NoReturn:
    reason = str(cause) if isinstance(cause, BackupdError) else f"{type(cause).__name__}: " \
        f"{getattr(cause, 'strerror', None) or cause}"
    log.error("restore_failed", backup=selected.manifest.id, error=reason,
              state=run.journal.state)
    try:
        result = roll_back(run, ctx.opts.start)
    except (BackupdError, OSError) as exc:
        raise RestoreError(
            f"restore of backup {selected.manifest.id} failed ({reason}) and the rollback "
            f"failed too ({exc}). Redis's previous files are in {run.pre_dir}; fix the cause "
            "and run `backupd restore --rollback`.") from None
    state = (f"Redis answers with {result.keys} keys" if result.started
             else "Redis was not running before and was left stopped")
    raise RestoreError(f"restore of backup {selected.manifest.id} failed: {reason}. It was "
                       f"rolled back: the previous files are back in place and the data is as "
                       f"before ({state}).")


def _not_back_text(ctx: Context, run: Run, selected: Selected, cause: BaseException) -> str:
    return (f"the files of backup {selected.manifest.id} are in place, but Redis did not come "
            f"back: {cause}. {ctx.controller.not_back_hint()}. The previous files are kept in "
            f"{run.pre_dir}; `backupd restore --rollback` puts them back.")


def _finish(ctx: Context, run: Run, selected: Selected, loaded: Loaded | None) -> None:
    run.journal.advance(run.pre_dir, DONE)
    removed = prune_pre_dirs(ctx.data_dir, run.pre_dir)
    m = selected.manifest
    if loaded is None:
        ctx.ui.echo(f"restored backup {m.id} into {ctx.data_dir}; Redis was not running and was "
                    "left stopped (use --start to start it): it loads the backup when started.")
    else:
        ctx.ui.echo(f"restored backup {m.id} ({m.created_at}) into Redis at {ctx.link.where}: "
                    f"{loaded.loaded if loaded.loaded is not None else loaded.keys} keys loaded, "
                    f"{loaded.keys} keys now; {loaded.seconds:g}s from stop to loaded.")
    ctx.ui.echo(f"the previous data is kept in {run.pre_dir} "
                "(`backupd restore --rollback` puts it back; delete it when no longer needed)")
    log.info("restore_done", backup=m.id, pre_restore_dir=str(run.pre_dir),
             removed_older=removed or None, keys=None if loaded is None else loaded.keys)


# -- texts ------------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def prompt_text(ctx: Context, selected: Selected, prepared: Prepared) -> str:
    m, t = selected.manifest, prepared.target
    now = f"{t.keys} keys now" if t.keys is not None else "not running"
    return (f"Replace ALL data of Redis at {ctx.link.where} ({now}) with backup {m.id} "
            f"(created {m.created_at}, {m.keys} keys, {_mib(m.raw_size)}, from "
            f"{selected.storage.name})? The current data is kept in {ctx.data_dir}/"
            f"{PRE_PREFIX}<time>.")


def plan_text(ctx: Context, selected: Selected, prepared: Prepared,
              leftovers: Sequence[str]) -> str:
    m, t, o = selected.manifest, prepared.target, prepared.owner
    stop = "SHUTDOWN NOSAVE NOW (after the swap)" if ctx.controller.swap_while_running \
        else f"stop Redis ({ctx.method})"
    files = t.dbfilename + (f", {t.aof_dir}/ ({t.aof_file}.1.base.rdb + "
                            f"{t.aof_file}.manifest)" if t.aof else "")
    start = ("restart policy starts Redis; wait for a new run_id" if
             ctx.controller.swap_while_running else
             "start Redis" if t.running or ctx.opts.start else
             "leave Redis stopped (it was not running; --start starts it)")
    lines = [
        "Restore plan (dry run: nothing was changed)",
        f"  backup   {m.id} [{selected.storage.name}] created {m.created_at}, {m.keys} keys, "
        f"RDB version {m.rdb_version}, {_mib(m.raw_size)} raw, {m.compression}, "
        f"{'encrypted' if m.encrypted else 'not encrypted'}",
        "           checked: stored SHA-256, decryption, decompression, RDB SHA-256, "
        "RDB header and CRC",
        f"  target   Redis at {ctx.link.where}: "
        + (f"{t.keys} keys, appendonly {'yes' if t.aof else 'no'}" if t.answers
           else "not answering") + f"; version check: {prepared.version_note}",
        f"  method   {ctx.controller.describe()}",
        *([f"  sentinel {ctx.link.endpoint.via}; failover held off while Redis is stopped "
           f"(down-after-milliseconds {ctx.config.redis.sentinel.failover_hold_off:g}s on every "
           "sentinel, put back after); replicas checked for the restored data"]
          if ctx.config.redis.sentinel.enabled else []),
        f"  space    {_mib(prepared.space)} needed in {ctx.data_dir}",
        "  steps",
        f"    1. stage into {ctx.data_dir}/{STAGING_PREFIX}{m.id}/: {files}; owner "
        f"{o.uid}:{o.gid}, mode {o.file_mode:04o} (from {o.source})",
    ]
    if prepared.snapshot:
        lines.append("    2. BGSAVE the current data, so the pre-restore copy is current")
    lines += [
        '    3. CONFIG SET save ""' + (" and auto-aof-rewrite-percentage 0" if t.aof else "")
        + "; wait until no save or rewrite runs",
        f"    4. {stop}",
        f"    5. move {', '.join(t.entries)} aside into {ctx.data_dir}/{PRE_PREFIX}<time>/, "
        "rename the staged files in, fsync",
        f"    6. {start}; wait up to {ctx.config.restore.start_timeout:g}s for PING and "
        f"loading:0; check {m.keys} keys loaded",
        "    on failure in 4-6: put the previous files back and start Redis",
    ]
    lines += [f"  WARNING  {text}" for text in leftovers]
    return "\n".join(lines)


# -- backupd restore --rollback ---------------------------------------------------------------


def rollback(config: Config, opts: Options, ui: Ui,
             env: Mapping[str, str] | None = None) -> int:
    """Put back the files of the newest pre-restore copy (interrupted or completed restore)."""
    require_confirmation_possible(opts.yes, False, ui)
    ctx = _context(config, opts, ui, env)
    with backup_lock(Path(config.backup.dir)):
        found = pre_dirs(ctx.data_dir)
        if not found:
            # A restore killed before step 4 changed nothing but may have left its staging
            # copy (a whole RDB on Redis's data volume): remove it (we hold the lock that
            # every restore holds, so no restore is staging now).
            stale = staging_dirs(ctx.data_dir)
            for staging in stale:
                remove_tree(staging)
            removed = f"; removed {len(stale)} leftover staging dir(s)" if stale else ""
            raise RestoreError(f"nothing to roll back: no {PRE_PREFIX}* directory with a "
                               f"restore journal in {ctx.data_dir}{removed}")
        pre = found[0]
        journal = Journal.load(pre)
        question = (f"Put back Redis's data from before the restore of backup "
                    f"{journal.backup_id} ({journal.started_at}, {pre})? The current data "
                    "of Redis is discarded.")
        if not opts.yes and not ui.confirm(question):
            raise RestoreError("rollback cancelled; nothing was changed")
        aof = len(journal.entries) > 1  # the RDB, plus the AOF dir when AOF was on
        run = Run(ctx.link, ctx.controller, config.restore, config.redis.save_timeout,
                  ctx.data_dir, pre, journal, aof)
        with _failover_held_off(ctx):
            result = roll_back(run, opts.start)
    where = (f"Redis at {ctx.link.where} answers with {result.keys} keys" if result.started
             else "Redis is not running (it was not before the restore; --start starts it)")
    ui.echo(f"rolled back the restore of backup {journal.backup_id}: the previous files are "
            f"back in {ctx.data_dir}; {where}.")
    return 0
