"""Retention planning: which backups to keep, following restic's `forget --keep-*` policy.

Pure functions, no I/O: the caller lists backups, `plan` decides, the caller deletes. Keeping the
decision apart from the deletion makes it testable and printable as a dry run. The semantics are
restic's (internal/data/snapshot_policy.go) so that operators can reason with restic's docs; the
safety rails (empty policy keeps all, newest never deleted) are enforced here, not by callers.

Reason strings on kept decisions:
  "last", "hourly", "daily", "weekly", "monthly", "yearly"  kept by that rule;
  "oldest <rule>" (e.g. "oldest daily")  the oldest backup, kept because <rule> had count left;
  "within <span>" (e.g. "within 2d")  newer than keep_within before the anchor (see `plan`);
  "no policy"  the policy is empty, so nothing is deleted (restic refuses to forget then too);
  "newest"  the newest backup, kept as a safety rail when no rule matched it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backupd.config import RetentionConfig

# (rule, bucket key). A backup is kept by a rule when its key differs from the key of the backup
# that rule kept last. "last" keys on the position, so every backup is a new bucket for it.
_RULES: tuple[tuple[str, Callable[[datetime, int], int]], ...] = (
    ("last", lambda _d, nr: nr),
    ("hourly", lambda d, _nr: ((d.year * 100 + d.month) * 100 + d.day) * 100 + d.hour),
    ("daily", lambda d, _nr: (d.year * 100 + d.month) * 100 + d.day),
    ("weekly", lambda d, _nr: d.isocalendar().year * 100 + d.isocalendar().week),
    ("monthly", lambda d, _nr: d.year * 100 + d.month),
    ("yearly", lambda d, _nr: d.year),
)


@dataclass(frozen=True)
class Policy:
    """Counts per rule (0 = rule off) and an optional keep_within span (None or 0 = off)."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: timedelta | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and value < 0:
                raise ValueError(f"{f.name} must be >= 0, got {value}")
        if self.keep_within is not None and self.keep_within < timedelta(0):
            raise ValueError(f"keep_within must be >= 0, got {self.keep_within}")

    @property
    def empty(self) -> bool:
        """No rule set at all: `plan` then keeps everything rather than deleting everything."""
        return not self.keep_within and not any(getattr(self, f"keep_{n}") for n, _ in _RULES)

    @classmethod
    def from_config(cls, cfg: RetentionConfig) -> Policy:
        """Build from a RetentionConfig (or any object with the same attributes)."""
        within = cfg.keep_within
        return cls(
            keep_last=cfg.keep_last, keep_hourly=cfg.keep_hourly, keep_daily=cfg.keep_daily,
            keep_weekly=cfg.keep_weekly, keep_monthly=cfg.keep_monthly,
            keep_yearly=cfg.keep_yearly, keep_within=timedelta(seconds=within) if within else None,
        )


@dataclass(frozen=True)
class Decision:
    backup_id: str
    created: datetime  # timezone-aware UTC
    keep: bool
    reasons: tuple[str, ...]  # why kept; empty for a delete


def _utc(value: datetime, what: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what}: naive datetime {value.isoformat()}; need a timezone")
    return value.astimezone(UTC)


def _span(td: timedelta) -> str:
    seconds = td.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def plan(
    backups: Sequence[tuple[str, datetime]], policy: Policy, *, now: datetime | None = None
) -> list[Decision]:
    """Decide keep/delete for every backup; newest first, ties broken by id descending.

    Bucket keys are computed in UTC. keep_within is measured, as in restic, from the newest
    backup, not from the wall clock, so a daemon that stopped backing up does not age its last
    backups out. If `now` is given, backups dated after it are ignored when picking that anchor
    (restic does this with its clock, so a future-dated backup cannot push the window forward);
    `plan` itself never reads the clock, so the result depends only on its arguments.
    The oldest backup is kept ("oldest <rule>") when a rule still has count left, which keeps the
    longest history while the rules are not yet filled. Ids must be unique.
    """
    items = [(bid, _utc(created, f"backup {bid!r}")) for bid, created in backups]
    if len({bid for bid, _ in items}) != len(items):
        raise ValueError("duplicate backup ids")
    items.sort(key=lambda item: (item[1], item[0]), reverse=True)
    if policy.empty:
        return [Decision(bid, t, True, ("no policy",)) for bid, t in items]

    cutoff: datetime | None = None
    if policy.keep_within:
        limit = None if now is None else _utc(now, "now")
        anchors = [t for _, t in items if limit is None or t < limit]
        cutoff = anchors[0] - policy.keep_within if anchors else None  # None: keep all within
    counts = {name: int(getattr(policy, f"keep_{name}")) for name, _ in _RULES}
    previous: dict[str, int | None] = dict.fromkeys(counts)
    decisions: list[Decision] = []
    for nr, (bid, created) in enumerate(items):
        reasons: list[str] = []
        if policy.keep_within and (cutoff is None or created > cutoff):
            reasons.append(f"within {_span(policy.keep_within)}")
        oldest = nr == len(items) - 1
        for name, key in _RULES:
            if counts[name] <= 0:
                continue
            value = key(created, nr)
            if value != previous[name] or oldest:
                reasons.append(name if value != previous[name] else f"oldest {name}")
                previous[name] = value
                counts[name] -= 1
        if nr == 0 and not reasons:
            reasons.append("newest")
        decisions.append(Decision(bid, created, bool(reasons), tuple(reasons)))
    return decisions


def explain(decisions: Sequence[Decision]) -> dict[str, int]:
    """Counts for logs and metrics: {"keep": n, "delete": m}."""
    kept = sum(1 for d in decisions if d.keep)
    return {"keep": kept, "delete": len(decisions) - kept}


def keep_chain_bases(decisions: list[Decision], chain_ends: dict[str, datetime],
                     window: timedelta, now: datetime) -> list[Decision]:
    """Keep every base whose point-in-time chain reaches into the window (its newest segment
    is newer than now - window): deleting it would take the chain with it."""
    out = []
    for decision in decisions:
        end = chain_ends.get(decision.backup_id)
        if not decision.keep and end is not None and now - end <= window:
            decision = dataclasses.replace(
                decision, keep=True,
                reasons=(f"point-in-time base (pitr.window {_span(window)})",))
        out.append(decision)
    return out
