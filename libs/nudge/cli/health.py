"""`nudge healthcheck ADDR [SERVICE]`: the standard grpc.health.v1 Check, as an exit code.

Used by docker-compose and exec probes (ECOSYSTEM.md §1.1), and by `nudge up` to wait for the
services.
"""

from __future__ import annotations

import argparse

import grpc
from grpc_health.v1 import health_pb2

from nudge.cli.common import EXIT_FAILED, EXIT_OK


def check(address: str, service: str = "", timeout: float = 2.0) -> tuple[bool, str]:
    """Ask `address` for the health of `service` ("" = the whole server).

    Return (serving, what): `what` is the status name (``SERVING``, ``NOT_SERVING``...) or
    ``<CODE>: <details>`` when the call failed (``UNAVAILABLE``: nothing listening).
    """
    with grpc.insecure_channel(address) as channel:
        # The typeshed stubs of HealthStub lack its methods; bind the method by name instead.
        check_method = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            response = check_method(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            return False, describe_rpc_error(error)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def describe_rpc_error(error: grpc.RpcError) -> str:
    """``<CODE>: <details>`` for a failed call (``UNAVAILABLE: failed to connect...``)."""
    if isinstance(error, grpc.Call):
        code = error.code()
        details = error.details() or ""
        return f"{code.name}: {details}" if details else code.name
    return str(error) or type(error).__name__


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `healthcheck` command."""
    parser = commands.add_parser(
        "healthcheck",
        help="exit 0 iff a gRPC server reports SERVING (grpc.health.v1)",
        description="Call grpc.health.v1.Health/Check; exit 0 iff the answer is SERVING, "
        "else print the status or error and exit 1.",
    )
    parser.add_argument("address", metavar="ADDR", help="host:port of the gRPC server")
    parser.add_argument(
        "service",
        metavar="SERVICE",
        nargs="?",
        default="",
        help="service name, e.g. nudge.ingest.v1.IngestService (default: the whole server)",
    )
    parser.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait (default: %(default)s)"
    )
    parser.set_defaults(func=run_healthcheck)


def run_healthcheck(args: argparse.Namespace) -> int:
    """`nudge healthcheck`: print nothing and exit 0 when SERVING, else print why and exit 1."""
    serving, what = check(args.address, args.service, args.timeout)
    if serving:
        return EXIT_OK
    print(f"{args.address}: {what}")
    return EXIT_FAILED
