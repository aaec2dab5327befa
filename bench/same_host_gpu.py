"""GPU to GPU on one host: pdserve's CUDA IPC backend against Mooncake's intra-node NVLink transport.

Two processes on one GPU.  The "prefill" child (this script with ``--serve``)
fills a 256 MiB device buffer with a known pattern and publishes it through the
backend under test; the parent reads a 64 MiB request in ``--ranges`` equal
ranges into its own device buffer, checks every byte, then times ``--repeats``
reads against a device-to-device copy of the same bytes in one process (the
limit), median of each.  Backends, one at a time:

* ``ipc``: ``CudaIpcBackend.read`` (``common/kv_transfer/cuda_ipc.py``);
* ``mooncake``: ``TransferEngine.batch_transfer_sync_read`` with protocol
  ``nvlink_intra`` and ``MC_INTRANODE_NVLINK=1`` in both processes (the only way
  Mooncake 0.3.14 picks that transport; it then serves nothing else).

    python -m bench.same_host_gpu --backend ipc --ranges 16
    MC_INTRANODE_NVLINK=1 python -m bench.same_host_gpu --backend mooncake --ranges 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from common.kv_transfer.status import TransferStatus
from common.messages import MemoryRegion

POOL = 256 << 20
REQUEST = 64 << 20


def pattern(n: int) -> torch.Tensor:
    return (torch.arange(n, device="cuda", dtype=torch.int64) % 251).to(torch.uint8)


def open_backend(name: str, buf: torch.Tensor):
    """(session, meta) published for ``buf`` and a ``read(session, local, remote, lengths)``."""
    if name == "ipc":
        from common.kv_transfer.cuda_ipc import CudaIpcBackend

        backend = CudaIpcBackend("127.0.0.1", buf)
        backend.register([MemoryRegion(buf.data_ptr(), POOL)])
        return backend, backend.session, backend.backend_meta().hex()
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "nvlink_intra", "") != 0:
        raise SystemExit("Mooncake initialize(nvlink_intra) failed")
    if engine.register_memory(buf.data_ptr(), POOL) != 0:
        raise SystemExit("Mooncake register_memory failed")
    return engine, f"127.0.0.1:{engine.get_rpc_port()}", ""


def serve(name: str) -> None:
    buf = pattern(POOL)
    torch.cuda.synchronize()
    _, session, meta = open_backend(name, buf)
    print(json.dumps({"session": session, "meta": meta, "addr": buf.data_ptr()}), flush=True)
    sys.stdin.read()


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args: argparse.Namespace) -> dict:
    child = subprocess.Popen([sys.executable, "-m", "bench.same_host_gpu", "--serve", "--backend", args.backend],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        peer = json.loads(child.stdout.readline())
        dst = torch.zeros(POOL, dtype=torch.uint8, device="cuda")
        backend, _, _ = open_backend(args.backend, dst)
        seg = REQUEST // args.ranges
        local = [dst.data_ptr() + 2 * i * seg for i in range(args.ranges)]
        remote = [peer["addr"] + (2 * i + 1) * seg for i in range(args.ranges)]
        lengths = [seg] * args.ranges
        if args.backend == "ipc":
            backend.connect(peer["session"], bytes.fromhex(peer["meta"]))

            def read() -> bool:
                return set(backend.read(peer["session"], local, remote, lengths)) == {TransferStatus.SUCCESS}
        else:
            def read() -> bool:
                return backend.batch_transfer_sync_read(peer["session"], local, remote, lengths) == 0
        ok = read()
        expected = pattern(POOL)
        exact = all(torch.equal(dst[2 * i * seg:(2 * i + 1) * seg], expected[(2 * i + 1) * seg:(2 * i + 2) * seg])
                    for i in range(args.ranges))
        read_s = median_s(read, args.repeats)
        a, b = torch.empty(REQUEST, dtype=torch.uint8, device="cuda"), torch.ones(REQUEST, dtype=torch.uint8,
                                                                                   device="cuda")

        def device_copy():
            a.copy_(b)
            torch.cuda.synchronize()

        copy_s = median_s(device_copy, args.repeats)
        return {"backend": args.backend, "ranges": args.ranges, "bytes": REQUEST, "status_ok": bool(ok),
                "bytes_exact": exact, "read_gbps": REQUEST / read_s / 1e9, "copy_gbps": REQUEST / copy_s / 1e9,
                "ratio": copy_s / read_s}
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("ipc", "mooncake"), default="ipc")
    p.add_argument("--ranges", type=int, default=16, help="ranges the 64 MiB request is read in (default 16)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.backend)
        return
    r = measure(args)
    print(json.dumps(r))
    print(f"{r['backend']}: {r['ranges']} ranges, bytes exact {r['bytes_exact']}: read {r['read_gbps']:.0f} GB/s, "
          f"device copy {r['copy_gbps']:.0f} GB/s, ratio {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
