"""The pdserve CLI, config conventions, and the deployment files that use them."""

import dataclasses
import json
import os
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
    # compose passes PDSERVE_BASE_IMAGE to the Dockerfile's BASE_IMAGE, defaulting to the Dockerfile's default
    dockerfile_default = (ROOT / "Dockerfile").read_text().split("ARG BASE_IMAGE=", 1)[1].split()[0]
    assert compose["x-pdserve"]["build"]["args"]["BASE_IMAGE"] == f"${{PDSERVE_BASE_IMAGE:-{dockerfile_default}}}"
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no health check"
        check_pdserve_command(name, svc["command"], svc.get("environment", {}))


def check_pdserve_command(name: str, cmd: list[str], env: dict[str, str]) -> None:
    """Container ``name``'s ``cmd`` runs a real ``pdserve`` subcommand that takes its flags, every key of its
    ``env`` is a ``PDSERVE_<FLAG>`` of that subcommand, and the service's config accepts the settings
    (also used by the Kubernetes manifests' test)."""
    assert cmd[0] == "pdserve" and cmd[1] in COMMANDS, cmd
    sub = cmd[1]
    parser = build_parser(sub)
    subparser = parser._subparsers._group_actions[0].choices[sub]
    known = {a.dest for a in subparser._actions}
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
    assert text.index("TORCH_SPEC") < text.index('pip install --no-cache-dir ".[cpu,etcd]"')
    for pkg in ("libibverbs1", "librdmacm1", "libnuma1"):
        assert pkg in text
    (cmd,) = (json.loads(line[len("CMD "):]) for line in text.splitlines() if line.startswith("CMD "))
    assert cmd[0] == "pdserve"


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


def pdserve(*args: str, module: str = "services.cli") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_boolean_flags_have_a_negation():
    assert parse(["--verbose", "--no-verbose"]).verbose is False
    assert parse(["--no-verbose", "--verbose"]).verbose is True  # the last one wins
    ns = build_parser("prefill").parse_args(["prefill", "--no-enable-prefix-caching"])
    assert ns.enable_prefix_caching is False


def test_choices_of_a_str_field_are_enforced(capsys):
    with pytest.raises(SystemExit):
        build_parser("gateway").parse_args(["gateway", "--log-level", "loud"])
    assert "'loud' is not one of debug, info, warning, error" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["up", "prefill", "decode"])
def test_the_model_may_be_given_as_a_positional_argument(command):
    parser = build_parser(command)
    ns = parser.parse_args([command, str(ROOT), "--dtype", "float32"])
    assert ns.model_tag == str(ROOT)
    out = pdserve(command, "/nonexistent/model", "--dtype", "float32")
    assert out.returncode == 2 and "--model: /nonexistent/model is not a directory" in out.stderr
    out = pdserve(command, str(ROOT / "docs"), "--model", str(ROOT / "tests"))
    assert out.returncode == 2 and "the model is given twice" in out.stderr


@pytest.mark.parametrize("args, usage, message", [
    (["registry", "--lease-ttl-s", "-1"], "usage: pdserve registry [options]", "--lease-ttl-s: must be > heartbeat interval"),
    (["registry", "--bogus"], "usage: pdserve registry [options]", "unrecognized arguments: --bogus"),
    (["up", "--model", "/nonexistent"], "usage: pdserve up [MODEL] [options]",
     "--model: /nonexistent is not a directory (give a model directory, a Hugging Face hub id, or 'demo')"),
    (["up", "--dtype", "fp8"], "usage: pdserve up [MODEL] [options]", "--dtype: must be one of auto, float32"),
    (["up", "--device", "tpu"], "usage: pdserve up [MODEL] [options]", "--device: must be auto, cpu, cuda"),
    (["up", "--log-level", "loud"], "usage: pdserve up [MODEL] [options]", "'loud' is not one of debug, info"),
    (["up", "--mode", "colocated", "--prefill", "2"], "usage: pdserve up [MODEL] [options]",
     "--prefill: applies to --mode disagg only"),
    (["up", "--colocated", "2"], "usage: pdserve up [MODEL] [options]", "--colocated: counts instances of"),
])
def test_a_user_error_is_the_subcommands_usage_and_one_line(args, usage, message):
    out = pdserve(*args)
    assert out.returncode == 2
    assert out.stderr.splitlines()[0] == usage and message in out.stderr.splitlines()[1]
    assert len(out.stderr.splitlines()) == 2, out.stderr


def test_python_m_services_up_is_pdserve_up():
    out = pdserve("--dtype", "fp8", module="services.up")
    assert out.returncode == 2 and "pdserve up: error: --dtype" in out.stderr
    assert "usage: pdserve up" in pdserve("--help", module="services.up").stdout


def test_version():
    out = pdserve("--version")
    assert out.returncode == 0 and out.stdout.startswith("pdserve ")
