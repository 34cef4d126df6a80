"""Push (APNs, FCM HTTP v1) and SMS (Twilio) channels against real peers on 127.0.0.1:
hypercorn over TLS with a trustme CA, HTTP/2 for the push providers (nudge.testing.provider_peers).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest

from nudge.config import ConfigError
from nudge.dev.stack import free_port
from nudge.testing.provider_peers import (
    APNS,
    FCM,
    HANG,
    TWILIO,
    ProviderCredentials,
    ProviderPeers,
    apns_error,
    fcm_error,
    twilio_error,
)
from services.dispatch.channels import (
    AmbiguousChannelError,
    Channel,
    OutboundMessage,
    PermanentChannelError,
    TransientChannelError,
    UndeliverableAddressError,
)
from services.dispatch.channels.configured import provider_channels
from services.dispatch.channels.provider_http import StaticAccessToken
from services.dispatch.channels.push import (
    ApnsChannel,
    ApnsJwtSigner,
    FcmChannel,
    PushChannel,
    PushRoute,
    UnregisteredTokenError,
    route_push,
)
from services.dispatch.channels.sms import RecipientOptedOutError, TwilioChannel
from services.dispatch.settings import Settings

SEND_ID = "3f1c7a52-2b7e-5d3c-9a41-0c2f8e6d1b11"
APNS_TOKEN = "a1" * 32
FCM_TOKEN = "fXk3_Qe2RJ2w:APA91bH-example_registration-token"
TIMEOUT_S = 0.5


def message(channel: str, **fields: str) -> OutboundMessage:
    return OutboundMessage(
        send_id=SEND_ID, workspace_id="acme", user_id="u1", channel=channel, fields=fields
    )


def push(**fields: str) -> OutboundMessage:
    return message("push", **({"subject": "Your cart", "body": "3 items left"} | fields))


class FakeClock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def peers() -> Iterator[ProviderPeers]:
    with ProviderPeers() as running:
        yield running


class Channels:
    """Builds channels pointed at the peers and closes them at teardown."""

    def __init__(self, peers: ProviderPeers) -> None:
        self.peers = peers
        self.credentials = peers.credentials
        self._opened: list[Channel] = []

    def _keep(self, channel: Any) -> Any:
        self._opened.append(channel)
        return channel

    def signer(self, clock: FakeClock | None = None, key_pem: str | None = None) -> ApnsJwtSigner:
        c = self.credentials
        return ApnsJwtSigner(
            c.apns_team_id,
            c.apns_key_id,
            key_pem or c.apns_private_key_pem,
            clock=clock or time.time,
        )

    def apns(self, signer: ApnsJwtSigner | None = None, url: str | None = None) -> ApnsChannel:
        channel = ApnsChannel(
            url or self.peers.url,
            self.credentials.apns_topic,
            signer or self.signer(),
            timeout_s=TIMEOUT_S,
            tls_context=self.peers.client_tls_context(),
        )
        return self._keep(channel)  # type: ignore[no-any-return]

    def fcm(self, token: str | None = None, project_id: str | None = None) -> FcmChannel:
        channel = FcmChannel(
            self.peers.url,
            project_id or self.credentials.fcm_project_id,
            StaticAccessToken(token or self.credentials.fcm_access_token),
            timeout_s=TIMEOUT_S,
            tls_context=self.peers.client_tls_context(),
        )
        return self._keep(channel)  # type: ignore[no-any-return]

    def twilio(self, url: str | None = None, **options: Any) -> TwilioChannel:
        c = self.credentials
        options.setdefault("from_number", c.twilio_from)
        channel = TwilioChannel(
            url or self.peers.url,
            c.twilio_account_sid,
            options.pop("auth_token", c.twilio_auth_token),
            timeout_s=TIMEOUT_S,
            tls_context=self.peers.client_tls_context(),
            **options,
        )
        return self._keep(channel)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        for channel in self._opened:
            await channel.aclose()


@pytest.fixture
async def channels(peers: ProviderPeers) -> AsyncIterator[Channels]:
    built = Channels(peers)
    yield built
    await built.aclose()


# --------------------------------------------------------------------------------------------
# APNs
# --------------------------------------------------------------------------------------------


async def test_apns_request_shape_over_http2(peers: ProviderPeers, channels: Channels) -> None:
    delivery = await channels.apns().send(push(to=APNS_TOKEN, payload='{"cart_id":"c9"}'))

    assert delivery.provider_message_id == SEND_ID
    [request] = peers.requests(APNS)
    assert request.http_version == "2"
    assert (request.method, request.path) == ("POST", f"/3/device/{APNS_TOKEN}")
    assert request.authorized
    assert request.status == 200
    headers = request.headers
    assert headers["apns-topic"] == peers.credentials.apns_topic
    assert headers["apns-push-type"] == "alert"
    assert headers["apns-priority"] == "10"
    assert headers["apns-id"] == SEND_ID
    assert headers["apns-collapse-id"] == SEND_ID
    assert headers["content-type"] == "application/json"
    assert request.json() == {
        "aps": {"alert": {"title": "Your cart", "body": "3 items left"}},
        "cart_id": "c9",
    }
    # The peer verified the JWT with the public key; check the claims once more here.
    token = headers["authorization"].removeprefix("bearer ")
    assert jwt.get_unverified_header(token) == {
        "alg": "ES256",
        "kid": peers.credentials.apns_key_id,
        "typ": "JWT",
    }
    claims = jwt.decode(token, peers.credentials.apns_public_key(), algorithms=["ES256"])
    assert claims["iss"] == peers.credentials.apns_team_id
    assert abs(claims["iat"] - time.time()) < 60


async def test_apns_payload_aps_is_merged_and_data_kept(
    peers: ProviderPeers, channels: Channels
) -> None:
    payload = json.dumps({"aps": {"badge": 3, "sound": "default"}, "deep_link": "app://cart"})
    await channels.apns().send(push(to=APNS_TOKEN, payload=payload, subject=""))

    assert peers.requests(APNS)[0].json() == {
        "aps": {"badge": 3, "sound": "default", "alert": {"body": "3 items left"}},
        "deep_link": "app://cart",
    }


async def test_apns_jwt_is_reused_then_renewed_after_50_minutes(
    peers: ProviderPeers, channels: Channels
) -> None:
    clock = FakeClock(time.time() - 55 * 60)
    channel = channels.apns(channels.signer(clock))

    await channel.send(push(to=APNS_TOKEN))
    await channel.send(push(to=APNS_TOKEN))
    clock.now += 51 * 60
    await channel.send(push(to=APNS_TOKEN))

    requests = peers.requests(APNS)
    assert [r.status for r in requests] == [200, 200, 200]
    tokens = [r.headers["authorization"] for r in requests]
    assert tokens[0] == tokens[1] != tokens[2]
    issued = [r.jwt_claims["iat"] for r in requests if r.jwt_claims is not None]
    assert issued[2] - issued[0] == 51 * 60


async def test_apns_410_unregistered_signals_token_removal(
    peers: ProviderPeers, channels: Channels
) -> None:
    peers.script(APNS, apns_error(410, "Unregistered", timestamp_ms=1_700_000_000_000))

    with pytest.raises(UnregisteredTokenError) as caught:
        await channels.apns().send(push(to=APNS_TOKEN))

    error = caught.value
    assert isinstance(error, UndeliverableAddressError)
    assert isinstance(error, PermanentChannelError)
    assert not error.retryable
    assert error.reason.startswith("unregistered token")
    assert "410 Unregistered" in error.reason
    assert (error.provider, error.token, error.address) == ("apns", APNS_TOKEN, APNS_TOKEN)
    assert error.unregistered_at == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert len(peers.requests(APNS)) == 1


async def test_apns_expired_provider_token_is_refreshed_and_retried_once(
    peers: ProviderPeers, channels: Channels
) -> None:
    clock = FakeClock(time.time() - 40 * 60)
    channel = channels.apns(channels.signer(clock))
    await channel.send(push(to=APNS_TOKEN))
    clock.now += 25 * 60  # old enough to be replaced (APNs allows one new token per 20 min)
    peers.script(APNS, apns_error(403, "ExpiredProviderToken"))

    delivery = await channel.send(push(to=APNS_TOKEN))

    assert delivery.provider_message_id == SEND_ID
    first, refused, retried = peers.requests(APNS)
    assert (refused.status, retried.status) == (403, 200)
    assert refused.headers["authorization"] == first.headers["authorization"]
    assert retried.headers["authorization"] != refused.headers["authorization"]


async def test_apns_refused_again_after_refresh_is_transient(
    peers: ProviderPeers, channels: Channels
) -> None:
    clock = FakeClock(time.time() - 40 * 60)
    channel = channels.apns(channels.signer(clock))
    await channel.send(push(to=APNS_TOKEN))
    clock.now += 25 * 60
    peers.script(APNS, *[apns_error(403, "ExpiredProviderToken")] * 2)

    with pytest.raises(TransientChannelError, match="apns rejected our provider token"):
        await channel.send(push(to=APNS_TOKEN))
    assert [r.status for r in peers.requests(APNS)] == [200, 403, 403]


async def test_apns_token_signed_with_another_key_is_transient_without_a_retry_storm(
    peers: ProviderPeers, channels: Channels
) -> None:
    other_key = ProviderCredentials.generate().apns_private_key_pem
    channel = channels.apns(channels.signer(key_pem=other_key))

    with pytest.raises(TransientChannelError, match="403 InvalidProviderToken"):
        await channel.send(push(to=APNS_TOKEN))
    # A fresh token was minted less than 20 minutes ago: no second request.
    [request] = peers.requests(APNS)
    assert (request.authorized, request.status) == (False, 403)


@pytest.mark.parametrize(
    ("answer", "error_type", "retry_after"),
    [
        (apns_error(429, "TooManyRequests", retry_after=7), TransientChannelError, 7.0),
        (apns_error(500, "InternalServerError"), TransientChannelError, None),
        (apns_error(503, "ServiceUnavailable"), TransientChannelError, None),
        (apns_error(400, "BadDeviceToken"), PermanentChannelError, None),
        (apns_error(413, "PayloadTooLarge"), PermanentChannelError, None),
    ],
)
async def test_apns_errors_are_classified(
    peers: ProviderPeers,
    channels: Channels,
    answer: Any,
    error_type: type[Exception],
    retry_after: float | None,
) -> None:
    peers.script(APNS, answer)

    with pytest.raises(error_type) as caught:
        await channels.apns().send(push(to=APNS_TOKEN))

    assert not isinstance(caught.value, UnregisteredTokenError)
    assert getattr(caught.value, "retry_after_s", None) == retry_after
    assert len(peers.requests(APNS)) == 1


async def test_apns_no_answer_is_ambiguous_and_retryable(
    peers: ProviderPeers, channels: Channels
) -> None:
    peers.script(APNS, HANG)
    started = time.monotonic()

    with pytest.raises(AmbiguousChannelError) as caught:
        await channels.apns().send(push(to=APNS_TOKEN))

    assert caught.value.retryable  # APNs shows one notification per apns-collapse-id
    assert time.monotonic() - started < 5 * TIMEOUT_S
    assert len(peers.requests(APNS)) == 1


@pytest.mark.parametrize("token", ["../../admin", "a1" * 31 + "/x", "zz" * 32, "a1" * 32 + "?q"])
async def test_apns_token_never_reaches_the_url_unless_hex(
    peers: ProviderPeers, channels: Channels, token: str
) -> None:
    with pytest.raises(PermanentChannelError, match="invalid device token"):
        await channels.apns().send(push(to=token))
    assert peers.requests() == []


async def test_apns_refused_connection_is_transient(channels: Channels) -> None:
    channel = channels.apns(url=f"https://127.0.0.1:{free_port()}")
    with pytest.raises(TransientChannelError, match="apns connect failed"):
        await channel.send(push(to=APNS_TOKEN))


# --------------------------------------------------------------------------------------------
# FCM HTTP v1
# --------------------------------------------------------------------------------------------


async def test_fcm_request_shape(peers: ProviderPeers, channels: Channels) -> None:
    payload = json.dumps({"cart_id": "c9", "items": 3, "meta": {"vip": True}})

    delivery = await channels.fcm().send(push(to=FCM_TOKEN, payload=payload))

    assert delivery.provider_message_id == "projects/nudge-test/messages/1"
    [request] = peers.requests(FCM)
    assert request.http_version == "2"
    assert (request.method, request.path) == ("POST", "/v1/projects/nudge-test/messages:send")
    assert request.headers["authorization"] == f"Bearer {peers.credentials.fcm_access_token}"
    assert request.headers["content-type"].startswith("application/json")
    assert request.json() == {
        "message": {
            "token": FCM_TOKEN,
            "notification": {"title": "Your cart", "body": "3 items left"},
            "data": {"cart_id": "c9", "items": "3", "meta": '{"vip": true}'},
        }
    }


async def test_fcm_404_unregistered_signals_token_removal(
    peers: ProviderPeers, channels: Channels
) -> None:
    peers.script(FCM, fcm_error(404, "NOT_FOUND", "UNREGISTERED"))

    with pytest.raises(UnregisteredTokenError) as caught:
        await channels.fcm().send(push(to=FCM_TOKEN))

    assert caught.value.reason.startswith("unregistered token")
    assert (caught.value.provider, caught.value.token) == ("fcm", FCM_TOKEN)
    assert caught.value.unregistered_at is None


async def test_fcm_404_for_a_wrong_project_is_permanent_not_unregistered(
    peers: ProviderPeers, channels: Channels
) -> None:
    with pytest.raises(PermanentChannelError) as caught:
        await channels.fcm(project_id="someone-else").send(push(to=FCM_TOKEN))
    assert not isinstance(caught.value, UnregisteredTokenError)
    assert "404 NOT_FOUND" in caught.value.reason


@pytest.mark.parametrize(
    ("answer", "error_type", "retry_after"),
    [
        (
            fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", retry_after=30),
            TransientChannelError,
            30.0,
        ),
        (fcm_error(503, "UNAVAILABLE", "UNAVAILABLE"), TransientChannelError, None),
        (fcm_error(500, "INTERNAL", "INTERNAL"), TransientChannelError, None),
        (fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"), PermanentChannelError, None),
        (fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"), PermanentChannelError, None),
    ],
)
async def test_fcm_errors_are_classified(
    peers: ProviderPeers,
    channels: Channels,
    answer: Any,
    error_type: type[Exception],
    retry_after: float | None,
) -> None:
    peers.script(FCM, answer)

    with pytest.raises(error_type) as caught:
        await channels.fcm().send(push(to=FCM_TOKEN))

    assert not isinstance(caught.value, UnregisteredTokenError)
    assert getattr(caught.value, "retry_after_s", None) == retry_after
    assert len(peers.requests(FCM)) == 1


async def test_fcm_rejected_static_token_is_transient_after_one_request(
    peers: ProviderPeers, channels: Channels
) -> None:
    with pytest.raises(TransientChannelError, match="fcm rejected our access token"):
        await channels.fcm(token="ya29.revoked").send(push(to=FCM_TOKEN))
    [request] = peers.requests(FCM)
    assert (request.authorized, request.status) == (False, 401)


async def test_fcm_rejected_token_is_refreshed_once(
    peers: ProviderPeers, channels: Channels
) -> None:
    class Rotating:
        def __init__(self) -> None:
            self.current = "ya29.stale"

        async def token(self) -> str:
            return self.current

        async def refresh(self, rejected: str) -> bool:
            self.current = peers.credentials.fcm_access_token
            return rejected != self.current

    channel = FcmChannel(
        peers.url,
        peers.credentials.fcm_project_id,
        Rotating(),
        timeout_s=TIMEOUT_S,
        tls_context=peers.client_tls_context(),
    )
    try:
        delivery = await channel.send(push(to=FCM_TOKEN))
    finally:
        await channel.aclose()

    assert delivery.provider_message_id is not None
    assert [r.status for r in peers.requests(FCM)] == [401, 200]


async def test_fcm_no_answer_is_ambiguous_and_not_retryable(
    peers: ProviderPeers, channels: Channels
) -> None:
    peers.script(FCM, HANG)
    with pytest.raises(AmbiguousChannelError) as caught:
        await channels.fcm().send(push(to=FCM_TOKEN))
    assert not caught.value.retryable  # FCM has no idempotency key


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"to": ""}, "missing address"),
        ({"subject": "", "body": ""}, "empty push message"),
        ({"payload": "[1, 2]"}, "payload must be a JSON object"),
        ({"payload": "{nope"}, "payload is not valid JSON"),
    ],
)
async def test_unusable_push_messages_are_permanent_and_not_sent(
    peers: ProviderPeers, channels: Channels, fields: dict[str, str], reason: str
) -> None:
    with pytest.raises(PermanentChannelError, match=reason):
        await channels.fcm().send(push(**({"to": FCM_TOKEN} | fields)))
    assert peers.requests() == []


# --------------------------------------------------------------------------------------------
# The `push` channel: routing between providers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "route"),
    [
        ({"to": APNS_TOKEN}, PushRoute("apns", APNS_TOKEN)),
        ({"to": FCM_TOKEN}, PushRoute("fcm", FCM_TOKEN)),
        ({"to": f"ios:{APNS_TOKEN}"}, PushRoute("apns", APNS_TOKEN)),
        ({"to": f"Android: {FCM_TOKEN}"}, PushRoute("fcm", FCM_TOKEN)),
        ({"to": "web:abc"}, PushRoute("fcm", "abc")),
        ({"to": "abc", "platform": "iOS"}, PushRoute("apns", "abc")),
        ({"to": APNS_TOKEN, "platform": "fcm"}, PushRoute("fcm", APNS_TOKEN)),
        ({"to": f"ios:{APNS_TOKEN}", "platform": "web"}, PushRoute("fcm", APNS_TOKEN)),
    ],
)
def test_route_push(fields: dict[str, str], route: PushRoute) -> None:
    assert route_push(fields) == route


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"to": "  "}, "missing address"),
        ({"to": "ios:"}, "missing address"),
        ({"to": "abc", "platform": "blackberry"}, "unknown push platform"),
    ],
)
def test_route_push_refuses(fields: dict[str, str], reason: str) -> None:
    with pytest.raises(PermanentChannelError, match=reason):
        route_push(fields)


async def test_push_channel_routes_to_each_provider(
    peers: ProviderPeers, channels: Channels
) -> None:
    channel = PushChannel(fcm=channels.fcm(), apns=channels.apns())
    assert not channel.supports_idempotency  # FCM does not dedupe

    await channel.send(push(to=APNS_TOKEN))
    await channel.send(push(to=f"android:{FCM_TOKEN}"))

    assert [(r.provider, r.status) for r in peers.requests()] == [("apns", 200), ("fcm", 200)]
    assert peers.requests(FCM)[0].json()["message"]["token"] == FCM_TOKEN


async def test_push_channel_unregistered_error_carries_the_rendered_address(
    peers: ProviderPeers, channels: Channels
) -> None:
    channel = PushChannel(fcm=channels.fcm(), apns=channels.apns())
    peers.script(FCM, fcm_error(404, "NOT_FOUND", "UNREGISTERED"))

    with pytest.raises(UnregisteredTokenError) as caught:
        await channel.send(push(to=f" android:{FCM_TOKEN} "))

    assert caught.value.address == f"android:{FCM_TOKEN}"  # what dispatch compares later
    assert caught.value.token == FCM_TOKEN


async def test_push_channel_without_the_needed_provider_is_permanent(
    peers: ProviderPeers, channels: Channels
) -> None:
    channel = PushChannel(apns=channels.apns())
    assert channel.supports_idempotency

    with pytest.raises(PermanentChannelError, match="push provider fcm is not configured"):
        await channel.send(push(to=FCM_TOKEN))
    assert peers.requests() == []


# --------------------------------------------------------------------------------------------
# SMS (Twilio)
# --------------------------------------------------------------------------------------------


async def test_twilio_request_shape(peers: ProviderPeers, channels: Channels) -> None:
    channel = channels.twilio(status_callback_url="https://nudge.example/sms/status")

    delivery = await channel.send(message("sms", to="+1 (415) 555-0100", body="Code: 12 & 34"))

    assert delivery.provider_message_id is not None
    assert delivery.provider_message_id.startswith("SM")
    assert delivery.detail == "twilio queued"
    [request] = peers.requests(TWILIO)
    c = peers.credentials
    assert (request.method, request.path) == (
        "POST",
        f"/2010-04-01/Accounts/{c.twilio_account_sid}/Messages.json",
    )
    assert request.http_version == "1.1"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    scheme, _, encoded = request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == f"{c.twilio_account_sid}:{c.twilio_auth_token}"
    assert request.form() == {
        "To": "+14155550100",
        "From": c.twilio_from,
        "Body": "Code: 12 & 34",
        "StatusCallback": "https://nudge.example/sms/status",
    }


async def test_twilio_messaging_service_instead_of_from(
    peers: ProviderPeers, channels: Channels
) -> None:
    channel = channels.twilio(from_number=None, messaging_service_sid="MG" + "1" * 32)

    await channel.send(message("sms", to="+447700900123", body="Hi"))

    assert peers.requests(TWILIO)[0].form() == {
        "To": "+447700900123",
        "MessagingServiceSid": "MG" + "1" * 32,
        "Body": "Hi",
    }


@pytest.mark.parametrize(
    ("to", "reason"),
    [
        ("", "missing address"),
        ("4155550100", "invalid phone number"),
        ("+0155550100", "invalid phone number"),
        ("+1415555010012345", "invalid phone number"),
        ("+1 415 CALL NOW", "invalid phone number"),
        ("+14155550100\r\nBcc: x", "invalid phone number"),
    ],
)
async def test_twilio_refuses_non_e164_numbers_without_a_request(
    peers: ProviderPeers, channels: Channels, to: str, reason: str
) -> None:
    with pytest.raises(PermanentChannelError, match=reason):
        await channels.twilio().send(message("sms", to=to, body="Hi"))
    assert peers.requests() == []


@pytest.mark.parametrize(
    ("answer", "error_type", "retry_after"),
    [
        (twilio_error(400, 21211, "Invalid 'To' Phone Number"), PermanentChannelError, None),
        (twilio_error(400, 21614, "'To' is not a mobile number"), PermanentChannelError, None),
        (twilio_error(400, 21611, "'From' queue is full"), TransientChannelError, None),
        (twilio_error(429, 20429, "Too Many Requests", retry_after=5), TransientChannelError, 5.0),
        (twilio_error(500, 20500, "Internal Server Error"), TransientChannelError, None),
        (twilio_error(503, 20503, "Service Unavailable"), TransientChannelError, None),
    ],
)
async def test_twilio_errors_are_classified(
    peers: ProviderPeers,
    channels: Channels,
    answer: Any,
    error_type: type[Exception],
    retry_after: float | None,
) -> None:
    peers.script(TWILIO, answer)

    with pytest.raises(error_type) as caught:
        await channels.twilio().send(message("sms", to="+14155550100", body="Hi"))

    assert not isinstance(caught.value, RecipientOptedOutError)
    assert getattr(caught.value, "retry_after_s", None) == retry_after
    assert len(peers.requests(TWILIO)) == 1


async def test_twilio_unsubscribed_recipient_is_signalled(
    peers: ProviderPeers, channels: Channels
) -> None:
    peers.script(TWILIO, twilio_error(400, 21610, "Attempt to send to unsubscribed recipient"))

    with pytest.raises(RecipientOptedOutError) as caught:
        await channels.twilio().send(message("sms", to=" +1 415-555-0100 ", body="Hi"))

    assert isinstance(caught.value, UndeliverableAddressError)
    assert caught.value.address == "+1 415-555-0100"  # as rendered: what dispatch compares
    assert (caught.value.number, caught.value.code) == ("+14155550100", 21610)
    assert caught.value.reason.startswith("recipient unsubscribed (twilio 400 21610")


async def test_twilio_rejected_credentials_are_transient(
    peers: ProviderPeers, channels: Channels
) -> None:
    channel = channels.twilio(auth_token="wrong")
    with pytest.raises(TransientChannelError, match="twilio rejected our credentials"):
        await channel.send(message("sms", to="+14155550100", body="Hi"))
    assert [r.status for r in peers.requests(TWILIO)] == [401]


async def test_twilio_no_answer_is_ambiguous_and_not_retryable(
    peers: ProviderPeers, channels: Channels
) -> None:
    peers.script(TWILIO, HANG)
    with pytest.raises(AmbiguousChannelError) as caught:
        await channels.twilio().send(message("sms", to="+14155550100", body="Hi"))
    assert not caught.value.retryable


async def test_twilio_refused_connection_is_transient(channels: Channels) -> None:
    channel = channels.twilio(url=f"https://127.0.0.1:{free_port()}")
    with pytest.raises(TransientChannelError, match="twilio connect failed"):
        await channel.send(message("sms", to="+14155550100", body="Hi"))


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

BASE_ENV = {
    "DATABASE_URL": "postgresql://unused",
    "NATS_URL": "nats://unused",
    "NUDGE_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"0" * 24).decode(),
}


async def test_configured_channels_send_through_the_peers(peers: ProviderPeers) -> None:
    built = provider_channels(Settings.from_env(BASE_ENV | peers.env()))
    try:
        assert sorted(built) == ["push", "sms"]
        await built["push"].send(push(to=APNS_TOKEN))
        await built["push"].send(push(to=FCM_TOKEN))
        await built["sms"].send(message("sms", to="+14155550100", body="Hi"))
    finally:
        for channel in built.values():
            await channel.aclose()

    assert [(r.provider, r.status) for r in peers.requests()] == [
        ("apns", 200),
        ("fcm", 200),
        ("twilio", 201),
    ]


def test_provider_channels_are_off_unless_their_url_is_set() -> None:
    assert provider_channels(Settings.from_env(BASE_ENV)) == {}


@pytest.mark.parametrize(
    ("drop", "variable"),
    [
        ("NUDGE_APNS_TOPIC", "NUDGE_APNS_TOPIC"),
        ("NUDGE_FCM_TOKEN", "NUDGE_FCM_TOKEN"),
        ("NUDGE_TWILIO_AUTH_TOKEN", "NUDGE_TWILIO_AUTH_TOKEN"),
        ("NUDGE_TWILIO_FROM", "NUDGE_TWILIO_FROM"),
    ],
)
def test_incomplete_provider_settings_name_the_variable(
    peers: ProviderPeers, drop: str, variable: str
) -> None:
    env = {k: v for k, v in (BASE_ENV | peers.env()).items() if k != drop}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.variable == variable


def test_a_bad_apns_key_names_the_variable(peers: ProviderPeers, tmp_path: Any) -> None:
    key_file = tmp_path / "key.p8"
    key_file.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    env = BASE_ENV | peers.env() | {"NUDGE_APNS_KEY_FILE": str(key_file)}
    with pytest.raises(ConfigError) as caught:
        provider_channels(Settings.from_env(env))
    assert caught.value.variable == "NUDGE_APNS_KEY_FILE"
