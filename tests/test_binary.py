"""Smoke test of the BUILT single executable (`make binary` -> dist/chat-agent-server).

Skipped unless the environment variable CHAT_BINARY names the file:

    make binary && CHAT_BINARY=dist/chat-agent-server make test-binary

What only the frozen build can get wrong, each checked against the real file: a
module PyInstaller did not collect (trio, trio_websocket, wsproto, h11, httpx,
pydantic, jwt + cryptography for RS256/ES256, prometheus_client, sqlite3, ssl,
psycopg with its libpq, coredis), the web page missing from the bundle, the
bootloader not forwarding SIGTERM or not passing the exit code on, and the unpacked
folder left behind.

Each test runs the executable as a child on 127.0.0.1 port 0 with its database and
its unpack folder ($TMPDIR) in the test's tmp_path, learns the port from the
`listening on` log line, and talks to it over loopback; the model is the fake
Responses API of `fake_upstream.py`. Every wait is bounded and every child is
killed on the way out.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import jwt
import psycopg
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from postgres_server import PostgresMissing, PostgresServer
from redis_server import RedisMissing, RedisServer
from server_process import ServerProcess, base_env, server_process

from conftest import API_KEY, JWT_SECRET, ChatClient, open_chat, token_for
from fake_upstream import FakeUpstream, StallReply, TextReply

BINARY = os.environ.get("CHAT_BINARY", "")
pytestmark = pytest.mark.skipif(not BINARY, reason="set CHAT_BINARY to the built executable")

SHUTDOWN_GRACE_S = 3.0
# A whole exchange with the child, start-up excluded; the start has its own bound.
WAIT_S = 10.0
SERVE = ["serve", "--port", "0", "--shutdown-grace", str(SHUTDOWN_GRACE_S)]


@pytest.fixture
def binary() -> Path:
    """The executable under test; a CHAT_BINARY naming nothing fails, never skips."""
    path = Path(BINARY).resolve()
    assert path.is_file() and os.access(path, os.X_OK), f"CHAT_BINARY={BINARY}: no executable"
    return path


def _env(fake: FakeUpstream, tmp_path: Path, **overrides: str | None) -> dict[str, str]:
    unpack = tmp_path / "unpack"
    unpack.mkdir(exist_ok=True)
    settings: dict[str, str | None] = {
        "CHAT_JWT_SECRET": JWT_SECRET,
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": API_KEY,
        "CHAT_DB": str(tmp_path / "chat.db"),
        "CHAT_MODEL": "test-model",
        "TMPDIR": str(unpack),
    }
    return base_env(**{**settings, **overrides})


def _unpacked(env: dict[str, str]) -> list[str]:
    """The onefile bootloader's folders (_MEIxxxxxx) in this run's TMPDIR."""
    return sorted(p.name for p in Path(env["TMPDIR"]).glob("_MEI*"))


@asynccontextmanager
async def binary_process(
    binary: Path, args: Sequence[str], env: dict[str, str], *, argv: Sequence[str] = ()
) -> AsyncIterator[ServerProcess]:
    """Run the executable (or `argv`, which runs it) from its TMPDIR, where nothing of
    the source tree is at hand, as when installed; yield once its port is known."""
    async with server_process(
        args, env, command=list(argv) or [str(binary), *args], cwd=env["TMPDIR"]
    ) as proc:
        yield proc


async def _run(
    binary: Path, args: Sequence[str], env: dict[str, str]
) -> subprocess.CompletedProcess[bytes]:
    """Run a one-shot subcommand to its end (bounded); its result, output captured."""
    with trio.fail_after(WAIT_S * 2):
        done: subprocess.CompletedProcess[bytes] = await trio.run_process(
            [str(binary), *args],
            env=env,
            cwd=env["TMPDIR"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done


async def _text_until(client: ChatClient, text: str) -> None:
    """Read deltas until the streamed text is `text`; the turn is then mid-stream."""
    received = ""
    while received != text:
        frame = await client.receive()
        if frame["type"] == "text_delta":
            received += frame["content"]
        assert text.startswith(received), received


async def test_binary_serves_health_page_metrics_and_a_streamed_turn(
    binary: Path, fake: FakeUpstream, tmp_path: Path
) -> None:
    env = _env(fake, tmp_path)
    fake.enqueue(TextReply(["Hel", "lo ", "from ", "the binary"]))
    async with binary_process(binary, SERVE, env) as proc:
        assert _unpacked(env), "the onefile build did not unpack into $TMPDIR"
        base = f"http://127.0.0.1:{proc.port}"
        with trio.fail_after(WAIT_S):
            async with httpx.AsyncClient(base_url=base, timeout=WAIT_S) as http:
                health = await http.get("/healthz")
                page = await http.get("/")
                metrics = await http.get("/metrics")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert page.status_code == 200, "web/ is not inside the bundle"
        assert page.headers["content-type"].startswith("text/html")
        assert b"<html" in page.content.lower()
        assert metrics.status_code == 200 and b"chat_active_connections" in metrics.content

        async with open_chat(proc, "bin-1", "alice") as client:  # type: ignore[arg-type]
            await client.send(type="message", content="hello binary")
            frames = await client.turn()
        deltas = "".join(f["content"] for f in frames if f["type"] == "text_delta")
        assert deltas == "Hello from the binary"
        end = next(f for f in frames if f["type"] == "response_end")
        assert end["status"] == "completed", end
        request = await fake.wait_for_request(1)
        assert request.headers["authorization"] == f"Bearer {API_KEY}"

        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit(SHUTDOWN_GRACE_S + 2) == 0, proc.stderr_text
    assert "Traceback" not in proc.stderr_text
    assert _unpacked(env) == [], "the unpacked folder was left behind"


async def test_binary_sigterm_twice_mid_turn_closes_1001_and_exits_0(
    binary: Path, fake: FakeUpstream, tmp_path: Path
) -> None:
    env = _env(fake, tmp_path)
    fake.enqueue(StallReply(["still ", "going"], stall_s=60))
    async with binary_process(binary, SERVE, env) as proc:
        async with open_chat(proc, "bin-2", "bob") as client:  # type: ignore[arg-type]
            await client.send(type="message", content="talk slowly")
            await _text_until(client, "still going")
            signalled_at = trio.current_time()
            # To the bootloader, which forwards it to the Python process, as systemd
            # does with KillMode=mixed; twice, as systemd may.
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)
            assert await client.closed_code() == 1001
        assert await proc.wait_exit(SHUTDOWN_GRACE_S + 2) == 0, proc.stderr_text
        assert trio.current_time() - signalled_at < SHUTDOWN_GRACE_S
    assert "Traceback" not in proc.stderr_text
    assert _unpacked(env) == []


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_binary_accepts_tokens_signed_with_a_public_key_algorithm(
    binary: Path, fake: FakeUpstream, tmp_path: Path, algorithm: str
) -> None:
    """RS256/ES256 need cryptography's compiled parts inside the bundle."""
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = tmp_path / "public.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    token = jwt.encode({"sub": "carol", "exp": 2**31 - 1}, key, algorithm=algorithm)
    env = _env(fake, tmp_path, CHAT_JWT_SECRET=None, CHAT_JWT_PUBLIC_KEY=str(pem))
    async with binary_process(binary, SERVE, env) as proc:
        async with open_chat(proc, "bin-3", token=token) as client:  # type: ignore[arg-type]
            assert client.connected["user_id"] == "carol"  # type: ignore[attr-defined]
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit(SHUTDOWN_GRACE_S + 2) == 0, proc.stderr_text


async def test_binary_token_check_config_and_backup_commands(
    binary: Path, fake: FakeUpstream, tmp_path: Path
) -> None:
    env = _env(fake, tmp_path)

    issued = await _run(binary, ["token", "--sub", "dave", "--ttl", "120"], env)
    assert issued.returncode == 0, issued.stderr
    claims = jwt.decode(issued.stdout.decode().strip(), JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "dave" and claims["exp"] - claims["iat"] == 120

    config = tmp_path / "config.toml"
    config.write_text('model = "from-file"\nmax_connections = 10000\n', encoding="utf-8")
    checked = await _run(binary, ["check-config", "--print", "--config", str(config)], env)
    assert checked.returncode == 0, checked.stderr
    printed = checked.stdout.decode()
    assert 'model = "test-model"  # env CHAT_MODEL' in printed
    assert f"max-connections = 10000  # config {config}" in printed
    assert JWT_SECRET not in printed and API_KEY not in printed
    assert b"configuration OK" in checked.stderr

    refused = await _run(binary, ["check-config"], {**env, "CHAT_JWT_SECRET": ""})
    assert refused.returncode == 2 and b"jwt-secret" in refused.stderr

    async with binary_process(binary, SERVE, env) as proc:
        async with open_chat(proc, "bin-4", token=token_for("erin")) as client:  # type: ignore[arg-type]
            await client.send(type="message", content="keep this")
            await client.turn()
        destination = tmp_path / "backup.db"
        backed_up = await _run(binary, ["backup", str(destination)], env)  # while serving
        assert backed_up.returncode == 0, backed_up.stderr
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit(SHUTDOWN_GRACE_S + 2) == 0, proc.stderr_text
    copy = sqlite3.connect(destination)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = copy.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        copy.close()
    assert rows == 2
    again = await _run(binary, ["backup", str(destination)], env)
    assert again.returncode == 1, "backup must refuse to overwrite"
    assert _unpacked(env) == []


async def test_binary_tells_systemd_ready_watchdog_and_stopping(
    binary: Path, fake: FakeUpstream, tmp_path: Path
) -> None:
    """What build/chat-agent-server.service relies on (Type=notify, NotifyAccess=all,
    WatchdogSec=): READY=1 once listening, WATCHDOG=1 every half interval although
    systemd's WATCHDOG_PID is the bootloader's (build/rthook_systemd.py hands it to
    the Python process), STOPPING=1 on SIGTERM."""
    name = f"chat-agent-server-test-{secrets.token_hex(8)}"
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with notify:
        await notify.bind("\0" + name)
        env = _env(fake, tmp_path, NOTIFY_SOCKET="@" + name, WATCHDOG_USEC="200000")
        # systemd sets WATCHDOG_PID to the PID it started: a shell that execs the binary.
        argv = ["sh", "-c", 'export WATCHDOG_PID=$$; exec "$0" "$@"', str(binary), *SERVE]

        async def next_state() -> str:
            with trio.fail_after(WAIT_S):
                state: str = (await notify.recv(4096)).decode()
            return state

        async with binary_process(binary, SERVE, env, argv=argv) as proc:
            assert await next_state() == "READY=1"
            assert [await next_state() for _ in range(3)] == ["WATCHDOG=1"] * 3
            proc.send_signal(signal.SIGTERM)
            while (state := await next_state()) == "WATCHDOG=1":
                pass
            assert state == "STOPPING=1"
            assert await proc.wait_exit(SHUTDOWN_GRACE_S + 2) == 0, proc.stderr_text


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on a PostgreSQL server of this test's own (skipped without the
    server binaries, failed under CI)."""
    try:
        server = PostgresServer.create()
    except PostgresMissing as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required under CI: {missing}")
        pytest.skip(f"{missing}: run build/install-services.sh")
    try:
        yield server.create_database()
    finally:
        server.destroy()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis server of this test's own (skipped without redis-server, failed under CI)."""
    try:
        server = RedisServer.create()
    except RedisMissing as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"redis-server is required under CI: {missing}")
        pytest.skip(f"{missing}: run build/install-services.sh")
    try:
        yield server.url
    finally:
        server.destroy()


async def test_binary_runs_on_postgresql_and_redis(
    binary: Path, fake: FakeUpstream, tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    """Several instances: psycopg (with psycopg-binary's libpq) and coredis (compiled
    with mypyc) are imported only for a postgresql:// --db and a --redis-url, so only a
    run with both shows that the build collected them."""
    env = _env(fake, tmp_path, CHAT_DB=postgres_url, CHAT_REDIS_URL=redis_url)
    fake.enqueue(TextReply(["stored ", "in ", "PostgreSQL"]))
    async with binary_process(binary, SERVE, env) as proc:
        with trio.fail_after(WAIT_S):
            async with httpx.AsyncClient(timeout=WAIT_S) as http:
                health = await http.get(f"http://127.0.0.1:{proc.port}/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        async with open_chat(proc, "bin-pg", "alice") as client:  # type: ignore[arg-type]
            await client.send(type="message", content="hello postgres")
            frames = await client.turn()
        end = next(f for f in frames if f["type"] == "response_end")
        assert end["status"] == "completed" and end["full_content"] == "stored in PostgreSQL"
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit(SHUTDOWN_GRACE_S + 2) == 0, proc.stderr_text
    assert "Traceback" not in proc.stderr_text
    with psycopg.connect(postgres_url) as connection:
        stored = connection.execute("SELECT content FROM messages ORDER BY id").fetchall()
    assert [row[0] for row in stored] == ["hello postgres", "stored in PostgreSQL"]
