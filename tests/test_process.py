"""The server as a real process: the command line, signals, `kill -9`, HTTP on the
same port, hostile peers, the offline demo, start-up refusals, and secrets in logs.

Each test starts `python server.py` as a child (see `server_process.py`) on
127.0.0.1 port 0, learns the port from its `listening on` log line, and talks to
it over loopback; the model is the fake Responses API of `fake_upstream.py`.
Every wait is bounded, every child is killed on the way out, and every byte a
child writes is scanned for the API key, the JWT secret and every token a test
used (the autouse `_no_secret_in_any_output` fixture).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
from server_process import (
    ALL_PROCESSES,
    PROJECT_DIR,
    SERVER_PY,
    ServerProcess,
    base_env,
    server_process,
)
from trio_websocket import ConnectionRejected, open_websocket_url

from conftest import API_KEY, JWT_SECRET, ChatClient, open_chat
from fake_upstream import FakeUpstream, StallReply, StatusReply, TextReply
from server import issue_token

SHUTDOWN_GRACE_S = 3.0
# Generous bound for a whole exchange with a child process (start-up excluded).
WAIT_S = 10.0

# Every token a test handed to a server, so the log scan can look for each.
_USED_TOKENS: set[str] = set()


def _token(user: str, ttl_s: int = 3600, secret: str = JWT_SECRET) -> str:
    token = issue_token(secret, user, ttl_s)
    _USED_TOKENS.add(token)
    return token


def _secrets() -> list[str]:
    found = [API_KEY, JWT_SECRET]
    for token in _USED_TOKENS:
        # The whole token, and its signature alone (a log that cut the token up).
        found += [token, token.rsplit(".", 1)[-1]]
    return found


@pytest.fixture(autouse=True)
def _no_secret_in_any_output() -> Iterator[None]:
    """Rule: tokens and API keys never appear in logs. Checked for every child of every
    test; only the --insecure-dev token print on stdout is meant to show a token."""
    first = len(ALL_PROCESSES)
    yield
    for proc in ALL_PROCESSES[first:]:
        outputs = {"stderr": proc.stderr_text}
        if "--insecure-dev" not in proc.args:
            outputs["stdout"] = proc.stdout_text
        for name, text in outputs.items():
            for secret in _secrets():
                assert secret not in text, f"a secret leaked to {name} of {proc.args}"


def _env(fake: FakeUpstream, db: Path, **overrides: str | None) -> dict[str, str]:
    return base_env(
        CHAT_JWT_SECRET=JWT_SECRET,
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_API_KEY=API_KEY,
        CHAT_DB=str(db),
        CHAT_MODEL="test-model",
        **overrides,
    )


SERVE = ["serve", "--port", "0", "--shutdown-grace", str(SHUTDOWN_GRACE_S)]


@asynccontextmanager
async def _chat(
    proc: ServerProcess, session_id: str = "s1", user: str = "alice", **kwargs: Any
) -> AsyncIterator[ChatClient]:
    token = kwargs.pop("token", None) or _token(user)
    async with open_chat(proc, session_id, user, token=token, **kwargs) as client:  # type: ignore[arg-type]
        yield client


async def _history(proc: ServerProcess, session_id: str = "s1") -> list[dict[str, Any]]:
    async with _chat(proc, session_id) as client:
        await client.send(type="history")
        frames = await client.receive_until("history")
    messages: list[dict[str, Any]] = frames[-1]["messages"]
    return messages


async def _text_until(client: ChatClient, text: str) -> str:
    """Read deltas until the streamed text is `text`; the turn is then mid-stream."""
    received = ""
    while received != text:
        frame = await client.receive()
        if frame["type"] == "text_delta":
            received += frame["content"]
        assert frame["type"] in ("typing", "response_start", "text_delta", "ping"), frame
        assert text.startswith(received), received
    return received


async def _complete_turn(proc: ServerProcess, session_id: str, content: str) -> list[dict]:
    async with _chat(proc, session_id) as client:
        await client.send(type="message", content=content)
        frames = await client.turn()
    assert frames[-2]["type"] == "response_end" and frames[-2]["status"] == "completed"
    return frames


def _user_texts(items: object) -> list[str]:
    texts: list[str] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or item.get("role") != "user":
            continue
        content = item.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        texts.append(str(content))
    return texts


def _integrity_check(db: Path) -> str:
    connection = sqlite3.connect(db)
    try:
        result: str = connection.execute("PRAGMA integrity_check").fetchone()[0]
        return result
    finally:
        connection.close()


# =========================================================================== 1. token command


async def test_token_command_prints_a_jwt_the_server_accepts_with_its_ttl(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    env = _env(fake, tmp_path / "chat.db")
    with trio.fail_after(WAIT_S * 2):
        done = await trio.run_process(
            [sys.executable, SERVER_PY, "token", "--sub", "alice", "--ttl", "120"],
            env=env,
            cwd=str(PROJECT_DIR),
            capture_stdout=True,
            capture_stderr=True,
        )
    token = done.stdout.decode().strip()
    _USED_TOKENS.add(token)
    for secret in (API_KEY, JWT_SECRET):
        assert secret not in done.stderr.decode()
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == 120
    assert abs(claims["exp"] - (time.time() + 120)) < 30

    async with server_process(SERVE, env) as proc:
        async with _chat(proc, "tok-session", token=token) as client:
            assert client.connected["user_id"] == "alice"  # type: ignore[attr-defined]
            assert client.connected["session_id"] == "tok-session"  # type: ignore[attr-defined]


# =========================================================================== 2. signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_mid_turn_closes_1001_exits_0_within_grace_and_stores_interrupted(
    fake: FakeUpstream, tmp_path: Path, signum: signal.Signals
) -> None:
    db = tmp_path / "chat.db"
    env = _env(fake, db)
    fake.enqueue(StallReply(["partial ", "answer"], stall_s=60))
    async with server_process(SERVE, env) as proc:
        async with _chat(proc) as client:
            await client.send(type="message", content="tell me everything")
            await _text_until(client, "partial answer")
            signalled_at = trio.current_time()
            proc.send_signal(signum)
            assert await client.closed_code() == 1001
        assert await proc.wait_exit(SHUTDOWN_GRACE_S + 2) == 0, proc.stderr_text
        took_s = trio.current_time() - signalled_at
        assert took_s < SHUTDOWN_GRACE_S, f"exit took {took_s:.2f}s"

    async with server_process(SERVE, env) as proc:
        history = await _history(proc)
    assert [(m["role"], m["content"], m["status"]) for m in history] == [
        ("user", "tell me everything", None),
        ("assistant", "partial answer", "interrupted"),
    ]


async def test_sigterm_twice_is_harmless_and_exits_0(fake: FakeUpstream, tmp_path: Path) -> None:
    fake.enqueue(StallReply(["still ", "going"], stall_s=60))
    async with server_process(SERVE, _env(fake, tmp_path / "chat.db")) as proc:
        async with _chat(proc) as client:
            await client.send(type="message", content="hi")
            await _text_until(client, "still going")
            signalled_at = trio.current_time()
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)
            assert await client.closed_code() == 1001
        assert await proc.wait_exit(SHUTDOWN_GRACE_S + 2) == 0, proc.stderr_text
        assert trio.current_time() - signalled_at < SHUTDOWN_GRACE_S
    assert "Traceback" not in proc.stderr_text


async def test_idle_server_exits_0_on_sigterm(fake: FakeUpstream, tmp_path: Path) -> None:
    async with server_process(SERVE, _env(fake, tmp_path / "chat.db")) as proc:
        signalled_at = trio.current_time()
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit(SHUTDOWN_GRACE_S + 2) == 0, proc.stderr_text
        assert trio.current_time() - signalled_at < SHUTDOWN_GRACE_S


# =========================================================================== 3. kill -9


async def test_kill_9_mid_stream_loses_nothing_committed_and_the_chain_resumes(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "chat.db"
    env = _env(fake, db)
    fake.enqueue(
        TextReply(["first ", "answer"], response_id="resp_done_1"),
        StallReply(["half an ", "answer"], stall_s=60),
    )
    async with server_process(SERVE, env) as proc:
        await _complete_turn(proc, "s1", "first question")
        async with _chat(proc) as client:
            await client.send(type="message", content="unanswered question")
            typing = await client.receive()
            assert typing == {"type": "typing", "is_typing": True}
            await _text_until(client, "half an answer")
            proc.kill()
            assert await proc.wait_exit() == -signal.SIGKILL
            await client.closed_code()

    assert await trio.to_thread.run_sync(_integrity_check, db) == "ok"

    fake.enqueue(TextReply(["after ", "restart"], response_id="resp_after"))
    async with server_process(SERVE, env) as proc:
        history = await _history(proc)
        assert [(m["role"], m["content"]) for m in history][:3] == [
            ("user", "first question"),
            ("assistant", "first answer"),
            ("user", "unanswered question"),
        ]
        assert history[1]["status"] == "completed"
        frames = await _complete_turn(proc, "s1", "next question")
    assert frames[-2]["full_content"] == "after restart"
    last = fake.requests[-1].body
    assert last["previous_response_id"] == "resp_done_1"
    assert _user_texts(last["input"]) == ["unanswered question", "next question"]


# =========================================================================== 4. HTTP


async def test_http_on_the_same_port_healthz_404_405_and_unknown_ws_path(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    async with server_process(SERVE, _env(fake, tmp_path / "chat.db")) as proc:
        base = f"http://127.0.0.1:{proc.port}"
        with trio.fail_after(WAIT_S):
            async with httpx.AsyncClient(base_url=base, timeout=WAIT_S) as http:
                health = await http.get("/healthz")
                missing = await http.get("/nope")
                posted = await http.post("/healthz", content=b"{}")
        assert health.status_code == 200
        assert health.headers["content-type"].startswith("application/json")
        assert health.json() == {"status": "ok"}
        assert missing.status_code == 404
        assert posted.status_code in (404, 405)

        token = _token("alice")
        for path in ("/ws/nope/s1", "/healthz", "/ws/chat", "/wschat/s1"):
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(
                    f"ws://127.0.0.1:{proc.port}{path}?token={token}", connect_timeout=WAIT_S
                ):
                    pytest.fail(f"WebSocket accepted on {path}")
            assert rejected.value.status_code == 404, path
        # A known path with an empty session id is an invalid session id, not a 404.
        async with _chat(proc, "", token=token, expect_connected=False) as client:
            assert await client.closed_code() == 4400
        assert proc.returncode is None


# =========================================================================== 5. hostile peers


def _masked_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """One client frame (clients must mask); `opcode` is not checked on purpose."""
    head = bytes([(0x80 if fin else 0) | opcode])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    else:
        head += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each whole unmasked server frame in `data`."""
    frames: list[tuple[int, bytes]] = []
    while len(data) >= 2:
        opcode, length, start = data[0] & 0x0F, data[1] & 0x7F, 2
        if length == 126:
            length, start = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            length, start = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < start + length:
            break
        frames.append((opcode, data[start : start + length]))
        data = data[start + length :]
    return frames


# On a framing error wsproto reports a close while its state is still OPEN, so
# trio-websocket drops the TCP connection without sending 1002 (RFC 6455 7.1.7 says
# SHOULD). What these tests hold the server to is closing that one connection.
PROTOCOL_ERROR_CLOSES = (1002, None)


def _close_code(data: bytes) -> int | None:
    for opcode, payload in _server_frames(data):
        if opcode == 0x8:
            return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else None
    return None


async def _raw_connect(port: int) -> trio.SocketStream:
    with trio.fail_after(WAIT_S):
        return await trio.open_tcp_stream("127.0.0.1", port)


async def _read_to_eof(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection (bounded)."""
    data = bytearray()
    with trio.fail_after(WAIT_S):
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            pass  # a reset is a close too
    return bytes(data)


async def _raw_handshake(port: int, session_id: str, token: str) -> tuple[trio.SocketStream, bytes]:
    """A hand-written WebSocket upgrade. Returns the stream and any bytes after the 101."""
    stream = await _raw_connect(port)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(
        (
            f"GET /ws/chat/{session_id}?token={token} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    data = bytearray()
    with trio.fail_after(WAIT_S):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed during the handshake: {bytes(data)!r}"
            data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return stream, rest


async def _reset(stream: trio.SocketStream) -> None:
    """Close with a TCP RST instead of a FIN (SO_LINGER 0)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def _garbage_instead_of_http(port: int) -> None:
    stream = await _raw_connect(port)
    await stream.send_all(b"\x16\x03\x01\x00\xff\x00garbage \x00\xff\r\n\r\n" * 4)
    await _read_to_eof(stream)
    await stream.aclose()


async def _half_request_then_close(port: int) -> None:
    stream = await _raw_connect(port)
    await stream.send_all(b"GET /ws/chat/s1?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr")
    await stream.aclose()


async def _half_request_then_reset(port: int) -> None:
    stream = await _raw_connect(port)
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHo")
    await _reset(stream)


async def _ping_right_after_client_close(port: int) -> None:
    stream, _ = await _raw_handshake(port, "nasty-close", _token("mallory"))
    close = _masked_frame(0x8, struct.pack("!H", 1000) + b"bye")
    await stream.send_all(close + _masked_frame(0x9, b"late ping") + _masked_frame(0x9, b"again"))
    data = await _read_to_eof(stream)
    assert _close_code(data) in (1000, None)
    await stream.aclose()


async def _ping_while_server_closes(port: int) -> None:
    # A bad token: the server sends close 4001 and waits for ours; we ping instead.
    stream, rest = await _raw_handshake(port, "nasty-refused", "not-a-jwt")
    await stream.send_all(_masked_frame(0x9, b"ping during close"))
    await stream.send_all(_masked_frame(0xA, b"unsolicited pong"))
    data = rest + await _read_to_eof(stream)
    # Known trio-websocket race (the rest of issue #184): aclose() moves wsproto to
    # LOCAL_CLOSING before the close frame is written; our ping makes the reader task
    # fail and cancel the connection, and then the frame is never sent (~10% of runs).
    # The server's duty here is to drop this one peer quietly and keep serving.
    assert _close_code(data) in (4001, None), data
    await stream.aclose()


async def _reset_mid_turn(port: int) -> None:
    stream, _ = await _raw_handshake(port, "nasty-reset", _token("mallory"))
    message = json.dumps({"type": "message", "content": "reset me"}).encode()
    await stream.send_all(_masked_frame(0x1, message))
    data = bytearray()
    with trio.fail_after(WAIT_S):
        while b"typing" not in data:  # the turn has started
            chunk = await stream.receive_some(65536)
            assert chunk
            data += chunk
    await _reset(stream)


async def _invalid_opcode(port: int) -> None:
    stream, _ = await _raw_handshake(port, "nasty-opcode", _token("mallory"))
    await stream.send_all(_masked_frame(0x3, b"reserved opcode"))
    data = await _read_to_eof(stream)
    assert _close_code(data) in PROTOCOL_ERROR_CLOSES, data
    await stream.aclose()


async def _fragmented_ping(port: int) -> None:
    stream, _ = await _raw_handshake(port, "nasty-fragment", _token("mallory"))
    await stream.send_all(_masked_frame(0x9, b"half", fin=False))
    data = await _read_to_eof(stream)
    assert _close_code(data) in PROTOCOL_ERROR_CLOSES, data
    await stream.aclose()


async def _exabyte_frame_header(port: int) -> None:
    stream, _ = await _raw_handshake(port, "nasty-huge", _token("mallory"))
    # The header claims 2**62 bytes; the server must cut us off once more than
    # --max-frame-bytes (64 KiB) of it arrived, not buffer on.
    header = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 2**62) + bytes(4)  # zero mask
    try:
        with trio.fail_after(WAIT_S):
            await stream.send_all(header)
            for _ in range(64):  # up to 4 MiB
                await stream.send_all(b"a" * 65536)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # closed on us mid-send: what we want
    data = await _read_to_eof(stream)
    assert _close_code(data) == 1009, data
    await stream.aclose()


async def _unmasked_frame(port: int) -> None:
    stream, _ = await _raw_handshake(port, "nasty-unmasked", _token("mallory"))
    await stream.send_all(bytes([0x81, 5]) + b"hello")
    data = await _read_to_eof(stream)
    assert _close_code(data) in PROTOCOL_ERROR_CLOSES, data
    await stream.aclose()


NASTY_PEERS: list[Callable[[int], Awaitable[None]]] = [
    _garbage_instead_of_http,
    _half_request_then_close,
    _half_request_then_reset,
    _ping_right_after_client_close,
    _ping_while_server_closes,
    _reset_mid_turn,
    _invalid_opcode,
    _fragmented_ping,
    _exabyte_frame_header,
    _unmasked_frame,
]


async def test_no_hostile_peer_takes_the_server_down(fake: FakeUpstream, tmp_path: Path) -> None:
    async with server_process(SERVE, _env(fake, tmp_path / "chat.db")) as proc:
        assert proc.port is not None
        for number, nasty in enumerate(NASTY_PEERS):
            await nasty(proc.port)
            assert proc.returncode is None, f"died after {nasty.__name__}:\n{proc.stderr_text}"
            frames = await _complete_turn(proc, f"good-{number}", f"still there after {number}")
            assert frames[-2]["full_content"] == f"echo: still there after {number}"
        assert proc.returncode is None
    assert "Traceback" not in proc.stderr_text, proc.stderr_text


# =========================================================================== 6. try it


async def test_insecure_dev_without_keys_serves_the_offline_demo_with_a_ready_url(
    tmp_path: Path,
) -> None:
    env = base_env(CHAT_DB=str(tmp_path / "demo.db"))
    assert not any(name.startswith(("OPENAI_", "CHAT_JWT")) for name in env)
    async with server_process(["serve", "--insecure-dev", "--port", "0"], env) as proc:
        said = (proc.stderr_text + proc.stdout_text).lower()
        assert "offline demo model" in said
        url = await proc.wait_for_output(
            r"https?://[^\s/]+:(\d+)/\S*\?token=([\w.-]+)", stream="stdout"
        )
        assert int(url.group(1)) == proc.port, f"printed URL is not usable: {url.group(0)}"
        token = url.group(2)
        assert token not in proc.stderr_text
        async with open_chat(proc, "demo", token=token) as client:  # type: ignore[arg-type]
            assert client.connected["user_id"]  # type: ignore[attr-defined]
            await client.send(type="message", content="hello demo")
            frames = await client.turn()
    deltas = [f["content"] for f in frames if f["type"] == "text_delta"]
    end = frames[-2]
    assert len(deltas) >= 3
    assert end["type"] == "response_end" and end["status"] == "completed"
    assert end["full_content"] == "".join(deltas)
    assert "hello demo" in end["full_content"]


# =========================================================================== 7. refusals


async def _run_to_exit(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(WAIT_S * 2):
        done: subprocess.CompletedProcess[bytes] = await trio.run_process(
            [sys.executable, SERVER_PY, *args],
            env=env,
            cwd=str(PROJECT_DIR),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    for secret in _secrets():
        assert secret.encode() not in done.stdout + done.stderr
    return done


async def test_no_jwt_secret_without_insecure_dev_refuses_to_start(tmp_path: Path) -> None:
    env = base_env(CHAT_DB=str(tmp_path / "chat.db"), OPENAI_API_KEY=API_KEY)
    done = await _run_to_exit(["serve", "--port", "0"], env)
    stderr = done.stderr.decode()
    assert done.returncode != 0
    assert "jwt-secret" in stderr.lower() and "--insecure-dev" in stderr
    assert "listening on" not in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("tools", "names"),
    [
        ([{"description": "a tool with no name"}], ["tool #0", "name"]),
        ([{"name": "fine"}, {"name": "bad name!"}], ["tool #1", "bad name!"]),
        ([{"name": "fine"}, "not an object"], ["tool #1"]),
        ({"name": "not a list"}, ["list"]),
    ],
    ids=["no-name", "bad-name", "not-an-object", "not-a-list"],
)
async def test_bad_tools_file_refuses_to_start_naming_the_bad_entry(
    fake: FakeUpstream, tmp_path: Path, tools: object, names: list[str]
) -> None:
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(tools))
    env = _env(fake, tmp_path / "chat.db")
    done = await _run_to_exit(["serve", "--port", "0", "--tools-file", str(tools_file)], env)
    stderr = done.stderr.decode()
    assert done.returncode != 0
    for name in names:
        assert name in stderr, stderr
    assert "listening on" not in stderr
    assert "Traceback" not in stderr, stderr


# =========================================================================== 8. secrets


async def test_secrets_never_in_logs_even_at_debug_level_on_failures(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    # The upstream echoes the key back in its error body, as a misconfigured proxy might.
    fake.enqueue(
        StatusReply(401, {"error": {"message": f"Incorrect API key provided: {API_KEY}"}}),
        StatusReply(400, f"bad request from key {API_KEY}"),
    )
    args = [*SERVE, "--log-level", "DEBUG"]
    async with server_process(args, _env(fake, tmp_path / "chat.db")) as proc:
        async with _chat(proc) as client:
            for _ in range(2):
                await client.send(type="message", content="fail please")
                frames = await client.turn()
                errors = [f for f in frames if f["type"] == "error"]
                assert errors and errors[0]["code"] == "upstream_error", frames
                assert API_KEY not in json.dumps(frames)
        refused = [
            _token("alice", ttl_s=-60),  # expired
            _token("alice", secret="another-secret-that-is-long-enough-32b"),  # wrong key
            _token("alice")[:-4] + "AAAA",  # tampered signature
        ]
        _USED_TOKENS.update(refused)
        for token in refused:
            async with open_chat(proc, "s1", token=token, expect_connected=False) as bad:  # type: ignore[arg-type]
                assert await bad.closed_code() == 4001
        with trio.fail_after(WAIT_S):
            async with httpx.AsyncClient(timeout=WAIT_S) as http:
                await http.get(
                    f"http://127.0.0.1:{proc.port}/nope?token={_token('bob')}",
                    headers={"Authorization": f"Bearer {_token('carol')}"},
                )
        await _complete_turn(proc, "s2", "and now a good one")
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit(SHUTDOWN_GRACE_S + 2) == 0
    logged = proc.stderr_text + proc.stdout_text
    # The scan below covers the paths that handled the secrets: upstream failures and
    # refused tokens were logged.
    assert "upstream" in logged.lower() and "4001" in logged, logged
    for secret in _secrets():
        assert secret not in logged
