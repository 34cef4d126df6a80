"""Dispatch settings, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nudge.config import ConfigError, env_address, env_float, env_int, env_str
from services.dispatch import tracking


@dataclass(frozen=True)
class Settings:
    """Everything the dispatch process needs to start."""

    address: str
    database_url: str
    nats_url: str
    nats_prefix: str
    smtp_url: str
    email_from: str
    webhook_secret: str
    webhook_allow_hosts: tuple[str, ...]
    lease_s: float
    ack_wait_s: float
    retry_window_s: float
    fcm: FcmSettings | None = None
    apns: ApnsSettings | None = None
    twilio: TwilioSettings | None = None
    provider_ca_file: str | None = None
    provider_timeout_s: float = 10.0
    http_address: str = "127.0.0.1:50055"
    unsubscribe_secret: str | None = None
    unsubscribe_url: str | None = None
    tracking_url: str | None = None
    tracking_secret: str | None = None
    channel_concurrency: int = 32
    pickup_grace_s: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read NUDGE_DISPATCH_ADDR, DATABASE_URL, NATS_URL, NUDGE_SMTP_URL, NUDGE_EMAIL_FROM,
        NUDGE_WEBHOOK_SECRET, NUDGE_WEBHOOK_ALLOW_HOSTS, NUDGE_DISPATCH_LEASE_S,
        NUDGE_DISPATCH_ACK_WAIT_S, NUDGE_RETRY_WINDOW_S; the push and SMS providers (each
        configured only when its URL is set, see FcmSettings, ApnsSettings, TwilioSettings),
        NUDGE_PROVIDER_CA_FILE and NUDGE_PROVIDER_TIMEOUT_S."""
        allow = env_str("NUDGE_WEBHOOK_ALLOW_HOSTS", "-", env)
        return cls(
            address=env_address("NUDGE_DISPATCH_ADDR", "127.0.0.1:50054", env),
            database_url=env_str("DATABASE_URL", None, env),
            nats_url=env_str("NATS_URL", None, env),
            nats_prefix=env_str("NUDGE_NATS_PREFIX", "nudge", env),
            smtp_url=env_str("NUDGE_SMTP_URL", "smtp://127.0.0.1:2525", env),
            email_from=env_str("NUDGE_EMAIL_FROM", "Nudge <nudge@localhost>", env),
            webhook_secret=env_str("NUDGE_WEBHOOK_SECRET", None, env),
            webhook_allow_hosts=tuple(h for h in allow.split(",") if h and h != "-"),
            lease_s=env_float("NUDGE_DISPATCH_LEASE_S", 60.0, env),
            ack_wait_s=env_float("NUDGE_DISPATCH_ACK_WAIT_S", 60.0, env),
            retry_window_s=env_float("NUDGE_RETRY_WINDOW_S", 86400.0, env),
            fcm=FcmSettings.from_env(env),
            apns=ApnsSettings.from_env(env),
            twilio=TwilioSettings.from_env(env),
            provider_ca_file=_optional("NUDGE_PROVIDER_CA_FILE", env),
            provider_timeout_s=env_float("NUDGE_PROVIDER_TIMEOUT_S", 10.0, env),
            **_delivery_from_env(env),
        )


def _delivery_from_env(env: Mapping[str, str] | None) -> dict[str, Any]:
    """NUDGE_DISPATCH_HTTP_ADDR (the unsubscribe endpoint), NUDGE_UNSUBSCRIBE_SECRET (default:
    derived from NUDGE_WEBHOOK_SECRET), NUDGE_UNSUBSCRIBE_URL (the public URL of
    /unsubscribe; must be https in production), NUDGE_DISPATCH_CHANNEL_CONCURRENCY (provider
    calls in flight per channel), NUDGE_DISPATCH_PICKUP_GRACE_S; open and click tracking:
    NUDGE_TRACKING_URL (the public base URL of this server's /o/ and /c/; unset: tracking is
    off) and NUDGE_TRACKING_SECRET (default: derived from NUDGE_WEBHOOK_SECRET)."""
    concurrency = env_int("NUDGE_DISPATCH_CHANNEL_CONCURRENCY", 32, env)
    if concurrency < 1:
        raise ConfigError("NUDGE_DISPATCH_CHANNEL_CONCURRENCY", "must be at least 1")
    tracking_url = _optional("NUDGE_TRACKING_URL", env)
    tracking_secret = _optional("NUDGE_TRACKING_SECRET", env)
    _check_tracking(tracking_url, tracking_secret)
    return {
        "http_address": env_address("NUDGE_DISPATCH_HTTP_ADDR", "127.0.0.1:50055", env),
        "unsubscribe_secret": _optional("NUDGE_UNSUBSCRIBE_SECRET", env),
        "unsubscribe_url": _optional("NUDGE_UNSUBSCRIBE_URL", env),
        "tracking_url": tracking_url,
        "tracking_secret": tracking_secret,
        "channel_concurrency": concurrency,
        "pickup_grace_s": env_float("NUDGE_DISPATCH_PICKUP_GRACE_S", 5.0, env),
    }


def _check_tracking(url: str | None, secret: str | None) -> None:
    """Fail at startup, not at the first send, on a base URL or key tokens cannot use."""
    if secret is not None and len(secret.encode("utf-8")) < tracking.MIN_SECRET_BYTES:
        raise ConfigError(
            "NUDGE_TRACKING_SECRET", f"must be at least {tracking.MIN_SECRET_BYTES} bytes"
        )
    if url is not None:
        try:
            tracking.open_url(url, "00000000-0000-0000-0000-000000000000", b"k" * 32)
        except ValueError as error:
            raise ConfigError("NUDGE_TRACKING_URL", str(error)) from None


def _optional(name: str, env: Mapping[str, str] | None) -> str | None:
    value = env_str(name, "-", env)
    return None if value == "-" else value


@dataclass(frozen=True)
class FcmSettings:
    """FCM HTTP v1: NUDGE_FCM_URL (enables it), NUDGE_FCM_PROJECT_ID, NUDGE_FCM_TOKEN (a static
    OAuth2 access token)."""

    url: str
    project_id: str
    access_token: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FcmSettings | None:
        url = _optional("NUDGE_FCM_URL", env)
        if url is None:
            return None
        return cls(
            url=url,
            project_id=env_str("NUDGE_FCM_PROJECT_ID", None, env),
            access_token=env_str("NUDGE_FCM_TOKEN", None, env),
        )


@dataclass(frozen=True)
class ApnsSettings:
    """APNs: NUDGE_APNS_URL (enables it), NUDGE_APNS_TEAM_ID, NUDGE_APNS_KEY_ID,
    NUDGE_APNS_KEY_FILE (the ES256 .p8 PEM), NUDGE_APNS_TOPIC (bundle id),
    NUDGE_APNS_PRIORITY (10)."""

    url: str
    team_id: str
    key_id: str
    private_key_pem: str
    topic: str
    priority: int = 10

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ApnsSettings | None:
        url = _optional("NUDGE_APNS_URL", env)
        if url is None:
            return None
        key_file = env_str("NUDGE_APNS_KEY_FILE", None, env)
        try:
            with open(key_file, encoding="ascii") as handle:
                private_key_pem = handle.read()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError("NUDGE_APNS_KEY_FILE", f"cannot read {key_file!r}: {error}") from None
        return cls(
            url=url,
            team_id=env_str("NUDGE_APNS_TEAM_ID", None, env),
            key_id=env_str("NUDGE_APNS_KEY_ID", None, env),
            private_key_pem=private_key_pem,
            topic=env_str("NUDGE_APNS_TOPIC", None, env),
            priority=env_int("NUDGE_APNS_PRIORITY", 10, env),
        )


@dataclass(frozen=True)
class TwilioSettings:
    """Twilio-style SMS: NUDGE_TWILIO_URL (enables it), NUDGE_TWILIO_ACCOUNT_SID,
    NUDGE_TWILIO_AUTH_TOKEN, NUDGE_TWILIO_FROM and/or NUDGE_TWILIO_MESSAGING_SERVICE_SID,
    NUDGE_TWILIO_STATUS_CALLBACK_URL (optional)."""

    url: str
    account_sid: str
    auth_token: str
    from_number: str | None
    messaging_service_sid: str | None
    status_callback_url: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TwilioSettings | None:
        url = _optional("NUDGE_TWILIO_URL", env)
        if url is None:
            return None
        from_number = _optional("NUDGE_TWILIO_FROM", env)
        service_sid = _optional("NUDGE_TWILIO_MESSAGING_SERVICE_SID", env)
        if from_number is None and service_sid is None:
            raise ConfigError(
                "NUDGE_TWILIO_FROM", "or NUDGE_TWILIO_MESSAGING_SERVICE_SID is required"
            )
        return cls(
            url=url,
            account_sid=env_str("NUDGE_TWILIO_ACCOUNT_SID", None, env),
            auth_token=env_str("NUDGE_TWILIO_AUTH_TOKEN", None, env),
            from_number=from_number,
            messaging_service_sid=service_sid,
            status_callback_url=_optional("NUDGE_TWILIO_STATUS_CALLBACK_URL", env),
        )
