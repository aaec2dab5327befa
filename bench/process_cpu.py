"""Where a benchmark run's CPU went: each named process tree's CPU per request and its share of a core.

A process whose ``busy`` share is near 1.0 saturates its core (a single-threaded Python process
cannot go past it): when that is a fake engine or the load generator, not the router under test,
the run measured the harness.  CPU is user + system time from Linux ``/proc``.
"""

from __future__ import annotations

import os


def stat_cpu_s(path: str) -> float:
    """User + system CPU seconds in a ``/proc/<pid>/stat`` or ``/proc/<pid>/task/<tid>/stat`` file."""
    fields = open(path).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants so far (0.0 once gone)."""
    total, pending = 0.0, [pid]
    while pending:
        p = pending.pop()
        try:
            total += stat_cpu_s(f"/proc/{p}/stat")
            with open(f"/proc/{p}/task/{p}/children") as f:
                pending.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            pass  # exited in between
    return total


class ProcessCPU:
    """CPU seconds that named process trees spend between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: tree_cpu_s(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {name: tree_cpu_s(pid) - self._start[name] for name, pid in self.pids.items()}


def cpu_per_request(cpu_s: dict[str, float], requests: int, elapsed_s: float) -> dict[str, dict[str, float]]:
    """Per name: ``cpu_us`` (CPU microseconds per request) and ``busy`` (CPU over wall time: 1.0 is one
    core all the time), from CPU seconds spent over ``requests`` requests in ``elapsed_s`` seconds."""
    return {name: {"cpu_us": s * 1e6 / requests, "busy": s / elapsed_s} for name, s in cpu_s.items()}
