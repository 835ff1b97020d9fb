"""Before/after of backupd/pipeline.py: `python -m bench.compare [REV] [--runs N] [--size S]`.

Runs the pipeline scenarios (1, 2, 6) and the unpack paths of verify and restore with the
pipeline.py of git revision REV (default HEAD, i.e. without uncommitted changes) and with the
working tree's, alternately, and prints a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench import datasets
from bench.measure import Contender, Series, alternate, clear_dir, run
from bench.scenarios import DRIVER, WORK, ZSTD, child_env

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("rev", nargs="?", default="HEAD")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", default="1GB", choices=sorted(datasets.SIZES))
    args = parser.parse_args(argv)
    before = datasets.CACHE / f"pipeline-{args.rev}.py"
    before.write_bytes(subprocess.run(["git", "show", f"{args.rev}:backupd/pipeline.py"],
                                      cwd=ROOT, capture_output=True, check=True).stdout)
    data = datasets.get(args.size)
    out, scratch = WORK / "compare", WORK / "compare-artifact"
    clear_dir(scratch)
    env = child_env()
    old_env = {**env, "BENCH_PIPELINE": str(before)}
    artifact = scratch / "a.rdb.zst"
    subprocess.run([ZSTD, "-q", "-3", "-T0", str(data.path), "-o", str(artifact)], check=True)
    recipient = _recipient()

    def driver(label: str, old: bool, *argv: str) -> Contender:
        return Contender(Series(label, ""), lambda: run([*DRIVER, *argv],
                                                       env=old_env if old else env),
                         lambda: clear_dir(out))

    def shell(label: str, script: str) -> Contender:
        return Contender(Series(label, script), lambda: run(["sh", "-c", script], env=env),
                         lambda: clear_dir(out))

    src = str(data.path)
    groups: list[tuple[str, list[Contender]]] = []
    for what, extra, baseline in (
            ("pack zstd-3", ["zstd", "3"], shell("zstd -3 -T0",
                                                 f"{ZSTD} -q -3 -T0 {src} -o {out}/z")),
            ("pack zstd-3 + age", ["zstd", "3", recipient], None),
            ("pack none", ["none", "0"], shell("cp + sync", f"cp {src} {out}/x && sync"))):
        contenders = [driver(f"before: {what}", True, "pack", src, str(out), *extra),
                      driver(f"after: {what}", False, "pack", src, str(out), *extra)]
        groups.append((what, contenders + ([baseline] if baseline else [])))
    for what, extra in (("unpack (verify)", []), ("unpack to file + fsync (restore)",
                                                  [str(out / "out.rdb")])):
        groups.append((what, [
            driver(f"before: {what}", True, "unpack", str(artifact), "zstd", *extra),
            driver(f"after: {what}", False, "unpack", str(artifact), "zstd", *extra)]))
    print(f"[compare] pipeline.py at {args.rev} vs working tree, {data.name}, "
          f"{args.runs} runs", flush=True)
    lines = ["| operation | before | after | after / before | CLI baseline |",
             "|---|---|---|---|---|"]
    for what, contenders in groups:
        alternate(args.runs, contenders)
        old, new = (c.series.median("work_seconds") for c in contenders[:2])
        base = (f"{contenders[2].series.median():.2f} s ({contenders[2].series.label}): "
                f"before {old / contenders[2].series.median():.2f}x, after "
                f"{new / contenders[2].series.median():.2f}x" if len(contenders) > 2 else "—")
        lines.append(f"| {what} | {old:.2f} s | {new:.2f} s | {new / old:.2f}x | {base} |")
    clear_dir(out)
    clear_dir(scratch)
    print("\n".join(lines))
    return 0


def _recipient() -> str:
    import pyrage

    return str(pyrage.x25519.Identity.generate().to_public())


if __name__ == "__main__":
    sys.exit(main())
