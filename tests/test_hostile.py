"""Hostile input, held: each defect an attack run found, as the rule it broke.

Every test drives the real server (in-process on 127.0.0.1 port 0, or a child
process where a signal is the input) with real clients over loopback. Every wait is
bounded (`fail_after`, or the harness's per-receive bound); no test sleeps where an
event can be awaited; every loop is bounded in count and time.

1. Connection limits under a burst of concurrent connects (4008, 1013, 4009).
2. SIGTERM while connects are in flight (1001, nobody admitted after the drain began).
3. An upgrade followed by a TCP reset (no ERROR, no traceback).
4. JWT time claims that are not JSON numbers in range (4001).
5. A history larger than the slow-client bound (sent whole, connection kept).
6. Tool-call arguments nested 100,000 deep (the bad-arguments path).
7. An unexpected exception: its connection closes 1011, its turn fails cleanly.
8. The database file deleted while running (storage_error, /healthz 503).
9. Another process holding the database's write lock (reads go on, writes time out).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sqlite3
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
import trio.testing
from server_process import base_env, server_process
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from agent_client import TOOL_BAD_ARGUMENTS_OUTPUT
from chat.connection import ChatConnection
from chat.settings import MAX_OUTBOX_CHARS, load_tools
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
from fake_upstream import FakeUpstream, TextReply, ToolCallReply
from protocol import DEFAULT_HISTORY_LIMIT
from server import ChatServer
from store import BUSY_TIMEOUT_S

StartServer = Callable[..., Awaitable[ChatServer]]
EXAMPLE_TOOLS = Path(__file__).resolve().parents[1] / "docs" / "tools.example.json"
# A burst of a few hundred connects at once, on loopback, client and server in one
# process: well under this on a loaded two-core box.
BURST_WAIT_S = 60.0
BURST = 300


def _chat_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Records of the server's loggers at ERROR or above, or carrying a traceback."""
    return [
        record
        for record in caplog.records
        if record.name.split(".")[0] == "chat"
        and (record.levelno >= logging.ERROR or record.exc_info is not None)
    ]


async def _history(client: ChatClient, limit: int = DEFAULT_HISTORY_LIMIT) -> list[dict[str, Any]]:
    await client.send(type="history", limit=limit)
    frames = await client.receive_until("history")
    messages: list[dict[str, Any]] = frames[-1]["messages"]
    return messages


async def _ping_pong(client: ChatClient) -> None:
    """The connection is open and served: a ping is answered."""
    await client.send(type="ping")
    assert (await client.receive_until("pong"))[-1]["type"] == "pong"


# =========================================================================== 1. bursts


@dataclass
class _Outcome:
    """One client of a burst: whether it got `connected`, whether it was still open
    (answered a ping) once every client of the burst knew its fate, and the close
    code the server sent it (None: the server never closed it)."""

    connected: bool = False
    open_at_end: bool = False
    code: int | None = None


class _Burst:
    """Clients connecting all at once. Each connected one holds its connection, reading
    nothing, until every client has its `connected` or its close; then each is probed
    with a ping (a pong: still open; a close frame instead: closed, with its code);
    then all let go.

    The probe makes "open at the end" exact: a connection the server has closed
    answers no ping, whether or not its client has read the close frame yet."""

    def __init__(self, server: ChatServer, targets: Sequence[tuple[str, str]]) -> None:
        self._urls = [ws_url(server, session_id, token_for(user)) for session_id, user in targets]
        self.outcomes = [_Outcome() for _ in targets]
        self._settled = _Countdown(len(targets))
        self._probed = _Countdown(len(targets))

    async def run(self) -> list[_Outcome]:
        with trio.fail_after(BURST_WAIT_S):
            async with trio.open_nursery() as clients:
                for url, outcome in zip(self._urls, self.outcomes, strict=True):
                    clients.start_soon(self._client, url, outcome)
        return self.outcomes

    async def _client(self, url: str, outcome: _Outcome) -> None:
        try:
            async with open_websocket_url(
                url, connect_timeout=BURST_WAIT_S, disconnect_timeout=CLIENT_WAIT_S
            ) as ws:
                try:
                    first = json.loads(await ws.get_message())
                    assert first["type"] == "connected", first
                    outcome.connected = True
                    await self._settled.arrive_and_wait()
                    await ws.send_message('{"type": "ping"}')
                    for _ in range(10):  # a pong, maybe after a heartbeat ping
                        if json.loads(await ws.get_message())["type"] == "pong":
                            outcome.open_at_end = True
                            break
                    await self._probed.arrive_and_wait()
                except ConnectionClosed as closed:
                    outcome.code = closed.reason.code if closed.reason else None
        finally:
            self._settled.leave()
            self._probed.leave()


class _Countdown:
    """A barrier for `count` tasks; a task that will never arrive `leave`s instead."""

    def __init__(self, count: int) -> None:
        self._left = count
        self._done = trio.Event()
        self._arrived: set[object] = set()

    def _tick(self) -> None:
        task = trio.lowlevel.current_task()
        if task not in self._arrived:
            self._arrived.add(task)
            self._left -= 1
            if self._left == 0:
                self._done.set()

    async def arrive_and_wait(self) -> None:
        self._tick()
        await self._done.wait()

    def leave(self) -> None:
        self._tick()


class _Peaks:
    """The most connections registered at once, in all and per user, measured at
    every registration (the moment a connection is about to get `connected`)."""

    def __init__(self, server: ChatServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.total = 0
        self.per_user: dict[str, int] = {}
        register = server._register

        def counting_register(connection: ChatConnection) -> None:
            register(connection)
            held = sum(c.user_id == connection.user_id for c in server._connections)
            self.per_user[connection.user_id] = max(self.per_user.get(connection.user_id, 0), held)
            self.total = max(self.total, server.connection_count)

        monkeypatch.setattr(server, "_register", counting_register)


async def _quiet(server: ChatServer) -> None:
    """Until every connection has left and every WebSocket handler has ended (admissions
    waiting on the store's threads included), with nothing left to run."""
    with trio.fail_after(CLIENT_WAIT_S):
        for _ in range(4 * BURST):  # each register, unregister or handler end wakes it
            await trio.testing.wait_all_tasks_blocked()
            if server.connection_count == 0 and server._websockets == 0:
                return
            await server._count_changed.wait()
        raise AssertionError("the server never went quiet")


async def test_burst_of_one_users_connects_to_distinct_sessions_admits_exactly_the_user_limit(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(max_connections_per_user=2, max_connections=10_000)
    peaks = _Peaks(server, monkeypatch)

    outcomes = await _Burst(server, [(f"d{n}", "alice") for n in range(BURST)]).run()

    admitted = [o for o in outcomes if o.connected]
    assert len(admitted) == 2, [o for o in outcomes if o.code != 4008]
    assert all(o.open_at_end and o.code is None for o in admitted)
    assert sorted(o.code for o in outcomes if not o.connected) == [4008] * (BURST - 2)
    assert peaks.per_user == {"alice": 2}
    # Every slot came back: the user's limit is whole again.
    await _quiet(server)
    again = await _Burst(server, [("again-1", "alice"), ("again-2", "alice")]).run()
    assert all(o.connected for o in again), again


async def test_burst_of_one_users_connects_to_one_session_leaves_at_most_the_user_limit_open(
    start_server: StartServer,
) -> None:
    server = await start_server(max_connections_per_user=2, max_connections=10_000)

    outcomes = await _Burst(server, [("same", "alice")] * BURST).run()

    # Takeover: each newer connection takes the session over, the older gets 4009.
    still_open = [o for o in outcomes if o.open_at_end]
    assert 1 <= len(still_open) <= 2, len(still_open)
    assert all(o.code == 4009 for o in outcomes if o.connected and not o.open_at_end)
    assert {o.code for o in outcomes if not o.connected} <= {4008, 4009}
    await _quiet(server)
    again = await _Burst(server, [("same", "alice"), ("other", "alice")]).run()
    assert all(o.connected for o in again), again


async def test_burst_of_connects_over_max_connections_admits_exactly_the_limit_the_rest_1013(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 50
    server = await start_server(max_connections=limit, max_connections_per_user=2)
    peaks = _Peaks(server, monkeypatch)

    outcomes = await _Burst(server, [(f"g{n}", f"user{n}") for n in range(BURST)]).run()

    # First come, first served: a herd larger than the limit does not lock out all of
    # itself (every arrival finding the count over the limit).
    admitted = [o for o in outcomes if o.connected]
    assert len(admitted) == limit, len(admitted)
    assert peaks.total == limit
    assert all(o.open_at_end for o in admitted)
    assert {o.code for o in outcomes if not o.connected} == {1013}
    # Every slot came back: the limit's worth connects at once.
    await _quiet(server)
    again = await _Burst(server, [(f"h{n}", f"user{n}") for n in range(limit)]).run()
    assert all(o.connected for o in again), [o for o in again if not o.connected]


# =========================================================================== 2. SIGTERM


SHUTDOWN_GRACE_S = 3.0
IN_FLIGHT = 150
ADMITTED_BEFORE_SIGNAL = 10


@dataclass
class _Arrival:
    """One client connecting around the SIGTERM."""

    connected: bool = False
    code: int | None = None  # the close code of an upgraded connection
    failed: str = ""  # no upgrade: the listener was closed, or the handshake cut


async def _connect_and_hold(
    port: int, n: int, arrivals: list[_Arrival], some_admitted: trio.Event
) -> None:
    arrival = arrivals[n]
    url = f"ws://127.0.0.1:{port}/ws/chat/t{n}?token={token_for(f'user{n}')}"
    try:
        async with open_websocket_url(
            url, connect_timeout=CLIENT_WAIT_S, disconnect_timeout=CLIENT_WAIT_S
        ) as ws:
            try:
                frame = json.loads(await ws.get_message())
                assert frame["type"] == "connected", frame
                arrival.connected = True
                if sum(a.connected for a in arrivals) == ADMITTED_BEFORE_SIGNAL:
                    some_admitted.set()
                for _ in range(100):  # until the close; a heartbeat ping at most
                    await ws.get_message()
            except ConnectionClosed as closed:
                arrival.code = closed.reason.code if closed.reason else None
    except (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError) as exc:
        arrival.failed = type(exc).__name__


async def test_sigterm_with_connects_in_flight_admits_no_one_after_the_drain_and_closes_all_1001(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    env = base_env(
        CHAT_JWT_SECRET=JWT_SECRET,
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_API_KEY=API_KEY,
        CHAT_DB=str(tmp_path / "chat.db"),
        CHAT_MODEL="test-model",
    )
    args = ["serve", "--port", "0", "--shutdown-grace", str(SHUTDOWN_GRACE_S)]
    arrivals = [_Arrival() for _ in range(IN_FLIGHT)]
    async with server_process(args, env) as proc:
        assert proc.port is not None
        some_admitted = trio.Event()
        with trio.fail_after(CLIENT_WAIT_S * 3):
            async with trio.open_nursery() as clients:
                for n in range(IN_FLIGHT):
                    clients.start_soon(_connect_and_hold, proc.port, n, arrivals, some_admitted)
                await some_admitted.wait()
                admitted_at_signal = sum(a.connected for a in arrivals)
                signalled_at = trio.current_time()
                proc.send_signal(signal.SIGTERM)
                exit_code = await proc.wait_exit(SHUTDOWN_GRACE_S + 2)
                took_s = trio.current_time() - signalled_at
    log_text = proc.stderr_text
    assert exit_code == 0, log_text[-3000:]
    assert admitted_at_signal < IN_FLIGHT  # the signal came with connects in flight

    # Nobody is admitted once the drain has begun (`connected` is sent after this line).
    lines = log_text.splitlines()
    drain = next(i for i, line in enumerate(lines) if "shutting down" in line)
    late = [line for line in lines[drain:] if "user connected" in line]
    assert not late, late[:5]
    # Every upgraded connection, admitted or not, is closed 1001: never 1000, never cut.
    upgraded = [a for a in arrivals if not a.failed]
    assert {a.code for a in upgraded} == {1001}, [a for a in upgraded if a.code != 1001][:5]
    assert any(a.connected for a in upgraded)
    assert not re.search(r"closed with 1000\b", log_text)
    assert "Traceback" not in log_text
    # The drain did not need its time box (the grace less a second for the exit).
    assert took_s < SHUTDOWN_GRACE_S - 1.0, f"exit took {took_s:.2f} s"


# =========================================================================== 3. TCP reset


def _upgrade_request(session_id: str, user: str) -> bytes:
    return (
        f"GET /ws/chat/{session_id}?token={token_for(user)} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def _upgrade_then_reset(port: int, n: int, *, read_first: bytes) -> None:
    """Send a WebSocket upgrade, read until `read_first` has arrived (empty: read
    nothing), then reset the connection (SO_LINGER 0: an RST instead of a FIN)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    with trio.fail_after(CLIENT_WAIT_S):
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        await stream.send_all(_upgrade_request(f"rst{n}", f"user{n}"))
        received = b""
        while read_first not in received:
            chunk = await stream.receive_some(4096)
            assert chunk, received
            received += chunk
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize(
    ("read_first", "info_lines_per_peer"),
    [
        (b"", 1),  # reset under the handshake: never admitted
        (b"\r\n\r\n", 2),  # reset under admission: its connect and close lines
        (b"history_length", 2),  # reset once connected: the same
    ],
    ids=["before-the-101", "after-the-101", "after-connected"],
)
async def test_upgrades_reset_by_the_peer_log_no_error_and_no_traceback(
    server: ChatServer,
    caplog: pytest.LogCaptureFixture,
    read_first: bytes,
    info_lines_per_peer: int,
) -> None:
    caplog.set_level(logging.INFO, logger="chat")
    assert server.port is not None
    peers = 50
    for n in range(peers):
        await _upgrade_then_reset(server.port, n, read_first=read_first)
    await _quiet(server)

    assert not _chat_errors(caplog), [r.getMessage() for r in _chat_errors(caplog)]
    lines = [r.getMessage() for r in caplog.records if r.name.split(".")[0] == "chat"]
    assert len(lines) <= info_lines_per_peer * peers, lines[:10]
    async with open_chat(server, "after-resets") as client:
        await _ping_pong(client)


# =========================================================================== 4. JWT times


def _signed(payload_json: str) -> str:
    """An HS256 token over exactly this payload text (numbers no encoder would write)."""
    return jwt.api_jws.encode(payload_json.encode(), JWT_SECRET, algorithm="HS256")


_IN_AN_HOUR = int(time.time()) + 3600
_NOW = int(time.time())

BAD_TIME_CLAIMS = {
    "exp-numeric-string": f'{{"sub": "alice", "exp": "{_IN_AN_HOUR}"}}',
    "exp-past-numeric-string": '{"sub": "alice", "exp": "1"}',
    "exp-huge-integer": f'{{"sub": "alice", "exp": {10**400}}}',
    "exp-1e400": '{"sub": "alice", "exp": 1e400}',
    "exp-Infinity": '{"sub": "alice", "exp": Infinity}',
    "exp-NaN": '{"sub": "alice", "exp": NaN}',
    "exp-after-year-9999": '{"sub": "alice", "exp": 1e308}',
    "exp-true": '{"sub": "alice", "exp": true}',
    "exp-null": '{"sub": "alice", "exp": null}',
    "nbf-numeric-string": f'{{"sub": "alice", "nbf": "{_NOW - 60}"}}',
    "nbf-true": '{"sub": "alice", "nbf": true}',
    "nbf-false": '{"sub": "alice", "nbf": false}',
    "nbf-huge-negative-integer": f'{{"sub": "alice", "nbf": {-(10**400)}}}',
    "nbf-minus-1e400": '{"sub": "alice", "nbf": -1e400}',
    "iat-numeric-string": f'{{"sub": "alice", "iat": "{_NOW}"}}',
    "iat-true": '{"sub": "alice", "iat": true}',
    "iat-huge-integer": f'{{"sub": "alice", "iat": {10**400}}}',
}


@pytest.mark.parametrize("payload", BAD_TIME_CLAIMS.values(), ids=BAD_TIME_CLAIMS.keys())
async def test_time_claim_that_is_not_a_json_number_within_year_9999_closes_4001(
    server: ChatServer, caplog: pytest.LogCaptureFixture, payload: str
) -> None:
    code, _ = await refusal(ws_url(server, "s-jwt", _signed(payload)))
    assert code == 4001
    assert not _chat_errors(caplog), [r.getMessage() for r in _chat_errors(caplog)]
    async with open_chat(server, "s-jwt") as client:  # nothing was stored, nothing broke
        assert client.connected["resumed"] is False  # type: ignore[attr-defined]


async def test_token_with_json_number_time_claims_still_connects(server: ChatServer) -> None:
    token = _signed(
        f'{{"sub": "alice", "iat": {_NOW}, "nbf": {_NOW - 60}.5, "exp": {_IN_AN_HOUR}.25}}'
    )
    async with open_chat(server, "s-jwt-ok", token=token) as client:
        assert client.connected["user_id"] == "alice"  # type: ignore[attr-defined]


# =========================================================================== 5. big history


async def test_history_larger_than_the_outbox_bound_is_sent_whole_and_the_connection_stays(
    server: ChatServer,
) -> None:
    turns, chars = 250, 20_000  # 500 entries of 20,000 characters: 10 M > 8 Mi
    assert 2 * turns * chars > MAX_OUTBOX_CHARS
    store = server.store
    with trio.fail_after(CLIENT_WAIT_S * 3):
        await store.claim_session("big", "alice")
        for n in range(turns):
            asked = await store.add_user_message(
                "big", f"{n:05d}" + "q" * (chars - 5), client_message_id=None, metadata=None
            )
            await store.finish_turn(
                "big",
                reply_to=asked.id,
                turn_id=f"turn_{n}",
                content=f"{n:05d}" + "a" * (chars - 5),
                status="completed",
                response_id=f"resp_{n}",
                tool_calls=[],
            )
    url = ws_url(server, "big", token_for("alice"))
    with trio.fail_after(CLIENT_WAIT_S * 3):
        async with open_websocket_url(
            url,
            connect_timeout=CLIENT_WAIT_S,
            disconnect_timeout=CLIENT_WAIT_S,
            max_message_size=16 * 1024 * 1024,
        ) as ws:
            client = ChatClient(ws)
            assert (await client.receive())["type"] == "connected"
            messages = await _history(client, limit=500)
            await _ping_pong(client)
    assert len(messages) == 2 * turns
    assert sum(len(m["content"]) for m in messages) == 2 * turns * chars
    assert [m["content"][:5] for m in messages[::2]] == [f"{n:05d}" for n in range(turns)]
    assert [m["role"] for m in messages[:2]] == ["user", "assistant"]


# =========================================================================== 6. deep JSON


async def test_tool_call_arguments_nested_100000_deep_take_the_bad_arguments_path(
    start_server: StartServer, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(tools=load_tools(str(EXAMPLE_TOOLS)))
    fake.enqueue(
        ToolCallReply([("call_deep", "ask_user", "[" * 100_000)], response_id="resp_deep"),
        TextReply(["Let me ", "ask again."], response_id="resp_after"),
    )
    async with open_chat(server, "deep") as client:
        await client.send(type="message", content="hello")
        frames = await client.turn()
        history = await _history(client)
        await _ping_pong(client)
    assert [f["type"] for f in frames if f["type"] in ("tool_request", "error")] == []
    end = next(f for f in frames if f["type"] == "response_end")
    assert end["status"] == "completed" and end["full_content"] == "Let me ask again."
    assert fake.requests[1].body["input"] == [
        {
            "type": "function_call_output",
            "call_id": "call_deep",
            "output": TOOL_BAD_ARGUMENTS_OUTPUT,
        }
    ]
    [tool] = [m for m in history if m["role"] == "tool"]
    assert tool["arguments"] == {} and tool["output"] == TOOL_BAD_ARGUMENTS_OUTPUT
    assert not _chat_errors(caplog), [r.getMessage() for r in _chat_errors(caplog)]


# =========================================================================== 7. last resort


async def test_unexpected_error_in_a_connection_closes_it_1011_and_the_server_serves_on(
    server: ChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    history = server.store.history

    async def failing_history(session_id: str, limit: int) -> Any:
        if session_id == "doomed":
            raise RuntimeError("a bug of ours")
        return await history(session_id, limit)

    monkeypatch.setattr(server.store, "history", failing_history)
    async with open_chat(server, "bystander", "bob") as bystander:
        async with open_chat(server, "doomed") as client:
            await client.send(type="history")
            assert await client.closed_code() == 1011
        assert await _history(bystander) == []
    async with open_chat(server, "doomed") as again:
        assert again.connected["resumed"] is True  # type: ignore[attr-defined]
        await _ping_pong(again)


async def test_unexpected_error_in_a_turn_fails_that_turn_and_the_connection_stays_usable(
    server: ChatServer, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing_chain_point(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug of ours")

    async with open_chat(server, "turn-bug") as client:
        with monkeypatch.context() as patch:
            patch.setattr(server.store, "chain_point", failing_chain_point)
            await client.send(type="message", content="first")
            frames = await client.turn()
        fake.enqueue(TextReply(["fine ", "now"]))
        await client.send(type="message", content="second")
        after = await client.turn()
    assert [f["type"] for f in frames] == [
        "typing",
        "response_start",
        "error",
        "response_end",
        "typing",
    ]
    turn_id = frames[1]["turn_id"]
    assert frames[2]["code"] == "upstream_error" and frames[2]["turn_id"] == turn_id
    assert frames[3]["status"] == "failed" and frames[3]["turn_id"] == turn_id
    end = next(f for f in after if f["type"] == "response_end")
    assert end["status"] == "completed" and end["full_content"] == "fine now"


# =========================================================================== 8. file deleted


async def test_database_file_deleted_while_running_refuses_messages_and_healthz_is_503(
    server: ChatServer, fake: FakeUpstream
) -> None:
    base = f"http://127.0.0.1:{server.port}"
    async with (
        open_chat(server, "gone") as client,
        httpx.AsyncClient(base_url=base, timeout=CLIENT_WAIT_S) as http,
    ):
        with trio.fail_after(CLIENT_WAIT_S):
            assert (await http.get("/healthz")).status_code == 200
        os.remove(server.config.db_path)

        await client.send(type="message", content="where does this go?")
        frame = await client.receive()
        assert frame["type"] == "error" and frame["code"] == "storage_error", frame
        with trio.fail_after(CLIENT_WAIT_S):
            health = await http.get("/healthz")
        assert (health.status_code, health.json()) == (503, {"status": "storage_error"})
        await _ping_pong(client)
    assert fake.requests == []  # nothing reached the model either


# =========================================================================== 9. outside lock


async def test_outside_write_lock_delays_no_read_and_writes_fail_after_the_busy_timeout(
    server: ChatServer,
) -> None:
    outside = sqlite3.connect(server.config.db_path, isolation_level=None, check_same_thread=False)
    try:
        async with (
            open_chat(server, "locked", "alice") as alice,
            open_chat(server, "reader", "bob") as bob,
        ):
            with trio.fail_after(CLIENT_WAIT_S):
                await trio.to_thread.run_sync(outside.execute, "BEGIN IMMEDIATE")
            sent_at = trio.current_time()
            await alice.send(type="message", content="held up")
            # Reads go on while the write waits for the lock, each answered at once. The
            # first may be served before the write reaches the writer thread; the later
            # ones are asked a round trip after it, while it waits.
            for _ in range(3):
                asked_at = trio.current_time()
                assert await _history(bob) == []
                assert trio.current_time() - asked_at < BUSY_TIMEOUT_S / 2
            frame = await alice.receive()
            waited_s = trio.current_time() - sent_at
            assert frame["type"] == "error" and frame["code"] == "storage_error", frame
            assert BUSY_TIMEOUT_S * 0.75 <= waited_s < BUSY_TIMEOUT_S + 2.0, waited_s

            with trio.fail_after(CLIENT_WAIT_S):
                await trio.to_thread.run_sync(outside.execute, "ROLLBACK")
            await alice.send(type="message", content="and now?")
            frames = await alice.turn()
            end = next(f for f in frames if f["type"] == "response_end")
            assert end["status"] == "completed"
            assert [m["content"] for m in await _history(alice)] == [
                "and now?",
                end["full_content"],
            ]
    finally:
        outside.close()
