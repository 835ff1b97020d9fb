"""Building the S3 client: credentials, timeouts and retries."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import boto3
from botocore.config import Config

from backupd.config import S3Config
from backupd.errors import ConfigError
from backupd.storage.s3.errors import BOTO_ERRORS

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def make_client(cfg: S3Config, env: Mapping[str, str] | None = None) -> S3Client:
    """An S3 client for `cfg`: explicit credentials from the env vars named in the config when
    both are set, otherwise the default AWS credential chain (env, profile, IMDS, IRSA...).
    `config.load` has checked the endpoint URL and that the two variables come as a pair."""
    env = os.environ if env is None else env
    key_id = env.get(cfg.access_key_id_env, "") if cfg.access_key_id_env else ""
    secret = env.get(cfg.secret_access_key_env, "") if cfg.secret_access_key_env else ""
    config = Config(
        s3={"addressing_style": cast(Any, cfg.addressing_style)},
        retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    kwargs: dict[str, Any] = {"region_name": cfg.region or None, "config": config}
    if cfg.endpoint_url:
        kwargs["endpoint_url"] = cfg.endpoint_url
    if key_id and secret:
        kwargs["aws_access_key_id"] = key_id
        kwargs["aws_secret_access_key"] = secret
    try:
        # A session per client: boto3's default session is not thread-safe to create.
        client: S3Client = boto3.session.Session().client("s3", **kwargs)
        return client
    except ValueError:
        # botocore rejects a malformed endpoint URL with a message that quotes it.
        raise ConfigError("key 's3.endpoint_url': not a valid URL (expected e.g. "
                          "https://s3.example.com)") from None
    except BOTO_ERRORS as exc:
        raise ConfigError(f"cannot create the S3 client: {type(exc).__name__}") from None


def endpoint_host(url: str | None) -> str:
    """host[:port] of an endpoint URL, without scheme, userinfo or path."""
    try:
        parts = urlsplit(url or "")
        host = parts.hostname or "(unparsable URL)"
        return f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return "(unparsable URL)"
