"""The rules Projector in-process against real Postgres: state, decisions, outbox, replay."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from nudge import db, eventstore
from nudge.bus import BusNames
from nudge.dispatch.v1 import dispatch_pb2
from nudge.eventstore import NewEvent
from nudge.grpcserver import InvalidArgumentError
from nudge.protoconv import struct_to_dict
from services.rules import store
from services.rules.application import CampaignAdmin, CampaignCache, Planner, Projector
from services.rules.domain import send_id

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "campaigns"
CAMPAIGN = "order-shipped"


def order_shipped_campaign(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((EXAMPLES / "order-shipped.yaml").read_text())
    return document | overrides


@dataclass
class Rules:
    """One database with the rules projection wired as services/rules/__main__ wires it."""

    pool: asyncpg.Pool
    admin: CampaignAdmin
    projector: Projector
    names: BusNames
    workspace_id: str

    async def apply_campaign(self, document: dict[str, Any]) -> tuple[store.CampaignVersion, bool]:
        return await self.admin.apply(self.workspace_id, document)

    async def append(self, *events: NewEvent) -> None:
        """Each event in its own transaction, as separate ingest requests would be."""
        for event in events:
            async with self.pool.acquire() as conn, conn.transaction():
                await eventstore.append(conn, [event])

    async def project(self) -> int:
        """Apply batches until the projection has caught up."""
        total = 0
        while applied := await self.projector.apply_once():
            total += applied
        return total

    async def state(self, user_id: str) -> dict[str, Any]:
        document = await store.load_state(self.pool, self.workspace_id, user_id)
        assert document is not None
        return document

    async def decisions(self, user_id: str) -> list[tuple[str | None, str, str]]:
        rows = await store.decisions_for(self.pool, self.workspace_id, user_id, None)
        return [(row.event_id, row.campaign_id, row.kind) for row in rows]

    async def outbox(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT kind, msg_id, subject, payload FROM rules_outbox ORDER BY outbox_id"
        )

    async def instances(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT instance_id::text AS instance_id, campaign_id, version, user_id, state,"
            " trigger_event_id, due_at FROM campaign_instances ORDER BY instance_id"
        )

    def event(self, event_id: str, user_id: str, name: str, **properties: Any) -> NewEvent:
        return NewEvent(
            workspace_id=self.workspace_id,
            event_id=event_id,
            user_id=user_id,
            name=name,
            occurred_at=None,
            properties=properties,
            context={},
            metadata={},
        )

    def identify(self, event_id: str, user_id: str, **traits: Any) -> NewEvent:
        return self.event(event_id, user_id, "$identify", **traits)

    def shipped(self, event_id: str, user_id: str, total: float) -> NewEvent:
        return self.event(
            event_id, user_id, "order_shipped", order_id=f"A-{event_id}", total=total, eta="Monday"
        )


OpenRules = Callable[[str], contextlib.AbstractAsyncContextManager[Rules]]


@pytest.fixture
def open_rules(test_id: str) -> OpenRules:
    @contextlib.asynccontextmanager
    async def open_(database_url: str) -> AsyncIterator[Rules]:
        pool = await db.create_pool(database_url, max_size=4, application_name="test-rules")
        try:
            names = BusNames(f"t{test_id}")
            projector = Projector(pool, CampaignCache(), Planner(names), batch_size=1000)
            yield Rules(pool, CampaignAdmin(pool), projector, names, f"ws-{test_id}")
        finally:
            await pool.close()

    return open_


@pytest.fixture
async def rules(open_rules: OpenRules, database_url: str) -> AsyncIterator[Rules]:
    async with open_rules(database_url) as opened:
        yield opened


# --- projection into user state ---------------------------------------------------------------


async def test_user_states_count_events_sum_numbers_and_merge_traits(rules: Rules) -> None:
    await rules.append(
        rules.identify("id-1", "u1", email="ada@example.test", first_name="Ada"),
        rules.shipped("o1", "u1", 42.5),
        rules.shipped("o2", "u1", 5),
        rules.identify("id-2", "u1", plan="pro"),
        rules.event("p1", "u2", "page_viewed"),
    )

    assert await rules.project() == 5

    u1 = await rules.state("u1")
    assert u1["traits"] == {"email": "ada@example.test", "first_name": "Ada", "plan": "pro"}
    assert u1["event_count"] == 4
    assert u1["events"]["order_shipped"]["count"] == 2
    assert u1["events"]["order_shipped"]["sums"]["total"] == 47.5
    assert "$identify" not in u1["events"]
    u2 = await rules.state("u2")
    assert u2["events"]["page_viewed"]["count"] == 1
    assert u2["traits"] == {}
    assert await rules.projector.apply_once() == 0


async def test_the_projection_checkpoint_follows_the_last_applied_event(rules: Rules) -> None:
    await rules.append(rules.event("p1", "u1", "page_viewed"), rules.event("p2", "u1", "x"))
    await rules.project()

    checkpoint = await eventstore.load_checkpoint(rules.pool, "rules")
    last = await rules.pool.fetchrow(
        "SELECT tx_id::text AS tx, global_position FROM events ORDER BY global_position DESC"
    )
    assert last is not None
    assert (checkpoint.tx_id, checkpoint.position) == (int(last["tx"]), last["global_position"])
    user_state = await rules.pool.fetchval("SELECT last_position FROM user_states")
    assert user_state == last["global_position"]


# --- an immediate action campaign -------------------------------------------------------------


async def test_a_triggered_immediate_campaign_plans_one_send_with_a_deterministic_id(
    rules: Rules,
) -> None:
    await rules.apply_campaign(order_shipped_campaign())
    await rules.append(
        rules.identify("id-1", "u1", email="ada@example.test", first_name="Ada"),
        rules.shipped("o1", "u1", 42.5),
    )

    await rules.project()

    assert await rules.decisions("u1") == [
        ("o1", CAMPAIGN, "triggered"),
        ("o1", CAMPAIGN, "send_planned"),
    ]
    expected_send_id = str(send_id(rules.workspace_id, CAMPAIGN, 1, "u1", "o1", "email"))
    [item] = await rules.outbox()
    assert item["kind"] == "dispatch"
    assert item["msg_id"] == expected_send_id
    assert item["subject"] == rules.names.dispatch_subject(rules.workspace_id, "email")
    request = dispatch_pb2.SendRequest.FromString(item["payload"])
    assert request.send_id == expected_send_id
    assert (request.workspace_id, request.user_id, request.campaign_id) == (
        rules.workspace_id,
        "u1",
        CAMPAIGN,
    )
    assert (request.campaign_version, request.channel, request.trigger_event_id) == (
        1,
        "email",
        "o1",
    )
    assert request.template["to"] == "{{ user.traits.email }}"
    context = struct_to_dict(request.context)
    assert context["user"]["traits"]["email"] == "ada@example.test"
    assert context["event"]["properties"]["order_id"] == "A-o1"
    [instance] = await rules.instances()
    assert (instance["campaign_id"], instance["user_id"], instance["state"]) == (
        CAMPAIGN,
        "u1",
        "sent",
    )


async def test_a_false_where_filter_records_filtered_out_and_plans_nothing(rules: Rules) -> None:
    await rules.apply_campaign(order_shipped_campaign())
    await rules.append(rules.shipped("o1", "u1", 5))

    await rules.project()

    [decision] = await store.decisions_for(rules.pool, rules.workspace_id, "u1", CAMPAIGN)
    assert (decision.kind, decision.reason, decision.event_id) == (
        "filtered_out",
        "trigger.where is false",
        "o1",
    )
    assert await rules.outbox() == []
    assert await rules.instances() == []


async def test_events_received_before_the_campaign_was_created_do_not_trigger_it(
    rules: Rules,
) -> None:
    await rules.append(rules.shipped("before", "u1", 42.5))
    await rules.apply_campaign(order_shipped_campaign())
    await rules.append(rules.shipped("after", "u1", 42.5))

    await rules.project()

    assert await rules.decisions("u1") == [
        ("after", CAMPAIGN, "triggered"),
        ("after", CAMPAIGN, "send_planned"),
    ]
    assert [item["msg_id"] for item in await rules.outbox()] == [
        str(send_id(rules.workspace_id, CAMPAIGN, 1, "u1", "after", "email"))
    ]
    assert (await rules.state("u1"))["events"]["order_shipped"]["count"] == 2


async def test_a_campaign_of_another_workspace_never_sees_this_workspaces_events(
    rules: Rules,
) -> None:
    await rules.admin.apply(f"{rules.workspace_id}-other", order_shipped_campaign())
    await rules.append(rules.shipped("o1", "u1", 42.5))

    await rules.project()

    assert await rules.decisions("u1") == []
    assert await rules.outbox() == []


# --- replay equals live -----------------------------------------------------------------------


async def copy_events(source: Rules, target: Rules) -> None:
    """Give `target` the same event rows (positions and received times) in one transaction."""
    columns = (
        "global_position, workspace_id, event_id, user_id, name, occurred_at, received_at,"
        " properties, context, metadata, body_hash"
    )
    rows = await source.pool.fetch(f"SELECT {columns} FROM events ORDER BY tx_id, global_position")
    async with target.pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            f"INSERT INTO events ({columns}) OVERRIDING SYSTEM VALUE"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            [tuple(row.values()) for row in rows],
        )


async def outcome(rules: Rules) -> dict[str, Any]:
    """Everything the projection wrote, in comparable form."""
    states = await rules.pool.fetch(
        "SELECT workspace_id, user_id, state, last_position FROM user_states"
        " ORDER BY workspace_id, user_id"
    )
    decisions = await rules.pool.fetch(
        "SELECT workspace_id, user_id, campaign_id, version, instance_id::text, event_id, kind,"
        " reason, detail, decided_at FROM decisions ORDER BY decision_id"
    )
    instances = await rules.pool.fetch(
        "SELECT instance_id::text, campaign_id, version, user_id, correlation, trigger_event_id,"
        " trigger_event, state, due_at FROM campaign_instances ORDER BY instance_id"
    )
    return {
        "states": [tuple(r.values()) for r in states],
        "decisions": [tuple(r.values()) for r in decisions],
        "instances": [tuple(r.values()) for r in instances],
        "outbox": [
            (
                r["kind"],
                r["msg_id"],
                r["subject"],
                dispatch_pb2.SendRequest.FromString(r["payload"]),
            )
            for r in await rules.outbox()
        ],
    }


async def test_replaying_the_same_events_in_a_fresh_database_gives_identical_results(
    open_rules: OpenRules, database_url: str, database_factory: Callable[[], str]
) -> None:
    once_ever = order_shipped_campaign(id="first-order", reeligibility=None)
    async with open_rules(database_url) as live, open_rules(database_factory()) as replay:
        for rules in (live, replay):  # both exist before any event is received
            await rules.apply_campaign(order_shipped_campaign())
            await rules.apply_campaign(once_ever)
        events = [
            live.identify("id-1", "u1", email="ada@example.test", first_name="Ada"),
            live.identify("id-2", "u2", email="bob@example.test"),
            live.shipped("o1", "u1", 42.5),
            live.shipped("o2", "u2", 10),
            live.event("p1", "u1", "page_viewed", path="/orders"),
            live.shipped("o3", "u1", 99),
            live.shipped("o4", "u2", 21),
            live.identify("id-3", "u1", first_name="Augusta"),
        ]
        for event in events:  # live: one event at a time, projected as it arrives
            await live.append(event)
            assert await live.project() == 1
        await copy_events(live, replay)

        assert await replay.project() == len(events)  # replay: all at once, one batch

        live_outcome = await outcome(live)
        replay_outcome = await outcome(replay)
    assert replay_outcome == live_outcome
    kinds = [(d[2], d[5], d[6]) for d in live_outcome["decisions"]]
    assert kinds == [
        ("first-order", "o1", "triggered"),
        ("first-order", "o1", "send_planned"),
        (CAMPAIGN, "o1", "triggered"),
        (CAMPAIGN, "o1", "send_planned"),
        ("first-order", "o2", "filtered_out"),
        (CAMPAIGN, "o2", "filtered_out"),
        ("first-order", "o3", "not_reeligible"),
        (CAMPAIGN, "o3", "triggered"),
        (CAMPAIGN, "o3", "send_planned"),
        ("first-order", "o4", "triggered"),
        ("first-order", "o4", "send_planned"),
        (CAMPAIGN, "o4", "triggered"),
        (CAMPAIGN, "o4", "send_planned"),
    ]
    assert [item[1] for item in live_outcome["outbox"]] == [
        str(send_id(live.workspace_id, campaign, 1, user, trigger, "email"))
        for campaign, user, trigger in [
            ("first-order", "u1", "o1"),
            (CAMPAIGN, "u1", "o1"),
            (CAMPAIGN, "u1", "o3"),
            ("first-order", "u2", "o4"),
            (CAMPAIGN, "u2", "o4"),
        ]
    ]


# --- campaign administration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (
            {"trigger": {"event": "order_shipped", "where": "event.properties.total >"}},
            "trigger.where",
        ),
        ({"trigger": {"event": "order_shipped", "where": "customer.total > 20"}}, "trigger.where"),
        ({"colour": "red"}, "colour"),
        ({"delay": "soon"}, "delay"),
        (
            {
                "message": {
                    "channel": "email",
                    "to": "{{ user.traits.email }}",
                    "subject": "s",
                    "body": "Hi {{ user.traits.first_name ",
                }
            },
            "messages[0].message.body",
        ),
        (
            {
                "message": {
                    "channel": "email",
                    "to": "{{ user.traits.email | shout }}",
                    "subject": "s",
                    "body": "b",
                }
            },
            "messages[0].message.to",
        ),
    ],
)
async def test_an_invalid_campaign_is_refused_with_the_path_of_the_bad_field(
    rules: Rules, overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await rules.apply_campaign(order_shipped_campaign(**overrides))

    assert caught.value.field == field
    assert await rules.pool.fetchval("SELECT count(*) FROM campaign_versions") == 0


async def test_applying_the_same_definition_twice_creates_one_version(rules: Rules) -> None:
    first, created = await rules.apply_campaign(order_shipped_campaign())
    again, created_again = await rules.apply_campaign(order_shipped_campaign())

    assert (first.version, created) == (1, True)
    assert (again.version, created_again) == (1, False)
    assert again.definition_hash == first.definition_hash


async def test_a_changed_definition_becomes_version_two_and_new_triggers_use_it(
    rules: Rules,
) -> None:
    await rules.apply_campaign(order_shipped_campaign())
    changed, created = await rules.apply_campaign(order_shipped_campaign(name="Order shipped (v2)"))
    await rules.append(rules.shipped("o1", "u1", 42.5))

    await rules.project()

    assert (changed.version, created) == (2, True)
    versions = await rules.pool.fetch(
        "SELECT version FROM campaign_versions WHERE campaign_id = $1 ORDER BY version", CAMPAIGN
    )
    assert [v["version"] for v in versions] == [1, 2]
    [item] = await rules.outbox()
    assert item["msg_id"] == str(send_id(rules.workspace_id, CAMPAIGN, 2, "u1", "o1", "email"))
    assert dispatch_pb2.SendRequest.FromString(item["payload"]).campaign_version == 2


async def test_orders_whose_received_times_run_backwards_in_commit_order_are_each_sent(
    rules: Rules, database_url: str
) -> None:
    # Reader order follows transaction ids, and a transaction can take its id before another
    # yet stamp received_at after it: the projection then sees o-late, then o-early.
    await rules.apply_campaign(order_shipped_campaign())
    await rules.append(rules.identify("id-1", "u1", email="ada@example.test"))
    slow = await db.connect(database_url)
    try:
        async with slow.transaction():
            await slow.execute("SELECT pg_current_xact_id()")
            await rules.append(rules.shipped("o-early", "u1", 30))
            await slow.execute("SELECT pg_sleep(0.01)")
            await eventstore.append(slow, [rules.shipped("o-late", "u1", 30)])
    finally:
        await slow.close()
    order = await rules.pool.fetch(
        "SELECT event_id, received_at FROM events WHERE name = 'order_shipped'"
        " ORDER BY tx_id, global_position"
    )
    assert [r["event_id"] for r in order] == ["o-late", "o-early"]
    assert order[0]["received_at"] > order[1]["received_at"]

    await rules.project()

    kinds = [kind for _, campaign_id, kind in await rules.decisions("u1") if campaign_id]
    assert kinds == ["triggered", "send_planned", "triggered", "send_planned"]
    assert len(await rules.outbox()) == 2


async def test_an_event_received_before_an_edit_but_projected_after_uses_the_old_version(
    rules: Rules,
) -> None:
    await rules.apply_campaign(order_shipped_campaign())
    await rules.append(
        rules.identify("id-1", "u1", email="ada@example.test"), rules.shipped("o1", "u1", 30)
    )
    # The projection lags: version 2 is applied before it reads o1.
    await rules.apply_campaign(order_shipped_campaign(name="Order shipped, v2"))
    await rules.append(rules.shipped("o2", "u1", 30))

    await rules.project()

    sends = [dispatch_pb2.SendRequest.FromString(row["payload"]) for row in await rules.outbox()]
    assert [(r.trigger_event_id, r.campaign_version) for r in sends] == [("o1", 1), ("o2", 2)]
