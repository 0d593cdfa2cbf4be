"""Property-based tests (Hypothesis) of the two parsers that read untrusted bytes:
client frames (`protocol.parse_client_frame`) and the upstream SSE stream
(`agent_client.AgentClient`, fed through an `httpx.MockTransport`: no sockets).

Rules: parsing never raises anything but `InvalidMessage`, and what it returns is a
valid frame; an upstream body, whatever its bytes and however they are chunked,
yields events ending in exactly one terminal event, or raises an `UpstreamError`
subclass. Example counts are modest to keep the suite fast.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from agent_client import (
    AgentClient,
    AgentEvent,
    Completed,
    Failed,
    Incomplete,
    ResponseRequest,
    UpstreamError,
)
from chat.demo_model import encode_sse

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FRAME_TYPES = (protocol.UserMessage, protocol.StopRequest, protocol.ClientPing)
FRAME_TYPES += (protocol.ClientPong, protocol.ToolResponse, protocol.HistoryRequest)
TYPE_NAMES = ["message", "stop", "ping", "pong", "tool_response", "history", "Message", ""]
FIELD_NAMES = ["type", "content", "id", "metadata", "call_id", "limit", "extra"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Objects shaped like frames, so validation gets past the type tag most of the time.
frame_like = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from(TYPE_NAMES) | json_values,
    st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=4),
)


def _check_parse(raw: str | bytes) -> None:
    try:
        frame = protocol.parse_client_frame(raw)
    except protocol.InvalidMessage as error:
        assert error.code == "invalid_message" and error.detail
        return
    assert isinstance(frame, FRAME_TYPES)
    if isinstance(frame, protocol.UserMessage):
        assert isinstance(frame.content, str) and frame.content
    if isinstance(frame, protocol.HistoryRequest):
        assert 1 <= frame.limit <= protocol.MAX_HISTORY_LIMIT


@FUZZ
@given(st.text())
def test_parse_client_frame_on_any_text_returns_a_frame_or_raises_invalid_message(
    text: str,
) -> None:
    _check_parse(text)


@FUZZ
@given(st.binary())
def test_parse_client_frame_on_any_bytes_raises_invalid_message(data: bytes) -> None:
    _check_parse(data)
    try:
        protocol.parse_client_frame(data)
    except protocol.InvalidMessage:
        return
    raise AssertionError("a binary frame was accepted")


@FUZZ
@given(json_values | frame_like)
def test_parse_client_frame_on_any_json_value_returns_a_frame_or_raises_invalid_message(
    value: Any,
) -> None:
    _check_parse(json.dumps(value))


@FUZZ
@given(frame_like, st.binary(max_size=8))
def test_parse_client_frame_on_corrupted_json_returns_a_frame_or_raises_invalid_message(
    value: dict[str, Any], noise: bytes
) -> None:
    text = json.dumps(value)
    cut = len(text) // 2
    _check_parse(text[:cut] + noise.decode("latin-1") + text[cut:])


# --------------------------------------------------------------------------- SSE


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


def _split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(body) + 1) for cut in cuts} | {0, len(body)})
    return [body[a:b] for a, b in zip(points, points[1:], strict=False)]


async def _consume(chunks: list[bytes]) -> tuple[list[AgentEvent], UpstreamError | None]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=_Chunks(chunks)
        )

    client = AgentClient(
        base_url="http://upstream.invalid/v1",
        api_key="sk-fuzz-key",
        model="m",
        transport=httpx.MockTransport(handler),
        max_attempts=1,
    )
    events: list[AgentEvent] = []
    request = ResponseRequest(input=[{"role": "user", "content": "hi"}], instructions="")
    try:
        with trio.fail_after(10):
            async with client.stream(request) as stream:
                async for event in stream:
                    events.append(event)
    except UpstreamError as error:
        return events, error
    finally:
        await client.aclose()
    return events, None


def _check_stream(chunks: list[bytes]) -> None:
    events, error = trio.run(_consume, chunks)
    terminal = [e for e in events if isinstance(e, Completed | Incomplete | Failed)]
    if error is None:
        assert terminal and events[-1] is terminal[0] and len(terminal) == 1
    else:
        assert not terminal
        assert "sk-fuzz-key" not in str(error)


EVENT_TYPES = [
    "response.created",
    "response.output_text.delta",
    "response.refusal.delta",
    "response.output_item.done",
    "response.completed",
    "response.incomplete",
    "response.failed",
    "error",
    "response.in_progress",
]
sse_event = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from(EVENT_TYPES),
    st.dictionaries(
        st.sampled_from(["delta", "response", "item", "error", "id", "code"]),
        json_values
        | st.fixed_dictionaries({"id": st.text(max_size=5), "type": st.text(max_size=14)}),
        max_size=3,
    ),
)
sse_piece = (
    sse_event.map(encode_sse)
    | st.binary(max_size=40)
    | st.sampled_from(
        [b"\n", b"\r\n", b"\r", b": keep-alive\n\n", b"data:", b"event: x\n", b"\xff"]
    )
)


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0), max_size=6))
def test_any_upstream_body_ends_with_one_terminal_event_or_an_upstream_error(
    body: bytes, cuts: list[int]
) -> None:
    _check_stream(_split(body, cuts))


@FUZZ
@given(st.lists(sse_piece, max_size=12), st.lists(st.integers(min_value=0), max_size=6))
def test_any_sse_event_sequence_ends_with_one_terminal_event_or_an_upstream_error(
    pieces: list[bytes], cuts: list[int]
) -> None:
    _check_stream(_split(b"".join(pieces), cuts))
