"""examples/compose.sidecar.yaml added to a compose project shaped like most users' one: Redis
with `command: redis-server --requirepass ${REDIS_PASSWORD}`, an external `redis-data` volume
and its own network. Run with podman-compose (`-f compose.yaml -f compose.sidecar.yaml up -d`)
on local images standing in for the official ones; the sidecar takes its first backup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from .conftest import REDIS_IMAGE, REPO, _remove, _run_logged, _wait_until

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]
# The official image's entrypoint takes `redis-server ...` as the command; the local Redis
# image takes redis-server's arguments only: this one accepts both, as the official one does.
OFFICIAL_LIKE = "localhost/redis-test:7-official-entrypoint"
USER_COMPOSE = """\
services:
  redis:
    image: {redis_image}
    command: redis-server --requirepass ${{REDIS_PASSWORD}}
    volumes:
      - redis-data:/data
    networks:
      - backend
    restart: unless-stopped
volumes:
  redis-data:
    external: true
    name: {volume}
networks:
  backend:
"""


def compose(project: Path, name: str, *args: str, env: dict[str, str],
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "podman_compose", "-p", name, "-f", str(project / "compose.yaml"),
         "-f", str(project / "compose.sidecar.yaml"), *args],
        cwd=project, env={**os.environ, **env}, capture_output=True, text=True,
        timeout=timeout, check=False)


@pytest.fixture(scope="module")
def official_like_image(podman_api: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    ctx = tmp_path_factory.mktemp("official-like")
    (ctx / "Containerfile").write_text(
        f"FROM {REDIS_IMAGE}\n"
        'ENTRYPOINT ["/bin/sh", "-c", "umask 0077 && if [ \\"$1\\" = redis-server ]; then '
        'shift; fi && exec redis-server \\"$@\\"", "redis-server"]\n')
    _run_logged(["podman", "build", "-t", OFFICIAL_LIKE, str(ctx)], ctx / "build.log",
                timeout=300, what=f"podman build {OFFICIAL_LIKE}")
    return OFFICIAL_LIKE


@pytest.fixture
def project(tmp_path: Path, docker_client: docker.DockerClient, backupd_image: str,
            official_like_image: str) -> Iterator[tuple[Path, str, dict[str, str]]]:
    name = f"backupd-test-{uuid.uuid4().hex[:8]}"
    volume = docker_client.volumes.create(name=f"{name}-redis-data",
                                          labels={"backupd-test": "1"})
    (tmp_path / "compose.yaml").write_text(USER_COMPOSE.format(
        redis_image=official_like_image, volume=volume.name))
    (tmp_path / "compose.sidecar.yaml").write_text(
        (REPO / "examples" / "compose.sidecar.yaml").read_text())
    (tmp_path / "backupd.toml").write_text(
        '[schedule]\nrun_on_start = true\n\n[log]\nformat = "json"\n')
    (tmp_path / "backupd.toml").chmod(0o644)
    env = {"REDIS_PASSWORD": f"pw-{uuid.uuid4().hex}", "BACKUPD_IMAGE": backupd_image}
    try:
        yield tmp_path, name, env
    finally:
        down = compose(tmp_path, name, "down", "-v", env=env)
        print(down.stdout[-3000:], down.stderr[-3000:])
        _remove(volume, force=True)


def test_sidecar_joins_the_users_redis_volume_and_network(
        project: tuple[Path, str, dict[str, str]], docker_client: docker.DockerClient) -> None:
    path, name, env = project
    up = compose(path, name, "up", "-d", env=env)
    assert up.returncode == 0, up.stdout + up.stderr

    def sidecar() -> Any:
        found = docker_client.containers.list(
            filters={"label": [f"com.docker.compose.project={name}",
                               "com.docker.compose.service=backupd"]})
        return found[0] if found else None

    backupd = _wait_until(sidecar, 60, "the backupd container")

    def first_backup() -> list[dict[str, Any]]:
        code, out = backupd.exec_run(["backupd", "list", "--json"], user="999")
        return json.loads(out) if code == 0 and out.strip().startswith(b"[") else []

    [entry] = _wait_until(first_backup, 120, "the sidecar's first backup")
    assert entry["server"] == "redis" and entry["redis_version"].startswith("7.")
    code, out = backupd.exec_run(["backupd", "verify", "--drill", entry["id"]], user="999")
    assert code == 0, out  # the image's drill server (8.2) loads the 7.0 RDB
    assert b"drill ok: Redis 8.2.3" in out
    logs = backupd.logs().decode(errors="replace")
    assert env["REDIS_PASSWORD"] not in logs and '"event": "drill_server"' in logs
