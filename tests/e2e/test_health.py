"""grpc.health.v1 of the four service processes follows NATS going away and coming back."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nudge.dev.stack import NatsHandle
from nudge.testing.services import SERVICES, ServiceProcesses, is_serving

pytestmark = pytest.mark.e2e


@pytest.fixture
def services(
    database_url: str, nats_url: str, test_id: str, tmp_path: Path
) -> Iterator[ServiceProcesses]:
    processes = ServiceProcesses.configure(
        database_url=database_url,
        nats_url=nats_url,
        nats_prefix=f"t{test_id}",
        log_dir=tmp_path / "logs",
        extra_env={"NUDGE_READINESS_INTERVAL_S": "0.5"},
    )
    try:
        processes.start_all()
        yield processes
    finally:
        processes.stop_all()


def _ready_gauge(address: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("nudge_ready "):
                return float(line.split()[1])
    raise AssertionError("no nudge_ready gauge")


def _wait_all(services: ServiceProcesses, serving: bool, timeout_s: float = 20.0) -> float:
    started = time.monotonic()
    pending = set(SERVICES)
    while pending:
        pending = {n for n in pending if is_serving(services.addresses[n], 0.5) is not serving}
        assert time.monotonic() - started < timeout_s, f"{sorted(pending)} not {serving}"
        time.sleep(0.1)
    return time.monotonic() - started


def test_services_turn_not_serving_without_nats_and_serving_when_it_returns(
    services: ServiceProcesses, nats_server: NatsHandle
) -> None:
    assert {_ready_gauge(services.metrics_addresses[n]) for n in SERVICES} == {1.0}

    nats_server.stop()
    _wait_all(services, serving=False)
    assert {_ready_gauge(services.metrics_addresses[n]) for n in SERVICES} == {0.0}

    nats_server.restart()
    _wait_all(services, serving=True)
    assert {_ready_gauge(services.metrics_addresses[n]) for n in SERVICES} == {1.0}
    assert all(p.poll() is None for p in services.processes.values())
