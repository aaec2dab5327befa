#!/usr/bin/env bash
# Issue 13's GPU part on one H200 (nvidia-h200): the Triton kernels compiled and checked, greedy identity of the
# triton backend against the torch one, the decode step against its floor, prefill against the matmul peak.
#
#   OUT=/tmp/kernels-gpu bash bench/kernels_gpu.sh                 # from the repository root
#   OUT=/tmp/kernels-gpu PARTS="tests floor" bash bench/kernels_gpu.sh   # some parts only
#   OUT=/tmp/kernels-gpu PARTS=tests KERNEL_TESTS="gemv_kernels range_copy" bash bench/kernels_gpu.sh   # some test files
#
# Needs, in .whl/ (git-ignored), the cp312 wheels the device image lacks (bench/gpu_steps.sh) and pytest's
# (pytest, pluggy, iniconfig, packaging, pytest_asyncio: pure Python); the tests part also needs openai's (openai,
# httpx2, httpcore2, truststore, pydantic, pydantic_core, jiter, distro, ...): tests/test_kernel_engine.py imports
# tests/procs.py, which imports openai (without them its collection fails and stops the part).
# tests:    the kernel tests compiled on the GPU (bf16 included) and the engine on the triton backend;
# gpu-tests: the test plan's GPU layer (tests/test_gpu_layer.py, `-m gpu`: registration metadata, a producer ->
#           consumer loopback compared byte for byte, gateway + prefill + decode end to end; needs openai's wheels);
# identity: 29 greedy requests through the triton backend (decode CUDA graphs) and the torch backend, 1B shape;
# floor:    bench.decode_floor, batches 1 and 32, triton backend, for the Llama-3.2-1B and Llama-3.1-8B shapes;
# prefill:  bench.prefill_roof, 1 x 2,048 and 8 x 2,048 tokens, both shapes;
# offline:  bench.engine_throughput 32 x 128 -> 128 against transformers (cuDNN SDPA off for both), 1B shape.
# async:    async scheduling (the default on CUDA) against synchronous steps, 1B shape: 29 requests (greedy, seeded,
#           stop ids, logprobs) identical either way with no KV block left; the offline run with --no-async-scheduling.
# host:     bench.host_step, 1B shape, batches 1 and 32: GPU busy (graph replay + LM head events over the step
#           period), async and synchronous steps (not in the default PARTS: PARTS=host).
# Writes $OUT/<step>.log and status.txt.  A failed step does not stop the next one.
set -uo pipefail
OUT=${OUT:-/tmp/kernels-gpu}
PARTS=${PARTS:-tests gpu-tests identity floor prefill offline async}
CKPT_1B=${CKPT_1B:-/tmp/llama-3.2-1b-random}
CKPT_8B=${CKPT_8B:-/tmp/llama-3.1-8b-random}
source bench/gpu_steps.sh
has() { [[ " $PARTS " == *" $1 "* ]]; }

# one step a file, failures named (-rf): a step that runs out of time still leaves the other files' results
if has tests; then
  for t in ${KERNEL_TESTS:-paged_attention_kernels fused_kernels gemv_kernels rotary_decode_attention kernel_engine range_copy}; do
    step "kernel_tests_$t" 240 python3 -m pytest -q -rf --tb=short -p no:cacheprovider "tests/test_$t.py"
  done
fi
has gpu-tests && step gpu_tests 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_layer.py
needs_1b=0; for p in identity floor prefill offline async host; do has $p && needs_1b=1; done
[ $needs_1b = 0 ] || [ -f "$CKPT_1B/model.safetensors" ] || step checkpoint_1b 120 python3 -m bench.make_checkpoint --shape llama-3.2-1b \
  --out "$CKPT_1B" --device cuda --seed 0
if has floor || has prefill; then
  [ -f "$CKPT_8B/model.safetensors" ] || step checkpoint_8b 200 python3 -m bench.make_checkpoint --shape llama-3.1-8b \
    --out "$CKPT_8B" --device cuda --seed 0
fi

if has identity; then
  step identity 240 python3 - "$CKPT_1B" <<'PY'
import random, sys

import torch

from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.messages import SamplingParams

rng = random.Random(0)
prompts = [[rng.randrange(1000, 100000) for _ in range(rng.randrange(20, 600))] for _ in range(29)]
sampling = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
outputs = {}
for dtype in ("float32", "bfloat16"):
    for backend in ("torch", "triton"):
        engine = LLMEngine(EngineConfig(model=sys.argv[1], dtype=dtype, device="cuda", max_num_seqs=32,
                                        max_model_len=1024, kv_cache_memory="8GiB", attention_backend=backend))
        outputs[dtype, backend] = [o.new_token_ids for o in engine.generate(prompts, sampling)]
        del engine
        torch.cuda.empty_cache()
    same = sum(a == b for a, b in zip(outputs[dtype, "torch"], outputs[dtype, "triton"]))
    print(f"{dtype}: triton backend vs torch backend: {same}/{len(prompts)} requests with identical greedy tokens")
PY
fi

if has floor; then
  for ckpt in "$CKPT_1B" "$CKPT_8B"; do
    step "floor_$(basename "$ckpt")" 200 python3 -m bench.decode_floor --model "$ckpt" --dtype bfloat16 --device cuda \
      --batch-sizes 1,32 --attention-backend triton --profile-steps 10
  done
fi
if has prefill; then
  for ckpt in "$CKPT_1B" "$CKPT_8B"; do
    step "prefill_$(basename "$ckpt")" 200 python3 -m bench.prefill_roof --model "$ckpt" --dtype bfloat16 \
      --batches 1,8 --attention-backend triton
  done
fi
if has offline; then
  step offline_1b 240 python3 -c 'import sys, torch, bench.engine_throughput as et
torch.backends.cuda.enable_cudnn_sdp(False)  # transformers too runs without the cuDNN SDPA backend
print("SDPA cuDNN backend disabled for both"); sys.argv[0] = "engine_throughput"; et.main()' \
    --model "$CKPT_1B" --num-requests 32 --input-len 128 --output-len 128 --dtype bfloat16 --device cuda \
    --attention-backend triton
fi
if has async; then
  step async_identity 240 python3 - "$CKPT_1B" <<'PY'
import random, sys

from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.messages import SamplingParams

rng = random.Random(0)
prompts = [[rng.randrange(1000, 100000) for _ in range(rng.randrange(20, 600))] for _ in range(29)]
params = [SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True),
          SamplingParams(max_tokens=48, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
          SamplingParams(max_tokens=64, temperature=0.0, logprobs=3)]
params = [params[i % 3] for i in range(len(prompts))]
runs = {}
for on in (False, True):
    engine = LLMEngine(EngineConfig(model=sys.argv[1], dtype="bfloat16", device="cuda", max_num_seqs=32,
                                    max_model_len=1024, kv_cache_memory="8GiB", async_scheduling=on))
    runs[on] = engine.generate(prompts, params)
    assert engine.block_manager.num_used == 0, "KV blocks left after generate"
    del engine
key = lambda o: (o.new_token_ids, o.finish_reason, o.usage, [lp.token_id for lp in o.logprobs or []])
same = sum(key(a) == key(b) for a, b in zip(runs[False], runs[True]))
print(f"async scheduling vs synchronous steps: {same}/{len(prompts)} requests identical (tokens, finish, usage)")
PY
  step offline_1b_sync 240 python3 -c 'import sys, torch, bench.engine_throughput as et
torch.backends.cuda.enable_cudnn_sdp(False)
sys.argv[0] = "engine_throughput"; et.main()' \
    --model "$CKPT_1B" --num-requests 32 --input-len 128 --output-len 128 --dtype bfloat16 --device cuda \
    --attention-backend triton --no-async-scheduling
fi
has host && step host_step 300 python3 -m bench.host_step --device cuda --model "$CKPT_1B" --dtype bfloat16 \
  --batch-sizes 1,32
cat "$OUT/status.txt"
exit $status
