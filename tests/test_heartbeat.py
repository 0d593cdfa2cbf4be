"""The heartbeat rule: every interval the server sends a JSON `ping` and a WebSocket
ping frame; a peer that answers neither within the timeout is closed and freed, and
any frame from the peer counts as an answer.

The silent peers here speak WebSocket by hand (wsproto over a raw trio TCP stream),
because trio-websocket's client answers ping frames on its own."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)

from conftest import CLIENT_WAIT_S, open_chat, token_for
from server import ChatServer

StartServer = Callable[..., Awaitable[ChatServer]]

INTERVAL_S = 0.2
TIMEOUT_S = 0.3
# Scheduling, the close frame and the socket teardown, on a loaded CI machine.
MARGIN_S = 1.0


async def _heartbeat_server(start_server: StartServer) -> ChatServer:
    return await start_server(heartbeat_interval_s=INTERVAL_S, heartbeat_timeout_s=TIMEOUT_S)


class RawPeer:
    """A WebSocket client with no automatic behaviour: it answers nothing unless told."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Event] = []

    @classmethod
    async def connect(cls, server: ChatServer, session_id: str) -> RawPeer:
        """Open the TCP stream and complete the opening handshake (the 101)."""
        assert server.port is not None
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        peer = cls(stream)
        target = f"/ws/chat/{session_id}?token={token_for('alice')}"
        await peer.send(Request(host=f"127.0.0.1:{server.port}", target=target))
        with trio.fail_after(CLIENT_WAIT_S):
            while not any(isinstance(e, AcceptConnection) for e in peer.events):
                assert await peer.read_some(), "EOF before the handshake completed"
        return peer

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def read_some(self) -> bool:
        """Read one chunk into `events`; False at EOF."""
        data = await self.stream.receive_some(65536)
        self.ws.receive_data(data or None)
        self.events.extend(self.ws.events())
        return bool(data)

    def json_frames(self) -> list[dict[str, Any]]:
        return [json.loads(e.data) for e in self.events if isinstance(e, TextMessage)]


async def test_client_that_answers_ping_frames_stays_connected_and_gets_json_pings(
    start_server: StartServer,
) -> None:
    server = await _heartbeat_server(start_server)
    async with open_chat(server, "hb-normal") as client:
        # Read only; trio-websocket answers the server's ping frames by itself.
        pings: list[dict[str, Any]] = []
        with trio.move_on_after(6 * INTERVAL_S):
            while True:
                frame = await client.receive()
                assert frame["type"] == "ping", frame
                pings.append(frame)
        assert len(pings) >= 3
        assert all(isinstance(p["timestamp"], str) and p["timestamp"] for p in pings)
        assert server.connection_count == 1
        await client.send(type="ping")
        assert (await client.receive_until("pong"))[-1]["type"] == "pong"


async def test_silent_peer_is_closed_and_freed_within_interval_plus_timeout(
    start_server: StartServer,
) -> None:
    server = await _heartbeat_server(start_server)
    peer = await RawPeer.connect(server, "hb-silent")
    async with peer.stream:
        with trio.fail_after(CLIENT_WAIT_S):
            await server.wait_for_connection_count(1)
        admitted_at = trio.current_time()
        # From here on the peer neither reads nor sends.
        with trio.fail_after(INTERVAL_S + TIMEOUT_S + MARGIN_S):
            await server.wait_for_connection_count(0)
        freed_after_s = trio.current_time() - admitted_at
        assert freed_after_s >= INTERVAL_S + TIMEOUT_S - 0.05
        # Now read what was sent: pings of both kinds, then the end of the TCP stream.
        with trio.fail_after(CLIENT_WAIT_S):
            while await peer.read_some():
                pass
    assert any(isinstance(e, Ping) for e in peer.events)
    assert "ping" in [frame["type"] for frame in peer.json_frames()]
    assert isinstance(peer.events[-1], CloseConnection), peer.events[-1]


async def test_peer_that_only_sends_json_pongs_stays_connected(
    start_server: StartServer,
) -> None:
    server = await _heartbeat_server(start_server)
    peer = await RawPeer.connect(server, "hb-json-pong")
    async with peer.stream:
        answered = 0
        with trio.move_on_after(6 * INTERVAL_S):
            while True:
                seen = len(peer.events)
                assert await peer.read_some(), "the server closed the stream"
                for event in peer.events[seen:]:
                    assert not isinstance(event, CloseConnection), event
                    # Ping frames go unanswered; each JSON ping gets a JSON pong.
                    if isinstance(event, TextMessage) and json.loads(event.data)["type"] == "ping":
                        await peer.send(TextMessage(data=json.dumps({"type": "pong"})))
                        answered += 1
        assert answered >= 3
        assert any(isinstance(e, Ping) for e in peer.events)
        assert server.connection_count == 1
        # Still served: a JSON ping of ours gets its pong.
        seen = len(peer.events)
        await peer.send(TextMessage(data=json.dumps({"type": "ping"})))
        with trio.fail_after(CLIENT_WAIT_S):
            while "pong" not in [
                json.loads(e.data)["type"] for e in peer.events[seen:] if isinstance(e, TextMessage)
            ]:
                assert await peer.read_some(), "the server closed the stream"
        await peer.send(CloseConnection(code=1000))
    with trio.fail_after(CLIENT_WAIT_S):
        await server.wait_for_connection_count(0)
