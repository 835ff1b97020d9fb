"""When the daemon runs: crontab and `every` settings turned into APScheduler triggers.

Why a translation layer: APScheduler 3.x numbers weekdays from Monday = 0, while every crontab
an operator has ever written means 0 (and 7) = Sunday; passed through, `0 3 * * 0` would back up
on Mondays. Numeric weekdays (values, ranges, lists, steps) are therefore expanded here into
APScheduler's weekday *names*, which are unambiguous. Crontab also ORs a restricted day-of-month
with a restricted day-of-week (`0 0 1 * 1` = the 1st and every Monday), where APScheduler ANDs
them; that case becomes an OrTrigger of two cron triggers.

Every validation error is a ConfigError naming the key (`schedule.cron`, ...), so `backupd run`
exits 2 at start-up instead of failing at the first scheduled time.
"""

from __future__ import annotations

import math
import zoneinfo
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Any

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from backupd.config import Config, ScheduleConfig
from backupd.errors import ConfigError

# Index = crontab number (0 = Sunday); the names are what APScheduler understands unambiguously.
CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_APS_ORDER = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DEFAULT_CRON = ScheduleConfig().cron
MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
FIELDS = ("minute", "hour", "day", "month", "day_of_week")


class CronSyntaxError(ValueError):
    """A crontab expression is malformed; the message says which part and why."""


def _day_number(token: str) -> int:
    name = token.lower()
    if name in CRON_DAYS:
        return CRON_DAYS.index(name)
    if not token.isdigit() or not 0 <= int(token) <= 7:
        raise CronSyntaxError(f"day-of-week {token!r}: expected 0-7 (0 and 7 = Sunday) or "
                              "a name such as mon")
    return int(token) % 7


def weekdays(expr: str) -> set[int]:
    """The crontab day-of-week field as a set of days, 0 = Sunday (`1-5`, `0,6`, `*/2`...)."""
    days: set[int] = set()
    for part in expr.split(","):
        if not part:
            raise CronSyntaxError(f"day-of-week {expr!r}: empty list element")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronSyntaxError(f"day-of-week {part!r}: the step must be a number >= 1")
            step = int(step_text)
        if base == "*":
            first, last = 0, 6
        elif "-" in base:
            low, _, high = base.partition("-")
            first, last = _day_number(low), _day_number(high)
            if high == "7" or (high.lower() == "sun" and first > 0):
                last = 7  # Sunday as the upper bound: `5-7` is Friday to Sunday, `0-7` all week
            if first > last:
                raise CronSyntaxError(f"day-of-week {part!r}: the range must go upwards")
        else:
            first = _day_number(base)
            last = 6 if slash else first  # `1/2` means from Monday on, every other day
        days.update(day % 7 for day in range(first, last + 1, step))
    return days


def translate_day_of_week(expr: str) -> str:
    """A crontab day-of-week field as an APScheduler `day_of_week` value (names, never numbers)."""
    if expr == "*":
        return "*"
    days = weekdays(expr)
    if len(days) == 7:
        return "*"
    return ",".join(name for name in _APS_ORDER if CRON_DAYS.index(name) in days)


def _split(expr: str) -> list[str]:
    parts = MACROS.get(expr.strip().lower(), expr).split()
    if len(parts) != 5:
        raise CronSyntaxError(f"expected 5 fields (minute hour day-of-month month day-of-week) "
                              f"or a macro such as @daily, got {len(parts)} fields")
    return parts


def crontab_fields(expr: str) -> dict[str, str]:
    """Split a 5-field crontab (or an @macro) into CronTrigger keyword values, weekdays named."""
    parts = _split(expr)
    fields = dict(zip(FIELDS, parts, strict=True))
    fields["day_of_week"] = translate_day_of_week(parts[4])
    return fields


def cron_trigger(expr: str, timezone: tzinfo, jitter: int | None = None) -> BaseTrigger:
    """A trigger with crontab semantics, including the day-of-month OR day-of-week rule."""
    fields = crontab_fields(expr)
    raw_dom, raw_dow = _split(expr)[2], _split(expr)[4]
    try:
        # Vixie cron: when neither day field starts with `*`, a day matching either one fires.
        if not raw_dom.startswith("*") and not raw_dow.startswith("*"):
            by_date = CronTrigger(**{**fields, "day_of_week": "*"}, timezone=timezone)
            by_weekday = CronTrigger(**{**fields, "day": "*"}, timezone=timezone)
            return OrTrigger([by_date, by_weekday], jitter=jitter)
        return CronTrigger(**fields, timezone=timezone, jitter=jitter)
    except ValueError as exc:
        raise CronSyntaxError(str(exc)) from None


def parse_timezone(name: str) -> tzinfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"key 'schedule.timezone': expected an IANA time zone such as 'UTC' "
                          f"or 'Europe/Berlin', got {name!r}") from None


@dataclass(frozen=True)
class Plan:
    """The validated schedule: what the daemon hands to APScheduler."""

    timezone: tzinfo
    backup: BaseTrigger
    backup_text: str  # for logs: "cron '0 * * * *' in UTC" / "every 15m"
    drill: BaseTrigger | None
    misfire_grace: int
    shutdown_grace: float


def plan(config: Config) -> Plan:
    """Validate the [schedule] section and build the triggers; raises ConfigError naming the key."""
    s = config.schedule
    tz = parse_timezone(s.timezone)
    jitter = math.ceil(s.jitter) or None
    if s.misfire_grace <= 0:
        raise ConfigError("key 'schedule.misfire_grace': expected a duration > 0 such as '10m' "
                          "(a late run within this grace still runs)")
    trigger: BaseTrigger
    if s.every is not None:
        if s.cron.strip() and s.cron.strip() != DEFAULT_CRON:
            raise ConfigError("keys 'schedule.cron' and 'schedule.every' are both set: choose "
                              "one (set cron = \"\" to use every)")
        trigger = IntervalTrigger(seconds=s.every, timezone=tz, jitter=jitter)
        text = f"every {s.every:g}s"
    else:
        if not s.cron.strip():
            raise ConfigError("key 'schedule.cron': expected a crontab such as '0 * * * *' "
                              "(or set schedule.every)")
        trigger = _cron_or_error("schedule.cron", s.cron, tz, jitter)
        text = f"cron {s.cron!r} in {s.timezone}"
    drill = _cron_or_error("schedule.drill", s.drill, tz, None) if s.drill.strip() else None
    return Plan(tz, trigger, text, drill, math.ceil(s.misfire_grace), s.shutdown_grace)


def _cron_or_error(key: str, expr: str, tz: tzinfo, jitter: int | None) -> BaseTrigger:
    try:
        return cron_trigger(expr, tz, jitter)
    except CronSyntaxError as exc:
        raise ConfigError(f"key {key!r}: {exc} (got {expr!r})") from None


def longest_gap(trigger: BaseTrigger, start: datetime, samples: int = 12) -> timedelta:
    """The longest time between consecutive fire times (jitter aside), to sanity-check max_age."""
    previous: Any = None
    moment = start
    gap = timedelta(0)
    for _ in range(samples):
        fire = trigger.get_next_fire_time(previous, moment)
        if fire is None:
            break
        if previous is not None:
            gap = max(gap, fire - previous)
        previous, moment = fire, fire + timedelta(microseconds=1)
    return gap
