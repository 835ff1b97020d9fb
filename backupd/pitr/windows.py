"""Which moments a chain (a base backup and the segments after it) can restore exactly.

A restore to T cuts the stream at the first stamp >= T: every command that reached backupd
before T is in, none after. That is the data at T when everything executed before T had
reached backupd by then, so a time is restorable only where the link was up and the
segments are contiguous from the base:

- a link down (or backupd restarted) between a segment's last stamp d and the next one's
  first stamp r: the writes executed meanwhile arrived at r, so T in (d, r] is not exact;
- an offset that does not follow on (a segment missing), a segment that is corrupt or unreadable:
  nothing after it can be replayed, the window ends at the segment before;
- the chain's first second (the RDB transfer) is left out for the same reason as a link down.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from backupd.manifest import Manifest
from backupd.pitr.segments import OPEN, ROTATED, SegmentMeta

GAP_REASONS = {"link down": "link down", "backupd restart": "backupd restarted",
               "backupd stopped": "backupd stopped"}


@dataclass(frozen=True)
class Gap:
    after: int  # unix seconds: the last exact moment before it
    until: int  # the first exact moment after it
    why: str


@dataclass
class Chain:
    base: Manifest
    segments: list[SegmentMeta] = field(default_factory=list)  # usable, in order
    pieces: list[tuple[int, int]] = field(default_factory=list)  # restorable [from, to]
    gaps: list[Gap] = field(default_factory=list)
    ends_because: str = ""  # why the chain stops where it does ("" = it is the live end)

    @property
    def replid(self) -> str:
        return str(self.base.replication.get("master_replid", ""))

    @property
    def base_offset(self) -> int:
        return int(self.base.replication.get("master_repl_offset", -1))

    def covers(self, moment: int) -> bool:
        return any(lo <= moment <= hi for lo, hi in self.pieces)

    @property
    def start(self) -> int | None:
        return self.pieces[0][0] if self.pieces else None

    @property
    def end(self) -> int | None:
        return self.pieces[-1][1] if self.pieces else None


def is_base(manifest: Manifest) -> bool:
    """A backup a chain can start from: a full sync with its exact replication offset."""
    facts = manifest.replication
    return bool(facts.get("repl_offset_exact")) and bool(facts.get("master_replid"))


def chains(bases: Iterable[Manifest], segments: Sequence[SegmentMeta],
           check: Callable[[SegmentMeta], str] | None = None) -> list[Chain]:
    """The chains of the segments, oldest base first. `check` says why a segment cannot be
    used ("" when it can): its stored size, or its SHA-256 when it is read."""
    by_base: dict[str, list[SegmentMeta]] = {}
    for seg in segments:
        by_base.setdefault(seg.base, []).append(seg)
    out = []
    for base in sorted((b for b in bases if b.id in by_base and is_base(b)),
                       key=lambda b: b.id):
        out.append(_chain(base, sorted(by_base[base.id], key=lambda s: s.first_offset), check))
    return out


def _chain(base: Manifest, segs: list[SegmentMeta],
           check: Callable[[SegmentMeta], str] | None) -> Chain:
    chain = Chain(base)
    expected = chain.base_offset + 1
    lo: int | None = None
    hi = 0
    previous: SegmentMeta | None = None
    for seg in segs:
        if seg.first_offset != expected:
            chain.ends_because = (f"segment missing: offsets {expected}.."
                                  f"{seg.first_offset - 1} are in no segment")
            break
        problem = check(seg) if check is not None else ""
        if problem:
            chain.ends_because = f"segment {seg.stem} unusable: {problem}"
            break
        if lo is None:
            lo = seg.first_time + 1
        elif previous is not None and not _continues(previous, seg) and seg.first_time > hi:
            why = GAP_REASONS.get(previous.ended, previous.ended)
            chain.gaps.append(Gap(hi, seg.first_time + 1, why))
            if lo <= hi:
                chain.pieces.append((lo, hi))
            lo = seg.first_time + 1
        hi = seg.last_time
        chain.segments.append(seg)
        expected = seg.last_offset + 1
        previous = seg
    if lo is not None and lo <= hi:
        chain.pieces.append((lo, hi))
    return chain


def _continues(previous: SegmentMeta, seg: SegmentMeta) -> bool:
    """No gap between them: a rotation, or the next uploaded piece of the same open segment."""
    return previous.ended == ROTATED or (
        previous.ended == seg.ended == OPEN and bool(seg.segment)
        and seg.segment == previous.segment)


def pick(found: Sequence[Chain], moment: int) -> Chain | None:
    """The newest chain that restores `moment` exactly."""
    for chain in reversed(found):
        if chain.covers(moment):
            return chain
    return None


def needed(chain: Chain, moment: int) -> list[SegmentMeta]:
    """The segments from the base up to the one holding the first stamp >= moment."""
    out = []
    for seg in chain.segments:
        out.append(seg)
        if seg.last_time >= moment:
            break
    return out
