"""The benchmarks still run: ``python -m bench.run_all --smoke`` finishes and prints every table.

Benchmark figures are never asserted here (a shared CI machine is too noisy
for that); BENCHMARKS.md quotes them from a full run.  This only guards the
scripts themselves against rot as the package changes under them: every
benchmark starts its processes, measures, cleans up and reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLES = (
    "Failover: celery-stoker",
    "Failover: RedBeat",
    "Failover ratio",
    "Clean failover in a rolling deploy",
    "Clean failover by phase",
    "First event of a new term",
    "Commands to stoker_url per clean failover",
    "Footprint",
    "Dispatch latency",
    "Recovery",
    "Redis cost",
    "Worker overhead",
    "Scale",
)


@pytest.mark.workers
@pytest.mark.timeout(240)
def test_run_all_smoke_prints_every_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run_all", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for title in TABLES:
        assert title in result.stdout, f"no {title!r} table in:\n{result.stdout[-4000:]}"
    for name in (
        "failover",
        "handover",
        "dispatch",
        "recovery",
        "idle",
        "footprint",
        "scale",
        "machine",
    ):
        json.loads((tmp_path / f"{name}.json").read_text())
    assert "Failover: celery-stoker" in (tmp_path / "tables.md").read_text()
