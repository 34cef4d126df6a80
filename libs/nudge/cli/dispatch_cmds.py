"""Delivery commands (DispatchService, with RulesService for previews).

`nudge workspace apply FILE.yaml | show`, `nudge dead-letters list | replay ID` and
`nudge preview CAMPAIGN --user USER`. Same conventions as the other API commands: the key comes
from ``--api-key`` or ``NUDGE_API_KEY``; a failed call prints ``error: <CODE>: <details>`` and
exits 2; an invalid policy file or a message that does not render exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf.json_format import MessageToDict

from nudge.cli.api import Client, _add_client_options, _iso, _status_code, yaml_to_json
from nudge.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    cli_env,
    format_table,
    parse_json_object,
    service_address,
    state_dir,
)
from nudge.cli.health import describe_rpc_error
from nudge.dispatch.v1 import dispatch_pb2, dispatch_pb2_grpc
from nudge.protoconv import dict_to_struct, struct_to_dict
from nudge.rules.v1 import rules_pb2, rules_pb2_grpc

# --------------------------------------------------------------------------------------------
# workspace policy


def load_policy_document(path: Path) -> dict[str, Any]:
    """The policy mapping in a YAML file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CliError(f"{path}: cannot read: {error.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise CliError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(document, dict):
        raise CliError(f"{path}: a workspace policy must be a mapping")
    try:
        converted: dict[str, Any] = yaml_to_json(document)
    except ValueError as error:
        raise CliError(f"{path}: {error}") from None
    return converted


def _policy_data(policy: dispatch_pb2.WorkspacePolicy) -> dict[str, Any]:
    data: dict[str, Any] = {
        "default_timezone": policy.default_timezone,
        "frequency_caps": [
            {"channel": cap.channel, "max": cap.max, "per": cap.per}
            for cap in policy.frequency_caps
        ],
    }
    if policy.HasField("quiet_hours"):
        data["quiet_hours"] = {
            "start": policy.quiet_hours.start,
            "end": policy.quiet_hours.end,
            "channels": list(policy.quiet_hours.channels),
        }
    data["require_opt_in"] = list(policy.require_opt_in)
    if policy.HasField("global_control"):
        control = policy.global_control
        data["global_control"] = {"percent": control.percent, "salt": control.salt}
    return data


def run_workspace_apply(args: argparse.Namespace) -> int:
    """`nudge workspace apply FILE`: store the policy; print its version and whether it changed.

    An invalid policy (INVALID_ARGUMENT) prints the server's message naming the field, exit 1."""
    path = Path(args.file)
    document = load_policy_document(path)
    client = Client.from_args(args, "dispatch")
    request = dispatch_pb2.ApplyWorkspacePolicyRequest(policy=dict_to_struct(document))
    with client.channel() as channel:
        stub = dispatch_pb2_grpc.DispatchServiceStub(channel)
        try:
            response = stub.ApplyWorkspacePolicy(
                request, metadata=client.metadata, timeout=client.timeout
            )
        except grpc.RpcError as error:
            if _status_code(error) != grpc.StatusCode.INVALID_ARGUMENT:
                raise CliError(describe_rpc_error(error), EXIT_USAGE) from None
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            print(f"error: {path}: {details}", file=sys.stderr)
            return EXIT_FAILED
    outcome = "changed" if response.changed else "unchanged"
    print(f"workspace policy version {response.policy.version} ({outcome})")
    return EXIT_OK


def run_workspace_show(args: argparse.Namespace) -> int:
    """`nudge workspace show`: the policy in force, as YAML (JSON with --json)."""
    client = Client.from_args(args, "dispatch")
    with client.channel() as channel:
        stub = dispatch_pb2_grpc.DispatchServiceStub(channel)
        response = client.call(stub.GetWorkspacePolicy, dispatch_pb2.GetWorkspacePolicyRequest())
    data = _policy_data(response.policy)
    if args.json:
        print(json.dumps({**data, "version": response.policy.version}, indent=2))
    else:
        print(f"# version {response.policy.version}")
        print(yaml.safe_dump(data, sort_keys=False).rstrip())
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# dead letters


def run_dead_letters_list(args: argparse.Namespace) -> int:
    """`nudge dead-letters list`: newest first, as a table or JSON."""
    client = Client.from_args(args, "dispatch")
    request = dispatch_pb2.ListDeadLettersRequest(limit=args.limit, include_replayed=args.all)
    with client.channel() as channel:
        stub = dispatch_pb2_grpc.DispatchServiceStub(channel)
        response = client.call(stub.ListDeadLetters, request)
    letters = response.dead_letters
    if args.json:
        data = [
            {
                "dead_letter_id": d.dead_letter_id,
                "send_id": d.send_id,
                "user_id": d.user_id,
                "campaign_id": d.campaign_id,
                "channel": d.channel,
                "reason": d.reason,
                "attempts": d.attempts,
                "state": d.state,
                "created_at": _iso(d.created_at, d.HasField("created_at")),
                "replayed_at": _iso(d.replayed_at, d.HasField("replayed_at")) or None,
            }
            for d in letters
        ]
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return EXIT_OK
    rows = [
        [
            str(d.dead_letter_id),
            d.send_id,
            d.user_id,
            d.campaign_id,
            d.channel,
            str(d.attempts),
            d.reason,
            _iso(d.created_at, d.HasField("created_at")),
            _iso(d.replayed_at, d.HasField("replayed_at")),
        ]
        for d in letters
    ]
    headers = ["id", "send_id", "user", "campaign", "channel", "attempts", "reason", "dead"]
    print(format_table([*headers, "replayed"], rows))
    return EXIT_OK


def run_dead_letters_replay(args: argparse.Namespace) -> int:
    """`nudge dead-letters replay ID`: send it again under the same send id (idempotent)."""
    client = Client.from_args(args, "dispatch")
    request = dispatch_pb2.ReplayDeadLetterRequest(dead_letter_id=args.id)
    with client.channel() as channel:
        stub = dispatch_pb2_grpc.DispatchServiceStub(channel)
        response = client.call(stub.ReplayDeadLetter, request)
    if response.replayed:
        print(f"replayed {args.id}: send {response.send_id} is {response.state} again")
    else:
        print(
            f"dead letter {args.id} was already replayed: send {response.send_id} is "
            f"{response.state}"
        )
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# preview


def message_template(message: dict[str, Any]) -> dict[str, str]:
    """A campaign message as SendRequest.template, as the rules planner builds it."""
    return {
        key: json.dumps(value) if key == "payload" else str(value)
        for key, value in message.items()
        if key != "channel" and value is not None
    }


def preview_context(
    definition: dict[str, Any],
    version: int,
    user: dict[str, Any],
    user_id: str,
    event_name: str | None,
    properties: dict[str, Any],
    variant: str | None = None,
) -> dict[str, Any]:
    """The render context of a send of `definition` to `user` triggered by a sample event."""
    now = datetime.now(UTC).isoformat()
    trigger = definition.get("trigger") or {}
    name = event_name or (trigger.get("event") if isinstance(trigger, dict) else None) or ""
    event = {
        "id": "preview",
        "name": name,
        "user_id": user_id,
        "occurred_at": now,
        "received_at": now,
        "properties": properties,
    }
    campaign = {
        "id": definition.get("id", ""),
        "name": definition.get("name", ""),
        "version": version,
        "variant": variant or "",
    }
    return {"user": user, "event": event, "trigger": event, "campaign": campaign}


def variant_messages(definition: dict[str, Any], variant: str | None) -> list[dict[str, Any]]:
    """The message of each branch, with `variant`'s overrides (the campaign's own without)."""
    from services.rules.cel import compile_campaign
    from services.rules.domain import CampaignError, parse_campaign

    try:
        compiled = compile_campaign(parse_campaign(definition))
    except CampaignError as error:
        raise CliError(f"the stored campaign does not parse: {error}") from None
    experiment = compiled.definition.experiment
    if variant is not None and (experiment is None or experiment.variant(variant) is None):
        names = [] if experiment is None else [v.name for v in experiment.variants]
        raise CliError(f"--variant: the campaign's variants are {names}", EXIT_USAGE)
    return [branch.message.to_dict() for branch in compiled.messages_for(variant)]


def choose_branch(definition: dict[str, Any], context: dict[str, Any]) -> int | None:
    """The branch a send would use: the first whose `when` holds for the user and the sample
    event (rules evaluates the same conditions when the send is due); None when none does."""
    from services.rules.cel import (
        CelEvaluationError,
        activation,
        compile_campaign,
        json_numbers_as_double,
    )
    from services.rules.domain import parse_campaign, zero_event_view

    compiled = compile_campaign(parse_campaign(definition))
    event = {
        **context["event"],
        "properties": json_numbers_as_double(context["event"]["properties"]),
    }
    events = dict(context["user"].get("events") or {})
    for name in compiled.referenced_event_names or ():
        events.setdefault(name, zero_event_view(compiled.sum_properties))
    user = {
        **context["user"],
        "traits": json_numbers_as_double(context["user"].get("traits") or {}),
        "events": events,
    }
    variables = activation({"user": user, "event": event, "trigger": event})
    for index, condition in enumerate(compiled.branch_conditions):
        if condition is None:
            return index
        try:
            if condition.evaluate_bool(variables):
                return index
        except CelEvaluationError as error:
            raise CliError(f"messages[{index}].when failed: {error.message}") from None
    return None


def run_preview(args: argparse.Namespace) -> int:
    """`nudge preview CAMPAIGN --user USER`: render the campaign's message for the user (with a
    sample trigger event) without sending; say what the delivery policy would do now."""
    properties = parse_json_object(args.props, "--props") if args.props else {}
    rules = Client.from_args(args, "rules")
    with rules.channel() as channel:
        stub = rules_pb2_grpc.RulesServiceStub(channel)
        campaign = rules.call(
            stub.GetCampaign, rules_pb2.GetCampaignRequest(campaign_id=args.campaign)
        ).campaign
        user = struct_to_dict(
            rules.call(stub.GetUser, rules_pb2.GetUserRequest(user_id=args.user)).state
        )
    definition = struct_to_dict(campaign.definition)
    context = preview_context(
        definition, campaign.version, user, args.user, args.event, properties, args.variant
    )
    branches = variant_messages(definition, args.variant)
    if args.branch is None:
        branch, how = choose_branch(definition, context), "chosen by the `when` conditions"
        if branch is None:
            print("no message branch's `when` holds for this user and event: nothing is sent")
            return EXIT_FAILED
    else:
        branch, how = args.branch, "chosen with --branch"
        if not 0 <= branch < len(branches):
            raise CliError(f"--branch: campaign {args.campaign} has {len(branches)} branches")
    message = branches[branch]
    request = dispatch_pb2.PreviewMessageRequest(
        user_id=args.user,
        channel=message["channel"],
        kind=str(definition.get("kind", "marketing")),
        template=message_template(message),
        context=dict_to_struct(context),
    )
    # --addr names the rules service; dispatch comes from the environment.
    dispatch = Client(service_address(cli_env(), "dispatch", None), rules.api_key, rules.timeout)
    with dispatch.channel() as channel:
        stub_d = dispatch_pb2_grpc.DispatchServiceStub(channel)
        response = dispatch.call(stub_d.PreviewMessage, request)
    if args.json:
        print(json.dumps(MessageToDict(response), indent=2, ensure_ascii=False))
        return EXIT_FAILED if response.error else EXIT_OK
    if len(branches) > 1:
        print(f"# branch {branch} of {len(branches)} ({how})")
    if args.variant:
        print(f"# variant {args.variant}")
    print(f"channel: {message['channel']}")
    for key in sorted(response.fields):
        print(f"{key}: {response.fields[key]}")
    if response.error:
        print(f"render error in {response.error_field}: {response.error}", file=sys.stderr)
    verdict = response.verdict
    if verdict == "hold":
        verdict += " until " + _iso(response.hold_until, response.HasField("hold_until"))
    print(f"policy now: {verdict}" + (f" ({response.reason})" if response.reason else ""))
    return EXIT_FAILED if response.error else EXIT_OK


# --------------------------------------------------------------------------------------------
# argument parsers


def run_webhook_secret(args: argparse.Namespace) -> int:
    """`nudge webhooks secret --workspace W`: the secret W's webhook receivers verify with."""
    from services.dispatch.channels.webhook import workspace_secret

    env = cli_env()
    master = env.get("NUDGE_WEBHOOK_SECRET")
    if not master:
        path = state_dir() / "webhook-secret"
        try:
            master = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise CliError(
                "NUDGE_WEBHOOK_SECRET is not set and no webhook-secret in the state directory"
            ) from None
    try:
        print(workspace_secret(master, args.workspace))
    except ValueError as error:
        raise CliError(f"NUDGE_WEBHOOK_SECRET: {error}") from None
    return EXIT_OK


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add workspace, webhooks, dead-letters and preview."""
    workspace = commands.add_parser(
        "workspace", help="apply or show the workspace delivery policy (DispatchService)"
    )
    workspace_commands = workspace.add_subparsers(dest="workspace_command", metavar="COMMAND")
    workspace_commands.required = True
    apply = workspace_commands.add_parser(
        "apply",
        help="apply a workspace policy YAML file",
        description="Apply the delivery policy (default_timezone, frequency_caps, quiet_hours, "
        "require_opt_in, global_control) through DispatchService.ApplyWorkspacePolicy. "
        "Prints the version and "
        "whether it changed; exits 1 if the policy is invalid (the message names the field).",
    )
    apply.add_argument("file", metavar="FILE", help="policy YAML file")
    _add_client_options(apply, "dispatch")
    apply.set_defaults(func=run_workspace_apply)
    show = workspace_commands.add_parser("show", help="print the policy in force")
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    _add_client_options(show, "dispatch")
    show.set_defaults(func=run_workspace_show)

    webhooks = commands.add_parser("webhooks", help="webhook signing")
    webhook_commands = webhooks.add_subparsers(dest="webhooks_command", metavar="COMMAND")
    webhook_commands.required = True
    secret = webhook_commands.add_parser(
        "secret",
        help="print a workspace's webhook signing secret",
        description="Print the Standard Webhooks secret (whsec_...) that the workspace's "
        "receivers verify `webhook-signature` with. It is derived from NUDGE_WEBHOOK_SECRET "
        "(or the webhook-secret file `nudge up` keeps in its state directory).",
    )
    secret.add_argument("--workspace", required=True, help="workspace id")
    secret.set_defaults(func=run_webhook_secret)

    dead = commands.add_parser("dead-letters", help="list and replay dead letters")
    dead_commands = dead.add_subparsers(dest="dead_letters_command", metavar="COMMAND")
    dead_commands.required = True
    listing = dead_commands.add_parser("list", help="list dead letters, newest first")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default: 50)")
    listing.add_argument("--all", action="store_true", help="include replayed dead letters")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_client_options(listing, "dispatch")
    listing.set_defaults(func=run_dead_letters_list)
    replay = dead_commands.add_parser(
        "replay",
        help="send a dead letter again (same send id)",
        description="Put the dead send back to planned under the same send id: it is claimed "
        "again (consent, quiet hours, caps) and attempted with a fresh retry window. Replaying "
        "the same dead letter twice does nothing the second time.",
    )
    replay.add_argument("id", metavar="ID", type=int, help="dead letter id (from list)")
    _add_client_options(replay, "dispatch")
    replay.set_defaults(func=run_dead_letters_replay)

    preview = commands.add_parser(
        "preview",
        help="render a campaign's message for a user without sending it",
        description="Fetch the campaign (RulesService.GetCampaign) and the user's state "
        "(RulesService.GetUser), pick the message branch whose `when` holds (as at send "
        "time; --branch overrides), apply an experiment --variant's overrides, render the "
        "message like a send would (DispatchService.PreviewMessage) with a sample trigger "
        "event, and print the fields and what the delivery policy would do now. Exits 1 if "
        "the message does not render or no branch matches. Uses "
        "NUDGE_RULES_ADDR and NUDGE_DISPATCH_ADDR; --addr is the rules address.",
    )
    preview.add_argument("campaign", metavar="CAMPAIGN", help="campaign id")
    preview.add_argument("--user", required=True, help="user id")
    preview.add_argument("--event", help="trigger event name (default: the campaign's trigger)")
    preview.add_argument("--props", help="trigger event properties as a JSON object")
    preview.add_argument(
        "--branch",
        type=int,
        help="message branch index (default: the first whose `when` holds, as at send time)",
    )
    preview.add_argument(
        "--variant", help="an experiment variant: its message overrides (default: none)"
    )
    preview.add_argument("--json", action="store_true", help="print the response as JSON")
    _add_client_options(preview, "rules")
    preview.set_defaults(func=run_preview)
