"""A real etcd cluster on loopback, for tests and benchmarks: ``async with EtcdCluster(3) as etcd:``.

Each member runs ``etcd`` (Debian's ``etcd-server``) on free ports with its data in a
temporary directory; ``url`` is the ``etcd://`` discovery URL naming every member.
Entering waits until every member answers ``/health``; leaving kills them all and
removes their data.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.processes import free_port
from common.discovery.etcd_server import etcd_argv

START_TIMEOUT_S = 15.0
START_ATTEMPTS = 3  # a port picked free may be taken (e.g. as an outgoing port) before etcd binds it


class MemberExited(RuntimeError):
    """A member exited while starting; ``port_taken``: one of its ports was taken meanwhile."""

    def __init__(self, name: str, log: str):
        super().__init__(f"etcd {name} exited: {log}")
        self.port_taken = "address already in use" in log


class EtcdCluster:
    def __init__(self, size: int = 1, *, lease_ttl_s: int = 1):
        self.size = size
        self.lease_ttl_s = lease_ttl_s
        self.names = [f"m{i}" for i in range(size)]
        self.dir = Path(tempfile.mkdtemp(prefix="pdserve-etcd-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.pick_ports()

    def pick_ports(self) -> None:
        self.client_ports = {name: free_port() for name in self.names}
        self.peer_ports = {name: free_port() for name in self.names}

    def member_url(self, *names: str) -> str:
        """The discovery URL of the given members (all when none given)."""
        hosts = ",".join(f"127.0.0.1:{self.client_ports[n]}" for n in names or self.names)
        return f"etcd://{hosts}?lease_ttl_s={self.lease_ttl_s}"

    @property
    def url(self) -> str:
        return self.member_url()

    async def __aenter__(self) -> EtcdCluster:
        """Start every member; again on other ports when a port was taken between picking and binding."""
        for attempt in range(START_ATTEMPTS):
            try:
                self.start()
                await self.wait_healthy(*self.names)
                return self
            except MemberExited as e:
                self.stop(keep_dir=True)
                if not e.port_taken or attempt == START_ATTEMPTS - 1:
                    self.stop()
                    raise
                self.pick_ports()
            except BaseException:
                self.stop()
                raise

    async def __aexit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        for name in self.names:
            shutil.rmtree(self.dir / name, ignore_errors=True)
            self.procs[name] = subprocess.Popen(
                etcd_argv(name, str(self.dir / name), self.client_ports[name], self.peer_ports, log_level="error"),
                stdout=subprocess.DEVNULL, stderr=open(self.dir / f"{name}.log", "wb"))

    async def wait_healthy(self, *names: str) -> None:
        """Wait until each member answers ``/health`` with 200 (503 while it has no leader)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(timeout=1.0) as http:
            for name in names:
                while not await self.healthy(http, name):
                    if self.procs[name].poll() is not None:
                        raise MemberExited(name, self.log(name))
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"etcd {name} not healthy within {START_TIMEOUT_S:g} s: {self.log(name)}")
                    await asyncio.sleep(0.05)

    async def healthy(self, http: httpx.AsyncClient, name: str) -> bool:
        try:
            return (await http.get(f"http://127.0.0.1:{self.client_ports[name]}/health")).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, name: str) -> None:
        """SIGKILL one member (the others keep the cluster when they are a majority)."""
        self.procs[name].kill()
        self.procs[name].wait()

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")[-2000:]

    def stop(self, *, keep_dir: bool = False) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs = {}
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
