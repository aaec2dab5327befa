"""One child process of ``pdserve up``: started in its own session, dying with ``up``, its output copied
to ``up``'s stderr with each line after its name."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import threading

from common.service import die_with_parent

log = logging.getLogger(__name__)

class Child:
    """One child process: its name (the prefix of each of its output lines), its command, its restarts."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.restarts = 0
        self.pump: threading.Thread | None = None
        self.proc = self.start()

    def start(self) -> subprocess.Popen:
        """Start (or restart) the process; a thread copies its output to ours, each line prefixed."""
        pdserve = self.argv[1:3] == ["-m", "services.cli"]  # shown as its flags only
        log.info("starting %s: %s", self.name, shown(self.argv[3:] if pdserve else self.argv))
        proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)
        self.pump = threading.Thread(target=_copy_lines, args=(proc.stdout, f"[{self.name}] ".encode()),
                                     name=f"output-{self.name}", daemon=True)
        self.pump.start()
        return proc


def shown(argv: list[str]) -> str:
    """``argv`` as a shell line for the log, the value of ``--api-key`` masked."""
    masked = ["***" if before == "--api-key" else "--api-key=***" if arg.startswith("--api-key=") else arg
              for before, arg in zip(["", *argv], argv)]
    return shlex.join(masked)


_output_lock = threading.Lock()


def _copy_lines(pipe, prefix: bytes) -> None:
    """Copy ``pipe`` to our stderr line by line, each line after ``prefix``, until it closes (lines
    are dropped once our stderr is gone, so that a child never blocks on a full pipe)."""
    with pipe:
        for line in pipe:
            with _output_lock:
                try:
                    sys.stderr.buffer.write(prefix + line)
                    sys.stderr.buffer.flush()
                except (OSError, ValueError):
                    pass
