"""The benchmark still runs: `bench/bench.py --quick` ends by itself and prints one JSON
line with every figure as a finite number.

With `BENCH_PASS_DETAIL=1` the stall report also says where the longest passes went.

Only the shape is checked, never the values: on a loaded CI machine the figures say
nothing, but a bench that no longer runs, or lost a figure, fails here. Bounded by
SMOKE_TIMEOUT_S (the quick mode takes < 30 s on an idle 2-core machine).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"
SMOKE_TIMEOUT_S = 180
FIGURES = (
    "idle_kb_per_conn_1",
    "idle_kb_per_conn_2",
    "relay_cpu_s_per_1000_deltas",
    "relay_deltas_per_s",
    "unpaced_deltas_per_s",
    "latency_p50_ms",
    "latency_p99_ms",
    "ttfd_quiet_p50_ms",
    "ttfd_load_p50_ms",
    "stop_p50_ms",
    "stop_p99_ms",
    "stall_max_ms",
)


def _quick_bench(*args: str, env: dict[str, str] | None = None) -> str:
    """Run `bench.py --quick` with `args`; its stdout, once it exited 0."""
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_quick_bench_prints_every_figure_as_a_number() -> None:
    stdout = _quick_bench()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, stdout[-4000:]
    figures = json.loads(lines[-1])
    assert figures["bench"] == "quick"
    for name in FIGURES:
        assert name in figures, name
    problems = {
        name: value
        for name, value in figures.items()
        if name != "bench" and not (isinstance(value, int | float) and math.isfinite(value))
    }
    assert not problems, (problems, stdout[-4000:])


def test_pass_detail_says_where_the_longest_passes_went() -> None:
    stdout = _quick_bench("--only", "idle", "--keep", env={**os.environ, "BENCH_PASS_DETAIL": "1"})
    kept = [line for line in stdout.splitlines() if line.startswith("work dir kept: ")]
    assert kept, stdout[-4000:]
    work = Path(kept[-1].removeprefix("work dir kept: "))
    try:
        stalls = (work / "server-stalls.jsonl").read_text()
        reports = [json.loads(line) for line in stalls.splitlines()]
    finally:
        shutil.rmtree(work)
    details = [report["longest_pass"] for report in reports if report.get("longest_pass")]
    assert details, reports
    for detail in details:
        assert detail["before_first_step_ms"] >= 0 and detail["between_steps_ms"] >= 0
        for where, steps, ms in detail["steps"]:
            assert " @ " in where and steps >= 1 and ms >= 0
