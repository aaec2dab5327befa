#!/usr/bin/env bash
# Issue 12's GPU part: tensor parallelism over NCCL.  Machine: nvidia-h200-x4 (4 GPUs of one host; TP 1, 2
# and 4).  On nvidia-h200-x2 parts a. and b. run at TP 1 and 2 and part c. is skipped (every configuration
# of c. needs 3 or 4 GPUs).
#
#   OUT=/tmp/tp-gpu bash bench/tp_gpu.sh              # from the repository root
#   OUT=/tmp/tp-gpu PARTS="b d" bash bench/tp_gpu.sh  # some parts only (each fits one 10-minute device call)
#
# Needs, in .whl/ (git-ignored), the cp312 wheels the device image lacks, as bench/eval_gpu.sh lists them
# (msgspec, pyzmq, starlette, uvicorn, httptools, mooncake-transfer-engine-cuda13 for part c.).
#
# a. bench.tp_step: decode step time at TP 1, 2 (and 4), batches 1, 8 and 32 at a 2,048-token context, each
#    against its floor at that TP size, and the prefill step of 1 and 8 prompts of 2,048 tokens, of a
#    Llama-3.1-8B-shaped random checkpoint in bfloat16 (bench.make_checkpoint, drawn on GPU 0, 16 GB under
#    /tmp), every size eager (TP > 1 runs eagerly, so TP 1 does too: a like-for-like ratio); then the demo
#    model's steps the same way;
# b. greedy identity on CUDA: bench.tp_step --check-tokens 32 on the demo model in float32 at TP 1, 2 (and 4):
#    every TP size's tokens must equal TP 1's (exit 1 otherwise; a bfloat16 all-reduce sums in another order
#    than one GPU's matmul does, so only float32 is held to identity);
# c. heterogeneous P/D through bench.eval_pd (pdserve up --prefill-args/--decode-args, --gpus hands each engine
#    as many GPUs as its TP size), a Llama-3.2-1B-shaped checkpoint in float32, one colocated TP 1 instance as
#    the reference: prefill TP 2 -> decode TP 1, TP 1 -> TP 2, TP 2 -> TP 2, and TP 2 with block size 16 ->
#    TP 1 with block size 32; each must serve (its "failed" is empty) and its greedy 32 tokens must equal the
#    colocated TP 1 instance's (greedy_agree).  These need the TP-aware KV transfer of issue 12.
# d. heterogeneous-TP handoff bandwidth on GPUs: bench.kv_handoff over nvlink, a 64 MiB request (1B shape) read
#    by a TP 2 decode (rank 1 on GPU 1, over NVLink) against the homogeneous TP 1 read interleaved with it.
# Writes under $OUT: env.txt, tp_step_8b.{log,json}, tp_step_demo.{log,json}, tp_identity.{log,json},
# pd_<name>.{log,json,md} (+ eval_pd's PNGs), status.txt (one line per step with its exit status).  A failed
# step does not stop the next one; the script exits 1 when any step failed.
# Budget on H200s: a. ~2 min for the checkpoint + ~3 min, b. ~1 min, c. ~2 min per configuration (limit 4 min
# each): PARTS="a b" and PARTS=c as two device calls.
set -uo pipefail
OUT=${OUT:-/tmp/tp-gpu}
PARTS=${PARTS:-a b c}
CKPT_8B=${CKPT_8B:-/tmp/llama-3.1-8b-random}
CKPT_1B=${CKPT_1B:-/tmp/llama-3.2-1b-random}
source bench/gpu_steps.sh

GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
if [ "$GPUS" -ge 4 ]; then TP_SIZES=1,2,4; else TP_SIZES=1,2; fi
{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  nvidia-smi topo -m
  python3 -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"
  echo "$GPUS GPUs: TP sizes $TP_SIZES"
} 2>&1 | tee "$OUT/env.txt"
[ "$GPUS" -ge 2 ] || { echo "tensor parallelism needs at least 2 GPUs"; exit 1; }

checkpoint() {  # checkpoint SHAPE DIR: write it unless it is there
  [ -f "$2/model.safetensors" ] || step "checkpoint_$1" 240 python3 -m bench.make_checkpoint --shape "$1" --out "$2" \
    --device cuda --seed 0
}

# a. decode step (and its floor) and prefill time, TP 1 vs 2 (vs 4), eager at every size
if [[ " $PARTS " == *" a "* ]]; then
  checkpoint llama-3.1-8b "$CKPT_8B"
  step tp_step_8b 300 python3 -m bench.tp_step --models "$CKPT_8B" --device cuda --dtype bfloat16 \
    --tp-sizes "$TP_SIZES" --batch-sizes 1,8,32 --input-len 2048 --warmup 10 --steps 50 --prefill-batches 1,8 \
    --enforce-eager --json "$OUT/tp_step_8b.json"
  step tp_step_demo 120 python3 -m bench.tp_step --models demo --device cuda --dtype bfloat16 \
    --tp-sizes "$TP_SIZES" --batch-sizes 1,8,32 --input-len 512 --warmup 10 --steps 50 --enforce-eager \
    --json "$OUT/tp_step_demo.json"
fi

# b. greedy identity of TP 2 (and 4) against TP 1, float32
if [[ " $PARTS " == *" b "* ]]; then
  step tp_identity 150 python3 -m bench.tp_step --models demo --device cuda --dtype float32 \
    --tp-sizes "$TP_SIZES" --batch-sizes 1 --warmup 2 --steps 5 --check-tokens 32 --json "$OUT/tp_identity.json"
fi

# c. heterogeneous P/D (TP sizes, block sizes) against a colocated TP 1 instance
# pd NAME NEEDED_GPUS EVAL_PD_FLAGS...: one bench.eval_pd run, then its serving and greedy agreement checked
pd() {
  local name=$1 needed=$2
  shift 2
  if [ "$GPUS" -lt "$needed" ]; then
    echo "$name skipped: needs $needed GPUs" | tee -a "$OUT/status.txt"
    return
  fi
  step "pd_$name" 240 python3 -m bench.eval_pd --model "$CKPT_1B" --modes colocated,disagg --colocated 1 \
    --gpus "$(seq -s, 0 $((needed - 1)))" --threads 0 --work-dir /tmp/pdserve-tp-eval --out-dir "$OUT" \
    --tag "pd_$name" --input-len 1024 --range-ratio 0 --output-len 64 --check-tokens 32 --handoff-prompts 4 \
    --rates 4 --num-prompts 16 --ready-timeout-s 200 --stop-timeout-s 20 --run-timeout-s 90 \
    --engine-args="--dtype float32 --device cuda --max-num-batched-tokens 4096 --max-model-len 4096" "$@"
  python3 - "$OUT/pd_$name.json" <<'PY' 2>&1 | tee -a "$OUT/status.txt" || status=1
import json, sys
d = json.load(open(sys.argv[1]))
name = sys.argv[1].rsplit("/", 1)[-1][:-5]
ok = not d["failed"] and d.get("greedy_agree") is True
print(f"{name}: {'PASS' if ok else 'FAIL'} (failed: {d['failed'] or 'none'}, greedy_agree: {d.get('greedy_agree')})")
sys.exit(0 if ok else 1)
PY
}
if [[ " $PARTS " == *" c "* ]]; then
  checkpoint llama-3.2-1b "$CKPT_1B"
  pd p2_d1 3 --prefill-args="-tp 2"
  pd p1_d2 3 --decode-args="-tp 2"
  pd p2_d2 4 --prefill-args="-tp 2" --decode-args="-tp 2"
  pd p2b16_d1b32 3 --prefill-args="-tp 2 --block-size 16" --decode-args="--block-size 32"
fi

# d. heterogeneous-TP handoff bandwidth vs homogeneous, over nvlink
if [[ " $PARTS " == *" d "* ]]; then
  step kv_handoff_tp2 120 python3 -m bench.kv_handoff --device cuda --transport nvlink --decode-tp 2 --repeats 10 \
    --requests 50 --json "$OUT/kv_handoff_tp2.json"
fi

cat "$OUT/status.txt"
exit $status
