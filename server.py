"""The chat server's composition root and command line.

`ChatServer` listens, routes each TCP connection (plain HTTP or a WebSocket
upgrade), admits WebSockets, keeps the registry of connections and live
sessions, hands a session over on takeover, and drains on shutdown. `run_server`
wires the store, the upstream client and the server together; `main` is the
command line (serve, check-config, token, backup).

The flow of one frame, forward through the modules (README, "How it is built")::

    socket ─ chat.ws_stream.ClientStream ─ trio-websocket
      └ chat.connection.ChatConnection._receive_loop ─ protocol.parse_client_frame
          └ message: store.add_user_message, then chat.session.LiveSession.enqueue
              └ chat.turn.run_turn ─ agent_client.AgentClient.stream (httpx, SSE)
                  └ TextDelta ─ LiveSession.send_delta ─ ChatConnection.send_delta
                      └ chat.ws_stream (one RFC 6455 frame to the socket) ─ socket
          and when the turn ends: store.finish_turn (SQLite)

Error handling: every failure inside one connection ends that connection only
(logged, close 1011); the server keeps serving. Contract errors are the
`protocol.ChatError` tree: each knows its frame (`FrameError.to_frame`) or close
code (`CloseError.close_code`); they are applied in one place each,
`ChatConnection._send_error` and `chat.connection.close_websocket`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import secrets
import signal
import sqlite3
import ssl
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST

import protocol as wire
from agent_client import AgentClient
from chat import pacing, upstream_tls
from chat.auth import MAX_TOKEN_BYTES, TokenVerifier, issue_token
from chat.cluster import Cluster, ClusterUnavailable, Command
from chat.http_front import (
    NOT_FOUND,
    HttpAnswer,
    HttpRoute,
    RequestHead,
    answer_http,
    error_answer,
    json_answer,
    read_body,
    read_request_head,
    session_id_from_path,
    token_from,
    web_page_routes,
)
from chat.ops import (
    ServerMetrics,
    configure_logging,
    systemd_notify,
    watchdog_pings,
)
from chat.pacing import ADMISSIONS_PER_PASS, DROPS_PER_PASS, ConnectionTimers, PassGate
from chat.sessions_api import ApiRequest, SessionsApi
from chat.settings import (
    DEFAULT_UPSTREAM_URL,
    Config,
    ConfigError,
    add_setting_flags,
    check_deployment,
    config_from_settings,
    print_settings,
    resolve_settings,
)
from chat.turn import FINAL_WRITE_TIMEOUT_S, TurnServices
from chat.ws_stream import ClientStream
from store import Store, backup_database, is_postgres_url, open_store

# Start-up: what nothing needs before the first WebSocket (trio-websocket, wsproto, the
# connection and session modules) is imported with the first upgrade, not at start;
# `warm_up` imports it right after the server listens (docs/operations.md, "Size and
# start time").
if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

    from chat.connection import ChatConnection
    from chat.session import LiveSession

__all__ = ["MAX_TOKEN_BYTES", "ChatServer", "Config", "issue_token", "main", "run_server"]

log = logging.getLogger("chat")

# trio-websocket's own queue of received messages; backpressure beyond it.
WS_MESSAGE_QUEUE_SIZE = 16
# With --retention-days, inactive sessions are looked for at start and then this often.
RETENTION_CHECK_INTERVAL_S = 3600.0


class ChatServer:
    """Accepts connections, admits WebSockets, keeps the registry, shuts down gracefully.

    Resource handling: `serve` owns the listeners, a nursery of connection handlers
    and a nursery of turns (which outlive their connections, see chat.session); it
    returns after `shutdown()` once every turn is stored and every connection has
    closed (or the grace period ran out and the rest were cancelled).
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        agent: AgentClient,
        *,
        cluster: Cluster | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.agent = agent
        self.cluster = cluster
        self.verifier = TokenVerifier(
            secret=config.jwt_secret,
            public_key_pem=config.jwt_public_key,
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
        )
        self.port: int | None = None
        self.metrics = ServerMetrics()
        store.write_observer = self.metrics.store_write_seconds.observe
        self.services = TurnServices(config, store, agent, self.metrics)
        self.http_routes: dict[str, HttpRoute] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            **web_page_routes(),
        }
        self.sessions_api = SessionsApi(
            store, self.verifier, is_running=self._is_running, end_session=self.end_session
        )
        self.timers = ConnectionTimers()
        self._drops = PassGate(DROPS_PER_PASS, pause_gc=True)
        self._admissions = PassGate(ADMISSIONS_PER_PASS, pause_gc=False)
        self._live: dict[str, LiveSession] = {}
        self._connections: set[ChatConnection] = set()
        self._connections_by_user: dict[str, int] = {}  # admitted or being admitted
        self._takeovers: set[str] = set()  # sessions with a takeover being admitted
        self._websockets = 0  # WebSocket upgrades in progress or admitted
        self._count_changed = trio.Event()
        self._turns: trio.Nursery | None = None
        self._shutdown = trio.Event()
        self._shutting_down = False

    @property
    def connection_count(self) -> int:
        """Admitted WebSocket connections open now."""
        return len(self._connections)

    async def wait_for_connection_count(self, count: int) -> None:
        """Return once `connection_count` is `count` (callers bound the wait)."""
        while self.connection_count != count:
            await self._count_changed.wait()

    def live_session(self, session_id: str) -> LiveSession | None:
        """The running side of a session, while it has a connection or work."""
        return self._live.get(session_id)

    def shutdown(self) -> None:
        """Begin a graceful shutdown; safe to call any number of times."""
        self._shutting_down = True
        self._shutdown.set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        capped = pacing.install(enabled=self.config.fast_paths)
        self.metrics.fast_path_active.labels("epoll_cap").set(int(capped))
        direct_writes = self.config.fast_paths and not self.config.tls_cert
        if self.config.fast_paths and self.config.tls_cert:
            log.warning("direct delta writes cannot apply over TLS: deltas go through TLS")
        self.metrics.fast_path_active.labels("direct_delta_writes").set(int(direct_writes))
        lean_reads = self.agent.lean_reads_active
        self.metrics.fast_path_active.labels("upstream_lean_reads").set(int(lean_reads))
        listeners: list[trio.abc.Listener[Any]] = list(
            await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        )
        self.port = listeners[0].socket.getsockname()[1]  # type: ignore[attr-defined]
        if self.config.tls_cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
            listeners = [
                trio.SSLListener(listener, context, https_compatible=True) for listener in listeners
            ]
        scheme = "https" if self.config.tls_cert else "http"
        serve = partial(self._serve_connections, listeners, scheme, task_status)
        if self.cluster is None:
            await serve()
        else:
            # The cluster wraps the server: whatever ends it, the turns and connections
            # still reach Redis while they clean up.
            await self.cluster.run(
                serve, on_command=self._on_command, on_dead_turn=self._store_dead_turn
            )

    async def _serve_connections(
        self,
        listeners: list[trio.abc.Listener[Any]],
        scheme: str,
        task_status: trio.TaskStatus[int],
    ) -> None:
        assert self.port is not None
        async with trio.open_nursery() as handlers:
            # These run until the drain is over and the handlers are cancelled.
            handlers.start_soon(self._drops.run)
            handlers.start_soon(self._admissions.run)
            handlers.start_soon(self.timers.run)
            if self.config.retention_days is not None:
                retention_s = self.config.retention_days * 86_400
                await self._delete_inactive(retention_s)  # before the first client
                handlers.start_soon(self._retention, retention_s)
            async with trio.open_nursery() as self._turns:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        partial(
                            trio.serve_listeners,
                            self._handle_stream,
                            listeners,
                            handler_nursery=handlers,
                        )
                    )
                    log.info("listening on %s://%s:%d", scheme, self.config.host, self.port)
                    task_status.started(self.port)
                    await self._shutdown.wait()
                    accepting.cancel_scope.cancel()
                await self._drain()
                self._turns.cancel_scope.cancel()
            handlers.cancel_scope.cancel()

    async def _drain(self) -> None:
        """Cancel every turn (stored `interrupted`) and close every connection with
        1001, within the grace; connections admitted later close at registration."""
        systemd_notify("STOPPING=1")
        log.info("shutting down: closing %d connections", self.connection_count)
        # Leave a margin inside the grace period for the store and the process exit.
        with trio.move_on_after(max(0.5, self.config.shutdown_grace_s - 1.0)):
            async with trio.open_nursery() as ending:
                for live in list(self._live.values()):
                    ending.start_soon(partial(live.end, timeout_s=FINAL_WRITE_TIMEOUT_S))
                for connection in list(self._connections):
                    connection.close(wire.ServerShuttingDown())
            while self._connections:
                for connection in list(self._connections):
                    connection.close(wire.ServerShuttingDown())
                    await connection.finished.wait()
            # Upgrades still in their handshake or admission: `_admit` refuses them with
            # 1001; cancelling their handlers instead would cut them off with no close.
            while self._websockets:
                await self._count_changed.wait()

    async def end_session(self, session_id: str) -> None:
        """End a session's live side before it is deleted, here and on every other
        instance: its connection is closed with 4410 and its running turn cancelled
        (stored, then deleted with the rest)."""
        await self._end_local_session(session_id)
        if self.cluster is not None:
            try:
                await self.cluster.end_session_everywhere(
                    session_id, timeout_s=FINAL_WRITE_TIMEOUT_S
                )
            except ClusterUnavailable:
                log.warning("session %s: deleted without reaching other instances", session_id)

    async def _end_local_session(self, session_id: str) -> None:
        live = self._live.get(session_id)
        if live is None:
            return
        if live.attached is not None:
            live.attached.close(wire.SessionDeleted())
        await live.end(timeout_s=FINAL_WRITE_TIMEOUT_S)

    async def _is_running(self, session_id: str) -> bool:
        live = self._live.get(session_id)
        if live is not None and live.running is not None:
            return True
        if self.cluster is None:
            return False
        try:
            return await self.cluster.turn_running(session_id)
        except ClusterUnavailable:
            return False

    async def _retention(self, older_than_s: float) -> None:
        """Delete sessions inactive for longer than the retention, hourly."""
        while True:
            await trio.sleep(RETENTION_CHECK_INTERVAL_S)
            await self._delete_inactive(older_than_s)

    async def _delete_inactive(self, older_than_s: float) -> None:
        try:
            deleted = await self.store.delete_inactive(older_than_s)
        except wire.StorageUnavailable:
            log.error("retention: the database refused the deletion; retrying later")
            return
        for session_id in deleted:
            await self.end_session(session_id)
        if deleted:
            log.info("retention: deleted %d inactive sessions", len(deleted))

    async def _metrics(self) -> HttpAnswer:
        # Counted when asked for: the live sessions are the one record of it.
        self.metrics.detached_sessions.set(sum(live.detached for live in self._live.values()))
        # Likewise the agent client for chaining, which stops when the upstream ignores it.
        chaining = self.config.upstream_store and self.agent.chaining_active
        self.metrics.upstream_chaining_active.set(int(chaining))
        return HttpAnswer(200, self.metrics.render(), CONTENT_TYPE_LATEST)

    async def _healthz(self) -> HttpAnswer:
        if self.cluster is not None and not await self.cluster.check():
            return json_answer(503, {"status": "degraded"})
        if not await self.store.healthy():
            # Deleted or replaced under us: every write is refused until a restart.
            return json_answer(503, {"status": "storage_error"})
        return json_answer(200, {"status": "ok"})

    # ------------------------------------------------------------------ per TCP stream

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one TCP connection. Never raises: a failing peer is logged and dropped."""
        try:
            head: RequestHead | None = None
            with trio.move_on_after(self.config.handshake_timeout_s):
                head = await read_request_head(stream)
            if head is not None:
                if head.is_websocket_upgrade:
                    await self._handle_websocket(stream, head)
                else:
                    await self._handle_http(stream, head)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            # A peer that leaves at any moment is no server fault: nothing to log
            # (trio-websocket's ConnectionClosed likewise, in `_handle_websocket`).
            pass
        except* Exception:
            log.exception("connection failed; the server keeps serving")
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle_http(self, stream: trio.abc.Stream, head: RequestHead) -> None:
        if SessionsApi.owns(head.path):
            await answer_http(stream, head, await self._answer_api(stream, head))
            return
        route = self.http_routes.get(head.path)
        if route is None or head.method not in ("GET", "HEAD"):
            # The contract: anything but the listed GETs is a 404, other methods included.
            await answer_http(stream, head, NOT_FOUND)
        else:
            await answer_http(stream, head, await route())

    async def _answer_api(self, stream: trio.abc.Stream, head: RequestHead) -> HttpAnswer:
        body: bytes | None = None
        with trio.move_on_after(self.config.handshake_timeout_s):
            body = await read_body(stream, head)
        if body is None:
            return error_answer(400, "bad_request", "The request body is missing or too large.")
        request = ApiRequest(
            head.method, head.path, head.query, head.headers.get("authorization", ""), body
        )
        try:
            return await self.sessions_api.answer(request)
        except wire.StorageUnavailable:
            return error_answer(503, "storage_error", "The database is unavailable.")

    async def _handle_websocket(self, stream: trio.abc.Stream, head: RequestHead) -> None:
        # Imported with the first upgrade (or by `warm_up`), not at start.
        from trio_websocket import ConnectionClosed, wrap_server_stream
        from wsproto.utilities import LocalProtocolError as WsprotoLocalProtocolError

        session_id = session_id_from_path(head.path)
        if session_id is None:
            await answer_http(stream, head, NOT_FOUND)
            return
        # Counted from here, handshake included, so --max-connections bounds descriptors.
        # Judged on arrival, first come first served: judged at admission, every one of a
        # burst larger than the limit would find the count over it, and none get in.
        self._websockets += 1
        over_limit = self._websockets > self.config.max_connections
        try:
            async with trio.open_nursery() as ws_tasks:
                ws: WebSocketConnection | None = None
                with trio.move_on_after(self.config.handshake_timeout_s):
                    client_stream = ClientStream(
                        stream, head.raw, self._drops, direct_writes=self.config.fast_paths
                    )
                    request = await wrap_server_stream(
                        ws_tasks,
                        client_stream,
                        message_queue_size=WS_MESSAGE_QUEUE_SIZE,
                        max_message_size=self.config.max_frame_bytes,
                    )
                    ws = await request.accept()
                    self.metrics.connections_opened.inc()
                if ws is not None:
                    await self._admissions.pass_through()
                    await self._run_session(
                        ws, client_stream, head, session_id, over_limit=over_limit
                    )
                ws_tasks.cancel_scope.cancel()
        except* ConnectionClosed:
            pass  # the peer left: no server fault, nothing to log (as in `_handle_stream`)
        except* WsprotoLocalProtocolError as errors:
            # trio-websocket issue #184: a peer's ping that arrives while we close makes
            # its reader task answer with a pong wsproto refuses. The peer is gone
            # either way; that is a peer's doing, not a server fault worth a traceback.
            log.info("websocket peer misbehaved while closing: %s", errors.exceptions[0])
        finally:
            self._websockets -= 1
            self._notify_count()

    async def _run_session(
        self,
        ws: WebSocketConnection,
        stream: ClientStream,
        head: RequestHead,
        session_id: str,
        *,
        over_limit: bool,
    ) -> None:
        from chat.connection import close_websocket  # with the first upgrade, see the top

        try:
            connection = await self._admit(ws, stream, head, session_id, over_limit=over_limit)
        except wire.StorageUnavailable:
            log.error("session %s: database unavailable, refusing the connection", session_id)
            await self._refuse(ws, wire.InternalError("database unavailable"))
            return
        except wire.CloseError as refused:
            log.info("connection refused: close %d (%s)", refused.close_code, refused.detail)
            await self._refuse(ws, refused)
            return
        head.release()
        self._register(connection)
        log.info("session %s: user connected (resumed=%s)", session_id, connection.resumed)
        try:
            if self._shutting_down:  # admitted while the drain ran: it ends at once
                connection.close(wire.ServerShuttingDown())
            if self.cluster is not None:
                await self._announce(connection)
            await connection.run()
        except Exception:
            log.exception("session %s: connection failed", session_id)
            connection.close(wire.InternalError())
            with trio.CancelScope(shield=True):
                await close_websocket(ws, wire.InternalError())
        finally:
            self._unregister(connection)
            if self.cluster is not None:
                with trio.CancelScope(shield=True):
                    await self._withdraw(connection)
            log.info("session %s: closed with %d", session_id, connection.close_code)

    async def _announce(self, connection: ChatConnection) -> None:
        """Tell the other instances this connection holds its session (one on another
        instance is taken over, 4009)."""
        assert self.cluster is not None
        try:
            await self.cluster.attach(connection.session_id, connection.user_id, connection.key)
        except ClusterUnavailable:
            log.warning("session %s: not announced to other instances", connection.session_id)

    async def _withdraw(self, connection: ChatConnection) -> None:
        assert self.cluster is not None
        await self.cluster.detach(connection.session_id, connection.user_id, connection.key)
        await self.cluster.release_user_slot(connection.user_id, connection.key)

    async def _refuse(self, ws: WebSocketConnection, error: wire.CloseError) -> None:
        from chat.connection import close_websocket  # with the first upgrade, see the top

        self.metrics.connections_closed.labels(str(error.close_code)).inc()
        await close_websocket(ws, error)

    def _register(self, connection: ChatConnection) -> None:
        self._connections.add(connection)
        self.metrics.active_connections.inc()
        self._notify_count()

    def _unregister(self, connection: ChatConnection) -> None:
        self._connections.discard(connection)
        self.metrics.active_connections.dec()
        self.metrics.connections_closed.labels(str(connection.close_code)).inc()
        self._release_user_slot(connection.user_id)
        self._notify_count()

    def _notify_count(self) -> None:
        self._count_changed.set()
        self._count_changed = trio.Event()

    def _release_user_slot(self, user_id: str) -> None:
        remaining = self._connections_by_user[user_id] - 1
        if remaining:
            self._connections_by_user[user_id] = remaining
        else:
            del self._connections_by_user[user_id]

    async def _admit(
        self,
        ws: WebSocketConnection,
        stream: ClientStream,
        head: RequestHead,
        session_id: str,
        *,
        over_limit: bool,
    ) -> ChatConnection:
        """Check everything before any session data is read; the user's slot is
        reserved before the first await and released on every way out but success.
        `over_limit`: it arrived with --max-connections reached. Raises CloseError or
        StorageUnavailable."""
        if self._shutting_down:
            raise wire.ServerShuttingDown()
        if not wire.is_valid_session_id(session_id):
            raise wire.InvalidSessionId()
        origin = head.headers.get("origin")
        if self.config.allowed_origins and origin is not None:
            if origin not in self.config.allowed_origins:
                raise wire.Forbidden("origin not allowed")
        user_id, expiry = self.verifier.verify(token_from(head))
        if over_limit:
            raise wire.ServerFull()
        if self.cluster is not None and not self.cluster.available:
            # Without Redis this instance cannot honour takeover, limits or resume
            # across instances: new clients try again (elsewhere, or later).
            raise wire.ServerFull("service degraded: redis unreachable")
        live = self._live.get(session_id)
        # A takeover replaces a connection, so it may go past the user's limit for the
        # moment the two overlap; one at a time per session, or a burst of takeovers
        # would each take a slot.
        takes_over = (
            live is not None
            and live.attached is not None
            and live.user_id == user_id
            and session_id not in self._takeovers
        )
        held = self._connections_by_user.get(user_id, 0)
        if held >= self.config.max_connections_per_user and not takes_over:
            raise wire.UserConnectionLimit()
        self._connections_by_user[user_id] = held + 1  # reserved: no await before this
        if takes_over:
            self._takeovers.add(session_id)
        try:
            return await self._claim_and_hand_over(
                ws, stream, session_id, user_id, expiry, takes_over
            )
        finally:
            if takes_over:
                self._takeovers.discard(session_id)

    async def _claim_and_hand_over(
        self,
        ws: WebSocketConnection,
        stream: ClientStream,
        session_id: str,
        user_id: str,
        expiry: float | None,
        takes_over: bool,
    ) -> ChatConnection:
        """The awaiting half of `_admit`, the user's slot reserved: claim the session,
        close an older connection of it (4009), and make the connection."""
        # With the first upgrade (or by `warm_up`), not at start: see the top.
        from chat.connection import ChatConnection
        from chat.session import LiveSession

        connection_key = secrets.token_hex(8)
        try:
            claim = await self.store.claim_session(session_id, user_id)
            if self._shutting_down:
                raise wire.ServerShuttingDown()
            if claim.owner_id != user_id:
                raise wire.Forbidden("session belongs to another user")
            if self.cluster is not None:
                await self._reserve_in_cluster(user_id, session_id, connection_key, takes_over)
        except BaseException:
            self._release_user_slot(user_id)
            raise
        live = self._live.get(session_id)
        previous = live.hand_over() if live is not None else None
        if previous is not None:
            # The older connection goes first (4009), so that the user's count and
            # the registry never hold both.
            with trio.move_on_after(FINAL_WRITE_TIMEOUT_S):
                await previous.finished.wait()
        # Looked up after that wait: a turn that ended during it, with nobody attached,
        # let its LiveSession go. From here on `expect_arrival` holds it until the
        # connection attaches (in `ChatConnection.run`) or gives up.
        live = self._live.get(session_id)
        if live is None:
            live = self._live[session_id] = LiveSession(
                session_id,
                user_id,
                self.services,
                turns=self._running_turns(),
                timers=self.timers,
                on_idle=self._forget_live_session,
                cluster=self.cluster,
            )
        live.expect_arrival()  # it stays until this connection attaches (or gives up)
        return ChatConnection(
            live,
            ws,
            stream,
            key=connection_key,
            timers=self.timers,
            token_expiry=expiry,
            resumed=claim.resumed,
            history_length=claim.history_length,
        )

    async def _reserve_in_cluster(
        self, user_id: str, session_id: str, connection_key: str, takes_over: bool
    ) -> None:
        """Count the connection against the user's limit on every instance. Raises
        UserConnectionLimit, or ServerFull when Redis does not answer."""
        assert self.cluster is not None
        try:
            takes_over = takes_over or await self.cluster.attached_elsewhere(session_id, user_id)
            reserved = await self.cluster.reserve_user_slot(
                user_id,
                connection_key,
                limit=self.config.max_connections_per_user,
                takes_over=takes_over,
            )
        except ClusterUnavailable:
            raise wire.ServerFull("service degraded: redis unreachable") from None
        if not reserved:
            raise wire.UserConnectionLimit()

    def _on_command(self, command: Command) -> None:
        """A command from another instance for a session whose turns run here."""
        live = self._live.get(command.session_id)
        if live is None:
            return
        if command.op == "delete":
            self._running_turns().start_soon(self._end_local_session, command.session_id)
        elif command.op == "stop":
            live.stop()
        elif command.op == "tool":
            live.answer_tool(
                wire.ToolResponse(
                    type="tool_response",
                    call_id=command.fields.get("call_id", ""),
                    content=command.fields.get("content", ""),
                )
            )
        elif command.op == "takeover":
            if live.attached is not None and live.attached.key == command.fields.get(
                "connection"
            ):
                live.hand_over()
                live.remote_attached()
        elif command.op == "attached":
            live.remote_attached()
        elif command.op == "detached":
            live.remote_detached()

    async def _store_dead_turn(
        self, session_id: str, lease: Mapping[str, str], frames: list[dict[str, Any]]
    ) -> None:
        """Store a dead instance's running turn `interrupted`, with the text its frames
        carried, and end it for whoever follows the session."""
        turn_id, reply_to = lease.get("turn_id"), lease.get("reply_to")
        if turn_id is None or reply_to is None:
            return  # it died before its turn began: nothing was said
        text = "".join(
            frame.get("content", "")
            for frame in frames
            if frame.get("type") == "text_delta" and frame.get("turn_id") == turn_id
        )
        try:
            await self.store.finish_turn(
                session_id,
                reply_to=int(reply_to),
                turn_id=turn_id,
                content=text,
                status="interrupted",
                response_id=None,
                tool_calls=[],
            )
        except wire.StorageUnavailable:
            log.error("session %s: a dead instance's turn could not be stored", session_id)
            return
        assert self.cluster is not None
        end = wire.ResponseEnd(
            turn_id=turn_id, full_content=text, status="interrupted", response_id=None
        )
        await self.cluster.publish(
            session_id, [wire.encode(end), wire.encode(wire.Typing(is_typing=False))]
        )

    def _running_turns(self) -> trio.Nursery:
        assert self._turns is not None, "admission happens only while serving"
        return self._turns

    def _forget_live_session(self, live: LiveSession) -> None:
        if self._live.get(live.session_id) is live:
            del self._live[live.session_id]


def build_agent(config: Config) -> AgentClient:
    if config.uses_demo_model:
        from chat.demo_model import DemoModelTransport  # only the demo needs it

        return AgentClient(
            base_url=DEFAULT_UPSTREAM_URL,
            api_key=None,
            model="demo",
            transport=DemoModelTransport(),
        )
    return AgentClient(
        base_url=config.upstream_url,
        api_key=config.api_key,
        model=config.model,
        idle_timeout_s=config.upstream_idle_timeout_s,
        lean_reads=config.fast_paths,
    )


async def run_server(
    config: Config,
    *,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[ChatServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open the store and the upstream client, serve until shutdown, close both.

    Started with `nursery.start(run_server, config)` it reports the ChatServer once
    listening (its `port` is set). With `handle_signals`, SIGTERM/SIGINT shut it down.
    """
    store = await open_store(config.db_path)
    agent = build_agent(config)
    cluster = Cluster(config.redis_url) if config.redis_url else None
    server = ChatServer(config, store, agent, cluster=cluster)

    async def serve_then_stop_watching(task_status: trio.TaskStatus[int]) -> None:
        await server.serve(task_status=task_status)
        nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(_shutdown_on_signal, server)
            await nursery.start(serve_then_stop_watching)
            systemd_notify("READY=1")
            nursery.start_soon(watchdog_pings)
            task_status.started(server)
    finally:
        with trio.CancelScope(shield=True):
            await agent.aclose()
            await store.aclose()


# What start-up leaves to the first request (docs/operations.md, "Size and start
# time"): PyJWT with cryptography (chat.auth), the WebSocket side (`_handle_websocket`),
# and what pydantic imports to build its first validator.
DEFERRED_IMPORTS = (
    "jwt",
    "trio_websocket",
    "wsproto.utilities",
    "chat.connection",
    "chat.session",
    "importlib.metadata",
)


async def warm_up(config: Config) -> None:
    """Load, right after the server listens, what start-up left to the first request, so
    that a client arriving a moment later does not wait for it (the command line does;
    a server started with `run_server` alone loads it when first needed).

    The imports, and for an https:// upstream its CA bundle (chat.upstream_tls), are read
    in a worker thread: they only share the GIL with the event loop, which goes on
    serving (an import on the loop would hold it for the whole import). The frame
    validators are built on the loop, one per pass (pydantic's building is not safe
    against a first use on another thread; each takes about a millisecond). A request
    that needs one of these first loads it itself, or waits for this thread's."""
    tls_upstream = not config.uses_demo_model and config.upstream_url.startswith("https:")
    # Not abandoned when cancelled: a thread still importing (a Rust or C extension's
    # initialisation) while the interpreter shuts down can crash the process. A stop
    # during these milliseconds waits for them.
    await trio.to_thread.run_sync(partial(_load_deferred, tls_upstream=tls_upstream))
    for build in wire.validator_builds():
        build()
        await trio.lowlevel.checkpoint()
    # From here on the process holds only what it serves with (bench/soak.py counts its
    # descriptors from this line: an import in the worker thread has a file open).
    log.info("warm-up done: deferred modules loaded, frame validators built")


def _load_deferred(*, tls_upstream: bool) -> None:
    for name in DEFERRED_IMPORTS:
        importlib.import_module(name)
    if tls_upstream:
        upstream_tls.load_trust_stores()


async def _shutdown_on_signal(server: ChatServer) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            # systemd may deliver SIGTERM twice (KillMode=mixed); repeats are harmless.
            log.info("received %s", signal.Signals(signum).name)
            server.shutdown()


def _build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; with `command`, the setting flags only on that subcommand (the
    one being parsed: ~40 flags on each of four took ~4 ms of every start)."""
    program = Path(sys.argv[0]).name or "server.py"
    parser = argparse.ArgumentParser(prog=program, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run the server (the default)")
    check = commands.add_parser("check-config", help="validate the configuration and exit")
    check.add_argument("--print", action="store_true", help="show each setting and its source")
    token = commands.add_parser("token", help="print a signed JWT for the configured secret")
    token.add_argument("--sub", required=True, help="the user id")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    backup = commands.add_parser("backup", help="copy the live database, consistently")
    backup.add_argument("destination", help="file to write (must not exist)")
    subcommands = {"serve": serve, "check-config": check, "token": token, "backup": backup}
    for name, subcommand in subcommands.items():
        if command is None or name == command:
            add_setting_flags(subcommand)
    return parser


def main(
    argv: Sequence[str] | None = None, *, instruments: Sequence[trio.abc.Instrument] = ()
) -> int:
    """The command line. `instruments` are given to trio.run (the bench measures the
    loop with one)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0].startswith("-"):
        arguments.insert(0, "serve")
    args = _build_parser(arguments[0]).parse_args(arguments)
    try:
        resolved = resolve_settings(args, os.environ)
        if args.command == "backup":
            # Copying the database needs its path only, not the server's secrets.
            config = Config(db_path=resolved["db"].value)
        else:
            config = config_from_settings(resolved, os.environ)
        if args.command == "check-config":
            check_deployment(config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        if args.print:
            print_settings(resolved)
        print("configuration OK", file=sys.stderr)
        return 0
    if args.command == "token":
        if config.jwt_secret is None or config.jwt_secret_generated:
            print(
                "token: needs the server's jwt-secret (a random --insecure-dev one "
                "lives only inside that server run)",
                file=sys.stderr,
            )
            return 2
        print(issue_token(config.jwt_secret, args.sub, args.ttl))
        return 0
    if args.command == "backup":
        if is_postgres_url(config.db_path):
            print("backup: the database is PostgreSQL; back it up with pg_dump", file=sys.stderr)
            return 2
        try:
            backup_database(config.db_path, args.destination)
        except (OSError, sqlite3.Error, FileExistsError) as exc:
            print(f"backup failed: {exc}", file=sys.stderr)
            return 1
        print(f"backed up {config.db_path} to {args.destination}", file=sys.stderr)
        return 0
    # First, while the process has no thread (the log writer is one): see the function.
    reserve_failure = pacing.reserve_descriptor_table(config.max_connections)
    configure_logging(resolved["log-level"].value, resolved["log-format"].value)
    if reserve_failure is not None:
        log.warning("%s", reserve_failure)
    if config.uses_demo_model:
        log.warning("no OPENAI_API_KEY and no --upstream-url: serving the OFFLINE DEMO MODEL")
    pacing.tune_garbage_collector()  # before the loop runs
    trio.run(partial(_serve_from_command_line, config), instruments=instruments)
    log.info("stopped")
    return 0


async def _serve_from_command_line(config: Config) -> None:
    """`run_server` with signal handling. The --insecure-dev URL is printed once the
    listener is bound: with `--port 0` only then is the real port known. Then `warm_up`."""
    async with trio.open_nursery() as nursery:
        server: ChatServer = await nursery.start(partial(run_server, config, handle_signals=True))
        if config.jwt_secret_generated:
            _print_dev_token(replace(config, port=server.port or config.port))
        await warm_up(config)
        # Like everything imported before the loop ran (pacing.tune_garbage_collector).
        pacing.freeze_garbage_collector()


def _print_dev_token(config: Config) -> None:
    assert config.jwt_secret is not None
    token = issue_token(config.jwt_secret, "dev-user", 24 * 3600)
    scheme = "https" if config.tls_cert else "http"
    # Printed to the terminal, never to the log: this secret lives only for this run.
    print(
        "\n  --insecure-dev: a random secret for this run. Open the chat at\n"
        f"  {scheme}://{config.host}:{config.port}/?token={token}\n"
        f"  or connect a client to ws://{config.host}:{config.port}/ws/chat/demo?token={token}\n",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
