"""AgentClient and decode_event against recordings, scripted failures and cancellation.

Rules for these tests: loopback only (the fake upstream on 127.0.0.1:0), every
test doing I/O is bounded by ``trio.fail_after``, waits are on events (requests
arriving, exchanges ending), never on sleeps. Expected outcomes for recordings
are computed from the recording files themselves, by a parser independent of
``decode_event``.
"""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import suppress
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import httpcore
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import agent_client
from agent_client import (
    BURST_PASS_BUDGET_S,
    BURST_READ_BYTES,
    MAX_CHUNK_LINE_BYTES,
    AgentClient,
    AgentEvent,
    ChunkedBodyDecoder,
    Completed,
    DemoModelTransport,
    Failed,
    Incomplete,
    PreviousResponseNotFound,
    ResponseRequest,
    ResponseStarted,
    SSEParser,
    TextDelta,
    ToolCall,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    _LeanReadStream,
    _loop_pass_clock,
    decode_event,
    encode_sse,
    text_response_events,
)
from conftest import self_signed_cert
from fake_upstream import (
    RECORDINGS_DIR,
    DropReply,
    FailedReply,
    FakeUpstream,
    GarbageReply,
    IncompleteReply,
    RawReply,
    RecordingReply,
    StallReply,
    StatusReply,
    TextReply,
    ToolCallReply,
    _Exchange,
)

API_KEY = "sk-test-DoNotLeakThisKey0123456789"
IO_LIMIT_S = 10
REQUEST = ResponseRequest(
    input=[{"role": "user", "content": "hello there"}], instructions="Be brief."
)
RECORDINGS = sorted(RECORDINGS_DIR.glob("*.sse"))


@pytest.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[AgentClient]:
    agent = AgentClient(
        base_url=fake.base_url, api_key=API_KEY, model="test-model", backoff_base_s=0.01
    )
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
    with pytest.raises(UpstreamProtocolError):
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


async def test_optional_fields_are_omitted_and_no_key_means_no_auth(fake: FakeUpstream) -> None:
    agent = AgentClient(base_url=fake.base_url, api_key=None, model="m")
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


async def test_retry_after_is_capped(fake: FakeUpstream) -> None:
    agent = AgentClient(base_url=fake.base_url, api_key=None, model="m", retry_after_cap_s=0.05)
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


async def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as sock:  # bind then close: a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    agent = AgentClient(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, model="m", backoff_base_s=0.01
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


async def test_stall_mid_stream_is_timeout(fake: FakeUpstream) -> None:
    agent = AgentClient(base_url=fake.base_url, api_key=None, model="m", idle_timeout_s=0.3)
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


async def test_cancel_during_retry_backoff_stops_retrying(fake: FakeUpstream) -> None:
    agent = AgentClient(base_url=fake.base_url, api_key=None, model="m", backoff_base_s=60)
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


async def test_demo_model_streams_text_and_completes() -> None:
    agent = AgentClient(
        base_url="http://demo.invalid/v1",
        api_key=None,
        model="demo",
        transport=DemoModelTransport(word_interval_s=0.001),
    )
    request = ResponseRequest(
        input=[{"role": "user", "content": [{"type": "input_text", "text": "ping?"}]}],
        instructions="",
    )
    try:
        events = await collect(agent, request)
    finally:
        await agent.aclose()
    started, last = events[0], events[-1]
    assert isinstance(started, ResponseStarted) and started.response_id.startswith("resp_demo_")
    assert last == Completed(started.response_id)
    text = text_of(events)
    assert "(offline demo model)" in text and "«ping?»" in text and "OPENAI_API_KEY" in text
    assert sum(isinstance(e, TextDelta) for e in events) > 5


async def test_a_completed_stream_returns_its_connection_to_the_pool(
    nursery: trio.Nursery,
) -> None:
    upstream = await nursery.start(FakeUpstream(keep_alive=True).serve)
    upstream.enqueue(TextReply(["one"]), TextReply(["two"]))
    client = AgentClient(base_url=upstream.base_url, api_key="k", model="m")
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
    # The real API is HTTPS: TLS reads go through httpcore, the body is still ours.
    cert, key = self_signed_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    upstream = await nursery.start(FakeUpstream(keep_alive=True, ssl_context=context).serve)
    assert upstream.base_url.startswith("https://")
    upstream.enqueue(TextReply(["secure ", "one"]), TextReply(["secure ", "two"]))
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # httpx trusts it, as in production
    client = AgentClient(base_url=upstream.base_url, api_key="k", model="m")
    try:
        assert text_of(await collect(client)) == "secure one"
        assert text_of(await collect(client)) == "secure two"
    finally:
        await client.aclose()
    assert upstream.connections_accepted == 1


async def test_silence_limit_is_per_gap_not_per_answer(fake: FakeUpstream) -> None:
    # Eight gaps of 0.15 s: the answer takes longer than the limit, no gap does.
    agent = AgentClient(base_url=fake.base_url, api_key=None, model="m", idle_timeout_s=0.6)
    fake.enqueue(TextReply([f"{n} " for n in range(9)], delay_s=0.15))
    try:
        started = trio.current_time()
        assert text_of(await collect(agent)) == "".join(f"{n} " for n in range(9))
        assert trio.current_time() - started > 0.6
    finally:
        await agent.aclose()


async def test_silence_before_the_headers_is_timeout(fake: FakeUpstream) -> None:
    agent = AgentClient(base_url=fake.base_url, api_key=None, model="m", idle_timeout_s=0.3)
    fake.enqueue(TextReply(["late"], start_delay_s=5))
    try:
        started = trio.current_time()
        with pytest.raises(UpstreamTimeout), trio.fail_after(IO_LIMIT_S):
            await collect(agent)
        assert trio.current_time() - started < 2
    finally:
        await agent.aclose()
    assert len(fake.requests) == 1  # the request may be running upstream: not repeated


async def test_loop_pass_clock_is_one_per_run_and_restarts_at_every_io_poll() -> None:
    # Bursting reads give way once a loop pass is older than BURST_PASS_BUDGET_S.
    clock = _loop_pass_clock()
    assert _loop_pass_clock() is clock
    busy_until = time.perf_counter() + 2 * BURST_PASS_BUDGET_S
    while time.perf_counter() < busy_until:  # a long pass: this task computing
        pass
    assert clock.age_s() > BURST_PASS_BUDGET_S
    await trio.lowlevel.checkpoint()  # the next pass starts with an I/O poll
    assert clock.age_s() < BURST_PASS_BUDGET_S


# --- chunked bodies: decoded by the agent client itself ------------------------


def _chunked_by_h11(
    pieces: list[bytes], trailers: list[tuple[bytes, bytes]]
) -> tuple[bytes, bytes]:
    """(the data chunks, the message end) of a chunked body as h11 writes it."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert isinstance(server.next_event(), h11.Request)
    server.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]))
    data = b"".join(server.send(h11.Data(data=piece)) or b"" for piece in pieces)
    return data, server.send(h11.EndOfMessage(headers=trailers)) or b""


@given(
    st.lists(st.binary(min_size=1, max_size=40), max_size=8),
    st.lists(st.integers(min_value=0, max_value=500), max_size=12),
)
def test_chunked_decoder_agrees_with_h11_however_the_bytes_are_cut(
    pieces: list[bytes], cuts: list[int]
) -> None:
    chunks, end = _chunked_by_h11(pieces, [(b"x-trailer", b"1")])
    body = chunks + end + b"NEXT"
    decoder = ChunkedBodyDecoder()
    points = [0, *sorted(c for c in cuts if c < len(body)), len(body)]
    payload = b"".join(decoder.feed(body[a:b]) for a, b in pairwise(points))
    assert payload == b"".join(pieces)
    assert decoder.done
    assert decoder.rest == end + b"NEXT"  # for h11 to read: the last chunk on


def test_chunked_decoder_reads_extensions_and_any_case_of_hex() -> None:
    decoder = ChunkedBodyDecoder()
    assert decoder.feed(b"5;name=value\r\nhello\r\nA \r\n0123456789\r\n") == b"hello0123456789"
    assert not decoder.done
    assert decoder.feed(b"0;last\r\n\r\n") == b""
    assert decoder.done and decoder.rest == b"0;last\r\n\r\n"


def test_chunked_decoder_passes_data_on_before_the_chunk_is_whole() -> None:
    decoder = ChunkedBodyDecoder()
    assert decoder.feed(b"a\r\nabc") == b"abc"
    assert decoder.feed(b"defghij\r") == b"defghij"
    assert decoder.feed(b"\n3\r\nxyz\r\n") == b"xyz"


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\n",  # not hex
        b"-5\r\nhello\r\n",  # signs, prefixes and spaces int() would take
        b"0x5\r\nhello\r\n",
        b" 5\r\nhello\r\n",
        b"\r\n",  # no size at all
        b"11111111111111111\r\n",  # past 16 hex digits
        b"5\r\nhelloXY",  # chunk data not followed by CRLF
        b"1" * (MAX_CHUNK_LINE_BYTES + 1),  # a size line that never ends
    ],
)
def test_chunked_decoder_rejects_broken_framing(body: bytes) -> None:
    decoder = ChunkedBodyDecoder()
    with pytest.raises(UpstreamProtocolError):
        decoder.feed(body)
        decoder.feed(b"")  # the payload before the error came first


def test_chunked_decoder_returns_the_payload_before_broken_framing_first() -> None:
    decoder = ChunkedBodyDecoder()
    assert decoder.feed(b"3\r\nabc\r\nzz\r\n") == b"abc"
    assert decoder.failed
    with pytest.raises(UpstreamProtocolError):
        decoder.feed(b"")


class _ScriptedStream(httpcore.AsyncNetworkStream):
    """An httpcore stream that reads a script, one piece per read (like TLS: no fd)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = deque(pieces)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        await trio.lowlevel.checkpoint()
        return self._pieces.popleft() if self._pieces else b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    def get_extra_info(self, info: str) -> Any:
        return object() if info == "ssl_object" else None


# An informational head, then the final one with bare-LF line ends (h11 takes both).
HEADS = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\ncontent-type: text/event-stream\ntransfer-encoding: chunked\n\n"
)
BODY = b"5\r\nhello\r\n0\r\n\r\n"


@given(st.lists(st.integers(min_value=1, max_value=len(HEADS + BODY) - 1), max_size=10))
def test_the_body_is_handed_over_whole_however_the_response_is_cut(cuts: list[int]) -> None:
    # h11 is the oracle: once it has the final head it must hold no byte of the body,
    # and take_body plus the reads after it must give exactly the body.
    raw = HEADS + BODY
    points = [0, *sorted(set(cuts)), len(raw)]

    async def exchange() -> None:
        stream = _LeanReadStream(_ScriptedStream([raw[a:b] for a, b in pairwise(points)]))
        await stream.write(b"POST / HTTP/1.1\r\n...")  # a request: its response head is next
        h11_client = h11.Connection(h11.CLIENT)
        h11_client.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
        while not isinstance(event := h11_client.next_event(), h11.Response):
            if event is h11.NEED_DATA:
                h11_client.receive_data(await stream.read(65536))
        assert h11_client.trailing_data == (b"", False)
        body = stream.take_body()
        while more := await stream.read(65536):
            body += more
        assert body == BODY

    trio.run(exchange)


SSE_BODY = b"".join(encode_sse(e) for e in text_response_events("resp_raw", "m", ["Hel", "lo"]))


def _chunked(data: bytes, size: int = 50) -> bytes:
    return b"".join(
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size])
        for i in range(0, len(data), size)
    )


RAW_SSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
FRAMINGS = {
    # the agent client decodes these bodies itself...
    "chunked": RAW_SSE + b"transfer-encoding: chunked\r\n\r\n" + _chunked(SSE_BODY) + b"0\r\n\r\n",
    "informational head first, trailers last": b"HTTP/1.1 100 Continue\r\n\r\n"
    + RAW_SSE
    + b"transfer-encoding: chunked\r\n\r\n"
    + _chunked(SSE_BODY)
    + b"0\r\nx-t: 1\r\n\r\n",
    # ...and leaves these to httpx
    "content-length": RAW_SSE + b"content-length: %d\r\n\r\n" % len(SSE_BODY) + SSE_BODY,
    "gzip": RAW_SSE
    + b"content-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n"
    + _chunked(gzip.compress(SSE_BODY))
    + b"0\r\n\r\n",
}


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_every_framing_streams_the_same_answer(
    fake: FakeUpstream, client: AgentClient, framing: str, monkeypatch: pytest.MonkeyPatch
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
    assert (body_through_h11 == 0) == (framing.startswith(("chunked", "informational")))


@pytest.mark.parametrize(
    ("broken", "error"),
    [(b"zz\r\n", UpstreamProtocolError), (b"", UpstreamDisconnected)],  # bad size; EOF
)
async def test_broken_chunked_framing_mid_stream_fails_the_stream(
    fake: FakeUpstream, client: AgentClient, broken: bytes, error: type[UpstreamError]
) -> None:
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
    fake: FakeUpstream, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Our transport is mounted for all:// so that httpx's proxy mounts win over it;
    # a proxied connection is not ours, and its body is read through httpx.
    targets: list[str] = []
    listeners = await nursery.start(
        partial(trio.serve_tcp, partial(_forwarding_proxy, targets=targets), 0, host="127.0.0.1")
    )
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    fake.enqueue(TextReply(["through ", "the proxy"]))
    agent = AgentClient(base_url=fake.base_url, api_key=None, model="m")
    try:
        assert text_of(await collect(agent)) == "through the proxy"
    finally:
        await agent.aclose()
    assert targets == [f"{fake.base_url}/responses"]


async def test_a_burst_read_waiting_for_the_next_pass_keeps_its_data_when_cancelled(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(IO_LIMIT_S):
        stream = _LeanReadStream(await httpcore.TrioBackend().connect_tcp("127.0.0.1", port))
        peer = await listeners[0].accept()
    async with peer, listeners[0]:
        burst = bytes(range(256)) * (BURST_READ_BYTES // 256 + 1)
        await peer.send_all(burst)
        monkeypatch.setattr(agent_client, "BURST_PASS_BUDGET_S", -1.0)  # every pass too old
        with trio.move_on_after(0.05) as waited:
            await stream.read(len(burst))
        assert waited.cancelled_caught
        monkeypatch.setattr(agent_client, "BURST_PASS_BUDGET_S", BURST_PASS_BUDGET_S)
        with trio.fail_after(IO_LIMIT_S):
            assert await stream.read(len(burst)) == burst
        await stream.aclose()
