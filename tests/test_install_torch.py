"""``make torch``: keeps an installed torch in the project's range, else installs from ``TORCH_INDEX_URL``.

Runs the real Makefile against a fresh virtual environment and small stand-in torch wheels served from
local indexes (no network, nothing 190 MB): pip's own configuration is switched off and its default
index is one offering only the stand-in of PyPI's build.  The project's own install step resolves its
real dependencies through the machine's pip configuration (a dry run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import quote

import pytest

ROOT = Path(__file__).resolve().parent.parent


def write_wheel(index: Path, version: str) -> None:
    """A minimal ``torch`` wheel of ``version`` under ``index/torch/``, linked from its PEP 503 page."""
    folder = index / "torch"
    folder.mkdir(parents=True, exist_ok=True)
    dist_info = f"torch-{version}.dist-info"
    files = {
        "torch/__init__.py": f"__version__ = {version!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{dist_info}/RECORD"])
    wheel = f"torch-{version}-py3-none-any.whl"
    with zipfile.ZipFile(folder / wheel, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    page = folder / "index.html"
    links = page.read_text() if page.exists() else ""
    page.write_text(links + f'<a href="{quote(wheel)}">{wheel}</a>\n')


@pytest.fixture
def env(tmp_path: Path) -> dict:
    """A venv with no torch; ``pypi`` offers torch 2.13.0 (PyPI's build), ``cpu`` 2.13.0+cpu, ``old`` 2.5.0
    and 2.3.0 (inside and outside the project's range)."""
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=120)
    indexes = {name: tmp_path / name for name in ("pypi", "cpu", "old")}
    write_wheel(indexes["pypi"], "2.13.0")
    write_wheel(indexes["cpu"], "2.13.0+cpu")
    write_wheel(indexes["old"], "2.5.0")
    write_wheel(indexes["old"], "2.3.0")
    pip_env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    pip_env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": indexes["pypi"].as_uri(),
               "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    return {"python": str(tmp_path / "venv" / "bin" / "python"), "env": pip_env,
            **{name: path.as_uri() for name, path in indexes.items()}}


def make_torch(env: dict, *variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "torch", f"PY={env['python']}", *variables], cwd=ROOT, env=env["env"],
                          capture_output=True, text=True, timeout=300)


def installed_torch(env: dict) -> str:
    code = "import importlib.metadata as m; print(m.version('torch'))"
    return subprocess.run([env["python"], "-c", code], env=env["env"], capture_output=True, text=True,
                          check=True).stdout.strip()


def pip_install(env: dict, index: str, requirement: str) -> None:
    subprocess.run([env["python"], "-m", "pip", "install", "-q", "--index-url", index, requirement],
                   env=env["env"], check=True, timeout=300)


def test_without_torch_the_wheel_comes_from_TORCH_INDEX_URL(env):
    out = make_torch(env, f"TORCH_INDEX_URL={env['cpu']}")
    assert out.returncode == 0, out.stderr
    assert installed_torch(env) == "2.13.0+cpu"


def test_without_TORCH_INDEX_URL_the_wheel_comes_from_pips_index(env):
    out = make_torch(env)
    assert out.returncode == 0, out.stderr
    assert installed_torch(env) == "2.13.0"


def test_a_torch_in_the_projects_range_is_kept(env):
    pip_install(env, env["old"], "torch==2.5.0")
    out = make_torch(env, f"TORCH_INDEX_URL={env['cpu']}")
    assert out.returncode == 0, out.stderr
    assert installed_torch(env) == "2.5.0"
    assert "keeping the installed torch 2.5.0" in out.stdout


def test_a_torch_outside_the_projects_range_is_replaced(env):
    pip_install(env, env["old"], "torch==2.3.0")
    out = make_torch(env, f"TORCH_INDEX_URL={env['cpu']}")
    assert out.returncode == 0, out.stderr
    assert installed_torch(env) == "2.13.0+cpu"


def test_the_projects_install_keeps_an_installed_torch(env):
    """pip installs the project's dependencies only if needed: a torch in range stays, whatever index
    (here the machine's own pip configuration) offers."""
    pip_install(env, env["old"], "torch==2.5.0")
    out = subprocess.run([env["python"], "-m", "pip", "install", "--dry-run", "-q", "--report", "-", f"{ROOT}[cpu]"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    to_install = {item["metadata"]["name"] for item in json.loads(out.stdout)["install"]}
    assert "pdserve" in to_install
    assert not {name for name in to_install if name == "torch" or name.startswith("nvidia-")}, to_install
