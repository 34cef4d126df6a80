"""`nudge up` end to end: the real stack as processes, driven by the `nudge` command.

Starts `nudge up` on free ports with a fresh state directory (embedded Postgres, nats-server,
the four services), waits for its `nudge ready:` line, checks gRPC health of the four services,
tracks events with `nudge track` (which finds the address and API key in `.nudge/env`), kills
a service to see it restarted, then stops the stack with SIGTERM and checks that it exits 0 and
leaves no service process behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nudge.cli.health import check
from nudge.dev.stack import free_ports

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("ingest", "rules", "scheduler", "dispatch")
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0


def _base_env() -> dict[str, str]:
    """The environment without any Nudge settings, with an absolute PYTHONPATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("NUDGE_") and k not in {"DATABASE_URL", "NATS_URL"}
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "libs"), str(REPO)])
    return env


class Output:
    """Collects the merged output of a process in a thread; waits for a line."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        assert proc.stdout is not None
        self._stream = proc.stdout
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for raw in self._stream:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()

    def wait_for(
        self, prefix: str, proc: subprocess.Popen[bytes], timeout: float, after: int = 0
    ) -> str:
        """The first line from index `after` on that starts with `prefix`; fail if the process
        exits or time runs out."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[after:]:
                    if line.startswith(prefix):
                        return line
                if proc.poll() is not None:
                    pytest.fail(f"nudge up exited with rc={proc.returncode}:\n{self.tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"no {prefix!r} line after {timeout}s:\n{self.tail()}")
                self._changed.wait(min(remaining, 0.5))

    def close(self) -> None:
        """After the process and its children exited: wait for EOF, close the pipe."""
        self._thread.join(5)
        if not self._thread.is_alive():
            self._stream.close()

    def tail(self, count: int = 60) -> str:
        """The last lines seen."""
        return "\n".join(self.lines[-count:])


@pytest.fixture
def state_root() -> Iterator[Path]:
    """A fresh directory (not under pytest's 0700 basetemp: Postgres runs as another user
    when the tests run as root)."""
    path = Path(tempfile.mkdtemp(prefix="nudge-e2e-cli-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _nudge(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nudge.cli.main", *args],
        cwd=cwd,
        env=_base_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_serves_tracks_and_stops_cleanly(state_root: Path) -> None:
    *service_ports, nats_port = free_ports(5)
    addresses = {
        name: f"127.0.0.1:{port}" for name, port in zip(SERVICES, service_ports, strict=True)
    }
    env = _base_env()
    env.update({f"NUDGE_{name.upper()}_ADDR": addr for name, addr in addresses.items()})
    env["NUDGE_NATS_PORT"] = str(nats_port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nudge.cli.main", "up", "--state-dir", str(state_root / ".nudge")],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output = Output(proc)
    try:
        ready = output.wait_for("nudge ready:", proc, READY_TIMEOUT_S)
        for name, address in addresses.items():
            assert f"{name}={address}" in ready
        assert sum("ready" in line for line in output.lines if line.startswith("nudge")) == 1
        key_line = output.wait_for("api key: ", proc, 5)
        assert re.fullmatch(r"api key: nk_\w{12}_[\w-]+", key_line)
        assert (state_root / ".nudge" / "env").exists()
        assert f"nats://127.0.0.1:{nats_port}" in output.tail(200)

        for name, address in addresses.items():
            assert check(address) == (True, "SERVING"), name

        pids = {
            m[1]: int(m[2])
            for line in output.lines
            if (m := re.match(r"nudge: started (\w+) \(pid (\d+)\)", line))
        }
        assert set(pids) == set(SERVICES)

        # `nudge track` from the directory holding .nudge/ finds the address and key there.
        event_id = str(uuid.uuid4())
        args = ["track", "--user", "u1", "--event", "signup", "--props", '{"plan": "pro"}']
        first = _nudge(state_root, *args, "--event-id", event_id)
        assert (first.returncode, first.stdout) == (0, f"accepted {event_id}\n"), first.stderr
        again = _nudge(state_root, *args, "--event-id", event_id)
        assert (again.returncode, again.stdout) == (0, f"duplicate {event_id}\n"), again.stderr
        bad_key = "nk_aaaaaaaaaaaa_" + "b" * 43
        refused = _nudge(state_root, *args, "--api-key", bad_key)
        assert refused.returncode == 2
        assert refused.stderr.startswith("error: UNAUTHENTICATED: "), refused.stderr

        # The supervisor restarts a service that dies.
        seen = len(output.lines)
        os.kill(pids["ingest"], signal.SIGKILL)
        restarted = output.wait_for("nudge: started ingest (pid ", proc, 10, after=seen)
        new_pid = int(re.findall(r"pid (\d+)", restarted)[0])
        assert new_pid != pids["ingest"]
        pids["ingest"] = new_pid
        deadline = time.monotonic() + 20
        while check(addresses["ingest"]) != (True, "SERVING"):
            assert time.monotonic() < deadline, output.tail()
            time.sleep(0.1)
        after_restart = _nudge(state_root, *args)
        assert after_restart.stdout.startswith("accepted "), after_restart.stderr

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"nudge up did not exit {STOP_TIMEOUT_S}s after SIGTERM:\n{output.tail()}")
        assert rc == 0, output.tail()
        assert time.monotonic() - started < STOP_TIMEOUT_S
        leftovers = {name: pid for name, pid in pids.items() if _alive(pid)}
        assert not leftovers, output.tail()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the services die with it (PR_SET_PDEATHSIG)
            proc.wait()
        output.close()


def test_up_fails_fast_when_a_service_cannot_start(state_root: Path) -> None:
    *service_ports, nats_port = free_ports(5)
    env = _base_env()
    for name, port in zip(SERVICES, service_ports, strict=True):
        env[f"NUDGE_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
    env["NUDGE_NATS_PORT"] = str(nats_port)
    env["NUDGE_WEBHOOK_SECRET"] = "not-a-secret"  # dispatch refuses to start with it
    result = subprocess.run(
        [sys.executable, "-m", "nudge.cli.main", "up", "--state-dir", str(state_root / "s")],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "error: dispatch exited with rc=" in result.stderr
    assert "nudge ready" not in result.stdout
    pids = [int(pid) for pid in re.findall(r"nudge: started \w+ \(pid (\d+)\)", result.stderr)]
    assert len(pids) == 4
    assert not [pid for pid in pids if _alive(pid)]
