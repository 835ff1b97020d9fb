"""Configuration: a TOML file plus `BACKUPD_<SECTION>__<KEY>` environment overrides.

Every section is a frozen dataclass; the loader walks the dataclass fields, so the schema, the
defaults and the type checks live in one place, and `config_checks` holds the checks that span
values. Every error names the file, the key and what was expected; all of them are raised
together as one ConfigError (exit code 2), never as a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from backupd.choices import Checksum, Compression, RestoreMethod
from backupd.choices import values as choice_values
from backupd.errors import ConfigError

ENV_PREFIX = "BACKUPD_"
CONFIG_ENV = "BACKUPD_CONFIG"

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Longer durations overflow socket timeouts and datetimes at run time, after `config check`
# said valid; nobody means them.
MAX_DURATION, MAX_DURATION_TEXT = 3650 * 86400.0, "3650d"
MAX_LOCK_DAYS = 36500


def parse_duration(text: str) -> float:
    """Parse `90s`, `15m`, `2h`, `1d` (a bare number is seconds) into seconds."""
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (expected e.g. 90s, 15m, 2h, 1d)")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not seconds <= MAX_DURATION:  # also inf (400 digits): sockets and dates overflow
        raise ValueError(f"{text[:20]!r} is longer than {MAX_DURATION_TEXT}")
    return seconds


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"


def _duration(default: str, *, optional: bool = False) -> Any:
    value: float | None = None if optional and not default else parse_duration(default)
    return field(default=value, metadata={"kind": "duration", "optional": optional})


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": choices})


def _secret(default: str = "") -> Any:
    return field(default=default, metadata={"secret": True})


def _strings(*default: str) -> Any:
    return field(default_factory=lambda: list(default), metadata={"kind": "strings"})


@dataclass(frozen=True)
class SentinelConfig:
    hosts: list[str] = _strings()  # "host:port" of each sentinel; empty = no Sentinel
    master_name: str = ""
    username: str = ""
    password_env: str = ""
    password_file: str = ""
    tls: bool = False  # with redis.tls_ca_file / tls_cert_file / tls_key_file / tls_verify
    failover_hold_off: float = _duration("15m")

    @property
    def enabled(self) -> bool:
        return bool(self.hosts)


@dataclass(frozen=True)
class ClusterConfig:
    seeds: list[str] = _strings()  # "host:port" of some cluster nodes; empty = no cluster
    parallel: int = 3  # shards whose snapshot is taken at the same time

    @property
    def enabled(self) -> bool:
        return bool(self.seeds)


@dataclass(frozen=True)
class RedisConfig:
    host: str = "127.0.0.1"
    port: int = 6379
    socket: str = ""
    username: str = ""
    password_env: str = "REDIS_PASSWORD"  # noqa: S105 - a variable name
    password_file: str = ""
    tls: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_server_name: str = ""
    tls_verify: bool = True
    source: str = _choice("volume", "volume", "replication")
    data_dir: str = "/data"
    # Redis's file names, for a restore where CONFIG GET cannot tell them (CONFIG renamed).
    dbfilename: str = ""
    appenddirname: str = ""
    appendfilename: str = ""
    save_timeout: float = _duration("15m")
    connect_timeout: float = _duration("10s")
    read_timeout: float = _duration("30s")
    follow_save: bool = True
    prefer: str = _choice("master", "master", "replica")
    allow_stale_replica: bool = False
    replica_max_io_age: float = _duration("30s")
    sentinel: SentinelConfig = field(default_factory=SentinelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


@dataclass(frozen=True)
class BackupConfig:
    dir: str = "/backups"
    compression: Compression = Compression.ZSTD
    compression_level: int = 3
    age_recipients: list[str] = _strings()
    niceness: int = 10


@dataclass(frozen=True)
class RetentionConfig:
    keep_last: int = 24
    keep_hourly: int = 0
    keep_daily: int = 7
    keep_weekly: int = 4
    keep_monthly: int = 6
    keep_yearly: int = 0
    keep_within: float | None = _duration("", optional=True)


@dataclass(frozen=True)
class S3Config:
    bucket: str = ""
    prefix: str = ""
    endpoint_url: str = _secret()
    region: str = "us-east-1"
    addressing_style: str = _choice("auto", "auto", "path", "virtual")
    access_key_id_env: str = "AWS_ACCESS_KEY_ID"
    secret_access_key_env: str = "AWS_SECRET_ACCESS_KEY"  # noqa: S105
    storage_class: str = ""
    sse: str = _choice("", "", "AES256", "aws:kms")
    sse_kms_key_id: str = ""
    object_lock_days: int = 0
    object_lock_mode: str = _choice("GOVERNANCE", "GOVERNANCE", "COMPLIANCE")
    checksum: Checksum = Checksum.SHA256
    keep_local: bool = True
    connect_timeout: float = _duration("10s")
    read_timeout: float = _duration("60s")
    max_attempts: int = 5  # per request, botocore "standard" retries with backoff
    retention: RetentionConfig = field(default_factory=RetentionConfig)

    @property
    def enabled(self) -> bool:
        return bool(self.bucket)


@dataclass(frozen=True)
class RestoreConfig:
    method: RestoreMethod = RestoreMethod.SHUTDOWN
    replicaof_announce_host: str = "127.0.0.1"
    docker_url: str = "unix:///var/run/docker.sock"
    docker_container: str = ""
    compose_project: str = ""
    compose_service: str = "redis"
    stop_timeout: float = _duration("60s")
    start_timeout: float = _duration("5m")
    answer_timeout: float = _duration("10s")  # silent this long after the start = dead
    stop_command: list[str] = _strings()
    start_command: list[str] = _strings()
    command_timeout: float = _duration("2m")


@dataclass(frozen=True)
class VerifyConfig:
    redis_server: str = "redis-server"
    redis_check_rdb: str = "redis-check-rdb"


@dataclass(frozen=True)
class KeysConfig:
    """How `diff` and `inspect` group keys into prefixes."""

    separator: str = ":"
    prefix_depth: int = 0  # 0: everything before the last separator; N: the first N parts


@dataclass(frozen=True)
class ScheduleConfig:
    cron: str = "0 * * * *"
    every: float | None = _duration("", optional=True)
    timezone: str = "UTC"
    jitter: float = _duration("0s")
    run_on_start: bool = False
    prune: bool = True
    drill: str = ""
    misfire_grace: float = _duration("10m")
    shutdown_grace: float = _duration("60s")


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "0.0.0.0:9721"
    max_age: float = _duration("2h")


@dataclass(frozen=True)
class NotifyConfig:
    webhook_url: str = _secret()
    on_success: bool = False
    healthchecks_url: str = _secret()
    timeout: float = _duration("10s")


@dataclass(frozen=True)
class LogConfig:
    format: str = _choice("auto", "auto", "json", "console")
    level: str = _choice("info", "debug", "info", "warning", "error")


@dataclass(frozen=True)
class PitrConfig:
    """Continuous backup: a replication link that writes the command stream as segments."""

    enabled: bool = False
    fsync: float = _duration("1s")
    segment: float = _duration("5m")
    upload_interval: float = _duration("10s")
    max_lag: float = _duration("30s")
    window: float = _duration("7d")
    # A replica whose last ACK is older than the master's min-replicas-max-lag (10 s by default)
    # is not counted for min-replicas-to-write; one silent for repl-timeout (60 s) is dropped.
    ack_interval: float = _duration("1s")


@dataclass(frozen=True)
class Config:
    redis: RedisConfig = field(default_factory=RedisConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    s3: S3Config = field(default_factory=S3Config)
    restore: RestoreConfig = field(default_factory=RestoreConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    log: LogConfig = field(default_factory=LogConfig)
    pitr: PitrConfig = field(default_factory=PitrConfig)
    source: str = field(default="(defaults)", metadata={"internal": True})


Problem = tuple[str, str]  # (the key it names, the operator's sentence)


class _Invalid(Exception):
    """A value has the wrong type or form; carries what is expected."""


_TYPES: dict[type[Any], dict[str, Any]] = {}


def _types(cls: type[Any]) -> dict[str, Any]:
    """The fields' types, resolved (the annotations are strings under `from __future__`)."""
    if cls not in _TYPES:
        _TYPES[cls] = typing.get_type_hints(cls)
    return _TYPES[cls]


def _coerce(f: dataclasses.Field[Any], annotation: Any, value: Any, from_env: bool) -> Any:
    kind = f.metadata.get("kind")
    if kind == "duration":
        if isinstance(value, int | float) and not isinstance(value, bool) and not from_env:
            if not 0 <= value <= MAX_DURATION:  # also TOML's nan and inf
                raise _Invalid(f"a duration from 0 to {MAX_DURATION_TEXT}")
            return float(value)
        if not isinstance(value, str):
            raise _Invalid("a duration string such as 90s, 15m, 2h or 1d")
        if value.strip() == "" and f.metadata.get("optional"):
            return None
        try:
            return parse_duration(value)
        except ValueError:
            raise _Invalid(f"a duration such as 90s, 15m, 2h or 1d (at most "
                           f"{MAX_DURATION_TEXT})") from None
    if kind == "strings":
        if from_env and isinstance(value, str):
            value = _env_list(value)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Invalid("a list of strings")
        return list(value)
    if annotation is bool:
        if from_env and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
        if not isinstance(value, bool):
            raise _Invalid("true or false")
        return value
    if annotation is int:
        if from_env and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise _Invalid("an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid("an integer")
        return value
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        if not isinstance(value, str):
            raise _Invalid("a string")
        if value not in choice_values(annotation):
            raise _Invalid("one of " + ", ".join(repr(c) for c in choice_values(annotation)))
        return annotation(value)
    if annotation is str:
        if not isinstance(value, str):
            raise _Invalid("a string")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise _Invalid("one of " + ", ".join(repr(c) for c in choices))
        return value
    raise _Invalid(f"a value of type {annotation}")  # pragma: no cover - schema bug


def _env_list(text: str) -> list[str]:
    """Env lists are a TOML array (`["a", "b"]`) or comma-separated (`a,b`)."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = tomllib.loads(f"v = {stripped}")["v"]
        except tomllib.TOMLDecodeError:
            raise _Invalid('a TOML array such as ["a", "b"]') from None
        return value if isinstance(value, list) else []
    return [part.strip() for part in stripped.split(",") if part.strip()]


def _build(cls: type[Any], data: Mapping[str, Any], env: Mapping[str, str], path: str,
           origin: str, problems: list[Problem]) -> Any:
    """The section `cls` from `data` and `env`; a value in error is reported in `problems` and
    left at its default, so that every other key is still read and checked."""
    if not isinstance(data, Mapping):
        problems.append((path, f"{origin}: [{path}] must be a table"))
        data = {}
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for name in sorted(set(data) - set(fields)):
        where = f"[{path}]" if path else "the top level"
        problems.append((_dotted(path, name), f"{origin}: unknown key {_dotted(path, name)!r} "
                         f"in {where} (known keys: {', '.join(sorted(fields))})"))
    values: dict[str, Any] = {}
    for name, f in fields.items():
        dotted = _dotted(path, name)
        if isinstance(f.default_factory, type):  # a nested section
            values[name] = _build(f.default_factory, data.get(name, {}), env, dotted, origin,
                                  problems)
            continue
        env_name = ENV_PREFIX + dotted.upper().replace(".", "__")
        if env_name in env:
            raw, source, from_env = env[env_name], f"environment variable {env_name}", True
        elif name in data:
            raw, source, from_env = data[name], origin, False
        else:
            continue
        try:
            values[name] = _coerce(f, _types(cls)[name], raw, from_env)
        except _Invalid as exc:
            problems.append((dotted, f"{source}: key {dotted!r}: expected {exc}, "
                             f"got {_show(f, raw)}"))
    return cls(**values)


def _dotted(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _show(f: dataclasses.Field[Any], raw: Any) -> str:
    return "'***'" if f.metadata.get("secret") else repr(raw)[:80]


def load(path: str | os.PathLike[str] | None = None,
         env: Mapping[str, str] | None = None) -> Config:
    """Load and validate the configuration: one ConfigError listing every problem found (the
    file's, the environment's and `config_checks`'), each naming its key."""
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {origin} does not exist") from None
        except (PermissionError, IsADirectoryError) as exc:
            raise ConfigError(f"config file {origin} cannot be read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {origin} is not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {origin} is not UTF-8 text") from None
    from backupd import config_checks  # it imports this module's sections

    problems = list(_unknown_env_names(env))
    config: Config = _build(Config, data, env, "", origin, problems)
    config = dataclasses.replace(config, source=origin)
    reported = {key for key, _ in problems}  # left at a default: its checks would mislead
    problems += [problem for problem in config_checks.iter_errors(config, data, env, origin)
                 if problem[0] not in reported]
    if len(problems) == 1:
        raise ConfigError(problems[0][1])
    if problems:
        raise ConfigError(f"{len(problems)} configuration errors: "
                          + "; ".join(message for _, message in problems))
    return config


def _env_names(cls: type[Any], path: str = "") -> dict[str, str]:
    """Every override variable of the schema: BACKUPD_REDIS__PORT -> redis.port."""
    names: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        dotted = _dotted(path, f.name)
        if isinstance(f.default_factory, type):
            names.update(_env_names(f.default_factory, dotted))
        else:
            names[ENV_PREFIX + dotted.upper().replace(".", "__")] = dotted
    return names


def _unknown_env_names(env: Mapping[str, str]) -> Iterator[Problem]:
    """An override with a typo is an error, as the same typo in the file is: a variable that
    looks like one (`BACKUPD_<SECTION>__...` or `BACKUPD_<SECTION>_...`) must name a key."""
    known = _env_names(Config)
    sections = tuple(ENV_PREFIX + f.name.upper() + "_" for f in dataclasses.fields(Config)
                     if isinstance(f.default_factory, type))
    for name in sorted(env):
        if name in known or not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        if "__" in name or name.startswith(sections):
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = (f"did you mean {close[0]} (key {known[close[0]]!r})?" if close
                    else "see config.example.toml for the keys")
            yield name, (f"environment variable {name} is not a configuration key; "
                         f"{hint} (overrides are BACKUPD_<SECTION>__<KEY>)")


def parse_host_port(text: str, key: str, origin: str = "config") -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() \
            or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{origin}: key {key!r}: expected HOST:PORT such as "
                          f"'10.0.0.5:26379', got {text!r}")
    return host.strip("[]"), int(port)


def parse_listen(listen: str, origin: str = "config") -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{origin}: key 'metrics.listen': expected HOST:PORT such as "
                          f"'0.0.0.0:9721', got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - a sidecar port


def redis_password(config: RedisConfig | SentinelConfig,
                   env: Mapping[str, str] | None = None) -> str | None:
    """The password from `password_file` or the env var named by `password_env` (of Redis,
    or of the sentinels)."""
    env = os.environ if env is None else env
    section = "redis.sentinel" if isinstance(config, SentinelConfig) else "redis"
    if config.password_file:
        try:
            return Path(config.password_file).read_text(encoding="utf-8").strip("\r\n")
        except OSError as exc:
            raise ConfigError(f"key '{section}.password_file': cannot read "
                              f"{config.password_file}: {exc.strerror}") from None
    if config.password_env:
        return env.get(config.password_env) or None
    return None


def effective(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, secrets shown as '***'."""
    def walk(obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = walk(value)
            elif f.metadata.get("secret") and value:
                out[f.name] = "***"
            elif f.metadata.get("kind") == "duration":
                out[f.name] = "" if value is None else format_duration(value)
            else:
                out[f.name] = value
        return out

    return walk(config)
