"""Child-process entry points that the benchmark times (each run is a process of its own, so
that GNU time reports its peak RSS). They print `name=value` pairs for measure.run().

    python -m bench.driver pack SRC DIR COMPRESSION LEVEL [RECIPIENT]
        backupd's local backup path after the snapshot, on a ready dump.rdb: pack() (RDB check,
        SHA-256s, compression, encryption, fsync, rename) and the manifest (write_atomic), as
        backupd.actions.backup.run_backup calls them: work_seconds. Then run_backup's read-back
        check of the artifact, timed on its own: readback_seconds.
    python -m bench.driver unpack ARTIFACT COMPRESSION [OUT]
        unpack() of a stored artifact: into nowhere (what `backupd verify` does), or into the
        new file OUT followed by fsync (what a restore's staging does): work_seconds.
    python -m bench.driver upload FILE ENDPOINT BUCKET KEY
        Scenario 3's baseline upload: one boto3 `upload_file` with default settings.
    python -m bench.driver bgsave PORT
        BGSAVE and wait for it to finish (polling INFO every 10 ms): work_seconds.
    python -m bench.driver load PORT DIR
        Start redis-server on DIR/dump.rdb, wait until it answers with the data loaded
        (polling every 5 ms): work_seconds; then shut it down without saving.

BENCH_PIPELINE=FILE makes pack and unpack use that copy of backupd/pipeline.py instead (for
`python -m bench.compare`, the before/after of pipeline changes).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType


def pipeline() -> ModuleType:
    path = os.environ.get("BENCH_PIPELINE")
    if not path:
        from backupd import pipeline as current

        return current
    spec = importlib.util.spec_from_file_location("bench_pipeline_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def pack(src: Path, directory: Path, compression: str, level: int, recipients: list[str]) -> None:
    from backupd import manifest as mf
    from backupd.actions.backup import check_stored
    from backupd.storage.local import LocalStorage, ensure_dir

    started = time.perf_counter()
    ensure_dir(directory)
    storage = LocalStorage(directory)
    backup_id = mf.new_id(mf.now_utc())
    name = mf.artifact_name(backup_id, compression, bool(recipients))
    with open(src, "rb") as fh:
        packed = pipeline().pack(fh, directory / name, compression=compression, level=level,
                             recipients=recipients)
    pack_seconds = time.perf_counter() - started
    manifest = mf.Manifest(
        id=backup_id, created_at=mf.format_time(mf.now_utc()), trigger="bench", tag="",
        redis=mf.RedisFacts(), rdb_version=packed.rdb.version, rdb_checksum=packed.rdb.checksum,
        keys=0, keys_per_db={}, raw_size=packed.raw.size, raw_sha256=packed.raw.sha256,
        stored_size=packed.stored.size, stored_sha256=packed.stored.sha256,
        compression=compression, encryption="age" if recipients else "none", artifact=name,
        age_recipients=recipients)
    storage.write_manifest(manifest)
    packed_at = time.perf_counter()
    check_stored(storage, manifest)
    done = time.perf_counter()
    print(f"work_seconds={packed_at - started:.4f} pack_seconds={pack_seconds:.4f} "
          f"readback_seconds={done - packed_at:.4f} stored_size={packed.stored.size}")


def unpack(artifact: Path, compression: str, out: Path | None) -> None:
    unpack_stream = pipeline().unpack
    started = time.perf_counter()
    with open(artifact, "rb") as src:
        if out is None:
            unpack_stream(src, None, compression=compression, encrypted=False)
        else:
            with open(out, "xb", buffering=1 << 20) as fh:  # as the restore opens it
                unpack_stream(src, fh, compression=compression, encrypted=False)
                fh.flush()
                os.fsync(fh.fileno())
    print(f"work_seconds={time.perf_counter() - started:.4f}")


def upload(path: Path, endpoint: str, bucket: str, key: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.upload_file(str(path), bucket, key)


def bgsave(port: int) -> None:
    from bench.redisproc import client, wait_until

    conn = client(port)
    saves = int(conn.info("persistence")["rdb_saves"])
    started = time.perf_counter()
    conn.bgsave()

    def done() -> bool:
        state = conn.info("persistence")
        return int(state["rdb_saves"]) > saves and not int(state["rdb_bgsave_in_progress"])

    wait_until(done, 600, "BGSAVE", step=0.01)
    print(f"work_seconds={time.perf_counter() - started:.4f}")


def load(port: int, directory: Path) -> None:
    from bench.redisproc import RedisServer

    server = RedisServer(directory, port)
    seconds = server.start(timeout=600)
    server.stop()
    print(f"work_seconds={seconds:.4f}")


def main(argv: list[str]) -> None:
    command, args = argv[0], argv[1:]
    if command == "pack":
        pack(Path(args[0]), Path(args[1]), args[2], int(args[3]), args[4:])
    elif command == "unpack":
        unpack(Path(args[0]), args[1], Path(args[2]) if len(args) > 2 else None)
    elif command == "upload":
        upload(Path(args[0]), args[1], args[2], args[3])
    elif command == "bgsave":
        bgsave(int(args[0]))
    elif command == "load":
        load(int(args[0]), Path(args[1]))
    else:
        raise SystemExit(f"unknown driver command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
