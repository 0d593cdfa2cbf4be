"""Every frame-level error of the contract: the `error` frame and its code, nothing
stored or answered for the bad frame, and the same connection still completing a
whole turn afterwards. An oversized frame is the one that closes (1009)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import ChatClient, open_chat
from fake_upstream import FakeUpstream
from server import ChatServer
from store import SessionStore

StartServer = Callable[..., Awaitable[ChatServer]]


def _types(frames: list[dict[str, Any]]) -> list[str]:
    return [frame["type"] for frame in frames]


async def _expect_error(client: ChatClient, code: str) -> dict[str, Any]:
    """The very next frame is an `error` with `code` (and nothing of a turn before it)."""
    frame = await client.receive()
    assert frame["type"] == "error", frame
    assert frame["code"] == code, frame
    assert isinstance(frame["message"], str) and frame["message"]
    return frame


async def _assert_full_turn(client: ChatClient, content: str = "still here") -> None:
    """A message on this connection gets a whole, completed turn in contract order."""
    await client.send(type="message", content=content)
    frames = await client.turn()
    types = _types(frames)
    assert types[:2] == ["typing", "response_start"], types
    assert types[-2:] == ["response_end", "typing"], types
    assert set(types[2:-2]) == {"text_delta"}, types
    assert frames[0]["is_typing"] is True and frames[-1]["is_typing"] is False
    end = frames[-2]
    assert end["status"] == "completed"
    assert end["full_content"] == f"echo: {content}"
    assert "".join(f["content"] for f in frames if f["type"] == "text_delta") == end["full_content"]


async def _history(client: ChatClient) -> list[tuple[str, str]]:
    await client.send(type="history")
    messages = (await client.receive_until("history"))[-1]["messages"]
    return [(m["role"], m["content"]) for m in messages]


# --------------------------------------------------------------------------- invalid_message


INVALID_TEXT_FRAMES = {
    "not_json": "this is not json {",
    "truncated_json": '{"type": "message", "content": "hi"',
    "json_array": '[{"type": "message", "content": "hi"}]',
    "json_string": '"message"',
    "json_number": "42",
    "json_null": "null",
    "unknown_type": '{"type": "shout", "content": "hi"}',
    "missing_type": '{"content": "hi"}',
    "type_not_a_string": '{"type": 5, "content": "hi"}',
    "content_int": '{"type": "message", "content": 5}',
    "content_missing": '{"type": "message"}',
    "content_empty": '{"type": "message", "content": ""}',
    "content_null": '{"type": "message", "content": null}',
    "id_too_long": json.dumps({"type": "message", "content": "hi", "id": "i" * 65}),
    "id_int": '{"type": "message", "content": "hi", "id": 7}',
    "metadata_string": '{"type": "message", "content": "hi", "metadata": "not an object"}',
    "metadata_list": '{"type": "message", "content": "hi", "metadata": [1, 2]}',
    "limit_string": '{"type": "history", "limit": "5"}',
    "limit_zero": '{"type": "history", "limit": 0}',
    "limit_over_500": '{"type": "history", "limit": 501}',
    "tool_response_call_id_int": '{"type": "tool_response", "call_id": 7, "content": "x"}',
    "tool_response_content_missing": '{"type": "tool_response", "call_id": "c1"}',
}


@pytest.mark.parametrize("case", list(INVALID_TEXT_FRAMES))
async def test_invalid_frame_gets_invalid_message_and_connection_keeps_working(
    server: ChatServer, fake: FakeUpstream, case: str
) -> None:
    async with open_chat(server) as client:
        await client.send_raw(INVALID_TEXT_FRAMES[case])
        await _expect_error(client, "invalid_message")
        await _assert_full_turn(client)
        history = await _history(client)
    assert history == [("user", "still here"), ("assistant", "echo: still here")]
    assert len(fake.requests) == 1


async def test_binary_frame_gets_invalid_message_and_connection_keeps_working(
    server: ChatServer, fake: FakeUpstream
) -> None:
    async with open_chat(server) as client:
        await client.send_raw(json.dumps({"type": "message", "content": "as bytes"}).encode())
        await _expect_error(client, "invalid_message")
        await _assert_full_turn(client)
        history = await _history(client)
    assert history == [("user", "still here"), ("assistant", "echo: still here")]
    assert len(fake.requests) == 1


async def test_valid_frame_with_metadata_and_id_of_64_chars_is_accepted(
    server: ChatServer, fake: FakeUpstream
) -> None:
    async with open_chat(server) as client:
        await client.send(type="message", content="ok", id="i" * 64, metadata={"k": [1]})
        frames = await client.turn()
    assert frames[1]["message_id"] == "i" * 64
    assert frames[-2]["status"] == "completed"


# --------------------------------------------------------------------------- message_too_large


async def test_content_over_max_content_chars_gets_message_too_large(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    server = await start_server(max_content_chars=50)
    async with open_chat(server) as client:
        await client.send(type="message", content="x" * 51, id="big")
        await _expect_error(client, "message_too_large")
        # The limit counts characters, not bytes: 50 two-byte characters fit.
        await _assert_full_turn(client, "é" * 50)
        history = await _history(client)
    assert history == [("user", "é" * 50), ("assistant", "echo: " + "é" * 50)]
    assert len(fake.requests) == 1


# --------------------------------------------------------------------------- duplicate_message


async def test_duplicate_message_id_is_refused_not_stored_and_not_answered(
    server: ChatServer, fake: FakeUpstream
) -> None:
    async with open_chat(server) as client:
        await client.send(type="message", content="first", id="m1")
        first = await client.turn()
        assert first[1]["message_id"] == "m1"
        await client.send(type="message", content="first again", id="m1")
        await _expect_error(client, "duplicate_message")
        assert len(fake.requests) == 1
        await _assert_full_turn(client)
        history = await _history(client)
    assert history == [
        ("user", "first"),
        ("assistant", "echo: first"),
        ("user", "still here"),
        ("assistant", "echo: still here"),
    ]
    assert len(fake.requests) == 2
    assert fake.requests[1].body["input"] == [{"role": "user", "content": "still here"}]


async def test_duplicate_message_id_is_refused_across_reconnects(
    server: ChatServer, fake: FakeUpstream
) -> None:
    async with open_chat(server) as client:
        await client.send(type="message", content="first", id="m1")
        await client.turn()
    async with open_chat(server) as client:
        await client.send(type="message", content="resent after reconnect", id="m1")
        await _expect_error(client, "duplicate_message")
        await _assert_full_turn(client)
    assert len(fake.requests) == 2


# --------------------------------------------------------------------------- frame size: 1009


async def test_frame_over_max_frame_bytes_closes_1009_and_stores_nothing(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    server = await start_server(max_frame_bytes=1024)
    async with open_chat(server) as client:
        await _assert_full_turn(client, "y" * 900)  # under the limit, frame and all
        await client.send(type="message", content="z" * 1100)
        assert await client.closed_code() == 1009
    async with open_chat(server) as client:
        assert client.connected["history_length"] == 2  # type: ignore[attr-defined]
    assert len(fake.requests) == 1


# --------------------------------------------------------------------------- rate_limited


async def _frames_until(client: ChatClient, done: Callable[[list[dict[str, Any]]], bool]) -> list:
    frames: list[dict[str, Any]] = []
    while not done(frames):
        frame = await client.receive()
        if frame["type"] != "ping":
            frames.append(frame)
    return frames


def _turns_ended_and_error(turns: int, code: str) -> Callable[[list[dict[str, Any]]], bool]:
    def done(frames: list[dict[str, Any]]) -> bool:
        ended = sum(f["type"] == "typing" and f["is_typing"] is False for f in frames)
        return ended == turns and any(f["type"] == "error" for f in frames)

    return done


async def test_message_over_rate_limit_gets_rate_limited_and_is_not_stored(
    start_server: StartServer, fake: FakeUpstream, tmp_path: Path
) -> None:
    server = await start_server(rate_limit_messages=2, rate_limit_window_s=60)
    async with open_chat(server, "s-rate") as client:
        for n in range(3):
            await client.send(type="message", content=f"m{n}", id=f"m{n}")
        frames = await _frames_until(client, _turns_ended_and_error(2, "rate_limited"))
        errors = [f for f in frames if f["type"] == "error"]
        assert [e["code"] for e in errors] == ["rate_limited"]
        assert [f["message_id"] for f in frames if f["type"] == "response_start"] == ["m0", "m1"]
        # Still connected and served (a ping is not a message).
        await client.send(type="ping")
        assert (await client.receive())["type"] == "pong"
        store = await SessionStore.open(tmp_path / "chat.db")
        try:
            stored = await store.history("s-rate", 100)
        finally:
            await store.aclose()
    # (What each answer says depends on the context the fake saw; only m2 must be absent.)
    assert [(m.role, m.content if m.role == "user" else m.status) for m in stored] == [
        ("user", "m0"),
        ("assistant", "completed"),
        ("user", "m1"),
        ("assistant", "completed"),
    ]
    assert len(fake.requests) == 2


async def test_rate_limited_connection_completes_a_turn_once_the_window_refills(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    window_s = 0.5
    server = await start_server(rate_limit_messages=2, rate_limit_window_s=window_s)
    async with open_chat(server) as client:
        for n in range(3):
            await client.send(type="message", content=f"m{n}")
        await _frames_until(client, _turns_ended_and_error(2, "rate_limited"))
        # The bucket refills evenly over the window; no event marks it, so wait it out.
        await trio.sleep(window_s)
        await _assert_full_turn(client)
    assert len(fake.requests) == 3


# --------------------------------------------------------------------------- unknown_call_id


async def test_tool_response_for_unknown_call_id_gets_unknown_call_id(
    server: ChatServer, fake: FakeUpstream
) -> None:
    async with open_chat(server) as client:
        await client.send(type="tool_response", call_id="call_nobody_asked", content="42")
        await _expect_error(client, "unknown_call_id")
        await _assert_full_turn(client)
        history = await _history(client)
    assert history == [("user", "still here"), ("assistant", "echo: still here")]
    assert len(fake.requests) == 1
