"""`nudge up` pieces that need no processes: settings, restart backoff, secrets, env."""

from __future__ import annotations

import argparse
import base64
import socket
import stat
from pathlib import Path

import pytest

from nudge.cli import up
from nudge.cli.common import CliError, parse_env_file


def _args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {"state_dir": None, "smtp_url": None, "skip": []}
    values.update(overrides)
    return argparse.Namespace(**values)


def test_settings_defaults() -> None:
    settings = up.UpSettings.from_args(_args(), {})
    assert settings.state_dir == Path(".nudge").absolute()
    assert settings.database_url is None
    assert settings.nats_url is None
    assert settings.nats_port == 4222
    assert settings.smtp_url == "smtp://127.0.0.1:2525"
    assert settings.webhook_secret is None
    assert dict(settings.addresses) == {
        "ingest": "127.0.0.1:50051",
        "rules": "127.0.0.1:50052",
        "scheduler": "127.0.0.1:50053",
        "dispatch": "127.0.0.1:50054",
    }
    assert settings.services == ("ingest", "rules", "scheduler", "dispatch")
    assert not settings.production


def test_settings_from_environment_and_flags(tmp_path: Path) -> None:
    environ = {
        "NUDGE_STATE_DIR": str(tmp_path / "from-env"),
        "DATABASE_URL": "postgresql://db/x",
        "NATS_URL": "nats://n:4222",
        "NUDGE_NATS_PORT": "14222",
        "NUDGE_SMTP_URL": "smtp://env:25",
        "NUDGE_WEBHOOK_SECRET": "whsec_abc",
        "NUDGE_RULES_ADDR": ":6002",
        "NUDGE_ENV": "production",
    }
    settings = up.UpSettings.from_args(
        _args(smtp_url="smtp://flag:25", skip=["rules,scheduler"]), environ
    )
    assert settings.state_dir == tmp_path / "from-env"
    assert (settings.database_url, settings.nats_url) == ("postgresql://db/x", "nats://n:4222")
    assert settings.nats_port == 14222
    assert settings.smtp_url == "smtp://flag:25"
    assert settings.webhook_secret == "whsec_abc"
    assert settings.addresses["rules"] == "127.0.0.1:6002"
    assert settings.services == ("ingest", "dispatch")
    assert settings.production
    flag = up.UpSettings.from_args(_args(state_dir=str(tmp_path / "flag")), environ)
    assert flag.state_dir == tmp_path / "flag"


@pytest.mark.parametrize(
    ("environ", "args", "message"),
    [
        ({"NUDGE_NATS_PORT": "x"}, {}, "NUDGE_NATS_PORT"),
        ({"NUDGE_NATS_PORT": "70000"}, {}, "NUDGE_NATS_PORT"),
        ({"NUDGE_INGEST_ADDR": "nope"}, {}, "NUDGE_INGEST_ADDR"),
        ({}, {"skip": ["billing"]}, "unknown service"),
    ],
)
def test_settings_errors(environ: dict[str, str], args: dict[str, object], message: str) -> None:
    with pytest.raises(CliError, match=message) as info:
        up.UpSettings.from_args(_args(**args), environ)
    assert info.value.code == 2


def test_restart_backoff_doubles_caps_and_resets() -> None:
    service = up.Service("rules", "127.0.0.1:1")
    delays = []
    now = 100.0
    for _ in range(7):
        service.started_at = now
        now += 1.0  # died one second after starting
        delays.append(up.plan_restart(service, now))
        assert service.restart_at == now + delays[-1]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    service.started_at = now
    now += up.STABLE_AFTER_S
    assert up.plan_restart(service, now) == up.BACKOFF_INITIAL_S


def test_webhook_secret_format() -> None:
    secret = up.new_webhook_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 24
    assert up.new_webhook_secret() != secret


def test_webhook_secret_is_created_once(tmp_path: Path) -> None:
    path = tmp_path / "webhook-secret"
    first = up.load_or_create_webhook_secret(path)
    assert up.load_or_create_webhook_secret(path) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_port_is_free() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert not up.port_is_free(sock.getsockname()[1])


def _stack(tmp_path: Path, environ: dict[str, str]) -> up.Stack:
    settings = up.UpSettings.from_args(_args(state_dir=str(tmp_path)), environ)
    stack = up.Stack(settings, up.StopSignal())
    stack.database_url = "postgresql://db/nudge"
    stack.nats_url = "nats://127.0.0.1:4222"
    stack.api_key = "nk_abcdefghijkl_secret"
    return stack


def test_service_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("NUDGE_STATE_DIR", "/elsewhere")
    monkeypatch.delenv("NUDGE_LOG_FORMAT", raising=False)
    monkeypatch.delenv("NUDGE_WEBHOOK_ALLOW_HOSTS", raising=False)
    env = _stack(tmp_path, {"NUDGE_DISPATCH_ADDR": ":7004"})._service_env("whsec_x")
    assert env["DATABASE_URL"] == "postgresql://db/nudge"
    assert env["NATS_URL"] == "nats://127.0.0.1:4222"
    assert env["NUDGE_WEBHOOK_SECRET"] == "whsec_x"
    assert env["NUDGE_SMTP_URL"] == "smtp://127.0.0.1:2525"
    assert env["NUDGE_DISPATCH_ADDR"] == "127.0.0.1:7004"
    assert env["NUDGE_INGEST_ADDR"] == "127.0.0.1:50051"
    assert env["NUDGE_WEBHOOK_ALLOW_HOSTS"] == "127.0.0.1,localhost"
    assert env["NUDGE_LOG_FORMAT"] == "text"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4317"
    assert "NUDGE_STATE_DIR" not in env


def test_service_env_keeps_explicit_log_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NUDGE_LOG_FORMAT", "json")
    assert _stack(tmp_path, {})._service_env("whsec_x")["NUDGE_LOG_FORMAT"] == "json"


def test_env_file_and_ready_line(tmp_path: Path) -> None:
    stack = _stack(tmp_path, {"NUDGE_RULES_ADDR": "127.0.0.1:6002"})
    path = stack.write_env_file()
    assert path == tmp_path / "env"
    assert parse_env_file(path.read_text()) == {
        "DATABASE_URL": "postgresql://db/nudge",
        "NATS_URL": "nats://127.0.0.1:4222",
        "NUDGE_API_KEY": "nk_abcdefghijkl_secret",
        "NUDGE_INGEST_ADDR": "127.0.0.1:50051",
        "NUDGE_RULES_ADDR": "127.0.0.1:6002",
        "NUDGE_SCHEDULER_ADDR": "127.0.0.1:50053",
        "NUDGE_DISPATCH_ADDR": "127.0.0.1:50054",
    }
    assert stack.ready_line() == (
        "nudge ready: ingest=127.0.0.1:50051 rules=127.0.0.1:6002 "
        "scheduler=127.0.0.1:50053 dispatch=127.0.0.1:50054"
    )
