"""The sidecar as operators run it: the backupd image next to a Redis container, for real.

Podman runs a password-protected Redis (the fixture's image) and the backupd image on the host
network, sharing Redis's named data volume on /data, with a backups volume on /backups and a
read-only config. One scenario, in the order an operator lives it:

1. the daemon takes a scheduled backup (`schedule.every`), seen by `backupd list --json` inside
   the container and as a manifest in the backups volume;
2. `/metrics` and `/healthz` answer on the host port; `backupd health` in the container exits 0;
3. `docker stop` (SIGTERM, the image's STOPSIGNAL) during a backup: the backup finishes, the
   daemon exits 0 within `schedule.shutdown_grace`, and the backups volume holds no temp files
   and no artifact without a manifest;
4. after the data changed, `backupd restore latest --yes` exec'd in a fresh sidecar (method
   `docker`, through the Docker Engine API socket mounted into it) brings the backup back.

The Redis password is in the containers' environment only: it must not appear in any log or
command output captured here. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backupd.storage.layout import TEMP_MARK
from backupd.storage.local import LocalStorage

from .conftest import (
    RedisContainer,
    RedisFactory,
    _remove,
    _wait_until,
    free_port,
    podman_service,
)

# The first container test of a session pays for podman-setup.sh and the image build.
pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

EVERY_S = 10  # schedule.every: the first scheduled run fires this long after start-up
SHUTDOWN_GRACE_S = 30
KEYS = 200  # plus the marker key
# rdb-key-save-delay (microseconds per key) makes Redis's BGSAVE take KEYS * 20 ms = 4 s, so the
# SIGTERM below surely lands while a scheduled backup waits for its snapshot.
SAVE_DELAY_US = 20_000
MARKER = "sidecar:marker"
AFTER = "sidecar:written-after-the-backup"
# The group that may use the dedicated API socket (see `sidecar_api_socket`); any gid that is
# neither root's nor the image's 999 shows that the access comes from the added group alone.
SOCKET_GID = 4747
SOCKET_IN_CONTAINER = "/run/podman/podman.sock"
CONFIG_IN_CONTAINER = "/etc/backupd/config.toml"


@pytest.fixture(scope="module")
def sidecar_api_socket(podman_api: str,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Docker Engine API socket that the backupd container (uid 999) may use.

    Not `user="0"`: the image runs as uid 999 on purpose (it must read Redis's 0600 dump.rdb and
    leave restored files Redis can read), and a root sidecar would hide exactly the permission
    bugs this test exists to catch. Instead the socket gets a group and the container gets that
    group (`group_add`), which is compose.yaml's "direct socket" variant (`group_add:
    DOCKER_GID`) as operators would run it. The socket is a dedicated `podman system service`
    rather than the session's socket made group-accessible: nothing else in the session ever
    sees that permission, and it goes away with this module.
    """
    directory = tmp_path_factory.mktemp("sidecar-api")
    path = directory / "podman.sock"
    with podman_service(path, directory / "service.log"):
        os.chown(path, -1, SOCKET_GID)  # created root:root 0600
        os.chmod(path, 0o660)
        yield path


@dataclass
class Sidecars:
    """Starts backupd containers on one Redis; removes them and the backups volume at the end."""

    client: docker.DockerClient
    image: str
    redis: RedisContainer
    socket: Path
    config: Path
    backups: Any  # docker.models.volumes.Volume, mounted at /backups
    metrics_port: int
    containers: list[Any] = field(default_factory=list)

    @property
    def backups_dir(self) -> Path:
        return Path(self.backups.attrs["Mountpoint"])

    def start(self, env: dict[str, str] | None = None) -> Any:
        container = self.client.containers.run(
            self.image,  # the image's own command: `backupd run`, as uid 999
            name=f"backupd-test-sidecar-{uuid.uuid4().hex[:10]}",
            detach=True,
            network_mode="host",  # API-created containers ignore containers.conf's netns
            group_add=[str(SOCKET_GID)],
            environment={"REDIS_PASSWORD": self.redis.password, **(env or {})},
            volumes={
                self.redis.volume.name: {"bind": "/data", "mode": "rw"},
                self.backups.name: {"bind": "/backups", "mode": "rw"},
                str(self.config): {"bind": CONFIG_IN_CONTAINER, "mode": "ro"},
                str(self.socket): {"bind": SOCKET_IN_CONTAINER, "mode": "rw"},
            },
            labels={"backupd-test": "1"},
        )
        self.containers.append(container)
        return container


@pytest.fixture
def sidecars(docker_client: docker.DockerClient, backupd_image: str,
             redis_container: RedisFactory, sidecar_api_socket: Path,
             tmp_path: Path) -> Iterator[Sidecars]:
    password = f"sidecar-pw-{uuid.uuid4().hex}"
    server = redis_container(password=password)
    metrics_port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""\
[redis]
host = "127.0.0.1"
port = {server.port}
data_dir = "/data"

[backup]
dir = "/backups"

[schedule]
every = "{EVERY_S}s"
shutdown_grace = "{SHUTDOWN_GRACE_S}s"

[metrics]
listen = "127.0.0.1:{metrics_port}"
max_age = "10m"

[restore]
method = "docker"
docker_url = "unix://{SOCKET_IN_CONTAINER}"
docker_container = "{server.container.name}"
stop_timeout = "20s"
start_timeout = "60s"

[log]
format = "json"
""")
    config.chmod(0o644)  # read by uid 999 in the container; the password is not in it
    backups = docker_client.volumes.create(name=f"backupd-test-backups-{uuid.uuid4().hex[:10]}",
                                           labels={"backupd-test": "1"})
    made = Sidecars(docker_client, backupd_image, server, sidecar_api_socket, config, backups,
                    metrics_port)
    try:
        yield made
    finally:
        errors = []
        for container in reversed(made.containers):
            with contextlib.suppress(docker.errors.APIError):  # shown on failure only
                print(f"--- logs of {container.name} ---\n"
                      f"{container.logs().decode(errors='replace')[-6000:]}")
            errors.append(_remove(container, force=True))
        errors.append(_remove(backups, force=True))
        if any(errors):
            pytest.fail(f"cleanup of sidecar containers failed: {[e for e in errors if e]}")


# -- helpers -------------------------------------------------------------------------------------


def events(container: Any) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (stderr), in order."""
    found = []
    for line in container.logs(stdout=True, stderr=True).decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and "event" in doc:
                found.append(doc)
    return found


def named(container: Any, event: str) -> list[dict[str, Any]]:
    return [e for e in events(container) if e["event"] == event]


def exec_in(container: Any, *argv: str) -> tuple[int, str, str]:
    """Run a command in the container (as its user, with its environment)."""
    result = container.exec_run(list(argv), demux=True)
    out, err = result.output
    return (int(result.exit_code), (out or b"").decode(errors="replace"),
            (err or b"").decode(errors="replace"))


def list_backups(container: Any) -> list[dict[str, Any]]:
    code, out, err = exec_in(container, "backupd", "list", "--json")
    assert code == 0, f"backupd list --json exited {code}: {err}"
    backups: list[dict[str, Any]] = json.loads(out)
    return backups


def http_get(url: str) -> tuple[int, bytes]:
    """Status and body, also for 503 (urlopen raises on it)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http://127.0.0.1
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels or ''} in /metrics")


def leftovers(directory: Path) -> list[str]:
    """Half-written files: temp files anywhere, and (by backupd's own definition) artifacts
    without a manifest or manifests without an artifact."""
    found = [str(p.relative_to(directory)) for p in directory.rglob("*") if TEMP_MARK in p.name]
    listing = LocalStorage(directory).listing()
    found += [o.name for o in listing.orphans]
    found += [f"{backup_id} ({why})" for backup_id, why in listing.broken.items()]
    return found


def wait_for(check: Callable[[], Any], timeout: float, what: str, container: Any) -> Any:
    """`_wait_until`, failing early with the log when the container is no longer running."""
    def alive_check() -> Any:
        container.reload()
        if container.status != "running":
            pytest.fail(f"{container.name} is {container.status} while waiting for {what}:\n"
                        f"{container.logs().decode(errors='replace')[-4000:]}")
        return check()

    return _wait_until(alive_check, timeout, what, interval=0.5)


# -- the scenario -------------------------------------------------------------------------------


def test_sidecar_backs_up_on_schedule_stops_cleanly_and_restores(sidecars: Sidecars) -> None:
    server = sidecars.redis
    password = server.password
    captured: list[str] = []  # every log and command output, checked for the password at the end
    r = server.client(decode_responses=True)
    r.mset({f"sidecar:key:{i}": f"value-{i}" for i in range(KEYS)})
    r.set(MARKER, "present-at-backup-time")

    # 1. A scheduled backup appears (the first run fires EVERY_S after start-up).
    daemon = sidecars.start()
    backups = wait_for(lambda: list_backups(daemon), 60, "a scheduled backup in `backupd list`",
                       daemon)
    first = backups[-1]
    assert first["trigger"] == "scheduled" and first["locations"] == ["local"]
    assert first["keys"] == KEYS + 1
    assert (sidecars.backups_dir / f"{first['id']}.json").is_file()
    started = named(daemon, "daemon_started")
    assert len(started) == 1 and started[0]["schedule"] == f"every {EVERY_S:g}s"

    # 2. /metrics and /healthz on the host port, and the HEALTHCHECK command in the container.
    # The first run commits its manifest before it updates the metrics: poll until they agree.
    base = f"http://127.0.0.1:{sidecars.metrics_port}"

    def metrics_show_success() -> str | None:
        status, body = http_get(f"{base}/metrics")
        text = body.decode()
        ok = status == 200 and metric(text, "backupd_backups_total", outcome="success") >= 1
        return text if ok else None

    text = wait_for(metrics_show_success, 30, "/metrics to count the backup", daemon)
    assert metric(text, "backupd_last_success_timestamp_seconds") > time.time() - 120
    assert metric(text, "backupd_backup_keys") == KEYS + 1
    assert metric(text, "backupd_backups_total", outcome="failure") == 0
    status, body = http_get(f"{base}/healthz")
    health = json.loads(body)
    assert status == 200, health
    assert health["status"] == "ok" and health["last_success_id"] in {
        b["id"] for b in list_backups(daemon)}
    assert health["next_run"] is not None and health["last_error"] is None
    # The state file the command reads is written just after the run's metrics: poll. Exit 0
    # alone would also accept "healthy (starting)", which says nothing about the backup.
    def health_command_ok() -> bool:
        code, out, err = exec_in(daemon, "backupd", "health")
        captured.extend([out, err])
        assert code in (0, 1), (code, out, err)
        return code == 0 and out.startswith("healthy (ok)")

    wait_for(health_command_ok, 30, "`backupd health` to exit 0 with status ok", daemon)

    # 3. SIGTERM while a scheduled backup waits for its (slowed-down) snapshot.
    r.config_set("rdb-key-save-delay", SAVE_DELAY_US)
    runs_before = len(named(daemon, "run_started"))

    def backup_waits_for_snapshot() -> bool:  # so the signal surely lands during the backup
        started = len(named(daemon, "run_started")) > runs_before
        return started and int(r.info("persistence")["rdb_bgsave_in_progress"]) == 1

    wait_for(backup_waits_for_snapshot, EVERY_S + 30,
             "the next scheduled run to wait for its BGSAVE", daemon)
    t0 = time.monotonic()
    daemon.stop(timeout=SHUTDOWN_GRACE_S + 30)  # SIGTERM (STOPSIGNAL), SIGKILL after that
    stop_seconds = time.monotonic() - t0
    r.config_set("rdb-key-save-delay", 0)
    daemon.reload()
    log = daemon.logs().decode(errors="replace")
    captured.append(log)
    assert daemon.attrs["State"]["ExitCode"] == 0, log[-4000:]
    assert stop_seconds < SHUTDOWN_GRACE_S, f"stop took {stop_seconds:.1f}s"
    seq = [e["event"] for e in events(daemon)]
    assert "shutdown_grace_expired" not in seq and "second_signal" not in seq, seq
    stop_at = seq.index("shutdown_requested")
    assert named(daemon, "shutdown_requested")[0]["backup_running"] is True, seq
    assert seq[stop_at:].count("run_succeeded") == 1 and seq[-1] == "daemon_stopped", seq
    finished = named(daemon, "run_succeeded")[-1]["id"]
    assert leftovers(sidecars.backups_dir) == []
    assert (sidecars.backups_dir / f"{finished}.json").is_file()

    # 4. The data changes after the backup; a restore in a fresh sidecar brings it back. That
    # one gets no scheduled run within the test: a new backup would capture the changed data
    # (and become `latest`), and a running one holds the flock a restore needs (exit 4, busy).
    r.delete(MARKER)
    r.set(AFTER, "must be gone after the restore")
    r.set("sidecar:key:0", "changed-after-the-backup")
    r.close()
    server.container.reload()
    redis_started_at = server.container.attrs["State"]["StartedAt"]
    restorer = sidecars.start({"BACKUPD_SCHEDULE__EVERY": "24h", "BACKUPD_METRICS__LISTEN": "",
                               "BACKUPD_METRICS__MAX_AGE": "48h"})
    wait_for(lambda: named(restorer, "daemon_started"), 30, "the second daemon to start",
             restorer)
    code, out, err = exec_in(restorer, "backupd", "restore", "latest", "--yes")
    captured += [out, err]
    assert code == 0, f"restore exited {code}:\n{out}\n{err}"
    assert f"restored backup {finished}" in out, out
    server.wait_ready(60)
    server.container.reload()
    # The docker method stopped and started this very container through the API.
    assert server.container.attrs["State"]["StartedAt"] != redis_started_at
    with server.client(decode_responses=True) as after:
        assert after.get(MARKER) == "present-at-backup-time"
        assert after.get(AFTER) is None
        assert after.get("sidecar:key:0") == "value-0"
        assert after.dbsize() == KEYS + 1
    data = sorted(p.name for p in server.data_dir.iterdir())
    assert not [n for n in data if n.startswith(".backupd-restore-")], data  # staging removed
    assert [n for n in data if n.startswith(".backupd-pre-restore-")], data  # safety copy kept

    # No secret in anything a container printed.
    restorer.stop(timeout=SHUTDOWN_GRACE_S + 30)
    restorer.reload()
    assert restorer.attrs["State"]["ExitCode"] == 0
    captured += [restorer.logs().decode(errors="replace"), server.logs(tail=1000)]
    leaks = [line for text in captured for line in text.splitlines() if password in line]
    assert not leaks, f"the Redis password appears in captured output: {leaks}"
