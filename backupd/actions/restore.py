"""`backupd restore`: replace a Redis server's data with a backup, safely, and undo it.

Order of operations (issue 4; shared/notes/redis.md sections 2-4), nothing destructive before 4:

1. Fetch the artifact into `<data_dir>/.backupd-restore-<id>` (same filesystem as Redis's files,
   so the swap is a rename) while checking SHA-256, decrypting, decompressing and checking the
   RDB CRC and header in the same pass.
2. Ask Redis (INFO, CONFIG GET) for its version, file names, AOF state and key count; refuse an
   RDB newer than the server can load, before anything stops.
3. Prepare the files: the RDB as `dbfilename` and, with AOF on, a fresh AOF directory whose base
   is the backup (Redis with appendonly loads only the AOF), owned like the existing files.
4. `CONFIG SET save ""` (so no shutdown save can overwrite the new files), wait until no child
   runs, stop Redis with the configured method.
5. Move the current files aside into `.backupd-pre-restore-<time>`, rename the new ones in,
   fsync the directory.
6. Start Redis, wait (bounded) for PING and loading:0, check the key count against the manifest.
7. On failure in 4-6, put the previous files back and start Redis again.

The `shutdown` method swaps before stopping (Redis restarts itself through its restart policy).

A journal (`restore.json` in the pre-restore directory) is written before step 4 and updated at
each step, so a killed restore is found later and `backupd restore --rollback` can undo it from
any point: it knows which original files existed, what the runtime config was, and whether Redis
was running.

For a running RDB-only server the pre-restore copy is first refreshed with a BGSAVE (the same
handshake as a backup): Redis is stopped with saving disabled, so without it a rollback would
bring back the last save rather than the data Redis held. The BGSAVE also proves that
`redis.data_dir` is Redis's data volume (the dump file must change).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import redis
import structlog

from backupd import checkpoints, source
from backupd import manifest as mf
from backupd.actions.backup import backup_lock
from backupd.actions.catalog import Catalog, Entry, storages
from backupd.config import Config, RedisConfig, RestoreConfig
from backupd.controllers.base import Controller, poll_until
from backupd.controllers.factory import make_controller
from backupd.errors import (
    EXIT_FAILED,
    EXIT_INTEGRITY,
    EXIT_OK,
    BackupdError,
    IntegrityError,
    RedisUnavailable,
    RestoreError,
    StorageError,
    UsageError,
)
from backupd.manifest import Manifest
from backupd.pipeline import (
    CHUNK,
    ObservedReader,
    UnpackResult,
    fsync_dir,
    load_identities,
    unpack,
    write_atomic,
)
from backupd.rdb import HEADER_SIZE, max_rdb_version, parse_header
from backupd.storage.base import Listing, Storage

log = structlog.get_logger("backupd.restore")

STAGING_PREFIX = ".backupd-restore-"
PRE_PREFIX = ".backupd-pre-restore-"
JOURNAL = "restore.json"
JOURNAL_FORMAT = 1
AOF_MANIFEST_SUFFIX = ".manifest"
STAMP = "%Y%m%dT%H%M%SZ"
PROGRESS_LOG_EVERY = 5.0

# Journal states, in order. A journal that is not DONE marks an interrupted restore.
QUIESCING, STOPPING, SWAPPING, SWAPPED, RESTARTING, DONE = (
    "quiescing", "stopping", "swapping", "swapped", "restarting", "done")
_AFTER_SWAP = (SWAPPED, RESTARTING)

# The first Redis release that writes each RDB version (for messages), from rdb.max_rdb_version.
_RELEASES = ("2.6", "3.2", "4.0", "5.0", "7.0", "7.2", "7.4", "8.6")


# -- options and the terminal ---------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    selector: str = "latest"
    source: str | None = None  # local | s3 | None: local if the backup is there, else s3
    before: datetime | None = None
    identity_file: str | None = None
    dry_run: bool = False
    yes: bool = False
    method: str | None = None
    start: bool = False


@dataclass(frozen=True)
class Ui:
    """How the action talks to the operator; the CLI wires it to click and the terminal."""

    echo: Callable[[str], None]
    confirm: Callable[[str], bool]
    interactive: bool  # stdin is a terminal: a confirmation can be asked
    progress: bool  # stderr is a terminal: draw a progress bar, else log lines


def require_confirmation_possible(opts_yes: bool, dry_run: bool, ui: Ui) -> None:
    if not (opts_yes or dry_run or ui.interactive):
        raise UsageError("restore replaces all data in Redis and there is no terminal to "
                         "confirm on: pass --yes (or --dry-run to only check)")


# -- talking to Redis ---------------------------------------------------------------------------


class RedisLink:
    """Fresh connections to the target: Redis goes away and comes back during a restore."""

    def __init__(self, cfg: RedisConfig, env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self.env = env

    @property
    def where(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    def connect(self) -> redis.Redis:
        return source.connect(self.cfg, self.env)

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return source.redis_errors(self.cfg, True)

    def answers(self) -> bool:
        """True while anything answers on the port (also -LOADING or an auth error)."""
        try:
            client = self.connect()
        except RedisUnavailable as exc:
            return "loading" in str(exc).lower()
        except BackupdError:
            return True
        client.close()
        return True

    def ready_info(self) -> dict[str, Any] | None:
        """INFO of a server that answers and has finished loading, else None."""
        try:
            client = self.connect()
        except RedisUnavailable:
            return None
        try:
            with self.errors():
                info: dict[str, Any] = client.info("everything")
        except RedisUnavailable:
            return None
        finally:
            client.close()
        return None if int(info.get("loading", 0)) else info


def wait_ready(link: RedisLink, not_run_id: str, timeout: float) -> dict[str, Any]:
    """Wait for PING, loading:0 and a run_id other than `not_run_id` (a restarted server)."""
    seen: dict[str, Any] = {}

    def ready() -> bool:
        info = link.ready_info()
        if info is None or (not_run_id and info.get("run_id") == not_run_id):
            return False
        seen.update(info)
        return True

    poll_until(ready, timeout, f"Redis at {link.where} to answer with its data loaded "
                               "(restore.start_timeout)")
    return seen


# -- step 2: the target -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What the server said in step 2, or what its files say when it is down."""

    answers: bool
    running: bool
    version: str
    run_id: str
    keys: int | None
    aof: bool
    dbfilename: str
    aof_dir: str
    aof_file: str
    role: str = "master"
    cluster: bool = False
    used_memory: int = 0

    @property
    def entries(self) -> list[str]:
        """The top-level names in data_dir that a restore replaces."""
        return [self.dbfilename, self.aof_dir] if self.aof else [self.dbfilename]


def inspect_target(link: RedisLink, controller: Controller, data_dir: Path) -> Target:
    running = controller.is_running()
    try:
        client = link.connect()
    except RedisUnavailable as exc:
        log.warning("redis_not_answering", where=link.where, error=str(exc))
        return _target_from_files(data_dir, bool(running))
    try:
        with link.errors():
            return _target_from_server(client, link.cfg)
    finally:
        client.close()


def _target_from_server(client: redis.Redis, cfg: RedisConfig) -> Target:
    info = source.server_info(client, cfg)
    conf = {key: _config_get(client, key) for key in
            ("appendonly", "appenddirname", "appendfilename", "dbfilename")}
    aof = conf["appendonly"] == "yes"
    if aof and not conf["appenddirname"]:
        raise RestoreError(f"Redis {info.facts.version} uses a single-file AOF (Redis < 7.0); "
                           "backupd restores the Redis 7 multi-part AOF only")
    raw = info.persistence
    return Target(
        answers=True, running=True, version=info.facts.version, run_id=info.facts.run_id,
        keys=info.keys, aof=aof, dbfilename=_safe_name(conf["dbfilename"] or "dump.rdb"),
        aof_dir=_safe_name(conf["appenddirname"] or "appendonlydir"),
        aof_file=_safe_name(conf["appendfilename"] or "appendonly.aof"),
        role=info.facts.role, cluster=bool(int(raw.get("cluster_enabled", 0))),
        used_memory=int(raw.get("used_memory_dataset", 0)),
    )


def _config_get(client: redis.Redis, key: str) -> str:
    try:
        return str(client.config_get(key).get(key, ""))
    except redis.exceptions.NoPermissionError:
        raise RestoreError(f"the Redis user cannot run CONFIG GET {key}: a restore needs "
                           "+config|get +config|set +info +ping +bgsave "
                           "(+shutdown for the shutdown method)") from None


def _target_from_files(data_dir: Path, running: bool) -> Target:
    """Redis is down: take the file names from what is on disk (defaults otherwise)."""
    aof_dir, aof_file = _find_aof_layout(data_dir)
    rdbs = sorted(p.name for p in _scan(data_dir) if p.is_file() and p.suffix == ".rdb")
    dbfilename = rdbs[0] if len(rdbs) == 1 else "dump.rdb"
    return Target(answers=False, running=running, version="", run_id="", keys=None,
                  aof=aof_dir is not None, dbfilename=dbfilename,
                  aof_dir=aof_dir or "appendonlydir", aof_file=aof_file or "appendonly.aof")


def _find_aof_layout(data_dir: Path) -> tuple[str | None, str | None]:
    for sub in _scan(data_dir):
        if sub.is_dir() and not sub.name.startswith(".backupd-"):
            manifests = [p.name for p in _scan(sub) if p.name.endswith(AOF_MANIFEST_SUFFIX)]
            if len(manifests) == 1:
                return sub.name, manifests[0][: -len(AOF_MANIFEST_SUFFIX)]
    return None, None


def _scan(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RestoreError(f"cannot list {path}: {exc.strerror}") from None


def _safe_name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or name.startswith(".backupd-"):
        raise RestoreError(f"Redis reports an unusable file name {name!r}")
    return name


def check_target(target: Target) -> None:
    """Targets where a restart loses the restore: refuse rather than pretend."""
    if target.role and target.role != "master":
        raise RestoreError("the target Redis is a replica: after a restart it resyncs from its "
                           "master and the restore is lost; restore the master instead")
    if target.cluster:
        raise RestoreError("the target Redis runs in cluster mode, which backupd does not "
                           "restore (a shard file on the wrong node loses keys silently)")


def check_version(manifest: Manifest, rdb_version: int, target: Target,
                  controller: Controller, data_dir: Path) -> str:
    """Refuse an RDB the server cannot load (it would exit, or crash-loop under a restart
    policy); returns the server version used for the check, or a note when inferred."""
    version = target.version or controller.server_version() or ""
    if version:
        can_load = max_rdb_version(version)
        if can_load < rdb_version:
            raise RestoreError(
                f"backup {manifest.id} is RDB version {rdb_version} (written by "
                f"{_writer(rdb_version)}, Redis {manifest.redis.version or '?'}); the target "
                f"runs Redis {version}, which loads RDB versions up to {can_load}. Nothing was "
                "stopped or changed. Upgrade the target or restore an older backup.")
        return f"Redis {version} (loads RDB <= {can_load})"
    on_disk = _on_disk_rdb_version(data_dir, target)
    if on_disk is None or on_disk < rdb_version:
        raise RestoreError(
            f"Redis is not running, so its version cannot be checked, and the files in "
            f"{data_dir} do not show that it can load RDB version {rdb_version} (backup "
            f"{manifest.id}, {_writer(rdb_version)}). Start Redis and run the restore again.")
    return f"unknown (Redis down; its files are RDB version {on_disk})"


def _writer(rdb_version: int) -> str:
    if rdb_version >= 80:
        return "Valkey 9.0 or newer"
    for release in _RELEASES:
        if max_rdb_version(release) >= rdb_version:
            return f"Redis {release} or newer"
    return "an unknown Redis"


def _on_disk_rdb_version(data_dir: Path, target: Target) -> int | None:
    """The newest RDB version among Redis's own files: a lower bound of what it can load."""
    paths = [data_dir / target.dbfilename]
    if target.aof:
        paths += [p for p in _scan(data_dir / target.aof_dir) if p.name.endswith(".base.rdb")]
    versions = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                versions.append(parse_header(fh.read(HEADER_SIZE)))
        except (OSError, IntegrityError):
            continue
    return max(versions) if versions else None


# -- selecting the backup -------------------------------------------------------------------


@dataclass(frozen=True)
class Selected:
    storage: Storage
    manifest: Manifest
    locations: tuple[str, ...]


def select_backup(config: Config, selector: str, before: datetime | None,
                  location: str | None, env: Mapping[str, str] | None = None) -> Selected:
    """`latest`, an id, or the newest at or before `before`; read from local when the backup
    is there, else from S3 (unless `location` says where)."""
    if before is not None and selector != "latest":
        raise UsageError("give a backup ID or --before, not both")
    chosen = storages(config, location or "all", env)
    found = _tolerant_catalog(chosen, strict=location is not None)
    if before is not None:
        candidates = [e for e in found.entries if e.manifest.created <= before]
        if not candidates:
            raise StorageError(f"there is no backup at or before {mf.format_time(before)}")
        entry = candidates[0]
    else:
        entry = found.find(selector)
    storage = next(s for s in chosen if s.name in entry.locations)
    return Selected(storage, entry.manifest, tuple(entry.locations))


def _tolerant_catalog(chosen: Sequence[Storage], strict: bool) -> Catalog:
    """Like catalog.catalog(), but an unreachable S3 does not block a restore from local."""
    merged: dict[str, Entry] = {}
    listings: dict[str, Listing] = {}
    for storage in chosen:
        try:
            listing = storage.list()
        except StorageError as exc:
            if strict or len(chosen) == 1:
                raise
            log.warning("location_unavailable", location=storage.name, error=str(exc))
            continue
        listings[storage.name] = listing
        for manifest in listing.manifests:
            merged.setdefault(manifest.id, Entry(manifest)).locations.append(storage.name)
    entries = sorted(merged.values(), key=lambda e: e.manifest.id, reverse=True)
    return Catalog(entries, listings)


def _identities(manifest: Manifest, identity_file: str | None) -> list[Any]:
    if not manifest.encrypted:
        return []
    if not identity_file:
        raise UsageError(f"backup {manifest.id} is encrypted: give --identity-file with the "
                         "age identity (AGE-SECRET-KEY-1...) of one of its recipients")
    return load_identities(identity_file)


# -- steps 1 and 3: staging -----------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int
    file_mode: int
    dir_mode: int
    source: str


def data_owner(data_dir: Path, target: Target) -> Owner:
    """Owner and modes for the new files, copied from Redis's existing files: a root-owned
    AOF directory makes a non-root Redis load the data and then exit (notes, section 3)."""
    aof_dir = data_dir / target.aof_dir
    files = [data_dir / target.dbfilename, *(p for p in _scan(aof_dir) if p.is_file())]
    dir_st = _stat(aof_dir)
    for path in files:
        st = _stat(path)
        if st is not None and stat.S_ISREG(st.st_mode):
            file_mode = stat.S_IMODE(st.st_mode)
            dir_mode = stat.S_IMODE(dir_st.st_mode) if dir_st else _dir_mode(file_mode)
            return Owner(st.st_uid, st.st_gid, file_mode, dir_mode, str(path))
    st = _stat(data_dir)
    if st is None:
        raise RestoreError(f"redis.data_dir {data_dir} does not exist")
    return Owner(st.st_uid, st.st_gid, 0o600, 0o700, f"{data_dir} (no data files yet)")


def _dir_mode(file_mode: int) -> int:
    """Add x wherever r is set: 0600 -> 0700, 0644 -> 0755."""
    return file_mode | ((file_mode & 0o444) >> 2)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def check_owner_possible(owner: Owner) -> None:
    if os.geteuid() != 0 and owner.uid != os.geteuid():
        raise RestoreError(f"Redis's files are owned by uid {owner.uid} ({owner.source}); "
                           f"backupd runs as uid {os.geteuid()} and cannot give the restored "
                           "files that owner: run the restore as root or as that uid")


@dataclass(frozen=True)
class Staged:
    dir: Path
    entries: list[str]
    rdb_version: int
    aof_base: str | None


class _Meter:
    """Bytes-read observer: a rich bar on a terminal, else a log line every few seconds."""

    def __init__(self, total: int, label: str, bar: bool) -> None:
        self.total = max(total, 1)
        self.label = label
        self.bar = bar
        self.done = 0
        self._last_log = time.monotonic()
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Meter:
        if self.bar:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      DownloadColumn(), TransferSpeedColumn(),
                                      TimeRemainingColumn(), console=Console(stderr=True),
                                      transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total)
        return self

    def __call__(self, data: bytes) -> None:
        self.done += len(data)
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done)
        elif time.monotonic() - self._last_log >= PROGRESS_LOG_EVERY:
            self._last_log = time.monotonic()
            log.info("restore_progress", what=self.label, bytes=self.done, total=self.total,
                     percent=round(100 * self.done / self.total, 1))

    def __exit__(self, *_: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def fetch_and_check(selected: Selected, sink: Any, identities: Sequence[Any],
                    bar: bool) -> UnpackResult:
    """Stream the artifact through SHA-256, decryption, decompression and the RDB check into
    `sink` (or nowhere), and compare everything with the manifest."""
    m = selected.manifest
    with _Meter(m.stored_size, f"download+verify {m.id} [{selected.storage.name}]", bar) as meter, \
            selected.storage.open_artifact(m) as stored:
        marks = checkpoints.ByteMarks([(CHUNK, "restore-fetch")])
        result = unpack(ObservedReader(stored, meter, marks), sink, compression=m.compression,
                        encrypted=m.encrypted, identities=identities, trust_recorded=True)
    problems = []
    if (result.stored.size, result.stored.sha256) != (m.stored_size, m.stored_sha256):
        problems.append("the stored artifact's SHA-256/size differ from the manifest")
    if (result.raw.size, result.raw.sha256) != (m.raw_size, m.raw_sha256):
        problems.append("the RDB's SHA-256/size differ from the manifest")
    if m.rdb_version and result.rdb.version != m.rdb_version:
        problems.append(f"the RDB is version {result.rdb.version}, the manifest says "
                        f"{m.rdb_version}")
    if problems:
        raise IntegrityError(f"backup {m.id} [{selected.storage.name}] is corrupt: "
                             + "; ".join(problems))
    return result


def stage(selected: Selected, target: Target, data_dir: Path, identities: Sequence[Any],
          owner: Owner, bar: bool) -> Staged:
    """Steps 1 and 3: the complete new files, fsynced, in a hidden dir beside Redis's own.

    Every check of `verify` runs on the way, the SHA-256 of the RDB included: it is the only
    thing that notices a manifest whose raw_sha256 is damaged while the artifact is intact
    (tests/faults/test_corrupt.py), so it cannot be left out even though the stored SHA-256
    and the RDB's CRC64 already cover the data itself."""
    staging = data_dir / f"{STAGING_PREFIX}{selected.manifest.id}"
    _remove_tree(staging)
    try:
        staging.mkdir(mode=0o700)
        rdb_path = staging / target.dbfilename
        fd = os.open(rdb_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        # Unbuffered: unpack writes pieces of pipeline.WRITE_SIZE (128 KiB), which cost the
        # kernel far less than the 1 MiB writes a buffered file would turn them into.
        with open(fd, "wb", buffering=0) as fh:
            result = fetch_and_check(selected, fh, identities, bar)
            os.fsync(fh.fileno())
        _own(rdb_path, owner, owner.file_mode)
        base = _stage_aof(staging, target, rdb_path, owner) if target.aof else None
        fsync_dir(staging)
    except BaseException:
        _remove_tree(staging)
        raise
    log.info("restore_step", step=1, what="staged and verified", dir=str(staging),
             rdb_version=result.rdb.version, rdb_crc=result.rdb.checksum, aof_base=base)
    return Staged(staging, target.entries, result.rdb.version, base)


def _stage_aof(staging: Path, target: Target, rdb_path: Path, owner: Owner) -> str:
    """A fresh multi-part AOF dir whose base is the backup (notes, section 3); Redis creates
    the incr file itself. A copy, not a hard link: an in-place write to dump.rdb (cp) must not
    change the AOF base."""
    aof_dir = staging / target.aof_dir
    aof_dir.mkdir(mode=0o700)
    base = f"{target.aof_file}.1.base.rdb"
    shutil.copyfile(rdb_path, aof_dir / base)
    _fsync_file(aof_dir / base)
    manifest_path = aof_dir / f"{target.aof_file}{AOF_MANIFEST_SUFFIX}"
    write_atomic(manifest_path, f"file {base} seq 1 type b\n".encode(), owner.file_mode)
    for path in (aof_dir / base, manifest_path):
        _own(path, owner, owner.file_mode)
    _own(aof_dir, owner, owner.dir_mode)
    fsync_dir(aof_dir)
    return base


def _own(path: Path, owner: Owner, mode: int) -> None:
    if os.geteuid() == 0:
        os.chown(path, owner.uid, owner.gid)
    os.chmod(path, mode)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


def check_space(data_dir: Path, manifest: Manifest, target: Target, snapshot: bool) -> int:
    """Staging needs the RDB (twice with AOF); a safety BGSAVE needs about one more RDB."""
    needed = manifest.raw_size * (2 if target.aof else 1)
    if snapshot:
        needed += _size_or(data_dir / target.dbfilename, target.used_memory)
    source.check_space(data_dir, needed, f"staging backup {manifest.id}")
    return needed


def _size_or(path: Path, fallback: int) -> int:
    st = _stat(path)
    return st.st_size if st is not None else fallback


# -- the journal ------------------------------------------------------------------------------


@dataclass
class Journal:
    """The state of one restore, in its pre-restore dir; the basis of `--rollback`."""

    backup_id: str
    started_at: str
    method: str
    state: str
    was_running: bool
    run_id_before: str
    keys_before: int | None
    expected_keys: int
    entries: dict[str, bool]  # name in data_dir -> whether Redis had that file before
    config_before: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    format: int = JOURNAL_FORMAT

    def save(self, pre_dir: Path) -> None:
        write_atomic(pre_dir / JOURNAL, (json.dumps(asdict(self), indent=2) + "\n").encode())
        checkpoints.reached(f"restore-{self.state}")

    def advance(self, pre_dir: Path, state: str) -> None:
        self.state = state
        self.save(pre_dir)
        log.info("restore_state", state=state, pre_restore_dir=str(pre_dir))

    @classmethod
    def load(cls, pre_dir: Path) -> Journal:
        try:
            raw = json.loads((pre_dir / JOURNAL).read_bytes())
            journal = cls(**raw)
        except (OSError, ValueError, TypeError) as exc:
            raise RestoreError(f"cannot read the restore journal in {pre_dir}: {exc}") from None
        if not isinstance(journal.entries, dict) or not all(
                isinstance(k, str) and isinstance(v, bool) for k, v in journal.entries.items()):
            raise RestoreError(f"the restore journal in {pre_dir} is malformed")
        for name in journal.entries:
            _safe_name(name)
        return journal


def new_pre_dir(data_dir: Path) -> Path:
    stamp = mf.now_utc().strftime(STAMP)
    for n in range(100):
        path = data_dir / f"{PRE_PREFIX}{stamp}{f'-{n}' if n else ''}"
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:
            continue
    raise RestoreError(f"cannot create a pre-restore directory in {data_dir}")


def pre_dirs(data_dir: Path) -> list[Path]:
    """Pre-restore dirs with a journal, newest first."""
    found = [p for p in _scan(data_dir) if p.name.startswith(PRE_PREFIX) and p.is_dir()
             and (p / JOURNAL).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def staging_dirs(data_dir: Path) -> list[Path]:
    return [p for p in _scan(data_dir) if p.name.startswith(STAGING_PREFIX) and p.is_dir()]


# -- steps 4 to 6 -----------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the destructive part needs, passed around as one object."""

    link: RedisLink
    controller: Controller
    cfg: RestoreConfig
    save_timeout: float
    data_dir: Path
    pre_dir: Path
    journal: Journal
    aof: bool


def _read_config(client: redis.Redis, aof: bool) -> dict[str, str]:
    keys = ["save"] + (["auto-aof-rewrite-percentage"] if aof else [])
    return {key: _config_get(client, key) for key in keys}


def quiesce(link: RedisLink, aof: bool, timeout: float, wait: bool = True) -> None:
    """`CONFIG SET save ""` (and no automatic AOF rewrite), then wait for no child: a save or
    rewrite finishing later would rename its file over the restored one."""
    client = link.connect()
    try:
        with link.errors():
            client.config_set("save", "")
            if aof:
                client.config_set("auto-aof-rewrite-percentage", "0")
            if wait:
                poll_until(lambda: _no_child(client), timeout,
                           "the running save or AOF rewrite to finish (redis.save_timeout)")
    finally:
        client.close()
    log.info("restore_step", step=4, what='CONFIG SET save "" and no child process', aof=aof)


def _no_child(client: redis.Redis) -> bool:
    state: dict[str, Any] = client.info("persistence")
    return not any(int(state.get(k, 0)) for k in (
        "rdb_bgsave_in_progress", "aof_rewrite_in_progress", "aof_rewrite_scheduled"))


def _revert_config(link: RedisLink, journal: Journal) -> None:
    """Put the runtime config back when Redis was not restarted (same run_id)."""
    if not journal.config_before:
        return
    try:
        client = link.connect()
    except BackupdError:
        return
    try:
        with link.errors():
            if client.info("server").get("run_id") != journal.run_id_before:
                return
            for key, value in journal.config_before.items():
                client.config_set(key, value)
        log.info("config_restored", keys=sorted(journal.config_before))
    except BackupdError as exc:
        log.warning("config_restore_failed", error=str(exc))
    finally:
        client.close()


def move_aside(run: Run) -> None:
    for name, existed in run.journal.entries.items():
        if existed and os.path.lexists(run.data_dir / name):
            os.rename(run.data_dir / name, run.pre_dir / name)


def install(run: Run, staged: Staged) -> None:
    for name in staged.entries:
        os.rename(staged.dir / name, run.data_dir / name)
    fsync_dir(run.data_dir)
    fsync_dir(run.pre_dir)


def swap_in(run: Run, staged: Staged) -> None:
    """Step 5: previous files aside, new files in, both directories fsynced."""
    # Recorded again right before the move: what exists now is what must come back.
    run.journal.entries = {name: os.path.lexists(run.data_dir / name) for name in staged.entries}
    run.journal.advance(run.pre_dir, SWAPPING)
    move_aside(run)
    checkpoints.reached("restore-moved")
    install(run, staged)
    run.journal.advance(run.pre_dir, SWAPPED)
    log.info("restore_step", step=5, what="files swapped", entries=staged.entries,
             pre_restore_dir=str(run.pre_dir))


def put_back(run: Run) -> bool:
    """Undo step 5 from whatever point it reached; True when anything was moved."""
    changed = False
    after_swap = run.journal.state in (SWAPPING, *_AFTER_SWAP, DONE)
    for name, existed in run.journal.entries.items():
        current, saved = run.data_dir / name, run.pre_dir / name
        if os.path.lexists(saved):
            _remove_tree(current)
            os.rename(saved, current)
            changed = True
        elif not existed and after_swap and os.path.lexists(current):
            _remove_tree(current)  # restored (or written from restored data): not Redis's own
            changed = True
    fsync_dir(run.data_dir)
    return changed


def needs_put_back(run: Run) -> bool:
    after_swap = run.journal.state in (SWAPPING, *_AFTER_SWAP, DONE)
    return any(os.path.lexists(run.pre_dir / name) or
               (not existed and after_swap and os.path.lexists(run.data_dir / name))
               for name, existed in run.journal.entries.items())


@dataclass(frozen=True)
class Loaded:
    keys: int
    loaded: int | None
    expired: int
    seconds: float


def drift_allowed(expected: int) -> int:
    """How far an approximate (INFO-based) key count may be from what the RDB held."""
    return max(100, expected // 100)


def check_loaded(info: Mapping[str, Any], expected: int, started: float,
                 exact: bool = True) -> Loaded:
    """Step 6: keys loaded at startup (+ those already expired) must equal the manifest's;
    the live key count may drift (clients write, keys expire) and is only a warning."""
    keys = sum(int(v.get("keys", 0)) for k, v in info.items()
               if k.startswith("db") and k[2:].isdigit() and isinstance(v, dict))
    seconds = round(time.monotonic() - started, 2)
    if "rdb_last_load_keys_loaded" not in info:  # Redis < 7.0
        if keys != expected:
            raise RestoreError(f"Redis has {keys} keys after the restart; the backup has "
                               f"{expected}")
        return Loaded(keys, None, 0, seconds)
    loaded = int(info["rdb_last_load_keys_loaded"])
    expired = int(info.get("rdb_last_load_keys_expired", 0))
    if loaded + expired != expected:
        if not exact and abs(loaded + expired - expected) <= drift_allowed(expected):
            # The manifest's count came from INFO a moment after the fork (several databases
            # on a busy server): a small difference is drift, not proof of a wrong load.
            log.warning("key_count_approximate", loaded=loaded, expired=expired,
                        manifest=expected, hint="the manifest's key count is approximate")
            return Loaded(keys, loaded, expired, seconds)
        raise RestoreError(f"Redis loaded {loaded} keys ({expired} already expired) after the "
                           f"restart; the backup's manifest says {expected}")
    if keys != loaded:
        log.warning("key_count_drift", loaded=loaded, now=keys,
                    hint="clients wrote or keys expired since the load")
    return Loaded(keys, loaded, expired, seconds)


# -- rollback ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolledBack:
    moved: bool
    started: bool
    keys: int | None


def roll_back(run: Run, start: bool) -> RolledBack:
    """Put the previous files back and Redis on them, from any journal state; removes the
    pre-restore dir when done. Used after a failed step and by `--rollback`."""
    log.info("rollback_started", state=run.journal.state, pre_restore_dir=str(run.pre_dir))
    if not needs_put_back(run):
        started = _ensure_running(run, start)
        _revert_config(run.link, run.journal)
        return _finish_rollback(run, moved=False, started=started)
    if run.controller.swap_while_running:
        return _roll_back_live(run)
    answers = run.link.answers()
    if answers or run.controller.is_running():
        if answers:
            _quiet_before_stop(run)
        _stop_for_rollback(run)
        checkpoints.reached("rollback-stopped")
    put_back(run)
    checkpoints.reached("rollback-put-back")
    started = False
    if run.journal.was_running or start:
        run.controller.start()
        wait_ready(run.link, "", run.cfg.start_timeout)
        started = True
    return _finish_rollback(run, moved=True, started=started)


def _roll_back_live(run: Run) -> RolledBack:
    """shutdown method: swap back while Redis runs, then SHUTDOWN NOSAVE NOW."""
    info = run.link.ready_info()
    if info is None:
        put_back(run)
        log.warning("rollback_redis_down", hint=run.controller.not_back_hint())
        return _finish_rollback(run, moved=True, started=False)
    if info.get("run_id") == run.journal.run_id_before:
        # Never shut down: memory still holds the previous data, which now matches the files.
        put_back(run)
        _revert_config(run.link, run.journal)
        return _finish_rollback(run, moved=True, started=True)
    quiesce(run.link, run.aof, run.save_timeout)
    put_back(run)
    run.controller.stop()
    wait_ready(run.link, str(info.get("run_id", "")), run.cfg.start_timeout)
    return _finish_rollback(run, moved=True, started=True)


def _quiet_before_stop(run: Run) -> None:
    """No save on the way down: it would only write the restored data again."""
    try:
        quiesce(run.link, run.aof, run.save_timeout, wait=False)
    except BackupdError as exc:
        log.warning("rollback_quiesce_failed", error=str(exc))


def _stop_for_rollback(run: Run) -> None:
    try:
        run.controller.stop()
    except BackupdError as exc:
        if run.link.answers() or run.controller.is_running():
            raise
        log.warning("rollback_stop_failed_but_down", error=str(exc))


def _ensure_running(run: Run, start: bool) -> bool:
    if run.link.answers():
        return True
    if not (run.journal.was_running or start):
        return False
    run.controller.start()
    wait_ready(run.link, "", run.cfg.start_timeout)
    return True


def _finish_rollback(run: Run, moved: bool, started: bool) -> RolledBack:
    keys = None
    if started:
        info = run.link.ready_info()
        keys = None if info is None else sum(
            int(v.get("keys", 0)) for k, v in info.items()
            if k.startswith("db") and k[2:].isdigit() and isinstance(v, dict))
        if keys is not None and run.journal.keys_before is not None \
                and keys != run.journal.keys_before:
            log.warning("rollback_key_count_differs", keys=keys, before=run.journal.keys_before)
    for staging in staging_dirs(run.data_dir):
        _remove_tree(staging)
    _remove_tree(run.pre_dir)
    fsync_dir(run.data_dir)
    log.info("rollback_done", moved=moved, started=started, keys=keys)
    return RolledBack(moved, started, keys)


# -- leftovers of interrupted restores --------------------------------------------------------


def interrupted(data_dir: Path) -> list[tuple[Path, Journal]]:
    found = []
    for pre in pre_dirs(data_dir):
        journal = Journal.load(pre)
        if journal.state != DONE:
            found.append((pre, journal))
    return found


def describe_interrupted(pre: Path, journal: Journal) -> str:
    text = (f"an interrupted restore of backup {journal.backup_id} (started "
            f"{journal.started_at}, method {journal.method}, stopped at step "
            f"'{journal.state}') left Redis's previous files in {pre}. To undo it and put the "
            "previous data back: `backupd restore --rollback`.")
    if journal.state in _AFTER_SWAP:
        text += (" The restored files are in place: once Redis runs with them and has loaded "
                 f"{journal.expected_keys} keys, the next `backupd restore` records the "
                 "restore as complete.")
    return text


def report_interrupted(config: Config) -> list[str]:
    """For `backupd run` and `backupd backup`: one error line per interrupted restore."""
    messages = [describe_interrupted(pre, journal)
                for pre, journal in interrupted(Path(config.redis.data_dir))]
    for message in messages:
        log.error("interrupted_restore", message=message)
    return messages


def settle_leftovers(data_dir: Path, link: RedisLink) -> None:
    """Before a new restore: complete a restore that in fact succeeded, refuse while one needs
    `--rollback`, and remove staging dirs of restores that never reached step 4."""
    for pre, journal in interrupted(data_dir):
        if journal.state in _AFTER_SWAP and _completed(link, journal):
            journal.advance(pre, DONE)
            log.warning("interrupted_restore_completed", backup=journal.backup_id,
                        pre_restore_dir=str(pre))
            continue
        raise RestoreError(describe_interrupted(pre, journal))
    for staging in staging_dirs(data_dir):
        log.warning("leftover_staging_removed", dir=str(staging),
                    reason="a restore stopped before changing anything")
        _remove_tree(staging)


def _completed(link: RedisLink, journal: Journal) -> bool:
    info = link.ready_info()
    if info is None or info.get("run_id") == journal.run_id_before:
        return False
    loaded = int(info.get("rdb_last_load_keys_loaded", -1))
    return loaded + int(info.get("rdb_last_load_keys_expired", 0)) == journal.expected_keys


def prune_pre_dirs(data_dir: Path, keep: Path) -> list[str]:
    """Keep the last pre-restore copy only; older completed ones are removed."""
    removed = []
    for pre in pre_dirs(data_dir):
        if pre != keep and Journal.load(pre).state == DONE:
            _remove_tree(pre)
            removed.append(pre.name)
    return removed


# -- the restore --------------------------------------------------------------------------------


@dataclass
class Context:
    config: Config
    opts: Options
    ui: Ui
    data_dir: Path
    link: RedisLink
    controller: Controller
    method: str


def _context(config: Config, opts: Options, ui: Ui, env: Mapping[str, str] | None) -> Context:
    method = opts.method or config.restore.method
    link = RedisLink(config.redis, env)
    controller = make_controller(method, config.restore, answers=link.answers,
                                 connect=link.connect)
    return Context(config, opts, ui, Path(config.redis.data_dir), link, controller, method)


def restore(config: Config, opts: Options, ui: Ui,
            env: Mapping[str, str] | None = None) -> int:
    """Run `backupd restore`; returns the exit code (0), raises BackupdError otherwise."""
    require_confirmation_possible(opts.yes, opts.dry_run, ui)
    ctx = _context(config, opts, ui, env)
    lock: contextlib.AbstractContextManager[None] = (
        contextlib.nullcontext() if opts.dry_run else backup_lock(Path(config.backup.dir)))
    with lock:
        if opts.dry_run:
            leftovers = [describe_interrupted(p, j) for p, j in interrupted(ctx.data_dir)]
        else:
            settle_leftovers(ctx.data_dir, ctx.link)
            leftovers = []
        selected = select_backup(config, opts.selector, opts.before, opts.source, env)
        identities = _identities(selected.manifest, opts.identity_file)
        prepared = _prepare(ctx, selected)
        if opts.dry_run:
            fetch_and_check(selected, None, identities, ui.progress)
            ui.echo(plan_text(ctx, selected, prepared, leftovers))
            return 0
        staged = stage(selected, prepared.target, ctx.data_dir, identities, prepared.owner,
                       ui.progress)
        checkpoints.reached("restore-staged")
        try:
            check_version(selected.manifest, staged.rdb_version, prepared.target,
                          ctx.controller, ctx.data_dir)
            if not opts.yes and not ui.confirm(prompt_text(ctx, selected, prepared)):
                raise RestoreError("restore cancelled; nothing was changed")
            _replace(ctx, selected, prepared, staged)
        finally:
            _remove_tree(staged.dir)
    return 0


@dataclass(frozen=True)
class Prepared:
    target: Target
    owner: Owner
    version_note: str
    snapshot: bool
    space: int


def _prepare(ctx: Context, selected: Selected) -> Prepared:
    """Step 2 and every check that needs no download; nothing changes here."""
    ctx.controller.check()
    target = inspect_target(ctx.link, ctx.controller, ctx.data_dir)
    check_target(target)
    if ctx.controller.swap_while_running and not target.answers:
        raise RestoreError("Redis is not answering, and the shutdown method needs a running "
                           "Redis to shut down; start Redis, or use --method command|docker")
    note = check_version(selected.manifest, selected.manifest.rdb_version, target,
                         ctx.controller, ctx.data_dir)
    _check_data_dir(ctx.data_dir, target)
    owner = data_owner(ctx.data_dir, target)
    check_owner_possible(owner)
    snapshot = target.answers and not target.aof
    space = check_space(ctx.data_dir, selected.manifest, target, snapshot)
    log.info("restore_step", step=2, what="target checked", redis=target.version or "down",
             keys=target.keys, aof=target.aof, method=ctx.method, version_check=note)
    return Prepared(target, owner, note, snapshot, space)


def _check_data_dir(data_dir: Path, target: Target) -> None:
    if not data_dir.is_dir():
        raise RestoreError(f"redis.data_dir {data_dir} is not a directory")
    if target.answers and target.aof and not (data_dir / target.aof_dir).is_dir():
        raise RestoreError(f"Redis has appendonly on, but {data_dir} has no {target.aof_dir}/: "
                           "is redis.data_dir the Redis data volume?")


def _replace(ctx: Context, selected: Selected, prepared: Prepared, staged: Staged) -> None:
    """Steps 4-7."""
    target = prepared.target
    if prepared.snapshot:
        _safety_snapshot(ctx)
        checkpoints.reached("restore-snapshot")
    keys_before, config_before = _current_state(ctx, target)
    pre_dir = new_pre_dir(ctx.data_dir)
    journal = Journal(
        backup_id=selected.manifest.id, started_at=mf.format_time(mf.now_utc()),
        method=ctx.method, state=QUIESCING, was_running=target.running,
        run_id_before=target.run_id, keys_before=keys_before,
        expected_keys=selected.manifest.keys,
        entries={name: os.path.lexists(ctx.data_dir / name) for name in staged.entries},
        config_before=config_before, pid=os.getpid())
    journal.save(pre_dir)
    run = Run(ctx.link, ctx.controller, ctx.config.restore, ctx.config.redis.save_timeout,
              ctx.data_dir, pre_dir, journal, target.aof)
    started = time.monotonic()
    should_start = target.running or ctx.opts.start
    try:
        _stop_and_swap(run, target, staged, should_start)
    except (BackupdError, OSError) as exc:
        _fail(ctx, run, selected, exc)
    if not should_start:
        _finish(ctx, run, selected, None)
        return
    try:
        info = wait_ready(ctx.link, target.run_id, ctx.config.restore.start_timeout)
        loaded = check_loaded(info, selected.manifest.keys, started,
                              selected.manifest.keys_exact)
    except BackupdError as exc:
        if ctx.controller.swap_while_running and ctx.link.ready_info() is None:
            raise RestoreError(_not_back_text(ctx, run, selected, exc)) from None
        _fail(ctx, run, selected, exc)
    _finish(ctx, run, selected, loaded)


def _safety_snapshot(ctx: Context) -> None:
    client = ctx.link.connect()
    try:
        with source.snapshot(client, ctx.config.redis, ctx.data_dir) as snap:
            log.info("restore_step", step=4, what="pre-restore BGSAVE", path=str(snap.path),
                     size=snap.size)
    finally:
        client.close()


def _current_state(ctx: Context, target: Target) -> tuple[int | None, dict[str, str]]:
    if not target.answers:
        return None, {}
    client = ctx.link.connect()
    try:
        with ctx.link.errors():
            return source.server_info(client, ctx.config.redis).keys, _read_config(
                client, target.aof)
    finally:
        client.close()


def _stop_and_swap(run: Run, target: Target, staged: Staged, should_start: bool) -> None:
    if target.answers:
        quiesce(run.link, target.aof, run.save_timeout)
    if run.controller.swap_while_running:
        swap_in(run, staged)
        run.journal.advance(run.pre_dir, RESTARTING)
        run.controller.stop()
        log.info("restore_step", step=6, what="SHUTDOWN NOSAVE NOW sent; waiting for restart")
        return
    if target.running:
        run.journal.advance(run.pre_dir, STOPPING)
        run.controller.stop()
        checkpoints.reached("restore-stopped")
        log.info("restore_step", step=4, what="Redis stopped", method=run.controller.name)
    swap_in(run, staged)
    if should_start:
        run.journal.advance(run.pre_dir, RESTARTING)
        run.controller.start()
        checkpoints.reached("restore-started")
        log.info("restore_step", step=6, what="Redis started; waiting for load")


def _fail(ctx: Context, run: Run, selected: Selected, cause: BaseException) -> NoReturn:
    reason = str(cause) if isinstance(cause, BackupdError) else f"{type(cause).__name__}: " \
        f"{getattr(cause, 'strerror', None) or cause}"
    log.error("restore_failed", backup=selected.manifest.id, error=reason,
              state=run.journal.state)
    try:
        result = roll_back(run, ctx.opts.start)
    except (BackupdError, OSError) as exc:
        raise RestoreError(
            f"restore of backup {selected.manifest.id} failed ({reason}) and the rollback "
            f"failed too ({exc}). Redis's previous files are in {run.pre_dir}; fix the cause "
            "and run `backupd restore --rollback`.") from None
    state = (f"Redis answers with {result.keys} keys" if result.started
             else "Redis was not running before and was left stopped")
    raise RestoreError(f"restore of backup {selected.manifest.id} failed: {reason}. It was "
                       f"rolled back: the previous files are back in place and the data is as "
                       f"before ({state}).")


def _not_back_text(ctx: Context, run: Run, selected: Selected, cause: BaseException) -> str:
    return (f"the files of backup {selected.manifest.id} are in place, but Redis did not come "
            f"back: {cause}. {ctx.controller.not_back_hint()}. The previous files are kept in "
            f"{run.pre_dir}; `backupd restore --rollback` puts them back.")


def _finish(ctx: Context, run: Run, selected: Selected, loaded: Loaded | None) -> None:
    run.journal.advance(run.pre_dir, DONE)
    removed = prune_pre_dirs(ctx.data_dir, run.pre_dir)
    m = selected.manifest
    if loaded is None:
        ctx.ui.echo(f"restored backup {m.id} into {ctx.data_dir}; Redis was not running and was "
                    "left stopped (use --start to start it): it loads the backup when started.")
    else:
        ctx.ui.echo(f"restored backup {m.id} ({m.created_at}) into Redis at {ctx.link.where}: "
                    f"{loaded.loaded if loaded.loaded is not None else loaded.keys} keys loaded, "
                    f"{loaded.keys} keys now; {loaded.seconds:g}s from stop to loaded.")
    ctx.ui.echo(f"the previous data is kept in {run.pre_dir} "
                "(`backupd restore --rollback` puts it back; delete it when no longer needed)")
    log.info("restore_done", backup=m.id, pre_restore_dir=str(run.pre_dir),
             removed_older=removed or None, keys=None if loaded is None else loaded.keys)


# -- texts ------------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def prompt_text(ctx: Context, selected: Selected, prepared: Prepared) -> str:
    m, t = selected.manifest, prepared.target
    now = f"{t.keys} keys now" if t.keys is not None else "not running"
    return (f"Replace ALL data of Redis at {ctx.link.where} ({now}) with backup {m.id} "
            f"(created {m.created_at}, {m.keys} keys, {_mib(m.raw_size)}, from "
            f"{selected.storage.name})? The current data is kept in {ctx.data_dir}/"
            f"{PRE_PREFIX}<time>.")


def plan_text(ctx: Context, selected: Selected, prepared: Prepared,
              leftovers: Sequence[str]) -> str:
    m, t, o = selected.manifest, prepared.target, prepared.owner
    stop = "SHUTDOWN NOSAVE NOW (after the swap)" if ctx.controller.swap_while_running \
        else f"stop Redis ({ctx.method})"
    files = t.dbfilename + (f", {t.aof_dir}/ ({t.aof_file}.1.base.rdb + "
                            f"{t.aof_file}.manifest)" if t.aof else "")
    start = ("restart policy starts Redis; wait for a new run_id" if
             ctx.controller.swap_while_running else
             "start Redis" if t.running or ctx.opts.start else
             "leave Redis stopped (it was not running; --start starts it)")
    lines = [
        "Restore plan (dry run: nothing was changed)",
        f"  backup   {m.id} [{selected.storage.name}] created {m.created_at}, {m.keys} keys, "
        f"RDB version {m.rdb_version}, {_mib(m.raw_size)} raw, {m.compression}, "
        f"{'encrypted' if m.encrypted else 'not encrypted'}",
        "           checked: stored SHA-256, decryption, decompression, RDB SHA-256, "
        "RDB header and CRC",
        f"  target   Redis at {ctx.link.where}: "
        + (f"{t.keys} keys, appendonly {'yes' if t.aof else 'no'}" if t.answers
           else "not answering") + f"; version check: {prepared.version_note}",
        f"  method   {ctx.controller.describe()}",
        f"  space    {_mib(prepared.space)} needed in {ctx.data_dir}",
        "  steps",
        f"    1. stage into {ctx.data_dir}/{STAGING_PREFIX}{m.id}/: {files}; owner "
        f"{o.uid}:{o.gid}, mode {o.file_mode:04o} (from {o.source})",
    ]
    if prepared.snapshot:
        lines.append("    2. BGSAVE the current data, so the pre-restore copy is current")
    lines += [
        '    3. CONFIG SET save ""' + (" and auto-aof-rewrite-percentage 0" if t.aof else "")
        + "; wait until no save or rewrite runs",
        f"    4. {stop}",
        f"    5. move {', '.join(t.entries)} aside into {ctx.data_dir}/{PRE_PREFIX}<time>/, "
        "rename the staged files in, fsync",
        f"    6. {start}; wait up to {ctx.config.restore.start_timeout:g}s for PING and "
        f"loading:0; check {m.keys} keys loaded",
        "    on failure in 4-6: put the previous files back and start Redis",
    ]
    lines += [f"  WARNING  {text}" for text in leftovers]
    return "\n".join(lines)


# -- backupd restore --rollback ---------------------------------------------------------------


def rollback(config: Config, opts: Options, ui: Ui,
             env: Mapping[str, str] | None = None) -> int:
    """Put back the files of the newest pre-restore copy (interrupted or completed restore)."""
    require_confirmation_possible(opts.yes, False, ui)
    ctx = _context(config, opts, ui, env)
    with backup_lock(Path(config.backup.dir)):
        found = pre_dirs(ctx.data_dir)
        if not found:
            # A restore killed before step 4 changed nothing but may have left its staging
            # copy (a whole RDB on Redis's data volume): remove it (we hold the lock that
            # every restore holds, so no restore is staging now).
            stale = staging_dirs(ctx.data_dir)
            for staging in stale:
                _remove_tree(staging)
            removed = f"; removed {len(stale)} leftover staging dir(s)" if stale else ""
            raise RestoreError(f"nothing to roll back: no {PRE_PREFIX}* directory with a "
                               f"restore journal in {ctx.data_dir}{removed}")
        pre = found[0]
        journal = Journal.load(pre)
        question = (f"Put back Redis's data from before the restore of backup "
                    f"{journal.backup_id} ({journal.started_at}, {pre})? The current data "
                    "of Redis is discarded.")
        if not opts.yes and not ui.confirm(question):
            raise RestoreError("rollback cancelled; nothing was changed")
        aof = len(journal.entries) > 1  # the RDB, plus the AOF dir when AOF was on
        run = Run(ctx.link, ctx.controller, config.restore, config.redis.save_timeout,
                  ctx.data_dir, pre, journal, aof)
        result = roll_back(run, opts.start)
    where = (f"Redis at {ctx.link.where} answers with {result.keys} keys" if result.started
             else "Redis is not running (it was not before the restore; --start starts it)")
    ui.echo(f"rolled back the restore of backup {journal.backup_id}: the previous files are "
            f"back in {ctx.data_dir}; {where}.")
    return 0


# -- backupd verify --drill -------------------------------------------------------------------


@dataclass(frozen=True)
class DrillResult:
    ok: bool
    exit_code: int
    message: str


def drill(config: Config, storage: Storage, manifest: Manifest, identities: Sequence[Any],
          scratch_parent: Path | None = None) -> DrillResult:
    """Load the backup into a throwaway redis-server and compare its key count."""
    from backupd.controllers.throwaway import server_version, throwaway_server

    binary = config.verify.redis_server
    version = server_version(binary)
    can_load = max_rdb_version(version)
    if manifest.rdb_version > can_load:
        return DrillResult(False, EXIT_FAILED, (
            f"cannot drill: {binary} is Redis {version}, older than this backup's RDB "
            f"(version {manifest.rdb_version}, {_writer(manifest.rdb_version)}; Redis "
            f"{version} loads up to {can_load}). Point verify.redis_server at a newer "
            "redis-server."))
    with tempfile.TemporaryDirectory(prefix=".backupd-drill-", dir=scratch_parent) as tmp:
        rdb = Path(tmp) / "dump.rdb"
        with open(rdb, "wb") as fh:
            fetch_and_check(Selected(storage, manifest, (storage.name,)), fh, identities,
                            sys.stderr.isatty())
        started = time.monotonic()
        with throwaway_server(binary, rdb, config.restore.start_timeout) as client:
            info: dict[str, Any] = client.info("everything")
        try:
            loaded = check_loaded(info, manifest.keys, started, manifest.keys_exact)
        except RestoreError as exc:
            return DrillResult(False, EXIT_INTEGRITY, f"drill failed: {exc}")
    count = loaded.loaded if loaded.loaded is not None else loaded.keys
    return DrillResult(True, EXIT_OK, (
        f"drill ok: redis-server {version} loaded {count} keys ({loaded.expired} already "
        f"expired) in {loaded.seconds:g}s; the manifest says {manifest.keys}"))
