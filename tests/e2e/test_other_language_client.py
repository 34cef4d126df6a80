"""A client in another language (Go: `buf curl`, loading the schema from protos/) tracks an event
with an API key, and the campaign's email arrives."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.test_walking_skeleton import _apply, _identify

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
BUF = shutil.which("buf", path=str(Path(sys.executable).parent))


def _buf_curl(stack: Stack, method: str, body: Mapping[str, object], key: str) -> dict[str, object]:
    assert BUF is not None, "buf-bin is a dev dependency; run make install"
    completed = subprocess.run(
        [
            BUF,
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "--schema",
            str(ROOT / "protos"),
            "-H",
            f"authorization: Bearer {key}",
            "-d",
            json.dumps(body),
            f"http://{stack.address('ingest')}/nudge.ingest.v1.IngestService/{method}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if completed.returncode != 0:
        return {"error": json.loads(completed.stdout or completed.stderr or "{}")}
    return dict(json.loads(completed.stdout))


async def test_go_client_tracks_an_event_and_the_email_arrives(stack: Stack) -> None:
    await _apply(stack, "order-shipped.yaml")
    await _identify(stack, "go-user", {"email": "gopher@example.test", "first_name": "Gopher"})
    event = {
        "eventId": "go-1",
        "userId": "go-user",
        "name": "order_shipped",
        "properties": {"order_id": "G-1", "total": 99, "eta": "tomorrow"},
    }
    response = await asyncio.to_thread(
        _buf_curl, stack, "Track", {"events": [event]}, stack.api_key
    )
    assert response == {"results": [{"eventId": "go-1", "status": "EVENT_STATUS_ACCEPTED"}]}

    [mail] = await asyncio.to_thread(stack.smtp.wait_for, 1, 20)
    assert mail.subject == "Your order G-1 is on its way"
    assert mail.text == "Hi Gopher, it arrives tomorrow."


async def test_go_client_with_a_wrong_key_is_unauthenticated(stack: Stack) -> None:
    body = {"events": [{"eventId": "x", "userId": "u", "name": "n"}]}
    response = await asyncio.to_thread(_buf_curl, stack, "Track", body, "nk_wrong")
    assert response["error"]["code"] == "unauthenticated"  # type: ignore[index]
