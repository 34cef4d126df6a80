"""Load generator of `make bench`, run as its own process so the client is not the bottleneck.

`python -m scripts.bench_load` reads one JSON config object on stdin and writes JSON lines on
stdout: ``{"event": "started", "t": ...}`` when the timed load begins, ``{"event": "loaded",
"t": ...}`` as soon as the last call returned (before any bookkeeping), then one
``{"event": "result", ...}`` line. Times are ``time.monotonic()`` (CLOCK_MONOTONIC, the same
clock in every process of the machine, so the bench process can compare them with the SMTP
sink's arrival times).

Modes:

* ``ingest``: `concurrency` closed-loop tasks send pre-encoded TrackRequests of `batch` events
  for `warmup_s` + `duration_s`; only calls that complete inside the measured window count.
  Requests are encoded by hand from a serialized template (no protobuf object per event) and
  responses are parsed only after the load stops, to keep the client's CPU use small.
* ``trigger``: an open-loop pacer sends one Track call every 1/`tick_hz` s (whether or not the
  previous returned), each with `per_tick` ``order_shipped`` events of which exactly one matches
  the campaign filter (total > 20) and belongs to a user no other matching event uses.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import grpc

from nudge.ingest.v1 import ingest_pb2
from nudge.protoconv import dict_to_struct

TRACK_METHOD = "/nudge.ingest.v1.IngestService/Track"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]
ACCEPTED = ingest_pb2.EVENT_STATUS_ACCEPTED


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def encode_track_request(template: bytes, ids: list[tuple[str, str]]) -> bytes:
    """TrackRequest bytes: `template` (a serialized Event with name and properties) with
    event_id (field 1) and user_id (field 2) set per event; `events` is field 1 of the request."""
    return b"".join(
        _field(1, _field(1, event_id.encode()) + _field(2, user_id.encode()) + template)
        for event_id, user_id in ids
    )


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class _Call:
    started: float
    ended: float
    code: str
    response: bytes | None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def run_ingest(config: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop Track load; see the module docstring."""
    batch: int = config["batch"]
    users: int = config["users"]
    tag: str = config["tag"]
    template = ingest_pb2.Event(
        name=config.get("event_name", "page_viewed"),
        properties=dict_to_struct({"path": "/products/1234", "referrer": "search", "ms": 42}),
    ).SerializeToString()
    metadata = (("authorization", f"Bearer {config['api_key']}"),)
    counter = iter(range(1 << 62))

    def next_request() -> bytes:
        ids = []
        for _ in range(batch):
            seq = next(counter)
            ids.append((f"{tag}-{seq}", f"{tag}-u{seq * 7919 % users}"))
        return encode_track_request(template, ids)

    calls: list[_Call] = []
    async with grpc.aio.insecure_channel(config["address"], options=CHANNEL_OPTIONS) as channel:
        track: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(TRACK_METHOD)
        # One warm-up call so connection set-up is not inside the window.
        await track(next_request(), metadata=metadata, timeout=30)
        cpu_start = _cpu_s()
        t0 = time.monotonic()
        window_start = t0 + config["warmup_s"]
        window_end = window_start + config["duration_s"]
        _emit({"event": "started", "t": t0, "window_start": window_start})

        async def worker() -> None:
            while True:
                request = next_request()
                started = time.monotonic()
                if started >= window_end:
                    return
                try:
                    response = await track(request, metadata=metadata, timeout=30)
                    calls.append(_Call(started, time.monotonic(), "OK", response))
                except grpc.aio.AioRpcError as error:
                    calls.append(_Call(started, time.monotonic(), error.code().name, None))
                    if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(0.05)

        await asyncio.gather(*(worker() for _ in range(config["concurrency"])))
        loaded = time.monotonic()
        cpu_load = _cpu_s() - cpu_start
        _emit({"event": "loaded", "t": loaded})

    accepted_in_window = 0
    accepted_total = 0
    events_in_window = 0
    statuses: dict[str, int] = {}
    codes: dict[str, int] = {}
    latencies: list[float] = []
    for call in calls:
        codes[call.code] = codes.get(call.code, 0) + 1
        # Counted by completion time: load is offered until window_end, so the window is busy.
        in_window = window_start <= call.ended <= window_end
        if call.response is None:
            continue
        response = ingest_pb2.TrackResponse.FromString(call.response)
        accepted = sum(1 for r in response.results if r.status == ACCEPTED)
        for result in response.results:
            name = ingest_pb2.EventStatus.Name(result.status)
            statuses[name] = statuses.get(name, 0) + 1
        accepted_total += accepted
        if in_window:
            accepted_in_window += accepted
            events_in_window += len(response.results)
            latencies.append((call.ended - call.started) * 1000)
    elapsed = window_end - window_start
    return {
        "event": "result",
        "accepted_in_window": accepted_in_window,
        "events_in_window": events_in_window,
        "window_s": elapsed,
        "events_per_s": accepted_in_window / elapsed,
        "accepted_total": accepted_total,
        "calls": len(calls),
        "codes": codes,
        "statuses": statuses,
        "call_ms_p50": _percentile(latencies, 0.5),
        "call_ms_p99": _percentile(latencies, 0.99),
        "client_cpu_s": cpu_load,
        "client_cpu_share_of_one_core": cpu_load / max(loaded - t0, 1e-9),
        "t0": t0,
        "loaded": loaded,
    }


def _trigger_requests(config: dict[str, Any]) -> list[tuple[bytes, int, str]]:
    """(request bytes, index of the matching event, its order id) per tick."""
    rng = random.Random(config.get("seed", 7))
    ticks = round(config["duration_s"] * config["tick_hz"])
    per_tick: int = config["per_tick"]
    tag: str = config["tag"]
    requests = []
    for tick in range(ticks):
        match_at = rng.randrange(per_tick)
        events = []
        order_id = f"{tag}M{tick}"
        for slot in range(per_tick):
            if slot == match_at:
                user_id = f"{config['match_user_prefix']}{tick}"
                properties = {"order_id": order_id, "total": 42.5, "eta": "Monday"}
            else:
                user_id = f"{tag}n{rng.randrange(config['other_users'])}"
                properties = {
                    "order_id": f"{tag}N{tick}-{slot}",
                    "total": float(rng.randrange(1, 21)),
                    "eta": "later",
                }
            events.append(
                ingest_pb2.Event(
                    event_id=f"{tag}-{tick}-{slot}",
                    user_id=user_id,
                    name="order_shipped",
                    properties=dict_to_struct(properties),
                )
            )
        request = ingest_pb2.TrackRequest(events=events).SerializeToString()
        requests.append((request, match_at, order_id))
    return requests


async def run_trigger(config: dict[str, Any]) -> dict[str, Any]:
    """Open-loop paced Track load with one matching event per call; see the module docstring."""
    requests = _trigger_requests(config)
    metadata = (("authorization", f"Bearer {config['api_key']}"),)
    matches: list[dict[str, Any]] = []
    codes: dict[str, int] = {}
    call_ms: list[float] = []
    lateness_ms: list[float] = []
    async with grpc.aio.insecure_channel(config["address"], options=CHANNEL_OPTIONS) as channel:
        track: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(TRACK_METHOD)
        period = 1.0 / config["tick_hz"]

        async def send(request: bytes, match_at: int, order_id: str, planned: float) -> None:
            started = time.monotonic()
            lateness_ms.append((started - planned) * 1000)
            try:
                raw = await track(request, metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] = codes.get(error.code().name, 0) + 1
                matches.append({"order_id": order_id, "sent": started, "ok": None})
                return
            ended = time.monotonic()
            codes["OK"] = codes.get("OK", 0) + 1
            call_ms.append((ended - started) * 1000)
            # Only the status of the matching event is needed; parse after timing.
            matches.append(
                {"order_id": order_id, "sent": started, "ok": ended, "raw": raw, "at": match_at}
            )

        cpu_start = _cpu_s()
        t0 = time.monotonic() + 0.05
        _emit({"event": "started", "t": t0})
        tasks = []
        for tick, (request, match_at, order_id) in enumerate(requests):
            planned = t0 + tick * period
            delay = planned - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(request, match_at, order_id, planned)))
        await asyncio.gather(*tasks)
        loaded = time.monotonic()
        cpu_load = _cpu_s() - cpu_start
        _emit({"event": "loaded", "t": loaded})

    accepted_events = 0
    out = []
    for match in matches:
        raw = match.pop("raw", None)
        at = match.pop("at", None)
        if raw is not None and at is not None:
            results = ingest_pb2.TrackResponse.FromString(raw).results
            accepted_events += sum(1 for r in results if r.status == ACCEPTED)
            if results[at].status != ACCEPTED:
                match["ok"] = None
        out.append(match)
    elapsed = max(loaded - t0, 1e-9)
    return {
        "event": "result",
        "matches": out,
        "codes": codes,
        "accepted_events": accepted_events,
        "events_per_s": accepted_events / elapsed,
        "calls": len(requests),
        "call_ms_p50": _percentile(call_ms, 0.5),
        "call_ms_p99": _percentile(call_ms, 0.99),
        "pacer_lateness_ms_p99": _percentile(lateness_ms, 0.99),
        "client_cpu_share_of_one_core": cpu_load / elapsed,
        "t0": t0,
        "loaded": loaded,
    }


def main() -> None:
    """Read the config from stdin, run the load, print the result lines."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    config = json.loads(sys.stdin.read())
    runner = run_ingest if config["mode"] == "ingest" else run_trigger
    try:
        _emit(asyncio.run(runner(config)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
