"""Rules commands: `nudge why`, `nudge replay`, `nudge campaigns pause|resume` (RulesService).

`nudge why USER CAMPAIGN` lists every decision the rules engine recorded for the user and
campaign, with the outcome dispatch reported for each send; `nudge replay` rebuilds the
workspace's user states from the event store and reports whether they equal the live
projection (exit 1 when they do not).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from nudge.cli.api import Client, _add_client_options
from nudge.cli.common import EXIT_FAILED, EXIT_OK, format_table
from nudge.protoconv import struct_to_dict
from nudge.rules.v1 import rules_pb2, rules_pb2_grpc


def _time(record: rules_pb2.DecisionRecord) -> str:
    if not record.HasField("decided_at"):
        return ""
    return record.decided_at.ToDatetime().isoformat(timespec="seconds") + "Z"


def decision_data(record: rules_pb2.DecisionRecord) -> dict[str, Any]:
    """A decision record as plain JSON data."""
    return {
        "decided_at": _time(record),
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
            _time(record),
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
    """Add why and replay, and pause/resume under `campaigns` (call after `api.register`)."""
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
