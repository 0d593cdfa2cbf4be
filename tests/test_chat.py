"""Connect, stream, queue, chain, persist, history, stop and disconnect, end to end:
the real server, a real WebSocket client, the fake Responses API on loopback."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

import trio

from conftest import API_KEY, open_chat
from fake_upstream import RECORDINGS_DIR, FakeUpstream, RecordingReply, TextReply
from server import ChatServer

StartServer = Callable[..., Awaitable[ChatServer]]


def _types(frames: list[dict]) -> list[str]:
    return [frame["type"] for frame in frames]


async def test_connected_frame_has_every_contract_field(server: ChatServer) -> None:
    async with open_chat(server, "fresh-session_1.x", "alice") as client:
        connected = client.connected  # type: ignore[attr-defined]
    assert connected["session_id"] == "fresh-session_1.x"
    assert connected["user_id"] == "alice"
    assert connected["resumed"] is False
    assert connected["history_length"] == 0
    assert datetime.fromisoformat(connected["timestamp"]).utcoffset().total_seconds() == 0


async def test_agent_alias_and_bearer_header_connect(server: ChatServer) -> None:
    from conftest import token_for

    async with open_chat(server, "s-alias", prefix="agent") as client:
        assert client.connected["session_id"] == "s-alias"  # type: ignore[attr-defined]
    headers = [("Authorization", f"Bearer {token_for('alice')}")]
    async with open_chat(server, "s-header", token="", headers=headers) as client:
        assert client.connected["user_id"] == "alice"  # type: ignore[attr-defined]


async def test_turn_streams_deltas_in_contract_order(
    server: ChatServer, fake: FakeUpstream
) -> None:
    chunks = ["Hé", "llo ", "wörld ", "— ✓ ", "🎉"]
    fake.enqueue(TextReply(chunks, response_id="resp_first", delay_s=0.02))
    async with open_chat(server) as client:
        await client.send(type="message", content="hi", id="m1")
        frames = await client.turn()
    types = _types(frames)
    # A client that lags may get neighbouring deltas merged into one frame; the text
    # is the same either way.
    assert types[:2] == ["typing", "response_start"] and types[-2:] == ["response_end", "typing"]
    assert set(types[2:-2]) == {"text_delta"} and len(types[2:-2]) >= 2
    assert frames[0]["is_typing"] is True and frames[-1]["is_typing"] is False
    start, end = frames[1], frames[-2]
    assert start["message_id"] == "m1"
    deltas = [f["content"] for f in frames if f["type"] == "text_delta"]
    assert "".join(deltas) == "".join(chunks)
    assert all(f["turn_id"] == start["turn_id"] for f in frames[1:-1])
    assert end["full_content"] == "".join(chunks)
    assert end["status"] == "completed"
    assert end["response_id"] == "resp_first"


async def test_deltas_arrive_as_the_upstream_sends_them(
    server: ChatServer, fake: FakeUpstream
) -> None:
    # The fake waits 0.3 s between deltas: the first must be with us long before the last
    # is even sent (no buffering of the whole answer).
    fake.enqueue(TextReply(["first ", "second ", "third"], delay_s=0.3))
    async with open_chat(server) as client:
        await client.send(type="message", content="hi")
        await client.receive_until("text_delta")
        first_at = trio.current_time()
        frames = await client.receive_until("response_end")
        assert trio.current_time() - first_at >= 0.5
    assert frames[-1]["full_content"] == "first second third"


async def test_long_recorded_unicode_answer_is_relayed_exactly(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(RecordingReply(RECORDINGS_DIR / "02_text_unicode_multidelta_gpt52.sse"))
    async with open_chat(server) as client:
        await client.send(type="message", content="tell me more")
        frames = await client.turn()
    deltas = "".join(f["content"] for f in frames if f["type"] == "text_delta")
    end = frames[-2]
    assert end["full_content"] == deltas and len(deltas) > 300 and "’" in deltas
    assert end["status"] == "completed"


async def test_message_sent_during_a_turn_is_queued_fifo(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(TextReply(["one"], delay_s=0.2, start_delay_s=0.2), TextReply(["two"]),
                 TextReply(["three"]))
    async with open_chat(server) as client:
        for n in ("a", "b", "c"):
            await client.send(type="message", content=f"msg {n}", id=n)
        turns = [await client.turn() for _ in range(3)]
    assert [t[1]["message_id"] for t in turns] == ["a", "b", "c"]
    assert [t[-2]["full_content"] for t in turns] == ["one", "two", "three"]
    turn_ids = [t[1]["turn_id"] for t in turns]
    assert len(set(turn_ids)) == 3


async def test_queue_full_past_max_queue(start_server: StartServer, fake: FakeUpstream) -> None:
    server = await start_server(max_queue=2)
    fake.enqueue(TextReply(["slow"], start_delay_s=1.0))
    async with open_chat(server) as client:
        await client.send(type="message", content="running", id="r")
        await client.receive_until("response_start")
        await client.send(type="message", content="queued 1", id="q1")
        await client.send(type="message", content="queued 2", id="q2")
        await client.send(type="message", content="one too many", id="q3")
        frames = await client.receive_until("error")
        assert frames[-1]["code"] == "queue_full"
        done = [await client.turn() for _ in range(2)]  # running (rest of it) + q1
        last = await client.turn()
    assert done[1][1]["message_id"] == "q1" and last[1]["message_id"] == "q2"


async def test_second_turn_chains_with_previous_response_id_and_instructions(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(TextReply(["first answer"], response_id="resp_1"), TextReply(["second"]))
    async with open_chat(server) as client:
        await client.send(type="message", content="first question")
        await client.turn()
        await client.send(type="message", content="second question")
        await client.turn()
    first, second = fake.requests[0].body, fake.requests[1].body
    assert first.get("previous_response_id") is None
    assert first["input"] == [{"role": "user", "content": "first question"}]
    assert second["previous_response_id"] == "resp_1"
    assert second["input"] == [{"role": "user", "content": "second question"}]
    assert first["instructions"] == second["instructions"] == "You are a test agent."
    assert second["stream"] is True and second["store"] is True
    assert fake.requests[1].headers["authorization"] == f"Bearer {API_KEY}"


async def test_history_survives_restart_and_next_turn_chains(
    start_server: StartServer, fake: FakeUpstream, nursery: trio.Nursery
) -> None:
    first = await start_server()
    fake.enqueue(TextReply(["kept"], response_id="resp_kept"))
    async with open_chat(first, "persist") as client:
        await client.send(type="message", content="remember me", id="u1")
        await client.turn()
    first.shutdown()
    second = await start_server()
    async with open_chat(second, "persist") as client:
        assert client.connected["resumed"] is True  # type: ignore[attr-defined]
        assert client.connected["history_length"] == 2  # type: ignore[attr-defined]
        await client.send(type="history")
        history = (await client.receive_until("history"))[-1]["messages"]
        await client.send(type="message", content="again")
        await client.turn()
    assert [(m["role"], m["content"], m["status"]) for m in history] == [
        ("user", "remember me", None),
        ("assistant", "kept", "completed"),
    ]
    assert fake.requests[-1].body["previous_response_id"] == "resp_kept"


async def test_history_limit_returns_latest_oldest_first(
    server: ChatServer, fake: FakeUpstream
) -> None:
    async with open_chat(server) as client:
        for n in range(3):
            await client.send(type="message", content=f"q{n}")
            await client.turn()
        await client.send(type="history", limit=3)
        messages = (await client.receive_until("history"))[-1]["messages"]
    assert [m["content"] for m in messages] == ["echo: q1", "q2", "echo: q2"]
    assert messages[0]["id"] < messages[1]["id"] < messages[2]["id"]


async def test_stop_closes_upstream_within_100ms_and_keeps_partial(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(TextReply([f"w{n} " for n in range(200)], delay_s=0.05))
    async with open_chat(server) as client:
        await client.send(type="message", content="talk a lot")
        await client.receive_until("text_delta")
        await client.receive_until("text_delta")
        stopped_at = trio.current_time()
        await client.send(type="stop")
        frames = await client.receive_until("response_end")
        end = frames[-1]
        assert (await client.receive_until("typing"))[-1]["is_typing"] is False
        upstream = fake.requests[0]
        with trio.fail_after(2):
            await upstream.closed.wait()
        await client.send(type="history")
        history = (await client.receive_until("history"))[-1]["messages"]
    assert upstream.client_closed_at is not None
    assert upstream.client_closed_at - stopped_at < 0.1
    assert end["status"] == "stopped"
    assert end["full_content"].startswith("w0 w1 ")
    assert history[-1]["status"] == "stopped"
    assert history[-1]["content"] == end["full_content"]


async def test_after_stop_next_turn_sends_partial_and_dropped_messages_as_context(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(
        TextReply(["done"], response_id="resp_done"),
        TextReply([f"w{n} " for n in range(100)], delay_s=0.05),
        TextReply(["after"]),
    )
    async with open_chat(server) as client:
        await client.send(type="message", content="one")
        await client.turn()
        await client.send(type="message", content="two")
        await client.receive_until("text_delta")
        await client.send(type="message", content="queued three")
        await client.send(type="stop")
        partial = (await client.receive_until("response_end"))[-1]["full_content"]
        await client.receive_until("typing")
        await client.send(type="message", content="four")
        frames = await client.turn()
    assert frames[-2]["full_content"] == "after"
    body = fake.requests[-1].body
    assert body["previous_response_id"] == "resp_done"
    assert body["input"] == [
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "queued three"},
        {"role": "user", "content": "four"},
    ]
    assert len(fake.requests) == 3  # the queued turn was dropped, never sent upstream


async def test_disconnect_mid_turn_without_grace_closes_upstream_and_stores_interrupted(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    server = await start_server(detach_grace_s=0)
    fake.enqueue(TextReply([f"w{n} " for n in range(200)], delay_s=0.05))
    async with open_chat(server, "vanish") as client:
        await client.send(type="message", content="go")
        await client.receive_until("text_delta")
        await client.ws._stream.aclose()  # vanish: TCP gone, no close frame
    with trio.fail_after(3):
        await fake.requests[0].closed.wait()
    async with open_chat(server, "vanish") as client:
        await client.send(type="history")
        messages = (await client.receive_until("history"))[-1]["messages"]
    assert messages[-1]["role"] == "assistant"
    assert messages[-1]["status"] == "interrupted"
    assert messages[-1]["content"].startswith("w0 ")


async def test_ping_gets_pong(server: ChatServer) -> None:
    async with open_chat(server) as client:
        await client.send(type="ping")
        pong = await client.receive()
    assert pong["type"] == "pong" and "timestamp" in pong
