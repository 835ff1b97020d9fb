"""The `docker` restore method: the controller's logic against a stand-in SDK client, and one
real restore through the Docker Engine API (podman) when DOCKER_HOST points at one."""

from __future__ import annotations

from typing import Any

import docker
import docker.errors
import pytest

from backupd.config import RestoreConfig
from backupd.controllers.docker import DockerController
from backupd.errors import ConfigError, RestoreError

# -- a stand-in for the docker SDK client (the engine is not what these tests are about) -------


class FakeContainer:
    def __init__(self, name: str, labels: dict[str, str] | None = None,
                 status: str = "running", env: tuple[str, ...] = (),
                 lag: int = 0) -> None:
        self.name = name
        self.labels = labels or {}
        self.status = status
        self.attrs = {"Config": {"Env": list(env)}}
        self.calls: list[tuple[str, Any]] = []
        self._lag = lag  # reloads during which a stopped container still reports running
        self._stopping = False

    def reload(self) -> None:
        if self._stopping:
            if self._lag:
                self._lag -= 1
            else:
                self.status, self._stopping = "exited", False

    def stop(self, timeout: int) -> None:
        self.calls.append(("stop", timeout))
        self._stopping = True

    def start(self) -> None:
        self.calls.append(("start", None))
        self.status = "running"


class FakeContainers:
    def __init__(self, containers: list[FakeContainer]) -> None:
        self.containers = containers
        self.filters: list[Any] = []

    def get(self, name: str) -> FakeContainer:
        for c in self.containers:
            if c.name == name:
                return c
        raise docker.errors.NotFound(f"no such container {name}")

    def list(self, all: bool, filters: dict[str, list[str]]) -> list[FakeContainer]:
        assert all is True
        self.filters.append(filters)
        wanted = dict(label.split("=", 1) for label in filters["label"])
        return [c for c in self.containers if all_items_in(wanted, c.labels)]


def all_items_in(wanted: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in wanted.items())


class FakeClient:
    def __init__(self, containers: list[FakeContainer]) -> None:
        self.containers = FakeContainers(containers)


def controller(containers: list[FakeContainer], **cfg: Any) -> tuple[DockerController,
                                                                      list[tuple[str, int]]]:
    made: list[tuple[str, int]] = []

    def factory(url: str, timeout: int) -> FakeClient:
        made.append((url, timeout))
        return FakeClient(containers)

    return DockerController(RestoreConfig(**cfg), client_factory=factory), made


def compose_labels(project: str, service: str, oneoff: bool = False) -> dict[str, str]:
    return {"com.docker.compose.project": project, "com.docker.compose.service": service,
            "com.docker.compose.oneoff": "True" if oneoff else "False"}


def test_finds_the_compose_service_by_labels_not_oneoff_runs() -> None:
    redis_c = FakeContainer("app-redis-1", compose_labels("app", "redis"))
    others = [FakeContainer("app-redis-run-1", compose_labels("app", "redis", oneoff=True)),
              FakeContainer("other-redis-1", compose_labels("other", "redis")),
              FakeContainer("app-web-1", compose_labels("app", "web"))]
    ctl, _ = controller([*others, redis_c], compose_project="app")
    ctl.check()
    assert ctl.container() is redis_c
    assert "com.docker.compose.project=app" in ctl.describe()


@pytest.mark.parametrize("count", [0, 2])
def test_zero_or_several_matches_is_an_error(count: int) -> None:
    found = [FakeContainer(f"app-redis-{i}", compose_labels("app", "redis")) for i in range(count)]
    ctl, _ = controller(found, compose_project="app")
    with pytest.raises(RestoreError, match=f"found {count}"):
        ctl.check()


def test_by_name_and_a_missing_name() -> None:
    ctl, _ = controller([FakeContainer("redis")], docker_container="redis")
    assert ctl.is_running() is True
    missing, _ = controller([], docker_container="redis")
    with pytest.raises(RestoreError, match="no container named 'redis'"):
        missing.check()


def test_needs_a_container_or_a_project() -> None:
    ctl, _ = controller([], compose_project="")
    with pytest.raises(ConfigError, match="docker_container"):
        ctl.check()


def test_project_defaults_to_the_sidecars_own_compose_project() -> None:
    """In compose, `restore.method = "docker"` alone is enough: the sidecar's own labels name
    the project, and the Redis service is found in it."""
    import socket

    me = FakeContainer(socket.gethostname(), compose_labels("shop", "backupd"))
    redis_c = FakeContainer("shop-redis-1", compose_labels("shop", "redis"))
    other = FakeContainer("blog-redis-1", compose_labels("blog", "redis"))
    ctl, _ = controller([me, other, redis_c], compose_project="")
    ctl.check()
    assert ctl.container() is redis_c


def test_stop_waits_until_not_running_and_client_timeout_exceeds_grace() -> None:
    container = FakeContainer("redis", lag=3)
    ctl, made = controller([container], docker_container="redis", stop_timeout=90.0,
                           docker_url="unix:///run/docker.sock")
    ctl.stop()
    assert container.calls == [("stop", 90)] and container.status == "exited"
    assert made == [("unix:///run/docker.sock", 120)]  # HTTP read timeout > stop grace period
    assert ctl.is_running() is False
    ctl.start()
    assert ctl.is_running() is True


def test_server_version_from_the_image_env() -> None:
    ctl, _ = controller([FakeContainer("r", env=("PATH=/bin", "REDIS_VERSION=7.2.4"))],
                        docker_container="r")
    assert ctl.server_version() == "7.2.4"
    plain, _ = controller([FakeContainer("r")], docker_container="r")
    assert plain.server_version() is None


def test_api_errors_name_the_action_and_hide_userinfo() -> None:
    class Broken(FakeContainer):
        def stop(self, timeout: int) -> None:
            raise docker.errors.APIError("500 Server Error: boom")

    ctl, _ = controller([Broken("r")], docker_container="r",
                        docker_url="tcp://user:hunter22@docker.internal:2375")
    with pytest.raises(RestoreError, match="cannot stop the Redis container") as info:
        ctl.stop()
    assert "hunter22" not in str(info.value) and "docker.internal:2375" in str(info.value)
