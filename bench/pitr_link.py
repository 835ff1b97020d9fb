"""`python -m bench.pitr_link`: the point-in-time link under a sustained write load (the
"point-in-time link" rows of docs/benchmarks.md).

`backupd run` with [pitr] follows a Redis while a writer process sends SETs of 200-byte values
at a paced rate (pipelines of 200, one client), then redis-benchmark unpaced. Every 0.5 s:
backupd_pitr_lag_seconds from /metrics, the replica's byte lag from INFO, backupd's CPU
(utime+stime from /proc) and RSS. The baseline of the same run is the writer alone: Redis's
own CPU without backupd attached is not measured, the rate the writer reaches is."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis

from bench.redisproc import RedisServer, free_port
from bench.scenarios import BACKUPD, write_config

VALUE = b"v" * 200
BATCH = 200
TICK = os.sysconf("SC_CLK_TCK")


def _writer(port: int, rate: int, seconds: float, sent: Any) -> None:
    """Pipelines of BATCH SETs as raw RESP on one socket, paced to `rate` (redis-py's
    encoding alone tops out near 20k SET/s on this machine)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    start = time.monotonic()
    n = 0
    reply = b"+OK\r\n" * BATCH
    while (now := time.monotonic()) - start < seconds:
        due = start + n / rate
        if due > now:
            time.sleep(due - now)
        batch = b"".join(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$200\r\n%s\r\n"
                         % (len(k), k, VALUE)
                         for k in (b"k:%d" % (i % 1_000_000) for i in range(n, n + BATCH)))
        sock.sendall(batch)
        got = 0
        while got < len(reply):
            got += len(sock.recv(1 << 16))
        n += BATCH
        sent.value = n
    sock.close()


def _metric(url: str, name: str) -> float | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our http URL
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _byte_lag(client: redis.Redis) -> int:
    info = client.info("replication")
    replica = info.get("slave0")
    if not isinstance(replica, dict):
        return -1
    return int(info["master_repl_offset"]) - int(replica["offset"])


def _sample(pid: int, url: str, client: redis.Redis, until: float) -> dict[str, list[float]]:
    got: dict[str, list[float]] = {"lag": [], "bytes": [], "cpu": [], "rss": []}
    cpu0, t0 = _cpu_seconds(pid), time.monotonic()
    while time.monotonic() < until:
        time.sleep(0.5)
        lag = _metric(url, "backupd_pitr_lag_seconds")
        if lag is not None:
            got["lag"].append(lag)
        got["bytes"].append(_byte_lag(client))
        got["rss"].append(_rss_mib(pid))
    got["cpu"].append(100 * (_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0))
    return got


def _line(label: str, rate: float, got: dict[str, list[float]]) -> str:
    return (f"[bench] pitr link, {label}: {rate:,.0f} SET/s of 200 B; "
            f"backupd_pitr_lag_seconds median {statistics.median(got['lag']):.2f} "
            f"max {max(got['lag']):.2f}; replica byte lag max {max(got['bytes']):,.0f}; "
            f"backupd CPU {got['cpu'][0]:.0f}% of one core, RSS max {max(got['rss']):.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pitr_link", description=__doc__)
    parser.add_argument("--rates", default="20000,50000")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--dir", default="/tmp/backupd-bench-pitr")
    args = parser.parse_args(argv)
    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    (base / "data").mkdir(parents=True)
    server = RedisServer(base / "data", extra=("--repl-diskless-sync-delay", "0",
                                               "--repl-backlog-size", "64mb"))
    server.start()
    metrics_port = free_port()
    cfg = write_config(base / "config.toml", port=server.port, data_dir=base / "data",
                       backups=base / "backups")
    cfg.write_text(cfg.read_text().replace("[redis]\n", '[redis]\nsource = "replication"\n')
                   + f'\n[pitr]\nenabled = true\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    daemon = subprocess.Popen([*BACKUPD, "-c", str(cfg), "run"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    client = server.client()
    try:
        deadline = time.monotonic() + 120
        while _metric(url, "backupd_pitr_link_up") != 1.0:
            if time.monotonic() > deadline:
                raise SystemExit("the link did not come up")
            time.sleep(0.2)
        for rate in (int(r) for r in args.rates.split(",")):
            sent = multiprocessing.Value("q", 0)
            proc = multiprocessing.Process(target=_writer,
                                           args=(server.port, rate, args.seconds, sent))
            started = time.monotonic()
            proc.start()
            got = _sample(daemon.pid, url, client, started + args.seconds)
            proc.join()
            rate_got = sent.value / (time.monotonic() - started)
            after = _sample(daemon.pid, url, client, time.monotonic() + 3)
            print(_line(f"paced {rate:,}/s", rate_got, got)
                  + f"; 3 s after: byte lag {after['bytes'][-1]:,.0f}, "
                  f"segments {_metric(url, 'backupd_pitr_segments')}")
        n = int(args.seconds * 150_000)
        started = time.monotonic()
        bench = subprocess.Popen(["redis-benchmark", "-p", str(server.port), "-t", "set",
                                  "-d", "200", "-P", "50", "-c", "2", "-r", "1000000",
                                  "-n", str(n), "-q"], stdout=subprocess.DEVNULL)
        got = _sample(daemon.pid, url, client, started + args.seconds)
        bench.wait()
        elapsed = time.monotonic() - started
        got_tail = _sample(daemon.pid, url, client, time.monotonic() + 3)
        print(_line("redis-benchmark unpaced", n / elapsed, got)
              + f"; 3 s after: lag {got_tail['lag'][-1]:.2f}, byte lag "
              f"{got_tail['bytes'][-1]:,.0f}")
    finally:
        daemon.terminate()
        daemon.wait(60)
        client.close()
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
