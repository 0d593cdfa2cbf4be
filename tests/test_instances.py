"""Several instances (PROTOCOL.md, "Several instances"): with `--redis-url`, server
processes sharing one database form one service, and every rule of the contract holds
across them as if they were one server. One test per rule of that section.

Black box through real sockets only: each test starts a real `redis-server` of its own
on a free loopback port (`redis_server.py`), two in-process servers
(`start_server(redis_url=..., db_path=<one shared SQLite file>)`, each on its own
port 0) against the same fake Responses API, and talks to them as clients do. The
instance that dies is a child process (`server_process.py`) so it can be killed with
SIGKILL. Nothing here imports the clustering code: only `Config` fields and the
public `ChatServer` attributes.

Where a turn must stay mid-answer while clients move between instances, the fake plays
`PausedReply` (see test_resume.py), so "the text so far" is known exactly.

Bounds: every test body runs under `trio.fail_after(TEST_S)` and every client receive
under its own `CLIENT_WAIT_S`. Events are awaited, never slept on, except for two
external recoveries that signal nothing (a dead instance's turns being stored by
another, Redis coming back): those are polled every POLL_S within the contract's bound.

Without redis-server these tests are skipped, except under CI=true where they fail
(build/install-services.sh installs it).
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from redis_server import RedisMissing, RedisServer, ping
from server_process import base_env, server_process
from test_resume import (
    EXAMPLE_TOOLS,
    PausedReply,
    _assert_replay_opening,
    _assert_whole_turn_exact,
    _end,
    _history,
    _read_deltas,
    _read_text,
    _rows,
    _start,
    _text,
    _vanish,
)
from trio_websocket import open_websocket_url

from chat.settings import load_tools
from conftest import (
    API_KEY,
    CLIENT_WAIT_S,
    JWT_SECRET,
    ChatClient,
    open_chat,
    refusal,
    token_for,
    ws_url,
)
from fake_upstream import FakeUpstream, StallReply, TextReply, ToolCallReply
from server import ChatServer, Config, run_server

StartServer = Callable[..., Awaitable[ChatServer]]

# A whole test: several servers, a few turns; generous on a loaded CI box.
TEST_S = 60.0
# Waits on a server or the fake that are not a client receive.
WAIT_S = 10.0
# The contract's bound for another instance to store a dead instance's turns.
DEAD_INSTANCE_STORED_S = 15.0
# How long Redis may take to be noticed again once it is back (no event to await).
REDIS_RECOVERY_S = 15.0
POLL_S = 0.1
STOP_CLOSES_UPSTREAM_S = 0.1


# =========================================================================== fixtures


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A Redis server of this test's own (skipped without redis-server, failed under
    CI). Set up before the servers and torn down after them."""
    try:
        server = RedisServer.create()
    except RedisMissing as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"redis-server is required under CI: {missing}")
        pytest.skip(f"{missing}: run build/install-services.sh to test several instances")
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def shared_db(tmp_path: Path) -> str:
    """The SQLite file every instance of the test shares."""
    return str(tmp_path / "shared.db")


@pytest.fixture
def start_instance(start_server: StartServer, redis: RedisServer, shared_db: str) -> StartServer:
    """Start one more in-process instance of the service: the test's Redis, the shared
    database, the common fake upstream, a port of its own."""

    async def start(**overrides: Any) -> ChatServer:
        return await start_server(redis_url=redis.url, db_path=shared_db, **overrides)

    return start


# =========================================================================== helpers


async def _refusal_code(server: ChatServer, session_id: str, user: str) -> int | None:
    """Connect as `user` and read until closed; the close code. Fails if a frame (a
    `connected` above all) arrives first."""
    code, _ = await refusal(ws_url(server, session_id, token_for(user)))
    return code


async def _expect_error(client: ChatClient, code: str) -> dict[str, Any]:
    """The next frame (pings aside) is an `error` with `code`."""
    frames = await client.receive_until("error")
    assert len(frames) == 1, frames
    assert frames[0]["code"] == code, frames[0]
    return frames[0]


Frames = list[dict[str, Any]]


async def _turn_of(client: ChatClient, message_id: str) -> tuple[Frames, Frames]:
    """(the frames of the turn answering `message_id`, from its `typing` true to its
    `typing` false; every other frame that came before it)."""
    before: list[dict[str, Any]] = []
    while True:
        frame = await client.receive()
        if frame["type"] == "response_start" and frame["message_id"] == message_id:
            break
        if frame["type"] != "ping":
            before.append(frame)
    assert before and before[-1] == {"type": "typing", "is_typing": True}, before
    frames = [before.pop(), frame]
    while frames[-1]["type"] != "response_end" or frames[-1]["turn_id"] != frame["turn_id"]:
        frames += await client.receive_until("response_end")
    frames += await client.receive_until("typing")
    return frames, before


async def _healthz(http: httpx.AsyncClient, server: ChatServer) -> tuple[int, Any]:
    with trio.fail_after(CLIENT_WAIT_S):
        response = await http.get(f"http://127.0.0.1:{server.port}/healthz")
    return response.status_code, response.json()


@asynccontextmanager
async def _connect_by(
    port: int, session_id: str, deadline: float, user: str = "alice"
) -> AsyncIterator[ChatClient]:
    """Connect to the instance on `port`; `connected` must come before `deadline`
    (trio clock), however long the instance takes to admit the connection."""
    url = f"ws://127.0.0.1:{port}/ws/chat/{session_id}?token={token_for(user)}"
    async with open_websocket_url(
        url,
        connect_timeout=max(deadline - trio.current_time(), 0.01),
        disconnect_timeout=CLIENT_WAIT_S,
    ) as ws:
        client = ChatClient(ws)
        frame = await client.receive(max(deadline - trio.current_time(), 0.01))
        assert frame["type"] == "connected", frame
        client.connected = frame  # type: ignore[attr-defined]
        yield client


# =========================================================================== one session


async def test_history_written_through_one_instance_is_read_through_another(
    start_instance: StartServer, fake: FakeUpstream
) -> None:
    a, b = await start_instance(), await start_instance()
    with trio.fail_after(TEST_S):
        async with open_chat(a, "h-shared") as client:
            await client.send(type="message", content="written on A", id="m1")
            assert _end(await client.turn())["status"] == "completed"
        async with open_chat(b, "h-shared") as client:
            assert client.connected["resumed"] is True  # type: ignore[attr-defined]
            assert client.connected["history_length"] == 2  # type: ignore[attr-defined]
            on_b = await _history(client)
            await client.send(type="message", content="written on B", id="m2")
            assert _end(await client.turn())["status"] == "completed"
        async with open_chat(a, "h-shared") as client:
            on_a = await _history(client)
    assert _rows(on_b) == [
        ("user", "written on A", None),
        ("assistant", "echo: written on A", "completed"),
    ]
    assert _rows(on_a) == [
        *_rows(on_b),
        ("user", "written on B", None),
        ("assistant", "echo: written on B", "completed"),
    ]


async def test_session_of_one_user_refuses_another_user_4003_on_every_instance(
    start_instance: StartServer, fake: FakeUpstream
) -> None:
    a, b = await start_instance(), await start_instance()
    with trio.fail_after(TEST_S):
        async with open_chat(a, "owned", "alice") as alice:
            assert await _refusal_code(b, "owned", "bob") == 4003  # while she is on A
            await alice.send(type="message", content="mine")
            await alice.turn()
        assert await _refusal_code(b, "owned", "bob") == 4003  # after she left
        assert await _refusal_code(a, "owned", "bob") == 4003
        # The refusals changed nothing: alice still owns it, through either instance.
        async with open_chat(b, "owned", "alice") as alice:
            assert alice.connected["resumed"] is True  # type: ignore[attr-defined]
            assert alice.connected["history_length"] == 2  # type: ignore[attr-defined]
    assert len(fake.requests) == 1


async def test_max_connections_per_user_counts_connections_on_every_instance_4008(
    start_instance: StartServer,
) -> None:
    a = await start_instance(max_connections_per_user=2)
    b = await start_instance(max_connections_per_user=2)
    with trio.fail_after(TEST_S):
        async with open_chat(a, "u1", "alice") as first, open_chat(b, "u2", "alice"):
            assert await _refusal_code(a, "u3", "alice") == 4008
            assert await _refusal_code(b, "u3", "alice") == 4008
            async with open_chat(b, "b1", "bob") as bob:  # other users are unaffected
                assert bob.connected["user_id"] == "bob"  # type: ignore[attr-defined]
            # One of hers closes (on A): a new one is admitted (on B).
            await first.ws.aclose()
            with trio.fail_after(WAIT_S):
                await a.wait_for_connection_count(0)
            async with open_chat(b, "u3", "alice") as third:
                assert third.connected["session_id"] == "u3"  # type: ignore[attr-defined]
                assert await _refusal_code(a, "u4", "alice") == 4008  # full again


async def test_takeover_on_another_instance_does_not_count_against_the_user_limit(
    start_instance: StartServer,
) -> None:
    a = await start_instance(max_connections_per_user=2)
    b = await start_instance(max_connections_per_user=2)
    with trio.fail_after(TEST_S):
        async with open_chat(a, "u1", "alice") as old, open_chat(b, "u2", "alice"):
            async with open_chat(b, "u1", "alice") as new:
                assert new.connected["resumed"] is True  # type: ignore[attr-defined]
                assert await old.closed_code() == 4009
                assert await _refusal_code(a, "u3", "alice") == 4008  # still two


# =========================================================================== a running turn


async def test_takeover_on_another_instance_closes_the_old_4009_and_replays_then_streams_live(
    start_instance: StartServer, fake: FakeUpstream
) -> None:
    a, b = await start_instance(), await start_instance()
    reply = PausedReply(["Hé", "llo, ", "wörld. "], [f"w{n} " for n in range(30)], delay_s=0.005)
    fake.enqueue(reply)
    with trio.fail_after(TEST_S):
        async with open_chat(a, "t-mid") as old:
            await old.send(type="message", content="talk to me", id="m1")
            seen = await _read_text(old, "Héllo, wörld. ")
            async with open_chat(b, "t-mid") as new:
                assert new.connected["resumed"] is True  # type: ignore[attr-defined]
                assert await old.closed_code() == 4009
                replay = [await new.receive() for _ in range(3)]
                reply.resume.set()
                frames = replay + await new.turn()
        with trio.fail_after(WAIT_S):
            await fake.requests[0].done.wait()
    turn_id = _start(seen)["turn_id"]
    _assert_replay_opening(frames, turn_id, "m1")
    assert frames[2] == {"type": "text_delta", "turn_id": turn_id, "content": "Héllo, wörld. "}
    _assert_whole_turn_exact(frames, reply.text)
    assert len(fake.requests) == 1  # the turn ran once, on A
    assert fake.requests[0].completed_normally  # and was never closed early


async def test_reconnect_on_another_instance_after_a_drop_replays_then_streams_live(
    start_instance: StartServer, fake: FakeUpstream
) -> None:
    a, b = await start_instance(), await start_instance()
    reply = PausedReply(["Hé", "llo, ", "wörld. "], [f"w{n} " for n in range(30)], delay_s=0.005)
    fake.enqueue(reply)
    with trio.fail_after(TEST_S):
        async with open_chat(a, "r-mid") as old:
            await old.send(type="message", content="talk to me", id="m1")
            seen = await _read_text(old, "Héllo, wörld. ")
            await _vanish(a, old)  # detached on A, within the grace
        assert not fake.requests[0].closed.is_set()
        async with open_chat(b, "r-mid") as new:
            assert new.connected["resumed"] is True  # type: ignore[attr-defined]
            replay = [await new.receive() for _ in range(3)]
            reply.resume.set()
            frames = replay + await new.turn()
            history = await _history(new)
        with trio.fail_after(WAIT_S):
            await fake.requests[0].done.wait()
    turn_id = _start(seen)["turn_id"]
    _assert_replay_opening(frames, turn_id, "m1")
    assert frames[2] == {"type": "text_delta", "turn_id": turn_id, "content": "Héllo, wörld. "}
    _assert_whole_turn_exact(frames, reply.text)
    assert len(fake.requests) == 1
    assert fake.requests[0].completed_normally
    assert _rows(history) == [("user", "talk to me", None), ("assistant", reply.text, "completed")]


async def test_stop_on_another_instance_closes_the_upstream_within_100ms(
    start_instance: StartServer, fake: FakeUpstream
) -> None:
    a, b = await start_instance(), await start_instance()
    fake.enqueue(TextReply([f"w{n} " for n in range(300)], delay_s=0.03))
    with trio.fail_after(TEST_S):
        async with open_chat(a, "s-stop") as old:
            await old.send(type="message", content="talk a lot")
            await _read_deltas(old, 2)
            await _vanish(a, old)
        async with open_chat(b, "s-stop") as new:
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
    assert upstream.client_closed_at - stopped_at < STOP_CLOSES_UPSTREAM_S
    end = _end(frames)
    assert end["status"] == "stopped"
    assert end["full_content"] == _text(frames)
    assert frames[-1] == {"type": "typing", "is_typing": False}
    assert (history[-1]["status"], history[-1]["content"]) == ("stopped", end["full_content"])
    assert len(fake.requests) == 1


async def test_tool_response_on_another_instance_reaches_the_waiting_turn_which_continues(
    start_instance: StartServer, fake: FakeUpstream
) -> None:
    tools = load_tools(str(EXAMPLE_TOOLS))
    a, b = await start_instance(tools=tools), await start_instance(tools=tools)
    fake.enqueue(
        ToolCallReply([("call_1", "get_client_time", '{"zone": "UTC"}')],
                      text_before="Let me check. ", response_id="resp_round1"),
        TextReply(["It is ", "noon."]),
    )
    with trio.fail_after(TEST_S):
        async with open_chat(a, "x-tool") as old:
            await old.send(type="message", content="what time is it?", id="m1")
            seen = await old.receive_until("tool_request")
            await _vanish(a, old)
        async with open_chat(b, "x-tool") as new:
            replay = [await new.receive() for _ in range(4)]
            await new.send(type="tool_response", call_id="call_1", content="12:00 UTC")
            frames = replay + await new.turn()
            history = await _history(new)
    _assert_replay_opening(frames, _start(seen)["turn_id"], "m1")
    assert frames[2]["type"] == "text_delta" and frames[2]["content"] == "Let me check. "
    assert frames[3] == seen[-1]  # the same tool_request, sent again by B
    _assert_whole_turn_exact(frames, "Let me check. It is noon.")
    assert len(fake.requests) == 2
    assert fake.requests[1].body["previous_response_id"] == "resp_round1"
    outputs = [(i["call_id"], i["output"]) for i in fake.requests[1].body["input"]
               if i.get("type") == "function_call_output"]
    assert outputs == [("call_1", "12:00 UTC")]
    tool = next(m for m in history if m["role"] == "tool")
    assert (tool["call_id"], tool["output"]) == ("call_1", "12:00 UTC")


async def test_message_sent_on_another_instance_during_a_turn_queues_behind_it_never_interleaved(
    start_instance: StartServer, fake: FakeUpstream
) -> None:
    """Turns never interleave (PROTOCOL.md, Order within a turn), wherever they run: a
    message accepted by B while A's turn runs waits for that turn to end."""
    a, b = await start_instance(), await start_instance()
    first = PausedReply(["first "], ["answer"], response_id="resp_first")
    fake.enqueue(first, TextReply(["second ", "answer"]))
    with trio.fail_after(TEST_S):
        async with open_chat(a, "q-two") as old:
            await old.send(type="message", content="one", id="m1")
            await _read_text(old, "first ")
            async with open_chat(b, "q-two") as new:
                assert await old.closed_code() == 4009
                replay = [await new.receive() for _ in range(3)]
                await new.send(type="message", content="two", id="m2")
                first.resume.set()
                one = replay + await new.turn()
                two = await new.turn()
                history = await _history(new)
    _assert_whole_turn_exact(one, "first answer")
    assert _start(one)["message_id"] == "m1" and _start(one)["resumed"] is True
    _assert_whole_turn_exact(two, "second answer")
    assert _start(two)["message_id"] == "m2" and _start(two)["resumed"] is False
    assert _rows(history) == [
        ("user", "one", None),
        ("assistant", "first answer", "completed"),
        ("user", "two", None),
        ("assistant", "second answer", "completed"),
    ]
    # m2's request was made after m1's answer was complete: it chains on it.
    assert fake.requests[1].body["previous_response_id"] == "resp_first"
    assert fake.requests[1].body["input"] == [{"role": "user", "content": "two"}]


async def test_delete_through_another_instance_closes_the_socket_4410_and_cancels_the_turn(
    start_instance: StartServer, fake: FakeUpstream
) -> None:
    a, b = await start_instance(), await start_instance()
    fake.enqueue(TextReply([f"w{n} " for n in range(300)], delay_s=0.03))
    headers = {"Authorization": f"Bearer {token_for('alice')}"}
    with trio.fail_after(TEST_S):
        async with open_chat(a, "doomed") as client, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{b.port}/api/sessions", headers=headers,
            timeout=CLIENT_WAIT_S,
        ) as api:
            await client.send(type="message", content="talk")
            await client.receive_until("text_delta")
            running = (await api.get("/doomed")).json()["running"]  # it runs on A
            assert (await api.delete("/doomed")).status_code == 204
            assert await client.closed_code() == 4410
            with trio.fail_after(WAIT_S):
                await fake.requests[0].closed.wait()
            assert (await api.get("/doomed")).status_code == 404
        async with open_chat(a, "doomed", "bob") as fresh:  # the id is free again
            assert fresh.connected["resumed"] is False  # type: ignore[attr-defined]
            assert fresh.connected["history_length"] == 0  # type: ignore[attr-defined]
    assert running is True


async def test_message_id_accepted_on_one_instance_is_a_duplicate_on_another(
    start_instance: StartServer, fake: FakeUpstream
) -> None:
    a, b = await start_instance(), await start_instance()
    with trio.fail_after(TEST_S):
        async with open_chat(a, "d-dup") as client:
            await client.send(type="message", content="first", id="m1")
            await client.turn()
        async with open_chat(b, "d-dup") as client:
            await client.send(type="message", content="first again", id="m1")
            await _expect_error(client, "duplicate_message")
            await client.send(type="message", content="still here", id="m2")
            frames = await client.turn()
            history = await _history(client)
    assert _start(frames)["message_id"] == "m2"
    assert _rows(history) == [
        ("user", "first", None),
        ("assistant", "echo: first", "completed"),
        ("user", "still here", None),
        ("assistant", "echo: still here", "completed"),
    ]
    assert len(fake.requests) == 2


# =========================================================================== failures


async def test_instance_killed_mid_answer_another_stores_its_turn_interrupted_within_15s(
    start_instance: StartServer, fake: FakeUpstream, redis: RedisServer, shared_db: str
) -> None:
    b = await start_instance()
    env = base_env(
        CHAT_JWT_SECRET=JWT_SECRET,
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_API_KEY=API_KEY,
        CHAT_MODEL="test-model",
    )
    args = ["serve", "--port", "0", "--db", shared_db, "--redis-url", redis.url,
            "--detach-grace", "60"]
    fake.enqueue(StallReply(["partial ", "answer"], stall_s=120))
    with trio.fail_after(TEST_S):
        async with server_process(args, env) as proc:
            async with open_chat(proc, "k-dead") as client:  # type: ignore[arg-type]
                await client.send(type="message", content="a long question", id="m1")
                seen = _text(await _read_text(client, "partial answer"))
                proc.kill()
                killed_at = trio.current_time()
                assert await proc.wait_exit() == -9
                await client.closed_code()  # the socket died with the instance
        deadline = killed_at + DEAD_INSTANCE_STORED_S
        assert b.port is not None
        received: Frames = []  # what B sent besides the history answers and the new turn
        async with _connect_by(b.port, "k-dead", deadline) as survivor:
            while True:
                await survivor.send(type="history")
                while (frame := await survivor.receive())["type"] != "history":
                    received.append(frame)
                history: Frames = frame["messages"]
                if len(history) >= 2:
                    break
                assert trio.current_time() < deadline, f"not stored in time: {history}"
                await trio.sleep(POLL_S)  # an external recovery: nothing to await
            await survivor.send(type="message", content="are you there?", id="m2")
            frames, before = await _turn_of(survivor, "m2")
            received += before
            after = await _history(survivor)
    assert _rows(history[:1]) == [("user", "a long question", None)]
    interrupted = history[1]
    assert (interrupted["role"], interrupted["status"]) == ("assistant", "interrupted"), history
    # Kept as far as it was stored: never more than the client saw, maybe nothing.
    assert seen.startswith(interrupted["content"]), (seen, interrupted["content"])
    assert len(history) == 2
    _assert_whole_turn_exact(frames, "echo: are you there?")
    assert _rows(after)[2:] == [
        ("user", "are you there?", None),
        ("assistant", "echo: are you there?", "completed"),
    ]
    # If B replayed the dead turn, it also ended it, as any turn ends (the client would
    # otherwise show `typing` for ever): one response_end whose full_content is the
    # text of that turn's deltas here, then typing false.
    dead = [f for f in received if f["type"] != "ping"]
    if any(f["type"] == "response_start" for f in dead):
        _assert_replay_opening(dead, _start(dead)["turn_id"], "m1")
        end = _end(dead)
        assert end["turn_id"] == _start(dead)["turn_id"], dead
        assert end["full_content"] == _text(dead) == interrupted["content"], dead
        assert dead[-1] == {"type": "typing", "is_typing": False}, dead
        assert [f["type"] for f in dead].count("response_end") == 1, dead
    else:
        assert dead == [], dead


async def test_sigterm_on_an_instance_mid_turn_exits_0_within_the_grace_and_stores_it_interrupted(
    start_instance: StartServer, fake: FakeUpstream, redis: RedisServer, shared_db: str
) -> None:
    """Shutdown (PROTOCOL.md, Behaviour) holds with Redis too: the turn's lease and the
    connection's slot are given back while the Redis client is still open."""
    b = await start_instance()
    shutdown_grace_s = 3.0
    env = base_env(
        CHAT_JWT_SECRET=JWT_SECRET,
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_API_KEY=API_KEY,
        CHAT_MODEL="test-model",
    )
    args = ["serve", "--port", "0", "--db", shared_db, "--redis-url", redis.url,
            "--shutdown-grace", str(shutdown_grace_s)]
    fake.enqueue(StallReply(["partial ", "answer"], stall_s=120))
    with trio.fail_after(TEST_S):
        async with server_process(args, env) as proc:
            async with open_chat(proc, "g-term") as client:  # type: ignore[arg-type]
                await client.send(type="message", content="a long question", id="m1")
                await _read_text(client, "partial answer")
                signalled_at = trio.current_time()
                proc.send_signal(signal.SIGTERM)
                assert await client.closed_code() == 1001
                assert await proc.wait_exit(shutdown_grace_s + 2) == 0, proc.stderr_text
                assert trio.current_time() - signalled_at < shutdown_grace_s
        assert "Traceback" not in proc.stderr_text, proc.stderr_text
        async with open_chat(b, "g-term") as client:
            history = await _history(client)
            await client.send(type="message", content="still usable?", id="m2")
            frames = await client.turn()
    assert _rows(history) == [
        ("user", "a long question", None),
        ("assistant", "partial answer", "interrupted"),
    ]
    _assert_whole_turn_exact(frames, "echo: still usable?")


async def test_cancelling_an_embedded_instance_mid_turn_ends_it_cleanly(
    start_instance: StartServer,
    make_config: Callable[..., Config],
    fake: FakeUpstream,
    redis: RedisServer,
    shared_db: str,
) -> None:
    """Entry points work with `nursery.start` (STYLE.md, 9): cancelling the nursery of
    an instance whose turn runs raises nothing; its Redis client outlives the turn's
    clean-up, which stores the turn `interrupted` and gives its lease back, so another
    instance can run the session's next turn at once."""
    b = await start_instance()
    reply = PausedReply(["so far "], ["never sent"])
    fake.enqueue(reply)
    config = make_config(redis_url=redis.url, db_path=shared_db)
    with trio.fail_after(TEST_S):
        async with trio.open_nursery() as embedder:
            a: ChatServer = await embedder.start(run_server, config)
            async with open_chat(a, "e-cancel") as client:
                await client.send(type="message", content="go", id="m1")
                await _read_text(client, "so far ")
                embedder.cancel_scope.cancel()
        with trio.fail_after(WAIT_S):
            await fake.requests[0].closed.wait()
        async with open_chat(b, "e-cancel") as client:
            history = await _history(client)
            await client.send(type="message", content="next", id="m2")
            frames = await client.turn()
    assert _rows(history) == [("user", "go", None), ("assistant", "so far ", "interrupted")]
    _assert_whole_turn_exact(frames, "echo: next")


async def test_while_redis_is_unreachable_new_connections_get_1013_open_ones_work_and_healthz_503(
    start_instance: StartServer, fake: FakeUpstream, redis: RedisServer
) -> None:
    a = await start_instance()
    with trio.fail_after(TEST_S):
        async with httpx.AsyncClient() as http:
            assert await _healthz(http, a) == (200, {"status": "ok"})
            async with open_chat(a, "ru-kept") as kept:
                await kept.send(type="message", content="before", id="m1")
                assert _end(await kept.turn())["status"] == "completed"
                await trio.to_thread.run_sync(redis.stop)
                assert await _refusal_code(a, "ru-new", "alice") == 1013
                assert await _refusal_code(a, "ru-other", "bob") == 1013
                await kept.send(type="message", content="during", id="m2")
                during = await kept.turn()
                assert await _healthz(http, a) == (503, {"status": "degraded"})

                await trio.to_thread.run_sync(redis.start)  # the same port
                recovered_by = trio.current_time() + REDIS_RECOVERY_S
                while (health := await _healthz(http, a)) != (200, {"status": "ok"}):
                    assert trio.current_time() < recovered_by, f"still {health}"
                    await trio.sleep(POLL_S)  # an external recovery: nothing to await
                async with open_chat(a, "ru-new", "alice") as new:
                    assert new.connected["session_id"] == "ru-new"  # type: ignore[attr-defined]
                await kept.send(type="ping")
                assert (await kept.receive_until("pong"))[-1]["type"] == "pong"
        async with open_chat(a, "ru-kept") as client:
            history = await _history(client)
    end = _end(during)
    assert (end["status"], end["full_content"]) == ("completed", "echo: during")
    assert _text(during) == "echo: during"
    # No message that got its `typing` is lost.
    assert _rows(history) == [
        ("user", "before", None),
        ("assistant", "echo: before", "completed"),
        ("user", "during", None),
        ("assistant", "echo: during", "completed"),
    ]


async def test_after_redis_comes_back_a_connection_kept_through_the_outage_is_taken_over_4009(
    start_instance: StartServer, fake: FakeUpstream, redis: RedisServer
) -> None:
    """Redis restarts empty (no persistence): the instances must tell it again what they
    hold, or the rules across instances would silently stop holding for connections
    that lived through the outage."""
    a, b = await start_instance(), await start_instance()
    with trio.fail_after(TEST_S):
        async with httpx.AsyncClient() as http, open_chat(a, "rb-kept") as kept:
            await trio.to_thread.run_sync(redis.stop)
            assert await _healthz(http, a) == (503, {"status": "degraded"})
            await trio.to_thread.run_sync(redis.start)
            recovered_by = trio.current_time() + REDIS_RECOVERY_S
            for server in (a, b):
                while (health := await _healthz(http, server)) != (200, {"status": "ok"}):
                    assert trio.current_time() < recovered_by, f"still {health}"
                    await trio.sleep(POLL_S)  # an external recovery: nothing to await
            assert await _refusal_code(b, "rb-kept", "bob") == 4003
            async with open_chat(b, "rb-kept") as new:
                assert await kept.closed_code() == 4009
                await new.send(type="message", content="after", id="m1")
                frames = await new.turn()
    _assert_whole_turn_exact(frames, "echo: after")


async def test_takeover_of_a_detached_running_turn_by_a_third_instance_delivers_it_once(
    start_instance: StartServer, fake: FakeUpstream
) -> None:
    """A then B then C: the turn still runs on A; its frames go to the newest
    connection only, and the older one on B is closed 4009."""
    a, b, c = await start_instance(), await start_instance(), await start_instance()
    reply = PausedReply(["one "], ["two ", "three"])
    fake.enqueue(reply)
    with trio.fail_after(TEST_S):
        async with open_chat(a, "t-three") as first:
            await first.send(type="message", content="go", id="m1")
            seen = await _read_text(first, "one ")
            await _vanish(a, first)
        async with open_chat(b, "t-three") as second:
            await _read_text(second, "one ")
            async with open_chat(c, "t-three") as third:
                assert await second.closed_code() == 4009
                replay = [await third.receive() for _ in range(3)]
                reply.resume.set()
                frames = replay + await third.turn()
    _assert_replay_opening(frames, _start(seen)["turn_id"], "m1")
    assert frames[2]["content"] == "one "
    _assert_whole_turn_exact(frames, reply.text)
    assert len(fake.requests) == 1 and fake.requests[0].completed_normally


def test_redis_helper_stops_and_restarts_on_the_same_port(redis: RedisServer) -> None:
    """The harness itself: a stopped server answers nothing, a restarted one the same
    URL."""
    url = redis.url
    assert ping(redis.port)
    redis.stop()
    assert not ping(redis.port)
    redis.start()
    assert redis.url == url and ping(redis.port)

