"""An engine binds where it advertises: unset binds follow --advertise-host; a mismatch is refused at start."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.engine_service.config import EngineServiceConfig

ROOT = Path(__file__).parents[1]
NOT_HERE = "198.51.100.7"  # TEST-NET-2: an address of no machine (a NAT or load-balancer address, say)


def routable_address() -> str:
    """This machine's address on its default route (no packet is sent), or skip."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((NOT_HERE, 9))
        except OSError:
            pytest.skip("no IPv4 route on this machine")
        address = s.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("no non-loopback address on this machine")
    return address


def config(**over) -> EngineServiceConfig:
    c = EngineServiceConfig(model="demo", **over)
    c.validate()
    return c


def test_binds_follow_the_advertised_host():
    assert (config().bind, config().kv_bind, config().kv_host) == ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0",
                                                                   "127.0.0.1")
    here = routable_address()
    c = config(advertise_host=here)
    assert (c.bind, c.kv_bind, c.kv_host) == (f"tcp://{here}:0", f"tcp://{here}:0", here)
    c = config(advertise_host=NOT_HERE)  # not an address of this host: all interfaces
    assert (c.bind, c.kv_bind, c.kv_host) == ("tcp://0.0.0.0:0", "tcp://0.0.0.0:0", NOT_HERE)
    assert config(advertise_host=here, bind="tcp://0.0.0.0:0").bind == "tcp://0.0.0.0:0"


@pytest.mark.parametrize("flags, refused", [
    (["--advertise-host", "{here}", "--bind", "tcp://127.0.0.1:0"], "--bind: tcp://127.0.0.1:0 is loopback only"),
    (["--advertise-host", "{here}", "--kv-host", "127.0.0.1"], "--kv-host: 127.0.0.1 is loopback only"),
    (["--kv-bind", "tcp://{here}:0"], "--kv-bind: tcp://{here}:0 is not loopback, but --advertise-host 127.0.0.1"),
])
def test_a_mismatch_is_refused_in_one_line(flags, refused):
    here = routable_address()
    argv = [sys.executable, "-m", "services.cli", "prefill", "--model", "demo", *(f.format(here=here) for f in flags)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert refused.format(here=here) in last and "Traceback" not in done.stderr
