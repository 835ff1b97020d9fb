"""The Redis side: connecting, the snapshot handshake, locating the dump file, server facts.

The handshake (shared/notes/redis.md, "A handshake that holds") trusts nothing that a naive wait
trusts: LASTSAVE has one-second resolution, `rdb_bgsave_in_progress:0` with status ok is also what
a save killed by FLUSHALL looks like, and a sidecar with the wrong volume mounted sees a stale
file. Success needs a new save counted by `rdb_saves`, status ok, a save time at or after the
request, and a dump file whose inode changed; the file is then opened once and read from that
descriptor only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from backupd.config import RedisConfig, redis_password
from backupd.errors import (
    ConfigError,
    InsufficientSpace,
    RedisAuthError,
    RedisUnavailable,
    SnapshotError,
)
from backupd.manifest import RedisFacts

log = structlog.get_logger("backupd.source")

POLL_MIN, POLL_MAX = 0.05, 0.2  # INFO persistence is cheap; a late poll delays every backup
SPACE_MARGIN = 16 * 1024 * 1024


def connect(cfg: RedisConfig, env: Mapping[str, str] | None = None) -> redis.Redis:
    """A checked connection (PING answered); errors say what to fix, never the password."""
    password = redis_password(cfg, env)
    client = redis.Redis(
        host=cfg.host, port=cfg.port, username=cfg.username or None, password=password,
        ssl=cfg.tls, socket_connect_timeout=cfg.connect_timeout,
        socket_timeout=max(cfg.connect_timeout, 30.0), decode_responses=True, protocol=2,
        retry=Retry(NoBackoff(), 0),  # the default retries auth errors (ConnectionError subclasses)
    )
    with redis_errors(cfg, password is not None):
        client.ping()
    return client


@contextlib.contextmanager
def redis_errors(cfg: RedisConfig, has_password: bool) -> Iterator[None]:
    """Translate redis-py exceptions into backupd errors with an operator-facing message."""
    where = f"Redis at {cfg.host}:{cfg.port}"
    try:
        yield
    except redis.exceptions.AuthenticationError as exc:
        if not has_password and ("required" in str(exc).lower() or "noauth" in str(exc).lower()):
            source = (f"key 'redis.password_file' ({cfg.password_file})" if cfg.password_file
                      else f"environment variable {cfg.password_env} (key 'redis.password_env')")
            raise ConfigError(f"{where} requires a password, but {source} is not set") from None
        user = cfg.username or "default"
        raise RedisAuthError(f"{where} rejected the password for user {user!r} "
                             "(wrong password, or the ACL user is disabled)") from None
    except redis.exceptions.NoPermissionError as exc:
        raise RedisAuthError(f"{where}: the ACL user lacks a permission backupd needs: {exc}. "
                             "Grant: +ping +info +bgsave +lastsave +time +config|get") from None
    except redis.exceptions.TimeoutError:
        raise RedisUnavailable(f"{where} did not answer in time "
                               f"(connect_timeout {cfg.connect_timeout:g}s)") from None
    except redis.exceptions.ConnectionError as exc:
        raise RedisUnavailable(f"cannot connect to {where}: {exc}") from None
    except redis.exceptions.ResponseError as exc:
        text = str(exc)
        if "without any password configured" in text:
            raise RedisAuthError(f"{where}: a password is configured for backupd, but Redis "
                                 "has none for this user") from None
        raise SnapshotError(f"{where} answered with an error: {text}") from None


@dataclass(frozen=True)
class ServerInfo:
    facts: RedisFacts
    keys_per_db: dict[str, int]
    persistence: dict[str, Any] = field(repr=False)

    @property
    def keys(self) -> int:
        return sum(self.keys_per_db.values())


def server_info(client: redis.Redis, cfg: RedisConfig) -> ServerInfo:
    info: dict[str, Any] = client.info("everything")
    keys = {db: int(stats.get("keys", 0)) for db, stats in info.items()
            if db.startswith("db") and db[2:].isdigit() and isinstance(stats, dict)}
    facts = RedisFacts(
        version=str(info.get("redis_version", "")), host=cfg.host, port=cfg.port,
        role=str(info.get("role", "")), run_id=str(info.get("run_id", "")),
        aof_enabled=bool(int(info.get("aof_enabled", 0))),
    )
    return ServerInfo(facts, keys, info)


def locate_dump(client: redis.Redis, cfg: RedisConfig) -> Path:
    """The dump file as seen from this container: `dbfilename` inside `redis.data_dir`."""
    try:
        name = client.config_get("dbfilename").get("dbfilename") or "dump.rdb"
    except (redis.exceptions.NoPermissionError, redis.exceptions.ResponseError):
        log.warning("config_get_denied", fallback="dump.rdb",
                    hint="grant +config|get to read dbfilename; assuming dump.rdb")
        name = "dump.rdb"
    if "/" in name or name in ("", ".", ".."):
        raise SnapshotError(f"Redis reports an unusable dbfilename {name!r}")
    return Path(cfg.data_dir) / name


def check_space(path: Path, needed: int, what: str) -> None:
    """Refuse before BGSAVE when a copy cannot fit: a failed save makes Redis refuse writes."""
    try:
        free = shutil.disk_usage(path).free
    except OSError as exc:
        raise SnapshotError(f"cannot check free space of {path}: {exc.strerror}") from None
    if free < needed + SPACE_MARGIN:
        raise InsufficientSpace(
            f"not enough free space in {path} for {what}: {free // 2**20} MiB free, about "
            f"{(needed + SPACE_MARGIN) // 2**20} MiB needed"
        )


def _persistence(client: redis.Redis) -> dict[str, Any]:
    return client.info("persistence")


def _poll(deadline: float, what: str, done: Callable[[], bool]) -> None:
    delay = POLL_MIN
    while not done():
        if time.monotonic() >= deadline:
            raise SnapshotError(f"timed out waiting for {what} (redis.save_timeout)")
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, POLL_MAX)


def _request_save(client: redis.Redis, deadline: float) -> str:
    """Send BGSAVE SCHEDULE until Redis accepts it; returns Redis's reply."""
    client.set_response_callback("BGSAVE", lambda response, **_: response)
    while True:
        try:
            return str(client.execute_command("BGSAVE", "SCHEDULE"))  # type: ignore[no-untyped-call]
        except redis.exceptions.NoPermissionError:
            raise  # redis_errors() names the missing ACL permission
        except redis.exceptions.BusyLoadingError:
            _poll(deadline, "Redis to finish loading",
                  lambda: not int(_persistence(client).get("loading", 0)))
        except redis.exceptions.ResponseError as exc:
            text = str(exc)
            if "already in progress" not in text:
                raise SnapshotError(
                    f"Redis refused BGSAVE: {text or 'ERR'} (a bare ERR means fork() failed: "
                    "check memory and vm.overcommit_memory; see the Redis log)") from None
            log.info("bgsave_in_progress", action="waiting for the running save, then asking again")
            _poll(deadline, "the running save to finish",
                  lambda: not int(_persistence(client).get("rdb_bgsave_in_progress", 0)))


@dataclass(frozen=True)
class Snapshot:
    file: IO[bytes]  # opened once, after the save: read only from this
    path: Path
    size: int
    server: ServerInfo
    save_reply: str


@contextlib.contextmanager
def snapshot(client: redis.Redis, cfg: RedisConfig, backup_dir: Path) -> Iterator[Snapshot]:
    """Trigger a fresh snapshot and yield it opened; see the module docstring."""
    with redis_errors(cfg, True):
        dump = locate_dump(client, cfg)
        before = server_info(client, cfg)
        estimate = _size_or(dump, int(before.persistence.get("used_memory_dataset", 0)))
        check_space(Path(cfg.data_dir), estimate, "Redis's temporary snapshot file")
        check_space(backup_dir, estimate, "the backup")
        with _pin(dump) as inode_before:
            t_req = int(client.time()[0])
            saves_before = int(_persistence(client).get("rdb_saves", -1))
            deadline = time.monotonic() + cfg.save_timeout
            reply = _request_save(client, deadline)
            at_save = server_info(client, cfg)
            log.info("bgsave_requested", reply=reply, keys=at_save.keys)
            _wait_for_save(client, deadline, saves_before, before.facts.run_id)
            state = _persistence(client)
        if state.get("rdb_last_bgsave_status") != "ok":
            raise SnapshotError(
                "the snapshot failed: rdb_last_bgsave_status is "
                f"{state.get('rdb_last_bgsave_status')!r}; see the Redis log (often a full or "
                "read-only data volume). Until a save succeeds Redis may refuse writes (MISCONF).")
        if int(state.get("rdb_last_save_time", 0)) < t_req:
            raise SnapshotError("the save ended without writing a new file (killed by FLUSHALL "
                                "or SHUTDOWN?); no backup was made of the old file")
    try:
        fh = open(dump, "rb")  # noqa: SIM115 - handed to the caller, closed below
    except FileNotFoundError:
        raise SnapshotError(f"Redis saved, but {dump} does not exist: is redis.data_dir "
                            "the Redis data volume?") from None
    with fh:
        stat = os.fstat(fh.fileno())
        if inode_before is not None and stat.st_ino == inode_before:
            raise SnapshotError(
                f"the file in data_dir ({dump}) did not change after a successful save: is "
                "redis.data_dir the Redis data volume? (or the save was killed by FLUSHALL or "
                "SHUTDOWN); no backup was made of the old file")
        yield Snapshot(fh, dump, stat.st_size, at_save, reply)


def _wait_for_save(client: redis.Redis, deadline: float, saves_before: int,
                   run_id: str = "") -> None:
    if saves_before < 0:  # Redis < 7.0 has no rdb_saves: wait for the child to go away
        _poll(deadline, "the snapshot", lambda: _same_server(client, run_id) and not int(
            _persistence(client).get("rdb_bgsave_in_progress", 0)))
        return

    def finished() -> bool:
        _same_server(client, run_id)
        state = _persistence(client)
        return (int(state.get("rdb_saves", 0)) > saves_before
                and not int(state.get("rdb_bgsave_in_progress", 0)))

    _poll(deadline, "the snapshot", finished)


def _same_server(client: redis.Redis, run_id: str) -> bool:
    """SnapshotError when Redis restarted since the save was requested: redis-py reconnects
    silently, and the new process would never count our save (its rdb_saves starts at 0)."""
    if run_id and str(client.info("server").get("run_id", "")) != run_id:
        raise SnapshotError("Redis restarted during the snapshot (its run_id changed): the "
                            "save was lost; no backup was made, the next run takes a new one")
    return True


@contextlib.contextmanager
def _pin(path: Path) -> Iterator[int | None]:
    """Hold the old dump file open during the save so its inode number cannot be reused."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - kept open for the duration of the save
    except FileNotFoundError:
        yield None
        return
    with fh:
        yield os.fstat(fh.fileno()).st_ino


def _size_or(path: Path, fallback: int) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return fallback
