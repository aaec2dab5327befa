"""The pdserve CLI, config conventions, and the deployment files that use them."""

import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml

from common.config import ConfigError, add_arguments, env_name, from_args, opt, require
from common.kv_transfer.transports import rdma_devices
from services.cli import COMMANDS, build_parser

ROOT = Path(__file__).parents[1]


@dataclasses.dataclass
class Sample:
    bind: str = opt("tcp://127.0.0.1:7100", "where to bind")
    ttl_s: float = opt(3.0, "lease ttl")
    workers: int | None = opt(None, "workers")
    mode: Literal["a", "b"] = opt("a", "mode")
    tags: list[str] = opt(["x"], "tags")
    verbose: bool = opt(False, "verbose")

    def validate(self) -> None:
        require(self.ttl_s > 0, "ttl_s", "must be > 0")


def parse(argv, env=None, monkeypatch=None):
    import argparse

    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    p = argparse.ArgumentParser()
    add_arguments(p, Sample)
    return from_args(Sample, p.parse_args(argv))


def test_defaults_flags_and_env(monkeypatch):
    assert parse([]) == Sample()
    c = parse(["--ttl-s", "5", "--workers", "3", "--mode", "b", "--tags", "p,q", "--verbose"])
    assert (c.ttl_s, c.workers, c.mode, c.tags, c.verbose) == (5.0, 3, "b", ["p", "q"], True)
    c = parse([], {"PDSERVE_TTL_S": "7.5", "PDSERVE_VERBOSE": "true"}, monkeypatch)
    assert (c.ttl_s, c.verbose) == (7.5, True)
    assert parse(["--ttl-s", "2"]).ttl_s == 2.0  # the command line beats the environment
    assert env_name("ttl_s") == "PDSERVE_TTL_S"


def test_invalid_values_are_clear(capsys):
    with pytest.raises(ConfigError, match="--ttl-s: must be > 0"):
        parse(["--ttl-s", "0"])
    with pytest.raises(SystemExit):
        parse(["--mode", "c"])
    assert "'c' is not one of a, b" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--ttl-s", "soon"])
    assert "'soon' is not a valid float" in capsys.readouterr().err


def test_every_subcommand_has_help_with_defaults_and_env():
    for name in COMMANDS:
        out = subprocess.run([sys.executable, "-m", "services.cli", name, "--help"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "default:" in out.stdout and "env PDSERVE_" in out.stdout, name


def test_bad_flag_value_exits_with_one_clear_line():
    out = subprocess.run([sys.executable, "-m", "services.registry", "--lease-ttl-s", "-1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--lease-ttl-s" in out.stderr and "Traceback" not in out.stderr


def test_compose_services_run_real_subcommands_with_valid_settings():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"registry", "gateway", "prefill", "decode"}
    assert any(p.endswith(":8000") for p in services["gateway"]["ports"])
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no health check"
        cmd = svc["command"]
        assert cmd[0] == "pdserve" and cmd[1] in COMMANDS, cmd
        sub = cmd[1]
        parser = build_parser(sub)
        subparser = parser._subparsers._group_actions[0].choices[sub]
        known = {a.dest for a in subparser._actions}
        env = svc.get("environment", {})
        for key in env:
            assert key.startswith("PDSERVE_"), key
            assert key[len("PDSERVE_"):].lower() in known, f"{name}: {key} is not a flag of pdserve {sub}"
        # the settings must also be accepted and validated by the service's config
        argv = cmd[1:]
        old = dict(os.environ)
        try:
            os.environ.update({k: str(v) for k, v in env.items()})
            ns = build_parser(sub).parse_args(argv)
            module = __import__(COMMANDS[sub].module, fromlist=["x"])
            from_args(getattr(module, COMMANDS[sub].config), ns)
        finally:
            os.environ.clear()
            os.environ.update(old)


def test_dockerfile_installs_torch_before_the_project_and_runs_pdserve():
    text = (ROOT / "Dockerfile").read_text()
    assert text.index("TORCH_SPEC") < text.index('pip install --no-cache-dir ".[cpu]"')
    for pkg in ("libibverbs1", "librdmacm1", "libnuma1"):
        assert pkg in text
    cmd = shlex.split(text.split("CMD", 1)[1].strip().strip("[]").replace(",", " "))
    assert cmd[0].strip('"') == "pdserve"


@pytest.mark.parametrize("command", ["prefill", "decode"])
def test_engine_subcommands_share_one_config_and_default_their_role(command, monkeypatch):
    parser = build_parser(command)
    assert parser.parse_args([command]).role == command
    assert parser.parse_args([command, "--role", "both"]).role == "both"
    monkeypatch.setenv("PDSERVE_ROLE", "both")
    assert build_parser(command).parse_args([command]).role == "both"  # the environment beats the default
    assert COMMANDS[command].config == "EngineServiceConfig"


def test_an_engine_subcommand_refuses_the_other_leg_role():
    out = subprocess.run([sys.executable, "-m", "services.cli", "prefill", "--role", "decode"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--role: pdserve prefill runs prefill or both, not decode" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(("flags", "reason"), [
    (["--kv-transport", "nvlink", "--device", "cpu"], "--kv-transport nvlink moves cuda memory"),
    (["--kv-transport", "rdma"], "--kv-transport rdma: this host has no RDMA devices"),
])
def test_a_forced_kv_transport_this_host_cannot_serve_is_refused_at_start(flags, reason):
    if "rdma" in flags and rdma_devices():
        pytest.skip("this host has RDMA devices")
    out = subprocess.run([sys.executable, "-m", "services.cli", "decode", *flags, "--registry", "tcp://127.0.0.1:9"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert reason in out.stderr and "Traceback" not in out.stderr
