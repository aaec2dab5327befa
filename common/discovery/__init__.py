"""Discovery: how engines register and how the gateway follows the membership, one interface, two backends.

The URL scheme picks the backend:

* ``tcp://HOST:PORT`` (or ``ipc://``): our ZMQ registry (``services.registry``), the embedded default
  for one machine (``common.registry_client``);
* ``etcd://HOST:PORT[,HOST:PORT...]``: an etcd cluster, for deployments that must survive losing a
  machine (``common.discovery.etcd_*``; needs the ``etcd`` extra: ``pip install 'pdserve[etcd]'``).

Engines use a ``Registration`` (``registration_for``), the gateway a ``MembershipCache`` (``watcher_for``).
Both backends keep the registry's rules: dedup by id and by request endpoint, the P/D compatibility check
at registration, leases renewed by heartbeats.
"""

from __future__ import annotations

import contextlib

from common.discovery.cache import MembershipCache
from common.discovery.etcd_url import SCHEME as ETCD_SCHEME
from common.discovery.etcd_url import EtcdURL
from common.discovery.registration import Registration
from common.errors import StartupError

ZMQ_SCHEMES = ("tcp://", "ipc://", "inproc://")


def url_problem(url: str) -> str | None:
    """Why ``url`` names no discovery backend (None when it does)."""
    if url.startswith(ZMQ_SCHEMES):
        return None
    if url.startswith(ETCD_SCHEME):
        try:
            EtcdURL.parse(url)
        except ValueError as e:
            return str(e)
        return None
    return (f"{url!r}: must be a registry endpoint tcp://host:port (ipc://, inproc://) "
            "or etcd://host:port[,host:port...]")


@contextlib.contextmanager
def _etcd_client():
    """Around importing the etcd backend: without its client, a ``StartupError`` saying what to install."""
    try:
        yield
    except ImportError as e:
        raise StartupError(f"etcd:// discovery needs the etcd client: pip install 'pdserve[etcd]' ({e})") from None


def registration_for(url: str, *, timeout: float) -> Registration:
    """The engine side of the backend ``url`` names; create it inside a running event loop."""
    if url.startswith(ETCD_SCHEME):
        with _etcd_client():
            from common.discovery.etcd_registration import EtcdRegistration
        return EtcdRegistration(url, timeout=timeout)
    from common.registry_client import RegistryClient

    return RegistryClient(url, timeout=timeout)


def watcher_for(url: str, *, idle_timeout: float, grace_s: float) -> MembershipCache:
    """The gateway side of the backend ``url`` names (``grace_s``: the ZMQ registry's restart grace;
    etcd keeps its state across member losses and needs none)."""
    if url.startswith(ETCD_SCHEME):
        with _etcd_client():
            from common.discovery.etcd_watch import EtcdWatcher
        return EtcdWatcher(url, idle_timeout=idle_timeout)
    from common.registry_client import MembershipWatcher

    return MembershipWatcher(url, idle_timeout=idle_timeout, grace_s=grace_s)
