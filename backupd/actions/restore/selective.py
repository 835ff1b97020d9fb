"""`backupd restore --keys PATTERN`: put back some keys into the running server.

The backup is staged and checked as for a full restore, loaded into a throwaway redis-server
(the drill's), and the keys matching the patterns are copied into the live target with
`RESTORE key <absolute expiry> payload ABSTTL`: no stop, no file swap, no `save ""`. Keys whose
expiry has passed are skipped and counted; `--conflict` decides about keys the live server
has (skip: RESTORE without REPLACE, so a key written meanwhile is never overwritten). Before
the first write the live values to be replaced go into an undo record (`undo_keys`).

DUMP payloads carry the RDB version of the server that made them: the throwaway must not be
newer than the target (servers.ServerId.can_load), checked before anything is fetched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import structlog

from backupd import discovery, keyspace, servers, source
from backupd import manifest as mf
from backupd.actions.restore import undo_keys
from backupd.actions.restore.loaded import Loaded, open_backup, throwaway_identity
from backupd.actions.restore.options import Options, Ui
from backupd.actions.restore.staging import Selected, identities_for, select_backup
from backupd.config import Config
from backupd.errors import RedisUnavailable, RestoreError, UsageError
from backupd.keyspace import KeyFacts
from backupd.servers import ServerId

log = structlog.get_logger("backupd.restore")

CONFLICTS = ("skip", "replace", "fail")
SHOW_NAMES = 5
BAR_FROM = 1000  # keys: fewer are done before a bar would draw


@dataclass(frozen=True)
class KeysOptions:
    patterns: tuple[str, ...]
    db: int | None = None
    conflict: str = "skip"


@dataclass
class Row:
    """One pattern in one db: the plan, then what happened."""

    pattern: str
    db: int
    new: list[KeyFacts] = field(default_factory=list)
    replace: list[KeyFacts] = field(default_factory=list)
    exists: int = 0  # live has the key: skipped (skip), refused (fail)
    expired: int = 0
    exists_names: list[str] = field(default_factory=list)
    created: int = 0
    replaced: int = 0

    def names(self) -> list[str]:
        return [keyspace.display(k.key) for k in (self.new + self.replace)[:SHOW_NAMES]]


@contextlib.contextmanager
def _redis_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise RedisUnavailable(f"lost {what}: {exc}") from None


def check_payload_fits(throwaway: ServerId, binary: str, target: ServerId) -> None:
    """RESTORE refuses a payload of a newer RDB version than the target writes."""
    if not target.can_load(throwaway.rdb_version):
        raise RestoreError(
            f"the throwaway server {binary} is {throwaway.label}: its DUMP payloads are RDB "
            f"version {throwaway.rdb_version}, which the target, {target.label}, cannot load "
            f"(it loads {target.loads}). Point verify.redis_server at a server no newer than "
            "the target (the target's own version)")


def restore_keys(config: Config, opts: Options, keys: KeysOptions, ui: Ui,
                 env: Mapping[str, str] | None = None) -> int:
    """Plan (and unless --dry-run, write) the selected keys into the live server."""
    if not (opts.yes or opts.dry_run or ui.interactive):
        raise UsageError("restore --keys writes into the live Redis and there is no terminal to "
                         "confirm on: pass --yes (or --dry-run to only look)")
    if keys.conflict not in CONFLICTS:
        raise UsageError(f"--conflict must be one of {', '.join(CONFLICTS)}")
    selected = select_backup(config, opts.selector, opts.before, opts.source, env)
    identities = identities_for(selected.manifest, opts.identity_file)
    endpoint = discovery.resolve(config.redis, env, for_restore=True)  # the master: it writes
    live = source.connect_endpoint(endpoint)
    try:
        with _redis_errors("the connection to the target Redis"):
            target = servers.from_info(live.info("server"))
        throwaway = throwaway_identity(config, selected.manifest.rdb_version)
        check_payload_fits(throwaway, config.verify.redis_server, target)
        with open_backup(config, selected, identities, ui.progress) as loaded, \
                _redis_errors("a Redis connection during the selective restore"):
            rows = _plan(loaded, live, keys)
            ui.echo(plan_text(selected, rows, keys, loaded.expired_at_load, opts.dry_run))
            if opts.dry_run:
                return 0
            _check_conflicts(rows, keys.conflict)
            total = sum(len(r.new) + len(r.replace) for r in rows)
            if not total:
                ui.echo("nothing to restore")
                return 0
            question = (f"Write {total} keys from backup {selected.manifest.id} into the live "
                        f"Redis at {endpoint.where} ("
                        f"{sum(len(r.replace) for r in rows)} replacing live values)?")
            if not opts.yes and not ui.confirm(question):
                raise RestoreError("selective restore cancelled; nothing was changed")
            run = _write(config, endpoint.where, loaded, live, rows, ui)
    finally:
        live.close()
    ui.echo(result_text(selected, rows, loaded.expired_at_load, run))
    return 0


def _plan(loaded: Loaded, live: redis.Redis, keys: KeysOptions) -> list[Row]:
    """SCAN MATCH per pattern and db in the throwaway; a key matched by two patterns counts
    for the first."""
    now_ms = _now_ms(live)
    rows: list[Row] = []
    for db in keyspace.databases(loaded.info, keys.db):
        tw, lv = keyspace.bytes_client(loaded.client, db), keyspace.bytes_client(live, db)
        seen: set[bytes] = set()
        for pattern in keys.patterns:
            row = Row(pattern, db)
            for page in keyspace.scan(tw, pattern):
                fresh = [k for k in dict.fromkeys(page) if k not in seen]
                seen.update(fresh)
                if fresh:
                    _classify(row, keyspace.facts(tw, fresh), _exists(lv, fresh), now_ms,
                              keys.conflict)
            rows.append(row)
        tw.close()
        lv.close()
    return rows


def _classify(row: Row, found: Sequence[KeyFacts], exists: Sequence[bool], now_ms: int,
              conflict: str) -> None:
    for item, there in zip(found, exists, strict=True):
        if item.expire_at == -2 or 0 < item.expire_at <= now_ms:
            row.expired += 1
        elif there and conflict == "replace":
            row.replace.append(item)
        elif there:
            row.exists += 1
            if len(row.exists_names) < SHOW_NAMES:
                row.exists_names.append(keyspace.display(item.key))
        else:
            row.new.append(item)


def _exists(client: redis.Redis, keys: Sequence[bytes]) -> list[bool]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.exists(key)
    return [bool(n) for n in pipe.execute()]


def _now_ms(client: redis.Redis) -> int:
    """The target's clock decides what has expired: it is the one that will expire keys."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _check_conflicts(rows: Sequence[Row], conflict: str) -> None:
    clashing = sum(r.exists for r in rows)
    if conflict == "fail" and clashing:
        names = [n for r in rows for n in r.exists_names][:SHOW_NAMES]
        raise RestoreError(f"{clashing} of the selected keys exist in the live server "
                           f"(--conflict fail), e.g. {', '.join(names)}; nothing was written. "
                           "Use --conflict skip or replace")


def _write(config: Config, where: str, loaded: Loaded, live: redis.Redis, rows: Sequence[Row],
           ui: Ui) -> str:
    """Undo record first (the values to be replaced), then RESTORE in pipelined batches."""
    run = mf.new_id(mf.now_utc())
    path = undo_keys.undo_path(Path(config.backup.dir), run)
    header = {"run": run, "backup": loaded.selected.manifest.id,
              "target": where,
              "created_at": mf.format_time(mf.now_utc())}
    undo_keys.write(path, header, _live_values(live, rows))
    log.info("selective_restore_undo_written", run=run, path=str(path))
    created: list[undo_keys.Record] = []
    total = sum(len(r.new) + len(r.replace) for r in rows)
    try:
        with _Bar(total, ui.progress and total >= BAR_FROM) as bar:
            for row in rows:
                tw = keyspace.bytes_client(loaded.client, row.db)
                lv = keyspace.bytes_client(live, row.db)
                try:
                    for items, replace in ((row.new, False), (row.replace, True)):
                        for batch in keyspace.batches(items):
                            done = _restore_batch(tw, lv, row, batch, replace, _now_ms(live))
                            created += [undo_keys.Record("del", row.db, key) for key in done]
                            bar.advance(len(batch))
                finally:
                    tw.close()
                    lv.close()
    except BaseException as exc:
        undo_keys.write(path, header, created, keep=path)
        if isinstance(exc, RestoreError):
            raise RestoreError(f"{exc}; the keys written so far are undone by "
                               f"`backupd restore --undo-keys {run}`") from None
        raise
    undo_keys.write(path, header, created, keep=path)
    return run


def _live_values(live: redis.Redis, rows: Sequence[Row]) -> Iterator[undo_keys.Record]:
    """DUMP + PEXPIRETIME of every live key the run will replace."""
    for row in rows:
        if not row.replace:
            continue
        lv = keyspace.bytes_client(live, row.db)
        try:
            for batch in keyspace.batches(row.replace):
                keys = [item.key for item in batch]
                for item, payload in zip(keyspace.facts(lv, keys, memory=False),
                                         keyspace.dump(lv, keys), strict=True):
                    if payload is not None:
                        yield undo_keys.Record("put", row.db, item.key, payload,
                                               item.expire_at)
        finally:
            lv.close()


def _restore_batch(tw: redis.Redis, lv: redis.Redis, row: Row, batch: Sequence[KeyFacts],
                   replace: bool, now_ms: int) -> list[bytes]:
    """RESTORE one batch; returns the keys it created (for the undo record)."""
    payloads = keyspace.dump(tw, [item.key for item in batch])
    pipe = lv.pipeline(transaction=False)
    sent: list[KeyFacts] = []
    for item, payload in zip(batch, payloads, strict=True):
        if payload is None or 0 < item.expire_at <= now_ms:
            row.expired += 1  # expired in the throwaway since the plan
            continue
        args: list[Any] = ["RESTORE", item.key, item.expire_at, payload, "ABSTTL"]
        pipe.execute_command(*([*args, "REPLACE"] if replace else args))  # type: ignore[no-untyped-call]
        sent.append(item)
    created: list[bytes] = []
    failed: list[str] = []
    for item, reply in zip(sent, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(reply, redis.exceptions.ResponseError):
            if str(reply).startswith("BUSYKEY") or "already exists" in str(reply):
                row.exists += 1  # written by a client since the plan: left alone
                continue
            failed.append(f"{keyspace.display(item.key)}: {reply}")
        elif replace:
            row.replaced += 1
        else:
            row.created += 1
            created.append(item.key)
    if failed:
        raise RestoreError(f"the target refused {len(failed)} keys, e.g. {failed[0]}")
    return created


class _Bar:
    """A rich progress bar on a terminal for big selections; nothing otherwise."""

    def __init__(self, total: int, show: bool) -> None:
        self.total, self.show = total, show
        self._progress: Any = None

    def __enter__(self) -> _Bar:
        if self.show:
            from rich.console import Console
            from rich.progress import Progress

            self._progress = Progress(console=Console(stderr=True), transient=True)
            self._progress.start()
            self._task = self._progress.add_task("restoring keys", total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n)

    def __exit__(self, *_: object) -> None:
        if self._progress is not None:
            self._progress.stop()


# -- backupd restore --undo-keys RUN ------------------------------------------------------------


def undo(config: Config, run: str, yes: bool, ui: Ui, env: Mapping[str, str] | None = None) -> int:
    """Put back the values a selective restore replaced and delete the keys it created."""
    path = undo_keys.undo_path(Path(config.backup.dir), run)
    header, records = undo_keys.read(path)
    if not (yes or ui.interactive):
        raise UsageError("--undo-keys writes into the live Redis and there is no terminal to "
                         "confirm on: pass --yes")
    endpoint = discovery.resolve(config.redis, env, for_restore=True)
    question = (f"Undo the selective restore {run} (backup {header.get('backup')}, "
                f"{header.get('created_at')}, written into {header.get('target')}) in the live "
                f"Redis at {endpoint.where}: put back the values it replaced, delete the keys "
                "it created?")
    if not yes and not ui.confirm(question):
        raise RestoreError("undo cancelled; nothing was changed")
    live = source.connect_endpoint(endpoint)
    counts = {"put": 0, "del": 0, "expired": 0}
    clients: dict[int, redis.Redis] = {}
    try:
        with _redis_errors("the connection to the target Redis"):
            pending: list[undo_keys.Record] = []
            for record in records:
                pending.append(record)
                if len(pending) >= keyspace.BATCH_KEYS:
                    _undo_batch(live, clients, pending, counts)
                    pending = []
            _undo_batch(live, clients, pending, counts)
    finally:
        for client in clients.values():
            client.close()
        live.close()
    ui.echo(f"undid selective restore {run}: put back {counts['put']} replaced values, "
            f"deleted {counts['del']} keys it created"
            + (f", {counts['expired']} put-back values had expired meanwhile (deleted)"
               if counts["expired"] else ""))
    return 0


def _undo_batch(live: redis.Redis, clients: dict[int, redis.Redis],
                batch: Sequence[undo_keys.Record], counts: dict[str, int]) -> None:
    now_ms = _now_ms(live)
    by_db: dict[int, list[undo_keys.Record]] = {}
    for record in batch:
        by_db.setdefault(record.db, []).append(record)
    for db, records in by_db.items():
        client = clients.setdefault(db, keyspace.bytes_client(live, db))
        pipe = client.pipeline(transaction=False)
        for record in records:
            if record.op == "put" and not 0 < record.expire_at <= now_ms:
                pipe.execute_command("RESTORE", record.key, record.expire_at, record.payload,
                                     "ABSTTL", "REPLACE")  # type: ignore[no-untyped-call]
                counts["put"] += 1
            else:
                pipe.delete(record.key)
                counts["del" if record.op == "del" else "expired"] += 1
        failed = [r for r in pipe.execute(raise_on_error=False)
                  if isinstance(r, redis.exceptions.ResponseError)]
        if failed:
            raise RestoreError(f"the target refused {len(failed)} undo writes, e.g. {failed[0]}")


# -- texts ------------------------------------------------------------------------------------


def plan_text(selected: Selected, rows: Sequence[Row], keys: KeysOptions,
              expired_at_load: int, dry_run: bool) -> str:
    m = selected.manifest
    exists_as = {"skip": "skip (exists)", "fail": "conflict (exists)"}.get(keys.conflict,
                                                                            "skip (exists)")
    head = "Selective restore plan (dry run: nothing was changed)" if dry_run \
        else "Selective restore plan"
    lines = [head,
             f"  backup   {m.id} [{selected.storage.name}] created {m.created_at}, {m.keys} keys",
             f"  conflict {keys.conflict}"]
    for row in rows:
        lines.append(f"  db {row.db} {row.pattern}: restore {len(row.new)}, replace "
                     f"{len(row.replace)}, {exists_as} {row.exists}, expired {row.expired}")
        if row.names():
            lines.append(f"      e.g. {', '.join(row.names())}")
        if row.exists_names:
            lines.append(f"      existing: {', '.join(row.exists_names)}")
    if expired_at_load:
        lines.append(f"  {expired_at_load} keys of the backup (any pattern) had already expired "
                     "when it was loaded: skipped")
    return "\n".join(lines)


def result_text(selected: Selected, rows: Sequence[Row], expired_at_load: int,
                run: str) -> str:
    created = sum(r.created for r in rows)
    replaced = sum(r.replaced for r in rows)
    skipped = sum(r.exists for r in rows)
    expired = sum(r.expired for r in rows) + expired_at_load
    return (f"restored {created + replaced} keys from backup {selected.manifest.id} into the "
            f"live server: {created} created, {replaced} replaced, {skipped} skipped (exist), "
            f"{expired} expired (skipped)\n"
            f"undo: backupd restore --undo-keys {run}")
