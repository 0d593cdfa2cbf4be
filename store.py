"""Sessions and their history in SQLite: the only module that touches the database.

Resource handling: one `SessionStore` owns one SQLite connection in WAL mode. Every
call runs in a worker thread through a limiter of one (`trio.to_thread.run_sync`),
so the event loop never waits on the disk and the connection is never used by two
threads at once. Each public method is one transaction: a message row is either
committed whole or not at all, which is what makes `kill -9` safe.

Error handling: a duplicate client message id raises `protocol.DuplicateMessage`;
a database that refuses a write (disk full, read-only file, locked) raises
`protocol.StorageUnavailable`. Nothing else escapes as an SQLite exception.

Order: a conversation reads in `(anchor, id)` order. A user message anchors at its
own id; the tool calls and the answer of its turn anchor at that message. So an
answer stored after later messages were queued still follows its question, and
"everything after the last completed response" includes those queued messages.

Durability: `synchronous=NORMAL` in WAL mode survives a killed process (the WAL
is in the OS before commit returns); only a power cut can lose the last commits.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from protocol import DuplicateMessage, StorageUnavailable, TurnStatus, utc_timestamp

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id          TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
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
CREATE UNIQUE INDEX IF NOT EXISTS messages_client_id
    ON messages (session_id, client_message_id) WHERE client_message_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_in_order ON messages (session_id, anchor, id);
"""

_NO_LIMIT = 2**63 - 1  # SQLite's largest integer: "no upper bound" on anchors
_COLUMNS = (
    "id, session_id, role, content, status, created_at, client_message_id, "
    "turn_id, response_id, name, call_id, arguments, output"
)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One history row. Tool rows carry name, call_id, arguments (JSON text) and output."""

    id: int
    session_id: str
    role: str
    content: str
    status: str | None
    created_at: str
    client_message_id: str | None = None
    turn_id: str | None = None
    response_id: str | None = None
    name: str | None = None
    call_id: str | None = None
    arguments: str | None = None
    output: str | None = None


@dataclass(slots=True)
class ToolCallRecord:
    """A tool call of a running turn; `output` and `status` are set when it resolves."""

    call_id: str
    name: str
    arguments: str
    output: str = ""
    status: str = "pending"


@dataclass(frozen=True, slots=True)
class SessionClaim:
    owner_id: str
    resumed: bool
    history_length: int


@dataclass(frozen=True, slots=True)
class ChainPoint:
    """Where the next turn continues: the last completed upstream response, and what
    was stored after it (unanswered messages, partial answers, tool calls)."""

    previous_response_id: str | None
    after: list[StoredMessage]


class SessionStore:
    """The database. Open with `SessionStore.open(path)`; close with `aclose()`."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        self._limiter = trio.CapacityLimiter(1)
        self.write_observer: Callable[[float], None] | None = None

    @classmethod
    async def open(cls, path: str | Path) -> SessionStore:
        """Open or create the database file and its schema. Raises sqlite3.Error if the
        file cannot be opened (the server refuses to start)."""
        return await trio.to_thread.run_sync(cls._open_sync, str(path))

    @classmethod
    def _open_sync(cls, path: str) -> SessionStore:
        connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")
        connection.execute("PRAGMA busy_timeout=5000")
        connection.executescript(_SCHEMA)
        return cls(connection)

    async def aclose(self) -> None:
        """Close the database. In the worker thread: closing checkpoints the WAL,
        which takes tens of milliseconds the event loop should not wait through."""
        await trio.to_thread.run_sync(self._db.close, limiter=self._limiter)

    async def _run(self, work: Callable[[], _T], *, write: bool) -> _T:
        started = time.perf_counter()
        try:
            return await trio.to_thread.run_sync(work, limiter=self._limiter)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.OperationalError as exc:
            raise StorageUnavailable() from exc
        finally:
            if write and self.write_observer is not None:
                self.write_observer(time.perf_counter() - started)

    def _transaction(self, work: Callable[[sqlite3.Connection], _T]) -> Callable[[], _T]:
        def run() -> _T:
            with self._db:  # one transaction: committed whole or rolled back
                self._db.execute("BEGIN IMMEDIATE")
                return work(self._db)

        return run

    # ------------------------------------------------------------------ sessions

    async def claim_session(self, session_id: str, user_id: str) -> SessionClaim:
        """Create the session for `user_id` if new; report its owner either way."""

        def claim(db: sqlite3.Connection) -> SessionClaim:
            row = db.execute("SELECT owner FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO sessions (id, owner, created_at) VALUES (?, ?, ?)",
                    (session_id, user_id, utc_timestamp()),
                )
                return SessionClaim(owner_id=user_id, resumed=False, history_length=0)
            (count,) = db.execute(
                "SELECT COUNT(*) FROM messages WHERE session_id = ?", (session_id,)
            ).fetchone()
            return SessionClaim(owner_id=row[0], resumed=True, history_length=count)

        return await self._run(self._transaction(claim), write=True)

    # ------------------------------------------------------------------ writes

    async def add_user_message(
        self,
        session_id: str,
        content: str,
        *,
        client_message_id: str | None,
        metadata: dict[str, Any] | None,
    ) -> StoredMessage:
        """Commit one user message. Raises DuplicateMessage if its client id was seen."""
        created_at = utc_timestamp()
        metadata_json = json.dumps(metadata) if metadata is not None else None

        def insert(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "INSERT INTO messages (session_id, role, anchor, content, created_at,"
                " client_message_id, metadata) VALUES (?, 'user', 0, ?, ?, ?, ?)",
                (session_id, content, created_at, client_message_id, metadata_json),
            )
            row_id = _row_id(cursor)
            db.execute("UPDATE messages SET anchor = id WHERE id = ?", (row_id,))
            return row_id

        try:
            row_id = await self._run(self._transaction(insert), write=True)
        except sqlite3.IntegrityError:
            raise DuplicateMessage() from None
        return StoredMessage(
            id=row_id,
            session_id=session_id,
            role="user",
            content=content,
            status=None,
            created_at=created_at,
            client_message_id=client_message_id,
        )

    async def finish_turn(
        self,
        session_id: str,
        *,
        reply_to: int,
        turn_id: str,
        content: str,
        status: TurnStatus,
        response_id: str | None,
        tool_calls: list[ToolCallRecord],
    ) -> int:
        """Commit a finished turn, whatever its status, in one transaction: its tool calls
        (each with an output, so the upstream context never holds a call without one)
        and then the assistant message. Returns the assistant row id."""
        created_at = utc_timestamp()

        def insert(db: sqlite3.Connection) -> int:
            db.executemany(
                "INSERT INTO messages (session_id, role, anchor, content, status, created_at,"
                " turn_id, name, call_id, arguments, output)"
                " VALUES (?, 'tool', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        session_id,
                        reply_to,
                        call.output,
                        call.status,
                        created_at,
                        turn_id,
                        call.name,
                        call.call_id,
                        call.arguments,
                        call.output,
                    )
                    for call in tool_calls
                ],
            )
            cursor = db.execute(
                "INSERT INTO messages (session_id, role, anchor, content, status, created_at,"
                " turn_id, response_id) VALUES (?, 'assistant', ?, ?, ?, ?, ?, ?)",
                (session_id, reply_to, content, status, created_at, turn_id, response_id),
            )
            return _row_id(cursor)

        return await self._run(self._transaction(insert), write=True)

    # ------------------------------------------------------------------ reads

    async def history(self, session_id: str, limit: int) -> list[StoredMessage]:
        """The latest `limit` messages, oldest first."""

        def read() -> list[StoredMessage]:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE session_id = ?"
                " ORDER BY anchor DESC, id DESC LIMIT ?",
                (session_id, limit),
            ).fetchall()
            return [StoredMessage(*row) for row in reversed(rows)]

        return await self._run(read, write=False)

    async def full_history(
        self, session_id: str, *, up_to: int | None = None
    ) -> list[StoredMessage]:
        """Every message of the session, oldest first; with `up_to`, only the part of the
        conversation up to (and including the turn of) that user message."""
        last_anchor = up_to if up_to is not None else _NO_LIMIT

        def read() -> list[StoredMessage]:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE session_id = ? AND anchor <= ?"
                " ORDER BY anchor, id",
                (session_id, last_anchor),
            ).fetchall()
            return [StoredMessage(*row) for row in rows]

        return await self._run(read, write=False)

    async def chain_point(self, session_id: str, *, up_to: int | None = None) -> ChainPoint:
        """The last completed upstream response and everything stored after it (with
        `up_to`: up to and including that user message's turn)."""
        last_anchor = up_to if up_to is not None else _NO_LIMIT

        def read() -> ChainPoint:
            last = self._db.execute(
                "SELECT anchor, id, response_id FROM messages WHERE session_id = ?"
                " AND role = 'assistant' AND status = 'completed' AND response_id IS NOT NULL"
                " AND anchor <= ? ORDER BY anchor DESC, id DESC LIMIT 1",
                (session_id, last_anchor),
            ).fetchone()
            anchor, after_id, response_id = last if last is not None else (0, 0, None)
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE session_id = ?"
                " AND (anchor > ? OR (anchor = ? AND id > ?)) AND anchor <= ?"
                " ORDER BY anchor, id",
                (session_id, anchor, anchor, after_id, last_anchor),
            ).fetchall()
            return ChainPoint(response_id, [StoredMessage(*row) for row in rows])

        return await self._run(read, write=False)

    async def integrity_check(self) -> str:
        """SQLite's own verdict on the file: 'ok' when sound."""

        def check() -> str:
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

        return await self._run(check, write=False)


def _row_id(cursor: sqlite3.Cursor) -> int:
    assert cursor.lastrowid is not None  # an INSERT always sets it
    return cursor.lastrowid


def backup_database(source: str | Path, destination: str | Path) -> None:
    """Copy a live database with SQLite's online backup API: a consistent snapshot,
    taken while the server keeps writing. Refuses to overwrite `destination`."""
    if Path(destination).exists():
        raise FileExistsError(f"{destination} exists")
    if not Path(source).is_file():
        raise FileNotFoundError(f"no database at {source}")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(str(destination))
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
