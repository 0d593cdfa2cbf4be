"""One load-client process of the benchmark: trio + trio-websocket, many sessions.

    python bench/load_client.py '{"mode": "idle", ...}'

Talks to the orchestrator (bench.py) in JSON lines: it prints
``{"event": "ready", ...}`` once every session is connected (or has failed), waits
for a ``go START W0 W1`` line on stdin (``time.monotonic()`` values: when to send
the first message, and the window whose deltas are counted apart), runs its turns
and prints ``{"event": "result", ...}``. In ``idle`` mode it holds its connections
after "ready" until stdin closes or the orchestrator kills it.

Deltas are counted by the fake's stamps ``<t=...>`` in the text, never by frames:
a lagging client gets consecutive deltas merged into one frame.

Error handling: a failed session is counted and described (first few only), never
fatal to the others. Every receive is bounded by ``recv_timeout_s``.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from typing import Any

import jwt
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

STAMP_RE = re.compile(r"<t=([0-9.]+)>")
RECEIVED_RE = re.compile(r"<r=([0-9.]+)>")
MAX_ERRORS_KEPT = 5


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Client:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.recv_timeout_s: float = spec.get("recv_timeout_s", 30.0)
        self.errors: list[str] = []
        self.error_count = 0
        self.connected: list[tuple[str, WebSocketConnection]] = []
        self.deltas = 0
        self.window_deltas = 0
        self.latencies_us: list[int] = []
        self.ttfd_us: list[int] = []
        self.stops: list[dict[str, Any]] = []
        self.statuses: dict[str, int] = {}
        self.turns_done = 0

    def fail(self, what: str, exc: BaseException) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")

    async def connect_one(
        self, nursery: trio.Nursery, index: int, limiter: trio.CapacityLimiter
    ) -> None:
        spec = self.spec
        sid = f"{spec['session_prefix']}{index}"
        user = f"{spec['user_prefix']}{index}"
        token = jwt.encode(
            {"sub": user, "exp": int(time.time()) + 3 * 3600}, spec["secret"], algorithm="HS256"
        )
        url = f"{spec['base_url']}/ws/chat/{sid}?token={token}"
        try:
            async with limiter:
                with trio.fail_after(self.recv_timeout_s):
                    ws = await connect_websocket_url(
                        nursery, url, receive_buffer_size=65536, message_queue_size=64
                    )
                    first = json.loads(await ws.get_message())
            if first.get("type") != "connected":
                raise RuntimeError(f"first frame {first.get('type')}")
            self.connected.append((sid, ws))
        except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError, RuntimeError) as exc:
            self.fail(f"connect {sid}", exc)

    async def run_session(self, order: int, sid: str, ws: WebSocketConnection, go: float) -> None:
        spec = self.spec
        total = spec.get("stagger_total", 1) or 1
        start = go + spec.get("start_delay_s", 0.0)
        start += (spec.get("stagger_offset", 0) + order) / total * spec.get("stagger_s", 0.0)
        await trio.sleep(max(0.0, start - time.monotonic()))
        until = go + spec["until_s"] if spec.get("until_s") else None
        try:
            for turn in range(spec.get("turns", 1)):
                if until is not None and time.monotonic() >= until:
                    break
                await self.one_turn(sid, ws, turn)
                if spec.get("pause_s"):
                    await trio.sleep(spec["pause_s"])
        except (ConnectionClosed, trio.TooSlowError, RuntimeError) as exc:
            self.fail(f"turn {sid}", exc)

    async def one_turn(self, sid: str, ws: WebSocketConnection, turn: int) -> None:
        spec = self.spec
        stop_after = (
            random.randint(spec["stop_after_min"], spec["stop_after_max"])
            if spec.get("stop_after_min")
            else None
        )
        content = (
            f"bench sid={sid} turn={turn} n={spec['n']} every={spec['every_ms']} "
            f"first={spec.get('first_ms', 0)} dur={spec.get('dur_s', 60)}"
        )
        w0, w1 = self.window
        collect = spec.get("collect_latency", True)
        seen = 0
        sent_at = time.monotonic()
        await ws.send_message(json.dumps({"type": "message", "content": content}))
        while True:
            with trio.fail_after(self.recv_timeout_s):
                text = await ws.get_message()
            now = time.monotonic()
            if '"response_end"' in text:
                status = json.loads(text).get("status", "?")
                self.statuses[status] = self.statuses.get(status, 0) + 1
                self.turns_done += 1
                return
            stamps = STAMP_RE.findall(text)
            if not stamps:
                frame = json.loads(text)
                if frame.get("type") == "error":
                    raise RuntimeError(f"error frame {frame.get('code')}")
                continue
            if seen == 0 and spec.get("collect_ttfd", True):
                received = RECEIVED_RE.search(text)
                if received is not None:
                    fake_own = float(stamps[0]) - float(received.group(1))
                    self.ttfd_us.append(int((now - sent_at - fake_own) * 1e6))
            seen += len(stamps)
            self.deltas += len(stamps)
            if w0 <= now <= w1:
                self.window_deltas += len(stamps)
            if collect:
                self.latencies_us.extend(int((now - float(s)) * 1e6) for s in stamps)
            if stop_after is not None and seen >= stop_after:
                stop_after = None
                stopped_at = time.monotonic()
                await ws.send_message('{"type":"stop"}')
                self.stops.append({"sid": sid, "turn": str(turn), "t": stopped_at})

    async def main(self) -> None:
        spec = self.spec
        limiter = trio.CapacityLimiter(spec.get("concurrency", 50))
        self.window = (0.0, 0.0)
        async with trio.open_nursery() as conn_nursery:
            async with trio.open_nursery() as nursery:
                for index in range(spec["first_index"], spec["first_index"] + spec["count"]):
                    nursery.start_soon(self.connect_one, conn_nursery, index, limiter)
            self.connected.sort(key=lambda pair: pair[0])
            _emit({"event": "ready", "connected": len(self.connected),
                   "errors": self.error_count, "error_samples": self.errors})
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if spec["mode"] == "idle" or not line.startswith("go "):
                conn_nursery.cancel_scope.cancel()
                return
            _, go, w0, w1 = line.split()
            self.window = (float(w0), float(w1))
            with trio.move_on_after(spec.get("phase_timeout_s", 120.0)) as scope:
                async with trio.open_nursery() as nursery:
                    for order, (sid, ws) in enumerate(self.connected):
                        nursery.start_soon(self.run_session, order, sid, ws, float(go))
            if scope.cancelled_caught:
                self.fail("phase", TimeoutError("phase timeout"))
            _emit({
                "event": "result", "deltas": self.deltas, "window_deltas": self.window_deltas,
                "latencies_us": self.latencies_us, "ttfd_us": self.ttfd_us,
                "stops": self.stops, "statuses": self.statuses, "turns": self.turns_done,
                "errors": self.error_count, "error_samples": self.errors,
            })
            # Closing handshakes are not measured: drop the sockets and leave.
            conn_nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(Client(json.loads(sys.argv[1])).main)
