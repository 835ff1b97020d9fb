"""`backupd restore` end to end: the real CLI against real redis-server processes.

Redis is stopped and started only through the configured method, as in production: for the
`command` method through tests/restore_redisctl.py (a stand-in for systemctl: a daemonized
redis-server with a pidfile), for `shutdown` through a supervisor that restarts redis-server
like a container restart policy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anycrc
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from backupd import manifest as mf
from backupd import pipeline
from backupd.errors import RestoreError
from tests.conftest import (
    PASSWORD,
    REDIS_SERVER,
    RedisServer,
    Server,
    fill,
    free_port,
    last_line,
    run_cli,
    wait_until,
    write_config,
)

CTL = Path(__file__).with_name("restore_redisctl.py")
CLI = [sys.executable, "-m", "backupd", "--log-format", "json"]


# -- a Redis controlled like a service ---------------------------------------------------------


@dataclass
class Service:
    """A redis-server that the tests, like backupd, start and stop only through commands."""

    server: RedisServer
    supervisor: subprocess.Popen[bytes] | None = None
    fail_once: Path | None = None
    hang: Path | None = None
    extra_cleanup: list[Path] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.server.dir

    @property
    def pidfile(self) -> Path:
        return self.server.dir / "redis.pid"

    def start_command(self) -> list[str]:
        opts: list[str] = []
        if self.fail_once:
            opts += ["--fail-once", str(self.fail_once)]
        if self.hang:
            opts += ["--hang", str(self.hang)]
        return [sys.executable, str(CTL), "start", str(self.pidfile), *opts, "--",
                *self.server.argv()]

    def stop_command(self) -> list[str]:
        return [sys.executable, str(CTL), "stop", str(self.pidfile)]

    def start(self) -> None:
        subprocess.run(self.start_command(), check=True, timeout=30)
        self.wait_ready()

    def stop(self) -> None:
        subprocess.run(self.stop_command(), check=True, timeout=30)

    def launch(self, supervise: list[str] | None) -> None:
        """Start it, under the restart-policy supervisor when `supervise` (its extra args)."""
        if supervise is None:
            self.start()
            return
        self.supervisor = subprocess.Popen(
            [sys.executable, str(CTL), "supervise", str(self.dir / "supervisor.pid"),
             *supervise, "--", *self.server.argv()])
        self.wait_ready()

    def remove(self) -> None:
        """The fixture's teardown: the supervisor, the server, and extra directories go."""
        if self.supervisor is not None:
            self.supervisor.terminate()
            self.supervisor.wait(20)
        subprocess.run(self.stop_command(), check=False, timeout=30)
        for path in self.extra_cleanup:
            shutil.rmtree(path, ignore_errors=True)

    def wait_ready(self) -> None:
        wait_until(self.ready, 20, f"redis on port {self.server.port}")

    def ready(self) -> bool:
        return self.server.answers()

    def answers(self) -> bool:
        try:
            client = self.client()
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.exceptions.BusyLoadingError:
            return True
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.server.port, password=PASSWORD, decode_responses=True,
                           socket_timeout=10, protocol=2, retry=Retry(NoBackoff(), 0))

    def run_id(self) -> str:
        client = self.client()
        try:
            return str(client.info("server")["run_id"])
        finally:
            client.close()

    def config(self, path: Path, backups: Path, method: str = "command",
               start_timeout: str = "20s") -> Path:
        body = (f'[restore]\nmethod = "{method}"\nstop_timeout = "15s"\n'
                f'start_timeout = "{start_timeout}"\ncommand_timeout = "20s"\n'
                f"stop_command = {json.dumps(self.stop_command())}\n"
                f"start_command = {json.dumps(self.start_command())}\n")
        return write_config(path, self.server, backups, body)


def _dir_for_user(base: Path, name: str, user: str | None) -> tuple[Path, Path | None]:
    """A data dir; for a non-root Redis one outside pytest's 0700 tmp tree."""
    if user is None:
        data = base / name
        data.mkdir()
        return data, None
    outer = Path(tempfile.mkdtemp(prefix="backupd-restore-test-"))
    outer.chmod(0o755)
    data = outer / name
    data.mkdir()
    shutil.chown(data, user, user)
    return data, outer


@contextlib.contextmanager
def running_service(tmp_path: Path, stop_timeout: float = 30, binary: str = REDIS_SERVER,
                    name: str = "data") -> Iterator[Service]:
    """One plain Redis service on tmp_path/<name>, stopped with its stop command afterwards."""
    data = tmp_path / name
    data.mkdir()
    svc = Service(RedisServer(data, free_port(), PASSWORD, [], binary=binary))
    svc.start()
    try:
        yield svc
    finally:
        subprocess.run(svc.stop_command(), check=False, timeout=stop_timeout)


@pytest.fixture
def services(tmp_path: Path, server_under_test: Server) -> Iterator[Callable[..., Service]]:
    made: list[Service] = []

    def make(*options: str, name: str = "data", user: str | None = None,
             supervised: str | None = None, binary: str | None = None) -> Service:
        data, outer = _dir_for_user(tmp_path, name, user)
        service = Service(RedisServer(data, free_port(), PASSWORD, list(options), user,
                                      binary=binary or server_under_test.binary))
        if outer is not None:
            service.extra_cleanup.append(outer)
        made.append(service)
        service.launch(None if supervised is None
                       else ["--once"] if supervised == "once" else [])
        return service

    yield make
    for service in made:
        service.remove()


# -- data helpers --------------------------------------------------------------------------------


def contents(service: Service) -> dict[tuple[int, str], Any]:
    """Every key and value in every db (strings, hashes), for exact comparisons."""
    result: dict[tuple[int, str], Any] = {}
    client = service.client()
    try:
        dbs = [int(k[2:]) for k in client.info("keyspace")]
        for db in dbs:
            client.select(db)
            for key in client.scan_iter(count=1000):
                kind = client.type(key)
                result[(db, key)] = client.hgetall(key) if kind == "hash" else client.get(key)
    finally:
        client.close()
    return result


def populate(service: Service, prefix: str, n: int = 300) -> None:
    fill(service.server, n, prefix=prefix)
    fill(service.server, 20, db=2, prefix=prefix + "-db2")
    client = service.client()
    try:
        client.set(f"{prefix}:ttl", "expires in an hour", ex=3600)
    finally:
        client.close()


def rewrite(service: Service, prefix: str = "new", n: int = 50) -> None:
    """Make the live data differ from the backup."""
    client = service.client()
    try:
        client.flushall()
    finally:
        client.close()
    fill(service.server, n, prefix=prefix)


def backup(config: Path) -> str:
    proc = run_cli("-c", str(config), "backup", "--no-prune")
    assert proc.returncode == 0, proc.stderr
    return last_line(proc.stdout)


def restore(config: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return run_cli("-c", str(config), "restore", *args, timeout=timeout)


def leftovers(data: Path) -> list[str]:
    return sorted(p.name for p in data.iterdir() if p.name.startswith(".backupd-"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def svc_setup(tmp_path: Path, services: Callable[..., Service]) -> tuple[Service, Path, Path]:
    """A populated, command-controlled Redis, its config and the backup dir."""
    service = services()
    populate(service, "orig")
    backups = tmp_path / "backups"
    return service, service.config(tmp_path / "config.toml", backups), backups


# -- the command method --------------------------------------------------------------------------


@pytest.mark.matrix
def test_restore_rdb_server(svc_setup: tuple[Service, Path, Path]) -> None:
    service, config, backups = svc_setup
    expected = contents(service)
    backup_id = backup(config)
    rewrite(service)
    changed = contents(service)
    run_id = service.run_id()

    proc = restore(config, backup_id, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert contents(service) == expected
    assert service.run_id() != run_id
    manifest = json.loads((backups / f"{backup_id}.json").read_text())
    assert sha256(service.dir / "dump.rdb") == manifest["raw_sha256"]
    assert f"restored backup {backup_id}" in proc.stdout and "323 keys loaded" in proc.stdout
    # The pre-restore copy holds the data Redis had (a fresh BGSAVE), and only it is left.
    (pre,) = leftovers(service.dir)
    assert pre.startswith(".backupd-pre-restore-") and pre in proc.stdout
    journal = json.loads((service.dir / pre / "restore.json").read_text())
    assert journal["state"] == "done" and journal["keys_before"] == len(changed)
    assert b"new:1" in (service.dir / pre / "dump.rdb").read_bytes()
    steps = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert [s["step"] for s in steps if s.get("event") == "restore_step"] == [2, 1, 4, 4, 4, 5, 6]
    assert PASSWORD not in proc.stdout + proc.stderr

    # As if killed after Redis came back but before the check: the next restore sees that
    # Redis runs with the restored data, records the restore as complete, and goes on.
    journal["state"] = "restarting"
    (service.dir / pre / "restore.json").write_text(json.dumps(journal))
    proc = restore(config, "latest", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert '"event": "interrupted_restore_completed"' in proc.stderr
    # ... and keeps only the newest pre-restore copy.
    (newer,) = leftovers(service.dir)
    assert newer != pre


def test_restore_onto_a_server_with_other_data(tmp_path: Path,
                                              services: Callable[..., Service]) -> None:
    origin = services(name="origin")
    populate(origin, "origin", 200)
    expected = contents(origin)
    backups = tmp_path / "backups"
    backup(origin.config(tmp_path / "origin.toml", backups))
    target = services(name="target")
    populate(target, "target", 77)
    proc = restore(target.config(tmp_path / "target.toml", backups), "--yes")
    assert proc.returncode == 0, proc.stderr
    assert contents(target) == expected


@pytest.mark.matrix
def test_restore_aof_server_survives_restarts(tmp_path: Path,
                                              services: Callable[..., Service]) -> None:
    service = services("--appendonly", "yes", user="redis")
    populate(service, "orig")
    expected = contents(service)
    backups = tmp_path / "backups"
    config = service.config(tmp_path / "config.toml", backups)
    backup_id = backup(config)
    rewrite(service)

    proc = restore(config, backup_id, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert contents(service) == expected
    aof = service.dir / "appendonlydir"
    names = sorted(p.name for p in aof.iterdir())
    assert names == ["appendonly.aof.1.base.rdb", "appendonly.aof.1.incr.aof",
                     "appendonly.aof.manifest"]
    assert (aof / "appendonly.aof.manifest").read_text().startswith(
        "file appendonly.aof.1.base.rdb seq 1 type b\n")
    for path in (service.dir / "dump.rdb", aof, *aof.iterdir()):
        assert path.stat().st_uid == service.dir.stat().st_uid != 0, path

    client = service.client()
    client.set("after-restore", "kept")
    client.close()
    expected[(0, "after-restore")] = "kept"
    for _ in range(2):  # AOF: the base plus what was written since survives each restart
        service.stop()
        service.start()
        assert contents(service) == expected


def rdb_with_version(data: bytes, version: int) -> bytes:
    """A copy of a real RDB claiming another version, with a correct CRC."""
    body = f"REDIS{version:04d}".encode() + data[9:-8]
    crc: int = anycrc.Model("CRC64-REDIS").calc(body)
    return body + crc.to_bytes(8, "little")


def forge_backup(backups: Path, template_id: str, raw: bytes, **changes: Any) -> str:
    """Store `raw` as a new, internally consistent backup cloned from `template_id`."""
    template = json.loads((backups / f"{template_id}.json").read_text())
    new_id = mf.new_id(mf.now_utc())
    name = mf.artifact_name(new_id, "none", False)
    src = backups / f".{new_id}.src"
    src.write_bytes(raw)
    with open(src, "rb") as fh:
        packed = pipeline.pack(fh, backups / name, compression="none", level=0, recipients=[])
    src.unlink()
    template.update(id=new_id, artifact=name, compression="none", encryption="none",
                    raw_size=packed.raw.size, raw_sha256=packed.raw.sha256,
                    stored_size=packed.stored.size, stored_sha256=packed.stored.sha256,
                    rdb_version=packed.rdb.version, **changes)
    (backups / f"{new_id}.json").write_text(json.dumps(template))
    return new_id


def assert_untouched(service: Service, run_id: str, before: dict[tuple[int, str], Any]) -> None:
    assert service.run_id() == run_id
    assert contents(service) == before
    assert leftovers(service.dir) == []
    client = service.client()
    try:
        assert client.config_get("save")["save"] == ""  # as the test server was started
    finally:
        client.close()


def test_newer_rdb_refused_before_anything_stops(svc_setup: tuple[Service, Path, Path]) -> None:
    service, config, backups = svc_setup
    good = backup(config)
    raw = (service.dir / "dump.rdb").read_bytes()
    newer = forge_backup(backups, good, rdb_with_version(raw, 11))
    before, run_id = contents(service), service.run_id()
    proc = restore(config, newer, "--yes")
    assert proc.returncode == 1, proc.stderr
    error = json.loads(proc.stderr.strip().splitlines()[-1])["error"]
    assert "RDB version 11" in error and "Redis 7.0.15" in error and "loads RDB versions up to" \
        " 10" in error and "Nothing was stopped" in error
    assert_untouched(service, run_id, before)


def test_corrupt_artifact_refused_before_anything_stops(
        svc_setup: tuple[Service, Path, Path]) -> None:
    service, config, backups = svc_setup
    backup_id = backup(config)
    artifact = backups / f"{backup_id}.rdb.zst"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x10
    artifact.write_bytes(bytes(data))
    before, run_id = contents(service), service.run_id()
    proc = restore(config, backup_id, "--yes")
    assert proc.returncode == 3, proc.stderr
    assert "corrupt" in proc.stderr
    assert_untouched(service, run_id, before)


def test_failed_start_rolls_back(tmp_path: Path, svc_setup: tuple[Service, Path, Path]) -> None:
    service, _, backups = svc_setup
    service.fail_once = tmp_path / "failed-once"
    config = service.config(tmp_path / "failing.toml", backups)
    backup(config)
    rewrite(service)
    before = contents(service)
    proc = restore(config, "--yes")
    assert proc.returncode == 1, proc.stderr
    error = json.loads(proc.stderr.strip().splitlines()[-1])["error"]
    assert "simulated start failure" in error and "rolled back" in error
    assert "data is as before" in error
    assert service.fail_once.exists()
    assert contents(service) == before
    assert leftovers(service.dir) == []


def test_key_count_mismatch_rolls_back(svc_setup: tuple[Service, Path, Path]) -> None:
    service, config, backups = svc_setup
    backup_id = backup(config)
    manifest_path = backups / f"{backup_id}.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["keys"] += 1
    manifest["keys_exact"] = True  # counted from the RDB: any difference is a wrong load
    manifest_path.write_text(json.dumps(manifest))
    rewrite(service)
    before = contents(service)
    proc = restore(config, backup_id, "--yes")
    assert proc.returncode == 1, proc.stderr
    error = json.loads(proc.stderr.strip().splitlines()[-1])["error"]
    assert "manifest says 324" in error and "rolled back" in error
    assert contents(service) == before
    assert leftovers(service.dir) == []


def test_killed_restore_then_rollback(tmp_path: Path,
                                      svc_setup: tuple[Service, Path, Path]) -> None:
    service, config, backups = svc_setup
    backup(config)
    rewrite(service)
    before = contents(service)
    service.hang = tmp_path / "start-hangs"
    hanging = service.config(tmp_path / "hanging.toml", backups)
    service.hang = None
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKUPD_")}
    env["REDIS_PASSWORD"] = PASSWORD
    proc = subprocess.Popen([*CLI, "-c", str(hanging), "restore", "--yes"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (tmp_path / "start-hangs").exists(), 30, "the start command")
    finally:
        proc.kill()  # killed between the swap and the start: Redis is down, files swapped
        proc.wait(10)
    os.kill(int((tmp_path / "start-hangs").read_text()), signal.SIGKILL)
    assert not service.answers()

    refused = restore(config, "--yes")
    assert refused.returncode == 1
    error = json.loads(refused.stderr.strip().splitlines()[-1])["error"]
    assert "interrupted restore" in error and "backupd restore --rollback" in error

    proc2 = restore(config, "--rollback", "--yes")
    assert proc2.returncode == 0, proc2.stderr
    assert "rolled back" in proc2.stdout
    assert contents(service) == before
    assert leftovers(service.dir) == []


def test_rollback_after_a_completed_restore(svc_setup: tuple[Service, Path, Path]) -> None:
    service, config, _ = svc_setup
    backup(config)
    rewrite(service)
    before = contents(service)
    assert restore(config, "--yes").returncode == 0
    assert contents(service) != before
    proc = restore(config, "--rollback", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert contents(service) == before
    nothing = restore(config, "--rollback", "--yes")
    assert nothing.returncode == 1 and "nothing to roll back" in nothing.stderr


def test_dry_run_and_refusals_change_nothing(svc_setup: tuple[Service, Path, Path]) -> None:
    service, config, backups = svc_setup
    backup_id = backup(config)
    rewrite(service)
    before, run_id = contents(service), service.run_id()
    dry = restore(config, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run: nothing was changed" in dry.stdout and backup_id in dry.stdout
    assert "RDB header and CRC" in dry.stdout and "stop Redis (command)" in dry.stdout
    no_tty = restore(config)
    assert no_tty.returncode == 2 and "--yes" in no_tty.stderr
    both = restore(config, backup_id, "--before", "2026-01-01T00:00:00Z", "--yes")
    assert both.returncode == 2
    too_early = restore(config, "--before", "2000-01-01T00:00:00Z", "--yes")
    assert too_early.returncode == 1 and "no backup at or before" in too_early.stderr
    newer = backup(config)  # ids of one directory are at least a second apart
    created = json.loads((backups / f"{backup_id}.json").read_text())["created_at"]
    picked = restore(config, "--dry-run", "--before", created)
    assert picked.returncode == 0 and backup_id in picked.stdout and newer not in picked.stdout
    assert_untouched(service, run_id, before)


def test_server_down_left_stopped_unless_start(svc_setup: tuple[Service, Path, Path]) -> None:
    service, config, backups = svc_setup
    expected = contents(service)
    backup_id = backup(config)
    rewrite(service)
    service.stop()
    proc = restore(config, backup_id, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert "left stopped" in proc.stdout and not service.answers()
    manifest = json.loads((backups / f"{backup_id}.json").read_text())
    assert sha256(service.dir / "dump.rdb") == manifest["raw_sha256"]
    proc = restore(config, backup_id, "--yes", "--start")
    assert proc.returncode == 0, proc.stderr
    assert contents(service) == expected


# -- the shutdown method ---------------------------------------------------------------------


@pytest.mark.matrix
@pytest.mark.parametrize("aof", ["no", "yes"])
def test_shutdown_method_with_a_restart_policy(tmp_path: Path, services: Callable[..., Service],
                                               aof: str) -> None:
    service = services("--appendonly", aof, supervised="always")
    populate(service, "orig")
    expected = contents(service)
    config = service.config(tmp_path / "config.toml", tmp_path / "backups", method="shutdown")
    backup_id = backup(config)
    rewrite(service)
    run_id = service.run_id()
    proc = restore(config, backup_id, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert service.run_id() != run_id and contents(service) == expected
    assert service.supervisor is not None and service.supervisor.poll() is None


def test_shutdown_method_without_restart(tmp_path: Path,
                                         services: Callable[..., Service]) -> None:
    service = services(supervised="once")
    populate(service, "orig")
    backups = tmp_path / "backups"
    config = service.config(tmp_path / "config.toml", backups, method="shutdown",
                            start_timeout="2s")
    backup_id = backup(config)
    proc = restore(config, backup_id, "--yes")
    assert proc.returncode == 1
    error = json.loads(proc.stderr.strip().splitlines()[-1])["error"]
    assert "did not come back" in error and "unless-stopped" in error and "--rollback" in error
    manifest = json.loads((backups / f"{backup_id}.json").read_text())
    assert sha256(service.dir / "dump.rdb") == manifest["raw_sha256"]  # files stay restored
    (pre,) = leftovers(service.dir)
    assert pre.startswith(".backupd-pre-restore-")


def test_shutdown_refused_rolls_back_while_running(tmp_path: Path,
                                                   services: Callable[..., Service]) -> None:
    service = services("--save", "3600 1", supervised="always")
    client = service.client()
    client.acl_setuser("restorer", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"],
                       channels=["*"], commands=["+@all", "-shutdown"])
    client.close()
    populate(service, "orig")
    config = service.config(tmp_path / "config.toml", tmp_path / "backups", method="shutdown")
    config.write_text(config.read_text().replace('port =', 'username = "restorer"\nport ='))
    backup(config)
    rewrite(service)
    before, run_id = contents(service), service.run_id()
    proc = restore(config, "--yes")
    assert proc.returncode == 1, proc.stderr
    error = json.loads(proc.stderr.strip().splitlines()[-1])["error"]
    assert "+shutdown" in error and "rolled back" in error
    assert service.run_id() == run_id and contents(service) == before
    assert leftovers(service.dir) == []
    client = service.client()
    try:
        assert client.config_get("save")["save"] == "3600 1"  # CONFIG SET save "" undone
    finally:
        client.close()
    # The file on disk is Redis's own again (the pre-restore BGSAVE), not the backup.
    assert b"new:1" in (service.dir / "dump.rdb").read_bytes()


@pytest.mark.parametrize(("exact", "off_by", "ok"), [
    (True, 0, True), (True, 1, False), (False, 1, True), (False, 100, True),
    (False, 101, False), (False, -323, False)])
def test_key_check_tolerates_only_drift_of_approximate_counts(exact: bool, off_by: int,
                                                              ok: bool) -> None:
    from backupd.actions.restore.swap import check_loaded

    info = {"rdb_last_load_keys_loaded": 320, "rdb_last_load_keys_expired": 3,
            "db0": {"keys": 320}}
    if ok:
        assert check_loaded(info, 323 + off_by, 0.0, exact).loaded == 320
    else:
        with pytest.raises(RestoreError, match="manifest says"):
            check_loaded(info, 323 + off_by, 0.0, exact)
