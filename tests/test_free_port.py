"""``free_port`` under pytest-xdist: each worker draws from its own slice of the ports, so two workers never
hand the same port to two children (each worker only knows the ports it handed out itself)."""

from __future__ import annotations

import pytest

from bench import processes
from bench.processes import PORTS, free_port


def slice_of(monkeypatch, worker: str, count: int) -> range:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(count))
    return processes._ports()


@pytest.mark.parametrize("count", [2, 3, 8])
def test_the_workers_slices_are_disjoint_and_inside_the_range(monkeypatch, count):
    slices = [slice_of(monkeypatch, f"gw{i}", count) for i in range(count)]
    ports = [p for s in slices for p in s]
    assert len(ports) == len(set(ports)) >= len(PORTS) - count
    assert min(ports) == PORTS.start and max(ports) < PORTS.stop


def test_a_worker_hands_out_ports_of_its_slice_only(monkeypatch):
    mine = slice_of(monkeypatch, "gw1", 2)
    assert all(free_port() in mine for _ in range(50))


def test_outside_xdist_the_whole_range(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert processes._ports() == PORTS
