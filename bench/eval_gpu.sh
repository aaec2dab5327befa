#!/usr/bin/env bash
# Issue 6's GPU part: P/D (prefill on GPU 0, decode on GPU 1) vs two colocated instances (one per GPU).
#
#   OUT=/tmp/eval-gpu bash bench/eval_gpu.sh        # from the repository root, on a host with 2 NVIDIA GPUs
#   SHAPE=llama-3.1-8b INPUT_LEN=8192 SLO_TTFT_MS=2000 SLO_TPOT_MS=40 RATES=0.5,1,2,3 TAG=gpu8k \
#     OUT=/tmp/eval-gpu bash bench/eval_gpu.sh      # issue 19's 8B, 8,192-token workload
#   GPUS=0 ... bash bench/eval_gpu.sh              # every engine on GPU 0 (a one-GPU host: a serving check, not
#                                                   # a P/D-vs-colocated comparison)
#
# Needs, in .whl/ (git-ignored), the cp312 manylinux wheels the device image lacks: msgspec, pyzmq,
# starlette, uvicorn, httptools and (optional: the engines on one host read over nvlink without it) pdserve's
# `cuda13` Mooncake build, mooncake-transfer-engine-cuda13==0.3.14
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
# Writes under $OUT: $TAG.{json,md,log}, ${TAG}_sweep.png, ${TAG}_handoff.png, ${TAG}_processes.log (each
# process's slow-step warnings, then its last lines) and ${TAG}_requests/ (each run's per-request records, as
# `pdserve bench --out` writes them).
# Budget: ~1 min install + checkpoint, <= 7.8 min for both configurations (timeout 470 s): under 9 min.
set -euo pipefail
OUT=${OUT:-/tmp/eval-gpu}
SHAPE=${SHAPE:-llama-3.2-1b}
CKPT=${CKPT:-/tmp/$SHAPE-random}
RATES=${RATES:-2,6,12}
INPUT_LEN=${INPUT_LEN:-2048}
OUTPUT_LEN=${OUTPUT_LEN:-256}
SLO_TTFT_MS=${SLO_TTFT_MS:-1000}
SLO_TPOT_MS=${SLO_TPOT_MS:-30}
NUM_PROMPTS=${NUM_PROMPTS:-48}
TAG=${TAG:-gpu}
GATEWAY_ARGS=${GATEWAY_ARGS:-}  # e.g. "--local-prefill-queue 1" (conditional disaggregation)
MAX_LEN=$((INPUT_LEN + OUTPUT_LEN + 64))
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GLOG_minloglevel=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=index,name,memory.total --format=csv
python3 - <<'PY'
import torch
from common.kv_transfer.backend import BackendUnavailable
from common.kv_transfer.mooncake import load_transfer_engine_class
try:
    load_transfer_engine_class()
    mooncake = "mooncake loads"
except BackendUnavailable as e:  # same-host engines read over nvlink without it; only the tcp transport is off
    mooncake = f"mooncake does not load ({e}): engines serve nvlink only"
print("torch", torch.__version__, "GPUs:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
      "|", mooncake)
PY

[ -f "$CKPT/model.safetensors" ] || python3 -m bench.make_checkpoint --shape "$SHAPE" --out "$CKPT" --device cuda --seed 0

# every engine step over SLOW_STEP_LOG_S seconds is logged (a 4k prompt of the 8B shape computes in ~0.11 s)
ENGINE="--dtype bfloat16 --device cuda --max-num-batched-tokens 8192 --max-model-len $MAX_LEN \
  --slow-step-log-s ${SLOW_STEP_LOG_S:-0.3}"
COMMON=(--model "$CKPT" --gpus "${GPUS:-0,1}" --engine-args "$ENGINE" --threads 0 --work-dir /tmp/pdserve-eval
        --input-len "$INPUT_LEN" --range-ratio 0 --output-len "$OUTPUT_LEN" --slo-ttft-ms "$SLO_TTFT_MS"
        --slo-tpot-ms "$SLO_TPOT_MS"
        --gateway-args "$GATEWAY_ARGS" --ready-timeout-s 150 --stop-timeout-s 20 --out-dir "$OUT")

# 2 + 3. For each configuration bench.eval_pd first sends the greedy check (no load yet): a P/D stack that
# cannot start or serve it is recorded under "failed" in gpu.json and the colocated run still happens;
# "greedy_agree" says whether P/D and colocated produced the same 32 tokens.
status=0
timeout -k 15 470 python3 -m bench.eval_pd "${COMMON[@]}" --tag "$TAG" --check-tokens 32 --handoff-prompts 8 \
  --rates "$RATES" --num-prompts "$NUM_PROMPTS" --run-timeout-s 60 2>&1 | grep -v '^[IW][0-9]' | tee "$OUT/$TAG.log" || status=$?
python3 - "$OUT/$TAG.json" <<'PY' || true
import json, sys
d = json.load(open(sys.argv[1]))
print("P/D on GPU:", "FAILED: " + d["failed"]["disagg"] if "disagg" in d["failed"] else "works",
      "| greedy tokens agree with colocated:", d.get("greedy_agree"))
PY
for f in /tmp/pdserve-eval/$TAG/*.log; do
  echo "== $f"; grep "engine step took" "$f" || echo "(no step over the threshold)"; echo "-- last lines:"; grep -v '^[IW][0-9]' "$f" | tail -30 || true
done >"$OUT/${TAG}_processes.log" 2>&1
# every run's per-request records (send time, TTFT, gaps), which the summary JSON does not keep
mkdir -p "$OUT/${TAG}_requests" && cp /tmp/pdserve-eval/$TAG/*.json "$OUT/${TAG}_requests/" 2>/dev/null || true
exit $status
