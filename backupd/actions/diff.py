"""`backupd diff [A] [B|live]`: which keys differ between two backups, or a backup and now.

Each backup is read from a throwaway server (never production). Two passes over SCAN pages,
so memory stays bounded by a page and the largest value, not by the key count (`--list` keeps
the names of the keys that differ): A's keys are
looked up in B (only in A, changed, same), then B's keys in A (only in B). A key is changed
when its type, its value or its TTL class differs. Strings, lists and streams compare by their
DUMP payload without the version/CRC trailer; sets, hashes and sorted sets by their sorted
content, as their DUMP follows the hash table's order, which a reload changes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from backupd import discovery, keyspace, source
from backupd.actions.restore.loaded import open_backup
from backupd.actions.restore.staging import identities_for, select_backup
from backupd.config import Config
from backupd.errors import RedisUnavailable, UsageError

CATEGORIES = ("only_a", "only_b", "changed", "same")
MAX_PREFIXES = 1000  # more distinct prefixes fold into "(other)": bounded memory
TRAILER = 10  # DUMP payload ends with the RDB version (2 bytes) and a CRC64 (8 bytes)
CANONICAL = ("set", "hash", "zset")


@dataclass(frozen=True)
class DiffOptions:
    a: str = "latest"
    b: str = "live"
    patterns: tuple[str, ...] = ("*",)
    db: int | None = None
    list_names: bool = False
    identity_file: str | None = None
    source: str | None = None


@dataclass
class Report:
    a: str
    b: str
    prefixes: dict[str, Counter[str]] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)
    listed: list[tuple[str, str, str, str]] | None = None  # with --list: the differing keys

    def count(self, category: str, key: bytes, cfg: Config, reason: str = "") -> None:
        prefix = keyspace.prefix_of(key, cfg.keys.separator, cfg.keys.prefix_depth)
        if prefix not in self.prefixes and len(self.prefixes) >= MAX_PREFIXES:
            prefix = "(other)"
        self.prefixes.setdefault(prefix, Counter())[category] += 1
        if reason:
            self.reasons[reason] += 1
        if self.listed is not None and category != "same":
            self.listed.append((category, prefix, keyspace.display(key), reason))

    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in self.prefixes.values():
            total.update(counts)
        return total


@dataclass(frozen=True)
class Fingerprint:
    type: str
    digest: bytes
    ttl: str


def fingerprints(client: redis.Redis, keys: Sequence[bytes], now_ms: int) -> list[
        Fingerprint | None]:
    """(type, value digest, TTL class) per key; None when the key does not exist."""
    found = keyspace.facts(client, keys, memory=False)
    dumped = keyspace.dump(client, [f.key for f in found
                                    if f.type not in CANONICAL and f.type != "none"])
    payloads = iter(dumped)
    out: list[Fingerprint | None] = []
    for item in found:
        if item.type == "none":
            out.append(None)
            continue
        payload = _canonical(client, item.key, item.type) if item.type in CANONICAL \
            else next(payloads)
        if payload is None:
            out.append(None)
            continue
        if item.type not in CANONICAL:
            payload = payload[:-TRAILER]
        out.append(Fingerprint(item.type, hashlib.sha256(payload).digest(),
                               keyspace.ttl_class(item.expire_at, now_ms)))
    return out


def _canonical(client: redis.Redis, key: bytes, kind: str) -> bytes:
    """Sorted content, hashed (bounded by the value's size)."""
    digest = hashlib.sha256()

    def add(*parts: bytes) -> None:
        for part in parts:
            digest.update(len(part).to_bytes(8, "big") + part)

    reply: Any
    if kind == "set":
        reply = client.smembers(key)
        for member in sorted(reply):
            add(member)
    elif kind == "hash":
        reply = client.hgetall(key)
        for name, value in sorted(reply.items()):
            add(name, value)
    else:
        reply = client.zrange(key, 0, -1, withscores=True)
        for member, score in reply:
            add(member, repr(score).encode())
    return digest.digest()


def compare(cfg: Config, a: redis.Redis, b: redis.Redis, patterns: Sequence[str],
            report: Report, now_ms: int) -> None:
    """Both passes for one db (clients return bytes)."""
    for index, pattern in enumerate(patterns):
        for page in keyspace.scan(a, pattern):
            keys = [k for k in dict.fromkeys(page) if not keyspace.matches(k, patterns[:index])]
            if not keys:
                continue
            for key, left, right in zip(keys, fingerprints(a, keys, now_ms),
                                        fingerprints(b, keys, now_ms), strict=True):
                if left is None:
                    continue  # gone from A (a throwaway: expired meanwhile)
                if right is None:
                    report.count("only_a", key, cfg)
                elif left != right:
                    reason = ("type" if left.type != right.type else
                              "value" if left.digest != right.digest else "ttl")
                    report.count("changed", key, cfg, reason)
                else:
                    report.count("same", key, cfg)
    for index, pattern in enumerate(patterns):
        for page in keyspace.scan(b, pattern):
            keys = [k for k in dict.fromkeys(page) if not keyspace.matches(k, patterns[:index])]
            if not keys:
                continue
            pipe = a.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            for key, there in zip(keys, pipe.execute(), strict=True):
                if not there:
                    report.count("only_b", key, cfg)


@contextlib.contextmanager
def _side(cfg: Config, selector: str, opts: DiffOptions, progress: bool,
          env: Mapping[str, str] | None) -> Iterator[tuple[str, redis.Redis, dict[str, Any]]]:
    """(label, client, INFO) of a backup in a throwaway server, or of the live server."""
    if selector == "live":
        endpoint = discovery.resolve(cfg.redis, env)
        client = source.connect_endpoint(endpoint)
        try:
            yield f"live {endpoint.where}", client, client.info("keyspace")
        finally:
            client.close()
        return
    selected = select_backup(cfg, selector, None, opts.source, env)
    identities = identities_for(selected.manifest, opts.identity_file)
    with open_backup(cfg, selected, identities, progress) as loaded:
        yield f"backup {selected.manifest.id}", loaded.client, loaded.info


def diff(cfg: Config, opts: DiffOptions, progress: bool,
         env: Mapping[str, str] | None = None) -> Report:
    if opts.a == "live":
        raise UsageError("A is a backup (ID or latest); B is a backup or live")
    with contextlib.ExitStack() as stack:
        label_a, a, info_a = stack.enter_context(_side(cfg, opts.a, opts, progress, env))
        label_b, b, info_b = stack.enter_context(_side(cfg, opts.b, opts, progress, env))
        report = Report(label_a, label_b, listed=[] if opts.list_names else None)
        dbs = sorted(set(keyspace.databases(info_a, opts.db))
                     | set(keyspace.databases(info_b, opts.db)))
        seconds, micros = b.time() if opts.b == "live" else a.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        try:
            for db in dbs:
                ca, cb = keyspace.bytes_client(a, db), keyspace.bytes_client(b, db)
                try:
                    compare(cfg, ca, cb, opts.patterns, report, now_ms)
                finally:
                    ca.close()
                    cb.close()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise RedisUnavailable(f"lost a Redis connection during the diff: {exc}") from None
    return report


def as_json(report: Report) -> dict[str, Any]:
    data: dict[str, Any] = {
        "a": report.a, "b": report.b,
        "total": {c: report.totals()[c] for c in CATEGORIES},
        "changed_by": dict(report.reasons),
        "prefixes": {p: {c: counts[c] for c in CATEGORIES}
                     for p, counts in sorted(report.prefixes.items())},
    }
    if report.listed is not None:
        data["keys"] = [{"category": c, "prefix": p, "key": k, **({"why": w} if w else {})}
                        for c, p, k, w in report.listed]
    return data


def text(report: Report) -> str:
    total = report.totals()
    lines = [f"A = {report.a}", f"B = {report.b}",
             f"only in A {total['only_a']}, only in B {total['only_b']}, changed "
             f"{total['changed']}"
             + (f" ({', '.join(f'{r} {n}' for r, n in sorted(report.reasons.items()))})"
                if report.reasons else "") + f", same {total['same']}"]
    rows: list[list[str]] = [["PREFIX", "ONLY-A", "ONLY-B", "CHANGED", "SAME"]]
    rows += [[p, *(str(c[k]) for k in CATEGORIES)] for p, c in sorted(report.prefixes.items())]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    for category, _, key, why in report.listed or []:
        lines.append(f"{category:8} {key}" + (f"  ({why})" if why else ""))
    return "\n".join(lines)
