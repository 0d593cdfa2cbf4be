"""chat.upstream_transport: the assumptions it makes about httpx, httpcore and h11 still
hold on the installed versions, its pure parts agree with h11, it turns itself off (and
says so) where it cannot apply, and an answer streams the same with it and without it.

Rules for these tests: loopback only (the fake upstream on 127.0.0.1:0), every test
doing I/O is bounded by ``trio.fail_after``, waits are on events, never on sleeps. A
test here failing after a library upgrade means an assumption in the module docstring
broke: fix the module or pin the library, do not loosen the test.
"""

from __future__ import annotations

import gc
import logging
import re
import ssl
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import h11
import httpcore
import httpx
import pytest
import trio
from h11 import _receivebuffer
from httpcore._backends.trio import TrioStream
from hypothesis import given
from hypothesis import strategies as st

import agent_client
import chat.upstream_transport as transport
from agent_client import (
    AgentClient,
    AgentEvent,
    Completed,
    ResponseRequest,
    TextDelta,
    UpstreamError,
    UpstreamUnavailable,
)
from bench.self_signed import self_signed_cert
from chat.demo_model import encode_sse, text_response_events
from chat.upstream_transport import (
    BURST_PASS_BUDGET_S,
    BURST_READ_BYTES,
    MAX_CHUNK_LINE_BYTES,
    AssumptionBroken,
    BodyFramingError,
    ChunkedBodyDecoder,
    LeanReadTransport,
    _LeanReadBackend,
    _LeanTCPStream,
    _LeanTLSStream,
    _loop_pass_clock,
    body_chunks,
    close_response,
    self_check,
)
from conftest import open_chat
from fake_upstream import (
    FAKE_MODEL,
    RECORDINGS_DIR,
    DropReply,
    FakeUpstream,
    RecordingReply,
    TextReply,
    _Exchange,
)
from server import ChatServer

IO_LIMIT_S = 10
REQUEST = ResponseRequest(input=[{"role": "user", "content": "hi"}], instructions="")
RECORDINGS = sorted(RECORDINGS_DIR.glob("*.sse"))


async def _events(agent: AgentClient) -> list[AgentEvent]:
    with trio.fail_after(IO_LIMIT_S):
        async with agent.stream(REQUEST) as events:
            return [event async for event in events]


def _upstream_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "chat.upstream" and r.levelno == logging.WARNING
    ]


# --- the assumptions, on the installed libraries ---------------------------------------


def test_the_self_check_passes_on_the_installed_libraries() -> None:
    self_check()  # raises AssumptionBroken naming what failed


@pytest.mark.parametrize("name", ["httpx", "httpcore", "h11"])
def test_the_installed_libraries_are_the_tested_series(name: str) -> None:
    module = {"httpx": httpx, "httpcore": httpcore, "h11": h11}[name]
    version = str(getattr(module, "__version__", ""))
    assert version.split(".")[:2] == transport.TESTED_SERIES[name].split("."), version


def test_httpx_keeps_its_pool_in_the_private_attribute_we_replace() -> None:
    tls = httpx.create_ssl_context()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=4)
    assert isinstance(httpx.AsyncHTTPTransport(verify=tls)._pool, httpcore.AsyncConnectionPool)
    lean = LeanReadTransport(tls, limits)
    assert isinstance(lean._pool, httpcore.AsyncConnectionPool)
    assert isinstance(lean._pool._network_backend, _LeanReadBackend)


def test_h11_ends_a_response_head_where_we_cut_it() -> None:
    # The rule is h11's private regex; ours must be the same one.
    assert _receivebuffer.blank_line_regex.pattern == transport._HEAD_END_RE.pattern


def test_the_self_check_fails_on_a_series_it_was_not_tested_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(transport.TESTED_SERIES, "httpcore", "9.9")
    with pytest.raises(AssumptionBroken, match="httpcore"):
        self_check()


def test_the_self_check_fails_when_h11_reads_past_the_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if our rule and h11's differed: a head cut one byte late leaves h11 a body byte.
    monkeypatch.setattr(transport, "_HEAD_END_RE", re.compile(rb"\n\r?\n."))
    with pytest.raises(AssumptionBroken):
        self_check()


class _ScriptedStream(httpcore.AsyncNetworkStream):
    """An httpcore stream that reads a script, one piece per read."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = deque(pieces)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        await trio.lowlevel.checkpoint()
        return self._pieces.popleft() if self._pieces else b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    def get_extra_info(self, info: str) -> Any:
        return _NoSocket() if info == "socket" else None


class _NoSocket:
    def fileno(self) -> int:
        return -1  # reads go to the inner stream, as after a close


# An informational head, then the final one with bare-LF line ends (h11 takes both).
HEADS = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\ncontent-type: text/event-stream\ntransfer-encoding: chunked\n\n"
)
BODY = b"5\r\nhello\r\n0\r\n\r\n"


@given(st.lists(st.integers(min_value=1, max_value=len(HEADS + BODY) - 1), max_size=10))
def test_the_body_is_handed_over_whole_however_the_response_is_cut(cuts: list[int]) -> None:
    # h11 is the oracle: once it has the final head it must hold no byte of the body,
    # and take_body plus the reads after it must give exactly the body.
    raw = HEADS + BODY
    points = [0, *sorted(set(cuts)), len(raw)]

    async def exchange() -> None:
        stream = _LeanTCPStream(_ScriptedStream([raw[a:b] for a, b in pairwise(points)]))
        await stream.write(b"POST / HTTP/1.1\r\n...")  # a request: its response head is next
        h11_client = h11.Connection(h11.CLIENT)
        h11_client.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
        while not isinstance(event := h11_client.next_event(), h11.Response):
            if event is h11.NEED_DATA:
                h11_client.receive_data(await stream.read(65536))
        assert h11_client.trailing_data == (b"", False)
        body = stream.take_body()
        while more := await stream.read(65536):
            body += more
        assert body == BODY

    trio.run(exchange)


@pytest.fixture(params=["http", "https"])
async def upstream(
    request: pytest.FixtureRequest,
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> FakeUpstream:
    """The fake upstream, keeping connections alive, over plain HTTP and over HTTPS
    (``indirect`` parametrizing picks one). On HTTPS its certificate is trusted as in
    production: through SSL_CERT_FILE, read when an AgentClient (or httpx context) is
    made."""
    context = None
    if request.param == "https":
        cert, key = self_signed_cert(tmp_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    served: FakeUpstream = await nursery.start(
        FakeUpstream(keep_alive=True, ssl_context=context).serve
    )
    assert served.base_url.startswith(f"{request.param}://127.0.0.1:")
    return served


async def test_httpcore_reads_our_connection_untimed_hands_the_body_over_and_pools_it(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # httpcore must (a) give our stream as the network_stream extension, (b) read it
    # with timeout=None when httpx's read timeout is None (so no read goes through
    # httpcore's own read path, nor, over TLS, through trio's SSLStream), (c) let h11
    # see no body data, and (d) read the end of the message we gave back, so the
    # connection serves the next request.
    ours = _LeanTLSStream if upstream.base_url.startswith("https:") else _LeanTCPStream
    upstream.enqueue(TextReply(["Hel", "lo"], response_id="resp_t"), TextReply(["again"]))
    inner_reads = 0
    body_through_h11 = 0
    trio_read = TrioStream.read
    next_event = h11.Connection.next_event

    async def counting_read(self: TrioStream, *args: Any, **kwargs: Any) -> bytes:
        nonlocal inner_reads
        inner_reads += 1
        return await trio_read(self, *args, **kwargs)

    def counting_event(self: h11.Connection) -> Any:
        nonlocal body_through_h11
        event = next_event(self)
        body_through_h11 += self.our_role is h11.CLIENT and isinstance(event, h11.Data)
        return event

    monkeypatch.setattr(TrioStream, "read", counting_read)
    monkeypatch.setattr(h11.Connection, "next_event", counting_event)
    tls = httpx.create_ssl_context()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=4)
    async with httpx.AsyncClient(
        mounts={"all://": LeanReadTransport(tls, limits)},
        timeout=httpx.Timeout(IO_LIMIT_S, read=None),
    ) as client:
        bodies: list[bytes] = []
        with trio.fail_after(IO_LIMIT_S):
            for _ in range(2):
                request = client.build_request("POST", f"{upstream.base_url}/responses", json={})
                response = await client.send(request, stream=True)
                stream = response.extensions["network_stream"]
                assert isinstance(stream, ours)
                if ours is _LeanTLSStream:
                    tls_version = stream.get_extra_info("ssl_object").version()
                    assert tls_version in ("TLSv1.2", "TLSv1.3")
                bodies.append(b"".join([chunk async for chunk in body_chunks(response)]))
                assert response.is_closed  # read to its end through httpcore
    assert body_through_h11 == 0
    assert inner_reads == 0
    sent = text_response_events("resp_t", FAKE_MODEL, ["Hel", "lo"])
    assert bodies[0] == b"".join(encode_sse(event) for event in sent)
    assert upstream.connections_accepted == 1


# --- where it applies, and saying so ------------------------------------------------------


def test_lean_reads_apply_to_a_plain_http_upstream_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="chat.upstream")
    agent = AgentClient(base_url="http://127.0.0.1:9/v1", api_key=None, model="m")
    assert agent.lean_reads_active
    assert _upstream_warnings(caplog) == []


def test_lean_reads_apply_to_an_https_upstream_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="chat.upstream")
    agent = AgentClient(base_url="https://api.example.invalid/v1", api_key=None, model="m")
    assert agent.lean_reads_active
    assert _upstream_warnings(caplog) == []


def test_a_proxied_upstream_is_never_lean_and_says_so_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # httpx tunnels through the proxy with its own transport; ours would not be used.
    caplog.set_level(logging.WARNING, logger="chat.upstream")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    agent = AgentClient(base_url="https://api.example.invalid/v1", api_key=None, model="m")
    assert not agent.lean_reads_active
    (warning,) = _upstream_warnings(caplog)
    assert "proxy" in warning


def test_switched_off_lean_reads_are_off_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="chat.upstream")
    agent = AgentClient(base_url="http://127.0.0.1:9/v1", api_key=None, model="m", lean_reads=False)
    assert not agent.lean_reads_active
    assert _upstream_warnings(caplog) == []


async def test_a_failed_self_check_turns_lean_reads_off_says_why_once_and_streams(
    fake: FakeUpstream, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="chat.upstream")
    monkeypatch.setitem(transport.TESTED_SERIES, "h11", "0.1")
    agent = AgentClient(base_url=fake.base_url, api_key=None, model="m")
    try:
        assert not agent.lean_reads_active
        fake.enqueue(TextReply(["plain ", "httpx"]), TextReply(["still ", "plain"]))
        for expected in ("plain httpx", "still plain"):
            events = await _events(agent)
            assert _text(events) == expected and isinstance(events[-1], Completed)
    finally:
        await agent.aclose()
    (warning,) = _upstream_warnings(caplog)
    assert "h11" in warning


async def test_switched_off_the_client_uses_nothing_of_the_module(
    fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("chat.upstream_transport used with lean_reads=False")

    for name in ("body_chunks", "close_response", "lean_read_transport"):
        monkeypatch.setattr(agent_client, name, refuse)
    monkeypatch.setattr(_LeanReadBackend, "connect_tcp", refuse)
    agent = AgentClient(base_url=fake.base_url, api_key=None, model="m", lean_reads=False)
    try:
        fake.enqueue(TextReply(["plain"]))
        assert _text(await _events(agent)) == "plain"
    finally:
        await agent.aclose()


# --- the same answer either way -------------------------------------------------------------


def _text(events: list[AgentEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def _normalised(events: list[AgentEvent]) -> list[AgentEvent]:
    """Adjacent text deltas joined: how deltas group depends on how reads fall."""
    out: list[AgentEvent] = []
    for event in events:
        if isinstance(event, TextDelta) and out and isinstance(out[-1], TextDelta):
            out[-1] = TextDelta(out[-1].text + event.text)
        else:
            out.append(event)
    return out


@pytest.fixture
async def both_clients(
    upstream: FakeUpstream,
) -> AsyncIterator[tuple[AgentClient, AgentClient]]:
    lean = AgentClient(base_url=upstream.base_url, api_key=None, model="m")
    plain = AgentClient(base_url=upstream.base_url, api_key=None, model="m", lean_reads=False)
    assert lean.lean_reads_active and not plain.lean_reads_active
    yield lean, plain
    await lean.aclose()
    await plain.aclose()


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.stem)
async def test_a_recording_streams_the_same_with_lean_reads_and_without(
    upstream: FakeUpstream, both_clients: tuple[AgentClient, AgentClient], path: Path
) -> None:
    lean, plain = both_clients
    upstream.enqueue(RecordingReply(path), RecordingReply(path))
    with_lean = await _events(lean)
    assert _normalised(with_lean) == _normalised(await _events(plain))
    assert isinstance(with_lean[-1], Completed) or path.stem.startswith(("06", "07"))


@dataclass
class _BurstReply:
    """A text answer whose events all go out in one write: the upstream far ahead."""

    words: list[str]

    async def play(self, out: _Exchange) -> None:
        events = text_response_events("resp_burst", FAKE_MODEL, self.words)
        await out.start(200, {"content-type": "text/event-stream"})
        await out.send(b"".join(encode_sse(event) for event in events))
        await out.end()


async def test_a_long_burst_streams_the_same_with_lean_reads_and_without(
    upstream: FakeUpstream, both_clients: tuple[AgentClient, AgentClient]
) -> None:
    # About 1 MB: many reads of either path (16 KB lean, 64 KB through httpx); over TLS,
    # records of up to 16 KB, several per read.
    words = [f"word{n} " for n in range(5_000)]
    lean, plain = both_clients
    upstream.enqueue(_BurstReply(words), _BurstReply(words))
    with_lean = await _events(lean)
    assert _text(with_lean) == "".join(words)
    assert _normalised(with_lean) == _normalised(await _events(plain))


# --- the chunked decoder: pure, against h11 ------------------------------------------------


def _chunked_by_h11(
    pieces: list[bytes], trailers: list[tuple[bytes, bytes]]
) -> tuple[bytes, bytes]:
    """(the data chunks, the message end) of a chunked body as h11 writes it."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert isinstance(server.next_event(), h11.Request)
    server.send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]))
    data = b"".join(server.send(h11.Data(data=piece)) or b"" for piece in pieces)
    return data, server.send(h11.EndOfMessage(headers=trailers)) or b""


@given(
    st.lists(st.binary(min_size=1, max_size=40), max_size=8),
    st.lists(st.integers(min_value=0, max_value=500), max_size=12),
)
def test_chunked_decoder_agrees_with_h11_however_the_bytes_are_cut(
    pieces: list[bytes], cuts: list[int]
) -> None:
    chunks, end = _chunked_by_h11(pieces, [(b"x-trailer", b"1")])
    body = chunks + end + b"NEXT"
    decoder = ChunkedBodyDecoder()
    points = [0, *sorted(c for c in cuts if c < len(body)), len(body)]
    payload = b"".join(decoder.feed(body[a:b]) for a, b in pairwise(points))
    assert payload == b"".join(pieces)
    assert decoder.done
    assert decoder.rest == end + b"NEXT"  # for h11 to read: the last chunk on


def test_chunked_decoder_reads_extensions_and_any_case_of_hex() -> None:
    decoder = ChunkedBodyDecoder()
    assert decoder.feed(b"5;name=value\r\nhello\r\nA \r\n0123456789\r\n") == b"hello0123456789"
    assert not decoder.done
    assert decoder.feed(b"0;last\r\n\r\n") == b""
    assert decoder.done and decoder.rest == b"0;last\r\n\r\n"


def test_chunked_decoder_passes_data_on_before_the_chunk_is_whole() -> None:
    decoder = ChunkedBodyDecoder()
    assert decoder.feed(b"a\r\nabc") == b"abc"
    assert decoder.feed(b"defghij\r") == b"defghij"
    assert decoder.feed(b"\n3\r\nxyz\r\n") == b"xyz"


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\n",  # not hex
        b"-5\r\nhello\r\n",  # signs, prefixes and spaces int() would take
        b"0x5\r\nhello\r\n",
        b" 5\r\nhello\r\n",
        b"\r\n",  # no size at all
        b"11111111111111111\r\n",  # past 16 hex digits
        b"5\r\nhelloXY",  # chunk data not followed by CRLF
        b"1" * (MAX_CHUNK_LINE_BYTES + 1),  # a size line that never ends
    ],
)
def test_chunked_decoder_rejects_broken_framing(body: bytes) -> None:
    decoder = ChunkedBodyDecoder()
    with pytest.raises(BodyFramingError):
        decoder.feed(body)
        decoder.feed(b"")  # the payload before the error came first


def test_chunked_decoder_returns_the_payload_before_broken_framing_first() -> None:
    decoder = ChunkedBodyDecoder()
    assert decoder.feed(b"3\r\nabc\r\nzz\r\n") == b"abc"
    assert decoder.failed
    with pytest.raises(BodyFramingError):
        decoder.feed(b"")


# --- burst reads and the loop-pass clock --------------------------------------------------


async def test_loop_pass_clock_is_one_per_run_and_restarts_at_every_io_poll() -> None:
    # Bursting reads give way once a loop pass is older than BURST_PASS_BUDGET_S.
    clock = _loop_pass_clock()
    assert _loop_pass_clock() is clock
    busy_until = time.perf_counter() + 2 * BURST_PASS_BUDGET_S
    while time.perf_counter() < busy_until:  # a long pass: this task computing
        pass
    assert clock.age_s() > BURST_PASS_BUDGET_S
    await trio.lowlevel.checkpoint()  # the next pass starts with an I/O poll
    assert clock.age_s() < BURST_PASS_BUDGET_S


async def test_a_burst_read_waiting_for_the_next_pass_keeps_its_data_when_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(IO_LIMIT_S):
        stream = _LeanTCPStream(await httpcore.TrioBackend().connect_tcp("127.0.0.1", port))
        peer = await listeners[0].accept()
    async with peer, listeners[0]:
        burst = bytes(range(256)) * (BURST_READ_BYTES // 256 + 1)
        await peer.send_all(burst)
        monkeypatch.setattr(transport, "BURST_PASS_BUDGET_S", -1.0)  # every pass too old
        with trio.move_on_after(0.05) as waited:
            await stream.read(len(burst))
        assert waited.cancelled_caught
        monkeypatch.setattr(transport, "BURST_PASS_BUDGET_S", BURST_PASS_BUDGET_S)
        with trio.fail_after(IO_LIMIT_S):
            assert await stream.read(len(burst)) == burst
        await stream.aclose()


# --- closing a response ----------------------------------------------------------------------


@pytest.mark.parametrize("broken_by_us", [True, False], ids=["close_response", "aclose"])
async def test_a_closed_response_is_freed_by_reference_counting_only_when_we_break_the_cycle(
    fake: FakeUpstream, broken_by_us: bool
) -> None:
    # httpx keeps a cycle between a response and its body stream (through the public
    # Response.stream): close_response must break it, and it must still be there to
    # break (otherwise the module carries code for nothing).
    fake.enqueue(TextReply(["cycle"]))
    gc.disable()
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(IO_LIMIT_S, read=None)) as client:
            with trio.fail_after(IO_LIMIT_S):
                request = client.build_request("POST", f"{fake.base_url}/responses", json={})
                response = await client.send(request, stream=True)
                async for _ in response.aiter_raw():
                    pass
                if broken_by_us:
                    await close_response(response)
                else:
                    await response.aclose()
            freed = weakref.ref(response)
            del response
            assert (freed() is None) is broken_by_us
    finally:
        gc.enable()


# --- TLS: the stdlib's SSLSocket under the same read path ----------------------------------


HTTPS = pytest.mark.parametrize("upstream", ["https"], indirect=True)


@HTTPS
async def test_a_tls_body_cut_short_fails_as_over_plain_httpx(
    upstream: FakeUpstream, both_clients: tuple[AgentClient, AgentClient]
) -> None:
    # The fake closes the TCP connection without close_notify inside the chunked body:
    # a ragged EOF, read as EOF (https_compatible), which the framing shows as truncated.
    outcomes: list[tuple[str, str]] = []
    for agent in both_clients:
        upstream.enqueue(DropReply(["partial"]))
        seen: list[AgentEvent] = []
        with pytest.raises(UpstreamError) as caught, trio.fail_after(IO_LIMIT_S):
            async with agent.stream(REQUEST) as events:
                async for event in events:
                    seen.append(event)
        outcomes.append((caught.value.kind, _text(seen)))
    assert outcomes == [("connect", "partial")] * 2


@HTTPS
async def test_an_untrusted_certificate_is_refused_and_leaks_no_socket(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE")  # the system's CAs only: the fake's is unknown
    made: list[_LeanTLSStream] = []
    make = _LeanTLSStream.__init__

    def recording_init(self: _LeanTLSStream, tls: ssl.SSLSocket) -> None:
        make(self, tls)
        made.append(self)

    monkeypatch.setattr(_LeanTLSStream, "__init__", recording_init)
    agent = AgentClient(base_url=upstream.base_url, api_key=None, model="m", max_attempts=1)
    assert agent.lean_reads_active
    try:
        with pytest.raises(UpstreamUnavailable) as caught:
            await _events(agent)
    finally:
        await agent.aclose()
    assert caught.value.kind == "connect"
    assert len(made) == 1
    assert made[0].get_extra_info("socket").fileno() == -1  # closed by the failed handshake
    assert upstream.requests == []


async def test_a_timed_tls_read_times_out_as_httpcore_says(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0]:
        with trio.fail_after(IO_LIMIT_S):
            tcp = await _LeanReadBackend().connect_tcp("127.0.0.1", port)
            peer = trio.SSLStream(await listeners[0].accept(), server_context, server_side=True)
            async with trio.open_nursery() as both:
                both.start_soon(peer.do_handshake)
                context = ssl.create_default_context(cafile=str(cert))
                ours = await tcp.start_tls(context, "127.0.0.1", timeout=IO_LIMIT_S)
            assert isinstance(ours, _LeanTLSStream)
            await peer.send_all(b"early")
            assert await ours.read(100, timeout=IO_LIMIT_S) == b"early"
            with pytest.raises(httpcore.ReadTimeout):
                await ours.read(100, timeout=0.05)
            await ours.write(b"ping", timeout=IO_LIMIT_S)
            assert await peer.receive_some(100) == b"ping"
            assert not ours.get_extra_info("is_readable")
            await ours.aclose()
            with pytest.raises(trio.BrokenResourceError):  # closed without close_notify
                await peer.receive_some(100)


async def test_a_silent_tls_peer_times_the_handshake_out_and_closes_the_socket(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    cert, _ = self_signed_cert(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))
    async with listeners[0]:
        with trio.fail_after(IO_LIMIT_S):
            tcp = await _LeanReadBackend().connect_tcp("127.0.0.1", port)
            async with await listeners[0].accept() as peer:
                with pytest.raises(httpcore.ConnectTimeout):
                    await tcp.start_tls(context, "127.0.0.1", timeout=0.05)
                # Our side is closed: the peer reads the ClientHello, then EOF.
                while await peer.receive_some(65536):
                    pass


@HTTPS
async def test_stop_closes_an_https_upstream_within_100ms(
    upstream: FakeUpstream, start_server: Callable[..., Awaitable[ChatServer]]
) -> None:
    # The whole server over an HTTPS upstream: the answer streams, stop cancels the
    # turn's scope, and the lean TLS connection closes with it.
    server = await start_server(upstream_url=upstream.base_url)
    assert server.agent.lean_reads_active == server.config.fast_paths
    upstream.enqueue(TextReply([f"w{n} " for n in range(200)], delay_s=0.05))
    async with open_chat(server) as client:
        await client.send(type="message", content="talk a lot")
        await client.receive_until("text_delta")
        await client.receive_until("text_delta")
        stopped_at = trio.current_time()
        await client.send(type="stop")
        end = (await client.receive_until("response_end"))[-1]
        exchange = upstream.requests[0]
        with trio.fail_after(2):
            await exchange.closed.wait()
    assert exchange.client_closed_at is not None
    assert exchange.client_closed_at - stopped_at < 0.1
    assert end["status"] == "stopped"
    assert end["full_content"].startswith("w0 w1 ")
