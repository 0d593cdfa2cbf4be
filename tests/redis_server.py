"""A throwaway Redis server for tests: `redis-server` on 127.0.0.1 only, no persistence
(`--save "" --appendonly no`), its working directory and log in a temporary directory;
stopped and removed at the end.

    server = RedisServer.create()   # raises RedisMissing without redis-server
    server.url                      # redis://127.0.0.1:PORT/0
    server.stop(); server.start()   # unreachable for a while, then back on the same port
    server.destroy()

Rules: a free port is picked by binding a socket first (and another one tried if
something took it meanwhile); the port stays the same across `stop` and `start`, so a
URL handed to a server stays valid. Readiness is a raw RESP `PING` answered `+PONG`,
retried every READY_POLL_S up to START_TIMEOUT_S: no client library is needed to tell
that the server is up, and nothing waits without a bound.

Resource handling: the process is ours; `stop` ends it with SIGTERM (SIGKILL after
STOP_TIMEOUT_S), `crash` with SIGKILL, `destroy` stops it if it runs and removes the
directory. The methods block (a few milliseconds each): from a trio test that runs
servers in the same loop, call them through `trio.to_thread.run_sync`.

Error handling: a server that does not come up raises RuntimeError with its log.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# redis-server is up in milliseconds; generous for a loaded CI box.
START_TIMEOUT_S = 10.0
READY_POLL_S = 0.02
STOP_TIMEOUT_S = 10.0
PING_TIMEOUT_S = 1.0
PORT_ATTEMPTS = 3


class RedisMissing(Exception):
    """No redis-server binary on PATH."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def ping(port: int, timeout_s: float = PING_TIMEOUT_S) -> bool:
    """True if a Redis server on 127.0.0.1:`port` answers PING with +PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            answer = b""
            while not answer.endswith(b"\r\n") and len(answer) < 64:
                chunk = sock.recv(64)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        return False
    return answer == b"+PONG\r\n"


class RedisServer:
    """One redis-server process (see the module docstring)."""

    def __init__(self, binary: str, root: Path) -> None:
        self.binary = binary
        self.root = root
        self.log = root / "redis.log"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls) -> RedisServer:
        """Start a new server on a free loopback port. Raises RedisMissing or
        RuntimeError."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisMissing("no redis-server on PATH")
        server = cls(binary, Path(tempfile.mkdtemp(prefix="chat-redis-")))
        try:
            for attempt in range(PORT_ATTEMPTS):
                server.port = _free_port()
                try:
                    server.start()
                    break
                except RuntimeError:
                    if attempt == PORT_ATTEMPTS - 1:  # not a port taken meanwhile
                        raise
        except BaseException:
            server.destroy()
            raise
        return server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start on `self.port` and return once it answers PING. Raises RuntimeError
        (with the log) if it exits or stays silent for START_TIMEOUT_S."""
        if self.running:
            return
        self._process = subprocess.Popen(
            [
                self.binary,
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.root),
                "--logfile", str(self.log),
                "--daemonize", "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if ping(self.port):
                return
            time.sleep(READY_POLL_S)
        self._end(signal.SIGKILL)
        raise RuntimeError(
            f"redis-server did not come up on 127.0.0.1:{self.port}:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        """A clean shutdown (SIGTERM; nothing is saved). Returns once the process has
        exited, so the port no longer answers."""
        self._end(signal.SIGTERM)

    def crash(self) -> None:
        """Stop as a crash would (SIGKILL)."""
        self._end(signal.SIGKILL)

    def destroy(self) -> None:
        try:
            self._end(signal.SIGKILL)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _end(self, signum: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
