"""The server's performance benchmark (issue 7): one command, a table, one JSON line.

    python bench/bench.py            # full run, a few minutes
    python bench/bench.py --quick    # tiny numbers, < 30 s (tests/test_bench_smoke.py)

Starts, on 127.0.0.1 only: the paced fake upstream (bench/fake_upstream.py), the
server through bench/instrumented_server.py (server.main() plus a loop-stall
meter), and load clients (bench/load_client.py), each its own process. Phases:

1. quiet: one session, sequential one-delta turns: time to first delta.
2. idle: authenticated idle connections in steps; server VmRSS growth each.
3. relay: many sessions, a delta every 200 ms each, plus probe sessions timing the
   first delta under load; server CPU (utime+stime) per 1,000 deltas; latency.
4. unpaced: sessions whose upstream sends as fast as it can: deltas per second.
5. stop: a delta every 50 ms; client `stop` to the fake seeing its socket closed.
6. tls: the relay load on two fresh servers at once, one whose upstream is the fake
   over plain HTTP and one over HTTPS (a self-signed certificate trusted through
   ``SSL_CERT_FILE``): the HTTPS server's CPU per 1,000 deltas over the plain one's.

Resource handling: every child runs in its own process group and is killed
(SIGKILL to the group) in a ``finally``; the server gets SIGTERM first so it
writes its final stall figure. Every wait has a deadline.

Error handling: a phase that fails leaves NaN in its figures and the run goes on;
the JSON line (the last line printed) then shows which figures are missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
LISTENING_RE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The fake upstream and the load clients stand for other machines; sharing the server's
# two cores, they run at a lower priority so that waking one (every frame the server
# writes wakes a client) does not preempt the server mid-pass.
PEER = ["nice", "-n", "10"]

SCALES: dict[str, dict[str, Any]] = {
    "full": {
        "quiet_turns": 40,
        "idle_steps": ((2000, 2), (10000, 4)),  # (total connections, new client processes)
        "idle_timeout_s": 240.0,
        "relay_sessions": 200,
        "relay_procs": 4,
        "relay_windows_s": (2.0, 20.0, 10.0),  # ramp, CPU window, probe window
        "probe_sessions": 4,
        "unpaced_sessions": 40,
        "unpaced_procs": 2,
        "unpaced_s": 15.0,
        "stop_sessions": 20,
        "stop_procs": 2,
        "stop_turns": 10,
    },
    "quick": {
        "quiet_turns": 5,
        "idle_steps": ((40, 1), (120, 1)),
        "idle_timeout_s": 30.0,
        "relay_sessions": 20,
        "relay_procs": 2,
        "relay_windows_s": (1.0, 2.0, 1.5),
        "probe_sessions": 1,
        "unpaced_sessions": 4,
        "unpaced_procs": 1,
        "unpaced_s": 3.0,
        "stop_sessions": 3,
        "stop_procs": 1,
        "stop_turns": 3,
    },
}

# (key, label, unit, target): the figure must be at most its target; None: no target
TARGETS: list[tuple[str, str, str, float | None]] = [
    ("idle_kb_per_conn_1", "idle RSS per connection, step 1", "KB", 30.0),
    ("idle_kb_per_conn_2", "idle RSS per connection, step 2", "KB", 30.0),
    ("relay_cpu_s_per_1000_deltas", "server CPU per 1,000 deltas (paced)", "s", 0.15),
    ("relay_deltas_per_s", "deltas relayed per second (paced)", "/s", None),
    ("fake_cpu_s_per_1000_deltas", "fake upstream CPU per 1,000 deltas (reference)", "s", None),
    ("relay_cpu_to_fake", "server CPU / fake CPU (compare this across runs)", "x", None),
    ("latency_p50_ms", "added latency p50 (paced load)", "ms", None),
    ("latency_p99_ms", "added latency p99 (paced load)", "ms", 10.0),
    ("unpaced_deltas_per_s", "max deltas relayed per second (unpaced)", "/s", None),
    ("unpaced_cpu_s_per_1000_deltas", "server CPU per 1,000 deltas (unpaced)", "s", None),
    ("ttfd_quiet_p50_ms", "first-delta overhead p50, quiet", "ms", None),
    ("ttfd_quiet_p99_ms", "first-delta overhead p99, quiet", "ms", None),
    ("ttfd_load_p50_ms", "first-delta overhead p50, under load", "ms", 20.0),
    ("ttfd_load_p99_ms", "first-delta overhead p99, under load", "ms", None),
    ("stop_p50_ms", "stop -> upstream closed p50", "ms", None),
    ("stop_p99_ms", "stop -> upstream closed p99", "ms", 20.0),
    ("stall_quiet_ms", "max loop stall: quiet", "ms", 20.0),
    ("stall_idle_ms", "max loop stall: idle connect", "ms", 20.0),
    ("stall_teardown_ms", "max loop stall: all idle clients drop at once", "ms", 20.0),
    ("stall_relay_ms", "max loop stall: paced relay", "ms", 20.0),
    ("stall_unpaced_ms", "max loop stall: unpaced", "ms", 20.0),
    ("stall_stop_ms", "max loop stall: stop", "ms", 20.0),
    ("plain_relay_cpu_s_per_1000_deltas", "tls phase: CPU per 1,000 deltas, plain upstream",
     "s", None),
    ("tls_relay_cpu_s_per_1000_deltas", "tls phase: CPU per 1,000 deltas, HTTPS upstream",
     "s", None),
    ("tls_to_plain_cpu", "tls phase: HTTPS / plain CPU (same window)", "x", 1.25),
    # Two servers, 400 streams and a fake doing TLS share the machine in this phase:
    # its latency and stalls are shown, the targets are the relay phase's.
    ("tls_latency_p99_ms", "tls phase: added latency p99, HTTPS upstream", "ms", None),
    ("tls_stall_relay_ms", "tls phase: max loop stall, HTTPS upstream", "ms", None),
    ("max_pass_cpu_tls_relay_ms", "tls phase: max CPU in one loop pass, HTTPS upstream", "ms",
     None),
    ("stall_max_ms", "max loop stall: whole run", "ms", 20.0),
]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# ----------------------------------------------------------------------------- processes


class Child:
    """A child process in its own group; stdout lines arrive on a queue."""

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, *, stdin: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.stderr_path = log_dir / f"{name}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=PROJECT_DIR,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        for raw in stream:
            self.lines.put(raw.decode("utf-8", "replace"))
        self.lines.put(None)

    def next_json(self, event: str, deadline: float) -> dict[str, Any]:
        """The next stdout JSON line with this ``event``. Raises TimeoutError/EOFError."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {event!r} in time; see {self.stderr_path}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise EOFError(f"{self.name} exited; see {self.stderr_path}")
            if line.startswith("{"):
                message: dict[str, Any] = json.loads(line)
                if message.get("event") == event:
                    return message

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log(f"{self.name} (pid {self.proc.pid}) did not die")
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._stderr.close()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_split_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the whole process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime


def cpu_s(pid: int) -> float:
    return sum(cpu_split_s(pid))


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


# ----------------------------------------------------------------------------- the bench


@dataclass
class Server:
    """One instrumented server process, its port and its stall file (stall_mark)."""

    child: Child
    port: int
    stall_path: Path
    stall_lines: int = 0

    @property
    def pid(self) -> int:
        return self.child.proc.pid

    def stop(self) -> bool:
        """SIGTERM (so it writes its final stall line); False if it did not exit in time."""
        if self.child.proc.poll() is None:
            self.child.proc.send_signal(signal.SIGTERM)
            try:
                self.child.proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return False
        return True


@dataclass
class Run:
    scale: dict[str, Any]
    work: Path
    secret: str
    children: list[Child]
    figures: dict[str, float]
    notes: list[str]
    server: Server | None = None  # the one every phase but `tls` measures
    fake: Child | None = None
    fake_port: int = 0
    fake_tls_port: int = 0
    profile_out: str | None = None

    # --- plumbing ---

    def spawn(
        self, name: str, argv: list[str], *, stdin: bool = False,
        env: dict[str, str] | None = None,
    ) -> Child:
        child = Child(name, argv, self.work, stdin=stdin, env=env)
        self.children.append(child)
        return child

    def start_fake(self) -> None:
        argv = [*PEER, sys.executable, str(BENCH_DIR / "fake_upstream.py"),
                "--tls-dir", str(self.work)]
        fake = self.fake = self.spawn("fake", argv)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (self.fake_port and self.fake_tls_port):
            left = deadline - time.monotonic()
            line = fake.lines.get(timeout=max(left, 0.01))
            if line is None or left <= 0:
                raise RuntimeError(f"fake upstream did not start; see {fake.stderr_path}")
            if line.startswith("fake listening on "):
                self.fake_port = int(line.split()[-1])
            elif line.startswith("fake tls listening on "):
                self.fake_tls_port = int(line.split()[-1])

    def start_server(self, name: str = "server", *, tls_upstream: bool = False) -> Server:
        """Start the instrumented server ``name`` against the fake, over HTTPS when
        ``tls_upstream``: the fake's certificate is then trusted through SSL_CERT_FILE,
        as a private CA would be."""
        stall_path = self.work / f"{name}-stalls.jsonl"
        scheme, port = ("https", self.fake_tls_port) if tls_upstream else ("http", self.fake_port)
        env = dict(os.environ)
        if tls_upstream:
            env["SSL_CERT_FILE"] = str(self.work / "cert.pem")
        if name != "server" and "BENCH_CPROFILE" in env:  # each server its own profile
            env["BENCH_CPROFILE"] += f".{name}"
        argv = [
            sys.executable, str(BENCH_DIR / "instrumented_server.py"), str(stall_path),
            "serve", "--host", "127.0.0.1", "--port", "0",
            "--db", str(self.work / f"{name}.db"),
            "--jwt-secret", self.secret,
            "--upstream-url", f"{scheme}://127.0.0.1:{port}/v1",
            "--api-key", "sk-bench-not-a-key",
            "--heartbeat-interval", "3600",
            "--max-connections", "50000",
            "--max-connections-per-user", "1000",
            "--rate-limit", "100000/1",
        ]
        child = self.spawn(name, argv, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = LISTENING_RE.search(child.stderr_path.read_text(errors="replace"))
            if match:
                return Server(child, int(match.group(1)), stall_path)
            if child.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start; see {child.stderr_path}")

    @property
    def main(self) -> Server:
        assert self.server is not None
        return self.server

    @property
    def fake_pid(self) -> int:
        assert self.fake is not None
        return self.fake.proc.pid

    def stall_mark(self, phase: str | None = None, server: Server | None = None) -> float:
        """Max loop stall (ms) since the previous mark, from the instrumented server
        (the main one unless ``server``); with ``phase``, the pass's CPU time and the
        longest GC pause go to the figures."""
        server = server or self.main
        os.kill(server.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            path = server.stall_path
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) > server.stall_lines:
                server.stall_lines = len(lines)
                line = json.loads(lines[-1])
                if phase is not None:
                    self.figures[f"stall_{phase}_cpu_ms"] = line["max_stall_cpu_ms"]
                    self.figures[f"max_pass_cpu_{phase}_ms"] = line["max_pass_cpu_ms"]
                    self.figures[f"gc_max_{phase}_ms"] = line["gc_max_ms"]
                return float(line["max_stall_ms"])
            time.sleep(0.02)
        return math.nan

    def http_get(self, port: int, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            body: bytes = answer.read()
            return body

    def active_connections(self) -> float:
        text = self.http_get(self.main.port, "/metrics").decode()
        match = re.search(r"^chat_active_connections (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else math.nan

    def clients(
        self, name: str, procs: int, sessions: int, first_index: int, spec: dict[str, Any],
        server: Server | None = None,
    ) -> list[Child]:
        """Start ``procs`` load clients sharing ``sessions`` sessions of ``server`` (the
        main one by default); wait for "ready"."""
        started: list[Child] = []
        per = [sessions // procs + (1 if i < sessions % procs else 0) for i in range(procs)]
        offset = first_index
        for i, count in enumerate(per):
            full = {
                "base_url": f"ws://127.0.0.1:{(server or self.main).port}",
                "secret": self.secret,
                "session_prefix": f"{name}-s",
                "user_prefix": f"{name}-u",
                "first_index": offset,
                "count": count,
                "stagger_offset": offset - first_index,
                "stagger_total": sessions,
                **spec,
            }
            argv = [*PEER, sys.executable, str(BENCH_DIR / "load_client.py"), json.dumps(full)]
            started.append(self.spawn(f"{name}-{first_index}-{i}", argv, stdin=True))
            offset += count
        deadline = time.monotonic() + spec.get("ready_timeout_s", 120.0)
        connected = 0
        for child in started:
            ready = child.next_json("ready", deadline)
            connected += ready["connected"]
            if ready["errors"]:
                self.notes.append(f"{child.name}: {ready['errors']} connect errors, e.g. "
                                  f"{ready['error_samples'][:1]}")
        if connected < sessions:
            log(f"{name}: only {connected}/{sessions} sessions connected")
        return started

    def go(
        self, children: list[Child], go_at: float, window: tuple[float, float],
        during: Callable[[], None] | None = None, timeout_s: float = 180.0,
    ) -> dict[str, Any]:
        return self.go_groups([children], go_at, window, during, timeout_s)[0]

    def go_groups(
        self, groups: list[list[Child]], go_at: float, window: tuple[float, float],
        during: Callable[[], None] | None = None, timeout_s: float = 180.0,
    ) -> list[dict[str, Any]]:
        """Start every load client at ``go_at``, run ``during``, then the results of
        each group of clients, merged per group."""
        for child in (child for group in groups for child in group):
            child.tell(f"go {go_at:.6f} {window[0]:.6f} {window[1]:.6f}")
        if during is not None:
            during()
        deadline = time.monotonic() + timeout_s
        results = []
        for group in groups:
            merged: dict[str, Any] = {"deltas": 0, "window_deltas": 0, "latencies_us": [],
                                      "ttfd_us": [], "stops": [], "errors": 0, "turns": 0}
            for child in group:
                result = child.next_json("result", deadline)
                for key in ("deltas", "window_deltas", "errors", "turns"):
                    merged[key] += result[key]
                for key in ("latencies_us", "ttfd_us", "stops"):
                    merged[key] += result[key]
                if result["errors"]:
                    self.notes.append(f"{child.name}: {result['errors']} errors, e.g. "
                                      f"{result['error_samples'][:1]}")
            results.append(merged)
        for child in (child for group in groups for child in group):
            child.kill()
        return results

    # --- phases ---

    def quiet(self) -> None:
        spec = {"mode": "turns", "turns": self.scale["quiet_turns"], "n": 1, "every_ms": 0,
                "pause_s": 0.05}
        children = self.clients("quiet", 1, 1, 0, spec)
        self.stall_mark()
        result = self.go(children, time.monotonic() + 0.2, (0.0, 0.0))
        self.figures["stall_quiet_ms"] = self.stall_mark("quiet")
        ttfd = [v / 1000 for v in result["ttfd_us"]]
        self.figures["ttfd_quiet_p50_ms"] = percentile(ttfd, 0.50)
        self.figures["ttfd_quiet_p99_ms"] = percentile(ttfd, 0.99)

    def idle(self) -> None:
        time.sleep(1.0)
        base = rss_kb(self.main.pid)
        self.figures["server_rss_base_kb"] = base
        log(f"idle: server RSS before {base} KB")
        self.stall_mark()
        held: list[Child] = []
        total = 0
        try:
            for step, (target, procs) in enumerate(self.scale["idle_steps"], start=1):
                spec = {"mode": "idle", "concurrency": 50, "recv_timeout_s": 60.0,
                        "ready_timeout_s": self.scale["idle_timeout_s"]}
                held += self.clients(f"idle{step}", procs, target - total, total, spec)
                total = target
                time.sleep(2.0)  # let the server settle (sender tasks parked, buffers freed)
                connected = self.active_connections()
                rss = rss_kb(self.main.pid)
                log(f"idle: {connected:.0f} connections, server RSS {rss} KB")
                self.figures[f"idle_conns_{step}"] = connected
                self.figures[f"idle_kb_per_conn_{step}"] = (rss - base) / max(connected, 1)
                self.figures[f"server_rss_idle_{step}_kb"] = rss
        finally:
            self.figures["stall_idle_ms"] = self.stall_mark("idle")
            for child in held:
                child.kill()
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and self.active_connections() > 0:
            time.sleep(0.25)
        self.figures["stall_teardown_ms"] = self.stall_mark("teardown")

    def relay(self, sides: list[tuple[str, Server]] | None = None) -> None:
        """Streams only during the CPU window; probe sessions join after it, so their
        per-turn work (SQLite, a new upstream connection) is not billed to deltas.
        ``sides``: (figure prefix, server) pairs measured at once, each with the whole
        load; by default the main server alone, figures without a prefix."""
        sides = sides or [("", self.main)]
        scale = self.scale
        ramp_s, cpu_window_s, probe_window_s = scale["relay_windows_s"]
        length_s = ramp_s + cpu_window_s + probe_window_s + 0.5
        spec = {"mode": "turns", "turns": 1, "n": int(length_s / 0.2), "every_ms": 200,
                "stagger_s": 0.2, "dur_s": length_s + 5, "collect_ttfd": False,
                "phase_timeout_s": length_s + 60}
        probe_spec = {"mode": "turns", "turns": 100000, "n": 1, "every_ms": 0,
                      "pause_s": 0.25, "until_s": length_s - 0.5,
                      "start_delay_s": ramp_s + cpu_window_s, "stagger_s": 0.25,
                      "phase_timeout_s": length_s + 60}
        groups = [
            self.clients(f"{prefix}relay", scale["relay_procs"], scale["relay_sessions"], 0,
                         spec, server)
            + self.clients(f"{prefix}probe", 1, scale["probe_sessions"], 0, probe_spec, server)
            for prefix, server in sides
        ]
        go_at = time.monotonic() + 0.5
        window = (go_at + ramp_s, go_at + ramp_s + cpu_window_s)
        sampled: dict[str, dict[str, float]] = {}
        sample_cpu = self.cpu_sampler(window, sampled, {p: srv.pid for p, srv in sides})

        for _, server in sides:
            self.stall_mark(server=server)
        first = sides[0][0]
        profiler = self.start_profiler(first + "relay", window) if self.profile_out else None
        results = self.go_groups(groups, go_at, window, sample_cpu, timeout_s=length_s + 90)
        if profiler is not None:
            profiler.proc.wait(timeout=60)
        all_relayed = sum(result["window_deltas"] for result in results)
        for (prefix, server), result in zip(sides, results, strict=True):
            self.figures[prefix + "stall_relay_ms"] = self.stall_mark(prefix + "relay", server)
            self.relay_figures(prefix, result, sampled, window, all_relayed)

    def relay_figures(
        self, prefix: str, result: dict[str, Any], sampled: dict[str, dict[str, float]],
        window: tuple[float, float], all_relayed: int,
    ) -> None:
        """The figures of one side of the relay phase (see `relay`)."""
        cpu = sampled[prefix]
        relayed = result["window_deltas"]
        self.figures[prefix + "relay_window_deltas"] = relayed
        self.figures[prefix + "relay_cpu_s_per_1000_deltas"] = (
            (cpu["cpu1"] - cpu["cpu0"]) / relayed * 1000 if relayed else math.nan
        )
        self.figures[prefix + "relay_deltas_per_s"] = relayed / (window[1] - window[0])
        # The machine's price of a trio wake-up plus a socket write: the fake does only
        # that per delta (a timer, one send), so the server cannot cost much less. With
        # several sides the fake serves them all: its figure is per delta of all sides.
        fake = sampled["fake"]
        self.figures[prefix + "fake_cpu_s_per_1000_deltas"] = (
            (fake["cpu1"] - fake["cpu0"]) / all_relayed * 1000 if all_relayed else math.nan
        )
        # The machine's speed drifts; this ratio does not (bench/README.md).
        server_cpu = self.figures[prefix + "relay_cpu_s_per_1000_deltas"]
        fake_cpu = self.figures[prefix + "fake_cpu_s_per_1000_deltas"]
        self.figures[prefix + "relay_cpu_to_fake"] = server_cpu / fake_cpu if fake_cpu else math.nan
        spent = cpu["cpu1"] - cpu["cpu0"]
        self.figures[prefix + "relay_cpu_system_share"] = (
            (cpu["sys1"] - cpu["sys0"]) / spent if spent else 0.0
        )
        latencies = [v / 1000 for v in result["latencies_us"]]
        self.figures[prefix + "latency_samples"] = len(latencies)
        self.figures[prefix + "latency_p50_ms"] = percentile(latencies, 0.50)
        self.figures[prefix + "latency_p99_ms"] = percentile(latencies, 0.99)
        self.figures[prefix + "latency_max_ms"] = max(latencies) if latencies else math.nan
        ttfd = [v / 1000 for v in result["ttfd_us"]]  # probes only (streams do not collect)
        self.figures[prefix + "ttfd_load_samples"] = len(ttfd)
        self.figures[prefix + "ttfd_load_p50_ms"] = percentile(ttfd, 0.50)
        self.figures[prefix + "ttfd_load_p99_ms"] = percentile(ttfd, 0.99)

    def cpu_sampler(
        self, window: tuple[float, float], sampled: dict[str, dict[str, float]],
        pids: dict[str, int] | None = None,
    ) -> Callable[[], None]:
        """A function that records user/system CPU seconds at the start (`*0`) and end
        (`*1`) of `window` (it sleeps until each): of each server in ``pids`` (name ->
        pid; by default the main server, named "") into ``sampled[name]``, and of the
        fake into ``sampled["fake"]``."""
        pids = {"": self.main.pid} if pids is None else pids
        processes = {**pids, "fake": self.fake_pid}

        def sample(mark: str) -> None:
            for name, pid in processes.items():
                user, system = cpu_split_s(pid)
                into = sampled.setdefault(name, {})
                into[f"user{mark}"], into[f"sys{mark}"] = user, system
                into[f"cpu{mark}"] = user + system
            for pid in pids.values():
                os.kill(pid, signal.SIGUSR2)  # BENCH_CPROFILE: profile the window

        def sample_cpu() -> None:
            sleep_until(window[0])
            sample("0")
            sleep_until(window[1])
            sample("1")

        return sample_cpu

    def unpaced(self) -> None:
        scale = self.scale
        length_s = scale["unpaced_s"]
        spec = {"mode": "turns", "turns": 100000, "n": 2000, "every_ms": 0,
                "until_s": length_s, "collect_latency": False, "dur_s": 30,
                "phase_timeout_s": length_s + 60}
        children = self.clients("unpaced", scale["unpaced_procs"], scale["unpaced_sessions"],
                                0, spec)
        ramp_s = min(2.0, length_s * 0.25)
        go_at = time.monotonic() + 0.5
        window = (go_at + ramp_s, go_at + length_s - 0.5)
        sampled: dict[str, dict[str, float]] = {}
        sample_cpu = self.cpu_sampler(window, sampled)

        self.stall_mark()
        profiler = self.start_profiler("unpaced", window) if self.profile_out else None
        result = self.go(children, go_at, window, sample_cpu, timeout_s=length_s + 90)
        if profiler is not None:
            profiler.proc.wait(timeout=60)
        self.figures["stall_unpaced_ms"] = self.stall_mark("unpaced")
        relayed = result["window_deltas"]
        self.figures["unpaced_deltas_per_s"] = relayed / (window[1] - window[0])
        self.figures["unpaced_cpu_s_per_1000_deltas"] = (
            (sampled[""]["cpu1"] - sampled[""]["cpu0"]) / relayed * 1000 if relayed else math.nan
        )

    def stop(self) -> None:
        scale = self.scale
        self.http_get(self.fake_port, "/records")  # clears earlier records
        spec = {"mode": "turns", "turns": scale["stop_turns"], "n": 10000, "every_ms": 50,
                "stop_after_min": 2, "stop_after_max": 6, "pause_s": 0.1, "stagger_s": 0.05,
                "dur_s": 30, "phase_timeout_s": 120}
        children = self.clients("stop", scale["stop_procs"], scale["stop_sessions"], 0, spec)
        self.stall_mark()
        result = self.go(children, time.monotonic() + 0.3, (0.0, 0.0))
        self.figures["stall_stop_ms"] = self.stall_mark("stop")
        time.sleep(0.5)
        records = json.loads(self.http_get(self.fake_port, "/records"))
        closed = {(r["sid"], r["turn"]): r["t"] for r in records["closes"]}
        waits = [
            (closed[(s["sid"], s["turn"])] - s["t"]) * 1000
            for s in result["stops"]
            if (s["sid"], s["turn"]) in closed
        ]
        missing = len(result["stops"]) - len(waits)
        if missing:
            self.notes.append(f"stop: {missing} stops without a recorded upstream close")
        self.figures["stop_samples"] = len(waits)
        self.figures["stop_p50_ms"] = percentile(waits, 0.50)
        self.figures["stop_p99_ms"] = percentile(waits, 0.99)

    def tls(self) -> None:
        """Plain and HTTPS upstream side by side: two fresh servers, one against the fake
        over plain HTTP and one against it over HTTPS, each under the relay phase's
        whole load in the same window, so that the machine's drift hits both alike.
        Figures ``plain_*`` and ``tls_*``, and their CPU ratio ``tls_to_plain_cpu``."""
        sides: list[tuple[str, Server]] = []
        try:
            for prefix, tls_upstream in (("plain_", False), ("tls_", True)):
                name = f"server-{prefix.rstrip('_')}"
                sides.append((prefix, self.start_server(name, tls_upstream=tls_upstream)))
            self.relay(sides)
        finally:
            for prefix, server in sides:
                if not server.stop():
                    self.notes.append(f"{prefix}server did not stop on SIGTERM in time")
        self.figures["tls_to_plain_cpu"] = (
            self.figures["tls_relay_cpu_s_per_1000_deltas"]
            / self.figures["plain_relay_cpu_s_per_1000_deltas"]
        )

    def start_profiler(self, phase: str, window: tuple[float, float]) -> Child:
        """py-spy over the measured window (perturbs the CPU figure: profile runs only)."""
        assert self.profile_out is not None
        duration = max(1, int(window[1] - window[0]))
        out = f"{self.profile_out}-{phase}.txt"
        argv = ["py-spy", "record", "--pid", str(self.main.pid), "--duration", str(duration),
                "--rate", "200", "--format", "raw", "--output", out, "--nonblocking"]
        delay = max(0.0, window[0] - time.monotonic())
        return self.spawn(f"py-spy-{phase}",
                          ["sh", "-c", f"sleep {delay:.2f}; exec \"$@\"", "sh", *argv])


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def print_table(figures: dict[str, float], scale_name: str) -> None:
    rows = [("figure", "measured", "target", "")]
    for key, label, unit, target in TARGETS:
        value = figures.get(key, math.nan)
        if key.startswith("idle_kb_per_conn_"):
            label += f" ({figures.get('idle_conns_' + key[-1], math.nan):.0f} conns)"
        shown = "n/a" if math.isnan(value) else f"{value:,.3f} {unit}".replace(".000 ", " ")
        if target is None:
            rows.append((label, shown, "-", ""))
        else:
            verdict = "" if math.isnan(value) else ("ok" if value <= target else "MISS")
            rows.append((label, shown, f"<= {target:g} {unit}", verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print(f"\nbenchmark ({scale_name})")
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny numbers, < 30 s")
    parser.add_argument("--profile", metavar="PREFIX",
                        help="also run py-spy over the relay windows (writes PREFIX-*.txt)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--only", metavar="PHASES",
                        help="comma-separated subset of quiet,idle,relay,unpaced,stop,tls")
    args = parser.parse_args(argv)
    scale_name = "quick" if args.quick else "full"
    scale = SCALES[scale_name]
    largest = scale["idle_steps"][-1][0]
    limit = raise_fd_limit(largest * 2 + 1024)
    if limit < largest + 512:
        scale = {**scale, "idle_steps": tuple(
            (min(n, limit - 512), p) for n, p in scale["idle_steps"])}
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    run = Run(scale=scale, work=work, secret=secrets.token_hex(32), children=[], figures={},
              notes=[], profile_out=args.profile)
    try:
        run.start_fake()
        run.server = run.start_server()
        run.figures["stall_startup_ms"] = run.stall_mark("startup")  # before any client
        log(f"server pid {run.main.pid} on port {run.main.port}, fake on {run.fake_port}, "
            f"work dir {work}")
        phases = [run.quiet, run.idle, run.relay, run.unpaced, run.stop, run.tls]
        if args.only:
            phases = [phase for phase in phases if phase.__name__ in args.only.split(",")]
        for phase in phases:
            log(f"phase {phase.__name__}")
            try:
                phase()
            except (OSError, RuntimeError, TimeoutError, EOFError, KeyError,
                    subprocess.SubprocessError) as exc:
                run.notes.append(f"phase {phase.__name__} failed: {type(exc).__name__}: {exc}")
                log(run.notes[-1])
        run.figures["server_cpu_total_s"] = cpu_s(run.main.pid)
        run.figures["server_rss_end_kb"] = rss_kb(run.main.pid)
    finally:
        if run.server is not None and not run.server.stop():
            run.notes.append("server did not stop on SIGTERM in time")
        for child in reversed(run.children):
            child.kill()
    stall_path = run.work / "server-stalls.jsonl"
    final = [json.loads(line) for line in stall_path.read_text().splitlines()
             if '"final": true' in line] if stall_path.exists() else []
    run.figures["stall_max_ms"] = final[-1]["max_stall_ms"] if final else math.nan
    run.figures["bench_seconds"] = time.monotonic() - started
    for key, *_ in TARGETS:
        run.figures.setdefault(key, math.nan)
    print_table(run.figures, scale_name)
    for note in run.notes:
        print(f"note: {note}")
    if not args.keep:
        for path in sorted(work.iterdir()):
            path.unlink()
        work.rmdir()
    else:
        print(f"work dir kept: {work}")
    figures = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
               for k, v in run.figures.items()}
    print(json.dumps({"bench": scale_name, **{k: v for k, v in figures.items()}},
                     allow_nan=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
