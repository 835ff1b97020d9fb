"""The backupd image as built from the Dockerfile, run for real under podman."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.conftest import (
    PASSWORD,
    RedisServer,
    fill,
    free_port,
    last_line,
    matrix_server,
    run_cli,
    write_config,
)

# The first test pays for podman-setup.sh and the image build (minutes on a fresh machine).
pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]


def run(client: docker.DockerClient, image: str, command: list[str] | None = None,
        entrypoint: list[str] | None = None) -> str:
    """Run a throwaway container to completion; its output (stdout and stderr).

    Not `containers.run()`: it follows the logs on a socket without a timeout, and podman
    sometimes never ends that stream for a container that already exited (a CI run hung
    for 15 minutes there). `wait()` has a deadline; the logs are read once it returned."""
    container = client.containers.create(image, command, entrypoint=entrypoint,
                                         network_mode="host")
    try:
        container.start()
        status = container.wait(timeout=120)["StatusCode"]
        out: bytes = container.logs(stdout=True, stderr=True)
    finally:
        container.remove(force=True)
    assert status == 0, f"{entrypoint or ''} {command or ''} exited {status}: {out!r}"
    return out.decode()


def test_cli_runs(docker_client: docker.DockerClient, backupd_image: str) -> None:
    if (REPO / "backupd" / "cli.py").exists():
        assert "Usage:" in run(docker_client, backupd_image, ["--help"])
    else:  # the CLI is written in parallel: at least the package must import
        run(docker_client, backupd_image, ["-c", "import backupd"], entrypoint=["python3"])


def test_runs_as_uid_999(docker_client: docker.DockerClient, backupd_image: str) -> None:
    # The official redis image writes dump.rdb as 999 with mode 0600.
    assert run(docker_client, backupd_image, ["-u"], entrypoint=["id"]).strip() == "999"
    assert run(docker_client, backupd_image, ["-g"], entrypoint=["id"]).strip() == "999"
    stat = run(docker_client, backupd_image, ["-c", "%u %g %a", "/backups"], entrypoint=["stat"])
    assert stat.split() == ["999", "999", "700"]


def test_redis_tools_on_path(docker_client: docker.DockerClient, backupd_image: str) -> None:
    # One name per `command -v`: dash looks up only the first. Both are REDIS_IMAGE's server.
    out = run(docker_client, backupd_image,
              ["-c", "command -v redis-check-rdb && command -v redis-server && "
                     "redis-check-rdb --version && redis-server --version"], entrypoint=["sh"])
    lines = out.splitlines()
    assert lines[:2] == ["/usr/local/bin/redis-check-rdb", "/usr/local/bin/redis-server"]
    assert "v=8.2.3" in lines[2] and "v=8.2.3" in lines[3]  # from the drill image, not Debian's


def test_image_metadata(docker_client: docker.DockerClient, backupd_image: str) -> None:
    config: dict[str, Any] = docker_client.images.get(backupd_image).attrs["Config"]
    assert config["Entrypoint"] == ["backupd"]
    assert config["Cmd"] == ["run"]
    assert config["User"] == "999:999"
    assert config["StopSignal"] == "SIGTERM"
    assert "BACKUPD_CONFIG=/etc/backupd/config.toml" in config["Env"]
    # Kept only in the docker image format (the fixture builds with --format=docker), and
    # podman 4.3's Docker API leaves it out of the image config: ask the podman CLI.
    inspect = subprocess.run(["podman", "image", "inspect", "--format",
                              "{{json .Config.Healthcheck}}", backupd_image],
                             capture_output=True, text=True, check=True).stdout
    assert json.loads(inspect)["Test"] == ["CMD", "backupd", "health"]


def test_redis_fixture_snapshot_lands_in_volume(redis_container: Callable[..., Any]) -> None:
    """The redis fixture behaves like the official image: uid 999 files on the /data volume."""
    server = redis_container(password="pw-fixture")
    with server.client() as r:
        r.set("k", "v")
        r.save()
    dump = server.data_dir / "dump.rdb"
    assert dump.read_bytes().startswith(b"REDIS")
    assert (dump.stat().st_uid, dump.stat().st_mode & 0o777) == (999, 0o600)


@contextlib.contextmanager
def host_backup(server_name: str) -> Iterator[tuple[Path, str]]:
    """A backup of 500 keys (+1) written by the matrix server `server_name` on the host, in a
    backups dir uid 999 (the image's user) owns, with a config for the image: (dir, id)."""
    outer = Path(tempfile.mkdtemp(prefix="backupd-image-drill-"))
    try:
        outer.chmod(0o755)
        (outer / "data").mkdir()
        server = RedisServer(outer / "data", free_port(), PASSWORD,
                             binary=matrix_server(server_name).binary)
        server.start()
        try:
            fill(server, 500)
            config = write_config(outer / "host.toml", server, outer / "backups")
            made = run_cli("-c", str(config), "backup", "--no-prune")
            assert made.returncode == 0, made.stderr
        finally:
            server.stop()
        (outer / "image.toml").write_text(
            f'[redis]\nhost = "127.0.0.1"\nport = {server.port}\ndata_dir = "/data"\n'
            '[backup]\ndir = "/backups"\n')
        for path in (outer / "backups", *(outer / "backups").iterdir(), outer / "image.toml"):
            os.chown(path, 999, 999)
        yield outer, last_line(made.stdout)
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def drill_in(client: docker.DockerClient, image: str, outer: Path,
             backup_id: str) -> tuple[int, str]:
    """`backupd verify --drill <id>` in a container of `image`: (exit status, output)."""
    container = client.containers.create(
        image, ["-c", "/etc/backupd/config.toml", "verify", "--drill", backup_id],
        network_mode="host", volumes={
            str(outer / "backups"): {"bind": "/backups", "mode": "rw"},
            str(outer / "image.toml"): {"bind": "/etc/backupd/config.toml", "mode": "ro"}})
    try:
        container.start()
        status = int(container.wait(timeout=120)["StatusCode"])
        return status, container.logs(stdout=True, stderr=True).decode(errors="replace")
    finally:
        container.remove(force=True)


def test_drill_of_an_rdb_12_backup_inside_the_image(docker_client: docker.DockerClient,
                                                    backupd_image: str) -> None:
    """A backup written by Redis 8.2 (RDB 12), drilled by the image built with the 8.2 image:
    what the Debian 7.0 server the image used to ship could not do."""
    with host_backup("redis-8.2") as (outer, backup_id):
        manifest = json.loads((outer / "backups" / f"{backup_id}.json").read_text())
        assert manifest["rdb_version"] == 12
        status, out = drill_in(docker_client, backupd_image, outer, backup_id)
    assert status == 0, out
    assert f"{backup_id} [local] drill ok: Redis 8.2.3 loaded 501 keys" in out


def test_the_valkey_image_drills_valkey_and_says_why_not_redis_8(
        docker_client: docker.DockerClient, valkey_backupd_image: str) -> None:
    """Built with a Valkey 8 image: it drills Valkey's RDB 11 and refuses Redis 8's RDB 12,
    naming both servers (as the 7.0 server the image used to ship refused RDB 11 and 12)."""
    with host_backup("valkey-8.1") as (outer, backup_id):
        status, out = drill_in(docker_client, valkey_backupd_image, outer, backup_id)
    assert status == 0, out
    assert f"{backup_id} [local] drill ok: Valkey 8.1.8 loaded 501 keys" in out
    with host_backup("redis-8.2") as (outer, backup_id):
        status, out = drill_in(docker_client, valkey_backupd_image, outer, backup_id)
    assert status == 1, out
    assert "cannot drill: redis-server is Valkey 8.1.8, unable to load this backup's RDB " \
        "(version 12" in out and "written by Redis 8.2.3" in out
