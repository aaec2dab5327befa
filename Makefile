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

.PHONY: system-deps etcd docker torch install up test

# Mooncake's transfer engine links these (RDMA is used only where NICs exist).
system-deps:
	@dpkg -s libibverbs1 librdmacm1 libnuma1 libcurl4 >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq libibverbs1 librdmacm1 libnuma1 libcurl4)

# The etcd discovery tests start real etcd members: Debian's etcd-server, where apt-get exists (elsewhere
# those tests skip, saying so).
etcd:
	@command -v etcd >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq etcd-server >/dev/null)

# torch first, so that the project's torch range (pyproject.toml) accepts it and pip keeps it.  A torch already
# installed in that range is kept whatever its build (a CUDA one on a GPU host); otherwise TORCH is installed from
# TORCH_INDEX_URL when set, else from pip's configured index.  PyPI's Linux x86_64 torch is the CUDA build: with
# its NVIDIA and triton wheels about 2.6 GB.  On a CPU host:
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   (the CPU wheel, about 190 MB)
TORCH ?= torch==2.13.0
TORCH_INDEX_URL ?=
# Exits 0 when the installed torch satisfies the project's torch requirement.
TORCH_IN_RANGE = $(PY) -c 'import importlib.metadata as m, tomllib; \
  from pip._vendor.packaging.requirements import Requirement; \
  deps = map(Requirement, tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]); \
  torch = next(r for r in deps if r.name == "torch"); \
  raise SystemExit(not torch.specifier.contains(m.version("torch"), prereleases=True))' 2>/dev/null

# The docker compose test builds the image and runs compose.yaml: Debian's Docker engine, compose (v1) and
# debootstrap (the local base image, scripts/docker-base.sh), where apt-get exists (elsewhere it skips, saying so).
docker:
	@{ command -v dockerd && command -v debootstrap && \
	   { command -v docker-compose || docker compose version; }; } >/dev/null 2>&1 || \
	  ! command -v apt-get >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null)

torch:
	@if $(TORCH_IN_RANGE); then echo "keeping the installed torch $$($(PY) -m pip show torch | sed -n 's/^Version: //p')"; \
	else $(PY) -m pip install -q $(if $(TORCH_INDEX_URL),--index-url '$(TORCH_INDEX_URL)') '$(TORCH)'; fi

install: system-deps torch
	@test -n "$(DIST_$(MOONCAKE))" || { echo "MOONCAKE=$(MOONCAKE): expected cpu, cuda12 or cuda13" >&2; exit 1; }
	if $(PY) -m pip show -q $(OTHER_BUILDS) >/dev/null 2>&1; then \
	  $(PY) -m pip uninstall -qq -y $(OTHER_BUILDS) $(DIST_$(MOONCAKE)); fi
	$(if $(filter cpu,$(MOONCAKE)),$(PY) -m pip uninstall -qq -y $(CUDA_RUNTIME_PIN))
	$(PY) -m pip install -q -e '.[$(MOONCAKE)$(EXTRAS)]'

up: install
	$(PY) -m services.cli up $(ARGS)

# The dev extra (test tools, triton for the kernel tests) only where the tests run.  The suite runs in
# TEST_WORKERS processes (pytest-xdist); most tests wait on processes and sockets, so two workers suit
# even a 2-core host (9.4 min there against 14.7 for one).
TEST_WORKERS ?= 2
test: EXTRAS = ,dev
test: install etcd docker
	$(PY) -m pytest -q -n $(TEST_WORKERS)
