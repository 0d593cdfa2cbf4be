"""A session's live state: its queue of turns, the turn running now, and the
connection attached to it (at most one), which may go and be replaced while the
turn runs (PROTOCOL.md, "Detach and resume").

Resource handling: a `LiveSession` exists while a connection is attached or
while it has work (a running or queued turn). Its turns run one at a time in a
task of the server's turns nursery, not in the connection's, so they outlive the
socket. When the connection goes without `stop`, the session is detached: its
work goes on for up to `--detach-grace` seconds (one wait on the server's
`ConnectionTimers`); if nobody attaches by then, the work is cancelled (the turn
stored `interrupted`, queued turns dropped, their messages kept as context).

The hand-over point: `attach` runs in one step of the event loop (no await). It
queues the running turn's replay (`TurnState.opening_frames(resumed=True)`: the
text so far as one delta, the tool requests still waiting) and makes the new
connection the one every later frame goes to. A delta's text and its frame are
produced in one step too (`turn._Conversation._on_event`), so no delta falls
between the replay and the live frames, and none is sent twice.

Error handling: a failing turn is the turn's business (`chat.turn.run_turn`); a
frame sent while detached is dropped (the turn's state keeps what a replay needs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

import protocol as wire
from chat.cluster import Cluster, ClusterUnavailable, RemoteTurn, TurnLease
from chat.connection import PendingDeltas
from chat.pacing import ConnectionTimers
from chat.turn import (
    FINAL_WRITE_TIMEOUT_S,
    QueuedTurn,
    TurnServices,
    TurnState,
    answer_tool_call,
    run_turn,
)

if TYPE_CHECKING:
    from chat.connection import ChatConnection

log = logging.getLogger("chat")


class LiveSession:
    """The running side of one session; see the module docstring."""

    # One per open session, idle ones included: slots keep it small (no __dict__).
    __slots__ = (
        "session_id",
        "user_id",
        "services",
        "attached",
        "queue",
        "running",
        "turn",
        "remote",
        "watched_elsewhere",
        "_turns",
        "_timers",
        "_on_idle",
        "_work",
        "_grace",
        "_ended",
        "_cluster",
        "_relay",
        "_follower",
        "_arriving",
    )

    def __init__(
        self,
        session_id: str,
        user_id: str,
        services: TurnServices,
        *,
        turns: trio.Nursery,
        timers: ConnectionTimers,
        on_idle: Callable[[LiveSession], None],
        cluster: Cluster | None = None,
    ) -> None:
        self.session_id = session_id
        self.user_id = user_id
        self.services = services
        self.attached: ChatConnection | None = None
        self.queue: list[QueuedTurn] = []
        self.running: QueuedTurn | None = None
        self.turn: TurnState | None = None
        self._turns = turns
        self._timers = timers
        self._on_idle = on_idle
        self._work: trio.CancelScope | None = None  # the turns task, while it runs
        self._grace: trio.CancelScope | None = None  # the grace wait, while detached
        # The turns task's end, while it runs (made with it: an idle session holds none).
        self._ended: trio.Event | None = None
        # Several instances (chat.cluster): the frames of a turn run here go to the
        # session's stream too; a turn run elsewhere is followed from it.
        self._cluster = cluster
        self._relay: _Publisher | None = None  # while a turn runs here under a lease
        self.remote: RemoteTurn | None = None  # while a turn elsewhere is followed
        self._follower: _Follower | None = None
        self.watched_elsewhere = False  # a connection on another instance follows us
        self._arriving = 0  # connections admitted that have not attached yet

    @property
    def has_work(self) -> bool:
        return self.running is not None or bool(self.queue)

    @property
    def detached(self) -> bool:
        return self.attached is None and self.has_work

    # ------------------------------------------------------------------ frames

    def send(self, frame: wire.ServerFrame) -> None:
        if self.attached is not None:
            self.attached.send(frame)
        if self._relay is not None:
            self._relay.put(frame)

    def send_delta(self, turn_id: str, text: str) -> None:
        if self.attached is not None:
            self.attached.send_delta(turn_id, text)
        if self._relay is not None:
            self._relay.put_delta(turn_id, text)

    # ------------------------------------------------------------------ connections

    def attach(self, connection: ChatConnection) -> None:
        """Make `connection` the one this session's frames go to, replaying the
        running turn first. One step: no frame can fall between replay and live."""
        previous = self.attached
        self.attached = connection
        if previous is not None and previous is not connection:
            previous.close(wire.TakenOver())
        if self._grace is not None:
            self._cancel_grace()
            log.info("session %s: re-attached", self.session_id)
        if self.turn is not None:
            self.services.metrics.attaches_with_running_turn.inc()
            for frame in self.turn.opening_frames(resumed=True):
                connection.send(frame)
        elif self._cluster is not None and self._follower is None:
            # No turn here: one may run on another instance; follow it from its stream.
            self._follower = _Follower(self, self._cluster)
            self._turns.start_soon(self._follower.run)

    def hand_over(self) -> ChatConnection | None:
        """Take the session from its attached connection for a newer one (takeover):
        the old one is closed with 4009, and its going detaches nothing. Returns it."""
        previous, self.attached = self.attached, None
        if previous is not None:
            previous.close(wire.TakenOver())
        return previous

    def detach(self, connection: ChatConnection) -> None:
        """`connection` is gone. Its work goes on for the grace (none: cancelled now)."""
        if self.attached is not connection:
            return  # taken over: the newer connection is attached already
        self.attached = None
        if self._follower is not None:
            self._follower.leave()
        if not self.has_work:
            self._maybe_idle()
            return
        self.start_grace()

    def expect_arrival(self) -> None:
        """A connection was admitted to this session and will attach (or give up):
        until then the session stays, even with nothing to do."""
        self._arriving += 1

    def arrival_ended(self) -> None:
        """An expected connection attached, or closed before it could."""
        self._arriving -= 1
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        """Let the session go if nothing holds it: no connection here or elsewhere,
        none on its way, no work."""
        if (
            self.attached is None
            and not self.has_work
            and not self._arriving
            and not self.watched_elsewhere
        ):
            self._on_idle(self)

    def remote_attached(self) -> None:
        """A connection on another instance follows this session's turns."""
        self.watched_elsewhere = True
        self._cancel_grace()

    def remote_detached(self) -> None:
        """The connection on another instance is gone: as a local detach."""
        self.watched_elsewhere = False
        if self.attached is None:
            if self.has_work:
                self.start_grace()
            else:
                self._maybe_idle()

    def _cancel_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def start_grace(self) -> None:
        """Nobody watches the work any more: it goes on for the grace, then ends."""
        if self._grace is not None or self.watched_elsewhere:
            return
        if self._work is not None and self._work.cancel_called and not self.queue:
            # Its work is being ended already (shutdown, deletion): no grace to wait
            # out; the turns task lets the session go when its turn is stored.
            return
        grace_s = self.services.config.detach_grace_s
        log.info(
            "session %s: detached with a turn %s (grace %g s)",
            self.session_id,
            "running" if self.running is not None else "queued",
            grace_s,
        )
        if grace_s <= 0:
            self._expire()
            return
        self._grace = trio.CancelScope()
        self._turns.start_soon(self._wait_out_grace, self._grace, trio.current_time() + grace_s)

    async def _wait_out_grace(self, grace: trio.CancelScope, until: float) -> None:
        with grace:
            await self._timers.sleep_until(until)
            if grace.cancel_called or self.watched_elsewhere:
                # Due, but an attach (or the turn's end) came in the same pass of the
                # loop, before this task ran again: the cancel lands at the next
                # checkpoint only, and there is none before `_expire`.
                return
            self._grace = None
            self.services.metrics.detach_grace_expiries.inc()
            log.info("session %s: grace ran out, cancelling its turn", self.session_id)
            self._expire()

    def _expire(self) -> None:
        """Cancel the work: the running turn is stored `interrupted` and sends no more
        frames (no response_end), so from now on an attach gets no replay of it; the
        queued turns are dropped (their messages stay as context)."""
        self.queue.clear()
        self.turn = None
        if self._work is not None:
            self._work.cancel()

    # ------------------------------------------------------------------ work

    def enqueue(self, queued: QueuedTurn) -> None:
        """Queue an accepted (stored) message's turn; the turns task starts if idle."""
        self.queue.append(queued)
        if self._work is None:
            self._start_work()

    def _start_work(self) -> None:
        self._work = trio.CancelScope()
        self._ended = trio.Event()
        self._turns.start_soon(self._run_queued_turns, self._work)

    def stop(self) -> None:
        """Cancel the running turn and drop the queued ones (their messages stay in
        history, as context for the next turn). When no turn runs yet, the first
        queued one is about to start: it starts cancelled, so its client still gets
        a response_end (status stopped) for it."""
        starting = self.queue[0] if self.running is None and self.queue else None
        self.queue.clear()
        for queued in (self.running, starting):
            if queued is not None:
                queued.scope.cancel()
        if starting is not None:
            self.queue.append(starting)
        if self.remote is not None:
            self._turns.start_soon(self._command_remote, self.remote, "stop", {})

    def answer_tool(self, frame: wire.ToolResponse) -> None:
        """Give a tool's answer to the turn waiting for it, here or on the instance
        running it. Raises UnknownCallId."""
        follower, remote = self._follower, self.remote
        if self.turn is None and follower is not None and remote is not None:
            if frame.call_id not in follower.waiting_calls:
                raise wire.UnknownCallId(
                    f"No tool request is waiting for call_id {frame.call_id!r}."
                )
            follower.waiting_calls.discard(frame.call_id)
            fields = {"call_id": frame.call_id, "content": frame.content}
            self._turns.start_soon(self._command_remote, remote, "tool", fields)
            return
        answer_tool_call(self.turn, frame)

    async def _command_remote(self, remote: RemoteTurn, op: str, fields: dict[str, str]) -> None:
        assert self._cluster is not None
        try:
            await self._cluster.send_command(remote.instance, op, self.session_id, **fields)
        except ClusterUnavailable:
            log.warning("session %s: %s could not reach the instance running the turn",
                        self.session_id, op)

    async def wait_until_idle(self) -> None:
        """Return once no turn runs or waits, the last one stored (callers bound the
        wait)."""
        while self.has_work and self._ended is not None:
            await self._ended.wait()

    async def end(self, *, timeout_s: float) -> None:
        """Cancel the work (stored `interrupted`) and wait for it, up to timeout_s."""
        self._expire()
        ended = self._ended
        if ended is not None:
            with trio.move_on_after(timeout_s):
                await ended.wait()

    async def _take_lease(self) -> TurnLease | None:
        """With several instances: wait until no other instance runs this session's
        turns, then hold the lease (None: one instance, or Redis unreachable, where
        the turn runs as on one instance)."""
        if self._cluster is None or not self._cluster.available:
            return None
        try:
            lease = await self._cluster.acquire_turn(self.session_id)
        except ClusterUnavailable:
            return None
        if self._follower is not None:
            # The followed turn is over (its lease went): let its last frames through.
            await self._follower.finish_before(lease.start)
        return lease

    async def _give_back(self, lease: TurnLease | None) -> None:
        if lease is not None and self._cluster is not None:
            with trio.CancelScope(shield=True):
                await self._cluster.release_turn(lease)

    async def _run_turn(self, queued: QueuedTurn, turn: TurnState, lease: TurnLease | None) -> None:
        if lease is None or self._cluster is None:
            await run_turn(self, self.services, queued, turn)
            return
        cluster = self._cluster
        with trio.move_on_after(FINAL_WRITE_TIMEOUT_S):
            try:
                await cluster.describe_turn(lease, turn_id=turn.turn_id, reply_to=turn.message.id)
            except ClusterUnavailable:
                pass  # a survivor could not store this turn if we died: logged by the cluster
        self._relay = relay = _Publisher(cluster, self.session_id)
        try:
            async with trio.open_nursery() as publishing:
                publishing.start_soon(relay.run)
                try:
                    await run_turn(self, self.services, queued, turn)
                finally:
                    self._relay = None
                    relay.close()
        finally:
            self._relay = None

    async def _run_queued_turns(self, work: trio.CancelScope) -> None:
        """The turns task: runs queued turns one at a time, then ends."""
        try:
            with work:
                while self.queue:
                    lease = await self._take_lease()
                    if not self.queue:  # stopped while another instance's turn ran
                        await self._give_back(lease)
                        break
                    queued = self.queue.pop(0)
                    # Running and its state are set in the same step: an attach that
                    # comes in between sees either no turn or this whole turn.
                    self.running, self.turn = queued, TurnState(queued.message)
                    try:
                        await self._run_turn(queued, self.turn, lease)
                    finally:
                        self.running, self.turn = None, None
                        await self._give_back(lease)
        finally:
            self._work = None
            ended, self._ended = self._ended, None
            if ended is not None:
                ended.set()
            if self.queue:
                self._start_work()  # accepted while cancelled work was being stored
            else:
                if self.attached is None:
                    self._cancel_grace()
                self._maybe_idle()


class _Publisher:
    """A turn's frames on their way to the session's stream, in order (several
    instances). `put` never waits: the turn's task does not wait on Redis; one task
    (`run`) writes what waits, consecutive deltas joined into one frame."""

    def __init__(self, cluster: Cluster, session_id: str) -> None:
        self._cluster = cluster
        self._session_id = session_id
        self._waiting: list[wire.ServerFrame | PendingDeltas] = []
        self._wake = trio.Event()
        self._closed = False

    def put(self, frame: wire.ServerFrame) -> None:
        self._waiting.append(frame)
        self._wake.set()

    def put_delta(self, turn_id: str, text: str) -> None:
        # As the outbox does: no frame model per delta, the parts joined when written.
        last = self._waiting[-1] if self._waiting else None
        if isinstance(last, PendingDeltas) and last.turn_id == turn_id:
            last.parts.append(text)
        else:
            self._waiting.append(PendingDeltas(turn_id, [text]))
        self._wake.set()

    def close(self) -> None:
        """The turn is over: `run` writes what waits and returns."""
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            batch, self._waiting = self._waiting, []
            if batch:
                with trio.CancelScope(shield=self._closed), trio.move_on_after(
                    FINAL_WRITE_TIMEOUT_S
                ):
                    try:
                        await self._cluster.publish(
                            self._session_id,
                            [
                                item.encode()
                                if isinstance(item, PendingDeltas)
                                else wire.encode(item)
                                for item in batch
                            ],
                        )
                    except ClusterUnavailable:
                        log.warning(
                            "session %s: %d frames not relayed (redis unreachable)",
                            self._session_id,
                            len(batch),
                        )
            if self._closed and not self._waiting:
                return


class _Follower:
    """A turn that runs on another instance, followed from the session's stream for
    the connection attached here: its replay (as `TurnState.opening_frames` would
    give it) and then its live frames, read from one position onwards."""

    def __init__(self, session: LiveSession, cluster: Cluster) -> None:
        self._session = session
        self._cluster = cluster
        self._scope = trio.CancelScope()
        self._until: str | None = None  # stop before this stream position
        self._done = trio.Event()
        self.waiting_calls: set[str] = set()

    def leave(self) -> None:
        """The connection is gone: tell the instance running the turn, and stop."""
        session = self._session
        if session.remote is not None:
            session._turns.start_soon(session._command_remote, session.remote, "detached", {})
        self._scope.cancel()

    async def finish_before(self, position: str) -> None:
        """Forward what comes before `position` (the start of a turn of ours), then
        stop: the followed turn's last frames are not cut off by ours."""
        self._until = position
        with trio.move_on_after(FINAL_WRITE_TIMEOUT_S):
            await self._done.wait()
        self._scope.cancel()

    async def run(self) -> None:
        session = self._session
        try:
            with self._scope:
                await self._follow()
        except ClusterUnavailable:
            log.warning("session %s: the turn on another instance cannot be followed",
                        session.session_id)
        finally:
            session.remote = None
            if session._follower is self:
                session._follower = None
            self._done.set()

    async def _follow(self) -> None:
        session = self._session
        remote = await self._cluster.remote_turn(session.session_id)
        if remote is None:
            return
        session.remote = remote
        await self._cluster.send_command(remote.instance, "attached", session.session_id)
        position = remote.start
        backlog = await self._cluster.read_frames(session.session_id, position, block=False)
        replay = _Replay()
        for position, document in backlog:  # noqa: B007  (the last position is kept)
            replay.add(wire.decode_server_frame(document))
        self.waiting_calls = set(replay.waiting_calls)
        for frame in replay.frames():
            session.send(frame)
        idle_reads = 0
        while True:
            entries = await self._cluster.read_frames(session.session_id, position, block=True)
            for entry_position, document in entries:
                if self._until is not None and _stream_order(entry_position) >= _stream_order(
                    self._until
                ):
                    return
                position = entry_position
                frame = wire.decode_server_frame(document)
                if isinstance(frame, wire.ToolRequest):
                    self.waiting_calls.add(frame.call_id)
                elif isinstance(frame, wire.TextDeltaFrame | wire.ResponseEnd):
                    self.waiting_calls.clear()
                session.send(frame)
            if entries:
                idle_reads = 0
                continue
            if self._until is not None:
                return
            current = await self._cluster.remote_turn(session.session_id)
            if current is not None:
                session.remote, idle_reads = current, 0
                continue
            # No lease, nothing new for a whole wait: that instance's turns are over
            # (between two of its queued turns the lease is gone only for moments).
            idle_reads += 1
            if idle_reads >= _IDLE_READS_BEFORE_DONE:
                return


# Empty blocking reads (BLOCK_MS each) with no lease anywhere before a follower ends.
_IDLE_READS_BEFORE_DONE = 2


class _Replay:
    """The frames of a turn's stream so far, folded into its replay."""

    def __init__(self) -> None:
        self._start: wire.ResponseStart | None = None
        self._parts: list[str] = []
        self.waiting_calls: dict[str, wire.ToolRequest] = {}

    def add(self, frame: wire.ServerFrame) -> None:
        if isinstance(frame, wire.ResponseStart):
            self._start, self._parts, self.waiting_calls = frame, [], {}
        elif isinstance(frame, wire.TextDeltaFrame):
            self._parts.append(frame.content)
            self.waiting_calls = {}  # the model went on: earlier requests were answered
        elif isinstance(frame, wire.ToolRequest):
            self.waiting_calls[frame.call_id] = frame
        elif isinstance(frame, wire.ResponseEnd):
            self._start = None

    def frames(self) -> list[wire.ServerFrame]:
        if self._start is None:
            return []  # nothing running: what ended is in history
        start = self._start
        frames: list[wire.ServerFrame] = [
            wire.Typing(is_typing=True),
            wire.ResponseStart(turn_id=start.turn_id, message_id=start.message_id, resumed=True),
        ]
        if self._parts:
            frames.append(wire.TextDeltaFrame(turn_id=start.turn_id, content="".join(self._parts)))
        frames.extend(self.waiting_calls.values())
        return frames


def _stream_order(position: str) -> tuple[int, int]:
    milliseconds, _, sequence = position.partition("-")
    return int(milliseconds), int(sequence or 0)
