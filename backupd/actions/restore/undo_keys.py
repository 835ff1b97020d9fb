"""The safety record of a selective restore: the live values it replaced (DUMP payloads with
their absolute expiry) and the keys it created, so `restore --undo-keys RUN` puts the live
server back as it was before that run.

One JSON line per record under `<backup.dir>/.backupd-undo/<run>.jsonl` (dir 0700, file 0600),
written atomically: the replaced values before the first write, the created keys after the
last one (a run killed in between leaves the values it replaced, which is what matters).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backupd import manifest as mf
from backupd.errors import RestoreError, UsageError
from backupd.fsio import atomic_file

UNDO_DIR = ".backupd-undo"
SUFFIX = ".jsonl"
FORMAT = 1


@dataclass(frozen=True)
class Record:
    op: str  # "put" (a replaced value to put back) or "del" (a key the run created)
    db: int
    key: bytes
    payload: bytes = b""
    expire_at: int = 0  # absolute unix ms, 0 = none


def undo_dir(backup_dir: Path) -> Path:
    return backup_dir / UNDO_DIR


def undo_path(backup_dir: Path, run: str) -> Path:
    if not mf.is_valid_id(run):
        raise UsageError(f"{run!r} is not a selective-restore run id (YYYYMMDDTHHMMSSZ-xxxxxx, "
                         "printed by `restore --keys`)")
    return undo_dir(backup_dir) / f"{run}{SUFFIX}"


def _line(record: Record) -> bytes:
    data: dict[str, Any] = {"op": record.op, "db": record.db,
                            "key": base64.b64encode(record.key).decode()}
    if record.op == "put":
        data["payload"] = base64.b64encode(record.payload).decode()
        data["expire_at"] = record.expire_at
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


def write(path: Path, header: dict[str, Any], records: Iterable[Record],
          keep: Path | None = None) -> None:
    """Atomically (temp in the same dir, fsync, rename) write the header and records, after
    the records of `keep` (an earlier version of this file) when given."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    with atomic_file(path) as raw:
        fh = io.BufferedWriter(raw, 1 << 20)  # one record a line: write them in large pieces
        if keep is not None:
            with open(keep, "rb") as old:
                shutil.copyfileobj(old, fh, 1 << 20)
        else:
            fh.write(json.dumps({"format": FORMAT, **header}).encode() + b"\n")
        for record in records:
            fh.write(_line(record))
        fh.flush()
        fh.detach()  # atomic_file fsyncs and closes the file itself


def read(path: Path) -> tuple[dict[str, Any], Iterator[Record]]:
    """The header, and the records streamed (the file may hold many replaced values)."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the generator
    except FileNotFoundError:
        runs = sorted(p.name[: -len(SUFFIX)] for p in path.parent.glob(f"*{SUFFIX}"))
        raise UsageError(f"no undo record {path.name} in {path.parent}; runs there: "
                         f"{', '.join(runs[-5:]) or 'none'}") from None
    try:
        header = json.loads(fh.readline())
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError("not an undo record of this backupd")
    except ValueError as exc:
        fh.close()
        raise RestoreError(f"{path} is not a readable undo record: {exc}") from None

    def records() -> Iterator[Record]:
        with fh:
            for number, line in enumerate(fh, start=2):
                try:
                    data = json.loads(line)
                    yield Record(data["op"], int(data["db"]), base64.b64decode(data["key"]),
                                 base64.b64decode(data.get("payload", "")),
                                 int(data.get("expire_at", 0)))
                except (ValueError, KeyError, TypeError):
                    raise RestoreError(f"{path} line {number} is damaged; nothing after it "
                                       "was undone") from None

    return header, records()
