"""`python -m bench.replication_source`: `backupd backup` with redis.source = "replication"
against redis.source = "volume", alternately, on the bench datasets (the row "replication
source vs volume source" of docs/benchmarks.md). The master runs with
repl-diskless-sync-delay 0 (its 5 s default is a wait for other replicas, not work; backupd
logs it with the hint when it is set)."""

from __future__ import annotations

import argparse
import shutil
import statistics
from functools import partial

from bench import datasets
from bench.measure import Contender, Series, alternate, clear_dir
from bench.redisproc import RedisServer
from bench.scenarios import BACKUPD, Lab, write_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replication_source",
                                     description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="100MB")
    args = parser.parse_args(argv)
    lab = Lab(args.runs)
    for name in args.sizes.split(","):
        data = datasets.get(name)
        directory = lab.path(f"replsource-{name}")
        clear_dir(directory)
        shutil.copyfile(data.path, directory / "dump.rdb")
        server = RedisServer(directory, extra=("--repl-diskless-sync-delay", "0"))
        server.start(timeout=600)
        try:
            contenders = []
            for source in ("replication", "volume"):
                backups = lab.path(f"backups-{source}-{name}")
                cfg = write_config(lab.path("config", f"{source}-{name}.toml"),
                                   port=server.port, data_dir=directory, backups=backups)
                cfg.write_text(cfg.read_text().replace(
                    "[redis]\n", f'[redis]\nsource = "{source}"\n'))
                contenders.append(Contender(
                    Series(f"backupd backup source={source}", f"source = {source}"),
                    partial(lab.measure, [*BACKUPD, "-c", str(cfg), "backup"]),
                    partial(clear_dir, backups)))
            alternate(args.runs, contenders)
            repl, vol = (c.series for c in contenders)
            print(f"[bench] {name}: replication {repl.median():.2f}s "
                  f"(rss {repl.median('rss_mib'):.0f} MiB) vs volume {vol.median():.2f}s "
                  f"(rss {vol.median('rss_mib'):.0f} MiB): ratio "
                  f"{repl.median() / vol.median():.2f}; runs "
                  f"{[round(v, 2) for v in repl.values()]} vs "
                  f"{[round(v, 2) for v in vol.values()]}; rss medians "
                  f"{statistics.median(repl.values('rss_mib')):.0f}/"
                  f"{statistics.median(vol.values('rss_mib')):.0f} MiB")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
