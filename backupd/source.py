"""The Redis side: connecting, the snapshot handshake, locating the dump file, server facts.

The handshake trusts nothing that a naive wait trusts (each trap reproduced on a real Redis):
LASTSAVE has one-second resolution, `rdb_bgsave_in_progress:0` with status ok is also what a
save killed by FLUSHALL looks like, and a sidecar with the wrong volume mounted sees a stale
file. Success needs a new save counted by `rdb_saves`, status ok, a save time at or after the
request, and a dump file whose inode changed; the file is then opened once and read from that
descriptor only. `backupd backup` does not wait for the save to read it: `follow_snapshot`
streams Redis's temp-<pid>.rdb while the save child writes it (LiveSnapshot), so checking,
compressing and uploading overlap the save; the stream only ends once the same handshake has
confirmed the save and the file read is the very file that became the dump.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis
import structlog

from backupd import discovery, servers
from backupd.config import RedisConfig
from backupd.endpoint import Endpoint, at
from backupd.errors import (
    ConfigError,
    InsufficientSpace,
    RedisAuthError,
    RedisLoading,
    RedisUnavailable,
    SnapshotError,
    StaleReplica,
)
from backupd.manifest import RedisFacts
from backupd.polling import poll_until

log = structlog.get_logger("backupd.source")

POLL_MIN, POLL_MAX = 0.05, 0.2  # INFO persistence is cheap; a late poll delays every backup
READ_CHUNK = 1 << 20
SPACE_MARGIN = 16 * 1024 * 1024


def connect(cfg: RedisConfig, env: Mapping[str, str] | None = None) -> redis.Redis:
    """A checked connection (PING answered) to the server the configuration names (under
    Sentinel: the current master); errors say what to fix, never the password."""
    return connect_endpoint(discovery.resolve(cfg, env))


def connect_endpoint(endpoint: Endpoint) -> redis.Redis:
    """A checked connection (PING answered) to one resolved server."""
    client = endpoint.client()
    with redis_errors(endpoint.cfg, endpoint.password is not None):
        client.ping()
    return client


def _where(cfg: RedisConfig) -> str:
    return f"Redis at unix socket {cfg.socket}" if cfg.socket else \
        f"Redis at {cfg.host}:{cfg.port}"


_TLS_HINTS = (
    ("certificate has expired", "the server's certificate has expired"),
    ("certificate_verify_failed", "the server's certificate was not accepted; check "
                                  "redis.tls_ca_file (the CA that signed it) and "
                                  "redis.tls_server_name (the name in it)"),
    ("certificate required", "the server requires a client certificate: set "
                             "redis.tls_cert_file and redis.tls_key_file"),
    ("eof occurred in violation of protocol", "the server closed the TLS connection: does it "
                                              "require a client certificate (redis.tls_cert_file "
                                              "and redis.tls_key_file)?"),
)


def _connection_hint(text: str) -> str:
    lowered = text.lower()
    return next((f": {hint}" for needle, hint in _TLS_HINTS if needle in lowered), "")


@contextlib.contextmanager
def redis_errors(cfg: RedisConfig, has_password: bool) -> Iterator[None]:
    """Translate redis-py exceptions into backupd errors with an operator-facing message."""
    where = _where(cfg)
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
    except redis.exceptions.TimeoutError as exc:
        if "connect" in str(exc).lower():
            tls = (", TLS handshake included: is this port a TLS port?" if cfg.tls else "")
            raise RedisUnavailable(f"{where} did not accept the connection in time (redis."
                                   f"connect_timeout {cfg.connect_timeout:g}s{tls})") from None
        raise RedisUnavailable(f"{where} did not answer in time "
                               f"(redis.read_timeout {cfg.read_timeout:g}s)") from None
    except redis.exceptions.BusyLoadingError as exc:  # a ConnectionError in redis-py
        text = str(exc)
        raise RedisLoading(f"cannot connect to {where}{_connection_hint(text)} "
                           f"({text})") from None
    except redis.exceptions.ConnectionError as exc:
        text = str(exc)
        raise RedisUnavailable(f"cannot connect to {where}{_connection_hint(text)} "
                               f"({text})") from None
    except UnicodeError:  # the socket layer's IDNA encoding of the host name
        raise ConfigError(f"key 'redis.host': {cfg.host!r} is not a valid host name") from None
    except redis.exceptions.InvalidResponse:  # e.g. an HTTP server on that port
        raise RedisUnavailable(f"{where} does not answer in the Redis protocol: is it a Redis "
                               "server?") from None
    except redis.exceptions.ResponseError as exc:
        text = str(exc)
        if "without any password configured" in text:
            raise RedisAuthError(f"{where}: a password is configured for backupd, but Redis "
                                 "has none for this user") from None
        raise SnapshotError(f"{where} answered with an error: {text}") from None


def replication(client: redis.Redis, endpoint: Endpoint) -> tuple[dict[str, Any], list[str]]:
    """The server's replication state for the manifest, and warnings. A replica that is not in
    sync is refused (StaleReplica) unless redis.allow_stale_replica; a server that is not what
    the sentinels said it is (a failover under way) is refused."""
    cfg = endpoint.cfg
    with redis_errors(cfg, True):
        info: dict[str, Any] = client.info("replication")
    role = str(info.get("role", ""))
    if endpoint.expect_role and role != endpoint.expect_role:
        raise RedisUnavailable(f"the sentinels name {endpoint.where} as "
                               f"{endpoint.expect_role.replace('slave', 'replica')}, but it "
                               f"reports role:{role} (a failover under way?); nothing was "
                               "backed up, the next run asks the sentinels again")
    if role != "slave":
        return discovery.replication_facts(info, None), []
    warnings = []
    try:
        discovery.check_replica(info, cfg, endpoint.where)
    except StaleReplica as exc:
        if not cfg.allow_stale_replica:
            raise StaleReplica(f"{exc}; refused (redis.allow_stale_replica = false)") from None
        warnings.append(f"backed up a replica that is not in sync: {exc}")
    master_offset = None
    if info.get("master_link_status") == "up":
        master_offset = _master_offset(endpoint, str(info.get("master_host", "")),
                                       int(info.get("master_port", 0)))
    return discovery.replication_facts(info, master_offset), warnings


def _master_offset(endpoint: Endpoint, host: str, port: int) -> int | None:
    """The master's replication offset (to record a replica's lag); None when unreachable."""
    master = at(endpoint, host, port)
    try:
        client = master.client()
        try:
            return int(client.info("replication").get("master_repl_offset", 0))
        finally:
            client.close()
    except (redis.exceptions.RedisError, OSError, ValueError) as exc:
        log.warning("master_offset_unknown", master=master.where, error=str(exc))
        return None


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
    identity = servers.from_info(info)
    facts = RedisFacts(
        version=identity.version, host=cfg.socket or cfg.host,
        port=0 if cfg.socket else cfg.port, role=str(info.get("role", "")),
        run_id=str(info.get("run_id", "")),
        aof_enabled=bool(int(info.get("aof_enabled", 0))), server=identity.kind,
        used_memory=int(info.get("used_memory", 0)),
        maxmemory_policy=str(info.get("maxmemory_policy", "")),
    )
    return ServerInfo(facts, keys, info)


def locate_dump(client: redis.Redis, cfg: RedisConfig) -> Path:
    """The dump file as seen from this container: `dbfilename` inside `redis.data_dir`."""
    fallback = cfg.dbfilename or "dump.rdb"
    try:
        name = client.config_get("dbfilename").get("dbfilename") or fallback
    except (redis.exceptions.NoPermissionError, redis.exceptions.ResponseError) as exc:
        renamed = "unknown command" in str(exc).lower()
        log.warning("config_get_denied", fallback=fallback, hint=(
            "Redis does not know CONFIG (rename-command CONFIG): set redis.dbfilename"
            if renamed else "grant +config|get to read dbfilename, or set redis.dbfilename"))
        name = fallback
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


def _replication(client: redis.Redis) -> dict[str, Any]:
    return client.info("replication")


def _poll(deadline: float, what: str, done: Callable[[], bool]) -> None:
    poll_until(done, deadline,
               lambda: SnapshotError(f"timed out waiting for {what} (redis.save_timeout)"),
               first=POLL_MIN, longest=POLL_MAX)


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


@dataclass(frozen=True)
class _Save:
    """A BGSAVE that was asked for, and what is needed to judge its outcome."""

    client: redis.Redis
    dump: Path
    t_req: int  # Redis's clock when it was asked
    saves_before: int  # rdb_saves then (-1: Redis < 7.0)
    run_id: str
    inode_before: int | None  # the old dump's, pinned open until the outcome is judged
    temps_before: frozenset[tuple[str, int]]  # temp-<pid>.rdb files that are not ours
    deadline: float
    reply: str
    at_save: ServerInfo


@contextlib.contextmanager
def _requested_save(client: redis.Redis, cfg: RedisConfig, backup_dir: Path) -> Iterator[_Save]:
    """Check space, pin the old dump, send BGSAVE; the pin holds until the caller is done."""
    dump = locate_dump(client, cfg)
    before = server_info(client, cfg)
    estimate = _size_or(dump, int(before.persistence.get("used_memory_dataset", 0)))
    check_space(Path(cfg.data_dir), estimate, "Redis's temporary snapshot file")
    check_space(backup_dir, estimate, "the backup")
    with _pin(dump) as inode_before:
        temps_before = frozenset(_temp_files(dump.parent))
        t_req = int(client.time()[0])
        saves_before = int(_persistence(client).get("rdb_saves", -1))
        deadline = time.monotonic() + cfg.save_timeout
        reply = _request_save(client, deadline)
        at_save = server_info(client, cfg)
        log.info("bgsave_requested", reply=reply, keys=at_save.keys)
        yield _Save(client, dump, t_req, saves_before, before.facts.run_id, inode_before,
                    temps_before, deadline, reply, at_save)


def _open_result(save: _Save) -> IO[bytes]:
    """Once the save is over: check that it succeeded and wrote a new dump file; that file,
    opened (unbuffered: read() returns what is there)."""
    state = _persistence(save.client)
    if state.get("rdb_last_bgsave_status") != "ok":
        raise SnapshotError(
            "the snapshot failed: rdb_last_bgsave_status is "
            f"{state.get('rdb_last_bgsave_status')!r}; see the Redis log (often a full or "
            "read-only data volume). Until a save succeeds Redis may refuse writes (MISCONF).")
    if int(state.get("rdb_last_save_time", 0)) < save.t_req:
        raise SnapshotError("the save ended without writing a new file (killed by FLUSHALL "
                            "or SHUTDOWN?); no backup was made of the old file")
    try:
        fh = open(save.dump, "rb", buffering=0)  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        raise SnapshotError(f"Redis saved, but {save.dump} does not exist: is redis.data_dir "
                            "the Redis data volume?") from None
    role = str(_replication(save.client).get("role", ""))
    if role != save.at_save.facts.role:  # checked once the file is open: no rename after
        fh.close()
        raise SnapshotError(
            f"Redis changed role during the snapshot (role:{save.at_save.facts.role} -> "
            f"role:{role}: a failover?). A demoted master resyncs from the new one and that "
            "data replaces its dump file; the backup was discarded so that it never mixes two "
            "servers, and the next run backs up the server the configuration names then")
    if save.inode_before is not None and os.fstat(fh.fileno()).st_ino == save.inode_before:
        fh.close()
        raise SnapshotError(
            f"the file in data_dir ({save.dump}) did not change after a successful save: is "
            "redis.data_dir the Redis data volume? (or the save was killed by FLUSHALL or "
            "SHUTDOWN); no backup was made of the old file")
    return fh


@contextlib.contextmanager
def snapshot(client: redis.Redis, cfg: RedisConfig, backup_dir: Path) -> Iterator[Snapshot]:
    """Trigger a fresh snapshot and yield it opened, once Redis has finished it."""
    with redis_errors(cfg, True), _requested_save(client, cfg, backup_dir) as save:
        _poll(save.deadline, "the snapshot", lambda: _save_over(save))
        fh = _open_result(save)
    with fh:
        yield Snapshot(fh, save.dump, os.fstat(fh.fileno()).st_size, save.at_save, save.reply)


def _save_over(save: _Save) -> bool:
    """Whether the save has ended (in success or not); SnapshotError if Redis restarted."""
    _check_same_server(save.client, save.run_id)
    state = _persistence(save.client)
    if save.saves_before < 0:  # Redis < 7.0 has no rdb_saves: wait for the child to go away
        return not int(state.get("rdb_bgsave_in_progress", 0))
    return (int(state.get("rdb_saves", 0)) > save.saves_before
            and not int(state.get("rdb_bgsave_in_progress", 0)))


class FollowLost(Exception):
    """The file followed during the save is not the one Redis ended up with: read again."""


class LiveSnapshot:
    """A fresh snapshot as a stream that can be read while Redis is still writing it.

    Redis's save child writes temp-<pid>.rdb in the data directory, sequentially, and renames
    it to the dump file when it is complete. With `follow`, reads follow that temp file as it
    grows, so that checking, compressing and uploading overlap the save instead of waiting for
    it. Nothing is trusted for that: the end of the stream is only reached after the full
    handshake (module docstring) confirmed the save AND the dump file is the very inode that
    was followed. A followed file that turns out not to be the dump raises FollowLost, and
    `rewind()` starts over from the finished dump; the caller also rewinds when the RDB check
    fails on followed bytes (a network filesystem may show a growing file inconsistently).
    Without `follow`, or when the save ends before its temp file is seen, this reads the
    finished dump, exactly like `snapshot()`.
    """

    WAIT = 0.01  # at the end of what Redis has written so far: it writes ~100 MB/s

    def __init__(self, save: _Save, follow: bool) -> None:
        self._save = save
        self._follow = follow
        self._fh: IO[bytes] | None = None
        self._done = False  # _fh is the confirmed dump: its end is the snapshot's end
        self._lost = False  # FollowLost was raised: the caller must rewind
        self._next_poll = 0.0
        self.followed = False  # bytes were handed out before the save was confirmed
        self.path = save.dump
        self.server = save.at_save
        self.save_reply = save.reply
        self.size: int | None = None  # known once the save is confirmed

    def fileno(self) -> int:
        if self._fh is None:
            raise SnapshotError("the snapshot is not open yet")
        return self._fh.fileno()

    def read(self, size: int = -1, /) -> bytes:
        size = READ_CHUNK if size is None or size < 0 else size
        while True:
            if self._fh is None and self._follow:
                self._fh = _open_new_temp(self._save)
            if self._fh is not None:
                data = self._fh.read(size)
                if data:
                    self.followed = self.followed or not self._done
                    return data
                if self._done:
                    return b""
            if self._over():
                self._confirm()
                continue
            if time.monotonic() >= self._save.deadline:
                raise SnapshotError("timed out waiting for the snapshot (redis.save_timeout)")
            time.sleep(self.WAIT)

    def _over(self) -> bool:
        """Whether the save ended; asks Redis at most every POLL_MAX / 2, or at once when the
        followed file has just become the dump file."""
        now = time.monotonic()
        if now < self._next_poll and not (self._fh is not None and _is_dump(
                self._fh, self._save.dump)):
            return False
        self._next_poll = now + POLL_MAX / 2
        return _save_over(self._save)

    def _confirm(self) -> None:
        result = _open_result(self._save)
        if self._fh is not None and _same_file(self._fh, result):
            result.close()
        else:
            if self._fh is not None:
                self._fh.close()
            self._lost = self.followed
            self._fh, self.followed = result, False
        self._done = True
        self.size = os.fstat(self._fh.fileno()).st_size
        log.info("snapshot_ready", path=str(self.path), raw_size=self.size,
                 followed=self.followed)
        if self._lost:
            raise FollowLost

    def rewind(self) -> bool:
        """Start over from byte 0 of the finished dump file (after FollowLost, or when the
        followed bytes failed the RDB check); False when the bytes read so far came from the
        finished dump already: reading them again would change nothing."""
        if self._lost:  # _confirm switched to the dump: nothing read from it yet
            self._lost = False
            return True
        if not self.followed:
            return False
        self.followed = self._follow = False
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._done = False
        return True

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


@contextlib.contextmanager
def follow_snapshot(client: redis.Redis, cfg: RedisConfig,
                    backup_dir: Path) -> Iterator[LiveSnapshot]:
    """Trigger a fresh snapshot and yield it as a LiveSnapshot right away (see there)."""
    with redis_errors(cfg, True), _requested_save(client, cfg, backup_dir) as save:
        live = LiveSnapshot(save, cfg.follow_save)
        try:
            yield live
        finally:
            live.close()


TEMP_PREFIX, TEMP_SUFFIX = "temp-", ".rdb"


def _temp_files(directory: Path) -> Iterator[tuple[str, int]]:
    """(name, inode) of Redis's save temp files (temp-<pid>.rdb) in `directory`."""
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                name = entry.name
                if (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)
                        and name[len(TEMP_PREFIX):-len(TEMP_SUFFIX)].isdigit()):
                    with contextlib.suppress(OSError):
                        yield name, entry.inode()
    except OSError:
        return


def _open_new_temp(save: _Save) -> IO[bytes] | None:
    """The newest save temp file that was not there before BGSAVE, opened; None if none yet."""
    new = [(name, inode) for name, inode in _temp_files(save.dump.parent)
           if (name, inode) not in save.temps_before]
    for name, _ in sorted(new, key=lambda n: _mtime(save.dump.parent / n[0]), reverse=True):
        try:
            fd = os.open(save.dump.parent / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # renamed or removed since the listing
        fh = open(fd, "rb", buffering=0)  # noqa: SIM115 - owned by LiveSnapshot
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fh
        fh.close()
    return None


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _same_file(one: IO[bytes], other: IO[bytes]) -> bool:
    a, b = os.fstat(one.fileno()), os.fstat(other.fileno())
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _is_dump(fh: IO[bytes], dump: Path) -> bool:
    """Whether `fh` is the dump file now (Redis renames its temp file when the save ends)."""
    try:
        a, b = os.fstat(fh.fileno()), os.stat(dump)
    except OSError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _check_same_server(client: redis.Redis, run_id: str) -> None:
    """SnapshotError when Redis restarted since the save was requested: redis-py reconnects
    silently, and the new process would never count our save (its rdb_saves starts at 0)."""
    if run_id and str(client.info("server").get("run_id", "")) != run_id:
        raise SnapshotError("Redis restarted during the snapshot (its run_id changed): the "
                            "save was lost; no backup was made, the next run takes a new one")


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
