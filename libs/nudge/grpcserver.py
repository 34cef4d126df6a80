"""grpc.aio server bootstrap shared by the four services: health, reflection, error mapping."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nudge.auth import PermissionDeniedError, UnauthenticatedError
from nudge.metrics import GrpcMetricsInterceptor

log = logging.getLogger("nudge.grpc")

MAX_MESSAGE_BYTES = 1024 * 1024
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]


class ServiceError(Exception):
    """Base of errors a servicer reports to its caller with a specific status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(ServiceError):
    """The request is invalid; `field` names the offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class NotFoundError(ServiceError):
    """The named thing does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhaustedError(ServiceError):
    """A limit was exceeded; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def _status_for(error: BaseException) -> tuple[grpc.StatusCode, str] | None:
    # The one table from exceptions to gRPC status codes (STYLE.md habit 8).
    import asyncpg

    if isinstance(error, ServiceError):
        return error.code, error.message
    if isinstance(error, UnauthenticatedError):
        return grpc.StatusCode.UNAUTHENTICATED, str(error)
    if isinstance(error, PermissionDeniedError):
        return grpc.StatusCode.PERMISSION_DENIED, str(error)
    if isinstance(
        error,
        OSError
        | TimeoutError
        | asyncpg.exceptions.CannotConnectNowError
        | asyncpg.exceptions.ConnectionDoesNotExistError
        | asyncpg.exceptions.InterfaceError
        | asyncpg.exceptions.QueryCanceledError
        | asyncpg.exceptions.LockNotAvailableError
        | asyncpg.exceptions.TooManyConnectionsError
        | asyncpg.exceptions.AdminShutdownError,
    ):
        return grpc.StatusCode.UNAVAILABLE, f"temporarily unavailable: {type(error).__name__}"
    return None


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def maps_errors(method: Handler) -> Handler:
    """Decorate a servicer method: known errors become their status; others become INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            mapped = _status_for(error)
            if mapped is None:
                log.exception("unhandled error in %s", method.__qualname__)
                mapped = (grpc.StatusCode.INTERNAL, "internal error")
            await context.abort(mapped[0], mapped[1])

    return wrapper  # type: ignore[return-value]


def bearer(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The `authorization` metadata value of a call."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer and how to add it: `add(servicer, server)` and its full service name."""

    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str


class GrpcServer:
    """A running grpc.aio server with health and reflection."""

    def __init__(
        self, server: grpc.aio.Server, health_servicer: Any, names: Sequence[str], port: int
    ):
        self.server = server
        self.health = health_servicer
        self.names = list(names)
        self.port = port

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the server and each service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.names]:
            await self.health.set(name, status)

    async def drain(self, grace_s: float = 5.0) -> None:
        """Turn NOT_SERVING for good, then stop accepting calls and let in-flight calls finish."""
        # Graceful-shutdown mode ignores later updates: a readiness check that completes during
        # the drain cannot report SERVING again.
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_grpc_server(
    address: str,
    bindings: Iterable[ServiceBinding],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> GrpcServer:
    """Start a server on `address` with the bindings, health (NOT_SERVING until told) and
    reflection. Raises OSError when the address cannot be bound."""
    server = grpc.aio.server(
        options=SERVER_OPTIONS, interceptors=[GrpcMetricsInterceptor(), *interceptors]
    )
    bindings = list(bindings)
    for binding in bindings:
        binding.add(binding.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [b.full_name for b in bindings]
    reflection.enable_server_reflection(
        (
            *names,
            HEALTH_SERVICE_NAME,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    result = GrpcServer(server, health_servicer, names, port)
    await result.set_serving(False)
    return result


CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", 4 * MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.enable_retries", 1),
]


def insecure_channel(address: str, service_config: str | None = None) -> grpc.aio.Channel:
    """A client channel with the project's keepalive/size options and optional retry policy."""
    options: list[tuple[str, Any]] = list(CLIENT_OPTIONS)
    if service_config:
        options.append(("grpc.service_config", service_config))
    return grpc.aio.insecure_channel(address, options=options)
