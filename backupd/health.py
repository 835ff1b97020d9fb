"""Is the sidecar doing its job? One rule, served by /healthz and by `backupd health`.

Health means *backup freshness*, because the failure operators miss is silence ("backups hadn't
been running for 4 days"):

- healthy ("ok") when the last successful backup is at most `metrics.max_age` old;
- healthy ("starting") while no run could reasonably have succeeded yet: until
  `first_due + max_age`, where `first_due` is the first fire time after start-up (the start
  itself with `run_on_start`). That is the same slack a running daemon gets between two
  successes, so a restart neither flaps the check nor hides a daemon that never succeeds. It
  applies even when an older backup exists: the daemon cannot have fixed a gap before its first
  run, and the age of that backup is still in the body and in the metrics;
- unhealthy ("stale") otherwise, with the age and the last error in the reason.

A failed run alone does not make the daemon unhealthy while the last success is fresh: that is
what `max_age` tolerates; the failure is in the body, the metrics and the notifications.

`backupd health` cannot ask the process (no HTTP needed), so the daemon keeps the same facts in
`<backup.dir>/.backupd-state.json` (0600, written atomically) and rewrites it every
HEARTBEAT_S seconds. The command additionally fails when the file is missing ("the daemon has not
written its state yet": the daemon writes it before its first run, within a second of start;
the image's HEALTHCHECK --start-period covers that second, so the command has no grace of its
own), when the daemon has stopped, or when the heartbeat is older than STALE_AFTER_S (a dead
daemon's file must not look healthy).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backupd import __version__
from backupd import manifest as mf
from backupd.config import Config
from backupd.errors import BackupdError
from backupd.fsio import write_atomic

STATE_FILE = ".backupd-state.json"
STATE_FORMAT = 1
HEARTBEAT_S = 30.0
STALE_AFTER_S = 150.0  # five missed heartbeats: far beyond a slow fsync during a big backup
_TIMES = ("started_at", "first_due", "next_run", "last_attempt", "last_success", "last_error_at",
          "updated_at", "stopped_at", "pitr_durable")


@dataclass(frozen=True)
class DaemonState:
    """What the daemon knows about its runs; times are Unix seconds (None: never)."""

    started_at: float
    first_due: float | None = None
    next_run: float | None = None
    running: bool = False
    last_attempt: float | None = None
    last_success: float | None = None
    last_success_id: str = ""
    last_error: str = ""
    last_error_at: float | None = None
    consecutive_failures: int = 0
    updated_at: float = 0.0
    stopped_at: float | None = None
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    version: str = __version__
    pitr_max_lag: float | None = None  # [pitr] on: /healthz fails past this lag
    pitr_durable: float | None = None  # the newest fsynced stamp of the point-in-time link

    def to_json(self) -> dict[str, Any]:
        """Times as ISO 8601 UTC: the file and /healthz are read by people too."""
        data = asdict(self)
        for name in _TIMES:
            data[name] = iso_time(data[name])
        return {"format": STATE_FORMAT, **data}

    @classmethod
    def from_json(cls, data: Any) -> DaemonState:
        """Parse the state file; raises ValueError when it is not one."""
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ValueError("not a backupd state file (format 1)")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in _TIMES:
                value = None if value is None else _epoch(value)
            elif f.name == "running":
                value = bool(value)
            elif f.name in ("consecutive_failures", "pid"):
                value = int(value)
            elif f.name == "pitr_max_lag":
                value = None if value is None else float(value)
            elif not isinstance(value, str):
                raise ValueError(f"{f.name}: expected a string")
            values[f.name] = value
        if "started_at" not in values or values["started_at"] is None:
            raise ValueError("started_at is missing")
        return cls(**values)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    status: str  # ok | starting | stale | stopped | unresponsive | missing | unreadable
    reason: str


def evaluate(state: DaemonState, now: float, max_age: float,
             stale_after: float | None = None) -> Verdict:
    """The health rule of the module docstring; `stale_after` also checks the heartbeat."""
    if state.stopped_at is not None:
        return Verdict(False, "stopped", f"the daemon stopped at {iso_time(state.stopped_at)}")
    if stale_after is not None and now - state.updated_at > stale_after:
        return Verdict(False, "unresponsive",
                       f"the daemon has not updated its state for {_ago(now - state.updated_at)} "
                       f"(since {iso_time(state.updated_at)}): is it running?")
    lagging = pitr_lag(state, state.updated_at if stale_after is not None else now)
    if lagging is not None:
        return lagging
    error = f"; last error ({iso_time(state.last_error_at)}): {state.last_error}" \
        if state.last_error else ""
    if state.last_success is not None and now - state.last_success <= max_age:
        return Verdict(True, "ok", f"last successful backup {state.last_success_id} "
                                   f"{_ago(now - state.last_success)} ago")
    grace_until = (state.first_due or state.started_at) + max_age
    last = ("no successful backup yet" if state.last_success is None else
            f"the last successful backup is {_ago(now - state.last_success)} old")
    if now < grace_until:
        return Verdict(True, "starting",
                       f"{last}; the daemon started at {iso_time(state.started_at)}, first run "
                       f"due {iso_time(state.first_due)}, healthy until {iso_time(grace_until)} "
                       f"unless a backup succeeds{error}")
    return Verdict(False, "stale", f"{last} (metrics.max_age {_ago(max_age)}){error}")


def pitr_lag(state: DaemonState, now: float) -> Verdict | None:
    """Unhealthy when the point-in-time link's newest durable second is older than
    pitr.max_lag (since the start, before the first one): writes since would be lost."""
    if state.pitr_max_lag is None:
        return None
    durable = state.pitr_durable
    lag = now - (durable if durable is not None else state.started_at)
    if lag <= state.pitr_max_lag:
        return None
    since = f"the newest durable second is {iso_time(durable)}" if durable is not None \
        else f"no durable second since the start ({iso_time(state.started_at)})"
    return Verdict(False, "pitr_lag", f"point-in-time lag {_ago(lag)} > pitr.max_lag "
                                      f"{_ago(state.pitr_max_lag)}: {since}")


def body(state: DaemonState, verdict: Verdict) -> dict[str, Any]:
    """The /healthz JSON document."""
    return {
        "status": verdict.status,
        "reason": verdict.reason,
        "last_success": iso_time(state.last_success),
        "last_success_id": state.last_success_id or None,
        "last_error": ({"at": iso_time(state.last_error_at), "message": state.last_error}
                       if state.last_error else None),
        "next_run": iso_time(state.next_run),
        "running": state.running,
        "started_at": iso_time(state.started_at),
        **({"pitr_durable": iso_time(state.pitr_durable)}
           if state.pitr_max_lag is not None else {}),
    }


def state_path(config: Config) -> Path:
    return Path(config.backup.dir) / STATE_FILE


def write_state(path: Path, state: DaemonState) -> None:
    write_atomic(path, json.dumps(state.to_json(), indent=2).encode() + b"\n", mode=0o600)


def read_state(path: Path) -> DaemonState | None:
    """The state file, or None when it does not exist; ValueError when it is unreadable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return DaemonState.from_json(json.loads(data))
    except (ValueError, TypeError, BackupdError) as exc:
        raise ValueError(f"{path} is not a valid state file: {exc}") from None


def check(config: Config, now: float | None = None) -> Verdict:
    """`backupd health`: the daemon's verdict from its state file, no HTTP and no Redis."""
    path = state_path(config)
    try:
        state = read_state(path)
    except ValueError as exc:
        return Verdict(False, "unreadable", str(exc))
    if state is None:
        return Verdict(False, "missing", f"the daemon has not written its state yet ({path})")
    return evaluate(state, time.time() if now is None else now, config.metrics.max_age,
                    STALE_AFTER_S)


class Tracker:
    """The live state, shared by job threads, the HTTP thread and the main loop."""

    def __init__(self, state: DaemonState, path: Path | None) -> None:
        self._state = state
        self._path = path
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()

    @property
    def state(self) -> DaemonState:
        with self._lock:
            return self._state

    def update(self, **changes: Any) -> DaemonState:
        with self._lock:
            self._state = replace(self._state, **changes)
            return self._state

    def save(self) -> None:
        """Write the file (stamping updated_at); OSError is the caller's to log, not fatal."""
        if self._path is None:
            return
        with self._write_lock:  # the newest snapshot is always the one written last
            write_state(self._path, self.update(updated_at=time.time()))


def iso_time(moment: float | None) -> str | None:
    """Unix seconds as `2026-01-02T03:04:05Z` (None stays None)."""
    if moment is None:
        return None
    return mf.format_time(datetime.fromtimestamp(moment, UTC))


def _epoch(text: Any) -> float:
    if not isinstance(text, str):
        raise ValueError(f"expected a time string, got {type(text).__name__}")
    return mf.parse_time(text).timestamp()


def _ago(seconds: float) -> str:
    """`3h12m`, `45s`: ages for people, not to be parsed."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n][:2]
    return "".join(shown) or "0s"
