"""The live restore's journal: a `replicaof` restore killed half-way leaves the target a
read-only replica of a throwaway server that died with backupd, with its masterauth changed.

Before the REPLICAOF, `<backup.dir>/.backupd-live-restore/` (0700) holds the safety snapshot
of the target (`safety/dump.rdb`, 0600) and `restore.json` (0600, atomic): the target, the
address the target is about to replicate from, and the target's own masterauth/masteruser. A
finished restore removes the directory; one left behind is an interrupted live restore,
reported by `backup`/`run`, refused by `restore`, and undone by `restore --rollback`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
import structlog

from backupd import checkpoints, discovery, source
from backupd import manifest as mf
from backupd.actions.restore.staging import remove_tree
from backupd.config import Config
from backupd.errors import BackupdError, RestoreError
from backupd.fsio import write_atomic

log = structlog.get_logger("backupd.restore.live")

LIVE_DIR = ".backupd-live-restore"
JOURNAL = "restore.json"
JOURNAL_FORMAT = 1
# States: the target is (about to be) a replica of `throwaway` on the backup, or on the
# safety snapshot (a rollback).
REPLICATING, ROLLING_BACK = "replicating", "rolling-back"


@dataclass
class LiveJournal:
    """One live restore in progress; the basis of `--rollback`."""

    backup_id: str
    started_at: str
    target: str
    state: str
    throwaway: str  # host:port the target replicates from in this state
    masteruser: str
    masterauth: str = field(repr=False)
    keys_per_db_before: dict[str, int] = field(default_factory=dict)
    pid: int = 0
    format: int = JOURNAL_FORMAT

    def save(self, live_dir: Path) -> None:
        write_atomic(live_dir / JOURNAL, (json.dumps(asdict(self), indent=2) + "\n").encode())
        checkpoints.reached(f"restore-live-{self.state}")

    @classmethod
    def load(cls, live_dir: Path) -> LiveJournal:
        try:
            journal = cls(**json.loads((live_dir / JOURNAL).read_bytes()))
        except (OSError, ValueError, TypeError) as exc:
            raise RestoreError(f"cannot read the live restore journal in {live_dir}: "
                               f"{exc}") from None
        if not all(isinstance(v, str) for v in (journal.throwaway, journal.masterauth,
                                                journal.masteruser, journal.state)):
            raise RestoreError(f"the live restore journal in {live_dir} is malformed")
        return journal


def live_dir(config: Config) -> Path:
    return Path(config.backup.dir) / LIVE_DIR


def safety_path(directory: Path) -> Path:
    return directory / "safety" / "dump.rdb"


def staged_path(directory: Path) -> Path:
    return directory / "staged" / "dump.rdb"


def new_live_dir(config: Config) -> Path:
    """A fresh directory for a live restore; one that has no journal is what a restore killed
    before its REPLICAOF left (nothing changed then): removed."""
    directory = live_dir(config)
    if (directory / JOURNAL).is_file():
        raise RestoreError(describe(config, directory, LiveJournal.load(directory), None))
    remove_tree(directory)
    directory.mkdir(mode=0o700)
    for sub in ("staged", "safety"):
        (directory / sub).mkdir(mode=0o700)
    return directory


def finish(directory: Path) -> None:
    """The restore (or its rollback) is done: the journal goes first, then the copies."""
    (directory / JOURNAL).unlink(missing_ok=True)
    remove_tree(directory)


def find(config: Config) -> tuple[Path, LiveJournal] | None:
    directory = live_dir(config)
    if not (directory / JOURNAL).is_file():
        return None
    return directory, LiveJournal.load(directory)


def replica_of(target: redis.Redis) -> str:
    """'host:port' of the target's master, '' when it is a master."""
    info = target.info("replication")
    if info.get("role") == "master":
        return ""
    return f"{info.get('master_host', '?')}:{info.get('master_port', '?')}"


def describe(config: Config, directory: Path, journal: LiveJournal,
             env: Mapping[str, str] | None) -> str:
    """What an interrupted live restore left, checked on the target itself."""
    now = _target_state(config, journal, env)
    return (f"an interrupted live restore (restore.method = \"replicaof\") of backup "
            f"{journal.backup_id} (started {journal.started_at}, stopped at step "
            f"'{journal.state}'): {now} Redis's data from before the restore is in the safety "
            f"snapshot {safety_path(directory)}. To put it back (live) and restore masterauth: "
            "`backupd restore --rollback`.")


def _target_state(config: Config, journal: LiveJournal, env: Mapping[str, str] | None) -> str:
    try:
        endpoint = discovery.resolve(config.redis, env)
        target = source.connect_endpoint(endpoint)
        try:
            with source.redis_errors(endpoint.cfg, endpoint.password is not None):
                master = replica_of(target)
        finally:
            target.close()
    except (BackupdError, redis.exceptions.RedisError) as exc:
        return f"Redis at {journal.target} could not be checked ({exc})."
    if master == journal.throwaway:
        return (f"Redis at {journal.target} is still a READ-ONLY replica of the throwaway "
                f"server at {master}, which died with backupd, and its masterauth is the "
                "throwaway's.")
    if master:
        return f"Redis at {journal.target} is a replica of {master}."
    return (f"Redis at {journal.target} is a master again, holding either its previous data "
            "or the backup.")


def report(config: Config) -> list[str]:
    """For `backupd run` and `backupd backup`: the interrupted live restore, if any."""
    found = find(config)
    if found is None:
        return []
    message = describe(config, *found, None)
    log.error("interrupted_restore", message=message)
    return [message]


def new_journal(backup_id: str, target: str, saved: Mapping[str, str],
                keys_per_db: Mapping[str, int]) -> LiveJournal:
    return LiveJournal(backup_id=backup_id, started_at=mf.format_time(mf.now_utc()),
                       target=target, state=REPLICATING, throwaway="",
                       masteruser=saved.get("masteruser", ""),
                       masterauth=saved.get("masterauth", ""),
                       keys_per_db_before=dict(keys_per_db), pid=os.getpid())
