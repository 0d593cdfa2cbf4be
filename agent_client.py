"""Upstream model client: one streamed OpenAI Responses API call per turn.

This module owns the Responses API: building the ``POST {base_url}/responses``
request (``ResponseRequest``) and its input items (``input_items``: the stored
history, tool calls and their outputs in the API's shape; the ``TOOL_*_OUTPUT``
texts; ``parse_arguments``), retrying what is safe to retry, reading the body
within its bounds, mapping upstream events to the small event set below, and closing
the upstream connection the moment the caller leaves the stream's context.

Its neighbours own the byte-level rest:

- ``chat.content_coding`` (``ContentDecoder``) and ``chat.sse`` (``SSEParser``): the
  body's content coding undone in bounded pieces, then its events framed; both pure,
  their errors become UpstreamProtocolError here, in one place (``_events``);
- ``chat.upstream_transport``: the only code beneath httpx (lean reads on plain TCP
  and on TLS through the stdlib's SSLSocket, and a chunked body decoded off httpx's
  pooled connection;
  ``AgentClient(lean_reads=False)`` uses plain httpx instead, and
  ``AgentClient.lean_reads_active`` says whether it applies);
- ``chat.demo_model``: the offline demo model and the synthetic streams the fakes
  reuse (``DemoModelTransport``, ``encode_sse``, ``text_response_events``,
  ``last_user_text``).

Our events (frozen dataclasses)::

    ResponseStarted  response.created: the upstream response id, known early, and
                     the previous_response_id its response object echoes
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
    |       |                           the full history without it
    |       +-- PreviousResponseIgnored a 200 that does not honour previous_response_id
    |                                   (see "Chaining" below); same remedy
    +-- UpstreamProtocolError       "protocol": not SSE, not JSON (or nested too deeply
    |                               to decode), oversized event, broken chunked framing,
    |                               a content coding we cannot undo or that inflates
    |                               past MAX_INFLATED_BODY_BYTES, stream ended with no
    |                               terminal event
    +-- UpstreamTimeout             "timeout": no bytes for idle_timeout_s

Messages are for humans and never contain the API key: upstream error text is
passed through ``_redact`` before it lands in an exception.

Chaining. OpenAI echoes a request's ``previous_response_id`` in the response object of
``response.created``; some proxies (one popular one, run without its database) accept the
field, answer 200 and silently drop the chain, so the model sees none of the earlier turns.
A chained request is therefore checked at its first event: unless it is a
``response.created`` echoing the id we sent (or an error event, which carries no answer), the
response is closed at once, before any of it reaches the user, and PreviousResponseIgnored
raised. A stream with no ``response.created`` before its first content event counts as not
echoing: a chain we cannot verify is not trusted. From then on the client chains no more
(``chaining_active`` is False, one WARNING says so): a chained request raises
PreviousResponseIgnored without being sent, and callers send the full history instead.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import httpx
import trio

from chat.content_coding import (
    DECODE_PIECE_BYTES,
    ContentCodingError,
    ContentDecoder,
    content_coding,
)
from chat.sse import SSEEventTooLarge, SSEParser
from chat.upstream_tls import client_context
from chat.upstream_transport import (
    BodyFramingError,
    body_chunks,
    close_response,
    lean_read_transport,
)

logger = logging.getLogger(__name__)

# response.completed repeats the instructions, the tools and the whole output, so it
# is the largest event a healthy stream sends; a 128k-token answer is ~0.5 MiB of
# text. Anything past this is a broken or hostile upstream, and we refuse to buffer it.
MAX_SSE_EVENT_BYTES = 4 * 1024 * 1024
# Error bodies are short JSON; we only need error.code and error.message from them.
MAX_ERROR_BODY_BYTES = 64 * 1024
# After the terminal event, the rest of the body is read for this long at most.
BODY_DRAIN_TIMEOUT_S = 0.05
# We ask for identity (SSE is not worth compressing), but an upstream may compress
# anyway. A whole answer, events and all, is a few MiB; a compressed body that inflates
# past this is a bomb (525 KB of gzip inflated to 512 MiB froze the server for 57 s).
MAX_INFLATED_BODY_BYTES = 64 * 1024 * 1024

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


class PreviousResponseIgnored(PreviousResponseNotFound):
    """A chained request was answered 200 without echoing ``previous_response_id`` (the
    upstream ignores chaining), or was not sent because the client chains no more
    (``AgentClient.chaining_active``). Nothing of it reached the caller's events; resend
    the full history. ``status_code`` is 200, ``code`` None."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=200, code=None)


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
    # What the response object says it continues; None when null or absent.
    previous_response_id: str | None = None


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
    Raises UpstreamProtocolError if ``data`` is not a JSON object (nested too deeply
    to decode counts as not JSON), or if an event we use lacks the field that carries
    its meaning (a delta without text).
    """
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise UpstreamProtocolError(f"upstream event is not JSON: {_excerpt(data)}") from exc
    except RecursionError as exc:  # not a ValueError: json gives up past ~1,000 levels
        raise UpstreamProtocolError(
            f"upstream event is JSON nested too deeply: {_excerpt(data)}"
        ) from exc
    if not isinstance(event, dict):
        raise UpstreamProtocolError(f"upstream event is not a JSON object: {_excerpt(data)}")
    kind = event.get("type")
    if kind == "response.created":
        response = _response(event)
        response_id = response.get("id")
        if not isinstance(response_id, str):
            raise UpstreamProtocolError("response.created without a response id")
        return ResponseStarted(response_id, _str_or_none(response.get("previous_response_id")))
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


# --- request building: input items and tool outputs ----------------------------

# What the model is told in place of a tool's answer (as function_call_output).
TOOL_TIMEOUT_OUTPUT = "Error: the tool did not answer in time (timed out). Continue without it."
TOOL_CANCELLED_OUTPUT = "Error: the turn ended before the tool answered."
TOOL_BAD_ARGUMENTS_OUTPUT = "Error: the arguments were not a valid JSON object; call again."


class HistoryRow(Protocol):
    """A stored history message as ``input_items`` reads it (``store.StoredMessage``).
    Tool rows (role "tool") carry name, call_id, arguments (JSON text) and output."""

    @property
    def role(self) -> str: ...
    @property
    def content(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def call_id(self) -> str | None: ...
    @property
    def arguments(self) -> str | None: ...
    @property
    def output(self) -> str | None: ...


def parse_arguments(arguments: str) -> dict[str, Any] | None:
    """A function call's arguments as an object (empty text: an empty one); None when
    they are not a JSON object, including JSON nested too deeply to decode."""
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except (ValueError, RecursionError):  # RecursionError is not a ValueError
        return None
    return parsed if isinstance(parsed, dict) else None


def assistant_item(text: str) -> dict[str, Any]:
    """An assistant message input item (text the model said earlier)."""
    return {"role": "assistant", "content": text}


def function_call_item(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """A function_call input item: a call the model made, arguments as JSON text."""
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments}


def function_output_item(call_id: str, output: str) -> dict[str, Any]:
    """The function_call_output input item answering the call ``call_id``."""
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def input_items(messages: Iterable[HistoryRow]) -> list[dict[str, Any]]:
    """Stored history as Responses API input items. A tool row becomes its call and its
    output (every stored call has one), so the upstream never sees a dangling call."""
    items: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "user":
            items.append({"role": "user", "content": message.content})
        elif message.role == "assistant":
            if message.content:
                items.append(assistant_item(message.content))
        elif message.call_id and message.name is not None:
            items.append(
                function_call_item(message.call_id, message.name, message.arguments or "{}")
            )
            items.append(function_output_item(message.call_id, message.output or ""))
    return items


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

    ``lean_reads`` (default on) lets ``chat.upstream_transport`` read the upstream's
    bodies beneath httpx where it applies (``lean_reads_active``: an HTTP or HTTPS
    upstream without a proxy, its self-check passed; a WARNING says why when it does
    not) and
    close responses without leaving a reference cycle. Off, everything is plain
    httpx. A ``transport`` of the caller's (the demo model, a mock) is used as given.

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
        lean_reads: bool = True,
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
        self._lean_reads = lean_reads
        self._chaining_active = True  # until the upstream is seen to ignore the chain
        # identity: SSE is not worth compressing, and an inflated body costs event-loop
        # time that a plain one does not (a bomb froze the server; MAX_INFLATED_BODY_BYTES).
        headers = {
            "Accept": "text/event-stream",
            "Accept-Encoding": "identity",
            "Cache-Control": "no-store",
        }
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # Every live turn holds a connection for its whole stream, so the pool must
        # not cap concurrency; idle ones are kept for TLS reuse.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        # One TLS context for every transport: each load of the CA bundle takes ~50 ms,
        # so it is read after the server listens, not here (chat.upstream_tls).
        tls = client_context()
        lean = None
        if lean_reads and transport is None:
            lean = lean_read_transport(self._url, tls, limits)
        self._lean_reads_active = lean is not None
        self._http = httpx.AsyncClient(
            transport=transport,
            # A mount, not `transport=`: httpx then still honours proxy variables
            # (HTTPS_PROXY...), whose more specific mounts win over this one.
            mounts=None if lean is None else {"all://": lean},
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

    @property
    def lean_reads_active(self) -> bool:
        """Whether upstream bodies are read beneath httpx (``chat.upstream_transport``):
        False when ``lean_reads`` is off, with a transport of the caller's, for an
        upstream behind a proxy, and when the self-check of its assumptions failed on
        the installed libraries."""
        return self._lean_reads_active

    @property
    def chaining_active(self) -> bool:
        """Whether requests may chain with ``previous_response_id``: True until a chained
        request was answered without the echo (module docstring, "Chaining"), then False
        for the life of this client. Callers send the full history while it is False."""
        return self._chaining_active

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
        ``idle_timeout_s`` of silence. A chained request raises PreviousResponseIgnored
        when its response does not echo the chain (closed before anything is yielded),
        or at once, unsent, once ``chaining_active`` is False.

        Iterating yields our events and ends after the terminal one. Raises
        UpstreamTimeout after ``idle_timeout_s`` of silence, UpstreamDisconnected if
        the connection breaks (no longer retried: the user has seen part of the
        answer), UpstreamProtocolError for undecodable or oversized events or a
        stream that ends with no terminal event.
        """
        if request.previous_response_id is not None and not self._chaining_active:
            # Built before another turn found the chain ignored: not worth a round trip.
            raise PreviousResponseIgnored(
                "this upstream ignores previous_response_id; send the full history"
            )
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
                        await self._close(response)
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
        again, PreviousResponseIgnored for a chain the response does not echo, the
        public errors for the rest."""
        response = await self._send(payload)
        events = self._events(response, silence)
        opening: list[AgentEvent] = []
        chained_to = payload.get("previous_response_id")
        try:
            async for event in events:
                if chained_to is not None and not opening:
                    self._check_chain(chained_to, event)
                opening.append(event)
                if not isinstance(event, ResponseStarted):
                    break
        except UpstreamDisconnected as failure:
            await events.aclose()
            await self._close(response)
            raise _Retryable(failure) from failure
        except BaseException:
            await events.aclose()
            await self._close(response)
            raise
        return response, events, opening

    def _check_chain(self, chained_to: str, first: AgentEvent) -> None:
        """Raise PreviousResponseIgnored unless ``first``, a chained response's first
        event, shows the upstream honoured the chain: a response.created echoing
        ``chained_to``, or an error (no answer, nothing to verify). The first time,
        chaining stops for this client's lifetime, with one WARNING."""
        if isinstance(first, Failed):
            return
        if isinstance(first, ResponseStarted) and first.previous_response_id == chained_to:
            return
        if self._chaining_active:
            self._chaining_active = False
            # No ids, no URL: the id may be long and opaque, and the URL may carry credentials.
            logger.warning(
                "upstream ignores previous_response_id (%s): every request now sends the"
                " full history, for the life of this process",
                "response.created did not echo it"
                if isinstance(first, ResponseStarted)
                else "no response.created before the answer",
            )
        raise PreviousResponseIgnored(
            "upstream answered a chained request without echoing previous_response_id"
        )

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
                await self._close(response)
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
                await self._close(response)
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
            await self._close(response)
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
        text = (await self._error_body(response)).decode("utf-8", errors="replace")
        code: str | None = None
        message = text.strip()[:500] or response.reason_phrase
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            parsed = None
        if isinstance(parsed, dict):
            error = parsed.get("error")
            if isinstance(error, dict):
                code = _str_or_none(error.get("code")) or _str_or_none(error.get("type"))
                message = _str_or_none(error.get("message")) or message
        return code, _redact(message, self._api_key)

    async def _error_body(self, response: httpx.Response) -> bytes:
        """Up to MAX_ERROR_BODY_BYTES of an error body, its content coding undone; what
        arrived before a failure (the status code alone still says what happened)."""
        body = bytearray()
        try:
            decoder = ContentDecoder(
                content_coding(response.headers), max_bytes=MAX_INFLATED_BODY_BYTES
            )
            async with aclosing(self._raw_body(response)) as chunks:
                async for chunk in chunks:
                    for piece in decoder.feed(chunk):  # made one by one: stops with us
                        body += piece
                        if len(body) >= MAX_ERROR_BODY_BYTES:
                            return bytes(body[:MAX_ERROR_BODY_BYTES])
        except (httpx.HTTPError, BodyFramingError, ContentCodingError):
            pass
        return bytes(body)

    def _raw_body(self, response: httpx.Response) -> AsyncGenerator[bytes, None]:
        """The body as it came: transfer coding removed, content coding kept."""
        if self._lean_reads_active:
            return body_chunks(response)
        # aiter_raw() is an async generator (typed as a plain iterator); the caller
        # closes it, so nothing is left for the garbage collector.
        return cast(AsyncGenerator[bytes, None], response.aiter_raw())

    async def _close(self, response: httpx.Response) -> None:
        """Close ``response``; unless lean_reads is off, without leaving httpx's reference
        cycle for the garbage collector (``close_response``)."""
        if self._lean_reads:
            await close_response(response)
        else:
            await response.aclose()

    def _describe(self, exc: Exception) -> str:
        return _redact(f"{type(exc).__name__}: {exc}", self._api_key)

    async def _events(
        self, response: httpx.Response, silence: trio.CancelScope
    ) -> AsyncGenerator[AgentEvent, None]:
        # The silence deadline moves at most once per slack_s (moving it costs more than
        # an SSE event): silence is still allowed idle_timeout_s, and at most slack_s more.
        slack_s = self._idle_timeout_s / 8
        push_at = trio.current_time()
        parser = SSEParser(MAX_SSE_EVENT_BYTES)
        response_id: str | None = None
        try:
            # Before the body is touched: a content coding we cannot undo fails here.
            decoder = ContentDecoder(
                content_coding(response.headers), max_bytes=MAX_INFLATED_BODY_BYTES
            )
            identity = decoder.coding == "identity"
            async with aclosing(self._raw_body(response)) as chunks:
                async for chunk in chunks:
                    now = trio.current_time()
                    if now >= push_at:
                        silence.deadline = now + self._idle_timeout_s + slack_s
                        push_at = now + slack_s
                    # The usual read is one piece. A larger or compressed one is decoded
                    # and parsed piece by piece, the event loop's other tasks run between
                    # pieces: no one read holds the loop, whatever it inflates to.
                    pieces: Iterable[bytes] = (
                        (chunk,)
                        if identity and len(chunk) <= DECODE_PIECE_BYTES
                        else decoder.feed(chunk)
                    )
                    later = False
                    for piece in pieces:
                        if later:
                            await trio.lowlevel.checkpoint()
                        later = True
                        # Text deltas that arrived together go on as one (the same text):
                        # under a burst, one frame and one write per network read.
                        together: list[TextDelta] = []
                        for data in parser.feed(piece):
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
                                # The error event carries no response id; we know it now.
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
        except BodyFramingError as exc:
            raise UpstreamProtocolError(_redact(str(exc), self._api_key)) from exc
        except (ContentCodingError, SSEEventTooLarge) as exc:
            # The one place a body we cannot decode becomes our callers' error.
            raise UpstreamProtocolError(f"upstream {exc}") from exc
        raise UpstreamProtocolError("upstream stream ended without a terminal event")


def _joined(deltas: list[TextDelta]) -> TextDelta:
    return deltas[0] if len(deltas) == 1 else TextDelta("".join(d.text for d in deltas))


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
    body), briefly and without decoding it: a fully read response goes back to httpx's
    pool, so the next turn skips a TCP and TLS handshake. Whatever goes wrong here,
    the answer is complete."""
    with trio.move_on_after(BODY_DRAIN_TIMEOUT_S):
        try:
            drained = 0
            async for chunk in chunks:
                drained += len(chunk)
                if drained > MAX_ERROR_BODY_BYTES:
                    return
        except (httpx.HTTPError, BodyFramingError):  # broken framing: connection dropped
            return
