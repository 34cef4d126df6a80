"""SchedulerService over a real gRPC server built by the composition root."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from nats.aio.client import Client as NatsClient

from nudge import bus
from nudge.dev.stack import free_port
from nudge.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.__main__ import SERVICE_NAME, serve
from services.scheduler.settings import Settings

from .conftest import FiredInbox

REPO = Path(__file__).resolve().parents[3]
SERVING = health_pb2.HealthCheckResponse.SERVING


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    # Called by method path: the grpc_health stubs do not type HealthStub's methods.
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    reply: health_pb2.HealthCheckResponse = await check(
        health_pb2.HealthCheckRequest(service=service), timeout=1.0
    )
    return reply.status


async def _list_services(channel: grpc.aio.Channel) -> set[str]:
    info = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    call = info()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    await call.done_writing()
    reply = await call.read()
    call.cancel()
    assert isinstance(reply, reflection_pb2.ServerReflectionResponse)
    return {service.name for service in reply.list_services_response.service}


async def _wait_serving(channel: grpc.aio.Channel, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            if await _health(channel) == SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        assert asyncio.get_running_loop().time() < deadline, "scheduler never became SERVING"
        await asyncio.sleep(0.1)


@pytest.fixture
async def channel(
    database_url: str, nats_url: str, test_id: str
) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a scheduler served in-process by `serve` on a free port."""
    address = f"127.0.0.1:{free_port()}"
    settings = Settings(
        address=address,
        database_url=database_url,
        nats_url=nats_url,
        nats_prefix=f"t{test_id}",
        batch_size=100,
        max_idle_s=1.0,
    )
    stop = asyncio.Event()
    server = asyncio.create_task(serve(settings, stop), name="scheduler")
    channel = grpc.aio.insecure_channel(address)
    try:
        await _wait_serving(channel)
        yield channel
    finally:
        await channel.close()
        stop.set()
        await asyncio.wait_for(server, timeout=15)


def _timer(timer_id: str = "", **fields: object) -> scheduler_pb2.Timer:
    due_at = Timestamp()
    due_at.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    values: dict[str, object] = {
        "timer_id": timer_id or str(uuid.uuid4()),
        "workspace_id": "acme",
        "topic": "reminders",
        "due_at": due_at,
        "payload": b"instance-42",
    }
    values.update(fields)
    return scheduler_pb2.Timer(**values)  # type: ignore[arg-type]


async def test_schedule_get_cancel_round_trip(channel: grpc.aio.Channel) -> None:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    timer = _timer()

    scheduled = await stub.Schedule(scheduler_pb2.ScheduleRequest(timer=timer))
    again = await stub.Schedule(scheduler_pb2.ScheduleRequest(timer=timer))
    got = await stub.Get(scheduler_pb2.GetRequest(timer_id=timer.timer_id))
    cancelled = await stub.Cancel(scheduler_pb2.CancelRequest(timer_id=timer.timer_id))
    after = await stub.Get(scheduler_pb2.GetRequest(timer_id=timer.timer_id))
    unknown = await stub.Cancel(scheduler_pb2.CancelRequest(timer_id=str(uuid.uuid4())))

    assert scheduled.timer.state == scheduler_pb2.TIMER_STATE_PENDING
    assert scheduled.timer.version == 1
    assert scheduled.timer.due_at == timer.due_at
    assert scheduled.timer.payload == b"instance-42"
    assert again.timer == scheduled.timer
    assert got.timer == scheduled.timer
    assert cancelled.state == scheduler_pb2.TIMER_STATE_CANCELLED
    assert after.timer.state == scheduler_pb2.TIMER_STATE_CANCELLED
    assert unknown.state == scheduler_pb2.TIMER_STATE_UNSPECIFIED


@pytest.mark.parametrize(
    ("timer", "field"),
    [
        (_timer(timer_id="not-a-uuid"), "timer.timer_id"),
        (_timer(topic="Bad.Topic"), "timer.topic"),
        (_timer(workspace_id="-acme"), "timer.workspace_id"),
        (_timer(traceparent="garbage"), "timer.traceparent"),
    ],
)
async def test_schedule_rejects_invalid_timers(
    channel: grpc.aio.Channel, timer: scheduler_pb2.Timer, field: str
) -> None:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Schedule(scheduler_pb2.ScheduleRequest(timer=timer))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (raised.value.details() or "")


async def test_schedule_requires_due_at(channel: grpc.aio.Channel) -> None:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    timer = _timer()
    timer.ClearField("due_at")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Schedule(scheduler_pb2.ScheduleRequest(timer=timer))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "timer.due_at" in (raised.value.details() or "")


async def test_get_and_cancel_reject_a_malformed_timer_id(channel: grpc.aio.Channel) -> None:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

    with pytest.raises(grpc.aio.AioRpcError) as get_error:
        await stub.Get(scheduler_pb2.GetRequest(timer_id="nope"))
    with pytest.raises(grpc.aio.AioRpcError) as cancel_error:
        await stub.Cancel(scheduler_pb2.CancelRequest(timer_id=""))

    assert get_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cancel_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_get_of_an_unknown_timer_is_not_found(channel: grpc.aio.Channel) -> None:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Get(scheduler_pb2.GetRequest(timer_id=str(uuid.uuid4())))

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_and_reflection_name_the_service(channel: grpc.aio.Channel) -> None:
    overall = await _health(channel)
    service = await _health(channel, SERVICE_NAME)
    listed = await _list_services(channel)

    assert overall == SERVING
    assert service == SERVING
    assert SERVICE_NAME in listed
    assert "grpc.health.v1.Health" in listed


async def test_process_serves_fires_and_drains_on_sigterm(
    database_url: str, nats_url: str, test_id: str, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    prefix = f"t{test_id}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "libs"), str(REPO)]),
        "DATABASE_URL": database_url,
        "NATS_URL": nats_url,
        "NUDGE_NATS_PREFIX": prefix,
        "NUDGE_SCHEDULER_ADDR": address,
        # The default metrics port is fixed; another stack on the machine may hold it.
        "NUDGE_SCHEDULER_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        "NUDGE_LOG_FORMAT": "text",
    }
    log_path = tmp_path / "scheduler.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.scheduler", cwd=REPO, env=env, stderr=log
        )
    nc: NatsClient = await bus.connect(nats_url, "scheduler-process-test")
    channel = grpc.aio.insecure_channel(address)
    try:
        await _wait_serving(channel)
        inbox = FiredInbox(nc.jetstream(), bus.BusNames(prefix), "reminders")
        await inbox.open()
        timer = _timer()
        timer.due_at.FromDatetime(datetime.now(UTC) - timedelta(seconds=1))
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        await stub.Schedule(scheduler_pb2.ScheduleRequest(timer=timer))

        [fired] = await inbox.wait_for(1)

        assert fired.msg_id == f"{timer.timer_id}:1"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0, log_path.read_text()
    finally:
        await channel.close()
        await nc.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
