"""`backupd list --pitr`: the restorable windows, their gaps and why, per location.

Every segment is read and checked against its SHA-256 (a listing alone cannot see a corrupt
segment), so the windows shown are the ones a restore would accept."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from backupd import manifest as mf
from backupd.config import Config
from backupd.errors import StorageError
from backupd.pitr import windows
from backupd.pitr.rebuild import Found, find
from backupd.pitr.segments import SegmentMeta
from backupd.streams import CHUNK


def _t(second: int | None) -> str | None:
    return None if second is None else mf.format_time(datetime.fromtimestamp(second, UTC))


def checked_chains(found: Found) -> list[windows.Chain]:
    def check(meta: SegmentMeta) -> str:
        if found.sizes.get(meta.stem, -1) != meta.size:
            return f"stored size {found.sizes.get(meta.stem)}, its metadata says {meta.size}"
        hasher, size = hashlib.sha256(), 0
        try:
            with found.where[meta.stem].open_segment(meta) as fh:
                while chunk := fh.read(CHUNK):
                    hasher.update(chunk)
                    size += len(chunk)
        except StorageError as exc:
            return f"unreadable: {exc}"
        if size != meta.size or hasher.hexdigest() != meta.sha256:
            return "corrupt (its SHA-256 differs from its metadata)"
        return ""

    return windows.chains((b[0] for b in found.bases.values()), found.segments, check)


def windows_report(config: Config, location: str,
                   env: Mapping[str, str] | None = None) -> dict[str, Any]:
    found = find(config, None if location == "all" else location, env)
    chains = checked_chains(found)
    out: list[dict[str, Any]] = []
    previous: windows.Chain | None = None
    for chain in chains:
        between = None
        if previous is not None and previous.segments and chain.start is not None:
            last = previous.segments[-1]
            why = ("backlog lost: the master answered the partial resync with a full one"
                   if last.ended != "rotated" else "new chain")
            between = {"from": _t(last.last_time), "to": _t(chain.start), "why": why}
        out.append({
            "base": chain.base.id, "replid": chain.replid, "base_offset": chain.base_offset,
            "from": _t(chain.start), "to": _t(chain.end),
            "pieces": [{"from": _t(lo), "to": _t(hi)} for lo, hi in chain.pieces],
            "gaps": ([between] if between else []) + [
                {"from": _t(g.after), "to": _t(g.until), "why": g.why} for g in chain.gaps],
            "ends_because": chain.ends_because or None,
            "segments": len(chain.segments),
            "bytes": sum(s.size for s in chain.segments),
        })
        previous = chain
    known = {s.base for s in found.segments}
    orphans = sorted(known - {c.base.id for c in chains})
    return {"chains": out, "segments_without_base": orphans,
            "broken": found.broken}


def text(report: dict[str, Any]) -> list[str]:
    lines = []
    for chain in report["chains"]:
        lines.append(f"base {chain['base']} (offset {chain['base_offset']}): "
                     + (f"{chain['from']} .. {chain['to']}" if chain["from"] else
                        "no restorable time")
                     + f"  [{chain['segments']} segments, {chain['bytes']} bytes]")
        for gap in chain["gaps"]:
            lines.append(f"  gap  {gap['from']} .. {gap['to']}: {gap['why']}")
        if chain["ends_because"]:
            lines.append(f"  ends {chain['ends_because']}")
    for base in report["segments_without_base"]:
        lines.append(f"segments of base {base}: the base backup is gone, not restorable")
    for name, why in report["broken"].items():
        lines.append(f"broken {name}: {why}")
    return lines or ["(no point-in-time segments)"]
