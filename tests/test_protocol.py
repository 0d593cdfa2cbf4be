"""The wire protocol with no sockets: parsing, encoding and the error tree's codes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol as wire


def test_every_client_frame_type_parses() -> None:
    assert wire.parse_client_frame('{"type":"message","content":"hi","id":"m1"}') == (
        wire.UserMessage(type="message", content="hi", id="m1")
    )
    assert isinstance(wire.parse_client_frame('{"type":"stop"}'), wire.StopRequest)
    assert isinstance(wire.parse_client_frame('{"type":"ping"}'), wire.ClientPing)
    assert isinstance(wire.parse_client_frame('{"type":"pong"}'), wire.ClientPong)
    assert wire.parse_client_frame('{"type":"history"}') == wire.HistoryRequest(type="history")
    assert wire.parse_client_frame('{"type":"history","limit":500}').limit == 500
    tool = wire.parse_client_frame('{"type":"tool_response","call_id":"c","content":"x"}')
    assert tool == wire.ToolResponse(type="tool_response", call_id="c", content="x")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ('{"content": "x"}', "no 'type' field"),
        ('{"type": "dance"}', "Unknown frame type"),
        ('{"type": "message", "content": 5}', "'content'"),
        ('{"type": "history", "limit": 0}', "'limit'"),
        ('{"type": "history", "limit": "5"}', "'limit'"),
        ('{"type": "message", "content": "x", "id": "' + "i" * 65 + '"}', "'id'"),
    ],
)
def test_invalid_frames_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(wire.InvalidMessage) as refused:
        wire.parse_client_frame(text)
    assert reason in str(refused.value)
    assert refused.value.to_frame().code == "invalid_message"


def test_binary_frames_are_invalid() -> None:
    with pytest.raises(wire.InvalidMessage, match="Binary"):
        wire.parse_client_frame(b'{"type":"ping"}')


def test_every_error_knows_its_contract_code() -> None:
    codes = {cls: cls.code for cls in wire.FrameError.__subclasses__()}
    assert set(codes.values()) >= {
        "invalid_message", "message_too_large", "rate_limited", "queue_full",
        "duplicate_message", "unknown_call_id", "upstream_error",
    }
    closes = {cls.__name__: cls.close_code for cls in wire.CloseError.__subclasses__()}
    assert closes["Unauthorized"] == 4001 and closes["TakenOver"] == 4009
    assert closes["FrameTooLarge"] == 1009 and closes["InvalidSessionId"] == 4400
    upstream = wire.UpstreamFailed(turn_id="t1").to_frame()
    assert upstream.message == "I encountered an issue. Please try again."


@given(turn_id=st.text(max_size=40), content=st.text(max_size=200))
def test_fast_delta_encoding_is_the_frame_encoding(turn_id: str, content: str) -> None:
    fast = wire.encode_text_delta(turn_id, content)
    model = wire.encode(wire.TextDeltaFrame(turn_id=turn_id, content=content))
    assert json.loads(fast) == json.loads(model)


def test_history_entries_carry_tool_fields_only_for_tools() -> None:
    reply = wire.HistoryReply(messages=[
        wire.HistoryEntry(id=1, role="user", content="hi", status=None, timestamp="t"),
        wire.HistoryEntry(id=2, role="tool", content="out", status="completed", timestamp="t",
                          name="n", call_id="c", arguments={"a": 1}, output="out"),
    ])
    user, tool = json.loads(wire.encode(reply))["messages"]
    assert user == {"id": 1, "role": "user", "content": "hi", "status": None, "timestamp": "t"}
    assert tool["name"] == "n" and tool["arguments"] == {"a": 1} and tool["output"] == "out"


@pytest.mark.parametrize("session_id", ["a", "A-z_0.9", "x" * 128])
def test_valid_session_ids(session_id: str) -> None:
    assert wire.is_valid_session_id(session_id)


@pytest.mark.parametrize("session_id", ["", "x" * 129, "a b", "a/b", "é", "a;b", "x'--"])
def test_invalid_session_ids(session_id: str) -> None:
    assert not wire.is_valid_session_id(session_id)
