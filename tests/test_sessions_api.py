"""The Sessions API (PROTOCOL.md, "Sessions API") over real HTTP on the server's port:
list with cursors, read, rename, delete (closing the session's socket with 4410 and
cancelling its turn), export as JSON and Markdown, and retention."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from conftest import CLIENT_WAIT_S, open_chat, token_for
from fake_upstream import FakeUpstream, TextReply
from server import ChatServer

StartServer = Callable[..., Awaitable[ChatServer]]


def _api(server: ChatServer, user: str = "alice") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{server.port}/api/sessions",
        headers={"Authorization": f"Bearer {token_for(user)}"},
        timeout=CLIENT_WAIT_S,
    )


async def _chat_once(server: ChatServer, session_id: str, text: str, user: str = "alice") -> None:
    async with open_chat(server, session_id, user) as client:
        await client.send(type="message", content=text)
        await client.turn()


async def test_list_is_most_recent_first_and_pages_with_a_cursor(
    server: ChatServer, fake: FakeUpstream
) -> None:
    for n in range(5):
        fake.enqueue(TextReply([f"answer {n}"]))
        await _chat_once(server, f"s{n}", f"question {n}")
    fake.enqueue(TextReply(["x"]))
    await _chat_once(server, "other", "not alice's", user="bob")
    seen: list[str] = []
    async with _api(server) as api:
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = (await api.get("", params=params)).raise_for_status().json()
            seen += [session["id"] for session in page["sessions"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert len(seen) < 10, "the cursor never ended"
        first = (await api.get("/s4")).raise_for_status().json()
    assert seen == ["s4", "s3", "s2", "s1", "s0"]
    assert first["title"] == "question 4" and first["message_count"] == 2
    assert first["last_status"] == "completed" and first["running"] is False
    assert set(first) == {
        "id", "title", "created_at", "updated_at", "message_count", "last_status", "running",
    }


async def test_another_users_session_is_indistinguishable_from_a_missing_one(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(TextReply(["hi"]))
    await _chat_once(server, "bobs", "secret", user="bob")
    async with _api(server, "alice") as api:
        answers = [
            await api.get("/bobs"),
            await api.get("/nobody-has-this"),
            await api.patch("/bobs", json={"title": "mine now"}),
            await api.delete("/bobs"),
            await api.get("/bobs/export"),
        ]
    for answer in answers:
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "not_found"
    async with _api(server, "bob") as api:
        assert (await api.get("/bobs")).json()["title"] == "secret"


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer not-a-jwt"}, 401), ({"Authorization": "Basic x"}, 401)],
)
async def test_requests_without_a_valid_bearer_token_get_401(
    server: ChatServer, headers: dict[str, str], status: int
) -> None:
    async with httpx.AsyncClient(timeout=CLIENT_WAIT_S) as http:
        answer = await http.get(f"http://127.0.0.1:{server.port}/api/sessions", headers=headers)
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "?limit=0", None),
        ("GET", "?limit=201", None),
        ("GET", "?limit=x", None),
        ("GET", "?cursor=garbage", None),
        ("PATCH", "/s1", b"not json"),
        ("PATCH", "/s1", b'{"title": ""}'),
        ("PATCH", "/s1", json.dumps({"title": "x" * 201}).encode()),
        ("PATCH", "/s1", b'{"title": 5}'),
        ("GET", "/s1/export?format=pdf", None),
    ],
)
async def test_bad_input_gets_400_and_changes_nothing(
    server: ChatServer, fake: FakeUpstream, method: str, path: str, body: bytes | None
) -> None:
    fake.enqueue(TextReply(["hi"]))
    await _chat_once(server, "s1", "the title")
    async with _api(server) as api:
        answer = await api.request(method, path, content=body)
        after = (await api.get("/s1")).json()
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "bad_request"
    assert after["title"] == "the title"


async def test_rename_changes_the_title_and_not_the_order(
    server: ChatServer, fake: FakeUpstream
) -> None:
    for session_id in ("older", "newer"):
        fake.enqueue(TextReply(["ok"]))
        await _chat_once(server, session_id, session_id)
    async with _api(server) as api:
        renamed = (await api.patch("/older", json={"title": "  Trip to Lyon  "})).json()
        listed = (await api.get("")).json()["sessions"]
    assert renamed["title"] == "Trip to Lyon"
    assert [s["id"] for s in listed] == ["newer", "older"]


async def test_delete_closes_the_socket_4410_cancels_the_turn_and_frees_the_id(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(TextReply([f"w{n} " for n in range(200)], delay_s=0.05))
    async with open_chat(server, "doomed", "alice") as client, _api(server) as api:
        await client.send(type="message", content="talk")
        await client.receive_until("text_delta")
        assert (await api.get("/doomed")).json()["running"] is True
        answer = await api.delete("/doomed")
        assert answer.status_code == 204
        assert await client.closed_code() == 4410
        with trio.fail_after(CLIENT_WAIT_S):
            await fake.requests[0].closed.wait()
        assert (await api.get("/doomed")).status_code == 404
    # The id may start a new session, of anyone.
    async with open_chat(server, "doomed", "bob") as fresh:
        assert fresh.connected["resumed"] is False  # type: ignore[attr-defined]
        assert fresh.connected["history_length"] == 0  # type: ignore[attr-defined]


async def test_export_gives_the_whole_conversation_as_json_and_markdown(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(TextReply(["Paris ", "is ", "the capital."]))
    await _chat_once(server, "geo", "Capital of France?")
    async with _api(server) as api:
        as_json = (await api.get("/geo/export", params={"format": "json"})).json()
        markdown = await api.get("/geo/export", params={"format": "markdown"})
    assert as_json["session"]["id"] == "geo"
    assert [(m["role"], m["content"], m["status"]) for m in as_json["messages"]] == [
        ("user", "Capital of France?", None),
        ("assistant", "Paris is the capital.", "completed"),
    ]
    assert markdown.headers["content-type"].startswith("text/markdown")
    assert "attachment" in markdown.headers["content-disposition"]
    text = markdown.text
    assert text.startswith("# Capital of France?")
    assert text.index("Capital of France?\n\n## Assistant") < text.index("Paris is the capital.")


async def test_unknown_methods_get_405_and_unknown_paths_404(server: ChatServer) -> None:
    async with _api(server) as api:
        assert (await api.post("", json={})).status_code == 405
        assert (await api.put("/s1", json={})).status_code == 405
        assert (await api.get("/s1/nothing")).status_code == 404


async def test_retention_deletes_inactive_sessions_at_start(
    start_server: StartServer, fake: FakeUpstream, tmp_path: Path
) -> None:
    database = tmp_path / "kept.db"
    first = await start_server(db_path=str(database))
    for session_id in ("old", "recent"):
        fake.enqueue(TextReply(["ok"]))
        await _chat_once(first, session_id, "hello")
    # Backdate one session's activity, as if it had been idle for years.
    with sqlite3.connect(database) as db:
        db.execute("UPDATE sessions SET updated_at = ? WHERE id = 'old'", ("2000-01-01T00:00:00Z",))
    # The first check runs before the server listens.
    second = await start_server(db_path=str(database), retention_days=1.0)
    async with _api(second) as api:
        assert (await api.get("/old")).status_code == 404
        assert (await api.get("/recent")).status_code == 200
