# What the bench/*_gpu.sh scripts share; they source it from the repository root after setting $OUT:
# the environment (the .whl/ wheels, PYTHONPATH, NCCL without NVLink multicast), an empty $OUT/status.txt,
# and `step`.  $status is 0, and 1 once a step failed.
mkdir -p "$OUT"
: >"$OUT/status.txt"
export PYTHONUNBUFFERED=1 GLOG_minloglevel=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/*.whl failed"; exit 1; }
  export PYTHONPATH=/tmp/site  # the processes the benches start put the repository before it
else
  echo "no .whl/*.whl: using the installed packages"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import msgspec, zmq" || { echo "msgspec/pyzmq missing: carry their cp312 wheels in .whl/"; exit 1; }

status=0
# step NAME SECONDS CMD...: runs CMD under a time limit, its output (without Mooncake's glog lines) to $OUT/NAME.log
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout -k 15 "$limit" "$@" 2>&1 | grep --line-buffered -v '^[IW][0-9]\{4\} ' | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc" | tee -a "$OUT/status.txt"
  [ "$rc" = 0 ] || status=1
}
