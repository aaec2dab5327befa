#!/usr/bin/env bash
# Issue 11's one-GPU figures and check: prefill and decode as two processes on the same GPU, KV over CUDA IPC.
#
#   OUT=/tmp/out bash bench/kv_gpu.sh        # from the repository root, on a host with an NVIDIA GPU
#
# Needs, in .whl/ (git-ignored), the cp312 wheels the device image lacks (msgspec, pyzmq, ...; see
# bench/eval_gpu.sh); mooncake-transfer-engine-cuda13 is optional: without it the "today" (tcp) figure is skipped.
#
# a. bench.kv_handoff: a 64 MiB request through the connector over nvlink vs a device-to-device copy of the
#    same bytes in one process (the limit); then over Mooncake tcp, as today, when Mooncake loads;
# b. bench.pd_identity: greedy P/D over nvlink vs colocated, demo model in bfloat16, token by token, in read mode
#    and in push mode;
# c. bench.handoff_gap: the first inter-token gap at one request in flight, P/D minus colocated, with a
#    Llama-3.2-1B-shaped random checkpoint (bfloat16, drawn on the GPU) and 2,048-token prompts, in read
#    mode and in push mode.
# The CPU-checkable parts dry-run on a CPU host (no wheels needed there, the installed packages are used):
#   OUT=/tmp/out DEVICE=cpu KV=shm DTYPE=float32 SHAPE=demo PROMPT_LEN=256 bash bench/kv_gpu.sh
# Writes under $OUT: env.txt, kv_handoff_$KV.{log,json}, kv_handoff_tcp.{log,json}, pd_identity_{read,push}.log,
# handoff_gap_{read,push}.{log,json}, status.txt (one line per step with its exit status).  A failed step does not stop
# the next one; the script exits 1 when any step failed.
# Budget on an H200: ~3.5 minutes expected (session 12: the gap runs ~35 s each); the step limits (a. 75 + 50 s,
# b. 2 x 90 s, checkpoint 75 s, c. 2 x 100 s) and ~0.5 min of install bound it at 10 min.
set -uo pipefail
OUT=${OUT:-/tmp/kv-gpu}
DEVICE=${DEVICE:-cuda}        # every engine's --device
KV=${KV:-nvlink}              # the same-host transport measured (shm with DEVICE=cpu)
DTYPE=${DTYPE:-bfloat16}
SHAPE=${SHAPE:-llama-3.2-1b}  # the checkpoint of c.
PROMPT_LEN=${PROMPT_LEN:-2048}
CKPT=${CKPT:-/tmp/$SHAPE-random}
source bench/gpu_steps.sh

{
  [ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"
if python3 -c "from common.kv_transfer.mooncake import load_transfer_engine_class as f; f()" >>"$OUT/env.txt" 2>&1; then
  MOONCAKE=1; echo "mooncake loads: the tcp figure runs" | tee -a "$OUT/env.txt"
else
  MOONCAKE=0; echo "mooncake does not load: no tcp figure (see env.txt)" | tee -a "$OUT/env.txt"
fi

# a. the connector over nvlink (then tcp) vs the device copy limit, 64 MiB (the default geometry)
step "kv_handoff_$KV" 75 python3 -m bench.kv_handoff --device "$DEVICE" --transport "$KV" --repeats 50 \
  --requests 200 --json "$OUT/kv_handoff_$KV.json"
if [ "$MOONCAKE" = 1 ]; then
  step kv_handoff_tcp 50 python3 -m bench.kv_handoff --device "$DEVICE" --transport tcp --repeats 20 --requests 50 \
    --json "$OUT/kv_handoff_tcp.json"
fi

# b. token identity, P/D over nvlink vs colocated, three engines on one GPU
for mode in read push; do
  step "pd_identity_$mode" 90 python3 -m bench.pd_identity --device "$DEVICE" --dtype "$DTYPE" --kv-transport "$KV" \
    --kv-mode "$mode" --max-tokens 32 --ready-timeout-s 80
done

# c. the first inter-token gap, 1B-shaped model, 2,048-token prompts (64 MiB of KV each)
[ -f "$CKPT/model.safetensors" ] \
  || timeout 75 python3 -m bench.make_checkpoint --shape "$SHAPE" --out "$CKPT" --device "$DEVICE" --seed 0
for mode in read push; do  # read: decode pulls after prefill; push: prefill writes decode's blocks as it computes
  step "handoff_gap_$mode" 100 python3 -m bench.handoff_gap --device "$DEVICE" --dtype "$DTYPE" --kv-transport "$KV" \
    --kv-mode "$mode" --model "$CKPT" --prompt-len "$PROMPT_LEN" --requests 20 --warmup 3 --ready-timeout-s 100 \
    --engine-args "--max-model-len 4096 --max-num-batched-tokens 4096" --json "$OUT/handoff_gap_$mode.json"
done

cat "$OUT/status.txt"
exit $status
