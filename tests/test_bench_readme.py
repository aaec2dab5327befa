"""The README's ``pdserve bench`` command, exactly as written but for a small ``--num-prompts`` and the
stack's URL, against a real ``pdserve up`` of the demo model; and a model the stack does not serve."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.eval_pd import EvalConfig, Stack

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.timeout(600)


def readme_bench_command() -> list[str]:
    """The command of the README's "Measuring it" section, as argv."""
    section = (ROOT / "README.md").read_text().split("## Measuring it", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return shlex.split(block.replace("\\\n", " "))


def set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced, or the flag appended."""
    if flag not in argv:
        return [*argv, flag, value]
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def pdserve(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``pdserve`` (``services.cli``, this checkout's) with ``argv`` in ``cwd``."""
    assert argv[0] == "pdserve"
    return subprocess.run([sys.executable, "-m", "services.cli", *argv[1:]], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """``pdserve up`` with its defaults: the demo model, one prefill and one decode engine."""
    s = Stack(EvalConfig(engine_args=""), "disagg", "demo", tmp_path_factory.mktemp("stack"))
    try:
        s.start()
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_the_readme_command_measures_exact_lengths(stack, tmp_path):
    argv = set_flag(set_flag(readme_bench_command(), "--url", stack.url), "--num-prompts", "3")
    run = pdserve(argv, tmp_path)
    assert run.returncode == 0, run.stderr
    # the demo model's tokenizer, found through /v1/models: no approximation, no warning
    assert "WARNING" not in run.stderr
    assert re.search(r"^prompt length: 1024\.0 tokens by .*demo.*tokenizer\.json .*server counted 1025\.0 tokens",
                     run.stdout, re.M)  # the server's count adds the BOS token
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.png", "results.json"]  # what --out, --plot name
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["model"] == "demo" and doc["dataset"]["length_method"] == "tokenizer-exact"
    assert doc["dataset"]["measured_mean_prompt_len"] == 1025
    assert [run["request_rate"] for run in doc["runs"]] == [1, 2, 4]
    for r in doc["runs"]:
        assert (r["summary"]["completed"], r["summary"]["errors"]) == (3, {})
        assert r["summary"]["total_output_tokens"] == 3 * 128


def test_a_model_not_served_fails_with_the_servers_message(stack, tmp_path):
    run = pdserve(["pdserve", "bench", "--url", stack.url, "--model", "nosuch", "--num-prompts", "2",
                   "--input-len", "8", "--output-len", "2", "--progress", "false"], tmp_path)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("pdserve bench: 2 of 2 requests failed at rate inf (more than --max-failure-ratio 0.05)")
    assert re.search(r"the first: http_40[04]: .*nosuch.*demo", last)  # the gateway's message names what it serves
    assert list(tmp_path.iterdir()) == []
