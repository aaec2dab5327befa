"""Engine services as a client sees them, and real service processes, for tests and benchmarks.

``EngineClients`` drives engines by name over the bus: colocated reference
runs, the two P/D legs, stats, and polling until an engine is idle.
``Processes`` starts ``python -m services.<name> ...`` children with explicit
free ports, waits for them to register and always stops them (SIGTERM, then
SIGKILL) when its ``async with`` block ends.  Each child's output goes to a
log file whose tail is attached to failures.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.bus import BusClient
from common.errors import BusError
from common.messages import (
    EngineStats,
    Generate,
    GetStats,
    Instance,
    InstanceList,
    KVTransferParams,
    ListInstances,
    SamplingParams,
    TokenOutput,
)

REPO = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 10.0  # a stopped child gets this long to exit before SIGKILL


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(predicate, timeout: float = 5.0, interval: float = 0.02) -> None:
    """Wait until ``predicate()`` (sync or async) is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:g} s")
        await asyncio.sleep(interval)


def tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def prompt_ids(n: int, seed: int) -> list[int]:
    """``n`` token ids of the demo model's vocabulary (no BOS/EOS), distinct per seed."""
    rng = random.Random(seed)
    return [rng.randrange(3, 330) for _ in range(n)]


def tokens(outputs: list[TokenOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


class EngineClients:
    """Bus clients for engines by name (``endpoints``: name -> request endpoint); ``close()`` them."""

    def __init__(self, endpoints: dict[str, str], timeout_s: float = 60.0):
        self.endpoints = dict(endpoints)
        self.timeout_s = timeout_s
        self._clients: dict[str, BusClient] = {}
        self._ids = itertools.count()

    def client(self, name: str) -> BusClient:
        if name not in self._clients:
            self._clients[name] = BusClient(self.endpoints[name], name=name, timeout=self.timeout_s)
        return self._clients[name]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    async def run(self, name: str, msg: Generate) -> list[TokenOutput]:
        return [out async for out in self.client(name).stream(msg)]

    async def reference(self, ids: list[int], sampling: SamplingParams = GREEDY, name: str = "both") -> list[int]:
        """Colocated output: what every P/D run must equal."""
        return tokens(await self.run(name, Generate(f"ref-{next(self._ids)}", sampling, prompt_token_ids=ids)))

    async def prefill_leg(self, name: str, rid: str, ids: list[int], sampling: SamplingParams = GREEDY
                          ) -> list[TokenOutput]:
        return await self.run(name, Generate(rid, sampling, prompt_token_ids=ids, do_remote_decode=True))

    async def decode_leg(self, name: str, rid: str, ids: list[int], params: KVTransferParams,
                         sampling: SamplingParams = GREEDY) -> list[TokenOutput]:
        return await self.run(name, Generate(rid, sampling, prompt_token_ids=ids, remote_prefill=params))

    async def pd(self, rid: str, ids: list[int], sampling: SamplingParams = GREEDY, *, prefill: str = "prefill",
                 decode: str = "decode") -> tuple[list[TokenOutput], list[TokenOutput]]:
        """Both legs as the gateway runs them: the prefill's params go to the decode."""
        pre = await self.prefill_leg(prefill, rid, ids, sampling)
        return pre, await self.decode_leg(decode, rid, ids, pre[-1].kv_transfer, sampling)

    async def stats(self, name: str) -> EngineStats:
        reply = await self.client(name).call(GetStats())
        assert isinstance(reply, EngineStats)
        return reply

    async def wait_idle(self, *names: str, timeout_s: float = 15.0) -> None:
        """Poll GetStats until no request runs or waits and no block is used or pinned (all engines
        when no name is given)."""
        for name in names or tuple(self.endpoints):
            deadline = time.monotonic() + timeout_s
            while True:
                s = await self.stats(name)
                load = s.load
                if (load.running, load.waiting, load.kv_blocks_used, load.kv_blocks_pinned, s.num_transfers_active) \
                        == (0, 0, 0, 0, 0):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} not idle after {timeout_s} s: {s}")
                await asyncio.sleep(0.05)


@dataclass
class Proc:
    """One child service process."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen
    endpoint: str = ""  # request ROUTER (registry: its ROUTER)
    kv_endpoint: str = ""

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive:
            self.popen.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """Exit status; raises ``subprocess.TimeoutExpired`` after ``timeout_s``."""
        return self.popen.wait(timeout=timeout_s)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.name} ({self.log_path}) ---\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class Processes:
    """Starts and owns service processes; ``async with`` guarantees none outlives the block."""

    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pdserve-procs-")))
    procs: dict[str, Proc] = field(default_factory=dict)
    registry_endpoint: str = ""

    async def __aenter__(self) -> "Processes":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop_all()
        shutil.rmtree(self.log_dir, ignore_errors=True)  # failures already carry the log tails

    def spawn(self, name: str, module: str, args: list[str]) -> Proc:
        argv = [sys.executable, "-m", module, *args]
        log_path = self.log_dir / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOG_minloglevel": "1"}
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        proc = Proc(name, argv, log_path, popen)
        self.procs[name] = proc
        return proc

    def start_registry(self, *extra: str) -> Proc:
        port = free_port()
        proc = self.spawn("registry", "services.registry", ["--bind", tcp(port), *extra])
        proc.endpoint = self.registry_endpoint = tcp(port)
        return proc

    def start_engine(self, name: str, service: str, *extra: str, num_kv_blocks: int = 256) -> Proc:
        """``python -m services.<service> --instance-id <name>`` on fresh ports, demo model on CPU."""
        if not self.registry_endpoint:
            raise RuntimeError("start the registry first")
        request, kv = tcp(free_port()), tcp(free_port())
        args = ["--instance-id", name, "--bind", request, "--kv-bind", kv, "--registry", self.registry_endpoint,
                "--model", "demo", "--num-kv-blocks", str(num_kv_blocks), "--dtype", "float32", "--device", "cpu",
                "--kv-force-tcp", "true", *extra]  # fmt: skip
        proc = self.spawn(name, f"services.{service}", args)
        proc.endpoint, proc.kv_endpoint = request, kv
        return proc

    def engine_endpoints(self) -> dict[str, str]:
        """Request endpoints of the live engines, by name (for ``EngineClients``)."""
        return {n: p.endpoint for n, p in self.procs.items() if n != "registry" and p.alive}

    def logs(self) -> str:
        return "\n".join(p.log_tail() for p in self.procs.values())

    def check_alive(self, *names: str) -> None:
        for name in names or tuple(self.procs):
            proc = self.procs[name]
            if not proc.alive:
                raise AssertionError(f"{name} exited with {proc.popen.returncode}\n{proc.log_tail()}")

    async def instances(self) -> dict[str, Instance]:
        bus = BusClient(self.registry_endpoint, timeout=5.0)
        try:
            reply = await bus.call(ListInstances())
        finally:
            await bus.close()
        assert isinstance(reply, InstanceList)
        return {i.id: i for i in reply.instances}

    async def wait_registered(self, *names: str, timeout_s: float = 120.0) -> None:
        """Poll the registry until every named engine is listed; fail early when one died."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive(*names, "registry")
            try:
                if set(names) <= set(await self.instances()):
                    return
            except BusError:
                pass  # the registry is still starting
            if time.monotonic() > deadline:
                raise AssertionError(f"{names} not registered within {timeout_s} s\n{self.logs()}")
            await asyncio.sleep(0.2)

    async def stop(self, name: str, signum: int = signal.SIGTERM, timeout_s: float = STOP_GRACE_S) -> int:
        """Signal one child and wait for it (SIGKILL after ``timeout_s``); returns its exit status."""
        self.procs[name].signal(signum)
        return await self.wait_exit(name, timeout_s)

    async def wait_exit(self, name: str, timeout_s: float = STOP_GRACE_S) -> int:
        """Wait for a child to exit; after ``timeout_s`` kill it and fail.  Returns its exit status."""
        proc = self.procs[name]
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
            raise AssertionError(f"{name} did not exit within {timeout_s} s\n{proc.log_tail()}")

    async def stop_all(self) -> None:
        """SIGTERM every live child (engines before the registry), SIGKILL what does not exit."""
        ordered = sorted(self.procs.values(), key=lambda p: p.name == "registry")
        for proc in ordered:
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in ordered:
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, proc.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
