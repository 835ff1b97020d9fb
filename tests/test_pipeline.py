"""Pack/unpack streams: every codec combination round-trips; damage and failures leave no file."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest
from pyrage import x25519

from backupd import codecs, fsio, pipeline
from backupd.errors import IntegrityError, StorageError
from tests.test_rdb import make_rdb

IDENTITY = x25519.Identity.generate()
RDB = make_rdb(os.urandom(1000) + b"a" * 300_000 + os.urandom(3 * (1 << 20)))


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
@pytest.mark.parametrize("encrypted", [False, True])
def test_round_trip(tmp_path: Path, compression: str, encrypted: bool) -> None:
    dest = tmp_path / "artifact"
    packed = pipeline.pack(io.BytesIO(RDB), dest, compression=compression, level=3,
                           recipients=[str(IDENTITY.to_public())] if encrypted else [])
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert packed.stored.size == dest.stat().st_size and packed.raw.size == len(RDB)
    sink = io.BytesIO()
    with open(dest, "rb") as fh:
        result = pipeline.unpack(fh, sink, compression=compression, encrypted=encrypted,
                                 identities=[IDENTITY])
    assert sink.getvalue() == RDB
    assert (result.raw, result.stored) == (packed.raw, packed.stored)
    assert os.listdir(tmp_path) == ["artifact"]


def test_corrupt_snapshot_never_becomes_a_file(tmp_path: Path) -> None:
    bad = bytearray(RDB)
    bad[5000] ^= 1
    with pytest.raises(IntegrityError, match="CRC64"):
        pipeline.pack(io.BytesIO(bytes(bad)), tmp_path / "a", compression="zstd", level=3,
                      recipients=[])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_damaged_stored_stream_is_an_integrity_error(tmp_path: Path, compression: str) -> None:
    dest = tmp_path / "a"
    pipeline.pack(io.BytesIO(RDB), dest, compression=compression, level=3, recipients=[])
    data = bytearray(dest.read_bytes())
    for damaged in (bytes(data[: len(data) // 2]), bytes(data[:10]),
                    bytes(data[:100]) + b"\x00" * 50 + bytes(data[150:])):
        with pytest.raises(IntegrityError):
            pipeline.unpack(io.BytesIO(damaged), None, compression=compression,
                            encrypted=False)


def test_valid_zstd_of_garbage_is_rejected() -> None:
    import zstandard

    garbage = zstandard.ZstdCompressor().compress(b"hello, not an rdb" * 100)
    with pytest.raises(IntegrityError, match="not an RDB"):
        pipeline.unpack(io.BytesIO(garbage), None, compression="zstd", encrypted=False)


def test_wrong_identity(tmp_path: Path) -> None:
    dest = tmp_path / "a"
    pipeline.pack(io.BytesIO(RDB), dest, compression="zstd", level=3,
                  recipients=[str(IDENTITY.to_public())])
    with open(dest, "rb") as fh, pytest.raises(IntegrityError, match="cannot decrypt"):
        pipeline.unpack(fh, None, compression="zstd", encrypted=True,
                        identities=[x25519.Identity.generate()])


def test_disk_full_leaves_nothing(tmp_path: Path) -> None:
    import subprocess

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(tiny)], check=True)
    try:
        with pytest.raises(StorageError, match="No space left"):
            pipeline.pack(io.BytesIO(RDB), tiny / "a", compression="none", level=0,
                          recipients=[])
        assert os.listdir(tiny) == []
    finally:
        subprocess.run(["umount", str(tiny)], check=True)


def test_identity_file_parsing(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(f"# public key: {IDENTITY.to_public()}\n{IDENTITY}\n")
    assert len(codecs.load_identities(str(path))) == 1
    path.write_text("# nothing\n")
    with pytest.raises(IntegrityError, match="no age identity"):
        codecs.load_identities(str(path))
    path.write_text("AGE-SECRET-KEY-1NOTAKEY\n")
    with pytest.raises(IntegrityError) as info:
        codecs.load_identities(str(path))
    assert "NOTAKEY" not in str(info.value)


def test_atomic_write(tmp_path: Path) -> None:
    dest = tmp_path / "m.json"
    fsio.write_atomic(dest, b"one")
    fsio.write_atomic(dest, b"two")
    assert dest.read_bytes() == b"two" and os.listdir(tmp_path) == ["m.json"]
