"""The benchmark's scenarios, each timing backupd and its baseline alternately in the same run.

Work happens in bench/.cache/run/ (emptied at the start); datasets come from bench.datasets.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import measure
from bench.datasets import CACHE, Dataset
from bench.measure import Contender, Sample, Series, alternate, clear_dir, run
from bench.redisproc import (
    REDIS_CLI,
    RedisServer,
    answers,
    client,
    free_port,
    loaded,
    server_argv,
    wait_until,
)

PYTHON = sys.executable
BACKUPD = [PYTHON, "-m", "backupd", "--log-format", "json"]
DRIVER = [PYTHON, "-m", "bench.driver"]
ZSTD = shutil.which("zstd") or "zstd"
WORK = CACHE / "run"
BUCKET = "bench"
S3_ENV = {"AWS_ACCESS_KEY_ID": "AKIABENCHBACKUPD0001", "AWS_SECRET_ACCESS_KEY": "bench-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Row:
    """One line of the results table: backupd versus its baseline (or alone, for context)."""

    scenario: str
    title: str
    dataset: str
    backupd: Series
    baseline: Series | None
    metric: str = "seconds"  # which Sample field the ratio uses, for backupd
    baseline_metric: str = "seconds"
    target: float | None = None  # the ratio must be <= target
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """The median of the per-round ratios: each backupd run divided by the baseline run of
        the same round (they ran back to back, so a noisy minute hits both)."""
        if self.baseline is None:
            return None
        pairs = zip(self.backupd.values(self.metric),
                    self.baseline.values(self.baseline_metric), strict=True)
        return statistics.median(ours / theirs for ours, theirs in pairs)

    @property
    def ratio_of_medians(self) -> float | None:
        if self.baseline is None:
            return None
        return self.backupd.median(self.metric) / self.baseline.median(self.baseline_metric)

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        return None if ratio is None or self.target is None else ratio <= self.target

    def as_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "title": self.title, "dataset": self.dataset,
                "metric": self.metric, "baseline_metric": self.baseline_metric,
                "ratio": None if self.ratio is None else round(self.ratio, 3),
                "ratio_of_medians": None if self.ratio_of_medians is None
                else round(self.ratio_of_medians, 3),
                "target": self.target, "met": self.met, "note": self.note,
                "backupd": self.backupd.as_json(),
                "baseline": None if self.baseline is None else self.baseline.as_json()}


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    memory: dict[str, dict[str, Series]] = field(default_factory=dict)  # command -> size
    skipped: dict[str, str] = field(default_factory=dict)  # scenario -> why it did not run
    datasets: list[Dataset] = field(default_factory=list)

    def add_memory(self, command: str, dataset: str, series: Series) -> None:
        self.memory.setdefault(command, {})[dataset] = series


def child_env() -> dict[str, str]:
    """The environment of every child: no BACKUPD_* overrides, no Redis password, fake S3
    credentials."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BACKUPD_", "AWS_")) and k != "REDIS_PASSWORD"}
    return {**env, **S3_ENV}


def _toml_list(items: list[str]) -> str:
    return json.dumps(items)


def write_config(path: Path, *, port: int, data_dir: Path, backups: Path,
                 compression: str = "zstd", recipients: list[str] | None = None,
                 s3_endpoint: str = "", restore: tuple[list[str], list[str]] | None = None) -> Path:
    text = f"""
[redis]
host = "127.0.0.1"
port = {port}
data_dir = "{data_dir}"
save_timeout = "10m"

[backup]
dir = "{backups}"
compression = "{compression}"
compression_level = {3 if compression == "zstd" else 0}
age_recipients = {_toml_list(recipients or [])}
"""
    if s3_endpoint:
        text += f"""
[s3]
bucket = "{BUCKET}"
prefix = "redis/"
endpoint_url = "{s3_endpoint}"
addressing_style = "path"
"""
    if restore is not None:
        text += f"""
[restore]
method = "command"
stop_command = {_toml_list(restore[0])}
start_command = {_toml_list(restore[1])}
start_timeout = "10m"
"""
    path.write_text(text)
    return path


def clean_up() -> None:
    """Remove the copies, backups and outputs of a run (GBs); keep its logs and configs."""
    for entry in WORK.iterdir():
        if entry.name not in ("logs", "config"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


class Lab:
    """Paths, the child environment and the S3 endpoint shared by the scenarios."""

    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.pipeline_runs = runs + 2  # seconds each: cheap, and the most sensitive to noise
        self.env = child_env()
        self.results = Results()
        shutil.rmtree(WORK, ignore_errors=True)
        (WORK / "logs").mkdir(parents=True)
        measure.LOGS[:] = [WORK / "logs"]
        self.endpoint = ""
        import pyrage

        # A throwaway age key pair: scenario 6 encrypts to it; nothing is ever decrypted.
        self.recipient = str(pyrage.x25519.Identity.generate().to_public())

    def path(self, *parts: str) -> Path:
        path = WORK.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def measure(self, argv: list[str]) -> Sample:
        return run(argv, env=self.env)

    # -- S3 ---------------------------------------------------------------------------------

    @contextmanager
    def moto(self) -> Iterator[str]:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        try:
            yield self.endpoint
        finally:
            server.stop()

    def reset_bucket(self) -> None:
        """Drop every stored object (moto keeps them in memory) and recreate the bucket."""
        import boto3

        url = f"{self.endpoint}/moto-api/reset"
        request = urllib.request.Request(url, method="POST")  # noqa: S310 - our endpoint
        with urllib.request.urlopen(request, timeout=30):  # noqa: S310 - our own endpoint
            pass
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=BUCKET)


# -- scenarios 1, 2 and 6: the pipeline on a ready dump.rdb -------------------------------------


def pipeline_scenarios(lab: Lab, data: Dataset) -> None:
    """pack() + manifest on the cached dump.rdb versus the zstd CLI and cp + sync."""
    out = lab.path("pipeline", data.name)
    src = str(data.path)
    subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=True)  # into the page cache

    def pack(compression: str, *recipients: str) -> Contender:
        argv = [*DRIVER, "pack", src, str(out), compression, "3", *recipients]
        label = f"backupd pack {compression}{' + age' if recipients else ''}"
        shown = (f"python -m bench.driver pack dump.rdb DIR {compression} 3"
                 + (" age1..." if recipients else ""))
        return Contender(Series(label, shown), lambda: lab.measure(argv),
                         lambda: clear_dir(out))

    def shell(label: str, script: str, shown: str) -> Contender:
        return Contender(Series(label, shown), lambda: lab.measure(["sh", "-c", script]),
                         lambda: clear_dir(out))

    zstd, zstd_age, plain = pack("zstd"), pack("zstd", lab.recipient), pack("none")
    zstd_cli = shell("zstd -3 -T0", f"{ZSTD} -q -3 -T0 {src} -o {out}/dump.rdb.zst",
                     "zstd -3 -T0 dump.rdb -o dump.rdb.zst")
    cp_sync = shell("cp + sync", f"cp {src} {out}/dump.rdb && sync", "cp dump.rdb DIR && sync")
    print(f"[bench] scenarios 1 and 6 ({data.name}): pack zstd-3 (+ age) vs zstd -3 -T0",
          flush=True)
    alternate(lab.pipeline_runs, [zstd, zstd_age, zstd_cli])
    print(f"[bench] scenario 2 ({data.name}): pack none vs cp + sync", flush=True)
    alternate(lab.pipeline_runs, [plain, cp_sync])
    rows = lab.results.rows
    note = ("pack() + manifest, timed inside the process (interpreter start-up and the "
            "read-back check excluded: see the full-backup rows)")
    rows.append(Row("1", "local backup, zstd-3: pipeline vs `zstd -3 -T0`", data.name,
                    zstd.series, zstd_cli.series, metric="work_seconds", target=1.15,
                    note=note))
    rows.append(Row("2", "local backup, no compression: pipeline vs `cp` + `sync`", data.name,
                    plain.series, cp_sync.series, metric="work_seconds", target=1.3, note=note))
    rows.append(Row("6", "encryption (age) on top of scenario 1: pipeline vs pipeline", data.name,
                    zstd_age.series, zstd.series, metric="work_seconds",
                    baseline_metric="work_seconds", target=1.10, note=note))
    clear_dir(out)


# -- full `backupd backup` runs, scenario 3, verify --------------------------------------------


@dataclass
class Source:
    """A redis-server holding a dataset."""

    server: RedisServer
    dataset: Dataset


@contextmanager
def source_server(lab: Lab, data: Dataset) -> Iterator[Source]:
    directory = lab.path(f"source-{data.name}")
    clear_dir(directory)
    shutil.copyfile(data.path, directory / "dump.rdb")
    server = RedisServer(directory)
    seconds = server.start(timeout=600)
    print(f"[bench] source redis-server with {data.name} loaded in {seconds:.1f}s", flush=True)
    try:
        yield Source(server, data)
    finally:
        server.stop()


def full_backups(lab: Lab, src: Source, all_codecs: bool) -> Path:
    """`backupd backup` (BGSAVE, pipeline, read-back, manifest, retention) against BGSAVE
    followed by the same CLI baselines. Returns the directory that holds the last zstd
    backup (for verify and restore)."""
    port, data_dir, name = src.server.port, src.server.dir, src.dataset.name
    out = lab.path("full", name)
    dump = data_dir / "dump.rdb"
    bgsave = shlex.join([*DRIVER, "bgsave", str(port)])

    def backup(compression: str, *recipients: str) -> Contender:
        tag = f"{name}-{compression}{'-age' if recipients else ''}"
        backups = lab.path(f"backups-{tag}")
        cfg = write_config(lab.path("config", f"backup-{tag}.toml"), port=port,
                           data_dir=data_dir, backups=backups, compression=compression,
                           recipients=list(recipients))
        label = f"backupd backup {compression}{' + age' if recipients else ''}"
        return Contender(Series(label, f"backupd -c CONFIG backup  # compression {compression}"
                                + (", age" if recipients else "")),
                         lambda: lab.measure([*BACKUPD, "-c", str(cfg), "backup"]),
                         lambda: clear_dir(backups))

    def shell(label: str, script: str, shown: str) -> Contender:
        return Contender(Series(label, shown), lambda: lab.measure(["sh", "-c", script]),
                         lambda: clear_dir(out))

    zstd = backup("zstd")
    contenders = [zstd, shell("BGSAVE + zstd -3 -T0",
                              f"{bgsave} && {ZSTD} -q -3 -T0 {dump} -o {out}/dump.rdb.zst",
                              "redis-cli BGSAVE (wait) && zstd -3 -T0 dump.rdb")]
    if all_codecs:  # no baseline of their own: their BGSAVE is the one above, plus scenario 2/6
        contenders += [backup("none"), backup("zstd", lab.recipient)]
    print(f"[bench] full backups ({name}): backupd backup vs BGSAVE + CLI", flush=True)
    alternate(lab.runs, contenders)
    rows = lab.results.rows
    note = ("whole CLI process: start-up, BGSAVE handshake, pipeline, read-back check, "
            "manifest, retention; baseline work_seconds = its BGSAVE")
    rows.append(Row("1 full", "`backupd backup` zstd-3 vs BGSAVE + `zstd -3 -T0`", name,
                    zstd.series, contenders[1].series, note=note))
    if all_codecs:
        rows.append(Row("2 full", "`backupd backup` none vs zstd-3", name,
                        contenders[2].series, zstd.series, note="whole CLI process"))
        rows.append(Row("6 full", "`backupd backup` zstd-3 + age vs zstd-3", name,
                        contenders[3].series, zstd.series, note="whole CLI process"))
    lab.results.add_memory("backupd backup", name, zstd.series)
    clear_dir(out)
    return lab.path(f"backups-{name}-zstd")


def s3_scenario(lab: Lab, src: Source) -> None:
    """Scenario 3: BGSAVE to a verified S3 object, versus redis-cli --rdb, zstd, upload_file."""
    name = src.dataset.name
    backups = lab.path(f"backups-s3-{name}")
    cfg = write_config(lab.path("config", f"s3-{name}.toml"), port=src.server.port,
                       data_dir=src.server.dir, backups=backups, s3_endpoint=lab.endpoint)
    scratch = lab.path("s3-baseline")
    rdb = scratch / "dump.rdb"
    script = (f"{REDIS_CLI} -p {src.server.port} --rdb {rdb} >/dev/null && "
              f"{ZSTD} -q -3 -T0 {rdb} -o {rdb}.zst && "
              + shlex.join([*DRIVER, "upload", f"{rdb}.zst", lab.endpoint, BUCKET,
                            "redis/dump.rdb.zst"]))

    def prepare_backupd() -> None:
        clear_dir(backups)
        lab.reset_bucket()

    def prepare_baseline() -> None:
        clear_dir(scratch)
        lab.reset_bucket()

    ours = Contender(Series("backupd backup (S3)", "backupd -c CONFIG backup  # with [s3]"),
                     lambda: lab.measure([*BACKUPD, "-c", str(cfg), "backup"]),
                     prepare_backupd)
    repl_cfg = lab.path("config", f"s3-replication-{name}.toml")
    repl_cfg.write_text(cfg.read_text().replace("[redis]\n", '[redis]\nsource = "replication"\n'))
    replication = Contender(
        Series("backupd backup (S3, source replication)",
               "backupd -c CONFIG backup  # with [s3], redis.source = \"replication\""),
        lambda: lab.measure([*BACKUPD, "-c", str(repl_cfg), "backup"]), prepare_backupd)
    theirs = Contender(
        Series("redis-cli --rdb + zstd + upload_file",
               "redis-cli --rdb dump.rdb && zstd -3 -T0 dump.rdb && "
               "python: boto3 upload_file(dump.rdb.zst)"),
        lambda: lab.measure(["sh", "-c", script]), prepare_baseline)
    print(f"[bench] scenario 3 ({name}): BGSAVE to verified S3 object vs sidecar pipeline",
          flush=True)
    alternate(lab.runs, [ours, theirs, replication])
    lab.results.add_memory("backupd backup (with S3 upload)", name, ours.series)
    lab.results.add_memory("backupd backup (S3, source replication)", name, replication.series)
    lab.results.rows.append(Row(
        "3", "BGSAVE to a verified S3 object vs `redis-cli --rdb` + `zstd` + `upload_file`",
        name, ours.series, theirs.series, target=0.8,
        note="moto server on 127.0.0.1; repl-diskless-sync-delay 0 for the baseline's SYNC; "
             "backupd also checks the uploaded object and writes both manifests"))
    lab.results.rows.append(Row(
        "3 repl", "the same with `redis.source = \"replication\"` (full sync, no data volume) "
        "vs `redis-cli --rdb` + `zstd` + `upload_file`", name, replication.series,
        theirs.series, target=0.7, note="same run, same baseline as row 3"))
    clear_dir(scratch)
    clear_dir(backups)


def verify_runs(lab: Lab, name: str, backups: Path) -> None:
    cfg = write_config(lab.path("config", f"verify-{name}.toml"), port=6379,
                       data_dir=lab.path("unused"), backups=backups)
    series = Series("backupd verify", "backupd -c CONFIG verify latest")
    print(f"[bench] verify ({name})", flush=True)
    alternate(lab.runs, [Contender(series, lambda: lab.measure(
        [*BACKUPD, "-c", str(cfg), "verify", "latest"]))])
    lab.results.add_memory("backupd verify", name, series)


# -- scenario 4: restore -----------------------------------------------------------------------


def restore_available(lab: Lab) -> str:
    """'' when `backupd restore --method command` exists, else why not."""
    proc = subprocess.run([*BACKUPD, "restore", "--help"], capture_output=True, text=True,
                          env=lab.env, check=False)
    if proc.returncode != 0 or "--method" not in proc.stdout or "command" not in proc.stdout:
        return "restore not available (`backupd restore --help` has no --method command)"
    return ""


class Target:
    """The Redis a restore replaces: started and stopped with plain commands, as the
    `command` restore method does it (a systemd unit would run the same)."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.dir = lab.path(f"target-{name}")
        self.port = free_port()
        self.start_command = [*server_argv(self.port, self.dir), "--daemonize", "yes",
                              "--pidfile", str(self.dir / "redis.pid")]
        self.stop_command = [REDIS_CLI, "-p", str(self.port), "shutdown", "nosave"]

    def stop(self) -> None:
        if answers(self.port):
            subprocess.run(self.stop_command, capture_output=True, check=False)
            wait_until(lambda: not answers(self.port), 120, "the target Redis to stop")

    def reset(self) -> None:
        """A running target with a little data of its own (what a restore replaces)."""
        self.stop()
        clear_dir(self.dir)
        subprocess.run(self.start_command, check=True)
        wait_until(lambda: loaded(self.port), 60, "the target Redis to start")
        conn = client(self.port)
        conn.mset({f"old:{i}": f"value-{i}" for i in range(1000)})
        conn.close()


def restore_scenario(lab: Lab, name: str, backups: Path, target_ratio: bool) -> None:
    """Scenario 4: `backupd restore --method command` of the latest backup in `backups` into
    a running Redis, versus redis-server starting on the same dump.rdb until it has loaded it."""
    target = Target(lab, name)
    cfg = write_config(lab.path("config", f"restore-{name}.toml"), port=target.port,
                       data_dir=target.dir, backups=backups,
                       restore=(target.stop_command, target.start_command))
    argv = [*BACKUPD, "-c", str(cfg), "restore", "latest", "--from", "local", "--method",
            "command", "--yes"]
    # The baseline loads exactly the RDB inside the backup.
    dump = lab.path(f"restore-{name}.rdb")
    artifact = next(backups.glob("*.rdb.zst"))
    subprocess.run([ZSTD, "-q", "-d", "-f", str(artifact), "-o", str(dump)], check=True)
    load_dir = lab.path(f"load-{name}")

    def prepare_load() -> None:
        target.stop()
        clear_dir(load_dir)
        os.link(dump, load_dir / "dump.rdb")

    ours = Contender(Series("backupd restore", "backupd -c CONFIG restore latest --from local "
                            "--method command --yes"),
                     lambda: lab.measure(argv), target.reset)
    theirs = Contender(Series("redis-server start + load", "redis-server on a dir holding the "
                              "same dump.rdb, until INFO says loading:0"),
                       lambda: lab.measure([*DRIVER, "load", str(free_port()), str(load_dir)]),
                       prepare_load)
    print(f"[bench] scenario 4 ({name}): restore vs redis-server loading the same dump.rdb",
          flush=True)
    try:
        alternate(lab.runs, [ours, theirs])
    finally:
        target.stop()
    clear_dir(load_dir)
    clear_dir(target.dir)
    dump.unlink()
    lab.results.rows.append(Row(
        "4", "restore (`command` method) vs Redis starting on the same dump.rdb", name,
        ours.series, theirs.series, baseline_metric="work_seconds",
        target=1.3 if target_ratio else None,
        note="restore: whole CLI (verify + stage + fsync, pre-restore BGSAVE of the target's "
             "1000 keys, stop, swap, start, wait for loading:0, key check); baseline: "
             "redis-server spawn until loaded, polled every 5 ms"))
    lab.results.add_memory("backupd restore", name, ours.series)
