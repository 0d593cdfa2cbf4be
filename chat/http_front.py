"""The HTTP front: request heads, answers written through h11, the fixed routes of
the bundled page, and where a WebSocket upgrade finds its session id and token.

Resource handling: nothing here holds a connection; the server's per-stream
handler owns the stream and closes it. Every read is bounded in size
(MAX_REQUEST_HEAD_BYTES, MAX_REQUEST_BODY_BYTES) and every write in time
(SEND_TIMEOUT_S); the caller bounds the time a head may take to arrive.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from chat.settings import SEND_TIMEOUT_S

MAX_REQUEST_HEAD_BYTES = 16 * 1024
# A Sessions API body is a title at most: anything larger is refused with 413.
MAX_REQUEST_BODY_BYTES = 16 * 1024
_RELEASED = h11.Connection(h11.SERVER)


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_answer(status: int, document: Any) -> HttpAnswer:
    return HttpAnswer(status, json.dumps(document, ensure_ascii=False).encode())


def error_answer(status: int, code: str, message: str) -> HttpAnswer:
    return json_answer(status, {"error": {"code": code, "message": message}})


NOT_FOUND = error_answer(404, "not_found", "not found")
HttpRoute = Callable[[], Awaitable[HttpAnswer]]


@dataclass
class RequestHead:
    """A request head and the bytes it came in (trio-websocket must read them again)."""

    method: str
    target: str
    headers: dict[str, str]
    raw: bytes = b""
    # The parser that read it: answers are written through it, so they are HTTP/1.1
    # as h11 writes it (framing, HEAD without a body).
    parser: h11.Connection = field(
        default_factory=lambda: h11.Connection(h11.SERVER), repr=False
    )

    def release(self) -> None:
        """Drop the bytes and headers once admission has used them: the frames that
        hold this object stay alive as long as the connection, often for hours."""
        self.raw = b""
        self.headers = {}
        self.parser = _RELEASED
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


async def read_request_head(stream: trio.abc.Stream) -> RequestHead | None:
    """Read until a full request head. Returns it (with every byte read, `raw`), or None
    if the peer closed or sent something that is not HTTP/1.1 or is too large (a head
    over MAX_REQUEST_HEAD_BYTES is answered 431 first)."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
    raw = bytearray()
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                # A head over the limit (a huge cookie or token): say why before closing.
                await _send_answer(
                    stream,
                    parser,
                    error_answer(431, "head_too_large", "request head too large"),
                    with_body=True,
                )
            return None
        if isinstance(event, h11.Request):
            headers = {
                name.decode("latin-1").lower(): value.decode("latin-1")
                for name, value in event.headers
            }
            return RequestHead(
                event.method.decode(),
                event.target.decode("latin-1"),
                headers,
                bytes(raw),
                parser,
            )
        if event is not h11.NEED_DATA:
            return None
        data = bytes(await stream.receive_some(4096))
        if not data:
            return None
        raw += data
        parser.receive_data(data)


async def read_body(stream: trio.abc.Stream, head: RequestHead) -> bytes | None:
    """The request's body, or None if it is over MAX_REQUEST_BODY_BYTES, malformed, or
    the peer left. The caller bounds the time."""
    body = bytearray()
    parser = head.parser
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError:
            return None
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST_BODY_BYTES:
                return None
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        elif event is h11.NEED_DATA:
            data = bytes(await stream.receive_some(4096))
            if not data:
                return None
            parser.receive_data(data)
        else:
            return None


async def answer_http(stream: trio.abc.Stream, head: RequestHead, answer: HttpAnswer) -> None:
    """Write one whole answer (no body for HEAD), then the connection is done."""
    await _send_answer(stream, head.parser, answer, with_body=head.method != "HEAD")


async def _send_answer(
    stream: trio.abc.Stream, parser: h11.Connection, answer: HttpAnswer, *, with_body: bool
) -> None:
    headers = [
        ("content-type", answer.content_type),
        ("content-length", str(len(answer.body))),
        ("cache-control", "no-store"),
        ("connection", "close"),
        *answer.headers,
    ]
    try:
        reason = HTTPStatus(answer.status).phrase.encode()
        response = h11.Response(status_code=answer.status, headers=headers, reason=reason)
        data = parser.send(response) or b""
        if with_body and answer.body:
            data += parser.send(h11.Data(data=answer.body)) or b""
        data += parser.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:
        return  # the request was not one we can answer (h11 refused): just close
    with trio.move_on_after(SEND_TIMEOUT_S):
        await stream.send_all(data)


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
    return Path(bundle or Path(__file__).resolve().parent.parent) / "web"


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
        answer = HttpAnswer(200, path.read_bytes(), content_type)
        route = _fixed_answer(answer)
        routes["/web/" + path.relative_to(root).as_posix()] = route
        if path == root / "index.html":
            routes["/"] = route
    return routes


def _fixed_answer(answer: HttpAnswer) -> HttpRoute:
    async def route() -> HttpAnswer:
        return answer

    return route


WEBSOCKET_PATH_PREFIXES = ("/ws/chat/", "/ws/agent/")


def session_id_from_path(path: str) -> str | None:
    for prefix in WEBSOCKET_PATH_PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix) :]
    return None


def token_from(head: RequestHead) -> str | None:
    authorization = head.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    tokens = head.query.get("token")
    return tokens[0] if tokens else None
