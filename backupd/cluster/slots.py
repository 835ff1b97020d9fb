"""Hash slots: which of the 16384 slots a key belongs to (CRC16/XMODEM of the key, or of its
`{hash tag}`), and slot ranges as the cluster reports them."""

from __future__ import annotations

from collections.abc import Iterable

SLOTS = 16384
Range = tuple[int, int]  # inclusive, as CLUSTER SHARDS / CLUSTER SLOTS give them


def _table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _table()


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM, the cluster's key hash (check value: crc16(b"123456789") == 0x31C3)."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc


def hash_tag(key: bytes) -> bytes:
    """The part of the key that is hashed: the first non-empty `{...}`, else the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


def keyslot(key: bytes) -> int:
    return crc16(hash_tag(key)) % SLOTS


def normalize(ranges: Iterable[Range]) -> list[Range]:
    """Sorted ranges with neighbours merged: [(0, 5), (6, 9)] -> [(0, 9)]."""
    out: list[Range] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def count(ranges: Iterable[Range]) -> int:
    return sum(end - start + 1 for start, end in ranges)


def gaps(ranges: Iterable[Range]) -> list[Range]:
    """The slots no range covers."""
    missing, nxt = [], 0
    for start, end in normalize(ranges):
        if start > nxt:
            missing.append((nxt, start - 1))
        nxt = max(nxt, end + 1)
    if nxt < SLOTS:
        missing.append((nxt, SLOTS - 1))
    return missing


def show(ranges: Iterable[Range]) -> str:
    """`0-5460,5461` as redis-cli writes slot ranges."""
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges) or "none"


def contains(ranges: list[Range], slot: int) -> bool:
    return any(start <= slot <= end for start, end in ranges)
