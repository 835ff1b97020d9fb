"""Configuration: defaults, env overrides, and errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd import config as config_mod
from backupd.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    cfg = config_mod.load(None, env={})
    assert cfg.redis.host == "127.0.0.1" and cfg.redis.port == 6379
    assert cfg.redis.save_timeout == 900 and cfg.backup.compression == "zstd"
    assert cfg.s3.enabled is False and cfg.retention.keep_daily == 7


def test_file_and_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[redis]\nport = 6380\nsave_timeout = "2h"\n'
                           '[backup]\ndir = "/srv/b"\nage_recipients = []\n')
    env = {"BACKUPD_REDIS__PORT": "7000", "BACKUPD_BACKUP__COMPRESSION": "gzip",
           "BACKUPD_REDIS__TLS": "yes", "BACKUPD_S3__RETENTION__KEEP_LAST": "3",
           "BACKUPD_RESTORE__STOP_COMMAND": '["systemctl", "stop", "redis"]'}
    cfg = config_mod.load(path, env=env)
    assert cfg.redis.port == 7000 and cfg.redis.tls is True
    assert cfg.redis.save_timeout == 7200 and cfg.backup.compression == "gzip"
    assert cfg.s3.retention.keep_last == 3
    assert cfg.restore.stop_command == ["systemctl", "stop", "redis"]


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, "[redis]\nport = 6390\n")
    assert config_mod.load(None, env={"BACKUPD_CONFIG": str(path)}).redis.port == 6390


@pytest.mark.parametrize(("text", "key", "expected"), [
    ("[redis]\nport = 'x'\n", "redis.port", "an integer"),
    ("[redis]\nport = 70000\n", "redis.port", "a port number"),
    ("[redis]\nsave_timeout = '15 minutes'\n", "redis.save_timeout", "a duration"),
    ("[redis]\ntls = 'maybe'\n", "redis.tls", "true or false"),
    ("[redis]\nhots = 'x'\n", "redis.hots", "unknown key"),
    ("[bakup]\n", "bakup", "unknown key"),
    ("[backup]\ncompression = 'lz4'\n", "backup.compression", "one of"),
    ("[backup]\ncompression_level = 30\n", "backup.compression_level", "1..22"),
    ("[backup]\nniceness = 20\n", "backup.niceness", "0..19"),
    ("[backup]\nage_recipients = ['ssh-rsa AAAA']\n", "backup.age_recipients", "age public"),
    ("[redis]\ndata_dir = '/data'\n[backup]\ndir = '/data/backups'\n", "backup.dir", "inside"),
    ("[s3]\nbucket = 'b'\n", "s3.prefix", "non-empty prefix"),
    ("[s3]\nbucket = 'b'\nprefix = 'redis'\n", "s3.prefix", "ending with '/'"),
    ("[retention]\nkeep_last = -1\n", "retention.keep_last", ">= 0"),
    ("[metrics]\nlisten = 'nope'\n", "metrics.listen", "HOST:PORT"),
    ("redis = 3\n", "redis", "must be a table"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config_mod.load(path, env={})
    message = str(info.value)
    assert key in message and expected in message and str(path) in message


def test_env_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"BACKUPD_REDIS__PORT.*redis.port.*integer"):
        config_mod.load(None, env={"BACKUPD_REDIS__PORT": "abc"})


def test_invalid_toml_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_mod.load(write(tmp_path, "[redis\n"), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        config_mod.load(tmp_path / "missing.toml", env={})


def test_secret_values_are_not_echoed(tmp_path: Path) -> None:
    # A value no temp path or line number can contain by chance.
    path = write(tmp_path, "[notify]\nwebhook_url = 918273645\n")
    with pytest.raises(ConfigError) as info:
        config_mod.load(path, env={})
    assert "918273645" not in str(info.value) and "***" in str(info.value)


def test_password_sources(tmp_path: Path) -> None:
    cfg = config_mod.load(None, env={})
    assert config_mod.redis_password(cfg.redis, {"REDIS_PASSWORD": "pw"}) == "pw"
    assert config_mod.redis_password(cfg.redis, {}) is None
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    cfg = config_mod.load(write(tmp_path, f"[redis]\npassword_file = '{secret}'\n"), env={})
    assert config_mod.redis_password(cfg.redis, {"REDIS_PASSWORD": "pw"}) == "from-file"


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("2h", 7200),
                                               ("1d", 86400), ("30", 30), ("1.5h", 5400)])
def test_durations(text: str, seconds: float) -> None:
    assert config_mod.parse_duration(text) == seconds


_values = st.one_of(st.integers(), st.text(max_size=20), st.booleans(), st.floats(
    allow_nan=False), st.lists(st.integers(), max_size=3), st.none())


@settings(max_examples=150, deadline=None)
@given(section=st.sampled_from(["redis", "backup", "s3", "retention", "schedule", "metrics"]),
       key=st.sampled_from(["port", "dir", "compression", "keep_last", "every", "listen",
                            "bucket", "timeout", "data_dir", "save_timeout"]),
       value=_values)
def test_random_values_never_crash(tmp_path_factory: pytest.TempPathFactory, section: str,
                                   key: str, value: object) -> None:
    import json

    if value is None:
        return
    path = tmp_path_factory.mktemp("fuzz") / "c.toml"
    path.write_text(f"[{section}]\n{key} = {json.dumps(value)}\n")
    try:
        config_mod.load(path, env={})
    except ConfigError as exc:
        assert str(exc)


def test_example_config_is_valid_and_documents_every_key() -> None:
    import dataclasses
    import tomllib

    example = Path(__file__).parent.parent / "config.example.toml"
    cfg = config_mod.load(example, env={})
    assert cfg.redis.host == "redis"
    data = tomllib.loads(example.read_text())

    def keys(obj: object, prefix: str = "") -> set[str]:
        out = set()
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            if f.metadata.get("internal"):
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out |= keys(value, f"{prefix}{f.name}.")
            else:
                out.add(prefix + f.name)
        return out

    def present(path: str) -> bool:
        node: object = data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    assert sorted(k for k in keys(cfg) if not present(k)) == []


def test_every_error_is_reported_at_once_each_naming_its_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[redis]\nport = 70000\nhots = 'x'\n"
                           "[backup]\ncompression = 'lz4'\n"
                           "[s3]\nbucket = 'b'\nprefix = 'redis'\n"
                           "[schedule]\ncron = '61 * * * *'\n"
                           "[notify]\nwebhook_url = 'file:///etc/passwd'\n")
    with pytest.raises(ConfigError) as info:
        config_mod.load(path, env={"BACKUPD_REDIS__TLS": "maybe"})
    message = str(info.value)
    assert message.startswith("7 configuration errors: ")
    for key in ("redis.port", "redis.hots", "backup.compression", "s3.prefix", "schedule.cron",
                "notify.webhook_url", "BACKUPD_REDIS__TLS"):
        assert key in message
    assert "/etc/passwd" not in message
    assert info.value.exit_code == 2


def test_a_value_in_error_is_not_checked_again_at_its_default(tmp_path: Path) -> None:
    # s3.prefix = 5 is left at its default "": its own check would add a second, wrong error.
    path = write(tmp_path, "[s3]\nbucket = 'b'\nprefix = 5\n")
    with pytest.raises(ConfigError) as info:
        config_mod.load(path, env={})
    assert "configuration errors" not in str(info.value)
    assert "key 's3.prefix': expected a string, got 5" in str(info.value)


def test_choices_are_enums_shown_as_their_values(tmp_path: Path) -> None:
    from backupd.choices import Checksum, Compression, RestoreMethod

    path = write(tmp_path, "[backup]\ncompression = 'gzip'\ncompression_level = 6\n"
                           "[s3]\nchecksum = 'crc32'\n[restore]\nmethod = 'replicaof'\n")
    cfg = config_mod.load(path, env={})
    assert cfg.backup.compression is Compression.GZIP
    assert cfg.s3.checksum is Checksum.CRC32 and cfg.restore.method is RestoreMethod.REPLICAOF
    effective = config_mod.effective(cfg)
    assert json.dumps(effective["backup"]["compression"]) == '"gzip"'
    with pytest.raises(ConfigError, match="one of 'docker', 'command', 'shutdown', 'replicaof'"):
        config_mod.load(write(tmp_path, "[restore]\nmethod = 'ssh'\n"), env={})
    with pytest.raises(ConfigError, match=r"key 'backup\.compression': expected a string"):
        config_mod.load(write(tmp_path, "[backup]\ncompression = 1\n"), env={})


def test_notify_and_s3_endpoint_urls_need_a_valid_port() -> None:
    with pytest.raises(ConfigError, match=r"notify\.healthchecks_url"):
        config_mod.load(None, env={"BACKUPD_NOTIFY__HEALTHCHECKS_URL": "https://hc:port/x"})
    env = {"BACKUPD_S3__BUCKET": "b", "BACKUPD_S3__PREFIX": "p/",
           "BACKUPD_S3__ENDPOINT_URL": "https://s3:99999"}
    with pytest.raises(ConfigError, match=r"s3\.endpoint_url"):
        config_mod.load(None, env=env)
    assert config_mod.load(None, env={**env, "BACKUPD_S3__ENDPOINT_URL": "https://s3:9000"})
