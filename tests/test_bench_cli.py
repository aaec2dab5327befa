"""The bench modules' shared command line (``bench.cli``): the report goes to stdout, the result to ``--json``;
and one module through it for real (``bench.handoff_overhead`` on a real P/D stack, tiny sizes)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from bench.cli import bench_parser, run_bench

ROOT = Path(__file__).parents[1]


def test_run_bench_prints_the_report_and_writes_the_result(tmp_path, capsys):
    async def run(args) -> dict:
        await asyncio.sleep(0)  # on a running loop
        return {"requests": args.requests}

    parser = bench_parser("A measurement.")
    parser.add_argument("--requests", type=int, default=1)
    out = tmp_path / "result.json"
    result = run_bench(parser.parse_args(["--requests", "3", "--json", str(out)]), run,
                       lambda r: f"{r['requests']} requests")
    assert result == {"requests": 3} == json.loads(out.read_text())
    assert capsys.readouterr().out == "3 requests\n"
    run_bench(parser.parse_args([]), run, lambda r: "no file")
    assert capsys.readouterr().out == "no file\n"


def test_a_bench_module_prints_its_report_and_writes_its_json(tmp_path):
    out = tmp_path / "handoff.json"
    done = subprocess.run([sys.executable, "-m", "bench.handoff_overhead", "--requests", "3", "--warmup", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["setup"]["requests"] == 3
    assert f"handoff overhead p50 = {result['overhead_over_round_trip_p50']:.2f} x bus round trip p50" in done.stdout
