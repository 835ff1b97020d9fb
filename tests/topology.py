"""Production-shaped Redis for tests: a private CA with server and client certificates, a
TLS-only server, a socket-only server, and a Sentinel setup (master, replica, 3 sentinels)."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import PASSWORD, REDIS_SERVER, RedisServer, fill, free_port, wait_until

MASTER_NAME = "mymaster"


@dataclass
class Pem:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return Pem(cert_path, key_path)


@dataclass
class CA:
    """A certificate authority made in the test; issues server and client certificates."""

    dir: Path
    name: str = "backupd test CA"
    pem: Pem = field(init=False)
    _key: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    _cert: x509.Certificate = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (x509.CertificateBuilder().subject_name(_name(self.name))
                      .issuer_name(_name(self.name)).public_key(self._key.public_key())
                      .serial_number(x509.random_serial_number())
                      .not_valid_before(now - datetime.timedelta(days=1))
                      .not_valid_after(now + datetime.timedelta(days=30))
                      .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                      .add_extension(x509.KeyUsage(
                          digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), True)
                      .sign(self._key, hashes.SHA256()))
        self.pem = _write(self.dir / self.name.replace(" ", "-"), self._cert, self._key)

    def issue(self, cn: str, *, expired: bool = False, client: bool = False) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = ((now - datetime.timedelta(days=10), now - datetime.timedelta(days=1))
                      if expired else (now - datetime.timedelta(hours=1),
                                       now + datetime.timedelta(days=30)))
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(self.name))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end))
        if not client:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False)
        cert = builder.sign(self._key, hashes.SHA256())
        return _write(self.dir / f"{cn}{'-expired' if expired else ''}", cert, key)


def tls_options(ca: CA, server: Pem, port: int, *, auth_clients: bool) -> list[str]:
    """redis-server options for a TLS-only server on `port` (the plain port is off)."""
    return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(server.cert),
            "--tls-key-file", str(server.key), "--tls-ca-cert-file", str(ca.pem.cert),
            "--tls-auth-clients", "yes" if auth_clients else "no"]


class TLSServer(RedisServer):
    """A RedisServer that answers on TLS only; the harness talks to it with the CA."""

    ca: CA | None = None
    client_pem: Pem | None = None

    def argv(self) -> list[str]:
        argv = super().argv()
        at = argv.index("--port")
        del argv[at:at + 2]  # tls_options() sets --port 0 and --tls-port
        return argv

    def client(self) -> redis.Redis:
        assert self.ca is not None
        return redis.Redis(
            port=self.port, password=self.password, decode_responses=True, socket_timeout=10,
            protocol=2, ssl=True, ssl_cert_reqs="none",  # the harness, even when expired
            ssl_certfile=str(self.client_pem.cert) if self.client_pem else None,
            ssl_keyfile=str(self.client_pem.key) if self.client_pem else None)


class SocketServer(RedisServer):
    """A RedisServer with its TCP port off: only its unix socket answers."""

    @property
    def socket(self) -> Path:
        return self.dir / "redis.sock"

    def argv(self) -> list[str]:
        argv = super().argv()
        argv[argv.index("--port") + 1] = "0"
        return [*argv, "--unixsocket", str(self.socket), "--unixsocketperm", "700"]

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), password=self.password,
                           decode_responses=True, socket_timeout=10, protocol=2)


@dataclass
class Sentinel:
    dir: Path
    port: int
    master_port: int
    down_after_ms: int = 2000
    password: str | None = None  # the sentinel's own requirepass
    tls: tuple[CA, Pem] | None = None  # TLS only, also to the servers (tls-replication)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "sentinel.conf"
        if not conf.exists():  # a restarted sentinel keeps what it learnt (it rewrites it)
            conf.write_text(
                (f"port {self.port}\n" if self.tls is None else
                 f"port 0\ntls-port {self.port}\ntls-replication yes\n"
                 f"tls-auth-clients no\ntls-cert-file {self.tls[1].cert}\n"
                 f"tls-key-file {self.tls[1].key}\ntls-ca-cert-file {self.tls[0].pem.cert}\n")
                + f"bind 127.0.0.1\ndir {self.dir}\n"
                f"logfile {self.dir / 'sentinel.log'}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel auth-pass {MASTER_NAME} {PASSWORD}\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                + (f"requirepass {self.password}\nsentinel sentinel-pass {self.password}\n"
                   if self.password else ""))
        self.proc = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, 10, f"sentinel on port {self.port}")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, decode_responses=True,
                           socket_timeout=5, protocol=2, ssl=self.tls is not None,
                           ssl_cert_reqs="none")

    def answers(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    def master(self) -> tuple[str, int]:
        with self.client() as client:
            host, port = client.sentinel_get_master_addr_by_name(MASTER_NAME)
        return str(host), int(port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@dataclass
class SentinelSetup:
    """A master and a replica sharing one data dir (different dbfilename: the file-based
    backup follows whichever is master), watched by three sentinels."""

    master: RedisServer
    replica: RedisServer
    sentinels: list[Sentinel]

    @property
    def hosts(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def current_master(self) -> RedisServer:
        port = self.sentinels[0].master()[1]
        return self.master if self.master.port == port else self.replica

    def other(self, server: RedisServer) -> RedisServer:
        return self.replica if server is self.master else self.master

    def wait_settled(self, timeout: float = 30) -> None:
        """Every sentinel knows the replica and the other sentinels, the replica is synced."""
        def settled() -> bool:
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    state = client.sentinel_master(MASTER_NAME)
                if int(state.get("num-slaves", 0)) < 1 or \
                        int(state.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                    return False
            replica = self.other(self.current_master())
            info = replica.client().info("replication")
            return bool(info.get("master_link_status") == "up")
        wait_until(settled, timeout, "the sentinels to discover each other and the replica")

    def failover(self) -> RedisServer:
        """A real failover (SENTINEL FAILOVER); returns the new master once all agree."""
        old = self.current_master()
        new = self.other(old)
        with self.sentinels[0].client() as client:
            client.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        wait_until(lambda: all(s.master()[1] == new.port for s in self.sentinels
                               if s.proc is not None), 30, "all sentinels to see the new master")
        wait_until(lambda: new.client().info("replication")["role"] == "master", 30,
                   "the new master to report role:master")
        return new


@contextlib.contextmanager
def sentinel_topology(tmp_path: Path, redis_factory: Callable[..., RedisServer],
                      keys: int = 400, password: str | None = None) -> Iterator[SentinelSetup]:
    """A settled SentinelSetup with `keys` (+1) keys; the sentinels stopped afterwards (the
    servers belong to redis_factory). `password`: the sentinels' own requirepass."""
    setup = sentinel_setup(tmp_path, redis_factory, password)
    try:
        fill(setup.master, keys)
        setup.wait_settled()
        yield setup
    finally:
        for sentinel in setup.sentinels:
            sentinel.stop()


def sentinel_config(tmp_path: Path, topo: SentinelSetup, redis_extra: str = "",
                    extra: str = "") -> Path:
    """A config that finds the master through the three sentinels (no host/port)."""
    path = tmp_path / "config.toml"
    path.write_text(f"""
[redis]
data_dir = "{topo.master.dir}"
save_timeout = "60s"
connect_timeout = "3s"
read_timeout = "5s"
{redis_extra}

[redis.sentinel]
hosts = {json.dumps(topo.hosts)}
master_name = "{MASTER_NAME}"

[backup]
dir = "{tmp_path / 'backups'}"
{extra}
""")
    return path


def tls_sentinel_setup(tmp_path: Path, ca: CA) -> SentinelSetup:
    """SentinelSetup on TLS only: master, replica (tls-replication) and sentinels; the caller
    starts nothing more and stops everything (stop_all)."""
    shared = tmp_path / "data"
    shared.mkdir()
    pem = ca.issue("localhost")
    servers = []
    master_port = free_port()
    for name, port, extra in (("master", master_port, []),
                              ("replica", free_port(),
                               ["--replicaof", "127.0.0.1", str(master_port)])):
        server = TLSServer(shared, port, PASSWORD, [
            *tls_options(ca, pem, port, auth_clients=False), "--tls-replication", "yes",
            "--masterauth", PASSWORD, "--dbfilename", f"{name}.rdb", *extra])
        server.ca = ca
        server.start()
        servers.append(server)
    sentinels = []
    for i in range(3):
        sentinel = Sentinel(tmp_path / f"sentinel{i}", free_port(), master_port,
                            tls=(ca, pem))
        sentinel.start()
        sentinels.append(sentinel)
    return SentinelSetup(servers[0], servers[1], sentinels)


def stop_all(setup: SentinelSetup) -> None:
    for sentinel in setup.sentinels:
        sentinel.stop()
    setup.replica.stop()
    setup.master.stop()


def sentinel_setup(tmp_path: Path, redis_factory: Callable[..., RedisServer],
                   password: str | None = None) -> SentinelSetup:
    shared = tmp_path / "data"
    common = ("--masterauth", PASSWORD, "--repl-diskless-sync", "no")
    master = redis_factory(*common, "--dbfilename", "master.rdb")
    replica = redis_factory(*common, "--dbfilename", "replica.rdb",
                            "--replicaof", "127.0.0.1", str(master.port))
    assert master.dir == replica.dir == shared
    sentinels = []
    for i in range(3):
        sentinel = Sentinel(tmp_path / f"sentinel{i}", free_port(), master.port,
                            password=password)
        sentinel.start()
        sentinels.append(sentinel)
    return SentinelSetup(master, replica, sentinels)
