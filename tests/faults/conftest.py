"""Fixtures of the fault tests (tests/faults/): see harness.py for the machinery.

Every test here runs with the known Redis password (tests.conftest.PASSWORD) and the known S3
secret (S3_SECRET); every captured output goes through harness.record, which fails on either
secret at once, and the session ends with a check over the whole transcript. The counters of
what was tried (kill points, random kills, fault cases, corrupt files and the detection rate)
are printed in pytest's terminal summary.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import PASSWORD, RedisServer, free_port
from tests.faults import harness
from tests.faults.harness import STATS, Bucket, Service


@pytest.fixture(scope="session", autouse=True)
def no_secret_anywhere() -> Iterator[None]:
    """The final check over all captured output of the fault tests."""
    yield
    leaks = [where for where, text in harness.transcript()
             if any(secret in text for secret in harness.SECRETS)]
    assert not leaks, f"secrets in the output of: {leaks[:5]}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    outputs = len(harness.transcript())
    if not outputs:
        return
    cases = STATS["fault_cases"]
    tried, detected = STATS["corrupt_tried"], STATS["corrupt_detected"]
    rate = f"{100 * detected / tried:.1f}%" if tried else "n/a"
    lines = [
        f"kill points: {len(STATS['kill_points'])} named stages "
        f"({', '.join(sorted(STATS['kill_points']))}); {STATS['stage_kills']} stage kills",
        f"random kills: {STATS['random_kills']} SIGKILLs in {STATS['random_runs']} random-time "
        f"runs; daemon kills: {STATS['daemon_kills']}; restore kills: {STATS['restore_kills']}",
        f"fault cases: {len(cases)} ({len(set(cases))} distinct)",
        f"corrupt or hostile files tried: {tried}, detected {detected}: detection rate {rate}",
        f"config fuzz examples: {STATS['fuzz_configs']}",
        f"outputs checked for the Redis password and the S3 secret: {outputs}, none leaked",
    ]
    terminalreporter.write_sep("-", "fault tests")
    for line in lines:
        terminalreporter.write_line(line)


@pytest.fixture
def logs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def age_key(tmp_path: Path) -> tuple[str, Path]:
    """(recipient, identity file) of a fresh age key."""
    import pyrage

    identity = pyrage.x25519.Identity.generate()
    path = tmp_path / "age.key"
    path.write_text(f"# test key\n{identity}\n")
    path.chmod(0o600)
    return str(identity.to_public()), path


@pytest.fixture
def s3(moto_endpoint: str) -> Bucket:
    """A fresh bucket of its own (parametrized tests would share tests.conftest.bucket)."""
    found = Bucket(moto_endpoint, f"faults-{uuid.uuid4().hex[:16]}")
    found.client().create_bucket(Bucket=found.name)
    return found


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Redis servers controlled like services (restore's `command` method)."""
    made: list[Service] = []

    def make(*options: str, name: str = "data") -> Service:
        data = tmp_path / name
        data.mkdir()
        service = Service(RedisServer(data, free_port(), PASSWORD, list(options)))
        made.append(service)
        service.start()
        return service

    yield make
    for service in made:
        subprocess.run(service.stop_command(), check=False, timeout=30)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory outside pytest's tmp tree (for mounts)."""
    path = Path(tempfile.mkdtemp(prefix="backupd-faults-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)

