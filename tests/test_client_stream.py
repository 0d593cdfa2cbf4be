"""ClientStream: the write path every text delta takes, over real loopback sockets.

The kernel is made to take frames in parts (a small send buffer, a tiny receive
window, a peer that does not read yet): whatever mix of `write_now`, `send_all` and
cancelled writers produced them, the peer must read every committed frame whole and
in order.
"""

from __future__ import annotations

import gc
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from chat.pacing import PassGate
from chat.ws_stream import ClientStream
from conftest import CLIENT_WAIT_S

FRAME_BYTES = 1500  # more than the kernel takes whole once its buffers are nearly full
MAX_FRAMES = 20_000  # bounds every fill loop


def _frame(writer: str, number: int) -> bytes:
    """A fixed-size, self-describing frame: the reader checks each one is whole."""
    head = f"<{writer}:{number:06d}>".encode()
    return head + b"." * (FRAME_BYTES - len(head))


@asynccontextmanager
async def _pair() -> AsyncIterator[tuple[ClientStream, trio.SocketStream]]:
    """(server side as a ClientStream with a small send buffer, client side with a tiny
    receive window that reads nothing until the test says so)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    client_sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with trio.fail_after(CLIENT_WAIT_S):
        await client_sock.connect(("127.0.0.1", port))
        server_side = await listener.accept()
    await listener.aclose()
    server_side.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    client = trio.SocketStream(client_sock)
    stream = ClientStream(server_side, b"", PassGate(1, pause_gc=True))
    try:
        yield stream, client
    finally:
        await stream.aclose()
        await client.aclose()


def _fill(stream: ClientStream, writer: str) -> list[bytes]:
    """`write_now` frames until the kernel refuses one; the frames it took."""
    taken: list[bytes] = []
    for number in range(MAX_FRAMES):
        frame = _frame(writer, number)
        if not stream.write_now(frame):
            return taken
        taken.append(frame)
    raise AssertionError("the kernel never pushed back")


async def _read_exactly(client: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    with trio.fail_after(CLIENT_WAIT_S):
        while len(data) < size:
            chunk = await client.receive_some(65536)
            assert chunk, "the stream ended early"
            data += chunk
    return bytes(data)


def _frames_of(data: bytes) -> list[bytes]:
    assert len(data) % FRAME_BYTES == 0
    frames = [data[i : i + FRAME_BYTES] for i in range(0, len(data), FRAME_BYTES)]
    for frame in frames:
        head = frame.split(b">", 1)[0] + b">"
        assert frame == head + b"." * (FRAME_BYTES - len(head)), f"cut frame: {frame[:40]!r}"
    return frames


async def test_write_now_takes_whole_frames_without_yielding() -> None:
    async with _pair() as (stream, client):
        frame = _frame("now", 1)
        # No checkpoint: the write happens inside this synchronous call.
        assert stream.write_now(frame)
        assert not stream.has_pending
        assert await _read_exactly(client, FRAME_BYTES) == frame


async def test_frames_from_every_writer_arrive_whole_and_in_commit_order() -> None:
    async with _pair() as (stream, client):
        direct = _fill(stream, "now")
        assert direct
        # The kernel took part of a frame at most: the rest waits, committed.
        if stream.has_pending:
            assert not stream.write_now(_frame("refused", 0))
        per_writer = 30
        async with trio.open_nursery() as nursery:

            async def writer(name: str) -> None:
                for number in range(per_writer):
                    await stream.send_all(_frame(name, number))

            nursery.start_soon(writer, "a")
            nursery.start_soon(writer, "b")
            nursery.start_soon(stream.flush)
            await trio.testing.wait_all_tasks_blocked()
            # A writer is waiting for the kernel: direct writes must queue behind it.
            assert not stream.write_now(_frame("refused", 1))
            expected = (len(direct) + 2 * per_writer) * FRAME_BYTES
            received = _frames_of(await _read_exactly(client, expected))
        assert received[: len(direct)] == direct
        for name in ("a", "b"):
            mine = [f for f in received if f.startswith(f"<{name}:".encode())]
            assert mine == [_frame(name, n) for n in range(per_writer)]
        assert not any(f.startswith(b"<refused") for f in received)


async def test_a_cancelled_writer_leaves_its_bytes_committed_ahead_of_the_next() -> None:
    async with _pair() as (stream, client):
        direct = _fill(stream, "now")
        big = b"".join(_frame("big", n) for n in range(40))
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:

            async def write_big() -> None:
                with scope:
                    await stream.send_all(big)

            nursery.start_soon(write_big)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
        assert scope.cancelled_caught
        assert stream.has_pending
        after = _frame("after", 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, after)
            size = (len(direct) + 41) * FRAME_BYTES
            received = _frames_of(await _read_exactly(client, size))
        assert b"".join(received) == b"".join(direct) + big + after


async def test_broken_and_closed_streams_raise_trio_errors() -> None:
    async with _pair() as (stream, client):
        # An RST from the peer: its pending data is discarded, the connection resets.
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert stream.write_now(_frame("now", 0))
        await client.aclose()
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(CLIENT_WAIT_S):
            for number in range(MAX_FRAMES):
                await stream.send_all(_frame("late", number))
        assert not stream.write_now(_frame("late", 0))
        await stream.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"closed")
        assert not stream.write_now(b"closed")


async def test_streams_without_a_socket_write_through_their_own_send_all() -> None:
    # TLS streams have no socket to write to directly; a memory stream stands in.
    ours, theirs = trio.testing.memory_stream_pair()
    stream = ClientStream(ours, b"replayed", PassGate(1, pause_gc=True))
    assert not stream.write_now(b"direct")
    await stream.send_all(b"queued")
    assert await theirs.receive_some() == b"queued"
    assert await stream.receive_some() == b"replayed"
    await theirs.send_all(b"live")
    assert await stream.receive_some() == b"live"


class _PassCounter(trio.abc.Instrument):
    """Counts passes of trio's run loop (each begins when its I/O poll returns)."""

    def __init__(self) -> None:
        self.passes = 0

    def after_io_wait(self, timeout: float) -> None:
        self.passes += 1


async def test_the_drop_gate_lets_streams_through_a_few_per_loop_pass_in_arrival_order(
    nursery: trio.Nursery,
) -> None:
    gate = PassGate(3, pause_gc=True)
    nursery.start_soon(gate.run)
    counter = _PassCounter()
    arrived: list[int] = []
    through_in_pass: dict[int, int] = {}
    gc_on_when_through: list[bool] = []

    async def drop(n: int) -> None:
        arrived.append(n)
        await gate.pass_through()
        through_in_pass[n] = counter.passes
        gc_on_when_through.append(gc.isenabled())

    trio.lowlevel.add_instrument(counter)
    try:
        with trio.fail_after(CLIENT_WAIT_S):
            async with trio.open_nursery() as drops:
                for n in range(11):
                    drops.start_soon(drop, n)
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert sorted(through_in_pass) == list(range(11))
    per_pass = [list(through_in_pass.values()).count(p) for p in set(through_in_pass.values())]
    assert max(per_pass) <= 3 and len(per_pass) >= 4
    passes_in_arrival_order = [through_in_pass[n] for n in arrived]
    assert passes_in_arrival_order == sorted(passes_in_arrival_order)
    # The cyclic collector paused while streams waited, and runs again after.
    assert not all(gc_on_when_through)
    await trio.testing.wait_all_tasks_blocked()
    assert gc.isenabled()
    # The storm is over: the next stream goes through at once, without a pass.
    before = counter.passes
    trio.lowlevel.add_instrument(counter)
    try:
        await gate.pass_through()
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert counter.passes == before


async def test_a_gate_for_admissions_keeps_the_collector_running(nursery: trio.Nursery) -> None:
    gate = PassGate(2, pause_gc=False)
    nursery.start_soon(gate.run)
    gc_on_when_through: list[bool] = []

    async def admit() -> None:
        await gate.pass_through()
        gc_on_when_through.append(gc.isenabled())

    with trio.fail_after(CLIENT_WAIT_S):
        async with trio.open_nursery() as admissions:
            for _ in range(9):
                admissions.start_soon(admit)
    assert gc_on_when_through == [True] * 9
