"""What keeps each pass of the event loop short when thousands of connections act at
once: the cap on ready sockets one I/O poll reports, and the server-wide timers that
keep a deadline per idle connection out of trio's deadline heap.
"""

from __future__ import annotations

import socket

import trio
import trio.testing

from chat.pacing import ConnectionTimers, cap_io_events_per_pass
from conftest import CLIENT_WAIT_S, open_chat
from server import ChatServer

SOCKETS = 40  # more than the cap below, far fewer than a default fd limit
VIRTUAL_LIMIT_S = 3600.0  # on the autojump clock: reached at once if a wake-up is lost


class _TaskStepsPerPass(trio.abc.Instrument):
    """How many task steps each pass of the loop ran."""

    def __init__(self) -> None:
        self.steps: list[int] = [0]

    def after_io_wait(self, timeout: float) -> None:
        self.steps.append(0)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[-1] += 1


async def _most_wakeups_in_one_pass() -> tuple[int, int]:
    """SOCKETS tasks wait for their socket; all sockets become readable at once.
    Returns (the most task steps in one pass, how many tasks woke)."""
    pairs = [socket.socketpair() for _ in range(SOCKETS)]
    woke = 0

    async def wait_for(sock: socket.socket) -> None:
        nonlocal woke
        await trio.lowlevel.wait_readable(sock)
        woke += 1

    counter = _TaskStepsPerPass()
    try:
        with trio.fail_after(CLIENT_WAIT_S):
            async with trio.open_nursery() as waiters:
                for ours, _ in pairs:
                    waiters.start_soon(wait_for, ours)
                await trio.testing.wait_all_tasks_blocked()
                trio.lowlevel.add_instrument(counter)
                for _, theirs in pairs:
                    theirs.send(b"x")
    finally:
        trio.lowlevel.remove_instrument(counter)
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
    return max(counter.steps), woke


async def test_without_the_cap_one_poll_wakes_every_ready_socket_in_one_pass() -> None:
    most_in_a_pass, woke = await _most_wakeups_in_one_pass()
    assert woke == SOCKETS
    assert most_in_a_pass >= SOCKETS


async def test_the_cap_spreads_ready_sockets_over_passes_and_every_one_wakes() -> None:
    # Fails if trio's I/O manager changes shape under the cap (it then returns False).
    assert cap_io_events_per_pass(8)
    assert cap_io_events_per_pass(8)  # a second server in the same loop: already capped
    most_in_a_pass, woke = await _most_wakeups_in_one_pass()
    assert woke == SOCKETS
    # Each woken task runs one step in the pass after its poll; the test's own task
    # and the nursery's wake-up may share a pass with them.
    assert most_in_a_pass <= 8 + 2


def test_outside_a_trio_loop_there_is_nothing_to_cap() -> None:
    assert not cap_io_events_per_pass(8)


async def test_timers_wake_each_sleeper_at_its_time_in_order(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    timers = ConnectionTimers()
    nursery.start_soon(timers.run)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, when: float) -> None:
        await timers.sleep_until(when)
        woke.append((name, trio.current_time()))

    start = trio.current_time()
    with trio.fail_after(VIRTUAL_LIMIT_S):  # the clock jumps: a lost wake-up fails
        async with trio.open_nursery() as sleepers:
            sleepers.start_soon(sleeper, "late", start + 30.0)
            sleepers.start_soon(sleeper, "middle", start + 20.0)
            await trio.testing.wait_all_tasks_blocked()
            # Earlier than what the timer task is waiting for: it must wake for this one.
            sleepers.start_soon(sleeper, "early", start + 5.0)
            sleepers.start_soon(sleeper, "past", start - 1.0)
    assert [name for name, _ in woke] == ["past", "early", "middle", "late"]
    assert [at - start for _, at in woke] == [0.0, 5.0, 20.0, 30.0]
    assert len(timers) == 0


async def test_a_cancelled_sleeper_leaves_nothing_behind_and_others_still_wake(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    timers = ConnectionTimers()
    nursery.start_soon(timers.run)
    woke: list[str] = []

    async def sleeper(name: str, when: float) -> None:
        await timers.sleep_until(when)
        woke.append(name)

    start = trio.current_time()
    with trio.fail_after(VIRTUAL_LIMIT_S):
        async with trio.open_nursery() as sleepers:
            with trio.CancelScope() as gone:
                async with trio.open_nursery() as cancelled:
                    for n in range(100):
                        cancelled.start_soon(sleeper, f"gone{n}", start + 10.0 + n)
                    sleepers.start_soon(sleeper, "kept", start + 50.0)
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(timers) == 101
                    gone.cancel()
            assert len(timers) == 1
    assert woke == ["kept"]
    assert trio.current_time() - start == 50.0
    assert len(timers) == 0


async def test_thousands_of_sleepers_hold_one_trio_deadline(nursery: trio.Nursery) -> None:
    """The point of the timers: trio's deadline heap (rebuilt in one go inside a loop
    pass) does not grow with the number of idle connections."""
    deadlines = trio._core._run.GLOBAL_RUN_CONTEXT.runner.deadlines
    timers = ConnectionTimers()
    nursery.start_soon(timers.run)
    await trio.testing.wait_all_tasks_blocked()
    before = deadlines._active
    async with trio.open_nursery() as sleepers:
        for n in range(2000):
            sleepers.start_soon(timers.sleep_until, trio.current_time() + 3600.0 + n)
        await trio.testing.wait_all_tasks_blocked()
        assert len(timers) == 2000
        assert deadlines._active <= before + 1
        sleepers.cancel_scope.cancel()
    assert len(timers) == 0


async def test_an_idle_connection_waits_on_the_server_timers(server: ChatServer) -> None:
    async with open_chat(server, "idle-1") as first, open_chat(server, "idle-2", "bob"):
        await first.send(type="ping")
        await first.receive_until("pong")
        # Each idle connection's heartbeat waits here, none on a trio deadline of its own.
        assert len(server.timers) == 2
    with trio.fail_after(CLIENT_WAIT_S):
        await server.wait_for_connection_count(0)
    assert len(server.timers) == 0
