"""An engine service that cannot start says what to change in one line and exits 2 (no traceback).

Each case runs the real ``pdserve prefill`` process; none gets as far as the registry.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.engine.demo_model import ensure_demo_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefill(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PDSERVE_CACHE_DIR": str(tmp_path / "cache"),
           "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    return subprocess.run([sys.executable, "-m", "services.cli", "prefill", *args, "--registry", "tcp://127.0.0.1:1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def assert_one_error_line(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, out.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_an_unreachable_hub_id(tmp_path):
    out = start_prefill(tmp_path, "nosuch/hub-id")
    assert_one_error_line(out, "'nosuch/hub-id'", "Hugging Face Hub", "pass a local model directory or 'demo'")


def test_an_unreachable_tokenizer_hub_id(tmp_path):
    out = start_prefill(tmp_path, "--tokenizer", "nosuch/tokenizer")
    assert_one_error_line(out, "tokenizer 'nosuch/tokenizer'", "pass a local tokenizer directory or 'demo'")


def test_a_directory_that_is_no_checkpoint(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert_one_error_line(start_prefill(tmp_path, str(tmp_path / "model")), "config.json", "not supported")


def test_a_corrupt_weights_file(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ensure_demo_checkpoint(tmp_path / "demo"), model)
    (model / "model.safetensors").write_bytes(b"not safetensors")
    assert_one_error_line(start_prefill(tmp_path, str(model)), "model.safetensors", "corrupt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu(tmp_path):
    assert_one_error_line(start_prefill(tmp_path, "--device", "cuda"), "--device", "CUDA is not available")
