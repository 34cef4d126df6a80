"""The four services as real OS processes against a given database and NATS, for e2e tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nudge.dev.stack import free_ports

SERVICES = ("ingest", "rules", "scheduler", "dispatch")
ROOT = Path(__file__).resolve().parents[3]


def is_serving(address: str, timeout_s: float = 1.0) -> bool:
    """True when the server at `address` answers grpc.health.v1 Check with SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class ServiceProcesses:
    """Four service processes sharing one environment; each can be killed and restarted."""

    env: dict[str, str]
    log_dir: Path
    addresses: dict[str, str] = field(default_factory=dict)
    metrics_addresses: dict[str, str] = field(default_factory=dict)
    """Where each service serves /metrics (NUDGE_<SERVICE>_METRICS_ADDR)."""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _terminated: set[str] = field(default_factory=set)

    @classmethod
    def configure(
        cls,
        *,
        database_url: str,
        nats_url: str,
        nats_prefix: str,
        log_dir: Path,
        extra_env: Mapping[str, str] | None = None,
        tracking: bool = False,
    ) -> ServiceProcesses:
        """Pick free ports and build the environment (nothing starts yet). `tracking`: open and
        click tracking on, its links pointing at dispatch's own public HTTP server."""
        ports = iter(free_ports(2 * len(SERVICES) + 1))
        addresses = {name: f"127.0.0.1:{next(ports)}" for name in SERVICES}
        metrics_addresses = {name: f"127.0.0.1:{next(ports)}" for name in SERVICES}
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "NATS_URL": nats_url,
            "NUDGE_NATS_PREFIX": nats_prefix,
            "NUDGE_LOG_FORMAT": "json",
            "NUDGE_WEBHOOK_SECRET": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "NUDGE_WEBHOOK_ALLOW_HOSTS": "127.0.0.1,localhost",
            "PYTHONPATH": f"{ROOT / 'libs'}{os.pathsep}{ROOT}",
            **{f"NUDGE_{name.upper()}_ADDR": address for name, address in addresses.items()},
            **{
                f"NUDGE_{name.upper()}_METRICS_ADDR": address
                for name, address in metrics_addresses.items()
            },
            "NUDGE_DISPATCH_HTTP_ADDR": f"127.0.0.1:{next(ports)}",  # unsubscribe, /o/, /c/
        }
        if tracking:
            env["NUDGE_TRACKING_URL"] = f"http://{env['NUDGE_DISPATCH_HTTP_ADDR']}"
        env.update(extra_env or {})
        log_dir.mkdir(parents=True, exist_ok=True)
        return cls(
            env=env, log_dir=log_dir, addresses=addresses, metrics_addresses=metrics_addresses
        )

    def start(self, name: str) -> None:
        """Start one service process (its output goes to <log_dir>/<name>.log)."""
        log = (self.log_dir / f"{name}.log").open("ab")
        self._terminated.discard(name)
        self.processes[name] = subprocess.Popen(  # noqa: S603 (our own module)
            [sys.executable, "-m", f"services.{name}"],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def start_all(self, timeout_s: float = 60.0) -> None:
        """Start every service and wait until all are SERVING."""
        for name in SERVICES:
            self.start(name)
        self.wait_serving(SERVICES, timeout_s)

    def wait_serving(self, names: tuple[str, ...] | list[str], timeout_s: float = 60.0) -> None:
        """Wait until the named services report SERVING; raise with their logs if not."""
        deadline = time.monotonic() + timeout_s
        pending = list(names)
        while pending:
            for name in list(pending):
                process = self.processes[name]
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {process.returncode}:\n{self.log(name)}"
                    )
                if is_serving(self.addresses[name], 0.5):
                    pending.remove(name)
            if pending and time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.log(n)}" for n in pending)
                raise TimeoutError(f"not serving after {timeout_s}s: {pending}\n{logs}")
            if pending:
                time.sleep(0.05)

    def kill(self, name: str) -> None:
        """SIGKILL one service (a crash) and wait for it to die."""
        process = self.processes[name]
        process.kill()
        process.wait(10)

    def stop(self, name: str, timeout_s: float = 15.0) -> int:
        """SIGTERM one service (a graceful drain); return its exit code."""
        process = self.processes[name]
        if process.poll() is None:
            self._terminate(name)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        return int(process.returncode)

    def stop_all(self) -> dict[str, float]:
        """SIGTERM every running service, then SIGKILL leftovers; return seconds each took."""
        started = time.monotonic()
        for name in self.processes:
            self._terminate(name)
        took: dict[str, float] = {}
        for name in list(self.processes):
            self.stop(name)
            took[name] = time.monotonic() - started
        return took

    def _terminate(self, name: str) -> None:
        # One SIGTERM per process: a second one could land after the service's handler is gone
        # (asyncio.run removes it while finishing) and kill a clean drain.
        process = self.processes[name]
        if process.poll() is None and name not in self._terminated:
            self._terminated.add(name)
            process.send_signal(signal.SIGTERM)

    def log(self, name: str) -> str:
        """The service's output so far (last 6000 characters)."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""
