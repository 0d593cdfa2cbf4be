"""SessionStore on real SQLite files: hardening against a vanished file and an outside
lock, the migration of an older file, and the storage of the Sessions API.

Rules: a real database file in `tmp_path` (`":memory:"` only where that path is the
rule), a `trio.fail_after` bound on every test, events awaited rather than sleeps.
Another process is played by a plain `sqlite3` connection, in another thread when it
must hold a lock while the store works.
"""

from __future__ import annotations

import base64
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import store as store_module
from protocol import DuplicateMessage, StorageUnavailable, TurnStatus
from store import (
    BUSY_TIMEOUT_S,
    DEFAULT_TITLE,
    TITLE_MAX_CHARS,
    SessionInfo,
    SessionStore,
    ToolCallRecord,
)

WAIT_S = 10.0  # the bound of a test that waits on nothing slower than the disk
OLD = "2020-01-01T00:00:00.000Z"  # long before any test runs


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SessionStore]:
    opened = await SessionStore.open(db_path)
    try:
        yield opened
    finally:
        await opened.aclose()


def _execute(db: Path, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """One statement on a connection of its own, as another process would run it."""
    connection = sqlite3.connect(db, isolation_level=None)
    try:
        return connection.execute(sql, parameters).fetchall()
    finally:
        connection.close()


def _set_updated_at(db: Path, session_id: str, updated_at: str) -> None:
    _execute(db, "UPDATE sessions SET updated_at = ? WHERE id = ?", (updated_at, session_id))


async def _say(
    store: SessionStore, session_id: str, content: str, *, client_id: str | None = None
) -> int:
    message = await store.add_user_message(
        session_id, content, client_message_id=client_id, metadata=None
    )
    return message.id


async def _answer(
    store: SessionStore,
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


@asynccontextmanager
async def _outside_write_lock(db: Path) -> AsyncIterator[None]:
    """Another process holding the write lock (`BEGIN IMMEDIATE`) until the block ends."""
    locked = trio.Event()
    release = threading.Event()

    def hold() -> None:
        connection = sqlite3.connect(db, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            trio.from_thread.run_sync(locked.set)
            release.wait(timeout=60)  # bounded even if the test forgot to release
            connection.execute("ROLLBACK")
        finally:
            connection.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, hold)
        await locked.wait()
        try:
            yield
        finally:
            release.set()


# =========================================================================== hardening


async def test_deleted_database_file_refuses_every_write_and_reports_unhealthy(
    db_path: Path,
) -> None:
    with trio.fail_after(WAIT_S):
        store = await SessionStore.open(db_path)
        try:
            await store.claim_session("s", "alice")
            await _say(store, "s", "kept")
            assert await store.healthy()

            await trio.Path(db_path).unlink()

            assert not await store.healthy()
            with pytest.raises(StorageUnavailable):
                await _say(store, "s", "would vanish with the unlinked file")
            with pytest.raises(StorageUnavailable):
                await store.claim_session("new", "bob")
            with pytest.raises(StorageUnavailable):
                await store.rename_session("alice", "s", "renamed")
            # Not self-healing: still refused, still unhealthy.
            with pytest.raises(StorageUnavailable):
                await _say(store, "s", "again")
            assert not await store.healthy()
            # What was acknowledged can still be read; nothing refused was written.
            assert [m.content for m in await store.history("s", 10)] == ["kept"]
        finally:
            await store.aclose()


async def test_replaced_database_file_refuses_writes_and_close_leaves_both_files_whole(
    db_path: Path, tmp_path: Path
) -> None:
    """An operator moves the live file away and a restored one in. The store writes
    nothing more, and on close empties its WAL into the file it opened: the moved
    file holds every acknowledged message, and the WAL left at the path does not
    replay the old file's pages onto the new one."""
    moved, restored = tmp_path / "moved.db", tmp_path / "restored.db"
    _execute(restored, "CREATE TABLE restored (x)")
    with trio.fail_after(WAIT_S):
        store = await SessionStore.open(db_path)
        try:
            await store.claim_session("s", "alice")
            await _say(store, "s", "acknowledged")
            await trio.Path(db_path).rename(moved)
            await trio.Path(restored).rename(db_path)

            assert not await store.healthy()
            with pytest.raises(StorageUnavailable):
                await _say(store, "s", "must not land anywhere")
            with pytest.raises(StorageUnavailable):
                await store.delete_inactive(0)
        finally:
            await store.aclose()
    assert _execute(db_path, "SELECT name FROM sqlite_master") == [("restored",)]
    assert _execute(moved, "SELECT content FROM messages") == [("acknowledged",)]


async def test_memory_database_has_no_file_to_lose_and_works_with_one_connection() -> None:
    with trio.fail_after(WAIT_S):
        store = await SessionStore.open(":memory:")
        try:
            assert await store.healthy()
            await store.claim_session("s", "alice")
            question = await _say(store, "s", "hello")
            await _answer(store, "s", question, "hi")
            assert [m.content for m in await store.history("s", 10)] == ["hello", "hi"]
            sessions, next_cursor = await store.list_sessions("alice", 10, None)
            assert [s.id for s in sessions] == ["s"] and next_cursor is None
        finally:
            await store.aclose()


@pytest.mark.parametrize("write", ["add_user_message", "claim_session"])
async def test_outside_write_lock_fails_one_write_within_busy_timeout_while_reads_go_on(
    store: SessionStore, db_path: Path, write: str
) -> None:
    with trio.fail_after(BUSY_TIMEOUT_S + WAIT_S):
        await store.claim_session("other", "bob")
        await _say(store, "other", "bob's question")
        await store.claim_session("mine", "alice")

        async with _outside_write_lock(db_path):
            started = trio.current_time()
            write_failed = trio.Event()

            async def attempt_write() -> None:
                with pytest.raises(StorageUnavailable):
                    if write == "add_user_message":
                        await _say(store, "mine", "stuck behind the lock")
                    else:
                        await store.claim_session("brand-new", "carol")
                write_failed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attempt_write)
                await trio.testing.wait_all_tasks_blocked()  # the write is in its thread
                history = await store.history("other", 10)
                info = await store.get_session("bob", "other")
                read_s = trio.current_time() - started
                assert not write_failed.is_set(), "the reads waited for the stuck write"
            failed_after_s = trio.current_time() - started

        assert [m.content for m in history] == ["bob's question"]
        assert info is not None and info.message_count == 1
        assert read_s < BUSY_TIMEOUT_S / 2
        assert BUSY_TIMEOUT_S * 0.9 <= failed_after_s < BUSY_TIMEOUT_S + 2.0
        # The lock is gone: writes work again, by themselves.
        await _say(store, "mine", "after the lock")
        assert [m.content for m in await store.history("mine", 10)] == ["after the lock"]


# =========================================================================== migration

_OLD_SCHEMA = """
CREATE TABLE sessions (
    id          TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE messages (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id         TEXT NOT NULL REFERENCES sessions(id),
    role               TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
    anchor             INTEGER NOT NULL,
    content            TEXT NOT NULL,
    status             TEXT,
    created_at         TEXT NOT NULL,
    client_message_id  TEXT,
    metadata           TEXT,
    turn_id            TEXT,
    response_id        TEXT,
    name               TEXT,
    call_id            TEXT,
    arguments          TEXT,
    output             TEXT
);
CREATE UNIQUE INDEX messages_client_id
    ON messages (session_id, client_message_id) WHERE client_message_id IS NOT NULL;
CREATE INDEX messages_in_order ON messages (session_id, anchor, id);
INSERT INTO sessions VALUES ('talked', 'alice', '2026-01-01T00:00:00.000Z');
INSERT INTO sessions VALUES ('silent', 'alice', '2026-01-05T00:00:00.000Z');
INSERT INTO messages (id, session_id, role, anchor, content, created_at, client_message_id)
    VALUES (1, 'talked', 'user', 1, 'Where is my parcel?', '2026-01-02T00:00:00.000Z', 'c1');
INSERT INTO messages (id, session_id, role, anchor, content, status, created_at, response_id)
    VALUES (2, 'talked', 'assistant', 1, 'On its way.', 'completed',
            '2026-01-03T00:00:00.000Z', 'resp-1');
"""


def _session_columns(db: Path) -> list[tuple[Any, ...]]:
    return _execute(db, "PRAGMA table_info(sessions)")


async def test_old_database_is_migrated_in_place_with_activity_from_its_messages(
    db_path: Path, tmp_path: Path
) -> None:
    connection = sqlite3.connect(db_path)
    connection.executescript(_OLD_SCHEMA)
    connection.close()
    with trio.fail_after(WAIT_S):
        store = await SessionStore.open(db_path)
        try:
            assert await store.get_session("alice", "talked") == SessionInfo(
                id="talked",
                title="Where is my parcel?",
                created_at="2026-01-01T00:00:00.000Z",
                updated_at="2026-01-03T00:00:00.000Z",  # its latest message
                message_count=2,
                last_status="completed",
            )
            assert await store.get_session("alice", "silent") == SessionInfo(
                id="silent",
                title=DEFAULT_TITLE,
                created_at="2026-01-05T00:00:00.000Z",
                updated_at="2026-01-05T00:00:00.000Z",  # no message: its creation
                message_count=0,
                last_status=None,
            )
            sessions, _ = await store.list_sessions("alice", 10, None)
            assert [s.id for s in sessions] == ["silent", "talked"]
            # The old rows still work as before: chain, duplicate ids, new activity.
            chain = await store.chain_point("talked")
            assert chain.previous_response_id == "resp-1" and chain.after == []
            with pytest.raises(DuplicateMessage):
                await _say(store, "talked", "again", client_id="c1")
            await _say(store, "talked", "And now?")
            sessions, _ = await store.list_sessions("alice", 10, None)
            assert [s.id for s in sessions] == ["talked", "silent"]
        finally:
            await store.aclose()
        # Opening the migrated file again changes nothing.
        reopened = await SessionStore.open(db_path)
        try:
            info = await reopened.get_session("alice", "talked")
            assert info is not None and info.message_count == 3
        finally:
            await reopened.aclose()
        fresh = await SessionStore.open(tmp_path / "fresh.db")
        await fresh.aclose()
    assert _session_columns(db_path) == _session_columns(tmp_path / "fresh.db")


# =========================================================================== sessions API


async def test_pages_hold_every_session_once_most_recently_active_first_ties_by_id(
    store: SessionStore, db_path: Path
) -> None:
    # Activity out of id order, with ties that straddle page boundaries.
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
            _set_updated_at(db_path, session_id, updated_at)

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
    # A page that ends exactly at the last session is the last page.
    assert [s.id for s in everything] == ["s2", "s0", "s5", "s3", "s6", "s4", "s1"]
    assert last is None


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "not base64!",
        base64.urlsafe_b64encode(b"not json").decode(),
        base64.urlsafe_b64encode(b'{"updated_at": "x"}').decode(),
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(b'["a", "b", "c"]').decode(),
        "é",
    ],
)
async def test_malformed_cursor_is_a_value_error(store: SessionStore, cursor: str) -> None:
    with trio.fail_after(WAIT_S), pytest.raises(ValueError):
        await store.list_sessions("alice", 3, cursor)


async def test_limit_below_one_is_a_value_error(store: SessionStore) -> None:
    with trio.fail_after(WAIT_S), pytest.raises(ValueError):
        await store.list_sessions("alice", 0, None)


async def test_another_users_session_is_invisible_and_untouchable(store: SessionStore) -> None:
    with trio.fail_after(WAIT_S):
        await store.claim_session("bobs", "bob")
        await _say(store, "bobs", "private")
        await store.claim_session("alices", "alice")

        sessions, _ = await store.list_sessions("alice", 10, None)
        assert [s.id for s in sessions] == ["alices"]
        assert await store.get_session("alice", "bobs") is None
        assert await store.rename_session("alice", "bobs", "mine now") is None
        assert await store.export_session("alice", "bobs") is None
        assert await store.delete_session("alice", "bobs") is False

        info = await store.get_session("bob", "bobs")
    assert info is not None and info.title == "private" and info.message_count == 1


async def test_title_defaults_to_the_first_line_of_the_first_user_message(
    store: SessionStore,
) -> None:
    long_line = "Please look into the invoice I got last week " + "x" * 100
    with trio.fail_after(WAIT_S):
        for session_id in ("empty", "lines", "long", "blank"):
            await store.claim_session(session_id, "alice")
        await _say(store, "lines", "  \n\n  Fix   the\tlogin page  \nIt fails with 500.")
        await _say(store, "lines", "Second message is not the title")
        await _say(store, "long", long_line)
        await _say(store, "blank", " \n\t ")
        titles = {
            session_id: info.title
            for session_id in ("empty", "lines", "long", "blank")
            if (info := await store.get_session("alice", session_id)) is not None
        }
    assert titles["empty"] == DEFAULT_TITLE
    assert titles["lines"] == "Fix the login page"
    assert titles["long"] == "Please look into the invoice I got last week…"
    assert len(titles["long"]) <= TITLE_MAX_CHARS
    assert titles["blank"] == DEFAULT_TITLE


async def test_rename_sets_the_title_and_does_not_count_as_activity(
    store: SessionStore, db_path: Path
) -> None:
    with trio.fail_after(WAIT_S):
        await store.claim_session("a", "alice")
        await _say(store, "a", "first words")
        _set_updated_at(db_path, "a", OLD)

        renamed = await store.rename_session("alice", "a", "Parcel trouble")

    assert renamed is not None
    assert renamed.title == "Parcel trouble" and renamed.updated_at == OLD


async def test_every_stored_message_and_turn_moves_the_session_to_the_front(
    store: SessionStore, db_path: Path
) -> None:
    with trio.fail_after(WAIT_S):
        await store.claim_session("a", "alice")
        await store.claim_session("b", "alice")
        _set_updated_at(db_path, "a", OLD)
        _set_updated_at(db_path, "b", "2020-01-02T00:00:00.000Z")

        question = await _say(store, "a", "question")
        after_message = await store.get_session("alice", "a")
        _set_updated_at(db_path, "a", OLD)
        await _answer(store, "a", question, "partial", status="stopped")
        after_turn, _ = await store.list_sessions("alice", 10, None)
        resumed = await store.claim_session("b", "alice")
        after_claim = await store.get_session("alice", "b")

    assert after_message is not None and after_message.updated_at > OLD
    assert [s.id for s in after_turn] == ["a", "b"]
    assert after_turn[0].last_status == "stopped"
    assert resumed.resumed and after_claim is not None
    assert after_claim.updated_at == "2020-01-02T00:00:00.000Z"  # a claim is no activity


async def test_deleted_session_id_can_be_claimed_anew_by_another_user(
    store: SessionStore,
) -> None:
    with trio.fail_after(WAIT_S):
        await store.claim_session("s", "alice")
        question = await _say(store, "s", "alice's secret", client_id="c1")

        assert await store.delete_session("alice", "s") is True
        assert await store.get_session("alice", "s") is None
        assert await store.history("s", 10) == []
        assert await store.delete_session("alice", "s") is False

        claim = await store.claim_session("s", "bob")
        assert (claim.owner_id, claim.resumed, claim.history_length) == ("bob", False, 0)
        # Alice's turn, still finishing when her session was deleted, lands nowhere.
        with pytest.raises(StorageUnavailable):
            await _answer(store, "s", question, "alice's answer", status="interrupted")
        # Bob may use the client ids Alice used: they belonged to another session.
        await _say(store, "s", "bob's question", client_id="c1")

        info = await store.get_session("bob", "s")
        alices, _ = await store.list_sessions("alice", 10, None)
        history = await store.history("s", 10)
    assert info is not None and info.title == "bob's question" and info.message_count == 1
    assert alices == []
    assert [m.content for m in history] == ["bob's question"]


async def test_message_into_a_deleted_session_is_storage_unavailable_not_duplicate(
    store: SessionStore,
) -> None:
    with trio.fail_after(WAIT_S):
        await store.claim_session("s", "alice")
        await store.delete_session("alice", "s")
        with pytest.raises(StorageUnavailable):
            await _say(store, "s", "too late", client_id="c1")


async def test_export_is_the_whole_conversation_in_order_answers_after_their_questions(
    store: SessionStore,
) -> None:
    call = ToolCallRecord("call-1", "lookup", '{"order": 7}', output="shipped", status="completed")
    with trio.fail_after(WAIT_S):
        await store.claim_session("s", "alice")
        first = await _say(store, "s", "Where is order 7?")
        second = await _say(store, "s", "And order 8?")  # queued before the first answer
        await _answer(store, "s", first, "Order 7 shipped.", tool_calls=[call])
        await _answer(store, "s", second, "Order 8 is", status="stopped")

        exported = await store.export_session("alice", "s")

    assert exported is not None
    info, messages = exported
    assert [(m.role, m.content) for m in messages] == [
        ("user", "Where is order 7?"),
        ("tool", "shipped"),
        ("assistant", "Order 7 shipped."),
        ("user", "And order 8?"),
        ("assistant", "Order 8 is"),
    ]
    assert info.message_count == 5 and info.last_status == "stopped"


async def test_delete_inactive_removes_only_sessions_idle_longer_than_the_age(
    store: SessionStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_PURGE_BATCH_SESSIONS", 2)  # several batches
    stale = [f"stale-{n}" for n in range(5)]
    with trio.fail_after(WAIT_S):
        for n, session_id in enumerate(stale):
            await store.claim_session(session_id, "alice" if n % 2 else "bob")
            await _say(store, session_id, "old news")
            _set_updated_at(db_path, session_id, OLD)
        await store.claim_session("fresh", "alice")
        await _say(store, "fresh", "new news")

        deleted = await store.delete_inactive(3600)

        remaining, _ = await store.list_sessions("alice", 10, None)
        with pytest.raises(ValueError):
            await store.delete_inactive(-1)
    assert sorted(deleted) == stale
    assert [s.id for s in remaining] == ["fresh"]
    assert _execute(db_path, "SELECT DISTINCT session_id FROM messages") == [("fresh",)]
