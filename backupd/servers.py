"""Which server wrote a backup and which servers can load it: Redis and Valkey.

Valkey answers INFO with `redis_version:7.2.4`, a compatibility value; its real version is
`valkey_version` (with `server_name:valkey`). What each release loads comes from the servers'
sources (RDB_VERSION in rdb.h): a server loads every RDB version up to the one it writes, and
Valkey 9 writes 80 (magic `VALKEY`) and refuses Redis's 12..79 ("foreign") by default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

REDIS, VALKEY = "redis", "valkey"
KINDS = (REDIS, VALKEY)
VALKEY_OWN_FROM = 80  # Valkey 9's first own RDB version; 12..79 are Redis's (foreign to it)

# (first release, the RDB version it writes and loads up to), newest first.
_WRITES: dict[str, tuple[tuple[tuple[int, int], int], ...]] = {
    REDIS: (((8, 6), 13), ((7, 4), 12), ((7, 2), 11), ((7, 0), 10), ((5, 0), 9), ((4, 0), 8),
            ((3, 2), 7), ((2, 6), 6)),
    VALKEY: (((9, 0), 80), ((7, 2), 11)),
}


@dataclass(frozen=True)
class ServerId:
    kind: str  # "redis" or "valkey"
    version: str  # the real version ("" when unknown)

    @property
    def label(self) -> str:
        """'Valkey 8.1.8', 'Redis 7.0.15': how messages name a server."""
        return f"{'Valkey' if self.kind == VALKEY else 'Redis'} {self.version or '?'}"

    @property
    def rdb_version(self) -> int:
        """The newest RDB version this server writes and loads (0 when unknown)."""
        try:
            major, minor = (int(part) for part in self.version.split(".")[:2])
        except ValueError:
            return 0
        table = _WRITES.get(self.kind, _WRITES[REDIS])
        for release, rdb_version in table:
            if (major, minor) >= release:
                return rdb_version
        return 5 if self.kind == REDIS else 0

    def can_load(self, rdb_version: int) -> bool:
        newest = self.rdb_version
        if self.kind == VALKEY and newest >= VALKEY_OWN_FROM:
            return rdb_version <= 11 or VALKEY_OWN_FROM <= rdb_version <= newest
        return rdb_version <= newest

    @property
    def loads(self) -> str:
        """What it loads, for messages: 'RDB versions up to 10'."""
        newest = self.rdb_version
        if self.kind == VALKEY and newest >= VALKEY_OWN_FROM:
            return f"RDB versions up to 11 and {VALKEY_OWN_FROM}..{newest}"
        return f"RDB versions up to {newest}"


def from_info(info: Mapping[str, Any]) -> ServerId:
    """The server as INFO describes it (Valkey by `server_name`, not by `redis_version`)."""
    if str(info.get("server_name", "")).lower() == VALKEY:
        return ServerId(VALKEY, str(info.get("valkey_version", "")))
    return ServerId(REDIS, str(info.get("redis_version", "")))


_VERSION_RE = re.compile(r"\bv=(\d+\.\d+\.\d+)")


def from_version_output(text: str) -> ServerId | None:
    """`redis-server --version` ('Redis server v=7.0.15 ...', 'Valkey server v=8.1.8 ...')."""
    match = _VERSION_RE.search(text) or re.search(r"(\d+\.\d+\.\d+)", text)
    if not match:
        return None
    kind = VALKEY if text.lower().lstrip().startswith("valkey") else REDIS
    return ServerId(kind, match.group(1))


def rdb_writer(rdb_version: int) -> str:
    """Which servers write an RDB of this version, for messages."""
    if rdb_version >= VALKEY_OWN_FROM:
        return "Valkey 9.0 or newer"
    for release, written in reversed(_WRITES[REDIS]):
        if written >= rdb_version:
            name = f"Redis {release[0]}.{release[1]} or newer"
            return name + (", or Valkey 7.2 to 8.x" if rdb_version == 11 else "")
    return "an unknown Redis"


@dataclass(frozen=True)
class Supported:
    """One row of README's "Supported servers" table (tests/test_servers.py keeps it true)."""

    server: str
    tested: str  # the versions the test matrix runs ("" when only the load table covers it)
    rdb: str
    aof: str
    notes: str


SUPPORTED = (
    Supported("Redis", "7.0.15 (Debian 12)", "10", "multi-part (`appendonlydir`)",
              "the oldest supported: loads RDB <= 10 only"),
    Supported("Redis", "7.2, 7.4: by the load table", "11, 12", "multi-part",
              "`redis:7` is 7.4 (RDB 12): drills need a 7.4+ drill server"),
    Supported("Redis", "8.2.3", "12", "multi-part", "8.0 to 8.4 write RDB 12; 8.6+ writes 13"),
    Supported("Valkey", "8.1.8", "11", "multi-part",
              "INFO `redis_version` is 7.2.4 (compatibility); backupd records `valkey_version`."
              " Redis 7.2+ loads its RDB; it cannot load Redis 7.4+/8 RDB 12"),
    Supported("Valkey", "9.0: by the load table", "80 (`VALKEY080`)", "multi-part",
              "loads RDB <= 11 and 80; refuses Redis's RDB 12 (foreign)"),
)


def supported_table() -> str:
    """README's "Supported servers" table, as Markdown."""
    rows = [("Server", "Versions tested", "RDB version", "AOF layout", "Notes"),
            ("---",) * 5]
    rows += [(s.server, s.tested, s.rdb, s.aof, s.notes) for s in SUPPORTED]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"
