"""The real server as a child process, for tests of what only a process has: signals,
`kill -9`, exit codes, the command line, the log.

    async with server_process(["--port", "0", "--db", db], env) as proc:
        proc.port            # read from the "listening on http://HOST:PORT" log line
        proc.stderr_text     # everything the child logged so far

Resource handling: `server_process` owns the child and two reader tasks that drain
its stdout and stderr for its whole life, so a chatty child never blocks on a full
pipe. On leaving the block the child is killed (SIGKILL) if it is still running and
reaped; the readers then read to EOF so nothing it wrote is lost.

Error handling: every wait is bounded; a child that never logs its listening line
raises `trio.TooSlowError` (with its stderr in the message) instead of hanging.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

PROJECT_DIR = Path(__file__).resolve().parents[1]
SERVER_PY = str(PROJECT_DIR / "server.py")
# Python start-up plus imports of trio, httpx, pydantic: generous on a loaded CI box.
START_TIMEOUT_S = 20.0
# After the child exits, how long its pipes may take to reach EOF.
PIPE_EOF_TIMEOUT_S = 5.0
LISTENING_RE = re.compile(r"listening on (https?)://([^\s:]+):(\d+)")

# Every ServerProcess of this test run, so a test can scan all the output at once.
ALL_PROCESSES: list[ServerProcess] = []


class ServerProcess:
    """A running `server.py` child and all it has written so far."""

    def __init__(self, process: trio.Process, args: Sequence[str]) -> None:
        self.process = process
        self.args = list(args)
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.port: int | None = None
        self._output_changed = trio.Event()
        self._eof = {"stdout": trio.Event(), "stderr": trio.Event()}

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def _drain(self, name: str, stream: trio.abc.ReceiveStream) -> None:
        buffer = self.stdout if name == "stdout" else self.stderr
        try:
            while chunk := await stream.receive_some(64 * 1024):
                buffer += chunk
                changed, self._output_changed = self._output_changed, trio.Event()
                changed.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._eof[name].set()
            changed, self._output_changed = self._output_changed, trio.Event()
            changed.set()

    async def wait_for_output(
        self, pattern: str | re.Pattern[str], *, stream: str = "stderr", timeout_s: float = 10.0
    ) -> re.Match[str]:
        """Wait until `pattern` appears in `stream`. Raises TooSlowError, or
        AssertionError if the stream ended without it."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        with trio.fail_after(timeout_s):
            while True:
                changed = self._output_changed
                text = self.stdout_text if stream == "stdout" else self.stderr_text
                if match := regex.search(text):
                    return match
                if self._eof[stream].is_set():
                    raise AssertionError(
                        f"{stream} ended without {regex.pattern!r}; "
                        f"exit {self.returncode}; stderr:\n{self.stderr_text}"
                    )
                await changed.wait()

    async def wait_listening(self, timeout_s: float = START_TIMEOUT_S) -> int:
        """The port from the `listening on` log line."""
        try:
            match = await self.wait_for_output(LISTENING_RE, timeout_s=timeout_s)
        except trio.TooSlowError:
            raise trio.TooSlowError(f"no listening line; stderr:\n{self.stderr_text}") from None
        self.port = int(match.group(3))
        return self.port

    async def wait_exit(self, timeout_s: float = 10.0) -> int:
        """Wait for the child to exit; its exit code (negative: killed by that signal)."""
        with trio.fail_after(timeout_s):
            return await self.process.wait()

    def send_signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, like `kill -9`."""
        self.process.kill()


def base_env(**overrides: str | None) -> dict[str, str]:
    """The parent's environment without any CHAT_/OPENAI_ setting, plus `overrides`
    (None removes a name)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CHAT_", "OPENAI_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@asynccontextmanager
async def server_process(
    args: Sequence[str],
    env: dict[str, str],
    *,
    wait_listening: bool = True,
    command: Sequence[str] = (),
    cwd: str | Path = PROJECT_DIR,
) -> AsyncIterator[ServerProcess]:
    """Run `python server.py *args` (or `command`, e.g. the built executable); with
    `wait_listening`, yield once its port is known. Killed (SIGKILL) and reaped on the
    way out if still running; its output is read to EOF."""
    process = await trio.lowlevel.open_process(
        list(command) or [sys.executable, SERVER_PY, *args],
        env=env,
        cwd=str(cwd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc = ServerProcess(process, args)
    ALL_PROCESSES.append(proc)
    try:
        async with trio.open_nursery() as readers:
            assert process.stdout is not None and process.stderr is not None
            readers.start_soon(proc._drain, "stdout", process.stdout)
            readers.start_soon(proc._drain, "stderr", process.stderr)
            try:
                if wait_listening:
                    await proc.wait_listening()
                yield proc
            finally:
                await _kill_and_reap(process)
                with trio.CancelScope(shield=True), trio.move_on_after(PIPE_EOF_TIMEOUT_S):
                    await proc._eof["stdout"].wait()
                    await proc._eof["stderr"].wait()
                readers.cancel_scope.cancel()
    finally:
        await _kill_and_reap(process)


async def _kill_and_reap(process: trio.Process) -> None:
    """SIGKILL the child if it still runs and wait for it (bounded, shielded)."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(PIPE_EOF_TIMEOUT_S):
            await process.wait()
