"""IngestService over real gRPC, in-process, against a real database (wired as __main__ does)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from nudge import db
from nudge.auth import KeyVerifier, create_api_key, ensure_workspace
from nudge.clock import DbClock
from nudge.grpcserver import MAX_MESSAGE_BYTES, ServiceBinding, start_grpc_server
from nudge.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from nudge.protoconv import dict_to_struct, to_timestamp
from services.ingest.application import GroupCommitter, RateLimiter
from services.ingest.grpc_api import IngestServicer

ACCEPTED = ingest_pb2.EVENT_STATUS_ACCEPTED
DUPLICATE = ingest_pb2.EVENT_STATUS_DUPLICATE
REJECTED = ingest_pb2.EVENT_STATUS_REJECTED
Metadata = tuple[tuple[str, str], ...]


def event(event_id: str, user_id: str = "u1", name: str = "page_viewed", **props: Any) -> Any:
    return ingest_pb2.Event(
        event_id=event_id, user_id=user_id, name=name, properties=dict_to_struct(props)
    )


def bearer(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


@dataclass
class Ingest:
    """A served IngestService, its committer, a workspace and a key with every scope."""

    pool: asyncpg.Pool
    committer: GroupCommitter
    stub: ingest_pb2_grpc.IngestServiceAsyncStub
    workspace_id: str
    api_key: str

    async def track(
        self, *events: ingest_pb2.Event, metadata: Metadata | None = None
    ) -> ingest_pb2.TrackResponse:
        return await self.stub.Track(
            ingest_pb2.TrackRequest(events=list(events)),
            metadata=bearer(self.api_key) if metadata is None else metadata,
            timeout=20,
        )

    async def track_error(
        self, *events: ingest_pb2.Event, metadata: Metadata | None = None
    ) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.track(*events, metadata=metadata)
        return caught.value

    async def stored(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT workspace_id, event_id, user_id, name, properties, metadata, occurred_at,"
            " received_at FROM events ORDER BY tx_id, global_position"
        )

    async def key(self, scopes: frozenset[str] = frozenset({"track"})) -> str:
        return await create_api_key(self.pool, self.workspace_id, scopes)


ServeIngest = Callable[[RateLimiter], contextlib.AbstractAsyncContextManager[Ingest]]


@pytest.fixture
def serve_ingest(database_url: str, test_id: str) -> ServeIngest:
    """Serve ingest with a given rate limiter (the composition of services/ingest/__main__)."""

    @contextlib.asynccontextmanager
    async def serve(limiter: RateLimiter) -> AsyncIterator[Ingest]:
        workspace_id = f"ws-{test_id}"
        async with contextlib.AsyncExitStack() as stack:
            pool = await db.create_pool(database_url, max_size=8, application_name="test-ingest")
            stack.push_async_callback(pool.close)
            await ensure_workspace(pool, workspace_id)
            api_key = await create_api_key(pool, workspace_id)
            clock = DbClock(pool)
            await clock.sync()
            committer = GroupCommitter(pool)
            flushing = asyncio.create_task(committer.run(), name="group-commit")

            async def stop_flushing() -> None:
                flushing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flushing

            stack.push_async_callback(stop_flushing)
            servicer = IngestServicer(KeyVerifier(pool), committer, limiter, clock)
            server = await start_grpc_server(
                "127.0.0.1:0",
                [
                    ServiceBinding(
                        ingest_pb2_grpc.add_IngestServiceServicer_to_server,
                        servicer,
                        "nudge.ingest.v1.IngestService",
                    )
                ],
            )
            stack.push_async_callback(server.server.stop, None)
            await server.set_serving(True)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
            stack.push_async_callback(channel.close)
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            yield Ingest(pool, committer, stub, workspace_id, api_key)

    return serve


@pytest.fixture
async def ingest(serve_ingest: ServeIngest) -> AsyncIterator[Ingest]:
    async with serve_ingest(RateLimiter(events_per_s=1e9, burst=1e9)) as served:
        yield served


def statuses(response: ingest_pb2.TrackResponse) -> list[int]:
    return [r.status for r in response.results]


# --- Track ------------------------------------------------------------------------------------


async def test_accepted_events_are_stored_with_their_workspace_and_properties(
    ingest: Ingest,
) -> None:
    response = await ingest.track(
        event("e1", "u1", "order_shipped", order_id="A-17", total=42.5),
        event("e2", "u2", "page_viewed", path="/"),
    )

    assert statuses(response) == [ACCEPTED, ACCEPTED]
    assert [r.event_id for r in response.results] == ["e1", "e2"]
    rows = await ingest.stored()
    assert [(r["workspace_id"], r["event_id"], r["user_id"], r["name"]) for r in rows] == [
        (ingest.workspace_id, "e1", "u1", "order_shipped"),
        (ingest.workspace_id, "e2", "u2", "page_viewed"),
    ]
    assert rows[0]["properties"] == {"order_id": "A-17", "total": 42.5}
    assert rows[0]["occurred_at"] == rows[0]["received_at"]  # no occurred_at: received time


async def test_a_client_occurred_at_within_bounds_is_kept(ingest: Ingest) -> None:
    occurred = (await db.db_now(ingest.pool)) - timedelta(days=2)
    shipped = event("e1")
    shipped.occurred_at.CopyFrom(to_timestamp(occurred))

    assert statuses(await ingest.track(shipped)) == [ACCEPTED]
    [row] = await ingest.stored()
    assert row["occurred_at"] == occurred
    assert row["received_at"] > occurred


async def test_the_same_event_id_with_the_same_body_is_a_duplicate(ingest: Ingest) -> None:
    await ingest.track(event("e1", total=3))

    response = await ingest.track(event("e1", total=3))

    assert statuses(response) == [DUPLICATE]
    assert len(await ingest.stored()) == 1


async def test_the_same_event_id_with_another_body_is_rejected_with_a_reason(
    ingest: Ingest,
) -> None:
    await ingest.track(event("e1", total=3))

    response = await ingest.track(event("e1", total=4))

    assert statuses(response) == [REJECTED]
    assert "different body" in response.results[0].reason
    [row] = await ingest.stored()
    assert row["properties"] == {"total": 3}


async def test_equivalent_unicode_spellings_of_an_event_id_dedupe(ingest: Ingest) -> None:
    first = await ingest.track(event("caf\u00e9"))
    second = await ingest.track(event("cafe\u0301"))

    assert statuses(first) == [ACCEPTED]
    assert statuses(second) == [DUPLICATE]
    assert [r["event_id"] for r in await ingest.stored()] == ["caf\u00e9"]


async def test_a_mixed_batch_answers_per_event_in_order_and_stores_only_the_valid(
    ingest: Ingest,
) -> None:
    response = await ingest.track(
        event("ok-1"),
        event("bad-user", user_id="u\x01"),
        event("ok-2"),
        event("bad-name", name="$identify"),
        event("bad-number", price=float("nan")),
        event("bad-size", blob="x" * (40 * 1024)),
    )

    assert statuses(response) == [ACCEPTED, REJECTED, ACCEPTED, REJECTED, REJECTED, REJECTED]
    assert [r.event_id for r in response.results] == [
        "ok-1",
        "bad-user",
        "ok-2",
        "bad-name",
        "bad-number",
        "bad-size",
    ]
    assert [r.field for r in response.results] == [
        "",
        "events[1].user_id",
        "",
        "events[3].name",
        "events[4].properties.price",
        "events[5].properties",
    ]
    assert all(r.reason for r in response.results if r.status == REJECTED)
    assert [r["event_id"] for r in await ingest.stored()] == ["ok-1", "ok-2"]


async def test_an_empty_batch_is_an_invalid_argument(ingest: Ingest) -> None:
    error = await ingest.track_error()

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events" in (error.details() or "")


async def test_a_batch_of_more_than_500_events_is_an_invalid_argument_and_stores_nothing(
    ingest: Ingest,
) -> None:
    error = await ingest.track_error(*[event(f"e{i}") for i in range(501)])

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "500" in (error.details() or "")
    assert await ingest.stored() == []
    assert statuses(await ingest.track(*[event(f"e{i}") for i in range(500)])) == [ACCEPTED] * 500


async def test_a_request_over_one_mib_is_refused_by_grpc_as_resource_exhausted(
    ingest: Ingest,
) -> None:
    error = await ingest.track_error(event("huge", blob="x" * (MAX_MESSAGE_BYTES + 1024)))

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (error.details() or "")
    assert await ingest.stored() == []


# --- authentication and authorization ---------------------------------------------------------


async def test_calls_without_a_valid_key_are_unauthenticated_and_store_nothing(
    ingest: Ingest,
) -> None:
    key_id = ingest.api_key.split("_")[1]
    revoked = await ingest.key()
    await ingest.pool.execute(
        "UPDATE api_keys SET revoked_at = clock_timestamp() WHERE key_id = $1",
        revoked.split("_")[1],
    )
    expired = await ingest.key()
    await ingest.pool.execute(
        "UPDATE api_keys SET expires_at = nudge_now() - interval '1 second' WHERE key_id = $1",
        expired.split("_")[1],
    )
    attempts: dict[str, Metadata] = {
        "missing": (),
        "not bearer": (("authorization", ingest.api_key),),
        "malformed": bearer("nk_short_secret"),
        "unknown": bearer("nk_aaaaaaaaaaaa_" + "b" * 43),
        "wrong secret": bearer(f"nk_{key_id}_" + "c" * 43),
        "revoked": bearer(revoked),
        "expired": bearer(expired),
    }

    codes = {
        name: (await ingest.track_error(event(f"e-{name}"), metadata=metadata)).code()
        for name, metadata in attempts.items()
    }

    assert codes == dict.fromkeys(attempts, grpc.StatusCode.UNAUTHENTICATED)
    assert await ingest.stored() == []


async def test_a_key_without_the_track_scope_is_permission_denied(ingest: Ingest) -> None:
    admin_only = await ingest.key(frozenset({"admin"}))

    error = await ingest.track_error(event("e1"), metadata=bearer(admin_only))

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "track" in (error.details() or "")
    assert await ingest.stored() == []


async def test_a_key_with_only_the_track_scope_may_track(ingest: Ingest) -> None:
    track_only = await ingest.key(frozenset({"track"}))

    assert statuses(await ingest.track(event("e1"), metadata=bearer(track_only))) == [ACCEPTED]


# --- Identify ---------------------------------------------------------------------------------


async def test_identify_stores_the_traits_as_an_identify_event(ingest: Ingest) -> None:
    response = await ingest.stub.Identify(
        ingest_pb2.IdentifyRequest(
            user_id="u1",
            traits=dict_to_struct({"email": "ada@example.test", "plan": "pro"}),
            event_id="identify-1",
        ),
        metadata=bearer(ingest.api_key),
        timeout=10,
    )

    assert response.result.status == ACCEPTED
    assert response.result.event_id == "identify-1"
    [row] = await ingest.stored()
    assert (row["event_id"], row["user_id"], row["name"]) == ("identify-1", "u1", "$identify")
    assert row["properties"] == {"email": "ada@example.test", "plan": "pro"}


async def test_identify_without_an_event_id_gets_a_fresh_one_each_time(ingest: Ingest) -> None:
    request = ingest_pb2.IdentifyRequest(user_id="u1", traits=dict_to_struct({"plan": "pro"}))
    for _ in range(2):
        reply = await ingest.stub.Identify(request, metadata=bearer(ingest.api_key), timeout=10)
        assert reply.result.status == ACCEPTED

    rows = await ingest.stored()
    assert len({r["event_id"] for r in rows}) == 2


async def test_identify_with_an_invalid_user_id_is_an_invalid_argument_naming_the_field(
    ingest: Ingest,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.stub.Identify(
            ingest_pb2.IdentifyRequest(user_id="\u202eu1"),
            metadata=bearer(ingest.api_key),
            timeout=10,
        )

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "identify.user_id" in (caught.value.details() or "")
    assert await ingest.stored() == []


# --- group commit and concurrency -------------------------------------------------------------


async def gather_tracks(
    ingest: Ingest, requests: Sequence[Sequence[ingest_pb2.Event]]
) -> list[ingest_pb2.TrackResponse]:
    calls: list[Awaitable[ingest_pb2.TrackResponse]] = [ingest.track(*r) for r in requests]
    return await asyncio.gather(*calls)


async def test_concurrent_requests_share_commits_and_all_their_events_are_stored(
    ingest: Ingest,
) -> None:
    requests = [[event(f"r{r}-e{e}", f"u{r}") for e in range(100)] for r in range(50)]

    responses = await gather_tracks(ingest, requests)

    assert all(statuses(response) == [ACCEPTED] * 100 for response in responses)
    assert await ingest.pool.fetchval("SELECT count(*) FROM events") == 5000
    assert sum(ingest.committer.batch_sizes) == 5000
    assert max(ingest.committer.batch_sizes) > 100  # several requests in one transaction
    transactions = await ingest.pool.fetchval("SELECT count(DISTINCT tx_id) FROM events")
    assert transactions == len(ingest.committer.batch_sizes) < 50


async def test_the_same_event_sent_200_times_at_once_is_accepted_exactly_once(
    ingest: Ingest,
) -> None:
    responses = await gather_tracks(ingest, [[event("same", total=1)]] * 200)

    outcomes = [status for response in responses for status in statuses(response)]
    assert outcomes.count(ACCEPTED) == 1
    assert outcomes.count(DUPLICATE) == 199
    assert await ingest.pool.fetchval("SELECT count(*) FROM events") == 1


# --- rate limiting ----------------------------------------------------------------------------


async def test_a_workspace_over_its_rate_is_resource_exhausted_and_others_are_not(
    serve_ingest: ServeIngest,
) -> None:
    async with serve_ingest(RateLimiter(events_per_s=0.01, burst=3)) as ingest:
        await ensure_workspace(ingest.pool, "ws-neighbour")
        neighbour = await create_api_key(ingest.pool, "ws-neighbour")

        assert statuses(await ingest.track(event("e1"), event("e2"), event("e3"))) == [ACCEPTED] * 3
        error = await ingest.track_error(event("e4"))

        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry in" in (error.details() or "")
        assert [r["event_id"] for r in await ingest.stored()] == ["e1", "e2", "e3"]
        assert statuses(await ingest.track(event("n1"), metadata=bearer(neighbour))) == [ACCEPTED]
