#!/usr/bin/env bash
# Issue 16's 16-core figure: requests/s of the gateway with 1, 2, 4, 8 worker processes against vllm-router at
# its defaults, streaming and not, on the GPU machine's CPUs (no GPU used; pinned to 16 cores); first, how far N
# plain Python processes scale on those cores alone (bench.cpu_scaling), the sweep's ceiling.
#
#   OUT=/tmp/out bash bench/router_sweep_gpu.sh      # from the repository root, .whl_router/ carried
#   CONCURRENCY=512 REQUESTS=24000 OUT=/tmp/out bash bench/router_sweep_gpu.sh   # every target at 512 in flight
#   ROUNDS=2 ...    # every target up at once and alternated twice, each round half the requests (default 1)
#   ROUTER_CORES=0-15 CORES=16-31 ...   # (a 32-core host) the routers alone on 16 cores, the harness on 16 others
#
# .whl_router/ (git-ignored) holds cp312 wheels: pdserve's (msgspec, pyzmq, starlette, uvicorn, ...) and
# vllm-router 0.1.17 with what it imports and the image lacks (setproctitle, fastapi, opentelemetry-api, orjson,
# pydantic).
# They are installed into /tmp/rsite; /tmp/routers/bin/{python,vllm-router} run the image's python3 on it, the
# layout bench.router_compare expects of --routers-venv.  Writes $OUT/router_sweep.{log,json} and
# $OUT/cpu_scaling.{log,json}.
#
# Core budget (16 cores, pdserve x8 at the goal, 0.8 x 8 x the 1-worker rate ~ 50k req/s): 8 gateway workers
# (one core each, libzmq's I/O threads included); 4 prefill + 4 decode instant fakes, single-threaded, each
# at ~40 us a leg ~ half a core (one of each capped the earlier sweep at ~21k req/s: one core); 4 load
# processes (16 connections each, ~20 us a request ~ a quarter core each); ~2 cores left for the registry and
# the kernel.  The report's harness rows say which process neared a core (busy ~ 1.00) and the direct row the
# rate the load generator and the fakes reach with no router in between.
set -uo pipefail
OUT=${OUT:-/tmp/router-sweep}
CORES=${CORES:-0-15}         # the whole sweep: harness, and the routers unless ROUTER_CORES is set
ROUTER_CORES=${ROUTER_CORES:-}
SWEEP=${SWEEP:-1,2,4,8}
mkdir -p "$OUT" /tmp/routers/bin
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rsite \
  .whl_router/*.whl || { echo "installing .whl_router/*.whl failed"; exit 1; }
printf '#!/bin/sh\nPYTHONPATH=/tmp/rsite exec python3 "$@"\n' >/tmp/routers/bin/python
printf '#!/bin/sh\nPYTHONPATH=/tmp/rsite exec python3 -m vllm_router.launch_router "$@"\n' >/tmp/routers/bin/vllm-router
chmod +x /tmp/routers/bin/python /tmp/routers/bin/vllm-router
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/rsite
nproc
# the routers' cores' own ceiling: N single-threaded Python processes alone, no harness (bench/cpu_scaling.py)
timeout 120 taskset -c "${ROUTER_CORES:-$CORES}" python3 -m bench.cpu_scaling --procs 1,2,4,8,16 --seconds 3 \
  --json "$OUT/cpu_scaling.json" 2>&1 | tee "$OUT/cpu_scaling.log"
timeout -k 15 "${LIMIT:-420}" taskset -c "$CORES" python3 -m bench.router_compare --sweep "$SWEEP" \
  --fake-engines 4 --load-processes 4 --bus-fakes instant --requests "${REQUESTS:-6000}" --rounds "${ROUNDS:-1}" \
  --concurrency "${CONCURRENCY:-64}" ${ROUTER_CORES:+--router-cpus "$ROUTER_CORES"} \
  --routers-venv /tmp/routers --json "$OUT/router_sweep.json" 2>&1 | tee "$OUT/router_sweep.log"
