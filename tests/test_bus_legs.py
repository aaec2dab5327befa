"""``bench.bus_legs`` on a tiny run: every rung measured across real processes, the report naming each and the
idle time between round trips."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bus_legs import RUNGS

ROOT = Path(__file__).parents[1]


@pytest.mark.timeout(150)
def test_every_rung_is_measured_and_reported(tmp_path):
    out = tmp_path / "legs.json"
    command = [sys.executable, "-m", "bench.bus_legs", "--requests", "30", "--rounds", "2", "--idle-us", "200",
               "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["idle_us"] == 200 and "1 in flight, 200 us idle between round trips" in done.stdout
    rungs = result["rungs"]
    assert list(rungs) == list(RUNGS)
    assert all(r["p50_us"] > 0 and r["mean_us"] > 0 for r in rungs.values())
    assert all(f"  {name:16s} {rungs[name]['p50_us']:8.0f}" in done.stdout for name in RUNGS)
