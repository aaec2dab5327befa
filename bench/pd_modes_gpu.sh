#!/usr/bin/env bash
# Issue 18's one-GPU figures: push vs read (prefill and decode sharing one GPU, KV over CUDA IPC) and the
# TTFT of a prompt re-sent after eviction, CPU offload hit vs recompute.
#
#   OUT=/tmp/out bash bench/pd_modes_gpu.sh     # from the repository root, on a host with an NVIDIA GPU
#   SHAPE=llama-3.1-8b OUT=/tmp/out bash bench/pd_modes_gpu.sh
#
# Needs the .whl/ wheels of bench/eval_gpu.sh (Mooncake is not used).  The CPU dry run:
#   OUT=/tmp/out DEVICE=cpu KV=shm DTYPE=float32 SHAPE=demo PROMPT_LEN=256 CHUNK=64 bash bench/pd_modes_gpu.sh
# Writes under $OUT: push_vs_read.{log,json}, offload_ttft.log, status.txt.
# Budget: checkpoint <= 90 s, push vs read <= 240 s, offload <= 120 s.
set -uo pipefail
OUT=${OUT:-/tmp/pd-modes-gpu}
DEVICE=${DEVICE:-cuda}
KV=${KV:-nvlink}
DTYPE=${DTYPE:-bfloat16}
SHAPE=${SHAPE:-llama-3.1-8b}
PROMPT_LEN=${PROMPT_LEN:-4096}
CHUNK=${CHUNK:-1024}
CKPT=${CKPT:-/tmp/$SHAPE-random}
source bench/gpu_steps.sh

if [ "$SHAPE" = demo ]; then MODEL=demo; else
  MODEL=$CKPT
  [ -f "$CKPT/model.safetensors" ] \
    || timeout 90 python3 -m bench.make_checkpoint --shape "$SHAPE" --out "$CKPT" --device "$DEVICE" --seed 0
fi
BLOCKS=$(( (PROMPT_LEN + 64) * 5 / 16 ))   # 4 prompts in flight on each decode, with room
step push_vs_read 240 python3 -m bench.push_vs_read --device "$DEVICE" --dtype "$DTYPE" --kv-transport "$KV" \
  --model "$MODEL" --prompt-len "$PROMPT_LEN" --chunk "$CHUNK" --num-kv-blocks "$BLOCKS" --requests 12 \
  --engine-args "--max-model-len $((PROMPT_LEN + 64))" --ready-timeout-s 120 --json "$OUT/push_vs_read.json"
step offload_ttft 120 python3 -m bench.offload_ttft --device "$DEVICE" --dtype "$DTYPE" --model "$MODEL" \
  --prompt-len $((PROMPT_LEN / 2)) --offload-gib 4 --repeats 5
cat "$OUT/status.txt"
exit $status
