"""Campaign stats: per experiment group, who entered, what happened to the messages, who
converted, and what the difference means (`nudge stats`, docs/experiments.md §6).

Read-only: four aggregate queries in one read-only snapshot, then `stats.analyze`. Everything is
counted over the instances of the current salt (`experiment.salt`, `''` without an experiment or
salt; a NULL salt from before migration 0008 counts as `''`), of every campaign version, so a
reset (a new salt) starts the counts afresh and an edit does not.

Units:

- `entered`, `converted` and `converted_attributed` count distinct **users** (the unit of
  analysis; assignment is per user). A user is in one group per salt, since assignment is
  deterministic; should the data say otherwise (an allocation changed without a reset), the user
  counts in each of their groups and `users_in_several_groups` says how many such users there
  are.
- The state counts (`pending`, `held_out`, `cancelled`, `suppressed`) count **instances**, and
  the dispatch outcomes (`sent`, `failed`, `suppressed_downstream`, `opened`, `clicked`) count
  **sends** (distinct `send_id`s with at least one such event).

Conversions (`campaign_conversions`): intention to treat (`converted`, the basis of the rates,
the uplift and the verdict) when one falls in `[entered_at, entered_at + horizon)`, the horizon
being `CampaignDefinition.analysis_horizon` (the same for every group); attributed
(`converted_attributed`) when one falls in `[exposed_at, exposed_at + within)`. An instance from
before migration 0008 has no `entered_at`; its creation time stands in.

Groups: an instance without a group (before 0008) is in `treatment`. The baseline is `control`
when the experiment has one (or the data do), else the first variant; `global_control` is
reported on its own row and never compared with the variants or pooled with `control` (those
users got no marketing at all, a different baseline). A campaign without an experiment has no
control of its own: there `treatment` is compared with `global_control`, the lift of the
campaign over no marketing. A group the data have but the current experiment does not (a removed or
renamed variant) is reported without a comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Final

import asyncpg

from nudge.db import Conn
from nudge.grpcserver import NotFoundError
from services.rules import experiments, stats, store
from services.rules.domain import parse_campaign
from services.rules.experiments import CONTROL, DEFAULT_VARIANT, GLOBAL_CONTROL

_OUTCOME_FIELDS: Final[Mapping[str, str]] = {
    "message.sent": "sent",
    "message.failed": "failed",
    "message.suppressed": "suppressed_downstream",
    "message.opened": "opened",
    "message.clicked": "clicked",
}
OUTCOME_EVENTS: Final = tuple(_OUTCOME_FIELDS)
"""Dispatch's outcome and engagement events, each counted into its `GroupStats` field."""

BASELINE: Final = "baseline"
VARIANT: Final = "variant"
GLOBAL: Final = GLOBAL_CONTROL
OTHER: Final = "other"
"""Row roles: the baseline, a variant compared with it, the global control group, and a group
the current experiment does not define (reported, not compared)."""

# The instances counted: this campaign, the current salt; `grp` and `entered_at` with the
# fallbacks for rows written before migration 0008. $1 workspace, $2 campaign, $3 salt.
_INSTANCES = """
    SELECT i.instance_id, i.user_id, i.state, i.send_id, i.exposed_at,
           COALESCE(i.experiment_group, 'treatment') AS grp,
           COALESCE(i.entered_at, i.created_at) AS entered_at
    FROM campaign_instances i
    WHERE i.workspace_id = $1 AND i.campaign_id = $2
      AND (i.experiment_salt = $3 OR ($3 = '' AND i.experiment_salt IS NULL))
"""

# $4 the analysis horizon, $5 the conversion window (both NULL without a conversion goal: then
# nothing counts as converted).
_GROUPS_SQL = f"""
    WITH inst AS ({_INSTANCES}), flagged AS (
        SELECT inst.*,
               inst.state = 'cancelled' AND EXISTS (
                   SELECT 1 FROM decisions d
                   WHERE d.workspace_id = $1 AND d.user_id = inst.user_id AND d.campaign_id = $2
                     AND d.instance_id = inst.instance_id AND d.kind = 'cancelled'
                     AND d.detail ? 'exception') AS exception_cancel,
               EXISTS (
                   SELECT 1 FROM campaign_conversions c
                   WHERE c.instance_id = inst.instance_id AND c.workspace_id = $1
                     AND c.converted_at >= inst.entered_at
                     AND c.converted_at < inst.entered_at + $4::interval) AS converted,
               EXISTS (
                   SELECT 1 FROM campaign_conversions c
                   WHERE c.instance_id = inst.instance_id AND c.workspace_id = $1
                     AND c.converted_at >= inst.exposed_at
                     AND c.converted_at < inst.exposed_at + $5::interval) AS attributed
        FROM inst
    )
    SELECT grp,
           count(DISTINCT user_id) AS entered,
           count(*) AS instances,
           count(*) FILTER (WHERE state = 'pending') AS pending,
           count(*) FILTER (WHERE state = 'held_out') AS held_out,
           count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
           count(*) FILTER (WHERE exception_cancel) AS cancelled_by_exception,
           count(*) FILTER (WHERE state = 'suppressed') AS suppressed,
           count(DISTINCT user_id) FILTER (WHERE converted) AS converted,
           count(DISTINCT user_id) FILTER (WHERE attributed) AS converted_attributed
    FROM flagged GROUP BY grp
"""

# Why the rules suppressed an instance at fire time: the kind of its last decision.
_SUPPRESSED_SQL = f"""
    WITH inst AS ({_INSTANCES})
    SELECT inst.grp, COALESCE(last.kind, 'unknown') AS reason, count(*) AS instances
    FROM inst LEFT JOIN LATERAL (
        SELECT d.kind FROM decisions d
        WHERE d.workspace_id = $1 AND d.user_id = inst.user_id AND d.campaign_id = $2
          AND d.instance_id = inst.instance_id
        ORDER BY d.decision_id DESC LIMIT 1
    ) last ON true
    WHERE inst.state = 'suppressed'
    GROUP BY 1, 2
"""

# Dispatch's outcome events of the instances' sends: sends per group and event name, and per
# suppression code (`code` is '' on the per-name totals, NULL-coded events count as '?').
# $4 the event names.
_OUTCOMES_SQL = f"""
    WITH inst AS ({_INSTANCES}), outcomes AS (
        SELECT inst.grp, inst.send_id, e.name, COALESCE(e.properties->>'code', '?') AS code
        FROM inst JOIN events e
          ON e.workspace_id = $1 AND e.user_id = inst.user_id
         AND e.properties->>'campaign_id' = $2
         AND e.properties->>'send_id' = inst.send_id::text
         AND e.name LIKE 'message.%'  -- the index events_outcomes_by_campaign (0009)
        WHERE inst.send_id IS NOT NULL AND e.name = ANY($4::text[])
    )
    SELECT grp, name, '' AS code, count(DISTINCT send_id) AS sends FROM outcomes GROUP BY 1, 2
    UNION ALL
    SELECT grp, name, code, count(DISTINCT send_id) FROM outcomes
    WHERE name = 'message.suppressed' GROUP BY 1, 2, 3
"""

_SEVERAL_GROUPS_SQL = f"""
    WITH inst AS ({_INSTANCES})
    SELECT count(*) FROM (
        SELECT user_id FROM inst GROUP BY user_id HAVING count(DISTINCT grp) > 1
    ) several
"""


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One group's counts, and (with a conversion goal) its rate and comparison.

    `arm` is None without a conversion goal; `comparison` is set for the variants compared with
    the baseline.
    """

    group: str
    role: str
    entered: int = 0
    instances: int = 0
    pending: int = 0
    held_out: int = 0
    cancelled: int = 0
    cancelled_by_exception: int = 0
    suppressed: int = 0
    suppressed_reasons: Mapping[str, int] = field(default_factory=dict)
    sent: int = 0
    failed: int = 0
    suppressed_downstream: int = 0
    suppressed_codes: Mapping[str, int] = field(default_factory=dict)
    opened: int = 0
    clicked: int = 0
    converted: int = 0
    converted_attributed: int = 0
    arm: stats.ArmStats | None = None
    comparison: stats.Comparison | None = None

    @property
    def delivered(self) -> int:
        """Sent; there are no delivery receipts yet."""
        return self.sent


@dataclass(frozen=True, slots=True)
class CampaignStats:
    """The stats of one campaign since its current salt: baseline first, then the variants, then
    other groups, then global control."""

    campaign_id: str
    version: int
    salt: str
    experiment: experiments.Experiment | None
    conversion: experiments.Conversion | None
    horizon: timedelta | None
    baseline: str | None
    groups: tuple[GroupStats, ...]
    users_in_several_groups: int = 0

    @property
    def verdicts(self) -> tuple[stats.Verdict, ...]:
        """The verdict of every comparison, in row order."""
        return tuple(g.comparison.verdict for g in self.groups if g.comparison is not None)


async def campaign_stats(pool: asyncpg.Pool, workspace_id: str, campaign_id: str) -> CampaignStats:
    """The stats of a campaign's current salt; NotFoundError when there is no such campaign."""
    async with (
        pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        return await _campaign_stats(conn, workspace_id, campaign_id)


async def _campaign_stats(conn: Conn, workspace_id: str, campaign_id: str) -> CampaignStats:
    current = await store.current_campaign(conn, workspace_id, campaign_id)
    if current is None:
        raise NotFoundError(f"no campaign {campaign_id!r}")
    definition = parse_campaign(current.definition)
    experiment, conversion = definition.experiment, definition.conversion
    salt = experiment.salt if experiment is not None else ""
    horizon = definition.analysis_horizon()
    base_args = (workspace_id, campaign_id, salt)
    groups = await conn.fetch(
        _GROUPS_SQL, *base_args, horizon, conversion.within if conversion is not None else None
    )
    suppressed = await conn.fetch(_SUPPRESSED_SQL, *base_args)
    outcomes = await conn.fetch(_OUTCOMES_SQL, *base_args, list(OUTCOME_EVENTS))
    several = await conn.fetchval(_SEVERAL_GROUPS_SQL, *base_args)

    counts: dict[str, dict[str, Any]] = {}
    for row in groups:
        counts[row["grp"]] = {k: v for k, v in dict(row).items() if k != "grp"}
    for row in suppressed:
        reasons = counts.setdefault(row["grp"], {}).setdefault("suppressed_reasons", {})
        reasons[row["reason"]] = row["instances"]
    for row in outcomes:
        group = counts.setdefault(row["grp"], {})
        if row["code"]:
            group.setdefault("suppressed_codes", {})[row["code"]] = row["sends"]
        else:
            group[_OUTCOME_FIELDS[row["name"]]] = row["sends"]

    order, baseline, compared = _layout(experiment, counts)
    rows = [
        GroupStats(group=name, role=_role(name, baseline, compared), **counts.get(name, {}))
        for name in order
    ]
    if conversion is not None and baseline is not None:
        rows = _analyze(rows, baseline, compared)
    return CampaignStats(
        campaign_id=campaign_id,
        version=current.version,
        salt=salt,
        experiment=experiment,
        conversion=conversion,
        horizon=horizon,
        baseline=baseline,
        groups=tuple(rows),
        users_in_several_groups=int(several or 0),
    )


def _layout(
    experiment: experiments.Experiment | None, counts: Mapping[str, Any]
) -> tuple[list[str], str | None, list[str]]:
    """(row order, baseline, the groups compared with it)."""
    if experiment is None and GLOBAL_CONTROL in counts:
        others = sorted(g for g in counts if g not in (GLOBAL_CONTROL, DEFAULT_VARIANT))
        return [GLOBAL_CONTROL, DEFAULT_VARIANT, *others], GLOBAL_CONTROL, [DEFAULT_VARIANT]
    defined = list(experiment.groups) if experiment is not None else [DEFAULT_VARIANT]
    if CONTROL in counts and CONTROL not in defined:
        defined.insert(0, CONTROL)  # control removed from the definition: still the baseline
    baseline = defined[0]
    compared = defined[1:]
    others = sorted(g for g in counts if g not in defined and g != GLOBAL_CONTROL)
    tail = [GLOBAL_CONTROL] if GLOBAL_CONTROL in counts else []
    return [*defined, *others, *tail], baseline, compared


def _role(name: str, baseline: str | None, compared: list[str]) -> str:
    if name == baseline:
        return BASELINE
    if name in compared:
        return VARIANT
    return GLOBAL if name == GLOBAL_CONTROL else OTHER


def _analyze(rows: list[GroupStats], baseline: str, compared: list[str]) -> list[GroupStats]:
    """Rates for every row; uplift, p-values and verdicts for the compared variants (ITT)."""
    by_name = {row.group: row for row in rows}

    def arm(name: str) -> stats.Arm:
        row = by_name[name]
        return stats.Arm(name, row.entered, row.converted)

    report = stats.analyze(arm(baseline), [arm(name) for name in compared])
    comparisons = {c.variant: c for c in report.comparisons}
    arms = {a.name: a for a in report.arms}
    out = []
    for row in rows:
        rate = arms.get(row.group) or stats.arm_stats(arm(row.group))
        out.append(replace(row, arm=rate, comparison=comparisons.get(row.group)))
    return out
