"""Multi-frame zstd artifacts: round trips, the zstd CLI reads them, older single-frame artifacts
still unpack, damaged frame structure is an IntegrityError (exit 3 from `verify`), and memory
stays bounded whatever sizes a frame claims."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import subprocess
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from backupd import pipeline, zstd_frames
from backupd.errors import IntegrityError
from tests.conftest import RedisServer, last_line, run_cli
from tests.test_rdb import make_rdb

MAGIC = zstd_frames.MAGIC
RANDOM = random.Random(6)
# ~7 MiB: random (incompressible) and repetitive parts, so frames of both kinds of block.
RDB = make_rdb(RANDOM.randbytes(3 << 20) + b"abcdefgh" * (512 << 10) + RANDOM.randbytes(1 << 20))


def packed(tmp_path: Path, rdb: bytes = RDB) -> bytes:
    dest = tmp_path / "a.rdb.zst"
    pipeline.pack(io.BytesIO(rdb), dest, compression="zstd", level=3, recipients=[])
    return dest.read_bytes()


def frame_starts(data: bytes) -> list[int]:
    """Offsets of the zstd frames of our own artifacts, by walking headers and blocks (the
    skippable frames around them, with the RDB's digest, are stepped over)."""
    starts, pos = [], 0
    while pos < len(data):
        if data[pos:pos + 4] == zstd_frames.BACKUPD_MAGIC:
            pos += 8 + int.from_bytes(data[pos + 4:pos + 8], "little")
            continue
        assert data[pos:pos + 4] == MAGIC
        starts.append(pos)
        descriptor = data[pos + 4]
        single = descriptor & 0x20
        fcs = (1 if single else 0, 2, 4, 8)[descriptor >> 6]
        pos += 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3] + fcs
        while True:
            value = int.from_bytes(data[pos:pos + 3], "little")
            pos += 3 + (1 if (value >> 1) & 3 == 1 else value >> 3)
            if value & 1:
                break
        pos += 4 if descriptor & 0x04 else 0
    return starts


def unpacked(data: bytes) -> bytes:
    out = io.BytesIO()
    result = pipeline.unpack(io.BytesIO(data), out, compression="zstd", encrypted=False)
    assert result.raw.sha256 == hashlib.sha256(RDB).hexdigest()
    return out.getvalue()


def decode(data: bytes) -> tuple[bytes, int]:
    out: list[bytes] = []
    pieces = iter([data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)])
    frames = zstd_frames.decode(lambda: next(pieces, b""), out.append)
    return b"".join(out), frames


def test_multi_frame_round_trip(tmp_path: Path) -> None:
    data = packed(tmp_path)
    starts = frame_starts(data)
    assert len(starts) == -(-len(RDB) // zstd_frames.FRAME_SIZE) >= 3
    for start in starts:  # every frame says how large it is: that is what makes it parallel
        params = zstandard.get_frame_parameters(data[start:start + 18])
        assert 0 < params.content_size <= zstd_frames.FRAME_SIZE
    assert unpacked(data) == RDB
    assert decode(data) == (RDB, len(starts))


@pytest.mark.skipif(shutil.which("zstd") is None, reason="no zstd CLI")
def test_the_zstd_cli_reads_multi_frame_artifacts(tmp_path: Path) -> None:
    packed(tmp_path)
    proc = subprocess.run(["zstd", "-q", "-d", "-c", str(tmp_path / "a.rdb.zst")],
                          capture_output=True, check=True)
    assert proc.stdout == RDB


def test_ratio_is_that_of_the_old_stream(tmp_path: Path) -> None:
    """Independent frames lose almost nothing against the zstd stream backupd wrote before
    (zstd's own threads, 2 MiB jobs) on data like a Redis of sessions and tokens. (Data that
    repeats over more than a frame loses more: a 5000-word vocabulary repeated over 30 MB, up
    to 4 %; the benchmark's 1 GB dataset: 0.0 %.)"""
    values = random.Random(8)
    rdb = make_rdb(b"".join(b"\x00\x18session:%d:%s\x10%s" % (
        i, values.randbytes(8).hex().encode(), values.randbytes(24).hex().encode())
        for i in range(120_000)))
    assert len(packed(tmp_path, rdb)) <= len(old_artifact(rdb, job_size=2 << 20)) * 1.02


def old_artifact(rdb: bytes, job_size: int = 1 << 20) -> bytes:
    """What backupd wrote before multi-frame: zstd's own threads, one frame of unknown size."""
    params = zstandard.ZstdCompressionParameters.from_level(3, threads=2, job_size=job_size)
    reader = zstandard.ZstdCompressor(compression_params=params).stream_reader(io.BytesIO(rdb))
    return reader.read()


def test_old_single_frame_artifacts_unpack() -> None:
    data = old_artifact(RDB)
    assert zstandard.get_frame_parameters(data).content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert unpacked(data) == RDB
    assert decode(data) == (RDB, 1)


def test_a_large_declared_frame_streams_in_bounded_pieces() -> None:
    """A frame larger than PARALLEL_MAX_OUTPUT (declared) is decompressed as a stream."""
    rdb = make_rdb(b"\0" * (zstd_frames.PARALLEL_MAX_OUTPUT + (3 << 20)))
    data = zstandard.ZstdCompressor(level=3).compress(rdb)
    sizes: list[int] = []
    pieces = iter([data])
    frames = zstd_frames.decode(lambda: next(pieces, b""), lambda b: sizes.append(len(b)))
    assert frames == 1 and sum(sizes) == len(rdb)
    assert max(sizes) <= zstd_frames.SERIAL_OUTPUT + zstd_frames.BLOCK_MAX


def frame_header(content_size: int, window_exponent: int = 10) -> bytes:
    """Magic, descriptor (8-byte content size, no checksum), window descriptor, size."""
    return MAGIC + bytes([0xC0, window_exponent << 3]) + content_size.to_bytes(8, "little")


def rle_block(last: bool = False, size: int = zstd_frames.BLOCK_MAX) -> bytes:
    return ((size << 3) | (1 << 1) | int(last)).to_bytes(3, "little") + b"x"


def raw_block(payload: bytes, last: bool = False) -> bytes:
    return ((len(payload) << 3) | int(last)).to_bytes(3, "little") + payload


def test_a_huge_claimed_size_costs_no_memory() -> None:
    """A frame claiming 2**62 bytes, then 256 MiB of RLE blocks from 8 KiB of input: streamed
    in small pieces, and refused at its end (it is not as large as it claims)."""
    hostile = frame_header(1 << 62, window_exponent=7) + rle_block() * 2047 + rle_block(
        last=True)
    total = 0

    def emit(data: bytes) -> None:
        nonlocal total
        total += len(data)

    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError):
            zstd_frames.decode(iter([hostile, b""]).__next__, emit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total >= 2040 * zstd_frames.BLOCK_MAX  # streamed, up to the block that lied
    assert peak < 16 << 20


def test_a_small_claimed_size_with_endless_blocks_is_refused_early() -> None:
    """A frame claiming 1 MiB (decompressed whole, in a worker) but made of 128 KiB raw blocks
    without end: refused once its input exceeds what such a frame can be, never buffered."""
    block = raw_block(bytes(zstd_frames.BLOCK_MAX))
    count = zstd_frames.PARALLEL_MAX_INPUT // len(block) + 100
    chunks = iter([frame_header(1 << 20)] + [block] * count + [b""])
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match="larger than its declared content"):
            zstd_frames.decode(chunks.__next__, lambda _: None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * zstd_frames.PARALLEL_MAX_INPUT + (8 << 20)


def damaged(data: bytes, how: str) -> bytes:
    second = frame_starts(data)[1]
    buf = bytearray(data)
    descriptor = data[second + 4]
    single = descriptor & 0x20
    block = (second + 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3]
             + (1 if single else 0, 2, 4, 8)[descriptor >> 6])  # its first block header
    if how == "reserved header bit":
        buf[second + 4] |= 0x08
    elif how == "impossible window":  # a frame of ours, but with a 2**41 window
        return bytes(buf[:second] + frame_header(1, window_exponent=31)
                     + raw_block(b"x", last=True) + buf[second:])
    elif how == "unknown magic of a frame":
        buf[second] ^= 0xFF
    elif how == "reserved block type":
        buf[block] |= 0x06
    elif how == "block larger than 128 KiB":
        buf[block + 2] |= 0x80
    elif how == "declared size too small":
        buf[block - 1] ^= 0x01
    elif how == "truncated in a frame header":
        return bytes(buf[:second + 5])
    elif how == "truncated in a block header":
        return bytes(buf[:block + 2])
    elif how == "truncated in a block":
        return bytes(buf[:block + 100])
    elif how == "trailing zero byte":
        return bytes(buf) + b"\0"
    elif how == "trailing frame magic":
        return bytes(buf) + MAGIC
    elif how == "empty":
        return b""
    else:
        raise AssertionError(how)
    return bytes(buf)


DAMAGE = ["reserved header bit", "impossible window", "unknown magic of a frame",
          "reserved block type", "block larger than 128 KiB", "declared size too small",
          "truncated in a frame header", "truncated in a block header", "truncated in a block",
          "trailing zero byte", "trailing frame magic", "empty"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_frame_structure_is_an_integrity_error(tmp_path: Path, how: str) -> None:
    bad = damaged(packed(tmp_path), how)
    with pytest.raises(IntegrityError):
        pipeline.unpack(io.BytesIO(bad), io.BytesIO(), compression="zstd", encrypted=False)


def test_skippable_frames_are_skipped(tmp_path: Path) -> None:
    """RFC 8878 skippable frames (none of ours has one) are skipped, like zstd -d does."""
    data = packed(tmp_path)
    second = frame_starts(data)[1]
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    assert decode(data[:second] + skippable + data[second:]) == (RDB, len(frame_starts(data)))


def big_backup(config: Path, server: RedisServer) -> str:
    """A backup of several frames: 6 MiB of values that do not compress."""
    client = server.client()
    values = random.Random(7)
    for i in range(48):
        client.set(f"big:{i}", values.randbytes(128 << 10))
    client.close()
    proc = run_cli("-c", str(config), "backup")
    assert proc.returncode == 0, proc.stderr
    return last_line(proc.stdout)


@pytest.mark.parametrize("how", ["reserved header bit", "reserved block type",
                                 "truncated in a block"])
def test_verify_exits_3_on_a_damaged_frame(setup: tuple[Path, RedisServer, Path],
                                           how: str) -> None:
    """The manifest's stored checksum is made to match the damage: only the frame walk (and
    what follows it) can tell."""
    config, server, backups = setup
    backup_id = big_backup(config, server)
    artifact = backups / f"{backup_id}.rdb.zst"
    good = artifact.read_bytes()
    assert len(frame_starts(good)) >= 3
    assert run_cli("-c", str(config), "verify", backup_id).returncode == 0
    bad = damaged(good, how)
    artifact.write_bytes(bad)
    manifest_path = backups / f"{backup_id}.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(stored_size=len(bad), stored_sha256=hashlib.sha256(bad).hexdigest())
    manifest_path.write_text(json.dumps(manifest))
    proc = run_cli("-c", str(config), "verify", backup_id)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"CORRUPT  {backup_id}" in proc.stdout


def _with_recorded_digest(data: bytes, size: int, sha256: bytes) -> bytes:
    """`data` (an artifact of ours) with its last frame, the RDB's digest, replaced."""
    trailer = zstd_frames.digest_frame(len(RDB), hashlib.sha256(RDB).digest())
    assert data.endswith(trailer)
    return data[:-len(trailer)] + zstd_frames.digest_frame(size, sha256)


def test_the_artifact_records_the_rdb_digest_and_a_restore_trusts_it(tmp_path: Path) -> None:
    """A restore does not hash the RDB again: the digest recorded at the end of the artifact
    (covered by the stored SHA-256) is what it compares with the manifest."""
    data = packed(tmp_path)
    assert data.startswith(zstd_frames.skippable_frame(zstd_frames.ANNOUNCE))
    result = pipeline.unpack(io.BytesIO(data), None, compression="zstd", encrypted=False,
                             trust_recorded=True)
    assert (result.raw.size, result.raw.sha256) == (len(RDB), hashlib.sha256(RDB).hexdigest())
    forged = _with_recorded_digest(data, len(RDB), b"\x01" * 32)
    result = pipeline.unpack(io.BytesIO(forged), None, compression="zstd", encrypted=False,
                             trust_recorded=True)
    assert result.raw.sha256 == "01" * 32  # differs from the manifest: the restore refuses


@pytest.mark.parametrize("damage", ["digest", "size", "no-trailer"])
def test_a_recorded_digest_that_contradicts_the_rdb_is_corrupt(tmp_path: Path,
                                                               damage: str) -> None:
    data = packed(tmp_path)
    sha = hashlib.sha256(RDB).digest()
    if damage == "digest":
        data = _with_recorded_digest(data, len(RDB), b"\x01" * 32)
    elif damage == "size":
        data = _with_recorded_digest(data, len(RDB) - 1, sha)
    else:
        data = data[:-len(zstd_frames.digest_frame(len(RDB), sha))]
    trusting = damage != "digest"  # a size or a missing trailer is caught either way
    for trust in (False, True) if trusting else (False,):
        with pytest.raises(IntegrityError, match="digest"):
            pipeline.unpack(io.BytesIO(data), None, compression="zstd", encrypted=False,
                            trust_recorded=trust)
