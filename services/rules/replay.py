"""Replay equals live (RELIABILITY.md checker C4): rebuild user states from the event store and
compare them with the projection, and recompute every recorded experiment assignment.

The rebuild folds every event of the workspace up to the live projection's checkpoint with the
projection's own `evolve`, in the order the projector applied them (each user's events in
`(tx_id, global_position)` order), in memory and one user at a time, inside one repeatable-read
snapshot so that the checkpoint, the live states and the events agree. It writes nothing.

Each `$experiment.assigned` event met on the way is checked against `experiments.assign` for
the campaign version it names, with the salt and the global control it recorded: a different
group (or draw) is an `assignment` mismatch of that user.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from nudge import eventstore
from nudge.eventstore import Cursor
from services.rules import store
from services.rules.application import ASSIGNED_EVENT, READER
from services.rules.domain import (
    CampaignError,
    RecordedEvent,
    UserState,
    evolve,
    parse_campaign,
    state_from_dict,
    state_to_dict,
)
from services.rules.experiments import (
    Experiment,
    ExperimentError,
    GlobalControl,
    assign,
    parse_global_control,
)

MAX_LISTED = 100
REPLAY_STATEMENT_TIMEOUT = "10min"


@dataclass(frozen=True)
class Mismatch:
    """One user whose replayed state differs from the live one (`problem`: state, position,
    missing from live, unexpected in live)."""

    user_id: str
    problem: str
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReplayReport:
    """The outcome of a replay: `match` when every user is equal."""

    users: int
    events: int
    checkpoint: Cursor
    mismatch_count: int
    mismatches: tuple[Mismatch, ...]
    assignments: int = 0
    """`$experiment.assigned` events recomputed."""

    @property
    def match(self) -> bool:
        """True when replay equals live for every user."""
        return self.mismatch_count == 0


def compare_user(
    user_id: str,
    live: tuple[Mapping[str, Any], int] | None,
    replayed: tuple[UserState, int] | None,
) -> Mismatch | None:
    """Compare one user's live (state document, last position) with the replayed pair."""
    if live is None and replayed is None:
        return None
    if live is None:
        return Mismatch(user_id, "missing")
    if replayed is None:
        return Mismatch(user_id, "unexpected")
    live_doc = state_to_dict(state_from_dict(live[0]))
    replayed_doc = state_to_dict(replayed[0])
    fields = tuple(
        sorted(
            key
            for key in live_doc.keys() | replayed_doc.keys()
            if live_doc.get(key) != replayed_doc.get(key)
        )
    )
    if fields:
        return Mismatch(user_id, "state", fields)
    if live[1] != replayed[1]:
        return Mismatch(user_id, "position", ("last_position",))
    return None


def check_assignment(
    event: RecordedEvent, experiments: Mapping[tuple[str, int], Experiment | None]
) -> Mismatch | None:
    """Recompute the assignment an `$experiment.assigned` event recorded."""
    props = event.properties
    campaign_id = str(props.get("campaign_id"))
    key = (campaign_id, int(props.get("version", 0)))
    if key not in experiments:
        return Mismatch(event.user_id, "assignment", (f"{campaign_id}: unknown version",))
    try:
        recorded_global = props.get("global_control")
        global_control: GlobalControl | None = (
            None if recorded_global is None else parse_global_control(recorded_global)
        )
    except ExperimentError:
        return Mismatch(event.user_id, "assignment", (f"{campaign_id}: bad global_control",))
    again = assign(
        event.workspace_id,
        campaign_id,
        event.user_id,
        experiments[key],
        str(props.get("salt") or ""),
        global_control=global_control,
    )
    if again.group != props.get("group") or again.bucket != props.get("bucket"):
        return Mismatch(
            event.user_id,
            "assignment",
            (f"{campaign_id}: recorded {props.get('group')}, recomputed {again.group}",),
        )
    return None


async def _experiments(conn: Any, workspace_id: str) -> dict[tuple[str, int], Experiment | None]:
    experiments: dict[tuple[str, int], Experiment | None] = {}
    for version in await store.all_campaign_versions(conn):
        if version.workspace_id != workspace_id:
            continue
        try:
            definition = parse_campaign(version.definition)
        except CampaignError:
            continue
        experiments[(version.campaign_id, version.version)] = definition.experiment
    return experiments


class _Comparison:
    def __init__(self, live: dict[str, tuple[dict[str, Any], int]]) -> None:
        self.live = live
        self.seen: set[str] = set()
        self.count = 0
        self.listed: list[Mismatch] = []
        self.assignments = 0

    def user(self, user_id: str, replayed: tuple[UserState, int] | None) -> None:
        self.seen.add(user_id)
        self.add(compare_user(user_id, self.live.get(user_id), replayed))

    def add(self, mismatch: Mismatch | None) -> None:
        if mismatch is not None:
            self.count += 1
            if len(self.listed) < MAX_LISTED:
                self.listed.append(mismatch)


async def verify_projection(pool: asyncpg.Pool, workspace_id: str) -> ReplayReport:
    """Replay the workspace's events up to the live checkpoint and compare (read-only)."""
    async with (
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        await conn.execute(f"SET LOCAL statement_timeout = '{REPLAY_STATEMENT_TIMEOUT}'")
        checkpoint = await eventstore.load_checkpoint(conn, READER)
        comparison = _Comparison(await store.live_states(conn, workspace_id))
        experiments = await _experiments(conn, workspace_id)
        events = 0
        user_id: str | None = None
        state: UserState | None = None
        position = 0
        async for row in conn.cursor(
            store.REPLAY_EVENTS_SQL,
            workspace_id,
            str(checkpoint.tx_id),
            checkpoint.position,
            prefetch=2000,
        ):
            event = store.recorded_event(row)
            if event.user_id != user_id:
                if user_id is not None and state is not None:
                    comparison.user(user_id, (state, position))
                user_id, state = event.user_id, None
            state = evolve(state, event)
            position = event.global_position
            if event.name == ASSIGNED_EVENT:
                comparison.assignments += 1
                comparison.add(check_assignment(event, experiments))
            events += 1
        if user_id is not None and state is not None:
            comparison.user(user_id, (state, position))
        for unexpected in sorted(comparison.live.keys() - comparison.seen):
            comparison.user(unexpected, None)
    return ReplayReport(
        users=len(comparison.seen),
        events=events,
        checkpoint=checkpoint,
        mismatch_count=comparison.count,
        mismatches=tuple(comparison.listed),
        assignments=comparison.assignments,
    )
