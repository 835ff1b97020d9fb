"""Structured logging: JSON lines on stderr (console format on a TTY), secrets masked everywhere.

Masking is value-based: every secret backupd reads (the Redis password, S3 keys, notification
URLs) is registered here, and every string in every event (messages, exception text,
tracebacks) is scrubbed of it, plus any `scheme://user:secret@` in a URL.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

_secrets: set[str] = set()
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
_SECRET_KEYS = re.compile(r"pass(word)?|secret|token|credential|identity|authorization", re.I)
MASK = "***"


def register_secret(value: str | None) -> None:
    """Mask this value in every later log line (ignored when too short to be a real secret)."""
    if value and len(value) >= 4:
        _secrets.add(value)


def mask(text: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _URL_USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", text)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {k: MASK if _SECRET_KEYS.search(str(k)) and v else _scrub(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    if isinstance(value, BaseException):
        return mask(f"{type(value).__name__}: {value}")
    return value


def _mask_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    return {key: _scrub(value) if not _SECRET_KEYS.search(key) or not value else MASK
            for key, value in event.items()}


def setup(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog and route stdlib logging (redis, botocore, apscheduler) through it."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                      exception_formatter=structlog.dev.plain_traceback)
        if console else structlog.processors.JSONRenderer())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Exceptions become text before masking, so secrets in tracebacks are masked too.
    exceptions: list[Any] = [structlog.processors.format_exc_info] if console else [
        structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False))]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *exceptions, _mask_processor, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "apscheduler.executors"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
