#!/usr/bin/env bash
# Decode CUDA graphs on a GPU: the exact commands run on the device machine for issue 3.
#
#   OUT=/tmp/gpu-graphs bash bench/gpu_graphs.sh        # from the repository root, on a CUDA machine
#
# 1. correctness: 29 requests of varied prompt lengths (graph batch 32: 3 padded rows; contexts
#    crossing block buckets) through an engine replaying decode CUDA graphs and one with
#    --enforce-eager, same weights: greedy tokens must be identical;
# 2. offline throughput, 32 requests x 128 prompt + 128 new tokens, bfloat16, against transformers
#    generate in the same run: with CUDA graphs (transformers at its defaults, then with SDPA's cuDNN
#    backend disabled, which otherwise builds a plan per decode step), then eager;
# 3. decode step time at batch 1 and 32 against its floor (bench.decode_floor).
set -uo pipefail  # a failing step does not stop the later ones
OUT=${OUT:-/tmp/gpu-graphs}
CKPT=${CKPT:-/tmp/llama-3.2-1b-random}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ! python3 -c 'import msgspec' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/msgspec-*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
[ -f "$CKPT/model.safetensors" ] || python3 -m bench.make_checkpoint --shape llama-3.2-1b --out "$CKPT" --device cuda --seed 0

python3 - "$CKPT" <<'PY' 2>&1 | tee "$OUT/graph_check.txt"
import random, sys, time

import torch

from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.messages import SamplingParams

rng = random.Random(0)
prompts = [[rng.randrange(1000, 100000) for _ in range(rng.randrange(20, 200))] for _ in range(29)]
sampling = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
outputs = {}
for eager in (False, True):
    engine = LLMEngine(EngineConfig(model=sys.argv[1], dtype="bfloat16", device="cuda", max_num_seqs=32,
                                    max_model_len=512, kv_cache_memory="4GiB", enforce_eager=eager))
    first = [o.new_token_ids for o in engine.generate(prompts, sampling)]  # captures the graphs
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs[eager] = first + [o.new_token_ids for o in engine.generate(prompts, sampling)]  # prefix-cache hits
    torch.cuda.synchronize()
    graphs = engine.runner.graphs
    print(f"{'eager' if eager else 'graphs'}: {time.perf_counter() - start:.3f} s"
          + ("" if graphs is None else f", graphs captured {sorted(graphs.graphs)}"))
    del engine
same = sum(a == b for a, b in zip(outputs[False], outputs[True]))
print(f"graph replay vs eager: {same}/{2 * len(prompts)} requests with identical greedy tokens")
PY

common=(--model "$CKPT" --num-requests 32 --input-len 128 --output-len 128 --dtype bfloat16 --device cuda)
python3 -m bench.engine_throughput "${common[@]}" 2>&1 | grep -v "Loading weights" | tee "$OUT/throughput_graphs.txt"
python3 -c 'import sys, torch, bench.engine_throughput as et
torch.backends.cuda.enable_cudnn_sdp(False)  # transformers too runs without the cuDNN SDPA backend
print("SDPA cuDNN backend disabled for both"); sys.argv[0] = "engine_throughput"; et.main()' "${common[@]}" 2>&1 \
  | grep -v "Loading weights" | tee "$OUT/throughput_graphs_no_cudnn.txt"
python3 -m bench.engine_throughput "${common[@]}" --enforce-eager 2>&1 | grep -v "Loading weights" | tee "$OUT/throughput_eager.txt"
python3 -m bench.decode_floor --model "$CKPT" --dtype bfloat16 --device cuda --batch-sizes 1,32 \
  --input-len 128 --warmup 10 --steps 100 --profile-steps 5 2>&1 | tee "$OUT/decode_floor.txt"
