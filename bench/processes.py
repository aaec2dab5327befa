"""Real service processes for tests and benchmarks, on explicit free ports.

``Processes`` starts ``python -m services.<name> ...`` children, waits for them
to register and always stops them (SIGTERM, then SIGKILL) when its ``async
with`` block ends.  Each child's output goes to a log file whose tail is
attached to failures.
"""

from __future__ import annotations

import asyncio
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
from common.messages import Instance, InstanceList, ListInstances

REPO = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 10.0  # a stopped child gets this long to exit before SIGKILL


PORTS = range(20000, 32768)  # below Linux's ephemeral range (32768-60999) and above Mooncake's (15000-17000)


_handed_out: set[int] = set()  # never hand a port out twice: its first taker may not have bound it yet


def _ports() -> range:
    """``PORTS``, or under pytest-xdist (``make test``) this worker's own slice of it: another worker's
    ``_handed_out`` is not ours to see, so two workers must never draw from the same ports."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if count <= 1 or not worker.startswith("gw"):
        return PORTS
    share = len(PORTS) // count
    start = PORTS.start + int(worker[2:]) * share
    return range(start, start + share)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and not handed out before by this process (nor by
    another test worker: ``_ports``), outside the ephemeral range: there the local end of any outgoing
    connection (a busy machine makes many) could take it before the service binds it. A child takes seconds
    to bind, so a port merely "free now" could be handed to two children started one after the other."""
    ports = _ports()
    for _ in range(1000):
        port = random.choice(ports)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {ports}")


def tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


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
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "GLOG_minloglevel": "1"}
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

    def start_engine(self, name: str, service: str, *extra: str, num_kv_blocks: int = 256,
                     kv_transport: str = "tcp") -> Proc:
        """``python -m services.<service> --instance-id <name>`` on fresh ports, demo model on CPU."""
        if not self.registry_endpoint:
            raise RuntimeError("start the registry first")
        request, kv = tcp(free_port()), tcp(free_port())
        args = ["--instance-id", name, "--bind", request, "--kv-bind", kv, "--registry", self.registry_endpoint,
                "--model", "demo", "--num-kv-blocks", str(num_kv_blocks), "--dtype", "float32", "--device", "cpu",
                "--kv-transport", kv_transport, *extra]  # fmt: skip
        proc = self.spawn(name, f"services.{service}", args)
        proc.endpoint, proc.kv_endpoint = request, kv
        return proc

    def engine_endpoints(self) -> dict[str, str]:
        """Request endpoints of the live engines, by name (for ``EngineDriver``)."""
        return {n: p.endpoint for n, p in self.procs.items() if n != "registry" and p.alive}

    def logs(self) -> str:
        return "\n".join(p.log_tail() for p in self.procs.values())

    def check_alive(self, *names: str) -> None:
        for name in names or tuple(self.procs):
            proc = self.procs[name]
            if not proc.alive:
                raise AssertionError(f"{name} exited with {proc.popen.returncode}\n{proc.log_tail()}")

    async def instances(self) -> dict[str, Instance]:
        bus = BusClient(self.registry_endpoint, timeout=5.0, server_role="registry")
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
