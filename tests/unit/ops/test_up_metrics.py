"""`nudge up` passes each service its metrics address, replacing a busy default port."""

from __future__ import annotations

import argparse

import pytest

from nudge.cli import up
from nudge.cli.common import CliError


def _stack(environ: dict[str, str]) -> up.Stack:
    args = argparse.Namespace(state_dir=None, smtp_url=None, skip=[])
    return up.Stack(up.UpSettings.from_args(args, environ), up.StopSignal())


def test_services_get_the_default_metrics_addresses_when_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(up, "port_is_free", lambda port, host="127.0.0.1": True)
    stack = _stack({})
    assert stack._metrics_env() == {
        "NUDGE_INGEST_METRICS_ADDR": "127.0.0.1:9101",
        "NUDGE_RULES_METRICS_ADDR": "127.0.0.1:9102",
        "NUDGE_SCHEDULER_METRICS_ADDR": "127.0.0.1:9103",
        "NUDGE_DISPATCH_METRICS_ADDR": "127.0.0.1:9104",
    }
    assert stack.metrics["dispatch"] == "127.0.0.1:9104"


def test_a_busy_default_port_is_replaced_but_a_configured_one_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(up, "port_is_free", lambda port, host="127.0.0.1": port != 9101)
    monkeypatch.setattr(up, "free_port", lambda host="127.0.0.1": 45678)
    monkeypatch.setattr(up, "say", lambda message: None)
    environ = {"NUDGE_RULES_METRICS_ADDR": "0.0.0.0:9101", "NUDGE_SCHEDULER_METRICS_ADDR": "off"}
    env = _stack(environ)._metrics_env()
    assert env["NUDGE_INGEST_METRICS_ADDR"] == "127.0.0.1:45678"
    assert env["NUDGE_RULES_METRICS_ADDR"] == "0.0.0.0:9101"  # explicit: left to fail fast
    assert env["NUDGE_SCHEDULER_METRICS_ADDR"] == "off"
    assert env["NUDGE_DISPATCH_METRICS_ADDR"] == "127.0.0.1:9104"


def test_a_malformed_metrics_address_is_a_usage_error() -> None:
    args = argparse.Namespace(state_dir=None, smtp_url=None, skip=[])
    with pytest.raises(CliError, match="NUDGE_DISPATCH_METRICS_ADDR"):
        up.UpSettings.from_args(args, {"NUDGE_DISPATCH_METRICS_ADDR": "nowhere"})


def test_otel_variables_pass_through_but_not_one_service_name_for_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(up, "port_is_free", lambda port, host="127.0.0.1": True)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "everything")
    env = _stack({})._service_env("whsec_x")
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4317"
    assert "OTEL_SERVICE_NAME" not in env
    assert env["NUDGE_DISPATCH_METRICS_ADDR"] == "127.0.0.1:9104"
