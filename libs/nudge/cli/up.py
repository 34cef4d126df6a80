"""`nudge up`: the whole stack on one machine, no Docker, no root required.

1. Infrastructure: embedded Postgres (data in ``<state-dir>/pg``, reused across runs) unless
   ``DATABASE_URL`` is set; nats-server with JetStream (store in ``<state-dir>/nats``, port
   ``$NUDGE_NATS_PORT`` or 4222, a free port if that one is busy) unless ``NATS_URL`` is set.
2. Database: migrations; the dev clock enabled (unless ``NUDGE_ENV=production``); workspace
   ``dev`` and an API key with every scope, kept in ``<state-dir>/dev-api-key`` and reused while
   it stays valid; a webhook signing secret in ``<state-dir>/webhook-secret`` unless
   ``NUDGE_WEBHOOK_SECRET`` is set.
3. The four services as separate OS processes (``python -m services.<name>``), their output
   passed through; once all report SERVING (grpc.health.v1, 60 s at most) one line
   ``nudge ready: ingest=... rules=... scheduler=... dispatch=...`` and ``api key: nk_...`` go
   to stdout, and ``<state-dir>/env`` gets ``export`` lines for other terminals.
4. Supervision: a service that dies is restarted with a capped exponential backoff; one that
   stops answering SERVING for 30 s is stopped (SIGTERM, SIGKILL after 10 s) and restarted; a
   nats-server or Postgres we started is restarted if it dies. SIGINT or SIGTERM stops
   everything: SIGTERM to the services, SIGKILL after 10 s, then nats-server and Postgres if we
   started them; exit 0. If a service exits before it is healthy, everything is stopped and
   `nudge up` exits 1 naming it.

Messages of `nudge up` itself go to stderr, prefixed ``nudge:``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import asyncpg

from nudge.cli.admin import is_production
from nudge.cli.common import (
    DEFAULT_STATE_DIR,
    ENV_FILE_NAME,
    EXIT_OK,
    EXIT_USAGE,
    SERVICES,
    STATE_DIR_ENV,
    CliError,
    address_variable,
    format_env_file,
    service_address,
    write_private_file,
)
from nudge.cli.health import check
from nudge.dev.stack import (
    NatsHandle,
    PostgresHandle,
    StackError,
    _die_with_parent,
    free_port,
    start_nats,
    start_postgres,
)

DEV_WORKSPACE = "dev"
DEFAULT_SMTP_URL = "smtp://127.0.0.1:2525"
DEFAULT_NATS_PORT = 4222
DEV_DATABASE = "nudge"
DEV_WEBHOOK_ALLOW_HOSTS = "127.0.0.1,localhost"
API_KEY_FILE = "dev-api-key"
DISPATCH_HTTP_VARIABLE = "NUDGE_DISPATCH_HTTP_ADDR"
DISPATCH_HTTP_DEFAULT = "127.0.0.1:50055"
WEBHOOK_SECRET_FILE = "webhook-secret"  # noqa: S105 - a file name

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.2
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 15.0
STABLE_AFTER_S = 30.0
"""A service that ran this long before dying is restarted after the initial backoff again."""
PROBE_INTERVAL_S = 5.0
UNHEALTHY_RESTART_S = 30.0
"""A running service that has not answered SERVING for this long is stopped and restarted."""


def say(message: str) -> None:
    """A status line of `nudge up` itself (stderr, so stdout keeps only the key lines)."""
    print(f"nudge: {message}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived while starting."""


class StopSignal:
    """Counts SIGINT/SIGTERM; the main loop polls it. A second signal hurries the shutdown."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.count = 0

    def install(self) -> None:
        """Handle SIGINT and SIGTERM in this (main) thread."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.event.set()

    @property
    def is_set(self) -> bool:
        """True once a stop was requested."""
        return self.event.is_set()

    def raise_if_set(self) -> None:
        """Raise Interrupted when a stop was requested (between start-up steps)."""
        if self.event.is_set():
            raise Interrupted

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` s; return early (True) when a stop is requested."""
        return self.event.wait(timeout)


# --------------------------------------------------------------------------------------------
# the service processes


@dataclass
class Service:
    """One supervised service process and its restart bookkeeping."""

    name: str
    address: str
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff_s: float = BACKOFF_INITIAL_S
    restart_at: float | None = None
    restarts: int = field(default=0)
    next_probe_at: float = 0.0
    healthy_at: float = 0.0
    """When the service last answered SERVING (or was started)."""
    kill_at: float | None = None
    """Set while a hung service is being stopped: SIGKILL it at this time."""

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, env: Mapping[str, str]) -> None:
        """Start ``python -m services.<name>`` in its own session, dying with us on Linux."""
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [sys.executable, "-m", f"services.{self.name}"],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C reaches only `nudge up`, which stops us in order
            preexec_fn=_die_with_parent(signal.SIGTERM),
        )
        self.started_at = self.healthy_at = time.monotonic()
        self.next_probe_at = self.started_at + PROBE_INTERVAL_S
        self.restart_at = None
        self.kill_at = None
        say(f"started {self.name} (pid {self.proc.pid}) on {self.address}")

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the process if it is alive."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def kill_group(self) -> None:
        """SIGKILL the process group (the service and anything it started) and reap."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def plan_restart(service: Service, now: float) -> float:
    """Schedule the restart of a service that exited; return the delay chosen.

    The delay doubles after each quick death up to BACKOFF_MAX_S, and starts over when the
    process had been running for STABLE_AFTER_S.
    """
    if now - service.started_at >= STABLE_AFTER_S:
        service.backoff_s = BACKOFF_INITIAL_S
    delay = service.backoff_s
    service.backoff_s = min(service.backoff_s * 2, BACKOFF_MAX_S)
    service.restart_at = now + delay
    return delay


# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class UpSettings:
    """What `nudge up` was asked to run (from flags and the environment only, no env file)."""

    state_dir: Path
    database_url: str | None
    nats_url: str | None
    nats_port: int
    smtp_url: str
    webhook_secret: str | None
    addresses: Mapping[str, str]
    metrics_addresses: Mapping[str, str | None]
    """``/metrics`` listen address per service (None: disabled with ``off``)."""
    metrics_configured: frozenset[str]
    """Services whose metrics address was set explicitly (never replaced when busy)."""
    services: tuple[str, ...]
    production: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> UpSettings:
        """Resolve flags and environment; CliError (exit 2) on malformed values."""
        state = Path(args.state_dir or environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)
        raw_port = environ.get("NUDGE_NATS_PORT") or str(DEFAULT_NATS_PORT)
        try:
            nats_port = int(raw_port)
            if not 0 <= nats_port < 65536:
                raise ValueError
        except ValueError:
            raise CliError(f"NUDGE_NATS_PORT: not a port: {raw_port!r}", EXIT_USAGE) from None
        skip = {s.strip() for item in args.skip for s in item.split(",") if s.strip()}
        unknown = skip - set(SERVICES)
        if unknown:
            raise CliError(f"--skip: unknown service(s): {', '.join(sorted(unknown))}", EXIT_USAGE)
        return cls(
            state_dir=state.absolute(),
            database_url=environ.get("DATABASE_URL") or None,
            nats_url=environ.get("NATS_URL") or None,
            nats_port=nats_port,
            smtp_url=args.smtp_url or environ.get("NUDGE_SMTP_URL") or DEFAULT_SMTP_URL,
            webhook_secret=environ.get("NUDGE_WEBHOOK_SECRET") or None,
            addresses={name: service_address(environ, name) for name in SERVICES},
            metrics_addresses=_metrics_addresses(environ),
            metrics_configured=frozenset(
                name for name in SERVICES if environ.get(f"NUDGE_{name.upper()}_METRICS_ADDR")
            ),
            services=tuple(name for name in SERVICES if name not in skip),
            production=is_production(dict(environ)),
        )


def _metrics_addresses(environ: Mapping[str, str]) -> dict[str, str | None]:
    from nudge.config import ConfigError
    from nudge.metrics import metrics_address

    try:
        return {name: metrics_address(name, environ) for name in SERVICES}
    except ConfigError as error:
        raise CliError(str(error), EXIT_USAGE) from None


def new_webhook_secret() -> str:
    """A Standard Webhooks signing secret: ``whsec_`` + base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode("ascii")


def load_or_create_webhook_secret(path: Path) -> str:
    """The secret stored at `path`, created (owner-only file) on first use."""
    with contextlib.suppress(FileNotFoundError):
        stored = path.read_text(encoding="utf-8").strip()
        if stored.startswith("whsec_"):
            return stored
    secret = new_webhook_secret()
    write_private_file(path, secret + "\n")
    return secret


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------------------------
# database preparation


async def ensure_database(admin_dsn: str, name: str) -> None:
    """CREATE DATABASE `name` on the server of `admin_dsn` unless it exists."""
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def key_is_valid(conn: asyncpg.Connection, key: str) -> bool:
    """True when `key` is a live API key of the dev workspace in this database."""
    from nudge.auth import KEY_PATTERN

    match = KEY_PATTERN.match(key)
    if not match:
        return False
    row = await conn.fetchrow(
        "SELECT secret_hash FROM api_keys WHERE key_id = $1 AND workspace_id = $2"
        " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > nudge_now())",
        match[1],
        DEV_WORKSPACE,
    )
    if row is None:
        return False
    digest = hashlib.sha256(match[2].encode()).digest()
    return hmac.compare_digest(bytes(row["secret_hash"]), digest)


@dataclass(frozen=True)
class PreparedDatabase:
    """What `prepare_database` did."""

    applied: list[str]
    api_key: str
    key_created: bool


async def prepare_database(dsn: str, stored_key: str, *, dev_clock: bool) -> PreparedDatabase:
    """Migrate, enable the dev clock, and ensure the dev workspace and key.

    `stored_key` (the key of an earlier run, or "") is reused while it is valid in this
    database; otherwise a new key with every scope is created.
    """
    from nudge.auth import SCOPES, create_api_key, ensure_workspace
    from nudge.migrate import apply_migrations_on

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        applied = await apply_migrations_on(conn)
        if dev_clock:
            await conn.execute("UPDATE dev_clock SET enabled = true")
        if stored_key and await key_is_valid(conn, stored_key):
            return PreparedDatabase(applied, stored_key, key_created=False)
        async with conn.transaction():
            await ensure_workspace(conn, DEV_WORKSPACE, "Development")
            key = await create_api_key(conn, DEV_WORKSPACE, SCOPES, "created by nudge up")
        return PreparedDatabase(applied, key, key_created=True)
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------
# the stack


class Stack:
    """Everything `nudge up` started, in order, so that `stop` can undo it."""

    def __init__(self, settings: UpSettings, stop: StopSignal) -> None:
        self.settings = settings
        self.stop_signal = stop
        self.postgres: PostgresHandle | None = None
        self.nats: NatsHandle | None = None
        self.database_url = settings.database_url or ""
        self.nats_url = settings.nats_url or ""
        self.api_key = ""
        self.services = [Service(name, settings.addresses[name]) for name in settings.services]
        self.service_env: dict[str, str] = {}
        self.metrics: dict[str, str] = {}
        """Where each service serves /metrics (after busy default ports were replaced)."""

    # -- start ---------------------------------------------------------------------------------

    def start_infrastructure(self) -> None:
        """Postgres and NATS (ours or external), migrations, dev clock, key, webhook secret."""
        state = self.settings.state_dir
        state.mkdir(parents=True, exist_ok=True)
        try:
            if not self.database_url:
                pg = start_postgres(state / "pg")
                self.postgres = pg
                asyncio.run(ensure_database(pg.dsn, DEV_DATABASE))
                self.database_url = pg.dsn_for(DEV_DATABASE)
                say(f"postgres (embedded, pid {pg.pid}) data in {pg.data_dir}")
            else:
                say("postgres: using DATABASE_URL")
            self.stop_signal.raise_if_set()
            if not self.nats_url:
                port = self.settings.nats_port
                if port == 0:
                    port = free_port()
                elif not port_is_free(port):
                    busy, port = port, free_port()
                    say(f"port {busy} is busy; nats-server will use port {port}")
                nats = start_nats(state / "nats", port)
                self.nats = nats
                self.nats_url = nats.url
                say(f"nats-server (pid {nats.pid}) on {nats.url}, store in {nats.store_dir}")
            else:
                say("nats: using NATS_URL")
        except StackError as error:
            raise CliError(str(error)) from None
        self.stop_signal.raise_if_set()
        key_file = state / API_KEY_FILE
        stored_key = key_file.read_text(encoding="utf-8").strip() if key_file.exists() else ""
        try:
            prepared = asyncio.run(
                prepare_database(
                    self.database_url, stored_key, dev_clock=not self.settings.production
                )
            )
        except (OSError, TimeoutError) as error:
            raise CliError(f"cannot connect to the database: {error}") from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise CliError(f"database: {error}") from None
        applied = prepared.applied
        say(f"migrations applied: {', '.join(applied)}" if applied else "migrations up to date")
        self.api_key = prepared.api_key
        if prepared.key_created:
            write_private_file(key_file, self.api_key + "\n")
            say(f"created an API key for workspace {DEV_WORKSPACE!r} (stored in {key_file})")
        secret = self.settings.webhook_secret or load_or_create_webhook_secret(
            state / WEBHOOK_SECRET_FILE
        )
        self.service_env = self._service_env(secret)
        self.stop_signal.raise_if_set()

    def _service_env(self, webhook_secret: str) -> dict[str, str]:
        env = dict(os.environ)  # OTEL_*, PATH, PYTHONPATH, NUDGE_* tuning pass through
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "NATS_URL": self.nats_url,
                "NUDGE_SMTP_URL": self.settings.smtp_url,
                "NUDGE_WEBHOOK_SECRET": webhook_secret,
                "PYTHONUNBUFFERED": "1",
            }
        )
        for name, address in self.settings.addresses.items():
            env[address_variable(name)] = address
        env.update(self._metrics_env())
        if not os.environ.get(DISPATCH_HTTP_VARIABLE) and not port_is_free(
            int(DISPATCH_HTTP_DEFAULT.rpartition(":")[2])
        ):
            # As for NATS and metrics: a busy default port is replaced, a configured one is not.
            replacement = f"127.0.0.1:{free_port()}"
            env[DISPATCH_HTTP_VARIABLE] = replacement
            say(f"dispatch HTTP port {DISPATCH_HTTP_DEFAULT} is busy; using {replacement}")
        if not self.settings.production:
            env.setdefault("NUDGE_WEBHOOK_ALLOW_HOSTS", DEV_WEBHOOK_ALLOW_HOSTS)
            # Open and click tracking on this machine: links point at dispatch's own server.
            http_address = env.get(DISPATCH_HTTP_VARIABLE, DISPATCH_HTTP_DEFAULT)
            env.setdefault("NUDGE_TRACKING_URL", f"http://{http_address}")
        env.setdefault("NUDGE_LOG_FORMAT", "text")
        env.pop(STATE_DIR_ENV, None)
        # One OTEL_SERVICE_NAME for all four would merge them in the trace viewer: each names
        # itself nudge-<service> (the other OTEL_* variables pass through).
        env.pop("OTEL_SERVICE_NAME", None)
        return env

    def _metrics_env(self) -> dict[str, str]:
        """``NUDGE_<SERVICE>_METRICS_ADDR`` for each service; a busy default port is replaced
        by a free one (as for NATS), an explicitly configured one is left to fail fast."""
        from nudge.metrics import metrics_variable

        env: dict[str, str] = {}
        for name, address in self.settings.metrics_addresses.items():
            variable = metrics_variable(name)
            if address is None:
                env[variable] = "off"
                continue
            host, _, port = address.rpartition(":")
            configured = name in self.settings.metrics_configured
            if not configured and not port_is_free(int(port), host):
                busy, address = address, f"{host}:{free_port()}"
                say(f"metrics port {busy} is busy; {name} will serve metrics on {address}")
            env[variable] = address
            self.metrics[name] = address
        return env

    def start_services(self) -> None:
        """Start every service process."""
        for service in self.services:
            service.start(self.service_env)

    def wait_healthy(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until every service answers SERVING; CliError if one exits or time runs out."""
        deadline = time.monotonic() + timeout
        pending = {s.name: s for s in self.services}
        last: dict[str, str] = {}
        while pending:
            for name, service in list(pending.items()):
                assert service.proc is not None
                rc = service.proc.poll()
                if rc is not None:
                    raise CliError(f"{name} exited with rc={rc} while starting (see its log above)")
                serving, what = check(service.address, timeout=1.0)
                if serving:
                    del pending[name]
                else:
                    last[name] = what
            if not pending:
                return
            if time.monotonic() > deadline:
                states = ", ".join(f"{n}: {last.get(n, '?')}" for n in pending)
                raise CliError(f"not healthy after {timeout:.0f}s: {states}")
            if self.stop_signal.wait(POLL_INTERVAL_S):
                raise Interrupted

    def write_env_file(self) -> Path:
        """Write ``<state-dir>/env`` (export lines) for other terminals and scripts."""
        values = {
            "DATABASE_URL": self.database_url,
            "NATS_URL": self.nats_url,
            "NUDGE_API_KEY": self.api_key,
        }
        for name, address in self.settings.addresses.items():
            values[address_variable(name)] = address
        for name, address in self.metrics.items():
            values[f"NUDGE_{name.upper()}_METRICS_ADDR"] = address
        path = self.settings.state_dir / ENV_FILE_NAME
        header = "written by `nudge up`; use it with: source " + str(path)
        write_private_file(path, format_env_file(values, header))
        return path

    def ready_line(self) -> str:
        """``nudge ready: ingest=... rules=... scheduler=... dispatch=...``."""
        parts = " ".join(f"{name}={self.settings.addresses[name]}" for name in SERVICES)
        return f"nudge ready: {parts}"

    # -- run -----------------------------------------------------------------------------------

    def supervise(self) -> None:
        """Until a stop signal: restart services that die (with backoff) or stay unhealthy,
        and restart NATS/Postgres if they die."""
        while not self.stop_signal.wait(POLL_INTERVAL_S):
            for service in self.services:
                self._tick(service, time.monotonic())
            self._watch_infrastructure()

    def _tick(self, service: Service, now: float) -> None:
        """One supervision step for one service."""
        assert service.proc is not None
        if service.restart_at is not None:  # dead, waiting for its backoff
            if now >= service.restart_at:
                service.restarts += 1
                service.start(self.service_env)
            return
        rc = service.proc.poll()
        if rc is not None:
            delay = plan_restart(service, now)
            say(f"{service.name} exited with rc={rc}; restarting in {delay:.1f}s")
            return
        if service.kill_at is not None:  # being stopped because it hung
            if now >= service.kill_at:
                service.kill_group()
            return
        if now < service.next_probe_at:
            return
        serving, what = check(service.address, timeout=1.0)
        now = time.monotonic()
        service.next_probe_at = now + PROBE_INTERVAL_S
        if serving:
            service.healthy_at = now
        elif now - service.healthy_at >= UNHEALTHY_RESTART_S:
            say(
                f"{service.name} not SERVING for {now - service.healthy_at:.0f}s ({what}); "
                "stopping it to restart"
            )
            service.signal(signal.SIGTERM)
            service.kill_at = now + STOP_TIMEOUT_S

    def _watch_infrastructure(self) -> None:
        handles: list[tuple[PostgresHandle | NatsHandle | None, str]] = [
            (self.postgres, "postgres"),
            (self.nats, "nats-server"),
        ]
        for handle, what in handles:
            if handle is not None and not handle.is_running:
                say(f"{what} died; restarting it")
                try:
                    handle.restart()
                except StackError as error:
                    raise CliError(f"{what} could not be restarted: {error}") from None

    # -- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM the services, SIGKILL leftovers after 10 s, then stop NATS and Postgres."""
        running = [s for s in self.services if s.running]
        if running:
            say(f"stopping {', '.join(s.name for s in running)}")
        for service in running:
            service.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(s.running for s in running) and time.monotonic() < deadline:
            if self.stop_signal.count >= 2:  # Ctrl-C again: do not wait
                break
            time.sleep(0.05)
        for service in self.services:
            if service.running:
                say(f"{service.name} did not stop in time; killing it")
            service.kill_group()
        if self.nats is not None:
            say("stopping nats-server")
            self.nats.stop()
        if self.postgres is not None:
            say("stopping postgres")
            self.postgres.stop()


# --------------------------------------------------------------------------------------------
# the command


def run_up(args: argparse.Namespace) -> int:
    """`nudge up`: start, wait healthy, announce, supervise until SIGINT/SIGTERM; stop all."""
    settings = UpSettings.from_args(args, os.environ)
    stop = StopSignal()
    stop.install()
    stack = Stack(settings, stop)
    code = EXIT_OK
    try:
        stack.start_infrastructure()
        stack.start_services()
        stack.wait_healthy()
        env_path = stack.write_env_file()
        print(stack.ready_line(), flush=True)
        print(f"api key: {stack.api_key}", flush=True)
        if stack.metrics:
            say("metrics: " + " ".join(f"{n}=http://{a}/metrics" for n, a in stack.metrics.items()))
        say(f"environment for other shells: source {env_path}")
        stack.supervise()
    except Interrupted:
        pass
    except CliError as error:
        print(f"error: {error.message}", file=sys.stderr, flush=True)
        code = error.code
    finally:
        stack.stop()
    say("stopped")
    return code


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `up` command."""
    parser = commands.add_parser(
        "up",
        help="run Postgres, NATS and the four services locally until Ctrl-C",
        description="Start the dev stack without Docker: embedded Postgres (unless "
        "DATABASE_URL), nats-server (unless NATS_URL), migrations, a dev workspace and API "
        "key, and the four services as processes. Prints `nudge ready: ...` and the API key "
        "once all are healthy, restarts services that die, and stops everything on "
        "Ctrl-C/SIGTERM. Addresses: NUDGE_INGEST_ADDR, NUDGE_RULES_ADDR, NUDGE_SCHEDULER_ADDR, "
        "NUDGE_DISPATCH_ADDR; NATS port: NUDGE_NATS_PORT (default 4222).",
    )
    parser.add_argument(
        "--state-dir",
        help=f"where data, the dev key and the env file live "
        f"(default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--smtp-url",
        help=f"SMTP server for email (default: $NUDGE_SMTP_URL or {DEFAULT_SMTP_URL})",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="SERVICE",
        help="do not start this service (run it yourself, e.g. in a debugger); repeatable",
    )
    parser.set_defaults(func=run_up)
