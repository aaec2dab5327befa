"""``pdserve up``: the whole stack on this machine, as child processes.

Refuses a gateway port already in use, then starts the registry (on a free
port unless ``--registry-port``), the engine instances (``--prefill N`` prefill
and ``--decode M`` decode, or ``--colocated K`` instances of role ``both`` with
``--mode colocated``), each under an instance id this run generated, and the
gateway; waits until the gateway lists every one of those ids; prints the URL
and a ``curl`` to paste.  Each child's output line is copied to stderr after its
name (``[prefill-0] ...``).  On SIGINT/SIGTERM it stops them in
order — gateway (no new requests), engines (finish or abort in-flight work,
release KV, deregister), registry — each within ``--shutdown-timeout-s``,
then SIGKILL.  A child that dies unexpectedly is restarted with the same
flags (at most ``--max-restarts`` times per child), as a supervisor would:
engines re-register, the gateway and engines find a restarted registry again.
With ``--gpus``, each engine gets as many GPUs as its tensor-parallel size
(``engine_gpus``) through ``CUDA_VISIBLE_DEVICES``.
Children run in their own session (a terminal's Ctrl-C reaches
only this process, which orders the shutdown) and die with this process
(PR_SET_PDEATHSIG), so no orphan outlives it.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Literal

import httpx

from common.config import ConfigError, add_arguments, flag_name, from_args, opt, require
from common.engine_service.config import EngineServiceConfig
from services.gateway.config import GatewayConfig

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


LogLevel = Literal["debug", "info", "warning", "error"]

# UpConfig fields handed to every engine as the same flag, when set.
ENGINE_FLAGS = ("model", "dtype", "device", "served_model_name", "max_model_len", "block_size",
                "gpu_memory_utilization", "tensor_parallel_size")


@dataclass
class UpConfig:
    mode: Literal["disagg", "colocated"] = opt("disagg", "disagg: prefill + decode instances; colocated: role-both instances")
    prefill: int | None = opt(None, "prefill instances, disagg only (none: 1)")
    decode: int | None = opt(None, "decode instances, disagg only (none: 1)")
    colocated: int | None = opt(None, "role-both instances, colocated only (none: 1)")
    model: str = opt("demo", "model directory, hub id, or 'demo' (tiny random model, meaningless text)")
    dtype: str = opt("auto", "engine dtype: auto, float32, float16, bfloat16")
    device: str = opt("auto", "engine device: auto, cpu, cuda, cuda:N")
    served_model_name: str | None = opt(None, "model name clients use (engines' flag); none = --model")
    max_model_len: int | None = opt(None, "context length limit (engines' flag); none = the model's")
    block_size: int | None = opt(None, "tokens per KV block (engines' flag); none = the engines' default")
    gpu_memory_utilization: float | None = opt(None, "share of free GPU memory for the KV cache (engines' "
                                                     "flag); none = the engines' default")
    tensor_parallel_size: int | None = opt(None, "ranks per engine (engines' flag); none = 1", aliases=("-tp",))
    api_key: str | None = opt(None, "gateway: /v1 requests need 'Authorization: Bearer <key>'")
    host: str = opt("127.0.0.1", "gateway host")
    port: int = opt(8000, "gateway port")
    registry_port: int = opt(0, "registry port on 127.0.0.1 (0: a free one)")
    engine_args: str = opt("", "extra flags for every engine, after the ones above so they win, "
                               "e.g. '--num-kv-blocks 512 --max-num-seqs 32'")
    prefill_args: str = opt("", "extra flags for the prefill engines only (after --engine-args, so they win), "
                                "e.g. '--block-size 16'")
    decode_args: str = opt("", "extra flags for the decode engines only (after --engine-args), "
                               "e.g. '--block-size 32'")
    gpus: list[int] = opt([], "GPUs handed out through CUDA_VISIBLE_DEVICES, each once: every engine "
                              "(prefills first, then decodes) takes the next N of them, N its "
                              "--tensor-parallel-size; a stack needing more is refused, except that "
                              "engines all of TP 1 wrap around and share (engine i on gpus[i % len]); "
                              "empty: no pinning")
    gateway_args: str = opt("", "extra flags for the gateway")
    ready_timeout_s: float = opt(180.0, "give up if the stack is not ready after this long")
    shutdown_timeout_s: float = opt(30.0, "per process group: SIGKILL after this long (engines drain "
                                          "for up to their own --shutdown-timeout-s, 10 s by default)")
    max_restarts: int = opt(5, "restart a child that died unexpectedly at most this many times")
    log_level: LogLevel = opt("info", "log level of every process")

    def validate(self) -> None:
        """Refuses counts and role flags the mode does not use, and any engine or gateway flag the child
        would refuse (naming the flag, or the ``--*-args`` it came from)."""
        if self.mode == "disagg":
            require(self.colocated is None, "colocated", "counts instances of --mode colocated only")
            require(self.prefill is None or self.prefill >= 1, "prefill", "disagg needs at least 1 prefill instance")
            require(self.decode is None or self.decode >= 1, "decode", "disagg needs at least 1 decode instance")
        else:
            for name in ("prefill", "decode", "prefill_args", "decode_args"):
                require(not getattr(self, name), name, "applies to --mode disagg only")
            require(self.colocated is None or self.colocated >= 1, "colocated", "colocated needs at least 1 instance")
        require(0 < self.port < 65536, "port", "must be a TCP port")
        require(0 <= self.registry_port < 65536, "registry_port", "must be a TCP port (0: a free one)")
        require(self.ready_timeout_s > 0, "ready_timeout_s", "must be > 0")
        require(self.max_restarts >= 0, "max_restarts", "must be >= 0")
        require(self.shutdown_timeout_s > 0, "shutdown_timeout_s", "must be > 0")
        require(all(g >= 0 for g in self.gpus), "gpus", "GPU ids are >= 0")
        require(len(set(self.gpus)) == len(self.gpus), "gpus", "lists a GPU twice")
        self.gateway_config("tcp://127.0.0.1:1")
        self.engine_gpus()  # parses every engine's flags; refuses a stack needing more GPUs than --gpus lists

    def engine_roles(self) -> list[str]:
        """The role of each engine instance, in start order: prefills then decodes, or ``both``."""
        if self.mode == "disagg":
            counts = {"prefill": self.prefill or 1, "decode": self.decode or 1}
        else:
            counts = {"both": self.colocated or 1}
        return [role for role, count in counts.items() for _ in range(count)]

    def own_engine_flags(self) -> list[str]:
        """The engine flags ``up`` sets itself (``ENGINE_FLAGS`` that are set)."""
        values = ((name, getattr(self, name)) for name in ENGINE_FLAGS)
        return [arg for name, value in values if value is not None for arg in (flag_name(name), str(value))]

    def engine_flag_sources(self, role: str) -> list[tuple[str, list[str]]]:
        """An engine of ``role``'s flags by where they come from: ``up``'s own, ``--engine-args``, then the
        role's own (``--prefill-args``/``--decode-args``): the last given wins."""
        own = {"prefill": self.prefill_args, "decode": self.decode_args, "both": ""}[role]
        return [("", self.own_engine_flags()), ("--engine-args", shlex.split(self.engine_args)),
                (f"--{role}-args", shlex.split(own))]

    def engine_flags(self, role: str) -> list[str]:
        """The flags of an engine of ``role``, in the order of ``engine_flag_sources``."""
        return [flag for _, flags in self.engine_flag_sources(role) for flag in flags]

    def engine_config(self, role: str) -> EngineServiceConfig:
        """The config an engine of ``role`` runs with; ``ConfigError`` names the flag, after the
        ``--*-args`` it came from."""
        flags: list[str] = []
        for source, more in self.engine_flag_sources(role):
            flags += more
            try:
                config = parse_engine_flags(flags, role)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}" if source else str(e)) from None
        return config

    def engine_gpus(self) -> list[list[int]]:
        """The GPUs of each engine of ``engine_roles()`` (all empty without ``--gpus``); raises ``ConfigError``."""
        sizes = [self.engine_config(role).tensor_parallel_size for role in self.engine_roles()]
        return assign_gpus(self.gpus, sizes) if self.gpus else [[] for _ in sizes]

    def gateway_argv(self, registry: str) -> list[str]:
        """The ``pdserve gateway`` flags: ``up``'s, then ``--gateway-args`` (which win)."""
        key = ["--api-key", self.api_key] if self.api_key is not None else []
        own = ["--host", self.host, "--port", str(self.port), "--registry", registry, "--mode", self.mode, *key]
        return [*own, *shlex.split(self.gateway_args)]

    def gateway_config(self, registry: str) -> GatewayConfig:
        """The config the gateway runs with; ``ConfigError`` names the flag (after ``--gateway-args:``
        when it came from there)."""
        flags = self.gateway_argv(registry)
        try:
            return from_args(GatewayConfig, _parse(GatewayConfig, flags))
        except ConfigError as e:
            raise ConfigError(f"--gateway-args: {e}" if self.gateway_args else str(e)) from None


class _RaisingParser(argparse.ArgumentParser):
    """An argument parser whose errors are ``ConfigError`` rather than an exit."""

    def error(self, message: str):
        raise ConfigError(message)


def _parse(config_cls: type, flags: list[str], defaults: dict | None = None) -> argparse.Namespace:
    parser = _RaisingParser(add_help=False)
    add_arguments(parser, config_cls, defaults)
    return parser.parse_args(flags)


def parse_engine_flags(flags: list[str], role: str = "both") -> EngineServiceConfig:
    """The config of an engine of ``role`` started with ``flags``, read as the engine reads them (the last
    flag wins, then ``PDSERVE_*``, then the default); raises ``ConfigError``."""
    return from_args(EngineServiceConfig, _parse(EngineServiceConfig, flags, {"role": role}))


def tensor_parallel_size(flags: list[str]) -> int:
    """The TP size of an engine started with ``flags`` (``-tp``/``--tensor-parallel-size``, else
    ``PDSERVE_TENSOR_PARALLEL_SIZE``, else 1); raises ``ConfigError``."""
    return parse_engine_flags(flags).tensor_parallel_size


def assign_gpus(gpus: list[int], tp_sizes: list[int]) -> list[list[int]]:
    """The GPUs of each engine, in order: engine i takes the next ``tp_sizes[i]`` GPUs of ``gpus``.

    A stack needing more GPUs than ``gpus`` lists is refused with ``ConfigError`` — two TP groups
    never share a GPU — unless every engine has TP 1: those wrap around (engine i on
    ``gpus[i % len(gpus)]``), so small engines may share one GPU.
    """
    needed = sum(tp_sizes)
    if needed <= len(gpus):
        starts = [sum(tp_sizes[:i]) for i in range(len(tp_sizes))]
        return [gpus[start:start + size] for start, size in zip(starts, tp_sizes)]
    if all(size == 1 for size in tp_sizes):
        return [[gpus[i % len(gpus)]] for i in range(len(tp_sizes))]
    raise ConfigError(f"--gpus: the engines need {needed} GPUs (tensor-parallel sizes "
                      f"{', '.join(map(str, tp_sizes))}) but --gpus lists {len(gpus)}")


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


class Child:
    """One child process: its name (the prefix of each of its output lines), its command, its restarts."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.restarts = 0
        self.pump: threading.Thread | None = None
        self.proc = self.start()

    def start(self) -> subprocess.Popen:
        """Start (or restart) the process; a thread copies its output to ours, each line prefixed."""
        log.info("starting %s: %s", self.name, shlex.join(self.argv[3:]))
        proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
        self.pump = threading.Thread(target=_copy_lines, args=(proc.stdout, f"[{self.name}] ".encode()),
                                     name=f"output-{self.name}", daemon=True)
        self.pump.start()
        return proc


_output_lock = threading.Lock()


def _copy_lines(pipe, prefix: bytes) -> None:
    """Copy ``pipe`` to our stderr line by line, each line after ``prefix``, until it closes (lines
    are dropped once our stderr is gone, so that a child never blocks on a full pipe)."""
    with pipe:
        for line in pipe:
            with _output_lock:
                try:
                    sys.stderr.buffer.write(prefix + line)
                    sys.stderr.buffer.flush()
                except (OSError, ValueError):
                    pass


class Stack:
    """The child processes, grouped in start order, and the instance ids this stack's engines register."""

    def __init__(self, config: UpConfig):
        self.config = config
        self.groups: dict[str, list[Child]] = {"registry": [], "engines": [], "gateway": []}
        self.registry_port = config.registry_port or free_port()
        self.registry = f"tcp://127.0.0.1:{self.registry_port}"
        self.gateway = config.gateway_config(self.registry)
        self.url = f"http://{self.gateway.host}:{self.gateway.port}"
        token = secrets.token_hex(3)  # tells this stack's instances from any other's
        roles = config.engine_roles()
        self.engines = [(f"{role}-{roles[:i].count(role)}", role) for i, role in enumerate(roles)]
        self.instance_ids = {name: f"{name}-{token}" for name, _ in self.engines}

    def spawn(self, group: str, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "services.cli", *argv, "--log-level", self.config.log_level]
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
        self.spawn("registry", "registry", ["registry", "--bind", self.registry])
        for (name, role), gpus in zip(self.engines, self.config.engine_gpus()):
            env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if gpus else None
            self.spawn("engines", name, self.engine_argv(role, name), env)
        self.spawn("gateway", "gateway", ["gateway", *self.config.gateway_argv(self.registry)])

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
        joined: dict[str, str] = {}
        async with httpx.AsyncClient(timeout=2.0, headers=self.auth()) as http:
            while len(joined) < len(self.instance_ids):
                if exited := self.exited():
                    child = exited[0]
                    raise StackFailed(f"{child.name} exited ({child.proc.returncode}) during start-up; its lines "
                                      f"above, prefixed [{child.name}], say why")
                if time.monotonic() > deadline:
                    waiting = ", ".join(name for name in self.instance_ids if name not in joined)
                    raise StackFailed(f"--ready-timeout-s: not ready after {self.config.ready_timeout_s:g} s "
                                      f"(not yet serving: {waiting}); a large model may need a longer one")
                joined = await self.joined(http)
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


if __name__ == "__main__":  # python -m services.up: the same as pdserve up
    from services.cli import main

    main(["up", *sys.argv[1:]])
