# One CPU image for every pdserve service; compose.yaml picks the subcommand.
# BASE_IMAGE: any Debian-based image with Python 3.11 and its venv module: python:3.11-slim (pulled), or
# pdserve-base:local, which scripts/docker-base.sh builds from Debian's packages where nothing can be pulled.
# Few steps after the large ones: on vfs storage (Docker inside a container) every step copies the whole tree.
ARG BASE_IMAGE=python:3.11-slim

# What the image runs with, shared by both stages: Mooncake's shared libraries (RDMA is used only where NICs
# exist) and an empty venv, so that pip works under a Debian-packaged Python too (PEP 668).
FROM ${BASE_IMAGE} AS runtime
RUN dpkg -s libibverbs1 librdmacm1 libnuma1 libcurl4 >/dev/null 2>&1 \
 || (apt-get update \
     && apt-get install -y --no-install-recommends libibverbs1 librdmacm1 libnuma1 libcurl4 \
     && rm -rf /var/lib/apt/lists/*) \
 && python3 -m venv /opt/pdserve
ENV PATH=/opt/pdserve/bin:$PATH \
    PDSERVE_CACHE_DIR=/cache
# The demo checkpoint is written to PDSERVE_CACHE_DIR on first use; a volume keeps it.
VOLUME ["/cache"]
CMD ["pdserve", "up", "--host", "0.0.0.0"]

# Fills the venv; the image takes only the venv (not the build context with its torch wheel, nor pip's cache).
# Nothing is compiled: every dependency is a wheel.
FROM runtime AS build
# torch before the project, so the project's torch range accepts it and pip keeps it: the CPU wheel in wheels/
# when there is one (scripts/docker-base.sh puts it there), else TORCH_SPEC from TORCH_INDEX_URL, by default
# PyTorch's CPU index (about 190 MB); TORCH_INDEX_URL= (empty) takes pip's index instead, where PyPI's Linux
# x86_64 torch is the CUDA build with about 2.6 GB of NVIDIA and triton wheels.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
# .dockerignore lets in only the package, its metadata and wheels/torch-*.whl.
COPY . /src
# The non-CUDA Mooncake build (this image runs on hosts without an NVIDIA driver) and the etcd client
# (--registry etcd://...).
RUN cd /src \
 && if [ -n "$(ls wheels/torch-*.whl 2>/dev/null)" ]; then pip install --no-cache-dir wheels/torch-*.whl; \
    else pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"; fi \
 && pip install --no-cache-dir ".[cpu,etcd]"

FROM runtime
COPY --from=build /opt/pdserve /opt/pdserve
