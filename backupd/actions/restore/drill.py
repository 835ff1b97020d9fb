"""`backupd verify --drill`: load a backup into a throwaway redis-server and check it."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backupd.actions.restore.staging import Selected, fetch_and_check
from backupd.actions.restore.swap import check_loaded
from backupd.config import Config
from backupd.errors import (
    EXIT_FAILED,
    EXIT_INTEGRITY,
    EXIT_OK,
    RestoreError,
)
from backupd.manifest import Manifest
from backupd.servers import rdb_writer
from backupd.storage.base import Storage


@dataclass(frozen=True)
class DrillResult:
    ok: bool
    exit_code: int
    message: str


def drill(config: Config, storage: Storage, manifest: Manifest, identities: Sequence[Any],
          scratch_parent: Path | None = None) -> DrillResult:
    """Load the backup into a throwaway redis-server and compare its key count."""
    from backupd.controllers.throwaway import server_identity, throwaway_server

    binary = config.verify.redis_server
    server = server_identity(binary)
    if not server.can_load(manifest.rdb_version):
        why = ("older than" if manifest.rdb_version > server.rdb_version
               else "unable to load")
        return DrillResult(False, EXIT_FAILED, (
            f"cannot drill: {binary} is {server.label}, {why} this backup's RDB "
            f"(version {manifest.rdb_version}, {rdb_writer(manifest.rdb_version)}; written by "
            f"{manifest.redis.identity.label}; {server.label} loads {server.loads}). Point "
            "verify.redis_server at a server that loads it (the one in production, or newer)."))
    with tempfile.TemporaryDirectory(prefix=".backupd-drill-", dir=scratch_parent) as tmp:
        rdb = Path(tmp) / "dump.rdb"
        with open(rdb, "wb") as fh:
            fetch_and_check(Selected(storage, manifest, (storage.name,)), fh, identities,
                            sys.stderr.isatty())
        started = time.monotonic()
        with throwaway_server(binary, rdb, config.restore.start_timeout) as client:
            info: dict[str, Any] = client.info("everything")
        try:
            loaded = check_loaded(info, manifest.keys, started, manifest.keys_exact)
        except RestoreError as exc:
            return DrillResult(False, EXIT_INTEGRITY, f"drill failed: {exc}")
    count = loaded.loaded if loaded.loaded is not None else loaded.keys
    return DrillResult(True, EXIT_OK, (
        f"drill ok: {server.label} loaded {count} keys ({loaded.expired} already "
        f"expired) in {loaded.seconds:g}s; the manifest says {manifest.keys}"))
