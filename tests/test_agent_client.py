"""AgentClient and decode_event against recordings, scripted failures and cancellation.

Rules for these tests: loopback only (the fake upstream on 127.0.0.1:0), every
test doing I/O is bounded by ``trio.fail_after``, waits are on events (requests
arriving, exchanges ending), never on sleeps. Expected outcomes for recordings
are computed from the recording files themselves (read from
``../shared/upstream-recordings/`` at test time), by a parser independent of
``decode_event``. Every test that goes over a socket runs twice, with lean reads
(``chat.upstream_transport``) and with plain httpx (``lean_reads=False``).
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import socket
import ssl
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import agent_client
from agent_client import (
    MAX_INFLATED_BODY_BYTES,
    AgentClient,
    AgentEvent,
    Completed,
    Failed,
    Incomplete,
    PreviousResponseIgnored,
    PreviousResponseNotFound,
    ResponseRequest,
    ResponseStarted,
    TextDelta,
    ToolCall,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    assistant_item,
    decode_event,
    function_call_item,
    function_output_item,
    input_items,
    parse_arguments,
)
from bench.self_signed import self_signed_cert
from chat.content_coding import ContentCodingError, ContentDecoder
from chat.demo_model import DemoModelTransport, encode_sse, text_response_events
from chat.sse import SSEEventTooLarge, SSEParser
from fake_upstream import (
    RECORDINGS_DIR,
    DropReply,
    FailedReply,
    FakeUpstream,
    GarbageReply,
    IncompleteReply,
    ProxyQuirks,
    RawReply,
    RecordingReply,
    StallReply,
    StatusReply,
    TextReply,
    ToolCallReply,
    _Exchange,
    long_response_id,
)
from store import StoredMessage

API_KEY = "sk-test-DoNotLeakThisKey0123456789"
IO_LIMIT_S = 10
REQUEST = ResponseRequest(
    input=[{"role": "user", "content": "hello there"}], instructions="Be brief."
)
RECORDINGS = sorted(RECORDINGS_DIR.glob("*.sse"))


@pytest.fixture(params=[True, False], ids=["lean", "plain"])
def lean_reads(request: pytest.FixtureRequest) -> bool:
    """Both read paths: chat.upstream_transport's, and plain httpx's."""
    lean: bool = request.param
    return lean


@pytest.fixture
async def client(fake: FakeUpstream, lean_reads: bool) -> AsyncIterator[AgentClient]:
    agent = AgentClient(
        base_url=fake.base_url,
        api_key=API_KEY,
        model="test-model",
        backoff_base_s=0.01,
        lean_reads=lean_reads,
    )
    assert agent.lean_reads_active is lean_reads  # the self-check passes here
    yield agent
    await agent.aclose()


async def collect(agent: AgentClient, request: ResponseRequest = REQUEST) -> list[AgentEvent]:
    with trio.fail_after(IO_LIMIT_S):
        async with agent.stream(request) as events:
            return [event async for event in events]


def text_of(events: list[AgentEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, TextDelta))


# --- decode_event: pure ----------------------------------------------------------


def test_decode_text_delta_ignores_extra_and_missing_optional_fields() -> None:
    assert decode_event('{"type":"response.output_text.delta","delta":"Hi","x":1}') == TextDelta(
        "Hi"
    )


def test_decode_refusal_delta_is_text() -> None:
    assert decode_event('{"type":"response.refusal.delta","delta":"No."}') == TextDelta("No.")


def test_decode_created_gives_response_id() -> None:
    data = '{"type":"response.created","response":{"id":"resp_1","status":"in_progress"}}'
    assert decode_event(data) == ResponseStarted("resp_1")


def test_decode_function_call_item_done() -> None:
    data = json.dumps(
        {
            "type": "response.output_item.done",
            "item": {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        }
    )
    assert decode_event(data) == ToolCall("c1", "f", "{}")


def test_decode_message_item_done_is_ignored() -> None:
    data = '{"type":"response.output_item.done","item":{"type":"message","content":[]}}'
    assert decode_event(data) is None


@pytest.mark.parametrize(
    "event_type",
    [
        "response.in_progress",
        "response.queued",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
        "response.something_new_next_year",
    ],
)
def test_decode_ignores_events_we_do_not_use(event_type: str) -> None:
    assert decode_event(json.dumps({"type": event_type, "delta": "x"})) is None


def test_decode_completed_and_incomplete() -> None:
    assert decode_event('{"type":"response.completed","response":{"id":"r"}}') == Completed("r")
    incomplete = (
        '{"type":"response.incomplete","response":{"id":"r",'
        '"incomplete_details":{"reason":"max_output_tokens"}}}'
    )
    assert decode_event(incomplete) == Incomplete("r", "max_output_tokens")


def test_decode_nested_error_event() -> None:
    data = '{"type":"error","error":{"type":"x","code":"insufficient_quota","message":"pay"}}'
    assert decode_event(data) == Failed(None, "insufficient_quota", "pay")


def test_decode_flat_legacy_error_event() -> None:
    data = '{"type":"error","code":"server_error","message":"oops","param":null}'
    assert decode_event(data) == Failed(None, "server_error", "oops")


def test_decode_response_failed() -> None:
    data = '{"type":"response.failed","response":{"id":"r","error":{"code":"c","message":"m"}}}'
    assert decode_event(data) == Failed("r", "c", "m")


@pytest.mark.parametrize("data", ["not json", "[1, 2]", '"text"', "{"])
def test_decode_rejects_non_object(data: str) -> None:
    with pytest.raises(UpstreamProtocolError):
        decode_event(data)


def test_decode_rejects_delta_without_text() -> None:
    with pytest.raises(UpstreamProtocolError):
        decode_event('{"type":"response.output_text.delta"}')


def test_synthetic_text_events_decode_to_the_text() -> None:
    events = text_response_events("resp_x", "m", ["a", "b"])
    decoded = [decode_event(json.dumps(event)) for event in events]
    assert [d for d in decoded if d is not None] == [
        ResponseStarted("resp_x"),
        TextDelta("a"),
        TextDelta("b"),
        Completed("resp_x"),
    ]
    assert encode_sse(events[0]).startswith(b"event: response.created\ndata: {")


STREAM = (
    b"\xef\xbb\xbf: a comment, then a field we skip\r\nevent: x\r\nid: 1\r\n\r\n"
    b"data: one\n\n"
    b"data:two\ndata:  lines\r\rdata\n\n"  # no space after the colon; CR ends; bare field
    b"event: only\n\n\n\n"  # no data: no event; extra blank lines
    b"data: \xc3\xa9t\xc3\xa9\r\n\r\n"
    b"data: unfinished"
)
STREAM_EVENTS = ["one", "two\n lines", "\u00e9t\u00e9"]


def test_sse_parser_reads_the_standard_format() -> None:
    assert SSEParser(1024).feed(STREAM) == STREAM_EVENTS


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_sse_parser_gives_the_same_events_however_the_bytes_are_cut(cuts: list[int]) -> None:
    parser = SSEParser(1024)
    points = [0, *sorted(cuts), len(STREAM)]
    events = [e for a, b in zip(points, points[1:], strict=False) for e in parser.feed(STREAM[a:b])]
    assert events == STREAM_EVENTS


def test_sse_parser_returns_the_events_of_each_chunk_together() -> None:
    parser = SSEParser(1024)
    assert parser.feed(b"data: a\n\ndata: b\n\ndata: c") == ["a", "b"]
    assert parser.feed(b"\n\n") == ["c"]


def test_sse_parser_bounds_one_event_not_the_stream() -> None:
    parser = SSEParser(10)
    for _ in range(100):
        assert parser.feed(b"data: 1\n\n") == ["1"]  # many small events: fine
    parser.feed(b"data: 12")
    with pytest.raises(SSEEventTooLarge):
        parser.feed(b"345")


async def test_deltas_that_arrive_together_are_one_delta_with_the_same_text(
    fake: FakeUpstream, client: AgentClient
) -> None:
    # The fake writes each event apart; ten deltas then arrive in one read.
    fake.enqueue(_OneWriteReply([f"d{n} " for n in range(10)]))
    events = await collect(client)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert "".join(d.text for d in deltas) == "".join(f"d{n} " for n in range(10))
    assert len(deltas) == 1
    assert isinstance(events[-1], Completed)


class _OneWriteReply:
    """A text answer whose events all go out in a single write."""

    def __init__(self, chunks: list[str]) -> None:
        self.chunks = chunks

    async def play(self, out: _Exchange) -> None:
        events = text_response_events("resp_one_write", "m", self.chunks)
        await out.start(200, {"content-type": "text/event-stream"})
        await out.send(b"".join(encode_sse(event) for event in events))
        await out.end()


# --- recordings, through a real socket ------------------------------------------


def recording_oracle(path: Path) -> dict[str, Any]:
    """What a correct client must report for a recording, read straight from the file."""
    payloads = [
        json.loads(line[len("data:") :])
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.startswith("data:")
    ]
    terminal = next(
        p
        for p in payloads
        if p["type"] in ("response.completed", "response.incomplete", "response.failed", "error")
    )
    ids = [p["response"]["id"] for p in payloads if "response" in p]
    return {
        "text": "".join(
            p["delta"]
            for p in payloads
            if p["type"] in ("response.output_text.delta", "response.refusal.delta")
        ),
        "calls": [
            ToolCall(p["item"]["call_id"], p["item"]["name"], p["item"]["arguments"])
            for p in payloads
            if p["type"] == "response.output_item.done" and p["item"]["type"] == "function_call"
        ],
        "terminal": terminal,
        "response_id": ids[0] if ids else None,
        "has_created": any(p["type"] == "response.created" for p in payloads),
    }


def test_recordings_are_present() -> None:
    assert len(RECORDINGS) >= 11, f"recordings missing from {RECORDINGS_DIR}"


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.stem)
async def test_recording_streams_to_the_right_outcome(
    fake: FakeUpstream, client: AgentClient, path: Path
) -> None:
    expected = recording_oracle(path)
    fake.enqueue(RecordingReply(path))

    events = await collect(client)

    assert text_of(events) == expected["text"]
    assert [e for e in events if isinstance(e, ToolCall)] == expected["calls"]
    assert isinstance(events[-1], Completed | Incomplete | Failed)
    assert sum(isinstance(e, Completed | Incomplete | Failed) for e in events) == 1
    assert events[-1].response_id == expected["response_id"]
    terminal = expected["terminal"]
    match terminal["type"]:
        case "response.completed":
            assert isinstance(events[-1], Completed)
        case "response.incomplete":
            assert events[-1] == Incomplete(
                expected["response_id"], terminal["response"]["incomplete_details"]["reason"]
            )
        case _:
            assert isinstance(events[-1], Failed)
    started = [e for e in events if isinstance(e, ResponseStarted)]
    if expected["has_created"]:
        assert started == [ResponseStarted(expected["response_id"])]
        assert events[0] == started[0]
    # Recorded unchained ("previous_response_id":null): nothing to check, chaining stays.
    assert client.chaining_active


def recording(prefix: str) -> Path:
    (path,) = [p for p in RECORDINGS if p.name.startswith(prefix + "_")]
    return path


@pytest.mark.parametrize("prefix", ["01", "02"])
async def test_text_recordings_complete_with_text(
    fake: FakeUpstream, client: AgentClient, prefix: str
) -> None:
    fake.enqueue(RecordingReply(recording(prefix)))
    events = await collect(client)
    assert text_of(events) and not any(isinstance(e, ToolCall) for e in events)
    assert isinstance(events[-1], Completed)


async def test_recording_03_is_one_tool_call(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(RecordingReply(recording("03")))
    events = await collect(client)
    assert [type(e) for e in events] == [ResponseStarted, ToolCall, Completed]


async def test_recording_04_is_text_then_tool_call(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(RecordingReply(recording("04")))
    events = await collect(client)
    kinds = [type(e) for e in events]
    assert kinds.index(TextDelta) < kinds.index(ToolCall) and kinds.count(ToolCall) == 1


async def test_recording_05_is_two_tool_calls(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(RecordingReply(recording("05")))
    events = await collect(client)
    assert [e.call_id for e in events if isinstance(e, ToolCall)] == [
        "call_0xi8hXSApey3her10vjUIx0j",
        "call_8fhPkmx5g5wyqqsTFMvzVtJw",
    ]


async def test_recording_06_fails_with_insufficient_quota_once(
    fake: FakeUpstream, client: AgentClient
) -> None:
    fake.enqueue(RecordingReply(recording("06")))
    events = await collect(client)
    assert isinstance(events[-1], Failed) and events[-1].code == "insufficient_quota"
    assert "quota" in events[-1].message


async def test_recording_07_is_incomplete_with_partial_text(
    fake: FakeUpstream, client: AgentClient
) -> None:
    fake.enqueue(RecordingReply(recording("07")))
    events = await collect(client)
    assert text_of(events).startswith("A cute tabby cat")
    assert isinstance(events[-1], Incomplete) and events[-1].reason == "max_output_tokens"


async def test_recording_09_reasoning_summary_is_not_text(
    fake: FakeUpstream, client: AgentClient
) -> None:
    fake.enqueue(RecordingReply(recording("09")))
    events = await collect(client)
    assert "Calcul" not in text_of(events)
    assert sum(isinstance(e, TextDelta) for e in events) == 1


@pytest.mark.parametrize("prefix", ["08", "08a"])
async def test_background_recordings_complete(
    fake: FakeUpstream, client: AgentClient, prefix: str
) -> None:
    fake.enqueue(RecordingReply(recording(prefix)))
    events = await collect(client)
    assert text_of(events) == "2 + 2 equals 4." and isinstance(events[-1], Completed)


async def test_recording_10_legacy_without_sequence_numbers(
    fake: FakeUpstream, client: AgentClient
) -> None:
    fake.enqueue(RecordingReply(recording("10")))
    events = await collect(client)
    assert ToolCall("call_kL0PCQV7M2WMoVX8V8OtYSAL", "get_capital", '{"country":"France"}') in (
        events
    )
    assert isinstance(events[-1], Completed)


# --- synthetic replies -------------------------------------------------------------


async def test_default_reply_echoes_last_user_text(client: AgentClient) -> None:
    events = await collect(client)
    assert text_of(events) == "echo: hello there"


async def test_tool_call_reply_after_text(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(ToolCallReply([("c1", "lookup", '{"q":"x"}'), ("c2", "f", "{}")], "Let me see"))
    events = await collect(client)
    assert text_of(events) == "Let me see"
    assert [e for e in events if isinstance(e, ToolCall)] == [
        ToolCall("c1", "lookup", '{"q":"x"}'),
        ToolCall("c2", "f", "{}"),
    ]


async def test_incomplete_reply(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(IncompleteReply(["par", "tial"], reason="content_filter"))
    events = await collect(client)
    assert text_of(events) == "partial"
    assert isinstance(events[-1], Incomplete) and events[-1].reason == "content_filter"


async def test_mid_stream_error_fills_in_response_id(
    fake: FakeUpstream, client: AgentClient
) -> None:
    fake.enqueue(FailedReply(["so far"], code="server_error"))
    events = await collect(client)
    assert text_of(events) == "so far"
    started = events[0]
    assert isinstance(started, ResponseStarted)
    assert events[-1] == Failed(
        started.response_id,
        "server_error",
        "The server had an error while processing your request.",
    )


# --- the request --------------------------------------------------------------------


async def test_request_body_and_headers(fake: FakeUpstream, client: AgentClient) -> None:
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    request = ResponseRequest(
        input=[{"role": "user", "content": "hi"}],
        instructions="Be kind.",
        previous_response_id="resp_prev",
        tools=[tool],
        store=False,
    )
    await collect(client, request)
    (seen,) = fake.requests
    assert seen.body == {
        "model": "test-model",
        "input": [{"role": "user", "content": "hi"}],
        "instructions": "Be kind.",
        "stream": True,
        "store": False,
        "previous_response_id": "resp_prev",
        "tools": [tool],
    }
    assert seen.headers["authorization"] == f"Bearer {API_KEY}"
    assert seen.headers["content-type"] == "application/json"


async def test_optional_fields_are_omitted_and_no_key_means_no_auth(
    fake: FakeUpstream, lean_reads: bool
) -> None:
    agent = AgentClient(base_url=fake.base_url, api_key=None, model="m", lean_reads=lean_reads)
    try:
        await collect(agent)
    finally:
        await agent.aclose()
    (seen,) = fake.requests
    assert "previous_response_id" not in seen.body and "tools" not in seen.body
    assert seen.body["store"] is True
    assert "authorization" not in seen.headers


# --- retries and rejections ------------------------------------------------------------


async def test_429_retry_after_is_honoured(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(StatusReply(429, headers={"retry-after": "0.2"}))
    events = await collect(client)
    assert isinstance(events[-1], Completed)
    first, second = fake.requests
    assert second.received_at - first.received_at >= 0.2


async def test_retry_after_is_capped(fake: FakeUpstream, lean_reads: bool) -> None:
    agent = AgentClient(
        base_url=fake.base_url,
        api_key=None,
        model="m",
        retry_after_cap_s=0.05,
        lean_reads=lean_reads,
    )
    fake.enqueue(StatusReply(503, headers={"retry-after": "3600"}))
    try:
        with trio.fail_after(2):
            await collect(agent)
    finally:
        await agent.aclose()
    assert len(fake.requests) == 2


async def test_two_500s_then_success(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(StatusReply(500), StatusReply(502, "bad gateway"))
    events = await collect(client)
    assert isinstance(events[-1], Completed)
    assert len(fake.requests) == 3


async def test_three_500s_is_unavailable(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(*[StatusReply(500)] * 3, TextReply(["never"]))
    with pytest.raises(UpstreamUnavailable) as caught:
        await collect(client)
    assert caught.value.kind == "server_error" and caught.value.status_code == 500
    assert len(fake.requests) == 3


async def test_persistent_429_is_rate_limited(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(*[StatusReply(429, headers={"retry-after": "0"})] * 3)
    with pytest.raises(UpstreamUnavailable) as caught:
        await collect(client)
    assert caught.value.kind == "rate_limited"


async def test_connection_refused_is_unavailable(lean_reads: bool) -> None:
    with socket.socket() as sock:  # bind then close: a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    agent = AgentClient(
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key=API_KEY,
        model="m",
        backoff_base_s=0.01,
        lean_reads=lean_reads,
    )
    try:
        with pytest.raises(UpstreamUnavailable) as caught:
            await collect(agent)
    finally:
        await agent.aclose()
    assert caught.value.kind == "connect"
    assert API_KEY not in str(caught.value)


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"code": "previous_response_not_found", "message": "gone", "param": None}},
        {"error": {"code": None, "message": "Previous response with id 'resp_x' not found."}},
    ],
)
async def test_previous_response_not_found(
    fake: FakeUpstream, client: AgentClient, body: dict[str, Any]
) -> None:
    fake.enqueue(StatusReply(400, body))
    with pytest.raises(PreviousResponseNotFound) as caught:
        await collect(client)
    assert caught.value.status_code == 400 and caught.value.kind == "rejected"
    assert len(fake.requests) == 1


async def test_other_4xx_is_rejected_with_code(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(StatusReply(400, {"error": {"code": "invalid_value", "message": "bad model"}}))
    with pytest.raises(UpstreamRejected) as caught:
        await collect(client)
    assert type(caught.value) is UpstreamRejected
    assert (caught.value.status_code, caught.value.code) == (400, "invalid_value")
    assert "bad model" in str(caught.value)


async def test_html_200_is_protocol_error(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(GarbageReply(b"<html>proxy login</html>", "text/html"))
    with pytest.raises(UpstreamProtocolError):
        await collect(client)


async def test_non_json_event_is_protocol_error(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(GarbageReply(b"data: <html>\n\n", "text/event-stream"))
    with pytest.raises(UpstreamProtocolError):
        await collect(client)


async def test_stream_without_terminal_event_is_protocol_error(
    fake: FakeUpstream, client: AgentClient
) -> None:
    body = b"".join(encode_sse(e) for e in text_response_events("resp_t", "m", ["a"])[:-1])
    fake.enqueue(GarbageReply(body, "text/event-stream"))
    with pytest.raises(UpstreamProtocolError, match="terminal"):
        await collect(client)


async def test_oversized_event_is_protocol_error(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(GarbageReply(b"data: " + b"x" * (5 * 1024 * 1024), "text/event-stream"))
    with pytest.raises(UpstreamProtocolError, match="exceeds"):
        await collect(client)


async def test_dropped_connection_mid_stream(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(DropReply(["partial"]))
    seen: list[AgentEvent] = []
    with pytest.raises(UpstreamError) as caught, trio.fail_after(IO_LIMIT_S):
        async with client.stream(REQUEST) as events:
            async for event in events:
                seen.append(event)
    assert caught.value.kind == "connect"
    assert text_of(seen) == "partial"
    assert len(fake.requests) == 1  # never retried once events flowed


async def test_a_drop_before_the_first_delta_is_retried(
    fake: FakeUpstream, client: AgentClient
) -> None:
    fake.enqueue(DropReply([]), TextReply(["second ", "try"]))
    events = await collect(client)
    assert text_of(events) == "second try" and isinstance(events[-1], Completed)
    assert len(fake.requests) == 2


async def test_every_kind_of_retry_shares_one_budget_of_three_tries(
    fake: FakeUpstream, client: AgentClient
) -> None:
    fake.enqueue(StatusReply(500), DropReply([]), StatusReply(503), TextReply(["never"]))
    with pytest.raises(UpstreamUnavailable) as caught:
        await collect(client)
    assert caught.value.status_code == 503
    assert len(fake.requests) == 3


async def test_drops_before_the_first_delta_run_out_as_disconnected(
    fake: FakeUpstream, client: AgentClient
) -> None:
    fake.enqueue(*[DropReply([])] * 3, TextReply(["never"]))
    with pytest.raises(UpstreamDisconnected):
        await collect(client)
    assert len(fake.requests) == 3


async def test_stall_mid_stream_is_timeout(fake: FakeUpstream, lean_reads: bool) -> None:
    agent = AgentClient(
        base_url=fake.base_url, api_key=None, model="m", idle_timeout_s=0.3, lean_reads=lean_reads
    )
    fake.enqueue(StallReply(["before"], stall_s=5))
    try:
        with pytest.raises(UpstreamTimeout), trio.fail_after(IO_LIMIT_S):
            async with agent.stream(REQUEST) as events:
                started = trio.current_time()
                async for _ in events:
                    pass
    finally:
        await agent.aclose()
    assert trio.current_time() - started < 2


@pytest.mark.parametrize(
    "reply",
    [
        StatusReply(401, {"error": {"code": "invalid_api_key", "message": f"Bad key {API_KEY}"}}),
        StatusReply(500, f"crash while handling {API_KEY}"),
        GarbageReply(f"<html>{API_KEY}</html>".encode(), "text/html"),
        DropReply(["x"]),
    ],
    ids=["401", "500", "html", "drop"],
)
async def test_api_key_never_in_error_messages(
    fake: FakeUpstream, client: AgentClient, reply: Any
) -> None:
    fake.enqueue(*[reply] * 3)
    with pytest.raises(UpstreamError) as caught:
        await collect(client)
    assert API_KEY not in str(caught.value) and API_KEY not in repr(caught.value)
    assert "DoNotLeak" not in str(caught.value)


# --- cancellation ------------------------------------------------------------------------


async def test_cancel_closes_upstream_within_100ms(fake: FakeUpstream, client: AgentClient) -> None:
    fake.enqueue(TextReply(["first", " second"], delay_s=30))
    first_delta = trio.Event()
    with trio.fail_after(IO_LIMIT_S):
        async with trio.open_nursery() as nursery:
            turn = trio.CancelScope()

            async def run_turn() -> None:
                with turn:
                    async with client.stream(REQUEST) as events:
                        async for event in events:
                            if isinstance(event, TextDelta):
                                first_delta.set()

            nursery.start_soon(run_turn)
            await first_delta.wait()
            await trio.testing.wait_all_tasks_blocked()  # the turn is blocked reading
            cancelled_at = trio.current_time()
            turn.cancel()

        seen = fake.requests[0]
        await seen.done.wait()
    assert seen.closed.is_set() and not seen.completed_normally
    assert seen.client_closed_at is not None
    assert seen.client_closed_at - cancelled_at < 0.1


async def test_leaving_the_context_early_closes_upstream(
    fake: FakeUpstream, client: AgentClient
) -> None:
    fake.enqueue(TextReply(["a", "b", "c"], delay_s=30))
    with trio.fail_after(IO_LIMIT_S):
        async with client.stream(REQUEST) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    break
        left_at = trio.current_time()
        await fake.requests[0].closed.wait()
    closed_at = fake.requests[0].client_closed_at
    assert closed_at is not None and closed_at - left_at < 0.1


async def test_cancel_during_retry_backoff_stops_retrying(
    fake: FakeUpstream, lean_reads: bool
) -> None:
    agent = AgentClient(
        base_url=fake.base_url, api_key=None, model="m", backoff_base_s=60, lean_reads=lean_reads
    )
    fake.enqueue(StatusReply(500))
    try:
        with trio.fail_after(IO_LIMIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, agent)
                await fake.wait_for_request(1)
                await fake.requests[0].done.wait()
                nursery.cancel_scope.cancel()
    finally:
        await agent.aclose()
    assert len(fake.requests) == 1


# --- the offline demo model ----------------------------------------------------------------


@pytest.fixture
async def demo_agent() -> AsyncIterator[AgentClient]:
    agent = AgentClient(
        base_url="http://demo.invalid/v1",
        api_key=None,
        model="demo",
        transport=DemoModelTransport(word_interval_s=0.001),
    )
    yield agent
    await agent.aclose()


async def test_demo_model_streams_text_and_completes(demo_agent: AgentClient) -> None:
    request = ResponseRequest(
        input=[{"role": "user", "content": [{"type": "input_text", "text": "ping?"}]}],
        instructions="",
    )
    events = await collect(demo_agent, request)
    started, last = events[0], events[-1]
    assert isinstance(started, ResponseStarted) and started.response_id.startswith("resp_demo_")
    assert last == Completed(started.response_id)
    text = text_of(events)
    assert "(offline demo model)" in text and "«ping?»" in text and "OPENAI_API_KEY" in text
    assert sum(isinstance(e, TextDelta) for e in events) > 5


async def test_demo_model_echoes_the_chain_so_chaining_goes_on(demo_agent: AgentClient) -> None:
    # Like the real API: a demo session's second turn is chained, and stays chained.
    request = ResponseRequest(
        input=[{"role": "user", "content": "again"}],
        instructions="",
        previous_response_id="resp_demo_first",
    )
    events = await collect(demo_agent, request)
    started = events[0]
    assert isinstance(started, ResponseStarted)
    assert started.previous_response_id == "resp_demo_first"
    assert isinstance(events[-1], Completed)
    assert demo_agent.chaining_active


async def test_a_completed_stream_returns_its_connection_to_the_pool(
    nursery: trio.Nursery, lean_reads: bool
) -> None:
    upstream = await nursery.start(FakeUpstream(keep_alive=True).serve)
    upstream.enqueue(TextReply(["one"]), TextReply(["two"]))
    client = AgentClient(base_url=upstream.base_url, api_key="k", model="m", lean_reads=lean_reads)
    try:
        with trio.fail_after(10):
            for _ in range(2):
                async with client.stream(ResponseRequest(input=[], instructions="")) as events:
                    outcome = [event async for event in events]
                assert isinstance(outcome[-1], Completed)
    finally:
        await client.aclose()
    assert len(upstream.requests) == 2
    assert upstream.connections_accepted == 1


async def test_https_upstream_streams_and_reuses_its_tls_connection(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real API is HTTPS: lean reads apply to it (chat.upstream_transport).
    cert, key = self_signed_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    upstream = await nursery.start(FakeUpstream(keep_alive=True, ssl_context=context).serve)
    assert upstream.base_url.startswith("https://")
    upstream.enqueue(TextReply(["secure ", "one"]), TextReply(["secure ", "two"]))
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # httpx trusts it, as in production
    client = AgentClient(base_url=upstream.base_url, api_key="k", model="m")
    assert client.lean_reads_active
    try:
        assert text_of(await collect(client)) == "secure one"
        assert text_of(await collect(client)) == "secure two"
    finally:
        await client.aclose()
    assert upstream.connections_accepted == 1


async def test_silence_limit_is_per_gap_not_per_answer(
    fake: FakeUpstream, lean_reads: bool
) -> None:
    # Eight gaps of 0.15 s: the answer takes longer than the limit, no gap does.
    agent = AgentClient(
        base_url=fake.base_url, api_key=None, model="m", idle_timeout_s=0.6, lean_reads=lean_reads
    )
    fake.enqueue(TextReply([f"{n} " for n in range(9)], delay_s=0.15))
    try:
        started = trio.current_time()
        assert text_of(await collect(agent)) == "".join(f"{n} " for n in range(9))
        assert trio.current_time() - started > 0.6
    finally:
        await agent.aclose()


async def test_silence_before_the_headers_is_timeout(
    fake: FakeUpstream, lean_reads: bool
) -> None:
    agent = AgentClient(
        base_url=fake.base_url, api_key=None, model="m", idle_timeout_s=0.3, lean_reads=lean_reads
    )
    fake.enqueue(TextReply(["late"], start_delay_s=5))
    try:
        started = trio.current_time()
        with pytest.raises(UpstreamTimeout), trio.fail_after(IO_LIMIT_S):
            await collect(agent)
        assert trio.current_time() - started < 2
    finally:
        await agent.aclose()
    assert len(fake.requests) == 1  # the request may be running upstream: not repeated


# --- framings and content codings: the same answer either way -------------------


SSE_BODY = b"".join(encode_sse(e) for e in text_response_events("resp_raw", "m", ["Hel", "lo"]))


def _chunked(data: bytes, size: int = 50) -> bytes:
    return b"".join(
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size])
        for i in range(0, len(data), size)
    )


RAW_SSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
FRAMINGS = {
    # with lean reads, these bodies are read off the connection, not through h11...
    "chunked": RAW_SSE + b"transfer-encoding: chunked\r\n\r\n" + _chunked(SSE_BODY) + b"0\r\n\r\n",
    "informational head first, trailers last": b"HTTP/1.1 100 Continue\r\n\r\n"
    + RAW_SSE
    + b"transfer-encoding: chunked\r\n\r\n"
    + _chunked(SSE_BODY)
    + b"0\r\nx-t: 1\r\n\r\n",
    "chunked gzip": RAW_SSE
    + b"content-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n"
    + _chunked(gzip.compress(SSE_BODY))
    + b"0\r\n\r\n",
    # ...and this one through httpx either way
    "content-length deflate": RAW_SSE
    + b"content-encoding: deflate\r\ncontent-length: %d\r\n\r\n" % len(zlib.compress(SSE_BODY))
    + zlib.compress(SSE_BODY),
}


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_every_framing_streams_the_same_answer(
    fake: FakeUpstream,
    client: AgentClient,
    framing: str,
    lean_reads: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Head and whole body in one write: the first read holds both.
    body_through_h11 = 0
    next_event = h11.Connection.next_event

    def counting(self: h11.Connection) -> Any:
        nonlocal body_through_h11
        event = next_event(self)
        body_through_h11 += self.our_role is h11.CLIENT and isinstance(event, h11.Data)
        return event

    monkeypatch.setattr(h11.Connection, "next_event", counting)
    fake.enqueue(RawReply(FRAMINGS[framing]))
    events = await collect(client)
    assert text_of(events) == "Hello"
    assert events[0] == ResponseStarted("resp_raw") and isinstance(events[-1], Completed)
    tapped = lean_reads and framing.startswith(("chunked", "informational"))
    assert (body_through_h11 == 0) == tapped


@pytest.mark.parametrize(
    ("broken", "lean_error", "plain_error"),
    [
        # A bad chunk size: our decoder calls it a protocol error; h11's error reaches
        # us as httpx.RemoteProtocolError, the same type as a connection cut mid-body.
        (b"zz\r\n", UpstreamProtocolError, UpstreamDisconnected),
        (b"", UpstreamDisconnected, UpstreamDisconnected),  # EOF
    ],
)
async def test_broken_chunked_framing_mid_stream_fails_the_stream(
    fake: FakeUpstream,
    client: AgentClient,
    lean_reads: bool,
    broken: bytes,
    lean_error: type[UpstreamError],
    plain_error: type[UpstreamError],
) -> None:
    error = lean_error if lean_reads else plain_error
    events = text_response_events("resp_raw", "m", ["Hel", "lo"])
    first_delta = next(i for i, e in enumerate(events) if e["type"].endswith(".delta"))
    opening = b"".join(encode_sse(e) for e in events[: first_delta + 1])
    fake.enqueue(
        RawReply(RAW_SSE + b"transfer-encoding: chunked\r\n\r\n" + _chunked(opening) + broken)
    )
    seen: list[AgentEvent] = []
    with pytest.raises(error), trio.fail_after(IO_LIMIT_S):
        async with client.stream(REQUEST) as stream:
            async for event in stream:
                seen.append(event)
    assert text_of(seen) == "Hel"


async def test_broken_framing_after_the_terminal_event_leaves_the_answer_complete(
    fake: FakeUpstream, client: AgentClient
) -> None:
    head = RAW_SSE + b"transfer-encoding: chunked\r\n\r\n"
    fake.enqueue(RawReply(head + _chunked(SSE_BODY) + b"zz\r\n"))
    events = await collect(client)
    assert text_of(events) == "Hello" and isinstance(events[-1], Completed)


async def _forwarding_proxy(client: trio.SocketStream, targets: list[str]) -> None:
    """A plain-HTTP forward proxy for one request: origin-form to the target, then
    bytes both ways until the target closes."""
    head = b""
    while b"\r\n" not in head:
        chunk = await client.receive_some(65536)
        if not chunk:
            return
        head += chunk
    line, rest = head.split(b"\r\n", 1)
    method, target, version = line.split(b" ")
    url = urlsplit(target.decode())
    targets.append(target.decode())
    assert url.hostname is not None and url.port is not None
    upstream = await trio.open_tcp_stream(url.hostname, url.port)

    async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await source.receive_some(65536):
                await sink.send_all(data)

    async with upstream, trio.open_nursery() as both_ways:
        await upstream.send_all(b" ".join([method, url.path.encode(), version]) + b"\r\n" + rest)
        both_ways.start_soon(pipe, client, upstream)
        await pipe(upstream, client)
        both_ways.cancel_scope.cancel()


async def test_a_proxy_set_in_the_environment_still_carries_the_requests(
    fake: FakeUpstream,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A proxied connection is not ours: lean reads do not apply (and say so), and
    # httpx's proxy transport carries the request.
    caplog.set_level(logging.WARNING, logger="chat.upstream")
    targets: list[str] = []
    listeners = await nursery.start(
        partial(trio.serve_tcp, partial(_forwarding_proxy, targets=targets), 0, host="127.0.0.1")
    )
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    fake.enqueue(TextReply(["through ", "the proxy"]))
    agent = AgentClient(base_url=fake.base_url, api_key=None, model="m")
    assert not agent.lean_reads_active
    assert any("proxy" in r.getMessage() for r in caplog.records if r.name == "chat.upstream")
    try:
        assert text_of(await collect(agent)) == "through the proxy"
    finally:
        await agent.aclose()
    assert targets == [f"{fake.base_url}/responses"]


# --- compressed bodies: identity asked for, inflation bounded -----------------------------

# A step of the event loop (one task running without a break) longer than this holds
# every other session: no upstream, however hostile, may cause one.
MAX_STEP_S = 0.05


async def test_identity_is_the_only_content_coding_asked_for(
    fake: FakeUpstream, client: AgentClient
) -> None:
    await collect(client)
    assert fake.requests[0].headers["accept-encoding"] == "identity"


class _StepTimer(trio.abc.Instrument):
    """The longest task step while installed, in CPU time of the loop's thread: how long
    one task held the loop (on a busy machine the process is also descheduled within a
    step; that wall time is not the step's doing)."""

    def __init__(self) -> None:
        self.longest_s = 0.0
        self._began_s = time.thread_time()  # installed by a running step: counts from here

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began_s = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.longest_s = max(self.longest_s, time.thread_time() - self._began_s)


@cache
def _gzip_bomb(comment: bytes, inflated_bytes: int) -> bytes:
    """A gzip body: an answer's opening events, then SSE comments (``comment`` again and
    again) for ``inflated_bytes``, and never a terminal event."""
    opening = b"".join(encode_sse(e) for e in text_response_events("resp_bomb", "m", ["x"])[:2])
    block = comment * (1024 * 1024 // len(comment))
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(opening)]
    parts += [packer.compress(block) for _ in range(inflated_bytes // len(block))]
    return b"".join(parts) + packer.flush()


@dataclass
class _CompressedReply:
    """A body in a content coding, whatever the request asked for."""

    body: bytes
    coding: str = "gzip"
    status: int = 200
    content_type: str = "text/event-stream"

    async def play(self, out: _Exchange) -> None:
        await out.start(
            self.status, {"content-type": self.content_type, "content-encoding": self.coding}
        )
        await out.send(self.body)
        await out.end()


@pytest.mark.parametrize(
    ("comment", "limit_bytes"),
    [
        # The real limit, with comments that are cheap to parse...
        (b":" + b"." * 1021 + b"\n\n", MAX_INFLATED_BODY_BYTES),
        # ...and the costliest SSE there is (~0.2 s per MiB to parse), under a lower
        # limit to keep the test short: the steps must stay short all the same.
        (b":\n\n", 4 * 1024 * 1024),
    ],
    ids=["long-comments", "empty-comments"],
)
async def test_a_gzip_bomb_fails_the_turn_without_holding_the_event_loop(
    fake: FakeUpstream,
    client: AgentClient,
    monkeypatch: pytest.MonkeyPatch,
    comment: bytes,
    limit_bytes: int,
) -> None:
    monkeypatch.setattr(agent_client, "MAX_INFLATED_BODY_BYTES", limit_bytes)
    bomb = _gzip_bomb(comment, 2 * limit_bytes)
    assert len(bomb) < limit_bytes // 100  # it is one: a hundredth of what it inflates to
    fake.enqueue(_CompressedReply(bomb))
    timer = _StepTimer()
    trio.lowlevel.add_instrument(timer)
    try:
        with pytest.raises(UpstreamProtocolError, match="inflates past"):
            await collect(client)
    finally:
        trio.lowlevel.remove_instrument(timer)
    assert timer.longest_s < MAX_STEP_S
    assert len(fake.requests) == 1  # a protocol error is not retried


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.stem)
async def test_a_recording_compressed_anyway_streams_to_the_same_outcome(
    fake: FakeUpstream, client: AgentClient, path: Path
) -> None:
    expected = recording_oracle(path)
    fake.enqueue(_CompressedReply(gzip.compress(await trio.Path(path).read_bytes())))
    events = await collect(client)
    assert text_of(events) == expected["text"]
    assert [e for e in events if isinstance(e, ToolCall)] == expected["calls"]
    last = events[-1]
    assert isinstance(last, Completed | Incomplete | Failed)
    assert last.response_id == expected["response_id"]


async def test_a_content_coding_we_cannot_undo_is_a_protocol_error(
    fake: FakeUpstream, client: AgentClient
) -> None:
    fake.enqueue(_CompressedReply(SSE_BODY, coding="br"))
    with pytest.raises(UpstreamProtocolError, match="'br'"):
        await collect(client)
    assert len(fake.requests) == 1


async def test_an_error_body_that_is_a_gzip_bomb_is_read_only_in_part(
    fake: FakeUpstream, client: AgentClient
) -> None:
    bomb = _gzip_bomb(b":\n\n", 2 * MAX_INFLATED_BODY_BYTES)
    fake.enqueue(_CompressedReply(bomb, status=400, content_type="application/json"))
    timer = _StepTimer()
    trio.lowlevel.add_instrument(timer)
    try:
        with pytest.raises(UpstreamRejected):
            await collect(client)
    finally:
        trio.lowlevel.remove_instrument(timer)
    assert timer.longest_s < MAX_STEP_S
    assert len(fake.requests) == 1


def test_content_decoder_inflates_in_bounded_pieces_made_one_by_one() -> None:
    payload = bytes(range(256)) * 1024  # 256 KB
    decoder = ContentDecoder("gzip", max_bytes=1024 * 1024, piece_bytes=1000)
    pieces = decoder.feed(gzip.compress(payload))
    first = next(iter(pieces))
    assert len(first) == 1000
    rest = list(pieces)
    assert first + b"".join(rest) == payload
    assert max(len(piece) for piece in rest) <= 1000


def test_content_decoder_reads_gzip_members_in_turn_and_zlib_deflate() -> None:
    gzip_decoder = ContentDecoder("gzip", max_bytes=100)
    members = gzip.compress(b"one ") + gzip.compress(b"two")
    cut = len(members) - 5
    decoded = [*gzip_decoder.feed(members[:cut]), *gzip_decoder.feed(members[cut:])]
    assert b"".join(decoded) == b"one two"
    deflate_decoder = ContentDecoder("deflate", max_bytes=100)
    assert b"".join(deflate_decoder.feed(zlib.compress(b"zlib") + b"after")) == b"zlib"
    assert list(deflate_decoder.feed(b"more after the end")) == []


def test_content_decoder_cuts_identity_to_size_and_never_counts_it() -> None:
    decoder = ContentDecoder("identity", max_bytes=10, piece_bytes=4)
    assert list(decoder.feed(b"0123456789abcdef")) == [b"0123", b"4567", b"89ab", b"cdef"]


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_content_decoder_rejects_what_is_not_its_coding_and_what_inflates_too_far(
    coding: str,
) -> None:
    with pytest.raises(ContentCodingError, match="not valid"):
        list(ContentDecoder(coding, max_bytes=100).feed(b"plain text, not compressed"))
    packed = gzip.compress(b"x" * 101) if coding == "gzip" else zlib.compress(b"x" * 101)
    with pytest.raises(ContentCodingError, match="inflates past 100"):
        list(ContentDecoder(coding, max_bytes=100, piece_bytes=10).feed(packed))


# --- JSON nested too deeply ------------------------------------------------------------------

DEEP = "[" * 100_000  # json gives up with RecursionError, which is not a ValueError


def test_decode_rejects_json_nested_too_deeply() -> None:
    for data in (DEEP, '{"type":"response.output_text.delta","delta":' + DEEP):
        with pytest.raises(UpstreamProtocolError, match="nested too deeply"):
            decode_event(data)


async def test_an_event_nested_too_deeply_is_a_protocol_error(
    fake: FakeUpstream, client: AgentClient
) -> None:
    fake.enqueue(GarbageReply(b"data: " + DEEP.encode() + b"\n\n", "text/event-stream"))
    with pytest.raises(UpstreamProtocolError):
        await collect(client)


async def test_an_error_body_nested_too_deeply_is_still_a_rejection(
    fake: FakeUpstream, client: AgentClient
) -> None:
    fake.enqueue(StatusReply(400, "[" * 60_000))
    with pytest.raises(UpstreamRejected) as caught:
        await collect(client)
    assert caught.value.status_code == 400


@pytest.mark.parametrize(
    "arguments", [DEEP, '{"a":' + "[" * 5_000 + "]" * 5_000 + "}"], ids=["array", "in-object"]
)
def test_arguments_nested_too_deeply_are_bad_arguments(arguments: str) -> None:
    assert parse_arguments(arguments) is None  # the caller answers TOOL_BAD_ARGUMENTS_OUTPUT


# --- request items -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "parsed"),
    [
        ("", {}),
        ("  \n", {}),
        ('{"q": "x", "n": [1]}', {"q": "x", "n": [1]}),
        ("[1, 2]", None),
        ('"text"', None),
        ("{not json", None),
    ],
)
def test_parse_arguments_gives_an_object_or_none(
    arguments: str, parsed: dict[str, Any] | None
) -> None:
    assert parse_arguments(arguments) == parsed


def test_stored_history_becomes_input_items_with_every_call_answered() -> None:
    def row(role: str, content: str = "", **tool: str | None) -> StoredMessage:
        return StoredMessage(
            id=0, session_id="s", role=role, content=content, status=None, created_at="", **tool
        )

    history = [
        row("user", "what time is it?"),
        row("assistant", "Let me look."),
        row("tool", name="get_client_time", call_id="c1", arguments='{"tz":"UTC"}', output="9"),
        row("tool", name="get_page_context", call_id="c2"),  # no arguments, no output kept
        row("tool", name="orphan"),  # no call id: nothing to answer
        row("assistant", ""),  # a stopped turn that said nothing
        row("user", "thanks"),
    ]
    assert input_items(history) == [
        {"role": "user", "content": "what time is it?"},
        assistant_item("Let me look."),
        function_call_item("c1", "get_client_time", '{"tz":"UTC"}'),
        function_output_item("c1", "9"),
        {"type": "function_call", "call_id": "c2", "name": "get_page_context", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c2", "output": ""},
        {"role": "user", "content": "thanks"},
    ]


# --- every recording, without a socket too ---------------------------------------------------


def test_every_recording_the_readme_lists_is_tested() -> None:
    readme = (RECORDINGS_DIR / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `([^`]+\.sse)`", readme, flags=re.MULTILINE))
    assert listed and listed == {path.name for path in RECORDINGS}


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.stem)
def test_a_recording_decodes_to_its_outcome_without_a_socket(path: Path) -> None:
    expected = recording_oracle(path)
    parser = SSEParser(agent_client.MAX_SSE_EVENT_BYTES)
    decoded = [decode_event(data) for data in parser.feed(path.read_bytes())]
    events = [event for event in decoded if event is not None]
    ends = [n for n, e in enumerate(events) if isinstance(e, Completed | Incomplete | Failed)]
    events = events[: ends[0] + 1]  # a stream ends at its first terminal event
    assert text_of(events) == expected["text"]
    assert [e for e in events if isinstance(e, ToolCall)] == expected["calls"]
    terminal_type = {"response.completed": Completed, "response.incomplete": Incomplete}
    assert type(events[-1]) is terminal_type.get(expected["terminal"]["type"], Failed)


# --- chaining checked; a third-party proxy's quirks ----------------------------------


CHAINED = ResponseRequest(
    input=[{"role": "user", "content": "and then?"}],
    instructions="Be brief.",
    previous_response_id="resp_before",
)
CHAIN_WARNING = "upstream ignores previous_response_id"


def _chain_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "agent_client" and CHAIN_WARNING in record.getMessage()
    ]


@asynccontextmanager
async def _proxy(
    nursery: trio.Nursery, quirks: ProxyQuirks, lean_reads: bool, *, keep_alive: bool = False
) -> AsyncIterator[tuple[FakeUpstream, AgentClient]]:
    """A fake upstream with the proxy's ``quirks``, and a client of it."""
    fake: FakeUpstream = await nursery.start(
        FakeUpstream(proxy=quirks, keep_alive=keep_alive).serve
    )
    agent = AgentClient(
        base_url=fake.base_url,
        api_key=API_KEY,
        model="test-model",
        backoff_base_s=0.01,
        lean_reads=lean_reads,
    )
    try:
        yield fake, agent
    finally:
        await agent.aclose()


def test_decode_created_reads_the_echoed_previous_response_id() -> None:
    created = '{"type":"response.created","response":%s}'
    echoed = created % '{"id":"resp_2","previous_response_id":"resp_1"}'
    assert decode_event(echoed) == ResponseStarted("resp_2", "resp_1")
    for response in ('{"id":"resp_2","previous_response_id":null}', '{"id":"resp_2"}'):
        assert decode_event(created % response) == ResponseStarted("resp_2", None)


@pytest.mark.parametrize("reply", ["synthetic", "recording 01"])
async def test_chained_requests_the_upstream_echoes_keep_chaining(
    fake: FakeUpstream, client: AgentClient, reply: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent_client")
    for _ in range(3):
        more = RecordingReply(recording("01")) if reply == "recording 01" else None
        fake.enqueue(more or TextReply(["more"]))
        events = await collect(client, CHAINED)
        started = events[0]
        assert isinstance(started, ResponseStarted)
        assert started.previous_response_id == "resp_before"
        assert isinstance(events[-1], Completed) and text_of(events)
    assert client.chaining_active
    assert [r.body["previous_response_id"] for r in fake.requests] == ["resp_before"] * 3
    assert not _chain_warnings(caplog)


IGNORING = {
    "echo null": ProxyQuirks(ignores_chaining=True),
    "echo absent": ProxyQuirks(ignores_chaining=True, echo_absent=True),
    # The documented choice: no response.created before the answer, no verified chain.
    "no response.created": ProxyQuirks(no_created=True),
}


@pytest.mark.parametrize("quirks", IGNORING.values(), ids=IGNORING.keys())
async def test_a_chain_not_echoed_is_closed_at_once_and_chaining_stops(
    nursery: trio.Nursery,
    lean_reads: bool,
    quirks: ProxyQuirks,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="agent_client")
    async with _proxy(nursery, quirks, lean_reads) as (fake, agent):
        # 30 s between the deltas: only a close at the first event ends this early.
        fake.enqueue(TextReply(["never ", "shown"], delay_s=30.0))
        seen: list[AgentEvent] = []
        with trio.fail_after(IO_LIMIT_S):
            with pytest.raises(PreviousResponseIgnored):
                async with agent.stream(CHAINED) as events:
                    seen += [event async for event in events]
            first = fake.requests[0]
            await first.done.wait()
        assert seen == []
        assert first.body["previous_response_id"] == "resp_before"
        assert not first.completed_normally and first.client_closed_at is not None
        assert first.client_closed_at - first.received_at < 1.0
        assert not agent.chaining_active
        (warning,) = _chain_warnings(caplog)
        assert warning.levelno == logging.WARNING and "resp_before" not in warning.getMessage()

        # From now on a chained request is not even sent...
        with pytest.raises(PreviousResponseIgnored):
            await collect(agent, CHAINED)
        assert len(fake.requests) == 1
        # ...and unchained ones stream as usual; the warning stays the only one.
        assert text_of(await collect(agent)) == "echo: hello there"
        assert len(_chain_warnings(caplog)) == 1 and not agent.chaining_active


async def test_an_error_answer_to_a_chained_request_is_not_taken_for_an_ignored_chain(
    nursery: trio.Nursery, lean_reads: bool
) -> None:
    # No response.created, the error event first: a failure, nothing to verify.
    async with _proxy(nursery, ProxyQuirks(no_created=True), lean_reads) as (fake, agent):
        fake.enqueue(FailedReply([], code="server_error"))
        events = await collect(agent, CHAINED)
        assert [type(event) for event in events] == [Failed]
        assert agent.chaining_active


QUIRKS = {
    "data: [DONE] after the terminal event": ProxyQuirks(done_sentinel=True),
    "no event: lines": ProxyQuirks(no_event_lines=True),
    "response ids of ~460 characters": ProxyQuirks(long_ids=True),
    "a model field on every event": ProxyQuirks(model_field=True),
}


@pytest.mark.parametrize("quirks", QUIRKS.values(), ids=QUIRKS.keys())
async def test_each_proxy_quirk_alone_gives_the_same_events(
    nursery: trio.Nursery, lean_reads: bool, quirks: ProxyQuirks
) -> None:
    async with _proxy(nursery, quirks, lean_reads) as (fake, agent):
        fake.enqueue(
            TextReply(["Hel", "lo"], response_id="resp_text"),
            ToolCallReply([("c1", "f", '{"a": 1}')], "Let me see", response_id="resp_tool"),
        )
        text = await collect(agent)
        tool = await collect(agent)
    ids = {"resp_text": "resp_text", "resp_tool": "resp_tool"}
    if quirks.long_ids:
        ids = {short: long_response_id(short) for short in ids}
        assert all(455 <= len(long) <= 470 for long in ids.values())
    assert text[0] == ResponseStarted(ids["resp_text"]) and text[-1] == Completed(ids["resp_text"])
    assert text_of(text) == "Hello"
    assert tool[0] == ResponseStarted(ids["resp_tool"]) and tool[-1] == Completed(ids["resp_tool"])
    assert text_of(tool) == "Let me see"
    assert [e for e in tool if isinstance(e, ToolCall)] == [ToolCall("c1", "f", '{"a": 1}')]
    assert agent.chaining_active


class _DoneInOneWriteReply:
    """A text answer, its terminal event and ``data: [DONE]`` in a single write."""

    async def play(self, out: _Exchange) -> None:
        events = text_response_events("resp_done", "m", ["Hel", "lo"])
        await out.start(200, {"content-type": "text/event-stream"})
        await out.send(b"".join(encode_sse(event) for event in events) + b"data: [DONE]\n\n")
        await out.end()


async def test_done_after_the_terminal_event_is_never_decoded_and_the_connection_is_reused(
    nursery: trio.Nursery, lean_reads: bool
) -> None:
    quirks = ProxyQuirks(done_sentinel=True)
    async with _proxy(nursery, quirks, lean_reads, keep_alive=True) as (fake, agent):
        fake.enqueue(TextReply(["a"]), _DoneInOneWriteReply(), TextReply(["b"]))  # type: ignore[arg-type]
        answers = [await collect(agent) for _ in range(3)]
        assert [text_of(events) for events in answers] == ["a", "Hello", "b"]
        assert all(sum(isinstance(e, Completed) for e in events) == 1 for events in answers)
        # [DONE] read past, not left unread: the one connection served all three.
        assert fake.connections_accepted == 1


async def test_chained_requests_in_flight_together_warn_once(
    nursery: trio.Nursery, lean_reads: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent_client")
    quirks = ProxyQuirks(ignores_chaining=True)
    async with _proxy(nursery, quirks, lean_reads) as (fake, agent):
        refused = 0

        async def chained_turn() -> None:
            nonlocal refused
            with pytest.raises(PreviousResponseIgnored):
                await collect(agent, CHAINED)
            refused += 1

        async with trio.open_nursery() as turns:
            for _ in range(3):
                turns.start_soon(chained_turn)
        # All three were sent before any answer came back; each was found out itself.
        assert refused == 3 and len(fake.requests) == 3
        assert len(_chain_warnings(caplog)) == 1
