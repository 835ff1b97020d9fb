"""Preflight (step 2, also in `--dry-run`): what the restart will do with the backup, checked
before anything stops. Each finding names the setting and the fix; a refusal changes nothing.

- `databases`: a backup holding db 15 makes a server with `databases 4` exit at startup (a
  crash loop under a restart policy).
- memory: the source's `used_memory` (manifest) against the target's `maxmemory`: larger means
  keys evicted right after the restart, or every write refused with OOM (`noeviction`).
- the ACL user: one created with `ACL SETUSER` and not saved is gone after the restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import redis
import structlog

from backupd.actions.restore.target import Target
from backupd.errors import RestoreError
from backupd.manifest import Manifest

log = structlog.get_logger("backupd.restore")

DEFAULT_DATABASES = 16
MEMORY_WARN = 0.8  # of maxmemory: warn above this, refuse above 1
MAX_ACL_BYTES = 1 << 20
NOTHING_CHANGED = "Nothing was stopped or changed."


@dataclass(frozen=True)
class Findings:
    warnings: list[str]
    user_note: str  # why the restore's user may be gone after the restart ("" = no doubt)


def highest_db(manifest: Manifest) -> int:
    return max((int(db[2:]) for db, n in manifest.keys_per_db.items() if n), default=-1)


def check_databases(manifest: Manifest, target: Target) -> str:
    """Refuse a backup with a db the target cannot open; a warning when it cannot be told."""
    top = highest_db(manifest)
    if target.databases is None:
        return (f"the target's `databases` setting is unknown (Redis down or CONFIG "
                f"unavailable); the backup uses db{top}: Redis exits at startup if `databases` "
                f"is {top} or less") if top >= DEFAULT_DATABASES else ""
    if top >= target.databases:
        raise RestoreError(
            f"backup {manifest.id} holds keys in db{top}, but the target runs with `databases "
            f"{target.databases}` (db0-db{target.databases - 1}): Redis would refuse the file "
            "at startup and exit (a crash loop under a restart policy). Set `databases "
            f"{max(top + 1, DEFAULT_DATABASES)}` in the Redis config and restart Redis, then "
            f"restore. {NOTHING_CHANGED}")
    return ""


def memory_needed(manifest: Manifest) -> tuple[int, str]:
    if manifest.redis.used_memory:
        return manifest.redis.used_memory, "used_memory of its source"
    return manifest.raw_size, "its RDB size (the manifest has no used_memory; memory is larger)"


def check_memory(manifest: Manifest, target: Target, force: bool) -> str:
    """Refuse (unless `force`) when the backup does not fit the target's maxmemory."""
    if not target.answers:
        return "the target's maxmemory is unknown (Redis down): not checked"
    if not target.maxmemory:
        return ""
    need, basis = memory_needed(manifest)
    mib = f"{need / 2**20:.1f} MiB ({basis})"
    limit = f"maxmemory {target.maxmemory / 2**20:.1f} MiB"
    if need <= target.maxmemory * MEMORY_WARN:
        return ""
    if need <= target.maxmemory:
        return f"the backup needs {mib}, close to the target's {limit}"
    effect = ("every write would fail with OOM (maxmemory-policy noeviction)"
              if target.maxmemory_policy == "noeviction" else
              f"Redis would evict keys right after the restart (maxmemory-policy "
              f"{target.maxmemory_policy})")
    text = (f"backup {manifest.id} needs {mib}, more than the target's {limit}: {effect}. "
            "Raise maxmemory (CONFIG SET maxmemory and in the Redis config)")
    if force:
        return text + "; --force-memory given: restoring anyway"
    raise RestoreError(f"{text}, or pass --force-memory to restore anyway. {NOTHING_CHANGED}")


def user_persistence(client: redis.Redis, username: str, data_dir: Path) -> str:
    """Why the ACL user may not exist after a restart ("" = it is in a file Redis loads)."""
    if not username or username == "default":
        return ""
    conf = {str(k): str(v) for k, v in client.config_get("aclfile", "dir").items()}
    info: dict[str, Any] = client.info("server")
    aclfile, redis_dir = conf.get("aclfile", ""), conf.get("dir", "")
    config_file = str(info.get("config_file", ""))
    source = aclfile or config_file
    if not source:
        return (f"Redis runs without a config file or aclfile, so ACL user {username!r} "
                "exists only at runtime (unless given on its command line): it is gone after "
                "the restart. Define it in the Redis config or an aclfile first")
    text = _read_local(source, redis_dir, data_dir)
    what = "aclfile" if aclfile else "config file"
    if text is None:
        return (f"cannot read Redis's {what} {source} from here to check that ACL user "
                f"{username!r} survives the restart")
    if not any(line.split()[:2] == ["user", username] for line in text.splitlines()):
        return (f"ACL user {username!r} is not in Redis's {what} {source}: it was created at "
                "runtime (ACL SETUSER" + (", no ACL SAVE" if aclfile else "") + ") and is gone "
                "after the restart. " + ("Run ACL SAVE" if aclfile else
                                         "Add it to the config file") + " first")
    return ""


def _read_local(path: str, redis_dir: str, data_dir: Path) -> str | None:
    """A file of Redis's, as this process sees it: inside Redis's `dir` it is in data_dir."""
    candidates = []
    pure = PurePosixPath(path)
    if redis_dir and not pure.is_absolute():
        pure = PurePosixPath(redis_dir) / pure
    if redis_dir and pure.is_relative_to(redis_dir):
        candidates.append(data_dir / pure.relative_to(redis_dir))
    candidates.append(Path(pure))
    for candidate in candidates:
        try:
            with open(candidate, encoding="utf-8", errors="replace") as fh:
                return fh.read(MAX_ACL_BYTES)
        except OSError:
            continue
    return None


def preflight(manifest: Manifest, target: Target, force_memory: bool,
              user_note: str) -> Findings:
    """Every check; raises RestoreError on a refusal, else the warnings for the plan."""
    found = [check_databases(manifest, target), check_memory(manifest, target, force_memory),
             user_note]
    warnings = [text for text in found if text]
    for text in warnings:
        log.warning("restore_preflight", finding=text)
    return Findings(warnings, user_note)
