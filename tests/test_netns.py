"""The README's multi-host commands with every process on a host of its own, on one machine.

Registry, gateway, prefill and decode each run in their own network namespace (one address on a bridge in
10.77.0.0/24, whose root-namespace end is this test's way in) and UTS namespace (their own hostname: engines
on one machine but different hosts, as on two machines, move KV over the network, not shared memory).  The
commands are the README's "Running the services yourself" block as written; only its placeholders change:
the keys directory, the engines' addresses, and the host name ``registry``, which each namespace's
``/etc/netns/<ns>/hosts`` resolves as DNS would.  Ports stay as written: each namespace has its own.

Mooncake's RPC and TCP data ports bind every interface (the library has no bind address): inside a namespace
with one address that is that address plus loopback, and the listener check below expects them on the
wildcard; every other socket listens only where the README's flags say.

Skipped, with the reason, where namespaces cannot be made (not root, no iproute2 or util-linux, ``ip netns add``
or ``unshare`` refused).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from bench.processes import Processes, Proc
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.messages import SamplingParams
from tests.procs import eventually

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.timeout(240)

SUBNET = "10.77.0"
ADDRESSES = {"registry": f"{SUBNET}.1", "gateway": f"{SUBNET}.2", "prefill": f"{SUBNET}.3", "decode": f"{SUBNET}.4",
             "stray": f"{SUBNET}.5"}  # stray: a prefill started with a wrong --advertise-host  # fmt: skip
BRIDGE_ADDRESS = f"{SUBNET}.254"
WRONG = f"{SUBNET}.99"  # an address of no host on the bridge
PLACEHOLDERS = {"/etc/pdserve/keys": None, "10.0.0.5": ADDRESSES["prefill"], "10.0.0.6": ADDRESSES["decode"]}
GATEWAY_URL = f"http://{ADDRESSES['gateway']}:8000"
START_TIMEOUT_S = 150.0  # three engines loading the demo model on a loaded two-core machine
SERVING = re.compile(r"serving demo on tcp://([\d.]+):(\d+) \(KV side channel tcp://([\d.]+):(\d+)\)")
MOONCAKE = re.compile(r"Mooncake engine up at ([\d.]+):(\d+) over tcp")


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


def readme_commands() -> dict[str, list[str]]:
    """The README's multi-host block, as argv by subcommand (``keys``, ``registry``, ``prefill``...)."""
    section = (ROOT / "README.md").read_text().split("## Running the services yourself", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    return {argv[1]: argv for argv in commands if argv}


def placed(argv: list[str], keys: Path, **more: str) -> list[str]:
    """``pdserve ...`` as this checkout's ``python -m services.cli ...``, the README's placeholders replaced
    (``more``: further replacements)."""
    assert argv[0] == "pdserve"
    values = {**PLACEHOLDERS, "/etc/pdserve/keys": str(keys), **more}
    out = []
    for arg in argv[1:]:
        for placeholder, value in values.items():
            arg = arg.replace(placeholder, value)
        out.append(arg)
    return [sys.executable, "-m", "services.cli", *out]


class Hosts:
    """One network + UTS namespace per host, on a bridge; ``close`` removes everything it made."""

    def __init__(self) -> None:
        tag = os.getpid()
        self.bridge = f"pdsbr{tag}"[:15]
        self.names = {host: f"pdserve-{host}-{tag}" for host in ADDRESSES}
        self.made: list[str] = []

    def make(self) -> None:
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for i, (host, ns) in enumerate(self.names.items()):
            run("ip", "netns", "add", ns)
            self.made.append(ns)
            veth = f"pdsv{i}-{os.getpid()}"[:15]
            run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "link", "set", veth, "master", self.bridge, "up")
            run("ip", "-n", ns, "addr", "add", f"{ADDRESSES[host]}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{ADDRESSES['registry']} registry\n")
        run(*self.command("registry", ["true"]))  # a UTS namespace, too

    def close(self) -> None:
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)  # its veth ends go with the netns

    def command(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run on ``host``: in its network namespace, in a UTS namespace named after it."""
        return ["ip", "netns", "exec", self.names[host], "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                host, *argv]

    def listeners(self, host: str) -> set[tuple[str, int]]:
        """(address, port) of every TCP socket listening in ``host``'s namespace (``/proc/net/tcp{,6}``)."""
        found = set()
        for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
            for line in run("ip", "netns", "exec", self.names[host], "cat", f"/proc/net/{table}").splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A":  # TCP_LISTEN
                    address, port = local.split(":")
                    raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
                    found.add((socket.inet_ntop(family, raw), int(port, 16)))
        return found


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if missing := [tool for tool in ("ip", "unshare") if shutil.which(tool) is None]:
        pytest.skip(f"no {' or '.join(missing)} here (iproute2, util-linux)")
    h = Hosts()
    try:
        try:
            h.make()
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot make network namespaces here: {' '.join(e.cmd)}: {e.stderr.strip()}")
        yield h
    finally:
        h.close()


def gateway_ready() -> bool:
    try:
        with urllib.request.urlopen(GATEWAY_URL + "/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def log_text(proc: Proc) -> str:
    return proc.log_path.read_text(errors="replace")


def wait(predicate, timeout: float, procs: Processes, what: str) -> None:
    try:
        asyncio.run(eventually(predicate, timeout, interval=0.2))
    except AssertionError:
        raise AssertionError(f"{what} not within {timeout:g} s\n{procs.logs()}") from None


@pytest.fixture(scope="module")
def stack(hosts, tmp_path_factory):
    """The README's commands, each on its host; and a stray prefill whose --advertise-host is no host's (its
    registry is nowhere, so that it never joins the stack)."""
    readme = readme_commands()
    assert list(readme) == ["keys", "registry", "prefill", "decode", "gateway"]
    keys = tmp_path_factory.mktemp("keys") / "pdserve-keys"
    subprocess.run(placed(readme["keys"], keys), check=True, cwd=ROOT, capture_output=True, timeout=60)
    procs = Processes(log_dir=tmp_path_factory.mktemp("logs"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    starts = {host: placed(readme[host], keys) for host in ("registry", "prefill", "decode", "gateway")}
    starts["stray"] = placed(readme["prefill"], keys, **{"10.0.0.5": WRONG, "registry:7100": "127.0.0.1:7100"})
    try:
        for host, argv in starts.items():
            log_path = procs.log_dir / f"{host}.log"
            with open(log_path, "wb") as log:
                popen = subprocess.Popen(hosts.command(host, argv), cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            procs.procs[host] = Proc(host, argv, log_path, popen)
        wait(lambda: gateway_ready() and all(SERVING.search(log_text(procs.procs[e])) for e in ("prefill", "decode")),
             START_TIMEOUT_S, procs, "the gateway ready with both engines serving")
        yield procs
    finally:
        asyncio.run(procs.stop_all())


def test_completions_across_hosts_equal_a_colocated_engine_and_kv_moves_over_tcp(stack):
    client = openai.OpenAI(base_url=GATEWAY_URL + "/v1", api_key="unused", timeout=60, max_retries=0)
    reference = LLMEngine(EngineConfig(model="demo", device="cpu", num_kv_blocks=64))
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for prompt in ([(7 * i) % 250 + 3 for i in range(40)], [5, 6, 7]):  # 40 tokens: 2 full blocks and a part
        got = client.completions.create(model="demo", prompt=prompt, max_tokens=16, temperature=0,
                                        extra_body={"ignore_eos": True})
        (want,) = reference.generate([prompt], greedy)
        assert got.usage.completion_tokens == len(want.new_token_ids) == 16
        assert got.choices[0].text == want.text
    prefill_id = re.search(r"INFO \S+ \[\d+\]: (\S+) serving demo", log_text(stack.procs["prefill"])).group(1)
    decode_log = log_text(stack.procs["decode"])
    assert re.search(rf"KV from {prefill_id} \(tcp://{ADDRESSES['prefill']}:\d+, TP 1\) over tcp$", decode_log,
                     re.M), decode_log


def test_a_wrong_advertise_host_is_reported_at_start(stack):
    """Today an engine advertising no host's address binds every interface (a NAT address, it assumes) and
    the gateway waits 60 s for its first answer; now the engine warns before it registers."""
    stray = stack.procs["stray"]
    wait(lambda: "is not an address of this host, and connecting to it from here fails" in log_text(stray),
         30, stack, "the stray's warning on its --advertise-host")
    text = log_text(stray)
    assert re.search(rf"WARNING .* --advertise-host {WRONG} is not an address of this host, and connecting to it "
                     r"from here fails \(.+\): peers told to connect there will not reach this engine", text), text
    assert re.search(rf"WARNING .* --kv-host {WRONG} is not an address of this host and connecting to {WRONG}:\d+ "
                     r"from here fails \(.+\): peers will not reach this engine's KV there", text), text


def test_nothing_listens_where_it_should_not(stack, hosts):
    assert hosts.listeners("registry") == {("0.0.0.0", 7100)}  # --bind tcp://0.0.0.0:7100
    assert hosts.listeners("gateway") == {("0.0.0.0", 8000)}  # --host 0.0.0.0 --port 8000
    for engine in ("prefill", "decode"):
        text = log_text(stack.procs[engine])
        address, request, kv_address, kv = SERVING.search(text).groups()
        mooncake_address, rpc = MOONCAKE.search(text).groups()
        assert address == kv_address == mooncake_address == ADDRESSES[engine]
        found = hosts.listeners(engine)
        # the request and KV side-channel sockets listen on the advertised address only
        assert {a for a in found if a[0] != "0.0.0.0" and a[0] != "::"} == {(address, int(request)), (address, int(kv))}
        # Mooncake's RPC port and its TCP data port: every interface (here: the namespace's address and loopback)
        wildcard = found - {(address, int(request)), (address, int(kv))}
        assert ("0.0.0.0", int(rpc)) in wildcard and len(wildcard) == 2, found
