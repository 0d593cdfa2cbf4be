"""A paced fake Responses API for the benchmark, run as its own process.

    python bench/fake_upstream.py          # prints "fake listening on PORT" on stdout
    python bench/fake_upstream.py --tls-dir DIR   # also HTTPS: "fake tls listening on PORT"

With ``--tls-dir`` it writes a self-signed certificate for 127.0.0.1 to
``DIR/cert.pem`` (and its key) and serves the same replies over TLS on a second
port, as api.openai.com does (trio's SSLStream: the TLS cost is the fake's own).

Each ``POST .../responses`` is answered by a streamed text reply whose shape is
taken from the user's last message, a line of ``key=value`` directives:

    bench sid=S turn=K n=N every=MS first=MS dur=S

``n`` deltas, the first ``first`` ms after the request arrived, then one every
``every`` ms on an absolute schedule (0: as fast as the socket takes them, in
batches), at most ``dur`` seconds. Every delta's text carries its send time,
``<t=MONOTONIC>``; the first also carries the request's arrival, ``<r=MONOTONIC>``.
``time.monotonic()`` is CLOCK_MONOTONIC, the same clock in every process.

While a reply streams, a second task reads the socket: the moment it returns EOF
or an error is when "the fake saw the upstream connection closed", recorded with
the session and turn. ``GET /records`` returns (and clears) those records plus the
number of deltas sent, as JSON.

Resource handling: one task per connection, each bounded by REQUEST_READ_TIMEOUT_S
for the request and by ``dur`` for the reply; every response says
``Connection: close``. Error handling: a failure in one exchange is printed to
stderr and ends that exchange only.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from self_signed import self_signed_cert  # noqa: E402  (this script's folder)

from chat.demo_model import (  # noqa: E402
    encode_sse,
    last_user_text,
    previous_response_id_of,
    text_response_events,
)

REQUEST_READ_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 16 * 1024 * 1024
# Deltas written per socket write when unpaced: fewer syscalls in the fake, so the
# fake is not what limits the unpaced throughput.
UNPACED_BATCH = 16
# A reply never streams longer than this, whatever it was asked.
MAX_REPLY_S = 600.0
MODEL = "bench-model"


class _State:
    def __init__(self) -> None:
        self.closes: list[dict[str, Any]] = []
        self.deltas_sent = 0
        self.requests = 0
        self.response_counter = 0


def _directives(text: str) -> dict[str, str]:
    pairs = (word.split("=", 1) for word in text.split() if "=" in word)
    return {key: value for key, value in pairs}


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _read_request(stream: trio.abc.Stream) -> tuple[str, str, bytes] | None:
    """(method, path, body) of one HTTP/1.1 request with Content-Length, or None."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
        if len(buffer) > MAX_REQUEST_BYTES:
            return None
    head, _, body = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length > MAX_REQUEST_BYTES:
        return None
    while len(body) < length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        body += data
    return method, path, body


class _Reply:
    """One streamed text reply; ``closed_at`` is set when the client goes away."""

    def __init__(self, state: _State, stream: trio.abc.Stream, received_at: float) -> None:
        self.state = state
        self.stream = stream
        self.received_at = received_at
        self.closed_at: float | None = None

    async def watch_close(self, cancel_scope: trio.CancelScope) -> None:
        try:
            while await self.stream.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if self.closed_at is None:
            self.closed_at = time.monotonic()
        cancel_scope.cancel()

    async def _write(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self.closed_at is None:
                self.closed_at = time.monotonic()
            raise

    async def play(self, spec: dict[str, str], chained: str | None) -> None:
        count = int(spec.get("n", "10"))
        every_s = float(spec.get("every", "0")) / 1000
        first_s = float(spec.get("first", "0")) / 1000
        limit_s = min(float(spec.get("dur", "60")), MAX_REPLY_S)
        self.state.response_counter += 1
        response_id = f"resp_bench_{self.state.response_counter:08d}"
        template = text_response_events(response_id, MODEL, ["x"], previous_response_id=chained)
        head = b"".join(encode_sse(event) for event in template[:4])
        place = template[4]
        await self._write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n" + _chunk(head)
        )
        # One delta event, formatted by hand: the fake must stay cheap next to the server.
        prefix = (
            '{"type":"response.output_text.delta","sequence_number":%d,'
            f'"item_id":"{place["item_id"]}","output_index":0,"content_index":0,"delta":"'
        )
        suffix = '","logprobs":[]}'
        chunks: list[str] = []
        start = self.received_at + first_s
        deadline = self.received_at + limit_s
        sequence = 4
        now = time.monotonic()
        if start > now:
            await trio.sleep(start - now)
        while len(chunks) < count and time.monotonic() < deadline:
            batch = 1 if every_s else min(UNPACED_BATCH, count - len(chunks))
            parts = []
            for _ in range(batch):
                text = f"<t={time.monotonic():.6f}>"
                if not chunks:
                    text = f"<r={self.received_at:.6f}>" + text
                chunks.append(text)
                parts.append(
                    "event: response.output_text.delta\ndata: "
                    + prefix % sequence
                    + text
                    + suffix
                    + "\n\n"
                )
                sequence += 1
            await self._write(_chunk("".join(parts).encode()))
            self.state.deltas_sent += batch
            if every_s:
                wake = start + len(chunks) * every_s
                now = time.monotonic()
                if wake > now:
                    await trio.sleep(wake - now)
            else:
                await trio.lowlevel.checkpoint()
        tail = text_response_events(
            response_id, MODEL, chunks, previous_response_id=chained
        )[-4:]
        body = b"".join(encode_sse({**event, "sequence_number": sequence + i})
                        for i, event in enumerate(tail))
        await self._write(_chunk(body) + b"0\r\n\r\n")


async def _handle(state: _State, stream: trio.abc.Stream) -> None:
    try:
        async with stream:
            with trio.move_on_after(REQUEST_READ_TIMEOUT_S):
                request = await _read_request(stream)
            if request is None:
                return
            received_at = time.monotonic()
            method, path, body = request
            if method == "GET" and path == "/records":
                payload = json.dumps(
                    {"closes": state.closes, "deltas_sent": state.deltas_sent,
                     "requests": state.requests}
                ).encode()
                state.closes = []
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(payload), payload)
                )
                return
            if method != "POST" or not path.endswith("/responses"):
                await stream.send_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
                return
            state.requests += 1
            request_body = json.loads(body)
            spec = _directives(last_user_text(request_body.get("input")))
            reply = _Reply(state, stream, received_at)
            completed = False
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reply.watch_close, nursery.cancel_scope)
                try:
                    await reply.play(spec, previous_response_id_of(request_body))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                else:
                    completed = True
                    # Done: give the client a moment to close first, then close ourselves.
                    with trio.move_on_after(1.0):
                        await trio.sleep_forever()
                nursery.cancel_scope.cancel()
            if reply.closed_at is not None and not completed and "sid" in spec:
                state.closes.append(
                    {"sid": spec["sid"], "turn": spec.get("turn", ""), "t": reply.closed_at}
                )
    except Exception:  # one bad exchange must not stop the fake
        traceback.print_exc()


async def _main(tls_dir: Path | None) -> None:
    state = _State()
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
    plain = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
    print(f"fake listening on {plain[0].socket.getsockname()[1]}", flush=True)
    listeners += plain
    if tls_dir is not None:
        cert, key = self_signed_cert(tls_dir)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        secure = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
        print(f"fake tls listening on {secure[0].socket.getsockname()[1]}", flush=True)
        listeners += [trio.SSLListener(listener, context) for listener in secure]
    await trio.serve_listeners(partial(_handle, state), listeners)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tls-dir", type=Path, help="also serve HTTPS, certificate written here")
    trio.run(_main, parser.parse_args().tls_dir)
