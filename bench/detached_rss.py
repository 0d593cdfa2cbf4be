"""What a session detached mid-answer costs the server in memory, against the same
sessions idle (PROTOCOL.md, "Detach and resume").

    python bench/detached_rss.py                  # 1,000 sessions, about a minute
    python bench/detached_rss.py --sessions 100   # smaller and quicker

Everything on 127.0.0.1, each part its own process: the paced fake upstream
(bench/fake_upstream.py) and, twice, the server (`server.py`, a fresh database each
time, `--detach-grace 3600`); the clients are tasks of this process, speaking
WebSocket by hand (wsproto over a TCP stream), one user per session.

1. **idle**: N clients connect (sessions `rss-0` ... `rss-N-1`) and stay connected,
   sending nothing. Server VmRSS is read with all N open.
2. **detached**: a fresh server; N clients connect to the same sessions, each sends
   one message whose answer is slow (a first delta at once, then one every
   DELTA_EVERY_MS), waits for its first `text_delta`, then vanishes (TCP closed, no
   close frame). Once `/metrics` shows N detached sessions and no connection, server
   VmRSS is read: every session then holds a running turn, its upstream request, its
   text so far and its grace timer, and no socket of a client.

Before each phase the server serves WARMUP_SESSIONS whole turns (connect, one-delta
answer, close), so lazily built state (the upstream client's pool, SQLite's
statements) is in both baselines. Figures: (VmRSS in the phase - VmRSS at its
baseline) / N, for each phase, and their difference; the last line printed is JSON.

Resource handling: every child runs in its own process group and is killed (SIGKILL
to the group) in a `finally`; every wait has a deadline and the whole run is bounded
by `--timeout`. Error handling: a session that fails is counted; the run fails (exit
1) if fewer than all N sessions reached the state measured, since the figure would
then be per the wrong count.
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import jwt
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, Request, TextMessage

# bench/bench.py, from this script's folder: its process and /proc helpers.
from bench import LISTENING_RE, Child, raise_fd_limit, rss_kb

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
START_TIMEOUT_S = 30.0
# Handshake, `connected`, the first delta: per client, on a loaded 2-core machine.
CLIENT_TIMEOUT_S = 30.0
# Clients connecting at once; the server admits a dozen per loop pass anyway.
CONNECT_CONCURRENCY = 50
WARMUP_SESSIONS = 20
# After the last client of a phase, before VmRSS is read: sender tasks end, buffers
# are freed, the collector catches up.
SETTLE_S = 2.0
# The slow answer: a delta now, then one per DELTA_EVERY_MS. Longer than a phase, so
# the text held per session is one delta's when VmRSS is read (the text's own size is
# the answer's, not the detach's cost).
DELTA_EVERY_MS = 60_000
ANSWER_DELTAS = 20


def log(message: str) -> None:
    print(f"[detached_rss {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- children


async def start_fake(work: Path, children: list[Child]) -> int:
    fake = Child("fake", [sys.executable, str(BENCH_DIR / "fake_upstream.py")], work)
    children.append(fake)
    try:
        line = await trio.to_thread.run_sync(partial(fake.lines.get, timeout=START_TIMEOUT_S))
    except queue.Empty:
        line = None
    if line is None or not line.startswith("fake listening on "):
        raise RuntimeError(f"fake upstream did not start; see {fake.stderr_path}")
    return int(line.split()[-1])


async def start_server(
    name: str, work: Path, secret: str, fake_port: int, children: list[Child]
) -> tuple[Child, int]:
    argv = [
        sys.executable, str(PROJECT_DIR / "server.py"),
        "serve", "--host", "127.0.0.1", "--port", "0",
        "--db", str(work / f"{name}.db"),
        "--jwt-secret", secret,
        "--upstream-url", f"http://127.0.0.1:{fake_port}/v1",
        "--api-key", "sk-bench-not-a-key",
        "--heartbeat-interval", "3600",
        "--detach-grace", "3600",
        "--max-connections", "50000",
        "--max-connections-per-user", "1000",
        "--rate-limit", "100000/1",
    ]
    server = Child(name, argv, work)
    children.append(server)
    with trio.fail_after(START_TIMEOUT_S):
        while True:
            match = LISTENING_RE.search(server.stderr_path.read_text(errors="replace"))
            if match:
                return server, int(match.group(1))
            if server.proc.poll() is not None:
                raise RuntimeError(f"server did not start; see {server.stderr_path}")
            await trio.sleep(0.05)


# ----------------------------------------------------------------------------- clients


class Peer:
    """One WebSocket client over a raw TCP stream: nothing happens unless asked."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Event] = []

    @classmethod
    async def connect(cls, port: int, session_id: str, token: str) -> Peer:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        peer = cls(stream)
        target = f"/ws/chat/{session_id}?token={token}"
        await peer.send(Request(host=f"127.0.0.1:{port}", target=target))
        while not isinstance(await peer.next_event(), AcceptConnection):
            pass
        first = await peer.next_frame()
        if first.get("type") != "connected":
            raise RuntimeError(f"first frame: {first.get('type')}")
        return peer

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> Event:
        while not self.pending:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the server closed the stream")
            self.ws.receive_data(data)
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def next_frame(self) -> dict[str, Any]:
        """The next complete text frame, as JSON (messages here are never split)."""
        while True:
            event = await self.next_event()
            if isinstance(event, TextMessage):
                frame: dict[str, Any] = json.loads(event.data)
                return frame


@dataclass
class Phase:
    name: str
    port: int
    secret: str
    sessions: int
    failures: int = 0
    first_failure: str = ""

    def token(self, user: str) -> str:
        return jwt.encode(
            {"sub": user, "exp": int(time.time()) + 3600}, self.secret, algorithm="HS256"
        )

    def fail(self, session_id: str, exc: BaseException) -> None:
        self.failures += 1
        if not self.first_failure:
            self.first_failure = f"{session_id}: {type(exc).__name__}: {exc}"

    async def each(self, limiter: trio.CapacityLimiter, job: Any, count: int, prefix: str) -> None:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(job, limiter, f"{prefix}{index}", f"user-{prefix}{index}")


async def _turn_to_end(peer: Peer, content: str) -> None:
    await peer.send(TextMessage(data=json.dumps({"type": "message", "content": content})))
    while (await peer.next_frame()).get("type") != "response_end":
        pass


def _answer(session_id: str, *, slow: bool) -> str:
    every, count = (DELTA_EVERY_MS, ANSWER_DELTAS) if slow else (0, 1)
    return f"bench sid={session_id} turn=0 n={count} every={every} first=0 dur=600"


async def warm_up(phase: Phase) -> None:
    """Whole one-delta turns, so that lazily built server state is in the baseline."""

    async def one(limiter: trio.CapacityLimiter, session_id: str, user: str) -> None:
        async with limiter:
            with trio.fail_after(CLIENT_TIMEOUT_S):
                peer = await Peer.connect(phase.port, session_id, phase.token(user))
                async with peer.stream:
                    await _turn_to_end(peer, _answer(session_id, slow=False))

    await phase.each(trio.CapacityLimiter(10), one, WARMUP_SESSIONS, "warm-")


async def hold_idle(phase: Phase, held: list[Peer]) -> None:
    async def one(limiter: trio.CapacityLimiter, session_id: str, user: str) -> None:
        try:
            async with limiter:
                with trio.fail_after(CLIENT_TIMEOUT_S):
                    held.append(await Peer.connect(phase.port, session_id, phase.token(user)))
        except (OSError, EOFError, RuntimeError, trio.TooSlowError) as exc:
            phase.fail(session_id, exc)

    await phase.each(trio.CapacityLimiter(CONNECT_CONCURRENCY), one, phase.sessions, "rss-")


async def detach_mid_answer(phase: Phase) -> None:
    async def one(limiter: trio.CapacityLimiter, session_id: str, user: str) -> None:
        try:
            async with limiter:
                with trio.fail_after(CLIENT_TIMEOUT_S):
                    peer = await Peer.connect(phase.port, session_id, phase.token(user))
                    async with peer.stream:  # closed on the way out: the client vanishes
                        content = _answer(session_id, slow=True)
                        await peer.send(TextMessage(data=json.dumps(
                            {"type": "message", "content": content}
                        )))
                        while (await peer.next_frame()).get("type") != "text_delta":
                            pass
        except (OSError, EOFError, RuntimeError, trio.TooSlowError) as exc:
            phase.fail(session_id, exc)

    await phase.each(trio.CapacityLimiter(CONNECT_CONCURRENCY), one, phase.sessions, "rss-")


async def metric(http: httpx.AsyncClient, port: int, name: str) -> float:
    text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


async def until_metrics(http: httpx.AsyncClient, port: int, wanted: dict[str, float]) -> None:
    with trio.fail_after(CLIENT_TIMEOUT_S * 2):
        while True:
            values = {name: await metric(http, port, name) for name in wanted}
            if values == wanted:
                return
            await trio.sleep(0.25)


async def fake_records(http: httpx.AsyncClient, fake_port: int) -> dict[str, Any]:
    records: dict[str, Any] = (await http.get(f"http://127.0.0.1:{fake_port}/records")).json()
    return records


# ----------------------------------------------------------------------------- the run


async def run(sessions: int, work: Path, children: list[Child]) -> dict[str, Any]:
    secret = secrets.token_urlsafe(32)
    fake_port = await start_fake(work, children)
    figures: dict[str, Any] = {"sessions": sessions}
    async with httpx.AsyncClient(timeout=10.0) as http:
        # ---- idle
        server, port = await start_server("server-idle", work, secret, fake_port, children)
        phase = Phase("idle", port, secret, sessions)
        await warm_up(phase)
        await trio.sleep(SETTLE_S)
        base = rss_kb(server.proc.pid)
        held: list[Peer] = []
        started = time.monotonic()
        await hold_idle(phase, held)
        await until_metrics(http, port, {"chat_active_connections": float(len(held))})
        await trio.sleep(SETTLE_S)
        rss = rss_kb(server.proc.pid)
        log(f"idle: {len(held)} connections in {time.monotonic() - started:.1f} s; "
            f"server RSS {base} -> {rss} KB")
        figures.update(idle_rss_base_kb=base, idle_rss_kb=rss, idle_failures=phase.failures)
        figures["idle_kb_per_session"] = (rss - base) / max(len(held), 1)
        for peer in held:
            await peer.stream.aclose()
        server.kill()
        if phase.failures:
            raise RuntimeError(f"idle: {phase.failures} sessions failed: {phase.first_failure}")

        # ---- detached mid-answer, the same sessions on a fresh server
        server, port = await start_server("server-detached", work, secret, fake_port, children)
        phase = Phase("detached", port, secret, sessions)
        await warm_up(phase)
        await trio.sleep(SETTLE_S)
        closes_before = len((await fake_records(http, fake_port))["closes"])
        base = rss_kb(server.proc.pid)
        started = time.monotonic()
        await detach_mid_answer(phase)
        if phase.failures:
            raise RuntimeError(f"detached: {phase.failures} failed: {phase.first_failure}")
        await until_metrics(
            http, port,
            {"chat_detached_sessions": float(sessions), "chat_active_connections": 0.0},
        )
        await trio.sleep(SETTLE_S)
        rss = rss_kb(server.proc.pid)
        records = await fake_records(http, fake_port)
        log(f"detached: {sessions} sessions in {time.monotonic() - started:.1f} s; "
            f"server RSS {base} -> {rss} KB")
        # Still mid-answer: no upstream request was closed (the records clear on read).
        upstream_closed = len(records["closes"]) + closes_before
        if upstream_closed:
            raise RuntimeError(f"{upstream_closed} upstream requests were closed while detached")
        figures.update(detached_rss_base_kb=base, detached_rss_kb=rss)
        figures["detached_kb_per_session"] = (rss - base) / sessions
        figures["detached_minus_idle_kb_per_session"] = (
            figures["detached_kb_per_session"] - figures["idle_kb_per_session"]
        )
        server.kill()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000, help="sessions per phase")
    parser.add_argument("--timeout", type=float, default=300.0, help="the whole run, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 10_000:
        parser.error("--sessions: 1 to 10000")
    raise_fd_limit(4 * args.sessions + 1024)
    work = Path(tempfile.mkdtemp(prefix="detached-rss-"))
    children: list[Child] = []

    async def bounded() -> dict[str, Any]:
        with trio.fail_after(args.timeout):
            return await run(args.sessions, work, children)

    try:
        figures = trio.run(bounded)
    except (RuntimeError, trio.TooSlowError, OSError, httpx.HTTPError) as exc:
        log(f"failed: {type(exc).__name__}: {exc} (logs in {work})")
        return 1
    finally:
        for child in children:
            child.kill()
        if not args.keep:
            for path in work.iterdir():
                path.unlink()
            work.rmdir()
    n = figures["sessions"]
    print(f"\nserver RSS, {n} sessions (per session: growth over the phase's baseline / {n})")
    print(f"  idle, connected:          {figures['idle_kb_per_session']:6.1f} KB per session")
    print(f"  detached mid-answer:      {figures['detached_kb_per_session']:6.1f} KB per session")
    print(f"  detached minus idle:      "
          f"{figures['detached_minus_idle_kb_per_session']:+6.1f} KB per session")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
