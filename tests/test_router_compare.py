"""``bench.router_compare`` on tiny runs with several fake engines per role, and its per-process CPU accounting."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.process_cpu import ProcessCPU, cpu_per_request, tree_cpu_s
from bench.router_compare import cpu_list
from tests.procs import eventually

ROOT = Path(__file__).parents[1]
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\ntime.sleep(60)"


def test_cpu_per_request_is_cpu_over_requests_and_busy_is_cpu_over_wall_time():
    assert cpu_per_request({"decode 1": 0.5, "load x2": 1.5}, requests=1000, elapsed_s=2.0) == {
        "decode 1": {"cpu_us": 500.0, "busy": 0.25}, "load x2": {"cpu_us": 1500.0, "busy": 0.75}}


async def test_a_process_trees_cpu_counts_its_childrens():
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {BURN.format(s=0.4)!r}])\ntime.sleep(60)"])
    cpu = ProcessCPU({"tree": parent.pid})
    cpu.start()
    try:
        await eventually(lambda: children(parent.pid), timeout=30)
        child = children(parent.pid)[0]
        await eventually(lambda: tree_cpu_s(child) >= 0.4, timeout=30)
        assert tree_cpu_s(parent.pid) >= tree_cpu_s(child) >= 0.4
        assert 0.4 - 0.1 <= cpu.stop()["tree"] < 0.4 + 2.0  # the burn, not the sleep (interpreters' start-up aside)
    finally:
        for pid in children(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def run_compare(tmp_path, *args: str) -> dict:
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, "-m", "bench.router_compare", "--fake-engines", "2", "--bus-fakes", "instant",
                    "--requests", "100", "--rounds", "1", "--concurrency", "8", "--routers-venv",
                    str(tmp_path / "no-venv"), "--json", str(out), *args], cwd=ROOT, check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


FAKES = {"prefill 1", "prefill 2", "decode 1", "decode 2"}


@pytest.mark.timeout(150)
def test_a_sweep_with_two_fake_engines_reports_the_harness_ceiling_and_every_process(tmp_path):
    """Every target up at once, the gateways pinned to CPU 0 (``taskset``) while the harness runs anywhere."""
    result = run_compare(tmp_path, "--sweep", "1,2", "--load-processes", "2", "--router-cpus", "0")
    for mode in ("non-streaming", "streaming"):
        rows = result[mode]
        assert list(rows) == ["direct (harness ceiling)", "pdserve (instant fakes)", "pdserve x2 (instant fakes)"]
        assert rows["direct (harness ceiling)"]["router_cpu_us"] is None
        assert set(rows["direct (harness ceiling)"]["processes"]) == {"load x2", "direct 1", "direct 2"}
        for name in ("pdserve (instant fakes)", "pdserve x2 (instant fakes)"):
            assert set(rows[name]["processes"]) == FAKES | {"load x2"}
            assert rows[name]["router_cpu_us"] > 0
        assert all(r["rps"] > 0 for r in rows.values())
    assert result["router_cpus"] == {"pdserve (instant fakes)": [0], "pdserve x2 (instant fakes)": [0]}


def test_cpu_lists_are_written_as_taskset_reads_them():
    assert [cpu_list(c) for c in ([0], [0, 1, 2, 5], list(range(16)), [1, 3])] == ["0", "0-2,5", "0-15", "1,3"]


def test_router_cpus_outside_a_sweep_is_refused():
    done = subprocess.run([sys.executable, "-m", "bench.router_compare", "--router-cpus", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "--router-cpus applies to a --sweep" in done.stderr


@pytest.mark.timeout(150)
def test_no_peers_and_two_concurrencies_measure_each_pdserve_target_at_each(tmp_path):
    result = run_compare(tmp_path, "--no-peers", "--concurrency", "8,16")
    assert result["concurrency"] == 8
    assert set(result["skipped"]) == {"vllm-router", "sglang-router"}
    for mode in ("non-streaming", "streaming"):
        rows = result[mode]
        assert list(rows) == ["pdserve (instant fakes)", "pdserve (instant fakes) at 16"]
        assert all(r["rps"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in rows.values())
