# The two commands the README shows: `make up` (extra flags: make up ARGS="--prefill 2") and `make test`.
PY ?= python3

# The Mooncake build, one of pyproject's extras cpu / cuda12 / cuda13: cpu unless this host has an NVIDIA
# driver (nvidia-smi) and torch was built for CUDA, then the build for torch's CUDA major version.
# Override: make install MOONCAKE=cuda13
MOONCAKE ?= $(if $(shell command -v nvidia-smi),$(shell $(PY) -c 'import torch; v = torch.version.cuda; print("cuda" + v.split(".")[0] if v else "cpu")'),cpu)
# Every build installs the same `mooncake` module and pip cannot swap one distribution of a module for
# another, so installing one build first removes the others' distributions (and, on CPU hosts, the CUDA
# runtime that pdserve pinned before these extras existed).
REPLACED_BY_cpu := mooncake-transfer-engine mooncake-transfer-engine-cuda13 nvidia-cuda-runtime-cu12
REPLACED_BY_cuda12 := mooncake-transfer-engine-non-cuda mooncake-transfer-engine-cuda13
REPLACED_BY_cuda13 := mooncake-transfer-engine-non-cuda mooncake-transfer-engine

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
	@test -n "$(REPLACED_BY_$(MOONCAKE))" || { echo "MOONCAKE=$(MOONCAKE): expected cpu, cuda12 or cuda13" >&2; exit 1; }
	$(PY) -m pip uninstall -qq -y $(REPLACED_BY_$(MOONCAKE))
	$(PY) -m pip install -q -e '.[$(MOONCAKE),dev]'

up: install
	$(PY) -m services.cli up $(ARGS)

test: install
	$(PY) -m pytest -q
