"""Shared machinery of the fault tests: running backupd (as a process or in-process), the output
transcript checked for secrets, invariant checks, a command-controlled Redis, tmpfs mounts.

Imported as `tests.faults.harness` by conftest.py and the test modules alike, so that the
transcript and the counters (STATS, printed in pytest's terminal summary) are one object.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import boto3.session
import botocore.loaders
import botocore.session
import filelock
import redis
import structlog
from click.testing import CliRunner
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import PASSWORD, S3_ENV, S3_KEY_ID, S3_SECRET, RedisServer, wait_until
from tests.test_restore import Service as CommandService

SECRETS = (PASSWORD, S3_SECRET)
ROOT = Path(__file__).resolve().parents[2]
ID_FILE_RE = re.compile(r"^(\d{8}T\d{6}Z-[0-9a-f]{6})\.json\Z")
LOCK = ".backupd.lock"
STATE = ".backupd-state.json"  # the daemon's health state (backupd/health.py)
PREFIX = "redis/prod/"


# -- the transcript and the counters ------------------------------------------------------------

_transcript: list[tuple[str, str]] = []
STATS: dict[str, Any] = {
    "kill_points": set(),  # named stages a process was SIGKILLed at
    "stage_kills": 0,  # kills at named stages (each point may be hit more than once)
    "random_kills": 0,  # backup processes SIGKILLed at a random time
    "random_runs": 0,  # random-time runs in all (some finish before their kill time)
    "daemon_kills": 0,
    "restore_kills": 0,
    "fault_cases": [],  # names of injected-fault scenarios that ran
    "corrupt_tried": 0,
    "corrupt_detected": 0,
    "fuzz_configs": 0,
}


def record(where: str, *texts: str) -> None:
    """Keep captured output for the final secrets check, and check it right away."""
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"a secret appears in the output of {where}"
        _transcript.append((where, text))


def transcript() -> list[tuple[str, str]]:
    return list(_transcript)


def fault_case(name: str) -> None:
    STATS["fault_cases"].append(name)


def killed_at(stage: str) -> None:
    STATS["kill_points"].add(stage)
    STATS["stage_kills"] += 1


# -- running backupd ----------------------------------------------------------------------------


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BACKUPD_") and k not in ("REDIS_PASSWORD",) and
           not k.startswith("AWS_")}
    env["REDIS_PASSWORD"] = PASSWORD
    env.update(S3_ENV)
    env.update(extra or {})
    return env


def cli(config: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real `backupd` in a subprocess, JSON logs; output recorded."""
    proc = subprocess.run(
        [sys.executable, "-m", "backupd", "--log-format", "json", "-c", str(config), *args],
        capture_output=True, text=True, timeout=timeout, env=base_env(env), check=False,
        cwd=ROOT)
    record(f"backupd {' '.join(args)}", proc.stdout, proc.stderr)
    return proc


@dataclass
class Ran:
    """The outcome of an in-process CLI run."""

    code: int
    stdout: str
    stderr: str
    crashed: str = ""  # a traceback when the command raised (a bug)

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr.splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


_LOADER = botocore.loaders.create_loader()


class _SharedModels(boto3.session.Session):
    """A boto3 session whose botocore data loader (the parsed service models) is shared: in
    this process only, so that hundreds of in-process CLI runs do not parse the S3 model
    hundreds of times (~0.1 s each). backupd's own behaviour is unchanged."""

    def __init__(self, botocore_session: Any = None, **kwargs: Any) -> None:
        if botocore_session is None:
            botocore_session = botocore.session.get_session()
            botocore_session.register_component("data_loader", _LOADER)
        super().__init__(botocore_session=botocore_session, **kwargs)


def cli_fast(config: Path, *args: str, env: dict[str, str] | None = None) -> Ran:
    """The same click command tree in this process (no interpreter start-up): for the checks
    that run hundreds of times. Logging is put back as it was afterwards."""
    from backupd.cli import cli as command

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    saved = structlog.get_config()
    full_env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("BACKUPD_")}
    full_env.update({"REDIS_PASSWORD": PASSWORD, **S3_ENV, **(env or {})})
    session_class = boto3.session.Session
    boto3.session.Session = _SharedModels  # type: ignore[assignment,misc]
    try:
        result = CliRunner().invoke(command, ["--log-format", "json", "-c", str(config), *args],
                                    env=full_env, catch_exceptions=True)
    finally:
        boto3.session.Session = session_class  # type: ignore[misc]
        root.handlers[:], root.level = handlers, level
        structlog.configure(**saved)
    crashed = ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        crashed = "".join(traceback.format_exception(result.exception))
    ran = Ran(result.exit_code, result.stdout, result.stderr, crashed)
    record(f"backupd {' '.join(args)} (in-process)", ran.stdout, ran.stderr, crashed)
    return ran


@dataclass
class Spawned:
    """A backupd process started in the background (to be killed); output in files."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    what: str

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def output(self) -> tuple[str, str]:
        out = self.out.read_text(errors="replace")
        err = self.err.read_text(errors="replace")
        record(self.what, out, err)
        return out, err


_SPAWNED: list[Spawned] = []


def reap_spawned() -> None:
    """SIGKILL what a test spawned and left running (a failed assertion before its stop):
    a `backupd run` left behind would keep a replication link and ports for the whole run."""
    while _SPAWNED:
        _SPAWNED.pop().kill()


def spawn(config: Path, *args: str, env: dict[str, str] | None = None,
          logs: Path | None = None) -> Spawned:
    logs = logs or Path(tempfile.mkdtemp(prefix="backupd-fault-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.out")))
    out, err = logs / f"{n}.out", logs / f"{n}.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backupd", "--log-format", "json", "-c", str(config), *args],
            stdout=fo, stderr=fe, env=base_env(env), cwd=ROOT)
    spawned = Spawned(proc, out, err, f"backupd {' '.join(args)} (spawned)")
    _SPAWNED.append(spawned)
    return spawned


def crash_env(stage: str) -> dict[str, str]:
    return {"BACKUPD_CRASH_AT": stage}


def run_killed_at(config: Path, stage: str, *args: str, env: dict[str, str] | None = None,
                  timeout: float = 90) -> Spawned:
    """Run `backupd ARGS` with the crash hook at `stage`; assert it really died there."""
    spawned = spawn(config, *args, env={**(env or {}), **crash_env(stage)})
    code = spawned.wait(timeout)
    _, err = spawned.output()
    assert code == -signal.SIGKILL, f"not killed at {stage} (exit {code}): {err[-2000:]}"
    killed_at(stage)
    return spawned


# -- looking at a backup directory and a bucket, independently of backupd ---------------------


def complete_local(backups: Path) -> dict[str, dict[str, Any]]:
    """Backups on disk by our own reading: a regular <id>.json that parses and names an
    artifact that exists as a regular file."""
    found: dict[str, dict[str, Any]] = {}
    if not backups.is_dir():
        return found
    for path in backups.iterdir():
        match = ID_FILE_RE.match(path.name)
        if not match or path.is_symlink() or not path.is_file():
            continue
        try:
            manifest = json.loads(path.read_bytes())
            name = str(manifest["artifact"])
        except (ValueError, KeyError, TypeError):
            continue
        artifact = backups / name
        if _owned(match.group(1), manifest, name) and artifact.is_file() and \
                not artifact.is_symlink():
            found[match.group(1)] = manifest
    return found


def _owned(backup_id: str, manifest: dict[str, Any], artifact: str) -> bool:
    """The manifest is of this id and names an artifact of this id, in the same place."""
    return manifest.get("id") == backup_id and artifact.startswith(backup_id + ".rdb") and \
        "/" not in artifact and "\0" not in artifact


def leftovers(backups: Path) -> list[str]:
    """Files that are neither the lock, the daemon's state, nor part of a complete backup."""
    complete = complete_local(backups)
    owned = {LOCK, STATE} | {f"{i}.json" for i in complete} | {
        m["artifact"] for m in complete.values()}
    return sorted(p.name for p in backups.iterdir() if p.name not in owned)


def assert_lock_free(backups: Path) -> None:
    """The kernel released a dead holder's flock: the next run is never blocked."""
    if not (backups / LOCK).exists():
        return
    lock = filelock.FileLock(backups / LOCK, timeout=0)
    lock.acquire()
    lock.release()


@dataclass(frozen=True)
class Bucket:
    endpoint: str  # moto itself, never the fault proxy
    name: str
    prefix: str = PREFIX

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY_ID,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1")

    def keys(self) -> list[str]:
        client, keys, token = self.client(), [], None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.name}
            if token:
                kwargs["ContinuationToken"] = token
            resp = client.list_objects_v2(**kwargs)
            keys += [o["Key"] for o in resp.get("Contents", [])]
            token = resp.get("NextContinuationToken")
            if not token:
                return sorted(keys)

    def complete(self) -> dict[str, dict[str, Any]]:
        keys, client, found = set(self.keys()), self.client(), {}
        for key in keys:
            name = key[len(self.prefix):] if key.startswith(self.prefix) else ""
            match = ID_FILE_RE.match(name)
            if not match:
                continue
            try:
                manifest = json.loads(client.get_object(Bucket=self.name, Key=key)["Body"].read())
            except ValueError:
                continue
            name = str(manifest.get("artifact"))
            if _owned(match.group(1), manifest, name) and self.prefix + name in keys:
                found[match.group(1)] = manifest
        return found

    def orphans(self) -> list[str]:
        complete = self.complete()
        owned = {f"{self.prefix}{i}.json" for i in complete} | {
            self.prefix + m["artifact"] for m in complete.values()}
        return [k for k in self.keys() if k.startswith(self.prefix) and k not in owned]

    def put(self, key: str, body: bytes) -> None:
        self.client().put_object(Bucket=self.name, Key=key, Body=body)


def s3_conf(endpoint: str, bucket: str, *, max_attempts: int = 2, read_timeout: str = "1s",
            keep_local: bool = True, checksum: str = "sha256", retention: str = "") -> str:
    """An [s3] section (for the fault proxy: short timeouts, few attempts)."""
    return f"""
[s3]
bucket = "{bucket}"
prefix = "{PREFIX}"
endpoint_url = "{endpoint}"
addressing_style = "path"
max_attempts = {max_attempts}
connect_timeout = "1s"
read_timeout = "{read_timeout}"
keep_local = {str(keep_local).lower()}
checksum = "{checksum}"
{f"[s3.retention]{chr(10)}{retention}" if retention else ""}
"""


def assert_consistent(config: Path, backups: Path, *, bucket: Bucket | None = None,
                      identity: Path | None = None) -> dict[str, list[str]]:
    """The crash invariants, as backupd reports them:
    - `backupd list` shows exactly the complete backups (manifest + artifact) of each location,
      so nothing without a manifest is ever listed;
    - `backupd verify --all` passes for every listed backup;
    - `backupd prune --dry-run` considers only listed backups (no file without a manifest is
      ever pruned as a backup);
    - the backup directory's lock is free.
    Returns the listed ids per location."""
    assert_lock_free(backups)
    locations = ["local"] + (["s3"] if bucket is not None else [])
    where = "all" if bucket is not None else "local"
    ran = cli_fast(config, "list", "--json", "--location", where)
    assert ran.code == 0 and not ran.crashed, ran.stderr + ran.crashed
    entries = json.loads(ran.stdout)
    listed = {loc: [e["id"] for e in entries if loc in e["locations"]] for loc in locations}
    for location in locations:
        expected = complete_local(backups) if location == "local" else bucket.complete() \
            if bucket is not None else {}
        assert sorted(listed[location]) == sorted(expected), (location, listed, expected)
    if entries:
        args = ["verify", "--all", "--location", where]
        if identity is not None:
            args += ["--identity-file", str(identity)]
        ran = cli_fast(config, *args)
        assert ran.code == 0, ran.stdout + ran.stderr + ran.crashed
    ran = cli_fast(config, "prune", "--dry-run", "--json")
    assert not ran.crashed, ran.crashed
    for report in json.loads(ran.stdout):
        ids = [b["id"] for b in report["backups"]]
        assert set(ids) <= set(listed.get(report["location"], [])), report
        # An incomplete upload of a committed backup's key is an orphan (killed mid-stream,
        # committed later by `upload --pending`); an object of a listed backup never is.
        objects = {o["name"] for o in report["orphans"] if "(incomplete upload" not in o["name"]}
        assert not {n.split(".")[0] for n in objects} & set(ids), report
    return listed


# -- Redis ------------------------------------------------------------------------------------


def redis_client(port: int) -> redis.Redis:
    return redis.Redis(port=port, password=PASSWORD, decode_responses=False, socket_timeout=10,
                       protocol=2, retry=Retry(NoBackoff(), 0))


def populate(port: int, n: int, value_size: int = 64, prefix: str = "key",
             random_values: bool = False, db: int = 0) -> None:
    """n string keys `<prefix>:<i>`; values repetitive (compressible) or random bytes."""
    client = redis_client(port)
    try:
        client.select(db)
        for start in range(0, n, 5000):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(n, start + 5000)):
                value = os.urandom(value_size) if random_values else (
                    f"{prefix}-{i}-".encode() * (value_size // 8 + 1))[:value_size]
                pipe.set(f"{prefix}:{i}", value)
            pipe.execute()
    finally:
        client.close()


def contents(port: int) -> dict[tuple[int, bytes], bytes]:
    """Every string key and value in every db: exact comparisons of datasets."""
    client = redis_client(port)
    out: dict[tuple[int, bytes], bytes] = {}
    try:
        dbs = [int(k[2:]) for k in client.info("keyspace")]
        for db in dbs:
            client.select(db)
            for key in client.scan_iter(count=5000):
                value = client.get(key)
                assert isinstance(value, bytes) and isinstance(key, bytes)
                out[(db, key)] = value
    finally:
        client.close()
    return out


def info(port: int, section: str = "everything") -> dict[str, Any]:
    client = redis_client(port)
    try:
        result: dict[str, Any] = client.info(section)
        return result
    finally:
        client.close()


def in_bgsave(port: int) -> bool:
    """True while a save child runs: a failed backup may leave its BGSAVE running (reading it
    live, backupd can stop first), and Redis refuses SAVE until it ends."""
    return bool(int(info(port, "persistence")["rdb_bgsave_in_progress"]))


def set_save_delay(port: int, micros_per_key: int) -> None:
    client = redis_client(port)
    try:
        client.config_set("rdb-key-save-delay", micros_per_key)
    finally:
        client.close()


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def kill_redis(server: RedisServer) -> None:
    """SIGKILL redis-server and its save child, as an OOM kill or a dead container does."""
    assert server.proc is not None
    pids = [server.proc.pid, *children(server.proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.proc.wait(10)
    wait_until(lambda: all(not Path(f"/proc/{p}").exists() or
                           "\nState:\tZ" in _status(p) for p in pids), 10, "redis to die")
    server.proc = None


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""


# -- a Redis stopped and started only through commands (restore's `command` method) ----------


@dataclass
class Service(CommandService):
    """tests/test_restore.py's command-controlled Redis, plus what the fault tests ask of it."""

    @property
    def port(self) -> int:
        return self.server.port

    def restore_section(self) -> str:
        return (f'[restore]\nmethod = "command"\nstop_timeout = "15s"\nstart_timeout = "30s"\n'
                f'command_timeout = "30s"\nstop_command = {json.dumps(self.stop_command())}\n'
                f"start_command = {json.dumps(self.start_command())}\n")

    def restore_leftovers(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.name.startswith(".backupd-"))


# -- tmpfs --------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes at `path` (root only); unmounted afterwards."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# -- small helpers ------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot_dir(path: Path) -> dict[str, str]:
    """name -> sha256 of every regular file (to prove files were not touched)."""
    return {p.name: sha256(p) for p in sorted(path.iterdir()) if p.is_file()}


def last_event(stderr: str) -> dict[str, Any]:
    for line in reversed(stderr.strip().splitlines()):
        with contextlib.suppress(ValueError):
            event: dict[str, Any] = json.loads(line)
            return event
    return {}


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback (most recent call last)" not in text, text[-3000:]
        assert '"unexpected_error"' not in text, text[-3000:]


def deadline_wait(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    """Let `proc` run for up to `seconds`; True if it exited by then (the kill timing of the
    random-kill tests, not a synchronisation)."""
    try:
        proc.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def monotonic() -> float:
    return time.monotonic()
