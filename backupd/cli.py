"""Command line: thin click commands over the actions; errors become documented exit codes.

Exit codes: 0 ok, 1 operation failed, 2 usage or config error, 3 integrity failure, 4 busy.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import structlog

from backupd import __version__, logs
from backupd import config as config_mod
from backupd.choices import ALL_LOCATIONS, Location, RestoreMethod, values
from backupd.errors import EXIT_FAILED, EXIT_INTEGRITY, BackupdError
from backupd.runtime import keep_buffers

log = structlog.get_logger("backupd")
F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  operation failed (Redis, disk, S3, restore)
  2  usage or configuration error
  3  integrity failure (a backup is corrupt)
  4  busy (another backup holds the lock)"""


def handle_errors(func: F) -> F:
    """Map BackupdError to its exit code with one clear, secret-free line; never a traceback."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BackupdError as exc:
            log.error("command_failed", command=func.__name__, error=logs.mask(str(exc)),
                      error_type=type(exc).__name__, exit_code=exc.exit_code)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            log.error("interrupted", command=func.__name__)
            sys.exit(130)
        except Exception as exc:  # a bug: say so, with a masked traceback, exit 1
            log.exception("unexpected_error", command=func.__name__,
                          error=logs.mask(f"{type(exc).__name__}: {exc}"))
            sys.exit(EXIT_FAILED)
    return wrapper  # type: ignore[return-value]


def _location_option(*, default: str) -> Callable[[F], F]:
    """`--location local|s3|all` of the commands that read or prune stored backups."""
    return click.option("--location", type=click.Choice([*values(Location), ALL_LOCATIONS]),
                        default=default, show_default=True)


class State:
    def __init__(self, config_path: str | None, log_format: str | None,
                 log_level: str | None) -> None:
        self.config_path = config_path
        self.log_format = log_format
        self.log_level = log_level
        self._config: config_mod.Config | None = None

    def config(self) -> config_mod.Config:
        if self._config is None:
            cfg = config_mod.load(self.config_path)
            logs.setup(self.log_format or cfg.log.format, self.log_level or cfg.log.level)
            for name in (cfg.redis.password_env, cfg.s3.secret_access_key_env):
                logs.register_secret(os.environ.get(name))
            for url in (cfg.notify.webhook_url, cfg.notify.healthchecks_url, cfg.s3.endpoint_url):
                logs.register_secret(url)
            self._config = cfg
        return self._config


pass_state = click.make_pass_decorator(State)


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              envvar=config_mod.CONFIG_ENV, help="TOML config file (env BACKUPD_CONFIG).")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), default=None,
              help="Log format on stderr (default: console on a TTY, else JSON).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default=None, help="Log level (default: info).")
@click.version_option(__version__, prog_name="backupd")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, log_format: str | None,
        log_level: str | None) -> None:
    """backupd: verified Redis backups, offsite copies and safe restores."""
    keep_buffers()
    logs.setup(log_format or "auto", log_level or "info")
    ctx.obj = State(config_path, log_format, log_level)


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--tag", default="", help="Free text stored in the manifest.")
@click.option("--no-prune", is_flag=True, help="Skip retention after this backup.")
@pass_state
@handle_errors
def backup(state: State, tag: str, no_prune: bool) -> None:
    """Take one backup now (then upload and prune); prints the new backup id as the last line."""
    from backupd.actions.cycle import run_cycle

    cfg = state.config()
    run_cycle(cfg, trigger="manual", tag=tag, prune=cfg.schedule.prune and not no_prune,
              on_backup=lambda manifest: click.echo(manifest.id))


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_location_option(default="all")
@click.option("--orphans", is_flag=True,
              help="Also delete leftovers without a manifest older than a day.")
@pass_state
@handle_errors
def prune(state: State, dry_run: bool, as_json: bool, location: str, orphans: bool) -> None:
    """Apply the retention policies; prints keep or delete, with reasons, for each backup."""
    import contextlib

    from backupd.actions.backup import backup_lock
    from backupd.actions.catalog import storages
    from backupd.actions.prune import prune as prune_all
    from backupd.manifest import now_utc

    cfg = state.config()
    chosen = storages(cfg, location)
    lock = (backup_lock(Path(cfg.backup.dir)) if location in ("local", "all") and not dry_run
            else contextlib.nullcontext())
    with lock:
        reports = prune_all(cfg, chosen, now=now_utc(), dry_run=dry_run, orphans=orphans)
    if as_json:
        click.echo(json.dumps([r.as_json() for r in reports], indent=2))
    else:
        for report in reports:
            click.echo(f"[{report.location}]{' (dry run)' if dry_run else ''}")
            if report.error:
                click.echo(f"  error: {report.error}")
            for d in report.decisions:
                action = "keep" if d.keep else ("would delete" if dry_run else "delete")
                if d.backup_id in report.locked:
                    action = "locked"
                elif d.backup_id in report.failed:
                    action = f"FAILED ({report.failed[d.backup_id]})"
                click.echo(f"  {action:12} {d.backup_id}  {', '.join(d.reasons)}".rstrip())
            for orphan in report.orphans:
                gone = " (deleted)" if orphan.name in report.orphans_deleted else ""
                click.echo(f"  {'orphan':12} {orphan.name}{gone}")
    if not all(r.ok for r in reports):
        sys.exit(EXIT_FAILED)


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--pending", is_flag=True, required=True,
              help="Upload every backup whose upload is pending.")
@pass_state
@handle_errors
def upload(state: State, pending: bool) -> None:
    """Upload pending backups to S3 (after an outage)."""
    from backupd.actions.backup import backup_lock
    from backupd.actions.upload import upload_pending
    from backupd.errors import UploadPending, UsageError
    from backupd.storage.local import LocalStorage
    from backupd.storage.s3 import S3Storage

    cfg = state.config()
    if not cfg.s3.enabled:
        raise UsageError("upload needs s3.bucket to be set in the configuration")
    local = LocalStorage(Path(cfg.backup.dir))
    with backup_lock(local.dir):
        result = upload_pending(local, S3Storage(cfg.s3), cfg.s3.keep_local)
    for backup_id in result.uploaded:
        click.echo(f"uploaded {backup_id}")
    if result.failed:
        raise UploadPending(f"{len(result.failed)} upload(s) still pending: "
                            + "; ".join(result.failed.values()))
    if not result.uploaded:
        click.echo("nothing pending")


@cli.command(name="list", epilog=EXIT_CODES_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@_location_option(default="all")
@click.option("--pitr", is_flag=True,
              help="Show the point-in-time windows (from, to, gaps and why) instead; "
                   "reads and checks every segment.")
@pass_state
@handle_errors
def list_cmd(state: State, as_json: bool, location: str, pitr: bool = False) -> None:
    """List backups, newest first."""
    from backupd.actions.catalog import catalog, storages

    if pitr:
        from backupd.pitr.report import text, windows_report

        report = windows_report(state.config(), location)
        click.echo(json.dumps(report, indent=2) if as_json else "\n".join(text(report)))
        return

    found = catalog(storages(state.config(), location))
    for name, listing in found.listings.items():
        for backup_id, why in listing.broken.items():
            log.warning("broken_backup", location=name, id=backup_id, problem=why)
    if as_json:
        click.echo(json.dumps([e.as_json() for e in found.entries], indent=2))
        return
    clusters = any(e.manifest.cluster is not None for e in found.entries)
    rows = [("ID", "CREATED", "KEYS", "RAW", "STORED", "RDB", "SERVER", "LOCATIONS", "UPLOAD",
             *(("CLUSTER",) if clusters else ()))]
    for entry in found.entries:
        m = entry.manifest
        shards = ((f"{len(m.cluster.shards)} shards, {m.cluster.slots_covered} slots"
                   if m.cluster is not None else "-"),) if clusters else ()
        rows.append((m.id, m.created_at, str(m.keys), _size(m.raw_size), _size(m.stored_size),
                     str(m.rdb_version), m.redis.identity.label, ",".join(entry.locations),
                     m.upload + (" !" if m.warnings else ""), *shards))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                   .rstrip())
    if not found.entries:
        click.echo("(no backups)")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("backup_id", metavar="[ID|latest]", required=False, default="latest")
@click.option("--all", "all_", is_flag=True, help="Verify every backup.")
@click.option("--deep", is_flag=True, help="Also run redis-check-rdb on the RDB.")
@click.option("--identity-file", type=click.Path(dir_okay=False),
              help="age identity file, to decrypt and check encrypted backups fully.")
@_location_option(default="local")
@click.option("--drill", is_flag=True,
              help="Load the backup into a throwaway redis-server and check its key count.")
@pass_state
@handle_errors
def verify(state: State, backup_id: str, all_: bool, deep: bool, identity_file: str | None,
           location: str, drill: bool = False) -> None:
    """Check stored backups: SHA-256, and the RDB CRC where the backup can be read."""
    if drill:
        return _verify_drill(state, backup_id, all_, identity_file, location)
    from backupd.actions.catalog import catalog, find_in, storages
    from backupd.actions.verify import verify as verify_one
    from backupd.codecs import load_identities

    cfg = state.config()
    identities = load_identities(identity_file) if identity_file else []
    failed = 0
    for storage in storages(cfg, location):
        broken: dict[str, str] = {}
        if all_:
            found = catalog([storage])
            targets, broken = [e.manifest for e in found.entries], found.listings[
                storage.name].broken
        else:
            targets = [find_in(storage, backup_id)]
        for manifest in targets:
            outcome = verify_one(storage, manifest, identities=identities, deep=deep,
                                 redis_check_rdb=cfg.verify.redis_check_rdb,
                                 scratch_dir=Path(cfg.backup.dir) if storage.name == "local"
                                 else None)
            status = "ok" if outcome.ok else "CORRUPT"
            click.echo(f"{status:8} {manifest.id} [{storage.name}] "
                       f"{'; '.join(outcome.problems or outcome.checked)}")
            for note in outcome.notes:
                click.echo(f"{'':8} {note}")
            if not outcome.ok:
                failed += 1
                log.error("backup_corrupt", id=manifest.id, location=storage.name,
                          problems=outcome.problems)
        for broken_id, why in broken.items():
            click.echo(f"{'CORRUPT':8} {broken_id} [{storage.name}] {why}")
            failed += 1
    if failed:
        log.error("verify_failed", corrupt=failed)
        sys.exit(EXIT_INTEGRITY)


@cli.group(name="config")
def config_group() -> None:
    """Configuration commands."""


@config_group.command(name="check", epilog=EXIT_CODES_HELP)
@click.option("--check-remote", is_flag=True, help="Also test access to the S3 bucket.")
@pass_state
@handle_errors
def config_check(state: State, check_remote: bool) -> None:
    """Validate the configuration and print it, secrets shown as ***."""
    cfg = state.config()  # config.load ran every check
    effective = config_mod.effective(cfg)
    password = config_mod.redis_password(cfg.redis)
    effective["redis"]["password"] = "***" if password else "(not set)"
    click.echo(f"# configuration from {cfg.source}: valid")
    click.echo(_toml(effective))
    from backupd.actions.restore.drill import drill_server_fits
    from backupd.discovery import resolve

    fits, why = drill_server_fits(cfg)
    click.echo(f"# {'ok' if fits else 'WARNING'}: {why}")
    if cfg.redis.cluster.enabled:
        from backupd.cluster import topology

        seeds = topology.seed_endpoints(cfg.redis)
        try:
            found = topology.read(seeds)
            shape = (f"{len(found.shards)} shards, {found.covered} of 16384 slots covered, "
                     f"epoch {found.epoch}")
        except BackupdError as exc:  # the configuration is valid: say what is wrong now
            shape = f"WARNING: cannot read the slot map: {exc}"
        click.echo(f"# target: Redis Cluster via {len(seeds)} seeds ({seeds[0].describe()}): "
                   f"{shape}")
    else:
        click.echo(f"# target: {resolve(cfg.redis).describe()}")
    if check_remote:
        if not cfg.s3.enabled:
            click.echo("# --check-remote: s3.bucket is not set; nothing to check")
            return
        from backupd.storage.s3 import S3Storage

        S3Storage(cfg.s3).check_access()
        click.echo(f"# s3: bucket {cfg.s3.bucket!r} prefix {cfg.s3.prefix!r}: reachable")


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    lines: list[str] = []
    tables = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    for key, value in tables:
        name = f"{prefix}{key}"
        lines.append(f"\n[{name}]")
        lines.append(_toml(value, name + "."))
    return "\n".join(line for line in lines if line)


# --- The sidecar: `run` and `health` (backupd/daemon.py, backupd/health.py) ---


@cli.command(epilog=EXIT_CODES_HELP)
@pass_state
@handle_errors
def run(state: State) -> None:
    """Run the scheduler daemon (the image's default command) until SIGTERM or SIGINT."""
    from backupd.daemon import run_daemon

    run_daemon(state.config())


@cli.command(name="health")
@pass_state
def health_cmd(state: State) -> None:
    """Exit 0 when the daemon's last backup is fresh, else 1, with a one-line reason.

    For the Docker HEALTHCHECK: reads <backup.dir>/.backupd-state.json, which the daemon keeps;
    needs neither HTTP nor Redis. Any error is exit 1 (Docker reserves exit code 2).
    """
    from backupd.health import check

    try:
        verdict = check(state.config())
    except BackupdError as exc:
        click.echo(f"unhealthy (error): {logs.mask(str(exc))}")
        sys.exit(EXIT_FAILED)
    click.echo(logs.mask(f"{'healthy' if verdict.ok else 'unhealthy'} ({verdict.status}): "
                         f"{verdict.reason}"))
    sys.exit(0 if verdict.ok else EXIT_FAILED)


# --- Restore: `restore` and `verify --drill` (backupd/actions/restore/) ---


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("backup_id", metavar="[ID|latest]", required=False, default="latest")
@click.option("--from", "from_", type=click.Choice(values(Location)), default=None,
              help="Where to read the backup (default: local if it is there, else s3).")
@click.option("--before", metavar="TIMESTAMP",
              help="The newest backup at or before this time, e.g. 2026-01-02T03:00:00Z.")
@click.option("--identity-file", type=click.Path(dir_okay=False),
              help="age identity file, to decrypt an encrypted backup.")
@click.option("--dry-run", is_flag=True,
              help="Download and check everything, print the plan, change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--method", type=click.Choice(values(RestoreMethod)),
              default=None,
              help="How to stop and start Redis (default: restore.method).")
@click.option("--start", is_flag=True,
              help="Start Redis after the restore even if it was not running before.")
@click.option("--rollback", is_flag=True,
              help="Put back the data from before the last restore (also after an "
                   "interrupted restore).")
@click.option("--to-time", metavar="TIMESTAMP",
              help="The data as it was at this moment, from a base backup and the "
                   "point-in-time segments of [pitr] (without any segments: as --before).")
@click.option("--keys", "patterns", multiple=True, metavar="PATTERN",
              help="Restore only the keys matching this glob (repeatable) into the running "
                   "server, with RESTORE ... ABSTTL: no restart.")
@click.option("--db", type=click.IntRange(0), default=None,
              help="With --keys: only this database (default: every database of the backup).")
@click.option("--into", type=click.Choice(["live"]), default="live", show_default=True,
              help="With --keys: where the keys go (the running server of [redis]).")
@click.option("--conflict", type=click.Choice(["skip", "replace", "fail"]), default="skip",
              show_default=True,
              help="With --keys, for keys the live server has: skip them (never overwrite), "
                   "replace them (their values go into the undo record), or fail before "
                   "writing anything.")
@click.option("--undo-keys", "undo_run", metavar="RUN",
              help="Undo the selective restore RUN: put back the values it replaced and "
                   "delete the keys it created.")
@click.option("--force-memory", is_flag=True,
              help="Restore even when the backup needs more memory than the target's "
                   "maxmemory (keys get evicted, or writes fail with OOM).")
@click.option("--reshard", is_flag=True,
              help="A cluster backup into a cluster of another shape: every key written to "
                   "the primary of its slot (RESTORE ... ABSTTL); try --dry-run first.")
@pass_state
@handle_errors
def restore(state: State, backup_id: str, from_: str | None, before: str | None,
            identity_file: str | None, dry_run: bool, yes: bool, method: str | None,
            start: bool, rollback: bool, to_time: str | None = None,
            patterns: tuple[str, ...] = (), db: int | None = None, into: str = "live",
            conflict: str = "skip", undo_run: str | None = None,
            force_memory: bool = False, reshard: bool = False) -> None:
    """Replace Redis's data with a backup: verified, AOF-aware, with a safety copy.

    With --keys, put back only the matching keys into the running server (see README
    "Restoring a few keys")."""
    from backupd.actions import restore as action
    from backupd.actions.restore import selective
    from backupd.actions.restore.options import Options, Ui
    from backupd.errors import UsageError
    from backupd.manifest import parse_time

    if to_time and before:
        raise UsageError("give --to-time or --before, not both")
    if to_time and (undo_run or rollback or backup_id != "latest"):
        raise UsageError("--to-time takes no backup ID, --undo-keys or --rollback")
    if to_time and patterns:  # a few keys come from a backup: the newest at or before it
        before, to_time = to_time, None
    if (patterns or undo_run) and (rollback or method or start):
        raise UsageError("--keys and --undo-keys take no --rollback, --method or --start "
                         "(nothing is stopped)")
    if undo_run and (patterns or backup_id != "latest" or before or dry_run):
        raise UsageError("--undo-keys takes only the run id (and --yes)")
    if not patterns and (db is not None or conflict != "skip"):
        raise UsageError("--db and --conflict go with --keys")
    if reshard and (patterns or undo_run or rollback):
        raise UsageError("--reshard restores a whole cluster backup: no --keys, --undo-keys "
                         "or --rollback")
    if rollback and (backup_id != "latest" or before or from_ or dry_run or identity_file):
        raise UsageError("--rollback takes no backup ID, --before, --from, --identity-file "
                         "or --dry-run")
    opts = Options(selector=backup_id, source=from_,
                   before=parse_time(before) if before else None,
                   identity_file=identity_file, dry_run=dry_run, yes=yes,
                   method=method, start=start, force_memory=force_memory, reshard=reshard,
                   to_time=parse_time(to_time) if to_time else None)
    ui = Ui(echo=click.echo,
            confirm=lambda text: click.confirm(text, default=False, err=True),
            interactive=sys.stdin.isatty(), progress=sys.stderr.isatty())
    cfg = state.config()
    if cfg.redis.cluster.enabled and (patterns or undo_run or rollback):
        raise UsageError("--keys, --undo-keys and --rollback do not work on a cluster yet: "
                         "restore the whole cluster backup (README \"Redis Cluster\")")
    if undo_run:
        sys.exit(selective.undo(cfg, undo_run, yes, ui))
    if patterns:
        sys.exit(selective.restore_keys(cfg, opts, selective.KeysOptions(patterns, db, conflict),
                                        ui))
    sys.exit(action.rollback(cfg, opts, ui) if rollback else action.restore(cfg, opts, ui))


def _reading_options(*, plural: bool) -> Callable[[F], F]:
    """--json, --identity-file and --from of the commands that read backups into a throwaway
    server (diff, inspect), worded for one backup or several."""
    backups, encrypted = ("backups", "encrypted backups") if plural else \
        ("backup", "an encrypted backup")
    options = [
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
        click.option("--identity-file", type=click.Path(dir_okay=False),
                     help=f"age identity file, to decrypt {encrypted}."),
        click.option("--from", "from_", type=click.Choice(values(Location)), default=None,
                     help=f"Where to read the {backups} (default: local if there, else s3)."),
    ]

    def decorate(func: F) -> F:
        for option in reversed(options):  # listed in --help in this order
            func = option(func)
        return func
    return decorate


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("a", metavar="[A]", required=False, default="latest")
@click.argument("b", metavar="[B|live]", required=False, default="live")
@click.option("--keys", "patterns", multiple=True, metavar="PATTERN",
              help="Compare only keys matching this glob (repeatable; default all).")
@click.option("--db", type=click.IntRange(0), default=None, help="Only this database.")
@click.option("--list", "list_names", is_flag=True, help="Also name every key that differs.")
@_reading_options(plural=True)
@pass_state
@handle_errors
def diff(state: State, a: str, b: str, patterns: tuple[str, ...], db: int | None,
         list_names: bool, as_json: bool, identity_file: str | None,
         from_: str | None) -> None:
    """Keys only in A, only in B, changed (type, value, TTL class), per prefix: two backups
    (IDs or latest), or a backup and the live server (default: latest vs live)."""
    from backupd.actions import diff as action

    opts = action.DiffOptions(a, b, patterns or ("*",), db, list_names, identity_file, from_)
    report = action.diff(state.config(), opts, sys.stderr.isatty())
    click.echo(json.dumps(action.as_json(report), indent=2) if as_json else action.text(report))


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("backup_id", metavar="[ID|latest]", required=False, default="latest")
@click.option("--keys", "patterns", multiple=True, metavar="PATTERN",
              help="Only keys matching this glob (repeatable; default all).")
@_reading_options(plural=False)
@pass_state
@handle_errors
def inspect(state: State, backup_id: str, patterns: tuple[str, ...], as_json: bool,
            identity_file: str | None, from_: str | None) -> None:
    """What a backup holds per prefix: key count, types, TTLs and memory, read from a
    throwaway redis-server (never production)."""
    from backupd.actions import inspect as action

    result = action.inspect(state.config(), backup_id, patterns or ("*",), identity_file, from_,
                            sys.stderr.isatty())
    click.echo(json.dumps(result.as_json(), indent=2) if as_json else action.text(result))


def _verify_drill(state: State, backup_id: str, all_: bool, identity_file: str | None,
                  location: str) -> None:
    """`verify --drill`: restore into a throwaway redis-server; exit 3 on a key mismatch,
    1 when the drill cannot run (e.g. redis-server older than the RDB)."""
    from backupd.actions.catalog import find_in, storages
    from backupd.actions.restore.drill import drill
    from backupd.codecs import load_identities
    from backupd.errors import UsageError

    if all_:
        raise UsageError("--drill checks one backup at a time; give an ID or latest")
    cfg = state.config()
    identities = load_identities(identity_file) if identity_file else []
    worst = 0
    for storage in storages(cfg, location):
        manifest = find_in(storage, backup_id)
        if manifest.encrypted and not identities:
            raise UsageError(f"backup {manifest.id} is encrypted: give --identity-file")
        result = drill(cfg, storage, manifest, identities,
                       Path(cfg.backup.dir) if storage.name == "local" else None)
        click.echo(f"{'ok' if result.ok else 'FAILED':8} {manifest.id} [{storage.name}] "
                   f"{result.message}")
        worst = max(worst, result.exit_code)
    if worst:
        sys.exit(worst)


def main() -> None:
    cli(prog_name="backupd")
