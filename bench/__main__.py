"""`python -m bench` (`make bench`): every scenario, then docs/benchmarks.{md,json}."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from bench import datasets, report, scenarios

DOCS = Path(__file__).resolve().parent.parent / "docs"
SCENARIOS = ("1", "2", "3", "4", "5", "6")


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds: every redis-server started here is stopped


def _renice(target: int) -> int:
    """Apply the niceness (children inherit it); keep the current one when not allowed."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, target)
    except PermissionError:
        print(f"[bench] cannot set niceness {target} (not root): running at the current one")
    return os.getpriority(os.PRIO_PROCESS, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=3,
                        help="timed runs of every command (default 3; the pipeline scenarios, "
                             "seconds each, get 2 more)")
    parser.add_argument("--sizes", default="100MB,1GB",
                        help="datasets, comma-separated (default 100MB,1GB)")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help="scenarios to run, comma-separated (default all: "
                             f"{','.join(SCENARIOS)}); a partial run reports only those")
    parser.add_argument("--docs", type=Path, default=DOCS,
                        help="where benchmarks.md and benchmarks.json go")
    parser.add_argument("--nice", type=int, default=-10,
                        help="niceness for the benchmark and everything it starts (default "
                             "-10 when root: less noise from other work on a shared machine)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    command = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    started, clock = report.now(), time.monotonic()
    facts = report.machine()
    facts["niceness"] = _renice(args.nice)
    facts["load_before"] = report.load_average()
    lab = scenarios.Lab(args.runs)
    sizes = [s for s in args.sizes.split(",") if s]
    only = {s for s in args.only.split(",") if s}
    if not only <= set(SCENARIOS):
        parser.error(f"--only: unknown scenario(s) {', '.join(sorted(only - set(SCENARIOS)))}")
    largest = max(sizes, key=lambda s: datasets.SIZES[s])
    why_not = scenarios.restore_available(lab)
    with lab.moto():
        for name in sizes:
            data = datasets.get(name)
            lab.results.datasets.append(data)
            if only & {"1", "2", "6"}:
                scenarios.pipeline_scenarios(lab, data)
            backups = None
            with scenarios.source_server(lab, data) as src:
                if only & {"1", "2", "4", "5", "6"}:  # 4 restores the backup these make
                    backups = scenarios.full_backups(
                        lab, src, all_codecs=name == largest and bool(only & {"2", "6"}))
                if "3" in only:
                    scenarios.s3_scenario(lab, src)
            if backups is not None and "5" in only:
                scenarios.verify_runs(lab, name, backups)
            if backups is not None and "4" in only:
                if why_not:
                    lab.results.skipped["4"] = why_not
                else:
                    scenarios.restore_scenario(lab, name, backups, target_ratio=name == largest)
    facts["load_after"] = report.load_average()
    scenarios.clean_up()
    seconds = time.monotonic() - clock
    report.write(lab.results, args.docs, command, started, seconds, facts)
    print(f"[bench] done in {seconds / 60:.1f} minutes: {args.docs / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
