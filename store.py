"""Sessions and their history in SQLite: the only module that touches a SQLite database.

`Store` is the API every store has, this module's `SessionStore` and
`chat.postgres_store.PostgresStore` (instances on several hosts sharing PostgreSQL),
with the same semantics; `open_store` picks one by `--db`. What does not depend on
the SQL (default titles, list cursors and pages, the retention cutoff) is at the end
of this module, under "shared logic", and both use it.

Resource handling: one `SessionStore` owns two SQLite connections to one file in
WAL mode, each used by one worker thread at a time through its own limiter of one
(`trio.to_thread.run_sync`), so the event loop never waits on the disk and no
connection is ever used by two threads at once.

- The *writer* runs every write (claims, messages, turns, renames, deletions), one
  transaction per public method, taken with `BEGIN IMMEDIATE`: a message row is
  either committed whole or not at all, which is what makes `kill -9` safe.
- The *reader* (`query_only`) runs every read, each in one read transaction, so a
  read sees one consistent snapshot. In WAL mode a reader never waits for a
  writer: a write stuck behind another process's lock delays no history, list or
  export, and no other session's reads.
- A database that is not a file in WAL mode (`":memory:"`, a temporary database, a
  file system where WAL cannot work) has one connection and one thread for both.

Health: the store remembers the device and inode of the file it opened. Before every
write, and in `healthy()`, it checks that the path still names that file. A file
deleted or replaced under a running server would otherwise take acknowledged
messages into an unlinked inode that nobody will ever read again; instead every
write fails with `StorageUnavailable` and `healthy()` is false until an operator
restarts the server (the store does not reopen by itself: a file that vanished is
an incident, not a retry). Closing such a store first empties its WAL into the file
it opened, so the WAL file left at the path is not replayed onto a replacement.

Error handling: a duplicate client message id raises `protocol.DuplicateMessage`;
a database that refuses a write (disk full, read-only file, deleted or replaced
file, locked for longer than `BUSY_TIMEOUT_S`) raises `protocol.StorageUnavailable`,
as does a write into a session deleted meanwhile. Nothing else escapes as an
SQLite exception. A malformed pagination cursor raises ValueError.

Order: a conversation reads in `(anchor, id)` order. A user message anchors at its
own id; the tool calls and the answer of its turn anchor at that message. So an
answer stored after later messages were queued still follows its question, and
"everything after the last completed response" includes those queued messages.
Message ids are never reused (AUTOINCREMENT), not even after a session is deleted.

Time: every timestamp is `protocol.utc_timestamp()`, fixed width with a `Z`
(`2026-11-22T10:00:00.123Z`), so comparing and ordering the strings compares and
orders the instants; the SQL below relies on it.

Durability: `synchronous=NORMAL` in WAL mode survives a killed process (the WAL
is in the OS before commit returns); only a power cut can lose the last commits.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from protocol import DuplicateMessage, StorageUnavailable, TurnStatus, utc_timestamp

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# How long SQLite waits for a lock another process holds (another instance on the
# same file, a backup tool, an operator's sqlite3 shell) before the write fails with
# StorageUnavailable. Well below the server's 10 s handshake and 20 s send timeouts,
# so one stuck write fails its own request instead of running those out for others;
# far above any commit of another instance (milliseconds), so sharing a file works.
BUSY_TIMEOUT_S = 2.0

DEFAULT_TITLE = "New chat"  # a session with no user message yet
TITLE_MAX_CHARS = 60  # a default title, "…" included: one line of a session list
# The part of the first user message read for its default title: its first line's
# first TITLE_MAX_CHARS characters, with room for whitespace collapsed away.
TITLE_SOURCE_CHARS = 4 * TITLE_MAX_CHARS
# Sessions deleted per transaction by `delete_inactive`: a large purge takes the
# write lock many times briefly, so live messages get their turns in between.
_PURGE_BATCH_SESSIONS = 500

# The sessions table as first released: the columns added since are added by
# `_migrate` to new and old files alike, so both end up with one schema.
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

_ADDED_SESSION_COLUMNS = (
    ("title", "TEXT"),  # NULL: the default title, from the first user message
    # ADD COLUMN ... NOT NULL needs a default; `_migrate` fills every row at once.
    ("updated_at", "TEXT NOT NULL DEFAULT ''"),
)
_SESSION_INDEXES = (
    # list_sessions: one owner's sessions by (updated_at, id), read backwards.
    "CREATE INDEX IF NOT EXISTS sessions_by_owner_activity ON sessions (owner, updated_at, id)",
    # delete_inactive: every owner's sessions idle since before a cutoff.
    "CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions (updated_at)",
)

_NO_LIMIT = 2**63 - 1  # SQLite's largest integer: "no upper bound" on anchors
_COLUMNS = (
    "id, session_id, role, content, status, created_at, client_message_id, "
    "turn_id, response_id, name, call_id, arguments, output"
)
_SESSION_INFO = f"""
SELECT s.id, s.title, s.created_at, s.updated_at,
    (SELECT COUNT(*) FROM messages AS m WHERE m.session_id = s.id),
    CASE WHEN s.title IS NULL THEN
        (SELECT substr(ltrim(m.content, char(9, 10, 13, 32)), 1, {TITLE_SOURCE_CHARS})
         FROM messages AS m WHERE m.session_id = s.id AND m.role = 'user'
         ORDER BY m.anchor, m.id LIMIT 1)
    END,
    (SELECT m.status FROM messages AS m WHERE m.session_id = s.id AND m.role = 'assistant'
     ORDER BY m.anchor DESC, m.id DESC LIMIT 1)
FROM sessions AS s
"""
SESSION_DELETED_MESSAGE = "This conversation was deleted; nothing was saved."


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


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One session as the Sessions API lists it (`running` is the server's to add).

    `title` is the owner's title, or else the start of the first user message (its
    first line, at most TITLE_MAX_CHARS characters, "…" when cut), or DEFAULT_TITLE.
    `updated_at` is the time of the last stored message or turn (a rename is not
    activity). `message_count` counts every history entry, tool calls included, as
    `connected.history_length` does. `last_status` is the status of the last
    assistant message, or None before the first answer."""

    id: str
    title: str
    created_at: str
    updated_at: str
    message_count: int
    last_status: str | None


POSTGRES_URL_SCHEMES = ("postgresql://", "postgres://")  # what libpq takes as a URL


class Store(Protocol):
    """The public API of a session store, which `SessionStore` (SQLite, this module) and
    `chat.postgres_store.PostgresStore` (PostgreSQL) share, with the same semantics:
    the same dataclasses, the same errors (`DuplicateMessage`, `StorageUnavailable`,
    ValueError for a bad list request or age), the same order, chain point, titles,
    cursors and retention. The server holds one through this type; `open_store`
    picks which."""

    # Called with the seconds each write transaction took (a metric), when set.
    write_observer: Callable[[float], None] | None

    async def aclose(self) -> None: ...
    async def healthy(self) -> bool: ...
    async def integrity_check(self) -> str: ...
    async def claim_session(self, session_id: str, user_id: str) -> SessionClaim: ...
    async def add_user_message(
        self,
        session_id: str,
        content: str,
        *,
        client_message_id: str | None,
        metadata: dict[str, Any] | None,
    ) -> StoredMessage: ...
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
    ) -> int: ...
    async def history(self, session_id: str, limit: int) -> list[StoredMessage]: ...
    async def full_history(
        self, session_id: str, *, up_to: int | None = None
    ) -> list[StoredMessage]: ...
    async def chain_point(self, session_id: str, *, up_to: int | None = None) -> ChainPoint: ...
    async def list_sessions(
        self, owner_id: str, limit: int, cursor: str | None = None
    ) -> tuple[list[SessionInfo], str | None]: ...
    async def get_session(self, owner_id: str, session_id: str) -> SessionInfo | None: ...
    async def rename_session(
        self, owner_id: str, session_id: str, title: str
    ) -> SessionInfo | None: ...
    async def delete_session(self, owner_id: str, session_id: str) -> bool: ...
    async def export_session(
        self, owner_id: str, session_id: str
    ) -> tuple[SessionInfo, list[StoredMessage]] | None: ...
    async def delete_inactive(self, older_than_s: float) -> list[str]: ...


def is_postgres_url(db: str | Path) -> bool:
    """Whether `--db` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(db, str) and db.startswith(POSTGRES_URL_SCHEMES)


async def open_store(db: str | Path) -> Store:
    """Open the store `--db` names: a `postgresql://` (or `postgres://`) URL opens a
    `PostgresStore`, anything else a `SessionStore` on that SQLite file (or
    ":memory:"). Raises what their `open` raises: sqlite3.Error for a file that cannot
    be opened; StorageUnavailable for a PostgreSQL database that cannot be reached or
    migrated, ValueError for a malformed URL."""
    if is_postgres_url(db):
        # Imported here: psycopg is loaded only by a server that uses PostgreSQL.
        from chat.postgres_store import PostgresStore

        return await PostgresStore.open(str(db))
    return await SessionStore.open(db)


@dataclass(frozen=True, slots=True)
class _FileIdentity:
    """The database file as opened. While the store holds it open its inode cannot be
    reused, so a file at `path` with another (device, inode) is another file."""

    path: str
    device: int
    inode: int

    @classmethod
    def of(cls, path: str) -> _FileIdentity:
        stat = os.stat(path)
        return cls(path, stat.st_dev, stat.st_ino)

    def still_named(self) -> bool:
        """Whether `path` still names this file (False when deleted, replaced, renamed,
        or when it cannot even be looked up)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return False
        return (stat.st_dev, stat.st_ino) == (self.device, self.inode)


class SessionStore:
    """The database. Open with `SessionStore.open(path)`; close with `aclose()`.

    Every method runs in a worker thread (see the module docstring): reads on the
    reader, writes on the writer, each write one transaction."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        *,
        reader: sqlite3.Connection | None = None,
        file: _FileIdentity | None = None,
    ) -> None:
        self._db = connection
        self._limiter = trio.CapacityLimiter(1)
        self._reader = reader if reader is not None else connection
        self._read_limiter = trio.CapacityLimiter(1) if reader is not None else self._limiter
        self._file = file
        self.write_observer: Callable[[float], None] | None = None

    @classmethod
    async def open(cls, path: str | Path) -> SessionStore:
        """Open or create the database file and its schema, migrating an older file in
        place. Raises sqlite3.Error if the file cannot be opened (the server refuses to
        start), including when another process locks it for over BUSY_TIMEOUT_S."""
        return await trio.to_thread.run_sync(cls._open_sync, str(path))

    @classmethod
    def _open_sync(cls, path: str) -> SessionStore:
        writer = _connect(path)
        try:
            (journal_mode,) = writer.execute("PRAGMA journal_mode=WAL").fetchone()
            writer.execute("PRAGMA synchronous=NORMAL")
            writer.execute("PRAGMA foreign_keys=ON")
            writer.executescript(_SCHEMA)
            _migrate(writer)
            # SQLite's own absolute name of the main database; '' when it has no file.
            file_name: str = writer.execute("PRAGMA database_list").fetchone()[2]
            file = _FileIdentity.of(file_name) if file_name else None
            if not file_name or journal_mode != "wal":
                # Without WAL a second connection's reads would wait on every write.
                return cls(writer, file=file)
            reader = _connect(file_name)
            reader.execute("PRAGMA query_only=1")
            # Read once now: a connection maps the WAL index at its first read, which
            # fails once the file is unlinked; mapped, it still serves what was stored.
            reader.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return cls(writer, reader=reader, file=file)
        except BaseException:
            writer.close()
            raise

    async def aclose(self) -> None:
        """Close the database. In the worker threads: closing the last connection
        checkpoints the WAL, which takes tens of milliseconds the event loop should
        not wait through.

        When the file was deleted or replaced meanwhile, SQLite skips that checkpoint
        and leaves the WAL at `path-wal`, where the next open would replay it onto
        whatever file has the path now (a restored backup, say). So the WAL is first
        emptied into the file this store opened (wherever it went) by hand."""
        if self._reader is not self._db:
            await trio.to_thread.run_sync(self._reader.close, limiter=self._read_limiter)
        await trio.to_thread.run_sync(self._close_writer, limiter=self._limiter)

    def _close_writer(self) -> None:
        try:
            if self._file is not None and not self._file.still_named():
                self._empty_wal(self._file)
        finally:
            self._db.close()

    def _empty_wal(self, file: _FileIdentity) -> None:
        try:
            (busy, _, _) = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error:
            busy = 1
        if busy:  # another process still reads it, or SQLite refused
            log.error(
                "could not empty the WAL of the moved database file; remove %s-wal "
                "before starting on %s again",
                file.path,
                file.path,
            )

    async def healthy(self) -> bool:
        """Whether the database path still names the file this store opened (always
        True without a file). False once it was deleted or replaced: every write then
        fails, and stays failing until the server is restarted on the right file."""
        if self._file is None:
            return True
        # A stat can block (a network file system): a thread, but not the writer's,
        # so a health probe never queues behind a write waiting for a lock.
        return await trio.to_thread.run_sync(self._file.still_named)

    # ------------------------------------------------------------------ plumbing

    async def _write(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `work` in one write transaction on the writer. Raises StorageUnavailable
        when the file is gone or SQLite refuses; `work` may raise it too."""

        def run() -> _T:
            if self._file is not None and not self._file.still_named():
                log.error(
                    "database file %s was deleted or replaced while open; writes are "
                    "refused until the server is restarted",
                    self._file.path,
                )
                raise StorageUnavailable()
            with self._db:  # one transaction: committed whole or rolled back
                self._db.execute("BEGIN IMMEDIATE")
                return work(self._db)

        started = time.perf_counter()
        try:
            return await _in_thread(run, self._limiter)
        finally:
            if self.write_observer is not None:
                self.write_observer(time.perf_counter() - started)

    async def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `work` in one read transaction (one snapshot) on the reader."""

        def run() -> _T:
            with self._reader:
                self._reader.execute("BEGIN")
                return work(self._reader)

        return await _in_thread(run, self._read_limiter)

    # ------------------------------------------------------------------ sessions

    async def claim_session(self, session_id: str, user_id: str) -> SessionClaim:
        """Create the session for `user_id` if new; report its owner either way.
        A write, even for an existing session: it fails when writes do."""

        def claim(db: sqlite3.Connection) -> SessionClaim:
            row = db.execute("SELECT owner FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                now = utc_timestamp()
                db.execute(
                    "INSERT INTO sessions (id, owner, created_at, updated_at) VALUES (?, ?, ?, ?)",
                    (session_id, user_id, now, now),
                )
                return SessionClaim(owner_id=user_id, resumed=False, history_length=0)
            (count,) = db.execute(
                "SELECT COUNT(*) FROM messages WHERE session_id = ?", (session_id,)
            ).fetchone()
            return SessionClaim(owner_id=row[0], resumed=True, history_length=count)

        return await self._write(claim)

    async def list_sessions(
        self, owner_id: str, limit: int, cursor: str | None = None
    ) -> tuple[list[SessionInfo], str | None]:
        """One page of the owner's sessions, most recently active first (ties: the
        greater id first), and the cursor of the next page (None on the last page).

        Pass the returned cursor back unchanged for the next page. Over a set of
        sessions that stays idle, the pages hold each session exactly once; a session
        that becomes active meanwhile moves to the front and is not repeated (read
        from the first page to see it). Raises ValueError for `limit` below 1 or a
        malformed cursor."""
        after = list_position(limit, cursor)

        def read(db: sqlite3.Connection) -> list[SessionInfo]:
            where, parameters = "s.owner = ?", [owner_id]
            if after is not None:
                where += " AND (s.updated_at, s.id) < (?, ?)"
                parameters += after
            rows = db.execute(
                f"{_SESSION_INFO} WHERE {where} ORDER BY s.updated_at DESC, s.id DESC LIMIT ?",
                (*parameters, limit + 1),  # one more than asked: is there a next page?
            ).fetchall()
            return [session_info_from_row(row) for row in rows]

        return split_page(await self._read(read), limit)

    async def get_session(self, owner_id: str, session_id: str) -> SessionInfo | None:
        """The session, or None when it does not exist or another user owns it."""
        return await self._read(lambda db: _owned_session(db, owner_id, session_id))

    async def rename_session(
        self, owner_id: str, session_id: str, title: str
    ) -> SessionInfo | None:
        """Set the session's title (the caller checks its length) and return the
        session, or None when it does not exist or another user owns it. Not activity:
        `updated_at`, and so the session's place in the list, stay as they were."""

        def rename(db: sqlite3.Connection) -> SessionInfo | None:
            db.execute(
                "UPDATE sessions SET title = ? WHERE id = ? AND owner = ?",
                (title, session_id, owner_id),
            )
            return _owned_session(db, owner_id, session_id)

        return await self._write(rename)

    async def delete_session(self, owner_id: str, session_id: str) -> bool:
        """Delete the session and every message of it in one transaction. False (and
        nothing deleted) when it does not exist or another user owns it. Afterwards
        the id is free: `claim_session` starts a new session with it, for anyone.
        Writes still aimed at the deleted session fail with StorageUnavailable, so
        close its connection and cancel its turn (which store nothing) as well."""

        def delete(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT owner FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None or row[0] != owner_id:
                return False
            _delete_sessions(db, [session_id])
            return True

        return await self._write(delete)

    async def export_session(
        self, owner_id: str, session_id: str
    ) -> tuple[SessionInfo, list[StoredMessage]] | None:
        """The session and its whole conversation in order, read from one snapshot; None
        when it does not exist or another user owns it."""

        def read(db: sqlite3.Connection) -> tuple[SessionInfo, list[StoredMessage]] | None:
            info = _owned_session(db, owner_id, session_id)
            if info is None:
                return None
            return info, _conversation(db, session_id, _NO_LIMIT)

        return await self._read(read)

    async def delete_inactive(self, older_than_s: float) -> list[str]:
        """Delete every session (of any owner) whose last activity is older than
        `older_than_s` seconds, with its messages; return their ids. In batches of
        _PURGE_BATCH_SESSIONS sessions, one transaction each: a session is deleted whole
        or not at all, and other writes go on between batches. Raises ValueError for a
        negative age (it would delete sessions active right now)."""
        cutoff = inactive_cutoff(older_than_s)

        def purge_batch(db: sqlite3.Connection) -> list[str]:
            # Selected inside the deleting transaction: a session that became active
            # since the cutoff was computed is not touched.
            ids = [
                session_id
                for (session_id,) in db.execute(
                    "SELECT id FROM sessions WHERE updated_at < ? LIMIT ?",
                    (cutoff, _PURGE_BATCH_SESSIONS),
                )
            ]
            _delete_sessions(db, ids)
            return ids

        deleted: list[str] = []
        while True:
            batch = await self._write(purge_batch)
            deleted += batch
            if len(batch) < _PURGE_BATCH_SESSIONS:
                return deleted

    # ------------------------------------------------------------------ writes

    async def add_user_message(
        self,
        session_id: str,
        content: str,
        *,
        client_message_id: str | None,
        metadata: dict[str, Any] | None,
    ) -> StoredMessage:
        """Commit one user message. Raises DuplicateMessage if its client id was seen,
        StorageUnavailable if it cannot be stored (also: the session was deleted)."""
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
            _touch(db, session_id, created_at)
            return row_id

        try:
            row_id = await self._write(insert)
        except sqlite3.IntegrityError as error:
            if error.sqlite_errorname == "SQLITE_CONSTRAINT_UNIQUE":  # messages_client_id
                raise DuplicateMessage() from None
            # The foreign key: the session row is gone.
            raise StorageUnavailable(SESSION_DELETED_MESSAGE) from None
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
        and then the assistant message. Returns the assistant row id.

        Raises StorageUnavailable if it cannot be stored, or if the user message it
        answers is no longer in the session (deleted meanwhile: the turn must not land
        in a new session that took the same id)."""
        created_at = utc_timestamp()

        def insert(db: sqlite3.Connection) -> int:
            question = db.execute(
                "SELECT 1 FROM messages WHERE id = ? AND session_id = ?", (reply_to, session_id)
            ).fetchone()
            if question is None:
                raise StorageUnavailable(SESSION_DELETED_MESSAGE)
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
            _touch(db, session_id, created_at)
            return _row_id(cursor)

        return await self._write(insert)

    # ------------------------------------------------------------------ reads

    async def history(self, session_id: str, limit: int) -> list[StoredMessage]:
        """The latest `limit` messages, oldest first."""

        def read(db: sqlite3.Connection) -> list[StoredMessage]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE session_id = ?"
                " ORDER BY anchor DESC, id DESC LIMIT ?",
                (session_id, limit),
            ).fetchall()
            return [StoredMessage(*row) for row in reversed(rows)]

        return await self._read(read)

    async def full_history(
        self, session_id: str, *, up_to: int | None = None
    ) -> list[StoredMessage]:
        """Every message of the session, oldest first; with `up_to`, only the part of the
        conversation up to (and including the turn of) that user message."""
        last_anchor = up_to if up_to is not None else _NO_LIMIT
        return await self._read(lambda db: _conversation(db, session_id, last_anchor))

    async def chain_point(self, session_id: str, *, up_to: int | None = None) -> ChainPoint:
        """The last completed upstream response and everything stored after it (with
        `up_to`: up to and including that user message's turn)."""
        last_anchor = up_to if up_to is not None else _NO_LIMIT

        def read(db: sqlite3.Connection) -> ChainPoint:
            last = db.execute(
                "SELECT anchor, id, response_id FROM messages WHERE session_id = ?"
                " AND role = 'assistant' AND status = 'completed' AND response_id IS NOT NULL"
                " AND anchor <= ? ORDER BY anchor DESC, id DESC LIMIT 1",
                (session_id, last_anchor),
            ).fetchone()
            anchor, after_id, response_id = last if last is not None else (0, 0, None)
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE session_id = ?"
                " AND (anchor > ? OR (anchor = ? AND id > ?)) AND anchor <= ?"
                " ORDER BY anchor, id",
                (session_id, anchor, anchor, after_id, last_anchor),
            ).fetchall()
            return ChainPoint(response_id, [StoredMessage(*row) for row in rows])

        return await self._read(read)

    async def integrity_check(self) -> str:
        """SQLite's own verdict on the file: 'ok' when sound."""
        return await self._read(lambda db: str(db.execute("PRAGMA integrity_check").fetchone()[0]))


async def _in_thread(run: Callable[[], _T], limiter: trio.CapacityLimiter) -> _T:
    try:
        return await trio.to_thread.run_sync(run, limiter=limiter)
    except sqlite3.OperationalError as exc:
        raise StorageUnavailable() from exc


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: the store says BEGIN itself, so a transaction is exactly
    # one public method's work.
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    connection.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    return connection


def _migrate(db: sqlite3.Connection) -> None:
    """Bring the sessions table up to date in place, in one transaction (another
    instance may be opening the same file at the same moment)."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        present = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
        for name, declaration in _ADDED_SESSION_COLUMNS:
            if name not in present:
                db.execute(f"ALTER TABLE sessions ADD COLUMN {name} {declaration}")
        if "updated_at" not in present:
            db.execute(
                "UPDATE sessions SET updated_at = COALESCE("
                "(SELECT MAX(created_at) FROM messages WHERE session_id = sessions.id),"
                " created_at)"
            )
        for index in _SESSION_INDEXES:
            db.execute(index)


def _touch(db: sqlite3.Connection, session_id: str, at: str) -> None:
    """Record activity, in the transaction of the write that is the activity."""
    db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (at, session_id))


def _delete_sessions(db: sqlite3.Connection, session_ids: Iterable[str]) -> None:
    parameters = [(session_id,) for session_id in session_ids]
    # Messages first: they reference their session (foreign_keys is on).
    db.executemany("DELETE FROM messages WHERE session_id = ?", parameters)
    db.executemany("DELETE FROM sessions WHERE id = ?", parameters)


def _owned_session(db: sqlite3.Connection, owner_id: str, session_id: str) -> SessionInfo | None:
    row = db.execute(
        f"{_SESSION_INFO} WHERE s.id = ? AND s.owner = ?", (session_id, owner_id)
    ).fetchone()
    return session_info_from_row(row) if row is not None else None


def _conversation(db: sqlite3.Connection, session_id: str, last_anchor: int) -> list[StoredMessage]:
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM messages WHERE session_id = ? AND anchor <= ? ORDER BY anchor, id",
        (session_id, last_anchor),
    ).fetchall()
    return [StoredMessage(*row) for row in rows]


def _row_id(cursor: sqlite3.Cursor) -> int:
    assert cursor.lastrowid is not None  # an INSERT always sets it
    return cursor.lastrowid


# ====================================================================== shared logic
# What every store does the same way whatever its SQL (chat.postgres_store imports it).


def session_info_from_row(row: tuple[Any, ...]) -> SessionInfo:
    """A SessionInfo from a row of the session query: (id, title, created_at,
    updated_at, message count, the start of the first user message (at most
    TITLE_SOURCE_CHARS characters, leading whitespace trimmed; None when titled or
    there is none), the status of the last assistant message)."""
    session_id, title, created_at, updated_at, message_count, first_words, last_status = row
    return SessionInfo(
        id=session_id,
        title=title if title is not None else default_title(first_words),
        created_at=created_at,
        updated_at=updated_at,
        message_count=message_count,
        last_status=last_status,
    )


def default_title(first_message: str | None) -> str:
    """The title of a session nobody named: the first line of its first user message,
    whitespace collapsed, cut to TITLE_MAX_CHARS characters with "…" (at a word
    boundary when one is near); DEFAULT_TITLE when there is no such message or it is
    blank."""
    if first_message is None:
        return DEFAULT_TITLE
    first_line = first_message.strip().split("\n", 1)[0]
    line = " ".join(first_line.split())
    if not line:
        return DEFAULT_TITLE
    if len(line) <= TITLE_MAX_CHARS:
        return line
    cut = line[: TITLE_MAX_CHARS - 1]
    space = cut.rfind(" ")
    if space >= TITLE_MAX_CHARS // 2:  # a whole last word, unless that loses too much
        cut = cut[:space]
    return cut.rstrip() + "…"


def encode_cursor(last: SessionInfo) -> str:
    """The opaque position after `last` in list order: base64url of JSON, because
    clients must pass it back, not parse it."""
    position = json.dumps([last.updated_at, last.id]).encode()
    return base64.urlsafe_b64encode(position).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """The (updated_at, id) a cursor of `encode_cursor` holds. Raises ValueError."""
    try:
        text = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        position = json.loads(text)
    except ValueError:  # binascii.Error, UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError("malformed cursor") from None
    match position:
        case [str(updated_at), str(session_id)]:
            return updated_at, session_id
    raise ValueError("malformed cursor")


def list_position(limit: int, cursor: str | None) -> tuple[str, str] | None:
    """Check a `list_sessions` request and return the (updated_at, id) its page starts
    after (None: from the first). Raises ValueError for `limit` below 1 or a malformed
    cursor."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    return decode_cursor(cursor) if cursor is not None else None


def split_page(sessions: list[SessionInfo], limit: int) -> tuple[list[SessionInfo], str | None]:
    """The page and the next page's cursor, from up to `limit + 1` sessions in list
    order (one more than asked tells whether there is a next page)."""
    if len(sessions) <= limit:
        return sessions, None
    page = sessions[:limit]
    return page, encode_cursor(page[-1])


def inactive_cutoff(older_than_s: float) -> str:
    """The timestamp before which a session's last activity makes it older than
    `older_than_s` seconds. Raises ValueError for a negative age (it would delete
    sessions active right now)."""
    if older_than_s < 0:
        raise ValueError("older_than_s must not be negative")
    return utc_timestamp(datetime.now(UTC) - timedelta(seconds=older_than_s))


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
