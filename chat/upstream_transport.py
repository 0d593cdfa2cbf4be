"""Upstream reads beneath httpx: the only code that relies on httpx's, httpcore's and
h11's private or undocumented behaviour, kept because the benchmark shows it pays.

What it owns: ``LeanReadTransport`` (httpx's own transport over a pool whose
connections, ``_LeanReadStream``, read cheaply and hand a response body over: plain
TCP with one ``os.read``, TLS with one ``ssl.SSLSocket.recv``), ``body_chunks`` (a
chunked body read off such a connection and decoded here, ``ChunkedBodyDecoder``,
instead of through httpx, httpcore and h11), ``close_response`` (closes a response
and breaks httpx's response/body-stream reference cycle), and ``lean_read_transport``,
which decides whether any of the read path applies.

What it buys (bench/README.md; 2-core VM, Python 3.11; plain-HTTP upstream but for TLS):

* Reads without httpcore's and trio's per-read layers (a cancel scope, three
  exception mappers, a recv tried before every wait): part of session 2's hot-path
  rework, CPU per 1,000 relayed deltas 0.334 -> 0.188 s in all (not measured alone).
* The body decoded here (session 3, commit acd7460): Python calls per paced delta
  242 -> 146; CPU per 1,000 deltas, back to back, 0.236 / 0.249 s through httpx
  against 0.188 / 0.165 s with it.
* Bursts read 16 KB at a time (64 KB: unpaced loop stall 47 ms; 16 KB: 22-27 ms), and
  given way to the next loop pass once a pass has run 5 ms (``_LoopPassClock``,
  commit 1b31251): unpaced stall 22-27 -> 11-16 ms, for 15 % less unpaced throughput.
* No cyclic garbage per turn (session 1): with full collections made rare, a cycle
  per response would otherwise hold its memory until the next full collection.
* TLS (``_LeanTLSStream``, session 6): the stdlib's ``ssl.SSLSocket`` on the
  non-blocking socket, so OpenSSL reads the socket itself and a record costs one C
  call, instead of trio's ``SSLStream`` (a state machine in Python around an
  ``ssl.MemoryBIO``) under httpcore's read layers and httpx's body path. With an
  HTTPS upstream the server spent 2.05-2.14 times the CPU per relayed delta of a
  plain-HTTP one, measured side by side (``make bench``, phase tls); now 1.02-1.07
  (Python calls per delta 331 -> 168; plain TCP: 150).

What it relies on, tested with httpx 0.28.1, httpcore 1.0.9 and h11 0.16.0. At startup
(each ``AgentClient``) ``self_check`` refuses other series (``TESTED_SERIES``) and checks
3 without a connection, and ``LeanReadTransport`` checks 1; tests/test_upstream_transport.py
checks all five over loopback sockets (plain and TLS) and fails when one stops holding:

1. httpx: ``AsyncHTTPTransport`` keeps its httpcore pool in the private attribute
   ``_pool``, an ``httpcore.AsyncConnectionPool``; it is rebuilt here with the same
   settings and our network backend (httpx takes no backend).
2. httpcore (undocumented behaviour of its HTTP/1.1 connection): it writes a request
   before reading its response, reads only while h11 needs data, passes
   ``timeout=None`` to reads when httpx's read timeout is None, gives our stream as
   the ``network_stream`` response extension, and reads the end of the message
   through h11 when the body is read after we gave that end back.
3. h11: a head ends at the first ``\\n\\r?\\n`` (its private ``blank_line_regex``), and
   once it has produced the final ``Response`` from bytes that stop there it holds no
   byte of the body (``trailing_data`` is empty); handed the last chunk and trailers
   back, it produces ``EndOfMessage`` and the connection goes back to the pool.
4. httpx's response/body-stream cycle runs through the public ``Response.stream``;
   replacing it on a closed response breaks the cycle (harmless if it stops holding).
5. httpcore (its public network-stream interface, as its own trio backend uses it):
   for an https URL it calls ``start_tls`` on the stream ``connect_tcp`` returned and
   then uses only the stream ``start_tls`` returns, asking it for ``ssl_object`` (ALPN)
   and ``is_readable`` (a pooled connection closed by the server); the plain stream's
   ``socket`` extra is a trio socket, whose ``detach`` hands the descriptor over.

Where it applies: ``AgentClient(lean_reads=True)`` (the default) closes every response
with ``close_response``; the read path (``lean_read_transport``) applies to an HTTP or
HTTPS upstream reached without a proxy (httpx then tunnels through the proxy with its
own transport), and only when ``self_check`` passes. Otherwise the reads are plain
httpx's, and one WARNING (logger ``chat.upstream``) says why. ``lean_reads=False`` uses
none of this module.
"""

from __future__ import annotations

import logging
import os
import re
import select
import socket as stdlib_socket
import ssl
import time
import urllib.request
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar, cast

import h11
import httpcore
import httpx
import trio

logger = logging.getLogger("chat.upstream")

# The library series the assumptions above were checked against (major.minor).
TESTED_SERIES = {"httpx": "0.28", "httpcore": "1.0", "h11": "0.16"}
# A burst (the upstream far ahead of us) is read 16 KB at a time, each read its own
# schedule point: one connection's step stays short while others wait (bench/README.md).
LEAN_READ_BYTES = 16 * 1024
# ...and once a pass of the event loop has run this long, a read of a burst (this much
# or more) waits for the next pass before it returns: the loop polls I/O again, and
# sessions with a delta or two go first.
BURST_PASS_BUDGET_S = 0.005
BURST_READ_BYTES = 4 * 1024
# A chunk-size line is a hex number and perhaps extensions; h11 allows 16 KB for it.
MAX_CHUNK_LINE_BYTES = 16 * 1024

_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")
# Where a response head ends: h11's own pattern (a line may end in LF alone).
_HEAD_END_RE = re.compile(b"\n\r?\n")


class AssumptionBroken(Exception):
    """An assumption of this module does not hold for the installed libraries."""


class BodyFramingError(Exception):
    """The upstream's body is not valid chunked coding."""


# --- deciding whether the read path applies --------------------------------------


def lean_read_transport(
    url: str, tls: ssl.SSLContext, limits: httpx.Limits
) -> LeanReadTransport | None:
    """The lean transport for requests to ``url``, or None when it cannot apply: the
    upstream is neither HTTP nor HTTPS, a proxy from the environment carries the
    requests, or ``self_check`` fails. None is logged once, as a WARNING naming the
    reason."""
    target = httpx.URL(url)
    reason: str | None = None
    if target.scheme not in ("http", "https"):
        reason = f"the upstream is {target.scheme}, and lean reads are for HTTP and HTTPS"
    elif _proxied(target):
        reason = "a proxy from the environment carries the upstream requests"
    else:
        try:
            self_check()
            return LeanReadTransport(tls, limits)
        except AssumptionBroken as broken:
            reason = f"an assumption about the installed libraries failed: {broken}"
    logger.warning("lean upstream reads do not apply (%s); reading through httpx", reason)
    return None


def _proxied(target: httpx.URL) -> bool:
    """Whether the environment names a proxy for ``target`` (httpx honours these)."""
    proxies = urllib.request.getproxies()
    if not (proxies.get(target.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(target.host)


def self_check() -> None:
    """Check the assumptions that can be checked without a connection (see the module
    docstring): the library series, h11's reading of a response head and of the
    message end handed back to it, and that a trio socket can hand over its
    descriptor. Raises AssumptionBroken naming the first that fails."""
    versions = {
        "httpx": httpx.__version__,
        "httpcore": httpcore.__version__,
        "h11": str(getattr(h11, "__version__", "unknown")),  # set, though not in __all__
    }
    for name, series in TESTED_SERIES.items():
        if versions[name].split(".")[:2] != series.split("."):
            raise AssumptionBroken(f"{name} {versions[name]} is not the tested {series}.x")
    for heads in (_PROBE_HEADS, _PROBE_HEADS.replace(b"\r\n", b"\n")):
        _check_h11_hand_over(heads)
    if not callable(getattr(trio.socket.SocketType, "detach", None)):
        raise AssumptionBroken("trio's sockets cannot hand their descriptor over (detach)")


# An informational head first, then the final one: reads stop at each head's end.
_PROBE_HEADS = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
_PROBE_BODY = b"5\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\n"


def _check_h11_hand_over(heads: bytes) -> None:
    """Read ``heads`` into h11 as `_LeanReadStream` would (each read stops at a head's
    end), hand the body over as `_tapped_body` does, give the message end back."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/", headers=[("host", "probe")]))
    client.send(h11.EndOfMessage())
    head_end = _HeadEnd()
    unread = heads + _PROBE_BODY
    while not isinstance(event := client.next_event(), h11.Response):
        if event is h11.NEED_DATA:
            cut = head_end.find(unread)
            if cut is None:
                raise AssumptionBroken("h11 wants more than a whole response head")
            client.receive_data(unread[:cut])
            unread = unread[cut:]
        elif not isinstance(event, h11.InformationalResponse):
            raise AssumptionBroken(f"h11 read a response head as {event!r}")
    if client.trailing_data != (b"", False) or unread != _PROBE_BODY:
        raise AssumptionBroken("h11 did not stop at the end of the response head")
    decoder = ChunkedBodyDecoder()
    if decoder.feed(unread) != b"hello" or not decoder.done:
        raise AssumptionBroken("the probe body did not decode")
    client.receive_data(decoder.rest)
    if not isinstance(client.next_event(), h11.EndOfMessage):
        raise AssumptionBroken("h11 did not read the message end handed back to it")


# --- the transport ------------------------------------------------------------------


class LeanReadTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, over connections that read cheaply (`_LeanReadStream`).

    httpx builds its httpcore pool itself and takes no network backend; the pool is
    rebuilt here with the same settings and ours. Raises AssumptionBroken if httpx
    keeps its pool elsewhere, or httpcore's pool takes no backend.
    """

    def __init__(self, tls: ssl.SSLContext, limits: httpx.Limits) -> None:
        super().__init__(verify=tls, limits=limits)
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise AssumptionBroken("httpx.AsyncHTTPTransport keeps its pool elsewhere")
        try:
            self._pool = httpcore.AsyncConnectionPool(
                ssl_context=tls,
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
                network_backend=_LeanReadBackend(),
            )
        except TypeError as exc:
            raise AssumptionBroken(f"httpcore's pool takes no such settings: {exc}") from exc


# httpcore's socket option shape (it does not export the alias).
_SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


class _LeanReadBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend, whose connections read through `_LeanTCPStream` and,
    for TLS, `_LeanTLSStream`."""

    def __init__(self) -> None:
        self._trio = httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._trio.connect_tcp(host, port, timeout, local_address, socket_options)
        return _LeanTCPStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._trio.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._trio.sleep(seconds)


class _LoopPassClock(trio.abc.Instrument):
    """When the current pass of trio's run loop began (its I/O poll returned)."""

    def __init__(self) -> None:
        self._started = time.perf_counter()

    def after_io_wait(self, timeout: float) -> None:
        self._started = time.perf_counter()

    def age_s(self) -> float:
        return time.perf_counter() - self._started


_LOOP_PASS_CLOCK: trio.lowlevel.RunVar[_LoopPassClock] = trio.lowlevel.RunVar("loop_pass_clock")


def _loop_pass_clock() -> _LoopPassClock:
    """The pass clock of the running trio loop, installed on first use."""
    try:
        return _LOOP_PASS_CLOCK.get()
    except LookupError:
        clock = _LoopPassClock()
        trio.lowlevel.add_instrument(clock)
        _LOOP_PASS_CLOCK.set(clock)
        return clock


class _HeadEnd:
    """Finds where a response head ends in bytes that arrive piece by piece."""

    def __init__(self) -> None:
        self._tail = b""  # the last bytes of the head so far: its end may straddle pieces

    def reset(self) -> None:
        self._tail = b""

    def find(self, data: bytes) -> int | None:
        """The offset in ``data`` just past the head's end (> 0), or None."""
        seen = self._tail + data
        end = _HEAD_END_RE.search(seen)
        if end is None:
            self._tail = seen[-2:]
            return None
        # The tail held no head end (it would have been cut at), so the offset is > 0.
        cut = end.end() - len(self._tail)
        self._tail = b""
        return cut


class _LeanReadStream(httpcore.AsyncNetworkStream):
    """An httpcore connection whose reads are cheap, and whose response bodies can be
    read by `_tapped_body`; `_LeanTCPStream` and `_LeanTLSStream` read the network.

    Cheap reads: untimed reads skip httpcore's and trio's layers. They are a read per
    SSE event, and those layers cost more than the event. When the last read drained
    the connection, the next waits for readability first instead of trying a read that
    would fail.

    Body hand-over: from each request write until ``take_body``, a read returns at
    most up to the end of a response head (by h11's rule), and keeps what follows.
    So when httpcore has the final response's head, h11 holds no byte of the body,
    and ``take_body`` hands that body over: the bytes read past the head, then
    plain reads. ``give_back`` returns bytes for httpcore to read (the end of the
    message), so that a response read this way still ends in httpcore's pool.
    """

    def __init__(self) -> None:
        # The last network read emptied the connection: the next waits for it first.
        self._drained = True
        self._unread = b""  # read from the network, not yet returned
        self._in_head = False  # reads stop at the end of a response head
        self._head_end = _HeadEnd()

    async def read(
        self,
        max_bytes: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> bytes:
        if self._unread:
            data, self._unread = self._unread[:max_bytes], self._unread[max_bytes:]
            await trio.lowlevel.checkpoint()  # every read is a schedule point
        else:
            data = await self._read_network(max_bytes, timeout)
        if self._in_head and data:
            cut = self._head_end.find(data)
            if cut is not None:
                data, self._unread = data[:cut], data[cut:] + self._unread
        return data

    def take_body(self) -> bytes:
        """End head mode; the bytes already read past the head (see the class doc)."""
        self._in_head = False
        data, self._unread = self._unread, b""
        return data

    def give_back(self, data: bytes) -> None:
        """Make ``data`` the next bytes read."""
        self._unread = data + self._unread

    async def write(
        self,
        buffer: bytes,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> None:
        self._in_head = True  # a request: its response head comes next
        self._head_end.reset()
        await self._write_network(buffer, timeout)

    async def _read_network(
        self,
        max_bytes: int,
        timeout: float | None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> bytes:
        raise NotImplementedError

    async def _write_network(
        self,
        buffer: bytes,
        timeout: float | None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> None:
        raise NotImplementedError

    async def _after_burst(self, data: bytes) -> bytes:
        """``data``, a burst (a read of at least BURST_READ_BYTES), once the loop pass has
        room for it: it waits for the next pass when this one has run its budget."""
        # Only bursts consult the pass clock (and install it, on first use). The data
        # waits in _unread, so a cancelled wait loses none of it.
        loop_pass = _loop_pass_clock()
        if loop_pass.age_s() > BURST_PASS_BUDGET_S:
            self._unread = data
            while loop_pass.age_s() > BURST_PASS_BUDGET_S:
                await trio.lowlevel.checkpoint()
            data, self._unread = self._unread, b""
        return data


class _LeanTCPStream(_LeanReadStream):
    """A plain-TCP connection: untimed reads are one ``os.read``; timed reads, writes
    and closing are httpcore's own (``inner``)."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        super().__init__()
        self._inner = inner
        # The socket's descriptor while it is open (-1 once closed: read through httpcore).
        self._fd: int = inner.get_extra_info("socket").fileno()

    async def _read_network(
        self,
        max_bytes: int,
        timeout: float | None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> bytes:
        if self._fd < 0 or timeout is not None:
            return await self._inner.read(max_bytes, timeout)
        read_bytes = min(max_bytes, LEAN_READ_BYTES)
        try:
            if self._drained:
                await trio.lowlevel.wait_readable(self._fd)
            else:
                await trio.lowlevel.checkpoint()  # every read is a schedule point
            while True:
                try:
                    data = os.read(self._fd, read_bytes)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self._fd)
        except (OSError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            raise httpcore.ReadError(str(exc)) from exc
        self._drained = len(data) < read_bytes
        return await self._after_burst(data) if len(data) >= BURST_READ_BYTES else data

    async def _write_network(
        self,
        buffer: bytes,
        timeout: float | None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        self._fd = -1  # the number may belong to another socket once this one is closed
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> httpcore.AsyncNetworkStream:
        """TLS over this connection by the stdlib's ``ssl.SSLSocket`` (`_LeanTLSStream`).
        The socket leaves httpcore's stream, which is not used again."""
        socket_ = self._inner.get_extra_info("socket")
        self._fd = -1
        return await _LeanTLSStream.handshake(
            stdlib_socket.socket(fileno=socket_.detach()), ssl_context, server_hostname, timeout
        )

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _LeanTLSStream(_LeanReadStream):
    """A TLS connection through the stdlib's ``ssl.SSLSocket`` on a non-blocking socket,
    waited on with trio's ``wait_readable``/``wait_writable``: OpenSSL reads the socket
    itself, so a TLS record costs one C call. trio's ``SSLStream`` (what httpcore uses)
    runs its state machine in Python around an ``ssl.MemoryBIO``, and httpcore then
    passes each read through its own layers: together about as much again as the plain
    relay (bench/README.md, "Issue 18: an HTTPS upstream").

    Behaves as httpcore's TLS stream does (``https_compatible``): an EOF without
    TLS's close_notify ends the body like a plain EOF (the chunked framing still shows
    a truncated body), and closing sends no close_notify.
    """

    def __init__(self, tls: ssl.SSLSocket) -> None:
        super().__init__()
        self._tls = tls

    @classmethod
    async def handshake(
        cls,
        sock: stdlib_socket.socket,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None,
        timeout: float | None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> _LeanTLSStream:
        """The connection over ``sock`` once the handshake is done. Raises
        httpcore.ConnectTimeout or ConnectError (``sock`` is then closed)."""
        sock.setblocking(False)
        try:
            tls = ssl_context.wrap_socket(
                sock, server_hostname=server_hostname, do_handshake_on_connect=False
            )
        except (OSError, ValueError) as exc:
            sock.close()
            raise httpcore.ConnectError(str(exc)) from exc
        stream = cls(tls)
        try:
            with _timed(timeout, httpcore.ConnectTimeout):
                await stream._retrying(tls.do_handshake)
        except BaseException as exc:
            await stream.aclose()
            if isinstance(exc, OSError):  # ssl.SSLError included: a refused certificate
                raise httpcore.ConnectError(str(exc)) from exc
            raise
        return stream

    async def _retrying(self, operation: Callable[[], _T]) -> _T:
        """``operation`` of the SSLSocket, retried each time the socket can go on."""
        while True:
            try:
                return operation()
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self._tls)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self._tls)

    async def _read_network(
        self,
        max_bytes: int,
        timeout: float | None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> bytes:
        read_bytes = min(max_bytes, LEAN_READ_BYTES)
        if timeout is not None:
            with _timed(timeout, httpcore.ReadTimeout):
                return await self._read_tls(read_bytes)
        return await self._read_tls(read_bytes)  # a read per SSE event: no scope

    async def _read_tls(self, read_bytes: int) -> bytes:
        tls = self._tls
        try:
            if self._drained:
                await trio.lowlevel.wait_readable(tls)
            else:
                await trio.lowlevel.checkpoint()  # every read is a schedule point
            while True:
                try:
                    data = tls.recv(read_bytes)
                    break
                except ssl.SSLWantReadError:
                    await trio.lowlevel.wait_readable(tls)
                except ssl.SSLWantWriteError:  # a TLS 1.2 renegotiation
                    await trio.lowlevel.wait_writable(tls)
        except (OSError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            raise httpcore.ReadError(str(exc)) from exc
        # OpenSSL reads a socket one record at a time (read_ahead is off), so "the
        # socket is readable" and "OpenSSL holds decrypted bytes" (pending) cover all.
        self._drained = len(data) < read_bytes and not tls.pending()
        return await self._after_burst(data) if len(data) >= BURST_READ_BYTES else data

    async def _write_network(
        self,
        buffer: bytes,
        timeout: float | None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> None:
        view = memoryview(buffer)
        try:
            with _timed(timeout, httpcore.WriteTimeout):
                await trio.lowlevel.checkpoint()
                while view:
                    view = view[await self._retrying(partial(self._tls.send, view)) :]
        except (OSError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        if self._tls.fileno() >= 0:
            trio.lowlevel.notify_closing(self._tls)
            self._tls.close()
        await trio.lowlevel.checkpoint()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> httpcore.AsyncNetworkStream:
        # TLS inside TLS is for HTTPS proxies, whose requests never come this way.
        raise httpcore.ConnectError("TLS inside a lean TLS connection is not supported")

    def get_extra_info(self, info: str) -> Any:
        if info in ("ssl_object", "socket"):
            return self._tls
        if info == "client_addr":
            return self._tls.getsockname()
        if info == "server_addr":
            return self._tls.getpeername()
        if info == "is_readable":
            poller = select.poll()
            poller.register(self._tls, select.POLLIN)
            return bool(poller.poll(0))
        return None


_T = TypeVar("_T")


@contextmanager
def _timed(
    timeout: float | None,  # noqa: ASYNC109 (httpcore's interface)
    error: type[httpcore.TimeoutException],
) -> Iterator[None]:
    """No limit for None, else ``error`` after ``timeout`` seconds (as httpcore's own)."""
    if timeout is None:
        yield
        return
    try:
        with trio.fail_after(timeout):
            yield
    except trio.TooSlowError as exc:
        raise error(f"no progress in {timeout} s") from exc


# --- bodies ---------------------------------------------------------------------------


def body_chunks(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """The body of a streamed response as it came over the wire, chunk by chunk: its
    transfer coding removed, its content coding (if any) kept, as ``aiter_raw``. A
    chunked body on our own connection is read by `_tapped_body`, anything else (a
    connection that is not ours, a Content-Length body) through httpx's ``aiter_raw``.
    Raises what ``aiter_raw`` raises, and BodyFramingError for framing that is not
    chunked coding."""
    stream = response.extensions.get("network_stream")
    if isinstance(stream, _LeanReadStream):
        opening = stream.take_body()  # ends head mode, whoever reads the body
        if _is_chunked(response):
            return _tapped_body(response, stream, opening)
        stream.give_back(opening)  # httpx reads it, from the first byte past the head
    # aiter_raw() is an async generator (typed as a plain iterator); the caller
    # closes it, so nothing is left for the garbage collector.
    return cast(AsyncGenerator[bytes, None], response.aiter_raw())


def _is_chunked(response: httpx.Response) -> bool:
    """HTTP/1.1 chunked coding, the only transfer coding h11 knows."""
    return (
        response.http_version == "HTTP/1.1"
        and response.headers.get("transfer-encoding", "").strip().lower() == "chunked"
    )


async def _tapped_body(
    response: httpx.Response, stream: _LeanReadStream, opening: bytes
) -> AsyncGenerator[bytes, None]:
    """A chunked body decoded here, one payload per network read: httpx, httpcore and
    h11 would pass each read through five async generators and two h11 events, which
    cost more than the SSE event it carries (bench/README.md). The end of the message
    goes back to httpcore to read, so the connection is released to the pool as usual.
    Raises httpx.ReadError or RemoteProtocolError for a broken or closed connection
    (as httpx would), BodyFramingError for framing that is not chunked coding."""
    decoder = ChunkedBodyDecoder()
    raw = opening
    while True:
        payload = decoder.feed(raw)
        if payload:
            yield payload
        if decoder.done:
            break
        if decoder.failed:
            raw = b""  # the next feed raises
            continue
        try:
            raw = await stream.read(LEAN_READ_BYTES)
        except httpcore.NetworkError as exc:
            raise httpx.ReadError(str(exc)) from exc
        if not raw:
            raise httpx.RemoteProtocolError("upstream closed the connection inside a chunked body")
    stream.give_back(decoder.rest)
    # Nothing but the end of the message is left; reading it raw leaves httpx's content
    # decoders out (the caller undoes the content coding).
    async for _ in response.aiter_raw():
        pass


async def close_response(response: httpx.Response) -> None:
    """Close ``response`` and break the reference cycle httpx keeps between a response
    and its body stream, so that the whole connection's objects are freed at once by
    reference counting. Left to the garbage collector they wait for a full collection,
    whose pause grows with every object of every open WebSocket (bench/README.md)."""
    try:
        await response.aclose()
    finally:
        response.stream = _CLOSED_BODY


_CLOSED_BODY = httpx.ByteStream(b"")


class ChunkedBodyDecoder:
    """The payload of an HTTP/1.1 chunked body (RFC 9112 §7.1), from raw bytes.

    Pure, no I/O: ``feed`` takes each network read and returns the payload bytes it
    carries, a chunk's data passed on as it arrives rather than once the chunk is
    whole. When the last-chunk line begins, ``done`` is set and ``rest`` holds the
    raw bytes from that line on (the last chunk, trailers, the final CRLF), so that
    the HTTP library can read the end of the message itself. Chunk extensions are
    ignored. Framing that is not chunked coding raises BodyFramingError: from the
    call that meets it, or, when that call has payload to return first, from the
    next call (``failed`` is then set: make that call without waiting for input).
    Bounded: at most one chunk-size line (``MAX_CHUNK_LINE_BYTES``) is buffered.
    """

    def __init__(self) -> None:
        self._held = b""  # an unfinished chunk-size line, or the start of a data CRLF
        self._data_due = 0  # payload bytes still to come in the current chunk
        self._crlf_due = False  # the current chunk's data is over; its CRLF is next
        self._error: BodyFramingError | None = None
        self.done = False
        self.rest = b""

    @property
    def failed(self) -> bool:
        return self._error is not None

    def feed(self, raw: bytes) -> bytes:
        if self._error is not None:
            raise self._error
        if self.done:
            self.rest += raw
            return b""
        payload: list[bytes] = []
        try:
            self._decode(raw, payload)
        except BodyFramingError as error:
            if not any(payload):
                raise
            self._error = error
        return payload[0] if len(payload) == 1 else b"".join(payload)

    def _decode(self, raw: bytes, payload: list[bytes]) -> None:
        data = self._held + raw if self._held else raw
        self._held = b""
        pos, size = 0, len(data)
        while pos < size:
            if self._data_due:
                end = min(size, pos + self._data_due)
                payload.append(data[pos:end])
                self._data_due -= end - pos
                self._crlf_due = not self._data_due
                pos = end
            elif self._crlf_due:
                if size - pos < 2:
                    self._held = data[pos:]
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise BodyFramingError("upstream body: chunk data not followed by CRLF")
                self._crlf_due = False
                pos += 2
            else:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > MAX_CHUNK_LINE_BYTES:
                        raise BodyFramingError("upstream body: chunk-size line too long")
                    self._held = data[pos:]
                    break
                digits = data[pos:end].partition(b";")[0].rstrip(b" \t")
                if not _CHUNK_SIZE_RE.fullmatch(digits):
                    raise BodyFramingError(
                        f"upstream body: malformed chunk size {bytes(digits[:40])!r}"
                    )
                self._data_due = int(digits, 16)
                if not self._data_due:
                    self.done = True
                    self.rest = data[pos:]
                    break
                pos = end + 2
