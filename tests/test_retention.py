"""Tests for backupd.retention: restic's documented examples, edge cases, and property tests."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd.config import RetentionConfig
from backupd.retention import Decision, Policy, explain, plan

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
BUCKETS: dict[str, Callable[[datetime], object]] = {
    "hourly": lambda d: (d.year, d.month, d.day, d.hour),
    "daily": lambda d: d.date(),
    "weekly": lambda d: tuple(d.isocalendar())[:2],
    "monthly": lambda d: (d.year, d.month),
    "yearly": lambda d: d.year,
}


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, tzinfo=UTC)


def kept(decisions: list[Decision]) -> list[str]:
    return [d.backup_id for d in decisions if d.keep]


# --- restic's documented examples (doc/060_forget.rst, "Removing backup snapshots") ---------


def test_restic_doc_twelve_sundays_keep_daily_4() -> None:
    ids = ["0a1f9759", "46cfe4d5", "f6b1f037", "eb430a5d", "8cf1cb9a", "5d33b116",
           "b9553125", "e1a7b58b", "8f8018c0", "59403279", "dfee9fb4", "e1ae2f40"]
    backups = [(bid, utc(2019, 9, 1, 11) + timedelta(weeks=i)) for i, bid in enumerate(ids)]
    decisions = plan(backups, Policy(keep_daily=4))
    assert kept(decisions) == ["e1ae2f40", "dfee9fb4", "59403279", "8f8018c0"]
    assert all(d.reasons == ("daily",) for d in decisions if d.keep)
    assert explain(decisions) == {"keep": 4, "delete": 8}


def test_restic_doc_keep_last_1() -> None:
    backups = [("8c02b94b", utc(2017, 2, 21, 10, 48, 33)),
               ("4bba301e", utc(2017, 2, 21, 10, 49, 18))]
    decisions = plan(backups, Policy(keep_last=1))
    assert [(d.backup_id, d.keep, d.reasons) for d in decisions] == [
        ("4bba301e", True, ("last",)), ("8c02b94b", False, ())]


def test_restic_doc_daily_backups_for_100_years() -> None:
    start = utc(1925, 1, 1, 12)
    backups = [(f"b{i:05d}", start + timedelta(days=i)) for i in range(36525)]
    policy = Policy(keep_daily=7, keep_weekly=5, keep_monthly=12, keep_yearly=75)
    decisions = plan(backups, policy)
    per_rule = {r: sum(r in d.reasons for d in decisions) for r in RULES}
    assert per_rule == {"last": 0, "hourly": 0, "daily": 7, "weekly": 5, "monthly": 12,
                        "yearly": 75}
    # The docs estimate "7 daily + 4 weekly + 12 or 11 monthly + 75 or 74 yearly", counting
    # overlaps loosely. Exactly, for a history ending on Tuesday 2024-12-31: the weekly heads
    # Dec 31 and Dec 29 (a Sunday) are already dailies (3 new), the December head is the newest
    # (11 new), the 2024 head is the newest and 2023-12-31 is not a monthly (74 new).
    assert explain(decisions)["keep"] == 7 + 3 + 11 + 74
    weekly_only = [d.created.date().isoformat() for d in decisions if d.reasons == ("weekly",)]
    assert weekly_only == ["2024-12-22", "2024-12-15", "2024-12-08"]
    assert not any(r.startswith("oldest") for d in decisions for r in d.reasons)


# --- edge cases ------------------------------------------------------------------------------


def test_gap_in_daily_backups_still_keeps_seven_days() -> None:
    days = [d for d in range(20) if not 8 <= d < 13]  # a 5-day outage
    backups = [(f"d{d:02d}-{h}", utc(2024, 3, 1, h) + timedelta(days=d))
               for d in days for h in (1, 13)]
    decisions = plan(backups, Policy(keep_daily=7))
    kept_days = [d.created.date() for d in decisions if d.keep]
    assert len(kept_days) == len(set(kept_days)) == 7
    assert kept(decisions) == [f"d{d:02d}-13" for d in (19, 18, 17, 16, 15, 14, 13)]


def test_oldest_is_kept_while_a_rule_has_count_left() -> None:
    backups = [("a", utc(2024, 1, 1, 9)), ("b", utc(2024, 1, 1, 10)), ("c", utc(2024, 1, 2, 9))]
    assert [(d.backup_id, d.reasons) for d in plan(backups, Policy(keep_daily=5))] == [
        ("c", ("daily",)), ("b", ("daily",)), ("a", ("oldest daily",))]
    # count exhausted before the oldest: no bonus
    assert kept(plan(backups, Policy(keep_daily=2))) == ["c", "b"]


def test_keep_within_is_measured_from_newest_backup_not_the_clock() -> None:
    backups = [(f"b{i}", utc(2020, 1, 10) - timedelta(days=i)) for i in range(5)]
    decisions = plan(backups, Policy(keep_within=timedelta(days=2)))
    assert kept(decisions) == ["b0", "b1"]  # b2 is exactly 2d older: not "newer than"
    assert decisions[0].reasons == ("within 2d",)


def test_future_backup_does_not_move_the_within_window_when_now_given() -> None:
    backups = [("future", utc(2099, 1, 1)), ("b0", utc(2024, 1, 10)), ("b1", utc(2024, 1, 9)),
               ("old", utc(2023, 1, 1))]
    policy = Policy(keep_within=timedelta(days=3))
    assert kept(plan(backups, policy)) == ["future"]
    assert kept(plan(backups, policy, now=utc(2024, 1, 11))) == ["future", "b0", "b1"]
    assert kept(plan(backups, policy, now=utc(2000, 1, 1))) == ["future", "b0", "b1", "old"]


def test_buckets_are_utc() -> None:
    est = timezone(timedelta(hours=-5))
    backups = [("late-est", datetime(2024, 1, 1, 23, 30, tzinfo=est)),  # 2024-01-02 04:30 UTC
               ("early-utc", utc(2024, 1, 2, 1))]
    decisions = plan(backups, Policy(keep_daily=1))
    assert kept(decisions) == ["late-est"]
    assert decisions[0].created == utc(2024, 1, 2, 4, 30)
    assert decisions[0].created.tzinfo is UTC


def test_several_reasons_and_reason_strings() -> None:
    backups = [("x", utc(2024, 5, 5, 5)), ("y", utc(2024, 5, 5, 4))]
    policy = Policy(1, 1, 1, 1, 1, 1, timedelta(hours=36))
    assert plan(backups, policy)[0].reasons == (
        "within 36h", "last", "hourly", "daily", "weekly",
        "monthly", "yearly")
    assert plan(backups, policy)[1].reasons == ("within 36h",)


def test_empty_policy_keeps_everything() -> None:
    backups = [("a", utc(2024, 1, 1)), ("b", utc(2020, 1, 1))]
    for policy in (Policy(), Policy(keep_within=timedelta(0))):
        assert policy.empty
        assert [d.reasons for d in plan(backups, policy)] == [("no policy",), ("no policy",)]
    assert plan([], Policy()) == []
    assert plan([], Policy(keep_last=1)) == []


def test_naive_datetimes_are_rejected() -> None:
    with pytest.raises(ValueError, match="naive"):
        plan([("a", datetime(2024, 1, 1))], Policy(keep_last=1))
    with pytest.raises(ValueError, match="naive"):
        plan([("a", datetime(2024, 1, 1))], Policy())
    with pytest.raises(ValueError, match="naive"):
        plan([("a", utc(2024, 1, 1))], Policy(keep_within=timedelta(1)),
             now=datetime(2024, 1, 1))


def test_invalid_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        plan([("a", utc(2024, 1, 1)), ("a", utc(2024, 1, 2))], Policy(keep_last=1))
    with pytest.raises(ValueError, match="keep_daily"):
        Policy(keep_daily=-1)
    with pytest.raises(ValueError, match="keep_within"):
        Policy(keep_within=timedelta(seconds=-1))


def test_from_config() -> None:
    policy = Policy.from_config(RetentionConfig())
    assert policy == Policy(keep_last=24, keep_daily=7, keep_weekly=4, keep_monthly=6)
    duck = SimpleNamespace(keep_last=0, keep_hourly=2, keep_daily=0, keep_weekly=0,
                           keep_monthly=0, keep_yearly=1, keep_within=172800.0)
    assert Policy.from_config(duck) == Policy(  # type: ignore[arg-type]
        keep_hourly=2, keep_yearly=1, keep_within=timedelta(days=2))
    duck.keep_within = 0.0
    assert Policy.from_config(duck).keep_within is None  # type: ignore[arg-type]


def test_explain() -> None:
    decisions = plan([(str(i), utc(2024, 1, 1, i)) for i in range(5)], Policy(keep_last=2))
    assert explain(decisions) == {"keep": 2, "delete": 3}
    assert explain([]) == {"keep": 0, "delete": 0}


# --- property tests --------------------------------------------------------------------------

BASE = utc(2015, 6, 1)
ZONES = [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-7, minutes=-30))]


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, datetime]]:
    span = draw(st.sampled_from([600, 86400, 86400 * 60, 86400 * 365 * 6]))
    offsets = draw(st.lists(st.integers(0, span), max_size=60))
    offsets += draw(st.lists(st.sampled_from(offsets), max_size=10)) if offsets else []
    ids = draw(st.lists(st.text("0123456789abcdef", min_size=1, max_size=8),
                        min_size=len(offsets), max_size=len(offsets), unique=True))
    return [(bid, (BASE + timedelta(seconds=off)).astimezone(draw(st.sampled_from(ZONES))))
            for bid, off in zip(ids, offsets, strict=True)]


counts = st.integers(0, 6)
policies = st.builds(Policy, counts, counts, counts, counts, counts, counts,
                     st.none() | st.timedeltas(timedelta(0), timedelta(days=800)))
PROPS = settings(max_examples=300, deadline=None)


@PROPS
@given(histories(), policies)
def test_property_safety_rails(backups: list[tuple[str, datetime]], policy: Policy) -> None:
    decisions = plan(backups, policy)
    assert sorted(d.backup_id for d in decisions) == sorted(bid for bid, _ in backups)
    order = [(d.created, d.backup_id) for d in decisions]
    assert order == sorted(order, reverse=True)
    assert all(d.created.tzinfo is UTC for d in decisions)
    assert all(d.keep == bool(d.reasons) for d in decisions)
    if backups:
        assert decisions[0].keep
        newest = max(t for _, t in backups)
        assert decisions[0].created == newest
    if policy.empty:
        assert all(d.reasons == ("no policy",) for d in decisions)
    for rule in RULES:
        n = sum(1 for d in decisions for r in d.reasons if r in (rule, f"oldest {rule}"))
        assert n <= getattr(policy, f"keep_{rule}")


@PROPS
@given(histories(), policies, st.randoms(use_true_random=False))
def test_property_order_independent(
    backups: list[tuple[str, datetime]], policy: Policy, rnd: random.Random
) -> None:
    shuffled = list(backups)
    rnd.shuffle(shuffled)
    assert plan(shuffled, policy) == plan(backups, policy)


@PROPS
@given(histories(), policies)
def test_property_matches_bucket_model(
    backups: list[tuple[str, datetime]], policy: Policy
) -> None:
    """Each rule keeps the newest backup of its first `count` buckets, plus the oldest backup
    if buckets ran out first; keep_within keeps exactly what is newer than newest - span."""
    decisions = plan(backups, policy)
    if not decisions or policy.empty:
        return
    for rule in RULES:
        count = getattr(policy, f"keep_{rule}")
        heads: list[str] = []
        seen: set[object] = set()
        for d in decisions:
            key = BUCKETS[rule](d.created) if rule in BUCKETS else d.backup_id
            if key not in seen:
                seen.add(key)
                heads.append(d.backup_id)
        expected = set(heads[:count])
        oldest = decisions[-1].backup_id
        want_oldest = len(heads) < count and oldest not in expected
        assert {d.backup_id for d in decisions if rule in d.reasons} == expected
        got_oldest = {d.backup_id for d in decisions if f"oldest {rule}" in d.reasons}
        assert got_oldest == ({oldest} if want_oldest else set())
    if policy.keep_within:
        cutoff = decisions[0].created - policy.keep_within
        within = {d.backup_id for d in decisions if any(r.startswith("within") for r in d.reasons)}
        assert within == {d.backup_id for d in decisions if d.created > cutoff}
    assert all("newest" not in d.reasons for d in decisions[1:])
