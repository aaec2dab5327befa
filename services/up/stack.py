"""The stack ``pdserve up`` runs: its children in start order, the checks before they start, the wait
until this stack's own engines serve, the ready banner, restarts and the ordered stop."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common.bus.curve import create_keys
from common.config import ConfigError
from common.discovery.etcd_server import etcd_argv
from services.up.children import Child
from services.up.config import UpConfig

log = logging.getLogger(__name__)


class StackFailed(ConfigError):
    """The stack could not start or keep running; ``str()`` says what failed and what to change."""


def check_port_free(host: str, port: int, flag: str) -> None:
    """Refuse, naming ``flag``, a TCP port something on this machine is already listening on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family).close()
    except OSError as e:
        raise ConfigError(f"{flag}: cannot listen on {host}:{port} ({e.strerror}): another server "
                          f"(another pdserve up?) has it; stop it or choose another {flag}") from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


class Stack:
    """The child processes, grouped in start order, and the instance ids this stack's engines register."""

    def __init__(self, config: UpConfig):
        self.config = config
        self.groups: dict[str, list[Child]] = {"registry": [], "engines": [], "gateway": []}
        self.registry_port = config.registry_port or free_port()
        scheme = "etcd" if config.registry_backend == "etcd" else "tcp"
        self.registry = f"{scheme}://127.0.0.1:{self.registry_port}"
        self.etcd_dir: str | None = None  # the etcd member's data, removed at stop
        self.gateway = config.gateway_config(self.registry)
        self.url = f"http://{self.gateway.host}:{self.gateway.port}"
        token = secrets.token_hex(3)  # tells this stack's instances from any other's
        roles = config.engine_roles()
        self.engines = [(f"{role}-{roles[:i].count(role)}", role) for i, role in enumerate(roles)]
        self.instance_ids = {name: f"{name}-{token}" for name, _ in self.engines}
        self.keys: dict[str, Path] = {}  # role -> its keys directory, made by start unless --insecure

    def spawn(self, group: str, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start ``pdserve *argv`` with this run's keys of the group's role (before ``argv``'s flags, which win)."""
        role = {"registry": "registry", "engines": "engine", "gateway": "gateway"}[group]
        keys = ["--keys-dir", str(self.keys[role])] if self.keys else ["--insecure"]
        cmd = [sys.executable, "-m", "services.cli", argv[0], *keys, *argv[1:], "--log-level", self.config.log_level]
        self.groups[group].append(Child(name, cmd, env))

    def children(self) -> list[Child]:
        return [c for group in self.groups.values() for c in group]

    def engine_argv(self, role: str, name: str | None = None) -> list[str]:
        """The ``pdserve`` arguments of engine ``name`` (one of role prefill, decode, or both)."""
        command = {"prefill": ["prefill"], "decode": ["decode"], "both": ["prefill", "--role", "both"]}[role]
        own_id = ["--instance-id", self.instance_ids[name]] if name else []
        return [*command, "--registry", self.registry, *own_id, *self.config.engine_flags(role)]

    def start(self) -> None:
        """Refuse ports in use, then start the registry, the engines and the gateway."""
        check_port_free(self.gateway.host, self.gateway.port, "--port")
        if self.config.registry_port:
            check_port_free("127.0.0.1", self.registry_port, "--registry-port")
        if not self.config.insecure:  # throwaway keys: even this run's own processes authenticate each other
            self.keys = create_keys(tempfile.mkdtemp(prefix="pdserve-keys-"))
        if self.config.registry_backend == "etcd":
            self.start_etcd()
        else:
            self.spawn("registry", "registry", ["registry", "--bind", self.registry])
        for (name, role), gpus in zip(self.engines, self.config.engine_gpus()):
            env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if gpus else None
            self.spawn("engines", name, self.engine_argv(role, name), env)
        self.spawn("gateway", "gateway", ["gateway", *self.config.gateway_argv(self.registry)])

    def start_etcd(self, timeout_s: float = 10.0) -> None:
        """A one-member etcd on ``registry_port``, listening before the engines start (they register
        at once; a ZMQ registry queues their calls, etcd refuses them until it listens)."""
        self.etcd_dir = tempfile.mkdtemp(prefix="pdserve-up-etcd-")
        argv = etcd_argv("pdserve", self.etcd_dir, self.registry_port, {"pdserve": free_port()})
        child = Child("etcd", argv)
        self.groups["registry"].append(child)
        deadline = time.monotonic() + timeout_s
        while child.proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.registry_port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise StackFailed(f"etcd did not listen on 127.0.0.1:{self.registry_port} within {timeout_s:g} s; "
                          "its lines above, prefixed [etcd], say why")

    def exited(self) -> list[Child]:
        return [c for c in self.children() if c.proc.poll() is not None]

    def restart_dead(self) -> None:
        """Restart children that exited; ``StackFailed`` when one has used up its restarts."""
        for child in self.exited():
            code = child.proc.returncode
            if child.restarts >= self.config.max_restarts:
                raise StackFailed(f"{child.name} exited ({code}) after {child.restarts} restarts "
                                  f"(--max-restarts); its lines above, prefixed [{child.name}], say why")
            child.restarts += 1
            log.warning("%s exited (%s): restarting it (%d/%d)", child.name, code, child.restarts,
                        self.config.max_restarts)
            child.proc = child.start()

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.gateway.api_key}"} if self.gateway.api_key else {}

    async def joined(self, http: httpx.AsyncClient) -> dict[str, str]:
        """This stack's engines that this stack's gateway serves (name -> model); empty while it answers
        nothing, or answers for another stack."""
        try:
            if (await http.get(self.url + "/ready")).status_code != 200:
                return {}
            instances = (await http.get(self.url + "/v1/instances")).json()["data"]
        except (httpx.HTTPError, ValueError, KeyError):
            return {}
        ids = {i["id"]: i["model"] for i in instances}
        return {name: ids[iid] for name, iid in self.instance_ids.items() if iid in ids}

    async def wait_ready(self) -> str:
        """Wait until the gateway serves every engine of this stack; returns the model name they serve."""
        deadline = time.monotonic() + self.config.ready_timeout_s
        async with httpx.AsyncClient(timeout=2.0, headers=self.auth()) as http:
            while len(joined := await self.joined(http)) < len(self.instance_ids):
                if exited := self.exited():
                    child = exited[0]
                    raise StackFailed(f"{child.name} exited ({child.proc.returncode}) during start-up; its lines "
                                      f"above, prefixed [{child.name}], say why")
                if time.monotonic() > deadline:
                    waiting = ", ".join(name for name in self.instance_ids if name not in joined)
                    raise StackFailed(f"--ready-timeout-s: not ready after {self.config.ready_timeout_s:g} s "
                                      f"(not yet serving: {waiting}); a large model may need a longer one")
                await asyncio.sleep(0.25)
        return next(iter(joined.values()))

    def banner(self, model: str) -> str:
        """What ``up`` prints once ready: the URL, the engines, and a ``curl`` that works as pasted."""
        body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 16})
        headers = [f"{k}: {v}" for k, v in {"Content-Type": "application/json", **self.auth()}.items()]
        curl = shlex.join(["curl", self.url + "/v1/completions", *(a for h in headers for a in ("-H", h)),
                           "-d", body])
        return (f"\npdserve is ready at {self.url}  (mode {self.config.mode}, model {model}, engines "
                f"{', '.join(self.instance_ids.values())})\n  {curl}\nCtrl-C stops everything.")

    def stop(self) -> None:
        """Gateway, then engines, then registry; SIGTERM, then SIGKILL after the timeout."""
        for name in ("gateway", "engines", "registry"):
            procs = [c.proc for c in self.groups[name]]
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.config.shutdown_timeout_s
            for p in procs:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s pid %d did not stop in time: killing it", name, p.pid)
                    p.kill()
                    p.wait()
        for child in self.children():  # their last lines
            child.pump.join(timeout=1.0)
        if self.keys:
            shutil.rmtree(next(iter(self.keys.values())).parent, ignore_errors=True)
        if self.etcd_dir is not None:
            shutil.rmtree(self.etcd_dir, ignore_errors=True)


async def serve(config: UpConfig) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per /ready poll
    stack = Stack(config)
    try:
        stack.start()
        print(stack.banner(await stack.wait_ready()), flush=True)
        while True:
            await asyncio.sleep(0.5)
            stack.restart_dead()
    finally:
        await asyncio.get_running_loop().run_in_executor(None, stack.stop)
