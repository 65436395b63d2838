"""A channel event's log line stays bounded when a peer chose a long value; the event does not."""
from __future__ import annotations

import logging
import queue
from typing import Any

import pytest

import paychan
from paychan.protocol.identity import decode_channel_id


def test_a_long_peer_error_is_cut_in_the_log_but_whole_in_the_event(
        pair: tuple[paychan.Node, paychan.Node], channel: str,
        caplog: pytest.LogCaptureFixture) -> None:
    a, _ = pair
    heard: queue.Queue[dict[str, Any]] = queue.Queue()
    a.on("peer_error", heard.put)
    text = "peer says " + "x" * 60_000
    caplog.set_level(logging.INFO, logger="paychan.node")
    # What a peer's ErrorMsg turns into: the error object it sent, text and all.
    a._core.emit_event("peer_error", decode_channel_id(channel),
                       {"error": {"code": 3, "message": text}, "small": "kept"})
    lines = [r.getMessage() for r in caplog.records if "peer_error" in r.getMessage()]
    assert len(lines) == 1
    assert len(lines[0]) < 400 and "peer says xxx" in lines[0] and "chars)" in lines[0]
    assert "'small': 'kept'" in lines[0]
    event = heard.get(timeout=10)
    assert event["error"]["message"] == text
