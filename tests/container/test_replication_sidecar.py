"""The sidecar with `redis.source = "replication"` and NO data volume: the backup comes over the
network, as for a Redis in another pod or on another host.

Podman runs a password-protected Redis (its own named volume, which the backupd container does
not get) and a one-shot backupd container with only a backups volume and a read-only config:
`backupd backup`, then `backupd verify latest --deep` and `backupd verify --drill latest` in the
same container. The manifest in the backups volume must say `source: replication` with the
server's replication id, and the drill's key count must be the server's.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest

from .conftest import RedisFactory, _remove

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

KEYS = 300
CONFIG_IN_CONTAINER = "/etc/backupd/config.toml"
RUN_TIMEOUT = 300


def test_replication_sidecar_backs_up_without_the_data_volume(
        docker_client: docker.DockerClient, backupd_image: str,
        redis_container: RedisFactory, tmp_path: Path) -> None:
    password = f"repl-pw-{uuid.uuid4().hex}"
    server = redis_container(password=password)
    r = server.client()
    for start in range(0, KEYS, 100):
        r.mset({f"repl:{i}": f"value-{i}" for i in range(start, start + 100)})
    config = tmp_path / "config.toml"
    config.write_text(f"""\
[redis]
host = "127.0.0.1"
port = {server.port}
source = "replication"
data_dir = ""

[backup]
dir = "/backups"

[log]
format = "json"
""")
    config.chmod(0o644)  # read by uid 999 in the container; the password is not in it
    backups = docker_client.volumes.create(name=f"backupd-test-backups-{uuid.uuid4().hex[:10]}",
                                           labels={"backupd-test": "1"})
    container: Any = None
    try:
        container = docker_client.containers.run(
            backupd_image,
            entrypoint=["/bin/sh", "-c"],
            command=["backupd backup && backupd verify latest --deep "
                     "&& backupd verify --drill latest"],
            name=f"backupd-test-repl-{uuid.uuid4().hex[:10]}",
            detach=True,
            network_mode="host",
            environment={"REDIS_PASSWORD": password},
            volumes={backups.name: {"bind": "/backups", "mode": "rw"},
                     str(config): {"bind": CONFIG_IN_CONTAINER, "mode": "ro"}},
            labels={"backupd-test": "1"},
        )
        mounts = {m["Destination"] for m in container.attrs["Mounts"]}
        assert "/data" not in mounts and server.volume.name not in str(container.attrs["Mounts"])
        status = container.wait(timeout=RUN_TIMEOUT)
        logs = container.logs(stdout=True, stderr=True).decode(errors="replace")
        assert password not in logs
        assert status["StatusCode"] == 0, logs[-6000:]
        manifests = [p for p in Path(backups.attrs["Mountpoint"]).glob("*.json")
                     if not p.name.startswith(".")]
        assert len(manifests) == 1, manifests
        manifest = json.loads(manifests[0].read_text())
        assert manifest["source"] == "replication"
        # Read after the backup: a master's first full sync creates its backlog under a new
        # replication id, so the id from before the backup is not the snapshot's.
        assert manifest["replication"]["master_replid"] == r.info("replication")["master_replid"]
        assert manifest["keys"] == KEYS
        assert f"loaded {KEYS} keys" in logs, logs[-3000:]  # the drill's count
    finally:
        errors = [_remove(container, force=True)] if container is not None else []
        errors.append(_remove(backups, force=True))
        if any(errors):
            pytest.fail(f"cleanup failed: {[e for e in errors if e]}")
