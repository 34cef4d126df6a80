"""Commands that work on the database directly (``DATABASE_URL``): migrate, keys, time."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TypeVar

import asyncpg

from nudge.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    cli_env,
    parse_duration,
    parse_scopes,
    require,
)

T = TypeVar("T")

WORKSPACE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
CLOCK_CHANNEL = "nudge_clock"
"""NOTIFY channel that tells the services the dev clock moved."""


def database_url() -> str:
    """``DATABASE_URL`` from the environment or the env file of `nudge up`."""
    return require(cli_env(), "DATABASE_URL")


def run_db(work: Callable[[asyncpg.Connection], Awaitable[T]], dsn: str | None = None) -> T:
    """Connect to the database, run `work(conn)`, close; connection problems become CliError."""

    async def main() -> T:
        conn = await asyncpg.connect(dsn or database_url(), timeout=10)
        try:
            return await work(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(main())
    except (OSError, TimeoutError) as error:
        raise CliError(f"cannot connect to the database: {error}") from None
    except asyncpg.UndefinedTableError as error:
        raise CliError(f"database: {error} (run `nudge migrate` first)") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise CliError(f"database: {error}") from None


def format_skew(skew: timedelta) -> str:
    """A dev clock offset for humans: ``+14d 1h30m``, ``+0s``."""
    sign = "-" if skew < timedelta(0) else "+"
    seconds = abs(skew.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if days:
        parts.append(f"{int(days)}d")
    if hours or minutes:
        parts.append(f"{int(hours)}h{int(minutes):02d}m" if hours else f"{int(minutes)}m")
    if secs or not parts:
        parts.append(f"{secs:g}s")
    return sign + " ".join(parts)


def is_production(environ: dict[str, str] | None = None) -> bool:
    """True when ``NUDGE_ENV=production`` (the dev clock must never move)."""
    source = os.environ if environ is None else environ
    return source.get("NUDGE_ENV", "").strip().lower() == "production"


# --------------------------------------------------------------------------------------------
# commands


def run_migrate(args: argparse.Namespace) -> int:
    """`nudge migrate`: apply pending migrations and list them; a no-op when up to date."""
    from nudge.migrate import apply_migrations_on, migration_files

    applied = run_db(apply_migrations_on)
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print(f"up to date ({len(migration_files())} migrations)")
    return EXIT_OK


def run_keys_create(args: argparse.Namespace) -> int:
    """`nudge keys create`: ensure the workspace, create a key, print it (stdout, alone)."""
    from nudge.auth import create_api_key, ensure_workspace

    workspace = args.workspace
    if not WORKSPACE_PATTERN.match(workspace):
        raise CliError(
            f"--workspace: {workspace!r} is not a workspace id "
            "(lowercase letters, digits, '_' and '-', at most 63, starting with a letter or digit)",
            EXIT_USAGE,
        )
    scopes = parse_scopes(args.scopes)

    async def create(conn: asyncpg.Connection) -> str:
        async with conn.transaction():
            await ensure_workspace(conn, workspace)
            return await create_api_key(conn, workspace, scopes, args.description)

    key = run_db(create)
    print(key)
    print(
        f"created an API key for workspace {workspace} with scopes {','.join(sorted(scopes))}",
        file=sys.stderr,
    )
    return EXIT_OK


async def _clock_reading(conn: asyncpg.Connection) -> tuple[datetime, timedelta, bool]:
    row = await conn.fetchrow(
        "SELECT nudge_now() AS now, skew, enabled FROM dev_clock WHERE singleton"
    )
    if row is None:
        raise CliError("database: the dev_clock row is missing (run `nudge migrate`)")
    return row["now"], row["skew"], row["enabled"]


def _print_clock(now: datetime, skew: timedelta, enabled: bool) -> None:
    state = f"dev clock {format_skew(skew)}" if enabled else "dev clock disabled"
    print(f"{now.isoformat()} ({state})")


def run_time_now(args: argparse.Namespace) -> int:
    """`nudge time now`: print the database time (``nudge_now()``) and the dev clock offset."""
    _print_clock(*run_db(_clock_reading))
    return EXIT_OK


def run_time_advance(args: argparse.Namespace) -> int:
    """`nudge time advance DURATION`: move the dev clock forward and wake the services.

    Refused (exit 1) when ``NUDGE_ENV=production`` or the database's dev clock is disabled.
    """
    try:
        step = parse_duration(args.duration)
    except ValueError as error:
        raise CliError(str(error), EXIT_USAGE) from None
    if is_production():
        raise CliError("the dev clock cannot be advanced when NUDGE_ENV=production")

    async def advance(conn: asyncpg.Connection) -> tuple[datetime, timedelta, bool]:
        async with conn.transaction():
            enabled = await conn.fetchval(
                "SELECT enabled FROM dev_clock WHERE singleton FOR UPDATE"
            )
            if not enabled:
                raise CliError(
                    "the dev clock is disabled in this database; it is enabled by `nudge up` "
                    "(not in production) and only then can time be advanced"
                )
            await conn.execute(
                "UPDATE dev_clock SET skew = skew + $1::interval WHERE singleton", step
            )
            await conn.execute(f"NOTIFY {CLOCK_CHANNEL}")
        return await _clock_reading(conn)

    _print_clock(*run_db(advance))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# argument parsers


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add migrate, keys and time."""
    migrate = commands.add_parser(
        "migrate",
        help="apply database migrations ($DATABASE_URL)",
        description="Apply pending migrations to $DATABASE_URL and print them. Safe to run "
        "twice and from several processes at once.",
    )
    migrate.set_defaults(func=run_migrate)

    keys = commands.add_parser("keys", help="manage API keys ($DATABASE_URL)")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND")
    key_commands.required = True
    create = key_commands.add_parser(
        "create",
        help="create an API key (and the workspace if needed); prints the key",
        description="Create the workspace if it does not exist and a new API key for it. The "
        "key is printed once on stdout; only its hash is stored.",
    )
    create.add_argument("--workspace", required=True, help="workspace id, e.g. acme")
    create.add_argument(
        "--scopes", default="track,admin", help="comma-separated scopes (default: %(default)s)"
    )
    create.add_argument("--description", default="", help="a note stored with the key")
    create.set_defaults(func=run_keys_create)

    time_parser = commands.add_parser("time", help="read or advance the dev clock ($DATABASE_URL)")
    time_commands = time_parser.add_subparsers(dest="time_command", metavar="COMMAND")
    time_commands.required = True
    now = time_commands.add_parser("now", help="print the database time (nudge_now())")
    now.set_defaults(func=run_time_now)
    advance = time_commands.add_parser(
        "advance",
        help="move the dev clock forward",
        description="Add DURATION to the dev clock offset and notify the services. Refused "
        "unless the dev clock is enabled (nudge up enables it outside production).",
    )
    advance.add_argument("duration", metavar="DURATION", help="e.g. 90s, 15m, 1h, 14d, 1h30m")
    advance.set_defaults(func=run_time_advance)
