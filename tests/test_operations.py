"""Operations (issue 5): layered configuration and `check-config`, secrets from files and
systemd credentials, Prometheus `/metrics`, systemd notify (READY, STOPPING, WATCHDOG),
TLS on the same port, the log (events, formats, no secrets or content), and `backup`.

In-process servers come from conftest (`start_server`, `make_config`); the command line
runs as `python server.py ...` children. Loopback only, every wait bounded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from server_process import PROJECT_DIR, SERVER_PY, base_env, server_process
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from bench.self_signed import self_signed_cert
from chat import ops, pacing
from chat.ops import JsonLogFormatter, NonBlockingLogHandler
from chat.settings import ConfigError, config_from_settings, resolve_settings
from conftest import (
    API_KEY,
    CLIENT_WAIT_S,
    JWT_SECRET,
    ChatClient,
    open_chat,
    token_for,
)
from fake_upstream import FakeUpstream, StatusReply, TextReply
from server import ChatServer, Config, _build_parser, main, run_server

StartServer = Callable[..., Awaitable[ChatServer]]
MakeConfig = Callable[..., Config]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# One `python server.py` run: start-up (about a second) plus the command itself.
CLI_WAIT_S = 20.0


async def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run `python server.py *args` to its exit; stdout and stderr captured."""
    with trio.fail_after(CLI_WAIT_S):
        done: subprocess.CompletedProcess[bytes] = await trio.run_process(
            [sys.executable, SERVER_PY, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=str(PROJECT_DIR),
            env=env if env is not None else base_env(),
        )
    return done


def _clear_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("CHAT_", "OPENAI_")) or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def _resolve(argv: list[str], environ: dict[str, str]) -> Config:
    args: argparse.Namespace = _build_parser().parse_args(["check-config", *argv])
    return config_from_settings(resolve_settings(args, environ), environ)


# =========================================================================== configuration

PRINTED_RE = re.compile(r"^(?P<key>[a-z-]+) = (?P<value>.*?)  # (?P<source>.+)$")


async def test_check_config_print_shows_flag_over_env_over_file_over_default_masking_secrets(
    tmp_path: Path,
) -> None:
    config_file = tmp_path / "chat.toml"
    config_file.write_text(
        'port = 1111\nmodel = "file-model"\nmax_queue = 3\nheartbeat-interval = 12.5\n'
        f'allowed_origins = ["https://a.example"]\njwt_secret = "{JWT_SECRET}"\n'
        f'db = "{tmp_path / "chat.db"}"\n'
    )
    env = base_env(CHAT_PORT="2222", CHAT_MODEL="env-model", CHAT_MAX_QUEUE="5",
                   OPENAI_API_KEY=API_KEY)
    done = await _cli("check-config", "--config", str(config_file), "--print", "--port", "3333",
                      env=env)
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    printed = {}
    for line in stdout.splitlines():
        match = PRINTED_RE.match(line)
        assert match, line
        printed[match["key"]] = (json.loads(match["value"]), match["source"])
    from_file = f"config {config_file}"
    assert printed["port"] == (3333, "flag")
    assert printed["model"] == ("env-model", "env CHAT_MODEL")
    assert printed["max-queue"] == (5, "env CHAT_MAX_QUEUE")
    assert printed["heartbeat-interval"] == (12.5, from_file)
    assert printed["allowed-origin"] == (["https://a.example"], from_file)
    assert printed["db"] == (str(tmp_path / "chat.db"), from_file)
    assert printed["tool-timeout"] == (120.0, "default")
    assert printed["jwt-secret"] == ("********", from_file)
    assert printed["api-key"] == ("********", "env OPENAI_API_KEY")
    for secret in (JWT_SECRET, API_KEY):
        assert secret not in stdout + stderr


async def test_check_config_process_exits_non_zero_with_the_bad_value_and_its_source(
    tmp_path: Path,
) -> None:
    env = base_env(CHAT_JWT_SECRET=JWT_SECRET, CHAT_PORT="eighty", CHAT_DB=str(tmp_path / "c.db"))
    done = await _cli("check-config", env=env)
    stderr = done.stderr.decode()
    assert done.returncode != 0
    assert "port (from env CHAT_PORT)" in stderr and "Traceback" not in stderr, stderr


def _bad_config_cases(tmp: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """name -> (flags, environment, what stderr must say)."""
    bad_toml = tmp / "bad.toml"
    bad_toml.write_text("heartbeat_timeout = -1\n")
    unknown_key = tmp / "unknown.toml"
    unknown_key.write_text("prot = 8080\n")
    not_toml = tmp / "not.toml"
    not_toml.write_text("port = = 1\n")
    garbage_pem = tmp / "garbage.pem"
    garbage_pem.write_text("-----BEGIN CERTIFICATE-----\nnot a cert\n-----END CERTIFICATE-----\n")
    return {
        "bad-flag": (["--max-queue", "-1"], {}, "max-queue (from flag)"),
        "bad-env": ([], {"CHAT_RATE_LIMIT": "lots"}, "rate-limit (from env CHAT_RATE_LIMIT)"),
        "bad-file-value": (
            ["--config", str(bad_toml)], {}, f"heartbeat-timeout (from config {bad_toml})"
        ),
        "unknown-toml-key": (["--config", str(unknown_key)], {}, "unknown key 'prot'"),
        "invalid-toml": (["--config", str(not_toml)], {}, "not valid TOML"),
        "missing-config-file": (["--config", str(tmp / "nope.toml")], {}, "cannot read"),
        "unreadable-secret-file": (
            ["--jwt-secret-file", str(tmp / "no-secret")],
            {"CHAT_JWT_SECRET": ""},
            "jwt-secret-file: cannot read",
        ),
        "unreadable-api-key-file": (
            ["--api-key-file", str(tmp / "no-key")], {}, "api-key-file: cannot read"
        ),
        "db-folder-missing": (
            ["--db", str(tmp / "missing" / "chat.db")], {}, "does not exist"
        ),
        "bad-tls-files": (
            ["--tls-cert", str(garbage_pem), "--tls-key", str(garbage_pem)], {}, "tls-cert"
        ),
        "tls-cert-without-key": (["--tls-cert", str(garbage_pem)], {}, "tls-key"),
        # The environment's secret must not hide a bad file: both set is refused.
        "secret-and-secret-file": (
            ["--jwt-secret-file", str(garbage_pem)], {}, "jwt-secret and jwt-secret-file"
        ),
    }


BAD_CONFIG_CASES = [
    "bad-flag", "bad-env", "bad-file-value", "unknown-toml-key", "invalid-toml",
    "missing-config-file", "unreadable-secret-file", "unreadable-api-key-file",
    "db-folder-missing", "bad-tls-files", "tls-cert-without-key", "secret-and-secret-file",
]


@pytest.mark.parametrize("case", BAD_CONFIG_CASES)
def test_check_config_rejects_bad_config_with_a_clear_message(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    flags, env, expected = _bad_config_cases(tmp_path)[case]
    _clear_settings_env(monkeypatch)
    monkeypatch.setenv("CHAT_JWT_SECRET", JWT_SECRET)
    monkeypatch.setenv("CHAT_DB", str(tmp_path / "chat.db"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["check-config", *flags]) != 0
    captured = capsys.readouterr()
    assert captured.err.startswith("configuration error: "), captured.err
    assert expected in captured.err, captured.err
    assert "configuration OK" not in captured.err


def test_secrets_come_from_files_then_systemd_credentials(tmp_path: Path) -> None:
    secret_file, key_file = tmp_path / "jwt.txt", tmp_path / "key.txt"
    secret_file.write_text("secret-from-a-file-long-enough-for-hs256\n")
    key_file.write_text("sk-from-a-file\n")
    config = _resolve(["--jwt-secret-file", str(secret_file), "--api-key-file", str(key_file)], {})
    assert config.jwt_secret == "secret-from-a-file-long-enough-for-hs256"
    assert config.api_key == "sk-from-a-file"

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "jwt-secret").write_text("secret-from-systemd-long-enough-for-hs256")
    (credentials / "api-key").write_text("sk-from-systemd\n")
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}
    config = _resolve([], environ)
    assert config.jwt_secret == "secret-from-systemd-long-enough-for-hs256"
    assert config.api_key == "sk-from-systemd"
    # An explicit setting wins over the credential.
    config = _resolve([], {**environ, "OPENAI_API_KEY": "sk-explicit"})
    assert config.api_key == "sk-explicit"

    (credentials / "api-key").write_text("  \n")
    with pytest.raises(ConfigError, match="credential api-key"):
        _resolve([], environ)


async def test_token_command_signs_with_the_systemd_credential_secret(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    secret = "secret-from-systemd-long-enough-for-hs256"
    (credentials / "jwt-secret").write_text(secret + "\n")
    env = base_env(CREDENTIALS_DIRECTORY=str(credentials), CHAT_DB=str(tmp_path / "chat.db"))
    done = await _cli("token", "--sub", "carol", env=env)
    assert done.returncode == 0, done.stderr.decode()
    claims = jwt.decode(done.stdout.decode().strip(), secret, algorithms=["HS256"])
    assert claims["sub"] == "carol"


# =========================================================================== metrics


async def _scrape(http: httpx.AsyncClient, server: ChatServer) -> Samples:
    with trio.fail_after(CLIENT_WAIT_S):
        response = await http.get(f"http://127.0.0.1:{server.port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def _scrape_until(
    http: httpx.AsyncClient, server: ChatServer, done: Callable[[Samples], bool]
) -> Samples:
    """Scrape until `done` holds. A normal close is counted once the server's handler
    has finished, which may be just after the client saw the close; nothing to await."""
    with trio.fail_after(CLIENT_WAIT_S):
        while not done(samples := await _scrape(http, server)):  # noqa: ASYNC110
            await trio.sleep(0.01)
    return samples


async def test_metrics_scrape_shows_a_turn_moving_every_counter(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(TextReply(["one ", "two ", "three"], delay_s=0.01))
    async with httpx.AsyncClient() as http:
        before = await _scrape(http, server)
        async with open_chat(server, "metrics") as client:
            during = await _scrape(http, server)
            await client.send(type="message", content="count me")
            frames = await client.turn()
        after = await _scrape_until(
            http,
            server,
            lambda s: _value(s, "chat_connections_closed_total", code="1000")
            == _value(before, "chat_connections_closed_total", code="1000") + 1,
        )

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert frames[-2]["status"] == "completed"
    active = "chat_active_connections"
    assert _value(during, active) == _value(before, active) + 1
    assert _value(after, active) == _value(before, active)
    assert moved("chat_connections_opened_total") == 1
    assert moved("chat_messages_received_total") == 1
    assert moved("chat_turns_total", status="completed") == 1
    deltas = sum(1 for frame in frames if frame["type"] == "text_delta")
    assert moved("chat_deltas_sent_total") == deltas >= 1
    assert moved("chat_upstream_request_seconds_count") == 1
    assert moved("chat_upstream_request_seconds_sum") > 0
    assert moved("chat_time_to_first_token_seconds_count") == 1
    assert moved("chat_store_write_seconds_count") >= 2  # the user message, the answer


async def test_metrics_count_upstream_errors_by_kind_and_refusals_by_close_code(
    server: ChatServer, fake: FakeUpstream
) -> None:
    fake.enqueue(StatusReply(400, {"error": {"message": "bad request", "code": None}}))
    async with httpx.AsyncClient() as http:
        before = await _scrape(http, server)
        async with open_chat(server, "errors") as client:
            await client.send(type="message", content="fail please")
            frames = await client.turn()
        async with open_chat(server, "errors", token="not-a-jwt", expect_connected=False) as bad:
            assert await bad.closed_code() == 4001
        after = await _scrape(http, server)
    assert frames[-2]["status"] == "failed"
    for name, labels in [
        ("chat_upstream_errors_total", {"kind": "rejected"}),
        ("chat_turns_total", {"status": "failed"}),
        ("chat_connections_closed_total", {"code": "4001"}),
    ]:
        assert _value(after, name, **labels) - _value(before, name, **labels) == 1, name


async def test_metrics_count_a_turn_interrupted_by_a_disconnect_without_grace(
    start_server: StartServer, fake: FakeUpstream
) -> None:
    server = await start_server(detach_grace_s=0)
    fake.enqueue(TextReply([f"w{n} " for n in range(100)], delay_s=0.05))
    async with httpx.AsyncClient() as http:
        before = await _scrape(http, server)
        async with open_chat(server, "vanishing") as client:
            await client.send(type="message", content="talk")
            await client.receive_until("text_delta")
            await client.ws._stream.aclose()  # vanish: TCP gone, no close frame
        name, labels = "chat_turns_total", {"status": "interrupted"}
        after = await _scrape_until(
            http, server, lambda s: _value(s, name, **labels) > _value(before, name, **labels)
        )
    assert _value(after, name, **labels) - _value(before, name, **labels) == 1


# =========================================================================== systemd notify


async def _notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, abstract: bool = False
) -> trio.socket.SocketType:
    """A real AF_UNIX datagram socket, with NOTIFY_SOCKET pointing at it."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"chat-test-notify-{os.getpid()}-{tmp_path.name}"
        await sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    else:
        path = str(tmp_path / "notify.sock")
        assert len(path) < 100, "AF_UNIX paths are limited to 108 bytes"
        await sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
    return sock


async def _datagram(sock: trio.socket.SocketType) -> str:
    with trio.fail_after(CLIENT_WAIT_S):
        data: bytes = await sock.recv(4096)
    return data.decode()


@pytest.fixture
def _no_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
@pytest.mark.usefixtures("_no_watchdog")
async def test_systemd_ready_once_listening_and_stopping_on_shutdown(
    start_server: StartServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    abstract: bool,
) -> None:
    with await _notify_socket(tmp_path, monkeypatch, abstract=abstract) as sock:
        server = await start_server()
        assert await _datagram(sock) == "READY=1"
        async with httpx.AsyncClient() as http:  # READY=1 means it answers already
            with trio.fail_after(CLIENT_WAIT_S):
                response = await http.get(f"http://127.0.0.1:{server.port}/healthz")
        assert response.status_code == 200
        async with open_chat(server, "notify") as client:
            server.shutdown()
            assert await _datagram(sock) == "STOPPING=1"
            assert await client.closed_code() == 1001


@pytest.mark.parametrize("owner", ["ours", "unset"])
async def test_watchdog_pings_at_half_watchdog_usec(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owner: str
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    if owner == "ours":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    else:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with await _notify_socket(tmp_path, monkeypatch) as sock:
        server = await start_server()
        assert await _datagram(sock) == "READY=1"
        with trio.fail_after(1.0):  # two pings 0.1 s apart
            assert await _datagram(sock) == "WATCHDOG=1"
            assert await _datagram(sock) == "WATCHDOG=1"
        server.shutdown()
        with trio.fail_after(CLIENT_WAIT_S):
            while (state := await _datagram(sock)) == "WATCHDOG=1":
                pass
        assert state == "STOPPING=1"


async def test_no_watchdog_pings_when_watchdog_pid_is_another_process(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    with await _notify_socket(tmp_path, monkeypatch) as sock:
        server = await start_server()
        assert await _datagram(sock) == "READY=1"
        # A negative: three ping intervals of silence.
        with trio.move_on_after(0.3):
            unexpected = await sock.recv(4096)
            pytest.fail(f"got {unexpected!r}")
        server.shutdown()
        assert await _datagram(sock) == "STOPPING=1"


# =========================================================================== TLS




async def test_tls_serves_https_and_a_whole_turn_over_wss_and_refuses_plain_ws(
    start_server: StartServer,
    fake: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="chat")
    cert, key = self_signed_cert(tmp_path)
    server = await start_server(tls_cert=str(cert), tls_key=str(key))
    assert f"listening on https://127.0.0.1:{server.port}" in caplog.text
    context = ssl.create_default_context(cafile=str(cert))

    async with httpx.AsyncClient(verify=context) as http:
        with trio.fail_after(CLIENT_WAIT_S):
            response = await http.get(f"https://127.0.0.1:{server.port}/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}

    fake.enqueue(TextReply(["secure ", "answer"]))
    url = f"wss://127.0.0.1:{server.port}/ws/chat/tls?token={token_for('alice')}"
    async with open_websocket_url(
        url, ssl_context=context, connect_timeout=CLIENT_WAIT_S, disconnect_timeout=CLIENT_WAIT_S
    ) as ws:
        client = ChatClient(ws)
        assert (await client.receive())["type"] == "connected"
        await client.send(type="message", content="over tls")
        frames = await client.turn()
    assert frames[-2]["status"] == "completed" and frames[-2]["full_content"] == "secure answer"

    # Plain HTTP on the TLS port: the server drops it at once, without an HTTP answer.
    upgrade = (
        "GET /ws/chat/tls HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    with trio.fail_after(CLIENT_WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(upgrade.encode())
            received = b""
            while chunk := await stream.receive_some():
                received += chunk
    assert b"HTTP/1.1" not in received
    # A plain ws:// client fails. (trio-websocket only notices the EOF at its
    # connect timeout, hence the short one.)
    plain = f"ws://127.0.0.1:{server.port}/ws/chat/tls?token={token_for('alice')}"
    with trio.fail_after(CLIENT_WAIT_S), pytest.raises((HandshakeError, ConnectionClosed, OSError)):
        async with open_websocket_url(plain, connect_timeout=0.5, disconnect_timeout=0.5) as ws:
            await ws.get_message()


# =========================================================================== logs

USER_CONTENT = "my-private-question-5d1e"
ANSWER_CONTENT = "the-private-answer-9c2b"


async def _turn_then_shutdown(make_config: MakeConfig, fake: FakeUpstream, **overrides: Any) -> str:
    """One completed turn, one failed turn, then a graceful shutdown; the token used."""
    token = token_for("alice")
    fake.enqueue(
        TextReply([ANSWER_CONTENT[:10], ANSWER_CONTENT[10:]]),
        StatusReply(400, {"error": {"message": "bad request", "code": None}}),
    )
    async with trio.open_nursery() as nursery:
        server: ChatServer = await nursery.start(run_server, make_config(**overrides))
        async with open_chat(server, "logged", token=token) as client:
            await client.send(type="message", content=USER_CONTENT)
            assert (await client.turn())[-2]["status"] == "completed"
            await client.send(type="message", content=USER_CONTENT)
            assert (await client.turn())[-2]["status"] == "failed"
        server.shutdown()
    return token


async def test_log_has_one_line_per_event_and_no_secret_or_content_by_default(
    make_config: MakeConfig, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="chat")
    token = await _turn_then_shutdown(make_config, fake)
    messages = [record.getMessage() for record in caplog.records]
    text = "\n".join(messages)

    def count(pattern: str) -> int:
        return sum(1 for message in messages if re.search(pattern, message))

    assert count(r"listening on http://127\.0\.0\.1:\d+") == 1, text
    assert count(r"session logged: user connected") == 1, text
    assert count(r"session logged: turn turn_\w+ completed in \d+\.\d+ s") == 1, text
    assert count(r"session logged: turn turn_\w+ failed in \d+\.\d+ s") == 1, text
    assert count(r"upstream failed \(rejected\)") == 1, text
    assert count(r"session logged: closed with 1000") == 1, text
    for secret in (token, token.rsplit(".", 1)[-1], API_KEY, JWT_SECRET):
        assert secret not in text
    assert USER_CONTENT not in text and ANSWER_CONTENT not in text


async def test_log_content_flag_logs_the_message_and_answer_text(
    make_config: MakeConfig, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    token = await _turn_then_shutdown(make_config, fake, log_content=True)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert USER_CONTENT in text and ANSWER_CONTENT in text
    for secret in (token, API_KEY, JWT_SECRET):
        assert secret not in text


TEXT_LINE_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \S+: ")


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_process_log_is_human_readable_by_default_and_json_lines_on_request(
    fake: FakeUpstream, tmp_path: Path, log_format: str
) -> None:
    env = base_env(
        CHAT_JWT_SECRET=JWT_SECRET,
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_API_KEY=API_KEY,
        CHAT_DB=str(tmp_path / "chat.db"),
    )
    args = ["serve", "--port", "0", "--shutdown-grace", "2"]
    if log_format == "json":
        args += ["--log-format", "json"]
    fake.enqueue(TextReply(["logged ", "answer"]))
    async with server_process(args, env) as proc:
        async with open_chat(proc, "proc-log") as client:  # type: ignore[arg-type]
            await client.send(type="message", content=USER_CONTENT)
            await client.turn()
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit() == 0, proc.stderr_text
    lines = proc.stderr_text.splitlines()
    assert len(lines) >= 4, proc.stderr_text  # listening, connected, turn, closed, stopped
    if log_format == "json":
        entries = [json.loads(line) for line in lines]
        for entry in entries:
            assert {"time", "level", "message"} <= entry.keys(), entry
            datetime.fromisoformat(entry["time"])
        turn_ends = [e for e in entries if re.search(r"turn turn_\w+ completed", e["message"])]
        assert len(turn_ends) == 1 and turn_ends[0]["status"] == "completed"
        assert turn_ends[0]["elapsed_s"] >= 0
    else:
        for line in lines:
            assert TEXT_LINE_RE.match(line), line
            assert not line.startswith("{")
    assert USER_CONTENT not in proc.stderr_text and API_KEY not in proc.stderr_text


class _StuckStream(StringIO):
    """A stream whose writes wait until released, like a stderr nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
        assert self.release.wait(CLIENT_WAIT_S), "never released"
        return super().write(text)


def _logger_to(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


def test_a_stuck_stderr_blocks_no_log_call_and_drops_past_the_bound_are_reported() -> None:
    stream = _StuckStream()
    target = logging.StreamHandler(stream)
    target.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler = NonBlockingLogHandler(target, max_records=3)
    logger = _logger_to(handler, "test.stuck_stderr")
    try:
        logger.info("line %d", 0)
        assert stream.writing.wait(CLIENT_WAIT_S)  # the writer thread is stuck on it
        arguments = [1]
        for n in range(1, 6):  # three wait, two are dropped; none of these calls waits
            logger.info("line %d %s", n, arguments)
        arguments.append(2)  # too late: messages are rendered when logged
        assert stream.getvalue() == ""
    finally:
        stream.release.set()
        handler.close()  # writes what is queued
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == [
        "INFO line 0",
        "WARNING 2 log records dropped: stderr was not keeping up",
        "INFO line 1 [1]",
        "INFO line 2 [1]",
        "INFO line 3 [1]",
    ]


def test_a_stderr_that_never_drains_holds_the_exit_for_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ops, "LOG_DRAIN_TIMEOUT_S", 0.2)
    stream = _StuckStream()
    handler = NonBlockingLogHandler(logging.StreamHandler(stream), max_records=1)
    logger = _logger_to(handler, "test.never_drains")
    try:
        logger.info("stuck")
        assert stream.writing.wait(CLIENT_WAIT_S)
        logger.info("queued")  # the queue is full: the end mark finds no room either
        started = time.monotonic()
        handler.close()
        assert time.monotonic() - started < 2.0  # two waits of 0.2 s, not forever
    finally:
        stream.release.set()
        handler.records.put(None)  # the writer thread, released, ends too
        logger.removeHandler(handler)


def test_a_traceback_logged_through_the_writer_thread_stays_a_json_field() -> None:
    stream = StringIO()
    target = logging.StreamHandler(stream)
    target.setFormatter(JsonLogFormatter())
    handler = NonBlockingLogHandler(target)
    logger = _logger_to(handler, "test.json_traceback")
    try:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            logger.exception("it failed", extra={"turn_id": "t1"})
    finally:
        handler.close()
        logger.removeHandler(handler)
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "it failed" and entry["turn_id"] == "t1"
    assert "ZeroDivisionError" in entry["exception"]


def _fd_table_size() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^FDSize:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]


def test_the_descriptor_table_is_grown_up_front_to_what_max_connections_needs() -> None:
    # Grown later, while threads run, each doubling waits for an RCU grace period
    # inside accept(); the table never shrinks, so one early growth is enough.
    max_connections = _fd_table_size()  # the table is smaller than it will need
    wanted = 2 * max_connections + 1024
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        pytest.skip(f"RLIMIT_NOFILE {soft} is below {wanted}")
    open_before = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    pacing.reserve_descriptor_table(max_connections)
    assert _fd_table_size() >= wanted
    assert sorted(int(fd) for fd in os.listdir("/proc/self/fd")) == open_before


# =========================================================================== backup


def _sqlite(path: Path, query: str) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return connection.execute(query).fetchall()
    finally:
        connection.close()


async def test_backup_while_the_server_writes_is_consistent_and_never_overwrites(
    start_server: StartServer, fake: FakeUpstream, tmp_path: Path
) -> None:
    db, dest = tmp_path / "chat.db", tmp_path / "backup" / "copy.db"
    dest.parent.mkdir()
    server = await start_server(db_path=str(db))
    env = base_env()  # an operator's shell: no secrets needed to copy the database
    fake.enqueue(TextReply(["kept ", "answer"]))
    backed_up = trio.Event()
    turns_during_backup = 0

    async def keep_writing(client: ChatClient) -> None:
        nonlocal turns_during_backup
        n = 0
        while not backed_up.is_set():
            fake.enqueue(TextReply([f"busy {n} "] * 5, delay_s=0.01))
            await client.send(type="message", content=f"busy {n}", id=f"busy-{n}")
            assert (await client.turn())[-2]["status"] == "completed"
            turns_during_backup += 1
            n += 1

    async with open_chat(server, "backed-up") as client:
        await client.send(type="message", content="keep this", id="kept")
        await client.turn()
        async with trio.open_nursery() as writers:
            writers.start_soon(keep_writing, client)
            done = await _cli("backup", str(dest), "--db", str(db), env=env)
            backed_up.set()
    assert done.returncode == 0, done.stderr.decode()
    assert turns_during_backup >= 2  # the server really was writing meanwhile

    assert _sqlite(dest, "PRAGMA integrity_check") == [("ok",)]
    rows = _sqlite(dest, "SELECT role, content, status FROM messages ORDER BY id")
    assert rows[:2] == [("user", "keep this", None), ("assistant", "kept answer", "completed")]
    copied = dest.read_bytes()

    again = await _cli("backup", str(dest), "--db", str(db), env=env)
    assert again.returncode != 0
    assert "exists" in again.stderr.decode()
    assert dest.read_bytes() == copied
