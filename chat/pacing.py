"""Event-loop pacing: what keeps every pass of trio's loop within a few
milliseconds when thousands of connections arrive, idle or leave together.

Owns: `PassGate` (at most N costly steps per loop pass), `ConnectionTimers` (every
connection's long waits on one trio deadline), the garbage collector's thresholds,
the file-descriptor table reserved up front, and the one reach into trio's private
state, the cap on ready sockets per I/O poll (`install`).

The reach beneath trio (STYLE.md point 14):

- **Assumption.** trio's run context is reachable as
  `trio._core._run.GLOBAL_RUN_CONTEXT.runner.io_manager`, and on Linux that I/O
  manager polls a `select.epoll` stored in its `_epoll` attribute, calling only
  `poll(timeout, maxevents)`, `register`, `modify`, `unregister`, `fileno` and `close`
  on it. Pinned: trio < 0.33 in pyproject.toml (constraints.txt holds the exact
  version); tests/test_loop_passes.py fails if the cap stops taking hold.
- **What it buys.** When 10,000 clients connect at once, the largest loop pass used
  14-25 ms of CPU with 128 events per poll and 7-13 ms with 32 (bench/README.md).
- **When it cannot apply** (kqueue platforms, another trio layout) `install` logs a
  WARNING and `/metrics` shows `chat_fast_path_active{path="epoll_cap"} 0`; the loop
  then runs uncapped. `--no-fast-paths` switches it off.

The rest uses trio's public (lowlevel) API only.
"""

from __future__ import annotations

import fcntl
import gc
import itertools
import logging
import math
import os
import resource
import select
from collections.abc import Callable

import trio
from sortedcontainers import SortedList

log = logging.getLogger("chat.pacing")

# The garbage collector's generation thresholds (CPython's: 700, 10, 10). A middle
# collection scans what survived the young ones since the last: while thousands of
# clients connect that is mostly new connections' state, and at CPython's sizes it took
# 3-14 ms; at half the young size and half the count, 1-3 ms. A full collection scans
# every object of every open connection, about 200 ms at 10,000 connections, and
# stalls the event loop for that long: it is made rare. Chosen by measured loop
# stalls (bench/README.md).
GC_YOUNG_THRESHOLD = 350
GC_MIDDLE_THRESHOLD = 5
GC_FULL_THRESHOLD = 4_000
# Connections whose client is gone that are torn down per pass of the event loop when
# many drop at once (`PassGate`): a teardown takes ~0.4 ms of loop time here, so 8
# make 3-5 ms a pass (10,000 drops: about 1,250 passes, 7 s).
DROPS_PER_PASS = 8
# WebSockets admitted (token checked, session claimed) per pass of the event loop when
# many connect at once (`PassGate`): ~0.4 ms each here, so 12 make about 5 ms a pass.
ADMISSIONS_PER_PASS = 12
# Ready sockets one I/O poll reports to the event loop (`cap_io_events_per_pass`): a
# woken task costs 15 µs (an end of stream) to 300 µs (a handshake step) here, so a
# pass stays within a few milliseconds; 128 let 10,000 connecting clients make passes
# of 14-25 ms of CPU, 32 of 7-13 ms.
IO_EVENTS_PER_PASS = 32


def install(*, enabled: bool) -> bool:
    """Cap the running loop's I/O polls at IO_EVENTS_PER_PASS events, if `enabled`.
    True if the cap is in place. Asked for but impossible: a WARNING, and False."""
    if not enabled:
        log.info("fast paths off: I/O polls are not capped")
        return False
    if cap_io_events_per_pass(IO_EVENTS_PER_PASS):
        return True
    log.warning(
        "the I/O events cap cannot apply here (no epoll, or another trio layout): "
        "loop passes are uncapped while thousands of clients connect or drop"
    )
    return False


class PassGate:
    """Lets at most ``per_pass`` tasks per pass of the event loop through to costly
    work when many arrive at once; the rest wait in arrival order, and `run` (one
    task for the server's lifetime) lets them on pass by pass.

    trio runs every task that became ready in one pass of its loop before it looks at
    timers or I/O again, and thousands of connections can become ready together:

    - **Drops** (`ClientStream` passes the gate when it finds its client gone, before
      it tells trio-websocket). When clients vanish together (a network blip, a proxy
      restart), a teardown takes about 0.4 ms of loop time (the handler,
      trio-websocket's reader, the receiver and the heartbeat each take steps), and
      one poll reported up to 2,000 ends of stream: close to a second in which no other
      session moved.
    - **Admissions** (after the WebSocket handshake, before the token is checked and
      the session claimed). When thousands of clients connect together (after a
      restart), each admission step takes about 0.4 ms, and 30 or more became ready
      in the same pass.

    With ``pause_gc`` the cyclic garbage collector is paused while tasks wait: during
    a drop storm collections of the young generations over the storm's fresh objects
    took 20-29 ms each, and teardowns free their objects by reference counting (turns
    leave no cyclic garbage; a test checks it). It resumes when the last one has gone
    on. (Admissions create long-lived objects, which a paused collector would have to
    scan all at once when it resumes: not for them.)
    """

    def __init__(self, per_pass: int, *, pause_gc: bool) -> None:
        self._per_pass = per_pass
        self._free = per_pass  # may go on without waiting
        self._waiting = trio.lowlevel.ParkingLot()
        self._wake_pacer = trio.Event()
        self._pause_gc = pause_gc
        self._paused_gc = False

    async def pass_through(self) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        if self._pause_gc and not self._paused_gc and gc.isenabled():
            gc.disable()
            self._paused_gc = True
        self._wake_pacer.set()
        await self._waiting.park()

    async def run(self) -> None:
        """The pacer, for the server's lifetime: per_pass waiting tasks each pass."""
        while True:
            await self._wake_pacer.wait()
            self._wake_pacer = trio.Event()
            try:
                while self._waiting:
                    self._waiting.unpark(count=self._per_pass)
                    await trio.lowlevel.checkpoint()  # they run in the next pass, then we do
            finally:
                if self._paused_gc:
                    gc.enable()
                    self._paused_gc = False
            self._free = self._per_pass


class ConnectionTimers:
    """The long waits of every connection (the next heartbeat, a token's expiry) on
    one trio deadline for the whole server.

    trio keeps each cancel scope's deadline in one heap and, once stale entries (of
    scopes that ended early) outnumber the live ones, rebuilds the heap in one go,
    inside a pass of the event loop. With a deadline per idle connection that rebuild
    took 15 ms at 10,000 connections, and it comes around whenever many connections
    end or begin. Here the waits sit in a sorted list instead (insert and removal
    O(log n), nothing is ever rebuilt), and one task, `run`, sleeps until the earliest
    and wakes whoever is due.
    """

    def __init__(self) -> None:
        self._due = SortedList()  # (when, sequence number, task): no two compare equal
        self._sequence = itertools.count()
        self._alarm: trio.CancelScope | None = None  # run's wait, while it waits

    def __len__(self) -> int:
        return len(self._due)

    async def sleep_until(self, when: float) -> None:
        """Like `trio.sleep_until` (cancellable, on trio's clock), without a trio
        deadline of its own."""
        entry = (when, next(self._sequence), trio.lowlevel.current_task())
        self._due.add(entry)
        if self._alarm is not None and when < self._alarm.deadline:
            self._alarm.deadline = when

        def abort(_: Callable[[], BaseException]) -> trio.lowlevel.Abort:
            self._due.remove(entry)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def run(self) -> None:
        """The one task that sleeps for everyone, for the server's lifetime."""
        while True:
            now = trio.current_time()
            while self._due and self._due[0][0] <= now:
                trio.lowlevel.reschedule(self._due.pop(0)[2])
            earliest = self._due[0][0] if self._due else math.inf
            with trio.CancelScope(deadline=earliest) as self._alarm:
                await trio.sleep_forever()
            self._alarm = None


class _CappedEpoll:
    """trio's epoll object, except that one poll returns at most `limit` events."""

    def __init__(self, epoll: select.epoll, limit: int) -> None:
        self._epoll = epoll
        self._limit = limit

    def poll(self, timeout: float | None = None, maxevents: int = -1) -> list[tuple[int, int]]:
        wanted = self._limit if maxevents <= 0 else min(maxevents, self._limit)
        return self._epoll.poll(timeout, wanted)

    def register(self, fd: int, eventmask: int) -> None:
        self._epoll.register(fd, eventmask)

    def modify(self, fd: int, eventmask: int) -> None:
        self._epoll.modify(fd, eventmask)

    def unregister(self, fd: int) -> None:
        self._epoll.unregister(fd)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def close(self) -> None:
        self._epoll.close()


def cap_io_events_per_pass(limit: int) -> bool:
    """Make each I/O poll of the running trio loop report at most `limit` ready
    sockets. True if the cap is in place (now or already).

    trio wakes every task whose socket a poll reports and runs them all in the same
    pass of its loop, before it looks at timers or I/O again. When 10,000 clients
    drop at once a single poll reported up to 2,000 ends of stream: 35 ms in which
    no other session moved. epoll leaves the sockets it did not report ready (in
    order: it hands out its ready list from the front), so the rest wake in the next
    passes, each of which also serves everyone else.

    trio offers no setting for this: its epoll object is replaced by one that asks
    for fewer events. That object is private to trio, so the shape is checked first;
    on other platforms (kqueue) or another trio layout the loop runs uncapped, and
    tests/test_loop_passes.py fails on the pinned trio if the cap stops taking hold.
    """
    try:
        io_manager = trio._core._run.GLOBAL_RUN_CONTEXT.runner.io_manager
        epoll = io_manager._epoll
    except AttributeError:
        return False
    if isinstance(epoll, _CappedEpoll):
        return True
    if not isinstance(epoll, select.epoll):
        return False
    io_manager._epoll = _CappedEpoll(epoll, limit)  # type: ignore[assignment]  # duck-typed
    return True


def tune_garbage_collector() -> None:
    """Everything alive once the server is configured (modules, pydantic schemas)
    lives as long as the process: freeze it out of the collector's scans, keep the
    middle generation small and make full collections rare (the GC_* thresholds).
    No full collection first: at this point it finds about ten unreachable objects
    (imports leave almost no cyclic garbage) and took ~13 ms of every start."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, GC_MIDDLE_THRESHOLD, GC_FULL_THRESHOLD)


def freeze_garbage_collector() -> None:
    """Freeze what is alive now out of the collector's scans, as `tune_garbage_collector`
    did before the loop ran: for what the server imports and builds right after it
    listens (server.warm_up), which lives as long as the process too. No collection
    first either (it would stall the loop): the few cycles of garbage the imports left,
    and those of a request running at that moment, are kept with it."""
    gc.freeze()


def reserve_descriptor_table(max_connections: int) -> str | None:
    """Grow the process's file-descriptor table now to what max_connections needs (a
    client socket and an upstream one each). The kernel grows it by doubling as
    descriptors are opened, and in a process with threads (the store's worker, the log
    writer) every doubling waits for an RCU grace period inside that accept(): stalls
    of the event loop of up to tens of milliseconds while clients connect
    (bench/README.md). The table never shrinks; it takes about 8 bytes of kernel memory
    per descriptor (256 KB for 10,000 connections). Call it before the process starts
    a thread: then the one growth here needs no grace period either (0.05 ms instead
    of ~11 ms). Best effort: a failure changes nothing but the stalls; it returns
    what failed, for the caller to log at WARNING once logging is set up, else None."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * max_connections + 1024
    highest = wanted if soft == resource.RLIM_INFINITY else min(wanted, soft)
    try:
        with open(os.devnull, "rb") as devnull:
            # F_DUPFD takes the lowest free descriptor at or above the one asked:
            # nothing open is touched, and the table now reaches that far.
            os.close(fcntl.fcntl(devnull.fileno(), fcntl.F_DUPFD, highest - 1))
    except OSError as exc:
        return f"could not reserve {highest} file descriptors up front: {exc}"
    return None
