"""`backupd verify`: prove a stored backup is intact, as far as the given keys allow."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

from backupd.errors import IntegrityError, StorageError
from backupd.manifest import Manifest
from backupd.pipeline import Digester, unpack
from backupd.servers import ServerId, from_version_output
from backupd.storage.base import Storage
from backupd.streams import ObservedWriter, copy_stream

log = structlog.get_logger("backupd.verify")
CHECK_TIMEOUT = 600.0


@dataclass
class Outcome:
    backup_id: str
    location: str
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(storage: Storage, manifest: Manifest, *, identities: Sequence[Any] = (),
           deep: bool = False, redis_check_rdb: str = "redis-check-rdb",
           scratch_dir: Path | None = None) -> Outcome:
    """Recompute every checksum the keys allow; `deep` also runs redis-check-rdb. A cluster
    backup is verified shard by shard: one bad shard makes the whole backup bad."""
    if manifest.cluster is not None:
        whole = Outcome(manifest.id, storage.name)
        for index, part in enumerate(manifest.parts()):
            one = verify(storage, part, identities=identities, deep=deep,
                         redis_check_rdb=redis_check_rdb, scratch_dir=scratch_dir)
            whole.problems += [f"shard {index} ({part.artifact}): {p}" for p in one.problems]
            whole.checked += [c for c in one.checked if c not in whole.checked]
            whole.notes += [n for n in one.notes if n not in whole.notes]
        return whole
    outcome = Outcome(manifest.id, storage.name)
    can_unpack = not manifest.encrypted or bool(identities)
    try:
        with storage.open_artifact(manifest) as stored:
            if not can_unpack:
                counter = Digester()
                copy_stream(stored, ObservedWriter(None, counter))
                _compare(outcome, "stored", (counter.size, counter.digest().sha256),
                         (manifest.stored_size, manifest.stored_sha256))
                outcome.notes.append("encrypted: RDB CRC not checked (give --identity-file)")
                return outcome
            with _scratch(deep, scratch_dir) as sink:
                result = unpack(stored, sink, compression=manifest.compression,
                                encrypted=manifest.encrypted, identities=identities)
                _compare(outcome, "stored", (result.stored.size, result.stored.sha256),
                         (manifest.stored_size, manifest.stored_sha256))
                _compare(outcome, "raw", (result.raw.size, result.raw.sha256),
                         (manifest.raw_size, manifest.raw_sha256))
                if result.rdb.version != manifest.rdb_version:
                    outcome.problems.append(f"RDB version {result.rdb.version} differs from the "
                                            f"manifest's {manifest.rdb_version}")
                outcome.checked.append(f"rdb-crc:{result.rdb.checksum}")
                if deep and sink is not None and outcome.ok:
                    sink.flush()
                    _check_rdb(outcome, Path(sink.name), manifest.rdb_version, redis_check_rdb,
                               result.rdb.writer)
    except IntegrityError as exc:
        outcome.problems.append(str(exc))
    except StorageError as exc:
        outcome.problems.append(f"cannot read the artifact: {exc}")
    return outcome


def _compare(outcome: Outcome, what: str, got: tuple[int, str], want: tuple[int, str]) -> None:
    outcome.checked.append(f"{what}-sha256")
    if got != want:
        outcome.problems.append(f"{what} SHA-256/size mismatch: manifest says {want[1][:12]}… "
                                f"({want[0]} bytes), got {got[1][:12]}… ({got[0]} bytes)")


@contextlib.contextmanager
def _scratch(wanted: bool, directory: Path | None) -> Iterator[IO[bytes] | None]:
    """A temp file for the raw RDB when redis-check-rdb needs one; nothing otherwise."""
    if not wanted:
        yield None
        return
    with tempfile.NamedTemporaryFile(prefix=".backupd-verify-", suffix=".rdb",
                                     dir=directory) as fh:
        yield fh


def _check_rdb(outcome: Outcome, path: Path, rdb_version: int, tool: str,
               writer: ServerId | None) -> None:
    """Run redis-check-rdb, when it exists and can read this RDB version."""
    try:
        version_text = subprocess.run([tool, "--version"], capture_output=True, text=True,
                                      timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        outcome.notes.append(f"deep check skipped: {tool} is not available")
        return
    checker = from_version_output(version_text)
    if checker is not None and not checker.can_load(rdb_version):
        written = f" (written by {writer.label})" if writer else ""
        outcome.notes.append(f"deep check skipped: {tool} is {checker.label}, which cannot "
                             f"read RDB version {rdb_version}{written}; point "
                             "verify.redis_check_rdb at the production server's check tool")
        return
    try:
        proc = subprocess.run([tool, str(path)], capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        outcome.problems.append(f"{tool} did not finish within {CHECK_TIMEOUT:g}s")
        return
    outcome.checked.append("redis-check-rdb")
    if proc.returncode != 0:
        last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        outcome.problems.append(f"{tool} failed: {last}")
