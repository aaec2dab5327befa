# One CPU image for every pdserve service; compose.yaml picks the subcommand.
FROM python:3.11-slim

# Mooncake's transfer engine links these; RDMA is used only where NICs exist.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libibverbs1 librdmacm1 libnuma1 libcurl4 make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch before the project, so the project's torch range accepts it and pip keeps it.  By default the CPU
# wheel (about 190 MB) from PyTorch's CPU index; --build-arg TORCH_INDEX_URL= (empty) takes pip's index
# instead, where PyPI's Linux x86_64 torch is the CUDA build with about 2.6 GB of NVIDIA and triton wheels.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

COPY pyproject.toml README.md ./
COPY common ./common
COPY services ./services
COPY bench ./bench
# The non-CUDA Mooncake build: this image runs on hosts without an NVIDIA driver.
RUN pip install --no-cache-dir ".[cpu]"

# The demo checkpoint is written here on first use; a volume keeps it.
ENV PDSERVE_CACHE_DIR=/cache
VOLUME ["/cache"]

ENTRYPOINT []
CMD ["pdserve", "up", "--host", "0.0.0.0"]
