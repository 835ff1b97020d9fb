"""Per-backup metadata: the manifest is written last and is the commit marker of a backup.

An artifact without a manifest is not a backup. Manifests are parsed strictly: anything read
from disk or a bucket is untrusted input, so wrong types and bad ids raise IntegrityError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from backupd import servers
from backupd.cluster import facts as cluster_facts
from backupd.cluster.facts import ClusterFacts
from backupd.errors import IntegrityError, UsageError
from backupd.storage.layout import COMPRESSION_EXT as COMPRESSION_EXT
from backupd.storage.layout import artifact_name as artifact_name
from backupd.storage.layout import check_id as check_id
from backupd.storage.layout import is_valid_id as is_valid_id
from backupd.storage.layout import shard_artifact_name

FORMAT_VERSION = 1
_ID_TIME = "%Y%m%dT%H%M%SZ"
MAX_MANIFEST_BYTES = 1024 * 1024


def new_id(now: datetime) -> str:
    """A sortable id `YYYYMMDDTHHMMSSZ-<6 hex>`; the random part keeps ids unique per second."""
    return now.astimezone(UTC).strftime(_ID_TIME) + "-" + secrets.token_hex(3)


def id_time(backup_id: str) -> datetime:
    return datetime.strptime(backup_id.split("-", 1)[0], _ID_TIME).replace(tzinfo=UTC)


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 time; a time without zone is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{text!r} is not a time (expected e.g. 2026-01-02T03:00:00Z)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


SOURCES = ("volume", "replication")


@dataclass(frozen=True)
class RedisFacts:
    version: str = ""  # the real version (Valkey's valkey_version, not its redis_version)
    host: str = ""
    port: int = 0
    role: str = ""
    run_id: str = ""
    aof_enabled: bool = False
    server: str = servers.REDIS  # "redis" or "valkey"; manifests before it are all "redis"
    used_memory: int = 0  # INFO used_memory at the snapshot: a restore checks maxmemory
    maxmemory_policy: str = ""

    @property
    def identity(self) -> servers.ServerId:
        return servers.ServerId(self.server, self.version)


@dataclass(frozen=True)
class Manifest:
    id: str
    created_at: str
    trigger: str
    tag: str
    redis: RedisFacts
    rdb_version: int
    rdb_checksum: str
    keys: int
    keys_per_db: dict[str, int]
    raw_size: int
    raw_sha256: str
    stored_size: int
    stored_sha256: str
    compression: str
    encryption: str
    artifact: str
    age_recipients: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    backupd_version: str = ""
    warnings: list[str] = field(default_factory=list)
    upload: str = "none"
    keys_exact: bool = False  # keys counted from the RDB itself, not from INFO a moment later
    replication: dict[str, Any] = field(default_factory=dict)  # role, link, lag (replicas)
    sentinel: dict[str, Any] = field(default_factory=dict)  # the sentinels' view, if any
    # "<db>:<type>:<digest of the name>" of the first keys of each db (backupd.rdb_keys); a
    # restore checks that they exist after the restart.
    key_sample: list[str] = field(default_factory=list)
    source: str = "volume"  # how the RDB was read: "volume" (BGSAVE file) or "replication"
    # A cluster backup: one artifact per shard (shard 0's is `artifact`); the sizes and
    # digests above are the shards' totals and a digest over theirs (cluster_digest).
    cluster: ClusterFacts | None = None
    format_version: int = FORMAT_VERSION

    def parts(self) -> list[Manifest]:
        """What is stored, one view per artifact: the backup itself, or for a cluster backup
        one single-server view per shard (its artifact, sizes, digests, keys, node)."""
        if self.cluster is None:
            return [self]
        return [dataclasses.replace(
            self, artifact=s.artifact, raw_size=s.raw_size, raw_sha256=s.raw_sha256,
            stored_size=s.stored_size, stored_sha256=s.stored_sha256, rdb_version=s.rdb_version,
            rdb_checksum=s.rdb_checksum, keys=s.keys, keys_per_db={"db0": s.keys},
            key_sample=s.key_sample, cluster=None, redis=dataclasses.replace(
                self.redis, host=s.host, port=s.port, role=s.role, version=s.version,
                server=s.server)) for s in self.cluster.shards]

    @property
    def created(self) -> datetime:
        return parse_time(self.created_at)

    @property
    def encrypted(self) -> bool:
        return self.encryption == "age"

    def to_json(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n").encode()

    def with_upload(self, state: str) -> Manifest:
        return dataclasses.replace(self, upload=state)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str, "created_at": str, "trigger": str, "tag": str, "rdb_version": int,
    "rdb_checksum": str, "keys": int, "raw_size": int, "raw_sha256": str, "stored_size": int,
    "stored_sha256": str, "compression": str, "encryption": str, "artifact": str,
    "duration_s": (int, float), "backupd_version": str, "upload": str, "format_version": int,
    "keys_exact": bool, "source": str,
}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FACT_TYPES: dict[str, type] = {"version": str, "host": str, "port": int, "role": str,
                                "run_id": str, "aof_enabled": bool, "server": str,
                                "used_memory": int, "maxmemory_policy": str}
_SAMPLE_RE = re.compile(r"\d{1,5}:[a-z]{1,16}:[0-9a-f]{32}")


def cluster_digest(digests: list[str]) -> str:
    """A cluster backup's top-level digest: SHA-256 over its shards' digests, in order."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def parse(data: bytes, expected_id: str | None = None) -> Manifest:
    """Parse and validate a manifest; raises IntegrityError naming what is wrong."""
    where = f"manifest {expected_id}" if expected_id else "manifest"
    if len(data) > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{where} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested deep
        raise IntegrityError(f"{where} is not valid JSON") from None
    if not isinstance(raw, dict):
        raise IntegrityError(f"{where} is not a JSON object")

    def need(key: str, kind: type | tuple[type, ...]) -> Any:
        value = raw.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise IntegrityError(f"{where}: field {key!r} is missing or has the wrong type")
        return value

    values = {key: need(key, kind) for key, kind in _TYPES.items() if key in raw or
              key in ("id", "created_at", "raw_size", "raw_sha256", "stored_size",
                      "stored_sha256", "compression", "encryption", "artifact")}
    if values.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise IntegrityError(f"{where} has format_version {values['format_version']}, newer "
                             "than this backupd understands; upgrade backupd")
    backup_id = values["id"]
    if not is_valid_id(backup_id) or (expected_id is not None and backup_id != expected_id):
        raise IntegrityError(f"{where}: field 'id' is {backup_id[:64]!r}, not the expected id")
    if values["compression"] not in COMPRESSION_EXT or values["encryption"] not in ("none", "age"):
        raise IntegrityError(f"{where}: unknown compression or encryption")
    encrypted = values["encryption"] == "age"
    cluster = None
    if raw.get("cluster") is not None:
        cluster = cluster_facts.parse(raw["cluster"], where, lambda i: shard_artifact_name(
            backup_id, i, values["compression"], encrypted))
        values["cluster"] = cluster
    expected_artifact = (cluster.shards[0].artifact if cluster is not None else
                         artifact_name(backup_id, values["compression"], encrypted))
    if values["artifact"] != expected_artifact:
        raise IntegrityError(f"{where}: field 'artifact' must be {expected_artifact!r}")
    for key in ("raw_sha256", "stored_sha256"):
        if not _HEX64.fullmatch(values[key]):
            raise IntegrityError(f"{where}: field {key!r} is not a SHA-256 hex digest")
    for key in ("raw_size", "stored_size"):
        if values[key] < 0:
            raise IntegrityError(f"{where}: field {key!r} is negative")
    try:
        parse_time(values["created_at"])
    except UsageError:
        raise IntegrityError(f"{where}: field 'created_at' is not a time") from None
    redis_raw = raw.get("redis", {})
    if not isinstance(redis_raw, dict):
        raise IntegrityError(f"{where}: field 'redis' is not an object")
    known = {f.name: redis_raw[f.name] for f in dataclasses.fields(RedisFacts)
             if f.name in redis_raw}
    if not all(isinstance(v, _FACT_TYPES[k]) and (k == "aof_enabled" or not isinstance(v, bool))
               for k, v in known.items()):
        raise IntegrityError(f"{where}: field 'redis' is malformed")
    if known.get("server", servers.REDIS) not in servers.KINDS:
        raise IntegrityError(f"{where}: field 'redis.server' is not one of {servers.KINDS}")
    facts = RedisFacts(**known)
    keys_per_db = raw.get("keys_per_db", {})
    if not isinstance(keys_per_db, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in keys_per_db.values()):
        raise IntegrityError(f"{where}: field 'keys_per_db' is malformed")
    str_lists = {}
    for key in ("age_recipients", "warnings", "key_sample"):
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise IntegrityError(f"{where}: field {key!r} is not a list of strings")
        str_lists[key] = value
    for key in ("replication", "sentinel"):
        value = raw.get(key, {})
        if not isinstance(value, dict) or not all(
                isinstance(v, str | int | float | bool) or v is None for v in value.values()):
            raise IntegrityError(f"{where}: field {key!r} is not an object of plain values")
        values[key] = value
    if not all(_SAMPLE_RE.fullmatch(v) for v in str_lists["key_sample"]):
        raise IntegrityError(f"{where}: field 'key_sample' is malformed")
    if values.get("source", "volume") not in SOURCES:
        raise IntegrityError(f"{where}: field 'source' is not one of {SOURCES}")
    values.setdefault("tag", "")
    values.setdefault("trigger", "manual")
    values.setdefault("rdb_version", 0)
    values.setdefault("rdb_checksum", "ok")
    values.setdefault("keys", sum(keys_per_db.values()))
    return Manifest(redis=facts, keys_per_db=keys_per_db, age_recipients=str_lists[
        "age_recipients"], warnings=str_lists["warnings"], key_sample=str_lists["key_sample"],
        **values)


def now_utc() -> datetime:
    return datetime.now(UTC)
