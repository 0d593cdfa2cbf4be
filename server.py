"""The chat server: command line, HTTP front, WebSocket connections and turns.

Architecture (one process, one trio event loop)::

    ChatServer.serve            listeners, the connection registry, graceful shutdown
    └── _handle_stream          one per TCP connection: read the HTTP head (h11)
        ├── plain HTTP          /healthz, /metrics, /, else 404
        └── WebSocket upgrade   handed to trio-websocket over a ClientStream
            └── ChatConnection.run          one nursery per connection
                ├── _receive_loop           parse frames, queue messages, stop, tools
                ├── _send_loop              started on demand: drains the bounded
                │                           Outbox (frames that must wait), then ends
                ├── _heartbeat_loop         JSON ping + ping frame, drops silent peers,
                │                           closes with 4001 when the token expires
                └── _run_queued_turns       started on demand: the queued turns one at a
                                            time, each in its own cancel scope; writes
                                            text deltas itself while the client keeps up

`stop` is `turn.scope.cancel()` (each queued turn owns its cancel scope): the
upstream request lives inside that scope and is closed with it. Disconnect,
takeover and shutdown cancel the connection's nursery; the turn then stores its
partial answer as `interrupted` in a shielded, time-boxed write.

Error handling: every failure inside one connection ends that connection only
(logged, close 1011); the server keeps serving. Contract errors are the
`protocol.ChatError` tree: each knows its frame (`FrameError.to_frame`) or close
code (`CloseError.close_code`); they are applied in one place each, `_send_error`
and `_close_websocket`.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import gc
import itertools
import json
import logging
import logging.handlers
import math
import os
import queue
import resource
import secrets
import select
import signal
import socket
import sqlite3
import ssl
import sys
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import jwt
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sortedcontainers import SortedList
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream
from wsproto.utilities import LocalProtocolError as WsprotoLocalProtocolError

import protocol as wire
from agent_client import (
    AgentClient,
    AgentEvent,
    Completed,
    DemoModelTransport,
    Failed,
    Incomplete,
    PreviousResponseNotFound,
    ResponseRequest,
    ResponseStarted,
    TextDelta,
    ToolCall,
    UpstreamError,
)
from store import SessionStore, StoredMessage, ToolCallRecord, backup_database

log = logging.getLogger("chat")

DEFAULT_UPSTREAM_URL = "https://api.openai.com/v1"
DEFAULT_INSTRUCTIONS = (
    "You are a helpful, friendly support agent. Answer clearly and concisely. "
    "When you need information only the user or their device has, use the tools you are given."
)

# A client gets this long to send its HTTP request head; slowloris peers are dropped.
HANDSHAKE_TIMEOUT_S = 10.0
MAX_REQUEST_HEAD_BYTES = 16 * 1024
# How long one frame may wait for a client that does not read before it is dropped.
SEND_TIMEOUT_S = 20.0
# Closing handshake: a peer that does not answer our close frame is cut off after this.
CLOSE_TIMEOUT_S = 2.0
# The same for a peer already known to be silent (heartbeat timeout): enough to hand
# the close frame to the kernel, no more.
DEAD_PEER_CLOSE_TIMEOUT_S = 0.1
# Writes that must happen while the connection is being torn down (shielded).
FINAL_WRITE_TIMEOUT_S = 5.0
# Frames waiting for a slow client, in characters; past it the client is dropped (1008).
MAX_OUTBOX_CHARS = 8 * 1024 * 1024
MAX_TOKEN_BYTES = 8 * 1024
# The garbage collector's generation thresholds (CPython's: 700, 10, 10). A middle
# collection scans what survived the young ones since the last: while thousands of
# clients connect that is mostly new connections' state, and at CPython's sizes it took
# 3-14 ms; at half the young size and half the count, 1-3 ms. A full collection scans
# every object of every open connection, about 200 ms at 10,000 connections, and
# stalls the event loop for that long: it is made rare. Chosen by measured loop
# stalls (bench/README.md).
GC_YOUNG_THRESHOLD = 350
GC_MIDDLE_THRESHOLD = 5
GC_FULL_THRESHOLD = 4_000
# Log records waiting for the log writer thread; past this they are dropped and counted.
LOG_QUEUE_RECORDS = 10_000
# At exit, queued records are written for this long at most.
LOG_DRAIN_TIMEOUT_S = 5.0
# trio-websocket's own queue of received messages; backpressure beyond it.
WS_MESSAGE_QUEUE_SIZE = 16
# Connections whose client is gone that are torn down per pass of the event loop when
# many drop at once (`PassGate`): a teardown takes ~0.4 ms of loop time here, so 8
# make 3-5 ms a pass (10,000 drops: about 1,250 passes, 7 s).
DROPS_PER_PASS = 8
# WebSockets admitted (token checked, session claimed) per pass of the event loop when
# many connect at once (`PassGate`): ~0.4 ms each here, so 12 make about 5 ms a pass.
ADMISSIONS_PER_PASS = 12
# Ready sockets one I/O poll reports to the event loop (`cap_io_events_per_pass`): a
# woken task costs 15 µs (an end of stream) to 300 µs (a handshake step) here, so a
# pass stays within a few milliseconds; 128 let 10,000 connecting clients make passes
# of 14-25 ms of CPU, 32 of 7-13 ms.
IO_EVENTS_PER_PASS = 32


# =========================================================================== configuration


@dataclass(frozen=True)
class Config:
    """Everything the server reads from flags and the environment."""

    host: str = "127.0.0.1"
    port: int = 8765
    db_path: str = "./chat.db"
    jwt_secret: str | None = None
    jwt_secret_generated: bool = False
    jwt_public_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    insecure_dev: bool = False
    upstream_url: str = DEFAULT_UPSTREAM_URL
    api_key: str | None = None
    model: str = "gpt-4.1"
    instructions: str = DEFAULT_INSTRUCTIONS
    tools: list[dict[str, Any]] = field(default_factory=list)
    upstream_store: bool = True
    heartbeat_interval_s: float = 30.0
    heartbeat_timeout_s: float = 10.0
    max_frame_bytes: int = 64 * 1024
    max_content_chars: int = 10_000
    max_connections: int = 10_000
    max_connections_per_user: int = 5
    rate_limit_messages: int = 30
    rate_limit_window_s: float = 60.0
    max_queue: int = 8
    tool_timeout_s: float = 120.0
    upstream_idle_timeout_s: float = 60.0
    allowed_origins: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    shutdown_grace_s: float = 5.0
    log_content: bool = False
    # Not flags: tests and embedders lower these to exercise the slow-peer rules.
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    send_timeout_s: float = SEND_TIMEOUT_S
    max_outbox_chars: int = MAX_OUTBOX_CHARS

    @property
    def uses_demo_model(self) -> bool:
        """No key and no custom upstream: serve the offline demo model."""
        return self.api_key is None and self.upstream_url == DEFAULT_UPSTREAM_URL


class ConfigError(Exception):
    """The configuration cannot run; the message says which setting and why."""


class _ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


def load_tools(path: str) -> list[dict[str, Any]]:
    """Read a tools file: a JSON list of {name, description, parameters}. Returns them as
    Responses API function tools. Raises ConfigError naming the bad entry."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"tools file {path}: cannot read JSON ({exc})") from None
    if not isinstance(entries, list):
        raise ConfigError(f"tools file {path}: must be a JSON list of tools")
    tools: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        try:
            spec = _ToolSpec.model_validate(entry)
        except ValidationError as exc:
            problem = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(part) for part in problem["loc"]) or "entry"
            label = entry.get("name") if isinstance(entry, dict) else None
            raise ConfigError(
                f"tools file {path}: tool #{index} ({label or 'unnamed'}): "
                f"{where}: {problem['msg']}"
            ) from None
        if spec.parameters.get("type") != "object":
            raise ConfigError(
                f"tools file {path}: tool #{index} ({spec.name}): parameters must be a JSON "
                'schema with "type": "object"'
            )
        if spec.name in seen:
            raise ConfigError(f"tools file {path}: tool #{index}: duplicate name {spec.name!r}")
        seen.add(spec.name)
        tool: dict[str, Any] = {"type": "function", **spec.model_dump(exclude_none=True)}
        tools.append(tool)
    return tools


# =========================================================================== auth


class TokenVerifier:
    """Checks JWTs: signature, `exp`, a `sub`, and an algorithm allow-list (never `none`)."""

    def __init__(
        self,
        *,
        secret: str | None,
        public_key_pem: str | None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        self._audience = audience
        self._issuer = issuer
        self._keys: dict[str, Any] = {}
        if secret:
            self._keys["HS256"] = secret
        if public_key_pem:
            self._keys["RS256"] = public_key_pem
            self._keys["ES256"] = public_key_pem

    def verify(self, token: str | None) -> tuple[str, float | None]:
        """Return (user id, expiry as a UNIX time or None). Raises Unauthorized."""
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise wire.Unauthorized()
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
            if not isinstance(algorithm, str) or algorithm not in self._keys:
                raise wire.Unauthorized()
            key = self._keys[algorithm]
            required = ["sub"] + ["aud"] * bool(self._audience) + ["iss"] * bool(self._issuer)
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": required},
            )
        except jwt.PyJWTError:
            raise wire.Unauthorized() from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise wire.Unauthorized()
        expiry = claims.get("exp")
        return subject, float(expiry) if isinstance(expiry, int | float) else None


def issue_token(secret: str, subject: str, ttl_s: int) -> str:
    now = int(time.time())
    return jwt.encode({"sub": subject, "iat": now, "exp": now + ttl_s}, secret, algorithm="HS256")


# =========================================================================== HTTP front


@dataclass
class RequestHead:
    """A request head and the bytes it came in (trio-websocket must read them again)."""

    method: str
    target: str
    headers: dict[str, str]
    raw: bytes = b""

    def release(self) -> None:
        """Drop the bytes and headers once admission has used them: the frames that
        hold this object stay alive as long as the connection, often for hours."""
        self.raw = b""
        self.headers = {}
        self.target = ""  # it may carry the token in its query

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)

    @property
    def is_websocket_upgrade(self) -> bool:
        return self.headers.get("upgrade", "").lower() == "websocket"


class PassGate:
    """Lets at most ``per_pass`` tasks per pass of the event loop through to costly
    work when many arrive at once; the rest wait in arrival order, and `run` (one
    task for the server's lifetime) lets them on pass by pass.

    trio runs every task that became ready in one pass of its loop before it looks at
    timers or I/O again, and thousands of connections can become ready together:

    - **Drops** (`ClientStream` passes the gate when it finds its client gone, before
      it tells trio-websocket). When clients vanish together (a network blip, a proxy
      restart), a teardown takes about 0.4 ms of loop time (the handler,
      trio-websocket's reader, the receiver and the heartbeat each take steps), and
      one poll reported up to 2,000 ends of stream: close to a second in which no other
      session moved.
    - **Admissions** (after the WebSocket handshake, before the token is checked and
      the session claimed). When thousands of clients connect together (after a
      restart), each admission step takes about 0.4 ms, and 30 or more became ready
      in the same pass.

    With ``pause_gc`` the cyclic garbage collector is paused while tasks wait: during
    a drop storm collections of the young generations over the storm's fresh objects
    took 20-29 ms each, and teardowns free their objects by reference counting (turns
    leave no cyclic garbage; a test checks it). It resumes when the last one has gone
    on. (Admissions create long-lived objects, which a paused collector would have to
    scan all at once when it resumes: not for them.)
    """

    def __init__(self, per_pass: int, *, pause_gc: bool) -> None:
        self._per_pass = per_pass
        self._free = per_pass  # may go on without waiting
        self._waiting = trio.lowlevel.ParkingLot()
        self._wake_pacer = trio.Event()
        self._pause_gc = pause_gc
        self._paused_gc = False

    async def pass_through(self) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        if self._pause_gc and not self._paused_gc and gc.isenabled():
            gc.disable()
            self._paused_gc = True
        self._wake_pacer.set()
        await self._waiting.park()

    async def run(self) -> None:
        """The pacer, for the server's lifetime: per_pass waiting tasks each pass."""
        while True:
            await self._wake_pacer.wait()
            self._wake_pacer = trio.Event()
            try:
                while self._waiting:
                    self._waiting.unpark(count=self._per_pass)
                    await trio.lowlevel.checkpoint()  # they run in the next pass, then we do
            finally:
                if self._paused_gc:
                    gc.enable()
                    self._paused_gc = False
            self._free = self._per_pass


class ConnectionTimers:
    """The long waits of every connection (the next heartbeat, a token's expiry) on
    one trio deadline for the whole server.

    trio keeps each cancel scope's deadline in one heap and, once stale entries (of
    scopes that ended early) outnumber the live ones, rebuilds the heap in one go,
    inside a pass of the event loop. With a deadline per idle connection that rebuild
    took 15 ms at 10,000 connections, and it comes around whenever many connections
    end or begin. Here the waits sit in a sorted list instead (insert and removal
    O(log n), nothing is ever rebuilt), and one task, `run`, sleeps until the earliest
    and wakes whoever is due.
    """

    def __init__(self) -> None:
        self._due = SortedList()  # (when, sequence number, task): no two compare equal
        self._sequence = itertools.count()
        self._alarm: trio.CancelScope | None = None  # run's wait, while it waits

    def __len__(self) -> int:
        return len(self._due)

    async def sleep_until(self, when: float) -> None:
        """Like `trio.sleep_until` (cancellable, on trio's clock), without a trio
        deadline of its own."""
        entry = (when, next(self._sequence), trio.lowlevel.current_task())
        self._due.add(entry)
        if self._alarm is not None and when < self._alarm.deadline:
            self._alarm.deadline = when

        def abort(_: Callable[[], BaseException]) -> trio.lowlevel.Abort:
            self._due.remove(entry)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def run(self) -> None:
        """The one task that sleeps for everyone, for the server's lifetime."""
        while True:
            now = trio.current_time()
            while self._due and self._due[0][0] <= now:
                trio.lowlevel.reschedule(self._due.pop(0)[2])
            earliest = self._due[0][0] if self._due else math.inf
            with trio.CancelScope(deadline=earliest) as self._alarm:
                await trio.sleep_forever()
            self._alarm = None


class _CappedEpoll:
    """trio's epoll object, except that one poll returns at most `limit` events."""

    def __init__(self, epoll: select.epoll, limit: int) -> None:
        self._epoll = epoll
        self._limit = limit

    def poll(self, timeout: float | None = None, maxevents: int = -1) -> list[tuple[int, int]]:
        wanted = self._limit if maxevents <= 0 else min(maxevents, self._limit)
        return self._epoll.poll(timeout, wanted)

    def register(self, fd: int, eventmask: int) -> None:
        self._epoll.register(fd, eventmask)

    def modify(self, fd: int, eventmask: int) -> None:
        self._epoll.modify(fd, eventmask)

    def unregister(self, fd: int) -> None:
        self._epoll.unregister(fd)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def close(self) -> None:
        self._epoll.close()


def cap_io_events_per_pass(limit: int) -> bool:
    """Make each I/O poll of the running trio loop report at most `limit` ready
    sockets. True if the cap is in place (now or already).

    trio wakes every task whose socket a poll reports and runs them all in the same
    pass of its loop, before it looks at timers or I/O again. When 10,000 clients
    drop at once a single poll reported up to 2,000 ends of stream: 35 ms in which
    no other session moved. epoll leaves the sockets it did not report ready (in
    order: it hands out its ready list from the front), so the rest wake in the next
    passes, each of which also serves everyone else.

    trio offers no setting for this: its epoll object is replaced by one that asks
    for fewer events. That object is private to trio, so the shape is checked first;
    on other platforms (kqueue) or another trio layout the loop runs uncapped, and
    tests/test_loop_passes.py fails on the pinned trio if the cap stops taking hold.
    """
    try:
        io_manager = trio._core._run.GLOBAL_RUN_CONTEXT.runner.io_manager
        epoll = io_manager._epoll
    except AttributeError:
        return False
    if isinstance(epoll, _CappedEpoll):
        return True
    if not isinstance(epoll, select.epoll):
        return False
    io_manager._epoll = _CappedEpoll(epoll, limit)  # type: ignore[assignment]  # duck-typed
    return True


class ClientStream(trio.abc.Stream):
    """A client's TCP stream, under trio-websocket and under the hot path.

    Reading first returns the bytes already read: the HTTP head is read before we know
    whether the request is a WebSocket upgrade, and trio-websocket must see it again.

    Writing is built for a frame per text delta. `write_now` writes a whole frame
    without waiting or yielding (the turn task calls it; no task switch per delta);
    `send_all` (trio-websocket's writes: every other frame, pings, close) writes what
    the kernel takes at once and waits only for the rest. Bytes are committed in
    order: what the kernel has not taken yet (`_pending`) is always written before
    anything else, and stays committed if its writer is cancelled, so a frame is never
    cut by another. One task at a time waits to write; others queue behind it.
    On TLS (no socket to write to directly) every write is the TLS stream's.

    The end of the stream, or a broken one, passes `drops` (a PassGate) first.
    """

    def __init__(self, inner: trio.abc.Stream, already_read: bytes, drops: PassGate) -> None:
        self._inner = inner
        self._replay = already_read
        self._drops = drops
        self._socket = inner.socket if isinstance(inner, trio.SocketStream) else None
        self._pending = b""
        self._flushed: trio.Event | None = None  # exists while a task waits to write

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._replay:
            size = len(self._replay) if max_bytes is None else max_bytes
            chunk, self._replay = self._replay[:size], self._replay[size:]
            await trio.lowlevel.checkpoint()
            return chunk
        try:
            data = await self._inner.receive_some(max_bytes)
        except trio.BrokenResourceError:
            await self._drops.pass_through()
            raise
        if not data:
            await self._drops.pass_through()
        return data

    def write_now(self, data: bytes) -> bool:
        """Write `data` without waiting if nothing is queued before it and the kernel
        takes at least part of it. False: nothing was written, the caller queues it.
        A tail the kernel did not take is committed (`has_pending`): call `flush`."""
        if self._pending or self._flushed is not None or self._socket is None:
            return False
        fd = self._socket.fileno()
        if fd < 0:
            return False
        try:
            sent = os.write(fd, data)
        except OSError:
            return False  # full, or broken: the queued path waits, or reports it
        self._pending = data[sent:]
        return True

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._socket is None:
            await self._inner.send_all(data)
            return
        while self._flushed is not None:
            await self._flushed.wait()
        self._pending += data
        self._write_some()
        if self._pending:
            await self._flush_pending()

    async def flush(self) -> None:
        """Wait until every committed byte is written."""
        while self._flushed is not None:
            await self._flushed.wait()
        if self._pending:
            await self._flush_pending()

    async def _flush_pending(self) -> None:
        assert self._socket is not None
        self._flushed = flushed = trio.Event()
        try:
            while self._pending:
                await trio.lowlevel.wait_writable(self._socket)
                self._write_some()
        finally:
            self._flushed = None
            flushed.set()

    def _write_some(self) -> None:
        """Write what the kernel takes of `_pending` now. Raises ClosedResourceError
        or BrokenResourceError, as trio's streams do."""
        assert self._socket is not None
        fd = self._socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the stream is closed")
        try:
            sent = os.write(fd, self._pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self._pending = b""
            raise trio.BrokenResourceError(f"the connection broke: {exc.strerror}") from exc
        self._pending = self._pending[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._pending = b""
        await self._inner.aclose()


async def _read_request_head(stream: trio.abc.Stream) -> RequestHead | None:
    """Read until a full request head. Returns it (with every byte read, `raw`), or None
    if the peer closed or sent something that is not HTTP/1.1 or is too large."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
    raw = bytearray()
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                # A head over the limit (a huge cookie or token): say why before closing.
                await _answer_http(
                    stream, 431, b'{"error": "request head too large"}', "application/json"
                )
            return None
        if isinstance(event, h11.Request):
            headers = {
                name.decode("latin-1").lower(): value.decode("latin-1")
                for name, value in event.headers
            }
            head = RequestHead(event.method.decode(), event.target.decode("latin-1"), headers)
            head.raw = bytes(raw)
            return head
        if event is not h11.NEED_DATA:
            return None
        data = bytes(await stream.receive_some(4096))
        if not data:
            return None
        raw += data
        parser.receive_data(data)


async def _answer_http(
    stream: trio.abc.Stream, status: int, body: bytes, content_type: str
) -> None:
    reason = {
        200: b"OK",
        404: b"Not Found",
        431: b"Request Header Fields Too Large",
    }.get(status, b"")
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
        b"cache-control: no-store\r\nconnection: close\r\n\r\n"
        % (status, reason, content_type.encode(), len(body))
    )
    with trio.move_on_after(SEND_TIMEOUT_S):
        await stream.send_all(head + body)


HttpAnswer = tuple[int, bytes, str]
HttpRoute = Callable[[], Awaitable[HttpAnswer]]


# =========================================================================== per-connection


class Outbox:
    """Frames waiting for the sender task, bounded in characters.

    While the client lags, consecutive `text_delta`s of one turn are merged into one
    frame (the concatenated text is exactly the same), so a slow reader costs one
    growing string, not a frame per token. Raises SlowConsumer past MAX_OUTBOX_CHARS.
    """

    def __init__(self, max_chars: int = MAX_OUTBOX_CHARS) -> None:
        # A plain list: it holds a handful of frames at most, and an empty list costs
        # a fraction of an empty deque on every idle connection.
        self._frames: list[wire.ServerFrame | PendingDeltas] = []
        self._chars = 0
        self._max_chars = max_chars

    def put(self, frame: wire.ServerFrame) -> None:
        self._add(_frame_weight(frame))
        self._frames.append(frame)

    def put_delta(self, turn_id: str, text: str) -> None:
        """Queue a text delta, merged into the delta before it if that one still waits.
        The hot path: no frame model is built until the text is sent."""
        self._add(_DELTA_OVERHEAD_CHARS + len(text))
        last = self._frames[-1] if self._frames else None
        if isinstance(last, PendingDeltas) and last.turn_id == turn_id:
            last.parts.append(text)
        else:
            self._frames.append(PendingDeltas(turn_id, [text]))

    def _add(self, size: int) -> None:
        if self._chars + size > self._max_chars:
            raise wire.SlowConsumer()
        self._chars += size

    def take(self) -> wire.ServerFrame | PendingDeltas | None:
        """The oldest waiting frame, or None when there is none."""
        if not self._frames:
            return None
        item = self._frames.pop(0)
        self._chars -= item.weight() if isinstance(item, PendingDeltas) else _frame_weight(item)
        return item


_DELTA_OVERHEAD_CHARS = 64


@dataclass(slots=True)
class PendingDeltas:
    """Text deltas of one turn waiting for the sender; more than one part only while
    the client lags. Joined and encoded once, when sent."""

    turn_id: str
    parts: list[str]

    def weight(self) -> int:
        return sum(_DELTA_OVERHEAD_CHARS + len(part) for part in self.parts)

    def encode(self) -> str:
        return wire.encode_text_delta(self.turn_id, "".join(self.parts))


def _frame_weight(frame: wire.ServerFrame) -> int:
    """Characters a queued frame counts for (text deltas: `PendingDeltas.weight`)."""
    if isinstance(frame, wire.HistoryReply):
        return 64 + sum(128 + len(entry.content) for entry in frame.messages)
    return 256


class RateLimiter:
    """A token bucket: `capacity` messages, refilled evenly over `window_s`."""

    def __init__(self, capacity: int, window_s: float) -> None:
        self._capacity = float(capacity)
        self._tokens = float(capacity)
        self._refill_per_s = capacity / window_s
        self._updated = trio.current_time()

    def take(self) -> None:
        """Spend one token. Raises RateLimited if none is left."""
        now = trio.current_time()
        self._tokens = min(
            self._capacity, self._tokens + (now - self._updated) * self._refill_per_s
        )
        self._updated = now
        if self._tokens < 1.0:
            raise wire.RateLimited()
        self._tokens -= 1.0


@dataclass
class QueuedTurn:
    """An accepted message waiting for (or running) its turn; `scope` is the turn's
    cancel scope, made at once so that a `stop` can reach a turn about to start."""

    message: StoredMessage
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass
class PendingToolCall:
    record: ToolCallRecord
    answered: trio.Event = field(default_factory=trio.Event)


@dataclass
class TurnState:
    """What one turn has produced so far; stored when the turn ends, whatever the end."""

    turn_id: str
    message: StoredMessage
    parts: list[str] = field(default_factory=list)
    response_id: str | None = None
    status: wire.TurnStatus = "failed"
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    started_at: float = field(default_factory=trio.current_time)
    first_delta_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class _TurnFailed(Exception):
    """The upstream ended the turn with an error (after retries, or mid-stream)."""


TOOL_TIMEOUT_OUTPUT = "Error: the tool did not answer in time (timed out). Continue without it."
TOOL_CANCELLED_OUTPUT = "Error: the turn ended before the tool answered."
TOOL_BAD_ARGUMENTS_OUTPUT = "Error: the arguments were not a valid JSON object; call again."


class ChatConnection:
    """One authenticated WebSocket on one session.

    Resource handling: `run` owns a nursery holding the receiver and heartbeat tasks,
    and the sender and turns tasks while they have work; it returns when one of them ends
    the connection, after the running turn (if any) has been stored, and then closes
    the socket with the code that ended it. `close(error)` may be called from anywhere,
    any number of times: the first reason wins.
    """

    def __init__(
        self,
        server: ChatServer,
        ws: WebSocketConnection,
        stream: ClientStream,
        *,
        session_id: str,
        user_id: str,
        token_expiry: float | None,
        resumed: bool,
        history_length: int,
    ) -> None:
        self.server = server
        self.config = server.config
        self.ws = ws
        self._stream = stream
        self.session_id = session_id
        self.user_id = user_id
        self.token_expiry = token_expiry
        self.resumed = resumed
        self.history_length = history_length
        self.finished = trio.Event()
        self._outbox = Outbox(self.config.max_outbox_chars)
        self._sender_started = False
        self._queue: list[QueuedTurn] = []
        self._turns_task_started = False
        self._running: QueuedTurn | None = None
        self._pending_calls: dict[str, PendingToolCall] = {}
        # Set while a heartbeat waits for an answer; any received frame is one.
        self._activity: trio.Event | None = None
        self._rate = RateLimiter(self.config.rate_limit_messages, self.config.rate_limit_window_s)
        self._nursery: trio.Nursery | None = None
        self._close_error: wire.CloseError | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._close_error is not None:  # closed (taken over) before it started
                    nursery.cancel_scope.cancel()
                self.send(
                    wire.Connected(
                        session_id=self.session_id,
                        user_id=self.user_id,
                        timestamp=wire.utc_timestamp(),
                        resumed=self.resumed,
                        history_length=self.history_length,
                    )
                )
                # An idle connection is these two tasks (plus trio-websocket's reader);
                # the sender and the turns task exist only while they have work: tasks
                # are most of the memory an idle connection costs.
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._heartbeat_loop)
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await _close_websocket(self.ws, self._close_error or _NormalClose())
                self.finished.set()

    @property
    def close_code(self) -> int:
        return self._close_error.close_code if self._close_error else 1000

    def close(self, error: wire.CloseError) -> None:
        """End the connection with `error`'s close code (first call wins)."""
        if self._close_error is None:
            self._close_error = error
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def send(self, frame: wire.ServerFrame) -> None:
        """Queue one frame for the client. Never blocks; a client too far behind is closed."""
        try:
            self._outbox.put(frame)
        except wire.SlowConsumer as exc:
            self._too_slow(exc)
        self._start_sender()

    def send_delta(self, turn_id: str, text: str) -> None:
        """Send one text delta: written at once when nothing waits before it and the
        client keeps up (the hot path: no task switch), else queued (see `send`)."""
        if (
            not self._sender_started  # then nothing waits in the outbox either
            and self._close_error is None
            and self.ws.closed is None  # no close frame sent: data may still follow
            and self._stream.write_now(wire.encode_text_delta_frame(turn_id, text))
        ):
            self.server.metrics.deltas_sent.inc()
            if self._stream.has_pending:
                self._start_sender()  # it writes the tail the kernel did not take yet
            return
        try:
            self._outbox.put_delta(turn_id, text)
        except wire.SlowConsumer as exc:
            self._too_slow(exc)
        self._start_sender()

    def _start_sender(self) -> None:
        if not self._sender_started and self._nursery is not None:
            self._sender_started = True
            self._nursery.start_soon(self._send_loop)

    def _too_slow(self, error: wire.SlowConsumer) -> None:
        log.warning("session %s: client not reading, closing", self.session_id)
        self.close(error)

    def _send_error(self, error: wire.FrameError) -> None:
        self.send(error.to_frame())

    # ------------------------------------------------------------------ tasks

    async def _send_loop(self) -> None:
        """The sender: writes queued frames until the outbox is empty, and then what the
        stream still holds, then ends (the next frame starts it again). While it runs,
        text deltas queue behind it (`send_delta`), so frames keep their order."""
        try:
            while (item := self._outbox.take()) is not None and await self._send(item):
                pass
            if self._stream.has_pending:
                await self._send(None)
        finally:
            self._sender_started = False

    async def _send(self, item: wire.ServerFrame | PendingDeltas | None) -> bool:
        """Send one frame (None: only what the stream holds already); a client that does
        not take it within send_timeout_s is dropped (1008). Returns False once the
        connection is done."""
        with trio.move_on_after(self.config.send_timeout_s) as send_deadline:
            try:
                if item is None:
                    await self._stream.flush()
                elif isinstance(item, PendingDeltas):
                    await self.ws.send_message(item.encode())
                    self.server.metrics.deltas_sent.inc()
                else:
                    await self.ws.send_message(wire.encode(item))
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                self.close(_PeerGone())
                return False
        if send_deadline.cancelled_caught:
            self.close(wire.SlowConsumer())
            return False
        return True

    async def _receive_loop(self) -> None:
        while True:
            try:
                raw = await self.ws.get_message()
            except ConnectionClosed as closed:
                too_large = closed.reason is not None and closed.reason.code == 1009
                self.close(wire.FrameTooLarge() if too_large else _PeerGone())
                return
            if self._activity is not None:
                self._activity.set()
            try:
                await self._dispatch(wire.parse_client_frame(raw))
            except wire.FrameError as error:
                self._send_error(error)

    async def _dispatch(self, frame: wire.ClientFrame) -> None:
        if isinstance(frame, wire.UserMessage):
            await self._accept_message(frame)
        elif isinstance(frame, wire.StopRequest):
            self._stop()
        elif isinstance(frame, wire.ClientPing):
            self.send(wire.ServerPong(timestamp=wire.utc_timestamp()))
        elif isinstance(frame, wire.ToolResponse):
            self._answer_tool(frame)
        elif isinstance(frame, wire.HistoryRequest):
            # Not rate-limited: a client reloads history on every (re)connect, and that
            # must never cost the user a message. The read is bounded by `limit`.
            messages = await self.server.store.history(self.session_id, frame.limit)
            self.send(wire.HistoryReply(messages=[_history_entry(m) for m in messages]))
        # ClientPong: its arrival already counted as activity for the heartbeat.

    async def _accept_message(self, frame: wire.UserMessage) -> None:
        if len(frame.content) > self.config.max_content_chars:
            raise wire.MessageTooLarge(
                f"The message has {len(frame.content)} characters; the limit is "
                f"{self.config.max_content_chars}."
            )
        self._rate.take()
        if len(self._queue) >= self.config.max_queue:
            raise wire.QueueFull()
        message = await self.server.store.add_user_message(
            self.session_id, frame.content, client_message_id=frame.id, metadata=frame.metadata
        )
        self.server.metrics.messages_received.inc()
        if self.config.log_content:
            log.info("session %s: user message %d: %r", self.session_id, message.id, frame.content)
        self._queue.append(QueuedTurn(message))
        if not self._turns_task_started and self._nursery is not None:
            self._turns_task_started = True
            self._nursery.start_soon(self._run_queued_turns)

    def _stop(self) -> None:
        # Queued messages stay in history (they were committed on arrival) and so are
        # context for the next turn; only their turns are dropped. When no turn runs
        # yet, the first queued one is about to start: it starts cancelled, so its
        # sender still gets a response_end (status stopped) for it.
        starting = self._queue[0] if self._running is None and self._queue else None
        self._queue.clear()
        for turn in (self._running, starting):
            if turn is not None:
                turn.scope.cancel()
        if starting is not None:
            self._queue.append(starting)

    def _answer_tool(self, frame: wire.ToolResponse) -> None:
        pending = self._pending_calls.pop(frame.call_id, None)
        if pending is None:
            raise wire.UnknownCallId(f"No tool request is waiting for call_id {frame.call_id!r}.")
        pending.record.output = frame.content
        pending.record.status = "completed"
        pending.answered.set()

    async def _heartbeat_loop(self) -> None:
        """Ping every interval and drop a peer that answers nothing in time. The same
        timer closes the connection with 4001 when its token expires (one task, not two:
        memory per idle connection)."""
        expires_at = math.inf
        if self.token_expiry is not None:
            expires_at = trio.current_time() + (self.token_expiry - time.time())
        while True:
            await self.server.timers.sleep_until(
                min(trio.current_time() + self.config.heartbeat_interval_s, expires_at)
            )
            answered = trio.current_time() < expires_at and await self._ping_and_wait(
                min(trio.current_time() + self.config.heartbeat_timeout_s, expires_at)
            )
            if trio.current_time() >= expires_at:
                log.info("session %s: token expired, closing", self.session_id)
                self.close(wire.Unauthorized("token expired"))
                return
            if not answered:
                log.info("session %s: no heartbeat answer, closing", self.session_id)
                self.close(_HeartbeatTimeout())
                return

    async def _ping_and_wait(self, deadline: float) -> bool:
        """Send a JSON ping and a ping frame; True once the pong or any frame arrives
        before `deadline`."""
        self._activity = activity = trio.Event()
        self.send(wire.ServerPing(timestamp=wire.utc_timestamp()))
        try:
            with trio.move_on_at(deadline):
                async with trio.open_nursery() as race:
                    race.start_soon(self._await_pong, race.cancel_scope)
                    await activity.wait()
                    race.cancel_scope.cancel()
                return True
            return False
        finally:
            self._activity = None

    async def _await_pong(self, race: trio.CancelScope) -> None:
        try:
            await self.ws.ping()
        except ConnectionClosed:
            self.close(_PeerGone())
        race.cancel()

    async def _run_queued_turns(self) -> None:
        """The generation task: runs queued turns one at a time, then ends."""
        try:
            while self._queue:
                self._running = self._queue.pop(0)
                try:
                    await self._run_turn(self._running)
                finally:
                    self._running = None
        finally:
            self._turns_task_started = False

    # ------------------------------------------------------------------ turns

    async def _run_turn(self, queued: QueuedTurn) -> None:
        message = queued.message
        turn = TurnState(turn_id=f"turn_{uuid.uuid4().hex}", message=message)
        self.send(wire.Typing(is_typing=True))
        self.send(wire.ResponseStart(turn_id=turn.turn_id, message_id=message.client_message_id))
        try:
            with queued.scope as scope:
                try:
                    await self._converse(turn)
                except (UpstreamError, _TurnFailed) as exc:
                    kind = exc.kind if isinstance(exc, UpstreamError) else "error_event"
                    self.server.metrics.upstream_errors.labels(kind).inc()
                    log.warning("session %s: upstream failed (%s): %s", self.session_id, kind, exc)
                    turn.status = "failed"
                    self._send_error(wire.UpstreamFailed(turn_id=turn.turn_id))
                except wire.StorageUnavailable as error:
                    log.error("session %s: database unavailable for turn context", self.session_id)
                    turn.status = "failed"
                    error.turn_id = turn.turn_id
                    self._send_error(error)
            if scope.cancelled_caught:
                turn.status = "stopped"
        except BaseException:
            # Disconnect, takeover or shutdown: the partial answer is stored all the same.
            turn.status = "interrupted"
            with trio.CancelScope(shield=True), trio.move_on_after(FINAL_WRITE_TIMEOUT_S) as late:
                await self._store_turn(turn)
            if late.cancelled_caught:
                log.error("session %s: turn %s not stored in time", self.session_id, turn.turn_id)
            self._log_turn_end(turn)
            raise
        finally:
            self._pending_calls.clear()
        try:
            await self._store_turn(turn)
        except wire.StorageUnavailable as error:
            log.error("session %s: turn %s could not be stored", self.session_id, turn.turn_id)
            error.turn_id = turn.turn_id
            self._send_error(error)
        self.send(
            wire.ResponseEnd(
                turn_id=turn.turn_id,
                full_content=turn.text,
                status=turn.status,
                response_id=turn.response_id,
            )
        )
        self.send(wire.Typing(is_typing=False))
        self._log_turn_end(turn)

    def _log_turn_end(self, turn: TurnState) -> None:
        metrics = self.server.metrics
        metrics.turns.labels(turn.status).inc()
        elapsed_s = trio.current_time() - turn.started_at
        first_s = turn.first_delta_at - turn.started_at if turn.first_delta_at else None
        log.info(
            "session %s: turn %s %s in %.3f s (first delta %s, %d chars, %d tool calls)",
            self.session_id,
            turn.turn_id,
            turn.status,
            elapsed_s,
            f"{first_s:.3f} s" if first_s is not None else "none",
            len(turn.text),
            len(turn.tool_calls),
            extra={
                "session_id": self.session_id,
                "turn_id": turn.turn_id,
                "status": turn.status,
                "elapsed_s": round(elapsed_s, 4),
            },
        )
        if self.config.log_content:
            log.info("session %s: turn %s answer: %r", self.session_id, turn.turn_id, turn.text)

    async def _store_turn(self, turn: TurnState) -> None:
        for call in turn.tool_calls:
            if call.status == "pending":
                call.output, call.status = TOOL_CANCELLED_OUTPUT, turn.status
        await self.server.store.finish_turn(
            self.session_id,
            reply_to=turn.message.id,
            turn_id=turn.turn_id,
            content=turn.text,
            status=turn.status,
            response_id=turn.response_id,
            tool_calls=turn.tool_calls,
        )

    async def _converse(self, turn: TurnState) -> None:
        """Stream upstream responses until the model is done, answering tool calls
        between rounds. Raises UpstreamError or _TurnFailed."""
        request = await self._first_request(turn)
        while True:
            parts_before = len(turn.parts)
            try:
                calls = await self._stream_round(turn, request)
            except PreviousResponseNotFound:
                if request.previous_response_id is None or turn.parts:
                    raise
                # The upstream forgot the chain (expired or another project): resend history.
                log.info("session %s: previous response unknown upstream", self.session_id)
                request = await self._full_history_request(turn)
                continue
            if not calls:
                return
            outputs = await self._resolve_tool_calls(turn, calls)
            said = "".join(turn.parts[parts_before:])
            request = self._tool_output_request(turn, request, said, calls, outputs)

    async def _first_request(self, turn: TurnState) -> ResponseRequest:
        # The context ends at this turn's own message: messages queued behind it are
        # context for their own turns, not this one.
        if self.config.upstream_store:
            chain = await self.server.store.chain_point(self.session_id, up_to=turn.message.id)
            if chain.previous_response_id is not None:
                return self._request(_input_items(chain.after), chain.previous_response_id)
        return await self._full_history_request(turn)

    async def _full_history_request(self, turn: TurnState) -> ResponseRequest:
        history = await self.server.store.full_history(self.session_id, up_to=turn.message.id)
        return self._request(_input_items(history), None)

    def _request(self, items: list[dict[str, Any]], previous: str | None) -> ResponseRequest:
        return ResponseRequest(
            input=items,
            instructions=self.config.instructions,
            previous_response_id=previous,
            tools=self.config.tools,
            store=self.config.upstream_store,
        )

    def _tool_output_request(
        self,
        turn: TurnState,
        request: ResponseRequest,
        said: str,
        calls: list[ToolCall],
        outputs: list[dict[str, Any]],
    ) -> ResponseRequest:
        if self.config.upstream_store:
            return self._request(outputs, turn.response_id)
        # Without upstream storage nothing can be chained: resend this round's input
        # with what the model said and asked in this round, then the outputs.
        text = [_assistant_item(said)] if said else []
        asked = [_function_call_item(c.call_id, c.name, c.arguments) for c in calls]
        return replace(request, input=[*request.input, *text, *asked, *outputs])

    async def _stream_round(self, turn: TurnState, request: ResponseRequest) -> list[ToolCall]:
        """One upstream response (the agent client retries what is safe to retry)."""
        calls: list[ToolCall] = []
        started = trio.current_time()
        try:
            async with self.server.agent.stream(request) as events:
                async for event in events:
                    self._on_event(turn, event, calls)
        finally:
            self.server.metrics.upstream_request_seconds.observe(trio.current_time() - started)
        return calls

    def _on_event(self, turn: TurnState, event: AgentEvent, calls: list[ToolCall]) -> None:
        if isinstance(event, TextDelta):
            if event.text:
                if not turn.parts:
                    turn.first_delta_at = trio.current_time()
                    self.server.metrics.time_to_first_token_seconds.observe(
                        turn.first_delta_at - turn.started_at
                    )
                turn.parts.append(event.text)
                self.send_delta(turn.turn_id, event.text)
        elif isinstance(event, ToolCall):
            calls.append(event)
        elif isinstance(event, ResponseStarted):
            turn.response_id = event.response_id
        elif isinstance(event, Completed):
            turn.response_id = event.response_id or turn.response_id
            turn.status = "completed"
        elif isinstance(event, Incomplete):
            turn.response_id = event.response_id or turn.response_id
            turn.status = "incomplete"
        elif isinstance(event, Failed):
            turn.response_id = event.response_id or turn.response_id
            raise _TurnFailed(f"upstream error {event.code or 'unknown'}")

    async def _resolve_tool_calls(
        self, turn: TurnState, calls: list[ToolCall]
    ) -> list[dict[str, Any]]:
        """Send a tool_request per call and wait (up to --tool-timeout) for the answers.
        Returns one function_call_output item per call, in call order."""
        pending: list[PendingToolCall] = []
        for call in calls:
            record = ToolCallRecord(call.call_id, call.name, call.arguments)
            turn.tool_calls.append(record)
            arguments = _parse_arguments(call.arguments)
            if arguments is None:
                record.output, record.status = TOOL_BAD_ARGUMENTS_OUTPUT, "failed"
                continue
            waiting = PendingToolCall(record)
            self._pending_calls[call.call_id] = waiting
            pending.append(waiting)
            self.send(
                wire.ToolRequest(
                    turn_id=turn.turn_id, call_id=call.call_id, name=call.name, arguments=arguments
                )
            )
        with trio.move_on_after(self.config.tool_timeout_s):
            for waiting in pending:
                await waiting.answered.wait()
        for waiting in pending:
            if not waiting.answered.is_set():
                self._pending_calls.pop(waiting.record.call_id, None)
                waiting.record.output, waiting.record.status = TOOL_TIMEOUT_OUTPUT, "failed"
        return [_function_output_item(record) for record in turn.tool_calls[-len(calls) :]]


class _NormalClose(wire.CloseError):
    close_code = 1000
    message = "normal closure"


class _PeerGone(wire.CloseError):
    """The client closed or vanished; there is nobody to send a close frame to."""

    close_code = 1000
    message = "peer gone"


class _HeartbeatTimeout(wire.CloseError):
    close_code = 1001
    message = "heartbeat timeout"


async def _close_websocket(ws: WebSocketConnection, error: wire.CloseError) -> None:
    """Send the close frame, time-boxed: a silent peer does not hold us. The caller
    that owns the TCP stream closes it afterwards either way."""
    # A peer that failed its heartbeat will not answer a close frame either: send it,
    # but free the connection at once rather than wait for a reply.
    wait_s = DEAD_PEER_CLOSE_TIMEOUT_S if isinstance(error, _HeartbeatTimeout) else CLOSE_TIMEOUT_S
    with trio.move_on_after(wait_s):
        await ws.aclose(error.close_code, error.detail[:120])


def _parse_arguments(arguments: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _assistant_item(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def _function_call_item(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments}


def _function_output_item(record: ToolCallRecord) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": record.call_id, "output": record.output}


def _input_items(messages: Sequence[StoredMessage]) -> list[dict[str, Any]]:
    """Stored history as Responses API input items. A tool row becomes its call and its
    output (every stored call has one), so the upstream never sees a dangling call."""
    items: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "user":
            items.append({"role": "user", "content": message.content})
        elif message.role == "assistant":
            if message.content:
                items.append(_assistant_item(message.content))
        elif message.call_id and message.name is not None:
            record = ToolCallRecord(
                message.call_id, message.name, message.arguments or "{}", message.output or ""
            )
            items.append(_function_call_item(record.call_id, record.name, record.arguments))
            items.append(_function_output_item(record))
    return items


def _history_entry(message: StoredMessage) -> wire.HistoryEntry:
    if message.role == "tool":
        return wire.HistoryEntry(
            id=message.id,
            role="tool",
            content=message.content,
            status=message.status,
            timestamp=message.created_at,
            name=message.name,
            call_id=message.call_id,
            arguments=_parse_arguments(message.arguments or "") or {},
            output=message.output,
        )
    return wire.HistoryEntry(
        id=message.id,
        role="user" if message.role == "user" else "assistant",
        content=message.content,
        status=message.status,
        timestamp=message.created_at,
    )


# =========================================================================== the web page

WEB_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json",
}


def web_dir() -> Path:
    """The bundled page: next to this file, or inside a PyInstaller bundle."""
    bundle = getattr(sys, "_MEIPASS", None)
    return Path(bundle or Path(__file__).resolve().parent) / "web"


def web_page_routes() -> dict[str, HttpRoute]:
    """`/` is web/index.html; every other file under web/ is served at /web/<path>.

    The files are read once at start: the set of routes is fixed, so no request
    path ever reaches the file system.
    """
    root = web_dir()
    routes: dict[str, HttpRoute] = {}
    if not root.is_dir():
        return routes
    for path in sorted(root.rglob("*")):
        content_type = WEB_CONTENT_TYPES.get(path.suffix)
        if not path.is_file() or content_type is None:
            continue
        answer: HttpAnswer = (200, path.read_bytes(), content_type)
        route = _fixed_answer(answer)
        routes["/web/" + path.relative_to(root).as_posix()] = route
        if path == root / "index.html":
            routes["/"] = route
    return routes


def _fixed_answer(answer: HttpAnswer) -> HttpRoute:
    async def route() -> HttpAnswer:
        return answer

    return route


# =========================================================================== operations


class ServerMetrics:
    """The Prometheus metrics of one server, in a registry of its own (so that a test
    process can run several servers), served at `/metrics`."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        self.active_connections = Gauge(
            "chat_active_connections",
            "Authenticated WebSocket connections open now.",
            registry=registry,
        )
        self.connections_opened = Counter(
            "chat_connections_opened", "WebSocket handshakes accepted.", registry=registry
        )
        self.connections_closed = Counter(
            "chat_connections_closed",
            "WebSocket connections closed, by close code.",
            ["code"],
            registry=registry,
        )
        self.messages_received = Counter(
            "chat_messages_received", "User messages accepted and stored.", registry=registry
        )
        self.turns = Counter("chat_turns", "Turns ended, by status.", ["status"], registry=registry)
        self.deltas_sent = Counter(
            "chat_deltas_sent", "text_delta frames written to clients.", registry=registry
        )
        self.upstream_request_seconds = Histogram(
            "chat_upstream_request_seconds",
            "One upstream request, first byte sent to end.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry,
        )
        self.time_to_first_token_seconds = Histogram(
            "chat_time_to_first_token_seconds",
            "Turn start to its first text delta.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=registry,
        )
        self.upstream_errors = Counter(
            "chat_upstream_errors",
            "Upstream failures that ended a turn, by kind.",
            ["kind"],
            registry=registry,
        )
        self.store_write_seconds = Histogram(
            "chat_store_write_seconds",
            "One SQLite write transaction, queueing included.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def systemd_notify(state: str) -> None:
    """Tell systemd about our state (READY=1, STOPPING=1, WATCHDOG=1) through the
    datagram socket in $NOTIFY_SOCKET; a no-op when not run by systemd (Type=notify)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)  # a full queue must never stall the event loop
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("systemd notify failed: %s", exc.strerror)


async def _watchdog_pings() -> None:
    """With WatchdogSec= set, ping at half the interval. The pings come from the event
    loop itself, so a stalled loop stops them and systemd restarts the service."""
    interval_us = os.environ.get("WATCHDOG_USEC")
    owner = os.environ.get("WATCHDOG_PID")
    if not interval_us or (owner and owner != str(os.getpid())):
        return
    while True:
        systemd_notify("WATCHDOG=1")
        await trio.sleep(int(interval_us) / 2_000_000)


# =========================================================================== the server


class ChatServer:
    """Accepts connections, admits WebSockets, keeps the registry, shuts down gracefully.

    Resource handling: `serve` owns the listeners and a nursery of connection
    handlers; it returns after `shutdown()` once every connection has closed (or
    the grace period ran out and the rest were cancelled).
    """

    def __init__(self, config: Config, store: SessionStore, agent: AgentClient) -> None:
        self.config = config
        self.store = store
        self.agent = agent
        self.verifier = TokenVerifier(
            secret=config.jwt_secret,
            public_key_pem=config.jwt_public_key,
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
        )
        self.port: int | None = None
        self.metrics = ServerMetrics()
        store.write_observer = self.metrics.store_write_seconds.observe
        self.http_routes: dict[str, HttpRoute] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            **web_page_routes(),
        }
        self._sessions: dict[str, ChatConnection] = {}
        self._drops = PassGate(DROPS_PER_PASS, pause_gc=True)
        self._admissions = PassGate(ADMISSIONS_PER_PASS, pause_gc=False)
        self.timers = ConnectionTimers()
        self._connections_by_user: dict[str, int] = {}
        self._connection_count = 0
        self._shutdown = trio.Event()
        self._shutting_down = False

    @property
    def connection_count(self) -> int:
        return self._connection_count

    def shutdown(self) -> None:
        """Begin a graceful shutdown; safe to call any number of times."""
        self._shutdown.set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        if not cap_io_events_per_pass(IO_EVENTS_PER_PASS):
            log.info("I/O events per loop pass are not capped on this platform")
        listeners: list[trio.abc.Listener[Any]] = list(
            await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        )
        self.port = listeners[0].socket.getsockname()[1]  # type: ignore[attr-defined]
        if self.config.tls_cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
            listeners = [
                trio.SSLListener(listener, context, https_compatible=True) for listener in listeners
            ]
        scheme = "https" if self.config.tls_cert else "http"
        async with trio.open_nursery() as handlers:
            # These run until _drain cancels the handlers.
            handlers.start_soon(self._drops.run)
            handlers.start_soon(self._admissions.run)
            handlers.start_soon(self.timers.run)
            async with trio.open_nursery() as accepting:
                accepting.start_soon(
                    partial(
                        trio.serve_listeners,
                        self._handle_stream,
                        listeners,
                        handler_nursery=handlers,
                    )
                )
                log.info("listening on %s://%s:%d", scheme, self.config.host, self.port)
                task_status.started(self.port)
                await self._shutdown.wait()
                accepting.cancel_scope.cancel()
            await self._drain(handlers)

    async def _drain(self, handlers: trio.Nursery) -> None:
        self._shutting_down = True
        systemd_notify("STOPPING=1")
        log.info("shutting down: closing %d connections", self._connection_count)
        for connection in list(self._sessions.values()):
            connection.close(wire.ServerShuttingDown())
        # Leave a margin inside the grace period for the store and the process exit.
        with trio.move_on_after(max(0.5, self.config.shutdown_grace_s - 1.0)):
            for connection in list(self._sessions.values()):
                await connection.finished.wait()
        handlers.cancel_scope.cancel()

    async def _metrics(self) -> HttpAnswer:
        return 200, self.metrics.render(), CONTENT_TYPE_LATEST

    async def _healthz(self) -> HttpAnswer:
        return 200, b'{"status": "ok"}', "application/json"

    # ------------------------------------------------------------------ per TCP stream

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one TCP connection. Never raises: a failing peer is logged and dropped."""
        try:
            head: RequestHead | None = None
            with trio.move_on_after(self.config.handshake_timeout_s):
                head = await _read_request_head(stream)
            if head is not None:
                if head.is_websocket_upgrade:
                    await self._handle_websocket(stream, head)
                else:
                    await self._handle_http(stream, head)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
            pass
        except Exception:
            log.exception("connection failed; the server keeps serving")
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle_http(self, stream: trio.abc.Stream, head: RequestHead) -> None:
        route = self.http_routes.get(head.path)
        if route is None or head.method not in ("GET", "HEAD"):
            # The contract: anything but the listed GETs is a 404, other methods included.
            await _answer_http(stream, 404, b'{"error": "not found"}', "application/json")
        else:
            status, body, content_type = await route()
            await _answer_http(stream, status, body if head.method == "GET" else b"", content_type)

    async def _handle_websocket(self, stream: trio.abc.Stream, head: RequestHead) -> None:
        session_id = _session_id_from_path(head.path)
        if session_id is None:
            await _answer_http(stream, 404, b'{"error": "not found"}', "application/json")
            return
        try:
            async with trio.open_nursery() as ws_tasks:
                ws: WebSocketConnection | None = None
                with trio.move_on_after(self.config.handshake_timeout_s):
                    request = await wrap_server_stream(
                        ws_tasks,
                        client_stream := ClientStream(stream, head.raw, self._drops),
                        message_queue_size=WS_MESSAGE_QUEUE_SIZE,
                        max_message_size=self.config.max_frame_bytes,
                    )
                    ws = await request.accept()
                    self.metrics.connections_opened.inc()
                if ws is not None:
                    await self._admissions.pass_through()
                    await self._run_session(ws, client_stream, head, session_id)
                ws_tasks.cancel_scope.cancel()
        except* WsprotoLocalProtocolError as errors:
            # trio-websocket issue #184: a peer's ping that arrives while we close makes
            # its reader task answer with a pong wsproto refuses. The peer is gone
            # either way; that is a peer's doing, not a server fault worth a traceback.
            log.info("websocket peer misbehaved while closing: %s", errors.exceptions[0])

    async def _run_session(
        self, ws: WebSocketConnection, stream: ClientStream, head: RequestHead, session_id: str
    ) -> None:
        try:
            connection = await self._admit(ws, stream, head, session_id)
        except wire.StorageUnavailable:
            log.error("session %s: database unavailable, refusing the connection", session_id)
            self.metrics.connections_closed.labels("1011").inc()
            await _close_websocket(ws, wire.InternalError("database unavailable"))
            return
        except wire.CloseError as refused:
            log.info("connection refused: close %d (%s)", refused.close_code, refused.detail)
            self.metrics.connections_closed.labels(str(refused.close_code)).inc()
            await _close_websocket(ws, refused)
            return
        head.release()
        user_id = connection.user_id
        racing = self._sessions.get(session_id)
        if racing is not None:
            # Another connection of this user was admitted while we awaited the store:
            # the newest one wins, as with any takeover.
            racing.close(wire.TakenOver())
        self._sessions[session_id] = connection
        self._connections_by_user[user_id] = self._connections_by_user.get(user_id, 0) + 1
        self._connection_count += 1
        self.metrics.active_connections.inc()
        log.info("session %s: user connected (resumed=%s)", session_id, connection.resumed)
        try:
            await connection.run()
        except Exception:
            log.exception("session %s: connection failed", session_id)
            with trio.CancelScope(shield=True):
                await _close_websocket(ws, wire.InternalError())
        finally:
            self._connection_count -= 1
            self.metrics.active_connections.dec()
            self.metrics.connections_closed.labels(str(connection.close_code)).inc()
            remaining = self._connections_by_user[user_id] - 1
            if remaining:
                self._connections_by_user[user_id] = remaining
            else:
                del self._connections_by_user[user_id]
            if self._sessions.get(session_id) is connection:
                del self._sessions[session_id]
            log.info("session %s: closed with %d", session_id, connection.close_code)

    async def _admit(
        self, ws: WebSocketConnection, stream: ClientStream, head: RequestHead, session_id: str
    ) -> ChatConnection:
        """Check everything before any session data is read. Raises CloseError."""
        if self._shutting_down:
            raise wire.ServerShuttingDown()
        if self._connection_count >= self.config.max_connections:
            raise wire.ServerFull()
        if not wire.is_valid_session_id(session_id):
            raise wire.InvalidSessionId()
        origin = head.headers.get("origin")
        if self.config.allowed_origins and origin is not None:
            if origin not in self.config.allowed_origins:
                raise wire.Forbidden("origin not allowed")
        user_id, expiry = self.verifier.verify(_token_from(head))
        previous = self._sessions.get(session_id)
        takes_over = previous is not None and previous.user_id == user_id
        held = self._connections_by_user.get(user_id, 0)
        if held >= self.config.max_connections_per_user and not takes_over:
            raise wire.UserConnectionLimit()
        claim = await self.store.claim_session(session_id, user_id)
        if claim.owner_id != user_id:
            raise wire.Forbidden("session belongs to another user")
        if previous is not None:
            previous.close(wire.TakenOver())
            with trio.move_on_after(FINAL_WRITE_TIMEOUT_S):
                await previous.finished.wait()
        return ChatConnection(
            self,
            ws,
            stream,
            session_id=session_id,
            user_id=user_id,
            token_expiry=expiry,
            resumed=claim.resumed,
            history_length=claim.history_length,
        )


WEBSOCKET_PATH_PREFIXES = ("/ws/chat/", "/ws/agent/")


def _session_id_from_path(path: str) -> str | None:
    for prefix in WEBSOCKET_PATH_PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix) :]
    return None


def _token_from(head: RequestHead) -> str | None:
    authorization = head.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    tokens = head.query.get("token")
    return tokens[0] if tokens else None


# =========================================================================== running


def build_agent(config: Config) -> AgentClient:
    if config.uses_demo_model:
        return AgentClient(
            base_url=DEFAULT_UPSTREAM_URL,
            api_key=None,
            model="demo",
            transport=DemoModelTransport(),
        )
    return AgentClient(
        base_url=config.upstream_url,
        api_key=config.api_key,
        model=config.model,
        idle_timeout_s=config.upstream_idle_timeout_s,
    )


async def run_server(
    config: Config,
    *,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[ChatServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open the store and the upstream client, serve until shutdown, close both.

    Started with `nursery.start(run_server, config)` it reports the ChatServer once
    listening (its `port` is set). With `handle_signals`, SIGTERM/SIGINT shut it down.
    """
    store = await SessionStore.open(config.db_path)
    agent = build_agent(config)
    server = ChatServer(config, store, agent)

    async def serve_then_stop_watching(task_status: trio.TaskStatus[int]) -> None:
        await server.serve(task_status=task_status)
        nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(_shutdown_on_signal, server)
            await nursery.start(serve_then_stop_watching)
            systemd_notify("READY=1")
            nursery.start_soon(_watchdog_pings)
            task_status.started(server)
    finally:
        with trio.CancelScope(shield=True):
            await agent.aclose()
            await store.aclose()


async def _shutdown_on_signal(server: ChatServer) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            # systemd may deliver SIGTERM twice (KillMode=mixed); repeats are harmless.
            log.info("received %s", signal.Signals(signum).name)
            server.shutdown()


# =========================================================================== command line


@dataclass(frozen=True)
class Setting:
    """One setting: `--flag`, the environment variable, and the key in the TOML file
    (the flag's name, with dashes or underscores). `read` turns text (flag, env) or a
    TOML value into the setting's value, raising ValueError with a reason."""

    flag: str
    env: str
    read: Callable[[Any], Any]
    default: Any = None
    help: str = ""
    kind: str = "value"  # "value", "switch" (--x/--no-x) or "list" (repeatable)
    secret: bool = False


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected non-empty text")
    return value


def _number(convert: Callable[[Any], Any], minimum: float) -> Callable[[Any], Any]:
    def read(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        number = convert(value)
        if not math.isfinite(number) or number < minimum:
            raise ValueError(f"must be at least {minimum:g}")
        return number

    return read


def _switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _rate(value: Any) -> tuple[int, float]:
    count, _, window = str(value).partition("/")
    messages, seconds = int(count), float(window)
    if messages < 1 or not (0 < seconds < math.inf):
        raise ValueError("expected MESSAGES/SECONDS, both positive, e.g. 30/60")
    return messages, seconds


def _origins(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError("expected a list of origins")
    return tuple(item.strip() for item in items if item.strip())


def _one_of(*choices: str) -> Callable[[Any], str]:
    def read(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return str(value)

    return read


_positive = _number(float, 0.001)
_count = _number(int, 1)

SETTINGS: tuple[Setting, ...] = (
    Setting("host", "CHAT_HOST", _text, "127.0.0.1", "address to listen on"),
    Setting("port", "CHAT_PORT", _number(int, 0), 8765, "port (0: any free port)"),
    Setting("db", "CHAT_DB", _text, "./chat.db", "SQLite file"),
    Setting("jwt-secret", "CHAT_JWT_SECRET", _text, None, "HS256 secret", secret=True),
    Setting("jwt-secret-file", "CHAT_JWT_SECRET_FILE", _text, None, "file holding the secret"),
    Setting("jwt-public-key", "CHAT_JWT_PUBLIC_KEY", _text, None, "PEM file (RS256/ES256)"),
    Setting("jwt-audience", "CHAT_JWT_AUDIENCE", _text, None, "required `aud`, if set"),
    Setting("jwt-issuer", "CHAT_JWT_ISSUER", _text, None, "required `iss`, if set"),
    Setting(
        "insecure-dev",
        "CHAT_INSECURE_DEV",
        _switch,
        False,
        "no secret needed: a random one per run",
        kind="switch",
    ),
    Setting(
        "upstream-url", "OPENAI_BASE_URL", _text, DEFAULT_UPSTREAM_URL, "Responses API base URL"
    ),
    Setting("api-key", "OPENAI_API_KEY", _text, None, "upstream API key", secret=True),
    Setting("api-key-file", "OPENAI_API_KEY_FILE", _text, None, "file holding the API key"),
    Setting("model", "CHAT_MODEL", _text, "gpt-4.1", "model name"),
    Setting("instructions-file", "CHAT_INSTRUCTIONS_FILE", _text, None, "system instructions"),
    Setting("tools-file", "CHAT_TOOLS_FILE", _text, None, "JSON list of client tools"),
    Setting(
        "store",
        "CHAT_UPSTREAM_STORE",
        _switch,
        True,
        "chain turns with previous_response_id",
        kind="switch",
    ),
    Setting("heartbeat-interval", "CHAT_HEARTBEAT_INTERVAL", _positive, 30.0, "seconds"),
    Setting("heartbeat-timeout", "CHAT_HEARTBEAT_TIMEOUT", _positive, 10.0, "seconds"),
    Setting("max-frame-bytes", "CHAT_MAX_FRAME_BYTES", _count, 64 * 1024, "bytes"),
    Setting("max-content-chars", "CHAT_MAX_CONTENT_CHARS", _count, 10_000, "characters"),
    Setting("max-connections", "CHAT_MAX_CONNECTIONS", _count, 10_000, "in all"),
    Setting("max-connections-per-user", "CHAT_MAX_CONNECTIONS_PER_USER", _count, 5, "per user"),
    Setting("rate-limit", "CHAT_RATE_LIMIT", _rate, (30, 60.0), "MESSAGES/SECONDS"),
    Setting("max-queue", "CHAT_MAX_QUEUE", _number(int, 0), 8, "turns waiting"),
    Setting("tool-timeout", "CHAT_TOOL_TIMEOUT", _positive, 120.0, "seconds"),
    Setting(
        "upstream-idle-timeout",
        "CHAT_UPSTREAM_IDLE_TIMEOUT",
        _positive,
        60.0,
        "seconds without a byte mid-stream",
    ),
    Setting(
        "allowed-origin",
        "CHAT_ALLOWED_ORIGINS",
        _origins,
        (),
        "browser origin allowed (repeatable; env: comma-separated)",
        kind="list",
    ),
    Setting("tls-cert", "CHAT_TLS_CERT", _text, None, "PEM certificate chain"),
    Setting("tls-key", "CHAT_TLS_KEY", _text, None, "PEM private key"),
    Setting("shutdown-grace", "CHAT_SHUTDOWN_GRACE", _positive, 5.0, "seconds"),
    Setting("log-level", "CHAT_LOG_LEVEL", _one_of("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
    Setting("log-format", "CHAT_LOG_FORMAT", _one_of("text", "json"), "text"),
    Setting(
        "log-content",
        "CHAT_LOG_CONTENT",
        _switch,
        False,
        "log message text (off: never)",
        kind="switch",
    ),
)
SETTINGS_BY_KEY = {setting.flag: setting for setting in SETTINGS}


@dataclass(frozen=True)
class ResolvedSetting:
    value: Any
    source: str


def _attribute(setting: Setting) -> str:
    return setting.flag.replace("-", "_")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file with the same keys (env CHAT_CONFIG)")
    for setting in SETTINGS:
        name = f"--{setting.flag}"
        help_text = f"{setting.help} [env {setting.env}]".strip()
        if setting.kind == "switch":
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text)
        elif setting.kind == "list":
            parser.add_argument(name, action="append", help=help_text)
        else:
            parser.add_argument(name, help=help_text)


def _read_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        flag = key.replace("_", "-")
        if flag == "allowed-origins":
            flag = "allowed-origin"
        if flag not in SETTINGS_BY_KEY:
            raise ConfigError(f"--config: {path}: unknown key {key!r}")
        values[flag] = value
    return values


def resolve_settings(
    args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]
) -> dict[str, ResolvedSetting]:
    """Each setting's value and where it came from: flag > env > config file > default.
    Raises ConfigError naming the setting and the source of a bad value."""
    config_path = args.config or environ.get("CHAT_CONFIG")
    from_file = _read_config_file(config_path)
    resolved: dict[str, ResolvedSetting] = {}
    for setting in SETTINGS:
        from_flag = getattr(args, _attribute(setting), None)
        if from_flag is not None:
            raw, source = from_flag, "flag"
        elif environ.get(setting.env):
            raw, source = environ[setting.env], f"env {setting.env}"
        elif setting.flag in from_file:
            raw, source = from_file[setting.flag], f"config {config_path}"
        else:
            resolved[setting.flag] = ResolvedSetting(setting.default, "default")
            continue
        if setting.kind == "list" and isinstance(raw, list) and source == "flag":
            raw = ",".join(raw)
        try:
            resolved[setting.flag] = ResolvedSetting(setting.read(raw), source)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{setting.flag} (from {source}): {exc}") from None
    return resolved


def _read_secret(path: str, what: str) -> str:
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"{what}: {path} is empty")
    return secret


def _secret(
    values: dict[str, Any], key: str, environ: dict[str, str] | os._Environ[str]
) -> str | None:
    """A secret from its setting, else its `-file` setting, else a systemd credential
    of the same name ($CREDENTIALS_DIRECTORY/<key>). Both set is an error: one of
    them would be silently ignored (an unreadable file included)."""
    if values[key] and values[f"{key}-file"]:
        raise ConfigError(f"{key} and {key}-file are both set: keep one")
    if values[key]:
        return str(values[key])
    if values[f"{key}-file"]:
        return _read_secret(values[f"{key}-file"], f"{key}-file")
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / key).is_file():
        return _read_secret(str(Path(credentials) / key), f"credential {key}")
    return None


def config_from_settings(
    resolved: dict[str, ResolvedSetting], environ: dict[str, str] | os._Environ[str]
) -> Config:
    """Build and check a Config: reads the files it names. Raises ConfigError."""
    values = {key: item.value for key, item in resolved.items()}
    public_key = None
    if values["jwt-public-key"]:
        public_key = _read_secret(values["jwt-public-key"], "jwt-public-key")
    secret = _secret(values, "jwt-secret", environ)
    generated = False
    if not secret and not public_key:
        if not values["insecure-dev"]:
            raise ConfigError(
                "no jwt-secret (CHAT_JWT_SECRET, --jwt-secret-file or a systemd credential) "
                "and no --jwt-public-key: refusing to start. "
                "Use --insecure-dev to try it out with a random secret."
            )
        secret, generated = secrets.token_urlsafe(32), True
    instructions = DEFAULT_INSTRUCTIONS
    if values["instructions-file"]:
        instructions = _read_secret(values["instructions-file"], "instructions-file")
    if bool(values["tls-cert"]) != bool(values["tls-key"]):
        raise ConfigError("tls-cert and tls-key go together")
    messages, window = values["rate-limit"]
    return Config(
        host=values["host"],
        port=values["port"],
        db_path=values["db"],
        jwt_secret=secret,
        jwt_secret_generated=generated,
        jwt_public_key=public_key,
        jwt_audience=values["jwt-audience"],
        jwt_issuer=values["jwt-issuer"],
        insecure_dev=values["insecure-dev"],
        upstream_url=values["upstream-url"].rstrip("/"),
        api_key=_secret(values, "api-key", environ),
        model=values["model"],
        instructions=instructions,
        tools=load_tools(values["tools-file"]) if values["tools-file"] else [],
        upstream_store=values["store"],
        heartbeat_interval_s=values["heartbeat-interval"],
        heartbeat_timeout_s=values["heartbeat-timeout"],
        max_frame_bytes=values["max-frame-bytes"],
        max_content_chars=values["max-content-chars"],
        max_connections=values["max-connections"],
        max_connections_per_user=values["max-connections-per-user"],
        rate_limit_messages=messages,
        rate_limit_window_s=window,
        max_queue=values["max-queue"],
        tool_timeout_s=values["tool-timeout"],
        upstream_idle_timeout_s=values["upstream-idle-timeout"],
        allowed_origins=values["allowed-origin"],
        tls_cert=values["tls-cert"],
        tls_key=values["tls-key"],
        shutdown_grace_s=values["shutdown-grace"],
        log_content=values["log-content"],
    )


def _check_deployment(config: Config) -> None:
    """What `check-config` adds to parsing: the files the server will open at start."""
    database = Path(config.db_path).resolve()
    if not database.parent.is_dir():
        raise ConfigError(f"db: folder {database.parent} does not exist")
    if not os.access(database.parent, os.W_OK) or (
        database.exists() and not os.access(database, os.W_OK)
    ):
        raise ConfigError(f"db: {database} is not writable")
    if config.tls_cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                config.tls_cert, config.tls_key
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls-cert/tls-key: cannot load: {exc}") from None


def _print_settings(resolved: dict[str, ResolvedSetting]) -> None:
    for key, item in resolved.items():
        shown = item.value
        if SETTINGS_BY_KEY[key].secret and shown:
            shown = "********"
        elif key == "rate-limit":
            shown = f"{shown[0]}/{shown[1]:g}"
        elif isinstance(shown, tuple):
            shown = list(shown)
        print(f"{key} = {json.dumps(shown)}  # {item.source}")


def _build_parser() -> argparse.ArgumentParser:
    program = Path(sys.argv[0]).name or "server.py"
    parser = argparse.ArgumentParser(prog=program, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    _add_setting_flags(commands.add_parser("serve", help="run the server (the default)"))
    check = commands.add_parser("check-config", help="validate the configuration and exit")
    check.add_argument("--print", action="store_true", help="show each setting and its source")
    _add_setting_flags(check)
    token = commands.add_parser("token", help="print a signed JWT for the configured secret")
    token.add_argument("--sub", required=True, help="the user id")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    _add_setting_flags(token)
    backup = commands.add_parser("backup", help="copy the live database, consistently")
    backup.add_argument("destination", help="file to write (must not exist)")
    _add_setting_flags(backup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0].startswith("-"):
        arguments.insert(0, "serve")
    args = _build_parser().parse_args(arguments)
    try:
        resolved = resolve_settings(args, os.environ)
        if args.command == "backup":
            # Copying the database needs its path only, not the server's secrets.
            config = Config(db_path=resolved["db"].value)
        else:
            config = config_from_settings(resolved, os.environ)
        if args.command == "check-config":
            _check_deployment(config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        if args.print:
            _print_settings(resolved)
        print("configuration OK", file=sys.stderr)
        return 0
    if args.command == "token":
        if config.jwt_secret is None or config.jwt_secret_generated:
            print(
                "token: needs the server's jwt-secret (a random --insecure-dev one "
                "lives only inside that server run)",
                file=sys.stderr,
            )
            return 2
        print(issue_token(config.jwt_secret, args.sub, args.ttl))
        return 0
    if args.command == "backup":
        try:
            backup_database(config.db_path, args.destination)
        except (OSError, sqlite3.Error, FileExistsError) as exc:
            print(f"backup failed: {exc}", file=sys.stderr)
            return 1
        print(f"backed up {config.db_path} to {args.destination}", file=sys.stderr)
        return 0
    configure_logging(resolved["log-level"].value, resolved["log-format"].value)
    if config.uses_demo_model:
        log.warning("no OPENAI_API_KEY and no --upstream-url: serving the OFFLINE DEMO MODEL")
    _tune_garbage_collector()  # before the loop runs: its one full collection stalls no one
    _reserve_descriptor_table(config.max_connections)
    trio.run(partial(_serve_from_command_line, config))
    log.info("stopped")
    return 0


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": wire.utc_timestamp(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in self._STANDARD)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


class NonBlockingLogHandler(logging.handlers.QueueHandler):
    """Hands each record to a writer thread without waiting, so that a slow stderr (a
    disk journal commit, a busy journald socket) never stalls the event loop.

    The message and any traceback are rendered here, while the record's arguments
    are still current; the writer thread formats the line and writes it to `target`.
    Bounded: past `max_records` waiting, records are dropped and counted, and the
    writer says how many before its next line. `close` (run by logging at exit)
    writes what is queued, for LOG_DRAIN_TIMEOUT_S at most, and stops the thread.
    """

    def __init__(self, target: logging.Handler, max_records: int = LOG_QUEUE_RECORDS) -> None:
        self.records: queue.Queue[logging.LogRecord | None] = queue.Queue(max_records)
        super().__init__(self.records)
        self.dropped = 0  # only ever grows; the writer reports the growth
        self._writer = _LogWriter(self, target)
        self._writer.start()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        prepared = copy.copy(record)
        prepared.msg, prepared.args = record.getMessage(), None
        if record.exc_info:
            prepared.exc_text = _TRACEBACKS.formatException(record.exc_info)
            prepared.exc_info = None
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.records.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        self._writer.stop()
        super().close()


class _LogWriter(logging.handlers.QueueListener):
    """The thread of a NonBlockingLogHandler: writes its records, and its drops."""

    def __init__(self, source: NonBlockingLogHandler, target: logging.Handler) -> None:
        super().__init__(source.records, target)
        self._source = source
        self._target = target
        self._reported = 0

    def handle(self, record: logging.LogRecord) -> None:
        dropped = self._source.dropped - self._reported
        if dropped:
            self._reported += dropped
            message = f"{dropped} log records dropped: stderr was not keeping up"
            self._target.handle(
                logging.makeLogRecord(
                    {
                        "name": log.name,
                        "levelno": logging.WARNING,
                        "levelname": "WARNING",
                        "msg": message,
                    }
                )
            )
        super().handle(record)

    def stop(self) -> None:
        """Write what is queued, waiting at most LOG_DRAIN_TIMEOUT_S: a stderr that never
        drains cannot hold the process at exit. Stopping twice is fine."""
        if self._thread is None:
            return
        with suppress(queue.Full):
            self._source.records.put(None, timeout=LOG_DRAIN_TIMEOUT_S)  # QueueListener's end mark
        self._thread.join(LOG_DRAIN_TIMEOUT_S)
        self._thread = None


_TRACEBACKS = logging.Formatter()


def configure_logging(level: str, log_format: str) -> None:
    """Human-readable lines by default, JSON lines with `--log-format json`, to stderr,
    written by a thread of their own (NonBlockingLogHandler)."""
    stderr = logging.StreamHandler()
    if log_format == "json":
        stderr.setFormatter(JsonLogFormatter())
    else:
        stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[NonBlockingLogHandler(stderr)], force=True)
    # Library loggers can print request lines (with tokens in URLs) at debug level.
    for noisy in ("trio-websocket", "httpx", "httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def _serve_from_command_line(config: Config) -> None:
    """`run_server` with signal handling. The --insecure-dev URL is printed once the
    listener is bound: with `--port 0` only then is the real port known."""
    async with trio.open_nursery() as nursery:
        server: ChatServer = await nursery.start(partial(run_server, config, handle_signals=True))
        if config.jwt_secret_generated:
            _print_dev_token(replace(config, port=server.port or config.port))


def _tune_garbage_collector() -> None:
    """Everything alive once the server is configured (modules, pydantic schemas)
    lives as long as the process: freeze it out of the collector's scans, keep the
    middle generation small and make full collections rare (the GC_* thresholds)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, GC_MIDDLE_THRESHOLD, GC_FULL_THRESHOLD)


def _reserve_descriptor_table(max_connections: int) -> None:
    """Grow the process's file-descriptor table now to what max_connections needs (a
    client socket and an upstream one each). The kernel grows it by doubling as
    descriptors are opened, and in a process with threads (the store's worker, the log
    writer) every doubling waits for an RCU grace period inside that accept(): stalls
    of the event loop of up to tens of milliseconds while clients connect
    (bench/README.md). The table never shrinks; it takes about 8 bytes of kernel memory
    per descriptor (256 KB for 10,000 connections). Best effort: a failure changes
    nothing but the stalls."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * max_connections + 1024
    highest = wanted if soft == resource.RLIM_INFINITY else min(wanted, soft)
    try:
        with open(os.devnull, "rb") as devnull:
            # F_DUPFD takes the lowest free descriptor at or above the one asked:
            # nothing open is touched, and the table now reaches that far.
            os.close(fcntl.fcntl(devnull.fileno(), fcntl.F_DUPFD, highest - 1))
    except OSError as exc:
        log.warning("could not reserve %d file descriptors up front: %s", highest, exc)


def _print_dev_token(config: Config) -> None:
    assert config.jwt_secret is not None
    token = issue_token(config.jwt_secret, "dev-user", 24 * 3600)
    scheme = "https" if config.tls_cert else "http"
    # Printed to the terminal, never to the log: this secret lives only for this run.
    print(
        "\n  --insecure-dev: a random secret for this run. Open the chat at\n"
        f"  {scheme}://{config.host}:{config.port}/?token={token}\n"
        f"  or connect a client to ws://{config.host}:{config.port}/ws/chat/demo?token={token}\n",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
