"""A bounded soak of the real server: many clients connecting, chatting, stopping and
disconnecting at random for a fixed time, against a paced fake upstream.

    python bench/soak.py                       # 5 minutes, 300 clients
    python bench/soak.py --duration 60 --clients 100
    python bench/soak.py --quick               # ~20 s, 40 clients
    python bench/soak.py --quick --json report.json

Three processes, all on loopback: this driver (the clients), the server
(`server.py serve`, its own SQLite file in a temporary folder) and the fake
upstream (this file run with `_upstream`: a Responses API that streams 5 to 40
words, 15 ms apart, each answer on its own `Connection: close` exchange).

Each virtual client loops until the deadline: connect (a new session, or its last
one again), then a few actions drawn at random (a full turn; a turn stopped after
its first delta; a turn abandoned by disconnecting mid-stream; a history request;
a ping), with a short think time between, then disconnect. The report gives turns
by status, errors by kind, the server's RSS at the start, at a few points and at
the end, and its open file descriptors at the start and the end (after every
client left): a leak shows as a rising RSS trend or an fd count that does not
come back.

Self-contained: it needs only the project's own modules (for the SSE helpers) and
its dependencies; it never touches bench/bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import jwt
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url
from wsproto.utilities import LocalProtocolError

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from chat.demo_model import (  # noqa: E402
    encode_sse,
    previous_response_id_of,
    text_response_events,
)

JWT_SECRET = "soak-secret-that-is-long-enough-for-hs256"
UPSTREAM_DELTA_INTERVAL_S = 0.015
START_TIMEOUT_S = 30.0
# Clients start spread over this, so hundreds of handshakes do not land at once.
RAMP_UP_S = 10.0
CONNECT_TIMEOUT_S = 20.0
# One client action (a whole turn at most) must finish within this, or it is an error.
ACTION_TIMEOUT_S = 30.0
# After the last client left, how long the server may take to release its fds.
SETTLE_TIMEOUT_S = 15.0
WARM_RE = re.compile(r"warm-up done")
LISTENING_RE = re.compile(r"listening on http://[^\s:]+:(\d+)")


# =========================================================================== fake upstream


async def _upstream_handle(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    rng = random.Random()
    body = b""
    try:
        with trio.move_on_after(10):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
        words = [f"w{n} " for n in range(rng.randint(5, 40))]
        try:
            chained = previous_response_id_of(json.loads(body))
        except ValueError:
            chained = None
        events = text_response_events(
            f"resp_soak_{rng.getrandbits(48):x}", "soak", words, previous_response_id=chained
        )
        head = h11.Response(
            status_code=200,
            headers=[("content-type", "text/event-stream"), ("connection", "close")],
        )
        await stream.send_all(conn.send(head))
        for sse_event in events:
            if sse_event["type"] == "response.output_text.delta":
                await trio.sleep(UPSTREAM_DELTA_INTERVAL_S)
            await stream.send_all(conn.send(h11.Data(data=encode_sse(sse_event))))
        await stream.send_all(conn.send(h11.EndOfMessage()))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass  # the server closed the request (a stop or a disconnect): expected
    finally:
        await trio.aclose_forcefully(stream)


async def _serve_upstream() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(f"PORT {listeners[0].socket.getsockname()[1]}", flush=True)
    await trio.serve_listeners(_upstream_handle, listeners)


# =========================================================================== processes


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Child:
    """A child process whose stdout/stderr are drained for its whole life."""

    def __init__(self, process: trio.Process, name: str) -> None:
        self.process = process
        self.name = name
        self.output = bytearray()
        self.changed = trio.Event()

    async def drain(self, stream: trio.abc.ReceiveStream) -> None:
        try:
            while chunk := await stream.receive_some(65536):
                self.output += chunk
                # Keep only the tail: a soak's INFO log is long.
                if len(self.output) > 4 * 1024 * 1024:
                    del self.output[: len(self.output) - 1024 * 1024]
                self.changed.set()
                self.changed = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def wait_for(self, pattern: re.Pattern[str]) -> re.Match[str]:
        with trio.fail_after(START_TIMEOUT_S):
            while True:
                changed = self.changed
                if match := pattern.search(self.output.decode("utf-8", "replace")):
                    return match
                if self.process.returncode is not None:
                    raise RuntimeError(f"{self.name} exited:\n{self.output.decode()[-3000:]}")
                await changed.wait()


async def _start(nursery: trio.Nursery, args: list[str], name: str) -> Child:
    process = await trio.lowlevel.open_process(
        args,
        cwd=str(PROJECT_DIR),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    child = Child(process, name)
    assert process.stdout is not None
    nursery.start_soon(child.drain, process.stdout)
    return child


# =========================================================================== clients


@dataclass
class Stats:
    turns: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    first_delta_s: list[float] = field(default_factory=list)


def _token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 24 * 3600}, JWT_SECRET)


async def _receive(ws: Any) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await ws.get_message())
        if frame["type"] != "ping":
            return frame


async def _turn(ws: Any, stats: Stats, how: str) -> bool:
    """One turn: `full`, `stop` (after the first delta) or `abandon` (disconnect after
    the first delta). Returns False when the connection must be left."""
    sent_at = trio.current_time()
    await ws.send_message(json.dumps({"type": "message", "content": f"soak {how}"}))
    seen_delta = False
    while True:
        frame = await _receive(ws)
        kind = frame["type"]
        if kind == "text_delta" and not seen_delta:
            seen_delta = True
            stats.first_delta_s.append(trio.current_time() - sent_at)
            if how == "stop":
                await ws.send_message(json.dumps({"type": "stop"}))
            elif how == "abandon":
                stats.turns["abandoned"] += 1
                return False
        elif kind == "error":
            stats.errors[f"error_frame:{frame['code']}"] += 1
        elif kind == "response_end":
            stats.turns[frame["status"]] += 1
        elif kind == "typing" and frame["is_typing"] is False:
            return True


async def _client(number: int, deadline: float, port: int, stats: Stats, seed: int) -> None:
    rng = random.Random(seed * 100_003 + number)
    user = f"soak-user-{number}"
    token = _token(user)
    sessions = 0
    await trio.sleep(rng.uniform(0, min(RAMP_UP_S, (deadline - trio.current_time()) / 4)))
    while trio.current_time() < deadline:
        if sessions == 0 or rng.random() < 0.6:
            sessions += 1
        url = f"ws://127.0.0.1:{port}/ws/chat/soak-{number}-{sessions}?token={token}"
        try:
            with trio.fail_after(ACTION_TIMEOUT_S * 3):
                async with open_websocket_url(url, connect_timeout=CONNECT_TIMEOUT_S) as ws:
                    stats.connections += 1
                    connected = await _receive(ws)
                    if connected["type"] != "connected":
                        stats.errors[f"unexpected:{connected['type']}"] += 1
                        continue
                    for _ in range(rng.randint(1, 5)):
                        if trio.current_time() >= deadline:
                            break
                        action = rng.choices(
                            ["full", "stop", "abandon", "history", "ping"], [55, 15, 10, 10, 10]
                        )[0]
                        stats.actions[action] += 1
                        with trio.fail_after(ACTION_TIMEOUT_S):
                            if action in ("full", "stop", "abandon"):
                                if not await _turn(ws, stats, action):
                                    break
                            else:
                                await ws.send_message(json.dumps({"type": action}))
                                answer = "history" if action == "history" else "pong"
                                while (await _receive(ws))["type"] != answer:
                                    pass
                        await trio.sleep(rng.uniform(0.05, 0.8))
        except ConnectionClosed as closed:
            code = closed.reason.code if closed.reason else None
            stats.errors[f"closed:{code}"] += 1
        except HandshakeError as exc:
            stats.errors[f"handshake:{type(exc).__name__}"] += 1
        except trio.TooSlowError:
            stats.errors["timeout"] += 1
        except OSError as exc:
            stats.errors[f"os:{type(exc).__name__}"] += 1
        except LocalProtocolError:
            # trio-websocket (client side) answers a server ping that arrives while it
            # is closing, and wsproto refuses: a client-library fault, not the server's.
            stats.errors["client_lib:pong_while_closing"] += 1
        except Exception as exc:  # one client's surprise must not end the soak
            stats.errors[f"client:{type(exc).__name__}"] += 1
        except trio.Cancelled:
            # trio-websocket can leak the Cancelled of its own connect timeout. Escaping,
            # it would cancel every sibling client. Nothing else cancels a client (the
            # run ends by the clock), and a real cancel would recur at the next await.
            stats.errors["client_lib:leaked_cancelled"] += 1
        except BaseExceptionGroup as group:
            # trio-websocket lets a connect timeout escape as a group that also holds
            # the Cancelled of its own inner connect attempts. Count it; a Cancelled
            # meant for us is raised again by trio at the next checkpoint anyway.
            leaves = group.split(trio.Cancelled)[1]
            names = sorted({type(e).__name__ for e in leaves.exceptions}) if leaves else []
            stats.errors[f"client_lib:group:{'+'.join(names) or 'Cancelled'}"] += 1
        await trio.sleep(rng.uniform(0.05, 0.5))


# =========================================================================== the run


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def soak(duration_s: float, clients: int, seed: int) -> dict[str, Any]:
    stats = Stats()
    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        async with trio.open_nursery() as nursery:
            upstream = await _start(nursery, [sys.executable, __file__, "_upstream"], "upstream")
            upstream_port = int((await upstream.wait_for(re.compile(r"PORT (\d+)"))).group(1))
            server = await _start(
                nursery,
                [
                    sys.executable,
                    str(PROJECT_DIR / "server.py"),
                    "serve",
                    "--port",
                    "0",
                    "--db",
                    str(Path(tmp) / "soak.db"),
                    "--jwt-secret",
                    JWT_SECRET,
                    "--upstream-url",
                    f"http://127.0.0.1:{upstream_port}/v1",
                    "--api-key",
                    "sk-soak",
                    "--max-connections-per-user",
                    "5",
                    "--rate-limit",
                    "600/60",
                    "--heartbeat-interval",
                    "10",
                    "--log-level",
                    "INFO",
                ],
                "server",
            )
            port = int((await server.wait_for(LISTENING_RE)).group(1))
            # Descriptors are counted once the warm-up has ended (INFO, as the listening
            # line): its imports in a worker thread hold a file open for a moment.
            await server.wait_for(WARM_RE)
            pid = server.process.pid
            started = trio.current_time()
            fds_start, rss_start = _fd_count(pid), _rss_kb(pid)
            samples.append({"t_s": 0.0, "rss_kb": rss_start, "fds": fds_start})
            deadline = started + duration_s

            async def sampler() -> None:
                interval_s = max(1.0, duration_s / 10)
                while True:
                    await trio.sleep(interval_s)
                    samples.append(
                        {
                            "t_s": round(trio.current_time() - started, 1),
                            "rss_kb": _rss_kb(pid),
                            "fds": _fd_count(pid),
                        }
                    )

            async with trio.open_nursery() as work:
                work.start_soon(sampler)
                async with trio.open_nursery() as crowd:
                    for number in range(clients):
                        crowd.start_soon(_client, number, deadline, port, stats, seed)
                work.cancel_scope.cancel()
            ended = trio.current_time()
            # Every client left; the server closes its side of each within moments.
            fds_end = _fd_count(pid)
            with trio.move_on_after(SETTLE_TIMEOUT_S):
                # Another process's fd table: nothing to await but polling it.
                while (fds_end := _fd_count(pid)) > fds_start:  # noqa: ASYNC110
                    await trio.sleep(0.2)
            rss_end = _rss_kb(pid)
            samples.append(
                {"t_s": round(trio.current_time() - started, 1), "rss_kb": rss_end, "fds": fds_end}
            )
            server.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await server.process.wait()
            exit_code = server.process.returncode
            upstream.process.kill()
            nursery.cancel_scope.cancel()
    server_log = server.output.decode("utf-8", "replace")
    return {
        "duration_s": round(ended - started, 1),
        "clients": clients,
        "connections": stats.connections,
        "turns": dict(stats.turns),
        "turns_completed": stats.turns.get("completed", 0),
        "actions": dict(stats.actions),
        "errors": dict(stats.errors),
        "first_delta_p50_s": _percentile(stats.first_delta_s, 0.5),
        "first_delta_p95_s": _percentile(stats.first_delta_s, 0.95),
        "rss_kb_start": rss_start,
        "rss_kb_end": rss_end,
        "rss_samples": samples,
        "fds_start": fds_start,
        "fds_end": fds_end,
        "fds_back_to_start": fds_end == fds_start,
        "server_exit_code": exit_code,
        "server_tracebacks": server_log.count("Traceback"),
    }


def _print_report(report: dict[str, Any]) -> None:
    print(f"soak: {report['clients']} clients for {report['duration_s']} s")
    print(f"  connections      {report['connections']}")
    print(f"  turns            {report['turns']}  (completed {report['turns_completed']})")
    print(f"  actions          {report['actions']}")
    print(f"  errors by kind   {report['errors'] or 'none'}")
    p50, p95 = report["first_delta_p50_s"], report["first_delta_p95_s"]
    if p50 is not None:
        print(f"  first delta      p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
    print(f"  server RSS       start {report['rss_kb_start']} kB, end {report['rss_kb_end']} kB")
    trend = ", ".join(f"{s['t_s']}s:{s['rss_kb']}" for s in report["rss_samples"])
    print(f"  RSS samples (kB) {trend}")
    print(
        f"  server fds       start {report['fds_start']}, end {report['fds_end']}"
        f" ({'back to start' if report['fds_back_to_start'] else 'NOT back to start'})"
    )
    print(
        f"  server exit      {report['server_exit_code']}"
        f" (tracebacks in its log: {report['server_tracebacks']})"
    )


def main() -> int:
    if sys.argv[1:2] == ["_upstream"]:
        trio.run(_serve_upstream)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, help="seconds (default 300; --quick 20)")
    parser.add_argument("--clients", type=int, help="virtual clients (default 300; --quick 40)")
    parser.add_argument("--quick", action="store_true", help="a ~20 s run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()
    duration = args.duration if args.duration is not None else (20.0 if args.quick else 300.0)
    clients = args.clients if args.clients is not None else (40 if args.quick else 300)
    report = trio.run(soak, duration, clients, args.seed)
    _print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
