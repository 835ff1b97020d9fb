"""Reaching Redis as production exposes it: TLS (private CA, mTLS), unix sockets, and timeouts
and config overrides that say exactly what is wrong. Real servers throughout."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backupd import config as config_mod
from backupd.errors import ConfigError
from tests.conftest import PASSWORD, RedisServer, fill, free_port, last_line, run_cli
from tests.topology import CA, Pem, SocketServer, TLSServer, tls_options


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path / "pki")


@pytest.fixture
def tls_factory(tmp_path: Path, ca: CA) -> Iterator[Callable[..., TLSServer]]:
    servers: list[TLSServer] = []

    def make(server_pem: Pem | None = None, *, auth_clients: bool = False) -> TLSServer:
        port = free_port()
        data = tmp_path / f"tls-data-{port}"
        data.mkdir()
        pem = server_pem or ca.issue("localhost")
        server = TLSServer(data, port, PASSWORD, tls_options(ca, pem, port,
                                                             auth_clients=auth_clients))
        server.ca = ca
        server.client_pem = ca.issue("harness", client=True) if auth_clients else None
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def config_for(tmp_path: Path, server: RedisServer, redis_extra: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""
[redis]
{redis_extra}
data_dir = "{server.dir}"
save_timeout = "60s"
connect_timeout = "3s"
read_timeout = "3s"

[backup]
dir = "{tmp_path / 'backups'}"
""")
    return path


def tls_keys(ca: CA, client: Pem | None = None, **extra: str) -> str:
    lines = ["tls = true", f'tls_ca_file = "{ca.pem.cert}"']
    if client is not None:
        lines += [f'tls_cert_file = "{client.cert}"', f'tls_key_file = "{client.key}"']
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    return "\n".join(lines)


def backup_ok(config: Path) -> dict[str, object]:
    proc = run_cli("-c", str(config), "backup")
    assert proc.returncode == 0, proc.stderr[-3000:]
    backup_id = last_line(proc.stdout)
    manifest: dict[str, object] = json.loads(
        (config.parent / "backups" / f"{backup_id}.json").read_text())
    return manifest


def assert_failed(proc: object, code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.stdout, proc.stderr[-3000:])  # type: ignore[attr-defined]
    err: str = proc.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in err
    assert PASSWORD not in err + proc.stdout  # type: ignore[attr-defined]
    for needle in needles:
        assert needle in err, err[-3000:]
    return err


# -- TLS ----------------------------------------------------------------------------------------


def test_backup_over_tls_with_a_private_ca(tmp_path: Path, tls_factory: Callable[..., TLSServer],
                                           ca: CA) -> None:
    server = tls_factory()
    fill(server, 500)
    config = config_for(tmp_path, server, f'host = "127.0.0.1"\nport = {server.port}\n'
                        + tls_keys(ca))
    assert backup_ok(config)["keys"] == 501


def test_mtls_needs_the_client_certificate(tmp_path: Path, ca: CA,
                                           tls_factory: Callable[..., TLSServer]) -> None:
    server = tls_factory(auth_clients=True)
    fill(server, 100)
    where = f'host = "127.0.0.1"\nport = {server.port}\n'
    without = run_cli("-c", str(config_for(tmp_path, server, where + tls_keys(ca))), "backup")
    assert_failed(without, 1, "client certificate", "redis.tls_cert_file")
    client = ca.issue("backupd", client=True)
    assert backup_ok(config_for(tmp_path, server, where + tls_keys(ca, client)))["keys"] == 101


def test_a_wrong_ca_is_a_clear_error(tmp_path: Path, tls_factory: Callable[..., TLSServer]
                                     ) -> None:
    server = tls_factory()
    other = CA(tmp_path / "other-pki", name="some other CA")
    config = config_for(tmp_path, server, f'host = "127.0.0.1"\nport = {server.port}\n'
                        + tls_keys(other))
    assert_failed(run_cli("-c", str(config), "backup"), 1, "redis.tls_ca_file",
                  "certificate was not accepted")


def test_an_expired_server_certificate_is_a_clear_error(
        tmp_path: Path, ca: CA, tls_factory: Callable[..., TLSServer]) -> None:
    server = tls_factory(ca.issue("localhost", expired=True))
    config = config_for(tmp_path, server, f'host = "127.0.0.1"\nport = {server.port}\n'
                        + tls_keys(ca))
    assert_failed(run_cli("-c", str(config), "backup"), 1, "certificate has expired")


def test_tls_server_name_is_what_the_certificate_is_checked_against(
        tmp_path: Path, ca: CA, tls_factory: Callable[..., TLSServer]) -> None:
    server = tls_factory(ca.issue("localhost"))  # valid for localhost and 127.0.0.1 only
    where = f'host = "127.0.0.1"\nport = {server.port}\n'
    wrong = config_for(tmp_path, server, where + tls_keys(ca, tls_server_name="redis.internal"))
    assert_failed(run_cli("-c", str(wrong), "backup"), 1, "redis.tls_server_name")
    right = config_for(tmp_path, server, where + tls_keys(ca, tls_server_name="localhost"))
    backup_ok(right)


def test_tls_verify_false_connects_and_warns(tmp_path: Path, ca: CA,
                                             tls_factory: Callable[..., TLSServer]) -> None:
    server = tls_factory()
    config = config_for(tmp_path, server, f'host = "127.0.0.1"\nport = {server.port}\n'
                        "tls = true\ntls_verify = false")
    proc = run_cli("-c", str(config), "backup")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"tls_verify_off"' in proc.stderr


def test_a_world_readable_key_file_is_refused(tmp_path: Path, ca: CA,
                                              tls_factory: Callable[..., TLSServer]) -> None:
    server = tls_factory(auth_clients=True)
    client = ca.issue("backupd", client=True)
    client.key.chmod(0o644)
    config = config_for(tmp_path, server, f'host = "127.0.0.1"\nport = {server.port}\n'
                        + tls_keys(ca, client))
    err = assert_failed(run_cli("-c", str(config), "backup"), 2, "redis.tls_key_file",
                        "chmod 600")
    assert "PRIVATE KEY" not in err and client.key.read_text()[40:80] not in err


def test_tls_to_a_plain_port_is_clear(
        tmp_path: Path, ca: CA, redis_factory: Callable[..., RedisServer]) -> None:
    plain = redis_factory()
    config = config_for(tmp_path, plain, f'host = "127.0.0.1"\nport = {plain.port}\n'
                        + tls_keys(ca))
    assert_failed(run_cli("-c", str(config), "backup"), 1, "redis.connect_timeout 3s",
                  "is this port a TLS port?")


# -- unix socket ----------------------------------------------------------------------------------


def test_backup_through_a_unix_socket(tmp_path: Path) -> None:
    data = tmp_path / "sock-data"
    data.mkdir()
    server = SocketServer(data, free_port(), PASSWORD)
    server.start()
    try:
        fill(server, 300)
        config = config_for(tmp_path, server, f'socket = "{server.socket}"')
        manifest = backup_ok(config)
        assert manifest["keys"] == 301
        check = run_cli("-c", str(config), "config", "check")
        assert f"unix socket {server.socket}" in check.stdout
    finally:
        server.stop()


def test_a_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[redis]\nsocket = "{tmp_path}/nothing.sock"\ndata_dir = "{tmp_path}/d"\n'
                    f'[backup]\ndir = "{tmp_path}/b"\n')
    assert_failed(run_cli("-c", str(path), "backup"), 1, f"unix socket {tmp_path}/nothing.sock")


def test_socket_and_host_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[redis]\nsocket = "/run/redis/redis.sock"\nhost = "redis"\n')
    with pytest.raises(ConfigError, match=r"'redis.socket' and 'redis.host' exclude each other"):
        config_mod.load(path, env={})
    with pytest.raises(ConfigError, match=r"'redis.socket' and 'redis.port'"):
        config_mod.load(None, env={"BACKUPD_REDIS__SOCKET": "/run/r.sock",
                                   "BACKUPD_REDIS__PORT": "6380"})
    assert config_mod.load(None, env={"BACKUPD_REDIS__SOCKET": "/run/r.sock"}).redis.socket


# -- config honesty -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "closest"), [
    ("BACKUPD_REDIS__PROT", "BACKUPD_REDIS__PORT"),
    ("BACKUPD_REDIS_PORT", "BACKUPD_REDIS__PORT"),
    ("BACKUPD_S3__BUCKIT", "BACKUPD_S3__BUCKET"),
    ("BACKUPD_REDIS__SENTINEL__MASTERNAME", "BACKUPD_REDIS__SENTINEL__MASTER_NAME"),
])
def test_an_unknown_override_variable_names_the_closest_key(name: str, closest: str) -> None:
    with pytest.raises(ConfigError, match=rf"{name} is not a configuration key; did you mean "
                                          rf"{closest}"):
        config_mod.load(None, env={name: "1"})


def test_unrelated_backupd_variables_are_left_alone() -> None:
    cfg = config_mod.load(None, env={"BACKUPD_CONFIG": "", "BACKUPD_PAUSE_AT": "copy"})
    assert cfg.redis.port == 6379


def test_an_unknown_override_exits_2_from_the_cli(tmp_path: Path) -> None:
    proc = run_cli("config", "check", env={"BACKUPD_REDIS__PROT": "1"})
    assert proc.returncode == 2
    assert "BACKUPD_REDIS__PROT" in proc.stderr and "redis.port" in proc.stderr


def test_a_frozen_redis_names_read_timeout(tmp_path: Path,
                                           redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory()
    config = config_for(tmp_path, server, f'host = "127.0.0.1"\nport = {server.port}')
    assert server.proc is not None
    server.proc.send_signal(19)  # SIGSTOP: the port accepts, nothing answers
    try:
        proc = run_cli("-c", str(config), "backup", timeout=30)
    finally:
        server.proc.send_signal(18)  # SIGCONT
    err = assert_failed(proc, 1, "redis.read_timeout 3s")
    assert "connect_timeout" not in err.split('"event": "backup_failed"')[-1]


@pytest.mark.parametrize(("extra", "message"), [
    ('tls_ca_file = "/x.pem"', "'redis.tls_ca_file' is set, but 'redis.tls' is false"),
    ('tls = true\ntls_cert_file = "/c.pem"', "'redis.tls_cert_file' and 'redis.tls_key_file'"),
    ('socket = "run/redis.sock"', "expected an absolute path"),
    ('prefer = "replica"', "needs redis.sentinel.hosts"),
    ('[redis.sentinel]\nhosts = ["127.0.0.1:26379"]', "redis.sentinel.master_name"),
    ('[redis.sentinel]\nmaster_name = "m"\nhosts = ["nope"]', "HOST:PORT"),
])
def test_connection_settings_are_validated(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[redis]\n{extra}\n")
    with pytest.raises(ConfigError, match=message):
        config_mod.load(path, env={})


def test_a_loading_server_is_a_typed_error_not_a_matched_text() -> None:
    """redis-py reports -LOADING as BusyLoadingError (a ConnectionError): the restore's probes
    tell "loading" from "down" by the type backupd raises for it."""
    import redis

    from backupd import source
    from backupd.errors import RedisLoading, RedisUnavailable

    cfg = config_mod.load(None, env={}).redis
    with pytest.raises(RedisLoading, match="cannot connect to"), source.redis_errors(cfg, True):
        raise redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory")
    with pytest.raises(RedisUnavailable) as down, source.redis_errors(cfg, True):
        raise redis.exceptions.ConnectionError("Connection refused")
    assert not isinstance(down.value, RedisLoading)
