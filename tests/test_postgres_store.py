"""PostgresStore against a real PostgreSQL server, and the rules both stores share.

The first part is the contract of `store.Store`: each test runs twice, on a
`SessionStore` (SQLite file) and on a `PostgresStore` (a fresh PostgreSQL database),
and asserts the same thing of both: durability, duplicate ids, order, the chain point,
the Sessions API's list, titles, renames, deletions, export and retention, cursor
paging, another user's invisibility, and text that PostgreSQL's own text type refuses.
The second part is what only PostgreSQL has: a database server that crashes and comes
back, or hangs (a proxy that stops passing bytes); several instances on one database;
another session's lock; the statement timeout; migrations; passwords kept out of
errors and logs.

Rules: the PostgreSQL server is real, started once for the session by
`tests/postgres_server.py` on a free loopback port in a temporary directory and
removed at the end; each test gets a database of its own. Without PostgreSQL's
binaries the PostgreSQL tests are skipped outside CI and fail under CI=true
(build/install-services.sh installs them). A `trio.fail_after` bound on every test that does I/O;
events awaited rather than sleeps, except where the only signal is a server coming
back (polled, bounded). Another instance, or an operator, is played by a plain psycopg
connection.
"""

from __future__ import annotations

import base64
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from postgres_server import PASSWORD, PostgresMissing, PostgresServer

import store as store_module
from chat import postgres_connections, postgres_store
from chat.postgres_connections import LOCK_TIMEOUT_S
from chat.postgres_store import HEALTH_TIMEOUT_S, SCHEMA_VERSION, PostgresStore
from chat.postgres_text import escape_text, unescape_text
from protocol import DuplicateMessage, StorageUnavailable, TurnStatus
from store import (
    DEFAULT_TITLE,
    TITLE_MAX_CHARS,
    SessionStore,
    Store,
    ToolCallRecord,
    open_store,
)

WAIT_S = 15.0  # the bound of a test that waits on nothing slower than a local database
OLD = "2020-01-01T00:00:00.000Z"  # long before any test runs


# =========================================================================== fixtures


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (skipped without one, failed under CI)."""
    try:
        server = PostgresServer.create()
    except PostgresMissing as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required under CI: {missing}")
        pytest.skip(f"{missing}: run build/install-services.sh to test PostgresStore")
    try:
        yield server
    finally:
        server.destroy()


class Backend:
    """Where a contract test's store lives, and what another process may do to it."""

    name: str

    async def open(self) -> Store:
        raise NotImplementedError

    def execute(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement on a connection of its own (placeholders: `%s`)."""
        raise NotImplementedError

    def set_updated_at(self, session_id: str, updated_at: str) -> None:
        self.execute("UPDATE sessions SET updated_at = %s WHERE id = %s", (updated_at, session_id))


class SqliteBackend(Backend):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    async def open(self) -> Store:
        return await open_store(str(self.path))

    def execute(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        connection = sqlite3.connect(self.path, isolation_level=None)
        try:
            return connection.execute(sql.replace("%s", "?"), parameters).fetchall()
        finally:
            connection.close()


class PostgresBackend(Backend):
    name = "postgres"

    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self) -> Store:
        return await open_store(self.url)

    def execute(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return _pg_execute(self.url, sql, parameters)


def _pg_execute(url: str, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as connection:
        cursor = connection.execute(sql, parameters)
        return cursor.fetchall() if cursor.description is not None else []


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return SqliteBackend(tmp_path / "chat.db")
    server: PostgresServer = request.getfixturevalue("postgres")
    return PostgresBackend(server.create_database())


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = await backend.open()
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh PostgreSQL database of this test's own."""
    return postgres.create_database()


@asynccontextmanager
async def _pg_store(url: str) -> AsyncIterator[PostgresStore]:
    opened = await PostgresStore.open(url)
    try:
        yield opened
    finally:
        await opened.aclose()


@asynccontextmanager
async def _table_locked(url: str) -> AsyncIterator[None]:
    """Another session holding `LOCK TABLE messages IN EXCLUSIVE MODE` until the block
    ends: inserts wait for it, reads do not."""
    locked, release = trio.Event(), threading.Event()

    def hold_lock() -> None:
        with psycopg.connect(url, connect_timeout=10) as connection:
            connection.execute("LOCK TABLE messages IN EXCLUSIVE MODE")
            trio.from_thread.run_sync(locked.set)
            release.wait(timeout=60)  # bounded even if the test forgot to release
            connection.rollback()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, hold_lock)
        await locked.wait()
        try:
            yield
        finally:
            release.set()


class FreezableProxy:
    """A loopback TCP proxy in front of PostgreSQL that can stop passing bytes while
    every socket stays open: to a client, a server that accepted its statements and
    then hangs (stuck storage, a stopped process), where no timeout of its own fires
    and the kernel keeps acknowledging. `thaw` drops the connections it froze."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self._connections: set[trio.CancelScope] = set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    def freeze(self) -> None:
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False
        for scope in self._connections:
            scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                async with client, server, trio.open_nursery() as pipes:
                    pipes.start_soon(self._pipe, client, server, pipes.cancel_scope)
                    pipes.start_soon(self._pipe, server, client, pipes.cancel_scope)
            finally:
                self._connections.discard(scope)

    async def _pipe(
        self, source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some():
                if self.frozen:
                    await trio.sleep_forever()  # held, until `thaw` drops the connection
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()


async def _say(store: Store, session_id: str, content: str, *, client_id: str | None = None) -> int:
    message = await store.add_user_message(
        session_id, content, client_message_id=client_id, metadata=None
    )
    return message.id


async def _answer(
    store: Store,
    session_id: str,
    reply_to: int,
    content: str,
    status: TurnStatus = "completed",
    tool_calls: list[ToolCallRecord] | None = None,
) -> int:
    return await store.finish_turn(
        session_id,
        reply_to=reply_to,
        turn_id=f"turn-{reply_to}",
        content=content,
        status=status,
        response_id=f"resp-{reply_to}",
        tool_calls=tool_calls or [],
    )


def _contents(messages: list[store_module.StoredMessage]) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in messages]


# =========================================================================== the contract


async def test_open_store_picks_the_store_by_db(backend: Backend) -> None:
    with trio.fail_after(WAIT_S):
        opened = await backend.open()
        try:
            expected = PostgresStore if backend.name == "postgres" else SessionStore
            assert isinstance(opened, expected)
            assert await opened.healthy()
            assert await opened.integrity_check() == "ok"
        finally:
            await opened.aclose()


async def test_committed_messages_and_turns_are_there_after_a_reopen(backend: Backend) -> None:
    call = ToolCallRecord("call-1", "lookup", '{"order": 7}', output="shipped", status="completed")
    with trio.fail_after(WAIT_S):
        first = await backend.open()
        try:
            await first.claim_session("s", "alice")
            question = await first.add_user_message(
                "s", "Where is order 7?", client_message_id="c1", metadata={"page": "orders"}
            )
            await _answer(first, "s", question.id, "Order 7 shipped.", tool_calls=[call])
        finally:
            await first.aclose()

        second = await backend.open()
        try:
            claim = await second.claim_session("s", "bob")
            history = await second.history("s", 10)
            with pytest.raises(DuplicateMessage):
                await _say(second, "s", "again", client_id="c1")
        finally:
            await second.aclose()
    assert (claim.owner_id, claim.resumed, claim.history_length) == ("alice", True, 3)
    assert history[0] == question
    assert _contents(history) == [
        ("user", "Where is order 7?"),
        ("tool", "shipped"),
        ("assistant", "Order 7 shipped."),
    ]
    tool = history[1]
    assert (tool.name, tool.call_id, tool.arguments, tool.output, tool.status) == (
        "lookup",
        "call-1",
        '{"order": 7}',
        "shipped",
        "completed",
    )
    assert (tool.turn_id, history[2].turn_id) == (f"turn-{question.id}", f"turn-{question.id}")
    assert (history[2].status, history[2].response_id) == ("completed", f"resp-{question.id}")


async def test_a_client_message_id_is_accepted_once_per_session(store: Store) -> None:
    with trio.fail_after(WAIT_S):
        await store.claim_session("a", "alice")
        await store.claim_session("b", "alice")
        await _say(store, "a", "first", client_id="m1")
        with pytest.raises(DuplicateMessage):
            await _say(store, "a", "first again", client_id="m1")
        await _say(store, "b", "same id, other session", client_id="m1")
        await _say(store, "a", "no id")
        await _say(store, "a", "no id either")
        history = await store.history("a", 10)
    assert [m.content for m in history] == ["first", "no id", "no id either"]


async def test_an_answer_follows_its_question_even_when_stored_after_later_messages(
    store: Store,
) -> None:
    with trio.fail_after(WAIT_S):
        await store.claim_session("s", "alice")
        first = await _say(store, "s", "one")
        second = await _say(store, "s", "two")  # queued while the first turn ran
        await _answer(store, "s", first, "answer one")
        await _answer(store, "s", second, "answer two")
        third = await _say(store, "s", "three")

        history = await store.history("s", 10)
        latest = await store.history("s", 2)
        up_to_first = await store.full_history("s", up_to=first)
        everything = await store.full_history("s")
    assert [m.content for m in history] == ["one", "answer one", "two", "answer two", "three"]
    assert [m.content for m in latest] == ["answer two", "three"]
    assert [m.content for m in up_to_first] == ["one", "answer one"]
    assert everything == history
    assert first < second < third


async def test_chain_point_is_the_last_completed_response_and_what_came_after(
    store: Store,
) -> None:
    with trio.fail_after(WAIT_S):
        await store.claim_session("s", "alice")
        empty = await store.chain_point("s")

        first = await _say(store, "s", "one")
        unanswered = await store.chain_point("s")
        await _answer(store, "s", first, "answer one")
        second = await _say(store, "s", "two")
        await _answer(store, "s", second, "answer t", status="stopped")
        third = await _say(store, "s", "three")

        latest = await store.chain_point("s")
        before_third = await store.chain_point("s", up_to=second)
        at_first = await store.chain_point("s", up_to=first)
    assert (empty.previous_response_id, empty.after) == (None, [])
    assert unanswered.previous_response_id is None
    assert [m.content for m in unanswered.after] == ["one"]
    assert latest.previous_response_id == f"resp-{first}"
    assert [m.content for m in latest.after] == ["two", "answer t", "three"]
    assert [m.content for m in before_third.after] == ["two", "answer t"]
    assert (at_first.previous_response_id, at_first.after) == (f"resp-{first}", [])
    assert latest.after[-1].id == third


async def test_pages_hold_every_session_once_most_recently_active_first_ties_by_id(
    store: Store, backend: Backend
) -> None:
    activity = {
        "s0": "2026-03-03T00:00:00.000Z",
        "s1": "2026-03-01T00:00:00.000Z",
        "s2": "2026-03-03T00:00:00.000Z",
        "s3": "2026-03-02T00:00:00.000Z",
        "s4": "2026-03-01T00:00:00.000Z",
        "s5": "2026-03-02T00:00:00.000Z",
        "s6": "2026-03-01T00:00:00.000Z",
    }
    with trio.fail_after(WAIT_S):
        for session_id in activity:
            await store.claim_session(session_id, "alice")
        await store.claim_session("bobs", "bob")
        for session_id, updated_at in activity.items():
            backend.set_updated_at(session_id, updated_at)

        pages: list[list[str]] = []
        cursor: str | None = None
        while True:
            sessions, cursor = await store.list_sessions("alice", 3, cursor)
            pages.append([s.id for s in sessions])
            if cursor is None:
                break
            assert len(pages) < 5, "pagination does not end"
        everything, last = await store.list_sessions("alice", len(activity), None)
    assert pages == [["s2", "s0", "s5"], ["s3", "s6", "s4"], ["s1"]]
    assert [s.id for s in everything] == ["s2", "s0", "s5", "s3", "s6", "s4", "s1"]
    assert last is None


async def test_ties_order_by_the_bytes_of_the_id_whatever_the_locale(
    store: Store, backend: Backend
) -> None:
    """Bytewise, as SQLite compares: "a" (0x61) after "B" (0x42) and "_" (0x5f)
    between them; a natural-language collation would put "a" before "B"."""
    ids = ["a", "B", "b", "A", "s_1", "s-1", "S2", "_x"]
    with trio.fail_after(WAIT_S):
        for session_id in ids:
            await store.claim_session(session_id, "alice")
            backend.set_updated_at(session_id, OLD)
        first, cursor = await store.list_sessions("alice", 4, None)
        assert cursor is not None
        rest, end = await store.list_sessions("alice", 4, cursor)
    assert [s.id for s in first + rest] == sorted(ids, key=str.encode, reverse=True)
    assert end is None


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "not base64!",
        base64.urlsafe_b64encode(b"not json").decode(),
        base64.urlsafe_b64encode(b'{"updated_at": "x"}').decode(),
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        "é",
    ],
)
async def test_malformed_cursor_is_a_value_error(store: Store, cursor: str) -> None:
    with trio.fail_after(WAIT_S), pytest.raises(ValueError):
        await store.list_sessions("alice", 3, cursor)


async def test_a_forged_cursor_with_any_text_is_just_a_position(store: Store) -> None:
    forged = base64.urlsafe_b64encode(b'["9999\\u0000\\uffff", "\\u0000"]').decode()
    with trio.fail_after(WAIT_S):
        await store.claim_session("s", "alice")
        sessions, cursor = await store.list_sessions("alice", 3, forged.rstrip("="))
        with pytest.raises(ValueError):
            await store.list_sessions("alice", 0, None)
    assert ([s.id for s in sessions], cursor) == (["s"], None)  # every timestamp is before


async def test_another_users_session_is_invisible_and_untouchable(store: Store) -> None:
    with trio.fail_after(WAIT_S):
        await store.claim_session("bobs", "bob")
        await _say(store, "bobs", "private")
        await store.claim_session("alices", "alice")
        claim = await store.claim_session("bobs", "alice")

        sessions, _ = await store.list_sessions("alice", 10, None)
        assert [s.id for s in sessions] == ["alices"]
        assert await store.get_session("alice", "bobs") is None
        assert await store.rename_session("alice", "bobs", "mine now") is None
        assert await store.export_session("alice", "bobs") is None
        assert await store.delete_session("alice", "bobs") is False

        info = await store.get_session("bob", "bobs")
    assert (claim.owner_id, claim.resumed, claim.history_length) == ("bob", True, 1)
    assert info is not None and info.title == "private" and info.message_count == 1


async def test_title_defaults_to_the_first_line_of_the_first_user_message(store: Store) -> None:
    long_line = "Please look into the invoice I got last week " + "x" * 100
    with trio.fail_after(WAIT_S):
        for session_id in ("empty", "lines", "long", "blank", "padded"):
            await store.claim_session(session_id, "alice")
        await _say(store, "lines", "  \n\n  Fix   the\tlogin page  \nIt fails with 500.")
        await _say(store, "padded", " \r\n\t" * 200 + "Past the padding")
        await _say(store, "lines", "Second message is not the title")
        await _say(store, "long", long_line)
        await _say(store, "blank", " \n\t ")
        titles = {
            session_id: info.title
            for session_id in ("empty", "lines", "long", "blank", "padded")
            if (info := await store.get_session("alice", session_id)) is not None
        }
    assert titles["empty"] == DEFAULT_TITLE
    assert titles["lines"] == "Fix the login page"
    assert titles["long"] == "Please look into the invoice I got last week…"
    assert len(titles["long"]) <= TITLE_MAX_CHARS
    assert titles["blank"] == DEFAULT_TITLE
    assert titles["padded"] == "Past the padding"  # leading whitespace is not counted


async def test_rename_sets_the_title_and_does_not_count_as_activity(
    store: Store, backend: Backend
) -> None:
    with trio.fail_after(WAIT_S):
        await store.claim_session("a", "alice")
        await _say(store, "a", "first words")
        backend.set_updated_at("a", OLD)
        renamed = await store.rename_session("alice", "a", "Parcel trouble")
        listed, _ = await store.list_sessions("alice", 10, None)
    assert renamed is not None
    assert renamed.title == "Parcel trouble" and renamed.updated_at == OLD
    assert listed == [renamed]


async def test_every_stored_message_and_turn_moves_the_session_to_the_front(
    store: Store, backend: Backend
) -> None:
    with trio.fail_after(WAIT_S):
        await store.claim_session("a", "alice")
        await store.claim_session("b", "alice")
        backend.set_updated_at("a", OLD)
        backend.set_updated_at("b", "2020-01-02T00:00:00.000Z")

        question = await _say(store, "a", "question")
        after_message = await store.get_session("alice", "a")
        backend.set_updated_at("a", OLD)
        await _answer(store, "a", question, "partial", status="stopped")
        after_turn, _ = await store.list_sessions("alice", 10, None)
        resumed = await store.claim_session("b", "alice")
        after_claim = await store.get_session("alice", "b")
    assert after_message is not None and after_message.updated_at > OLD
    assert [s.id for s in after_turn] == ["a", "b"]
    assert after_turn[0].last_status == "stopped"
    assert resumed.resumed and after_claim is not None
    assert after_claim.updated_at == "2020-01-02T00:00:00.000Z"  # a claim is no activity


async def test_deleted_session_id_can_be_claimed_anew_by_another_user(store: Store) -> None:
    with trio.fail_after(WAIT_S):
        await store.claim_session("s", "alice")
        question = await _say(store, "s", "alice's secret", client_id="c1")

        assert await store.delete_session("alice", "s") is True
        assert await store.get_session("alice", "s") is None
        assert await store.history("s", 10) == []
        assert await store.delete_session("alice", "s") is False

        claim = await store.claim_session("s", "bob")
        with pytest.raises(StorageUnavailable):
            await _answer(store, "s", question, "alice's answer", status="interrupted")
        bobs = await _say(store, "s", "bob's question", client_id="c1")

        info = await store.get_session("bob", "s")
        alices, _ = await store.list_sessions("alice", 10, None)
        history = await store.history("s", 10)
    assert (claim.owner_id, claim.resumed, claim.history_length) == ("bob", False, 0)
    assert info is not None and info.title == "bob's question" and info.message_count == 1
    assert alices == []
    assert [m.content for m in history] == ["bob's question"]
    assert bobs > question  # ids are never reused, not even after a deletion


async def test_message_into_a_deleted_session_is_storage_unavailable_not_duplicate(
    store: Store,
) -> None:
    with trio.fail_after(WAIT_S):
        await store.claim_session("s", "alice")
        await _say(store, "s", "before", client_id="c1")
        await store.delete_session("alice", "s")
        with pytest.raises(StorageUnavailable):
            await _say(store, "s", "too late", client_id="c1")
        with pytest.raises(StorageUnavailable):
            await _say(store, "never-claimed", "no session")


async def test_export_is_the_whole_conversation_in_order_answers_after_their_questions(
    store: Store,
) -> None:
    call = ToolCallRecord("call-1", "lookup", '{"order": 7}', output="shipped", status="completed")
    with trio.fail_after(WAIT_S):
        await store.claim_session("s", "alice")
        first = await _say(store, "s", "Where is order 7?")
        second = await _say(store, "s", "And order 8?")
        await _answer(store, "s", first, "Order 7 shipped.", tool_calls=[call])
        await _answer(store, "s", second, "Order 8 is", status="stopped")
        exported = await store.export_session("alice", "s")
    assert exported is not None
    info, messages = exported
    assert _contents(messages) == [
        ("user", "Where is order 7?"),
        ("tool", "shipped"),
        ("assistant", "Order 7 shipped."),
        ("user", "And order 8?"),
        ("assistant", "Order 8 is"),
    ]
    assert info.message_count == 5 and info.last_status == "stopped"


async def test_delete_inactive_removes_only_sessions_idle_longer_than_the_age(
    store: Store, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_PURGE_BATCH_SESSIONS", 2)  # several batches
    monkeypatch.setattr(postgres_store, "PURGE_BATCH_SESSIONS", 2)
    stale = [f"stale-{n}" for n in range(5)]
    with trio.fail_after(WAIT_S):
        for n, session_id in enumerate(stale):
            await store.claim_session(session_id, "alice" if n % 2 else "bob")
            await _say(store, session_id, "old news")
            backend.set_updated_at(session_id, OLD)
        await store.claim_session("fresh", "alice")
        await _say(store, "fresh", "new news")

        deleted = await store.delete_inactive(3600)

        remaining, _ = await store.list_sessions("alice", 10, None)
        with pytest.raises(ValueError):
            await store.delete_inactive(-1)
    assert sorted(deleted) == stale
    assert [s.id for s in remaining] == ["fresh"]
    assert backend.execute("SELECT DISTINCT session_id FROM messages") == [("fresh",)]


async def test_any_text_round_trips_nul_and_noncharacters_included(
    store: Store, backend: Backend
) -> None:
    """PostgreSQL's text refuses U+0000, which JSON can carry in any field."""
    odd = "a\x00b\uffffc\uffff0\\0\x00"
    owner = "user\x00\uffff"
    with trio.fail_after(WAIT_S):
        await store.claim_session("s", owner)
        message = await store.add_user_message(
            "s", "A title \uffff0\n" + odd, client_message_id=odd, metadata={"k": odd}
        )
        with pytest.raises(DuplicateMessage):
            await _say(store, "s", "again", client_id=odd)
        call = ToolCallRecord(odd, odd, '{"q": "\\u0000"}', output=odd, status="completed")
        await _answer(store, "s", message.id, odd, tool_calls=[call])
        history = await store.history("s", 10)
        listed, _ = await store.list_sessions(owner, 10, None)
        renamed = await store.rename_session(owner, "s", odd)
        exported = await store.export_session(owner, "s")
    assert history[0] == message and message.content == "A title \uffff0\n" + odd
    assert history[0].client_message_id == odd
    tool, answer = history[1], history[2]
    assert (tool.name, tool.call_id, tool.output, tool.content) == (odd, odd, odd, odd)
    assert answer.content == odd
    # The first line (without U+0000: SQLite's substr, which finds it, stops there).
    assert [s.title for s in listed] == ["A title \uffff0"]
    assert renamed is not None and renamed.title == odd
    assert exported is not None and exported[1] == history
    if backend.name == "postgres":  # stored as itself where it can be
        assert backend.execute("SELECT owner FROM sessions") == [(escape_text(owner),)]


async def test_write_observer_sees_every_write_transaction(store: Store) -> None:
    seen: list[float] = []
    store.write_observer = seen.append
    with trio.fail_after(WAIT_S):
        await store.claim_session("s", "alice")
        await _say(store, "s", "hello")
        await store.history("s", 10)
    assert len(seen) == 2 and all(seconds >= 0 for seconds in seen)


# =========================================================================== PostgreSQL only


def test_escaping_is_invertible_and_leaves_ordinary_text_alone() -> None:
    for text in [
        "",
        "plain text é 日本",
        "\x00",
        "\uffff",
        "\uffff0",
        "\uffff1\x00\uffff",
        "0\x001",
    ]:
        assert unescape_text(escape_text(text)) == text
        assert "\x00" not in escape_text(text)
    assert escape_text("plain text é 日本") == "plain text é 日本"
    # A cut through an escape (substr) loses that one character, nothing else.
    assert unescape_text(escape_text("ab\x00")[:-1]) == "ab"


async def test_database_down_fails_calls_quickly_and_unhealthy_then_recovers_with_every_commit(
    postgres: PostgresServer, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The database server crashes (no checkpoint) and comes back on its own: every call
    in between fails with StorageUnavailable and no psycopg exception, `healthy()` says
    so, and afterwards the same store works again with everything committed before."""
    with trio.fail_after(WAIT_S * 3):
        async with _pg_store(pg_url) as store:
            await store.claim_session("s", "alice")
            question = await _say(store, "s", "committed before the crash")
            await _answer(store, "s", question, "answered before the crash")
            assert await store.healthy()

            await trio.to_thread.run_sync(postgres.crash)
            try:
                started = trio.current_time()
                assert not await store.healthy()
                with pytest.raises(StorageUnavailable):
                    await _say(store, "s", "while down")
                with pytest.raises(StorageUnavailable):
                    await store.history("s", 10)
                with pytest.raises(StorageUnavailable):
                    await store.claim_session("new", "bob")
                with pytest.raises(StorageUnavailable):
                    await store.delete_inactive(0)
                assert not await store.healthy()
                # Refused connects, then the backoff: no call waits for a timeout.
                assert trio.current_time() - started < HEALTH_TIMEOUT_S
            finally:
                await trio.to_thread.run_sync(postgres.start)

            # Polled: a restart sends no event. Bounded by the fail_after above.
            while not await store.healthy():  # noqa: ASYNC110
                await trio.sleep(0.05)
            after = await _say(store, "s", "after the restart")
            history = await store.history("s", 10)
    assert [m.content for m in history] == [
        "committed before the crash",
        "answered before the crash",
        "after the restart",
    ]
    assert after > question
    assert PASSWORD not in caplog.text


async def test_two_instances_on_one_database_see_each_others_writes(pg_url: str) -> None:
    with trio.fail_after(WAIT_S):
        async with _pg_store(pg_url) as one, _pg_store(pg_url) as two:
            created = await one.claim_session("s", "alice")
            resumed = await two.claim_session("s", "alice")
            question = await _say(one, "s", "asked on one", client_id="m1")
            # The turn ran on the other instance, which answers from its own view.
            assert [m.content for m in await two.history("s", 10)] == ["asked on one"]
            await _answer(two, "s", question, "answered on two")
            with pytest.raises(DuplicateMessage):
                await _say(two, "s", "the same message, retried", client_id="m1")
            chain = await one.chain_point("s")
            renamed = await two.rename_session("alice", "s", "Shared")
            listed, _ = await one.list_sessions("alice", 10, None)

            assert await two.delete_session("alice", "s")
            with pytest.raises(StorageUnavailable):
                await _say(one, "s", "into the deleted session")
            with pytest.raises(StorageUnavailable):
                await _answer(one, "s", question, "a late answer", status="interrupted")
            after_delete = await one.get_session("alice", "s")
    assert (created.resumed, resumed.resumed) == (False, True)
    assert chain.previous_response_id == f"resp-{question}" and chain.after == []
    assert renamed is not None and listed == [renamed]
    assert renamed.message_count == 2 and renamed.last_status == "completed"
    assert after_delete is None


async def test_instances_claiming_one_new_session_at_once_agree_on_one_owner(
    pg_url: str,
) -> None:
    users = ["alice", "bob", "carol", "dave"]
    claims: dict[str, store_module.SessionClaim] = {}
    with trio.fail_after(WAIT_S):
        stores = [await PostgresStore.open(pg_url) for _ in users]
        try:
            for round_number in range(5):  # a few rounds: the race is in the database
                claims.clear()
                session_id = f"s-{round_number}"

                async def claim(store: PostgresStore, user: str, session_id: str) -> None:
                    claims[user] = await store.claim_session(session_id, user)

                async with trio.open_nursery() as nursery:
                    for store, user in zip(stores, users, strict=True):
                        nursery.start_soon(claim, store, user, session_id)
                creators = [user for user, c in claims.items() if not c.resumed]
                assert len(creators) == 1
                assert {c.owner_id for c in claims.values()} == {creators[0]}
        finally:
            for store in stores:
                await store.aclose()


async def test_instances_opening_a_new_database_at_once_create_the_schema_once(
    pg_url: str,
) -> None:
    opened: list[PostgresStore] = []

    async def open_one() -> None:
        opened.append(await PostgresStore.open(pg_url))

    with trio.fail_after(WAIT_S):
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(open_one)
            await opened[0].claim_session("s", "alice")
            claim = await opened[-1].claim_session("s", "bob")
            checks = [await store.integrity_check() for store in opened]
        finally:
            for store in opened:
                await store.aclose()
    assert claim.owner_id == "alice" and checks == ["ok"] * 4
    assert _pg_execute(pg_url, "SELECT version FROM chat_schema_migrations") == [(SCHEMA_VERSION,)]


async def test_a_lock_held_elsewhere_fails_one_write_within_the_lock_timeout_while_reads_go_on(
    pg_url: str,
) -> None:
    with trio.fail_after(LOCK_TIMEOUT_S + WAIT_S):
        async with _pg_store(pg_url) as store:
            await store.claim_session("s", "alice")
            await _say(store, "s", "before the lock")
            async with _table_locked(pg_url), trio.open_nursery() as nursery:
                started = trio.current_time()
                write_failed = trio.Event()

                async def attempt_write() -> None:
                    with pytest.raises(StorageUnavailable):
                        await _say(store, "s", "stuck behind the lock")
                    write_failed.set()

                nursery.start_soon(attempt_write)
                await trio.testing.wait_all_tasks_blocked()
                history = await store.history("s", 10)
                info = await store.get_session("alice", "s")
                read_s = trio.current_time() - started
                assert not write_failed.is_set(), "the reads waited for the stuck write"
                await write_failed.wait()
                failed_after_s = trio.current_time() - started
            await _say(store, "s", "after the lock")
            after = await store.history("s", 10)
    assert [m.content for m in history] == ["before the lock"]
    assert info is not None and info.message_count == 1
    assert read_s < LOCK_TIMEOUT_S / 2
    assert LOCK_TIMEOUT_S * 0.9 <= failed_after_s < LOCK_TIMEOUT_S + 2.0
    assert [m.content for m in after] == ["before the lock", "after the lock"]


async def test_a_statement_longer_than_the_statement_timeout_fails(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Here the statement waits for a lock, with a lock timeout set longer than it."""
    statement_timeout_s = 0.5
    monkeypatch.setattr(postgres_connections, "STATEMENT_TIMEOUT_S", statement_timeout_s)
    monkeypatch.setattr(postgres_connections, "LOCK_TIMEOUT_S", 30.0)
    with trio.fail_after(WAIT_S):
        async with _pg_store(pg_url) as store:
            await store.claim_session("s", "alice")
            async with _table_locked(pg_url):
                started = trio.current_time()
                with pytest.raises(StorageUnavailable):
                    await _say(store, "s", "stuck behind the lock")
                failed_after_s = trio.current_time() - started
            await _say(store, "s", "after the lock")
    assert statement_timeout_s * 0.9 <= failed_after_s < statement_timeout_s + 2.0


async def test_a_hung_database_fails_each_call_within_its_timeout_and_recovers(
    postgres: PostgresServer, pg_url: str, monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery
) -> None:
    """No timeout of PostgreSQL's fires when it hangs, nor TCP's while the peer's kernel
    answers: the store's own call timeout cuts the connection."""
    call_timeout_s = 1.0
    monkeypatch.setattr(postgres_connections, "CALL_TIMEOUT_S", call_timeout_s)
    proxy = FreezableProxy(postgres.port)
    proxy_port = await nursery.start(proxy.serve)
    url = pg_url.replace(f":{postgres.port}/", f":{proxy_port}/")
    with trio.fail_after(WAIT_S * 2):
        async with _pg_store(url) as store:
            await store.claim_session("s", "alice")
            await _say(store, "s", "before the hang")
            assert await store.healthy()

            proxy.freeze()
            started = trio.current_time()
            assert not await store.healthy()
            health_s = trio.current_time() - started
            with pytest.raises(StorageUnavailable):
                await _say(store, "s", "into the hang")
            write_s = trio.current_time() - started - health_s
            with pytest.raises(StorageUnavailable):
                await store.history("s", 10)
            read_s = trio.current_time() - started - health_s - write_s

            proxy.thaw()
            # Polled: nothing announces that the server answers again. Bounded above.
            while not await store.healthy():  # noqa: ASYNC110
                await trio.sleep(0.05)
            await _say(store, "s", "after the hang")
            history = await store.history("s", 10)
    assert HEALTH_TIMEOUT_S * 0.9 <= health_s < HEALTH_TIMEOUT_S + 1.0
    assert call_timeout_s * 0.9 <= write_s < call_timeout_s + 1.0
    assert call_timeout_s * 0.9 <= read_s < call_timeout_s + 1.0
    assert [m.content for m in history] == ["before the hang", "after the hang"]


async def test_an_unreachable_database_refuses_to_open_without_showing_the_password(
    postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(WAIT_S):
        nobody = postgres.url("postgres").replace(f":{postgres.port}/", ":1/")
        with pytest.raises(StorageUnavailable) as refused:
            await open_store(nobody)
        wrong = postgres.url("postgres", password="wrong-password-DO-NOT-LEAK")
        with pytest.raises(StorageUnavailable) as denied:
            await open_store(wrong)
        with pytest.raises(ValueError) as malformed:
            await open_store(f"postgresql://{PASSWORD}@[::1")
    assert "127.0.0.1:1/postgres" in str(refused.value)
    assert "authentication failed" in str(denied.value)
    for text in (str(refused.value), str(denied.value), str(malformed.value), caplog.text):
        assert PASSWORD not in text and "wrong-password" not in text


async def test_a_database_migrated_by_a_newer_server_is_refused(pg_url: str) -> None:
    with trio.fail_after(WAIT_S):
        async with _pg_store(pg_url):
            pass
        _pg_execute(
            pg_url,
            "INSERT INTO chat_schema_migrations VALUES (%s, %s)",
            (SCHEMA_VERSION + 1, OLD),
        )
        with pytest.raises(StorageUnavailable, match="newer"):
            await PostgresStore.open(pg_url)


async def test_test_databases_sort_text_unlike_bytes_where_the_server_can(
    postgres: PostgresServer, pg_url: str
) -> None:
    """So that the bytewise tie test above shows a forgotten "C" collation."""
    if not postgres.icu:
        pytest.skip("this PostgreSQL has no ICU: test databases sort as bytes anyway")
    query = "SELECT x FROM (VALUES ('B'), ('a')) AS v (x) ORDER BY x"
    with trio.fail_after(WAIT_S):
        rows = await trio.to_thread.run_sync(_pg_execute, pg_url, query)
    assert rows == [("a",), ("B",)]
