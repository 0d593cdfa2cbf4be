"""Fault injection: `kill -9` under concurrent load, a multi-megabyte SSE line, a full
disk and a read-only database.

Already proven elsewhere (not repeated here): an upstream that stalls mid-stream
fails after the idle timeout, one that drops the TCP connection, answers garbage or
a 200 HTML page (test_upstream_faults.py); `kill -9` of one streaming session and the
chain resuming after restart (test_process.py).

How the storage faults are reproduced, on the server's own SQLite connection
(`server.store._db`, used through the store's one-thread limiter):

- disk full: `PRAGMA max_page_count = <current page_count>`; SQLite then fails any
  write that needs a new page with SQLITE_FULL ("database or disk is full"), the
  same error a full file system gives.
- read-only: `PRAGMA query_only = 1`; every write fails with SQLITE_READONLY
  ("attempt to write a readonly database"). `chmod 0444` on the file would not do:
  the open connection keeps its read-write descriptor, and the tests may run as root.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from server_process import base_env, server_process

from conftest import API_KEY, CLIENT_WAIT_S, JWT_SECRET, ChatClient, open_chat, token_for
from fake_upstream import FakeUpstream, GarbageReply, TextReply
from server import ChatServer

StartServer = Callable[..., Awaitable[ChatServer]]
WAIT_S = 20.0


async def _on_store_connection(server: ChatServer, sql: str) -> Any:
    """Run one statement on the server's own SQLite connection, in its worker thread."""
    store = server.store

    def run() -> Any:
        return store._db.execute(sql).fetchone()

    return await trio.to_thread.run_sync(run, limiter=store._limiter)


def _error_codes(frames: list[dict[str, Any]]) -> list[str]:
    return [frame["code"] for frame in frames if frame["type"] == "error"]


async def _history(client: ChatClient) -> list[dict[str, Any]]:
    await client.send(type="history")
    frames = await client.receive_until("history")
    messages: list[dict[str, Any]] = frames[-1]["messages"]
    return messages


# =========================================================================== kill -9 under load


CLIENTS = 20


def _rows(db: Path) -> tuple[str, list[tuple[Any, ...]]]:
    connection = sqlite3.connect(db)
    try:
        integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
        rows = connection.execute(
            "SELECT session_id, role, content, status FROM messages ORDER BY id"
        ).fetchall()
    finally:
        connection.close()
    return integrity, rows


async def test_kill_9_under_load_keeps_every_typed_message_and_no_half_written_row(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "chat.db"
    env = base_env(
        CHAT_JWT_SECRET=JWT_SECRET,
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_API_KEY=API_KEY,
        CHAT_DB=str(db),
        CHAT_MODEL="test-model",
    )
    rng = random.Random(6)
    # Long user messages (several SQLite pages each) make a torn write visible.
    sent = {
        n: f"q-{n}-" + "".join(rng.choices("abcdefgh ", k=rng.randint(10, 6000)))
        for n in range(CLIENTS)
    }
    typed: set[int] = set()
    streaming = 0
    all_streaming = trio.Event()
    replies_ready = trio.Event()

    async def client(n: int, proc: Any) -> None:
        nonlocal streaming
        async with open_chat(proc, f"load-{n}", f"user-{n}") as chat:
            await chat.send(type="message", content=f"warm-up {n}")
            await chat.turn()
            await replies_ready.wait()
            await chat.send(type="message", content=sent[n])
            assert await chat.receive() == {"type": "typing", "is_typing": True}
            typed.add(n)
            await chat.receive_until("text_delta")
            # A queued message too: committed on arrival, its typing never comes.
            await chat.send(type="message", content=f"queued {n}")
            streaming += 1
            if streaming == CLIENTS:
                all_streaming.set()
            await chat.closed_code()

    async with server_process(["serve", "--port", "0"], env) as proc:
        # Warm-ups are answered by the default echo; then 20 long, paced answers.
        async with trio.open_nursery() as nursery:
            for n in range(CLIENTS):
                nursery.start_soon(client, n, proc)
            with trio.fail_after(WAIT_S):
                while len(fake.requests) < CLIENTS:
                    await fake.wait_for_request(len(fake.requests) + 1)
            fake.enqueue(
                *(TextReply([f"w{i} " for i in range(2000)], delay_s=0.01) for _ in range(CLIENTS))
            )
            replies_ready.set()
            with trio.fail_after(WAIT_S):
                await all_streaming.wait()
            proc.kill()
            assert await proc.wait_exit() == -signal.SIGKILL

    integrity, rows = await trio.to_thread.run_sync(_rows, db)
    assert integrity == "ok"
    assert typed == set(range(CLIENTS))
    by_session: dict[str, list[tuple[str, str, str | None]]] = {}
    for session_id, role, content, status in rows:
        by_session.setdefault(session_id, []).append((role, content, status))
    for n in range(CLIENTS):
        stored = by_session[f"load-{n}"]
        users = [content for role, content, _ in stored if role == "user"]
        # Every message that got its typing is there, once, whole.
        assert users.count(sent[n]) == 1
        # No row is half-written: each user row is exactly a message we sent.
        assert set(users) <= {f"warm-up {n}", sent[n], f"queued {n}"}
        answers = [(content, status) for role, content, status in stored if role == "assistant"]
        assert answers == [(f"echo: warm-up {n}", "completed")]

    # The restarted server serves the same sessions and history, and goes on chatting.
    async with server_process(["serve", "--port", "0"], env) as proc:
        async with open_chat(proc, "load-0", "user-0") as chat:  # type: ignore[arg-type]
            assert chat.connected["resumed"] is True  # type: ignore[attr-defined]
            history = await _history(chat)
            assert sent[0] in [m["content"] for m in history]
            await chat.send(type="message", content="after restart")
            frames = await chat.turn()
    end = next(f for f in frames if f["type"] == "response_end")
    assert end["status"] == "completed"


# =========================================================================== upstream


@pytest.mark.parametrize(
    "body",
    [
        b"data: " + b"x" * (6 * 1024 * 1024) + b"\n\n",
        b'data: {"type": "response.output_text.delta", "delta": "'
        + b"y" * (5 * 1024 * 1024)
        + b'"}\n\n',
    ],
    ids=["6MB_garbage_line", "5MB_delta_event"],
)
async def test_sse_line_of_megabytes_fails_the_turn_cleanly_and_the_session_stays_usable(
    server: ChatServer, fake: FakeUpstream, body: bytes
) -> None:
    fake.enqueue(GarbageReply(body, "text/event-stream"))
    async with open_chat(server, "huge") as client:
        await client.send(type="message", content="say a lot")
        frames = await client.turn()
        end = next(f for f in frames if f["type"] == "response_end")
        assert end["status"] == "failed" and end["full_content"] == ""
        assert _error_codes(frames) == ["upstream_error"]
        await client.send(type="message", content="still there?")
        frames = await client.turn()
    end = next(f for f in frames if f["type"] == "response_end")
    assert end["status"] == "completed" and end["full_content"] == "echo: still there?"


# =========================================================================== storage


async def test_disk_full_answers_storage_error_keeps_serving_and_recovers(
    server: ChatServer, fake: FakeUpstream
) -> None:
    async with open_chat(server, "full") as client:
        (pages,) = await _on_store_connection(server, "PRAGMA page_count")
        await _on_store_connection(server, f"PRAGMA max_page_count = {pages}")

        # A user message that needs new pages is refused, not half-stored.
        await client.send(type="message", content="z" * 9000, id="big-1")
        frame = await client.receive()
        assert frame["type"] == "error" and frame["code"] == "storage_error", frame
        # A small one fits; its long answer does not: the turn ends, the client is told.
        fake.enqueue(TextReply(["long answer " * 100] * 10))
        await client.send(type="message", content="hi")
        frames = await client.turn()
        assert _error_codes(frames) == ["storage_error"]
        turn_id = next(f for f in frames if f["type"] == "response_start")["turn_id"]
        assert next(f for f in frames if f["type"] == "error")["turn_id"] == turn_id
        # Reads still work while the disk is full.
        history = await _history(client)
        assert [(m["role"], m["content"]) for m in history] == [("user", "hi")]

        # Space again: the same client id is accepted (nothing of it was stored).
        await _on_store_connection(server, "PRAGMA max_page_count = 1073741823")
        await client.send(type="message", content="z" * 9000, id="big-1")
        frames = await client.turn()
        assert _error_codes(frames) == []
        assert next(f for f in frames if f["type"] == "response_end")["status"] == "completed"
        history = await _history(client)
    assert [m["role"] for m in history] == ["user", "user", "assistant"]
    assert await server.store.integrity_check() == "ok"


async def test_read_only_database_answers_storage_error_no_crash_and_recovers(
    server: ChatServer,
) -> None:
    async with open_chat(server, "ro") as client:
        await _on_store_connection(server, "PRAGMA query_only = 1")
        await client.send(type="message", content="can you store this?")
        frame = await client.receive()
        assert frame == {
            "type": "error",
            "code": "storage_error",
            "message": frame["message"],
            "turn_id": None,
        }
        assert "database" in frame["message"] and "sqlite" not in frame["message"].lower()
        # A new session cannot be created: refused with 1011, the server stays up.
        url_token = token_for("bob")
        async with open_chat(server, "ro-new", token=url_token, expect_connected=False) as refused:
            assert await refused.closed_code() == 1011
        # The open session is still usable for reads.
        assert await _history(client) == []

        await _on_store_connection(server, "PRAGMA query_only = 0")
        await client.send(type="message", content="and now?")
        frames = await client.turn()
    assert _error_codes(frames) == []
    assert next(f for f in frames if f["type"] == "response_end")["status"] == "completed"
    async with open_chat(server, "ro-new", "bob") as bob:
        assert bob.connected["resumed"] is False  # type: ignore[attr-defined]
    with trio.fail_after(CLIENT_WAIT_S):
        assert await server.store.integrity_check() == "ok"
    assert json.dumps(frames).count("storage_error") == 0
