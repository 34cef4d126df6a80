"""Commands that call the services' public gRPC APIs with an API key.

`nudge track`, `nudge identify` (IngestService), `nudge campaigns apply|list`, `nudge user`
(RulesService) and `nudge messages` (DispatchService). The key comes from ``--api-key`` or
``NUDGE_API_KEY``; addresses from ``--addr`` or ``NUDGE_<SERVICE>_ADDR`` (see `common.cli_env`).
A failed call prints ``error: <CODE>: <details>`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from nudge.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    cli_env,
    format_table,
    parse_json_object,
    parse_time,
    service_address,
)
from nudge.cli.health import describe_rpc_error
from nudge.dispatch.v1 import dispatch_pb2, dispatch_pb2_grpc
from nudge.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from nudge.protoconv import dict_to_struct, struct_to_dict, to_timestamp
from nudge.rules.v1 import rules_pb2, rules_pb2_grpc

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

DEFAULT_TIMEOUT_S = 10.0


class Client:
    """Connection settings of one command: the service address, the API key, the deadline."""

    def __init__(self, address: str, api_key: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.address = address
        self.api_key = api_key
        self.timeout = timeout

    @classmethod
    def from_args(cls, args: argparse.Namespace, service: str) -> Client:
        """Resolve `--addr`/`--api-key`/`--timeout` against the environment and env file."""
        env = cli_env()
        address = service_address(env, service, args.addr)
        api_key = args.api_key or env.get("NUDGE_API_KEY")
        if not api_key:
            raise CliError(
                "no API key: pass --api-key or set NUDGE_API_KEY "
                "(`nudge up` writes one to .nudge/env)",
                EXIT_USAGE,
            )
        return cls(address, api_key, args.timeout)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata: ``authorization: Bearer <key>``."""
        return (("authorization", f"Bearer {self.api_key}"),)

    @contextmanager
    def channel(self) -> Iterator[grpc.Channel]:
        """An insecure channel to the address, closed afterwards."""
        with grpc.insecure_channel(self.address) as channel:
            yield channel

    def call(self, method: Callable[..., Resp], request: Req) -> Resp:
        """Call a unary method with the bearer key; a gRPC error becomes CliError (exit 2)."""
        try:
            return method(
                request,
                metadata=self.metadata,
                timeout=self.timeout,
            )
        except grpc.RpcError as error:
            raise CliError(describe_rpc_error(error), EXIT_USAGE) from None


def _status_code(error: grpc.RpcError) -> grpc.StatusCode | None:
    return error.code() if isinstance(error, grpc.Call) else None


def _add_client_options(parser: argparse.ArgumentParser, service: str) -> None:
    env_name = f"NUDGE_{service.upper()}_ADDR"
    parser.add_argument(
        "--addr", help=f"{service} gRPC address (default: ${env_name} or the `nudge up` default)"
    )
    parser.add_argument("--api-key", help="API key (default: $NUDGE_API_KEY)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="deadline in seconds (default: %(default)s)",
    )


# --------------------------------------------------------------------------------------------
# ingest


def _event_result_line(result: ingest_pb2.EventResult) -> tuple[str, bool]:
    """A printable line for one result, and whether it was rejected."""
    status = ingest_pb2.EventStatus.Name(result.status).removeprefix("EVENT_STATUS_").lower()
    line = f"{status} {result.event_id}"
    rejected = result.status not in (
        ingest_pb2.EVENT_STATUS_ACCEPTED,
        ingest_pb2.EVENT_STATUS_DUPLICATE,
    )
    if result.reason:
        line += f": {result.reason}"
    if result.field:
        line += f" (field {result.field})"
    return line, rejected


def _timestamp(text: str | None, option: str) -> Timestamp | None:
    return to_timestamp(parse_time(text, option)) if text else None


def run_track(args: argparse.Namespace) -> int:
    """`nudge track`: append one event; print accepted/duplicate/rejected; exit 1 if rejected."""
    properties = parse_json_object(args.props, "--props") if args.props else {}
    context = parse_json_object(args.context, "--context") if args.context else None
    event = ingest_pb2.Event(
        event_id=args.event_id or str(uuid.uuid4()),
        user_id=args.user,
        name=args.event,
        properties=dict_to_struct(properties),
        occurred_at=_timestamp(args.occurred_at, "--occurred-at"),
    )
    if context is not None:
        event.context.CopyFrom(dict_to_struct(context))
    client = Client.from_args(args, "ingest")
    with client.channel() as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        response = client.call(stub.Track, ingest_pb2.TrackRequest(events=[event]))
    failed = False
    for result in response.results:
        line, rejected = _event_result_line(result)
        print(line)
        failed = failed or rejected
    return EXIT_FAILED if failed else EXIT_OK


def run_identify(args: argparse.Namespace) -> int:
    """`nudge identify`: set user traits; print the outcome; exit 1 if rejected."""
    traits = parse_json_object(args.traits, "--traits")
    request = ingest_pb2.IdentifyRequest(
        user_id=args.user,
        traits=dict_to_struct(traits),
        event_id=args.event_id or "",
        occurred_at=_timestamp(args.occurred_at, "--occurred-at"),
    )
    client = Client.from_args(args, "ingest")
    with client.channel() as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        response = client.call(stub.Identify, request)
    line, rejected = _event_result_line(response.result)
    print(line)
    return EXIT_FAILED if rejected else EXIT_OK


# --------------------------------------------------------------------------------------------
# rules


def yaml_to_json(value: Any) -> Any:
    """YAML data as JSON-like data: dates and times become ISO strings, keys strings."""
    if isinstance(value, Mapping):
        return {str(k): yaml_to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [yaml_to_json(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        raise ValueError("binary values (!!binary) are not supported")
    return value


def load_campaign_documents(path: Path) -> list[dict[str, Any]]:
    """The campaign definitions in a YAML file (one, or several separated by ``---``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CliError(f"{path}: cannot read: {error.strerror}") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        raise CliError(f"{path}: invalid YAML: {error}") from None
    if not documents:
        raise CliError(f"{path}: no campaign definition in the file")
    result: list[dict[str, Any]] = []
    for document in documents:
        if not isinstance(document, dict):
            raise CliError(f"{path}: a campaign must be a mapping, got {type(document).__name__}")
        try:
            result.append(yaml_to_json(document))
        except ValueError as error:
            raise CliError(f"{path}: {error}") from None
    return result


def run_campaigns_apply(args: argparse.Namespace) -> int:
    """`nudge campaigns apply`: apply each file; print ``<id> version N (created|unchanged)``.

    An invalid definition (INVALID_ARGUMENT) prints the server's message, which names the
    field, and makes the command exit 1 after trying the remaining files.
    """
    client = Client.from_args(args, "rules")
    failed = False
    with client.channel() as channel:
        stub = rules_pb2_grpc.RulesServiceStub(channel)
        for name in args.files:
            path = Path(name)
            try:
                definitions = load_campaign_documents(path)
            except CliError as error:
                print(f"error: {error.message}", file=sys.stderr)
                failed = True
                continue
            for definition in definitions:
                request = rules_pb2.ApplyCampaignRequest(definition=dict_to_struct(definition))
                try:
                    response = stub.ApplyCampaign(
                        request,
                        metadata=client.metadata,
                        timeout=client.timeout,
                    )
                except grpc.RpcError as error:
                    if _status_code(error) != grpc.StatusCode.INVALID_ARGUMENT:
                        raise CliError(describe_rpc_error(error), EXIT_USAGE) from None
                    details = error.details() if isinstance(error, grpc.Call) else str(error)
                    print(f"error: {path}: {details}", file=sys.stderr)
                    failed = True
                    continue
                campaign = response.campaign
                outcome = "created" if response.created else "unchanged"
                print(f"{campaign.campaign_id} version {campaign.version} ({outcome})")
    return EXIT_FAILED if failed else EXIT_OK


def _iso(ts: Timestamp, present: bool = True) -> str:
    if not present:
        return ""
    return ts.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def run_campaigns_list(args: argparse.Namespace) -> int:
    """`nudge campaigns list`: the current version of every campaign, as a table or JSON."""
    client = Client.from_args(args, "rules")
    with client.channel() as channel:
        stub = rules_pb2_grpc.RulesServiceStub(channel)
        response = client.call(stub.ListCampaigns, rules_pb2.ListCampaignsRequest())
    if args.json:
        data = [
            {
                "campaign_id": c.campaign_id,
                "version": c.version,
                "status": c.status,
                "created_at": _iso(c.created_at, c.HasField("created_at")),
                "definition": struct_to_dict(c.definition),
            }
            for c in response.campaigns
        ]
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return EXIT_OK
    rows = [
        [
            c.campaign_id,
            str(c.version),
            c.status,
            _iso(c.created_at, c.HasField("created_at")),
            str(struct_to_dict(c.definition).get("name", "")),
        ]
        for c in response.campaigns
    ]
    print(format_table(["id", "version", "status", "created", "name"], rows))
    return EXIT_OK


def run_user(args: argparse.Namespace) -> int:
    """`nudge user USER`: the user's projected state as indented JSON (one line with --json)."""
    client = Client.from_args(args, "rules")
    with client.channel() as channel:
        stub = rules_pb2_grpc.RulesServiceStub(channel)
        response = client.call(stub.GetUser, rules_pb2.GetUserRequest(user_id=args.user))
    state = struct_to_dict(response.state)
    if args.json:
        print(json.dumps(state, ensure_ascii=False, sort_keys=True, separators=(",", ":")))
    else:
        print(json.dumps(state, ensure_ascii=False, sort_keys=True, indent=2))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# dispatch


def run_messages(args: argparse.Namespace) -> int:
    """`nudge messages USER`: the user's messages, newest first, as a table or JSON."""
    client = Client.from_args(args, "dispatch")
    request = dispatch_pb2.ListMessagesRequest(user_id=args.user, limit=args.limit)
    with client.channel() as channel:
        stub = dispatch_pb2_grpc.DispatchServiceStub(channel)
        response = client.call(stub.ListMessages, request)
    if args.json:
        data = [
            {
                "send_id": m.send_id,
                "campaign_id": m.campaign_id,
                "channel": m.channel,
                "state": m.state,
                "reason": m.reason,
                "attempts": m.attempts,
                "created_at": _iso(m.created_at, m.HasField("created_at")),
                "sent_at": _iso(m.sent_at, m.HasField("sent_at")) or None,
                "next_at": _iso(m.next_at, m.HasField("next_at")) or None,
                "ambiguous_attempts": m.ambiguous_attempts,
            }
            for m in response.messages
        ]
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return EXIT_OK
    rows = [
        [
            m.send_id,
            m.campaign_id,
            m.channel,
            m.state,
            m.reason,
            str(m.attempts),
            _iso(m.created_at, m.HasField("created_at")),
        ]
        for m in response.messages
    ]
    headers = ["send_id", "campaign", "channel", "state", "reason", "attempts", "created"]
    print(format_table(headers, rows))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# argument parsers


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add track, identify, campaigns, user and messages."""
    track = commands.add_parser(
        "track",
        help="send one event through IngestService.Track",
        description="Send one event through the public gRPC API. Prints accepted, duplicate "
        "or rejected (with the reason); exits 1 if rejected, 2 on a gRPC error.",
    )
    track.add_argument("--user", required=True, help="user id")
    track.add_argument("--event", required=True, help="event name, e.g. order_shipped")
    track.add_argument("--props", help="event properties as a JSON object")
    track.add_argument("--context", help="client context as a JSON object")
    track.add_argument("--event-id", help="idempotency key (default: a new uuid4)")
    track.add_argument("--occurred-at", help="client time, ISO 8601 (default: now)")
    _add_client_options(track, "ingest")
    track.set_defaults(func=run_track)

    identify = commands.add_parser(
        "identify",
        help="set user traits through IngestService.Identify",
        description="Merge traits into a user's profile (a null value removes a trait).",
    )
    identify.add_argument("--user", required=True, help="user id")
    identify.add_argument(
        "--traits", required=True, help='traits as a JSON object, e.g. {"email": "a@b.c"}'
    )
    identify.add_argument("--event-id", help="idempotency key (default: generated by the server)")
    identify.add_argument("--occurred-at", help="client time, ISO 8601 (default: now)")
    _add_client_options(identify, "ingest")
    identify.set_defaults(func=run_identify)

    campaigns = commands.add_parser("campaigns", help="apply and list campaigns (rules service)")
    campaign_commands = campaigns.add_subparsers(dest="campaigns_command", metavar="COMMAND")
    campaign_commands.required = True
    apply = campaign_commands.add_parser(
        "apply",
        help="apply campaign YAML files",
        description="Apply campaign definitions (YAML) through RulesService.ApplyCampaign. "
        "Prints `<id> version N (created|unchanged)` per campaign; exits 1 if any definition "
        "is invalid.",
    )
    apply.add_argument("files", metavar="FILE", nargs="+", help="campaign YAML file")
    _add_client_options(apply, "rules")
    apply.set_defaults(func=run_campaigns_apply)
    listing = campaign_commands.add_parser("list", help="list the current campaign versions")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_client_options(listing, "rules")
    listing.set_defaults(func=run_campaigns_list)

    user = commands.add_parser("user", help="show a user's engagement state (RulesService.GetUser)")
    user.add_argument("user", metavar="USER", help="user id")
    user.add_argument("--json", action="store_true", help="compact one-line JSON")
    _add_client_options(user, "rules")
    user.set_defaults(func=run_user)

    messages = commands.add_parser(
        "messages", help="list a user's messages (DispatchService.ListMessages)"
    )
    messages.add_argument("user", metavar="USER", help="user id")
    messages.add_argument("--limit", type=int, default=50, help="at most this many (default: 50)")
    messages.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_client_options(messages, "dispatch")
    messages.set_defaults(func=run_messages)
