"""What a running engine says and where it listens: a real engine process (demo model) with a real registry.

* it listens only on the address its --advertise-host resolves to (no loopback, no wildcard socket);
* a stats line at info every --stats-interval-s while work is in flight, none while idle and unchanged;
* one progress line per safetensors shard while the weights load.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.engine_driver import EngineDriver, prompt_ids
from bench.processes import free_port
from common.engine.engine import StepStats
from common.engine.loader import load_model, resolve_model_path
from common.engine.model_config import load_model_config
from common.engine_service.stats_log import StatsLog
from common.messages import SamplingParams
from tests.procs import eventually
from tests.test_engine_addresses import routable_address

ROOT = Path(__file__).parents[1]
STATS = re.compile(r"prompt throughput ([\d.]+) tokens/s, generation throughput ([\d.]+) tokens/s, "
                   r"running (\d+) reqs, waiting (\d+) reqs, KV cache usage ([\d.]+)%")


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on, read from /proc/net/tcp{,6}."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}") if os.path.islink(f"/proc/{pid}/fd/{fd}") else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_addr)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is little-endian
            found.append((socket.inet_ntop(family, raw), int(hex_port, 16)))
    return found


class EngineProcess:
    """``pdserve prefill --role both`` on the demo model, its stderr collected line by line."""

    def __init__(self, *flags: str):
        self.flags = flags
        self.lines: list[str] = []

    async def __aenter__(self) -> EngineProcess:
        self.registry_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.registry = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.registry", "--bind", self.registry_endpoint, cwd=ROOT)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "prefill", "--role", "both", "--model", "demo", "--device", "cpu",
            "--dtype", "float32", "--num-kv-blocks", "64", "--registry", self.registry_endpoint, *self.flags,
            cwd=ROOT, stderr=asyncio.subprocess.PIPE)
        self.reader = asyncio.create_task(self._read())
        try:
            await eventually(lambda: self.serving() is not None or self.proc.returncode is not None, timeout=120,
                             interval=0.1)
            assert self.serving() is not None, f"the engine exited: {''.join(self.lines[-5:])}"
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.lines.append(line.decode())

    def serving(self) -> str | None:
        """The request endpoint the engine advertised, once it serves."""
        for line in self.lines:
            m = re.search(r"serving demo on (tcp://\S+)", line)
            if m:
                return m.group(1)
        return None

    def stats_lines(self) -> list[re.Match]:
        return [m for m in map(STATS.search, self.lines) if m]

    async def __aexit__(self, *exc) -> None:
        for proc in (self.proc, self.registry):
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
        await self.reader


@pytest.mark.asyncio
async def test_engine_listens_where_it_advertises_and_logs_stats_while_busy():
    here = routable_address()
    async with EngineProcess("--advertise-host", here, "--stats-interval-s", "0.2", "--insecure") as engine:
        assert engine.serving().startswith(f"tcp://{here}:")
        sockets = listening(engine.proc.pid)
        assert sockets and {address for address, _ in sockets} == {here}, sockets
        driver = EngineDriver({"e": engine.serving()})
        try:
            before = len(engine.stats_lines())
            sampling = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
            assert len(await driver.reference(prompt_ids(40, 1), sampling, name="e")) == 64
        finally:
            await driver.close()
        await eventually(lambda: any(float(m.group(2)) > 0 for m in engine.stats_lines()[before:]), timeout=30)
        assert any(float(m.group(1)) > 0 for m in engine.stats_lines()[before:])  # the 40-token prompt
    assert all(" INFO " in line for line in engine.lines if STATS.search(line))


def test_an_idle_unchanged_engine_logs_nothing():
    state = StepStats(running=0, waiting=0, waiting_for_remote_kvs=0, kv_blocks_used=0, kv_blocks_pinned=0,
                      kv_blocks_total=64, num_preemptions=0)
    stats = StatsLog("e", lambda: state, transfers=lambda: 0, interval_s=10.0)
    assert stats.line() is not None  # the first line: the state is new
    assert stats.line() is None  # idle and unchanged
    stats.count_generated(5)
    assert "pinned 0 blocks, KV transfers 0" in stats.line()
    assert stats.line() is None
    state.kv_blocks_used = 16  # changed (cached blocks), though idle
    assert "KV cache usage 25.0%" in stats.line()
    assert "pinned" not in StatsLog("c", lambda: state, transfers=None, interval_s=10.0).line()  # colocated


def test_loading_logs_one_line_per_shard(tmp_path, caplog):
    demo = resolve_model_path("demo")
    tensors = load_file(str(demo / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: file for file, part in halves.items() for n in part}}))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((demo / name).read_bytes())
    with caplog.at_level(logging.INFO, logger="common.engine.loader"):
        load_model(tmp_path, load_model_config(tmp_path), torch.float32, "cpu")
    shards = [r.getMessage() for r in caplog.records if "loaded shard" in r.getMessage()]
    assert len(shards) == 2, shards
    assert re.fullmatch(r"loaded shard 1/2 model-00001-of-00002\.safetensors \([\d.]+ MiB\) in [\d.]+ s", shards[0])
    assert shards[1].startswith("loaded shard 2/2 model-00002-of-00002.safetensors")


@pytest.mark.asyncio
async def test_a_loopback_prefill_listens_on_loopback_only():
    """Issue 14, defect 9: with the default ``--kv-transport auto`` and a loopback ``--kv-host`` a prefill serves
    its KV over the same-host transport alone, so Mooncake (which binds every interface) is not opened."""
    async with EngineProcess("--role", "prefill") as engine:
        sockets = listening(engine.proc.pid)
        assert sockets and all(ipaddress.ip_address(address).is_loopback for address, _ in sockets), sockets
        assert "KV transports served: shm (cpu memory)" in "".join(engine.lines)
