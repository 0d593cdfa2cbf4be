"""A fake OpenAI Responses API: a real HTTP/1.1 server on 127.0.0.1 (trio + h11).

Owns scripted upstream behaviour for tests: each ``POST /v1/responses`` takes
the next reply from a FIFO (``enqueue``), or the default echo reply when the
FIFO is empty, and is recorded as a ``RecordedRequest``. While a reply streams,
a second task reads the socket so the moment the client closes the connection
is recorded (``client_closed_at``) and the reply stops at once; this is what
lets tests assert "stop closes the upstream within 100 ms".

Every response says ``Connection: close`` and the socket is closed after it,
so each exchange is one TCP connection and "the client closed it early" has
one meaning. Bodies are chunked, each SSE event sent as soon as it is produced.

Like OpenAI, the fake echoes a request's ``previous_response_id`` in the response
objects it sends (``"previous_response_id":null`` in any reply's bytes becomes the
request's id). ``FakeUpstream(proxy=ProxyQuirks(...))`` plays a third-party proxy
instead, each quirk on its own or all of them (``PROXY``): it ignores the chain (no
echo: null, or the field left out), ends with ``data: [DONE]``, sends no ``event:``
lines, uses response ids of ~460 characters, adds ``"model"`` to every event, or sends
no ``response.created``.

    fake = await nursery.start(FakeUpstream().serve)
    fake.enqueue(TextReply(["Hel", "lo"]))
    # point AgentClient at fake.base_url
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio

from chat.demo_model import encode_sse, last_user_text, text_response_events

RECORDINGS_DIR = Path(
    os.environ.get("UPSTREAM_RECORDINGS_DIR")
    or Path(__file__).resolve().parents[2] / "shared" / "upstream-recordings"
)
FAKE_MODEL = "fake-model"
# A request is a few KB of JSON; anything that takes longer than this to arrive
# is a test bug, and the handler gives up rather than hanging the nursery.
REQUEST_READ_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ProxyQuirks:
    """How a popular third-party Responses API proxy (run without its database) differs
    from OpenAI; each on its own, so a test can take them one at a time."""

    ignores_chaining: bool = False  # accepts previous_response_id, does not echo it
    echo_absent: bool = False  # with ignores_chaining: the field left out, not null
    done_sentinel: bool = False  # `data: [DONE]` after the terminal event
    no_event_lines: bool = False  # `data:` lines only
    long_ids: bool = False  # response ids of ~460 characters (routing data inside)
    model_field: bool = False  # a top-level "model" on every event
    no_created: bool = False  # no response.created event


PROXY = ProxyQuirks(
    ignores_chaining=True, done_sentinel=True, no_event_lines=True, long_ids=True,
    model_field=True,
)


def long_response_id(response_id: str) -> str:
    """A proxy-style id: ``response_id`` wrapped with routing data, base64; 461
    characters for any id up to 300 ASCII characters."""
    head, tail = "provider:openai;deployment:", f";response_id:{response_id}"
    filler = hashlib.sha256(response_id.encode()).hexdigest() * 6
    routing = head + filler[: max(0, 342 - len(head) - len(tail))] + tail
    return "resp_" + base64.urlsafe_b64encode(routing.encode()).decode()


@dataclass
class RecordedRequest:
    """One POST as the fake saw it, and how the exchange ended."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    received_at: float
    client_closed_at: float | None = None
    closed: trio.Event = field(default_factory=trio.Event)  # client closed before the end
    done: trio.Event = field(default_factory=trio.Event)  # exchange over, either way
    completed_normally: bool = False


class _Exchange:
    """Writes one HTTP response through h11; tracks whether the client is gone."""

    def __init__(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        rec: RecordedRequest,
        *,
        keep_alive: bool = False,
        proxy: ProxyQuirks | None = None,
    ) -> None:
        self._conn = conn
        self._stream = stream
        self._keep_alive = keep_alive
        self._proxy = proxy
        self.rec = rec
        self.early_bytes = b""
        # OpenAI's echo of the chain, patched into whatever a reply sends (`send`).
        chained_to = rec.body.get("previous_response_id")
        self._echo: bytes | None = None
        if isinstance(chained_to, str) and not (proxy and proxy.ignores_chaining):
            self._echo = b'"previous_response_id":' + json.dumps(chained_to).encode()

    def note_client_closed(self) -> None:
        if self.rec.client_closed_at is None:
            self.rec.client_closed_at = trio.current_time()
            self.rec.closed.set()

    async def _send(self, event: h11.Event) -> None:
        data = self._conn.send(event)
        if data:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.note_client_closed()
                raise

    async def send_raw(self, data: bytes) -> None:
        """Bytes past h11, HTTP framing included; the connection closes after them."""
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.note_client_closed()
            raise

    async def start(self, status: int, headers: dict[str, str]) -> None:
        merged = headers if self._keep_alive else {**headers, "connection": "close"}
        await self._send(h11.Response(status_code=status, headers=list(merged.items())))

    async def send(self, data: bytes) -> None:
        if self._echo is not None:
            data = data.replace(b'"previous_response_id":null', self._echo)
        await self._send(h11.Data(data=data))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def respond(self, status: int, body: bytes, content_type: str) -> None:
        await self.start(status, {"content-type": content_type})
        await self.send(body)
        await self.end()

    async def stream_events(self, events: list[dict[str, Any]], delay_s: float = 0.0) -> None:
        """200 text/event-stream, one event per write, ``delay_s`` between deltas."""
        await self.start(200, {"content-type": "text/event-stream"})
        await self.send_events(events, delay_s)
        if self._proxy and self._proxy.done_sentinel:
            await self.send(b"data: [DONE]\n\n")
        await self.end()

    async def send_events(self, events: list[dict[str, Any]], delay_s: float = 0.0) -> None:
        deltas_sent = 0
        for event in events:
            if event["type"].endswith(".delta"):
                if deltas_sent and delay_s:
                    await trio.sleep(delay_s)
                deltas_sent += 1
            if self._proxy is None:
                await self.send(encode_sse(event))
            elif not (self._proxy.no_created and event["type"] == "response.created"):
                await self.send(self._as_proxy(self._proxy, event))

    def _as_proxy(self, proxy: ProxyQuirks, event: dict[str, Any]) -> bytes:
        """``event`` as the proxy sends it (see ProxyQuirks)."""
        response = event.get("response")
        if isinstance(response, dict):
            response = dict(response)
            if proxy.long_ids:
                response["id"] = long_response_id(response["id"])
            if proxy.ignores_chaining:
                response["previous_response_id"] = None
                if proxy.echo_absent:
                    del response["previous_response_id"]
            event = {**event, "response": response}
        if proxy.model_field:
            event = {**event, "model": self.rec.body.get("model", FAKE_MODEL)}
        if not proxy.no_event_lines:
            return encode_sse(event)
        data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        return f"data: {data}\n\n".encode()


# --- replies --------------------------------------------------------------------


def _new_response_id() -> str:
    return f"resp_fake_{secrets.token_hex(8)}"


def _renumber(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**event, "sequence_number": number} for number, event in enumerate(events)]


def _text_parts(
    response_id: str, chunks: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(created + in_progress, the message item's events, response.completed)."""
    events = text_response_events(response_id, FAKE_MODEL, chunks)
    return events[:2], events[2:-1], events[-1]


def _until_last_delta(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    last = max(
        i
        for i, e in enumerate(events)
        if e["type"]
        in ("response.in_progress", "response.content_part.added", "response.output_text.delta")
    )
    return events[: last + 1]


def _with_response(event: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**event, "response": {**event["response"], **changes}}


@dataclass
class TextReply:
    """A normal text answer in ``chunks``, ``delay_s`` between deltas."""

    chunks: list[str]
    delay_s: float = 0.0
    response_id: str | None = None
    start_delay_s: float = 0.0

    async def play(self, out: _Exchange) -> None:
        await trio.sleep(self.start_delay_s)
        events = text_response_events(
            self.response_id or _new_response_id(), FAKE_MODEL, self.chunks
        )
        await out.stream_events(events, self.delay_s)


@dataclass
class RecordingReply:
    """Replays a recorded ``.sse`` file byte for byte, one event per write."""

    path: Path
    delay_s: float = 0.0

    async def play(self, out: _Exchange) -> None:
        raw = await trio.Path(self.path).read_bytes()
        await out.start(200, {"content-type": "text/event-stream"})
        for block in raw.split(b"\n\n"):
            if block.strip():
                await trio.sleep(self.delay_s)
                await out.send(block + b"\n\n")
        await out.end()


@dataclass
class ToolCallReply:
    """Optional text, then one function_call item per (call_id, name, arguments_json)."""

    calls: list[tuple[str, str, str]]
    text_before: str = ""
    response_id: str | None = None

    async def play(self, out: _Exchange) -> None:
        head, message, completed = _text_parts(
            self.response_id or _new_response_id(), [self.text_before]
        )
        output: list[dict[str, Any]] = []
        events = list(head)
        if self.text_before:
            events += message
            output.append(message[-1]["item"])
        for call_id, name, arguments in self.calls:
            index = len(output)
            item = {
                "id": f"fc_{call_id}",
                "type": "function_call",
                "status": "in_progress",
                "arguments": "",
                "call_id": call_id,
                "name": name,
            }
            done = {**item, "status": "completed", "arguments": arguments}
            half = len(arguments) // 2
            events += [
                {"type": "response.output_item.added", "output_index": index, "item": item},
                *(
                    {
                        "type": "response.function_call_arguments.delta",
                        "item_id": item["id"],
                        "output_index": index,
                        "delta": piece,
                    }
                    for piece in (arguments[:half], arguments[half:])
                    if piece
                ),
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "arguments": arguments,
                },
                {"type": "response.output_item.done", "output_index": index, "item": done},
            ]
            output.append(done)
        events.append(_with_response(completed, output=output))
        await out.stream_events(_renumber(events))


@dataclass
class StatusReply:
    """A plain HTTP response: JSON when ``body`` is a dict, text otherwise."""

    status: int
    body: dict[str, Any] | str = field(
        default_factory=lambda: {"error": {"message": "fake error", "code": None}}
    )
    headers: dict[str, str] = field(default_factory=dict)

    async def play(self, out: _Exchange) -> None:
        if isinstance(self.body, dict):
            data, content_type = json.dumps(self.body).encode(), "application/json"
        else:
            data, content_type = self.body.encode(), "text/plain; charset=utf-8"
        await out.start(self.status, {"content-type": content_type, **self.headers})
        await out.send(data)
        await out.end()


@dataclass
class IncompleteReply:
    """Text, then response.incomplete with ``incomplete_details.reason``."""

    chunks: list[str]
    reason: str = "max_output_tokens"

    async def play(self, out: _Exchange) -> None:
        events = text_response_events(_new_response_id(), FAKE_MODEL, self.chunks)
        events[-1] = _with_response(
            {**events[-1], "type": "response.incomplete"},
            status="incomplete",
            incomplete_details={"reason": self.reason},
        )
        await out.stream_events(events)


@dataclass
class FailedReply:
    """Some deltas, a nested ``error`` event, then response.failed (like recording 06)."""

    chunks_before: list[str]
    code: str = "server_error"
    message: str = "The server had an error while processing your request."

    async def play(self, out: _Exchange) -> None:
        events = _until_last_delta(
            text_response_events(_new_response_id(), FAKE_MODEL, self.chunks_before)
        )
        error = {"code": self.code, "message": self.message}
        events += [
            {"type": "error", "error": {"type": self.code, **error, "param": None}},
            _with_response(
                {"type": "response.failed", "response": events[0]["response"]},
                status="failed",
                error=error,
            ),
        ]
        await out.stream_events(_renumber(events))


@dataclass
class StallReply:
    """Some deltas, silence for ``stall_s``, then the rest of a normal answer."""

    chunks_before: list[str]
    stall_s: float

    async def play(self, out: _Exchange) -> None:
        events = text_response_events(_new_response_id(), FAKE_MODEL, self.chunks_before)
        before = _until_last_delta(events)
        await out.start(200, {"content-type": "text/event-stream"})
        await out.send_events(before)
        await trio.sleep(self.stall_s)
        await out.send_events(events[len(before) :])
        await out.end()


@dataclass
class DropReply:
    """Some deltas, then the TCP connection closes without ending the chunked body."""

    chunks_before: list[str]

    async def play(self, out: _Exchange) -> None:
        events = text_response_events(_new_response_id(), FAKE_MODEL, self.chunks_before)
        await out.start(200, {"content-type": "text/event-stream"})
        await out.send_events(_until_last_delta(events))


@dataclass
class GarbageReply:
    """A 200 with an arbitrary body and content type."""

    body: bytes
    content_type: str

    async def play(self, out: _Exchange) -> None:
        await out.respond(200, self.body, self.content_type)


@dataclass
class RawReply:
    """A whole HTTP response as raw bytes, in one write: framing h11 will not produce."""

    data: bytes

    async def play(self, out: _Exchange) -> None:
        await out.send_raw(self.data)


Reply = (
    TextReply
    | RecordingReply
    | ToolCallReply
    | StatusReply
    | IncompleteReply
    | FailedReply
    | StallReply
    | DropReply
    | GarbageReply
    | RawReply
)


# --- the server -------------------------------------------------------------------


class FakeUpstream:
    """The fake server; see the module docstring.

    Resource handling: ``serve`` runs until its nursery is cancelled; each
    connection is handled in its own task and closed when its exchange ends.
    """

    def __init__(
        self,
        *,
        keep_alive: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        proxy: ProxyQuirks | None = None,
    ) -> None:
        # keep_alive: answer without `Connection: close` and serve the next request on
        # the same connection when a reply ended normally (what real upstreams do).
        # ssl_context: serve HTTPS, as the real API does.
        # proxy: every event-stream reply as that proxy sends it (ProxyQuirks).
        self.keep_alive = keep_alive
        self.proxy = proxy
        self._ssl_context = ssl_context
        self.connections_accepted = 0
        self.requests: list[RecordedRequest] = []
        self.base_url = ""
        self._replies: deque[Reply] = deque()
        self._request_arrived = trio.Event()

    def enqueue(self, *replies: Reply) -> None:
        """Script the next replies, consumed FIFO, one per POST /v1/responses."""
        self._replies.extend(replies)

    async def wait_for_request(self, n: int) -> RecordedRequest:
        """Wait until at least ``n`` requests arrived; returns the n-th."""
        while len(self.requests) < n:
            await self._request_arrived.wait()
        return self.requests[n - 1]

    async def serve(
        self, *, task_status: trio.TaskStatus[FakeUpstream] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on 127.0.0.1:0; ``task_status.started(self)`` once ``base_url`` is set."""
        listeners: list[trio.abc.Listener[Any]] = list(
            await trio.open_tcp_listeners(0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]  # type: ignore[attr-defined]
        scheme = "http"
        if self._ssl_context is not None:
            listeners = [trio.SSLListener(lst, self._ssl_context) for lst in listeners]
            scheme = "https"
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            self.base_url = f"{scheme}://127.0.0.1:{port}/v1"
            task_status.started(self)

    def _record(self, rec: RecordedRequest) -> None:
        self.requests.append(rec)
        arrived, self._request_arrived = self._request_arrived, trio.Event()
        arrived.set()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        self.connections_accepted += 1
        async with stream:
            conn = h11.Connection(h11.SERVER)
            while await self._exchange(conn, stream) and self.keep_alive:
                conn.start_next_cycle()

    async def _exchange(self, conn: h11.Connection, stream: trio.abc.Stream) -> bool:
        """Serve one request; True if the connection can serve another."""
        request = None
        with trio.move_on_after(REQUEST_READ_TIMEOUT_S):
            request = await self._read_request(conn, stream)
        if request is None:
            return False
        head, body = request
        rec = RecordedRequest(
            method=head.method.decode(),
            path=head.target.decode(),
            headers={k.decode().lower(): v.decode() for k, v in head.headers},
            body=_json_or_empty(body),
            received_at=trio.current_time(),
        )
        if rec.method != "POST" or rec.path != "/v1/responses":
            reply: Reply = StatusReply(404, {"error": {"message": "no such route"}})
        else:
            self._record(rec)
            reply = self._replies.popleft() if self._replies else _echo_reply(rec.body)
        out = _Exchange(conn, stream, rec, keep_alive=self.keep_alive, proxy=self.proxy)
        try:
            await _until_client_closes(stream, out, reply.play)
        finally:
            rec.completed_normally = rec.client_closed_at is None
            rec.done.set()
        if out.early_bytes:  # the next request began while the watcher listened
            conn.receive_data(out.early_bytes)
        return rec.completed_normally and conn.our_state is h11.DONE

    async def _read_request(
        self, conn: h11.Connection, stream: trio.abc.Stream
    ) -> tuple[h11.Request, bytes] | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return None
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(64 * 1024)
                except trio.BrokenResourceError:
                    return None
                conn.receive_data(data)
                if not data:
                    continue  # h11 turns the EOF into ConnectionClosed or an error
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_REQUEST_BYTES:
                    return None
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                return head, bytes(body)
            else:
                return None


async def _until_client_closes(
    stream: trio.abc.Stream, out: _Exchange, play: Callable[[_Exchange], Awaitable[None]]
) -> None:
    """Run ``play`` while watching the socket; a client EOF/reset stops it at once."""

    async def watch() -> None:
        try:
            # The client sends nothing during a reply; with keep-alive, bytes may be the
            # next request, sent the moment this reply ended: keep them for it.
            while data := await stream.receive_some(4096):
                out.early_bytes += data
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        out.note_client_closed()
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        try:
            await play(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left mid-write; note_client_closed already recorded it
        nursery.cancel_scope.cancel()


def _json_or_empty(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _echo_reply(body: dict[str, Any]) -> TextReply:
    words = f"echo: {last_user_text(body.get('input'))}".split(" ")
    return TextReply([words[0], *(" " + word for word in words[1:])])
