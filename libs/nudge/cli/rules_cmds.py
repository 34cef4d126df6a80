"""Rules commands: `nudge why`, `nudge replay`, `nudge stats`, `nudge backtest`,
`nudge campaigns pause|resume` (RulesService).

`nudge why USER CAMPAIGN` lists every decision the rules engine recorded for the user and
campaign, with the outcome dispatch reported for each send; `nudge replay` rebuilds the
workspace's user states from the event store and reports whether they equal the live
projection (exit 1 when they do not); `nudge stats CAMPAIGN` reports the campaign's experiment
per group, with rates, uplift and a plain-language verdict per variant; `nudge backtest FILE
--from DATE --to DATE` replays a period's events through a definition without sending anything.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nudge.cli.api import Client, _add_client_options, _iso, load_campaign_documents
from nudge.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    format_table,
    parse_time,
)
from nudge.protoconv import dict_to_struct, struct_to_dict, to_timestamp
from nudge.rules.v1 import rules_pb2, rules_pb2_grpc


def decision_data(record: rules_pb2.DecisionRecord) -> dict[str, Any]:
    """A decision record as plain JSON data."""
    return {
        "decided_at": _iso(record.decided_at, record.HasField("decided_at")),
        "source": record.source,
        "kind": record.kind,
        "summary": record.summary,
        "reason": record.reason,
        "version": record.version,
        "instance_id": record.instance_id or None,
        "event_id": record.event_id or None,
        "send_id": record.send_id or None,
        "detail": struct_to_dict(record.detail),
    }


def run_why(args: argparse.Namespace) -> int:
    """`nudge why USER CAMPAIGN`: every decision for them, oldest first, and why."""
    client = Client.from_args(args, "rules")
    request = rules_pb2.ExplainDecisionsRequest(user_id=args.user, campaign_id=args.campaign)
    with client.channel() as channel:
        response = client.call(rules_pb2_grpc.RulesServiceStub(channel).ExplainDecisions, request)
    if args.json:
        data = [decision_data(record) for record in response.decisions]
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not response.decisions:
        print(f"no decisions for user {args.user!r} and campaign {args.campaign!r}")
        return EXIT_OK
    rows = [
        [
            _iso(record.decided_at, record.HasField("decided_at")),
            f"v{record.version}" if record.version else "",
            record.kind,
            record.event_id,
            record.summary,
        ]
        for record in response.decisions
    ]
    print(format_table(["time", "version", "decision", "event", "why"], rows))
    return EXIT_OK


def run_replay(args: argparse.Namespace) -> int:
    """`nudge replay`: rebuild the projection from the store and compare it with live."""
    client = Client.from_args(args, "rules")
    with client.channel() as channel:
        report = client.call(
            rules_pb2_grpc.RulesServiceStub(channel).VerifyProjection,
            rules_pb2.VerifyProjectionRequest(),
        )
    if args.json:
        data = {
            "match": report.match,
            "users": report.users,
            "events": report.events,
            "checkpoint": report.checkpoint,
            "mismatch_count": report.mismatch_count,
            "assignments": report.assignments,
            "mismatches": [
                {"user_id": m.user_id, "problem": m.problem, "fields": list(m.fields)}
                for m in report.mismatches
            ],
        }
        print(json.dumps(data, indent=2))
    elif report.match:
        print(
            f"match: {report.users} users rebuilt from {report.events} events "
            f"(up to checkpoint {report.checkpoint}) equal the live projection"
            + (
                f"; {report.assignments} experiment assignments recomputed equal"
                if report.assignments
                else ""
            )
        )
    else:
        print(
            f"MISMATCH: {report.mismatch_count} of {report.users} users differ "
            f"({report.events} events replayed up to checkpoint {report.checkpoint})"
        )
        for mismatch in report.mismatches:
            fields = f" ({', '.join(mismatch.fields)})" if mismatch.fields else ""
            print(f"  {mismatch.user_id}: {mismatch.problem}{fields}")
    return EXIT_OK if report.match else EXIT_FAILED


def _optional(message: Any, name: str) -> float | None:
    return float(getattr(message, name)) if message.HasField(name) else None


def _interval_data(message: Any, name: str) -> list[float] | None:
    if not message.HasField(name):
        return None
    interval = getattr(message, name)
    return [interval.low, interval.high]


def _comparison_data(comparison: rules_pb2.VariantComparison) -> dict[str, Any]:
    return {
        "baseline": comparison.baseline,
        "absolute_uplift": _optional(comparison, "absolute_uplift"),
        "relative_uplift": _optional(comparison, "relative_uplift"),
        "uplift_interval": _interval_data(comparison, "uplift_interval"),
        "test": comparison.test or None,
        "p_value": _optional(comparison, "p_value"),
        "adjusted_p_value": _optional(comparison, "adjusted_p_value"),
        "verdict": comparison.verdict,
        "verdict_text": comparison.verdict_text,
        "users_needed_per_arm": comparison.users_needed_per_arm or None,
        "target_difference": comparison.target_difference or None,
    }


def stats_data(response: rules_pb2.GetCampaignStatsResponse) -> dict[str, Any]:
    """A campaign stats report as plain JSON data (rates and uplifts as fractions)."""
    groups = []
    for group in response.groups:
        groups.append(
            {
                "group": group.group,
                "role": group.role,
                "entered": group.entered,
                "instances": group.instances,
                "pending": group.pending,
                "held_out": group.held_out,
                "cancelled": group.cancelled,
                "cancelled_by_exception": group.cancelled_by_exception,
                "suppressed": group.suppressed,
                "suppressed_reasons": dict(sorted(group.suppressed_reasons.items())),
                "sent": group.sent,
                "delivered": group.delivered,
                "failed": group.failed,
                "suppressed_downstream": group.suppressed_downstream,
                "suppressed_codes": dict(sorted(group.suppressed_codes.items())),
                "opened": group.opened,
                "clicked": group.clicked,
                "converted": group.converted,
                "converted_attributed": group.converted_attributed,
                "rate": _optional(group, "rate"),
                "rate_interval": _interval_data(group, "rate_interval"),
                "comparison": (
                    _comparison_data(group.comparison) if group.HasField("comparison") else None
                ),
            }
        )
    return {
        "campaign_id": response.campaign_id,
        "version": response.version,
        "salt": response.salt,
        "baseline": response.baseline or None,
        "conversion": (
            {"event": response.conversion_event, "within": response.conversion_within}
            if response.conversion_event
            else None
        ),
        "horizon": response.horizon or None,
        "groups": groups,
        "users_in_several_groups": response.users_in_several_groups,
    }


def _percent(value: float) -> str:
    return f"{value * 100:.1f}%"


def _signed_points(value: float) -> str:
    return f"{value * 100:+.1f}"


def _rate_cell(group: rules_pb2.CampaignGroupStats) -> str:
    if not group.HasField("rate"):
        return ""
    low, high = group.rate_interval.low, group.rate_interval.high
    return f"{_percent(group.rate)} [{low * 100:.1f}, {high * 100:.1f}]"


def _uplift_cell(group: rules_pb2.CampaignGroupStats) -> str:
    comparison = group.comparison
    if not group.HasField("comparison") or not comparison.HasField("absolute_uplift"):
        return ""
    interval = comparison.uplift_interval
    return (
        f"{_signed_points(comparison.absolute_uplift)} "
        f"[{_signed_points(interval.low)}, {_signed_points(interval.high)}]"
    )


def _p_cell(group: rules_pb2.CampaignGroupStats) -> str:
    if not group.HasField("comparison") or not group.comparison.HasField("adjusted_p_value"):
        return ""
    p = group.comparison.adjusted_p_value
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _breakdown(counts: Any, suffix: str = "") -> list[str]:
    return [f"{name} {count}{suffix}" for name, count in sorted(counts.items())]


def format_stats(response: rules_pb2.GetCampaignStatsResponse) -> str:
    """The stats table, its footnotes and the verdicts, for people."""
    salt = f"salt {response.salt!r}" if response.salt else "default salt"
    lines = [f"campaign {response.campaign_id} v{response.version} ({salt})"]
    if response.conversion_event:
        lines += [
            f"conversion: {response.conversion_event} within {response.conversion_within} of "
            "the send (`attributed`)",
            f"converted, rate, uplift and p: users who converted within {response.horizon} of "
            "entering (intention to treat)",
        ]
    else:
        lines.append("no conversion goal: add a `conversion:` block to the campaign for rates")
    headers = [
        "group",
        "entered",
        "cancelled",
        "held out",
        "sent",
        "suppressed",
        "opened",
        "clicked",
        "converted",
        "attributed",
        "rate [95% CI]",
        "uplift pts [95% CI]",
        "p (Holm)",
    ]
    rows = []
    notes = []
    for group in response.groups:
        name = group.group + (" (baseline)" if group.role == "baseline" else "")
        if group.role == "other":
            name += " (not in the experiment)"
        rows.append(
            [
                name,
                str(group.entered),
                str(group.cancelled),
                str(group.held_out),
                str(group.sent),
                str(group.suppressed + group.suppressed_downstream),
                str(group.opened),
                str(group.clicked),
                str(group.converted) if response.conversion_event else "",
                str(group.converted_attributed) if response.conversion_event else "",
                _rate_cell(group),
                _uplift_cell(group),
                _p_cell(group),
            ]
        )
        other_cancels = group.cancelled - group.cancelled_by_exception
        if other_cancels:
            notes.append(
                f"  {group.group} cancelled: {group.cancelled_by_exception} by an exception, "
                f"{other_cancels} otherwise (a new campaign version)"
            )
        suppressed = _breakdown(group.suppressed_reasons) + _breakdown(
            group.suppressed_codes, " (dispatch)"
        )
        if suppressed:
            notes.append(f"  {group.group} suppressed: {', '.join(suppressed)}")
        if group.failed:
            notes.append(f"  {group.group} failed: {group.failed}")
    lines += ["", format_table(headers, rows)]
    if notes:
        lines += ["", *notes]
    if response.users_in_several_groups:
        lines += [
            "",
            f"warning: {response.users_in_several_groups} users are in more than one group "
            "(the allocation changed without a new salt?); each counts in every group",
        ]
    verdicts = [
        text if text.startswith(f"{group.group} ") else f"{group.group}: {text}"
        for group in response.groups
        if group.HasField("comparison") and (text := group.comparison.verdict_text)
    ]
    if verdicts:
        lines += ["", *verdicts]
    return "\n".join(lines)


def run_stats(args: argparse.Namespace) -> int:
    """`nudge stats CAMPAIGN`: the experiment's groups, rates, uplift and verdicts."""
    client = Client.from_args(args, "rules")
    request = rules_pb2.GetCampaignStatsRequest(campaign_id=args.campaign)
    with client.channel() as channel:
        response = client.call(rules_pb2_grpc.RulesServiceStub(channel).GetCampaignStats, request)
    if args.json:
        print(json.dumps(stats_data(response), indent=2, ensure_ascii=False))
    else:
        print(format_stats(response))
    return EXIT_OK


BACKTEST_TIMEOUT_S = 600.0


def _exact_iso(message: Any, name: str) -> str | None:
    """The time field `name` of `message` to the microsecond with a ``+00:00`` offset (the
    backtest report's format, unlike `_iso`), or None when unset."""
    if not message.HasField(name):
        return None
    value: datetime = getattr(message, name).ToDatetime(tzinfo=UTC)
    return value.isoformat()


def backtest_data(response: rules_pb2.BacktestResponse) -> dict[str, Any]:
    """A backtest report as plain JSON data (stable key and list order)."""
    return {
        "campaign_id": response.campaign_id,
        "users": response.users,
        "events": response.events,
        "entered": {
            group.group: {"count": group.users_count, "users": list(group.users)}
            for group in response.groups
        },
        "entries": response.entries,
        "cancelled_by_exception": response.cancelled_by_exception,
        "pending_at_end": response.pending_at_end,
        "quiet_hours_holds": response.quiet_hours_holds,
        "decision_counts": dict(sorted(response.decision_counts.items())),
        "outcomes": dict(sorted(response.outcomes.items())),
        "suppressed": dict(sorted(response.suppressed.items())),
        "frequency_caps": dict(sorted(response.frequency_caps.items())),
        "sends_count": response.sends_count,
        "sends": [
            {
                "user_id": send.user_id,
                "trigger_event_id": send.trigger_event_id,
                "group": send.group,
                "branch": send.branch,
                "channel": send.channel,
                "due_at": _exact_iso(send, "due_at"),
                "claimed_at": _exact_iso(send, "claimed_at"),
                "held_until": _exact_iso(send, "held_until"),
                "outcome": send.outcome,
                "code": send.code,
                "reason": send.reason,
            }
            for send in response.sends
        ],
    }


def format_backtest(response: rules_pb2.BacktestResponse, start: datetime, end: datetime) -> str:
    """The report for people: totals, groups, what policy did, then the sends."""
    lines = [
        f"backtest of {response.campaign_id} from {start.isoformat()} to {end.isoformat()}: "
        f"{response.users} users, {response.events} events, {response.entries} entries, "
        f"{response.sends_count} would-be sends",
    ]
    if response.groups:
        lines += [
            "",
            format_table(
                ["group", "users"], [[g.group, str(g.users_count)] for g in response.groups]
            ),
        ]
    lines += [
        "",
        f"cancelled by an exception: {response.cancelled_by_exception}",
        f"still pending at the end: {response.pending_at_end}",
        f"held for quiet hours: {response.quiet_hours_holds}",
    ]
    for title, counts in (
        ("outcomes", response.outcomes),
        ("suppressed", response.suppressed),
        ("frequency caps", response.frequency_caps),
        ("decisions", response.decision_counts),
    ):
        if counts:
            items = ", ".join(f"{key} {value}" for key, value in sorted(counts.items()))
            lines.append(f"{title}: {items}")
    if response.sends:
        rows = [
            [
                _exact_iso(send, "due_at") or "",
                _exact_iso(send, "claimed_at") or "",
                send.user_id,
                send.group,
                f"{send.branch} ({send.channel})",
                send.outcome + (f": {send.code}" if send.code else ""),
            ]
            for send in response.sends
        ]
        lines += [
            "",
            format_table(["due", "claimed", "user", "group", "message", "outcome"], rows),
        ]
        if response.sends_count > len(response.sends):
            lines.append(f"(first {len(response.sends)} of {response.sends_count} sends)")
    return "\n".join(lines)


def run_backtest(args: argparse.Namespace) -> int:
    """`nudge backtest FILE.yaml --from DATE --to DATE`: what the definition would have done."""
    start = parse_time(args.start, "--from")
    end = parse_time(args.end, "--to")
    if start >= end:
        raise CliError("--to: must be after --from", EXIT_USAGE)
    [definition, *more] = load_campaign_documents(Path(args.file))
    if more:
        raise CliError(f"{args.file}: backtest takes one campaign definition", EXIT_USAGE)
    request = rules_pb2.BacktestRequest(
        definition=dict_to_struct(definition),
        from_time=to_timestamp(start),
        to_time=to_timestamp(end),
    )
    client = Client.from_args(args, "rules")
    with client.channel() as channel:
        response = client.call(rules_pb2_grpc.RulesServiceStub(channel).Backtest, request)
    if args.json:
        print(json.dumps(backtest_data(response), indent=2, ensure_ascii=False))
    else:
        print(format_backtest(response, start, end))
    return EXIT_OK


def _run_set_status(args: argparse.Namespace, pause: bool) -> int:
    client = Client.from_args(args, "rules")
    with client.channel() as channel:
        stub = rules_pb2_grpc.RulesServiceStub(channel)
        if pause:
            campaign = client.call(
                stub.PauseCampaign, rules_pb2.PauseCampaignRequest(campaign_id=args.campaign)
            ).campaign
        else:
            campaign = client.call(
                stub.ResumeCampaign, rules_pb2.ResumeCampaignRequest(campaign_id=args.campaign)
            ).campaign
    print(f"{campaign.campaign_id} version {campaign.version} {campaign.status}")
    return EXIT_OK


def run_pause(args: argparse.Namespace) -> int:
    """`nudge campaigns pause CAMPAIGN`."""
    return _run_set_status(args, pause=True)


def run_resume(args: argparse.Namespace) -> int:
    """`nudge campaigns resume CAMPAIGN`."""
    return _run_set_status(args, pause=False)


def _campaign_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    """The sub-commands of the existing `nudge campaigns` (registered by `api`)."""
    campaigns = commands.choices.get("campaigns")
    if campaigns is None:
        return None
    for action in campaigns._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add why, replay, stats and backtest, and pause/resume under `campaigns` (call after
    `api.register`)."""
    why = commands.add_parser(
        "why",
        help="explain every decision for a user and campaign (RulesService.ExplainDecisions)",
        description="List every decision the rules engine recorded for USER and CAMPAIGN, "
        "oldest first — triggered, delayed until, filtered out, not re-eligible, re-armed, "
        "cancelled by an event, re-checked and sent — and what dispatch reported for each "
        "send (delivered, failed, suppressed downstream).",
    )
    why.add_argument("user", metavar="USER", help="user id")
    why.add_argument("campaign", metavar="CAMPAIGN", help="campaign id")
    why.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_client_options(why, "rules")
    why.set_defaults(func=run_why)

    replay = commands.add_parser(
        "replay",
        help="rebuild the projection from the event store and compare it with live",
        description="Rebuild every user state of the workspace from the beginning of the "
        "event store (in memory, with the projection's own code, up to the live checkpoint) "
        "and compare it with the live projection (RulesService.VerifyProjection). Prints "
        "`match: ...` and exits 0, or lists the users that differ and exits 1.",
    )
    replay.add_argument("--json", action="store_true", help="print JSON")
    _add_client_options(replay, "rules")
    replay.set_defaults(func=run_replay)

    stats = commands.add_parser(
        "stats",
        help="a campaign's experiment: groups, conversion rates, uplift, verdicts",
        description="Report CAMPAIGN since its current experiment salt "
        "(RulesService.GetCampaignStats): per group the users who entered, cancelled, held "
        "out, sent, suppressed, opened, clicked and converted instances and sends; the "
        "conversion rate with a Wilson 95%% interval; each variant's uplift over the baseline "
        "(control, else the first variant) with Newcombe's interval and a Holm-adjusted "
        "p-value; and a verdict per variant in plain language. Rates use intention to treat "
        "(a conversion within the analysis horizon from entry, the same for every group).",
    )
    stats.add_argument("campaign", metavar="CAMPAIGN", help="campaign id")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_client_options(stats, "rules")
    stats.set_defaults(func=run_stats)

    backtest = commands.add_parser(
        "backtest",
        help="replay a period's events through a campaign definition, sending nothing",
        description="Replay the events received from --from (inclusive) to --to (exclusive) "
        "through the campaign in FILE (new or changed; it is not applied) as if it had been "
        "created at --from (RulesService.Backtest), and report who would have entered per "
        "experiment group, when each message would have been sent and claimed (after quiet "
        "hours), how many instances exception events would have cancelled, and what consent "
        "and frequency caps would have suppressed. Read-only and deterministic. DATE is "
        "YYYY-MM-DD (midnight UTC) or an ISO 8601 date-time; at most 366 days.",
    )
    backtest.add_argument("file", metavar="FILE.yaml", help="one campaign definition")
    backtest.add_argument("--from", dest="start", required=True, metavar="DATE")
    backtest.add_argument("--to", dest="end", required=True, metavar="DATE")
    backtest.add_argument("--json", action="store_true", help="print JSON")
    _add_client_options(backtest, "rules")
    backtest.set_defaults(func=run_backtest, timeout=BACKTEST_TIMEOUT_S)

    campaign_commands = _campaign_commands(commands)
    if campaign_commands is None:
        return
    for name, run, text in (
        ("pause", run_pause, "pause a campaign: nothing new starts or is sent"),
        ("resume", run_resume, "resume a campaign: what came due meanwhile is sent now"),
    ):
        parser = campaign_commands.add_parser(name, help=text, description=text + ".")
        parser.add_argument("campaign", metavar="CAMPAIGN", help="campaign id")
        _add_client_options(parser, "rules")
        parser.set_defaults(func=run)
