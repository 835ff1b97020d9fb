"""Timing and peak memory of child processes, and the statistics over repeated runs.

Every measured command runs as a child under GNU time (`/usr/bin/time -f ...`): the wall time
is taken here around the child, the peak RSS (`%M`, the largest resident set of the child and
the children it waited for) and CPU time come from GNU time. A driver may also print
`work_seconds=...` (the time of the measured part without interpreter start-up).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

GNU_TIME = "/usr/bin/time"
LOGS: list[Path] = []  # when set ([directory]): each command's output is kept there
_current = ["run"]  # the label of the series being measured, for the log file name


@dataclass(frozen=True)
class Sample:
    seconds: float  # wall time of the child, start-up included
    rss_mib: float  # peak resident set size
    cpu_seconds: float  # user + system
    work_seconds: float | None = None  # as reported by a driver, start-up excluded
    extra: dict[str, float] = field(default_factory=dict)  # other `name=value` a driver printed
    events: dict[str, float] = field(default_factory=dict)  # backupd log event -> s since start

    def metric(self, name: str) -> float:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"sample has no {name}")
        return float(value)


@dataclass
class Series:
    """Repeated runs of one command."""

    label: str
    command: str  # as shown in the report
    samples: list[Sample] = field(default_factory=list)

    def values(self, metric: str = "seconds") -> list[float]:
        return [s.metric(metric) for s in self.samples]

    def median(self, metric: str = "seconds") -> float:
        return statistics.median(self.values(metric))

    def summary(self, metric: str = "seconds") -> dict[str, Any]:
        values = self.values(metric)
        return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
                "max": round(max(values), 3), "runs": len(values),
                "values": [round(v, 3) for v in values]}

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "command": self.command,
                               "seconds": self.summary("seconds"),
                               "peak_rss_mib": self.summary("rss_mib"),
                               "cpu_seconds": self.summary("cpu_seconds")}
        if self.samples and self.samples[0].work_seconds is not None:
            out["work_seconds"] = self.summary("work_seconds")
        if self.events():
            out["events_median_seconds"] = self.events()
        extra = sorted({k for s in self.samples for k in s.extra})
        for key in extra:
            out[key] = round(statistics.median(s.extra[key] for s in self.samples
                                               if key in s.extra), 3)
        return out

    def events(self) -> dict[str, float]:
        """Median time of each log event seen in every run, in order of occurrence."""
        names = [n for n in self.samples[0].events if all(n in s.events for s in self.samples)] \
            if self.samples else []
        medians = {n: round(statistics.median(s.events[n] for s in self.samples), 2)
                   for n in names}
        return dict(sorted(medians.items(), key=lambda item: item[1]))


_REPORTED = re.compile(r"\b([a-z_]+)=([0-9]+(?:\.[0-9]+)?)\b")


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
        timeout: float = 900) -> Sample:
    """Run one command under GNU time (with exactly `env`, when given); raise with its output
    if it fails."""
    with tempfile.NamedTemporaryFile("r", prefix="bench-time-", suffix=".txt") as report:
        full = [GNU_TIME, "-f", "%M %U %S", "-o", report.name, *argv]
        wall_clock = time.time()
        started = time.perf_counter()
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                              env=env, check=False)
        seconds = time.perf_counter() - started
        if LOGS:
            slug = re.sub(r"[^A-Za-z0-9]+", "-", _current[0]).strip("-")
            log = LOGS[0] / f"{len(list(LOGS[0].iterdir())):03d}-{slug}.log"
            log.write_text(f"$ {shlex.join(argv)}\n# exit {proc.returncode}, {seconds:.3f}s\n"
                           f"{proc.stdout}\n{proc.stderr}")
        if proc.returncode != 0:
            raise RuntimeError(f"command failed ({proc.returncode}): {shlex.join(argv)}\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        fields = report.read().split()[-3:]  # a line before them means a signal or exit code
    rss_kib, user, system = int(fields[0]), float(fields[1]), float(fields[2])
    reported = {name: float(value) for name, value in _REPORTED.findall(proc.stdout)}
    return Sample(seconds, rss_kib / 1024, user + system, reported.pop("work_seconds", None),
                  reported, _events(proc.stderr, wall_clock))


def _events(log: str, started: float) -> dict[str, float]:
    """When each backupd JSON log event happened, in seconds since the command started (the
    first of each name; restore steps by number)."""
    events: dict[str, float] = {}
    for line in log.splitlines():
        try:
            entry = json.loads(line)
            moment = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        name = str(entry.get("event", ""))
        if name == "restore_step":
            name = f"restore_step_{entry.get('step')}"
        events.setdefault(name, round(moment.timestamp() - started, 3))
    return events


def settle() -> None:
    """Before each timed run: write back dirty pages, so no run pays for the previous one."""
    os.sync()
    time.sleep(0.1)


@dataclass
class Contender:
    series: Series
    measure: Callable[[], Sample]
    prepare: Callable[[], None] | None = None  # untimed: clean outputs, reset state


def alternate(runs: int, contenders: Sequence[Contender]) -> None:
    """Run every contender `runs` times, interleaved (ABC, BCA, CAB, ...) so that a noisy
    neighbour or a slow minute hits all of them alike."""
    for i in range(runs):
        for j in range(len(contenders)):
            contender = contenders[(i + j) % len(contenders)]
            if contender.prepare is not None:
                contender.prepare()
            settle()
            _current[0] = contender.series.label
            sample = contender.measure()
            contender.series.samples.append(sample)
            work = f" (work {sample.work_seconds:.2f}s)" if sample.work_seconds else ""
            print(f"  {contender.series.label:<46} {sample.seconds:7.2f}s{work}  "
                  f"rss {sample.rss_mib:6.1f} MiB  cpu {sample.cpu_seconds:6.2f}s", flush=True)


def clear_dir(path: Path) -> None:
    """Empty a directory (files and hidden temp files), keeping the directory itself."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            clear_dir(entry)
            entry.rmdir()
        else:
            entry.unlink()
