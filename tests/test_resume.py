"""Answers outlive the socket (PROTOCOL.md, "Detach and resume"): a turn goes on while
its session has no connection, for up to `--detach-grace`; a connection that attaches
meanwhile gets the running turn replayed (`typing`, `response_start` with
`resumed: true`, one `text_delta` with the text so far, the tool requests waiting) and
then its live frames, with nothing lost or repeated; when the grace runs out the turn
is cancelled and stored `interrupted`, and its queued turns are dropped as context.

Every rule runs through real sockets against the fake Responses API. Where a test
needs a turn to stay mid-answer while clients come and go, the fake plays a
`PausedReply`: it streams the first chunks, waits for an event the test sets, then
streams the rest; so "the text so far" is known exactly, without timing.
A client "vanishes" by closing its TCP stream without a close frame (a network drop).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from server_process import base_env, server_process
from test_heartbeat import RawPeer
from wsproto.events import CloseConnection, TextMessage

from chat.demo_model import text_response_events
from chat.settings import load_tools
from conftest import API_KEY, CLIENT_WAIT_S, JWT_SECRET, ChatClient, open_chat
from fake_upstream import FAKE_MODEL, FakeUpstream, StallReply, TextReply, ToolCallReply
from server import ChatServer

StartServer = Callable[..., Awaitable[ChatServer]]

# One bound for each wait on the server or the fake that is not a client receive.
WAIT_S = 10.0
EXAMPLE_TOOLS = Path(__file__).resolve().parents[1] / "docs" / "tools.example.json"


@dataclass
class PausedReply:
    """A text answer: `before` streams at once, then the reply waits for `resume`,
    then `after` streams with `delay_s` between deltas. With `before` empty the turn
    has started upstream but has no text yet."""

    before: list[str]
    after: list[str]
    resume: trio.Event = field(default_factory=trio.Event)
    delay_s: float = 0.0
    response_id: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.before + self.after)

    async def play(self, out: Any) -> None:
        response_id = self.response_id or f"resp_paused_{secrets.token_hex(6)}"
        events = text_response_events(response_id, FAKE_MODEL, self.before + self.after)
        deltas = [i for i, e in enumerate(events) if e["type"] == "response.output_text.delta"]
        split = deltas[len(self.before) - 1] + 1 if self.before else deltas[0]
        await out.start(200, {"content-type": "text/event-stream"})
        await out.send_events(events[:split])
        await self.resume.wait()
        await out.send_events(events[split:], self.delay_s)
        await out.end()


# --------------------------------------------------------------------------- helpers


async def _read_text(client: ChatClient, text: str) -> list[dict[str, Any]]:
    """The turn's frames until its deltas add up to `text` (it is then mid-answer)."""
    frames: list[dict[str, Any]] = []
    received = ""
    while received != text:
        frame = await client.receive()
        if frame["type"] == "ping":
            continue
        frames.append(frame)
        if frame["type"] == "text_delta":
            received += frame["content"]
            assert text.startswith(received), received
        else:
            assert frame["type"] in ("typing", "response_start"), frame
    return frames


async def _read_deltas(client: ChatClient, count: int) -> list[dict[str, Any]]:
    """The turn's frames until `count` text_delta frames have come."""
    frames: list[dict[str, Any]] = []
    while sum(f["type"] == "text_delta" for f in frames) < count:
        frames += await client.receive_until("text_delta")
    return frames


def _text(frames: list[dict[str, Any]]) -> str:
    return "".join(f["content"] for f in frames if f["type"] == "text_delta")


def _start(frames: list[dict[str, Any]]) -> dict[str, Any]:
    return next(f for f in frames if f["type"] == "response_start")


def _end(frames: list[dict[str, Any]]) -> dict[str, Any]:
    return next(f for f in frames if f["type"] == "response_end")


async def _vanish(server: ChatServer, client: ChatClient, *, left: int = 0) -> None:
    """Drop the client's TCP connection without a close frame (a network drop), and
    return once the server has let the connection go (`left` connections remain)."""
    await client.ws._stream.aclose()
    with trio.fail_after(WAIT_S):
        await server.wait_for_connection_count(left)


async def _until_idle(server: ChatServer, session_id: str) -> None:
    """Until the session has no turn running or waiting (its last one is stored)."""
    live = server.live_session(session_id)
    if live is not None:
        with trio.fail_after(WAIT_S):
            await live.wait_until_idle()


async def _history(client: ChatClient) -> list[dict[str, Any]]:
    await client.send(type="history")
    messages: list[dict[str, Any]] = (await client.receive_until("history"))[-1]["messages"]
    return messages


async def _next_frame_is_history(client: ChatClient) -> list[dict[str, Any]]:
    """Ask for history; the first frame after `connected` must be the answer (so no
    replay came before it)."""
    await client.send(type="history")
    frame = await client.receive()
    assert frame["type"] == "history", frame
    messages: list[dict[str, Any]] = frame["messages"]
    return messages


def _rows(history: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    return [(m["role"], m["content"], m["status"]) for m in history]


def _assert_replay_opening(
    frames: list[dict[str, Any]], turn_id: str, message_id: str | None
) -> None:
    typing, start = frames[0], frames[1]
    assert typing == {"type": "typing", "is_typing": True}, typing
    assert start["type"] == "response_start", start
    assert start["resumed"] is True
    assert start["turn_id"] == turn_id
    assert start["message_id"] == message_id


def _assert_whole_turn_exact(frames: list[dict[str, Any]], full_text: str) -> None:
    """The deltas this connection received add up to the whole answer, exactly once."""
    end = _end(frames)
    assert _text(frames) == end["full_content"] == full_text
    assert end["status"] == "completed"
    assert frames[-1] == {"type": "typing", "is_typing": False}
    assert all(f["turn_id"] == end["turn_id"] for f in frames if "turn_id" in f)


# --------------------------------------------------------------------------- reconnect


async def test_reconnect_mid_answer_replays_the_text_so_far_as_one_delta_then_the_rest_live(
    server: ChatServer, fake: FakeUpstream
) -> None:
    reply = PausedReply(["Hé", "llo, ", "wörld. "], [f"w{n} " for n in range(30)], delay_s=0.005)
    fake.enqueue(reply)
    async with open_chat(server, "r-mid") as old:
        await old.send(type="message", content="talk to me", id="m1")
        seen = await _read_text(old, "Héllo, wörld. ")
        await _vanish(server, old)
    assert not fake.requests[0].closed.is_set()
    async with open_chat(server, "r-mid") as new:
        assert new.connected["resumed"] is True  # type: ignore[attr-defined]
        replay = [await new.receive() for _ in range(3)]
        reply.resume.set()
        frames = replay + await new.turn()
    _assert_replay_opening(frames, _start(seen)["turn_id"], "m1")
    assert frames[2] == {
        "type": "text_delta",
        "turn_id": _start(seen)["turn_id"],
        "content": "Héllo, wörld. ",
    }
    _assert_whole_turn_exact(frames, reply.text)
    with trio.fail_after(WAIT_S):
        await fake.requests[0].done.wait()
    assert fake.requests[0].completed_normally  # the upstream was never closed early


async def test_reconnect_while_deltas_stream_loses_and_repeats_nothing(
    server: ChatServer, fake: FakeUpstream
) -> None:
    chunks = [f"w{n} " for n in range(200)]
    fake.enqueue(TextReply(chunks, delay_s=0.01))
    async with open_chat(server, "r-flow") as old:
        await old.send(type="message", content="talk a lot", id="m1")
        seen = await _read_deltas(old, 3)
        await _vanish(server, old)
    async with open_chat(server, "r-flow") as new:
        frames = await new.turn()
    _assert_replay_opening(frames, _start(seen)["turn_id"], "m1")
    assert frames[2]["type"] == "text_delta"
    assert frames[2]["content"].startswith(_text(seen))  # all the text so far, in one
    _assert_whole_turn_exact(frames, "".join(chunks))
    with trio.fail_after(WAIT_S):
        await fake.requests[0].done.wait()
    assert fake.requests[0].completed_normally


async def test_attach_before_the_first_delta_replays_no_text_then_streams_live(
    server: ChatServer, fake: FakeUpstream
) -> None:
    reply = PausedReply([], ["late ", "but ", "whole"])
    fake.enqueue(reply)
    async with open_chat(server, "r-early") as old:
        await old.send(type="message", content="think first", id="m1")
        seen = await old.receive_until("response_start")
        await _vanish(server, old)
    async with open_chat(server, "r-early") as new:
        replay = [await new.receive() for _ in range(2)]
        reply.resume.set()
        frames = replay + await new.turn()
    _assert_replay_opening(frames, _start(seen)["turn_id"], "m1")
    deltas = [f["content"] for f in frames if f["type"] == "text_delta"]
    assert deltas[0].startswith("late ") and "" not in deltas  # no empty replay delta
    _assert_whole_turn_exact(frames, reply.text)


async def test_two_quick_reconnects_the_last_gets_the_replay_and_the_whole_rest(
    server: ChatServer, fake: FakeUpstream
) -> None:
    chunks = [f"w{n} " for n in range(200)]
    fake.enqueue(TextReply(chunks, delay_s=0.01))
    async with open_chat(server, "r-twice") as first:
        await first.send(type="message", content="talk a lot", id="m1")
        seen = await _read_deltas(first, 3)
        await _vanish(server, first)
    # The second reconnect comes before the server has even noticed the first went.
    async with open_chat(server, "r-twice") as second:
        await second.ws._stream.aclose()
    async with open_chat(server, "r-twice") as last:
        frames = await last.turn()
    _assert_replay_opening(frames, _start(seen)["turn_id"], "m1")
    assert frames[2]["type"] == "text_delta"
    assert frames[2]["content"].startswith(_text(seen))
    _assert_whole_turn_exact(frames, "".join(chunks))
    with trio.fail_after(WAIT_S):
        await fake.requests[0].done.wait()
    assert fake.requests[0].completed_normally


async def test_answer_that_finishes_while_detached_is_stored_completed_and_not_replayed(
    server: ChatServer, fake: FakeUpstream
) -> None:
    reply = PausedReply(["first "], ["second ", "third"])
    fake.enqueue(reply)
    async with open_chat(server, "r-done") as old:
        await old.send(type="message", content="answer while I am away")
        await _read_text(old, "first ")
        await _vanish(server, old)
    reply.resume.set()
    await _until_idle(server, "r-done")
    assert server.live_session("r-done") is None  # nothing left running for it
    async with open_chat(server, "r-done") as new:
        history = await _next_frame_is_history(new)
    assert _rows(history) == [
        ("user", "answer while I am away", None),
        ("assistant", "first second third", "completed"),
    ]
    assert fake.requests[0].completed_normally


async def test_message_after_reattach_queues_behind_the_resumed_turn(
    server: ChatServer, fake: FakeUpstream
) -> None:
    reply = PausedReply(["one "], ["two"])
    fake.enqueue(reply, TextReply(["next"]))
    async with open_chat(server, "r-queue") as old:
        await old.send(type="message", content="first", id="a")
        await _read_text(old, "one ")
        await _vanish(server, old)
    async with open_chat(server, "r-queue") as new:
        replay = [await new.receive() for _ in range(3)]
        await new.send(type="message", content="second", id="b")
        reply.resume.set()
        resumed = replay + await new.turn()
        following = await new.turn()
    _assert_whole_turn_exact(resumed, "one two")
    assert _start(following)["message_id"] == "b" and _start(following)["resumed"] is False
    _assert_whole_turn_exact(following, "next")


# --------------------------------------------------------------------------- the grace


async def test_grace_running_out_closes_the_upstream_and_stores_the_partial_answer_interrupted(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    grace_s = 0.5
    server = await start_server(detach_grace_s=grace_s)
    chunks = [f"w{n} " for n in range(400)]
    fake.enqueue(TextReply(chunks, delay_s=0.02))
    async with open_chat(server, "r-grace") as old:
        await old.send(type="message", content="talk a lot")
        seen = _text(await _read_deltas(old, 2))
        await _vanish(server, old)
        detached_at = trio.current_time()
    upstream = fake.requests[0]
    with trio.fail_after(WAIT_S):
        await upstream.closed.wait()
    assert upstream.client_closed_at is not None
    # The detach came a little before the server had let the connection go.
    assert grace_s - 0.1 <= upstream.client_closed_at - detached_at <= grace_s + 0.5
    await _until_idle(server, "r-grace")
    async with open_chat(server, "r-grace") as new:
        history = await _next_frame_is_history(new)
    answer = history[-1]
    assert (answer["role"], answer["status"]) == ("assistant", "interrupted")
    assert "".join(chunks).startswith(answer["content"])
    # The turn went on while detached: more text was stored than the client saw.
    assert answer["content"].startswith(seen) and len(answer["content"]) > len(seen)


async def test_queued_turns_run_while_detached_and_are_dropped_as_context_at_grace_end(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    server = await start_server(detach_grace_s=1.0)
    first = PausedReply(["one "], ["done"], response_id="resp_one")
    fake.enqueue(first, TextReply([f"w{n} " for n in range(500)], delay_s=0.02), TextReply(["ok"]))
    async with open_chat(server, "r-drop") as old:
        for content in ("q1", "q2", "q3"):
            await old.send(type="message", content=content, id=content)
        await _read_text(old, "one ")
        await _vanish(server, old)
    first.resume.set()
    with trio.fail_after(WAIT_S):
        second = await fake.wait_for_request(2)  # q1 finished detached, q2 started
        await second.closed.wait()  # the grace ran out: q2 cancelled
    await _until_idle(server, "r-drop")
    assert len(fake.requests) == 2  # q3 was dropped, never sent upstream
    async with open_chat(server, "r-drop") as new:
        history = await _next_frame_is_history(new)
        await new.send(type="message", content="q4")
        after = await new.turn()
    partial = history[3]["content"]
    assert _rows(history) == [
        ("user", "q1", None),
        ("assistant", "one done", "completed"),
        ("user", "q2", None),
        ("assistant", partial, "interrupted"),
        ("user", "q3", None),
    ]
    assert partial.startswith("w0 ")
    assert _end(after)["full_content"] == "ok"
    # The dropped turn's message, and the partial answer, are context for the next turn.
    body = fake.requests[2].body
    assert body["previous_response_id"] == "resp_one"
    assert body["input"] == [
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "q3"},
        {"role": "user", "content": "q4"},
    ]


async def test_zero_detach_grace_cancels_the_turn_at_the_disconnect(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    server = await start_server(detach_grace_s=0)
    fake.enqueue(TextReply([f"w{n} " for n in range(400)], delay_s=0.02))
    async with open_chat(server, "r-zero") as old:
        await old.send(type="message", content="go")
        seen = _text(await _read_deltas(old, 2))
        vanished_at = trio.current_time()
        await old.ws._stream.aclose()
    upstream = fake.requests[0]
    with trio.fail_after(WAIT_S):
        await upstream.closed.wait()
    assert upstream.client_closed_at is not None
    assert upstream.client_closed_at - vanished_at < 0.5  # at once, no grace
    await _until_idle(server, "r-zero")
    async with open_chat(server, "r-zero") as new:
        history = await _next_frame_is_history(new)
    assert history[-1]["status"] == "interrupted"
    assert history[-1]["content"].startswith(seen)


async def test_reconnect_while_an_expired_turn_is_being_stored_gets_no_replay_of_it(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    """The expired turn will never send a response_end: a replay of it would leave the
    client showing `typing` for ever. Its store is held open here to catch the moment."""
    server = await start_server(detach_grace_s=0)
    storing, release = trio.Event(), trio.Event()
    finish_turn = server.store.finish_turn

    async def held_finish_turn(*args: Any, **kwargs: Any) -> Any:
        storing.set()
        await release.wait()
        return await finish_turn(*args, **kwargs)

    server.store.finish_turn = held_finish_turn  # type: ignore[method-assign]
    fake.enqueue(PausedReply(["lost "], ["never"]), TextReply(["fresh"]))
    async with open_chat(server, "r-storing") as old:
        await old.send(type="message", content="first")
        await _read_text(old, "lost ")
        await old.ws._stream.aclose()
    with trio.fail_after(WAIT_S):
        await storing.wait()
    async with open_chat(server, "r-storing") as new:
        await new.send(type="message", content="second", id="b")
        with trio.fail_after(WAIT_S):
            await new.ws.send_message(json.dumps({"type": "ping"}))
            assert (await new.receive())["type"] == "pong"  # nothing was replayed before it
        release.set()
        frames = await new.turn()
        history = await _history(new)
    assert _start(frames)["message_id"] == "b" and _start(frames)["resumed"] is False
    _assert_whole_turn_exact(frames, "fresh")
    assert [(m["content"], m["status"]) for m in history] == [
        ("first", None),
        ("lost ", "interrupted"),
        ("second", None),
        ("fresh", "completed"),
    ]


# ------------------------------------------------------------- acting on the resumed turn


async def test_pending_tool_request_is_resent_on_attach_and_its_answer_continues_the_turn(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    server = await start_server(tools=load_tools(str(EXAMPLE_TOOLS)))
    fake.enqueue(
        ToolCallReply([("call_1", "get_client_time", '{"zone": "UTC"}')],
                      text_before="Let me check. ", response_id="resp_round1"),
        TextReply(["It is ", "noon."]),
    )
    async with open_chat(server, "r-tool") as old:
        await old.send(type="message", content="what time is it?", id="m1")
        seen = await old.receive_until("tool_request")
        await _vanish(server, old)
    async with open_chat(server, "r-tool") as new:
        replay = [await new.receive() for _ in range(4)]
        await new.send(type="tool_response", call_id="call_1", content="12:00 UTC")
        frames = replay + await new.turn()
        history = await _history(new)
    _assert_replay_opening(frames, _start(seen)["turn_id"], "m1")
    assert frames[2]["type"] == "text_delta" and frames[2]["content"] == "Let me check. "
    assert frames[3] == seen[-1]  # the same tool_request, sent again
    assert frames[3]["call_id"] == "call_1" and frames[3]["arguments"] == {"zone": "UTC"}
    _assert_whole_turn_exact(frames, "Let me check. It is noon.")
    outputs = [(i["call_id"], i["output"]) for i in fake.requests[1].body["input"]
               if i.get("type") == "function_call_output"]
    assert outputs == [("call_1", "12:00 UTC")]
    tool = next(m for m in history if m["role"] == "tool")
    assert (tool["call_id"], tool["output"]) == ("call_1", "12:00 UTC")


async def test_stop_after_reattach_closes_the_upstream_within_100ms(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(TextReply([f"w{n} " for n in range(300)], delay_s=0.03))
    async with open_chat(server, "r-stop") as old:
        await old.send(type="message", content="talk a lot")
        await _read_deltas(old, 2)
        await _vanish(server, old)
    async with open_chat(server, "r-stop") as new:
        frames = await _read_deltas(new, 2)  # the replay, then a live delta
        stopped_at = trio.current_time()
        await new.send(type="stop")
        frames += await new.receive_until("response_end")
        frames += await new.receive_until("typing")
        upstream = fake.requests[0]
        with trio.fail_after(WAIT_S):
            await upstream.closed.wait()
        history = await _history(new)
    assert upstream.client_closed_at is not None
    assert upstream.client_closed_at - stopped_at < 0.1
    end = _end(frames)
    assert end["status"] == "stopped"
    assert end["full_content"] == _text(frames)
    assert (history[-1]["status"], history[-1]["content"]) == ("stopped", end["full_content"])


# --------------------------------------------------------------------------- ways to go


async def test_heartbeat_timeout_detaches_the_session_instead_of_cancelling_its_turn(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    server = await start_server(heartbeat_interval_s=0.2, heartbeat_timeout_s=0.3)
    reply = PausedReply(["said "], ["the ", "rest"])
    fake.enqueue(reply)
    peer = await RawPeer.connect(server, "r-hb")
    async with peer.stream:
        await peer.send(TextMessage(data=json.dumps({"type": "message", "content": "hi"})))
        with trio.fail_after(WAIT_S):
            while "text_delta" not in [f["type"] for f in peer.json_frames()]:
                assert await peer.read_some(), "the server closed the stream"
        # From here on the peer answers nothing: its heartbeat times out.
        with trio.fail_after(WAIT_S):
            await server.wait_for_connection_count(0)
    assert not fake.requests[0].closed.is_set()
    live = server.live_session("r-hb")
    assert live is not None and live.detached
    async with open_chat(server, "r-hb") as new:
        replay = await new.receive_until("text_delta")
        reply.resume.set()
        frames = replay + await new.turn()
    _assert_replay_opening(frames, _start(peer.json_frames())["turn_id"], None)
    assert frames[2]["content"] == "said "
    _assert_whole_turn_exact([f for f in frames if f["type"] != "ping"], "said the rest")
    assert fake.requests[0].completed_normally


async def test_takeover_while_the_old_connection_closes_slowly_and_the_turn_ends_keeps_one_owner(
    server: ChatServer, fake: FakeUpstream
) -> None:
    """The newer connection waits (up to a bound) for the older one to finish closing;
    a turn that ends meanwhile must not leave the newer one attached to a session the
    server has forgotten: a third connection still takes over from it (4009)."""
    reply = PausedReply(["brief "], ["answer"])
    fake.enqueue(reply)
    old = await RawPeer.connect(server, "r-slow")
    seen: dict[str, Any] = {}
    newer_has_history = trio.Event()

    async def connect_newer() -> None:
        async with open_chat(server, "r-slow") as newer:
            seen["history"] = await _history(newer)
            newer_has_history.set()
            seen["code"] = await newer.closed_code()

    async with old.stream, trio.open_nursery() as nursery:
        await old.send(TextMessage(data=json.dumps({"type": "message", "content": "hi"})))
        with trio.fail_after(WAIT_S):
            while "text_delta" not in [f["type"] for f in old.json_frames()]:
                assert await old.read_some()
        nursery.start_soon(connect_newer)
        # The old peer gets the 4009 close frame and never answers it: the newer
        # connection now waits for the old one to finish closing.
        with trio.fail_after(WAIT_S):
            while not any(isinstance(e, CloseConnection) for e in old.events):
                assert await old.read_some()
        assert [e.code for e in old.events if isinstance(e, CloseConnection)] == [4009]
        reply.resume.set()
        await _until_idle(server, "r-slow")  # the turn ended while nobody was attached
        with trio.fail_after(WAIT_S):
            await newer_has_history.wait()
        async with open_chat(server, "r-slow") as third:
            await third.send(type="ping")
            assert (await third.receive_until("pong"))[-1]["type"] == "pong"
            assert server.connection_count == 1
    assert seen["code"] == 4009
    assert _rows(seen["history"]) == [
        ("user", "hi", None),
        ("assistant", "brief answer", "completed"),
    ]


async def test_sigterm_while_detached_stores_the_turn_interrupted_and_exits_0_within_the_grace(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    shutdown_grace_s = 3.0
    env = base_env(
        CHAT_JWT_SECRET=JWT_SECRET,
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_API_KEY=API_KEY,
        CHAT_DB=str(tmp_path / "chat.db"),
        CHAT_MODEL="test-model",
    )
    args = ["serve", "--port", "0", "--shutdown-grace", str(shutdown_grace_s),
            "--detach-grace", "30"]
    fake.enqueue(StallReply(["partial ", "answer"], stall_s=60))
    async with server_process(args, env) as proc:
        async with open_chat(proc, "r-term") as client:  # type: ignore[arg-type]
            await client.send(type="message", content="a private question")
            await _read_text(client, "partial answer")
            await client.ws._stream.aclose()
        await proc.wait_for_output(r"session r-term: detached")
        signalled_at = trio.current_time()
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit(shutdown_grace_s + 2) == 0, proc.stderr_text
        assert trio.current_time() - signalled_at < shutdown_grace_s
    with trio.fail_after(WAIT_S):
        await fake.requests[0].closed.wait()
    assert "a private question" not in proc.stderr_text
    assert "partial answer" not in proc.stderr_text
    async with server_process(args, env) as proc:
        async with open_chat(proc, "r-term") as client:  # type: ignore[arg-type]
            history = await _next_frame_is_history(client)
    assert _rows(history) == [
        ("user", "a private question", None),
        ("assistant", "partial answer", "interrupted"),
    ]


# --------------------------------------------------------------------------- visible


async def _scrape(http: httpx.AsyncClient, server: ChatServer) -> dict[str, float]:
    with trio.fail_after(CLIENT_WAIT_S):
        response = await http.get(f"http://127.0.0.1:{server.port}/metrics")
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if not sample.labels
    }


async def test_metrics_count_detached_sessions_attaches_with_a_running_turn_and_expiries(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    server = await start_server(detach_grace_s=1.5)
    kept = PausedReply(["kept "], ["going"])
    fake.enqueue(kept, PausedReply(["lost "], ["never"]))
    async with httpx.AsyncClient() as http:
        async with open_chat(server, "m-kept") as client:
            await client.send(type="message", content="one")
            await _read_text(client, "kept ")
            await _vanish(server, client)
        detached = await _scrape(http, server)
        async with open_chat(server, "m-kept") as client:
            await client.receive_until("text_delta")
            attached = await _scrape(http, server)
            kept.resume.set()
            await client.turn()
        async with open_chat(server, "m-lost") as client:
            await client.send(type="message", content="two")
            await _read_text(client, "lost ")
            await _vanish(server, client)
        with trio.fail_after(WAIT_S):
            await fake.requests[1].closed.wait()
        await _until_idle(server, "m-lost")
        expired = await _scrape(http, server)
    assert detached["chat_detached_sessions"] == 1
    assert detached["chat_attaches_with_running_turn_total"] == 0
    assert attached["chat_detached_sessions"] == 0
    assert attached["chat_attaches_with_running_turn_total"] == 1
    assert attached["chat_detach_grace_expiries_total"] == 0
    assert expired["chat_detached_sessions"] == 0
    assert expired["chat_detach_grace_expiries_total"] == 1


async def test_log_tells_detach_reattach_and_expiry_but_never_the_content(
    start_server: StartServer, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chat")
    server = await start_server(detach_grace_s=1.0)
    back = PausedReply(["secret answer "], ["continues"])
    fake.enqueue(back, PausedReply(["another secret "], ["never"]))
    async with open_chat(server, "l-back") as client:
        await client.send(type="message", content="my secret question")
        await _read_text(client, "secret answer ")
        await _vanish(server, client)
    async with open_chat(server, "l-back") as client:
        await client.receive_until("text_delta")
        back.resume.set()
        await client.turn()
    async with open_chat(server, "l-gone") as client:
        await client.send(type="message", content="my other secret")
        await _read_text(client, "another secret ")
        await _vanish(server, client)
    with trio.fail_after(WAIT_S):
        await fake.requests[1].closed.wait()
    await _until_idle(server, "l-gone")
    lines = [record.getMessage() for record in caplog.records]
    said = "\n".join(lines)
    assert re.search(r"session l-back: detached with a turn running \(grace 1 s\)", said)
    assert "session l-back: re-attached" in said
    assert re.search(r"session l-gone: detached with a turn running", said)
    assert "session l-gone: grace ran out" in said
    assert not any("l-back" in line and "grace ran out" in line for line in lines)
    for secret in ("secret question", "secret answer", "other secret", "another secret"):
        assert secret not in said
