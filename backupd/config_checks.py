"""The checks of a configuration that span values: ranges, paths, combinations, the schedule,
URLs and credential pairs.

`config.load` runs every one of them and reports all problems at once, each naming its key
(borgmatic's `iter_errors`), so an operator fixes a file in one round instead of one error per
restart. Nothing else repeats them: storage backends and the daemon trust a loaded Config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from backupd.choices import Compression
from backupd.config import (
    ENV_PREFIX,
    MAX_LOCK_DAYS,
    Config,
    NotifyConfig,
    Problem,
    RedisConfig,
    S3Config,
    format_duration,
    parse_host_port,
    parse_listen,
)
from backupd.errors import ConfigError

_LEVELS = {Compression.ZSTD: (1, 22), Compression.GZIP: (1, 9), Compression.NONE: (0, 22)}


def http_url_ok(url: str) -> bool:
    """An http(s) URL with a host and a valid port: urllib would also open file:// and ftp://,
    and botocore quotes a URL it cannot parse (with any credentials in it)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a bad port (or an unencoded '/' in userinfo)
    except ValueError:  # also an unclosed '[' of an IPv6 host
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def iter_errors(config: Config, data: Mapping[str, Any], env: Mapping[str, str],
                origin: str) -> Iterator[Problem]:
    """Every problem of `config` (`data` is the file's table: it tells what was given)."""
    yield from _redis(config, origin)
    yield from _redis_target(config.redis, origin)
    yield from _exclusive(config.redis, data, env, origin)
    yield from _backup(config, origin)
    yield from _retention(config, origin)
    yield from _s3(config.s3, env, origin)
    if config.metrics.listen:
        yield from _raised("metrics.listen", lambda: parse_listen(config.metrics.listen, origin))
    yield from _pitr(config, origin)
    s = config.schedule
    if s.every is not None and s.every <= 0:
        yield "schedule.every", _expected(origin, "schedule.every", "a duration > 0",
                                          format_duration(s.every))
    else:
        yield from _schedule(config, origin)
    yield from _notify(config.notify, origin)


def _pitr(config: Config, origin: str) -> Iterator[Problem]:
    for f in dataclasses.fields(config.pitr):
        value = getattr(config.pitr, f.name)
        if f.metadata.get("kind") == "duration" and value <= 0:
            key = f"pitr.{f.name}"
            yield key, _expected(origin, key, "a duration > 0", format_duration(value))
    if config.pitr.enabled and config.redis.cluster.enabled:
        yield "pitr.enabled", (f"{origin}: keys 'pitr.enabled' and 'redis.cluster.seeds' "
                               "exclude each other: point-in-time recovery follows one "
                               "server's replication stream, not a cluster's shards")


def _expected(origin: str, key: str, expected: str, got: Any) -> str:
    return f"{origin}: key {key!r}: expected {expected}, got {got!r}"


def _raised(key: str, check: Callable[[], object]) -> Iterator[Problem]:
    try:
        check()
    except ConfigError as exc:
        yield key, str(exc)


def _redis(config: Config, origin: str) -> Iterator[Problem]:
    r = config.redis
    if not 1 <= r.port <= 65535:
        yield "redis.port", _expected(origin, "redis.port", "a port number from 1 to 65535",
                                      r.port)
    if not r.data_dir and r.source == "volume":
        yield "redis.data_dir", _expected(
            origin, "redis.data_dir", "the path of the Redis data volume in this container", "")
    for key, seconds in (("redis.save_timeout", r.save_timeout),
                         ("redis.connect_timeout", r.connect_timeout),
                         ("redis.read_timeout", r.read_timeout)):
        if seconds <= 0:
            yield key, _expected(origin, key, "a duration > 0", format_duration(seconds))


def _redis_target(r: RedisConfig, origin: str) -> Iterator[Problem]:
    """How Redis is reached: TLS files need TLS; Sentinel needs a master name and host:port
    pairs (a socket against host/port is `_exclusive`, which knows what was given)."""
    if not r.tls:
        for key in ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name"):
            if getattr(r, key):
                yield f"redis.{key}", (f"{origin}: key 'redis.{key}' is set, but 'redis.tls' is "
                                       "false: set redis.tls = true to use TLS")
    if bool(r.tls_cert_file) != bool(r.tls_key_file):
        yield "redis.tls_cert_file", (
            f"{origin}: keys 'redis.tls_cert_file' and 'redis.tls_key_file' go together (a "
            "client certificate and its private key)")
    if r.socket and not r.socket.startswith("/"):
        yield "redis.socket", (f"{origin}: key 'redis.socket': expected an absolute path such "
                               f"as '/run/redis/redis.sock', got {r.socket!r}")
    if r.socket and r.tls:
        yield "redis.socket", (f"{origin}: keys 'redis.socket' and 'redis.tls' exclude each "
                               "other (TLS is for TCP connections)")
    s = r.sentinel
    if s.enabled:
        if not s.master_name:
            yield "redis.sentinel.master_name", (
                f"{origin}: key 'redis.sentinel.master_name': expected the master's name in "
                "Sentinel (e.g. 'mymaster') when redis.sentinel.hosts is set")
        for host in s.hosts:
            try:
                parse_host_port(host, "redis.sentinel.hosts", origin)
            except ConfigError as exc:
                yield "redis.sentinel.hosts", str(exc)
        if r.cluster.enabled:
            yield "redis.cluster.seeds", (f"{origin}: keys 'redis.sentinel.hosts' and "
                                          "'redis.cluster.seeds' exclude each other")
        if r.socket:
            yield "redis.socket", (f"{origin}: keys 'redis.socket' and 'redis.sentinel.hosts' "
                                   "exclude each other (Sentinel gives TCP addresses)")
    elif r.cluster.enabled:
        yield from _cluster(r, origin)
    elif r.prefer == "replica":
        yield "redis.prefer", (f"{origin}: key 'redis.prefer' = 'replica' needs "
                               "redis.sentinel.hosts (the sentinels know the replicas)")
    if s.tls and not r.tls:
        yield "redis.sentinel.tls", (f"{origin}: key 'redis.sentinel.tls' = true needs "
                                     "redis.tls = true (the sentinels use the redis.tls_* files)")


def _cluster(r: RedisConfig, origin: str) -> Iterator[Problem]:
    """A cluster is read over the replication protocol from each shard's node (no shared data
    volume), its nodes named by the seeds."""
    c = r.cluster
    for seed in c.seeds:
        try:
            parse_host_port(seed, "redis.cluster.seeds", origin)
        except ConfigError as exc:
            yield "redis.cluster.seeds", str(exc)
    if r.source != "replication":
        yield "redis.source", (f"{origin}: key 'redis.source' must be 'replication' with "
                               "redis.cluster.seeds (each shard's snapshot comes over the "
                               "network)")
    if r.socket:
        yield "redis.socket", (f"{origin}: keys 'redis.socket' and 'redis.cluster.seeds' "
                               "exclude each other (cluster nodes are TCP addresses)")
    if not 1 <= c.parallel <= 64:
        yield "redis.cluster.parallel", _expected(origin, "redis.cluster.parallel", "1..64",
                                                  c.parallel)


def _exclusive(r: RedisConfig, data: Mapping[str, Any], env: Mapping[str, str],
               origin: str) -> Iterator[Problem]:
    """`redis.socket` or `redis.sentinel.hosts` replace host/port: both given is an error."""
    table = data.get("redis", {})
    table = table if isinstance(table, Mapping) else {}
    given = [k for k in ("host", "port") if k in table or f"{ENV_PREFIX}REDIS__{k.upper()}" in env]
    if not given:
        return
    if r.socket:
        yield "redis.socket", (f"{origin}: keys 'redis.socket' and 'redis.{given[0]}' exclude "
                               "each other: a unix socket or host/port, not both")
    if r.cluster.enabled:
        yield "redis.cluster.seeds", (
            f"{origin}: keys 'redis.cluster.seeds' and 'redis.{given[0]}' exclude each other: "
            "the seeds name the cluster's nodes")
    if r.sentinel.enabled:
        yield "redis.sentinel.hosts", (
            f"{origin}: keys 'redis.sentinel.hosts' and 'redis.{given[0]}' exclude each other: "
            "under Sentinel the sentinels name the server")


def _backup(config: Config, origin: str) -> Iterator[Problem]:
    b, r = config.backup, config.redis
    if not b.dir:
        yield "backup.dir", _expected(origin, "backup.dir", "a directory path", "")
    backup_dir, data_dir = Path(b.dir).resolve(), Path(r.data_dir).resolve()
    if r.source == "volume" and (backup_dir == data_dir or data_dir in backup_dir.parents):
        yield "backup.dir", (
            f"{origin}: key 'backup.dir': {b.dir!r} is inside redis.data_dir {r.data_dir!r}; "
            "backups must live on another volume (a full data volume makes Redis refuse writes)")
    low, high = _LEVELS[b.compression]
    if not low <= b.compression_level <= high:
        yield "backup.compression_level", _expected(
            origin, "backup.compression_level", f"{low}..{high} for {b.compression}",
            b.compression_level)
    if not 0 <= b.niceness <= 19:
        yield "backup.niceness", _expected(origin, "backup.niceness", "0..19", b.niceness)
    for recipient in b.age_recipients:
        if not _is_age_recipient(recipient):
            yield "backup.age_recipients", (
                f"{origin}: key 'backup.age_recipients': expected age public keys (age1...), "
                f"got {recipient[:12]!r}...")


def _is_age_recipient(recipient: str) -> bool:
    import pyrage

    try:
        pyrage.x25519.Recipient.from_str(recipient)
    except Exception:  # pyrage raises its own error types for every parse failure
        return False
    return True


def _retention(config: Config, origin: str) -> Iterator[Problem]:
    for section, retention in (("retention", config.retention),
                               ("s3.retention", config.s3.retention)):
        for f in dataclasses.fields(retention):
            value = getattr(retention, f.name)
            if isinstance(value, int) and value < 0:
                key = f"{section}.{f.name}"
                yield key, _expected(origin, key, "a number >= 0", value)


def _s3(s3: S3Config, env: Mapping[str, str], origin: str) -> Iterator[Problem]:
    if not s3.enabled:
        return
    if not s3.prefix or not s3.prefix.endswith("/") or s3.prefix.startswith("/"):
        yield "s3.prefix", _expected(
            origin, "s3.prefix", "a non-empty prefix ending with '/' (e.g. 'redis/prod/') when "
            "s3.bucket is set, so that retention only touches backupd's objects", s3.prefix)
    if s3.max_attempts < 1:
        yield "s3.max_attempts", _expected(origin, "s3.max_attempts",
                                           "a number of attempts >= 1", s3.max_attempts)
    if not 0 <= s3.object_lock_days <= MAX_LOCK_DAYS:
        yield "s3.object_lock_days", _expected(
            origin, "s3.object_lock_days", f"a number of days from 0 to {MAX_LOCK_DAYS}",
            s3.object_lock_days)
    if s3.endpoint_url and not http_url_ok(s3.endpoint_url):  # never echoed: may hold keys
        yield "s3.endpoint_url", (f"{origin}: key 's3.endpoint_url': expected an http(s) URL "
                                  "such as https://s3.example.com (percent-encode reserved "
                                  "characters)")
    key_id = env.get(s3.access_key_id_env, "") if s3.access_key_id_env else ""
    secret = env.get(s3.secret_access_key_env, "") if s3.secret_access_key_env else ""
    if bool(key_id) != bool(secret):
        present, missing = ((s3.access_key_id_env, s3.secret_access_key_env) if key_id
                            else (s3.secret_access_key_env, s3.access_key_id_env))
        yield "s3.access_key_id_env", (f"{origin}: S3 credentials: environment variable "
                                       f"{present} is set but {missing} is not; set both or "
                                       "neither")


def _schedule(config: Config, origin: str) -> Iterator[Problem]:
    from backupd import schedule  # APScheduler, and schedule imports this module's Config

    try:
        schedule.plan(config)
    except ConfigError as exc:
        yield "schedule", f"{origin}: {exc}"


def _notify(cfg: NotifyConfig, origin: str) -> Iterator[Problem]:
    for key, url in (("notify.webhook_url", cfg.webhook_url),
                     ("notify.healthchecks_url", cfg.healthchecks_url)):
        if url and not http_url_ok(url):  # never echoed: the URL is the secret
            yield key, f"{origin}: key {key!r}: expected an http:// or https:// URL, got '***'"
    if cfg.timeout <= 0:
        yield "notify.timeout", (f"{origin}: key 'notify.timeout': expected a duration > 0 "
                                 "such as '10s'")
