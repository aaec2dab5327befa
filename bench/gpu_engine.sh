#!/usr/bin/env bash
# Issue 3's GPU figures for the engine core: the exact commands run on the device machine.
#
#   OUT=/tmp/gpu-engine bash bench/gpu_engine.sh        # from the repository root, on a CUDA machine
#
# 1. a random-weight Llama-3.2-1B-shaped checkpoint in bfloat16 (written under /tmp, drawn on the GPU);
# 2. offline throughput: 32 concurrent requests, 128 prompt + 128 new tokens, greedy, EOS ignored,
#    through LLMEngine and through transformers generate, same weights/dtype/device, same run;
# 3. decode step time at batch 1 and 32 against the floor (bytes / measured bandwidth), with a
#    torch.profiler view of how much of a step the GPU is busy (Chrome traces in $OUT/traces);
# 4. the proposed fix measured: SDPA's cuDNN backend excluded (it builds a new plan for every new
#    key length, once per decode step): throughput with only our engine excluded from it
#    (transformers at its defaults), then with both excluded, and the decode floor again.
# Where msgspec is missing (the device image) it is installed from a carried wheel in .whl/.
set -euo pipefail
OUT=${OUT:-/tmp/gpu-engine}
CKPT=${CKPT:-/tmp/llama-3.2-1b-random}
mkdir -p "$OUT/traces" "$OUT/traces_fix"
export PYTHONUNBUFFERED=1

if ! python3 -c 'import msgspec' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/msgspec-*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())'

[ -f "$CKPT/model.safetensors" ] || python3 -m bench.make_checkpoint --shape llama-3.2-1b --out "$CKPT" --device cuda --seed 0

python3 -m bench.engine_throughput --model "$CKPT" --num-requests 32 --input-len 128 --output-len 128 \
  --dtype bfloat16 --device cuda 2>&1 | tee "$OUT/throughput.txt"

python3 -m bench.decode_floor --model "$CKPT" --dtype bfloat16 --device cuda --batch-sizes 1,32 \
  --input-len 128 --warmup 10 --steps 100 --profile-steps 10 --trace-dir "$OUT/traces" 2>&1 | tee "$OUT/decode_floor.txt"

throughput_without_cudnn() {  # $1: "ours" (only our engine runs without cuDNN SDPA) or "both"
  python3 - "$1" "$CKPT" <<'PY'
import sys

import torch
from torch.nn.attention import sdpa_kernel

import bench.engine_throughput as et
from bench.decode_floor import NON_CUDNN_SDPA

mode, ckpt = sys.argv[1], sys.argv[2]
if mode == "both":
    torch.backends.cuda.enable_cudnn_sdp(False)
run_engine = et.run_engine


def run_engine_without_cudnn(*args):
    with sdpa_kernel(NON_CUDNN_SDPA):
        return run_engine(*args)


et.run_engine = run_engine_without_cudnn
print("SDPA cuDNN backend excluded for:", "pdserve and transformers" if mode == "both" else "pdserve only")
sys.argv = ["engine_throughput", "--model", ckpt, "--num-requests", "32", "--input-len", "128",
            "--output-len", "128", "--dtype", "bfloat16", "--device", "cuda"]
et.main()
PY
}
throughput_without_cudnn ours 2>&1 | tee "$OUT/throughput_fix_ours.txt"
throughput_without_cudnn both 2>&1 | tee "$OUT/throughput_fix_both.txt"

python3 -m bench.decode_floor --model "$CKPT" --dtype bfloat16 --device cuda --batch-sizes 1,32 --no-cudnn-attention \
  --input-len 128 --warmup 10 --steps 100 --profile-steps 10 --trace-dir "$OUT/traces_fix" 2>&1 | tee "$OUT/decode_floor_fix.txt"
gzip -f "$OUT"/traces/*.json "$OUT"/traces_fix/*.json
