#!/usr/bin/env bash
# Issue 6's GPU part: P/D (prefill on GPU 0, decode on GPU 1) vs two colocated instances (one per GPU).
#
#   OUT=/tmp/eval-gpu bash bench/eval_gpu.sh        # from the repository root, on a host with 2 NVIDIA GPUs
#
# Needs, in .whl/ (git-ignored), the cp312 manylinux wheels the device image lacks: msgspec, pyzmq,
# starlette, uvicorn, httptools and pdserve's `cuda13` Mooncake build, mooncake-transfer-engine-cuda13==0.3.14
# (it links libcudart.so.13, which the image's CUDA 13 torch loads on import, before any Mooncake import,
# and the driver's libcuda.so.1).
#
# 1. a random-weight Llama-3.2-1B-shaped checkpoint in bfloat16 (drawn on GPU 0, under /tmp);
# 2. does P/D work on GPU at all?  Before any load, bench.eval_pd sends one greedy 32-token completion
#    to each configuration and records the outcome (gpu.json: "failed", "greedy_agree");
# 3. the comparison: 2,048 prompt tokens (exact, demo byte-level tokenizer) / 256 output tokens,
#    3 rates x 48 requests per configuration, a handoff run of 8 requests one in flight,
#    goodput at TTFT <= 1,000 ms and TPOT <= 30 ms; engines pinned with CUDA_VISIBLE_DEVICES by
#    bench.eval_pd --gpus, which passes them to pdserve up --gpus.
# Writes 7 files under $OUT: gpu.{json,md,log}, gpu_sweep.png, gpu_handoff.png, gpu_processes.log .
# Budget: ~1 min install + checkpoint, <= 7.8 min for both configurations (timeout 470 s): under 9 min.
set -euo pipefail
OUT=${OUT:-/tmp/eval-gpu}
CKPT=${CKPT:-/tmp/llama-3.2-1b-random}
RATES=${RATES:-2,6,12}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GLOG_minloglevel=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=index,name,memory.total --format=csv
python3 - <<'PY'
import torch
from common.kv_transfer.mooncake import load_transfer_engine_class
load_transfer_engine_class()
print("torch", torch.__version__, "GPUs:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
      "| mooncake loads")
PY

[ -f "$CKPT/model.safetensors" ] || python3 -m bench.make_checkpoint --shape llama-3.2-1b --out "$CKPT" --device cuda --seed 0

ENGINE="--dtype bfloat16 --device cuda --max-num-batched-tokens 4096 --max-model-len 4096"
COMMON=(--model "$CKPT" --gpus 0,1 --engine-args "$ENGINE" --threads 0 --work-dir /tmp/pdserve-eval
        --input-len 2048 --range-ratio 0 --output-len 256 --slo-ttft-ms 1000 --slo-tpot-ms 30
        --ready-timeout-s 150 --stop-timeout-s 20 --out-dir "$OUT")

# 2 + 3. For each configuration bench.eval_pd first sends the greedy check (no load yet): a P/D stack that
# cannot start or serve it is recorded under "failed" in gpu.json and the colocated run still happens;
# "greedy_agree" says whether P/D and colocated produced the same 32 tokens.
status=0
timeout -k 15 470 python3 -m bench.eval_pd "${COMMON[@]}" --tag gpu --check-tokens 32 --handoff-prompts 8 \
  --rates "$RATES" --num-prompts 48 --run-timeout-s 60 2>&1 | grep -v '^[IW][0-9]' | tee "$OUT/gpu.log" || status=$?
python3 - "$OUT/gpu.json" <<'PY' || true
import json, sys
d = json.load(open(sys.argv[1]))
print("P/D on GPU:", "FAILED: " + d["failed"]["disagg"] if "disagg" in d["failed"] else "works",
      "| greedy tokens agree with colocated:", d.get("greedy_agree"))
PY
for f in /tmp/pdserve-eval/gpu/*.log; do echo "== $f"; grep -v '^[IW][0-9]' "$f" | tail -30; done >"$OUT/gpu_processes.log" 2>&1
exit $status
