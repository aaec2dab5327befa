"""``docker compose up`` of the repository's ``compose.yaml``, for real.

The image is built from this checkout (``compose build``, then ``up``: what ``up --build`` does); the compose
file is used as written, only its environment knobs set: the base image (``PDSERVE_BASE_IMAGE``, by default
``pdserve-base:local`` from ``scripts/docker-base.sh``, which also puts the CPU torch wheel into the build
context) and the published port (``PDSERVE_PUBLISH_PORT``, a free one).  Registry, prefill, decode and gateway
each run in a container of their own, with their own network namespace and address; the test talks to the
gateway's published port with the official ``openai`` client, SIGKILLs the decode container's process (a crash:
``docker kill`` would count as a deliberate stop, which ``restart: unless-stopped`` honours) and sees compose's
restart policy bring it back and serving resume, then checks that ``compose down`` leaves no container behind.

Uses the running Docker daemon, else starts one with ``scripts/dockerd.sh`` (and stops it afterwards).
Skipped, with the reason, only where no daemon can run: no ``docker`` client or compose, not root, or
``dockerd`` failing to start.  Cold (base image, build, start), about 7 minutes on a loaded two-core machine
with overlay2 storage, twice that on vfs (docs/benchmarks.md); a data root that keeps its images makes later
runs quicker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from bench.processes import free_port
from tests.procs import eventually

ROOT = Path(__file__).parents[1]
SERVICES = ("registry", "prefill", "decode", "gateway")
PROJECT = "pdserve-compose-test"
BUILD_TIMEOUT_S = 900.0  # a cold image build on vfs storage, on a loaded two-core machine
HEALTHY_TIMEOUT_S = 240.0  # containers started to every health check passing (engines load the demo model)
pytestmark = [pytest.mark.timeout(1500), pytest.mark.runs_first]


def compose_command() -> list[str] | None:
    """``docker compose`` where the v2 plugin exists, else ``docker-compose`` (v1), else None."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.fixture(scope="module")
def daemon():
    """A Docker daemon answering; stopped afterwards when this fixture started it."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client on PATH (Debian: apt-get install docker.io docker-compose)")
    start = subprocess.run([ROOT / "scripts" / "dockerd.sh", "start"], capture_output=True, text=True, timeout=120)
    if start.returncode != 0:
        pytest.skip(f"no Docker daemon can start here: {start.stderr.strip()}")
    yield
    if start.stdout.strip() != "running":
        subprocess.run([ROOT / "scripts" / "dockerd.sh", "stop"], check=True, timeout=120)


def docker(*args: str, timeout: float = 60.0) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"docker {' '.join(args)}: {out.stderr}"
    return out.stdout


class Stack:
    """The compose project: ``compose`` runs a compose subcommand on it; ``inspect`` its containers by service."""

    def __init__(self, compose: list[str], env: dict[str, str]):
        self.argv = [*compose, "--project-name", PROJECT, "--file", str(ROOT / "compose.yaml")]
        self.env = env
        self.ids: dict[str, str] = {}

    def compose(self, *args: str, timeout: float = 120.0) -> str:
        out = subprocess.run([*self.argv, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, f"compose {' '.join(args)} failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
        return out.stdout

    def inspect(self) -> dict[str, dict]:
        """``docker inspect`` of each service's container (a restart keeps the container)."""
        if not self.ids:
            self.ids = {s: self.compose("ps", "-q", s).strip() for s in SERVICES}
        found = json.loads(docker("inspect", *self.ids.values()))
        return {s: next(c for c in found if c["Id"].startswith(cid)) for s, cid in self.ids.items()}

    def healthy(self) -> bool:
        return all(c["State"].get("Health", {}).get("Status") == "healthy" for c in self.inspect().values())

    def logs(self) -> str:
        out = subprocess.run([*self.argv, "logs", "--no-color", "--tail", "40"], cwd=ROOT, env=self.env,
                             capture_output=True, text=True, timeout=60)
        return out.stdout[-8000:]


def gateway_ready(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5).status == 200
    except urllib.error.URLError:  # HTTPError (503: not ready) included
        return False


def project_containers() -> list[str]:
    return docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}").split()


async def test_compose_up_serves_restarts_a_killed_decode_and_comes_down_clean(daemon):
    compose = compose_command()
    if compose is None:
        pytest.skip("no docker compose plugin and no docker-compose (Debian: apt-get install docker-compose)")
    took = Timer()
    base = os.environ.get("PDSERVE_BASE_IMAGE")
    if base is None:
        base = "pdserve-base:local"
        subprocess.run([ROOT / "scripts" / "docker-base.sh"], check=True, timeout=BUILD_TIMEOUT_S)
    took("base image")
    port = free_port()
    # compose v1's HTTP timeout (60 s) is shorter than creating a container takes on vfs (a copy of the image)
    env = {"COMPOSE_HTTP_TIMEOUT": "600", **os.environ, "PDSERVE_BASE_IMAGE": base,
           "PDSERVE_PUBLISH_PORT": str(port)}
    stack = Stack(compose, env)
    stack.compose("down", "--volumes", "--remove-orphans")  # what an interrupted earlier run left
    stack.compose("build", timeout=BUILD_TIMEOUT_S)
    took("build")
    try:
        stack.compose("up", "--detach", timeout=HEALTHY_TIMEOUT_S)
        try:
            await eventually(stack.healthy, timeout=HEALTHY_TIMEOUT_S, interval=1.0)
        except AssertionError:
            raise AssertionError(f"not all healthy within {HEALTHY_TIMEOUT_S:g} s:\n{stack.logs()}") from None
        took("up to healthy")

        networks = {s: c["NetworkSettings"]["Networks"] for s, c in stack.inspect().items()}
        assert all(len(nets) == 1 and "host" not in nets for nets in networks.values()), networks
        assert len({net["IPAddress"] for nets in networks.values() for net in nets.values()}) == len(SERVICES)

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60,
                               max_retries=0)
        greedy = dict(model="demo", temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
        first = client.completions.create(prompt="The quick brown fox", **greedy)
        assert first.usage.completion_tokens == 8 and first.choices[0].text
        chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "Hello"}], stream=True,
                                                     **greedy))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "length"
        took("requests")

        decode = stack.inspect()["decode"]
        os.kill(decode["State"]["Pid"], signal.SIGKILL)  # a crash, as an OOM kill would be
        await eventually(lambda: stack.inspect()["decode"]["RestartCount"] > decode["RestartCount"], timeout=60)
        await eventually(stack.healthy, timeout=HEALTHY_TIMEOUT_S, interval=1.0)
        await eventually(lambda: gateway_ready(port), timeout=30)  # the gateway has seen decode rejoin
        again = client.completions.create(prompt="The quick brown fox", **greedy)
        assert again.choices[0].text == first.choices[0].text
        took("decode killed to serving again")
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", timeout=300)
    assert project_containers() == []
    took("down")
    size = int(docker("image", "inspect", "-f", "{{.Size}}", "pdserve:latest"))
    print(f"{took}, image {size / 1e6:.0f} MB")


class Timer:
    """``timer(name)`` records the seconds since the previous call under ``name``; ``str`` lists them."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.phases: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name], self.last = now - self.last, now

    def __str__(self) -> str:
        return ", ".join(f"{name} {s:.0f} s" for name, s in self.phases.items())
