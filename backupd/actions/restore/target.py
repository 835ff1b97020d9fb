"""The Redis side of a restore: the connection, and what the target server is (version,
files, AOF, key count), found out before anything stops (step 2)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import structlog

from backupd import discovery, servers, source
from backupd.config import RedisConfig
from backupd.controllers.base import Controller, poll_until
from backupd.errors import (
    BackupdError,
    IntegrityError,
    NeverAnswered,
    RedisExited,
    RedisLoading,
    RedisUnavailable,
    RestoreError,
)
from backupd.manifest import Manifest
from backupd.rdb import HEADER_SIZE, parse_header

log = structlog.get_logger("backupd.restore")

AOF_MANIFEST_SUFFIX = ".manifest"


class RedisLink:
    """Fresh connections to the target: Redis goes away and comes back during a restore.

    The target is resolved once (under Sentinel: the master a majority of the sentinels
    confirm) and then kept: reconnects go to the same server, never to a new master."""

    def __init__(self, cfg: RedisConfig, env: Mapping[str, str] | None = None) -> None:
        self.endpoint = discovery.resolve(cfg, env, for_restore=True)
        self.cfg = self.endpoint.cfg
        self.env = env

    @property
    def where(self) -> str:
        return self.endpoint.where

    def connect(self) -> redis.Redis:
        return source.connect_endpoint(self.endpoint)

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return source.redis_errors(self.cfg, True)

    def answers(self) -> bool:
        """True while anything answers on the port (also -LOADING or an auth error)."""
        try:
            client = self.connect()
        except RedisLoading:
            return True
        except RedisUnavailable:
            return False
        except BackupdError:
            return True
        client.close()
        return True

    def ready_info(self) -> dict[str, Any] | None:
        """INFO of a server that answers and has finished loading, else None."""
        try:
            client = self.connect()
        except RedisUnavailable:
            return None
        try:
            with self.errors():
                info: dict[str, Any] = client.info("everything")
        except RedisUnavailable:
            return None
        finally:
            client.close()
        return None if int(info.get("loading", 0)) else info


    def probe(self) -> tuple[str, dict[str, Any]]:
        """("ready", INFO) once loaded, ("loading", {}), ("down", {}) when nothing answers;
        RedisAuthError when Redis answers but rejects the login."""
        try:
            client = self.connect()
        except RedisLoading:
            return "loading", {}
        except RedisUnavailable:
            return "down", {}
        try:
            with self.errors():
                info: dict[str, Any] = client.info("everything")
        except RedisLoading:
            return "loading", {}
        except RedisUnavailable:
            return "down", {}
        finally:
            client.close()
        return ("loading" if int(info.get("loading", 0)) else "ready"), info


GONE_AFTER = 1.0  # silent this long after it answered: the new server has exited


def wait_ready(link: RedisLink, not_run_id: str, timeout: float,
               answer_timeout: float = 10.0) -> dict[str, Any]:
    """Wait for PING, loading:0 and a run_id other than `not_run_id` (a restarted server).

    Fails fast on a dead server instead of waiting `timeout` (the whole load): RedisExited
    when a new server answered (-LOADING or loaded) and then went silent or restarted again
    (a crash loop), NeverAnswered when nothing new answered within `answer_timeout`."""
    started = time.monotonic()
    seen: dict[str, Any] = {}
    last_answer: float | None = None
    answering = False
    deaths = 0
    run_ids: set[str] = set()

    def ready() -> bool:
        nonlocal last_answer, answering, deaths
        state, info = link.probe()
        now = time.monotonic()
        run_id = str(info.get("run_id", ""))
        if state == "down" or (not_run_id and run_id == not_run_id):
            if state == "down" and answering:
                answering, deaths = False, deaths + 1
            if deaths and (deaths > 1 or now - (last_answer or now) >= GONE_AFTER):
                raise RedisExited(f"Redis at {link.where} started, answered, then exited "
                                  + ("and started again " if deaths > 1 else "")
                                  + f"({now - started:.1f}s after the start)"
                                  + (": a crash loop" if deaths > 1 else ""))
            if last_answer is None and now - started >= min(answer_timeout, timeout):
                raise NeverAnswered(f"nothing new answered at {link.where} within "
                                    f"{min(answer_timeout, timeout):g}s of the start "
                                    "(restore.answer_timeout)")
            return False
        last_answer, answering = now, True
        if run_id:
            run_ids.add(run_id)
            if len(run_ids) > 1:
                raise RedisExited(f"Redis at {link.where} restarted again after the start "
                                  f"(run_ids {', '.join(sorted(r[:8] for r in run_ids))}): "
                                  "a crash loop")
        if state != "ready":
            return False
        seen.update(info)
        return True

    poll_until(ready, timeout, f"Redis at {link.where} to answer with its data loaded "
                               "(restore.start_timeout)")
    return seen


# -- step 2: the target -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What the server said in step 2, or what its files say when it is down."""

    answers: bool
    running: bool
    version: str
    run_id: str
    keys: int | None
    aof: bool
    dbfilename: str
    aof_dir: str
    aof_file: str
    role: str = "master"
    cluster: bool = False
    used_memory: int = 0
    server: str = servers.REDIS  # "redis" or "valkey"
    keys_per_db: dict[str, int] = field(default_factory=dict)
    databases: int | None = None  # None: unknown (Redis down, or CONFIG unavailable)
    maxmemory: int = 0
    maxmemory_policy: str = ""
    config_denied: str = ""  # why CONFIG cannot be used ("" = it can)

    @property
    def entries(self) -> list[str]:
        """The top-level names in data_dir that a restore replaces: the RDB and the AOF dir,
        whatever AOF says now (a runtime `CONFIG SET appendonly` is forgotten at restart)."""
        return [self.dbfilename, self.aof_dir]


def inspect_target(link: RedisLink, controller: Controller, data_dir: Path) -> Target:
    running = controller.is_running()
    try:
        client = link.connect()
    except RedisUnavailable as exc:
        log.warning("redis_not_answering", where=link.where, error=str(exc))
        return _target_from_files(data_dir, bool(running), link.cfg)
    try:
        with link.errors():
            return _target_from_server(client, link.cfg)
    finally:
        client.close()


_CONFIG_KEYS = ("appendonly", "appenddirname", "appendfilename", "dbfilename", "databases")


def _target_from_server(client: redis.Redis, cfg: RedisConfig) -> Target:
    info = source.server_info(client, cfg)
    raw = info.persistence
    conf, denied = read_config_keys(client, _CONFIG_KEYS)
    if denied:
        log.warning("config_unavailable", reason=denied)
    names = {key: conf.get(key, "") or getattr(cfg, key) for key in
             ("dbfilename", "appenddirname", "appendfilename")}
    if denied and not (names["dbfilename"] and names["appenddirname"]):
        raise RestoreError(config_unavailable_text(denied))
    if not names["appenddirname"]:
        raise RestoreError(f"{info.facts.identity.label} has no appenddirname (Redis < 7.0, "
                           "single-file AOF); backupd restores Redis 7 and newer only")
    databases = conf.get("databases", "")
    return Target(
        answers=True, running=True, version=info.facts.version, run_id=info.facts.run_id,
        keys=info.keys, aof=bool(int(raw.get("aof_enabled", 0))),
        dbfilename=safe_name(names["dbfilename"]),
        aof_dir=safe_name(names["appenddirname"]),
        aof_file=safe_name(names["appendfilename"] or "appendonly.aof"),
        role=info.facts.role, cluster=bool(int(raw.get("cluster_enabled", 0))),
        used_memory=int(raw.get("used_memory_dataset", 0)), server=info.facts.server,
        keys_per_db=info.keys_per_db,
        databases=int(databases) if databases.isdigit() else None,
        maxmemory=int(raw.get("maxmemory", 0)),
        maxmemory_policy=str(raw.get("maxmemory_policy", "")), config_denied=denied,
    )


def read_config_keys(client: redis.Redis, keys: Sequence[str]) -> tuple[dict[str, str], str]:
    """CONFIG GET of `keys` (one round trip); ({}, why) when CONFIG is renamed or denied."""
    try:
        got = client.config_get(*keys)
    except redis.exceptions.NoPermissionError as exc:
        return {}, f"the Redis user may not run CONFIG GET ({exc})"
    except redis.exceptions.ResponseError as exc:
        if "unknown command" in str(exc).lower():
            return {}, "Redis does not know the CONFIG command (rename-command CONFIG)"
        raise
    return {str(k): str(v) for k, v in got.items()}, ""


def config_unavailable_text(denied: str) -> str:
    return (f"{denied}. A restore needs CONFIG GET (file names, databases) and CONFIG SET "
            "(save \"\" so no save overwrites the restored files): grant +config|get "
            "+config|set, or start Redis without rename-command CONFIG. Nothing was stopped "
            "or changed. With the command or docker method, setting redis.dbfilename and "
            "redis.appenddirname lets the restore run without CONFIG.")


def config_get(client: redis.Redis, key: str) -> str:
    conf, denied = read_config_keys(client, (key,))
    if denied:
        raise RestoreError(config_unavailable_text(denied))
    return conf.get(key, "")


def _target_from_files(data_dir: Path, running: bool, cfg: RedisConfig) -> Target:
    """Redis is down: take the file names from the config or what is on disk (defaults
    otherwise)."""
    aof_dir, aof_file = _find_aof_layout(data_dir)
    rdbs = sorted(p.name for p in scan_dir(data_dir) if p.is_file() and p.suffix == ".rdb")
    dbfilename = cfg.dbfilename or (rdbs[0] if len(rdbs) == 1 else "dump.rdb")
    return Target(answers=False, running=running, version="", run_id="", keys=None,
                  aof=aof_dir is not None, dbfilename=safe_name(dbfilename),
                  aof_dir=safe_name(cfg.appenddirname or aof_dir or "appendonlydir"),
                  aof_file=safe_name(cfg.appendfilename or aof_file or "appendonly.aof"))


def _find_aof_layout(data_dir: Path) -> tuple[str | None, str | None]:
    for sub in scan_dir(data_dir):
        if sub.is_dir() and not sub.name.startswith(".backupd-"):
            manifests = [p.name for p in scan_dir(sub) if p.name.endswith(AOF_MANIFEST_SUFFIX)]
            if len(manifests) == 1:
                return sub.name, manifests[0][: -len(AOF_MANIFEST_SUFFIX)]
    return None, None


def scan_dir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RestoreError(f"cannot list {path}: {exc.strerror}") from None


def safe_name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or name.startswith(".backupd-"):
        raise RestoreError(f"Redis reports an unusable file name {name!r}")
    return name


def check_target(target: Target) -> None:
    """Targets where a restart loses the restore: refuse rather than pretend."""
    if target.role and target.role != "master":
        raise RestoreError("the target Redis is a replica: after a restart it resyncs from its "
                           "master and the restore is lost; restore the master instead")
    if target.cluster:
        raise RestoreError("the target Redis runs in cluster mode, which backupd does not "
                           "restore (a shard file on the wrong node loses keys silently)")


def check_version(manifest: Manifest, rdb_version: int, target: Target,
                  controller: Controller, data_dir: Path) -> str:
    """Refuse an RDB the server cannot load (it would exit, or crash-loop under a restart
    policy); returns the server version used for the check, or a note when inferred."""
    version = target.version or controller.server_version() or ""
    if version:
        server = servers.ServerId(target.server if target.version else servers.REDIS, version)
        if not server.can_load(rdb_version):
            raise RestoreError(
                f"backup {manifest.id} is RDB version {rdb_version} (written by "
                f"{manifest.redis.identity.label}; {servers.rdb_writer(rdb_version)}); the "
                f"target runs {server.label}, which loads {server.loads}. Nothing was "
                "stopped or changed. Restore into a server that loads it, or an older backup.")
        return f"{server.label} (loads {server.loads})"
    on_disk = _on_disk_rdb_version(data_dir, target)
    if on_disk is None or on_disk < rdb_version or (
            11 < rdb_version < servers.VALKEY_OWN_FROM <= on_disk):  # Valkey 9 refuses 12..79
        raise RestoreError(
            f"Redis is not running, so its version cannot be checked, and the files in "
            f"{data_dir} do not show that it can load RDB version {rdb_version} (backup "
            f"{manifest.id}, {servers.rdb_writer(rdb_version)}). Start Redis and run the "
            "restore again.")
    return f"unknown (Redis down; its files are RDB version {on_disk})"


def _on_disk_rdb_version(data_dir: Path, target: Target) -> int | None:
    """The newest RDB version among Redis's own files: a lower bound of what it can load."""
    paths = [data_dir / target.dbfilename]
    if target.aof:
        paths += [p for p in scan_dir(data_dir / target.aof_dir) if p.name.endswith(".base.rdb")]
    versions = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                versions.append(parse_header(fh.read(HEADER_SIZE)))
        except (OSError, IntegrityError):
            continue
    return max(versions) if versions else None
