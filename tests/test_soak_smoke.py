"""`bench/soak.py --quick` runs end to end with tiny numbers and produces its report:
turns completed, errors by kind, RSS samples, and fds back to their start count."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

PROJECT_DIR = Path(__file__).resolve().parents[1]
SOAK_TIMEOUT_S = 45.0


async def test_soak_quick_mode_produces_a_report_with_no_leaked_fds(tmp_path: Path) -> None:
    report_path = tmp_path / "soak.json"
    with trio.fail_after(SOAK_TIMEOUT_S):
        result = await trio.run_process(
            [
                sys.executable,
                str(PROJECT_DIR / "bench" / "soak.py"),
                "--quick",
                "--duration",
                "6",
                "--clients",
                "12",
                "--json",
                str(report_path),
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output
    for line in ("turns", "errors by kind", "server RSS", "RSS samples", "server fds"):
        assert line in output, output
    report = json.loads(report_path.read_text())
    assert report["turns_completed"] > 0
    assert len(report["rss_samples"]) >= 3
    assert report["fds_back_to_start"], report
    assert report["server_exit_code"] == 0 and report["server_tracebacks"] == 0, report
