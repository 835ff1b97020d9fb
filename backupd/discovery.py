"""Which server to talk to: the configured one, or the one the sentinels name right now.

Under Sentinel every backup and every restore asks all configured sentinels for the master
(`SENTINEL MASTER <name>`); the answer with the newest config epoch wins, and the view (how many
sentinels answered and agreed) goes into the manifest. A restore needs a majority of the
configured sentinels to agree: a restore into anything but the current master is lost (a replica
is overwritten by its next sync, a failed-over old master by the new one).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from backupd.config import RedisConfig
from backupd.endpoint import Endpoint, at, direct, sentinel_endpoints
from backupd.errors import ConfigError, RedisUnavailable, RestoreError, StaleReplica
from backupd.polling import poll_until

log = structlog.get_logger("backupd.discovery")

_DOWN_FLAGS = {"s_down", "o_down"}


_UNUSABLE_REPLICA = {"s_down", "o_down", "disconnected"}


class _NotYet(Exception):
    """A bounded wait whose end is a warning line, not an error."""


@dataclass(frozen=True)
class Answer:
    sentinel: str
    host: str
    port: int
    epoch: int
    flags: frozenset[str]
    down_after_ms: int


@dataclass(frozen=True)
class View:
    """What the sentinels said about the master."""

    name: str
    configured: int
    answers: list[Answer]
    unreachable: list[str]

    @property
    def master(self) -> Answer:
        healthy = [a for a in self.answers if not a.flags & _DOWN_FLAGS]
        if not healthy:
            raise RedisUnavailable(
                f"the sentinels that answered ({len(self.answers)} of {self.configured}) "
                f"report master {self.name!r} as down: no server to use")
        return max(healthy, key=lambda a: a.epoch)

    @property
    def agreeing(self) -> int:
        best = self.master
        return sum(1 for a in self.answers if (a.host, a.port) == (best.host, best.port))

    def describe(self) -> str:
        m = self.master
        of = "" if self.agreeing == self.configured else f" of {self.configured}"
        return f"master {self.name} = {m.host}:{m.port} via {self.agreeing}{of} sentinels"

    def record(self) -> dict[str, Any]:
        m = self.master
        return {"master_name": self.name, "master": f"{m.host}:{m.port}",
                "config_epoch": m.epoch, "sentinels": self.configured,
                "answered": len(self.answers), "agreeing": self.agreeing,
                "unreachable": ", ".join(self.unreachable)}


def _pairs(reply: Any) -> dict[str, str]:
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    items = list(reply)
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def _sentinel_command(sentinel: Endpoint, *args: str) -> Any:
    client = sentinel.client()
    try:
        return client.execute_command("SENTINEL", *args)  # type: ignore[no-untyped-call]
    finally:
        client.close()


def ask(cfg: RedisConfig, env: Mapping[str, str] | None = None) -> View:
    """Ask every sentinel about the master; RedisUnavailable when none answers."""
    name = cfg.sentinel.master_name
    answers, unreachable, errors = [], [], []
    for sentinel in sentinel_endpoints(cfg, env):
        try:
            info = _pairs(_sentinel_command(sentinel, "MASTER", name))
        except redis.exceptions.ResponseError as exc:
            if "no such master" in str(exc).lower():
                raise ConfigError(f"sentinel {sentinel.where} does not know a master named "
                                  f"{name!r} (key 'redis.sentinel.master_name')") from None
            unreachable.append(sentinel.where)
            errors.append(f"{sentinel.where}: {exc}")
            continue
        except (redis.exceptions.RedisError, OSError) as exc:
            unreachable.append(sentinel.where)
            errors.append(f"{sentinel.where}: {_reason(exc, cfg)}")
            continue
        answers.append(Answer(sentinel.where, info.get("ip", ""), int(info.get("port", 0)),
                              int(info.get("config-epoch", 0)),
                              frozenset(info.get("flags", "").split(",")),
                              int(info.get("down-after-milliseconds", 0))))
    if not answers:
        raise RedisUnavailable(f"no sentinel answered about master {name!r}: "
                               + "; ".join(errors))
    if unreachable:
        log.warning("sentinel_unreachable", sentinels=unreachable, answered=len(answers))
    return View(name, len(cfg.sentinel.hosts), answers, unreachable)


def _reason(exc: BaseException, cfg: RedisConfig) -> str:
    if isinstance(exc, redis.exceptions.TimeoutError):
        setting = "connect_timeout" if "connect" in str(exc).lower() else "read_timeout"
        return f"did not answer in time (redis.{setting})"
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return "rejected the credentials (redis.sentinel.username/password_env/password_file)"
    return str(exc)


def resolve(cfg: RedisConfig, env: Mapping[str, str] | None = None, *,
            for_restore: bool = False) -> Endpoint:
    """The server to use: the configured one; under Sentinel the current master, or a healthy
    replica with redis.prefer = "replica" (not for a restore)."""
    base = direct(cfg, env)
    if not cfg.sentinel.enabled:
        return base
    view = ask(cfg, env)
    master = view.master
    if for_restore and view.agreeing * 2 <= view.configured:
        raise RestoreError(
            f"only {view.agreeing} of {view.configured} sentinels confirm {master.host}:"
            f"{master.port} as master {view.name!r} (unreachable: "
            f"{', '.join(view.unreachable) or 'none'}): a restore needs a majority, since one "
            "into anything but the current master is lost; nothing was changed")
    chosen = at(base, master.host, master.port, view.describe(), view.record(), "master")
    if cfg.prefer == "replica" and not for_restore:
        replica = _healthy_replica(cfg, env, view, chosen)
        if replica is not None:
            return replica
        log.warning("no_healthy_replica", using=chosen.where,
                    reason="no replica has master_link_status up and fresh I/O")
    log.info("sentinel_resolved", target=chosen.via)
    return chosen


def _healthy_replica(cfg: RedisConfig, env: Mapping[str, str] | None, view: View,
                     master: Endpoint) -> Endpoint | None:
    sentinel = next(s for s in sentinel_endpoints(cfg, env) if s.where == view.master.sentinel)
    try:
        replicas = [_pairs(r) for r in _sentinel_command(sentinel, "REPLICAS", view.name)]
    except (redis.exceptions.RedisError, OSError) as exc:
        log.warning("sentinel_replicas_failed", sentinel=sentinel.where, error=str(exc))
        return None
    candidates = [r for r in replicas
                  if not set(r.get("flags", "").split(",")) & _UNUSABLE_REPLICA
                  and r.get("master-link-status") == "ok"]
    candidates.sort(key=lambda r: -int(r.get("slave-repl-offset", 0)))
    for r in candidates:
        replica = at(master, r.get("ip", ""), int(r.get("port", 0)),
                     f"replica {r.get('ip')}:{r.get('port')} of {view.describe()}",
                     view.record(), "slave")
        try:
            client = replica.client()
            try:
                info: dict[str, Any] = client.info("replication")
            finally:
                client.close()
            check_replica(info, cfg, replica.where)
        except (redis.exceptions.RedisError, OSError, StaleReplica) as exc:
            log.warning("replica_skipped", replica=replica.where, reason=str(exc))
            continue
        log.info("sentinel_resolved", target=replica.via)
        return replica
    return None


def replication_facts(info: Mapping[str, Any], master_offset: int | None) -> dict[str, Any]:
    """What the manifest records about replication (INFO replication)."""
    role = str(info.get("role", ""))
    if role != "slave":
        return {"role": role, "connected_replicas": int(info.get("connected_slaves", 0))}
    offset = int(info.get("slave_repl_offset", info.get("master_repl_offset", 0)))
    return {
        "role": "replica", "master": f"{info.get('master_host', '')}:{info.get('master_port', '')}",
        "master_link_status": str(info.get("master_link_status", "")),
        "master_last_io_seconds_ago": int(info.get("master_last_io_seconds_ago", -1)),
        "offset": offset, "master_offset": master_offset,
        "lag_bytes": None if master_offset is None else max(0, master_offset - offset),
    }


def check_replica(info: Mapping[str, Any], cfg: RedisConfig, where: str) -> None:
    """StaleReplica unless a replica is in sync: link up, synced once, recent master I/O."""
    if str(info.get("role", "")) != "slave":
        return
    link = str(info.get("master_link_status", ""))
    io_age = int(info.get("master_last_io_seconds_ago", -1))
    if link != "up":
        raise StaleReplica(f"the replica at {where} has master_link_status:{link} (its "
                           "master link is down or it never synced): its data may be old")
    if int(info.get("master_sync_in_progress", 0)):
        raise StaleReplica(f"the replica at {where} is still syncing from its master "
                           "(master_sync_in_progress:1, master_link_status:up)")
    if io_age < 0 or io_age > cfg.replica_max_io_age:
        raise StaleReplica(f"the replica at {where} heard from its master {io_age}s ago "
                           f"(master_last_io_seconds_ago, master_link_status:{link}; more "
                           f"than redis.replica_max_io_age {cfg.replica_max_io_age:g}s)")


def require_hold_off(cfg: RedisConfig) -> None:
    """Every restore method stops the master: under Sentinel that needs the hold-off."""
    if cfg.sentinel.enabled and cfg.sentinel.failover_hold_off <= 0:
        raise RestoreError(
            "under Sentinel, stopping the master for a restore triggers a failover that "
            "loses the restore; set redis.sentinel.failover_hold_off (e.g. \"15m\", longer "
            "than the restore) so that backupd holds the failover off; nothing was changed")


@contextlib.contextmanager
def failover_held_off(cfg: RedisConfig, env: Mapping[str, str] | None,
                      settle: float) -> Iterator[None]:
    """Raise the master's down-after-milliseconds on every sentinel for the duration (a
    stopped master must not be failed over: the restore would be lost), and put each value
    back afterwards, whatever happens. Refuses when a sentinel cannot be reached.

    Each value goes back only once that sentinel has had a fresh PING reply from the master
    (waiting up to `settle` seconds): its last reply may date from before the restart, and
    with the old value back it would declare the restored master down at once."""
    s = cfg.sentinel
    require_hold_off(cfg)
    hold_ms = str(int(s.failover_hold_off * 1000))
    changed: list[tuple[Endpoint, int]] = []
    try:
        for sentinel in sentinel_endpoints(cfg, env):
            try:
                before = int(_pairs(_sentinel_command(sentinel, "MASTER", s.master_name))
                             ["down-after-milliseconds"])
                _sentinel_command(sentinel, "SET", s.master_name, "down-after-milliseconds",
                                  hold_ms)
            except (redis.exceptions.RedisError, OSError, KeyError) as exc:
                raise RestoreError(
                    f"cannot hold off a failover: sentinel {sentinel.where} "
                    f"({_reason(exc, cfg)}); with it a stopped master would be failed over "
                    "and the restore lost; nothing was changed") from None
            changed.append((sentinel, before))
        log.info("failover_held_off", sentinels=len(changed), down_after_ms=hold_ms,
                 previous=[ms for _, ms in changed])
        yield
    finally:
        deadline = time.monotonic() + settle
        for sentinel, before in changed:
            try:
                _wait_fresh_reply(sentinel, s.master_name, before, deadline)
                _sentinel_command(sentinel, "SET", s.master_name, "down-after-milliseconds",
                                  str(before))
            except (redis.exceptions.RedisError, OSError) as exc:
                log.error("failover_hold_off_not_undone", sentinel=sentinel.where,
                          down_after_ms=before, error=str(exc),
                          fix=f"SENTINEL SET {s.master_name} down-after-milliseconds {before}")


def _wait_fresh_reply(sentinel: Endpoint, name: str, down_after_ms: int,
                      deadline: float) -> None:
    """Until the sentinel's last PING reply from the master is well within `down_after_ms`;
    past the deadline a warning, not an error (the hold-off is undone either way)."""
    state: dict[str, Any] = {}

    def fresh() -> bool:
        state.update(_pairs(_sentinel_command(sentinel, "MASTER", name)))
        flags = set(state.get("flags", "").split(","))
        return (int(state.get("last-ok-ping-reply", down_after_ms)) < down_after_ms // 2
                and not flags & (_DOWN_FLAGS | {"disconnected"}))

    try:
        poll_until(fresh, deadline, _NotYet, first=0.05, longest=0.05)
    except _NotYet:
        log.warning("master_not_seen_by_sentinel", sentinel=sentinel.where,
                    flags=",".join(sorted(set(state.get("flags", "").split(",")))),
                    last_ok_ping_reply_ms=state.get("last-ok-ping-reply"))


def replicas_resynced(cfg: RedisConfig, env: Mapping[str, str] | None, master: Endpoint,
                      keys: int, timeout: float) -> list[str]:
    """After a restore: wait (bounded) until every replica the sentinels know is linked to the
    master and holds `keys` keys (a replica that kept its old data would hand it back at the
    next failover); one line per replica saying what was found."""
    try:
        view = ask(cfg, env)  # the master may still be flagged from its restart: any answer
        sentinel = next(s for s in sentinel_endpoints(cfg, env)
                        if s.where == view.answers[0].sentinel)
        replies = [_pairs(r) for r in _sentinel_command(sentinel, "REPLICAS", view.name)]
    except (redis.exceptions.RedisError, OSError, RedisUnavailable) as exc:
        return [f"WARNING the replicas could not be listed ({exc}): check them yourself"]
    deadline = time.monotonic() + timeout
    lines = []
    for reply in replies:
        replica = at(master, reply.get("ip", ""), int(reply.get("port", 0)))
        seen: dict[str, Any] = {}
        try:
            poll_until(functools.partial(_resynced, replica, keys, seen), deadline, _NotYet,
                       first=0.2, longest=0.2)
            lines.append(f"replica {replica.where} resynced to the restored data "
                         f"({keys} keys, master_link_status:up)")
        except _NotYet:
            lines.append(f"WARNING replica {replica.where} has not resynced within "
                         f"{timeout:g}s (restore.start_timeout): {seen.get('keys', '?')} keys, "
                         f"master_link_status:{seen.get('link', '?')}; it still holds other "
                         "data and would bring it back at a failover")
    return lines


def _resynced(replica: Endpoint, keys: int, seen: dict[str, Any]) -> bool:
    try:
        client = replica.client()
        try:
            info: dict[str, Any] = client.info("replication")
            seen["link"] = info.get("master_link_status", "?")
            space: dict[str, Any] = client.info("keyspace")
            seen["keys"] = sum(int(db.get("keys", 0)) for db in space.values()
                               if isinstance(db, dict))
        finally:
            client.close()
    except (redis.exceptions.RedisError, OSError) as exc:
        seen["link"] = f"unreachable ({exc})"
        return False
    return bool(seen["link"] == "up" and seen["keys"] == keys)
