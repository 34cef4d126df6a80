"""Configuration read once from the environment, failing fast with the variable's name."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping


class ConfigError(Exception):
    """A required environment variable is missing or malformed."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


def env_str(name: str, default: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Return the variable's value, or `default`; raise ConfigError when neither exists."""
    source = os.environ if env is None else env
    value = source.get(name)
    if value is None or value == "":
        if default is None:
            raise ConfigError(name, "is required but not set")
        return default
    return value


def env_int(name: str, default: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """Return the variable as an int."""
    raw = env_str(name, None if default is None else str(default), env)
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(name, f"must be an integer, got {raw!r}") from None


def env_float(
    name: str, default: float | None = None, env: Mapping[str, str] | None = None
) -> float:
    """Return the variable as a float."""
    raw = env_str(name, None if default is None else repr(default), env)
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(name, f"must be a number, got {raw!r}") from None


_ADDRESS = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]*):(?P<port>\d{1,5})$")


def env_address(name: str, default: str, env: Mapping[str, str] | None = None) -> str:
    """Return a `host:port` listen/connect address (`:50051` means 127.0.0.1:50051)."""
    raw = env_str(name, default, env)
    match = _ADDRESS.match(raw)
    if not match or not 0 < int(match["port"]) < 65536:
        raise ConfigError(name, f"must be host:port, got {raw!r}")
    host = match["host"] or "127.0.0.1"
    return f"{host}:{match['port']}"
