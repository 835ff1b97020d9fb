"""Crontab semantics on top of APScheduler, checked with the trigger's own get_next_fire_time."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd.config import Config, ScheduleConfig
from backupd.errors import ConfigError
from backupd.schedule import (
    CronSyntaxError,
    cron_trigger,
    crontab_fields,
    longest_gap,
    plan,
    translate_day_of_week,
    weekdays,
)

WEDNESDAY = datetime(2026, 1, 7, 12, 0, tzinfo=UTC)  # 2026-01-11 is a Sunday


def fires(trigger: BaseTrigger, start: datetime, n: int) -> list[datetime]:
    out: list[datetime] = []
    previous = None
    now = start
    for _ in range(n):
        fire = trigger.get_next_fire_time(previous, now)
        assert fire is not None
        out.append(fire)
        previous, now = fire, fire + timedelta(microseconds=1)
    return out


def cron_weekday(moment: datetime) -> int:
    """0 = Sunday, as crontab counts."""
    return (moment.weekday() + 1) % 7


@pytest.mark.parametrize(("expr", "expected"), [
    ("*", "*"),
    ("0", "sun"),
    ("7", "sun"),
    ("1-5", "mon,tue,wed,thu,fri"),
    ("0,6", "sat,sun"),
    ("6,7", "sat,sun"),
    ("*/2", "tue,thu,sat,sun"),  # 0,2,4,6 in crontab; APScheduler would read mon,wed,fri,sun
    ("1-5/2", "mon,wed,fri"),
    ("1/2", "mon,wed,fri"),
    ("5-7", "fri,sat,sun"),
    ("0-7", "*"),
    ("mon-fri", "mon,tue,wed,thu,fri"),
    ("SUN,3", "wed,sun"),
])
def test_weekday_translation(expr: str, expected: str) -> None:
    assert translate_day_of_week(expr) == expected


@pytest.mark.parametrize("expr", ["8", "-1", "5-1", "*/0", "1,,2", "x", "mon-", "1-5/x"])
def test_bad_weekdays_are_rejected(expr: str) -> None:
    with pytest.raises(CronSyntaxError):
        weekdays(expr)


@pytest.mark.parametrize(("expr", "first"), [
    ("0 3 * * 0", datetime(2026, 1, 11, 3, 0, tzinfo=UTC)),  # Sunday, not Monday
    ("0 3 * * 7", datetime(2026, 1, 11, 3, 0, tzinfo=UTC)),
    ("0 3 * * 1", datetime(2026, 1, 12, 3, 0, tzinfo=UTC)),
    ("30 2 * * 1-5", datetime(2026, 1, 8, 2, 30, tzinfo=UTC)),  # Thursday
    ("0 3 * * 6,0", datetime(2026, 1, 10, 3, 0, tzinfo=UTC)),  # Saturday
    ("@weekly", datetime(2026, 1, 11, 0, 0, tzinfo=UTC)),
    ("@daily", datetime(2026, 1, 8, 0, 0, tzinfo=UTC)),
    ("*/15 * * * *", datetime(2026, 1, 7, 12, 0, tzinfo=UTC)),  # "now" itself is due
])
def test_next_fire_time_follows_crontab(expr: str, first: datetime) -> None:
    assert fires(cron_trigger(expr, UTC), WEDNESDAY, 1) == [first]


def test_weekday_range_fires_only_on_those_days() -> None:
    got = fires(cron_trigger("0 3 * * 1-5", UTC), WEDNESDAY, 10)
    assert {cron_weekday(f) for f in got} == {1, 2, 3, 4, 5}


@settings(max_examples=40, deadline=None)
@given(st.sets(st.integers(min_value=0, max_value=7), min_size=1))
def test_any_weekday_list_fires_on_exactly_those_days(days: set[int]) -> None:
    expr = "0 3 * * " + ",".join(str(d) for d in sorted(days))
    got = fires(cron_trigger(expr, UTC), WEDNESDAY, 14)
    assert {cron_weekday(f) for f in got} == {d % 7 for d in days}


def test_day_of_month_and_weekday_are_ored_like_cron() -> None:
    # `0 0 1 * 1`: the 1st of the month *or* any Monday (APScheduler alone would AND them).
    got = fires(cron_trigger("0 0 1 * 1", UTC), datetime(2026, 1, 27, tzinfo=UTC), 3)
    assert got == [datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 2, 2, tzinfo=UTC),
                   datetime(2026, 2, 9, tzinfo=UTC)]
    # A `*`-prefixed day field keeps AND semantics, as in Vixie cron: odd days that are Mondays.
    anded = fires(cron_trigger("0 0 */2 * 1", UTC), datetime(2026, 1, 1, tzinfo=UTC), 2)
    assert all(f.day % 2 == 1 and f.weekday() == 0 for f in anded)


def test_timezone_applies() -> None:
    got = fires(cron_trigger("0 3 * * *", ZoneInfo("Europe/Berlin")), WEDNESDAY, 1)[0]
    assert got.astimezone(UTC) == datetime(2026, 1, 8, 2, 0, tzinfo=UTC)


def test_fields_are_passed_through_except_weekday() -> None:
    assert crontab_fields("5 4 1-10 jan-mar 0") == {
        "minute": "5", "hour": "4", "day": "1-10", "month": "jan-mar", "day_of_week": "sun"}


def config(**schedule: object) -> Config:
    return dataclasses.replace(Config(), schedule=ScheduleConfig(**schedule))  # type: ignore[arg-type]


def test_plan_builds_interval_trigger_for_every_with_jitter() -> None:
    p = plan(config(cron="", every=90.0, jitter=5.0))
    assert isinstance(p.backup, IntervalTrigger)
    assert p.backup.interval == timedelta(seconds=90)
    assert p.backup.jitter == 5
    assert p.misfire_grace == 600
    assert p.drill is None


def test_plan_builds_drill_and_cron_jitter() -> None:
    p = plan(config(cron="0 3 * * 0", jitter=30.0, drill="0 5 * * 0", timezone="Europe/Berlin"))
    assert getattr(p.backup, "jitter", None) == 30
    assert p.drill is not None
    first = fires(p.drill, WEDNESDAY, 1)[0]
    assert first.astimezone(UTC) == datetime(2026, 1, 11, 4, 0, tzinfo=UTC)


@pytest.mark.parametrize(("schedule", "key"), [
    ({"cron": "0 3 * * 8"}, "schedule.cron"),
    ({"cron": "61 * * * *"}, "schedule.cron"),
    ({"cron": "* * *"}, "schedule.cron"),
    ({"cron": ""}, "schedule.cron"),
    ({"timezone": "Mars/Olympus_Mons"}, "schedule.timezone"),
    ({"cron": "*/5 * * * *", "every": 60.0}, "schedule.every"),
    ({"drill": "every sunday"}, "schedule.drill"),
    ({"misfire_grace": 0.0}, "schedule.misfire_grace"),
])
def test_bad_schedule_is_a_config_error_naming_the_key(schedule: dict[str, object],
                                                        key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        plan(config(**schedule))


def test_longest_gap() -> None:
    assert longest_gap(cron_trigger("0 3 * * 1-5", UTC), WEDNESDAY) == timedelta(days=3)
    assert longest_gap(cron_trigger("0 * * * *", UTC), WEDNESDAY) == timedelta(hours=1)
