"""Upstream model client: one streamed OpenAI Responses API call per turn.

This module owns everything between "the server wants a model answer" and
"here are our own events": building the ``POST {base_url}/responses`` request,
retrying what is safe to retry, reading the body (a chunked body is decoded
here, ``ChunkedBodyDecoder``, on httpx's own pooled connection) and its SSE
stream (``SSEParser``), mapping upstream events to the small event set below,
and closing the upstream connection the moment the caller leaves the stream's
context. It also owns the offline demo model (``DemoModelTransport``) and the
pure helpers that synthesise a Responses API text stream
(``text_response_events``, ``encode_sse``), which the test fake upstream reuses.

Our events (frozen dataclasses)::

    ResponseStarted  response.created: the upstream response id, known early
    TextDelta        response.output_text.delta, response.refusal.delta
    ToolCall         response.output_item.done whose item is a function_call
    Completed        response.completed                      (terminal)
    Incomplete       response.incomplete                     (terminal)
    Failed           error (nested or flat shape), response.failed (terminal)

A stream yields exactly one terminal event, last; events after it are not read.
Consecutive text deltas that arrive in one network read are yielded as one
``TextDelta`` with their text joined: the same text, one frame per read in a burst.

Exception tree (``kind`` is a short machine-readable cause)::

    UpstreamError                   kind "unavailable"
    +-- UpstreamDisconnected        "connect": the connection broke after the request
    |                               was sent (not retried here: the caller knows whether
    |                               anything reached its user yet)
    +-- UpstreamUnavailable         after all retries: "connect", "server_error" (5xx),
    |                               "rate_limited" (429)
    +-- UpstreamRejected            non-retryable 4xx, "rejected"; status_code, code
    |   +-- PreviousResponseNotFound    previous_response_id unknown upstream: resend
    |                                   the full history without it
    +-- UpstreamProtocolError       "protocol": not SSE, not JSON, oversized event,
    |                               stream ended with no terminal event
    +-- UpstreamTimeout             "timeout": no bytes for idle_timeout_s

Messages are for humans and never contain the API key: upstream error text is
passed through ``_redact`` before it lands in an exception.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import re
import secrets
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, cast

import httpcore
import httpx
import trio

logger = logging.getLogger(__name__)

# response.completed repeats the instructions, the tools and the whole output, so it
# is the largest event a healthy stream sends; a 128k-token answer is ~0.5 MiB of
# text. Anything past this is a broken or hostile upstream, and we refuse to buffer it.
MAX_SSE_EVENT_BYTES = 4 * 1024 * 1024
# Error bodies are short JSON; we only need error.code and error.message from them.
MAX_ERROR_BODY_BYTES = 64 * 1024
# A burst (the upstream far ahead of us) is read 16 KB at a time, each read its own
# schedule point: one connection's step stays short while others wait (bench/README.md).
LEAN_READ_BYTES = 16 * 1024
# ...and once a pass of the event loop has run this long, a read of a burst (this much
# or more) waits for the next pass before it returns: the loop polls I/O again, and
# sessions with a delta or two go first.
BURST_PASS_BUDGET_S = 0.005
BURST_READ_BYTES = 4 * 1024
# A chunk-size line is a hex number and perhaps extensions; h11 allows 16 KB for it.
MAX_CHUNK_LINE_BYTES = 16 * 1024
# After the terminal event, the rest of the body is read for this long at most.
BODY_DRAIN_TIMEOUT_S = 0.05
# Pace of the offline demo model: fast enough to be pleasant, slow enough to see
# streaming (and to have something to stop).
DEMO_WORD_INTERVAL_S = 0.04

_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")
# Where a response head ends, by h11's rule (a line may end in LF alone).
_HEAD_END_RE = re.compile(rb"\n\r?\n")
_PREVIOUS_NOT_FOUND_RE = re.compile(r"previous response with id .* not found", re.IGNORECASE)
# OpenAI echoes (partly masked) keys in 401 messages; strip anything key-shaped.
_KEY_LIKE_RE = re.compile(r"sk-[A-Za-z0-9_\-*]{4,}")


# --- exceptions ---------------------------------------------------------------


class UpstreamError(Exception):
    """The upstream could not give us a complete answer. See the module docstring."""

    kind: str = "unavailable"

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind


class UpstreamDisconnected(UpstreamError):
    """The connection broke after the request was sent (reset, EOF mid-body)."""

    kind = "connect"


class UpstreamUnavailable(UpstreamError):
    """Connect errors, 5xx or 429 persisted through every attempt."""

    kind = "connect"

    def __init__(
        self, message: str, *, kind: str | None = None, status_code: int | None = None
    ) -> None:
        super().__init__(message, kind=kind)
        self.status_code = status_code


class UpstreamRejected(UpstreamError):
    """A non-retryable 4xx; ``code`` is the upstream ``error.code`` when it sent one."""

    kind = "rejected"

    def __init__(self, message: str, *, status_code: int, code: str | None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code


class PreviousResponseNotFound(UpstreamRejected):
    """The upstream no longer knows ``previous_response_id``; resend the full history."""


class UpstreamProtocolError(UpstreamError):
    """The upstream sent something that is not a Responses API event stream."""

    kind = "protocol"


class UpstreamTimeout(UpstreamError):
    """The upstream sent no bytes for ``idle_timeout_s``."""

    kind = "timeout"


class _Retryable(Exception):
    """Internal: `failure` happened before the user saw anything; it may be tried again."""

    def __init__(self, failure: UpstreamError, *, retry_after_s: float | None = None) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.retry_after_s = retry_after_s


# --- events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    response_id: str


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str  # raw JSON text, exactly as the model produced it


@dataclass(frozen=True, slots=True)
class Completed:
    response_id: str | None


@dataclass(frozen=True, slots=True)
class Incomplete:
    response_id: str | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class Failed:
    response_id: str | None
    code: str | None
    message: str


AgentEvent = ResponseStarted | TextDelta | ToolCall | Completed | Incomplete | Failed
_TERMINAL = (Completed, Incomplete, Failed)


# --- pure decoding ------------------------------------------------------------


def decode_event(data: str) -> AgentEvent | None:
    """Map one SSE ``data:`` payload to our event; None for events we ignore.

    Lenient: reads only the fields it uses, so unknown event types, unknown
    fields and missing ``sequence_number``/``obfuscation``/``logprobs`` are fine.
    Raises UpstreamProtocolError if ``data`` is not a JSON object, or if an event
    we use lacks the field that carries its meaning (a delta without text).
    """
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise UpstreamProtocolError(f"upstream event is not JSON: {_excerpt(data)}") from exc
    if not isinstance(event, dict):
        raise UpstreamProtocolError(f"upstream event is not a JSON object: {_excerpt(data)}")
    kind = event.get("type")
    if kind == "response.created":
        response_id = _response(event).get("id")
        if not isinstance(response_id, str):
            raise UpstreamProtocolError("response.created without a response id")
        return ResponseStarted(response_id)
    if kind in ("response.output_text.delta", "response.refusal.delta"):
        return TextDelta(_required_str(event, "delta", kind))
    if kind == "response.output_item.done":
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type") != "function_call":
            return None
        return ToolCall(
            call_id=_required_str(item, "call_id", kind),
            name=_required_str(item, "name", kind),
            arguments=_required_str(item, "arguments", kind),
        )
    if kind == "response.completed":
        return Completed(_response_id(event))
    if kind == "response.incomplete":
        details = _response(event).get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        return Incomplete(_response_id(event), _str_or_none(reason))
    if kind == "response.failed":
        error = _response(event).get("error")
        return _failed(_response_id(event), error if isinstance(error, dict) else {})
    if kind == "error":
        nested = event.get("error")
        return _failed(None, nested if isinstance(nested, dict) else event)
    return None


def _response(event: Mapping[str, Any]) -> Mapping[str, Any]:
    response = event.get("response")
    return response if isinstance(response, dict) else {}


def _response_id(event: Mapping[str, Any]) -> str | None:
    return _str_or_none(_response(event).get("id"))


def _failed(response_id: str | None, error: Mapping[str, Any]) -> Failed:
    message = _str_or_none(error.get("message")) or "upstream reported a failure"
    return Failed(response_id, _str_or_none(error.get("code")), message)


def _required_str(obj: Mapping[str, Any], key: str, kind: object) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise UpstreamProtocolError(f"{kind} event without a string {key!r}")
    return value


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _excerpt(text: str, limit: int = 200) -> str:
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


class SSEParser:
    """Server-sent events (the WHATWG ``text/event-stream`` format) from raw bytes.

    Pure, no I/O: ``feed`` takes each network chunk and returns the data of every
    event the chunk completes, so the caller sees which events arrived together.
    Lines may end in LF, CRLF or CR; ``data`` lines are joined with LF, other
    fields and comments (keep-alives) are skipped, and an unfinished event at the
    end of the stream is dropped, as the standard says. Events with no data carry
    nothing for us and are not returned.
    Bounded: an event that grows past ``max_event_bytes`` without ending raises
    UpstreamProtocolError (at most that plus one chunk is ever buffered).
    """

    def __init__(self, max_event_bytes: int) -> None:
        self._max_event_bytes = max_event_bytes
        self._pending = b""  # the unfinished event, line ends already LF
        self._cr_held = False  # the last chunk ended in CR: the next may start with its LF
        self._at_start = True

    def feed(self, chunk: bytes) -> list[str]:
        if self._at_start and chunk:
            self._at_start = False
            chunk = chunk.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
        if self._cr_held:
            chunk, self._cr_held = b"\r" + chunk, False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk, self._cr_held = chunk[:-1], True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._pending + chunk
        events: list[str] = []
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            data = _event_data(buffer[start:end])
            if data:
                events.append(data)
            start = end + 2
        self._pending = buffer[start:]
        if len(self._pending) > self._max_event_bytes:
            raise UpstreamProtocolError(
                f"upstream SSE event exceeds {self._max_event_bytes} bytes without ending"
            )
        return events


def _event_data(block: bytes) -> str | None:
    """The data of one event's lines (LF-separated, no blank line among them but
    perhaps leading ones), or None if it has no data field."""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data"):
            name, _, value = line.partition(b":")
            if name == b"data":
                data.append(value[1:] if value.startswith(b" ") else value)
    if not data:
        return None
    # Event boundaries are ASCII, so no UTF-8 sequence is ever cut between events.
    return b"\n".join(data).decode("utf-8", errors="replace")


class ChunkedBodyDecoder:
    """The payload of an HTTP/1.1 chunked body (RFC 9112 §7.1), from raw bytes.

    Pure, no I/O: ``feed`` takes each network read and returns the payload bytes it
    carries, a chunk's data passed on as it arrives rather than once the chunk is
    whole. When the last-chunk line begins, ``done`` is set and ``rest`` holds the
    raw bytes from that line on (the last chunk, trailers, the final CRLF), so that
    the HTTP library can read the end of the message itself. Chunk extensions are
    ignored. Framing that is not chunked coding raises UpstreamProtocolError: from
    the call that meets it, or, when that call has payload to return first, from the
    next call (``failed`` is then set: make that call without waiting for input).
    Bounded: at most one chunk-size line (``MAX_CHUNK_LINE_BYTES``) is buffered.
    """

    def __init__(self) -> None:
        self._held = b""  # an unfinished chunk-size line, or the start of a data CRLF
        self._data_due = 0  # payload bytes still to come in the current chunk
        self._crlf_due = False  # the current chunk's data is over; its CRLF is next
        self._error: UpstreamProtocolError | None = None
        self.done = False
        self.rest = b""

    @property
    def failed(self) -> bool:
        return self._error is not None

    def feed(self, raw: bytes) -> bytes:
        if self._error is not None:
            raise self._error
        if self.done:
            self.rest += raw
            return b""
        payload: list[bytes] = []
        try:
            self._decode(raw, payload)
        except UpstreamProtocolError as error:
            if not any(payload):
                raise
            self._error = error
        return payload[0] if len(payload) == 1 else b"".join(payload)

    def _decode(self, raw: bytes, payload: list[bytes]) -> None:
        data = self._held + raw if self._held else raw
        self._held = b""
        pos, size = 0, len(data)
        while pos < size:
            if self._data_due:
                end = min(size, pos + self._data_due)
                payload.append(data[pos:end])
                self._data_due -= end - pos
                self._crlf_due = not self._data_due
                pos = end
            elif self._crlf_due:
                if size - pos < 2:
                    self._held = data[pos:]
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise UpstreamProtocolError("upstream body: chunk data not followed by CRLF")
                self._crlf_due = False
                pos += 2
            else:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > MAX_CHUNK_LINE_BYTES:
                        raise UpstreamProtocolError("upstream body: chunk-size line too long")
                    self._held = data[pos:]
                    break
                digits = data[pos:end].partition(b";")[0].rstrip(b" \t")
                if not _CHUNK_SIZE_RE.fullmatch(digits):
                    raise UpstreamProtocolError(
                        f"upstream body: malformed chunk size {bytes(digits[:40])!r}"
                    )
                self._data_due = int(digits, 16)
                if not self._data_due:
                    self.done = True
                    self.rest = data[pos:]
                    break
                pos = end + 2


# httpcore's socket option shape (it does not export the alias).
SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


class _LoopPassClock(trio.abc.Instrument):
    """When the current pass of trio's run loop began (its I/O poll returned)."""

    def __init__(self) -> None:
        self._started = time.perf_counter()

    def after_io_wait(self, timeout: float) -> None:
        self._started = time.perf_counter()

    def age_s(self) -> float:
        return time.perf_counter() - self._started


_LOOP_PASS_CLOCK: trio.lowlevel.RunVar[_LoopPassClock] = trio.lowlevel.RunVar("loop_pass_clock")


def _loop_pass_clock() -> _LoopPassClock:
    """The pass clock of the running trio loop, installed on first use."""
    try:
        return _LOOP_PASS_CLOCK.get()
    except LookupError:
        clock = _LoopPassClock()
        trio.lowlevel.add_instrument(clock)
        _LOOP_PASS_CLOCK.set(clock)
        return clock


class _LeanReadTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, over connections that read cheaply (`_LeanReadStream`).

    httpx builds its httpcore pool itself and takes no network backend; the pool is
    rebuilt here with the same settings and ours. Construction fails loudly if httpx
    ever stops keeping its pool where this expects it.
    """

    def __init__(self, tls: ssl.SSLContext, limits: httpx.Limits) -> None:
        super().__init__(verify=tls, limits=limits)
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise RuntimeError("this httpx keeps its connection pool elsewhere")
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=tls,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_LeanReadBackend(),
        )


class _LeanReadBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend, whose plain TCP connections read through `_LeanReadStream`."""

    def __init__(self) -> None:
        self._trio = httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._trio.connect_tcp(host, port, timeout, local_address, socket_options)
        return _LeanReadStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._trio.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._trio.sleep(seconds)


class _LeanReadStream(httpcore.AsyncNetworkStream):
    """An httpcore connection whose reads are cheap, and whose response bodies the
    agent client can read itself (`_tapped_body`).

    Cheap reads: untimed reads on plain TCP skip httpcore's and trio's layers. They
    are a read per SSE event, and those layers (a cancel scope, three
    exception-mapping context managers, a recv tried before every wait) cost more
    than the event. When the last read drained the socket, it waits for readability
    first instead of trying a recv that would fail. Timed reads, TLS connections and
    everything else are httpcore's own.

    Body hand-over: from each request write until ``take_body``, a read returns at
    most up to the end of a response head (by h11's rule), and keeps what follows.
    So when httpcore has the final response's head, h11 holds no byte of the body,
    and ``take_body`` hands that body over: the bytes read past the head, then
    plain reads. ``give_back`` returns bytes for httpcore to read (the end of the
    message), so that a response read this way still ends in httpcore's pool.
    """

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        # Plain TCP's descriptor, while the socket is open (-1: read through httpcore).
        plain = inner.get_extra_info("ssl_object") is None
        self._fd: int = inner.get_extra_info("socket").fileno() if plain else -1
        self._drained = True
        self._unread = b""  # read from the network, not yet returned
        self._in_head = False  # reads stop at the end of a response head
        self._head_tail = b""  # the last bytes of the head so far: its end may straddle reads

    async def read(
        self,
        max_bytes: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> bytes:
        if self._unread:
            data, self._unread = self._unread[:max_bytes], self._unread[max_bytes:]
            await trio.lowlevel.checkpoint()  # every read is a schedule point
        else:
            data = await self._read_network(max_bytes, timeout)
        if self._in_head and data:
            data = self._up_to_head_end(data)
        return data

    def take_body(self) -> bytes:
        """End head mode; the bytes already read past the head (see the class doc)."""
        self._in_head = False
        data, self._unread = self._unread, b""
        return data

    def give_back(self, data: bytes) -> None:
        """Make ``data`` the next bytes read."""
        self._unread = data + self._unread

    def _up_to_head_end(self, data: bytes) -> bytes:
        seen = self._head_tail + data
        end = _HEAD_END_RE.search(seen)
        if end is None:
            self._head_tail = seen[-2:]
            return data
        # The tail held no head end (it would have been cut at), so `cut` is > 0.
        cut = end.end() - len(self._head_tail)
        self._head_tail = b""
        self._unread = data[cut:] + self._unread
        return data[:cut]

    async def _read_network(
        self,
        max_bytes: int,
        timeout: float | None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> bytes:
        if self._fd < 0 or timeout is not None:
            return await self._inner.read(max_bytes, timeout)
        read_bytes = min(max_bytes, LEAN_READ_BYTES)
        try:
            if self._drained:
                await trio.lowlevel.wait_readable(self._fd)
            else:
                await trio.lowlevel.checkpoint()  # every read is a schedule point
            while True:
                try:
                    data = os.read(self._fd, read_bytes)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self._fd)
        except (OSError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            raise httpcore.ReadError(str(exc)) from exc
        self._drained = len(data) < read_bytes
        if len(data) >= BURST_READ_BYTES:
            # Only bursts consult the pass clock (and install it, on first use). The
            # data waits in _unread, so a cancelled wait loses none of it.
            loop_pass = _loop_pass_clock()
            if loop_pass.age_s() > BURST_PASS_BUDGET_S:
                self._unread = data
                while loop_pass.age_s() > BURST_PASS_BUDGET_S:
                    await trio.lowlevel.checkpoint()
                data, self._unread = self._unread, b""
        return data

    async def write(
        self,
        buffer: bytes,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> None:
        self._in_head, self._head_tail = True, b""  # a request: its response head comes next
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        self._fd = -1  # the number may belong to another socket once this one is closed
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> httpcore.AsyncNetworkStream:
        return _LeanReadStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _redact(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "***")
    return _KEY_LIKE_RE.sub("sk-***", text)


def _retry_after_s(headers: httpx.Headers) -> float | None:
    """Seconds the upstream asked us to wait, from retry-after-ms or Retry-After."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# --- the client ---------------------------------------------------------------


@dataclass(frozen=True)
class ResponseRequest:
    """One Responses API call; ``input`` items and ``tools`` are in the API's own shape."""

    input: list[dict[str, Any]]
    instructions: str
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    store: bool = True


class AgentClient:
    """Streams Responses API answers over one pooled httpx.AsyncClient.

    Resource handling: ``stream()`` holds one upstream HTTP response for the
    duration of its ``async with``; leaving it (normally, by exception or by
    cancellation) closes that response, and with it the TCP connection unless
    the response was read to its end. ``aclose()`` closes the pool.

    Error handling: everything the upstream can do wrong surfaces as an
    UpstreamError subclass (see the module docstring); transport and decoding
    exceptions from httpx never escape ``stream()``.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        model: str,
        transport: httpx.AsyncBaseTransport | None = None,
        max_attempts: int = 3,
        backoff_base_s: float = 0.25,
        retry_after_cap_s: float = 20.0,
        connect_timeout_s: float = 10.0,
        idle_timeout_s: float = 60.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._url = base_url.rstrip("/") + "/responses"
        self._api_key = api_key
        self._model = model
        self._max_attempts = max_attempts
        self._backoff_base_s = backoff_base_s
        self._retry_after_cap_s = retry_after_cap_s
        self._idle_timeout_s = idle_timeout_s
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # Every live turn holds a connection for its whole stream, so the pool must
        # not cap concurrency; idle ones are kept for TLS reuse.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        # One TLS context for every transport: each load of the CA bundle takes ~50 ms.
        tls = httpx.create_ssl_context()
        self._http = httpx.AsyncClient(
            transport=transport,
            # A mount, not `transport=`: httpx then still honours proxy variables
            # (HTTPS_PROXY...), whose more specific mounts win over this one.
            mounts=None if transport else {"all://": _LeanReadTransport(tls, limits)},
            verify=tls,
            headers=headers,
            # No read timeout: httpx would time-box every read of the body, a cancel
            # scope per SSE event. Silence is bounded per response (`_silence_scope`).
            timeout=httpx.Timeout(
                connect=connect_timeout_s,
                read=None,
                write=connect_timeout_s,
                pool=connect_timeout_s,
            ),
            limits=limits,
        )

    async def aclose(self) -> None:
        """Close every pooled upstream connection."""
        await self._http.aclose()

    @asynccontextmanager
    async def stream(self, request: ResponseRequest) -> AsyncIterator[AsyncIterator[AgentEvent]]:
        """Start one streamed response; ``async with client.stream(req) as events``.

        Entering sends the request and reads up to the first event that carries
        something for the user (text, a tool call, or the end). Until then every
        failure that is safe to repeat is retried, ``max_attempts`` tries in all,
        with exponential backoff and jitter (Retry-After honoured up to
        ``retry_after_cap_s``): connect errors, 5xx, 429, and a connection that
        breaks before that first event. Raises UpstreamUnavailable or
        UpstreamDisconnected when the tries run out, UpstreamRejected (or
        PreviousResponseNotFound) for other 4xx, UpstreamProtocolError for a
        success that is not an event stream, UpstreamTimeout after
        ``idle_timeout_s`` of silence.

        Iterating yields our events and ends after the terminal one. Raises
        UpstreamTimeout after ``idle_timeout_s`` of silence, UpstreamDisconnected if
        the connection breaks (no longer retried: the user has seen part of the
        answer), UpstreamProtocolError for undecodable or oversized events or a
        stream that ends with no terminal event.
        """
        payload = self._payload(request)
        for attempt in range(1, self._max_attempts + 1):
            silence = self._silence_scope()
            with silence:
                try:
                    response, events, opening = await self._open(payload, silence)
                except _Retryable as retryable:
                    if attempt == self._max_attempts:
                        raise retryable.failure from retryable.__cause__
                    retry = retryable
                else:
                    try:
                        async with aclosing(events):
                            yield _Resumed(opening, events)
                    finally:
                        # httpcore shields this close from cancellation, so a cancelled
                        # turn still drops the upstream connection here, not at garbage
                        # collection.
                        await _close_response(response)
                    return
            if silence.cancelled_caught:
                raise UpstreamTimeout(
                    f"upstream sent nothing for {self._idle_timeout_s:g} s"
                )
            await self._wait_before_retry(attempt, retry.failure, retry.retry_after_s)

    def _silence_scope(self) -> trio.CancelScope:
        """The scope one upstream response lives in: it is cancelled once the upstream
        sends no bytes for idle_timeout_s (before the headers, or between chunks; in
        the body, up to an eighth more). Chunks push its deadline (`_events`): one
        scope per response instead of one per read."""
        return trio.CancelScope(deadline=trio.current_time() + self._idle_timeout_s)

    async def _open(
        self, payload: dict[str, Any], silence: trio.CancelScope
    ) -> tuple[httpx.Response, AsyncGenerator[AgentEvent, None], list[AgentEvent]]:
        """Send the request and read its opening events (up to and including the first
        text, tool call or terminal event). Raises _Retryable for what may be tried
        again, the public errors for the rest."""
        response = await self._send(payload)
        events = self._events(response, silence)
        opening: list[AgentEvent] = []
        try:
            async for event in events:
                opening.append(event)
                if not isinstance(event, ResponseStarted):
                    break
        except UpstreamDisconnected as failure:
            await events.aclose()
            await _close_response(response)
            raise _Retryable(failure) from failure
        except BaseException:
            await events.aclose()
            await _close_response(response)
            raise
        return response, events, opening

    async def _send(self, payload: dict[str, Any]) -> httpx.Response:
        """POST the request; the response once it is a 200 event stream."""
        try:
            response = await self._http.send(
                self._http.build_request("POST", self._url, json=payload), stream=True
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Retryable(
                UpstreamUnavailable(
                    f"cannot connect to the upstream: {self._describe(exc)}", kind="connect"
                )
            ) from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("upstream sent no response in time") from exc
        except httpx.TransportError as exc:
            raise _Retryable(
                UpstreamDisconnected(f"upstream connection failed: {self._describe(exc)}")
            ) from exc

        status = response.status_code
        if status == 429 or status >= 500:
            try:
                detail = await self._error_detail(response)
            finally:
                await _close_response(response)
            raise _Retryable(
                UpstreamUnavailable(
                    f"upstream answered HTTP {status}: {detail[1]}",
                    kind="rate_limited" if status == 429 else "server_error",
                    status_code=status,
                ),
                retry_after_s=_retry_after_s(response.headers),
            )
        if status >= 300:
            try:
                code, message = await self._error_detail(response)
            finally:
                await _close_response(response)
            cls = UpstreamRejected
            if status in (400, 404) and (
                code == "previous_response_not_found" or _PREVIOUS_NOT_FOUND_RE.search(message)
            ):
                cls = PreviousResponseNotFound
            raise cls(
                f"upstream rejected the request with HTTP {status}: {message}",
                status_code=status,
                code=code,
            )
        content_type = response.headers.get("content-type", "")
        if content_type.partition(";")[0].strip().lower() != "text/event-stream":
            await _close_response(response)
            raise UpstreamProtocolError(
                f"upstream answered HTTP {status} with {content_type or 'no content-type'!r},"
                " not text/event-stream"
            )
        return response

    def _payload(self, request: ResponseRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self._model,
            "input": request.input,
            "instructions": request.instructions,
            "stream": True,
            "store": request.store,
        }
        if request.previous_response_id is not None:
            payload["previous_response_id"] = request.previous_response_id
        if request.tools:
            payload["tools"] = request.tools
        return payload

    async def _wait_before_retry(
        self, attempt: int, failure: UpstreamError, retry_after_s: float | None
    ) -> None:
        if retry_after_s is not None:
            delay_s = min(retry_after_s, self._retry_after_cap_s)
        else:
            # Full jitter spreads out the retries of many turns hit by one outage.
            ceiling_s = min(self._backoff_base_s * 2 ** (attempt - 1), self._retry_after_cap_s)
            delay_s = random.uniform(ceiling_s / 2, ceiling_s)
        logger.warning(
            "upstream attempt %d/%d failed (%s); retrying in %.2fs",
            attempt,
            self._max_attempts,
            failure,
            delay_s,
        )
        await trio.sleep(delay_s)

    async def _error_detail(self, response: httpx.Response) -> tuple[str | None, str]:
        """(error.code, redacted message) from a bounded read of an error body."""
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= MAX_ERROR_BODY_BYTES:
                    break
        except httpx.HTTPError:
            pass  # the status code alone still tells the caller what happened
        text = bytes(body[:MAX_ERROR_BODY_BYTES]).decode("utf-8", errors="replace")
        code: str | None = None
        message = text.strip()[:500] or response.reason_phrase
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            error = parsed.get("error")
            if isinstance(error, dict):
                code = _str_or_none(error.get("code")) or _str_or_none(error.get("type"))
                message = _str_or_none(error.get("message")) or message
        return code, _redact(message, self._api_key)

    def _describe(self, exc: Exception) -> str:
        return _redact(f"{type(exc).__name__}: {exc}", self._api_key)

    async def _events(
        self, response: httpx.Response, silence: trio.CancelScope
    ) -> AsyncGenerator[AgentEvent, None]:
        chunks = _body_chunks(response)
        # The silence deadline moves at most once per slack_s (moving it costs more than
        # an SSE event): silence is still allowed idle_timeout_s, and at most slack_s more.
        slack_s = self._idle_timeout_s / 8
        push_at = trio.current_time()
        parser = SSEParser(MAX_SSE_EVENT_BYTES)
        response_id: str | None = None
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    now = trio.current_time()
                    if now >= push_at:
                        silence.deadline = now + self._idle_timeout_s + slack_s
                        push_at = now + slack_s
                    # Text deltas that arrived together go on as one (the same text):
                    # under a burst, one frame and one write per network read.
                    together: list[TextDelta] = []
                    for data in parser.feed(chunk):
                        event = decode_event(data)
                        if isinstance(event, TextDelta):
                            together.append(event)
                            continue
                        if together:
                            yield _joined(together)
                            together.clear()
                        if isinstance(event, ResponseStarted):
                            response_id = event.response_id
                        elif isinstance(event, _TERMINAL):
                            # The error event carries no response id; we know it by now.
                            if event.response_id is None:
                                event = replace(event, response_id=response_id)
                            yield event
                            await _finish_body(chunks)
                            return
                        if event is not None:
                            yield event
                    if together:
                        yield _joined(together)
        except httpx.TransportError as exc:
            raise UpstreamDisconnected(
                f"upstream connection broke mid-stream: {self._describe(exc)}"
            ) from exc
        except httpx.DecodingError as exc:
            raise UpstreamProtocolError(
                f"upstream body could not be decoded: {self._describe(exc)}"
            ) from exc
        raise UpstreamProtocolError("upstream stream ended without a terminal event")


def _body_chunks(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """The body of a streamed response, chunk by chunk: a plain chunked body on our own
    connection is read by `_tapped_body`, anything else through httpx."""
    stream = response.extensions.get("network_stream")
    if isinstance(stream, _LeanReadStream):
        opening = stream.take_body()  # ends head mode, whoever reads the body
        if _is_plain_chunked(response):
            return _tapped_body(response, stream, opening)
        stream.give_back(opening)  # httpx reads it, from the first byte past the head
    # aiter_bytes() is an async generator (typed as a plain iterator); the caller
    # closes it, so nothing is left for the garbage collector.
    return cast(AsyncGenerator[bytes, None], response.aiter_bytes())


def _is_plain_chunked(response: httpx.Response) -> bool:
    """Chunked coding (the only transfer coding h11 knows) and no content coding."""
    headers = response.headers
    return (
        response.http_version == "HTTP/1.1"
        and headers.get("transfer-encoding", "").strip().lower() == "chunked"
        and headers.get("content-encoding", "identity").strip().lower() in ("", "identity")
    )


async def _tapped_body(
    response: httpx.Response, stream: _LeanReadStream, opening: bytes
) -> AsyncGenerator[bytes, None]:
    """A chunked body decoded here, one payload per network read: httpx, httpcore and
    h11 would pass each read through five async generators and two h11 events, which
    cost more than the SSE event it carries (bench/README.md). The end of the message
    goes back to httpcore to read, so the connection is released to the pool as usual.
    Raises httpx.ReadError or RemoteProtocolError for a broken or closed connection
    (as httpx would), UpstreamProtocolError for framing that is not chunked coding."""
    decoder = ChunkedBodyDecoder()
    raw = opening
    while True:
        payload = decoder.feed(raw)
        if payload:
            yield payload
        if decoder.done:
            break
        if decoder.failed:
            raw = b""  # the next feed raises
            continue
        try:
            raw = await stream.read(LEAN_READ_BYTES)
        except httpcore.NetworkError as exc:
            raise httpx.ReadError(str(exc)) from exc
        if not raw:
            raise httpx.RemoteProtocolError("upstream closed the connection inside a chunked body")
    stream.give_back(decoder.rest)
    await response.aread()  # nothing but the end of the message is left


def _joined(deltas: list[TextDelta]) -> TextDelta:
    return deltas[0] if len(deltas) == 1 else TextDelta("".join(d.text for d in deltas))


async def _close_response(response: httpx.Response) -> None:
    """Close `response` and break the reference cycle httpx keeps between a response and
    its body stream, so that the whole connection's objects are freed at once by
    reference counting. Left to the garbage collector they wait for a full collection,
    whose pause grows with every object of every open WebSocket (bench/README.md)."""
    try:
        await response.aclose()
    finally:
        response.stream = _CLOSED_BODY


_CLOSED_BODY = httpx.ByteStream(b"")


class _Resumed:
    """The events a stream opened with (read while deciding whether to retry), then
    the rest of the stream. A class, not an async generator: one call per event."""

    def __init__(self, opening: list[AgentEvent], rest: AsyncIterator[AgentEvent]) -> None:
        self._opening = opening
        self._rest = rest

    def __aiter__(self) -> _Resumed:
        return self

    async def __anext__(self) -> AgentEvent:
        if self._opening:
            return self._opening.pop(0)
        return await anext(self._rest)


async def _finish_body(chunks: AsyncIterator[bytes]) -> None:
    """Read what follows the terminal event (normally just the end of the chunked
    body), briefly: a fully read response goes back to httpx's pool, so the next turn
    skips a TCP and TLS handshake. Whatever goes wrong here, the answer is complete."""
    with trio.move_on_after(BODY_DRAIN_TIMEOUT_S):
        try:
            drained = 0
            async for chunk in chunks:
                drained += len(chunk)
                if drained > MAX_ERROR_BODY_BYTES:
                    return
        except (httpx.HTTPError, UpstreamProtocolError):  # broken framing: connection dropped
            return


# --- synthetic streams: the demo model and the test fake share these ----------


def encode_sse(event: Mapping[str, Any]) -> bytes:
    """Frame one event the way the real upstream does: ``event:`` line, compact JSON."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def text_response_events(
    response_id: str, model: str, text_chunks: list[str], *, created_at: int = 0
) -> list[dict[str, Any]]:
    """The full event sequence of a one-message text answer, shaped like the recordings.

    Pure: ids derive from ``response_id``; pass ``created_at`` for a real timestamp.
    """
    item_id = "msg_" + response_id.removeprefix("resp_")
    text = "".join(text_chunks)
    part_done = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    item_done = {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "content": [part_done],
        "role": "assistant",
    }
    place = {"item_id": item_id, "output_index": 0, "content_index": 0}

    def response(status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": response_id,
            "object": "response",
            "created_at": created_at,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "model": model,
            "output": output,
            "previous_response_id": None,
            "store": True,
            "usage": None
            if status == "in_progress"
            else {"input_tokens": 0, "output_tokens": len(text_chunks)},
        }

    bodies: list[dict[str, Any]] = [
        {"type": "response.created", "response": response("in_progress", [])},
        {"type": "response.in_progress", "response": response("in_progress", [])},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item_done, "status": "in_progress", "content": []},
        },
        {"type": "response.content_part.added", **place, "part": {**part_done, "text": ""}},
        *(
            {"type": "response.output_text.delta", **place, "delta": chunk, "logprobs": []}
            for chunk in text_chunks
        ),
        {"type": "response.output_text.done", **place, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **place, "part": part_done},
        {"type": "response.output_item.done", "output_index": 0, "item": item_done},
        {"type": "response.completed", "response": response("completed", [item_done])},
    ]
    return [
        {"type": body["type"], "sequence_number": number, **body}
        for number, body in enumerate(bodies)
    ]


def last_user_text(items: object) -> str:
    """Text of the last user message in a Responses API ``input`` (string or items)."""
    if isinstance(items, str):
        return items
    if not isinstance(items, list):
        return ""
    for item in reversed(items):
        if not isinstance(item, dict) or item.get("role") != "user":
            continue
        content = item.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(
                part["text"]
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return ""


class _PacedSSEStream(httpx.AsyncByteStream):
    """Encodes events on demand, pausing before each text delta.

    An iterator object rather than an async generator, so a reader that stops
    early (a stopped turn) leaves nothing for trio's garbage-collection warning.
    """

    def __init__(self, events: list[dict[str, Any]], word_interval_s: float) -> None:
        self._events = iter(events)
        self._word_interval_s = word_interval_s

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        event = next(self._events, None)
        if event is None:
            raise StopAsyncIteration
        if event["type"] == "response.output_text.delta":
            await trio.sleep(self._word_interval_s)
        return encode_sse(event)


class DemoModelTransport(httpx.AsyncBaseTransport):
    """Offline demo model for running the server without an API key.

    Answers ``POST .../responses`` with a streamed, correctly shaped Responses
    API text answer that echoes the last user message and says it is a demo.
    Anything else gets a 404 JSON error, as the real API would.
    """

    def __init__(self, *, word_interval_s: float = DEMO_WORD_INTERVAL_S) -> None:
        self._word_interval_s = word_interval_s

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST" or not request.url.path.endswith("/responses"):
            return httpx.Response(
                404, json={"error": {"code": "not_found", "message": "demo model: no such route"}}
            )
        try:
            body = json.loads(await request.aread())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return httpx.Response(
                400, json={"error": {"code": "invalid_json", "message": "body is not JSON"}}
            )
        said = last_user_text(body.get("input")).strip() or "(nothing)"
        if len(said) > 200:
            said = said[:200] + "…"
        text = (
            f"**(offline demo model)** You said: «{said}».\n\n"
            "Set `OPENAI_API_KEY` or `--upstream-url` to talk to a *real* model."
        )
        events = text_response_events(
            f"resp_demo_{secrets.token_hex(12)}",
            str(body.get("model", "demo")),
            re.findall(r"\s*\S+", text),
            created_at=int(time.time()),
        )
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=_PacedSSEStream(events, self._word_interval_s),
        )
