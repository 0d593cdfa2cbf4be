"""Measure the start time of the server: process start -> first `GET /healthz` 200.

    .venv/bin/python build/measure-start.py dist/chat-agent-server [--runs 5]
    .venv/bin/python build/measure-start.py --python server.py   # for comparison

Each run starts the program on a free loopback port with a fresh database in a
scratch folder, polls /healthz every 5 ms, then stops it with SIGTERM and waits for
exit code 0. Prints each run and the median, in seconds. The figures in
docs/operations.md come from this script.

With --python the environment is passed on as it is: where PYTHONDONTWRITEBYTECODE is
set (as in some CI sandboxes) Python keeps no bytecode cache, and every start compiles
the server's own modules again (about 60 ms on the 2-core VM); the script says so.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLL_INTERVAL_S = 0.005
START_LIMIT_S = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def one_run(command: list[str]) -> float:
    """Seconds from spawning `command` to its first healthy answer. Raises on failure."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as scratch:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "OPENAI_"))}
        args = ["serve", "--port", str(port), "--db", str(Path(scratch) / "chat.db")]
        # A local upstream URL so the server never falls back to the demo model;
        # nothing calls it during this measurement.
        args += ["--jwt-secret", "x" * 32, "--upstream-url", "http://127.0.0.1:9/v1"]
        started = time.perf_counter()
        process = subprocess.Popen(
            [*command, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            while not _healthy(port):
                if process.poll() is not None:
                    raise RuntimeError(f"exited with {process.returncode} before listening")
                if time.perf_counter() - started > START_LIMIT_S:
                    raise RuntimeError("not healthy in time")
                time.sleep(POLL_INTERVAL_S)
            took_s = time.perf_counter() - started
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=15)
        if code != 0:
            raise RuntimeError(f"exit code {code} after SIGTERM")
        return took_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("program", help="the executable, or server.py with --python")
    parser.add_argument("--python", action="store_true", help="run `program` with this Python")
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    command = [sys.executable, options.program] if options.python else [options.program]
    if options.python and os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("note: PYTHONDONTWRITEBYTECODE is set: every start compiles the server's modules")
    times = []
    for run in range(1, options.runs + 1):
        times.append(one_run(command))
        print(f"run {run}: {times[-1]:.3f} s", flush=True)
    print(f"median of {len(times)}: {statistics.median(times):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
