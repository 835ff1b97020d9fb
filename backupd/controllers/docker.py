"""The `docker` method: stop and start the Redis container through the Docker Engine API.

Needs the engine socket, which is root-equivalent on the host: opt-in only, ideally through a
socket proxy that allows just inspect/start/stop (see the README). The container is found by
name, or by the compose labels `com.docker.compose.project` / `com.docker.compose.service`
because compose v1 and v2 name containers differently. The SDK's HTTP read timeout is the client
timeout, and `stop` blocks for up to the stop grace period, so the client timeout is set above
`restore.stop_timeout` (docker SDK 7.2: the read timeout is the client's timeout + 10 s).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from backupd.config import RestoreConfig
from backupd.controllers.base import poll_until
from backupd.errors import ConfigError, RestoreError

CLIENT_TIMEOUT_MARGIN = 30.0
RUNNING_STATES = ("running", "restarting", "paused")
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
ONEOFF_LABEL = "com.docker.compose.oneoff"

ClientFactory = Callable[[str, int], Any]


def _sdk_client(base_url: str, timeout: int) -> Any:
    import docker

    return docker.DockerClient(base_url=base_url, timeout=timeout)


def _errors() -> tuple[type[BaseException], ...]:
    """The docker SDK's errors, plus OSError (requests' exceptions derive from it)."""
    import docker

    return (docker.errors.DockerException, OSError)


class DockerController:
    name = "docker"
    swap_while_running = False

    def __init__(self, cfg: RestoreConfig, client_factory: ClientFactory = _sdk_client) -> None:
        self.cfg = cfg
        self._factory = client_factory
        self._client: Any = None
        self._container: Any = None
        self._project = cfg.compose_project

    @property
    def client_timeout(self) -> int:
        """Larger than the stop grace period: the stop call blocks for that long."""
        return int(self.cfg.stop_timeout + CLIENT_TIMEOUT_MARGIN)

    def describe(self) -> str:
        return f"docker: container {self._target()} via {_safe_url(self.cfg.docker_url)}"

    def _target(self) -> str:
        if self.cfg.docker_container:
            return repr(self.cfg.docker_container)
        return (f"with labels {PROJECT_LABEL}={self._project or '?'}, "
                f"{SERVICE_LABEL}={self.cfg.compose_service}")

    def check(self) -> None:
        if not self.cfg.docker_container and not self.cfg.compose_project:
            with self._api("inspect this container's compose labels"):
                self._project = self._own_project()
            if not self._project:
                raise ConfigError(
                    "restore.method is 'docker' but neither key 'restore.docker_container' "
                    "nor 'restore.compose_project' is set, and this container has no compose "
                    "project label to take it from")
        self.container()

    def _own_project(self) -> str:
        """Inside compose, this sidecar's own project label names the Redis service's project."""
        import docker

        try:
            own = self._connect().containers.get(socket.gethostname())
        except docker.errors.NotFound:
            return ""
        return str(own.labels.get(PROJECT_LABEL, ""))

    def container(self) -> Any:
        """The Redis container (looked up once per restore)."""
        if self._container is None:
            with self._api("find the Redis container"):
                self._container = self._find()
        return self._container

    def _find(self) -> Any:
        client = self._connect()
        if self.cfg.docker_container:
            import docker

            try:
                return client.containers.get(self.cfg.docker_container)
            except docker.errors.NotFound:
                raise RestoreError(f"no container named {self.cfg.docker_container!r} "
                                   "(key 'restore.docker_container')") from None
        labels = [f"{PROJECT_LABEL}={self._project}",
                  f"{SERVICE_LABEL}={self.cfg.compose_service}"]
        found = [c for c in client.containers.list(all=True, filters={"label": labels})
                 if str(c.labels.get(ONEOFF_LABEL, "False")).lower() != "true"]
        if len(found) != 1:
            raise RestoreError(
                f"expected one container {self._target()}, found {len(found)}"
                + ("; set restore.docker_container to the one to restore" if found else
                   " (check restore.compose_project / compose_service)"))
        return found[0]

    def _connect(self) -> Any:
        if self._client is None:
            self._client = self._factory(self.cfg.docker_url, self.client_timeout)
        return self._client

    def _api(self, action: str) -> contextlib.AbstractContextManager[None]:
        return _api_errors(action, _safe_url(self.cfg.docker_url))

    def is_running(self) -> bool:
        with self._api("inspect the Redis container"):
            container = self.container()
            container.reload()
            return str(container.status) in RUNNING_STATES

    def server_version(self) -> str | None:
        """REDIS_VERSION from the image's environment (the official image sets it)."""
        with self._api("inspect the Redis container"):
            env = self.container().attrs.get("Config", {}).get("Env") or []
        for item in env:
            name, _, value = str(item).partition("=")
            if name == "REDIS_VERSION" and value:
                return value
        return None

    def stop(self) -> None:
        with self._api("stop the Redis container"):
            self.container().stop(timeout=int(self.cfg.stop_timeout))
        poll_until(lambda: not self.is_running(), self.cfg.stop_timeout,
                   f"container {self._target()} to stop")

    def start(self) -> None:
        with self._api("start the Redis container"):
            self.container().start()

    def not_back_hint(self) -> str:
        return (f"see `docker logs` of the container {self._target()}; restore.start_timeout "
                "bounds how long loading may take")


@contextlib.contextmanager
def _api_errors(action: str, url: str) -> Iterator[None]:
    """Turn docker SDK and transport errors into RestoreError naming the action."""
    try:
        yield
    except (RestoreError, ConfigError):
        raise
    except _errors() as exc:
        detail = (str(getattr(exc, "explanation", None) or exc).splitlines() or [""])[0][:200]
        raise RestoreError(f"cannot {action} through the Docker API at {url}: "
                           f"{type(exc).__name__}: {detail}") from None


def _safe_url(url: str) -> str:
    """The engine URL without any userinfo."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
