"""``bench.bus_legs`` on a tiny run: every rung measured across real processes, the report naming each."""

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
    done = subprocess.run([sys.executable, "-m", "bench.bus_legs", "--requests", "30", "--rounds", "2", "--json",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    rungs = json.loads(out.read_text())["rungs"]
    assert list(rungs) == list(RUNGS)
    assert all(r["p50_us"] > 0 and r["mean_us"] > 0 for r in rungs.values())
    assert all(f"  {name:16s} {rungs[name]['p50_us']:8.0f}" in done.stdout for name in RUNGS)
