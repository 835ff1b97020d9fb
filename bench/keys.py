"""`python -m bench.keys`: throughput of `restore --keys` and peak RSS of `diff`.

Starts its own redis-server (free port, temp dir), fills it with DEBUG POPULATE, takes a
backup with the real CLI, then times the real CLI:
- selective restore of N small keys into an emptied server (keys/s, whole command and the
  write phase: the command minus its --dry-run, which does everything but the writes);
- `diff <backup> live` at each size, sampling the backupd process's peak RSS (VmHWM) from
  /proc, so the throwaway redis-server's memory is not counted (it is reported apart).
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.redisproc import REDIS_SERVER, free_port, wait_until


def _server(data: Path) -> tuple[subprocess.Popen[bytes], redis.Redis]:
    port = free_port()
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(data), "--save", "", "--appendonly", "no",
                             "--enable-debug-command", "yes", "--daemonize", "no",
                             "--logfile", str(data / "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    wait_until(lambda: _pings(client), 10, "redis-server")
    return proc, client


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def _config(path: Path, port: int, data: Path, backups: Path) -> Path:
    path.write_text(f'[redis]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data}"\n'
                    f'save_timeout = "120s"\n\n[backup]\ndir = "{backups}"\n')
    return path


def _cli(config: Path, *args: str) -> tuple[float, int, str]:
    """(seconds, peak RSS of the backupd process in KiB, stdout)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "backupd", "--log-format", "json", "-c",
                             str(config), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.05)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode:
        raise RuntimeError(f"backupd {' '.join(args)} exited {proc.returncode}: {out[-500:]}")
    return time.monotonic() - started, peak, out


def restore_throughput(root: Path, n: int) -> dict[str, float]:
    data, backups = root / "r-data", root / "r-backups"
    data.mkdir()
    proc, client = _server(data)
    try:
        client.execute_command("DEBUG", "POPULATE", n, "bench:k", 16)  # type: ignore[no-untyped-call]
        config = _config(root / "r.toml", client.connection_pool.connection_kwargs["port"],
                         data, backups)
        _cli(config, "backup", "--no-prune")
        client.flushall()
        dry, _, _ = _cli(config, "restore", "--keys", "bench:*", "--dry-run")
        full, _, out = _cli(config, "restore", "--keys", "bench:*", "--yes")
        assert client.dbsize() == n, out
        return {"keys": n, "command_s": full, "dry_run_s": dry,
                "keys_per_s": n / full, "write_keys_per_s": n / max(full - dry, 1e-6)}
    finally:
        proc.terminate()
        proc.wait(30)


def diff_rss(root: Path, n: int) -> dict[str, float]:
    data, backups = root / f"d{n}-data", root / f"d{n}-backups"
    data.mkdir()
    proc, client = _server(data)
    try:
        client.execute_command("DEBUG", "POPULATE", n, "bench:k", 16)  # type: ignore[no-untyped-call]
        config = _config(root / f"d{n}.toml", client.connection_pool.connection_kwargs["port"],
                         data, backups)
        _cli(config, "backup", "--no-prune")
        pipe = client.pipeline(transaction=False)
        for i in range(0, n, 100):
            pipe.set(f"bench:k:{i}", "changed")
        pipe.execute()
        seconds, peak, out = _cli(config, "diff", "latest", "live")
        assert f"changed {len(range(0, n, 100))}" in out, out
        return {"keys": n, "seconds": seconds, "peak_rss_mib": peak / 1024,
                "target_used_memory_mib": int(client.info("memory")["used_memory"]) / 2**20}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restore-keys", type=int, default=100_000)
    parser.add_argument("--diff-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-keys-") as tmp:
        root = Path(tmp)
        r = restore_throughput(root, args.restore_keys)
        print(f"| restore --keys, {r['keys']:,} small keys | {r['command_s']:.1f} s command "
              f"({r['keys_per_s']:,.0f} keys/s); --dry-run {r['dry_run_s']:.1f} s; write phase "
              f"~{r['write_keys_per_s']:,.0f} keys/s |")
        for n in args.diff_sizes:
            d = diff_rss(root, n)
            print(f"| diff backup vs live, {n:,} keys | {d['seconds']:.1f} s, peak RSS of "
                  f"backupd {d['peak_rss_mib']:.0f} MiB (target holds "
                  f"{d['target_used_memory_mib']:.0f} MiB) |")
    os.sync()


if __name__ == "__main__":
    main()
