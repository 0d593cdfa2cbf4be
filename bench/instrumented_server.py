"""Run ``server.main()`` unchanged, with a trio Instrument that measures loop stalls.

    python bench/instrumented_server.py STALL_FILE serve --port 0 --db ... (server.py's args)

A stall is one pass of trio's run loop between two I/O waits: from ``after_io_wait``
to the next ``before_io_wait`` the loop runs ready tasks and polls nothing, so a
task that became ready meanwhile (a socket became readable, a timer expired) waits
at least that long. Two calls per loop pass: cheap enough to leave on while the
CPU cost is measured. Each report also gives the main thread's CPU time in that
longest pass (wall much larger than CPU: the process was descheduled or blocked in
a syscall, not computing), the most CPU any one pass used, and the longest
garbage-collector pause.

On SIGUSR1 the largest pass since the last SIGUSR1 is appended to STALL_FILE as a
JSON line and the maximum is reset; on exit a last line (``"final": true``) with
the maximum over the whole run is written. The whole run starts at the first
SIGUSR1, which the bench sends once the server listens: startup (imports, TLS
contexts) happens before anyone can connect. With ``BENCH_CPROFILE=PATH`` in the
environment, cProfile runs between pairs of SIGUSR2 (the bench sends them at the
start and end of each CPU window) and the stats are dumped to PATH on exit:
deterministic call counts for exactly the work that the CPU figures bill.

With ``BENCH_PASS_DETAIL=1`` every task step is timed too (it costs a little per
step, so it stays off for the CPU figures), and each report gains ``longest_pass``:
where the longest pass spent its time (before its first task step: the I/O
events and trio's deadlines; between steps: freeing finished tasks; after the last)
and, per task and the code line it resumed at, how many steps and how many ms.
"""

from __future__ import annotations

import collections
import cProfile
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import server  # noqa: E402

TRIO_DIR = str(Path(trio.__file__).parent)


def _resumed_at(task: trio.lowlevel.Task) -> str:
    """`task`, and the innermost line outside trio itself that it is suspended at."""
    where = "?"
    awaiting: Any = task.coro
    while awaiting is not None:
        frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "ag_frame", None)
        if frame is not None and not frame.f_code.co_filename.startswith(TRIO_DIR):
            where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "ag_await", None)
    return f"{'.'.join(task.name.rsplit('.', 2)[-2:])} @ {where}"


class PassDetail:
    """The task steps of the current loop pass, and a summary of the longest one."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, float]] = []
        self._pass_started = 0.0
        self._first_step_at: float | None = None
        self._between_s = 0.0
        self._last_step_ended = 0.0
        self._step_started = 0.0
        self._resumed_at = ""
        self.longest: dict[str, Any] | None = None

    def pass_began(self, at: float) -> None:
        self._steps = []
        self._pass_started = self._last_step_ended = at
        self._first_step_at = None
        self._between_s = 0.0

    def step_began(self, task: trio.lowlevel.Task) -> None:
        self._resumed_at = _resumed_at(task)
        now = time.perf_counter()
        if self._first_step_at is None:
            self._first_step_at = now
        else:
            self._between_s += now - self._last_step_ended
        self._step_started = now

    def step_ended(self) -> None:
        self._last_step_ended = time.perf_counter()
        self._steps.append((self._resumed_at, self._last_step_ended - self._step_started))

    def pass_was_longest(self, ended: float) -> None:
        count: collections.Counter[str] = collections.Counter()
        spent: collections.Counter[str] = collections.Counter()
        for where, took in self._steps:
            count[where] += 1
            spent[where] += took * 1000
        first = self._first_step_at if self._first_step_at is not None else ended
        self.longest = {
            "before_first_step_ms": round((first - self._pass_started) * 1000, 2),
            "between_steps_ms": round(self._between_s * 1000, 2),
            "after_last_step_ms": round((ended - self._last_step_ended) * 1000, 2)
            if self._steps else 0.0,
            "steps": [[where, count[where], round(ms, 2)] for where, ms in spent.most_common(8)],
        }


class StallMeter(trio.abc.Instrument):
    """Longest loop pass without an I/O poll, since the last reset and overall."""

    def __init__(self, detail: PassDetail | None = None) -> None:
        self._pass_started: float | None = None
        self._pass_cpu_started = 0.0
        self._gc_started = 0.0
        self.max_s = 0.0
        self.max_cpu_of_max_s = 0.0  # main-thread CPU time spent in the longest pass
        self.max_cpu_s = 0.0  # the pass that used the most CPU
        self.overall_max_s = 0.0
        self.reported = False
        self.passes = 0
        self.over_5ms = 0
        self.gc_max_s = 0.0
        self.gc_full = 0
        self.detail = detail
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_started
        self.gc_max_s = max(self.gc_max_s, took)
        if info.get("generation") == 2:
            self.gc_full += 1

    def after_io_wait(self, timeout: float) -> None:
        self._pass_started = time.perf_counter()
        self._pass_cpu_started = time.thread_time()
        if self.detail is not None:
            self.detail.pass_began(self._pass_started)

    def before_io_wait(self, timeout: float) -> None:
        if self._pass_started is None:
            return
        ended = time.perf_counter()
        took = ended - self._pass_started
        cpu = time.thread_time() - self._pass_cpu_started
        self._pass_started = None
        self.passes += 1
        self.max_cpu_s = max(self.max_cpu_s, cpu)
        if took > 0.005:
            self.over_5ms += 1
        if took > self.max_s:
            self.max_s = took
            self.max_cpu_of_max_s = cpu
            if self.detail is not None:
                self.detail.pass_was_longest(ended)
            if took > self.overall_max_s:
                self.overall_max_s = took

    def report(self, final: bool = False) -> dict[str, Any]:
        line = {
            "max_stall_ms": (self.overall_max_s if final else self.max_s) * 1000,
            "passes": self.passes,
            "passes_over_5ms": self.over_5ms,
            "max_stall_cpu_ms": self.max_cpu_of_max_s * 1000,
            "max_pass_cpu_ms": self.max_cpu_s * 1000,
            "gc_max_ms": self.gc_max_s * 1000,
            "gc_full_collections": self.gc_full,
            "final": final,
        }
        if self.detail is not None:
            line["longest_pass"] = self.detail.longest  # type: ignore[assignment]
        if not self.reported:
            self.reported = True
            self.overall_max_s = 0.0
        self.max_s = 0.0
        self.max_cpu_of_max_s = 0.0
        self.max_cpu_s = 0.0
        self.gc_max_s = 0.0
        self.gc_full = 0
        self.passes = 0
        self.over_5ms = 0
        return line


class DetailedStallMeter(StallMeter):
    """A StallMeter that also times every task step (trio calls these two hooks only
    on instruments that define them)."""

    def __init__(self) -> None:
        super().__init__(PassDetail())

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        assert self.detail is not None
        self.detail.step_began(task)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        assert self.detail is not None
        self.detail.step_ended()


def main() -> int:
    stall_file = Path(sys.argv[1])
    argv = sys.argv[2:]
    meter = DetailedStallMeter() if os.environ.get("BENCH_PASS_DETAIL") else StallMeter()

    def write(line: dict[str, Any]) -> None:
        with stall_file.open("a") as out:
            out.write(json.dumps(line) + "\n")

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        write(meter.report())

    profile_path = os.environ.get("BENCH_CPROFILE")
    profiler = cProfile.Profile() if profile_path else None
    profiling = False

    def on_usr2(signum: int, frame: FrameType | None) -> None:
        nonlocal profiling
        if profiler is not None:
            profiling = not profiling
            if profiling:
                profiler.enable()
            else:
                profiler.disable()

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGUSR2, on_usr2)
    try:
        return server.main(argv, instruments=[meter])
    finally:
        if profiler is not None and profile_path:
            profiler.disable()
            profiler.dump_stats(profile_path)
        write(meter.report(final=True))


if __name__ == "__main__":
    sys.exit(main())
