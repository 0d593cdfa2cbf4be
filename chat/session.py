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
from chat.pacing import ConnectionTimers
from chat.turn import QueuedTurn, TurnServices, TurnState, answer_tool_call, run_turn

if TYPE_CHECKING:
    from chat.connection import ChatConnection

log = logging.getLogger("chat")


class LiveSession:
    """The running side of one session; see the module docstring."""

    def __init__(
        self,
        session_id: str,
        user_id: str,
        services: TurnServices,
        *,
        turns: trio.Nursery,
        timers: ConnectionTimers,
        on_idle: Callable[[LiveSession], None],
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
        self._ended = trio.Event()  # set when the turns task ends (or never started)
        self._ended.set()

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

    def send_delta(self, turn_id: str, text: str) -> None:
        if self.attached is not None:
            self.attached.send_delta(turn_id, text)

    # ------------------------------------------------------------------ connections

    def attach(self, connection: ChatConnection) -> None:
        """Make `connection` the one this session's frames go to, replaying the
        running turn first. One step: no frame can fall between replay and live."""
        previous = self.attached
        self.attached = connection
        if previous is not None and previous is not connection:
            previous.close(wire.TakenOver())
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
            self.services.metrics.detached_sessions.dec()
            log.info("session %s: re-attached", self.session_id)
        if self.turn is not None:
            self.services.metrics.attaches_with_running_turn.inc()
            for frame in self.turn.opening_frames(resumed=True):
                connection.send(frame)

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
        if not self.has_work:
            self._on_idle(self)
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
        self.services.metrics.detached_sessions.inc()
        self._grace = trio.CancelScope()
        self._turns.start_soon(self._wait_out_grace, self._grace, trio.current_time() + grace_s)

    async def _wait_out_grace(self, grace: trio.CancelScope, until: float) -> None:
        with grace:
            await self._timers.sleep_until(until)
            if grace.cancel_called:
                # Due, but an attach (or the turn's end) came in the same pass of the
                # loop, before this task ran again: the cancel lands at the next
                # checkpoint only, and there is none before `_expire`.
                return
            self._grace = None
            self.services.metrics.detached_sessions.dec()
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

    def answer_tool(self, frame: wire.ToolResponse) -> None:
        answer_tool_call(self.turn, frame)

    async def wait_until_idle(self) -> None:
        """Return once no turn runs or waits, the last one stored (callers bound the
        wait)."""
        while self.has_work:
            await self._ended.wait()

    async def end(self, *, timeout_s: float) -> None:
        """Cancel the work (stored `interrupted`) and wait for it, up to timeout_s."""
        self._expire()
        with trio.move_on_after(timeout_s):
            await self._ended.wait()

    async def _run_queued_turns(self, work: trio.CancelScope) -> None:
        """The turns task: runs queued turns one at a time, then ends."""
        try:
            with work:
                while self.queue:
                    queued = self.queue.pop(0)
                    # Running and its state are set in the same step: an attach that
                    # comes in between sees either no turn or this whole turn.
                    self.running, self.turn = queued, TurnState(queued.message)
                    try:
                        await run_turn(self, self.services, queued, self.turn)
                    finally:
                        self.running, self.turn = None, None
        finally:
            self._work = None
            self._ended.set()
            if self.queue:
                self._start_work()  # accepted while cancelled work was being stored
            elif self.attached is None:
                if self._grace is not None:
                    self._grace.cancel()
                    self._grace = None
                    self.services.metrics.detached_sessions.dec()
                self._on_idle(self)
