"""Pieces every command shares: errors and exit codes, the env file, settings, parsing helpers.

Pure and fast to import (no grpc, no asyncpg): the unit tests exercise this module directly.

Settings lookup: a command reads a variable from the process environment first and, when it is
unset there, from the env file `nudge up` writes (``$NUDGE_STATE_DIR/env``, default
``.nudge/env`` in the current directory). So after `nudge up` in one terminal, `nudge track ...`
works in another terminal started in the same directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
from collections import ChainMap
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, Final

from nudge.config import ConfigError, env_address

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
"""The operation ran and failed (rejected event, invalid campaign, unhealthy service...)."""
EXIT_USAGE: Final = 2
"""Bad arguments, missing configuration, or a gRPC error."""

STATE_DIR_ENV: Final = "NUDGE_STATE_DIR"
DEFAULT_STATE_DIR: Final = ".nudge"
ENV_FILE_NAME: Final = "env"

SERVICES: Final = ("ingest", "rules", "scheduler", "dispatch")
"""The four services, in start order."""

DEFAULT_ADDRESSES: Final[Mapping[str, str]] = {
    "ingest": "127.0.0.1:50051",
    "rules": "127.0.0.1:50052",
    "scheduler": "127.0.0.1:50053",
    "dispatch": "127.0.0.1:50054",
}


class CliError(Exception):
    """An expected failure: printed as ``error: <message>`` (no traceback), exit with `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def address_variable(service: str) -> str:
    """The environment variable holding a service's gRPC address, e.g. ``NUDGE_INGEST_ADDR``."""
    return f"NUDGE_{service.upper()}_ADDR"


# --------------------------------------------------------------------------------------------
# the env file


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_env_file(text: str) -> dict[str, str]:
    """Parse shell assignments, one per line: ``export NAME=value`` or ``NAME=value``.

    Values may be shell-quoted. Blank lines and ``#`` comments are skipped, and so are lines
    that are not assignments (the file is meant to be ``source``-d by a shell as well).
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # unbalanced quotes
            continue
        if tokens and tokens[0] == "export":
            tokens = tokens[1:]
        for token in tokens:
            name, sep, value = token.partition("=")
            if sep and _NAME.match(name):
                values[name] = value
    return values


def format_env_file(values: Mapping[str, str], header: str = "") -> str:
    """Render `values` as ``export NAME='value'`` lines that `parse_env_file` and sh read back."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for name, value in values.items():
        if not _NAME.match(name):
            raise ValueError(f"not a variable name: {name!r}")
        lines.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(lines) + "\n"


def read_env_file(path: Path) -> dict[str, str]:
    """The assignments in the env file at `path`; empty when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror}") from None
    return parse_env_file(text)


def write_private_file(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, readable by the owner only (it may hold secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The state directory: ``$NUDGE_STATE_DIR``, else ``.nudge`` (relative to the cwd)."""
    source = os.environ if environ is None else environ
    return Path(source.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def cli_env(environ: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """The settings a client command sees: the environment, then the env file of `nudge up`.

    Empty environment variables count as unset.
    """
    source = dict(os.environ if environ is None else environ)
    present = {name: value for name, value in source.items() if value}
    return ChainMap(present, read_env_file(state_dir(source) / ENV_FILE_NAME))


def require(env: Mapping[str, str], name: str) -> str:
    """A required setting, or a CliError (exit 2) that says how to provide it."""
    value = env.get(name)
    if not value:
        raise CliError(
            f"{name} is not set (export it, or run `nudge up` in this directory first)",
            EXIT_USAGE,
        )
    return value


def service_address(env: Mapping[str, str], service: str, override: str | None = None) -> str:
    """The gRPC address of `service`: `override`, else ``NUDGE_<SERVICE>_ADDR``, else default.

    ``:50051`` means ``127.0.0.1:50051``.
    """
    name = address_variable(service)
    source: Mapping[str, str] = {name: override} if override else env
    try:
        return env_address(name, DEFAULT_ADDRESSES[service], source)
    except ConfigError as error:
        raise CliError(str(error), EXIT_USAGE) from None


# --------------------------------------------------------------------------------------------
# argument parsing helpers


def parse_json_object(text: str, option: str) -> dict[str, Any]:
    """Parse a JSON object given on the command line; CliError (exit 2) names the option."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise CliError(f"{option}: invalid JSON: {error}", EXIT_USAGE) from None
    if not isinstance(value, dict):
        raise CliError(f"{option}: must be a JSON object, got {type(value).__name__}", EXIT_USAGE)
    return value


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS: Final[Mapping[str, float]] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}


def parse_duration(text: str) -> timedelta:
    """Parse a positive duration: ``90s``, ``15m``, ``1h``, ``14d``, ``2w``, ``500ms``, ``1.5h``,
    or several parts together, ``1h30m``. Raise ValueError otherwise."""
    compact = text.strip().replace(" ", "")
    position = 0
    seconds = 0.0
    for match in _DURATION_PART.finditer(compact):
        if match.start() != position:
            break
        seconds += float(match[1]) * _UNIT_SECONDS[match[2]]
        position = match.end()
    if not compact or position != len(compact):
        raise ValueError(f"not a duration: {text!r} (examples: 90s, 15m, 1h, 14d, 1h30m)")
    if seconds <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return timedelta(seconds=seconds)


def parse_time(text: str, option: str) -> datetime:
    """Parse a time argument, as an aware UTC datetime: ``YYYY-MM-DD`` (midnight UTC) or an
    ISO 8601 date-time (UTC when it has no offset). CliError (exit 2) otherwise."""
    value = text.strip()
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(0), tzinfo=UTC)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(
            f"{option}: must be a date (YYYY-MM-DD) or an ISO 8601 date-time, got {text!r}",
            EXIT_USAGE,
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_scopes(text: str) -> frozenset[str]:
    """Parse a comma-separated scope list (``track,admin``); CliError (exit 2) on unknown ones."""
    from nudge.auth import SCOPES

    scopes = frozenset(part.strip() for part in text.split(",") if part.strip())
    if not scopes:
        raise CliError("--scopes: give at least one scope", EXIT_USAGE)
    unknown = scopes - SCOPES
    if unknown:
        raise CliError(
            f"--scopes: unknown scope(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(SCOPES))})",
            EXIT_USAGE,
        )
    return scopes


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a header line."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)
