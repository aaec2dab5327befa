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


class EtcdCluster:
    def __init__(self, size: int = 1, *, lease_ttl_s: int = 1):
        self.size = size
        self.lease_ttl_s = lease_ttl_s
        self.names = [f"m{i}" for i in range(size)]
        self.client_ports = {name: free_port() for name in self.names}
        self.peer_ports = {name: free_port() for name in self.names}
        self.dir = Path(tempfile.mkdtemp(prefix="pdserve-etcd-"))
        self.procs: dict[str, subprocess.Popen] = {}

    def member_url(self, *names: str) -> str:
        """The discovery URL of the given members (all when none given)."""
        hosts = ",".join(f"127.0.0.1:{self.client_ports[n]}" for n in names or self.names)
        return f"etcd://{hosts}?lease_ttl_s={self.lease_ttl_s}"

    @property
    def url(self) -> str:
        return self.member_url()

    async def __aenter__(self) -> EtcdCluster:
        try:
            for name in self.names:
                self.procs[name] = subprocess.Popen(
                    etcd_argv(name, str(self.dir / name), self.client_ports[name], self.peer_ports, log_level="error"),
                    stdout=subprocess.DEVNULL, stderr=open(self.dir / f"{name}.log", "wb"))
            await self.wait_healthy(*self.names)
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop()

    async def wait_healthy(self, *names: str) -> None:
        """Wait until each member answers ``/health`` with a leader elected."""
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(timeout=1.0) as http:
            for name in names:
                while True:
                    if self.procs[name].poll() is not None:
                        raise RuntimeError(f"etcd {name} exited: {self.log(name)}")
                    try:
                        reply = await http.get(f"http://127.0.0.1:{self.client_ports[name]}/health")
                        if reply.status_code == 200 and reply.json().get("health") == "true":
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"etcd {name} not healthy within {START_TIMEOUT_S:g} s: {self.log(name)}")
                    await asyncio.sleep(0.05)

    def kill(self, name: str) -> None:
        """SIGKILL one member (the others keep the cluster when they are a majority)."""
        self.procs[name].kill()
        self.procs[name].wait()

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
