"""A client of one end-to-end stack: what an SDK and an operator do, over gRPC and the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import yaml

from nudge.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from nudge.protoconv import dict_to_struct, struct_to_dict
from nudge.rules.v1 import rules_pb2, rules_pb2_grpc
from nudge.testing.sinks import ReceivedMail
from tests.e2e.conftest import Stack

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "campaigns"
PAST_DUE = timedelta(minutes=1)
WAIT_S = 20.0


class Nudge:
    """A client of one stack: what an SDK and an operator do, over gRPC."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.auth = (("authorization", f"Bearer {stack.api_key}"),)

    async def rules(self, method: str, request: Any) -> Any:
        async with grpc.aio.insecure_channel(self.stack.address("rules")) as channel:
            stub = rules_pb2_grpc.RulesServiceStub(channel)
            return await getattr(stub, method)(request, metadata=self.auth, timeout=30)

    async def apply(self, file: str, **overrides: Any) -> rules_pb2.Campaign:
        definition = yaml.safe_load((EXAMPLES / file).read_text()) | overrides
        response: rules_pb2.ApplyCampaignResponse = await self.rules(
            "ApplyCampaign", rules_pb2.ApplyCampaignRequest(definition=dict_to_struct(definition))
        )
        return response.campaign

    async def identify(self, user_id: str, **traits: Any) -> None:
        async with grpc.aio.insecure_channel(self.stack.address("ingest")) as channel:
            response = await ingest_pb2_grpc.IngestServiceStub(channel).Identify(
                ingest_pb2.IdentifyRequest(user_id=user_id, traits=dict_to_struct(traits)),
                metadata=self.auth,
                timeout=10,
            )
        assert response.result.status == ingest_pb2.EVENT_STATUS_ACCEPTED

    async def track(self, user_id: str, name: str, **properties: Any) -> str:
        event_id = str(uuid.uuid4())
        async with grpc.aio.insecure_channel(self.stack.address("ingest")) as channel:
            response = await ingest_pb2_grpc.IngestServiceStub(channel).Track(
                ingest_pb2.TrackRequest(
                    events=[
                        ingest_pb2.Event(
                            event_id=event_id,
                            user_id=user_id,
                            name=name,
                            properties=dict_to_struct(properties),
                        )
                    ]
                ),
                metadata=self.auth,
                timeout=10,
            )
        assert [r.status for r in response.results] == [ingest_pb2.EVENT_STATUS_ACCEPTED]
        return event_id

    async def advance(self, step: timedelta) -> None:
        """Skip the database clock forward for every service (what `nudge time advance` does)."""
        conn = await asyncpg.connect(self.stack.database_url)
        try:
            await conn.execute("UPDATE dev_clock SET skew = skew + $1::interval", step)
            await conn.execute("NOTIFY nudge_clock")
        finally:
            await conn.close()

    async def why(self, user_id: str, campaign_id: str) -> list[rules_pb2.DecisionRecord]:
        response = await self.rules(
            "ExplainDecisions",
            rules_pb2.ExplainDecisionsRequest(user_id=user_id, campaign_id=campaign_id),
        )
        return list(response.decisions)

    async def kinds(self, user_id: str, campaign_id: str) -> list[str]:
        return [d.kind for d in await self.why(user_id, campaign_id)]

    async def wait_for_kinds(
        self, user_id: str, campaign_id: str, done: Callable[[list[str]], bool]
    ) -> list[str]:
        """Poll ExplainDecisions until `done(kinds)`; the decisions are committed with the
        projection (or the fired timer), so this waits for the engine, not for a clock."""
        deadline = time.monotonic() + WAIT_S
        while True:
            kinds = await self.kinds(user_id, campaign_id)
            if done(kinds):
                return kinds
            if time.monotonic() > deadline:
                raise AssertionError(f"{user_id}/{campaign_id} decisions stuck at {kinds}")
            await asyncio.sleep(0.1)

    async def user(self, user_id: str) -> dict[str, Any]:
        response = await self.rules("GetUser", rules_pb2.GetUserRequest(user_id=user_id))
        return struct_to_dict(response.state)

    async def wait_for_count(self, user_id: str, event: str, count: int) -> None:
        """Wait until the projection has applied `count` events named `event` of the user."""
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                state = await self.user(user_id)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                state = {"events": {}}
            if state["events"].get(event, {}).get("count", 0) >= count:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{user_id} never had {count} {event} projected")
            await asyncio.sleep(0.1)

    async def mails(self, count: int) -> list[ReceivedMail]:
        mails = await asyncio.to_thread(self.stack.smtp.wait_for, count, WAIT_S)
        assert len(mails) >= count, [(m.rcpt_tos, m.subject) for m in mails]
        return mails

    async def verify_replay(self) -> None:
        """Replay equals live (checker C4)."""
        report = await self.rules("VerifyProjection", rules_pb2.VerifyProjectionRequest())
        assert report.match, report
        assert report.users > 0
        assert report.events > 0


def inbox(mails: list[ReceivedMail]) -> dict[str, list[tuple[str, str]]]:
    """(subject, body) of the received mails by recipient."""
    by_rcpt: dict[str, list[tuple[str, str]]] = {}
    for mail in mails:
        for rcpt in mail.rcpt_tos:
            by_rcpt.setdefault(rcpt, []).append((mail.subject, mail.text))
    return by_rcpt


async def settle(stack: Stack, expected: int, seconds: float = 1.5) -> None:
    """Nothing beyond the `expected` mails arrives within `seconds`."""
    await asyncio.sleep(seconds)
    assert len(stack.smtp.messages) == expected, inbox(stack.smtp.messages)


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("NUDGE_")},
        "NUDGE_API_KEY": stack.api_key,
        "NUDGE_RULES_ADDR": stack.address("rules"),
        "NUDGE_STATE_DIR": str(REPO / ".nudge-e2e-unused"),
        "PYTHONPATH": os.pathsep.join([str(REPO / "libs"), str(REPO)]),
    }
    return subprocess.run(
        [sys.executable, "-m", "nudge.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
