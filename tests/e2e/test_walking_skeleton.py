"""The foundation end to end: gRPC Track → store → relay → rules → dispatch → SMTP/HTTP peers."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from nudge.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from nudge.protoconv import dict_to_struct
from nudge.rules.v1 import rules_pb2, rules_pb2_grpc
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "campaigns"


def _auth(stack: Stack) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {stack.api_key}"),)


async def _apply(stack: Stack, name: str, **overrides: Any) -> rules_pb2.ApplyCampaignResponse:
    definition = yaml.safe_load((EXAMPLES / name).read_text()) | overrides
    async with grpc.aio.insecure_channel(stack.address("rules")) as channel:
        return await rules_pb2_grpc.RulesServiceStub(channel).ApplyCampaign(
            rules_pb2.ApplyCampaignRequest(definition=dict_to_struct(definition)),
            metadata=_auth(stack),
            timeout=10,
        )


async def _track(stack: Stack, *events: ingest_pb2.Event) -> ingest_pb2.TrackResponse:
    async with grpc.aio.insecure_channel(stack.address("ingest")) as channel:
        return await ingest_pb2_grpc.IngestServiceStub(channel).Track(
            ingest_pb2.TrackRequest(events=list(events)), metadata=_auth(stack), timeout=10
        )


async def _identify(stack: Stack, user_id: str, traits: dict[str, Any]) -> None:
    async with grpc.aio.insecure_channel(stack.address("ingest")) as channel:
        response = await ingest_pb2_grpc.IngestServiceStub(channel).Identify(
            ingest_pb2.IdentifyRequest(user_id=user_id, traits=dict_to_struct(traits)),
            metadata=_auth(stack),
            timeout=10,
        )
    assert response.result.status == ingest_pb2.EVENT_STATUS_ACCEPTED


def _event(user_id: str, name: str, event_id: str | None = None, **properties: Any) -> Any:
    return ingest_pb2.Event(
        event_id=event_id or str(uuid.uuid4()),
        user_id=user_id,
        name=name,
        properties=dict_to_struct(properties),
    )


async def test_order_shipped_email_is_delivered_once_with_personalization(stack: Stack) -> None:
    applied = await _apply(stack, "order-shipped.yaml")
    assert applied.created
    assert applied.campaign.version == 1
    await _identify(stack, "u1", {"email": "ada@example.test", "first_name": "Ada"})
    shipped = _event("u1", "order_shipped", "order-1", order_id="A-17", total=42.5, eta="Monday")
    response = await _track(stack, shipped, _event("u1", "order_shipped", total=5, eta="x"))
    assert [r.status for r in response.results] == [ingest_pb2.EVENT_STATUS_ACCEPTED] * 2

    [mail] = await asyncio.to_thread(stack.smtp.wait_for, 1, 20)
    assert mail.rcpt_tos == ("ada@example.test",)
    assert mail.subject == "Your order A-17 is on its way"
    assert mail.text == "Hi Ada, it arrives Monday."

    again = await _track(stack, shipped)
    assert again.results[0].status == ingest_pb2.EVENT_STATUS_DUPLICATE
    await asyncio.sleep(1.5)
    assert len(stack.smtp.messages) == 1


async def test_delayed_webhook_fires_through_the_scheduler(stack: Stack) -> None:
    await _apply(stack, "cart-webhook.yaml")
    await _identify(stack, "u2", {"crm_webhook": f"{stack.http.url}/crm"})
    await _track(stack, _event("u2", "add_to_cart", cart_id="c-9", value=30))

    [request] = await asyncio.to_thread(stack.http.wait_for, 1, 20)
    assert request.path == "/crm"
    assert request.json() == {"user": "u2", "cart": "c-9", "value": "30"}
    assert request.headers["webhook-id"]
    await asyncio.sleep(1.0)
    assert len(stack.http.requests) == 1


async def test_bad_api_key_is_unauthenticated_and_stores_nothing(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.address("ingest")) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Track(
                ingest_pb2.TrackRequest(events=[_event("u3", "x")]),
                metadata=(("authorization", "Bearer nk_aaaaaaaaaaaa_" + "b" * 43),),
                timeout=5,
            )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
