"""`make demo` end to end: `python -m scripts.demo` starts its own `nudge up` on free ports,
drives events through the public gRPC API and must exit 0 showing what was delivered."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180.0  # the demo itself takes ~50 s; its own delivery timeout is 30 s per wait


def _env() -> dict[str, str]:
    """This environment without Nudge settings, with the repository on PYTHONPATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("NUDGE_") and k not in {"DATABASE_URL", "NATS_URL"}
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "libs"), str(REPO)])
    return env


def test_demo_delivers_the_example_campaigns_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.demo"],
        cwd=REPO,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    for subject in (
        "subject: Your order A-1001 is on its way",
        "subject: Your order B-2002 is on its way",
        "subject: Your order C-3004 is on its way",
    ):
        assert subject in result.stdout, report
    assert "Hi there, it arrives Friday." in result.stdout, report
    assert "POST /crm/grace" in result.stdout, report
    assert "POST /crm/linus" in result.stdout, report
    assert "C-3003" not in result.stdout.split("5. Wait")[1], report  # filtered out: no email
    assert "cancelled by purchase 'buy-grace-77'" in result.stdout, report  # the campaign engine
    assert "sent to linus@example.com  'We miss you, friend'" in result.stdout, report
    assert "\n     match: " in result.stdout, report  # nudge replay
    results = result.stdout.split("The experiment's results (nudge stats)")[1]  # issue 6
    assert "wait-1h converts better than control" in results, report
    assert "wait-24h: not enough data yet" in results, report
    assert "would-be sends" in result.stdout, report  # nudge backtest
    assert "nudge up exited 0" in result.stdout, report
    assert result.stderr == "", report
