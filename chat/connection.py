"""One authenticated WebSocket on one session: its lifecycle, the receiver that
parses and dispatches client frames, the heartbeat, the sender and its bounded
outbox, and the per-connection rate limit.

A connection does not run turns: it hands accepted messages, `stop` and tool
answers to its session (`chat.session.LiveSession`), which runs the turns and
sends their frames to whichever connection is attached.

Resource handling: `run` owns a nursery holding the receiver and heartbeat tasks,
and the sender task while it has work; it returns when one of them ends the
connection, then detaches from its session and closes the socket with the code
that ended it. `close(error)` may be called from anywhere, any number of times:
the first reason wins.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

import protocol as wire
from agent_client import parse_arguments
from chat.pacing import ConnectionTimers
from chat.settings import MAX_OUTBOX_CHARS, Config
from chat.turn import QueuedTurn, TurnServices
from chat.ws_stream import ClientStream, encode_text_delta_frame
from store import StoredMessage

if TYPE_CHECKING:
    from chat.session import LiveSession

log = logging.getLogger("chat")

# Closing handshake: a peer that does not answer our close frame is cut off after this.
CLOSE_TIMEOUT_S = 2.0
# The same for a peer already known to be silent (heartbeat timeout): enough to hand
# the close frame to the kernel, no more.
DEAD_PEER_CLOSE_TIMEOUT_S = 0.1


class Outbox:
    """Frames waiting for the sender task, bounded in characters.

    While the client lags, consecutive `text_delta`s of one turn are merged into one
    frame (the concatenated text is exactly the same), so a slow reader costs one
    growing string, not a frame per token. Raises SlowConsumer past MAX_OUTBOX_CHARS.
    """

    def __init__(self, max_chars: int = MAX_OUTBOX_CHARS) -> None:
        # A plain list: it holds a handful of frames at most, and an empty list costs
        # a fraction of an empty deque on every idle connection.
        self._frames: list[wire.ServerFrame | PendingDeltas | _Uncounted] = []
        self._chars = 0
        self._max_chars = max_chars

    def put(self, frame: wire.ServerFrame, *, bounded: bool = True) -> None:
        """Queue a frame; `bounded=False` queues it without counting it (see
        `ChatConnection.send`). Raises SlowConsumer past the bound."""
        if bounded:
            self._add(_frame_weight(frame))
            self._frames.append(frame)
        else:
            self._frames.append(_Uncounted(frame))

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
        if isinstance(item, _Uncounted):
            return item.frame
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


@dataclass(frozen=True, slots=True)
class _Uncounted:
    """A queued frame that does not count towards the outbox bound."""

    frame: wire.ServerFrame


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
        live: LiveSession,
        ws: WebSocketConnection,
        stream: ClientStream,
        *,
        key: str,
        timers: ConnectionTimers,
        token_expiry: float | None,
        resumed: bool,
        history_length: int,
    ) -> None:
        self.live = live
        self.key = key  # names this connection to other instances (chat.cluster)
        self.services: TurnServices = live.services
        self.config: Config = live.services.config
        self._timers = timers
        self.ws = ws
        self._stream = stream
        self.session_id = live.session_id
        self.user_id = live.user_id
        self.token_expiry = token_expiry
        self.resumed = resumed
        self.history_length = history_length
        self.finished = trio.Event()
        self._outbox = Outbox(self.config.max_outbox_chars)
        self._sender_started = False
        # Set while a heartbeat waits for an answer; any received frame is one.
        self._activity: trio.Event | None = None
        self._rate = RateLimiter(self.config.rate_limit_messages, self.config.rate_limit_window_s)
        self._nursery: trio.Nursery | None = None
        self._close_error: wire.CloseError | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        arriving = True  # admitted to `live` (expect_arrival), not attached yet
        try:
            # Written before anything can close the connection: every admitted client
            # learns it was admitted, even one taken over at once by a racing twin.
            if not await self._send(self._connected()):
                return
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._close_error is not None:  # closed (taken over) before it started
                    nursery.cancel_scope.cancel()
                else:
                    # The hand-over point: the running turn's replay is queued, and
                    # every later frame of the session comes here.
                    arriving = False
                    self.live.attach(self)
                    self.live.arrival_ended()
                # An idle connection is these two tasks (plus trio-websocket's reader);
                # the sender exists only while it has work: tasks are most of the
                # memory an idle connection costs.
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._heartbeat_loop)
        except Exception:
            # The last resort: an unexpected error ends this connection only, as 1011.
            self.close(wire.InternalError())
            raise
        finally:
            self._nursery = None
            if arriving:
                self.live.arrival_ended()
            self.live.detach(self)
            with trio.CancelScope(shield=True):
                await close_websocket(self.ws, self._close_error or wire.NormalClosure())
                self.finished.set()

    def _connected(self) -> wire.Connected:
        # Made and dropped in one call: `run`'s frame lives as long as the connection.
        return wire.Connected(
            session_id=self.session_id,
            user_id=self.user_id,
            timestamp=wire.utc_timestamp(),
            resumed=self.resumed,
            history_length=self.history_length,
        )

    @property
    def close_code(self) -> int:
        return self._close_error.close_code if self._close_error else 1000

    def close(self, error: wire.CloseError) -> None:
        """End the connection with `error`'s close code (first call wins)."""
        if self._close_error is None:
            self._close_error = error
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def send(self, frame: wire.ServerFrame, *, bounded: bool = True) -> None:
        """Queue one frame for the client. Never blocks; a client too far behind is closed.
        `bounded=False`: a reply whose size its request bounds (history), which does
        not count towards the slow-client bound. Once the connection is closing,
        frames are dropped: a session's frames that matter reach the next connection
        as a replay."""
        if self._close_error is not None:
            return
        try:
            self._outbox.put(frame, bounded=bounded)
        except wire.SlowConsumer as exc:
            self._too_slow(exc)
        self._start_sender()

    def send_delta(self, turn_id: str, text: str) -> None:
        """Send one text delta: written at once when nothing waits before it and the
        client keeps up (the hot path: no task switch), else queued (see `send`)."""
        if self._close_error is not None:
            return
        if (
            not self._sender_started  # then nothing waits in the outbox either
            and self.ws.closed is None  # no close frame sent: data may still follow
            and self._stream.write_now(encode_text_delta_frame(turn_id, text))
        ):
            self.services.metrics.deltas_sent.inc()
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
                    self.services.metrics.deltas_sent.inc()
                else:
                    await self.ws.send_message(wire.encode(item))
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                self.close(wire.PeerGone())
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
                self.close(wire.FrameTooLarge() if too_large else wire.PeerGone())
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
            self.live.stop()
        elif isinstance(frame, wire.ClientPing):
            self.send(wire.ServerPong(timestamp=wire.utc_timestamp()))
        elif isinstance(frame, wire.ToolResponse):
            self.live.answer_tool(frame)
        elif isinstance(frame, wire.HistoryRequest):
            # Not rate-limited: a client reloads history on every (re)connect, and that
            # must never cost the user a message. The read is bounded by `limit`.
            messages = await self.services.store.history(self.session_id, frame.limit)
            reply = wire.HistoryReply(messages=[history_entry(m) for m in messages])
            self.send(reply, bounded=False)
        # ClientPong: its arrival already counted as activity for the heartbeat.

    async def _accept_message(self, frame: wire.UserMessage) -> None:
        if len(frame.content) > self.config.max_content_chars:
            raise wire.MessageTooLarge(
                f"The message has {len(frame.content)} characters; the limit is "
                f"{self.config.max_content_chars}."
            )
        self._rate.take()
        if len(self.live.queue) >= self.config.max_queue:
            raise wire.QueueFull()
        message = await self.services.store.add_user_message(
            self.session_id, frame.content, client_message_id=frame.id, metadata=frame.metadata
        )
        self.services.metrics.messages_received.inc()
        if self.config.log_content:
            log.info("session %s: user message %d: %r", self.session_id, message.id, frame.content)
        self.live.enqueue(QueuedTurn(message))

    async def _heartbeat_loop(self) -> None:
        """Ping every interval and drop a peer that answers nothing in time. The same
        timer closes the connection with 4001 when its token expires (one task, not two:
        memory per idle connection)."""
        expires_at = math.inf
        if self.token_expiry is not None:
            expires_at = trio.current_time() + (self.token_expiry - time.time())
        while True:
            await self._timers.sleep_until(
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
                self.close(wire.HeartbeatTimeout())
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
            self.close(wire.PeerGone())
        race.cancel()


async def close_websocket(ws: WebSocketConnection, error: wire.CloseError) -> None:
    """Send the close frame, time-boxed: a silent peer does not hold us. The caller
    that owns the TCP stream closes it afterwards either way."""
    # A peer that failed its heartbeat will not answer a close frame either: send it,
    # but free the connection at once rather than wait for a reply.
    silent = isinstance(error, wire.HeartbeatTimeout)
    wait_s = DEAD_PEER_CLOSE_TIMEOUT_S if silent else CLOSE_TIMEOUT_S
    with trio.move_on_after(wait_s):
        await ws.aclose(error.close_code, error.detail[:120])


def history_entry(message: StoredMessage) -> wire.HistoryEntry:
    if message.role == "tool":
        return wire.HistoryEntry(
            id=message.id,
            role="tool",
            content=message.content,
            status=message.status,
            timestamp=message.created_at,
            name=message.name,
            call_id=message.call_id,
            arguments=parse_arguments(message.arguments or "") or {},
            output=message.output,
        )
    return wire.HistoryEntry(
        id=message.id,
        role="user" if message.role == "user" else "assistant",
        content=message.content,
        status=message.status,
        timestamp=message.created_at,
    )
