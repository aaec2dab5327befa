"""The evaluation driver's arithmetic: scraping /metrics, per-run means, the handoff split, the greedy check;
the ``pdserve up`` command it starts; where its results go."""

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.eval_pd import (EvalConfig, Stack, check_completion, checks_agree, client_first_itl_ms, handoff_split,
                           metric_means, scrape, tables)
from common.config import from_args
from services.cli import build_parser
from services.gateway.metrics import GatewayMetrics
from services.up import UpConfig

ROOT = Path(__file__).parents[1]


@contextlib.contextmanager
def http_server(get: Callable[[], bytes], post: Callable[[dict], bytes] | None = None):
    """A local HTTP server answering GET with ``get()``, a POST of a JSON body with ``post(body)``; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.reply(get())

        def do_POST(self):
            self.reply(post(json.loads(self.rfile.read(int(self.headers["Content-Length"])))))

        def reply(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture
def metrics_server():
    metrics = GatewayMetrics()
    with http_server(metrics.render) as url:
        yield metrics, url


def test_means_cover_only_what_a_run_observed(metrics_server):
    metrics, url = metrics_server
    metrics.ttft.observe(9.0)  # before the run: must not count
    before = scrape(url)
    for v in (0.1, 0.3):
        metrics.ttft.observe(v)
    metrics.kv_transfer.observe(0.004)
    means = metric_means(before, scrape(url))
    assert means["pdserve_gateway_ttft_seconds"] == pytest.approx({"mean": 0.2, "count": 2})
    assert means["pdserve_gateway_kv_transfer_seconds"] == pytest.approx({"mean": 0.004, "count": 1})
    assert "pdserve_gateway_tpot_seconds" not in means  # nothing observed


def _result(mode: str, **ms: float) -> dict:
    means = {f"pdserve_gateway_{k}_seconds": {"mean": v / 1000, "count": 4} for k, v in ms.items()}
    return {"mode": mode, "handoff": {"metrics": means, "summary": {"ttft_ms": {"mean": 110.0, "p50": 105.0}},
                                      "first_itl_ms": {"mean": 12.0, "p50": 10.5}}}


def test_handoff_split_adds_up_to_the_measured_totals():
    split = handoff_split(_result("disagg", ttft=104, prefill_leg=102, prefill_queue=0.5, prefill=99,
                                  first_itl=11, decode_dispatch=1, decode_first_output=10, kv_transfer=3,
                                  first_decode_step=6))
    ttft, itl = split["ttft_parts"], split["first_itl_parts"]
    assert ttft == pytest.approx({"gateway": 2, "bus + engine service": 2.5, "prefill queue": 0.5,
                                  "prefill compute": 99})
    assert sum(ttft.values()) == pytest.approx(104)
    assert itl == pytest.approx({"gateway dispatch": 1, "bus + alloc + handshake": 1, "KV transfer": 3,
                                 "first decode step": 6})
    assert sum(itl.values()) == pytest.approx(11) and not split["missing"]
    assert (split["client_first_itl_ms"], split["client_first_itl_p50_ms"], split["client_ttft_p50_ms"]) == (12, 10.5, 105)


def test_gateway_dispatch_is_the_measured_dispatch_never_negative():
    # the first gap is timed from the first token's delivery, decode's first output from the decode Generate's
    # send: when the delivery comes after the send, first gap < decode's first output (here by 4.5 ms)
    split = handoff_split(_result("disagg", ttft=104, prefill_leg=102, prefill_queue=0.5, prefill=99,
                                  first_itl=8, decode_dispatch=0.1, decode_first_output=12.5, kv_transfer=3,
                                  first_decode_step=6))
    assert split["first_itl_parts"]["gateway dispatch"] == pytest.approx(0.1)
    assert all(v >= 0 for part in ("ttft_parts", "first_itl_parts") for v in split[part].values())
    assert "| first_itl: gateway dispatch | 0.1 |" in tables({"disagg": {"sweep": [], "handoff_split": split}})


def test_handoff_split_names_what_the_gateway_did_not_expose():
    split = handoff_split(_result("disagg", ttft=104, prefill_leg=102, prefill=99, first_itl=11))
    assert split["ttft_parts"]["bus + engine service"] is None  # the queue time is missing
    assert "pdserve_gateway_prefill_queue_seconds" in split["missing"]
    assert "pdserve_gateway_kv_transfer_seconds" in split["missing"]
    assert "pdserve_gateway_decode_dispatch_seconds" in split["missing"]
    assert split["first_itl_parts"]["gateway dispatch"] is None
    colocated = handoff_split(_result("colocated", ttft=50, prefill_leg=48, prefill_queue=0.1, prefill=45,
                                      first_itl=3.3))
    assert colocated["first_itl_parts"] == pytest.approx({"decode step (batched)": 3.3})


def test_greedy_check_compares_tokens_not_only_text():
    bodies = []

    def complete(body: dict) -> bytes:
        bodies.append(body)
        logprobs = {"tokens": ["", "a", ""], "token_logprobs": [-0.1] * 3, "top_logprobs": [{}] * 3,
                    "text_offset": [0, 0, 1]}
        return json.dumps({"choices": [{"index": 0, "text": "a", "logprobs": logprobs, "finish_reason": "length"}],
                           "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}).encode()

    with http_server(lambda: json.dumps({"data": [{"id": "m"}]}).encode(), complete) as url:
        check = check_completion(url, 3)
    assert bodies[0]["logprobs"] == 0 and bodies[0]["max_tokens"] == 3 and bodies[0]["model"] == "m"
    assert check["tokens"] == ["", "a", ""] and check["usage"]["completion_tokens"] == 3
    # the same text from other tokens (here: one token fewer that decodes to nothing) is a disagreement
    assert not checks_agree([check, check | {"tokens": ["a", ""]}])
    assert checks_agree([check, dict(check)])


@pytest.mark.parametrize("mode, prefill_args, decode_args", [("disagg", "-tp 2", "--block-size=32"),
                                                             ("colocated", "", "")])
def test_role_flags_reach_pdserve_up_for_the_disaggregated_stack_only(monkeypatch, tmp_path, mode, prefill_args,
                                                                       decode_args):
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **kwargs: started.append(argv))
    config = EvalConfig(prefill_args="-tp 2", decode_args="--block-size=32", gpus=[0, 1, 2])
    stack = Stack(config, mode, "demo", tmp_path)
    try:
        stack.start()
    finally:
        stack.log.close()
    (argv,) = started
    up = from_args(UpConfig, build_parser("up").parse_args(argv[argv.index("up"):]))
    assert (up.mode, up.prefill_args, up.decode_args, up.gpus) == (mode, prefill_args, decode_args, [0, 1, 2])


def test_results_go_to_the_work_dir_not_the_working_directory(tmp_path):
    """By default nothing lands in the working directory (run from the repository, that was docs/eval)."""
    cwd, work = tmp_path / "cwd", tmp_path / "work"
    cwd.mkdir()
    run = subprocess.run([sys.executable, "-m", "bench.eval_pd", "--modes", "disagg", "--engine-args", "--dtype nosuch",
                          "--work-dir", str(work), "--ready-timeout-s", "120"],
                         cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 1 and "no configuration could be measured" in run.stderr
    assert list(cwd.iterdir()) == []
    doc = json.loads((work / "cpu" / "cpu.json").read_text())  # the failure is recorded beside the logs
    assert set(doc["failed"]) == {"disagg"} and (work / "cpu" / "disagg.log").is_file()


def test_client_first_gap_has_mean_and_median():
    requests = [{"error": None, "itl_s": [0.010, 0.5]}, {"error": None, "itl_s": [0.020]},
                {"error": None, "itl_s": [0.060]}, {"error": "timeout", "itl_s": [9.0]}, {"error": None, "itl_s": []}]
    gaps = client_first_itl_ms({"runs": [{"requests": requests}]})
    assert gaps == pytest.approx({"mean": 30.0, "p50": 20.0})  # one slow first request moves only the mean
    assert client_first_itl_ms({"runs": [{"requests": requests[3:]}]}) is None
