"""The provider channels (push, sms) that the settings enable; each only when its URL is set."""

from __future__ import annotations

import ssl

from nudge.config import ConfigError
from services.dispatch.channels.base import Channel
from services.dispatch.channels.provider_http import StaticAccessToken
from services.dispatch.channels.push import ApnsChannel, ApnsJwtSigner, FcmChannel, PushChannel
from services.dispatch.channels.sms import TwilioChannel
from services.dispatch.settings import Settings


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    # A fresh context per client: httpx sets the ALPN protocols on the context it is given.
    if settings.provider_ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=settings.provider_ca_file)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError("NUDGE_PROVIDER_CA_FILE", f"cannot load: {error}") from None


def provider_channels(settings: Settings) -> dict[str, Channel]:
    """`push` (FCM and/or APNs) and `sms` (Twilio), as configured; ConfigError names the
    variable that is wrong."""
    channels: dict[str, Channel] = {}
    timeout_s = settings.provider_timeout_s
    fcm: FcmChannel | None = None
    apns: ApnsChannel | None = None
    if settings.fcm is not None:
        try:
            fcm = FcmChannel(
                settings.fcm.url,
                settings.fcm.project_id,
                StaticAccessToken(settings.fcm.access_token),
                timeout_s=timeout_s,
                tls_context=_tls_context(settings),
            )
        except ValueError as error:
            raise ConfigError("NUDGE_FCM_PROJECT_ID", str(error)) from None
    if settings.apns is not None:
        try:
            signer = ApnsJwtSigner(
                settings.apns.team_id, settings.apns.key_id, settings.apns.private_key_pem
            )
        except ValueError as error:
            raise ConfigError("NUDGE_APNS_KEY_FILE", str(error)) from None
        try:
            apns = ApnsChannel(
                settings.apns.url,
                settings.apns.topic,
                signer,
                priority=settings.apns.priority,
                timeout_s=timeout_s,
                tls_context=_tls_context(settings),
            )
        except ValueError as error:
            raise ConfigError("NUDGE_APNS_TOPIC or NUDGE_APNS_PRIORITY", str(error)) from None
    if fcm is not None or apns is not None:
        channels["push"] = PushChannel(fcm=fcm, apns=apns)
    if settings.twilio is not None:
        try:
            channels["sms"] = TwilioChannel(
                settings.twilio.url,
                settings.twilio.account_sid,
                settings.twilio.auth_token,
                from_number=settings.twilio.from_number,
                messaging_service_sid=settings.twilio.messaging_service_sid,
                status_callback_url=settings.twilio.status_callback_url,
                timeout_s=timeout_s,
                tls_context=_tls_context(settings),
            )
        except ValueError as error:
            raise ConfigError("NUDGE_TWILIO_ACCOUNT_SID", str(error)) from None
    return channels
