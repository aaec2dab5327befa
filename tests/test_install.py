"""The package selection: one Mooncake build per host, and no CUDA package on a CPU host.

pyproject.toml keeps Mooncake out of the base dependencies and offers one build per extra
(``cpu``, ``cuda12``, ``cuda13``); ``make install`` picks ``cpu`` where there is no NVIDIA driver.
The installed-environment checks hold after ``make install`` (as CI runs it).
"""

import importlib.metadata
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
CPU_BUILD = "mooncake-transfer-engine-non-cuda"
BUILD_OF_EXTRA = {
    "cpu": CPU_BUILD,
    "cuda12": "mooncake-transfer-engine",
    "cuda13": "mooncake-transfer-engine-cuda13",
}


def canonical(name: str) -> str:
    """The distribution name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_cuda_package(name: str) -> bool:
    return name.startswith("nvidia-") or name in set(BUILD_OF_EXTRA.values()) - {CPU_BUILD}


def requirement_names(requirements: list[str]) -> set[str]:
    return {canonical(Requirement(r).name) for r in requirements}


def mooncake_providers() -> set[str]:
    """The installed distributions that ship the top-level ``mooncake`` module."""
    return {canonical(d) for d in importlib.metadata.packages_distributions().get("mooncake", [])}


def test_base_dependencies_name_no_mooncake_build_and_no_cuda_package():
    base = requirement_names(tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"])
    assert not base & set(BUILD_OF_EXTRA.values())
    assert not {name for name in base if is_cuda_package(name)}


def test_each_platform_extra_names_exactly_its_mooncake_build():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    for extra, build in BUILD_OF_EXTRA.items():
        assert requirement_names(extras[extra]) == {build}, extra


def test_one_build_provides_the_mooncake_module():
    """Every build installs the same files: two of them installed means one overwrote the other."""
    assert len(mooncake_providers()) == 1, mooncake_providers()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="NVIDIA driver present: a CUDA build may be chosen")
def test_cpu_host_has_the_non_cuda_build_and_no_cuda_package():
    assert mooncake_providers() == {CPU_BUILD}
    installed = {canonical(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    assert not {name for name in installed if is_cuda_package(name)}


def dockerfile_torch_command(build_args: dict[str, str]) -> list[str]:
    """The pip command of the Dockerfile's torch step, expanded by a shell as ``docker build`` would run it."""
    lines = (PYPROJECT.parent / "Dockerfile").read_text().splitlines()
    defaults = dict(re.fullmatch(r'ARG (\w+)="?(.*?)"?', line).groups() for line in lines if line.startswith("ARG "))
    args = next(re.search(r'pip install (.*"\$TORCH_SPEC")', line).group(1)
                for line in lines if '"$TORCH_SPEC"' in line)
    env = {"PATH": "/usr/bin:/bin", **defaults, **build_args}
    out = subprocess.run(["sh", "-c", f'set -- {args}; printf "%s\\n" "$@"'],
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_the_image_takes_the_cpu_torch_wheel_unless_its_build_names_another_index():
    assert dockerfile_torch_command({}) == [
        "--no-cache-dir", "--index-url", "https://download.pytorch.org/whl/cpu", "torch==2.13.0"
    ]
    assert dockerfile_torch_command({"TORCH_INDEX_URL": ""}) == ["--no-cache-dir", "torch==2.13.0"]
    # compose passes the Dockerfile's default where TORCH_INDEX_URL is unset (compose v1 would pass an unset
    # variable as empty: pip's index), and an empty one where it is set empty
    compose = yaml.safe_load((PYPROJECT.parent / "compose.yaml").read_text())
    index = dockerfile_torch_command({})[2]
    assert compose["x-pdserve"]["build"]["args"]["TORCH_INDEX_URL"] == "${TORCH_INDEX_URL-%s}" % index


def test_only_make_test_installs_the_dev_extra():
    def project_install(target: str) -> str:
        out = subprocess.run(["make", "-n", target, "MOONCAKE=cpu"], cwd=PYPROJECT.parent, capture_output=True,
                             text=True, check=True).stdout
        return next(line for line in out.splitlines() if "pip install -q -e" in line)

    assert project_install("up").endswith("-e '.[cpu]'")
    assert project_install("test").endswith("-e '.[cpu,dev]'")
