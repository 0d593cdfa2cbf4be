"""One turn of a conversation: its context, its upstream rounds, its tool round
trips, its final status, and storing it.

A turn is run by its session (`chat.session.LiveSession`) inside the turn's own
cancel scope: `stop` cancels that scope, and the upstream request, which lives
inside it, is closed with it. The turn does not know which connection (if any)
watches it: every frame goes to its `TurnHost`, which forwards it to the attached
connection or, while none is attached, keeps nothing but what `TurnState` holds
(enough to replay the turn to a connection that attaches later).

Error handling: an upstream failure ends the turn `failed` with an
`upstream_error` frame; a database that cannot give the context ends it `failed`
with `storage_error`. A cancellation from outside the turn's scope (grace expiry,
session deletion, shutdown) stores the partial answer as `interrupted`, in a
shielded, time-boxed write, and propagates.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import trio

import protocol as wire
from agent_client import (
    TOOL_BAD_ARGUMENTS_OUTPUT,
    TOOL_CANCELLED_OUTPUT,
    TOOL_TIMEOUT_OUTPUT,
    AgentClient,
    AgentEvent,
    Completed,
    Failed,
    Incomplete,
    PreviousResponseIgnored,
    PreviousResponseNotFound,
    ResponseRequest,
    ResponseStarted,
    TextDelta,
    ToolCall,
    UpstreamError,
    assistant_item,
    function_call_item,
    function_output_item,
    input_items,
    parse_arguments,
)
from chat.ops import ServerMetrics
from chat.settings import Config
from store import Store, StoredMessage, ToolCallRecord

log = logging.getLogger("chat")

# Writes that must happen while a turn is being torn down (shielded).
FINAL_WRITE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class TurnServices:
    """What every turn of the server uses."""

    config: Config
    store: Store
    agent: AgentClient
    metrics: ServerMetrics


@dataclass
class QueuedTurn:
    """An accepted message waiting for (or running) its turn; `scope` is the turn's
    cancel scope, made at once so that a `stop` can reach a turn about to start."""

    message: StoredMessage
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass
class PendingToolCall:
    """A tool request waiting for its answer; `request` is re-sent on attach."""

    record: ToolCallRecord
    request: wire.ToolRequest
    answered: trio.Event = field(default_factory=trio.Event)


@dataclass
class TurnState:
    """What one turn has produced so far; stored when the turn ends, whatever the end."""

    message: StoredMessage
    turn_id: str = field(default_factory=lambda: f"turn_{uuid.uuid4().hex}")
    parts: list[str] = field(default_factory=list)
    response_id: str | None = None
    status: wire.TurnStatus = "failed"
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    pending_calls: dict[str, PendingToolCall] = field(default_factory=dict)
    started_at: float = field(default_factory=trio.current_time)
    first_delta_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def opening_frames(self, *, resumed: bool) -> list[wire.ServerFrame]:
        """The frames that open this turn; `resumed`: replayed to a connection that
        attached while it ran, with its text so far and the tool requests waiting."""
        frames: list[wire.ServerFrame] = [
            wire.Typing(is_typing=True),
            wire.ResponseStart(
                turn_id=self.turn_id,
                message_id=self.message.client_message_id,
                resumed=resumed,
            ),
        ]
        if resumed:
            if self.parts:
                frames.append(wire.TextDeltaFrame(turn_id=self.turn_id, content=self.text))
            frames.extend(pending.request for pending in self.pending_calls.values())
        return frames


class TurnHost(Protocol):
    """Where a turn's frames go: its session, which forwards them to the attached
    connection, if any."""

    session_id: str

    def send(self, frame: wire.ServerFrame) -> None: ...

    def send_delta(self, turn_id: str, text: str) -> None: ...


async def run_turn(
    host: TurnHost, services: TurnServices, queued: QueuedTurn, turn: TurnState
) -> None:
    """Run one turn to its end and store it. Sends its frames through `host`: the
    opening ones, text deltas, tool requests, errors, `response_end` and `typing`
    false. Cancelled from outside its scope: stores it `interrupted` and re-raises."""
    for frame in turn.opening_frames(resumed=False):
        host.send(frame)
    conversation = _Conversation(host, services, turn)
    try:
        with queued.scope as scope:
            try:
                await conversation.converse()
            except UpstreamError as exc:
                kind = exc.kind
                services.metrics.upstream_errors.labels(kind).inc()
                log.warning("session %s: upstream failed (%s): %s", host.session_id, kind, exc)
                turn.status = "failed"
                host.send(wire.UpstreamFailed(turn_id=turn.turn_id).to_frame())
            except wire.StorageUnavailable as error:
                log.error("session %s: database unavailable for turn context", host.session_id)
                turn.status = "failed"
                error.turn_id = turn.turn_id
                host.send(error.to_frame())
            except Exception:
                # A fault of ours: this turn fails, the session and the server go on.
                log.exception("session %s: turn %s failed", host.session_id, turn.turn_id)
                turn.status = "failed"
                host.send(wire.UpstreamFailed(turn_id=turn.turn_id).to_frame())
        if scope.cancelled_caught:
            turn.status = "stopped"
    except BaseException:
        # Grace expiry, deletion or shutdown: the partial answer is stored all the same.
        turn.status = "interrupted"
        with trio.CancelScope(shield=True), trio.move_on_after(FINAL_WRITE_TIMEOUT_S) as late:
            await _store_turn(host, services, turn)
        if late.cancelled_caught:
            log.error("session %s: turn %s not stored in time", host.session_id, turn.turn_id)
        _log_turn_end(host, services, turn)
        raise
    finally:
        turn.pending_calls.clear()
    try:
        await _store_turn(host, services, turn)
    except wire.StorageUnavailable as error:
        log.error("session %s: turn %s could not be stored", host.session_id, turn.turn_id)
        error.turn_id = turn.turn_id
        host.send(error.to_frame())
    host.send(
        wire.ResponseEnd(
            turn_id=turn.turn_id,
            full_content=turn.text,
            status=turn.status,
            response_id=turn.response_id,
        )
    )
    host.send(wire.Typing(is_typing=False))
    _log_turn_end(host, services, turn)


def _log_turn_end(host: TurnHost, services: TurnServices, turn: TurnState) -> None:
    services.metrics.turns.labels(turn.status).inc()
    elapsed_s = trio.current_time() - turn.started_at
    first_s = turn.first_delta_at - turn.started_at if turn.first_delta_at else None
    log.info(
        "session %s: turn %s %s in %.3f s (first delta %s, %d chars, %d tool calls)",
        host.session_id,
        turn.turn_id,
        turn.status,
        elapsed_s,
        f"{first_s:.3f} s" if first_s is not None else "none",
        len(turn.text),
        len(turn.tool_calls),
        extra={
            "session_id": host.session_id,
            "turn_id": turn.turn_id,
            "status": turn.status,
            "elapsed_s": round(elapsed_s, 4),
        },
    )
    if services.config.log_content:
        log.info("session %s: turn %s answer: %r", host.session_id, turn.turn_id, turn.text)


async def _store_turn(host: TurnHost, services: TurnServices, turn: TurnState) -> None:
    for call in turn.tool_calls:
        if call.status == "pending":
            call.output, call.status = TOOL_CANCELLED_OUTPUT, turn.status
    await services.store.finish_turn(
        host.session_id,
        reply_to=turn.message.id,
        turn_id=turn.turn_id,
        content=turn.text,
        status=turn.status,
        response_id=turn.response_id,
        tool_calls=turn.tool_calls,
    )


class _Conversation:
    """The upstream side of one turn: requests, rounds, tool round trips."""

    def __init__(self, host: TurnHost, services: TurnServices, turn: TurnState) -> None:
        self._host = host
        self._services = services
        self._config = services.config
        self._turn = turn
        # This turn's finished tool rounds as input items (what the model said and
        # called, then the outputs): the full history of a request leaves them out.
        self._rounds: list[dict[str, Any]] = []

    async def converse(self) -> None:
        """Stream upstream responses until the model is done, answering tool calls
        between rounds. Raises UpstreamError."""
        turn = self._turn
        request = await self._first_request()
        while True:
            parts_before = len(turn.parts)
            try:
                calls = await self._stream_round(request)
            except PreviousResponseNotFound as exc:
                # Raised before any of this round's events, so nothing is repeated.
                if request.previous_response_id is None or len(turn.parts) > parts_before:
                    raise
                # The upstream forgot the chain (expired, another project) or ignores it
                # (PreviousResponseIgnored; the agent client chains no more): resend history.
                log.info(
                    "session %s: previous response %s upstream; resending the full history",
                    self._host.session_id,
                    "ignored" if isinstance(exc, PreviousResponseIgnored) else "unknown",
                )
                request = await self._unchained_request()
                continue
            if not calls:
                return
            outputs = await self._resolve_tool_calls(calls)
            said = "".join(turn.parts[parts_before:])
            request = await self._tool_output_request(request, said, calls, outputs)

    def _chains(self) -> bool:
        return self._config.upstream_store and self._services.agent.chaining_active

    async def _first_request(self) -> ResponseRequest:
        # The context ends at this turn's own message: messages queued behind it are
        # context for their own turns, not this one.
        if self._chains():
            chain = await self._services.store.chain_point(
                self._host.session_id, up_to=self._turn.message.id
            )
            if chain.previous_response_id is not None:
                return self._request(input_items(chain.after), chain.previous_response_id)
        return await self._full_history_request()

    async def _full_history_request(self) -> ResponseRequest:
        history = await self._services.store.full_history(
            self._host.session_id, up_to=self._turn.message.id
        )
        return self._request(input_items(history), None)

    async def _unchained_request(self) -> ResponseRequest:
        """The full history, then this turn's finished tool rounds: the same context
        as a chained request, with no previous_response_id."""
        request = await self._full_history_request()
        return replace(request, input=[*request.input, *self._rounds])

    def _request(self, items: list[dict[str, Any]], previous: str | None) -> ResponseRequest:
        return ResponseRequest(
            input=items,
            instructions=self._config.instructions,
            previous_response_id=previous,
            tools=self._config.tools,
            store=self._config.upstream_store,
        )

    async def _tool_output_request(
        self,
        request: ResponseRequest,
        said: str,
        calls: list[ToolCall],
        outputs: list[dict[str, Any]],
    ) -> ResponseRequest:
        text = [assistant_item(said)] if said else []
        asked = [function_call_item(c.call_id, c.name, c.arguments) for c in calls]
        self._rounds += [*text, *asked, *outputs]
        if self._chains():
            return self._request(outputs, self._turn.response_id)
        if request.previous_response_id is None:
            # Nothing chained (--no-store, or an upstream that ignores chains): resend
            # this round's input with what the model said and asked, then the outputs.
            return replace(request, input=[*request.input, *text, *asked, *outputs])
        # This round was chained, and chaining stopped since: rebuild the whole context.
        return await self._unchained_request()

    async def _stream_round(self, request: ResponseRequest) -> list[ToolCall]:
        """One upstream response (the agent client retries what is safe to retry)."""
        calls: list[ToolCall] = []
        started = trio.current_time()
        try:
            async with self._services.agent.stream(request) as events:
                async for event in events:
                    self._on_event(event, calls)
        finally:
            self._services.metrics.upstream_request_seconds.observe(
                trio.current_time() - started
            )
        return calls

    def _on_event(self, event: AgentEvent, calls: list[ToolCall]) -> None:
        turn = self._turn
        if isinstance(event, TextDelta):
            if event.text:
                if not turn.parts:
                    turn.first_delta_at = trio.current_time()
                    self._services.metrics.time_to_first_token_seconds.observe(
                        turn.first_delta_at - turn.started_at
                    )
                # The text and its frame in one step: a connection that attaches
                # between two deltas gets exactly the text so far (no await here).
                turn.parts.append(event.text)
                self._host.send_delta(turn.turn_id, event.text)
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
            # The upstream's own error event: the same failure as any other upstream one.
            raise UpstreamError(f"upstream error {event.code or 'unknown'}", kind="error_event")

    async def _resolve_tool_calls(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        """Send a tool_request per call and wait (up to --tool-timeout) for the answers.
        Returns one function_call_output item per call, in call order."""
        turn = self._turn
        waiting_calls: list[PendingToolCall] = []
        for call in calls:
            record = ToolCallRecord(call.call_id, call.name, call.arguments)
            turn.tool_calls.append(record)
            arguments = parse_arguments(call.arguments)
            if arguments is None:
                record.output, record.status = TOOL_BAD_ARGUMENTS_OUTPUT, "failed"
                continue
            request = wire.ToolRequest(
                turn_id=turn.turn_id, call_id=call.call_id, name=call.name, arguments=arguments
            )
            waiting = PendingToolCall(record, request)
            turn.pending_calls[call.call_id] = waiting
            waiting_calls.append(waiting)
            self._host.send(request)
        with trio.move_on_after(self._config.tool_timeout_s):
            for waiting in waiting_calls:
                await waiting.answered.wait()
        for waiting in waiting_calls:
            if not waiting.answered.is_set():
                turn.pending_calls.pop(waiting.record.call_id, None)
                waiting.record.output, waiting.record.status = TOOL_TIMEOUT_OUTPUT, "failed"
        return [
            function_output_item(record.call_id, record.output)
            for record in turn.tool_calls[-len(calls) :]
        ]


def answer_tool_call(turn: TurnState | None, frame: wire.ToolResponse) -> None:
    """Give a tool's answer to the turn waiting for it. Raises UnknownCallId."""
    pending = turn.pending_calls.pop(frame.call_id, None) if turn is not None else None
    if pending is None:
        raise wire.UnknownCallId(f"No tool request is waiting for call_id {frame.call_id!r}.")
    pending.record.output = frame.content
    pending.record.status = "completed"
    pending.answered.set()
