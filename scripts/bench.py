"""`make bench`: throughput and latency of the whole system on this machine, with its limits.

Run from the repository root: ``.venv/bin/python -m scripts.bench`` (``--help`` for options;
``--quick`` for a short smoke run). Everything runs in a private temp directory and is removed
at the end, also on Ctrl-C: embedded Postgres, nats-server (JetStream, ``sync_interval:
always``), an SMTP sink and the four services as separate processes.

stdout gets JSON lines only: first ``{"facts": ...}`` (machine, commit, settings), then one
``{"metric": NAME, "value": V, "unit": U, "runs": [...], "detail": {...}}`` per figure, last
``{"summary": ...}`` with the targets. Progress goes to stderr.

Figures, in the order they are measured (limits first, before the services start):

* ``limit_pg_copy_rows_per_s``: asyncpg COPY of events-shaped rows into a LOGGED scratch table
  ``LIKE events INCLUDING ALL`` (same indexes); the no-index figure is in the detail.
* ``limit_pg_commit_ms``: one-row autocommit INSERT round trip (the price of one WAL flush).
* ``limit_jetstream_publish_per_s``: async publishes (acks awaited in windows) to a scratch FILE
  stream; the one-at-a-time rate is in the detail.
* ``limit_grpc_roundtrip_ms``: median grpc.health.v1 Check round trip to the idle ingest service.
* ``trigger_latency_ms_p50`` / ``_p99``: the example ``order-shipped`` campaign (immediate email)
  under ~1,000 ``order_shipped`` events/s, ~50/s matching the filter, each for its own
  identified user; from Track returning OK (load process) to the SMTP sink receiving the mail
  (bench process), both on CLOCK_MONOTONIC. The detail has: the latency of single events sent
  one at a time before the load (no queueing), the path split into stages (database timestamps
  events.received_at, campaign_instances.created_at, sends.created_at/sent_at, plus core NATS
  taps on the events and dispatch subjects), the ages of open xid-holding transactions per
  service (gap-free readers wait for them), and the decisions rules wrote.
* ``ingest_events_per_s``: closed-loop Track calls of 100 events from a separate load process,
  median of the runs; ``projection_drain_s``, ``projection_events_per_s`` and
  ``projection_keeps_up`` from the rules checkpoint after each run.

Every window also records CPU seconds per process tree (services, postgres, nats-server, load
generator; ingest runs also per accepted event) and the machine's busy share, including the CPU
of processes that are not ours: on a shared machine, read the figures against that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("nudge") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "libs"))

import asyncpg  # noqa: E402
import grpc  # noqa: E402
import nats  # noqa: E402
import yaml  # noqa: E402

from nudge.auth import create_api_key, ensure_workspace  # noqa: E402
from nudge.dev.stack import NatsHandle, PostgresHandle, start_nats, start_postgres  # noqa: E402
from nudge.ingest.v1 import ingest_pb2, ingest_pb2_grpc  # noqa: E402
from nudge.migrate import apply_migrations  # noqa: E402
from nudge.protoconv import dict_to_struct  # noqa: E402
from nudge.rules.v1 import rules_pb2, rules_pb2_grpc  # noqa: E402
from nudge.testing.services import SERVICES, ServiceProcesses  # noqa: E402
from nudge.testing.sinks import SmtpSink  # noqa: E402
from scripts import bench_limits  # noqa: E402
from scripts.bench_procstat import CpuMeter, CpuSnapshot, format_delta  # noqa: E402

CAMPAIGN_FILE = ROOT / "examples" / "campaigns" / "order-shipped.yaml"
WORKSPACE = "bench"
DATABASE = "nudge_bench"
SUBJECT = re.compile(r"Your order (\S+) is on its way")
TARGETS = {
    "ingest_events_per_s": (">=", 20_000.0),
    "trigger_latency_ms_p50": ("<=", 25.0),
    "trigger_latency_ms_p99": ("<=", 100.0),
    "projection_keeps_up": ("==", True),
}
PHASES = frozenset({"limits", "trigger", "ingest"})
KEEPS_UP_DRAIN_S = 2.0
"""The projection keeps up when it reaches the last event at most this long after load stops."""

Cursor = tuple[int, int]


def emit(line: dict[str, Any]) -> None:
    """One JSON line on stdout."""
    print(json.dumps(line, default=_jsonable), flush=True)


def _jsonable(value: Any) -> Any:
    return str(value)


def say(message: str) -> None:
    """Progress on stderr."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def metric(name: str, value: Any, unit: str, runs: list[Any], detail: dict[str, Any]) -> None:
    """Print one figure."""
    emit(
        {
            "metric": name,
            "value": _round(value),
            "unit": unit,
            "runs": _round(runs),
            "detail": _round(detail),
        }
    )


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def spread(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max of a sample, for stage breakdowns."""
    return {
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
        "n": len(values),
    }


# --------------------------------------------------------------------------------------------
# options and facts


@dataclass(frozen=True)
class Options:
    """What to run (see --help)."""

    ingest_runs: int
    ingest_seconds: float
    ingest_warmup_s: float
    ingest_concurrency: int
    ingest_batch: int
    ingest_users: int
    drain_timeout_s: float
    trigger_seconds: float
    trigger_rate: float
    trigger_match_rate: float
    copy_rows: int
    copy_runs: int
    js_seconds: float
    profile: frozenset[str]
    keep: bool
    skip: frozenset[str]
    probes: bool

    @classmethod
    def parse(cls, argv: list[str] | None = None) -> Options:
        """Parse the command line."""
        parser = argparse.ArgumentParser(
            prog="python -m scripts.bench",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument("--quick", action="store_true", help="short smoke run (~1 min)")
        parser.add_argument("--ingest-runs", type=int, default=3)
        parser.add_argument("--ingest-seconds", type=float, default=10.0)
        parser.add_argument("--ingest-concurrency", type=int, default=16)
        parser.add_argument("--ingest-batch", type=int, default=100)
        parser.add_argument("--ingest-users", type=int, default=10_000)
        parser.add_argument(
            "--drain-timeout",
            type=float,
            default=15.0,
            help="seconds to wait for the projection after each ingest run",
        )
        parser.add_argument("--trigger-seconds", type=float, default=10.0)
        parser.add_argument("--trigger-rate", type=float, default=1000.0)
        parser.add_argument("--trigger-match-rate", type=float, default=50.0)
        parser.add_argument(
            "--profile",
            default="",
            help="comma-separated services to run under cProfile (implies --keep)",
        )
        parser.add_argument(
            "--skip", default="", help="comma-separated phases to skip: limits,trigger,ingest"
        )
        parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
        parser.add_argument(
            "--no-probes",
            action="store_true",
            help="no NATS taps / pg_stat_activity sampling during the trigger load (their cost "
            "is ~0.05 core; the stage breakdown then lacks the NATS stages)",
        )
        args = parser.parse_args(argv)
        quick = bool(args.quick)
        profile = frozenset(s for s in args.profile.split(",") if s)
        unknown = profile - set(SERVICES)
        if unknown:
            parser.error(f"--profile: unknown services {sorted(unknown)}")
        skip = frozenset(s for s in args.skip.split(",") if s)
        if skip - PHASES:
            parser.error(f"--skip: unknown phases {sorted(skip - PHASES)}")
        return cls(
            ingest_runs=1 if quick else args.ingest_runs,
            ingest_seconds=3.0 if quick else args.ingest_seconds,
            ingest_warmup_s=0.5 if quick else 1.0,
            ingest_concurrency=args.ingest_concurrency,
            ingest_batch=args.ingest_batch,
            ingest_users=args.ingest_users,
            drain_timeout_s=5.0 if quick else args.drain_timeout,
            trigger_seconds=3.0 if quick else args.trigger_seconds,
            trigger_rate=args.trigger_rate,
            trigger_match_rate=args.trigger_match_rate,
            copy_rows=50_000 if quick else 100_000,
            copy_runs=1 if quick else 2,
            js_seconds=0.5 if quick else 1.5,
            profile=profile,
            keep=bool(args.keep) or bool(profile),
            skip=skip,
            probes=not args.no_probes,
        )


def _run(*cmd: str) -> str:
    try:
        return subprocess.run(  # noqa: S603 - fixed argv
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_facts() -> dict[str, Any]:
    """nproc, CPU model, memory, load, commit: what the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "loadavg_at_start": list(os.getloadavg()),
        "commit": _run("git", "rev-parse", "HEAD"),
        "worktree_dirty": bool(_run("git", "status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


# --------------------------------------------------------------------------------------------
# the stack


class ProfiledServices(ServiceProcesses):
    """ServiceProcesses that can run chosen services under cProfile (<log_dir>/<name>.prof)."""

    profile: frozenset[str] = frozenset()

    def start(self, name: str) -> None:
        """Start one service, under cProfile if chosen."""
        if name not in self.profile:
            super().start(name)
            return
        log = (self.log_dir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(  # noqa: S603 - our own module
            [
                sys.executable,
                "-m",
                "cProfile",
                "-o",
                str(self.log_dir / f"{name}.prof"),
                "-m",
                f"services.{name}",
            ],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()


async def prepare_database(admin_dsn: str, dsn: str) -> str:
    """Create the database, migrate, create the workspace; return an API key."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    await apply_migrations(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await ensure_workspace(conn, WORKSPACE)
        return await create_api_key(conn, WORKSPACE, description="bench")
    finally:
        await conn.close()


@dataclass
class Stack:
    """Everything the bench started."""

    tmp: Path
    pg: PostgresHandle
    nats: NatsHandle
    sink: SmtpSink
    services: ProfiledServices
    dsn: str
    api_key: str = ""
    load_pids: set[int] = field(default_factory=set)

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        """gRPC call metadata with the bench API key."""
        return (("authorization", f"Bearer {self.api_key}"),)

    def meter(self) -> CpuMeter:
        """A CPU meter over our process trees."""
        roots = {name: proc.pid for name, proc in self.services.processes.items()}
        roots["postgres"] = self.pg.pid or -1
        roots["nats"] = self.nats.pid or -1
        roots["bench"] = os.getpid()
        return CpuMeter(roots, own_only={"bench"})


# --------------------------------------------------------------------------------------------
# database probes


async def read_checkpoint(conn: asyncpg.Connection, reader: str) -> Cursor:
    """A reader's checkpoint cursor ((0, 0) when it has none)."""
    row = await conn.fetchrow(
        "SELECT tx_id::text AS tx, global_position FROM reader_checkpoints WHERE reader = $1",
        reader,
    )
    return (0, 0) if row is None else (int(row["tx"]), int(row["global_position"]))


async def last_event(conn: asyncpg.Connection) -> Cursor:
    """The cursor of the last event in commit order."""
    row = await conn.fetchrow(
        "SELECT tx_id::text AS tx, global_position FROM events"
        " ORDER BY tx_id DESC, global_position DESC LIMIT 1"
    )
    return (0, 0) if row is None else (int(row["tx"]), int(row["global_position"]))


async def count_between(conn: asyncpg.Connection, after: Cursor, upto: Cursor) -> int:
    """Events with after < cursor <= upto (exact; the store is append-only)."""
    if upto <= after:
        return 0
    value = await conn.fetchval(
        "SELECT count(*) FROM events"
        " WHERE (tx_id, global_position) > ($1::text::xid8, $2)"
        " AND (tx_id, global_position) <= ($3::text::xid8, $4)",
        str(after[0]),
        after[1],
        str(upto[0]),
        upto[1],
    )
    return int(value)


async def wait_readers(
    conn: asyncpg.Connection, target: Cursor, timeout_s: float, readers: tuple[str, ...]
) -> dict[str, float | None]:
    """Poll until each reader's checkpoint reaches `target`; monotonic time reached (or None)."""
    reached: dict[str, float | None] = dict.fromkeys(readers)
    deadline = time.monotonic() + timeout_s
    while True:
        for reader in readers:
            if reached[reader] is None and await read_checkpoint(conn, reader) >= target:
                reached[reader] = time.monotonic()
        if all(v is not None for v in reached.values()) or time.monotonic() > deadline:
            return reached
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------------------------
# the load process


class LoadProcess:
    """`python -m scripts.bench_load` with a JSON config; yields its JSON lines."""

    def __init__(self, stack: Stack, config: dict[str, Any]) -> None:
        self._stack = stack
        self._config = config
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> LoadProcess:
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'libs'}{os.pathsep}{ROOT}"}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "scripts.bench_load",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        self._stack.load_pids.add(self.proc.pid)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(self._config).encode())
        await self.proc.stdin.drain()
        self.proc.stdin.close()
        return self

    async def next_line(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON line; RuntimeError if the process ended."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not raw:
            code = await self.proc.wait()
            raise RuntimeError(f"load generator exited with {code} (see stderr above)")
        line: dict[str, Any] = json.loads(raw)
        return line

    async def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        """Read lines until one with this event."""
        while True:
            line = await self.next_line(timeout_s)
            if line.get("event") == event:
                return line

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        self._stack.load_pids.discard(self.proc.pid)


# --------------------------------------------------------------------------------------------
# phases


async def measure_limits(stack: Stack, options: Options) -> dict[str, Any]:
    """PG COPY and JetStream publish limits (before the services start)."""
    results: dict[str, Any] = {}
    say(f"limit: COPY {options.copy_rows} rows x {options.copy_runs} runs")
    copy = await bench_limits.pg_copy(stack.dsn, options.copy_rows, options.copy_runs)
    metric("limit_pg_copy_rows_per_s", copy["value"], "rows/s", copy["runs"], copy["detail"])
    results["limit_pg_copy_rows_per_s"] = copy["value"]
    commit = await bench_limits.pg_commit(stack.dsn, 300)
    metric("limit_pg_commit_ms", commit["value"], "ms", commit["runs"], commit["detail"])
    results["limit_pg_commit_ms"] = commit["value"]
    say(f"limit: JetStream async publishes, 2 x {options.js_seconds}s")
    js = await bench_limits.jetstream_publish(
        stack.nats.url, options.js_seconds, window=500, sync_seconds=1.0, payload_bytes=128
    )
    metric("limit_jetstream_publish_per_s", js["value"], "msgs/s", js["runs"], js["detail"])
    results["limit_jetstream_publish_per_s"] = js["value"]
    results["limit_jetstream_sync_publish_per_s"] = js["detail"]["sync_one_at_a_time_per_s"]
    return results


async def measure_grpc(stack: Stack) -> dict[str, Any]:
    """The gRPC round trip limit (services running, idle)."""
    rt = await bench_limits.grpc_roundtrip(stack.services.addresses["ingest"], 500)
    metric("limit_grpc_roundtrip_ms", rt["value"], "ms", rt["runs"], rt["detail"])
    return {"limit_grpc_roundtrip_ms": rt["value"]}


async def apply_campaign(stack: Stack) -> int:
    """Apply examples/campaigns/order-shipped.yaml through the rules API; return its version."""
    definition = yaml.safe_load(CAMPAIGN_FILE.read_text())
    async with grpc.aio.insecure_channel(stack.services.addresses["rules"]) as channel:
        response = await rules_pb2_grpc.RulesServiceStub(channel).ApplyCampaign(
            rules_pb2.ApplyCampaignRequest(definition=dict_to_struct(definition)),
            metadata=stack.metadata,
            timeout=10,
        )
    return int(response.campaign.version)


async def identify_users(stack: Stack, prefix: str, count: int) -> None:
    """Give users prefix0..prefix{count-1} an email trait (16 Identify calls in flight)."""
    async with grpc.aio.insecure_channel(stack.services.addresses["ingest"]) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        queue = iter(range(count))

        async def worker() -> None:
            for i in queue:
                response = await stub.Identify(
                    ingest_pb2.IdentifyRequest(
                        user_id=f"{prefix}{i}",
                        traits=dict_to_struct(
                            {"email": f"{prefix}{i}@bench.test", "first_name": f"B{i}"}
                        ),
                    ),
                    metadata=stack.metadata,
                    timeout=30,
                )
                if response.result.status != ingest_pb2.EVENT_STATUS_ACCEPTED:
                    raise RuntimeError(f"Identify {prefix}{i}: {response.result}")

        await asyncio.gather(*(worker() for _ in range(16)))


def _clock_offset() -> float:
    """time.time() - time.monotonic(), sampled tightly (to put DB timestamps on the
    monotonic axis)."""
    samples = []
    for _ in range(5):
        a = time.monotonic()
        wall = time.time()
        b = time.monotonic()
        samples.append(wall - (a + b) / 2)
    return statistics.median(samples)


@dataclass
class BusTap:
    """Core NATS subscriptions on the events and dispatch subjects (like the rules wake-up
    subscription): when did the relay publish each event, and the rules outbox each send?"""

    nats_url: str
    prefix: str
    user_prefix: str
    relay_seen: dict[str, float] = field(default_factory=dict)
    outbox_seen: dict[str, float] = field(default_factory=dict)
    _nc: Any = None

    async def start(self, enabled: bool = True) -> None:
        """Subscribe (unless disabled: then nothing is recorded)."""
        if not enabled:
            return
        from nats.aio.msg import Msg

        from nudge.dispatch.v1 import dispatch_pb2

        self._nc = await nats.connect(self.nats_url, name="nudge-bench-tap")

        async def on_events(msg: Msg) -> None:
            seen = time.monotonic()
            for event in ingest_pb2.EventBatch.FromString(msg.data).events:
                if event.user_id.startswith(self.user_prefix):
                    self.relay_seen.setdefault(event.event_id, seen)

        async def on_dispatch(msg: Msg) -> None:
            seen = time.monotonic()
            request = dispatch_pb2.SendRequest.FromString(msg.data)
            self.outbox_seen.setdefault(request.trigger_event_id, seen)

        await self._nc.subscribe(f"{self.prefix}.events.>", cb=on_events)
        await self._nc.subscribe(f"{self.prefix}.dispatch.>", cb=on_dispatch)

    async def stop(self) -> None:
        """Unsubscribe and close."""
        if self._nc is not None:
            await self._nc.close()


async def stage_breakdown(
    conn: asyncpg.Connection,
    user_prefix: str,
    ok_by_order: dict[str, float],
    mail_by_order: dict[str, float],
    offset: float,
    tap: BusTap,
) -> dict[str, Any]:
    """Split trigger latency into stages with the database's timestamps (wall clock, converted
    to monotonic with `offset`)."""
    rows = await conn.fetch(
        """SELECT e.properties->>'order_id' AS order_id, e.event_id,
                  extract(epoch FROM e.received_at)::float8 AS received,
                  extract(epoch FROM i.created_at)::float8 AS instance,
                  extract(epoch FROM s.created_at)::float8 AS dispatch,
                  extract(epoch FROM s.sent_at)::float8 AS sent
           FROM events e
           LEFT JOIN campaign_instances i
                  ON i.workspace_id = e.workspace_id AND i.trigger_event_id = e.event_id
           LEFT JOIN sends s ON s.workspace_id = e.workspace_id AND s.user_id = e.user_id
                            AND s.campaign_id = i.campaign_id
           WHERE e.workspace_id = $1 AND e.name = 'order_shipped' AND e.user_id LIKE $2""",
        WORKSPACE,
        user_prefix + "%",
    )
    stages: dict[str, list[float]] = {
        "insert_to_client_ok": [],
        "insert_to_relay_publish": [],
        "relay_publish_to_rules_decision": [],
        "insert_to_rules_decision": [],
        "rules_decision_to_outbox_publish": [],
        "outbox_publish_to_dispatch_insert": [],
        "rules_decision_to_dispatch_insert": [],
        "dispatch_insert_to_smtp_arrival": [],
        "smtp_arrival_to_sent_recorded": [],
    }

    def add(stage: str, start: float | None, end: float | None) -> None:
        if start is not None and end is not None:
            stages[stage].append((end - start) * 1000)

    def mono(epoch: float | None) -> float | None:
        return None if epoch is None else epoch - offset

    for row in rows:
        order_id = row["order_id"]
        if order_id not in ok_by_order:
            continue  # the idle probes, or a Track call that failed
        received = mono(row["received"])
        instance = mono(row["instance"])
        dispatch = mono(row["dispatch"])
        relay = tap.relay_seen.get(row["event_id"])
        outbox = tap.outbox_seen.get(row["event_id"])
        mail = mail_by_order.get(order_id)
        add("insert_to_client_ok", received, ok_by_order.get(order_id))
        add("insert_to_relay_publish", received, relay)
        add("relay_publish_to_rules_decision", relay, instance)
        add("insert_to_rules_decision", received, instance)
        add("rules_decision_to_outbox_publish", instance, outbox)
        add("outbox_publish_to_dispatch_insert", outbox, dispatch)
        add("rules_decision_to_dispatch_insert", instance, dispatch)
        add("dispatch_insert_to_smtp_arrival", dispatch, mail)
        add("smtp_arrival_to_sent_recorded", mail, mono(row["sent"]))
    return {name: spread(values) for name, values in stages.items()}


IDLE_SAMPLES = 10


async def idle_trigger_latency(
    stack: Stack, user_prefix: str, first_user: int, tag: str
) -> tuple[dict[str, float], dict[str, float]]:
    """Single matching events sent one at a time on an otherwise idle system (no queueing):
    the floor the loaded figure is compared with. Track OK and mail arrival per order id."""
    ok_by_order: dict[str, float] = {}
    mail_by_order: dict[str, float] = {}
    async with grpc.aio.insecure_channel(stack.services.addresses["ingest"]) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        for i in range(IDLE_SAMPLES):
            order_id = f"{tag}I{i}"
            skip = len(stack.sink.messages)
            event = ingest_pb2.Event(
                event_id=f"{tag}-idle-{i}",
                user_id=f"{user_prefix}{first_user + i}",
                name="order_shipped",
                properties=dict_to_struct({"order_id": order_id, "total": 42.5, "eta": "Monday"}),
            )
            await stub.Track(
                ingest_pb2.TrackRequest(events=[event]), metadata=stack.metadata, timeout=30
            )
            ok_by_order[order_id] = time.monotonic()
            arrival, _ = await _collect_mails(stack, {order_id: 0.0}, skip, 5.0, poll_s=0.002)
            if not arrival:
                say(f"trigger: idle probe {order_id}: no mail within 5 s; no more probes")
                break
            mail_by_order.update(arrival)
            await asyncio.sleep(0.2)
    return ok_by_order, mail_by_order


class XidSampler:
    """Samples pg_stat_activity: how old are the open transactions that hold an xid, per
    application? Gap-free readers (relay, rules projection) cannot read an event until every
    transaction that got its xid earlier has ended, so these ages are the readers' wait."""

    def __init__(self, dsn: str, interval_s: float = 0.05, enabled: bool = True) -> None:
        self._dsn = dsn
        self._interval_s = interval_s
        self.ages_ms: dict[str, list[float]] = {}
        self.oldest_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._enabled = enabled

    async def _run(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            while not self._stop.is_set():
                rows = await conn.fetch(
                    """SELECT application_name AS app,
                              extract(epoch FROM clock_timestamp() - xact_start)::float8 * 1000
                                  AS age_ms
                       FROM pg_stat_activity
                       WHERE datname = current_database() AND backend_xid IS NOT NULL
                         AND pid <> pg_backend_pid()"""
                )
                oldest = 0.0
                for row in rows:
                    self.ages_ms.setdefault(row["app"] or "?", []).append(row["age_ms"])
                    oldest = max(oldest, row["age_ms"])
                self.oldest_ms.append(oldest)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._interval_s)
        finally:
            await conn.close()

    def start(self) -> None:
        """Start sampling in the background."""
        if self._enabled:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, Any]:
        """Stop; the age distribution per application and of the oldest per sample."""
        self._stop.set()
        if self._task is not None:
            await self._task
        return {
            "samples": len(self.oldest_ms),
            "oldest_xid_transaction_ms": spread(self.oldest_ms),
            "by_application_ms": {app: spread(v) for app, v in sorted(self.ages_ms.items())},
        }


async def _trigger_load(
    stack: Stack, config: dict[str, Any], seconds: float, meter: CpuMeter
) -> tuple[dict[str, Any], dict[str, object], CpuSnapshot]:
    """Run the paced trigger load; its result, the CPU use during it, and the CPU snapshot at
    its start."""
    async with LoadProcess(stack, config) as load:
        assert load.proc is not None
        meter.roots["load"] = load.proc.pid
        first = await load.expect("started", 60)
        cpu_before = meter.snapshot()
        loaded = await load.expect("loaded", seconds + 60)
        cpu_after = meter.snapshot()
        result = await load.expect("result", 60)
    cpu = CpuMeter.delta(cpu_before, cpu_after, loaded["t"] - first["t"])
    say("trigger: " + format_delta(cpu))
    return result, cpu, cpu_before


async def _collect_mails(
    stack: Stack, expected: dict[str, float], skip: int, timeout_s: float, poll_s: float = 0.1
) -> tuple[dict[str, float], int]:
    """Wait (up to `timeout_s`) for a mail per expected order id; return the first arrival time
    per order id and how many duplicates arrived."""
    deadline = time.monotonic() + timeout_s
    while True:
        arrival: dict[str, float] = {}
        duplicates = 0
        for mail in stack.sink.messages[skip:]:
            found = SUBJECT.match(mail.subject)
            if found is None or found.group(1) not in expected:
                continue
            if found.group(1) in arrival:
                duplicates += 1
            else:
                arrival[found.group(1)] = mail.received_monotonic
        if len(arrival) >= len(expected) or time.monotonic() > deadline:
            return arrival, duplicates
        await asyncio.sleep(poll_s)


async def measure_trigger(
    stack: Stack, options: Options, conn: asyncpg.Connection
) -> dict[str, Any]:
    """trigger_latency_ms_p50/_p99; see the module docstring."""
    ticks = round(options.trigger_seconds * options.trigger_match_rate)
    tag = "t" + secrets.token_hex(3)
    match_prefix = f"{tag}m"
    version = await apply_campaign(stack)
    say(f"trigger: campaign order-shipped v{version}; identifying {ticks} users")
    started = time.monotonic()
    await identify_users(stack, match_prefix, ticks + IDLE_SAMPLES)
    target = await last_event(conn)
    reached = await wait_readers(conn, target, 60.0, ("rules",))
    if reached["rules"] is None:
        raise RuntimeError("the projection did not apply the Identify events within 60 s")
    say(f"trigger: identified and projected in {time.monotonic() - started:.1f}s")
    tap = BusTap(stack.nats.url, "bench", match_prefix)
    await tap.start(options.probes)
    try:
        idle_ok, idle_mail = await idle_trigger_latency(stack, match_prefix, ticks, tag)
        idle = [(idle_mail[o] - ok) * 1000 for o, ok in idle_ok.items() if o in idle_mail]
        say(f"trigger: idle single-event latency ms: {_round(spread(idle))}")
        return await _loaded_trigger(stack, options, conn, tap, tag, (idle_ok, idle_mail))
    finally:
        await tap.stop()


async def _loaded_trigger(
    stack: Stack,
    options: Options,
    conn: asyncpg.Connection,
    tap: BusTap,
    tag: str,
    idle_maps: tuple[dict[str, float], dict[str, float]],
) -> dict[str, Any]:
    """The paced load (the idle probes already ran) and its figures."""
    tick_hz = options.trigger_match_rate
    per_tick = max(1, round(options.trigger_rate / tick_hz))
    match_prefix = f"{tag}m"
    config = {
        "mode": "trigger",
        "address": stack.services.addresses["ingest"],
        "api_key": stack.api_key,
        "duration_s": options.trigger_seconds,
        "tick_hz": tick_hz,
        "per_tick": per_tick,
        "tag": tag,
        "match_user_prefix": match_prefix,
        "other_users": 5000,
    }
    mails_before = len(stack.sink.messages)
    sampler = XidSampler(stack.dsn, enabled=options.probes)
    sampler.start()
    try:
        meter = stack.meter()
        result, cpu, cpu_start = await _trigger_load(stack, config, options.trigger_seconds, meter)
        xids = await sampler.stop()
        ok_by_order = {m["order_id"]: m["ok"] for m in result["matches"] if m["ok"] is not None}
        mail_by_order, duplicates = await _collect_mails(stack, ok_by_order, mails_before, 15.0)
        # Until the last mail: the whole pipeline's work for this load, for per-event costs.
        cpu_total = CpuMeter.delta(cpu_start, meter.snapshot(), 1.0)
    finally:
        await sampler.stop()
    expected = len(ok_by_order)
    latencies = [
        (mail_by_order[o] - ok) * 1000 for o, ok in ok_by_order.items() if o in mail_by_order
    ]
    offset = _clock_offset()
    stages = await stage_breakdown(conn, match_prefix, ok_by_order, mail_by_order, offset, tap)
    idle_ok, idle_mail = idle_maps
    idle = [(idle_mail[o] - ok) * 1000 for o, ok in idle_ok.items() if o in idle_mail]
    idle_stages = await stage_breakdown(conn, match_prefix, idle_ok, idle_mail, offset, tap)
    used = cpu_total["cpu_s"]
    cpu_per_event: dict[str, float] = {}
    if isinstance(used, dict) and result["accepted_events"]:
        cpu_per_event = {k: v / result["accepted_events"] * 1e6 for k, v in used.items()}
        if latencies:
            cpu_per_event["dispatch_per_mail"] = used.get("dispatch", 0.0) / len(latencies) * 1e6
    decisions = await conn.fetch(
        "SELECT kind, count(*) AS n FROM decisions WHERE workspace_id = $1 AND user_id LIKE $2"
        " GROUP BY kind ORDER BY kind",
        WORKSPACE,
        tag + "%",
    )
    p50 = percentile(latencies, 0.5)
    p99 = percentile(latencies, 0.99)
    detail = {
        "count": len(latencies),
        "expected": expected,
        "lost": expected - len(latencies),
        "duplicates": duplicates,
        "matching_failed_track": len(result["matches"]) - expected,
        "offered_events_per_s": options.trigger_rate,
        "accepted_events_per_s": result["events_per_s"],
        "matching_per_s": tick_hz,
        "events_per_track_call": per_tick,
        "track_call_ms_p50": result["call_ms_p50"],
        "track_call_ms_p99": result["call_ms_p99"],
        "track_codes": result["codes"],
        "pacer_lateness_ms_p99": result["pacer_lateness_ms_p99"],
        "latency_ms": spread(latencies),
        "stages_ms": stages,
        "stages_note": "stages come from DB timestamps (statement time, before commit) and NATS "
        "taps in the bench process; rules reads the store, not NATS, so it may apply an event "
        "before the tap sees the relay's message (negative relay_publish_to_rules_decision)",
        "decisions_written_by_kind": {r["kind"]: r["n"] for r in decisions},
        "idle_single_event_latency_ms": spread(idle),
        "idle_single_event_lost": len(idle_ok) - len(idle),
        "idle_stages_ms": idle_stages,
        "open_xid_transactions": xids,
        "cpu": cpu,
        "cpu_us_per_accepted_event": cpu_per_event,
        "cpu_us_note": "CPU from load start until the last mail arrived, per accepted event "
        "(dispatch_per_mail: dispatch CPU per delivered mail)",
        "measured": "Track OK (load process) -> SMTP sink arrival (bench process), CLOCK_MONOTONIC",
    }
    metric("trigger_latency_ms_p50", p50, "ms", [p50], detail)
    metric(
        "trigger_latency_ms_p99",
        p99,
        "ms",
        [p99],
        {
            "count": len(latencies),
            "lost": expected - len(latencies),
            "see": "trigger_latency_ms_p50 detail",
        },
    )
    return {
        "trigger_latency_ms_p50": p50,
        "trigger_latency_ms_p99": p99,
        "trigger_lost": expected - len(latencies),
        "trigger_count": len(latencies),
    }


async def ingest_run(
    stack: Stack, options: Options, conn: asyncpg.Connection, index: int
) -> dict[str, Any]:
    """One sustained ingest run and the projection's drain after it."""
    tag = f"i{index}{secrets.token_hex(2)}"
    rules_start = await read_checkpoint(conn, "rules")
    backlog_start = await count_between(conn, rules_start, await last_event(conn))
    config = {
        "mode": "ingest",
        "address": stack.services.addresses["ingest"],
        "api_key": stack.api_key,
        "duration_s": options.ingest_seconds,
        "warmup_s": options.ingest_warmup_s,
        "concurrency": options.ingest_concurrency,
        "batch": options.ingest_batch,
        "users": options.ingest_users,
        "tag": tag,
    }
    meter = stack.meter()
    samples: list[tuple[float, int, int]] = []
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        # Stopped by the event, never cancelled mid-query: `conn` is used again afterwards.
        while not stop_sampling.is_set():
            rules = await read_checkpoint(conn, "rules")
            relay = await read_checkpoint(conn, "relay")
            samples.append((time.monotonic(), rules[1], relay[1]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_sampling.wait(), 0.5)

    async with LoadProcess(stack, config) as load:
        assert load.proc is not None
        meter.roots["load"] = load.proc.pid
        first = await load.expect("started", 60)
        window_start = first["window_start"]
        await asyncio.sleep(max(0.0, window_start - time.monotonic()))
        cpu_before = meter.snapshot()
        sampler = asyncio.create_task(sample())
        loaded = await load.expect("loaded", options.ingest_seconds + 120)
        cpu_after = meter.snapshot()
        stop_sampling.set()
        await sampler
        t_loaded = loaded["t"]
        rules_at_load_end = await read_checkpoint(conn, "rules")
        target = await last_event(conn)
        reached = await wait_readers(conn, target, options.drain_timeout_s, ("rules", "relay"))
        t_drain_end = time.monotonic()
        rules_end = await read_checkpoint(conn, "rules")
        result = await load.expect("result", 60)
    cpu = CpuMeter.delta(cpu_before, cpu_after, loaded["t"] - window_start)
    used = cpu["cpu_s"]
    accepted = max(result["accepted_in_window"], 1)
    per_event: dict[str, float] = {}
    if isinstance(used, dict):
        per_event = {k: v / accepted * 1e6 for k, v in used.items()}
        per_event["system_total"] = sum(
            v for k, v in per_event.items() if k not in ("bench", "load")
        )
    applied_total = await count_between(conn, rules_start, rules_end)
    applied_in_drain = await count_between(conn, rules_at_load_end, rules_end)
    backlog_end = await count_between(conn, rules_end, target)
    rules_done = reached["rules"]
    relay_done = reached["relay"]
    drain_s = None if rules_done is None else max(0.0, rules_done - t_loaded)
    relay_drain_s = None if relay_done is None else max(0.0, relay_done - t_loaded)
    projection_window = (rules_done or t_drain_end) - first["t"]
    drain_window = (rules_done or t_drain_end) - t_loaded
    during = [s for s in samples if s[0] >= window_start]
    rules_rate_during = relay_rate_during = None
    if len(during) >= 2:
        span = during[-1][0] - during[0][0]
        rules_rate_during = (during[-1][1] - during[0][1]) / span
        relay_rate_during = (during[-1][2] - during[0][2]) / span
    run = {
        "events_per_s": result["events_per_s"],
        "accepted_in_window": result["accepted_in_window"],
        "window_s": result["window_s"],
        "track_call_ms_p50": result["call_ms_p50"],
        "track_call_ms_p99": result["call_ms_p99"],
        "codes": result["codes"],
        "statuses": result["statuses"],
        "client_cpu_share_of_one_core": result["client_cpu_share_of_one_core"],
        "projection_backlog_at_start": backlog_start,
        "projection_drain_s": drain_s,
        "relay_drain_s": relay_drain_s,
        "projection_backlog_left": backlog_end,
        "projection_events_per_s": applied_total / projection_window if projection_window else None,
        "projection_events_per_s_during_load": rules_rate_during,
        "projection_events_per_s_after_load": (
            applied_in_drain / drain_window if drain_window > 0.5 else None
        ),
        "relay_events_per_s_during_load": relay_rate_during,
        "cpu": cpu,
        "cpu_us_per_accepted_event": per_event,
    }
    drain_text = f"{drain_s:.1f}s" if drain_s is not None else f">{options.drain_timeout_s}s"
    say(
        f"ingest run {index + 1}: {result['events_per_s']:.0f} events/s accepted, "
        f"projection drain {drain_text} (backlog left {backlog_end}), "
        f"projection {run['projection_events_per_s'] or 0:.0f}/s; " + format_delta(cpu)
    )
    return run


async def measure_ingest(
    stack: Stack, options: Options, conn: asyncpg.Connection
) -> dict[str, Any]:
    """ingest_events_per_s and the projection figures over `options.ingest_runs` runs."""
    runs = [await ingest_run(stack, options, conn, i) for i in range(options.ingest_runs)]
    rates = [r["events_per_s"] for r in runs]
    drains = [r["projection_drain_s"] for r in runs]
    projection = [r["projection_events_per_s"] for r in runs]
    common = {
        "batch": options.ingest_batch,
        "concurrency": options.ingest_concurrency,
        "seconds": options.ingest_seconds,
        "warmup_s": options.ingest_warmup_s,
        "users": options.ingest_users,
        "client": "1 separate process, grpc.aio, pre-encoded requests",
    }
    metric(
        "ingest_events_per_s",
        statistics.median(rates),
        "events/s",
        rates,
        {**common, "per_run": runs},
    )
    known = [d for d in drains if d is not None]
    median_drain = statistics.median(drains) if len(known) == len(drains) else None
    metric(
        "projection_drain_s",
        median_drain,
        "s",
        drains,
        {
            "timeout_s": options.drain_timeout_s,
            "backlog_left": [r["projection_backlog_left"] for r in runs],
            "relay_drain_s": [r["relay_drain_s"] for r in runs],
        },
    )
    metric(
        "projection_events_per_s",
        statistics.median(projection),
        "events/s",
        projection,
        {
            "definition": "events the rules projection applied from load start until it caught "
            "up (or the drain timeout) / that time",
            "during_load": [r["projection_events_per_s_during_load"] for r in runs],
            "after_load": [r["projection_events_per_s_after_load"] for r in runs],
            "relay_during_load": [r["relay_events_per_s_during_load"] for r in runs],
        },
    )
    keeps_up = all(d is not None and d <= KEEPS_UP_DRAIN_S for d in drains)
    metric(
        "projection_keeps_up",
        keeps_up,
        "bool",
        [d is not None and d <= KEEPS_UP_DRAIN_S for d in drains],
        {"rule": f"projection_drain_s <= {KEEPS_UP_DRAIN_S} in every run"},
    )
    return {
        "ingest_events_per_s": statistics.median(rates),
        "ingest_runs": rates,
        "projection_drain_s": median_drain,
        "projection_events_per_s": statistics.median(projection),
        "projection_keeps_up": keeps_up,
    }


def print_profiles(stack: Stack) -> None:
    """Top functions of each profiled service, to stderr."""
    import pstats

    for name in sorted(stack.services.processes):
        path = stack.services.log_dir / f"{name}.prof"
        if path.exists():
            say(f"profile of {name}: {path}")
            stats = pstats.Stats(str(path), stream=sys.stderr)
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(40)


def summarize(results: dict[str, Any], started: float) -> None:
    """The closing line: every headline figure against its target."""
    summary: dict[str, Any] = {}
    for name, value in results.items():
        entry: dict[str, Any] = {"value": _round(value)}
        if name in TARGETS:
            op, target = TARGETS[name]
            entry["target"] = f"{op} {target}"
            if value is None:
                entry["met"] = False
            elif op == ">=":
                entry["met"] = value >= target
            elif op == "<=":
                entry["met"] = value <= target
            else:
                entry["met"] = value == target
        summary[name] = entry
    summary["bench_seconds"] = round(time.monotonic() - started, 1)
    summary["loadavg_at_end"] = list(os.getloadavg())
    emit({"summary": summary})


async def run_phases(stack: Stack, options: Options, admin_dsn: str) -> bool:
    """Everything after the servers are up; False when a phase failed (the others still run,
    the failure is one ``{"error": ...}`` line and is listed in the summary)."""
    started = time.monotonic()
    stack.api_key = await prepare_database(admin_dsn, stack.dsn)
    results: dict[str, Any] = {}
    failed: list[str] = []

    async def phase(name: str, run: Coroutine[Any, Any, dict[str, Any]]) -> None:
        try:
            results.update(await run)
        except Exception as error:
            failed.append(name)
            say(f"{name} failed: {error!r}")
            emit({"error": {"phase": name, "message": repr(error)}})

    if "limits" not in options.skip:
        await phase("limits", measure_limits(stack, options))
    say("starting the four services")
    await asyncio.to_thread(stack.services.start_all, 90.0)
    if "limits" not in options.skip:
        await phase("limits_grpc", measure_grpc(stack))
    conn = await asyncpg.connect(stack.dsn)
    try:
        if "trigger" not in options.skip:
            await phase("trigger", measure_trigger(stack, options, conn))
        if "ingest" not in options.skip:
            await phase("ingest", measure_ingest(stack, options, conn))
    finally:
        await conn.close()
    if failed:
        results["failed_phases"] = failed
    summarize(results, started)
    return not failed


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def bench_stack(options: Options) -> Iterator[tuple[Stack, str]]:
    """Start Postgres, NATS, the SMTP sink and configure the services; tear all down at exit."""
    tmp = Path(tempfile.mkdtemp(prefix="nudge-bench-", dir="/tmp"))
    say(f"working directory {tmp}")
    with contextlib.ExitStack() as cleanup:
        if not options.keep:
            cleanup.callback(shutil.rmtree, tmp, True)
        else:
            cleanup.callback(say, f"kept {tmp} (logs in {tmp / 'logs'})")
        pg = start_postgres(tmp / "pg")
        cleanup.callback(pg.stop)
        nats_handle = start_nats(tmp / "nats")
        cleanup.callback(nats_handle.stop)
        sink = SmtpSink().start()
        cleanup.callback(sink.stop)
        dsn = pg.dsn_for(DATABASE)
        base = ServiceProcesses.configure(
            database_url=dsn,
            nats_url=nats_handle.url,
            nats_prefix="bench",
            log_dir=tmp / "logs",
            extra_env={
                "NUDGE_SMTP_URL": sink.url,
                # The per-workspace rate limit is policy, not capacity: out of the way.
                "NUDGE_INGEST_RATE_EVENTS_PER_S": "10000000",
                "NUDGE_INGEST_RATE_BURST_EVENTS": "10000000",
            },
        )
        services = ProfiledServices(base.env, base.log_dir, base.addresses)
        services.profile = options.profile
        stack = Stack(tmp, pg, nats_handle, sink, services, dsn)
        if options.profile:
            cleanup.callback(print_profiles, stack)  # runs after stop_all wrote the profiles
        cleanup.callback(services.stop_all)
        cleanup.callback(_kill_load, stack)
        yield stack, pg.dsn


def _kill_load(stack: Stack) -> None:
    for pid in list(stack.load_pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every phase completed (targets met or not), 1 when a phase
    failed, 130 when interrupted."""
    options = Options.parse(argv)
    # Ctrl-C and SIGTERM both unwind through the cleanup below (SIGINT explicitly: a process
    # started in the background by a non-interactive shell inherits it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    facts = machine_facts()
    facts["options"] = {
        k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in options.__dict__.items()
    }
    try:
        with bench_stack(options) as (stack, admin_dsn):
            facts["postgres_settings"] = "fsync=on synchronous_commit=on full_page_writes=on"
            facts["nats"] = "JetStream file store, sync_interval: always"
            facts["services"] = "4 processes (python -m services.<name>), SMTP sink in-process"
            emit({"facts": facts})
            ok = asyncio.run(run_phases(stack, options, admin_dsn))
    except KeyboardInterrupt:
        say("interrupted; everything was stopped")
        return 130
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
