"""RDB structure and CRC64 checks, streaming over any chunking."""

from __future__ import annotations

import anycrc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd.errors import IntegrityError
from backupd.rdb import RdbChecker, parse_header
from tests.conftest import RedisServer, fill


def make_rdb(body: bytes = b"\xfa\x09redis-ver\x067.0.15", version: int = 10,
             checksum: bool = True) -> bytes:
    data = f"REDIS{version:04d}".encode() + body + b"\xff"
    crc = anycrc.Model("CRC64-REDIS").calc(data) if checksum else 0
    return data + crc.to_bytes(8, "little")


def check(data: bytes, chunks: list[int] | None = None) -> object:
    checker = RdbChecker()
    pos = 0
    for size in chunks or []:
        checker.update(data[pos:pos + size])
        pos += size
    checker.update(data[pos:])
    return checker.finish()


def test_crc_check_value() -> None:
    assert anycrc.Model("CRC64-REDIS").calc(b"123456789") == 0xE9C6D914C4B8D9CA


def test_real_rdb_from_redis(redis_server: RedisServer) -> None:
    fill(redis_server, 500)
    redis_server.client().save()
    data = (redis_server.dir / "dump.rdb").read_bytes()
    info = check(data, [1, 7, 4096])
    assert info.version == 10 and info.checksum == "ok"  # type: ignore[attr-defined]
    assert info.size == len(data)  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300), cuts=st.lists(st.integers(0, 40), max_size=12))
def test_any_chunking_gives_the_same_answer(body: bytes, cuts: list[int]) -> None:
    data = make_rdb(body)
    assert check(data, cuts) == check(data)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(min_size=1, max_size=200), data=st.data())
def test_every_flipped_byte_is_detected(body: bytes, data: st.DataObject) -> None:
    rdb = bytearray(make_rdb(body))
    offset = data.draw(st.integers(0, len(rdb) - 1))
    rdb[offset] ^= data.draw(st.integers(1, 255))
    with pytest.raises(IntegrityError):
        check(bytes(rdb))


def test_truncation_at_every_length_is_detected() -> None:
    rdb = make_rdb(bytes(range(256)))
    for length in range(len(rdb)):
        with pytest.raises(IntegrityError):
            check(rdb[:length])


def test_disabled_checksum_is_recorded() -> None:
    assert check(make_rdb(checksum=False)).checksum == "disabled"  # type: ignore[attr-defined]


def test_headers() -> None:
    assert parse_header(b"REDIS0011") == 11
    assert parse_header(b"VALKEY080") == 80
    for bad in (b"", b"REDIS", b"RDB0010xx", b"\x28\xb5\x2f\xfdxxxxx"):
        with pytest.raises(IntegrityError):
            parse_header(bad)
