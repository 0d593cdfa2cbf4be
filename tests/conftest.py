"""Test harness: the real server in-process on 127.0.0.1:0, a fake Responses API on
loopback, and a real WebSocket client speaking the contract.

Rules (after trio-websocket's own test suite): loopback only, port 0, every test
that does I/O is bounded (`CLIENT_WAIT_S` on each receive, plus the test's own
`fail_after` where it waits on something else), and no sleeps where an event can
be awaited.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from fake_upstream import FakeUpstream
from server import ChatServer, Config, issue_token, run_server

JWT_SECRET = "test-secret-that-is-long-enough-for-hs256"
API_KEY = "sk-test-DO-NOT-LEAK-1234567890"
CLIENT_WAIT_S = 10.0


def token_for(user: str, ttl_s: int = 3600) -> str:
    return issue_token(JWT_SECRET, user, ttl_s)


class ChatClient:
    """A real WebSocket client that sends and receives contract frames as dicts."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, **frame: Any) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send_message(data)

    async def receive(self, timeout_s: float = CLIENT_WAIT_S) -> dict[str, Any]:
        with trio.fail_after(timeout_s):
            frame: dict[str, Any] = json.loads(await self.ws.get_message())
        return frame

    async def receive_until(
        self, frame_type: str, *, skip_pings: bool = True
    ) -> list[dict[str, Any]]:
        """Every frame up to and including the first of `frame_type`."""
        frames: list[dict[str, Any]] = []
        while True:
            frame = await self.receive()
            if skip_pings and frame["type"] == "ping" and frame_type != "ping":
                continue
            frames.append(frame)
            if frame["type"] == frame_type:
                return frames

    async def turn(self) -> list[dict[str, Any]]:
        """The frames of one whole turn: from `typing` true to `typing` false."""
        frames = await self.receive_until("response_end")
        frames += await self.receive_until("typing")
        return frames

    async def closed_code(self) -> int | None:
        """Read until the server closes; the close code it sent."""
        with trio.fail_after(CLIENT_WAIT_S):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as closed:
                return closed.reason.code if closed.reason else None


async def refusal(
    url: str, headers: list[tuple[str, str]] | None = None
) -> tuple[int | None, str]:
    """Connect and read until the server closes: (close code, close reason). Fails if
    any frame (a `connected` above all) arrives before the close."""
    async with open_websocket_url(
        url, extra_headers=headers, connect_timeout=CLIENT_WAIT_S, disconnect_timeout=CLIENT_WAIT_S
    ) as ws:
        with trio.fail_after(CLIENT_WAIT_S):
            try:
                frame = await ws.get_message()
            except ConnectionClosed as closed:
                reason = closed.reason
                return (reason.code, reason.reason or "") if reason else (None, "")
    raise AssertionError(f"a frame arrived before the close: {frame!r}")


def ws_url(server: ChatServer, session_id: str, token: str | None, prefix: str = "chat") -> str:
    query = f"?token={token}" if token is not None else ""
    return f"ws://127.0.0.1:{server.port}/ws/{prefix}/{session_id}{query}"




@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeUpstream:
    upstream: FakeUpstream = await nursery.start(FakeUpstream().serve)
    return upstream


@pytest.fixture
def make_config(tmp_path: Path, fake: FakeUpstream) -> Callable[..., Config]:
    def make(**overrides: Any) -> Config:
        settings: dict[str, Any] = {
            "port": 0,
            "db_path": str(tmp_path / "chat.db"),
            "jwt_secret": JWT_SECRET,
            "upstream_url": fake.base_url,
            "api_key": API_KEY,
            "model": "test-model",
            "instructions": "You are a test agent.",
            "shutdown_grace_s": 2.0,
            # `make test` runs the core tests a second time with the fast paths off.
            "fast_paths": os.environ.get("CHAT_FAST_PATHS", "1") != "0",
        }
        settings.update(overrides)
        return Config(**settings)

    return make


@pytest.fixture
def start_server(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> Callable[..., Awaitable[ChatServer]]:
    async def start(**overrides: Any) -> ChatServer:
        server: ChatServer = await nursery.start(run_server, make_config(**overrides))
        return server

    return start


@pytest.fixture
async def server(start_server: Callable[..., Awaitable[ChatServer]]) -> ChatServer:
    return await start_server()


@asynccontextmanager
async def open_chat(
    server: ChatServer,
    session_id: str = "s1",
    user: str = "alice",
    *,
    token: str | None = None,
    prefix: str = "chat",
    headers: list[tuple[str, str]] | None = None,
    expect_connected: bool = True,
) -> AsyncIterator[ChatClient]:
    """Connect as `user` (or with an explicit `token`); reads `connected` first."""
    url = ws_url(server, session_id, token if token is not None else token_for(user), prefix)
    async with open_websocket_url(
        url, extra_headers=headers, connect_timeout=CLIENT_WAIT_S, disconnect_timeout=CLIENT_WAIT_S
    ) as ws:
        client = ChatClient(ws)
        if expect_connected:
            frame = await client.receive()
            assert frame["type"] == "connected", frame
            client.connected = frame  # type: ignore[attr-defined]
        yield client
