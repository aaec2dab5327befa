# The two commands the README shows: `make up` (extra flags: make up ARGS="--prefill 2") and `make test`.
PY ?= python3

.PHONY: system-deps install up test

# Mooncake's transfer engine links these (RDMA is used only where NICs exist).
system-deps:
	@dpkg -s libibverbs1 librdmacm1 libnuma1 >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq libibverbs1 librdmacm1 libnuma1)

# torch first: on CPU-only hosts 2.13.0 is the local CPU wheel; the project then
# accepts the installed build instead of pulling CUDA packages.
install: system-deps
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'

up: install
	$(PY) -m services.cli up $(ARGS)

test: install
	$(PY) -m pytest -q
