"""``pdserve up``: the whole stack on this machine, as child processes.

Starts the registry, the engine instances (``--prefill N`` prefill and
``--decode M`` decode, or ``--colocated K`` instances of role ``both`` with
``--mode colocated``) and the gateway; waits until the gateway's ``/ready``;
prints the URL and a ``curl`` to paste.  On SIGINT/SIGTERM it stops them in
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
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal

import httpx

from common.config import ConfigError, add_arguments, from_args, opt, require
from common.engine.config import EngineConfig

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class UpConfig:
    mode: Literal["disagg", "colocated"] = opt("disagg", "disagg: prefill + decode instances; colocated: role-both instances")
    prefill: int = opt(1, "prefill instances (disagg)")
    decode: int = opt(1, "decode instances (disagg)")
    colocated: int = opt(1, "role-both instances (colocated)")
    model: str = opt("demo", "model directory, hub id, or 'demo' (tiny random model, meaningless text)")
    dtype: str = opt("auto", "engine dtype")
    device: str = opt("auto", "engine device")
    host: str = opt("127.0.0.1", "gateway host")
    port: int = opt(8000, "gateway port")
    registry_port: int = opt(7100, "registry port on 127.0.0.1")
    engine_args: str = opt("", "extra flags for every engine, e.g. '--num-kv-blocks 512 --max-num-seqs 32'")
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
    log_level: str = opt("info", "log level of every process")

    def validate(self) -> None:
        if self.mode == "disagg":
            require(self.prefill >= 1, "prefill", "disagg needs at least 1 prefill instance")
            require(self.decode >= 1, "decode", "disagg needs at least 1 decode instance")
        else:
            require(self.colocated >= 1, "colocated", "colocated needs at least 1 instance")
        require(0 < self.port < 65536, "port", "must be a TCP port")
        require(0 < self.registry_port < 65536, "registry_port", "must be a TCP port")
        require(self.ready_timeout_s > 0, "ready_timeout_s", "must be > 0")
        require(self.max_restarts >= 0, "max_restarts", "must be >= 0")
        require(self.shutdown_timeout_s > 0, "shutdown_timeout_s", "must be > 0")
        require(all(g >= 0 for g in self.gpus), "gpus", "GPU ids are >= 0")
        require(len(set(self.gpus)) == len(self.gpus), "gpus", "lists a GPU twice")
        self.engine_gpus()  # refuses a stack that needs more GPUs than --gpus lists

    def engine_roles(self) -> list[str]:
        """The role of each engine instance, in start order: prefills then decodes, or ``both``."""
        counts = {"prefill": self.prefill, "decode": self.decode} if self.mode == "disagg" else {"both": self.colocated}
        return [role for role, count in counts.items() for _ in range(count)]

    def engine_flags(self, role: str) -> list[str]:
        """The extra flags of an engine of ``role``: ``--engine-args``, then the role's own (which win)."""
        own = {"prefill": self.prefill_args, "decode": self.decode_args, "both": ""}[role]
        return [*shlex.split(self.engine_args), *shlex.split(own)]

    def engine_gpus(self) -> list[list[int]]:
        """The GPUs of each engine of ``engine_roles()`` (all empty without ``--gpus``); raises ``ConfigError``."""
        roles = self.engine_roles()
        if not self.gpus:
            return [[] for _ in roles]
        sizes = []
        for role in roles:
            try:
                sizes.append(tensor_parallel_size(self.engine_flags(role)))
            except ConfigError as e:
                source = "--engine-args" if role == "both" else f"--engine-args/--{role}-args"
                raise ConfigError(f"{source}: {e}") from None
        return assign_gpus(self.gpus, sizes)


class _RaisingParser(argparse.ArgumentParser):
    """An argument parser whose errors are ``ConfigError`` rather than an exit."""

    def error(self, message: str):
        raise ConfigError(message)


def tensor_parallel_size(flags: list[str]) -> int:
    """The TP size of an engine started with ``flags``, read as the engine reads them: the last
    ``--tensor-parallel-size``/``-tp`` wins, else ``PDSERVE_TENSOR_PARALLEL_SIZE``, else 1.
    Raises ``ConfigError`` when the engine's own flags among ``flags`` are invalid; others are skipped."""
    parser = _RaisingParser(add_help=False)
    add_arguments(parser, EngineConfig)
    known, _ = parser.parse_known_args(flags)
    return from_args(EngineConfig, known).tensor_parallel_size


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


class Child:
    """One child process and the command that (re)starts it."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.argv = argv
        self.env = env
        self.name = " ".join(argv[3:5])
        self.restarts = 0
        self.proc = self.start()

    def start(self) -> subprocess.Popen:
        log.info("starting %s%s", " ".join(self.argv[3:]), f" ({self.env})" if self.env else "")
        env = {**os.environ, **self.env} if self.env else None
        return subprocess.Popen(self.argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)


class Stack:
    """The child processes, grouped in start order."""

    def __init__(self, config: UpConfig):
        self.config = config
        self.groups: dict[str, list[Child]] = {"registry": [], "engines": [], "gateway": []}
        self.registry = f"tcp://127.0.0.1:{config.registry_port}"
        self.url = f"http://{config.host}:{config.port}"

    def spawn(self, group: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "services.cli", *argv, "--log-level", self.config.log_level]
        self.groups[group].append(Child(cmd, env))

    def children(self) -> list[Child]:
        return [c for group in self.groups.values() for c in group]

    def engine_argv(self, role: str) -> list[str]:
        """The ``pdserve`` arguments of one engine of ``role`` (prefill, decode, or both)."""
        c = self.config
        command = {"prefill": ["prefill"], "decode": ["decode"], "both": ["prefill", "--role", "both"]}[role]
        return [*command, "--registry", self.registry, "--model", c.model, "--dtype", c.dtype, "--device", c.device,
                *c.engine_flags(role)]

    def start(self) -> None:
        c = self.config
        self.spawn("registry", ["registry", "--bind", self.registry])
        for role, gpus in zip(c.engine_roles(), c.engine_gpus()):
            env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if gpus else None
            self.spawn("engines", self.engine_argv(role), env)
        self.spawn("gateway", ["gateway", "--host", c.host, "--port", str(c.port), "--registry", self.registry,
                               "--mode", c.mode, *shlex.split(c.gateway_args)])

    def dead(self) -> list[int]:
        return [c.proc.returncode for c in self.children() if c.proc.poll() is not None]

    def restart_dead(self) -> None:
        """Restart children that exited; raise when one has used up its restarts."""
        for child in self.children():
            code = child.proc.poll()
            if code is None:
                continue
            if child.restarts >= self.config.max_restarts:
                raise RuntimeError(f"{child.name} exited ({code}) after {child.restarts} restarts")
            child.restarts += 1
            log.warning("%s exited (%s): restarting it (%d/%d)", child.name, code, child.restarts,
                        self.config.max_restarts)
            child.proc = child.start()

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self.dead():
                    raise RuntimeError(f"a child process exited during start-up (codes {self.dead()})")
                try:
                    if (await http.get(self.url + "/ready")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.25)
        raise TimeoutError(f"stack not ready after {self.config.ready_timeout_s:g} s")

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


async def serve(config: UpConfig) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per /ready poll
    stack = Stack(config)
    try:
        stack.start()
        await stack.wait_ready()
        print(f"\npdserve is ready at {stack.url}  (mode {config.mode}, model {config.model})\n"
              f"  curl {stack.url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{config.model}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'\n"
              "Ctrl-C stops everything.", flush=True)
        while True:
            await asyncio.sleep(0.5)
            stack.restart_dead()
    finally:
        await asyncio.get_running_loop().run_in_executor(None, stack.stop)
