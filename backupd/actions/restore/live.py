"""`restore.method = "replicaof"`: a live restore, with no stop/start and no file access.

A throwaway redis-server (the drill's machinery) loads the staged backup and listens on
`restore.replicaof_announce_host` (a free port, a random password); the target is made its
replica (`masterauth` set for the sync and put back afterwards), the full sync replaces all of
its data, the data is checked as after a file restore's start (keys per db, the key sample),
and `REPLICAOF NO ONE` makes it a master again. During the sync clients of the target get
`-LOADING` (while it loads) and `-READONLY` for writes. A target that starts no sync within
REACH_TIMEOUT cannot reach the throwaway's address: it is released (a replica keeps its data
until a sync succeeds) and the restore refused. Before anything changes, the target's own data
is read over the replication protocol into a safety snapshot, and a journal is written
(live_journal); a failure after the REPLICAOF rolls back by the same path from the snapshot,
and so does `restore --rollback` after a kill.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import redis
import structlog

from backupd import checkpoints, discovery, servers, source
from backupd.actions.backup import backup_lock
from backupd.actions.restore import live_journal as lj
from backupd.actions.restore.options import Options, Ui, require_confirmation_possible
from backupd.actions.restore.restarted import check_keyspace, check_sample, keyspace
from backupd.actions.restore.staging import (
    Selected,
    fetch_and_check,
    identities_for,
    remove_tree,
    sample_keys,
)
from backupd.config import Config
from backupd.controllers.throwaway import Listen, server_identity, throwaway_server
from backupd.errors import BackupdError, RestoreError
from backupd.fsio import atomic_file, write_all
from backupd.manifest import Manifest
from backupd.polling import poll_until
from backupd.rdb_keys import SampledKey
from backupd.replication import ReplicationStream
from backupd.streams import CHUNK

log = structlog.get_logger("backupd.restore.live")

POLL = 0.05
REACH_TIMEOUT = 10.0  # a replica connects within a second of REPLICAOF (replication cron)


class Unreachable(RestoreError):
    """The target started no sync from the throwaway server: nothing changed."""


def restore_live(config: Config, opts: Options, ui: Ui,
                 env: Mapping[str, str] | None = None) -> int:
    """Run `backupd restore` with the replicaof method; 0, or raises BackupdError."""
    require_confirmation_possible(opts.yes, opts.dry_run, ui)
    from backupd.actions.restore import choose_backup

    with choose_backup(config, opts, ui, env) as selected:
        return _restore_live(config, opts, ui, env, selected)


def _restore_live(config: Config, opts: Options, ui: Ui, env: Mapping[str, str] | None,
                  selected: Selected) -> int:
    identities = identities_for(selected.manifest, opts.identity_file)
    endpoint = discovery.resolve(config.redis, env, for_restore=True)
    target = source.connect_endpoint(endpoint)
    binary = config.verify.redis_server
    try:
        _preflight(target, endpoint.cfg, binary, selected.manifest.rdb_version)
        if opts.dry_run:
            fetch_and_check(selected, None, identities, ui.progress)
            found = lj.find(config)
            ui.echo(f"would restore backup {selected.manifest.id} into {endpoint.where} "
                    f"by REPLICAOF from a throwaway server on "
                    f"{config.restore.replicaof_announce_host}"
                    + (f"\n  WARNING  {lj.describe(config, *found, env)}" if found else ""))
            return 0
        with backup_lock(Path(config.backup.dir)):
            directory = lj.new_live_dir(config)
            try:
                keys = _restore_in(config, opts, ui, endpoint, target, directory, selected,
                                   identities)
            except BaseException:
                if not (directory / lj.JOURNAL).exists():
                    remove_tree(directory)  # nothing changed: no journal, no snapshot kept
                raise
            lj.finish(directory)
    finally:
        target.close()
    ui.echo(f"restored backup {selected.manifest.id}: {keys} keys (live, by replicaof)")
    return 0


def _restore_in(config: Config, opts: Options, ui: Ui, endpoint: Any, target: redis.Redis,
                directory: Path, selected: Selected, identities: Sequence[Any]) -> int:
    staged = lj.staged_path(directory)
    with atomic_file(staged) as fh:  # 0600: it holds all the data
        fetch_and_check(selected, fh, identities, ui.progress)
    sample = sample_keys(staged, selected.manifest)
    checkpoints.reached("restore-staged")
    if not opts.yes and not ui.confirm(
            f"Replace ALL data in Redis at {endpoint.where} with backup "
            f"{selected.manifest.id}?"):
        raise RestoreError("restore cancelled; nothing was changed")
    with source.redis_errors(endpoint.cfg, True):
        saved = _config(target, "masterauth", "masteruser")
        before = keyspace(target.info("keyspace"))
    _safety_snapshot(endpoint, lj.safety_path(directory))
    log.info("restore_step", what="safety snapshot taken", path=str(lj.safety_path(directory)))
    journal = lj.new_journal(selected.manifest.id, endpoint.where, saved, before)
    try:
        with source.redis_errors(endpoint.cfg, True):
            return _sync_from(config, target, staged, journal, directory,
                              (selected.manifest, sample))
    except Unreachable as exc:
        lj.finish(directory)
        raise RestoreError(str(exc)) from None
    except BackupdError as exc:
        log.error("restore_failed_rolling_back", error=str(exc))
        try:
            with source.redis_errors(endpoint.cfg, True):
                _sync_from(config, target, lj.safety_path(directory), journal, directory, None)
        except BackupdError as again:
            raise RestoreError(f"{exc}; the rollback from the safety snapshot failed too: "
                               f"{again}. The safety snapshot is kept in {directory}: fix the "
                               "cause and run `backupd restore --rollback`") from None
        lj.finish(directory)
        raise RestoreError(f"{exc}; rolled back: the target has its previous data "
                           "again") from None


def rollback_live(config: Config, opts: Options, ui: Ui,
                  env: Mapping[str, str] | None = None) -> int:
    """`backupd restore --rollback` after an interrupted live restore: the safety snapshot
    goes back by the same live path, and the target's own masterauth/masteruser with it."""
    require_confirmation_possible(opts.yes, False, ui)
    with backup_lock(Path(config.backup.dir)):
        found = lj.find(config)
        if found is None:
            raise RestoreError("nothing to roll back: no interrupted live restore")
        directory, journal = found
        question = (f"Put back Redis's data from before the live restore of backup "
                    f"{journal.backup_id} ({journal.started_at}) from the safety snapshot "
                    f"{lj.safety_path(directory)}? The current data of Redis is discarded.")
        if not opts.yes and not ui.confirm(question):
            raise RestoreError("rollback cancelled; nothing was changed")
        endpoint = discovery.resolve(config.redis, env, for_restore=True)
        target = source.connect_endpoint(endpoint)
        try:
            with source.redis_errors(endpoint.cfg, True):
                keys = _sync_from(config, target, lj.safety_path(directory), journal,
                                  directory, None)
        finally:
            target.close()
        lj.finish(directory)
    ui.echo(f"rolled back the live restore of backup {journal.backup_id}: Redis at "
            f"{journal.target} holds its previous data again ({keys} keys), is a master, and "
            "has its own masterauth back.")
    return 0


def _preflight(target: redis.Redis, cfg: Any, binary: str, rdb_version: int) -> None:
    """Refuse, before anything changes: cluster mode, a replica, and a throwaway server
    whose RDB the target cannot load (newer than the target)."""
    with source.redis_errors(cfg, True):
        info: dict[str, Any] = target.info("everything")
    if int(info.get("cluster_enabled", 0)):
        raise RestoreError("the target runs in cluster mode, where REPLICAOF is not allowed: "
                           "restore.method = \"replicaof\" cannot restore it")
    if info.get("role") != "master":
        raise RestoreError("the target is a replica: restore its master instead")
    throwaway = server_identity(binary)
    production = servers.from_info(info)
    if not throwaway.can_load(rdb_version):
        raise RestoreError(f"{binary} is {throwaway.label} and cannot load this backup's RDB "
                           f"(version {rdb_version}); set verify.redis_server")
    if not production.can_load(throwaway.rdb_version):
        raise RestoreError(f"{binary} is {throwaway.label}, newer than the target "
                           f"({production.label}): the target could not load its RDB; point "
                           "verify.redis_server at the target's own version")


def _safety_snapshot(endpoint: Any, dest: Path) -> None:
    stream = ReplicationStream(endpoint)
    try:
        with atomic_file(dest) as fh:  # 0600: it holds all the data
            while chunk := stream.read(CHUNK):
                write_all(fh, chunk)
    finally:
        stream.close()


def _sync_from(config: Config, target: redis.Redis, rdb: Path, journal: lj.LiveJournal,
               directory: Path, backup: tuple[Manifest, Sequence[SampledKey]] | None) -> int:
    """Make the target a replica of a throwaway server on `rdb` until it holds the same
    data, then a master again with its own masterauth/masteruser; the key count. `backup`:
    the data is checked against it (a restore), else against the throwaway (a rollback)."""
    rcfg = config.restore
    listen = Listen(rcfg.replicaof_announce_host, _free_port(rcfg.replicaof_announce_host),
                    secrets.token_hex(24))
    saved = {"masterauth": journal.masterauth, "masteruser": journal.masteruser}
    with throwaway_server(config.verify.redis_server, rdb, rcfg.start_timeout, listen) as tmp:
        expected = keyspace(tmp.info("keyspace"))
        journal.state = lj.REPLICATING if backup else lj.ROLLING_BACK
        journal.throwaway = f"{listen.host}:{listen.port}"
        journal.save(directory)
        try:
            target.config_set("masteruser", "")
            target.config_set("masterauth", listen.password)
            target.replicaof(listen.host, listen.port)
            checkpoints.reached("restore-replicaof")
            _wait_synced(target, tmp, rcfg.start_timeout, listen)
            checkpoints.reached("restore-live-synced")
        finally:
            _release(target, saved)
    checkpoints.reached("restore-live-released")
    info = target.info("everything")
    if backup is None:
        if keyspace(info) != expected:
            raise RestoreError(f"the target has {keyspace(info)} keys per db after the sync; "
                               f"the safety snapshot has {expected}")
    else:
        check_keyspace(info, backup[0])
        log.info("key_sample_checked", keys=check_sample(target, backup[1]))
    return sum(keyspace(info).values())


def _wait_synced(target: redis.Redis, tmp: redis.Redis, timeout: float,
                 listen: Listen) -> None:
    started = time.monotonic()
    reach_by = started + min(timeout, REACH_TIMEOUT)
    tried = False

    def synced() -> bool:
        nonlocal tried
        try:
            offset = int(tmp.info("replication").get("master_repl_offset", 0))
            tried = tried or int(tmp.info("stats").get("sync_full", 0)) > 0
        except redis.exceptions.RedisError as exc:
            raise RestoreError(f"the throwaway server stopped answering during the sync "
                               f"({exc})") from None
        try:
            info = target.info("replication")
        except redis.exceptions.BusyLoadingError:
            tried = True
            return False  # the target is loading what it received
        if (info.get("master_link_status") == "up"
                and not int(info.get("master_sync_in_progress", 0))
                and int(info.get("slave_repl_offset", -1)) >= offset):
            return True
        if not tried and time.monotonic() >= reach_by:
            raise Unreachable(
                f"the target did not connect to the throwaway server at {listen.host}:"
                f"{listen.port} within {reach_by - started:g}s: it cannot reach that address. "
                "Set restore.replicaof_announce_host to an address of this host that the "
                "target can reach. Nothing was changed: the target is a master again, with "
                "its data and its own masterauth")
        return False

    poll_until(synced, started + timeout, lambda: RestoreError(
        f"the target did not sync from the throwaway server at {listen.host}:{listen.port} "
        f"within {timeout:g}s (restore.start_timeout)"), first=POLL, longest=POLL)


def _release(target: redis.Redis, saved: dict[str, str]) -> None:
    """REPLICAOF NO ONE and the target's own masterauth/masteruser back, whatever happened."""
    try:
        target.replicaof("NO", "ONE")
    finally:
        for key, value in saved.items():
            target.config_set(key, value)


def _config(target: redis.Redis, *keys: str) -> dict[str, str]:
    return {key: str(target.config_get(key).get(key, "")) for key in keys}


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
