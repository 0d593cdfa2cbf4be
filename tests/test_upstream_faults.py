"""Upstream faults through the whole server: retries, failed and incomplete turns,
a forgotten response chain, and `--no-store`. The session stays usable after each."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from conftest import ChatClient, open_chat
from fake_upstream import (
    DropReply,
    FailedReply,
    FakeUpstream,
    GarbageReply,
    IncompleteReply,
    StallReply,
    StatusReply,
    TextReply,
)
from protocol import UPSTREAM_ERROR_TEXT
from server import ChatServer

StartServer = Callable[..., Awaitable[ChatServer]]


async def _turn_then_error(client: ChatClient, content: str) -> tuple[dict, dict]:
    await client.send(type="message", content=content)
    frames = await client.turn()
    errors = [f for f in frames if f["type"] == "error"]
    assert len(errors) == 1, frames
    return frames[-2], errors[0]


async def _completes_a_turn(client: ChatClient, fake: FakeUpstream) -> None:
    fake.enqueue(TextReply(["still ", "here"]))
    await client.send(type="message", content="are you there?")
    end = (await client.turn())[-2]
    assert end["status"] == "completed" and end["full_content"] == "still here"


async def test_429_honours_retry_after_then_succeeds(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(StatusReply(429, headers={"retry-after": "0.4"}), TextReply(["ok"]))
    async with open_chat(server) as client:
        await client.send(type="message", content="hi")
        frames = await client.turn()
    assert frames[-2]["status"] == "completed" and frames[-2]["full_content"] == "ok"
    assert len(fake.requests) == 2
    assert fake.requests[1].received_at - fake.requests[0].received_at >= 0.4


async def test_5xx_three_times_ends_failed_with_upstream_error(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(StatusReply(500), StatusReply(502), StatusReply(503))
    async with open_chat(server) as client:
        end, error = await _turn_then_error(client, "hi")
        assert end["status"] == "failed" and end["full_content"] == ""
        assert error == {
            "type": "error",
            "code": "upstream_error",
            "message": UPSTREAM_ERROR_TEXT,
            "turn_id": end["turn_id"],
        }
        assert len(fake.requests) == 3
        await _completes_a_turn(client, fake)


async def test_unreachable_upstream_fails_the_turn_not_the_session(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    server = await start_server(upstream_url="http://127.0.0.1:9/v1")  # discard port: refused
    async with open_chat(server) as client:
        end, error = await _turn_then_error(client, "hi")
        assert end["status"] == "failed" and error["code"] == "upstream_error"
        await client.send(type="history")
        history = (await client.receive_until("history"))[-1]["messages"]
    assert [(m["role"], m["status"]) for m in history] == [("user", None), ("assistant", "failed")]


async def test_mid_stream_error_event_ends_failed_with_partial_text(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(FailedReply(["half ", "an answer"]))
    async with open_chat(server) as client:
        end, error = await _turn_then_error(client, "hi")
        assert end["status"] == "failed" and end["full_content"] == "half an answer"
        assert error["code"] == "upstream_error"
        assert len(fake.requests) == 1  # mid-stream failures are not retried
        await _completes_a_turn(client, fake)


async def test_incomplete_response_ends_incomplete(server: ChatServer, fake: FakeUpstream) -> None:
    fake.enqueue(IncompleteReply(["cut ", "short"]))
    async with open_chat(server) as client:
        await client.send(type="message", content="hi")
        frames = await client.turn()
        assert not [f for f in frames if f["type"] == "error"]
        assert frames[-2]["status"] == "incomplete"
        assert frames[-2]["full_content"] == "cut short"
        await _completes_a_turn(client, fake)


async def test_dropped_or_garbage_upstream_fails_cleanly(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(DropReply(["so far"]), GarbageReply(b"<html>oops</html>", "text/html"))
    async with open_chat(server) as client:
        end, _ = await _turn_then_error(client, "one")
        assert end["status"] == "failed" and end["full_content"] == "so far"
        end, _ = await _turn_then_error(client, "two")
        assert end["status"] == "failed"
        await _completes_a_turn(client, fake)


async def test_stalled_upstream_fails_after_idle_timeout(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    server = await start_server(upstream_idle_timeout_s=0.3)
    fake.enqueue(StallReply(["before the stall"], stall_s=5.0))
    async with open_chat(server) as client:
        with trio.fail_after(3):
            end, error = await _turn_then_error(client, "hi")
        assert end["status"] == "failed" and end["full_content"] == "before the stall"
        await _completes_a_turn(client, fake)


async def test_previous_response_not_found_resends_full_history(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(
        TextReply(["first answer"], response_id="resp_gone"),
        StatusReply(
            400,
            {"error": {"code": "previous_response_not_found", "message": "not found",
                       "type": "invalid_request_error", "param": "previous_response_id"}},
        ),
        TextReply(["recovered"]),
    )
    async with open_chat(server) as client:
        await client.send(type="message", content="one")
        await client.turn()
        await client.send(type="message", content="two")
        frames = await client.turn()
    assert frames[-2]["status"] == "completed" and frames[-2]["full_content"] == "recovered"
    assert fake.requests[1].body["previous_response_id"] == "resp_gone"
    resent = fake.requests[2].body
    assert "previous_response_id" not in resent or resent["previous_response_id"] is None
    assert resent["input"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "two"},
    ]


async def test_no_store_sends_full_history_and_never_chains(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    server = await start_server(upstream_store=False)
    async with open_chat(server) as client:
        for content in ("one", "two", "three"):
            await client.send(type="message", content=content)
            await client.turn()
    bodies = [r.body for r in fake.requests]
    assert all(b.get("previous_response_id") is None and b["store"] is False for b in bodies)
    assert bodies[2]["input"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "echo: one"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "echo: two"},
        {"role": "user", "content": "three"},
    ]
    assert all(b["instructions"] == "You are a test agent." for b in bodies)


async def test_connection_dropped_before_the_first_delta_is_retried(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(DropReply([]), TextReply(["second ", "try"]))
    async with open_chat(server) as client:
        await client.send(type="message", content="hi")
        frames = await client.turn()
    assert not [f for f in frames if f["type"] == "error"]
    assert frames[-2]["status"] == "completed" and frames[-2]["full_content"] == "second try"
    assert len(fake.requests) == 2
