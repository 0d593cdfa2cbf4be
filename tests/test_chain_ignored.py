"""An upstream that accepts `previous_response_id` and ignores it, through the whole
server: the chained request is closed at once and resent with the full history, the
client sees one normal answer, and from then on no turn of any session chains (one
WARNING, `chat_upstream_chaining_active` 0). A normal upstream never trips the check.

The fake upstream plays the third-party proxy this was found against (`ProxyQuirks`):
no echo, `data: [DONE]`, no `event:` lines, ~460-character response ids, a `model`
field on every event.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from chat.settings import load_tools
from conftest import CLIENT_WAIT_S, ChatClient, open_chat
from fake_upstream import (
    PROXY,
    FakeUpstream,
    ProxyQuirks,
    TextReply,
    ToolCallReply,
    long_response_id,
)
from server import ChatServer

StartServer = Callable[..., Awaitable[ChatServer]]
EXAMPLE_TOOLS = Path(__file__).resolve().parents[1] / "docs" / "tools.example.json"
CHAIN_WARNING = "upstream ignores previous_response_id"
TEST_LIMIT_S = 20.0

IGNORING = {
    "proxy": PROXY,
    "proxy, echo absent": replace(PROXY, echo_absent=True),
    # The documented choice: no response.created before the answer, no verified chain.
    "no response.created": ProxyQuirks(no_created=True),
}


@pytest.fixture
async def fake(nursery: trio.Nursery, request: pytest.FixtureRequest) -> FakeUpstream:
    """The fake upstream, with the quirks the test is parametrized with (none: OpenAI)."""
    quirks: ProxyQuirks | None = getattr(request, "param", None)
    upstream: FakeUpstream = await nursery.start(FakeUpstream(proxy=quirks).serve)
    return upstream


def _chain_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.levelno == logging.WARNING and CHAIN_WARNING in record.getMessage()
    ]


async def _chaining_gauge(server: ChatServer) -> str:
    async with httpx.AsyncClient() as http:
        with trio.fail_after(CLIENT_WAIT_S):
            response = await http.get(f"http://127.0.0.1:{server.port}/metrics")
    (line,) = [
        line
        for line in response.text.splitlines()
        if line.startswith("chat_upstream_chaining_active ")
    ]
    return line.split()[1]


async def _ask(client: ChatClient, content: str) -> list[dict[str, Any]]:
    await client.send(type="message", content=content)
    return await client.turn()


def _answer(frames: list[dict[str, Any]]) -> dict[str, Any]:
    """The turn's response_end, after checking it is one normal answer: one start,
    deltas that add up to the full content, no error."""
    types = [frame["type"] for frame in frames]
    assert types.count("response_start") == 1 and "error" not in types, frames
    end = frames[-2]
    deltas = "".join(frame["content"] for frame in frames if frame["type"] == "text_delta")
    assert end["type"] == "response_end" and end["status"] == "completed"
    assert end["full_content"] == deltas
    return end


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("fake", IGNORING.values(), ids=IGNORING.keys(), indirect=True)
async def test_ignored_chain_is_resent_in_full_and_chaining_stops_for_every_session(
    server: ChatServer, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    quirks = fake.proxy
    assert quirks is not None
    with trio.fail_after(TEST_LIMIT_S):
        assert await _chaining_gauge(server) == "1.0"
        async with open_chat(server, "s1") as client:
            first = _answer(await _ask(client, "first question"))
            assert first["full_content"] == "echo: first question"
            if quirks.long_ids:  # stored in SQLite, read back for the chain, on the frame
                assert len(first["response_id"]) >= 450

            # Turn 2 chains; the fake would stream this for a minute, if it were read.
            fake.enqueue(TextReply(["never ", "shown"], delay_s=60.0))
            second = _answer(await _ask(client, "second question"))
            assert second["full_content"] == "echo: second question"
            ignored, resent = fake.requests[1], fake.requests[2]
            assert ignored.body["previous_response_id"] == first["response_id"]
            assert ignored.body["input"] == [_user("second question")]
            assert ignored.client_closed_at is not None and not ignored.completed_normally
            assert ignored.client_closed_at <= resent.received_at
            assert "previous_response_id" not in resent.body
            assert resent.body["input"] == [
                _user("first question"),
                _assistant("echo: first question"),
                _user("second question"),
            ]
            assert await _chaining_gauge(server) == "0.0"

            third = _answer(await _ask(client, "third question"))
            assert third["full_content"] == "echo: third question"
            assert "previous_response_id" not in fake.requests[3].body
            assert len(fake.requests[3].body["input"]) == 5

        # Another session's second turn does not chain either.
        async with open_chat(server, "s2") as client:
            _answer(await _ask(client, "hello"))
            _answer(await _ask(client, "again"))
        assert "previous_response_id" not in fake.requests[5].body
        assert fake.requests[5].body["input"] == [
            _user("hello"),
            _assistant("echo: hello"),
            _user("again"),
        ]
        assert len(fake.requests) == 6
        assert await _chaining_gauge(server) == "0.0"
    (warning,) = _chain_warnings(caplog)
    assert warning.name == "agent_client"
    # Later turns build full-history requests themselves: only turn 2 fell back.
    assert caplog.text.count("resending the full history") == 1
    assert "question" not in warning.getMessage()
    assert first["response_id"] not in warning.getMessage()


@pytest.mark.parametrize("fake", [PROXY], ids=["proxy"], indirect=True)
async def test_ignored_chain_at_a_tool_round_resends_the_turns_call_and_output(
    start_server: StartServer, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    # Turn 1 sends its history in full; its tool round is the first to chain.
    server = await start_server(tools=load_tools(str(EXAMPLE_TOOLS)))
    fake.enqueue(
        ToolCallReply(
            [("call_1", "get_client_time", "{}")],
            text_before="Let me check. ",
            response_id="resp_round1",
        ),
        TextReply(["never ", "shown"], delay_s=60.0),
        TextReply(["It is ", "noon."]),
    )
    with trio.fail_after(TEST_LIMIT_S):
        async with open_chat(server) as client:
            await client.send(type="message", content="what time is it?")
            frames = await client.receive_until("tool_request")
            await client.send(type="tool_response", call_id="call_1", content="12:00")
            frames += await client.turn()
    end = _answer(frames)
    assert end["full_content"] == "Let me check. It is noon."
    first, ignored, resent = (request.body for request in fake.requests)
    assert ignored["previous_response_id"] == long_response_id("resp_round1")
    assert ignored["input"] == [
        {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}
    ]
    assert "previous_response_id" not in resent
    assert resent["input"] == [
        _user("what time is it?"),
        _assistant("Let me check. "),
        {"type": "function_call", "call_id": "call_1", "name": "get_client_time",
         "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "12:00"},
    ]
    assert len(_chain_warnings(caplog)) == 1


async def test_an_upstream_that_echoes_the_chain_is_chained_every_turn(
    server: ChatServer, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    assert fake.proxy is None  # OpenAI's behaviour: previous_response_id echoed
    caplog.set_level(logging.INFO)
    with trio.fail_after(TEST_LIMIT_S):
        async with open_chat(server) as client:
            ends = [_answer(await _ask(client, f"question {n}")) for n in range(4)]
        assert await _chaining_gauge(server) == "1.0"
    assert len(fake.requests) == 4  # nothing resent
    chained = [request.body.get("previous_response_id") for request in fake.requests]
    assert chained == [None, *(end["response_id"] for end in ends[:-1])]
    assert [request.body["input"] for request in fake.requests[1:]] == [
        [_user(f"question {n}")] for n in range(1, 4)
    ]
    assert not _chain_warnings(caplog)
