"""``bench.host_step`` runs on CPU: the decode graphs' path (``RerunGraph``), async and synchronous windows."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def host_step(*flags: str) -> list[list[str]]:
    """The rows of the bench's table (batch, mode, figures...)."""
    done = subprocess.run([sys.executable, "-m", "bench.host_step", "--batch-sizes", "1,3", "--warmup", "1",
                           "--steps", "4", "--repeats", "1", "--input-len", "20", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = lines.index("batch  mode   step_ms  fwd_ms  host_ms  host/fwd")
    return [line.split() for line in lines[header + 1 :]]


def test_it_reports_host_time_per_step_of_each_batch_and_mode():
    rows = host_step()
    assert [row[:2] for row in rows] == [["1", "async"], ["1", "sync"], ["3", "async"], ["3", "sync"]]
    for _, _, step, fwd, host, ratio in rows:
        assert float(step) > float(fwd) > 0 and float(host) > 0 and ratio.endswith("x")
    null = host_step("--null-forward")
    assert all(row[-1] == "-" for row in null)
