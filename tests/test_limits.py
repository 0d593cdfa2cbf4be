"""Resource limits: connection caps, cheap and fast refusal of unauthenticated peers,
the handshake timeout, and slow or stuck clients.

Already proven elsewhere (not repeated here): the rate-limit token bucket, frame
bytes (1009) and content chars (test_bad_input.py); the turn queue (test_chat.py);
the 2**62-byte frame header and other hostile peers (test_process.py).
"""

from __future__ import annotations

import base64
import gc
import json
import os
import socket
import sqlite3
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

import server as server_module
from chat.connection import ChatConnection
from chat.demo_model import encode_sse
from conftest import CLIENT_WAIT_S, open_chat, refusal, token_for, ws_url
from fake_upstream import FakeUpstream, TextReply, _Exchange
from server import ChatServer

StartServer = Callable[..., Awaitable[ChatServer]]


async def _close_code(server: ChatServer, session_id: str, user: str) -> int | None:
    """Connect and read until closed; the close code. Fails if a frame arrives first."""
    code, _ = await refusal(ws_url(server, session_id, token_for(user)))
    return code


async def _read_to_eof(stream: trio.SocketStream, timeout_s: float) -> bytes:
    data = bytearray()
    with trio.fail_after(timeout_s):
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            pass
    return bytes(data)


# --------------------------------------------------------------------------- caps


async def test_connection_over_max_connections_closes_1013(start_server: StartServer) -> None:
    server = await start_server(max_connections=2)
    async with open_chat(server, "a", "u1"), open_chat(server, "b", "u2"):
        assert await _close_code(server, "c", "u3") == 1013
    # Slots are freed when connections end.
    async with open_chat(server, "c", "u3") as client:
        assert client.connected["session_id"] == "c"  # type: ignore[attr-defined]


async def test_user_over_max_connections_per_user_closes_4008_other_users_unaffected(
    start_server: StartServer,
) -> None:
    server = await start_server(max_connections_per_user=2)
    async with open_chat(server, "a1", "alice"), open_chat(server, "a2", "alice"):
        assert await _close_code(server, "a3", "alice") == 4008
        async with open_chat(server, "b1", "bob") as bob:
            assert bob.connected["user_id"] == "bob"  # type: ignore[attr-defined]


async def test_takeover_of_ones_own_session_does_not_count_against_the_user_limit(
    start_server: StartServer,
) -> None:
    server = await start_server(max_connections_per_user=2)
    async with open_chat(server, "a1", "alice") as old, open_chat(server, "a2", "alice"):
        async with open_chat(server, "a1", "alice") as new:
            assert new.connected["resumed"] is True  # type: ignore[attr-defined]
            assert await old.closed_code() == 4009
            assert server.connection_count == 2


async def test_unauthenticated_connections_are_refused_fast_and_hold_no_slot(
    start_server: StartServer,
) -> None:
    server = await start_server(max_connections=1)
    url = "ws://127.0.0.1:{port}/ws/chat/s{n}?token=not-a-jwt"

    async def refused(n: int) -> None:
        async with open_websocket_url(
            url.format(port=server.port, n=n), connect_timeout=CLIENT_WAIT_S
        ) as ws:
            try:
                await ws.get_message()
            except ConnectionClosed as closed:
                assert closed.reason is not None and closed.reason.code == 4001
                return
        raise AssertionError("a frame arrived before the close")

    started = trio.current_time()
    with trio.fail_after(CLIENT_WAIT_S):
        async with trio.open_nursery() as nursery:
            for n in range(50):
                nursery.start_soon(refused, n)
    # 50 refusals, all concurrent, on loopback: well under a second each.
    assert trio.current_time() - started < 5.0
    assert server.connection_count == 0
    # None of them took the one slot or touched the store.
    async with open_chat(server, "s0", "alice") as client:
        assert client.connected["resumed"] is False  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- handshake timeout


async def _raw_connect(port: int) -> trio.SocketStream:
    with trio.fail_after(CLIENT_WAIT_S):
        return await trio.open_tcp_stream("127.0.0.1", port)


async def test_socket_that_never_sends_a_request_is_dropped_after_the_handshake_timeout(
    start_server: StartServer,
) -> None:
    server = await start_server(handshake_timeout_s=0.5)
    assert server.port is not None
    silent = await _raw_connect(server.port)
    slowloris = await _raw_connect(server.port)
    await slowloris.send_all(b"GET /ws/chat/s1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    started = trio.current_time()
    assert await _read_to_eof(silent, 3.0) == b""
    assert await _read_to_eof(slowloris, 3.0) == b""
    assert trio.current_time() - started < 2.0
    await silent.aclose()
    await slowloris.aclose()
    # The server is fine and serves the next client.
    async with open_chat(server, "after", "alice") as client:
        assert client.connected["user_id"] == "alice"  # type: ignore[attr-defined]


async def test_upgrade_request_whose_body_never_finishes_the_handshake_is_dropped(
    start_server: StartServer,
) -> None:
    # A complete-looking head with a content-length the peer never sends: neither the
    # HTTP head reader nor the WebSocket handshake may wait past the timeout.
    server = await start_server(handshake_timeout_s=0.5)
    assert server.port is not None
    stream = await _raw_connect(server.port)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(
        (
            f"GET /ws/chat/s1?token={token_for('alice')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        ).encode()
    )
    # No final CRLF: the head never ends.
    assert await _read_to_eof(stream, 3.0) == b""
    await stream.aclose()
    assert server.connection_count == 0


# --------------------------------------------------------------------------- slow consumers


class _LongAnswerReply:
    """`count` deltas (`delta(n)` for the n-th), sent as fast as the server takes them and
    generated one at a time, so the fake's own memory stays flat (TextReply builds the
    whole answer first, which would hide the server's memory in the measurement)."""

    def __init__(self, delta: Callable[[int], str], count: int) -> None:
        self.delta = delta
        self.count = count

    async def play(self, out: _Exchange) -> None:
        await out.start(200, {"content-type": "text/event-stream"})
        created = {"type": "response.created", "response": {"id": "resp_long"}}
        await out.send(encode_sse(created))
        for number in range(self.count):
            delta = {
                "type": "response.output_text.delta",
                "item_id": "m",
                "delta": self.delta(number),
            }
            await out.send(encode_sse(delta))
        completed = {"type": "response.completed", "response": {"id": "resp_long"}}
        await out.send(encode_sse(completed))
        await out.end()


def _attached(server: ChatServer, session_id: str) -> ChatConnection:
    live = server.live_session(session_id)
    assert live is not None and live.attached is not None
    return live.attached


async def _handshake_small_window(port: int, session_id: str, user: str) -> trio.SocketStream:
    """A WebSocket handshake by hand over a socket with a tiny receive buffer; returns
    the stream once the 101 and the `connected` frame arrived. The caller then never
    reads from it."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with trio.fail_after(CLIENT_WAIT_S):
        await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(
        (
            f"GET /ws/chat/{session_id}?token={token_for(user)} HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = bytearray()
    with trio.fail_after(CLIENT_WAIT_S):
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(1)  # the head only, nothing beyond
            assert chunk
            head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    # Read the `connected` frame too (the session is registered by then), no more.
    connected = bytearray()
    with trio.fail_after(CLIENT_WAIT_S):
        while b"history_length" not in connected:
            chunk = await stream.receive_some(1)
            assert chunk
            connected += chunk
    return stream


async def test_clients_that_drop_at_once_are_all_let_go_and_the_server_serves_on(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Their teardowns pass the drop gate two per loop pass; every one must get through.
    monkeypatch.setattr(server_module, "DROPS_PER_PASS", 2)
    server = await start_server()
    assert server.port is not None
    streams = [await _handshake_small_window(server.port, f"d{n}", f"u{n}") for n in range(12)]
    connections = [_attached(server, f"d{n}") for n in range(12)]
    for stream in streams:
        stream.socket.close()  # all at once, no close frame: the clients just vanish
    with trio.fail_after(CLIENT_WAIT_S):
        for connection in connections:
            await connection.finished.wait()
    assert server.connection_count == 0
    async with open_chat(server, "after", "alice") as client:
        assert client.connected["user_id"] == "alice"  # type: ignore[attr-defined]


async def test_clients_that_connect_at_once_are_all_admitted(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Their admissions pass the gate two per loop pass; every one must get through.
    monkeypatch.setattr(server_module, "ADMISSIONS_PER_PASS", 2)
    server = await start_server()
    admitted: list[str] = []

    async def connect(n: int) -> None:
        async with open_chat(server, f"c{n}", f"u{n}") as client:
            admitted.append(client.connected["session_id"])  # type: ignore[attr-defined]

    with trio.fail_after(CLIENT_WAIT_S):
        async with trio.open_nursery() as clients:
            for n in range(12):
                clients.start_soon(connect, n)
    assert sorted(admitted) == sorted(f"c{n}" for n in range(12))


def _masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + bytes(4) + payload  # zero mask


def _stored_turns(db: Path, session_id: str) -> list[tuple[str, str | None]]:
    connection = sqlite3.connect(db)
    try:
        rows = connection.execute(
            "SELECT role, status FROM messages WHERE session_id = ? ORDER BY anchor, id",
            (session_id,),
        ).fetchall()
    finally:
        connection.close()
    return [(role, status) for role, status in rows]


@pytest.mark.parametrize(
    ("max_outbox_chars", "send_timeout_s"),
    # The short send timeout is short against the relay's speed: the upstream is read at
    # up to ~100,000 deltas/s, so in 1 s the outbox alone could take half the answer.
    [(256 * 1024, 30.0), (64 * 1024 * 1024, 0.3)],
    ids=["outbox_bound_closes", "send_timeout_closes"],
)
async def test_client_that_stops_reading_is_closed_1008_with_bounded_memory_and_delays_no_one(
    start_server: StartServer,
    fake: FakeUpstream,
    tmp_path: Path,
    max_outbox_chars: int,
    send_timeout_s: float,
) -> None:
    # Each limit alone must end it: a small outbox with a patient send timeout, and a
    # huge outbox with a short send timeout.
    # Without a grace, the dropped client's turn ends with it (the upstream is closed).
    server = await start_server(
        max_outbox_chars=max_outbox_chars, send_timeout_s=send_timeout_s, detach_grace_s=0
    )
    assert server.port is not None
    # A fast upstream with a long answer: 40 000 deltas of 200 characters, 8 MB in all.
    fake.enqueue(_LongAnswerReply(lambda _: "x" * 199 + " ", 40_000))  # type: ignore[arg-type]

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline_bytes, _ = tracemalloc.get_traced_memory()
        stuck = await _handshake_small_window(server.port, "stuck", "slow-user")
        connection: ChatConnection = _attached(server, "stuck")
        await stuck.send_all(_masked_text_frame(json.dumps({"type": "message", "content": "go"})))
        with trio.fail_after(CLIENT_WAIT_S):
            await fake.wait_for_request(1)

        # Meanwhile another session chats normally, without waiting on the stuck one.
        fake.enqueue(TextReply(["quick ", "and ", "complete"], delay_s=0.01))
        async with open_chat(server, "fast", "fast-user") as other:
            started = trio.current_time()
            await other.send(type="message", content="hello")
            frames = await other.turn()
            elapsed_s = trio.current_time() - started
        end = next(f for f in frames if f["type"] == "response_end")
        assert end["status"] == "completed" and end["full_content"] == "quick and complete"
        assert elapsed_s < 1.0, f"the other session waited {elapsed_s:.2f} s"

        with trio.fail_after(CLIENT_WAIT_S):
            await connection.finished.wait()
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert connection.close_code == 1008
    # The upstream request was closed long before the 8 MB answer was through.
    with trio.fail_after(CLIENT_WAIT_S):
        await fake.requests[0].done.wait()
    assert not fake.requests[0].completed_normally
    # Server-side memory stayed near the outbox bound, far below the answer's size
    # (the in-process fake upstream's own buffers are counted in it too).
    growth_bytes = peak_bytes - baseline_bytes
    assert growth_bytes < 4 * 1024 * 1024, f"peak grew by {growth_bytes / 1e6:.1f} MB"
    # The socket is closed: whatever was in flight, then EOF.
    await _read_to_eof(stuck, CLIENT_WAIT_S)
    await stuck.aclose()
    assert _stored_turns(tmp_path / "chat.db", "stuck") == [
        ("user", None),
        ("assistant", "interrupted"),
    ]


def _take_text_frames(buffer: bytearray) -> list[bytes]:
    """Remove the complete server frames at the start of `buffer`; their payloads.
    Each must be a whole, final, unmasked text frame (RFC 6455 §5.2)."""
    payloads = []
    while len(buffer) >= 2:
        assert buffer[0] == 0x81 and buffer[1] < 0x80, f"not a final text frame: {buffer[:2]!r}"
        size, start = buffer[1], 2
        if size == 126:
            size, start = int.from_bytes(buffer[2:4], "big"), 4
        elif size == 127:
            size, start = int.from_bytes(buffer[2:10], "big"), 10
        if len(buffer) < start + size:
            break
        payloads.append(bytes(buffer[start : start + size]))
        del buffer[: start + size]
    return payloads


def numbered_delta(number: int) -> str:
    return f"<{number:05d}>" + "é" * 40 + " "


async def test_client_that_lags_gets_every_character_in_order(
    server: ChatServer, fake: FakeUpstream
) -> None:
    # The client reads nothing until the upstream has sent the whole answer: deltas
    # are first written whole, then the kernel takes frames in part, then they wait
    # in the outbox and merge. Every frame must still be whole and every character
    # in its place.
    assert server.port is not None
    count = 4000
    fake.enqueue(_LongAnswerReply(numbered_delta, count))  # type: ignore[arg-type]
    lagging = await _handshake_small_window(server.port, "lagging", "lagging-user")
    with trio.fail_after(CLIENT_WAIT_S):
        while await lagging.receive_some(1) != b"}":  # the rest of the `connected` frame
            pass
    await lagging.send_all(_masked_text_frame(json.dumps({"type": "message", "content": "go"})))
    with trio.fail_after(CLIENT_WAIT_S):
        await fake.wait_for_request(1)
        await fake.requests[0].done.wait()

    frames: list[dict[str, Any]] = []
    received = bytearray()
    with trio.fail_after(CLIENT_WAIT_S):
        while not any(frame["type"] == "response_end" for frame in frames):
            data = await lagging.receive_some(65536)
            assert data, "the server closed the connection"
            received += data
            frames += [json.loads(payload) for payload in _take_text_frames(received)]
    await lagging.aclose()

    expected = "".join(numbered_delta(n) for n in range(count))
    deltas = [f for f in frames if f["type"] == "text_delta"]
    assert "".join(f["content"] for f in deltas) == expected
    end = next(frame for frame in frames if frame["type"] == "response_end")
    assert end["full_content"] == expected
    assert end["status"] == "completed"
    assert len(deltas) < count, "the client lagged, so some deltas should have merged"


@pytest.mark.skipif(
    os.environ.get("CHAT_FAST_PATHS") == "0",
    reason="breaking httpx's response/body-stream cycle is part of the fast paths "
    "(chat/upstream_transport.py): the plain httpx path leaves it to the collector",
)
async def test_turns_leave_no_cyclic_garbage(server: ChatServer, fake: FakeUpstream) -> None:
    """Every object of a finished turn (the upstream connection included) is freed by
    reference counting: the server never needs a full garbage collection, whose pause
    grows with all open connections, to get its memory back."""
    ours = {"httpx", "httpcore", "server", "agent_client", "store", "chat", "trio_websocket"}
    async with open_chat(server) as client:
        await client.send(type="message", content="warm up")
        await client.turn()
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for n in range(3):
                await client.send(type="message", content=f"turn {n}")
                await client.turn()
            fake.enqueue(TextReply([f"w{n} " for n in range(100)], delay_s=0.02))
            await client.send(type="message", content="then stop")
            await client.receive_until("text_delta")
            await client.send(type="stop")
            await client.turn()
            gc.collect()
            leftovers = [o for o in gc.garbage if type(o).__module__.split(".")[0] in ours]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert leftovers == []
