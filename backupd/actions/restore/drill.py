"""`backupd verify --drill`: load a backup into a throwaway redis-server and check it."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from backupd import servers, source
from backupd.actions.restore.staging import Selected, fetch_and_check, select_backup
from backupd.actions.restore.swap import check_loaded
from backupd.config import Config
from backupd.errors import (
    EXIT_FAILED,
    EXIT_INTEGRITY,
    EXIT_OK,
    BackupdError,
    OperationError,
    RestoreError,
)
from backupd.manifest import Manifest
from backupd.storage.base import Storage


@dataclass(frozen=True)
class DrillResult:
    ok: bool
    exit_code: int
    message: str


def drill(config: Config, storage: Storage, manifest: Manifest, identities: Sequence[Any],
          scratch_parent: Path | None = None) -> DrillResult:
    """Load the backup into a throwaway redis-server and compare its key count."""
    from backupd.controllers.throwaway import server_identity

    binary = config.verify.redis_server
    server = server_identity(binary)
    if not server.can_load(manifest.rdb_version):
        why = ("older than" if server.kind == manifest.redis.server
               and manifest.rdb_version > server.rdb_version else "unable to load")
        writers = servers.rdb_writer(manifest.rdb_version)
        return DrillResult(False, EXIT_FAILED, (
            f"cannot drill: {binary} is {server.label}, {why} this backup's RDB "
            f"(version {manifest.rdb_version}, {writers}; written by "
            f"{manifest.redis.identity.label}; {server.label} loads {server.loads}). Point "
            "verify.redis_server at a server that loads it (the one in production, or newer)."))
    if manifest.cluster is not None:
        from backupd.actions.restore.cluster_drill import drill_shards

        return drill_shards(config, storage, manifest, identities, scratch_parent, server)
    with drilled(config, storage, manifest, identities, scratch_parent) as (client, started):
        info: dict[str, Any] = client.info("everything")
    try:
        loaded = check_loaded(info, manifest.keys, started, manifest.keys_exact)
    except RestoreError as exc:
        return DrillResult(False, EXIT_INTEGRITY, f"drill failed: {exc}")
    count = loaded.loaded if loaded.loaded is not None else loaded.keys
    return DrillResult(True, EXIT_OK, (
        f"drill ok: {server.label} loaded {count} keys ({loaded.expired} already "
        f"expired) in {loaded.seconds:g}s; the manifest says {manifest.keys}"))


@contextlib.contextmanager
def drilled(config: Config, storage: Storage, manifest: Manifest, identities: Sequence[Any],
            scratch_parent: Path | None) -> Iterator[tuple[redis.Redis, float]]:
    """The backup (one artifact: a single-server backup or a cluster shard's view) fetched,
    checked and loaded into a throwaway server: its client, and when loading started."""
    from backupd.controllers.throwaway import throwaway_server

    with tempfile.TemporaryDirectory(prefix=".backupd-drill-", dir=scratch_parent) as tmp:
        rdb = Path(tmp) / "dump.rdb"
        with open(rdb, "wb") as fh:
            fetch_and_check(Selected(storage, manifest, (storage.name,)), fh, identities,
                            sys.stderr.isatty())
        started = time.monotonic()
        with throwaway_server(config.verify.redis_server, rdb,
                              config.restore.start_timeout) as client:
            yield client, started


class DrillSkipped(Exception):
    """The drill cannot run here for a known, non-alarming reason (logged, not notified)."""


def drill_latest(config: Config) -> str:
    """The daemon's scheduled drill: `verify --drill latest`. Encrypted backups are skipped:
    the sidecar holds only the age recipient, never the identity. Returns the drill's
    message; raises on a failed drill."""
    selected = select_backup(config, "latest", None, None)
    manifest = selected.manifest
    if manifest.encrypted:
        raise DrillSkipped(f"backup {manifest.id} is encrypted and the daemon has no age "
                           "identity; run `backupd verify --drill --identity-file ...` elsewhere")
    scratch = Path(config.backup.dir) if selected.storage.name == "local" else None
    result = drill(config, selected.storage, manifest, [], scratch)
    if not result.ok:
        raise OperationError(f"drill of {manifest.id}: {result.message}")
    return result.message


def drill_server_fits(config: Config) -> tuple[bool, str]:
    """Whether verify.redis_server can load what the production server writes: said at start
    and by `config check`, so a drill server older than production (the image's own 7.0 next
    to redis:7 = 7.4) shows before the first scheduled drill fails."""
    from backupd.controllers.throwaway import server_identity

    binary = config.verify.redis_server
    try:
        drill_server = server_identity(binary)
    except RestoreError as exc:
        return False, f"drill server {binary}: {exc}"
    try:
        if config.redis.cluster.enabled:  # a seed: the nodes run one version
            from backupd.cluster.topology import seed_endpoints

            client = source.connect_endpoint(seed_endpoints(config.redis)[0])
        else:
            client = source.connect(config.redis)
        try:
            with source.redis_errors(config.redis, True):
                production = servers.from_info(client.info("server"))
        finally:
            client.close()
    except BackupdError as exc:
        return False, (f"drill server {binary} is {drill_server.label}; cannot tell whether it "
                       f"loads production's RDB: {exc}")
    writes = production.rdb_version
    if drill_server.can_load(writes):
        return True, (f"drill server {binary} is {drill_server.label}: it loads what "
                      f"{production.label} writes (RDB {writes})")
    return False, (f"drill server {binary} is {drill_server.label}, which cannot load what "
                   f"{production.label} writes (RDB {writes}; it loads {drill_server.loads}): "
                   "verify --drill fails and verify --deep skips its check. Point "
                   "verify.redis_server/redis_check_rdb at the production server's binaries "
                   "(the image: build it with REDIS_IMAGE set to the image production runs)")
