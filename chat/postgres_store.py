"""Sessions and their history in PostgreSQL: the only module with SQL for a PostgreSQL
database (its connections are `chat.postgres_connections`'s, the escaping of its text
`chat.postgres_text`'s). Instances on several hosts share one with
`--db postgresql://...`.

`PostgresStore` has `store.Store`'s API with `store.SessionStore`'s semantics: the
same dataclasses, errors, `(anchor, id)` order, chain point, titles, cursors and
retention (see store.py's docstring; the logic that needs no SQL is imported from
there). Only what PostgreSQL does differently is described here.

Resource handling: the store holds three connections (`chat.postgres_connections.Link`:
each used by one call and one worker thread at a time, opened and reopened there):

- the *writer* runs every write, one transaction per public method (READ COMMITTED,
  the isolation the concurrency rules below are written for);
- the *reader* runs every read, each in one REPEATABLE READ READ ONLY transaction, so
  a read sees one snapshot; under MVCC it never waits for a writer;
- the *probe* runs `healthy()`'s `SELECT 1`, so a health check never queues behind
  a slow read or write.

Fixed connections and not a pool (psycopg_pool): the store's callers already meet at
one writer and one reader as with SQLite, a pool's background threads and reconnect
backoff would add waits this module does not bound itself, and three connections per
instance keep many instances within PostgreSQL's `max_connections` (100 by default).

Time: each call is bounded as `chat.postgres_connections` describes (connecting,
each statement, each lock wait, a silent network; each call as a whole by
CALL_TIMEOUT_S, past which its connection is cut), `healthy()` by HEALTH_TIMEOUT_S.
A cancelled caller waits for its call to end, as with store.py's threads (never longer
than that bound).

Concurrency (several instances write at once, where SQLite's write lock would let one
at a time): a claim inserts with ON CONFLICT DO NOTHING, so of two instances creating
one session one creates it and the other resumes it. A message insert holds a key
share lock on its session row (the foreign key) and a turn locks its question, so a
deletion (`ON DELETE CASCADE` from the session row) waits for them, or they find the
session gone. Retention skips sessions locked by a write in progress: they are active.

Text: PostgreSQL's text cannot hold U+0000, which SQLite stores and a client may send.
Every string goes in and comes out escaped (`chat.postgres_text`), so every text
round-trips and ordinary text is stored as it is. Timestamps are the same
fixed-width strings as in SQLite, and ids, timestamps and owners use the "C" collation,
so they compare and sort bytewise as in SQLite whatever the database's locale.

Schema: created or migrated at `open`, in one transaction under a transaction-scoped
advisory lock, so several instances may start at once; `chat_schema_migrations` holds
the versions applied. A database migrated by a newer server is refused.

Error handling: a duplicate client message id raises `protocol.DuplicateMessage`; a
database that cannot be reached, refuses, times out or is locked for too long raises
`protocol.StorageUnavailable`, as does a write into a session deleted meanwhile. No
psycopg exception escapes (`chat.postgres_connections.call_or_unavailable` maps those
of every call). Messages in logs and errors never hold the URL's password.
A connection lost while its COMMIT was under way leaves the outcome unknown: the
call fails, and a client that sends the message again with its id learns from
DuplicateMessage that it was stored.

Durability: a commit returns once PostgreSQL has it (its own `synchronous_commit`,
on by default); a killed instance, or a crashed database server, loses nothing that
was committed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import psycopg.errors
import trio
from psycopg.rows import TupleRow

from chat.postgres_connections import (
    Link,
    PgConnection,
    call_or_unavailable,
    connector,
    first_line,
)
from protocol import DuplicateMessage, StorageUnavailable, TurnStatus, utc_timestamp
from store import (
    SESSION_DELETED_MESSAGE,
    TITLE_SOURCE_CHARS,
    ChainPoint,
    SessionClaim,
    SessionInfo,
    StoredMessage,
    ToolCallRecord,
    inactive_cutoff,
    list_position,
    session_info_from_row,
    split_page,
)

_T = TypeVar("_T")

# `healthy()` answers False when the probe takes longer than this.
HEALTH_TIMEOUT_S = 2.0
# Creating or migrating the schema at `open` may wait for another instance doing it.
MIGRATION_TIMEOUT_S = 60.0
# Sessions deleted per transaction by `delete_inactive` (as in store.py).
PURGE_BATCH_SESSIONS = 500
# The advisory lock that serialises schema migrations: "chat" in ASCII, a constant
# every instance of this server takes and nothing else should.
_MIGRATION_LOCK_KEY = 0x63686174

_NO_LIMIT = 2**63 - 1  # BIGINT's largest: "no upper bound" on anchors

_BEGIN_WRITE = "BEGIN ISOLATION LEVEL READ COMMITTED, READ WRITE"
_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"

# Each migration is a list of statements, run in order in one transaction; a new one
# is appended, never edited (a database records how many it has applied).
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE IF NOT EXISTS sessions (
            id          TEXT COLLATE "C" PRIMARY KEY,
            owner       TEXT COLLATE "C" NOT NULL,
            created_at  TEXT COLLATE "C" NOT NULL,
            title       TEXT,
            updated_at  TEXT COLLATE "C" NOT NULL
        )
        """,
        """
        CREATE TABLE IF NOT EXISTS messages (
            id                 BIGSERIAL PRIMARY KEY,
            session_id         TEXT COLLATE "C" NOT NULL
                               REFERENCES sessions (id) ON DELETE CASCADE,
            role               TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
            anchor             BIGINT NOT NULL,
            content            TEXT NOT NULL,
            status             TEXT,
            created_at         TEXT COLLATE "C" NOT NULL,
            client_message_id  TEXT COLLATE "C",
            metadata           TEXT,
            turn_id            TEXT,
            response_id        TEXT,
            name               TEXT,
            call_id            TEXT,
            arguments          TEXT,
            output             TEXT
        )
        """,
        "CREATE UNIQUE INDEX IF NOT EXISTS messages_client_id"
        " ON messages (session_id, client_message_id) WHERE client_message_id IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS messages_in_order ON messages (session_id, anchor, id)",
        # list_sessions: one owner's sessions by (updated_at, id), read backwards.
        "CREATE INDEX IF NOT EXISTS sessions_by_owner_activity ON sessions (owner, updated_at, id)",
        # delete_inactive: every owner's sessions idle since before a cutoff.
        "CREATE INDEX IF NOT EXISTS sessions_by_activity ON sessions (updated_at)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_COLUMNS = (
    "id, session_id, role, content, status, created_at, client_message_id, "
    "turn_id, response_id, name, call_id, arguments, output"
)
# Escaped, a character takes at most two; one more keeps a cut escape from costing
# a character. `_session_info` cuts the unescaped text to TITLE_SOURCE_CHARS.
_TITLE_SOURCE_STORED_CHARS = 2 * TITLE_SOURCE_CHARS + 1
_SESSION_INFO = f"""
SELECT s.id, s.title, s.created_at, s.updated_at,
    (SELECT COUNT(*) FROM messages AS m WHERE m.session_id = s.id),
    CASE WHEN s.title IS NULL THEN
        (SELECT substr(ltrim(m.content, E'\\t\\n\\r '), 1, {_TITLE_SOURCE_STORED_CHARS})
         FROM messages AS m WHERE m.session_id = s.id AND m.role = 'user'
         ORDER BY m.anchor, m.id LIMIT 1)
    END,
    (SELECT m.status FROM messages AS m WHERE m.session_id = s.id AND m.role = 'assistant'
     ORDER BY m.anchor DESC, m.id DESC LIMIT 1)
FROM sessions AS s
"""


class PostgresStore:
    """The database. Open with `PostgresStore.open(url)`; close with `aclose()`.

    Every method runs in a worker thread (see the module docstring): reads on the
    reader, writes on the writer, each write one transaction."""

    def __init__(self, writer: Link, reader: Link, probe: Link) -> None:
        self._writer = writer
        self._reader = reader
        self._probe = probe
        self.write_observer: Callable[[float], None] | None = None

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        """Connect to the database `url` names (`postgresql://user:password@host/db`),
        creating or migrating its schema. Raises StorageUnavailable when it cannot be
        reached, refuses, or was migrated by a newer server (the server refuses to
        start), ValueError when `url` is malformed."""
        return await trio.to_thread.run_sync(cls._open_sync, url)

    @classmethod
    def _open_sync(cls, url: str) -> PostgresStore:
        connect, where = connector(url)
        writer, reader, probe = Link(connect, where), Link(connect, where), Link(connect, where)
        try:
            _migrate(writer.connect_now())
            reader.connect_now()
        except psycopg.Error as error:
            writer.close()
            reader.close()
            raise StorageUnavailable(
                f"could not open the PostgreSQL database {where}: {first_line(error)}"
            ) from None
        except BaseException:
            writer.close()
            reader.close()
            raise
        return cls(writer, reader, probe)

    async def aclose(self) -> None:
        """Close the connections, each once its thread is done with it (one cut off by
        its call's timeout may still be ending: bounded by the connection's timeouts)."""
        for link in (self._probe, self._reader, self._writer):
            await link.aclose()

    async def healthy(self) -> bool:
        """Whether the database answers a `SELECT 1` within HEALTH_TIMEOUT_S. False
        while it is down, unreachable or hung; True again by itself once it is back."""
        try:
            return await self._probe.call(self._probe.ping, timeout_s=HEALTH_TIMEOUT_S)
        except StorageUnavailable:
            return False

    async def integrity_check(self) -> str:
        """'ok' when the database answers and holds the schema this server knows."""

        def read(db: PgConnection) -> str:
            version = _schema_version(db)
            if version != SCHEMA_VERSION:
                return f"schema version {version}, this server knows {SCHEMA_VERSION}"
            return "ok"

        return await self._read(read)

    # ------------------------------------------------------------------ plumbing

    async def _write(self, work: Callable[[PgConnection], _T]) -> _T:
        """Run `work` in one write transaction on the writer. Raises StorageUnavailable
        when the database cannot be used; `work` may raise it too."""
        started = time.perf_counter()
        try:
            return await call_or_unavailable(
                self._writer, lambda: self._writer.transaction(_BEGIN_WRITE, work)
            )
        finally:
            if self.write_observer is not None:
                self.write_observer(time.perf_counter() - started)

    async def _read(self, work: Callable[[PgConnection], _T]) -> _T:
        """Run `work` in one read transaction (one snapshot) on the reader."""
        return await call_or_unavailable(
            self._reader, lambda: self._reader.transaction(_BEGIN_READ, work)
        )

    # ------------------------------------------------------------------ sessions

    async def claim_session(self, session_id: str, user_id: str) -> SessionClaim:
        """Create the session for `user_id` if new; report its owner either way.
        A write, even for an existing session: it fails when writes do."""

        def claim(db: PgConnection) -> SessionClaim:
            now = utc_timestamp()
            # Twice at most: the session may be deleted between the two statements.
            for _ in range(2):
                created = db.execute(
                    "INSERT INTO sessions (id, owner, created_at, updated_at)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING owner",
                    (session_id, user_id, now, now),
                ).fetchone()
                if created is not None:
                    return SessionClaim(owner_id=user_id, resumed=False, history_length=0)
                # Another transaction had it (if still running, the insert waited for
                # its commit); READ COMMITTED: this statement sees that commit.
                existing = db.execute(
                    "SELECT owner, (SELECT COUNT(*) FROM messages WHERE session_id = %s)"
                    " FROM sessions WHERE id = %s",
                    (session_id, session_id),
                ).fetchone()
                if existing is not None:
                    return SessionClaim(
                        owner_id=existing[0], resumed=True, history_length=existing[1]
                    )
            raise StorageUnavailable()

        return await self._write(claim)

    async def list_sessions(
        self, owner_id: str, limit: int, cursor: str | None = None
    ) -> tuple[list[SessionInfo], str | None]:
        """One page of the owner's sessions, most recently active first (ties: the
        greater id first), and the cursor of the next page (None on the last page);
        as `SessionStore.list_sessions`. Raises ValueError for `limit` below 1 or a
        malformed cursor."""
        after = list_position(limit, cursor)

        def read(db: PgConnection) -> list[SessionInfo]:
            where, parameters = "s.owner = %s", [owner_id]
            if after is not None:
                where += " AND (s.updated_at, s.id) < (%s, %s)"
                parameters += after
            rows = db.execute(
                f"{_SESSION_INFO} WHERE {where} ORDER BY s.updated_at DESC, s.id DESC LIMIT %s",
                (*parameters, limit + 1),  # one more than asked: is there a next page?
            ).fetchall()
            return [_session_info(row) for row in rows]

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

        def rename(db: PgConnection) -> SessionInfo | None:
            db.execute(
                "UPDATE sessions SET title = %s WHERE id = %s AND owner = %s",
                (title, session_id, owner_id),
            )
            return _owned_session(db, owner_id, session_id)

        return await self._write(rename)

    async def delete_session(self, owner_id: str, session_id: str) -> bool:
        """Delete the session and every message of it in one transaction. False (and
        nothing deleted) when it does not exist or another user owns it. Afterwards
        the id is free; writes still aimed at the deleted session fail with
        StorageUnavailable (as `SessionStore.delete_session`)."""

        def delete(db: PgConnection) -> bool:
            # Its messages go with it (ON DELETE CASCADE), those committed by a write
            # this statement waited for included.
            row = db.execute(
                "DELETE FROM sessions WHERE id = %s AND owner = %s RETURNING id",
                (session_id, owner_id),
            ).fetchone()
            return row is not None

        return await self._write(delete)

    async def export_session(
        self, owner_id: str, session_id: str
    ) -> tuple[SessionInfo, list[StoredMessage]] | None:
        """The session and its whole conversation in order, read from one snapshot; None
        when it does not exist or another user owns it."""

        def read(db: PgConnection) -> tuple[SessionInfo, list[StoredMessage]] | None:
            info = _owned_session(db, owner_id, session_id)
            if info is None:
                return None
            return info, _conversation(db, session_id, _NO_LIMIT)

        return await self._read(read)

    async def delete_inactive(self, older_than_s: float) -> list[str]:
        """Delete every session (of any owner) whose last activity is older than
        `older_than_s` seconds, with its messages; return their ids. In batches of
        PURGE_BATCH_SESSIONS sessions, one transaction each. A session being written
        right now is skipped (it is active), so is one another instance is deleting.
        Raises ValueError for a negative age."""
        cutoff = inactive_cutoff(older_than_s)

        def purge_batch(db: PgConnection) -> list[str]:
            # The condition is checked again on the locked row: a session that became
            # active since the cutoff was computed is not touched.
            rows = db.execute(
                "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions"
                " WHERE updated_at < %s LIMIT %s FOR UPDATE SKIP LOCKED)"
                " AND updated_at < %s RETURNING id",
                (cutoff, PURGE_BATCH_SESSIONS, cutoff),
            ).fetchall()
            return [session_id for (session_id,) in rows]

        deleted: list[str] = []
        while True:
            batch = await self._write(purge_batch)
            deleted += batch
            if len(batch) < PURGE_BATCH_SESSIONS:
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

        def insert(db: PgConnection) -> int:
            try:
                # A user message anchors at its own id, taken from the sequence first.
                (row_id,) = _one(
                    db,
                    "INSERT INTO messages (id, session_id, role, anchor, content, created_at,"
                    " client_message_id, metadata)"
                    " SELECT n.id, %s, 'user', n.id, %s, %s, %s, %s"
                    " FROM (SELECT nextval('messages_id_seq') AS id) AS n RETURNING id",
                    (session_id, content, created_at, client_message_id, metadata_json),
                )
            except psycopg.errors.UniqueViolation as error:
                if error.diag.constraint_name == "messages_client_id":
                    raise DuplicateMessage() from None
                raise
            except psycopg.errors.ForeignKeyViolation:  # the session row is gone
                raise StorageUnavailable(SESSION_DELETED_MESSAGE) from None
            _touch(db, session_id, created_at)
            return int(row_id)

        row_id = await self._write(insert)
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
        and then the assistant message. Returns the assistant row id. Raises
        StorageUnavailable if it cannot be stored, or if the user message it answers is
        no longer in the session (deleted meanwhile)."""
        created_at = utc_timestamp()

        def insert(db: PgConnection) -> int:
            # Locked: a deletion of the session waits for this turn's commit (and then
            # deletes it too) instead of deleting the question under it.
            question = db.execute(
                "SELECT 1 FROM messages WHERE id = %s AND session_id = %s FOR KEY SHARE",
                (reply_to, session_id),
            ).fetchone()
            if question is None:
                raise StorageUnavailable(SESSION_DELETED_MESSAGE)
            with db.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO messages (session_id, role, anchor, content, status,"
                    " created_at, turn_id, name, call_id, arguments, output)"
                    " VALUES (%s, 'tool', %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
            (row_id,) = _one(
                db,
                "INSERT INTO messages (session_id, role, anchor, content, status, created_at,"
                " turn_id, response_id) VALUES (%s, 'assistant', %s, %s, %s, %s, %s, %s)"
                " RETURNING id",
                (session_id, reply_to, content, status, created_at, turn_id, response_id),
            )
            _touch(db, session_id, created_at)
            return int(row_id)

        return await self._write(insert)

    # ------------------------------------------------------------------ reads

    async def history(self, session_id: str, limit: int) -> list[StoredMessage]:
        """The latest `limit` messages, oldest first."""

        def read(db: PgConnection) -> list[StoredMessage]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE session_id = %s"
                " ORDER BY anchor DESC, id DESC LIMIT %s",
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

        def read(db: PgConnection) -> ChainPoint:
            last = db.execute(
                "SELECT anchor, id, response_id FROM messages WHERE session_id = %s"
                " AND role = 'assistant' AND status = 'completed' AND response_id IS NOT NULL"
                " AND anchor <= %s ORDER BY anchor DESC, id DESC LIMIT 1",
                (session_id, last_anchor),
            ).fetchone()
            anchor, after_id, response_id = last if last is not None else (0, 0, None)
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE session_id = %s"
                " AND (anchor > %s OR (anchor = %s AND id > %s)) AND anchor <= %s"
                " ORDER BY anchor, id",
                (session_id, anchor, anchor, after_id, last_anchor),
            ).fetchall()
            return ChainPoint(response_id, [StoredMessage(*row) for row in rows])

        return await self._read(read)


# ====================================================================== schema


def _migrate(db: PgConnection) -> None:
    """Create or bring the schema up to date, in one transaction, under an advisory
    lock: instances starting together migrate one after the other, and each sees the
    others' work. Raises StorageUnavailable for a schema newer than this server's."""
    db.execute(_BEGIN_WRITE)
    try:
        timeout_ms = int(MIGRATION_TIMEOUT_S * 1000)
        db.execute(f"SET LOCAL lock_timeout = {timeout_ms}")
        db.execute(f"SET LOCAL statement_timeout = {timeout_ms}")
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        db.execute(
            "CREATE TABLE IF NOT EXISTS chat_schema_migrations"
            " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        version = _schema_version(db)
        if version > SCHEMA_VERSION:
            raise StorageUnavailable(
                f"the database schema is at version {version}, newer than this server's"
                f" {SCHEMA_VERSION}: run a newer server"
            )
        for number, statements in enumerate(_MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                db.execute(statement)
            db.execute(
                "INSERT INTO chat_schema_migrations (version, applied_at) VALUES (%s, %s)",
                (number, utc_timestamp()),
            )
        db.execute("COMMIT")
    except BaseException:
        if not db.closed:
            db.execute("ROLLBACK")
        raise


def _schema_version(db: PgConnection) -> int:
    (version,) = _one(db, "SELECT COALESCE(MAX(version), 0) FROM chat_schema_migrations")
    return int(version)


# ====================================================================== statements


def _one(db: PgConnection, query: str, parameters: tuple[Any, ...] = ()) -> TupleRow:
    row = db.execute(query, parameters).fetchone()
    assert row is not None  # an aggregate, or an INSERT ... RETURNING of one row
    return row


def _touch(db: PgConnection, session_id: str, at: str) -> None:
    """Record activity, in the transaction of the write that is the activity."""
    db.execute("UPDATE sessions SET updated_at = %s WHERE id = %s", (at, session_id))


def _owned_session(db: PgConnection, owner_id: str, session_id: str) -> SessionInfo | None:
    row = db.execute(
        f"{_SESSION_INFO} WHERE s.id = %s AND s.owner = %s", (session_id, owner_id)
    ).fetchone()
    return _session_info(row) if row is not None else None


def _session_info(row: TupleRow) -> SessionInfo:
    first_words = row[5]
    if first_words is not None:
        first_words = first_words[:TITLE_SOURCE_CHARS]  # what store.py's SQL cuts
    return session_info_from_row((*row[:5], first_words, row[6]))


def _conversation(db: PgConnection, session_id: str, last_anchor: int) -> list[StoredMessage]:
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM messages WHERE session_id = %s AND anchor <= %s"
        " ORDER BY anchor, id",
        (session_id, last_anchor),
    ).fetchall()
    return [StoredMessage(*row) for row in rows]
