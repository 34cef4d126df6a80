"""Tracking settings: off unless NUDGE_TRACKING_URL is set; the key is derived from the webhook
secret unless given, independent of the unsubscribe key; bad values fail at startup."""

from __future__ import annotations

import pytest

from nudge.config import ConfigError
from services.dispatch import tracking, unsubscribe
from services.dispatch.http_api import tracking_config, tracking_secret
from services.dispatch.settings import Settings

BASE_ENV = {
    "DATABASE_URL": "postgresql://localhost/nudge",
    "NATS_URL": "nats://localhost:4222",
    "NUDGE_WEBHOOK_SECRET": "whsec_" + "x" * 32,
}


def test_tracking_is_off_by_default_but_its_endpoints_still_verify() -> None:
    settings = Settings.from_env(BASE_ENV)

    assert tracking_config(settings) is None
    secret = tracking_secret(settings)
    assert secret == tracking.derive_secret(BASE_ENV["NUDGE_WEBHOOK_SECRET"])
    assert secret != unsubscribe.derive_secret(BASE_ENV["NUDGE_WEBHOOK_SECRET"])


def test_a_tracking_url_turns_it_on() -> None:
    env = {
        **BASE_ENV,
        "NUDGE_TRACKING_URL": "https://t.example/",
        "NUDGE_TRACKING_SECRET": "s" * 16,
    }
    config = tracking_config(Settings.from_env(env))

    assert config is not None
    assert (config.base_url, config.secret) == ("https://t.example/", b"s" * 16)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("NUDGE_TRACKING_URL", "ftp://t.example"),
        ("NUDGE_TRACKING_URL", "https://t.example/?q=1"),
        ("NUDGE_TRACKING_URL", "t.example"),
        ("NUDGE_TRACKING_SECRET", "short"),
    ],
)
def test_unusable_tracking_settings_fail_at_startup(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as error:
        Settings.from_env({**BASE_ENV, variable: value})

    assert error.value.variable == variable
