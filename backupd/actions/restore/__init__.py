"""`backupd restore`: replace a Redis server's data with a backup, safely, and undo it.

Order of operations (what Redis loads at start, and what a shutdown save overwrites, decide it),
nothing destructive before 4:

1. Fetch the artifact into `<data_dir>/.backupd-restore-<id>` (same filesystem as Redis's files,
   so the swap is a rename) while checking SHA-256, decrypting, decompressing and checking the
   RDB CRC and header in the same pass.
2. Ask Redis (INFO, CONFIG GET) for its version, file names, AOF state and key count; refuse an
   RDB newer than the server can load, before anything stops.
3. Prepare the files: the RDB as `dbfilename` and a fresh AOF directory whose base is the
   backup (Redis with appendonly loads only the AOF), owned like the existing files. Both,
   whatever `appendonly` says now: a runtime `CONFIG SET appendonly` is forgotten at restart.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import structlog

from backupd import checkpoints, discovery, source
from backupd import manifest as mf
from backupd.actions.backup import backup_lock
from backupd.actions.restore import live_journal
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
from backupd.actions.restore.preflight import (
    Findings,
    highest_db,
    preflight,
    user_persistence,
)
from backupd.actions.restore.restarted import check_evictions, check_keyspace, check_sample
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
    snapshot_aof,
    stage,
)
from backupd.actions.restore.swap import (
    Loaded,
    RolledBack,
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
    config_unavailable_text,
    inspect_target,
    wait_ready,
)
from backupd.config import Config
from backupd.controllers.base import Controller
from backupd.controllers.factory import make_controller
from backupd.errors import (
    BackupdError,
    NeverAnswered,
    RedisAuthError,
    RedisExited,
    RestoreError,
)

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
    if config.redis.cluster.enabled or opts.reshard:
        from backupd.actions.restore.cluster import restore_cluster

        return restore_cluster(config, opts, ui, opts.reshard, env)
    found_live = live_journal.find(config)
    if found_live is not None and not opts.dry_run:
        raise RestoreError(live_journal.describe(config, *found_live, env))
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
        with choose_backup(config, opts, ui, env) as selected:
            return _restore_selected(ctx, selected, leftovers)


@contextlib.contextmanager
def choose_backup(config: Config, opts: Options, ui: Ui,
                  env: Mapping[str, str] | None) -> Iterator[Selected]:
    """The backup a restore puts back: the one asked for, or with --to-time the data at
    that moment, rebuilt from a base and its point-in-time segments (backupd/pitr)."""
    if opts.to_time is None:
        yield select_backup(config, opts.selector, opts.before, opts.source, env)
        return
    from backupd.pitr.rebuild import point_in_time

    with point_in_time(config, opts, opts.to_time, ui, env) as rebuilt:
        if rebuilt is None:
            ui.echo(f"no point-in-time segments: restoring the newest backup at or before "
                    f"{mf.format_time(opts.to_time)} (as --before)")
            yield select_backup(config, opts.selector, opts.to_time, opts.source, env)
        else:
            yield rebuilt


def _restore_selected(ctx: Context, selected: Selected, leftovers: Sequence[str]) -> int:
    opts, ui = ctx.opts, ctx.ui
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
    findings: Findings


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
    if ctx.controller.swap_while_running and target.config_denied:
        raise RestoreError(config_unavailable_text(target.config_denied)
                           + " (The shutdown method swaps while Redis runs: it needs CONFIG.)")
    if ctx.controller.swap_while_running and not target.answers:
        raise RestoreError("Redis is not answering, and the shutdown method needs a running "
                           "Redis to shut down; start Redis, or use --method command|docker")
    note = check_version(selected.manifest, selected.manifest.rdb_version, target,
                         ctx.controller, ctx.data_dir)
    findings = preflight(selected.manifest, target, ctx.opts.force_memory, _user_note(ctx, target))
    _check_data_dir(ctx.data_dir, target)
    owner = data_owner(ctx.data_dir, target)
    check_owner_possible(owner)
    snapshot = target.answers and not target.aof
    space = check_space(ctx.data_dir, selected.manifest, target, snapshot)
    log.info("restore_step", step=2, what="target checked", redis=target.version or "down",
             keys=target.keys, aof=target.aof, method=ctx.method, version_check=note)
    return Prepared(target, owner, note, snapshot, space, findings)


def _user_note(ctx: Context, target: Target) -> str:
    if not target.answers or target.config_denied:
        return ""
    client = ctx.link.connect()
    try:
        with ctx.link.errors():
            return user_persistence(client, ctx.config.redis.username, ctx.data_dir)
    finally:
        client.close()


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
    per_db_before, config_before = _current_state(ctx, target)
    pre_dir = new_pre_dir(ctx.data_dir)
    journal = Journal(
        backup_id=selected.manifest.id, started_at=mf.format_time(mf.now_utc()),
        method=ctx.method, state=QUIESCING, was_running=target.running,
        run_id_before=target.run_id,
        keys_before=None if per_db_before is None else sum(per_db_before.values()),
        expected_keys=selected.manifest.keys,
        entries={name: os.path.lexists(ctx.data_dir / name) for name in staged.entries},
        config_before=config_before, pid=os.getpid(), keys_per_db_before=per_db_before or {},
        aof=target.aof)
    journal.save(pre_dir)
    if prepared.snapshot:
        snapshot_aof(pre_dir, target, ctx.data_dir, prepared.owner)
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
        info = wait_ready(ctx.link, target.run_id, ctx.config.restore.start_timeout,
                          ctx.config.restore.answer_timeout)
        loaded = check_loaded(info, selected.manifest.keys, started,
                              selected.manifest.keys_exact)
        check_keyspace(info, selected.manifest)
        _check_sample(ctx, staged)
    except RedisAuthError as exc:
        # Rolling back would need the same login: say what is on disk and how to undo it.
        raise RestoreError(_login_lost_text(ctx, run, selected, prepared, exc)) from None
    except (RedisExited, NeverAnswered) as exc:
        dead = RedisExited(f"{exc}; {_likely_causes(selected.manifest, prepared, staged)}")
        if ctx.controller.swap_while_running and isinstance(exc, NeverAnswered):
            # No new server seen at all: no restart policy, or one that gave up.
            raise RestoreError(_not_back_text(ctx, run, selected, dead)) from None
        _fail(ctx, run, selected, dead)
    except BackupdError as exc:
        if ctx.controller.swap_while_running and ctx.link.ready_info() is None:
            raise RestoreError(_not_back_text(ctx, run, selected, exc)) from None
        _fail(ctx, run, selected, exc)
    _finish(ctx, run, selected, loaded)
    if ctx.config.redis.sentinel.enabled:
        for line in discovery.replicas_resynced(ctx.config.redis, ctx.env, ctx.link.endpoint,
                                                loaded.keys, ctx.config.restore.start_timeout):
            ctx.ui.echo(line)


def _check_sample(ctx: Context, staged: Staged) -> None:
    client = ctx.link.connect()
    try:
        with ctx.link.errors():
            checked = check_sample(client, staged.sample)
            check_evictions(client.info("everything"))
    finally:
        client.close()
    log.info("key_sample_checked", keys=checked)


def _safety_snapshot(ctx: Context) -> None:
    client = ctx.link.connect()
    try:
        with source.snapshot(client, ctx.link.cfg, ctx.data_dir) as snap:
            log.info("restore_step", step=4, what="pre-restore BGSAVE", path=str(snap.path),
                     size=snap.size)
    finally:
        client.close()


def _current_state(ctx: Context, target: Target) -> tuple[dict[str, int] | None,
                                                          dict[str, str]]:
    """Keys per db (after the safety BGSAVE: what a rollback must bring back) and the runtime
    config a rollback puts back."""
    if not target.answers:
        return None, {}
    client = ctx.link.connect()
    try:
        with ctx.link.errors():
            return source.server_info(client, ctx.link.cfg).keys_per_db, (
                {} if target.config_denied else read_config(client, target.aof))
    finally:
        client.close()


def _stop_and_swap(run: Run, target: Target, staged: Staged, should_start: bool) -> None:
    if target.answers and not target.config_denied:
        quiesce(run.link, target.aof, run.save_timeout, live=run.controller.swap_while_running)
    elif target.answers:  # command/docker: stopped before the swap, a late save is harmless
        log.warning("quiesce_skipped", reason=target.config_denied)
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
    raise RestoreError(f"restore of backup {selected.manifest.id} failed: {reason}. It was "
                       f"rolled back: the previous files are back in place; "
                       f"{rolled_back_text(run.journal, result)}.")


def rolled_back_text(journal: Journal, result: RolledBack) -> str:
    """What the rollback achieved, from the journal (what ran before) and Redis (now)."""
    if not result.started:
        return ("Redis was running before the restore but did not come back after the "
                "rollback: start it, it loads the previous files" if journal.was_running
                else "Redis was not running before the restore and was left stopped")
    if result.differs:
        return (f"Redis answers with {result.keys} keys, but NOT the data as before: "
                f"{result.differs}")
    if journal.keys_per_db_before:
        return f"the data is as before (Redis answers with {result.keys} keys, per db as before)"
    return f"Redis answers with {result.keys} keys"


def _likely_causes(manifest: mf.Manifest, prepared: Prepared, staged: Staged) -> str:
    """What the Redis log most likely says, from what preflight learned."""
    t, o, top = prepared.target, prepared.owner, highest_db(manifest)
    causes = [f"the config the restart reads has `databases` below {top + 1} (the backup "
              f"uses db{top}; the running Redis had {t.databases or '?'})" if top > 0 else "",
              f"the restart runs a Redis older than {t.version}, one that cannot load RDB "
              f"version {staged.rdb_version}" if t.version else
              f"the restarted Redis cannot load RDB version {staged.rdb_version}",
              f"it cannot read or write the restored files (owner {o.uid}:{o.gid}, mode "
              f"{o.file_mode:04o})", "a maxmemory or ACL file that the restart reads"]
    return "likely causes (see the Redis log): " + "; ".join(c for c in causes if c)


def _login_lost_text(ctx: Context, run: Run, selected: Selected, prepared: Prepared,
                     cause: BaseException) -> str:
    t = prepared.target
    why = prepared.findings.user_note or "it may have existed only at runtime"
    return (f"the files of backup {selected.manifest.id} are in place ({ctx.data_dir}/"
            f"{t.dbfilename} and {t.aof_dir}/) and Redis restarted on them, but it now rejects "
            f"the restore's login ({cause}); {why}. The data Redis loaded was not checked. The "
            f"previous files are kept in {run.pre_dir}: to go back, run `backupd restore "
            "--rollback` with a user that exists after a restart (redis.username, e.g. the "
            "default user).")


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
    files = (f"{t.dbfilename}, {t.aof_dir}/ ({t.aof_file}.1.base.rdb + {t.aof_file}.manifest;"
             " loaded whether the restart has appendonly on or off)")
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
        f"  checks   databases (backup up to db{highest_db(m)}"
        + (f", target has {t.databases}" if t.databases is not None else "") + "), memory ("
        + (f"maxmemory {t.maxmemory}" if t.maxmemory else "no maxmemory") + "), ACL user, "
        "then after the start: keys per db and "
        + (f"{len(m.key_sample)} sampled keys" if m.key_sample else "sampled keys"),
    ]
    lines += [f"  WARNING  {text}" for text in (*prepared.findings.warnings, *leftovers)]
    return "\n".join(lines)


# -- backupd restore --rollback ---------------------------------------------------------------


def _since_text(journal: Journal) -> str:
    """For a rollback of a completed restore: every write since it finished is discarded."""
    if journal.state != DONE or not journal.finished_at:
        return ""
    finished = mf.parse_time(journal.finished_at)
    span = max(0, int((mf.now_utc() - finished).total_seconds()))
    hours, rest = divmod(span, 3600)
    ago = f"{hours}h {rest // 60}m" if hours else f"{rest // 60}m {rest % 60}s"
    return (f", including every write since the restore finished at {journal.finished_at} "
            f"({ago} ago)")


def rollback(config: Config, opts: Options, ui: Ui,
             env: Mapping[str, str] | None = None) -> int:
    """Put back the files of the newest pre-restore copy (interrupted or completed restore),
    or, after an interrupted live restore, its safety snapshot."""
    if live_journal.find(config) is not None:
        from backupd.actions.restore.live import rollback_live

        return rollback_live(config, opts, ui, env)
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
        since = _since_text(journal)
        question = (f"Put back Redis's data from before the restore of backup "
                    f"{journal.backup_id} ({journal.started_at}, {pre})? The current data "
                    f"of Redis is discarded{since}.")
        if since:
            log.warning("rollback_discards_writes", finished_at=journal.finished_at)
        if not opts.yes and not ui.confirm(question):
            raise RestoreError("rollback cancelled; nothing was changed")
        # A journal of an older backupd has no `aof`: it listed the AOF dir only when AOF was on.
        aof = journal.aof if journal.aof is not None else len(journal.entries) > 1
        run = Run(ctx.link, ctx.controller, config.restore, config.redis.save_timeout,
                  ctx.data_dir, pre, journal, aof)
        with _failover_held_off(ctx):
            result = roll_back(run, opts.start)
    ui.echo(f"rolled back the restore of backup {journal.backup_id}{since}: the previous files "
            f"are back in {ctx.data_dir}; {rolled_back_text(journal, result)}"
            + ("" if result.started or journal.was_running else " (--start starts it)") + ".")
    if result.differs:
        raise RestoreError(f"the rollback put the previous files back, but Redis does not hold "
                           f"the data it had before the restore: {result.differs}")
    return 0
