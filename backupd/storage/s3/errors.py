"""botocore / boto3 errors as sentences for the operator.

Every error is turned into StorageError with a message that never contains the access key, the
secret key or the userinfo of the endpoint URL: known codes get a sentence of their own, server
messages are scrubbed of those values, and botocore's own messages (which may quote the URL) are
reduced to the error's kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from boto3.exceptions import Boto3Error, S3UploadFailedError
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from backupd.config import S3Config
from backupd.errors import StorageError

BOTO_ERRORS: tuple[type[BaseException], ...] = (BotoCoreError, ClientError, Boto3Error)
_MAX_TEXT = 300  # of a server's message quoted in ours


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def error_message(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", ""))


def is_missing_key(exc: BaseException) -> bool:
    """The object asked for does not exist (GET says NoSuchKey, HEAD only 404)."""
    return isinstance(exc, ClientError) and error_code(exc) in ("NoSuchKey", "404")


def is_lock_error(code: str, message: str) -> bool:
    """A refusal because of Object Lock retention or a legal hold (not a failure)."""
    text = message.lower()
    if code == "ObjectLocked":
        return True
    if code in ("AccessDenied", "InvalidRequest", "403"):
        return "lock" in text or "retention" in text or "legal hold" in text
    return False


def is_missing_md5(code: str, message: str) -> bool:
    """A server that wants Content-MD5 on DeleteObjects (botocore no longer sends it)."""
    return code == "MissingContentMD5" or (
        code in ("InvalidRequest", "InvalidArgument", "BadDigest")
        and "content-md5" in message.lower())


class Reasons:
    """Turns errors of one bucket's client into operator sentences (see the module docstring).
    `endpoint_host` is asked when needed: the client's endpoint is known only once it exists."""

    def __init__(self, cfg: S3Config, env: Mapping[str, str],
                 endpoint_host: Callable[[], str]) -> None:
        self._cfg = cfg
        self._endpoint_host = endpoint_host
        # Values that must never reach a message: redacted defensively from server messages.
        secrets = [env.get(cfg.access_key_id_env or "", ""),
                   env.get(cfg.secret_access_key_env or "", "")]
        try:
            parts = urlsplit(cfg.endpoint_url)
            secrets += [parts.username or "", parts.password or ""]
        except ValueError:
            pass
        self._secrets = sorted({v for v in secrets if len(v) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text[:_MAX_TEXT]

    def reason(self, exc: BaseException, key: str | None = None) -> str:
        """What went wrong, for the operator; never contains credentials or endpoint userinfo."""
        bucket = self._cfg.bucket
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
            exc = exc.__context__
        if isinstance(exc, ClientError):
            code, text = error_code(exc), error_message(exc)
            if code == "NoSuchBucket" or (code == "404" and key is None):
                return f"bucket {bucket} does not exist"
            if code in ("NoSuchKey", "404"):
                return f"object {key} does not exist"
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                              "ExpiredToken", "InvalidClientTokenId"):
                return "the S3 credentials were rejected"
            if code in ("AccessDenied", "403", "AllAccessDisabled"):
                return f"access denied to bucket {bucket} (check the IAM policy)"
            if code in ("PermanentRedirect", "301", "IllegalLocationConstraintException"):
                return (f"bucket {bucket} is in another region than the configured "
                        f"{self._cfg.region!r}")
            return self.scrub(f"{code}: {text}" if text else code)
        if isinstance(exc, ReadTimeoutError):
            return f"the S3 endpoint {self._endpoint_host()} did not answer in time"
        if isinstance(exc, ConnectionError):  # EndpointConnectionError, ConnectTimeoutError...
            return f"cannot reach the S3 endpoint {self._endpoint_host()}"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return (f"no S3 credentials found (set {self._cfg.access_key_id_env} and "
                    f"{self._cfg.secret_access_key_env}, or use an instance/role profile)")
        if isinstance(exc, BotoCoreError):
            # botocore messages may quote the endpoint URL: report the error kind only.
            return f"{type(exc).__name__} talking to {self._endpoint_host()}"
        return type(exc).__name__

    def error(self, action: str, exc: BaseException, key: str | None = None) -> StorageError:
        return StorageError(f"S3: {action}: {self.reason(exc, key)}")
