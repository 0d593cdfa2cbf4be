"""Connections to PostgreSQL for `chat.postgres_store`: opening them with their
timeouts, reconnecting, and bounding every call made on them.

What it owns: `Link`, one connection used by one call and one worker thread at a
time (psycopg's async API runs on asyncio only, so the store uses the sync
`psycopg.Connection` in worker threads, as store.py does with sqlite3); `connector`,
which opens a connection to a URL with this module's timeouts and text escaping
(`chat.postgres_text`); and `call_or_unavailable`, a call on a link with every psycopg
error mapped to `protocol.StorageUnavailable`.

Reconnection: a connection is opened on first use and again after it broke (the
server restarted, the network dropped), but not more often than once per
RECONNECT_BACKOFF_S: while the database is down, a queue of calls fails at once
instead of each waiting for its own connect timeout. A connection the server closed
while it sat idle is replaced at once and the transaction begun again: nothing of it
had run.

Time: every wait is bounded below the server's 10 s handshake and 20 s send timeouts.
Connecting by CONNECT_TIMEOUT_S; each statement by STATEMENT_TIMEOUT_S and each lock
wait by LOCK_TIMEOUT_S (both set at connect); a silent network by TCP keepalives and
TCP_USER_TIMEOUT_S; a transaction left idle by a stuck process is ended by the server
after IDLE_IN_TRANSACTION_TIMEOUT_S. Those are the database's and the kernel's; a
server that hangs with the statement in hand fires none of them, so each call as a
whole is bounded by CALL_TIMEOUT_S (or the caller's own bound), past which its
connection is cut under its thread and the call fails. A cancelled caller waits for
its call to end, as with store.py's threads (never longer than that bound).

Error handling: `call_or_unavailable` lets no psycopg exception escape; messages in
logs and errors name the database (`connector`'s description) without the URL's
password.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
import psycopg.conninfo
import trio
from psycopg.rows import TupleRow

from chat.postgres_text import register_text_escaping
from protocol import StorageUnavailable
from store import BUSY_TIMEOUT_S

log = logging.getLogger(__name__)

_T = TypeVar("_T")
PgConnection = psycopg.Connection[TupleRow]

# libpq counts whole seconds and takes at least 2. A database that does not answer a
# connect within this is down for this request's purposes.
CONNECT_TIMEOUT_S = 3
# How long a write waits for a row or table lock another transaction holds (another
# instance writing the same session, an operator's LOCK): as SQLite's busy timeout.
LOCK_TIMEOUT_S = BUSY_TIMEOUT_S
# Any one statement. Ours touch a few rows by index (milliseconds); a retention batch
# deletes up to chat.postgres_store.PURGE_BATCH_SESSIONS sessions' messages. Well below
# the 10 s handshake.
STATEMENT_TIMEOUT_S = 5.0
# A transaction idle this long (its process stuck or gone) is ended by the server,
# which releases its locks for the other instances.
IDLE_IN_TRANSACTION_TIMEOUT_S = 10.0
# A peer that stops answering mid-statement (a dead host, a dropped network): TCP
# keepalives probe an idle wait, TCP_USER_TIMEOUT_S bounds unacknowledged sends.
_KEEPALIVE_IDLE_S = 4
_KEEPALIVE_INTERVAL_S = 1
_KEEPALIVE_COUNT = 3
TCP_USER_TIMEOUT_S = 8.0
# A call (connecting, its statements, committing) that takes longer has its connection
# cut: the only bound on a server that accepted the statement and then hangs (stuck
# storage, a stopped process), where its own timeouts cannot fire.
CALL_TIMEOUT_S = 8.0
# After a failed connect, calls fail at once for this long instead of connecting again.
RECONNECT_BACKOFF_S = 1.0


class Link:
    """One connection to the database, used by one worker thread at a time. Opened on
    first use and again after it broke, but not within RECONNECT_BACKOFF_S of a failed
    attempt.

    `call` runs from the event loop; the other public methods run in the worker
    thread it starts, `interrupt` on the event loop while that thread waits."""

    def __init__(self, connect: Callable[[], PgConnection], where: str) -> None:
        self._connect = connect
        self._where = where
        self._connection: PgConnection | None = None
        self._failed_at: float | None = None  # time.monotonic() of the last failed connect
        self._interrupted = False
        self._lock = trio.Lock()  # one call at a time; waiting for it is cancellable
        # The worker thread's token: held until the thread really ends, even past its
        # call's timeout, so no two threads ever use the connection at once.
        self._thread = trio.CapacityLimiter(1)

    async def call(self, run: Callable[[], _T], *, timeout_s: float | None = None) -> _T:
        """`run()` in a worker thread. Raises StorageUnavailable when it takes longer
        than `timeout_s` (default CALL_TIMEOUT_S): then its connection is cut under it
        (`interrupt`), which ends any wait on the network at once, and its thread ends
        by itself.

        Shielded from the caller's cancellation, as a thread that cannot be abandoned
        is (store.py's): a cancelled caller waits until the call has ended (at most
        `timeout_s`), so a write it started is never still running behind its back."""
        if timeout_s is None:
            timeout_s = CALL_TIMEOUT_S
        async with self._lock:
            with trio.CancelScope(shield=True), trio.move_on_after(timeout_s):
                return await trio.to_thread.run_sync(
                    run, limiter=self._thread, abandon_on_cancel=True
                )
            log.warning(
                "PostgreSQL %s did not answer within %.1f s: connection cut",
                self._where,
                timeout_s,
            )
            self.interrupt()
        raise StorageUnavailable()

    async def aclose(self) -> None:
        async with self._lock:
            await trio.to_thread.run_sync(self.close, limiter=self._thread)

    def interrupt(self) -> None:
        """Shut the connection's socket down under the thread waiting on it, which then
        fails at once ("server closed the connection"), as if the network had dropped."""
        self._interrupted = True
        connection = self._connection
        if connection is None:
            return
        try:
            # A duplicate of the descriptor, shut down: the socket itself is, for both.
            with socket.socket(fileno=os.dup(connection.pgconn.socket)) as duplicate:
                duplicate.shutdown(socket.SHUT_RDWR)
        except (OSError, psycopg.Error):
            pass  # already closed

    def connect_now(self) -> PgConnection:
        """The connection, connected now if it is not. Raises psycopg.Error."""
        connection, _ = self._get()
        return connection

    def transaction(self, begin: str, work: Callable[[PgConnection], _T]) -> _T:
        """`work` in one transaction begun with `begin`: committed when it returns,
        rolled back when it raises. Raises psycopg.Error or StorageUnavailable (in the
        backoff after a failed connect), or what `work` raises."""
        connection = self._begin(begin)
        try:
            result = work(connection)
            connection.execute("COMMIT")
        except BaseException:
            self._roll_back(connection)
            raise
        return result

    def ping(self) -> bool:
        """Whether the database answers `SELECT 1` (within the connection's timeouts)."""
        try:
            self._begin("SELECT 1")
        except (psycopg.Error, StorageUnavailable):
            return False
        return True

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _begin(self, statement: str) -> PgConnection:
        """A connection on which `statement` (a BEGIN, a probe) just ran."""
        self._interrupted = False
        connection, fresh = self._get()
        try:
            connection.execute(statement)
            return connection
        except psycopg.OperationalError:
            if fresh or not connection.closed or self._interrupted:
                raise
        # The server closed it while it sat idle (a restart, an idle timeout): nothing
        # ran on it, so the statement runs again on a new connection, at once.
        connection, _ = self._get()
        connection.execute(statement)
        return connection

    def _get(self) -> tuple[PgConnection, bool]:
        """The open connection and whether it was connected just now."""
        if self._connection is not None:
            if not self._connection.closed:
                return self._connection, False
            self.close()  # broken: psycopg closes what is left of it
        if self._failed_at is not None and time.monotonic() - self._failed_at < RECONNECT_BACKOFF_S:
            raise StorageUnavailable()
        try:
            self._connection = self._connect()
        except psycopg.Error as error:
            if self._failed_at is None:  # once per outage, not once per request
                log.warning("PostgreSQL %s unreachable: %s", self._where, first_line(error))
            self._failed_at = time.monotonic()
            raise
        if self._failed_at is not None:
            log.info("PostgreSQL %s reachable again", self._where)
            self._failed_at = None
        return self._connection, True

    def _roll_back(self, connection: PgConnection) -> None:
        if connection.closed:
            self.close()
            return
        try:
            connection.execute("ROLLBACK")
        except psycopg.Error:
            self.close()  # a connection in an unknown state is not used again


def connector(url: str) -> tuple[Callable[[], PgConnection], str]:
    """A function that opens one connection to `url` with this module's timeouts, and
    a description of the database without its password. Raises ValueError when `url`
    is malformed."""
    try:
        parameters = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        raise ValueError("malformed PostgreSQL URL") from None
    where = "{}:{}/{}".format(
        parameters.get("host") or parameters.get("hostaddr") or "localhost",
        parameters.get("port") or 5432,
        parameters.get("dbname") or parameters.get("user") or "",
    )
    # Ours after the URL's own options, so ours win: the bounds are this module's rules.
    options = " ".join(
        part
        for part in (
            str(parameters.get("options") or ""),
            f"-c statement_timeout={int(STATEMENT_TIMEOUT_S * 1000)}",
            f"-c lock_timeout={int(LOCK_TIMEOUT_S * 1000)}",
            f"-c idle_in_transaction_session_timeout={int(IDLE_IN_TRANSACTION_TIMEOUT_S * 1000)}",
        )
        if part
    )

    def connect() -> PgConnection:
        connection = psycopg.Connection.connect(
            url,
            autocommit=True,  # the store says BEGIN itself: one transaction per method
            connect_timeout=CONNECT_TIMEOUT_S,
            options=options,
            application_name=parameters.get("application_name") or "chat-agent-server",
            keepalives=1,
            keepalives_idle=_KEEPALIVE_IDLE_S,
            keepalives_interval=_KEEPALIVE_INTERVAL_S,
            keepalives_count=_KEEPALIVE_COUNT,
            tcp_user_timeout=int(TCP_USER_TIMEOUT_S * 1000),
        )
        register_text_escaping(connection)
        return connection

    return connect, where


async def call_or_unavailable(link: Link, run: Callable[[], _T]) -> _T:
    """`link.call(run)`, with every psycopg error mapped to StorageUnavailable."""
    try:
        return await link.call(run)
    except psycopg.OperationalError as error:
        # Lost, refused, timed out, locked out: the database's state, not a bug.
        log.warning("PostgreSQL refused: %s (%s)", type(error).__name__, error.sqlstate)
        raise StorageUnavailable() from error
    except psycopg.Error as error:
        # Not expected from our own statements: a bug, or a schema changed by hand.
        log.error("PostgreSQL error: %s (%s)", type(error).__name__, error.sqlstate)
        raise StorageUnavailable() from error


def first_line(error: BaseException) -> str:
    """The first line of `error`'s text (psycopg's go on with details and hints)."""
    return str(error).strip().split("\n", 1)[0]
