"""Benchmark datasets: real RDB files written by redis-server, cached under bench/.cache/.

The data is loaded with pipelined real commands (RESP generated here, sent by
`redis-cli --pipe`), mixing the types a production Redis holds: strings from a few bytes to
tens of KiB (counters, tokens, JSON-ish documents, blobs), small (listpack) and large
(hashtable) hashes, int and string sets, small and large sorted sets, lists, streams, and
TTLs (days, so that nothing expires during a run) on about a fifth of the keys. Values are
drawn from a word pool plus random hex ids, so that they compress roughly like real data
(zstd -3 about 2-3x); the pool is far larger than zstd's window, so repeats do not flatter the
compressor. Everything is seeded: the same version gives the same file.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.redisproc import REDIS_CLI, RedisServer

GENERATOR_VERSION = 1
CACHE = Path(__file__).resolve().parent / ".cache"
# Units of mixed data per dataset; one unit is about 0.78 MB of RDB.
SIZES = {"100MB": 128, "1GB": 1280}
POOL_WORDS = 6_000_000  # ~40 MB of text: far beyond zstd -3's 2-8 MiB window
DAY = 86400


@dataclass(frozen=True)
class Dataset:
    name: str
    path: Path  # the cached dump.rdb
    size: int
    keys: int
    types: dict[str, int]
    seconds: float  # how long generating it took


def _cmd(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class _Values:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        letters = "abcdefghijklmnopqrstuvwxyz"
        vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(4000)]
        zipf = [1 / rank for rank in range(1, len(vocab) + 1)]  # word frequencies as in text
        self.pool = " ".join(rng.choices(vocab, weights=zipf, k=POOL_WORDS)).encode()

    def text(self, n: int) -> bytes:
        start = self.rng.randrange(0, len(self.pool) - n)
        return self.pool[start:start + n]

    def hexid(self, n: int = 16) -> bytes:
        return b"%0*x" % (n, self.rng.getrandbits(4 * n))

    def doc(self, n: int) -> bytes:
        """A JSON document of about n bytes, shaped like a cached API object."""
        rng = self.rng
        head = (b'{"id":"%s","type":"%s","status":"%s","created_at":"2025-%02d-%02dT%02d:%02d:'
                b'%02dZ","owner":{"id":%d,"name":"%s","country":"%s"},"score":%.4f,'
                b'"tags":["%s","%s"],"body":"'
                % (self.hexid(), rng.choice((b"order", b"user", b"event", b"session")),
                   rng.choice((b"active", b"pending", b"done", b"failed")),
                   rng.randint(1, 12), rng.randint(1, 28), rng.randrange(24),
                   rng.randrange(60), rng.randrange(60), rng.randrange(10**6), self.text(9),
                   rng.choice((b"DE", b"US", b"FR", b"JP", b"BR")), rng.random() * 100,
                   self.text(6), self.text(8)))
        return head + self.text(max(8, n - len(head) - 2)) + b'"}'

    def page(self, n: int) -> bytes:
        """A cached HTML fragment of about n bytes: markup repeats, the text does not."""
        parts = [b"<div class=\"list\">"]
        size = len(parts[0])
        while size < n:
            row = (b'<div class="item"><a href="/p/%s">%s</a><span class="price">%d.%02d'
                   b'</span><p>%s</p></div>\n'
                   % (self.hexid(8), self.text(20), self.rng.randrange(500),
                      self.rng.randrange(100), self.text(self.rng.randint(40, 200))))
            parts.append(row)
            size += len(row)
        return b"".join(parts) + b"</div>"


def _unit(u: int, v: _Values) -> Iterator[bytes]:
    """About 1 MB of RDB in mixed types; keys are namespaced by unit number."""
    rng = v.rng

    def ttl() -> list[bytes]:
        return [b"EX", b"%d" % rng.randint(7 * DAY, 30 * DAY)] if rng.random() < 0.2 else []

    for i in range(400):  # strings
        key = b"str:%d:%d" % (u, i)
        r = rng.random()
        if r < 0.3:
            value = b"%d" % rng.randrange(10**9)  # counters: int-encoded
        elif r < 0.55:
            value = v.hexid(rng.choice((16, 32, 40)))  # tokens, session ids
        elif r < 0.92:
            value = v.doc(rng.randint(100, 2000))
        else:
            value = v.page(rng.randint(2000, 24000))  # cached pages
        yield _cmd(b"SET", key, value, *ttl())
    for i in range(40):  # hashes: most small (listpack), some large (hashtable)
        key = b"hash:%d:%d" % (u, i)
        fields = rng.randint(5, 30) if i % 8 else rng.randint(200, 800)
        args = [b"HSET", key]
        for f in range(fields):
            args += [b"field%d" % f, v.text(rng.randint(4, 60)) if f % 3 else
                     b"%d" % rng.randrange(10**6)]
        yield _cmd(*args)
        if ttl():
            yield _cmd(b"EXPIRE", key, b"%d" % rng.randint(7 * DAY, 30 * DAY))
    for i in range(12):  # sets: intsets and string sets
        key = b"set:%d:%d" % (u, i)
        n = rng.randint(50, 600)
        members = ([b"%d" % rng.randrange(10**7) for _ in range(n)] if i % 2 else
                   [v.hexid(rng.choice((8, 16, 24))) for _ in range(n)])
        yield _cmd(b"SADD", key, *members)
    for i in range(12):  # sorted sets: leaderboards, small and large
        key = b"zset:%d:%d" % (u, i)
        n = rng.randint(20, 100) if i % 3 else rng.randint(300, 1500)
        args = [b"ZADD", key]
        for _ in range(n):
            args += [b"%.3f" % (rng.random() * 10**6), b"user:" + v.hexid(12)]
        yield _cmd(*args)
    for i in range(6):  # lists: queues of JSON messages
        key = b"list:%d:%d" % (u, i)
        yield _cmd(b"RPUSH", key, *[v.doc(rng.randint(40, 300))
                                    for _ in range(rng.randint(50, 400))])
    for i in range(3):  # streams: event logs
        key = b"stream:%d:%d" % (u, i)
        for _ in range(rng.randint(100, 300)):
            yield _cmd(b"XADD", key, b"*", b"event", rng.choice((b"login", b"click", b"buy")),
                       b"user", v.hexid(12), b"payload", v.text(rng.randint(20, 200)))


def _dump_name(name: str) -> str:
    return f"{name}-g{GENERATOR_VERSION}.rdb"


def get(name: str) -> Dataset:
    """The cached dataset, generating it first when missing (or from an older generator)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / _dump_name(name)
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        raw = json.loads(meta.read_text())
        if raw.get("size") == path.stat().st_size:
            return Dataset(name=name, path=path, size=raw["size"], keys=raw["keys"],
                           types=raw["types"], seconds=raw["seconds"])
    return _generate(name, path, meta)


def _generate(name: str, path: Path, meta: Path) -> Dataset:
    units = SIZES[name]
    work = CACHE / f"gen-{name}"
    shutil.rmtree(work, ignore_errors=True)
    server = RedisServer(work, extra=("--enable-debug-command", "yes"))
    started = time.perf_counter()
    print(f"[bench] generating dataset {name} ({units} units of mixed data)...", flush=True)
    server.start()
    try:
        values = _Values(random.Random(f"backupd-bench-{GENERATOR_VERSION}"))
        pipe = subprocess.Popen([REDIS_CLI, "-p", str(server.port), "--pipe"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert pipe.stdin is not None
        batch: list[bytes] = []
        for u in range(units):
            batch.extend(_unit(u, values))
            if len(batch) > 2000:
                pipe.stdin.write(b"".join(batch))
                batch.clear()
        pipe.stdin.write(b"".join(batch))
        out, _ = pipe.communicate()
        if pipe.returncode != 0 or b"errors: 0," not in out:
            raise RuntimeError(f"redis-cli --pipe failed: {out.decode(errors='replace')}")
        conn = server.client()
        types: dict[str, int] = {}
        for key in conn.scan_iter(count=10_000, match="*:0:*"):  # unit 0 as a sample
            kind = str(conn.type(key))
            types[kind] = types.get(kind, 0) + 1
        keys = int(conn.dbsize())
        expires = int(conn.info("keyspace")["db0"]["expires"])
        conn.save()
        conn.close()
    finally:
        server.stop()
    seconds = round(time.perf_counter() - started, 1)
    shutil.move(work / "dump.rdb", path)
    shutil.rmtree(work, ignore_errors=True)
    size = path.stat().st_size
    data = Dataset(name=name, path=path, size=size, keys=keys,
                   types={**{k: v * units for k, v in sorted(types.items())},
                          "with TTL": expires}, seconds=seconds)
    meta.write_text(json.dumps({k: v for k, v in asdict(data).items() if k != "path"},
                               indent=2) + "\n")
    print(f"[bench] dataset {name}: {size / 1e6:.0f} MB, {keys} keys, {seconds}s", flush=True)
    return data
