"""Start-up: what the server leaves off the path to listening, and what it loads right
after (docs/operations.md, "Size and start time").

Not timed: on a shared 2-core machine a bound on seconds is either loose enough to
always pass or flaky. These check the causes instead, each in a fresh interpreter
where it matters (this one imported everything long ago): `import server` imports none
of the heavy modules that nothing needs before the first request and builds no frame
validator; `warm_up` loads all of them; the upstream's trust store, read in a thread,
ends up as httpx's own and fails closed. `build/measure-start.py` measures the time.
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import certifi
import httpx
import pydantic
import pytest
import trio
from server_process import PROJECT_DIR

import protocol
import server
from bench.self_signed import self_signed_cert
from chat.settings import Config
from chat.upstream_tls import client_context, load_trust_stores

# Imported when first needed (or by server.warm_up right after listening), never by
# `import server`; each was measured on the start path (docs/operations.md).
DEFERRED_MODULES = {
    "jwt": "PyJWT (chat.auth): the first token read or made",
    "cryptography": "imported by PyJWT for RS256/ES256, the largest import of all",
    "trio_websocket": "the first WebSocket upgrade (server._handle_websocket)",
    "wsproto": "likewise, under trio-websocket",
    "chat.connection": "likewise (and the Sessions API's JSON export)",
    "chat.session": "likewise",
    "chat.demo_model": "only the offline demo model (server.build_agent)",
    "importlib.metadata": "pydantic's plugin lookup, with the first validator built",
}
FRESH_INTERPRETER_TIMEOUT_S = 60.0


def _in_fresh_interpreter(code: str) -> Any:
    """Run `code` in a new interpreter in the project folder; it prints one JSON value."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=FRESH_INTERPRETER_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


_STATE = """
import json, sys
import protocol
from chat import settings
models = [*protocol._FRAME_MODELS, settings._ToolSpec]
print(json.dumps({
    "modules": sorted(sys.modules),
    "validators_built": [m.__name__ for m in models if m.__pydantic_complete__],
    "adapters_built": [
        a.pydantic_complete
        for a in (protocol._client_frame_adapter, protocol._server_frame_adapter)
    ],
}))
"""


def test_importing_server_leaves_the_first_requests_modules_unimported() -> None:
    state = _in_fresh_interpreter("import server\n" + _STATE)
    imported = set(state["modules"])
    assert "server" in imported and "trio" in imported  # it did import the server
    early = {name: why for name, why in DEFERRED_MODULES.items() if name in imported}
    assert not early, f"imported before the first request: {early}"


def test_importing_server_builds_no_frame_validator() -> None:
    state = _in_fresh_interpreter("import server\n" + _STATE)
    assert state["validators_built"] == []
    assert state["adapters_built"] == [False, False]


def test_warm_up_loads_everything_the_start_left_for_the_first_request() -> None:
    warm_up = "import server, trio\ntrio.run(server.warm_up, server.Config())\n"
    state = _in_fresh_interpreter(warm_up + _STATE)
    imported = set(state["modules"])
    still_missing = set(DEFERRED_MODULES) - {"chat.demo_model"} - imported
    assert not still_missing
    # ToolSpec is built when a tools file is read, not by the warm-up.
    assert "_ToolSpec" not in state["validators_built"]
    assert len(state["validators_built"]) == len(protocol._FRAME_MODELS)
    assert state["adapters_built"] == [True, True]


def test_every_frame_model_is_warmed_up() -> None:
    # A frame type added to protocol.py and not to _FRAME_MODELS would be built on first
    # use instead of by the warm-up.
    models = {
        value
        for value in vars(protocol).values()
        if isinstance(value, type)
        and issubclass(value, pydantic.BaseModel)
        and value.__module__ == "protocol"
        and not value.__name__.startswith("_")
    }
    assert models == set(protocol._FRAME_MODELS)


def _settled(context: ssl.SSLContext) -> ssl.SSLContext:
    """`context` once its trust store has loaded: beginning a connection waits for that."""
    context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="example.com")
    return context


def _settings(context: ssl.SSLContext) -> dict[str, Any]:
    return {
        "protocol": context.protocol,
        "verify_mode": context.verify_mode,
        "check_hostname": context.check_hostname,
        "verify_flags": context.verify_flags,
        "options": context.options,
        "minimum_version": context.minimum_version,
        "maximum_version": context.maximum_version,
        "ciphers": [cipher["name"] for cipher in context.get_ciphers()],
        "cert_store_stats": context.cert_store_stats(),
        "ca_certs": context.get_ca_certs(),
    }


@pytest.mark.parametrize("source", ["certifi", "SSL_CERT_FILE", "SSL_CERT_DIR"])
def test_the_upstream_trust_store_is_httpx_s_own(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    if source == "SSL_CERT_FILE":
        cert, _ = self_signed_cert(tmp_path)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    elif source == "SSL_CERT_DIR":
        monkeypatch.setenv("SSL_CERT_DIR", str(Path(certifi.where()).parent))
    ours = _settings(_settled(client_context()))
    assert ours == _settings(httpx.create_ssl_context())
    if source != "SSL_CERT_DIR":  # a directory is read lazily, per certificate looked up
        assert ours["cert_store_stats"]["x509_ca"] > 0


def test_the_ca_bundle_is_read_when_asked_not_when_the_context_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    context = client_context()
    assert context.cert_store_stats()["x509_ca"] == 0
    load_trust_stores()
    assert context.cert_store_stats()["x509_ca"] > 0


@pytest.mark.parametrize(
    ("upstream_url", "read"),
    [("https://api.example.com/v1", True), ("http://127.0.0.1:9/v1", False)],
)
async def test_warm_up_reads_the_ca_bundle_for_an_https_upstream_only(
    upstream_url: str, read: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    context = client_context()
    with trio.fail_after(FRESH_INTERPRETER_TIMEOUT_S):
        await server.warm_up(Config(upstream_url=upstream_url, api_key="sk-test"))
    assert (context.cert_store_stats()["x509_ca"] > 0) == read


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> None:
    """A TLS handshake in memory, no sockets. Raises what the client's side raises."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    from_client, from_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(to_client, to_server, server_hostname="127.0.0.1")
    server_side = server.wrap_bio(from_client, from_server, server_side=True)
    for _ in range(10):
        try:
            client_side.do_handshake()
            return
        except ssl.SSLWantReadError:
            pass
        from_client.write(to_server.read())
        try:
            server_side.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        to_client.write(from_server.read())
    raise AssertionError("the handshake did not finish")


def test_an_unreadable_ca_bundle_is_logged_and_trusts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = self_signed_cert(tmp_path)
    upstream = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    upstream.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    _handshake(client_context(), upstream)  # trusted: the control

    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(FileNotFoundError):
        httpx.create_ssl_context()  # httpx's own context failed the start
    with caplog.at_level(logging.ERROR, logger="chat.upstream_tls"):
        context = _settled(client_context())
    assert "cannot read the upstream's CA bundle" in caplog.text
    assert context.cert_store_stats()["x509_ca"] == 0
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(context, upstream)
