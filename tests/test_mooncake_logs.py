"""Mooncake's glog output follows --log-level, and a healthy start prints no error line.

Each case starts a Mooncake engine in a fresh process (glog reads its level when the module loads)
with our logging at the given level, and reads what the process wrote to stderr.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mooncake.engine")

ROOT = Path(__file__).parents[1]
START = """
import logging, sys
from common.service import setup_logging
setup_logging(sys.argv[1])
from common.kv_transfer.mooncake import MooncakeBackend
MooncakeBackend("127.0.0.1", force_tcp=True).close()
"""


def start_stderr(level: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", START, level], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def glog(lines: list[str], severity: str) -> list[str]:
    """glog's lines of one severity (``I1129 17:35:06.706 ... file.cpp:12] message``)."""
    return [line for line in lines if line[:1] == severity and line[1:5].isdigit()]


def test_a_healthy_start_at_info_prints_only_our_line():
    lines = start_stderr("info")
    assert not glog(lines, "E"), lines  # no "Local segment descriptor not found"
    assert not glog(lines, "I") and not glog(lines, "W"), lines
    assert any("Mooncake engine up at 127.0.0.1:" in line for line in lines), lines


def test_debug_shows_mooncake_info_lines_but_not_the_benign_error():
    lines = start_stderr("debug")
    assert any("TcpTransport: listen on port" in line for line in glog(lines, "I")), lines
    assert not any("Local segment descriptor not found" in line for line in lines), lines


def test_error_level_silences_mooncake_at_start():
    lines = start_stderr("error")
    assert lines == [], lines
