"""`backupd inspect [ID]`: what a backup holds, per prefix (key count, types, TTL classes,
memory), read from a throwaway server so nobody loads it near production to find out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from backupd import keyspace
from backupd.actions.restore.loaded import open_backup
from backupd.actions.restore.staging import identities_for, select_backup
from backupd.config import Config
from backupd.errors import RedisUnavailable

MAX_PREFIXES = 1000


@dataclass
class Group:
    keys: int = 0
    memory: int = 0
    types: Counter[str] = field(default_factory=Counter)
    ttl: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        return {"keys": self.keys, "memory": self.memory, "types": dict(self.types),
                "ttl": {label: self.ttl[label] for label in keyspace.TTL_LABELS
                        if self.ttl[label]}}


@dataclass
class Inspection:
    backup: str
    created_at: str
    expired_at_load: int
    prefixes: dict[str, Group] = field(default_factory=dict)

    def add(self, prefix: str, item: keyspace.KeyFacts, now_ms: int) -> None:
        if prefix not in self.prefixes and len(self.prefixes) >= MAX_PREFIXES:
            prefix = "(other)"
        group = self.prefixes.setdefault(prefix, Group())
        group.keys += 1
        group.memory += item.size
        group.types[item.type] += 1
        group.ttl[keyspace.ttl_class(item.expire_at, now_ms)] += 1

    def as_json(self) -> dict[str, Any]:
        return {"backup": self.backup, "created_at": self.created_at,
                "expired_at_load": self.expired_at_load,
                "prefixes": {p: g.as_json() for p, g in sorted(self.prefixes.items())}}


def inspect(cfg: Config, selector: str, patterns: tuple[str, ...], identity_file: str | None,
            location: str | None, progress: bool,
            env: Mapping[str, str] | None = None) -> Inspection:
    selected = select_backup(cfg, selector, None, location, env)
    identities = identities_for(selected.manifest, identity_file)
    m = selected.manifest
    with open_backup(cfg, selected, identities, progress) as loaded:
        result = Inspection(m.id, m.created_at, loaded.expired_at_load)
        seconds, micros = loaded.client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        try:
            for db in keyspace.databases(loaded.info, None):
                client = keyspace.bytes_client(loaded.client, db)
                try:
                    for index, pattern in enumerate(patterns):
                        for page in keyspace.scan(client, pattern):
                            keys = [k for k in dict.fromkeys(page)
                                    if not keyspace.matches(k, patterns[:index])]
                            for item in keyspace.facts(client, keys):
                                prefix = keyspace.prefix_of(item.key, cfg.keys.separator,
                                                            cfg.keys.prefix_depth)
                                result.add(f"db{db} {prefix}", item, now_ms)
                finally:
                    client.close()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise RedisUnavailable(f"lost the throwaway server during inspect: {exc}") from None
    return result


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def text(result: Inspection) -> str:
    lines = [f"backup {result.backup} (created {result.created_at})"]
    if result.expired_at_load:
        lines.append(f"{result.expired_at_load} keys had already expired (not counted below)")
    rows = [["PREFIX", "KEYS", "MEMORY", "TYPES", "TTL"]]
    for prefix, group in sorted(result.prefixes.items()):
        rows.append([prefix, str(group.keys), _size(group.memory),
                     ",".join(f"{t} {n}" for t, n in sorted(group.types.items())),
                     ",".join(f"{label} {group.ttl[label]}" for label in keyspace.TTL_LABELS
                              if group.ttl[label])])
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)
