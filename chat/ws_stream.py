"""The only code beneath trio-websocket: a client's byte stream (`ClientStream`) and
the RFC 6455 bytes of a text delta, written to the socket by the turn's own task.

- **Assumption.** trio-websocket (over wsproto) writes every message it sends as
  whole frames through `ClientStream.send_all`, the server negotiates no extension
  (no compression: a server frame is the plain RFC 6455 framing), and wsproto keeps
  no state about outgoing data frames once a message is complete. So a whole text
  frame written between two of its messages is a valid frame in the stream, as
  long as its close frame has not been sent (`ws.closed is None`). Pinned:
  trio-websocket < 0.13, wsproto < 2 (constraints.txt holds the exact versions);
  tests/test_ws_stream.py decodes what we write with wsproto and fails when the
  framing or the hand-over assumptions stop holding.
- **What it buys.** A delta written at once, without a task switch or a frame model:
  the relay costs 0.132-0.156 s of CPU per 1,000 paced deltas (bench/README.md),
  about what the trivial fake upstream costs, against roughly twice that through
  `send_message`.
- **When it cannot apply** (TLS: no socket to write to) every write is the TLS
  stream's; the server logs a WARNING at start and `/metrics` shows
  `chat_fast_path_active{path="direct_delta_writes"} 0`. `--no-fast-paths`
  switches it off (`direct_writes=False`).
"""

from __future__ import annotations

import os
import struct

import trio

import protocol as wire
from chat.pacing import PassGate


def encode_text_delta_frame(turn_id: str, content: str) -> bytes:
    """`encode_text_delta` as a whole WebSocket message (RFC 6455 §5.2): one final,
    unmasked text frame, as a server sends it when no extension was negotiated (the
    server offers none). The hot path writes these bytes to the socket itself."""
    payload = wire.encode_text_delta(turn_id, content).encode()
    size = len(payload)
    if size < 126:
        header = bytes((_FINAL_TEXT_FRAME, size))
    elif size < 1 << 16:
        header = struct.pack("!BBH", _FINAL_TEXT_FRAME, 126, size)
    else:
        header = struct.pack("!BBQ", _FINAL_TEXT_FRAME, 127, size)
    return header + payload


_FINAL_TEXT_FRAME = 0x81  # FIN bit, opcode 1 (text)


_FINAL_TEXT_FRAME = 0x81  # FIN bit, opcode 1 (text)


class ClientStream(trio.abc.Stream):
    """A client's TCP stream, under trio-websocket and under the hot path.

    Reading first returns the bytes already read: the HTTP head is read before we know
    whether the request is a WebSocket upgrade, and trio-websocket must see it again.

    Writing is built for a frame per text delta. `write_now` writes a whole frame
    without waiting or yielding (the turn task calls it; no task switch per delta);
    `send_all` (trio-websocket's writes: every other frame, pings, close) writes what
    the kernel takes at once and waits only for the rest. Bytes are committed in
    order: what the kernel has not taken yet (`_pending`) is always written before
    anything else, and stays committed if its writer is cancelled, so a frame is never
    cut by another. One task at a time waits to write; others queue behind it.
    On TLS (no socket to write to directly), or with `direct_writes` off, every write
    is the inner stream's and `write_now` always answers False.

    The end of the stream, or a broken one, passes `drops` (a PassGate) first.
    """

    def __init__(
        self,
        inner: trio.abc.Stream,
        already_read: bytes,
        drops: PassGate,
        *,
        direct_writes: bool = True,
    ) -> None:
        self._inner = inner
        self._replay = already_read
        self._drops = drops
        self._socket = (
            inner.socket if direct_writes and isinstance(inner, trio.SocketStream) else None
        )
        self._pending = b""
        self._flushed: trio.Event | None = None  # exists while a task waits to write

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._replay:
            size = len(self._replay) if max_bytes is None else max_bytes
            chunk, self._replay = self._replay[:size], self._replay[size:]
            await trio.lowlevel.checkpoint()
            return chunk
        try:
            data = await self._inner.receive_some(max_bytes)
        except trio.BrokenResourceError:
            await self._drops.pass_through()
            raise
        if not data:
            await self._drops.pass_through()
        return data

    def write_now(self, data: bytes) -> bool:
        """Write `data` without waiting if nothing is queued before it and the kernel
        takes at least part of it. False: nothing was written, the caller queues it.
        A tail the kernel did not take is committed (`has_pending`): call `flush`."""
        if self._pending or self._flushed is not None or self._socket is None:
            return False
        fd = self._socket.fileno()
        if fd < 0:
            return False
        try:
            sent = os.write(fd, data)
        except OSError:
            return False  # full, or broken: the queued path waits, or reports it
        self._pending = data[sent:]
        return True

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._socket is None:
            await self._inner.send_all(data)
            return
        while self._flushed is not None:
            await self._flushed.wait()
        self._pending += data
        self._write_some()
        if self._pending:
            await self._flush_pending()

    async def flush(self) -> None:
        """Wait until every committed byte is written."""
        while self._flushed is not None:
            await self._flushed.wait()
        if self._pending:
            await self._flush_pending()

    async def _flush_pending(self) -> None:
        assert self._socket is not None
        self._flushed = flushed = trio.Event()
        try:
            while self._pending:
                await trio.lowlevel.wait_writable(self._socket)
                self._write_some()
        finally:
            self._flushed = None
            flushed.set()

    def _write_some(self) -> None:
        """Write what the kernel takes of `_pending` now. Raises ClosedResourceError
        or BrokenResourceError, as trio's streams do."""
        assert self._socket is not None
        fd = self._socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the stream is closed")
        try:
            sent = os.write(fd, self._pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self._pending = b""
            raise trio.BrokenResourceError(f"the connection broke: {exc.strerror}") from exc
        self._pending = self._pending[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._pending = b""
        await self._inner.aclose()
