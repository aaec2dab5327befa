"""CURVE and ZAP on every bus socket, tried from an attacker's sockets on loopback (issue 15).

One deployment serves the module: a registry, a colocated engine (demo model, CPU) and a gateway,
each with its role's keys from ``pdserve keys``; the registry also trusts a second engine key, the
intruder's.  This process plays the attacker: with no keys, with a stranger's key, with the
gateway's key, with the engine's key, with the intruder's.
"""

from __future__ import annotations

import asyncio
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import msgspec
import openai
import pytest
import pytest_asyncio
import zmq.auth

from bench.processes import Processes, free_port
from common.bus import BusClient, BusServer, curve
from common.bus.server import sender
from common.errors import CallTimeout, PeerError, PeerGone
from common.messages import (
    Abort,
    Ack,
    Deregister,
    EngineRequest,
    Generate,
    GetStats,
    Heartbeat,
    InstanceList,
    ListInstances,
    Load,
    Register,
    ReleaseKV,
    SamplingParams,
)
from tests.procs import REPO, eventually

REFUSED_WAIT_S = 1.0  # a refused handshake never answers: how long the attacker waits
ANSWER_WAIT_S = 15.0  # an admitted call's reply: a loaded CI host may take seconds (1 s failed there once)
REFUSED = (CallTimeout, PeerGone)  # a refused handshake: the connection drops, or nothing ever answers
pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="module")]


@contextmanager
def acting_as(keys: curve.Keys | None):
    """Sockets this process opens inside the block use ``keys`` (None: no CURVE)."""
    before = curve.current()
    curve.use(keys)
    try:
        yield
    finally:
        curve.use(before)


def keys_of_own(directory: Path, copy_from: Path, *publics: str) -> curve.Keys:
    """A fresh engine keypair in ``directory``, with the public keys ``publics`` copied from ``copy_from``."""
    directory.mkdir(exist_ok=True)
    zmq.auth.create_certificates(directory, "engine")
    for name in publics:
        (directory / name).write_bytes((copy_from / name).read_bytes())
    return curve.load_keys(directory)


class Deployment:
    def __init__(self, procs: Processes, dirs: dict[str, Path], intruder: curve.Keys, http_port: int):
        self.procs = procs
        self.dirs = dirs
        self.keys = {role: curve.load_keys(path) for role, path in dirs.items()}
        self.intruder = intruder
        self.url = f"http://127.0.0.1:{http_port}/v1"

    @property
    def engine(self):
        return self.procs.procs["both-0"]

    async def call(self, keys: curve.Keys | None, endpoint: str, msg, *, server_role: str = "engine",
                   timeout: float = ANSWER_WAIT_S):
        """``msg``'s reply from ``endpoint``, sent from a socket with ``keys``; a call expected to be refused
        waits ``REFUSED_WAIT_S``."""
        with acting_as(keys):
            client = BusClient(endpoint, timeout=timeout, server_role=server_role)
        try:
            return await client.call(msg)
        finally:
            await client.close()

    async def registry(self, keys: curve.Keys | None, msg):
        return await self.call(keys, self.procs.registry_endpoint, msg, server_role="registry")

    async def instances(self) -> dict:
        reply = await self.registry(self.keys["gateway"], ListInstances())
        assert isinstance(reply, InstanceList)
        return {i.id: i for i in reply.instances}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    dirs = curve.create_keys(root / "stack")
    intruder = keys_of_own(root / "intruder", dirs["engine"], "registry.key")
    (dirs["registry"] / "engine-intruder.key").write_bytes((root / "intruder" / "engine.key").read_bytes())
    http_port = free_port()
    async with Processes() as procs:
        procs.start_registry("--keys-dir", str(dirs["registry"]))
        procs.start_engine("both-0", "prefill", "--role", "both", "--keys-dir", str(dirs["engine"]))
        procs.spawn("gateway", "services.gateway", ["--port", str(http_port), "--registry",
                                                    procs.registry_endpoint, "--keys-dir", str(dirs["gateway"])])
        deployment = Deployment(procs, dirs, intruder, http_port)
        with acting_as(deployment.keys["gateway"]):
            await procs.wait_registered("both-0")
        yield deployment


async def test_peer_without_keys_gets_no_answer_on_any_socket(deployment: Deployment, tmp_path: Path):
    """No keys at all, or a keypair no service filed: no socket answers (ZAP refuses the handshake)."""
    stranger = keys_of_own(tmp_path, deployment.dirs["engine"], "registry.key", "engine.key")
    sockets = [(deployment.procs.registry_endpoint, ListInstances(), "registry"),
               (deployment.engine.endpoint, GetStats(), "engine"),
               (deployment.engine.kv_endpoint, ReleaseKV(transfer_ids=["x"]), "engine")]
    for keys in (None, stranger):
        for endpoint, msg, role in sockets:
            with pytest.raises(REFUSED):
                await deployment.call(keys, endpoint, msg, server_role=role, timeout=REFUSED_WAIT_S)


async def test_each_socket_admits_its_roles_only(deployment: Deployment):
    """The engine's request socket takes gateways (and engines' health checks: GetStats, never Generate), its
    KV side channel engines only."""
    engine, gateway = deployment.keys["engine"], deployment.keys["gateway"]
    assert await deployment.call(gateway, deployment.engine.endpoint, GetStats())
    assert await deployment.call(engine, deployment.engine.endpoint, GetStats())
    with pytest.raises(PeerError, match="forbidden: engine keys may not send Generate: only gateway keys do"):
        await deployment.call(engine, deployment.engine.endpoint, Generate("stolen", SamplingParams(), prompt="hi"))
    with pytest.raises(PeerError, match="unsupported"):  # admitted, and told a colocated engine moves no KV
        await deployment.call(engine, deployment.engine.kv_endpoint, ReleaseKV(transfer_ids=["none"]))
    with pytest.raises(REFUSED):
        await deployment.call(gateway, deployment.engine.kv_endpoint, ReleaseKV(transfer_ids=["none"]),
                              timeout=REFUSED_WAIT_S)


async def test_gateway_key_cannot_register(deployment: Deployment):
    live = (await deployment.instances())["both-0"]
    fake = msgspec.structs.replace(live, id="fake-prefill", request_endpoint=f"tcp://127.0.0.1:{free_port()}")
    for msg in (Register(instance=fake), Heartbeat(instance_id="both-0", load=Load()),
                Deregister(instance_id="both-0")):
        with pytest.raises(PeerError) as refused:
            await deployment.registry(deployment.keys["gateway"], msg)
        assert refused.value.code == "forbidden"
    assert set(await deployment.instances()) == {"both-0"}


async def test_forged_register_of_a_live_instance_is_refused(deployment: Deployment):
    """Another engine key can neither take over a live id nor its endpoint, nor heartbeat or deregister it."""
    live = (await deployment.instances())["both-0"]
    trap = f"tcp://127.0.0.1:{free_port()}"
    forgeries = [Register(instance=msgspec.structs.replace(live, request_endpoint=trap)),
                 Register(instance=msgspec.structs.replace(live, id="both-1")),
                 Heartbeat(instance_id="both-0", load=Load()),
                 Deregister(instance_id="both-0")]
    for msg in forgeries:
        with pytest.raises(PeerError) as refused:
            await deployment.registry(deployment.intruder, msg)
        assert refused.value.code == "forbidden"
    assert await deployment.instances() == {"both-0": live}
    own = msgspec.structs.replace(live, id="intruder-0", request_endpoint=trap)
    await deployment.registry(deployment.intruder, Register(instance=own))  # its own instance: admitted
    await deployment.registry(deployment.intruder, Deregister(instance_id="intruder-0"))
    assert set(await deployment.instances()) == {"both-0"}


async def test_stack_with_keys_serves_the_openai_client(deployment: Deployment):
    client = openai.AsyncOpenAI(base_url=deployment.url, api_key="none", max_retries=0)

    async def ready() -> bool:
        try:
            return bool((await client.models.list()).data)
        except openai.APIError:
            return False

    await eventually(ready, timeout=30)
    out = await client.completions.create(model="demo", prompt="Hello", max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4
    deployment.procs.check_alive()


@pytest.mark.parametrize("secure", [True, False])
async def test_a_handler_learns_who_sent_its_message(deployment: Deployment, secure: bool):
    """``sender()``: the sender's role and public key under CURVE, its connection without."""
    keys = deployment.keys["engine"] if secure else None
    peers = []

    async def on_abort(msg: Abort) -> Ack:
        peers.append(sender())
        return Ack()

    with acting_as(keys):  # the server's ZAP handler, too, knows the keys this process has
        server = BusServer("tcp://127.0.0.1:0", EngineRequest, name="peers", admits=frozenset({"engine"}))
        server.on(Abort, on_abort)
        await server.start()
        try:
            await deployment.call(keys, server.endpoint, Abort("r1"))
            await deployment.call(keys, server.endpoint, Abort("r2"))
        finally:
            await server.close()
    if secure:
        assert peers == [curve.Peer("engine", deployment.keys["engine"].public.decode())] * 2
    else:  # two clients, two connections
        assert [p.role for p in peers] == [None, None] and peers[0] != peers[1]
        assert all(p.id.startswith("zmq:") and p.acts_as("engine") for p in peers)


async def test_no_keys_off_loopback_needs_insecure():
    """Without keys a registry refuses a non-loopback bind at start; with --insecure it serves there."""
    argv = [sys.executable, "-m", "services.registry", "--bind", f"tcp://0.0.0.0:{free_port()}"]
    refused = await asyncio.create_subprocess_exec(*argv, cwd=REPO, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(refused.communicate(), 60)
    assert refused.returncode == 2 and b"not on loopback" in err and b"--insecure" in err, err
    insecure = await asyncio.create_subprocess_exec(*argv, "--insecure", cwd=REPO, stderr=asyncio.subprocess.PIPE)
    try:
        lines = []
        while not any(b"registry on tcp://0.0.0.0" in line for line in lines):
            line = await asyncio.wait_for(insecure.stderr.readline(), 60)
            assert line, b"".join(lines)
            lines.append(line)
    finally:
        insecure.terminate()
        await insecure.wait()


async def test_an_engine_container_health_check_passes_with_its_own_keys(deployment: Deployment):
    """``python -m common.healthcheck engine`` dials with the container's engine key (compose, Kubernetes exec)."""
    env = {**os.environ, curve.KEYS_DIR_ENV: str(deployment.dirs["engine"])}
    check = await asyncio.create_subprocess_exec(sys.executable, "-m", "common.healthcheck", "engine",
                                                 deployment.engine.endpoint, cwd=REPO, env=env,
                                                 stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(check.communicate(), 60)
    assert check.returncode == 0, err
