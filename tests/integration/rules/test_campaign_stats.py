"""Campaign stats (`nudge stats`, RulesService.GetCampaignStats) against real Postgres.

The rows the stats read (campaign versions, instances, decisions, dispatch's outcome events,
conversions) are inserted directly, as the data contract of docs/experiments.md §6 describes
them, so these tests pin the counting rules independently of how the projector writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from nudge import db
from nudge.auth import KeyVerifier, create_api_key, ensure_workspace
from nudge.cli.main import main
from nudge.cli.rules_cmds import format_stats, stats_data
from nudge.grpcserver import NotFoundError, ServiceBinding, start_grpc_server
from nudge.rules.v1 import rules_pb2, rules_pb2_grpc
from services.rules import stats
from services.rules.application import CampaignAdmin, UserViews
from services.rules.campaign_stats import CampaignStats, GroupStats, campaign_stats
from services.rules.grpc_api import RulesServicer

CAMPAIGN = "cart"
T0 = datetime(2030, 1, 6, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)

EXPERIMENT = {
    "control": 10,
    "variants": [
        {"name": "wait-1h", "weight": 50, "delay": "1h"},
        {"name": "wait-24h", "weight": 50, "delay": "24h"},
    ],
    "salt": "s1",
}
CONVERSION = {"event": "purchase", "within": "3d"}  # horizon: 24h + 3d = 4d from entry


def definition(**blocks: Any) -> dict[str, Any]:
    """A canonical campaign definition with the given `experiment`/`conversion` blocks."""
    document: dict[str, Any] = {
        "id": CAMPAIGN,
        "name": "Abandoned cart",
        "status": "active",
        "kind": "marketing",
        "priority": 0,
        "trigger": {"event": "cart_abandoned"},
        "delay": "1h",
        "exceptions": [{"event": "purchase"}],
        "messages": [
            {"message": {"channel": "email", "to": "a@b.test", "subject": "Hi", "body": "Back"}}
        ],
    }
    return document | {k: v for k, v in blocks.items() if v is not None}


@dataclass
class Data:
    """Inserts the rows the stats read, for one workspace."""

    pool: asyncpg.Pool
    workspace_id: str
    version: int = 0
    _events: int = field(default=0)

    async def campaign(self, document: dict[str, Any], campaign_id: str = CAMPAIGN) -> None:
        """Store `document` as the campaign's next version and make it current."""
        self.version += 1
        await self.pool.execute(
            "INSERT INTO campaign_versions (workspace_id, campaign_id, version, definition,"
            " definition_hash) VALUES ($1, $2, $3, $4, $5)",
            self.workspace_id,
            campaign_id,
            self.version,
            document,
            f"h{self.version}",
        )
        await self.pool.execute(
            "INSERT INTO campaigns (workspace_id, campaign_id, current_version) VALUES ($1, $2, $3)"
            " ON CONFLICT (workspace_id, campaign_id) DO UPDATE SET current_version = $3",
            self.workspace_id,
            campaign_id,
            self.version,
        )

    async def instance(
        self,
        user_id: str,
        group: str | None,
        state: str,
        *,
        salt: str | None = "s1",
        entered: datetime | None = T0,
        exposed: datetime | None = None,
        send: bool = False,
        campaign_id: str = CAMPAIGN,
        workspace_id: str | None = None,
        created: datetime = T0,
    ) -> tuple[str, str | None]:
        """Insert an instance; returns (instance_id, send_id)."""
        instance_id = str(uuid.uuid4())
        send_id = str(uuid.uuid4()) if send else None
        await self.pool.execute(
            """INSERT INTO campaign_instances (instance_id, workspace_id, campaign_id, version,
                   user_id, trigger_event_id, trigger_event, state, due_at, created_at,
                   experiment_group, experiment_salt, entered_at, exposed_at, send_id)
               VALUES ($1, $2, $3, 1, $4, $5, '{}', $6, $7, $8, $9, $10, $11, $12, $13)""",
            instance_id,
            workspace_id or self.workspace_id,
            campaign_id,
            user_id,
            f"trigger-{instance_id}",
            state,
            exposed or T0,
            created,
            group,
            salt,
            entered,
            exposed,
            send_id,
        )
        return instance_id, send_id

    async def decision(
        self, instance_id: str, user_id: str, kind: str, detail: dict[str, Any] | None = None
    ) -> None:
        await self.pool.execute(
            "INSERT INTO decisions (workspace_id, user_id, campaign_id, version, instance_id,"
            " kind, detail) VALUES ($1, $2, $3, 1, $4, $5, $6)",
            self.workspace_id,
            user_id,
            CAMPAIGN,
            instance_id,
            kind,
            detail or {},
        )

    async def outcome(self, user_id: str, send_id: str | None, name: str, **props: Any) -> None:
        """An outcome event of dispatch for the send, as dispatch's store appends it."""
        assert send_id is not None
        self._events += 1
        await self.pool.execute(
            "INSERT INTO events (workspace_id, event_id, user_id, name, occurred_at, properties,"
            " body_hash) VALUES ($1, $2, $3, $4, $5, $6, '\\x00')",
            self.workspace_id,
            f"{send_id}:{name}:{self._events}",
            user_id,
            name,
            T0,
            {"send_id": send_id, "campaign_id": CAMPAIGN, **props},
        )

    async def conversion(self, instance_id: str, user_id: str, at: datetime) -> None:
        self._events += 1
        await self.pool.execute(
            "INSERT INTO campaign_conversions (instance_id, event_id, workspace_id, campaign_id,"
            " user_id, converted_at) VALUES ($1, $2, $3, $4, $5, $6)",
            instance_id,
            f"purchase-{self._events}",
            self.workspace_id,
            CAMPAIGN,
            user_id,
            at,
        )

    async def arm(self, group: str, users: int, conversions: int, salt: str = "s1") -> None:
        """`users` held-out or sent users of `group`, the first `conversions` of them converted
        (bulk, for the verdict tests)."""
        state = "held_out" if group in ("control", "global_control") else "sent"
        rows = [(str(uuid.uuid4()), f"{group}-{i}", group, state, T0 + H) for i in range(users)]
        await self.pool.executemany(
            """INSERT INTO campaign_instances (instance_id, workspace_id, campaign_id, version,
                   user_id, trigger_event_id, trigger_event, state, due_at, experiment_group,
                   experiment_salt, entered_at, exposed_at)
               VALUES ($1::uuid, $6, $7, 1, $2, 't-' || $1::text, '{}', $4, $5, $3, $9, $8,
                       $5)""",
            [(*row, self.workspace_id, CAMPAIGN, T0, salt) for row in rows],
        )
        await self.pool.executemany(
            "INSERT INTO campaign_conversions (instance_id, event_id, workspace_id, campaign_id,"
            " user_id, converted_at) VALUES ($1::uuid, 'p-' || $1::text, $3, $4, $2, $5)",
            [
                (instance_id, user_id, self.workspace_id, CAMPAIGN, T0 + 2 * H)
                for instance_id, user_id, *_ in rows[:conversions]
            ],
        )


@pytest.fixture
async def data(database_url: str, test_id: str) -> AsyncIterator[Data]:
    pool = await db.create_pool(database_url, max_size=4, application_name="test-stats")
    try:
        yield Data(pool, f"ws-{test_id}")
    finally:
        await pool.close()


def by_group(report: CampaignStats) -> dict[str, GroupStats]:
    return {group.group: group for group in report.groups}


async def plant_mixed_experiment(data: Data) -> None:
    """A small experiment with one example of everything counted (see the test below)."""
    await data.campaign(definition(experiment=EXPERIMENT, conversion=CONVERSION))
    # control: held out; c1 converts two hours in (within both windows).
    c1, _ = await data.instance("c1", "control", "held_out", exposed=T0 + H, send=True)
    await data.conversion(c1, "c1", T0 + 2 * H)
    await data.instance("c2", "control", "held_out", exposed=T0 + H, send=True)
    # wait-1h: a1 sent, opened twice, clicked, converted.
    a1, s1 = await data.instance("a1", "wait-1h", "sent", exposed=T0 + H, send=True)
    await data.outcome("a1", s1, "message.sent", channel="email")
    await data.outcome("a1", s1, "message.opened")
    await data.outcome("a1", s1, "message.opened")
    await data.outcome("a1", s1, "message.clicked")
    await data.conversion(a1, "a1", T0 + 3 * H)
    # a2 suppressed by the rules when the delay ended (its last decision says why).
    a2, _ = await data.instance("a2", "wait-1h", "suppressed")
    await data.decision(a2, "a2", "triggered")
    await data.decision(a2, "a2", "not_reeligible")
    # a3 planned, suppressed by dispatch (consent).
    _, s3 = await data.instance("a3", "wait-1h", "sent", exposed=T0 + H, send=True)
    await data.outcome("a3", s3, "message.suppressed", code="consent")
    # a4 entered twice, both sent: one user, two instances, two sends.
    for hours in (0, 30):
        _, s4 = await data.instance(
            "a4", "wait-1h", "sent", entered=T0 + hours * H, exposed=T0 + (hours + 1) * H, send=True
        )
        await data.outcome("a4", s4, "message.sent")
    # wait-24h: b1 bought before the 24h send, so the exception cancelled it. It converted by
    # intention to treat but was never exposed (not attributed).
    b1, _ = await data.instance("b1", "wait-24h", "cancelled")
    await data.decision(b1, "b1", "cancelled", {"exception": "purchase", "event_id": "p-b1"})
    await data.conversion(b1, "b1", T0 + 3 * H)
    # b2 cancelled by a new campaign version: cancelled, not by an exception.
    b2, _ = await data.instance("b2", "wait-24h", "cancelled")
    await data.decision(b2, "b2", "cancelled", {"superseded_by": 2})
    # b3 sent a day in, failed, converted just inside both windows.
    b3, s3b = await data.instance("b3", "wait-24h", "sent", exposed=T0 + D, send=True)
    await data.outcome("b3", s3b, "message.failed", reason="smtp 550")
    await data.conversion(b3, "b3", T0 + 4 * D - timedelta(seconds=1))
    # b4 bought before entering and after the horizon: neither counts.
    b4, _ = await data.instance("b4", "wait-24h", "sent", exposed=T0 + D, send=True)
    await data.conversion(b4, "b4", T0 - H)
    await data.conversion(b4, "b4", T0 + 4 * D)
    # global control: its own row.
    g1, _ = await data.instance("g1", "global_control", "held_out", exposed=T0 + H, send=True)
    await data.conversion(g1, "g1", T0 + 2 * H)
    # Not counted: the previous salt (a reset), another campaign, another workspace.
    old, _ = await data.instance("old", "wait-1h", "sent", salt="")
    await data.conversion(old, "old", T0 + 2 * H)
    await data.instance("x1", "wait-1h", "sent", campaign_id="other")
    await data.instance("x2", "wait-1h", "sent", workspace_id="another-workspace")


async def test_counts_per_group_follow_the_data_contract(data: Data) -> None:
    await plant_mixed_experiment(data)

    report = await campaign_stats(data.pool, data.workspace_id, CAMPAIGN)

    assert (report.campaign_id, report.version, report.salt) == (CAMPAIGN, 1, "s1")
    assert report.horizon == 4 * D
    assert report.baseline == "control"
    assert [(g.group, g.role) for g in report.groups] == [
        ("control", "baseline"),
        ("wait-1h", "variant"),
        ("wait-24h", "variant"),
        ("global_control", "global_control"),
    ]
    groups = by_group(report)
    control, fast, slow, global_control = (
        groups["control"],
        groups["wait-1h"],
        groups["wait-24h"],
        groups["global_control"],
    )
    assert (control.entered, control.held_out, control.sent, control.converted) == (2, 2, 0, 1)
    assert control.converted_attributed == 1

    assert (fast.entered, fast.instances) == (4, 5)  # users, not entries
    assert (fast.sent, fast.delivered, fast.failed) == (3, 3, 0)
    assert (fast.opened, fast.clicked) == (1, 1)  # sends opened, not opens
    assert (fast.suppressed, dict(fast.suppressed_reasons)) == (1, {"not_reeligible": 1})
    assert (fast.suppressed_downstream, dict(fast.suppressed_codes)) == (1, {"consent": 1})
    assert (fast.converted, fast.converted_attributed) == (1, 1)  # the old salt's user is not

    assert (slow.entered, slow.cancelled, slow.cancelled_by_exception) == (4, 2, 1)
    assert (slow.sent, slow.failed) == (0, 1)
    # Intention to treat counts b1 (cancelled by its purchase) and b3; attributed only b3.
    assert (slow.converted, slow.converted_attributed) == (2, 1)

    assert (global_control.entered, global_control.converted) == (1, 1)
    assert global_control.comparison is None
    assert report.users_in_several_groups == 0


async def test_rates_and_comparisons_use_intention_to_treat_against_control(data: Data) -> None:
    await plant_mixed_experiment(data)

    report = await campaign_stats(data.pool, data.workspace_id, CAMPAIGN)

    groups = by_group(report)
    slow = groups["wait-24h"]
    assert slow.arm is not None
    assert slow.arm.rate == 0.5
    assert slow.arm.interval == stats.wilson_interval(2, 4)
    assert slow.comparison is not None
    assert slow.comparison.baseline == "control"
    assert slow.comparison.absolute_uplift == 0.0  # 2/4 vs 1/2
    expected = stats.analyze(
        stats.Arm("control", 2, 1), [stats.Arm("wait-1h", 4, 1), stats.Arm("wait-24h", 4, 2)]
    )
    assert [g.comparison for g in report.groups if g.comparison] == list(expected.comparisons)
    assert groups["control"].comparison is None
    global_control = groups["global_control"].arm
    assert global_control is not None
    assert global_control.rate == 1.0
    assert [v.kind for v in report.verdicts] == [stats.VerdictKind.NOT_ENOUGH_DATA] * 2
    assert all(v.text.startswith("not enough data yet") for v in report.verdicts)


async def test_a_large_planted_difference_gives_better_and_worse(data: Data) -> None:
    await data.campaign(definition(experiment=EXPERIMENT, conversion=CONVERSION))
    await data.arm("control", 1000, 50)
    await data.arm("wait-1h", 1000, 120)
    await data.arm("wait-24h", 1000, 20)

    report = await campaign_stats(data.pool, data.workspace_id, CAMPAIGN)

    kinds = {g.group: g.comparison.verdict.kind for g in report.groups if g.comparison}
    assert kinds == {"wait-1h": stats.VerdictKind.BETTER, "wait-24h": stats.VerdictKind.WORSE}
    texts = [v.text for v in report.verdicts]
    assert texts[0].startswith("wait-1h converts better than control (12.0% vs 5.0%")
    assert texts[1].startswith("wait-24h converts worse than control (2.0% vs 5.0%")


async def test_a_small_sample_is_not_enough_data(data: Data) -> None:
    await data.campaign(definition(experiment=EXPERIMENT, conversion=CONVERSION))
    await data.arm("control", 10, 1)
    await data.arm("wait-1h", 10, 3)
    await data.arm("wait-24h", 10, 0)

    report = await campaign_stats(data.pool, data.workspace_id, CAMPAIGN)

    assert [v.kind for v in report.verdicts] == [stats.VerdictKind.NOT_ENOUGH_DATA] * 2
    assert all("not enough data yet" in v.text for v in report.verdicts)


async def test_a_new_salt_starts_the_counts_afresh(data: Data) -> None:
    await data.campaign(definition(experiment=EXPERIMENT, conversion=CONVERSION))
    await data.arm("wait-1h", 5, 2)

    await data.campaign(definition(experiment=EXPERIMENT | {"salt": "s2"}, conversion=CONVERSION))
    await data.instance("new", "wait-1h", "sent", salt="s2")
    report = await campaign_stats(data.pool, data.workspace_id, CAMPAIGN)

    assert (report.version, report.salt) == (2, "s2")
    assert (by_group(report)["wait-1h"].entered, by_group(report)["wait-1h"].converted) == (1, 0)


async def test_rows_from_before_experiments_count_as_treatment_with_the_default_salt(
    data: Data,
) -> None:
    await data.campaign(definition(conversion=CONVERSION))  # no experiment: everyone treatment
    legacy, _ = await data.instance(
        "u1", None, "sent", salt=None, entered=None, created=T0 - D, send=True
    )
    await data.conversion(legacy, "u1", T0)  # a day after creation, the entry stand-in
    await data.instance("u2", "treatment", "sent", salt="")
    await data.instance("u3", "treatment", "sent", salt="other")

    report = await campaign_stats(data.pool, data.workspace_id, CAMPAIGN)

    [treatment] = report.groups
    assert (treatment.group, treatment.role, report.baseline) == (
        "treatment",
        "baseline",
        "treatment",
    )
    assert (treatment.entered, treatment.converted, treatment.converted_attributed) == (2, 1, 0)
    assert treatment.arm is not None
    assert treatment.arm.rate == 0.5
    assert treatment.comparison is None
    assert report.verdicts == ()


async def test_without_a_conversion_goal_only_counts_are_reported(data: Data) -> None:
    await data.campaign(definition(experiment=EXPERIMENT))
    _, send = await data.instance("a1", "wait-1h", "sent", exposed=T0 + H, send=True)
    await data.outcome("a1", send, "message.sent")

    report = await campaign_stats(data.pool, data.workspace_id, CAMPAIGN)

    assert (report.conversion, report.horizon) == (None, None)
    groups = by_group(report)
    assert (groups["wait-1h"].entered, groups["wait-1h"].sent) == (1, 1)
    assert all(g.arm is None and g.comparison is None for g in report.groups)
    assert report.verdicts == ()


async def test_a_user_in_several_groups_counts_in_each_and_is_reported(data: Data) -> None:
    await data.campaign(definition(experiment=EXPERIMENT, conversion=CONVERSION))
    await data.instance("u1", "wait-1h", "sent")
    await data.instance("u1", "wait-24h", "sent")
    await data.instance("u2", "wait-24h", "sent")

    report = await campaign_stats(data.pool, data.workspace_id, CAMPAIGN)

    groups = by_group(report)
    assert (groups["wait-1h"].entered, groups["wait-24h"].entered) == (1, 2)
    assert report.users_in_several_groups == 1


async def test_an_unknown_campaign_is_not_found(data: Data) -> None:
    with pytest.raises(NotFoundError):
        await campaign_stats(data.pool, data.workspace_id, "nope")


# --- over gRPC and the CLI --------------------------------------------------------------------


@dataclass
class Served:
    stub: rules_pb2_grpc.RulesServiceAsyncStub
    address: str
    api_key: str


@contextlib.asynccontextmanager
async def serve_rules(data: Data) -> AsyncIterator[Served]:
    """RulesService as services/rules/__main__ wires it, on a free port."""
    await ensure_workspace(data.pool, data.workspace_id)
    api_key = await create_api_key(data.pool, data.workspace_id, frozenset({"admin"}))
    servicer = RulesServicer(
        data.pool, KeyVerifier(data.pool), CampaignAdmin(data.pool), UserViews(data.pool)
    )
    server = await start_grpc_server(
        "127.0.0.1:0",
        [
            ServiceBinding(
                rules_pb2_grpc.add_RulesServiceServicer_to_server,
                servicer,
                "nudge.rules.v1.RulesService",
            )
        ],
    )
    try:
        await server.set_serving(True)
        address = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            yield Served(rules_pb2_grpc.RulesServiceStub(channel), address, api_key)
    finally:
        await server.server.stop(None)


async def test_get_campaign_stats_over_grpc_and_the_cli(
    data: Data, capsys: pytest.CaptureFixture[str]
) -> None:
    await plant_mixed_experiment(data)

    async with serve_rules(data) as served:
        metadata = (("authorization", f"Bearer {served.api_key}"),)
        response = await served.stub.GetCampaignStats(
            rules_pb2.GetCampaignStatsRequest(campaign_id=CAMPAIGN), metadata=metadata, timeout=20
        )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await served.stub.GetCampaignStats(
                rules_pb2.GetCampaignStatsRequest(campaign_id="nope"), metadata=metadata
            )
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await served.stub.GetCampaignStats(
                rules_pb2.GetCampaignStatsRequest(), metadata=metadata
            )
        argv = ["stats", CAMPAIGN, "--addr", served.address, "--api-key", served.api_key]
        text_code = await asyncio.to_thread(main, argv)
        text = capsys.readouterr().out
        json_code = await asyncio.to_thread(main, [*argv, "--json"])
        printed = json.loads(capsys.readouterr().out)

    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (response.campaign_id, response.version, response.salt) == (CAMPAIGN, 1, "s1")
    assert (response.conversion_event, response.conversion_within) == ("purchase", "3d")
    assert (response.horizon, response.baseline) == ("4d", "control")
    slow = response.groups[2]
    assert (slow.group, slow.entered, slow.cancelled_by_exception) == ("wait-24h", 4, 1)
    assert (slow.converted, slow.converted_attributed, slow.rate) == (2, 1, 0.5)
    assert slow.comparison.verdict == "not_enough_data"
    assert slow.comparison.HasField("adjusted_p_value")
    assert not response.groups[0].HasField("comparison")
    assert dict(response.groups[1].suppressed_codes) == {"consent": 1}

    assert (text_code, json_code) == (0, 0)
    assert printed == stats_data(response)
    assert printed["groups"][1]["suppressed_reasons"] == {"not_reeligible": 1}
    assert text == format_stats(response) + "\n"
    lines = text.splitlines()
    assert lines[0] == "campaign cart v1 (salt 's1')"
    header = next(line for line in lines if line.startswith("group"))
    assert "rate [95% CI]" in header
    assert "uplift pts [95% CI]" in header
    control_row = next(line for line in lines if line.startswith("control (baseline)"))
    assert "50.0% [" in control_row
    assert "  wait-1h suppressed: not_reeligible 1, consent 1 (dispatch)" in lines
    assert [line.split(":")[0] for line in lines if "not enough data yet" in line] == [
        "wait-1h",
        "wait-24h",
    ]


async def test_without_an_experiment_the_campaign_is_compared_with_global_control(
    data: Data,
) -> None:
    await data.campaign(definition(conversion=CONVERSION))
    await data.arm("treatment", 400, 120, salt="")
    await data.arm("global_control", 200, 30, salt="")
    report = await campaign_stats(data.pool, data.workspace_id, CAMPAIGN)
    assert [(g.group, g.role) for g in report.groups] == [
        ("global_control", "baseline"),
        ("treatment", "variant"),
    ]
    assert report.baseline == "global_control"
    treatment = report.groups[1]
    assert treatment.comparison is not None
    assert treatment.comparison.verdict.kind is stats.VerdictKind.BETTER
    assert treatment.comparison.absolute_uplift == pytest.approx(0.30 - 0.15)
