"""Where Redis is and how to reach it, resolved once from the configuration.

An Endpoint is one server: a TCP address or a unix socket, the TLS context, the credentials and
the timeouts. Both kinds of client use it: redis-py clients (`Endpoint.client()`, through
`source.connect`) and raw sockets (`Endpoint.open_socket()`, for a replication-protocol
reader), so TLS, auth and timeouts mean the same thing everywhere. Under Sentinel, `resolve()`
asks the sentinels which server is the master (or a healthy replica) right now; the Endpoint
then stays fixed: a client never follows a failover on its own in the middle of a backup or a
restore (a backup from two servers would mix data).
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from backupd.config import RedisConfig, parse_host_port, redis_password
from backupd.errors import ConfigError

log = structlog.get_logger("backupd.endpoint")


@dataclass(frozen=True)
class Endpoint:
    """One server and everything needed to talk to it."""

    cfg: RedisConfig  # host/port are this server's (under Sentinel: the one resolved)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: ssl.SSLContext | None = None
    server_name: str | None = None  # the name checked against the certificate
    via: str = ""  # how it was found, for messages: "master mymaster via 3 sentinels"
    expect_role: str = ""  # what the sentinels said it is: "master", "slave" or "" (unknown)
    sentinel: dict[str, Any] = field(default_factory=dict)  # the sentinels' view (manifest)

    @property
    def where(self) -> str:
        return f"unix socket {self.cfg.socket}" if self.cfg.socket else \
            f"{self.cfg.host}:{self.cfg.port}"

    def describe(self) -> str:
        """The target for `config check`: how it was found and how it is reached."""
        how = "TLS" if self.tls is not None else "plain" if not self.cfg.socket else ""
        if self.tls is not None and self.tls.verify_mode == ssl.CERT_NONE:
            how += ", certificate NOT verified"
        elif self.tls is not None:
            how += f", certificate checked for {self.server_name!r}"
        if self.cfg.tls_cert_file and self.tls is not None:
            how += ", client certificate"
        return f"{self.via or 'Redis at ' + self.where}" + (f" ({how})" if how else "")

    def open_socket(self, read_timeout: float | None = None) -> socket.socket:
        """A connected socket (TLS handshake done), bounded by redis.connect_timeout; reads
        then time out after `read_timeout` (default redis.read_timeout)."""
        cfg = self.cfg
        if cfg.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = cfg.socket
        else:
            sock = None
            address = (cfg.host, cfg.port)
        try:
            if sock is None:
                sock = socket.create_connection(address, timeout=cfg.connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock.settimeout(cfg.connect_timeout)
                sock.connect(address)
            if self.tls is not None:  # the handshake counts as connecting
                sock = self.tls.wrap_socket(sock, server_hostname=self.server_name)
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        sock.settimeout(cfg.read_timeout if read_timeout is None else read_timeout)
        return sock

    def client(self) -> redis.Redis:
        """A redis-py client on this endpoint (not connected yet)."""
        pool = redis.ConnectionPool(
            connection_class=EndpointConnection, endpoint=self,
            host=self.cfg.socket or self.cfg.host, port=self.cfg.port,
            username=self.username, password=self.password,
            socket_connect_timeout=self.cfg.connect_timeout,
            socket_timeout=self.cfg.read_timeout, decode_responses=True, protocol=2,
            retry=Retry(NoBackoff(), 0),  # the default retries auth errors
        )
        return redis.Redis.from_pool(pool)


class EndpointConnection(redis.connection.Connection):
    """redis-py's connection, with the socket opened by Endpoint.open_socket()."""

    def __init__(self, endpoint: Endpoint, **kwargs: Any) -> None:
        self.endpoint = endpoint
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]

    def _connect(self) -> socket.socket:
        return self.endpoint.open_socket()


def tls_context(cfg: RedisConfig) -> ssl.SSLContext | None:
    """The TLS client context from the redis.tls_* keys; None without TLS."""
    if not cfg.tls:
        return None
    context = ssl.create_default_context()
    if cfg.tls_ca_file:
        _load(lambda: context.load_verify_locations(cafile=cfg.tls_ca_file),
              "redis.tls_ca_file", cfg.tls_ca_file)
    if cfg.tls_cert_file:
        check_key_file(cfg.tls_key_file)
        _load(lambda: context.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file),
              "redis.tls_cert_file", cfg.tls_cert_file, "(with redis.tls_key_file)")
    if not cfg.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _load(action: Any, key: str, path: str, extra: str = "") -> None:
    try:
        action()
    except FileNotFoundError:
        raise ConfigError(f"key {key!r}: {path} does not exist") from None
    except ssl.SSLError as exc:
        raise ConfigError(f"key {key!r}: {path} {extra} is not usable PEM: "
                          f"{exc.reason or exc}".replace("  ", " ")) from None
    except OSError as exc:
        raise ConfigError(f"key {key!r}: cannot read {path}: {exc.strerror}") from None


def check_key_file(path: str) -> None:
    """A private key readable by others is no longer private: refuse it, as ssh does."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"key 'redis.tls_key_file': cannot read {path}: "
                          f"{exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO) & ~stat.S_IRGRP:
        raise ConfigError(f"key 'redis.tls_key_file': {path} is readable or writable by "
                          f"other users (mode {stat.S_IMODE(mode):04o}); chmod 600 it")


def direct(cfg: RedisConfig, env: Mapping[str, str] | None = None, *,
           context: ssl.SSLContext | None = None) -> Endpoint:
    """The endpoint of the configured host/port or socket (no Sentinel lookup)."""
    if cfg.tls and not cfg.tls_verify:
        log.warning("tls_verify_off", where=cfg.socket or f"{cfg.host}:{cfg.port}",
                    risk="the server's certificate is not checked: anyone in the path can "
                         "read the data and the password")
    return Endpoint(
        cfg, username=cfg.username or None, password=redis_password(cfg, env),
        tls=context if context is not None else tls_context(cfg),
        server_name=(cfg.tls_server_name or cfg.host) if cfg.tls else None)


def at(base: Endpoint, host: str, port: int, via: str = "",
       view: dict[str, Any] | None = None, role: str = "") -> Endpoint:
    """The same credentials and TLS for another server (a master or replica named by Sentinel
    or by a replica's INFO)."""
    cfg = replace(base.cfg, host=host, port=port)
    name = base.cfg.tls_server_name or host if base.tls is not None else None
    return replace(base, cfg=cfg, server_name=name, via=via, expect_role=role,
                   sentinel=view if view is not None else base.sentinel)


def sentinel_endpoints(cfg: RedisConfig, env: Mapping[str, str] | None = None) -> list[Endpoint]:
    """One endpoint per configured sentinel, with the sentinels' own auth and TLS."""
    s = cfg.sentinel
    base = replace(cfg, socket="", tls=s.tls, username=s.username)
    context = tls_context(base) if s.tls else None
    password = redis_password(s, env)
    out = []
    for host_port in s.hosts:
        host, port = parse_host_port(host_port, "redis.sentinel.hosts")
        one = replace(base, host=host, port=port)
        out.append(Endpoint(one, username=s.username or None, password=password, tls=context,
                            server_name=(cfg.tls_server_name or host) if s.tls else None))
    return out
