"""The Sessions API (PROTOCOL.md, "Sessions API"): a user's sessions over HTTP on the
same port: list, read, rename, delete, export.

Every request carries the same JWT as a WebSocket, as `Authorization: Bearer`.
Answers are JSON; errors are `{"error": {"code", "message"}}` with 400 (bad input),
401 (missing, invalid or expired token), 404 (no such session *of this user*:
another user's session is indistinguishable from a missing one) or 405 (a method
the path does not have).

Resource handling: the API holds nothing between requests. Deleting a session
first ends its live side (`end_session`: the running turn cancelled and stored,
the connection closed with 4410), then deletes what is stored.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import protocol as wire
from chat.auth import TokenVerifier
from chat.http_front import HttpAnswer, error_answer, json_answer
from store import SessionInfo, Store, StoredMessage

PREFIX = "/api/sessions"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
MAX_TITLE_CHARS = 200

_NO_SUCH_SESSION = error_answer(404, "not_found", "No such session.")


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str
    query: Mapping[str, list[str]]
    authorization: str
    body: bytes


class _BadRequest(Exception):
    """Answered 400 with this message."""


class SessionsApi:
    """Answers `/api/sessions...` requests; see the module docstring."""

    def __init__(
        self,
        store: Store,
        verifier: TokenVerifier,
        *,
        is_running: Callable[[str], Awaitable[bool]],
        end_session: Callable[[str], Awaitable[None]],
    ) -> None:
        self._store = store
        self._verifier = verifier
        self._is_running = is_running
        self._end_session = end_session

    @staticmethod
    def owns(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    async def answer(self, request: ApiRequest) -> HttpAnswer:
        """One request's answer. Raises StorageUnavailable (the caller answers 503)."""
        user_id = self._user(request.authorization)
        if user_id is None:
            return error_answer(401, "unauthorized", "Missing, invalid or expired token.")
        rest = request.path[len(PREFIX) :].strip("/")
        parts = rest.split("/") if rest else []
        try:
            if not parts:
                return await self._collection(request, user_id)
            if not wire.is_valid_session_id(parts[0]) or len(parts) > 2:
                return _NO_SUCH_SESSION
            if len(parts) == 2:
                if parts[1] != "export":
                    return _NO_SUCH_SESSION
                return await self._export(request, user_id, parts[0])
            return await self._session(request, user_id, parts[0])
        except _BadRequest as bad:
            return error_answer(400, "bad_request", str(bad))

    def _user(self, authorization: str) -> str | None:
        if not authorization.lower().startswith("bearer "):
            return None
        try:
            user_id, _ = self._verifier.verify(authorization[7:].strip())
        except wire.Unauthorized:
            return None
        return user_id

    async def _collection(self, request: ApiRequest, user_id: str) -> HttpAnswer:
        if request.method not in ("GET", "HEAD"):
            return _not_allowed("GET")
        limit = _page_size(request.query)
        cursor = _single(request.query, "cursor")
        try:
            sessions, next_cursor = await self._store.list_sessions(user_id, limit, cursor)
        except ValueError:
            raise _BadRequest("cursor: not a cursor this server gave out") from None
        return json_answer(
            200,
            {"sessions": [await self._view(info) for info in sessions], "next_cursor": next_cursor},
        )

    async def _session(self, request: ApiRequest, user_id: str, session_id: str) -> HttpAnswer:
        if request.method in ("GET", "HEAD"):
            info = await self._store.get_session(user_id, session_id)
        elif request.method == "PATCH":
            title = _title(request.body)
            info = await self._store.rename_session(user_id, session_id, title)
        elif request.method == "DELETE":
            if await self._store.get_session(user_id, session_id) is None:
                return _NO_SUCH_SESSION
            await self._end_session(session_id)
            await self._store.delete_session(user_id, session_id)
            return HttpAnswer(204)
        else:
            return _not_allowed("GET, PATCH, DELETE")
        return _NO_SUCH_SESSION if info is None else json_answer(200, await self._view(info))

    async def _export(self, request: ApiRequest, user_id: str, session_id: str) -> HttpAnswer:
        if request.method not in ("GET", "HEAD"):
            return _not_allowed("GET")
        export_format = _single(request.query, "format") or "json"
        if export_format not in ("json", "markdown"):
            raise _BadRequest("format: json or markdown")
        exported = await self._store.export_session(user_id, session_id)
        if exported is None:
            return _NO_SUCH_SESSION
        info, messages = exported
        if export_format == "json":
            # Here, not at the top: chat.connection (and trio-websocket with it) is not
            # imported before the server listens (server.py, "Start-up").
            from chat.connection import history_entry

            entries = [history_entry(message).model_dump(mode="json") for message in messages]
            return json_answer(200, {"session": await self._view(info), "messages": entries})
        filename = quote(f"{info.id}.md")
        return HttpAnswer(
            200,
            markdown_document(info, messages).encode(),
            "text/markdown; charset=utf-8",
            (("content-disposition", f"attachment; filename*=UTF-8''{filename}"),),
        )

    async def _view(self, info: SessionInfo) -> dict[str, Any]:
        return {
            "id": info.id,
            "title": info.title,
            "created_at": info.created_at,
            "updated_at": info.updated_at,
            "message_count": info.message_count,
            "last_status": info.last_status,
            "running": await self._is_running(info.id),
        }


def markdown_document(info: SessionInfo, messages: list[StoredMessage]) -> str:
    """A conversation as a Markdown document: a heading per message, in order."""
    lines = [f"# {info.title}", "", f"Exported conversation `{info.id}`, {info.created_at}.", ""]
    for message in messages:
        if message.role == "tool":
            lines += [
                f"## Tool `{message.name}` ({message.created_at})",
                "",
                "Arguments:",
                "",
                "```json",
                message.arguments or "{}",
                "```",
                "",
                "Result:",
                "",
                "```",
                message.output or "",
                "```",
                "",
            ]
            continue
        who = "User" if message.role == "user" else "Assistant"
        status = f", {message.status}" if message.role == "assistant" and message.status else ""
        lines += [f"## {who} ({message.created_at}{status})", "", message.content, ""]
    return "\n".join(lines)


def _not_allowed(allowed: str) -> HttpAnswer:
    answer = error_answer(405, "method_not_allowed", f"Allowed: {allowed}.")
    return HttpAnswer(answer.status, answer.body, answer.content_type, (("allow", allowed),))


def _single(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise _BadRequest(f"{name}: give it once")
    return values[0]


def _page_size(query: Mapping[str, list[str]]) -> int:
    text = _single(query, "limit")
    if text is None:
        return DEFAULT_PAGE_SIZE
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE_SIZE:
        raise _BadRequest(f"limit: a whole number from 1 to {MAX_PAGE_SIZE}")
    return int(text)


def _title(body: bytes) -> str:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise _BadRequest('body: a JSON object {"title": "..."}') from None
    title = document.get("title") if isinstance(document, dict) else None
    if not isinstance(title, str) or not 1 <= len(title.strip()) <= MAX_TITLE_CHARS:
        raise _BadRequest(f"title: text of 1 to {MAX_TITLE_CHARS} characters")
    return title.strip()
