"""Corrupt and hostile backup files: `verify` detects every one (exit 3) and `restore` refuses
every one before Redis is touched. The detection rate is counted and must be 100%.

Four kinds of real backups (zstd, gzip, none, zstd+age) are damaged in many ways:
  artifact  flipped bytes at many offsets, truncations at many lengths, empty, appended
            garbage, wrong magic, valid zstd/gzip of garbage, the wrong codec;
  deeper    the same damage with the manifest's stored checksum and size rewritten to match
            (so only decompression, the raw SHA-256 and the RDB checks can tell), and RDBs
            damaged under a valid compression (the RDB CRC and structure checks);
  manifest  checksums or sizes that do not match, not JSON, nested 100k deep, too large,
            wrong types in every field, unknown format, claims encryption it does not have;
  foreign   files with backup-like names that are not backups (symlinks, directories, FIFOs,
            a newline in the id, orphans): never listed, verified as ok or restored.
Each case gets a directory of its own (BACKUPD_BACKUP__DIR); `list`, `verify ID`,
`verify --all` and `restore ID --yes` run in-process (the same click commands); a sample also
runs through the real CLI in subprocesses. Redis (run_id, saves, keys, config) and its data
dir are checked after every restore.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyrage
import pytest
import zstandard

from backupd.codecs import load_identities
from backupd.pipeline import unpack
from tests.conftest import write_config
from tests.faults import harness
from tests.faults.harness import STATS, Service, cli, cli_fast, info, populate, sha256

KINDS = ("zstd", "gzip", "none", "age")
Mutation = Callable[[Path], str]  # damages the case dir; returns the id to verify/restore


@dataclass
class Base:
    kind: str
    dir: Path
    id: str
    manifest: dict[str, Any]
    stored: bytes
    raw: bytes
    recipient: str

    @property
    def artifact(self) -> str:
        return str(self.manifest["artifact"])

    def encode(self, raw: bytes) -> bytes:
        """`raw` stored the way this kind stores it (compression, then encryption)."""
        if self.kind == "gzip":
            return gzip.compress(raw)
        if self.kind == "none":
            return raw
        packed = zstandard.ZstdCompressor().compress(raw)
        if self.kind == "age":
            recipient = pyrage.x25519.Recipient.from_str(self.recipient)
            return bytes(pyrage.encrypt(packed, [recipient]))
        return packed

    def decodes_intact(self, stored: bytes, identity: Path) -> bool:
        """Whether `stored` still decodes to exactly this backup's RDB (e.g. a flipped gzip
        MTIME byte): then the backup is not damaged, whatever its checksum."""
        sink = io.BytesIO()
        try:
            unpack(io.BytesIO(stored), sink, compression=self.manifest["compression"],
                   encrypted=self.kind == "age", identities=load_identities(str(identity)))
        except Exception:
            return False
        return sink.getvalue() == self.raw


def write_manifest(d: Path, backup_id: str, data: dict[str, Any] | bytes) -> None:
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    (d / f"{backup_id}.json").write_bytes(body)


def flipped(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0xFF
    return bytes(out)


def offsets(size: int, dense: bool) -> list[int]:
    edge = 16 if dense else 4
    spread = 40 if dense else 8
    found = set(range(min(edge, size))) | set(range(max(0, size - edge), size))
    found |= {size * i // spread for i in range(1, spread)}
    return sorted(found)


def lengths(size: int, dense: bool) -> list[int]:
    found = {0, 1, 9, 17, size // 2, size - 8, size - 1}
    if dense:
        found |= {2, 3, 4, 5, 8, 16, 32, 64, 128, 512, 4096, size // 4, 3 * size // 4,
                  size - 64, size - 16, size - 9, size - 2}
    return sorted(n for n in found if 0 <= n < size)


def corpus(base: Base, dense: bool, identity: Path) -> Iterator[tuple[str, Mutation, bool]]:
    """(name, mutation, foreign) for every case of this kind; `foreign`: no backup of ours is
    there under that id (so "not listed, not verified ok, not restored" is the detection)."""
    bid, name = base.id, base.artifact

    def artifact(data: bytes, rewrite: bool = False, raw: bytes | None = None) -> Mutation:
        """Replace the artifact; `rewrite`: make the manifest's stored checksum/size match;
        `raw`: also make its raw checksum/size match (only the RDB checks are left)."""
        def mutate(d: Path) -> str:
            (d / name).write_bytes(data)
            if rewrite or raw is not None:
                manifest = dict(base.manifest, stored_size=len(data),
                                stored_sha256=hashlib.sha256(data).hexdigest())
                if raw is not None:
                    manifest.update(raw_size=len(raw),
                                    raw_sha256=hashlib.sha256(raw).hexdigest())
                write_manifest(d, bid, manifest)
            return bid
        return mutate

    def manifest(data: dict[str, Any] | bytes) -> Mutation:
        def mutate(d: Path) -> str:
            write_manifest(d, bid, data)
            return bid
        return mutate

    stored, raw = base.stored, base.raw
    for rewrite in (False, True):
        level = "matching manifest" if rewrite else "manifest as written"
        if not rewrite or base.kind != "none":  # none: stored == raw, same cases below
            for offset in offsets(len(stored), dense):
                damaged = flipped(stored, offset)
                if rewrite and base.decodes_intact(damaged, identity):
                    continue  # e.g. gzip's MTIME: the backup itself is intact
                yield f"flip byte {offset} ({level})", artifact(damaged, rewrite), False
        for length in lengths(len(stored), dense):
            yield f"truncated to {length} ({level})", artifact(stored[:length], rewrite), False
        yield f"appended byte ({level})", artifact(stored + b"\0", rewrite), False
        yield f"appended 100 bytes ({level})", artifact(stored + os.urandom(100), rewrite), False
        yield f"wrong magic ({level})", artifact(b"XXXX" + stored[4:], rewrite), False
        yield f"zip magic ({level})", artifact(b"PK\x03\x04" + stored[4:], rewrite), False
        yield f"valid zstd of garbage ({level})", artifact(
            zstandard.ZstdCompressor().compress(os.urandom(4000)), rewrite), False
        yield f"valid gzip of garbage ({level})", artifact(gzip.compress(os.urandom(4000)),
                                                          rewrite), False
        yield f"valid zstd of the RDB, wrong codec ({level})", artifact(
            zstandard.ZstdCompressor().compress(raw) if base.kind != "zstd"
            else gzip.compress(raw), rewrite), False
        if base.kind != "none":
            yield f"the raw RDB, uncompressed ({level})", artifact(raw, rewrite), False
        else:
            yield f"RDB with a zero CRC ({level})", artifact(raw[:-8] + b"\0" * 8, rewrite), False
    # Deeper: a valid container around a damaged RDB, every checksum in the manifest matching.
    broken_rdbs = {
        "RDB with one flipped byte": flipped(raw, len(raw) // 2),
        "RDB with a flipped CRC": flipped(raw, len(raw) - 3),
        "RDB truncated by 1": raw[:-1],
        "RDB truncated to half": raw[: len(raw) // 2],
        "RDB with trailing garbage": raw + b"garbage!",
        "not an RDB": os.urandom(len(raw)),
        "empty RDB": b"",
        "RDB header only": raw[:9],
        "RDB without its EOF opcode": raw[:-9] + raw[-8:],
    }
    for what, bad in broken_rdbs.items():
        yield f"{what} (all checksums match)", artifact(base.encode(bad), raw=bad), False
    # The manifest.
    m = base.manifest

    def hexflip(text: str) -> str:
        return ("0" if text[0] != "0" else "1") + text[1:]

    yield "manifest: stored_sha256 differs", manifest(dict(m, stored_sha256=hexflip(
        m["stored_sha256"]))), False
    yield "manifest: raw_sha256 differs", manifest(dict(m, raw_sha256=hexflip(
        m["raw_sha256"]))), False
    yield "manifest: stored_size + 1", manifest(dict(m, stored_size=m["stored_size"] + 1)), False
    yield "manifest: raw_size - 1", manifest(dict(m, raw_size=m["raw_size"] - 1)), False
    yield "manifest: rdb_version + 1", manifest(dict(m, rdb_version=m["rdb_version"] + 1)), False
    yield "manifest: huge sizes", manifest(dict(m, raw_size=10**30, stored_size=10**30)), False
    if dense or base.kind == "zstd":  # parsing does not depend on the kind
        for what, data in {
            "empty": b"", "one brace": b"{", "random bytes": os.urandom(300),
            "invalid UTF-8": b'{"id": "\xff\xfe"}', "a JSON array": b"[]", "JSON null": b"null",
            "a JSON number": b"42", "a JSON string": b'"x"',
            "truncated": json.dumps(m).encode()[:-5],
            "nested 100k deep": b"[" * 100_000 + b"]" * 100_000,
            "nested objects 50k deep": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
            "over 1 MiB": json.dumps(dict(m, tag="x" * (1 << 20))).encode(),
            "NUL bytes": json.dumps(m).encode().replace(b"{", b"{\0", 1),
            "a second id key, last": json.dumps(m).encode()[:-1] + b', "id": "x"}',
        }.items():
            yield f"manifest: {what}", manifest(data), False
        wrong: dict[str, list[Any]] = {
            "id": [None, 5, [], "../../etc/passwd", "20990101T000000Z-abcdef", bid + "\n"],
            "artifact": [None, 5, "../" + name, "/etc/passwd", name + "\0", name.upper(),
                         bid + ".json", name + "/x", "x" * 5000],
            "created_at": [None, 5, "yesterday", ""],
            "stored_size": [None, "5", 1.5, True, -1, [], {}],
            "raw_size": [None, "5", 2.5, False, -1],
            "stored_sha256": [None, 5, "abc", "G" * 64, m["stored_sha256"].upper(), ""],
            "raw_sha256": [None, 5, "xyz", m["raw_sha256"] + "0"],
            "compression": [None, 5, "lz4", "ZSTD", ""],
            "encryption": [None, 5, "aes", "AGE", True],
            "rdb_version": ["10", None, 1.0, True],
            "keys": ["1", 1.5, None, True],
            "keys_per_db": [[], "x", {"db0": "1"}, {"db0": None}, {"db0": 1.5}, 5],
            "redis": [[], "x", 5, {"version": 7}, {"port": "x"}, {"port": True},
                      {"version": None}, {"aof_enabled": "yes"}],
            "age_recipients": ["x", [1], None, {}],
            "warnings": ["x", [1], 5],
            "format_version": [2, "1", None, 99],
            "keys_exact": ["yes", 1, None],
            "upload": [5, None, []],
            "tag": [5, None, ["x"]],
            "trigger": [5, None],
            "duration_s": ["1", None, []],
        }
        for key, values in wrong.items():
            for value in values:
                bad_type = manifest(dict(m, **{key: value}))
                yield f"manifest: {key} = {json.dumps(value)[:40]}", bad_type, False
        for key in ("id", "artifact", "stored_sha256", "raw_size", "compression", "encryption",
                    "created_at"):
            yield f"manifest: no {key}", manifest({k: v for k, v in m.items() if k != key}), False
    if base.kind != "age":
        def claims_age(d: Path) -> str:  # renamed to .age, manifest says age: not encrypted
            (d / name).rename(d / f"{name}.age")
            write_manifest(d, bid, dict(m, encryption="age", artifact=f"{name}.age"))
            return bid
        yield "manifest claims an encryption the artifact does not have", claims_age, False
    # Foreign files with backup-like names, instead of the backup.
    foreign_id = "20300101T000000Z-abcdef"

    def replace_with(maker: Callable[[Path], None], target: str = name) -> Mutation:
        def mutate(d: Path) -> str:
            (d / target).unlink()
            maker(d / target)
            return bid
        return mutate

    outside = base.dir.parent / f"outside-{base.kind}"
    yield "artifact is a symlink", replace_with(lambda p: p.symlink_to(outside / name)), False
    yield "artifact is a directory", replace_with(lambda p: p.mkdir()), False
    yield "artifact is a FIFO", replace_with(lambda p: os.mkfifo(p)), False
    yield "manifest is a symlink", replace_with(lambda p: p.symlink_to(outside / f"{bid}.json"),
                                                f"{bid}.json"), True
    yield "manifest is a directory", replace_with(lambda p: p.mkdir(), f"{bid}.json"), True
    yield "manifest is a FIFO", replace_with(lambda p: os.mkfifo(p), f"{bid}.json"), True

    def foreign(files: dict[str, bytes], check: str = foreign_id) -> Mutation:
        def mutate(d: Path) -> str:
            for path in d.iterdir():
                path.unlink()
            for file_name, data in files.items():
                (d / file_name).write_bytes(data)
            return check
        return mutate

    fid_manifest = json.dumps(dict(m, id=foreign_id, artifact=name.replace(bid, foreign_id)))
    nl_id = foreign_id + "\n"
    yield "an artifact without manifest", foreign({name.replace(bid, foreign_id): stored}), True
    yield "a temp file of a backup", foreign({f".{name.replace(bid, foreign_id)}.tmp-1234":
                                              stored}), True
    yield "uppercase id", foreign({
        f"{foreign_id.upper()}.json": fid_manifest.replace(foreign_id, foreign_id.upper())
        .encode(), name.replace(bid, foreign_id.upper()): stored}, foreign_id.upper()), True
    yield "a newline in the id", foreign({
        f"{nl_id}.json": json.dumps(dict(m, id=nl_id, artifact=name.replace(bid, nl_id)))
        .encode(), name.replace(bid, nl_id): stored}, foreign_id), True
    yield "hidden manifest", foreign({f".{foreign_id}.json": fid_manifest.encode(),
                                      name.replace(bid, foreign_id): stored}), True
    yield "manifest.bak", foreign({f"{foreign_id}.json.bak": fid_manifest.encode(),
                                   name.replace(bid, foreign_id): stored}), True
    yield "id with a short random part", foreign({
        f"{foreign_id[:-1]}.json": fid_manifest.replace(foreign_id, foreign_id[:-1]).encode(),
        name.replace(bid, foreign_id[:-1]): stored}, foreign_id), True


# -- running a case -------------------------------------------------------------------------------


@dataclass
class Target:
    service: Service
    config: Path
    identity: Path
    state: tuple[Any, ...]

    def now(self) -> tuple[Any, ...]:
        i = info(self.service.port)
        client = harness.redis_client(self.service.port)
        try:
            save = client.config_get("save")
        finally:
            client.close()
        return (i["run_id"], i["rdb_saves"], i.get("db0", {}).get("keys"), save,
                sha256(self.service.dir / "dump.rdb"), self.service.restore_leftovers())


def run_case(target: Target, case_dir: Path, check_id: str, foreign: bool,
             codes: dict[int, int]) -> list[str]:
    """Everything wrong with how backupd handled this case (empty: detected and refused).
    `codes` counts restore's exit codes: 3 (corrupt), 1 (refused earlier, before anything
    changed: the RDB version the manifest claims, the space it claims, no such backup),
    2 (not an id)."""
    env = {"BACKUPD_BACKUP__DIR": str(case_dir)}
    problems = []
    ident = ["--identity-file", str(target.identity)]
    listed = cli_fast(target.config, "list", "--json", env=env)
    table = cli_fast(target.config, "list", env=env)
    for ran in (listed, table):
        if ran.code != 0 or ran.crashed:
            problems.append(f"list failed ({ran.code}): {ran.crashed[-300:]}{ran.stderr[-300:]}")
    if foreign and listed.code == 0 and json.loads(listed.stdout):
        problems.append(f"list shows a foreign file as a backup: {listed.stdout[:200]}")
    one = cli_fast(target.config, "verify", check_id, *ident, env=env)
    every = cli_fast(target.config, "verify", "--all", *ident, env=env)
    restored = cli_fast(target.config, "restore", check_id, "--yes", *ident, env=env)
    for what, ran in (("verify ID", one), ("verify --all", every), ("restore", restored)):
        if ran.crashed or '"unexpected_error"' in ran.stderr:
            problems.append(f"{what} raised: {ran.crashed[-400:]}{ran.stderr[-400:]}")
    if foreign:  # not a backup: never verified as ok, never restored
        if one.code == 0 or restored.code == 0 or every.code not in (0, 3):
            problems.append(f"foreign file: verify {one.code}, verify --all {every.code}, "
                            f"restore {restored.code}")
    else:
        if one.code != 3 or every.code != 3:
            problems.append(f"verify exit {one.code}, verify --all exit {every.code} "
                            f"(expected 3): {one.stdout.strip()[:200]}{one.stderr[-200:]}")
        if restored.code not in (1, 3):  # 3: corrupt; 1: refused by a check on the way
            problems.append(f"restore exit {restored.code}: "
                            f"{harness.last_event(restored.stderr).get('error', '')}")
    codes[restored.code] = codes.get(restored.code, 0) + 1
    now = target.now()
    if now != target.state:
        problems.append("REDIS WAS TOUCHED")
        target.state = now  # report each case once
    return problems


def make_bases(tmp_path: Path, service: Service, recipient: str, identity: Path
               ) -> list[Base]:
    bases = []
    for kind in KINDS:
        d = tmp_path / f"base-{kind}"
        extra = {"zstd": "", "gzip": 'compression = "gzip"\ncompression_level = 6',
                 "none": 'compression = "none"\ncompression_level = 0',
                 "age": f"age_recipients = [{json.dumps(recipient)}]"}[kind]
        config = write_config(tmp_path / f"{kind}.toml", service.server, d, extra)
        ran = cli_fast(config, "backup", "--no-prune")
        assert ran.code == 0, ran.stderr
        backup_id = ran.stdout.strip().splitlines()[-1]
        manifest = json.loads((d / f"{backup_id}.json").read_text())
        stored = (d / manifest["artifact"]).read_bytes()
        sink = io.BytesIO()
        unpack(io.BytesIO(stored), sink, compression=manifest["compression"],
               encrypted=manifest["encryption"] == "age",
               identities=load_identities(str(identity)))
        outside = tmp_path / f"outside-{kind}"
        shutil.copytree(d, outside)
        bases.append(Base(kind, d, backup_id, manifest, stored, sink.getvalue(), recipient))
    return bases


def fresh_case(base: Base, root: Path, n: int) -> Path:
    d = root / f"case-{base.kind}-{n}"
    d.mkdir(mode=0o700)
    for path in base.dir.iterdir():
        if not path.name.startswith("."):
            shutil.copy2(path, d / path.name)
    return d


@pytest.fixture
def target(tmp_path: Path, services: Callable[..., Service],
           age_key: tuple[str, Path]) -> tuple[Target, list[Base]]:
    service = services()
    populate(service.port, 1500, 40)
    config = write_config(tmp_path / "restore.toml", service.server, tmp_path / "unused",
                          service.restore_section())
    bases = make_bases(tmp_path, service, *age_key)
    client = harness.redis_client(service.port)
    client.save()
    client.close()
    found = Target(service, config, age_key[1], ())
    found.state = found.now()
    return found, bases


def run_corpus(tmp_path: Path, target: Target, bases: list[Base], dense: bool) -> None:
    root = tmp_path / "cases"
    root.mkdir()
    failures: dict[str, list[str]] = {}
    codes: dict[int, int] = {}
    tried = 0
    for base in bases:
        for n, (name, mutate, foreign) in enumerate(corpus(base, dense, target.identity)):
            case_dir = fresh_case(base, root, n)
            check_id = mutate(case_dir)
            problems = run_case(target, case_dir, check_id, foreign, codes)
            tried += 1
            if problems:
                failures[f"{base.kind}: {name}"] = problems
            with contextlib.suppress(OSError):
                shutil.rmtree(case_dir)
    detected = tried - len(failures)
    STATS["corrupt_tried"] += tried
    STATS["corrupt_detected"] += detected
    print(f"corrupt or hostile files: {tried} tried, {detected} detected "
          f"({100 * detected / tried:.1f}%); restore exit codes {codes}")
    (tmp_path / "undetected.json").write_text(json.dumps(failures, indent=1))
    assert not failures, f"{len(failures)} of {tried} not detected or refused: " + \
        json.dumps(failures, indent=1)[:6000]


def test_corrupt_files_are_detected_and_refused(tmp_path: Path,
                                                target: tuple[Target, list[Base]]) -> None:
    run_corpus(tmp_path, *target, dense=False)


@pytest.mark.slow
def test_corrupt_files_dense(tmp_path: Path, target: tuple[Target, list[Base]]) -> None:
    run_corpus(tmp_path, *target, dense=True)


def test_real_cli_exit_codes(tmp_path: Path, target: tuple[Target, list[Base]]) -> None:
    """A sample through the real `backupd` processes: exit 3 from verify and restore."""
    found, bases = target
    root = tmp_path / "cli-cases"
    root.mkdir()
    picks = {"zstd": "flip byte 0 (manifest as written)", "gzip": "RDB with one flipped",
             "none": "manifest: raw_sha256 differs", "age": "RDB with one flipped"}
    n = 0
    for base in bases:
        for name, mutate, _ in corpus(base, False, found.identity):
            if not name.startswith(picks[base.kind]):
                continue
            n += 1
            case_dir = fresh_case(base, root, n)
            check_id = mutate(case_dir)
            env = {"BACKUPD_BACKUP__DIR": str(case_dir)}
            ident = ["--identity-file", str(found.identity)]
            verify = cli(found.config, "verify", check_id, *ident, env=env)
            restore = cli(found.config, "restore", check_id, "--yes", *ident, env=env)
            harness.no_traceback(verify.stderr, restore.stderr)
            assert (verify.returncode, restore.returncode) == (3, 3), (base.kind, name,
                                                                     verify.stdout)
            assert found.now() == found.state, f"Redis touched by {base.kind}: {name}"
    assert n == 4
