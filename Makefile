# The two commands the README shows: `make up` (extra flags: make up ARGS="--prefill 2") and `make test`.
PY ?= python3

# The Mooncake build, one of pyproject's extras cpu / cuda12 / cuda13: cpu unless this host has an NVIDIA
# driver (nvidia-smi) and torch was built for CUDA, then the build for torch's CUDA major version.
# Override: make install MOONCAKE=cuda13
MOONCAKE ?= $(if $(shell command -v nvidia-smi),$(shell $(PY) -c 'import torch; v = torch.version.cuda; print("cuda" + v.split(".")[0] if v else "cpu")'),cpu)
# The distribution each extra installs.  All of them ship the same `mooncake` files, so pip cannot swap
# one for another: `install` removes the other builds (and this one, which they may have overwritten).
DIST_cpu := mooncake-transfer-engine-non-cuda
DIST_cuda12 := mooncake-transfer-engine
DIST_cuda13 := mooncake-transfer-engine-cuda13
OTHER_BUILDS = $(filter-out $(DIST_$(MOONCAKE)),$(DIST_cpu) $(DIST_cuda12) $(DIST_cuda13))
# The CUDA runtime pdserve pinned before these extras existed: it has no use on a CPU host.
CUDA_RUNTIME_PIN := nvidia-cuda-runtime-cu12

.PHONY: system-deps torch install up test

# Mooncake's transfer engine links these (RDMA is used only where NICs exist).
system-deps:
	@dpkg -s libibverbs1 librdmacm1 libnuma1 libcurl4 >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq libibverbs1 librdmacm1 libnuma1 libcurl4)

# torch first: on CPU-only hosts 2.13.0 is the local CPU wheel; the project then
# accepts the installed build instead of pulling CUDA packages.
torch:
	$(PY) -m pip install -q torch==2.13.0

install: system-deps torch
	@test -n "$(DIST_$(MOONCAKE))" || { echo "MOONCAKE=$(MOONCAKE): expected cpu, cuda12 or cuda13" >&2; exit 1; }
	if $(PY) -m pip show -q $(OTHER_BUILDS) >/dev/null 2>&1; then \
	  $(PY) -m pip uninstall -qq -y $(OTHER_BUILDS) $(DIST_$(MOONCAKE)); fi
	$(if $(filter cpu,$(MOONCAKE)),$(PY) -m pip uninstall -qq -y $(CUDA_RUNTIME_PIN))
	$(PY) -m pip install -q -e '.[$(MOONCAKE),dev]'

up: install
	$(PY) -m services.cli up $(ARGS)

test: install
	$(PY) -m pytest -q
