"""Operations: the Prometheus metrics, the log (its formats and its writer thread),
and the systemd protocol (readiness, stopping, watchdog).

Resource handling: the log is written by one thread of its own
(`NonBlockingLogHandler`), so a slow stderr never stalls the event loop; its queue is
bounded and drops are counted and reported. systemd notifications are non-blocking
datagrams.
"""

from __future__ import annotations

import copy
import json
import logging
import logging.handlers
import os
import queue
import socket
import threading
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

import protocol as wire

log = logging.getLogger("chat")

# Log records waiting for the log writer thread; past this they are dropped and counted.
LOG_QUEUE_RECORDS = 10_000
# At exit, queued records are written for this long at most.
LOG_DRAIN_TIMEOUT_S = 5.0

class ServerMetrics:
    """The Prometheus metrics of one server, in a registry of its own (so that a test
    process can run several servers), served at `/metrics`."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        self.active_connections = Gauge(
            "chat_active_connections",
            "Authenticated WebSocket connections open now.",
            registry=registry,
        )
        self.connections_opened = Counter(
            "chat_connections_opened", "WebSocket handshakes accepted.", registry=registry
        )
        self.connections_closed = Counter(
            "chat_connections_closed",
            "WebSocket connections closed, by close code.",
            ["code"],
            registry=registry,
        )
        self.messages_received = Counter(
            "chat_messages_received", "User messages accepted and stored.", registry=registry
        )
        self.turns = Counter("chat_turns", "Turns ended, by status.", ["status"], registry=registry)
        self.deltas_sent = Counter(
            "chat_deltas_sent", "text_delta frames written to clients.", registry=registry
        )
        self.upstream_request_seconds = Histogram(
            "chat_upstream_request_seconds",
            "One upstream request, first byte sent to end.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry,
        )
        self.time_to_first_token_seconds = Histogram(
            "chat_time_to_first_token_seconds",
            "Turn start to its first text delta.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=registry,
        )
        self.upstream_errors = Counter(
            "chat_upstream_errors",
            "Upstream failures that ended a turn, by kind.",
            ["kind"],
            registry=registry,
        )
        self.store_write_seconds = Histogram(
            "chat_store_write_seconds",
            "One SQLite write transaction, queueing included.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=registry,
        )

        self.fast_path_active = Gauge(
            "chat_fast_path_active",
            "1 where a measured reach beneath a library is in force, 0 where it was "
            "switched off or cannot apply (docs/operations.md).",
            ["path"],
            registry=registry,
        )
        self.upstream_chaining_active = Gauge(
            "chat_upstream_chaining_active",
            "1 while turns chain with previous_response_id; 0 with --no-store, or once "
            "the upstream answered a chained request without echoing it (full history "
            "from then on, for the life of the process).",
            registry=registry,
        )
        self.detached_sessions = Gauge(
            "chat_detached_sessions",
            "Sessions whose turn or queue goes on with no connection attached.",
            registry=registry,
        )
        self.attaches_with_running_turn = Counter(
            "chat_attaches_with_running_turn",
            "Connections that attached to a session while its turn ran (replayed).",
            registry=registry,
        )
        self.detach_grace_expiries = Counter(
            "chat_detach_grace_expiries",
            "Detached sessions whose grace ran out: their turn was stored interrupted.",
            registry=registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def systemd_notify(state: str) -> None:
    """Tell systemd about our state (READY=1, STOPPING=1, WATCHDOG=1) through the
    datagram socket in $NOTIFY_SOCKET; a no-op when not run by systemd (Type=notify)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)  # a full queue must never stall the event loop
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("systemd notify failed: %s", exc.strerror)


async def watchdog_pings() -> None:
    """With WatchdogSec= set, ping at half the interval. The pings come from the event
    loop itself, so a stalled loop stops them and systemd restarts the service."""
    interval_us = os.environ.get("WATCHDOG_USEC")
    owner = os.environ.get("WATCHDOG_PID")
    if not interval_us or (owner and owner != str(os.getpid())):
        return
    while True:
        systemd_notify("WATCHDOG=1")
        await trio.sleep(int(interval_us) / 2_000_000)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": wire.utc_timestamp(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in self._STANDARD)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


class NonBlockingLogHandler(logging.handlers.QueueHandler):
    """Hands each record to a writer thread without waiting, so that a slow stderr (a
    disk journal commit, a busy journald socket) never stalls the event loop.

    The message and any traceback are rendered here, while the record's arguments
    are still current; the writer thread formats the line and writes it to `target`.
    Bounded: past `max_records` waiting, records are dropped and counted, and the
    writer says how many before its next line. `close` (run by logging at exit)
    writes what is queued, for LOG_DRAIN_TIMEOUT_S at most, and stops the thread.
    """

    def __init__(self, target: logging.Handler, max_records: int = LOG_QUEUE_RECORDS) -> None:
        self.records: queue.Queue[logging.LogRecord | None] = queue.Queue(max_records)
        super().__init__(self.records)
        self.dropped = 0  # only ever grows; the writer reports the growth
        self._writer = _LogWriter(self, target)
        self._writer.start()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        prepared = copy.copy(record)
        prepared.msg, prepared.args = record.getMessage(), None
        if record.exc_info:
            prepared.exc_text = _TRACEBACKS.formatException(record.exc_info)
            prepared.exc_info = None
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.records.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        self._writer.stop()
        super().close()


class _LogWriter:
    """The thread of a NonBlockingLogHandler: writes its records, and its drops."""

    def __init__(self, source: NonBlockingLogHandler, target: logging.Handler) -> None:
        self._source = source
        self._target = target
        self._reported = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._write, name="log writer", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        while (record := self._source.records.get()) is not None:
            self._report_drops()
            self._target.handle(record)

    def _report_drops(self) -> None:
        dropped = self._source.dropped - self._reported
        if dropped:
            self._reported += dropped
            message = f"{dropped} log records dropped: stderr was not keeping up"
            self._target.handle(
                logging.makeLogRecord(
                    {
                        "name": log.name,
                        "levelno": logging.WARNING,
                        "levelname": "WARNING",
                        "msg": message,
                    }
                )
            )

    def stop(self) -> None:
        """Write what is queued, waiting at most LOG_DRAIN_TIMEOUT_S: a stderr that never
        drains cannot hold the process at exit. Stopping twice is fine."""
        if self._thread is None:
            return
        with suppress(queue.Full):
            self._source.records.put(None, timeout=LOG_DRAIN_TIMEOUT_S)  # the end mark
        self._thread.join(LOG_DRAIN_TIMEOUT_S)
        self._thread = None


_TRACEBACKS = logging.Formatter()


def configure_logging(level: str, log_format: str) -> None:
    """Human-readable lines by default, JSON lines with `--log-format json`, to stderr,
    written by a thread of their own (NonBlockingLogHandler)."""
    stderr = logging.StreamHandler()
    if log_format == "json":
        stderr.setFormatter(JsonLogFormatter())
    else:
        stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[NonBlockingLogHandler(stderr)], force=True)
    # Library loggers can print request lines (with tokens in URLs) at debug level.
    for noisy in ("trio-websocket", "httpx", "httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
