"""Fake push and SMS providers for tests, the demo and the e2e suite.

One hypercorn server on 127.0.0.1 over TLS (a trustme CA; HTTP/2 and HTTP/1.1 via ALPN) that
speaks the request shapes of
- APNs: `POST /3/device/<token>`, bearer ES256 JWT checked with the public key;
- FCM HTTP v1: `POST /v1/projects/<id>/messages:send`, bearer access token;
- Twilio: `POST /2010-04-01/Accounts/<sid>/Messages.json`, form body, Basic auth.

It records every request (HTTP version, headers, body, verified JWT) and answers like the real
provider: authentication first (APNs 403 `InvalidProviderToken`/`ExpiredProviderToken`, FCM 401
`UNAUTHENTICATED`, Twilio 401 code 20003), then the next scripted `PeerAnswer` for that
provider, or success when none is scripted. `HANG` holds the request until the peer stops.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import parse_qsl

import jwt
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypercorn.asyncio import serve
from hypercorn.config import Config
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

APNS: Final = "apns"
FCM: Final = "fcm"
TWILIO: Final = "twilio"
_MAX_BODY: Final = 1 << 20
_APNS_MAX_PAYLOAD: Final = 4096
_APNS_TOKEN_MAX_AGE_S: Final = 3600
_HANG_LIMIT_S: Final = 60.0


@dataclass(frozen=True)
class PeerAnswer:
    """One scripted answer. `body` None means the provider's normal success body."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    hang: bool = False


HANG: Final = PeerAnswer(hang=True)


def _retry_after(retry_after: float | None) -> tuple[tuple[str, str], ...]:
    return () if retry_after is None else (("retry-after", f"{retry_after:g}"),)


def apns_error(
    status: int, reason: str, *, timestamp_ms: int | None = None, retry_after: float | None = None
) -> PeerAnswer:
    """An APNs error: `{"reason": …}` (+ `timestamp` for 410)."""
    body: dict[str, Any] = {"reason": reason}
    if timestamp_ms is not None:
        body["timestamp"] = timestamp_ms
    return PeerAnswer(status, _retry_after(retry_after), json.dumps(body).encode())


def fcm_error(
    status: int,
    rpc_status: str,
    error_code: str | None = None,
    *,
    message: str = "",
    retry_after: float | None = None,
) -> PeerAnswer:
    """A google.rpc-style FCM error, with an FcmError detail when `error_code` is given."""
    error: dict[str, Any] = {
        "code": status,
        "message": message or rpc_status,
        "status": rpc_status,
    }
    if error_code is not None:
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": error_code,
            }
        ]
    return PeerAnswer(status, _retry_after(retry_after), json.dumps({"error": error}).encode())


def twilio_error(
    status: int, code: int, message: str, *, retry_after: float | None = None
) -> PeerAnswer:
    """A Twilio REST error body."""
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return PeerAnswer(status, _retry_after(retry_after), json.dumps(body).encode())


@dataclass(frozen=True)
class ProviderCredentials:
    """What the fake providers accept; `generate()` makes a fresh APNs signing key."""

    apns_private_key_pem: str
    apns_team_id: str = "TEAM123456"
    apns_key_id: str = "KEY1234567"
    apns_topic: str = "com.example.nudge"
    fcm_project_id: str = "nudge-test"
    fcm_access_token: str = "ya29.nudge-test-token"  # noqa: S105 (test credential)
    twilio_account_sid: str = "AC" + "0" * 32
    twilio_auth_token: str = "nudge-test-auth-token"  # noqa: S105 (test credential)
    twilio_from: str = "+15005550006"

    @classmethod
    def generate(cls) -> ProviderCredentials:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cls(apns_private_key_pem=pem.decode("ascii"))

    def apns_public_key(self) -> ec.EllipticCurvePublicKey:
        key = serialization.load_pem_private_key(self.apns_private_key_pem.encode(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key.public_key()


@dataclass(frozen=True)
class ProviderRequest:
    """One request as a fake provider received it (header names lower-case)."""

    provider: str
    method: str
    path: str
    http_version: str
    headers: dict[str, str]
    body: bytes
    authorized: bool
    status: int
    jwt_header: dict[str, Any] | None = None
    jwt_claims: dict[str, Any] | None = None
    received_monotonic: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        """The body parsed as `application/x-www-form-urlencoded` (keys must be unique)."""
        pairs = parse_qsl(self.body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
        form = dict(pairs)
        assert len(form) == len(pairs), f"repeated form keys in {self.body!r}"
        return form


class _Response:
    def __init__(self, status: int, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()):
        self.status = status
        self.body = body
        self.headers = list(headers)


def _json_response(
    status: int, document: Any, headers: Iterable[tuple[str, str]] = ()
) -> _Response:
    return _Response(
        status, json.dumps(document).encode(), [("content-type", "application/json"), *headers]
    )


class ProviderPeers:
    """The fake APNs, FCM and Twilio endpoints, served from a background thread.

    Use as a context manager (or `start()`/`stop()`); `url` is the base URL for every provider,
    `ca_file`/`client_tls_context()` make a client trust it, `env()` gives dispatch's variables.
    """

    def __init__(self, credentials: ProviderCredentials | None = None) -> None:
        self.credentials = credentials or ProviderCredentials.generate()
        self._apns_public_key = self.credentials.apns_public_key()
        self._workdir = Path(tempfile.mkdtemp(prefix="nudge-provider-peers-"))
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = str(self._workdir / "ca.pem")
        ca.cert_pem.write_to_path(self.ca_file)
        self._server_pem = str(self._workdir / "server.pem")
        leaf.private_key_and_cert_chain_pem.write_to_path(self._server_pem)
        self.apns_key_file = str(self._workdir / "apns-key.p8")
        Path(self.apns_key_file).write_text(self.credentials.apns_private_key_pem)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._scripts: dict[str, deque[PeerAnswer]] = {APNS: deque(), FCM: deque(), TWILIO: deque()}
        self._requests: list[ProviderRequest] = []
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._release: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._fcm_counter = 0

    # ---- control (any thread) --------------------------------------------------------------

    @property
    def url(self) -> str:
        """`https://127.0.0.1:<port>`, the base URL of all three providers."""
        return f"https://127.0.0.1:{self.port}"

    def client_tls_context(self) -> ssl.SSLContext:
        """A client context that trusts this peer's CA (one per client: httpx sets ALPN on it)."""
        return ssl.create_default_context(cafile=self.ca_file)

    def env(self) -> dict[str, str]:
        """Dispatch's environment variables for sending to this peer."""
        c = self.credentials
        return {
            "NUDGE_FCM_URL": self.url,
            "NUDGE_FCM_PROJECT_ID": c.fcm_project_id,
            "NUDGE_FCM_TOKEN": c.fcm_access_token,
            "NUDGE_APNS_URL": self.url,
            "NUDGE_APNS_TEAM_ID": c.apns_team_id,
            "NUDGE_APNS_KEY_ID": c.apns_key_id,
            "NUDGE_APNS_KEY_FILE": self.apns_key_file,
            "NUDGE_APNS_TOPIC": c.apns_topic,
            "NUDGE_TWILIO_URL": self.url,
            "NUDGE_TWILIO_ACCOUNT_SID": c.twilio_account_sid,
            "NUDGE_TWILIO_AUTH_TOKEN": c.twilio_auth_token,
            "NUDGE_TWILIO_FROM": c.twilio_from,
            "NUDGE_PROVIDER_CA_FILE": self.ca_file,
        }

    def script(self, provider: str, *answers: PeerAnswer) -> None:
        """Queue answers for the next authorized requests to `provider`."""
        with self._lock:
            self._scripts[provider].extend(answers)

    def requests(self, provider: str | None = None) -> list[ProviderRequest]:
        """Everything received so far (optionally for one provider)."""
        with self._lock:
            return [r for r in self._requests if provider is None or r.provider == provider]

    def wait_for(
        self, count: int, provider: str | None = None, timeout_s: float = 10.0
    ) -> list[ProviderRequest]:
        """Block until `count` requests arrived (or the timeout); return them all."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = [r for r in self._requests if provider is None or r.provider == provider]
                remaining = deadline - time.monotonic()
                if len(found) >= count or remaining <= 0:
                    return found
                self._changed.wait(remaining)

    def start(self) -> ProviderPeers:
        """Serve in a background thread; returns once the server accepts connections."""
        self._sock.listen(128)
        self._thread = threading.Thread(target=self._run, name="provider-peers", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._failure is not None:
            self.stop()
            raise RuntimeError(f"provider peers did not start: {self._failure!r}")
        return self

    def stop(self) -> None:
        """Release hanging requests, stop serving and remove the temporary files."""
        loop, stop, release = self._loop, self._stop, self._release
        if loop is not None and stop is not None and release is not None and loop.is_running():
            loop.call_soon_threadsafe(release.set)
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self._sock.close()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> ProviderPeers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- server thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # reported by start()
            self._failure = error
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._release = asyncio.Event()
        config = Config()
        config.certfile = self._server_pem
        config.keyfile = self._server_pem
        config.accesslog = None
        config.errorlog = None
        config.graceful_timeout = 1.0
        # hypercorn wraps the fd in a socket object of its own; give it a duplicate.
        config.bind = [f"fd://{self._sock.dup().detach()}"]
        await serve(cast(Any, self._app), config, shutdown_trigger=self._stop.wait)

    async def _app(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        raw_scope = cast(dict[str, Any], scope)
        if raw_scope["type"] == "lifespan":
            while True:
                event = cast(dict[str, Any], await receive())
                if event["type"] == "lifespan.startup":
                    await send(cast(Any, {"type": "lifespan.startup.complete"}))
                    self._ready.set()
                elif event["type"] == "lifespan.shutdown":
                    await send(cast(Any, {"type": "lifespan.shutdown.complete"}))
                    return
        if raw_scope["type"] != "http":
            return
        body = b""
        while True:
            event = cast(dict[str, Any], await receive())
            if event["type"] != "http.request":
                return
            body += event.get("body", b"")
            if len(body) > _MAX_BODY:
                await self._send(send, _Response(413))
                return
            if not event.get("more_body"):
                break
        response = await self._handle(raw_scope, body)
        await self._send(send, response)

    @staticmethod
    async def _send(send: ASGISendCallable, response: _Response) -> None:
        headers = [(k.encode(), v.encode()) for k, v in response.headers]
        headers.append((b"content-length", str(len(response.body)).encode()))
        await send(
            cast(
                Any, {"type": "http.response.start", "status": response.status, "headers": headers}
            )
        )
        await send(cast(Any, {"type": "http.response.body", "body": response.body}))

    async def _handle(self, scope: dict[str, Any], body: bytes) -> _Response:
        headers: dict[str, str] = {}
        for key, value in scope["headers"]:
            name = key.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[name] = f"{headers[name]}, {text}" if name in headers else text
        path: str = scope["path"]
        method: str = scope["method"]
        parts = path.strip("/").split("/")
        record = {
            "method": method,
            "path": path,
            "http_version": str(scope["http_version"]),
            "headers": headers,
            "body": body,
        }
        if method == "POST" and len(parts) == 3 and parts[:2] == ["3", "device"]:
            return await self._apns(record, parts[2])
        fcm_shape = ["v1", "projects", parts[2] if len(parts) > 2 else "", "messages:send"]
        if method == "POST" and parts == fcm_shape:
            return await self._fcm(record, parts[2])
        twilio_shape = [
            "2010-04-01",
            "Accounts",
            parts[2] if len(parts) > 2 else "",
            "Messages.json",
        ]
        if method == "POST" and parts == twilio_shape:
            return await self._twilio(record, parts[2])
        self._record("unknown", record, authorized=False, status=404)
        return _Response(404)

    def _record(
        self,
        provider: str,
        record: dict[str, Any],
        *,
        authorized: bool,
        status: int,
        jwt_header: dict[str, Any] | None = None,
        jwt_claims: dict[str, Any] | None = None,
    ) -> None:
        request = ProviderRequest(
            provider=provider,
            authorized=authorized,
            status=status,
            jwt_header=jwt_header,
            jwt_claims=jwt_claims,
            **record,
        )
        with self._changed:
            self._requests.append(request)
            self._changed.notify_all()

    def _next_answer(self, provider: str) -> PeerAnswer | None:
        with self._lock:
            script = self._scripts[provider]
            return script.popleft() if script else None

    async def _override(
        self, provider: str, record: dict[str, Any], **jwt_info: Any
    ) -> _Response | None:
        """The scripted answer for an authorized request, or None for the normal behaviour."""
        answer = self._next_answer(provider)
        if answer is None or (answer.status == 200 and answer.body is None and not answer.hang):
            return None
        self._record(
            provider,
            record,
            authorized=True,
            status=0 if answer.hang else answer.status,
            **jwt_info,
        )
        if answer.hang:
            assert self._release is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), _HANG_LIMIT_S)
            return _Response(503)
        body = answer.body or b""
        content_type = [("content-type", "application/json")] if body else []
        return _Response(answer.status, body, [*content_type, *answer.headers])

    # ---- APNs -------------------------------------------------------------------------------

    def _verify_apns_jwt(
        self, authorization: str | None
    ) -> tuple[str | None, dict[str, Any] | None, dict[str, Any] | None]:
        """(error reason or None, JWT header, claims)."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return "MissingProviderToken", None, None
        token = authorization[len("bearer ") :].strip()
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token,
                self._apns_public_key,
                algorithms=["ES256"],
                options={"require": ["iss", "iat"]},
                leeway=300,
            )
        except jwt.PyJWTError:
            return "InvalidProviderToken", None, None
        c = self.credentials
        if header.get("kid") != c.apns_key_id or claims.get("iss") != c.apns_team_id:
            return "InvalidProviderToken", header, claims
        if time.time() - float(claims["iat"]) > _APNS_TOKEN_MAX_AGE_S:
            return "ExpiredProviderToken", header, claims
        return None, header, claims

    async def _apns(self, record: dict[str, Any], token: str) -> _Response:
        headers: dict[str, str] = record["headers"]
        problem, jwt_header, claims = self._verify_apns_jwt(headers.get("authorization"))
        jwt_info = {"jwt_header": jwt_header, "jwt_claims": claims}
        if problem is None and headers.get("apns-topic") != self.credentials.apns_topic:
            problem = "TopicDisallowed"
        if problem is not None:
            self._record(APNS, record, authorized=False, status=403, **jwt_info)
            return _json_response(403, {"reason": problem})
        override = await self._override(APNS, record, **jwt_info)
        if override is not None:
            return override
        if len(record["body"]) > _APNS_MAX_PAYLOAD:
            self._record(APNS, record, authorized=True, status=413, **jwt_info)
            return _json_response(413, {"reason": "PayloadTooLarge"})
        if not all(c in "0123456789abcdefABCDEF" for c in token):
            self._record(APNS, record, authorized=True, status=400, **jwt_info)
            return _json_response(400, {"reason": "BadDeviceToken"})
        self._record(APNS, record, authorized=True, status=200, **jwt_info)
        apns_id = headers.get("apns-id") or str(uuid.uuid4())
        return _Response(200, b"", [("apns-id", apns_id)])

    # ---- FCM --------------------------------------------------------------------------------

    async def _fcm(self, record: dict[str, Any], project_id: str) -> _Response:
        expected = f"Bearer {self.credentials.fcm_access_token}"
        if record["headers"].get("authorization") != expected:
            self._record(FCM, record, authorized=False, status=401)
            answer = fcm_error(401, "UNAUTHENTICATED", message="Request had invalid credentials.")
            return _Response(401, answer.body or b"", [("content-type", "application/json")])
        if project_id != self.credentials.fcm_project_id:
            self._record(FCM, record, authorized=False, status=404)
            answer = fcm_error(404, "NOT_FOUND", message="Requested entity was not found.")
            return _Response(404, answer.body or b"", [("content-type", "application/json")])
        override = await self._override(FCM, record)
        if override is not None:
            return override
        self._record(FCM, record, authorized=True, status=200)
        with self._lock:
            self._fcm_counter += 1
            number = self._fcm_counter
        return _json_response(200, {"name": f"projects/{project_id}/messages/{number}"})

    # ---- Twilio -----------------------------------------------------------------------------

    async def _twilio(self, record: dict[str, Any], account_sid: str) -> _Response:
        c = self.credentials
        expected = base64.b64encode(f"{c.twilio_account_sid}:{c.twilio_auth_token}".encode())
        authorization = record["headers"].get("authorization", "")
        if account_sid != c.twilio_account_sid or authorization != f"Basic {expected.decode()}":
            self._record(TWILIO, record, authorized=False, status=401)
            answer = twilio_error(401, 20003, "Authenticate")
            return _Response(401, answer.body or b"", [("content-type", "application/json")])
        override = await self._override(TWILIO, record)
        if override is not None:
            return override
        form = dict(parse_qsl(record["body"].decode("ascii", "replace"), keep_blank_values=True))
        missing = (
            (21604, "A 'To' phone number is required.")
            if not form.get("To")
            else (21603, "A 'From' phone number is required.")
            if not (form.get("From") or form.get("MessagingServiceSid"))
            else (21602, "Message body is required.")
            if not form.get("Body")
            else None
        )
        if missing is not None:
            self._record(TWILIO, record, authorized=True, status=400)
            error = twilio_error(400, *missing)
            return _Response(400, error.body or b"", [("content-type", "application/json")])
        self._record(TWILIO, record, authorized=True, status=201)
        sid = "SM" + secrets.token_hex(16)
        return _json_response(
            201,
            {
                "sid": sid,
                "account_sid": account_sid,
                "to": form["To"],
                "from": form.get("From"),
                "messaging_service_sid": form.get("MessagingServiceSid"),
                "body": form["Body"],
                "status": "queued",
            },
        )
