"""Config fuzzing: random TOML values (and env overrides) for every key of the schema, through
`backupd -c FILE config check` (the click command, in-process). Never a traceback: exit 0 for a
configuration that is valid (with finite, non-negative durations), else exit 2 with a message
that names the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupd import config as config_mod
from tests.conftest import RedisServer, s3_section, write_config
from tests.faults import harness
from tests.faults.harness import STATS, Bucket, cli_fast


def schema(cls: type[Any] = config_mod.Config, prefix: str = "") -> dict[str, Any]:
    """dotted key -> dataclass field, for every leaf of the configuration."""
    found: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        if isinstance(f.default_factory, type):
            found.update(schema(f.default_factory, f"{prefix}{f.name}."))
        else:
            found[prefix + f.name] = f
    return found


KEYS = schema()
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in KEYS if "." in k})
DURATIONS = sorted(k for k, f in KEYS.items() if f.metadata.get("kind") == "duration")

TRICKY_TEXT = ["", " ", "0", "-1", "1e9", "1e400", "nan", "inf", "15m\n", "15 m", "1.5.5h",
               "99999999999999999999999d", "9" * 400 + "s", "-5m", "0s", "²", "٣", "h:²",
               "0.0.0.0:٣", "[::1]:70000", ":", "host:", "http://h:99999999/x", "ftp://x",
               "file:///etc/passwd", "https://u:p@h/x",
               "* * * * *", "61 * * * *", "@reboot", "0 0 31 2 *", "*/0 * * * *",
               "Mars/Olympus", "UTC", "../../etc", "\x00", "\u202e", "zstd", "GOVERNANCE",
               "age1notakey", "redis/prod", "/abs/", "redis/prod/"]

scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 65535, 65536, 2**31, 2**63 - 1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=30),
    st.sampled_from(TRICKY_TEXT),
    st.datetimes(timezones=st.just(UTC)),
)
values = st.one_of(scalars, st.lists(scalars, max_size=4),
                   st.dictionaries(st.sampled_from(["a", "b", "bucket"]), scalars, max_size=2))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        out = ['"']
        for ch in value:
            if ch in '"\\':
                out.append("\\" + ch)
            elif ord(ch) < 0x20 or ch == "\x7f":
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return "".join(out) + '"'
    if isinstance(value, datetime):
        return f"{value.year:04d}-" + value.strftime("%m-%dT%H:%M:%SZ")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)  # pragma: no cover


def toml(settings_: dict[str, Any]) -> str:
    """Dotted keys to a TOML document (sections as tables)."""
    tables: dict[str, list[str]] = {}
    top: list[str] = []
    for dotted, value in settings_.items():
        section, _, key = dotted.rpartition(".")
        (tables.setdefault(section, []) if section else top).append(
            f"{key} = {toml_value(value)}")
    lines = top[:]
    for section, entries in tables.items():
        lines += [f"[{section}]", *entries]
    return "\n".join(lines) + "\n"


def check(text: str, named: list[str], env: dict[str, str] | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="backupd-fuzz-") as tmp:
        path = Path(tmp) / "c.toml"
        path.write_text(text, encoding="utf-8")
        base = {"BACKUPD_BACKUP__DIR": str(Path(tmp) / "b"),
                "BACKUPD_REDIS__DATA_DIR": str(Path(tmp) / "d")}
        ran = cli_fast(path, "config", "check", env={**base, **(env or {})})
        STATS["fuzz_configs"] += 1
        assert not ran.crashed, f"{text!r}\n{ran.crashed}"
        assert '"unexpected_error"' not in ran.stderr, f"{text!r}\n{ran.stderr[-2000:]}"
        assert ran.code in (0, 2), f"{text!r}: exit {ran.code}\n{ran.stderr[-2000:]}"
        if ran.code == 2:
            error = str(harness.last_event(ran.stderr).get("error", ""))
            names = [*named, *(n.split(".")[0] for n in named)]
            assert any(name in error for name in names), f"{text!r}: {error}"
            return
        loaded = config_mod.load(path, env={**base, **(env or {})})
        for key in DURATIONS:
            value: Any = loaded
            for part in key.split("."):
                value = getattr(value, part)
            assert value is None or (math.isfinite(value) and value >= 0), (key, value, text)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(KEYS)), values, min_size=1, max_size=4))
def test_random_values_in_a_file(chosen: dict[str, Any]) -> None:
    check(toml(chosen), [f"'{k}'" for k in chosen] + [k for k in chosen])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(KEYS)), st.one_of(st.text(max_size=30),
                                                st.sampled_from(TRICKY_TEXT)))
def test_random_env_overrides(key: str, value: str) -> None:
    if "\x00" in value:  # an environment variable cannot hold NUL
        return
    env_name = config_mod.ENV_PREFIX + key.upper().replace(".", "__")
    check("", [env_name, key], env={env_name: value})


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(SECTIONS), scalars)
def test_a_section_that_is_not_a_table(section: str, value: Any) -> None:
    check(f"{section.split('.')[0]} = {toml_value(value)}\n", [section.split(".")[0]])


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(SECTIONS), st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1,
                                          max_size=12), scalars)
def test_unknown_keys(section: str, key: str, value: Any) -> None:
    if f"{section}.{key}" in KEYS or (section == "s3" and key == "retention"):
        return
    check(toml({f"{section}.{key}": value}), [f"{section}.{key}"])


@pytest.mark.parametrize(("key", "value"), [
    ("metrics.listen", "0.0.0.0:²"), ("redis.save_timeout", float("nan")),
    ("redis.connect_timeout", float("inf")), ("schedule.every", "1" + "0" * 400),
    ("notify.timeout", float("nan")), ("redis.save_timeout", 1e400),
])
def test_found_by_fuzzing(key: str, value: Any) -> None:
    """Values the fuzzer found (kept as plain cases, so they are always tried)."""
    check(toml({key: value}), [f"'{key}'", key])


@pytest.mark.parametrize("key", ["notify.webhook_url", "notify.healthchecks_url"])
def test_unclosed_ipv6_bracket_in_a_notify_url(key: str) -> None:
    check(toml({key: "http://[::1"}), [f"'{key}'", key])


def test_schema_is_covered() -> None:
    assert len(KEYS) > 60 and "s3.retention.keep_last" in KEYS
    assert json.dumps(SECTIONS)


@pytest.mark.parametrize(("key", "value"), [
    ("redis.connect_timeout", "99999999999s"), ("redis.save_timeout", "9999999999999d"),
    ("s3.object_lock_days", 10**9), ("redis.connect_timeout", 1e15),
])
def test_what_config_check_accepts_does_not_crash_a_backup(
        tmp_path: Path, redis_server: RedisServer, s3: Bucket, key: str, value: Any) -> None:
    """Extreme values: either `config check` refuses them (exit 2, naming the key), or a
    backup with them runs without a traceback (a timeout of 3000 years overflowed the socket
    and a lock of 10^9 days overflowed datetime, after `config check` had said valid)."""
    section, _, name = key.rpartition(".")
    extra = "\n".join(f"{k} = {v}" for k, v in {name: toml_value(value)}.items())
    body = (s3_section(s3.endpoint, s3.name, extra) if section == "s3"
            else f"[{section}]\n{extra}\n" if section != "redis" else "")
    path = write_config(tmp_path / "c.toml", redis_server, tmp_path / "backups", body)
    if section == "redis":
        path.write_text(path.read_text().replace(f"{name} = ", f"# {name} = ").replace(
            "[redis]\n", f"[redis]\n{extra}\n"))
    ran = cli_fast(path, "config", "check")
    STATS["fuzz_configs"] += 1
    if ran.code == 2:
        assert key in str(harness.last_event(ran.stderr).get("error", "")), ran.stderr
        return
    assert ran.code == 0, ran.stderr
    proc = harness.cli(path, "backup")
    harness.no_traceback(proc.stderr)
