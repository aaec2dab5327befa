"""The command line of a local etcd member (``pdserve up --registry-backend etcd``, tests, benchmarks).

etcd comes from Debian (``apt-get install etcd-server``: ``/usr/bin/etcd``).  The
members listen on one host only, so they use a short raft heartbeat (10 ms) and
election timeout (100 ms): a lost leader is replaced within a fraction of a second,
and leases as short as 1 s are honoured (etcd's shortest lease is 1.5 elections).
"""

from __future__ import annotations

import shutil

from common.errors import StartupError

HEARTBEAT_MS = 10
ELECTION_MS = 100


def etcd_binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        raise StartupError("etcd is not installed: apt-get install etcd-server (Debian/Ubuntu) puts it in /usr/bin")
    return path


def etcd_argv(name: str, data_dir: str, client_port: int, peers: dict[str, int], *, host: str = "127.0.0.1",
              log_level: str = "warn") -> list[str]:
    """Member ``name`` of the cluster ``peers`` (member name -> peer port, ``name`` among them), serving
    clients on ``host:client_port`` and keeping its data in ``data_dir``."""
    cluster = ",".join(f"{member}=http://{host}:{port}" for member, port in peers.items())
    return [etcd_binary(), "--name", name, "--data-dir", data_dir,
            "--listen-client-urls", f"http://{host}:{client_port}",
            "--advertise-client-urls", f"http://{host}:{client_port}",
            "--listen-peer-urls", f"http://{host}:{peers[name]}",
            "--initial-advertise-peer-urls", f"http://{host}:{peers[name]}",
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS),
            "--logger", "zap", "--log-level", log_level]
