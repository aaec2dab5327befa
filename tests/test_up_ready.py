"""When ``pdserve up`` says it is ready, and what it says when it cannot start: real processes.

One stack (2 prefill, 2 decode, a served model name and an API key, given in
``--engine-args`` and ``--gateway-args``) checks the ready banner: it lists every engine this run started and its ``curl`` works as
pasted.  The other tests start ``pdserve up`` where it cannot succeed and check
that it ends with one line naming the flag to change.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.processes import free_port

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.timeout(600)


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Up:
    """``pdserve up <args>`` with its stdout and stderr in files."""

    def __init__(self, tmp: Path, *args: str):
        self.out, self.err = tmp / "stdout", tmp / "stderr"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", *args], cwd=ROOT,
                                         stdout=out, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    port = free_port()
    up = Up(tmp_path_factory.mktemp("up"), "--prefill", "2", "--decode", "2", "--port", str(port),
            "--engine-args", "--served-model-name 'my model' --num-kv-blocks 64 --device cpu --dtype float32",
            "--gateway-args", "--api-key s3cret")
    try:
        wait_for(lambda: "Ctrl-C stops everything." in up.stdout() or up.proc.poll() is not None, 300,
                 "the ready banner")
        assert up.proc.poll() is None, up.stderr()[-3000:]
        yield up, f"http://127.0.0.1:{port}"
    finally:
        assert up.stop() == 0


def test_ready_means_every_engine_of_this_stack_serves(stack):
    up, url = stack
    banner = up.stdout()
    listed = set(re.search(r"engines ([^)]*)\)", banner).group(1).split(", "))
    instances = httpx.get(url + "/v1/instances", headers={"Authorization": "Bearer s3cret"}, timeout=5).json()
    assert listed == {i["id"] for i in instances["data"]} and len(listed) == 4
    assert sorted(i.rsplit("-", 1)[0] for i in listed) == ["decode-0", "decode-1", "prefill-0", "prefill-1"]


def test_the_banners_curl_works_as_pasted(stack):
    up, url = stack
    (curl,) = [line.strip() for line in up.stdout().splitlines() if line.strip().startswith("curl ")]
    out = subprocess.run(["bash", "-c", curl + " -sS -w '\\n%{http_code}'"], capture_output=True, text=True,
                         timeout=60)
    body, status = out.stdout.rsplit("\n", 1)
    assert status == "200", body
    assert json.loads(body)["model"] == "my model"


def test_each_childs_output_lines_carry_its_name(stack):
    up, _ = stack
    lines = up.stderr().splitlines()
    for name in ("registry", "prefill-0", "prefill-1", "decode-0", "decode-1", "gateway"):
        assert any(line.startswith(f"[{name}] ") for line in lines), name
    logged = [line for line in lines if re.match(r"(\[[\w-]+\] )?\d{4}-\d\d-\d\d ", line)]
    assert all(line.startswith("[") or " services.up." in line for line in logged)
    assert "s3cret" not in up.stderr()  # the API key is masked where up logs the gateway's command


def test_a_taken_port_is_one_line_before_anything_starts(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        up = Up(tmp_path, "--port", str(port), "--ready-timeout-s", "60")
        assert up.proc.wait(60) == 2
    errors = [line for line in up.stderr().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"--port: cannot listen on 127.0.0.1:{port}" in errors[0], up.stderr()
    assert "Traceback" not in up.stderr() and "[registry]" not in up.stderr() and "ready" not in up.stdout()


def test_the_ready_timeout_names_its_flag(tmp_path):
    up = Up(tmp_path, "--port", str(free_port()), "--ready-timeout-s", "0.5", "--device", "cpu")
    assert up.proc.wait(120) == 2
    errors = [line for line in up.stderr().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "--ready-timeout-s: not ready after 0.5 s (not yet serving: prefill-0" in errors[0]
    assert "Traceback" not in up.stderr()


def test_a_child_out_of_restarts_ends_up_with_one_line(tmp_path):
    port = free_port()
    up = Up(tmp_path, "--mode", "colocated", "--port", str(port), "--max-restarts", "0", "--device", "cpu")
    wait_for(lambda: "Ctrl-C stops everything." in up.stdout() or up.proc.poll() is not None, 300, "ready")
    registry = subprocess.run(["pgrep", "-P", str(up.proc.pid), "-f", "services.cli registry "],
                              capture_output=True, text=True).stdout.split()
    os.kill(int(registry[0]), signal.SIGKILL)
    assert up.proc.wait(120) == 2
    errors = [line for line in up.stderr().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "registry exited (-9) after 0 restarts (--max-restarts)" in errors[0]
    assert "Traceback" not in up.stderr()


def test_the_readmes_up_and_curl_commands_work_as_written(tmp_path):
    """README, "The model": its ``pdserve up`` and ``curl``, with the demo model's checkpoint directory as the
    checkpoint, a free port for 8000, and a short ``--ready-timeout-s``."""
    from common.engine.demo_model import ensure_demo_checkpoint

    section = (ROOT / "README.md").read_text().split("## The model", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    up_line, curl = (line for line in block.splitlines() if line.strip())
    port = free_port()
    fill = {"/path/to/hf-checkpoint": str(ensure_demo_checkpoint()), "127.0.0.1:8000": f"127.0.0.1:{port}"}
    for placeholder, value in fill.items():
        up_line, curl = up_line.replace(placeholder, value), curl.replace(placeholder, value)
    command = shlex.split(up_line)
    assert command[:2] == ["pdserve", "up"]
    up = Up(tmp_path, *command[2:], "--port", str(port), "--ready-timeout-s", "120")
    try:
        wait_for(lambda: "Ctrl-C stops everything." in up.stdout() or up.proc.poll() is not None, 300, "ready")
        out = subprocess.run(["bash", "-c", curl + " -sS -w '\\n%{http_code}'"], capture_output=True, text=True,
                             timeout=60)
        body, status = out.stdout.rsplit("\n", 1)
        assert status == "200", body
        assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    finally:
        assert up.stop() == 0
