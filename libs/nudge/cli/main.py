"""Entry point of the `nudge` command: argument parsing and dispatch to the command groups.

Exit codes: 0 success; 1 the operation failed (rejected event, invalid campaign, unhealthy
service, database problem); 2 usage or configuration error, or a gRPC error
(``error: <CODE>: <details>``); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nudge.cli import admin, api, dispatch_cmds, health, rules_cmds, up
from nudge.cli.common import CliError


def build_parser() -> argparse.ArgumentParser:
    """The full `nudge` argument parser (each command sets ``func``)."""
    parser = argparse.ArgumentParser(
        prog="nudge",
        description="Nudge, a triggered-messaging engine: run the stack locally and talk to it.",
        epilog="Client commands read NUDGE_API_KEY, NUDGE_<SERVICE>_ADDR and DATABASE_URL from "
        "the environment and, when unset there, from $NUDGE_STATE_DIR/env (default "
        ".nudge/env) written by `nudge up`.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    up.register(commands)
    admin.register(commands)
    api.register(commands)
    rules_cmds.register(commands)
    dispatch_cmds.register(commands)
    health.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `nudge` with `argv` (default: sys.argv[1:]); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except CliError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `nudge messages u1 | head`
        sys.stderr.close()
        return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
