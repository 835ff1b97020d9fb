"""A backup opened in a throwaway redis-server (the drill's, on a unix socket): what the
selective restore, `diff` and `inspect` read keys from, never near production."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from backupd import servers
from backupd.actions.restore.staging import Selected, fetch_and_check
from backupd.config import Config
from backupd.errors import RestoreError
from backupd.servers import ServerId


@dataclass(frozen=True)
class Loaded:
    selected: Selected
    client: redis.Redis  # decode_responses=True, db 0
    server: ServerId
    info: dict[str, Any]

    @property
    def expired_at_load(self) -> int:
        """Keys of the backup already expired when the throwaway loaded it (it drops them)."""
        return int(self.info.get("rdb_last_load_keys_expired", 0))


def scratch_dir(config: Config) -> Path | None:
    backup_dir = Path(config.backup.dir)
    return backup_dir if backup_dir.is_dir() else None


def throwaway_identity(config: Config, rdb_version: int) -> ServerId:
    """verify.redis_server, refused (naming both) when it cannot load the backup's RDB."""
    from backupd.controllers.throwaway import server_identity

    binary = config.verify.redis_server
    server = server_identity(binary)
    if not server.can_load(rdb_version):
        raise RestoreError(
            f"{binary} is {server.label}, which cannot load this backup's RDB (version "
            f"{rdb_version}, {servers.rdb_writer(rdb_version)}; {server.label} loads "
            f"{server.loads}): point verify.redis_server at a server that loads it")
    return server


@contextlib.contextmanager
def open_backup(config: Config, selected: Selected, identities: Sequence[Any],
                progress: bool) -> Iterator[Loaded]:
    """Fetch and check the backup into a private temp dir, load it into a throwaway server,
    yield it; the server and the copy are gone afterwards."""
    from backupd.controllers.throwaway import throwaway_server

    server = throwaway_identity(config, selected.manifest.rdb_version)
    with tempfile.TemporaryDirectory(prefix=".backupd-keys-", dir=scratch_dir(config)) as tmp:
        rdb = Path(tmp) / "dump.rdb"
        with open(rdb, "wb") as fh:
            fetch_and_check(selected, fh, identities, progress)
        with throwaway_server(config.verify.redis_server, rdb,
                              config.restore.start_timeout) as client:
            yield Loaded(selected, client, server, client.info("everything"))
