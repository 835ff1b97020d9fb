"""The `docker` restore method against a real Docker Engine API (podman's), on a named volume."""

from __future__ import annotations

import uuid
from pathlib import Path

import docker
import pytest
import redis

from tests.conftest import free_port, last_line, run_cli, wait_until

# -- a real engine -----------------------------------------------------------------------------

PASSWORD = "docker-test-pw-3141"


@pytest.mark.docker
@pytest.mark.timeout(300)
def test_restore_through_the_engine_api(docker_client: docker.DockerClient, redis_image: str,
                                        podman_api: str, tmp_path: Path) -> None:
    engine = docker_client
    name = f"backupd-restore-test-{uuid.uuid4().hex[:8]}"
    volume = engine.volumes.create(name=f"{name}-data")
    port = free_port()
    container = engine.containers.run(
        redis_image, ["--port", str(port), "--bind", "127.0.0.1", "--requirepass", PASSWORD,
                      "--save", "3600 1"],
        name=name, detach=True, network_mode="host",
        volumes={volume.name: {"bind": "/data", "mode": "rw"}},
        restart_policy={"Name": "unless-stopped"})
    client = redis.Redis(port=port, password=PASSWORD, decode_responses=True, socket_timeout=5)

    def ready() -> bool:
        try:
            return bool(client.ping()) and not int(client.info("persistence")["loading"])
        except redis.exceptions.ConnectionError:
            return False

    try:
        wait_until(ready, 60, "redis in the container")
        client.mset({f"k{i}": str(i) for i in range(500)})
        config = tmp_path / "config.toml"
        config.write_text(f"""
[redis]
port = {port}
data_dir = "{volume.attrs['Mountpoint']}"
[backup]
dir = "{tmp_path / 'backups'}"
[restore]
method = "docker"
docker_url = "{podman_api}"
docker_container = "{name}"
stop_timeout = "20s"
start_timeout = "60s"
""")
        env = {"REDIS_PASSWORD": PASSWORD}
        made = run_cli("-c", str(config), "backup", "--no-prune", password=PASSWORD)
        assert made.returncode == 0, made.stderr
        backup_id = last_line(made.stdout)
        client.flushall()
        client.set("after", "backup")
        proc = run_cli("-c", str(config), "restore", backup_id, "--yes", env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr
        wait_until(ready, 60, "redis after the restore")
        assert client.dbsize() == 500 and client.get("k7") == "7" and client.get("after") is None
        # Not running before: the files are swapped and the container stays stopped.
        container.stop(timeout=20)
        proc = run_cli("-c", str(config), "restore", backup_id, "--yes", env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr
        container.reload()
        assert container.status != "running" and "left stopped" in proc.stdout
        proc = run_cli("-c", str(config), "restore", backup_id, "--yes", "--start", env=env,
                       timeout=240)
        assert proc.returncode == 0, proc.stderr
        wait_until(ready, 60, "redis after --start")
        assert client.dbsize() == 500
    finally:
        client.close()
        container.remove(force=True)
        volume.remove(force=True)
