"""`restore.method = "replicaof"`: a live restore, with no stop/start and no file access.

A throwaway redis-server (the drill's machinery) loads the staged backup and listens on
`restore.replicaof_announce_host` (a free port, a random password); the target is made its
replica (`masterauth` set for the sync and put back afterwards), the full sync replaces all of
its data, the key counts are compared, and `REPLICAOF NO ONE` makes it a master again. During
the sync clients of the target get `-LOADING` (while it loads) and `-READONLY` for writes.
Before anything changes, the target's own data is read over the replication protocol into a
safety snapshot; a failure after the REPLICAOF rolls back by the same path from it.
"""

from __future__ import annotations

import secrets
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis
import structlog

from backupd import checkpoints, discovery, servers, source
from backupd.actions.restore.options import Options, Ui, require_confirmation_possible
from backupd.actions.restore.staging import fetch_and_check, identities_for, select_backup
from backupd.config import Config
from backupd.controllers.throwaway import Listen, server_identity, throwaway_server
from backupd.errors import BackupdError, RestoreError
from backupd.fsio import atomic_file, write_all
from backupd.polling import poll_until
from backupd.replication import ReplicationStream
from backupd.streams import CHUNK

log = structlog.get_logger("backupd.restore.live")

POLL = 0.05


def restore_live(config: Config, opts: Options, ui: Ui,
                 env: Mapping[str, str] | None = None) -> int:
    """Run `backupd restore` with the replicaof method; 0, or raises BackupdError."""
    require_confirmation_possible(opts.yes, opts.dry_run, ui)
    selected = select_backup(config, opts.selector, opts.before, opts.source, env)
    identities = identities_for(selected.manifest, opts.identity_file)
    endpoint = discovery.resolve(config.redis, env)
    target = source.connect_endpoint(endpoint)
    try:
        binary = config.verify.redis_server
        _preflight(target, endpoint.cfg, binary, selected.manifest.rdb_version)
        with tempfile.TemporaryDirectory(prefix=".backupd-live-", dir=config.backup.dir) as tmp:
            staged, safety = Path(tmp) / "staged" / "dump.rdb", Path(tmp) / "safety" / "dump.rdb"
            staged.parent.mkdir(mode=0o700)
            safety.parent.mkdir(mode=0o700)
            with atomic_file(staged) as fh:  # 0600: it holds all the data
                fetch_and_check(selected, fh, identities, ui.progress)
            if opts.dry_run:
                ui.echo(f"would restore backup {selected.manifest.id} into {endpoint.where} "
                        f"by REPLICAOF from a throwaway server on "
                        f"{config.restore.replicaof_announce_host}")
                return 0
            if not opts.yes and not ui.confirm(
                    f"Replace ALL data in Redis at {endpoint.where} with backup "
                    f"{selected.manifest.id}?"):
                raise RestoreError("restore cancelled; nothing was changed")
            _safety_snapshot(endpoint, safety)
            log.info("restore_step", what="safety snapshot taken", path=str(safety))
            try:
                with source.redis_errors(endpoint.cfg, True):
                    keys = _sync_from(config, target, binary, staged)
            except BackupdError as exc:
                log.error("restore_failed_rolling_back", error=str(exc))
                try:
                    with source.redis_errors(endpoint.cfg, True):
                        _sync_from(config, target, binary, safety)
                except BackupdError as again:
                    raise RestoreError(f"{exc}; the rollback from the safety snapshot failed "
                                       f"too: {again}") from None
                raise RestoreError(f"{exc}; rolled back: the target has its previous data "
                                   "again") from None
    finally:
        target.close()
    ui.echo(f"restored backup {selected.manifest.id}: {keys} keys (live, by replicaof)")
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


def _sync_from(config: Config, target: redis.Redis, binary: str, rdb: Path) -> int:
    """Make the target a replica of a throwaway server on `rdb` until it holds the same
    keys, then a master again; the key count."""
    rcfg = config.restore
    listen = Listen(rcfg.replicaof_announce_host, _free_port(rcfg.replicaof_announce_host),
                    secrets.token_hex(24))
    with throwaway_server(binary, rdb, rcfg.start_timeout, listen) as tmp:
        expected = _keys(tmp.info("keyspace"))
        saved = _config(target, "masterauth", "masteruser")
        try:
            target.config_set("masteruser", "")
            target.config_set("masterauth", listen.password)
            target.replicaof(listen.host, listen.port)
            checkpoints.reached("restore-replicaof")
            _wait_synced(target, tmp, rcfg.start_timeout, listen)
        finally:
            _release(target, saved)
    keys = _keys(target.info("keyspace"))
    if keys != expected:
        raise RestoreError(f"the target has {keys} keys after the sync; the backup has "
                           f"{expected}")
    return keys


def _wait_synced(target: redis.Redis, tmp: redis.Redis, timeout: float,
                 listen: Listen) -> None:
    def synced() -> bool:
        try:
            offset = int(tmp.info("replication").get("master_repl_offset", 0))
        except redis.exceptions.RedisError as exc:
            raise RestoreError(f"the throwaway server stopped answering during the sync "
                               f"({exc})") from None
        try:
            info = target.info("replication")
        except redis.exceptions.BusyLoadingError:
            return False  # the target is loading what it received
        return (info.get("master_link_status") == "up"
                and not int(info.get("master_sync_in_progress", 0))
                and int(info.get("slave_repl_offset", -1)) >= offset)

    poll_until(synced, time.monotonic() + timeout, lambda: RestoreError(
        f"the target did not sync from the throwaway server at {listen.host}:{listen.port} "
        f"within {timeout:g}s (restore.start_timeout): can it reach that address "
        "(restore.replicaof_announce_host)?"), first=POLL, longest=POLL)


def _release(target: redis.Redis, saved: dict[str, str]) -> None:
    """REPLICAOF NO ONE and the target's own masterauth/masteruser back, whatever happened."""
    try:
        target.replicaof("NO", "ONE")
    finally:
        for key, value in saved.items():
            target.config_set(key, value)


def _config(target: redis.Redis, *keys: str) -> dict[str, str]:
    return {key: str(target.config_get(key).get(key, "")) for key in keys}


def _keys(keyspace: Mapping[str, Any]) -> int:
    return sum(int(v.get("keys", 0)) for k, v in keyspace.items()
               if k.startswith("db") and isinstance(v, dict))


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])

