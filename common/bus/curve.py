"""CURVE on the bus: each role's keys, the process's keys, and what each socket needs.

Keys are libzmq CURVE keypairs in ``zmq.auth`` certificate files (z85).
``pdserve keys DIR`` (``create_keys``) writes one directory per role,
``DIR/<role>/``, to ship to that role's hosts: the role's own keypair
(``<role>.key`` and ``<role>.key_secret``) and the public keys of the roles it
talks to (``<other>.key``).  A keys directory holds exactly one secret key: it
says which role this process is.  Every public key file names its role,
``<role>.key`` or ``<role>-<label>.key`` (more keys of one role: one per host,
or a new key while the old one is retired); a server of a role presents
``<role>.key``'s pair, so that is the key its clients expect.

Servers admit roles, not addresses: a ROUTER that admits ``{"gateway"}`` takes
connections only from keys filed as gateway keys (``zap``).  The peer of each
received message is a ``Peer``: with CURVE its role and public key, as the ZAP
handler named it; without, the connection's routing id (any role).

Without keys nothing is encrypted or authenticated, which is safe only when
every socket is on loopback: ``configure`` refuses anything else unless
``insecure`` says the operator means it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import zmq
import zmq.auth
from zmq.utils import z85

from common.bus import zap
from common import hosts
from common.config import ConfigError, opt, require

log = logging.getLogger(__name__)

ROLES = ("gateway", "engine", "registry")
# The roles whose public keys a role needs: those that dial it and those it dials.
TALKS_TO = {"gateway": ("engine", "registry"), "engine": ("gateway", "engine", "registry"),
            "registry": ("gateway", "engine")}
# Which roles each kind of server admits (its ZAP domain): the whole policy, in one place.
REGISTRY_ADMITS = frozenset({"engine", "gateway"})  # gateways watch; only engines register (registry.server)
# An engine's request socket: gateways, and engines for GetStats (a container's health check dials with its own
# key); Generate is the gateway's alone (``server.require_sender`` in its handler), an Abort reaches only the
# sender's own requests.
ENGINE_ADMITS = frozenset({"gateway", "engine"})
KV_ADMITS = frozenset({"engine"})  # KV side channels (decode -> prefill) and rank agents (rank 0 -> rank)
KEYS_DIR_ENV = "PDSERVE_KEYS_DIR"


class Peer(NamedTuple):
    """Who sent a message: ``role`` None without CURVE (then ``id`` is the connection's routing id)."""

    role: str | None
    id: str

    def acts_as(self, role: str) -> bool:
        """Whether this peer may do what ``role`` does (any peer may, without CURVE)."""
        return self.role is None or self.role == role


def peer_from_user_id(user_id: str) -> Peer:
    """The ``Peer`` the ZAP handler's User-Id (``role:z85-key``) names."""
    role, _, key = user_id.partition(":")
    return Peer(role, key)


def insecure_peer(identity: bytes) -> Peer:
    return Peer(None, "zmq:" + identity.hex())


@dataclass(frozen=True)
class Keys:
    """One process's CURVE material: its role and keypair, and every public key it knows, by role."""

    role: str
    public: bytes  # z85
    secret: bytes  # z85
    known: dict[bytes, str]  # raw 32-byte public key -> its role
    servers: dict[str, bytes]  # role -> the z85 public key its servers present

    def server_key(self, role: str) -> bytes:
        key = self.servers.get(role)
        if key is None:
            raise ConfigError(f"--keys-dir has no {role}.key: this {self.role} cannot reach a {role}")
        return key


def role_of_file(path: Path) -> str:
    role = path.name.split(".", 1)[0].split("-", 1)[0]
    if role not in ROLES:
        raise ConfigError(f"--keys-dir: {path.name} names no role ({', '.join(ROLES)})")
    return role


def load_keys(directory: str | Path) -> Keys:
    """The keys in ``directory`` (see the module doc); raises ``ConfigError`` on a bad directory."""
    root = Path(directory)
    require(root.is_dir(), "keys_dir", f"{directory} is not a directory (make one with `pdserve keys DIR`)")
    secrets = sorted(root.glob("*.key_secret"))
    require(len(secrets) == 1, "keys_dir", f"{directory} must hold exactly one *.key_secret, "
            f"found {len(secrets)}")
    role = role_of_file(secrets[0])
    try:
        public, secret = zmq.auth.load_certificate(secrets[0])
        known: dict[bytes, str] = {}
        servers: dict[str, bytes] = {}
        for path in sorted(root.glob("*.key")):
            key, _ = zmq.auth.load_certificate(path)
            known[z85.decode(key)] = role_of_file(path)
            if path.stem == role_of_file(path):
                servers[path.stem] = key
    except (OSError, ValueError) as e:
        raise ConfigError(f"--keys-dir: cannot read {directory}: {e}") from None
    require(secret is not None and len(secret) == 40, "keys_dir", f"{secrets[0]} holds no secret key")
    return Keys(role, public, secret, known, servers)


def create_keys(directory: str | Path) -> dict[str, Path]:
    """Write a fresh keypair per role and each role's keys directory under ``directory``; returns them.

    Raises ``ConfigError`` rather than overwrite keys already there."""
    root = Path(directory)
    dirs = {role: root / role for role in ROLES}
    taken = [str(d) for d in dirs.values() if d.exists() and any(d.iterdir())]
    if taken:
        raise ConfigError(f"{', '.join(taken)} already hold keys: give an empty or new directory")
    publics: dict[str, bytes] = {}
    for role, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
        public_file, secret_file = zmq.auth.create_certificates(path, role)
        Path(secret_file).chmod(0o600)
        publics[role] = Path(public_file).read_bytes()
    for role, path in dirs.items():
        for other in TALKS_TO[role]:
            if other != role:
                (path / f"{other}.key").write_bytes(publics[other])
    return dirs


# -- the process's keys -------------------------------------------------------

_UNSET = object()
_keys: Keys | None | object = _UNSET


def use(keys: Keys | None) -> None:
    """Make ``keys`` (None: no CURVE) the keys of every bus socket this process opens from now on."""
    global _keys
    _keys = keys


def current() -> Keys | None:
    """The process's keys: those ``use``d, else (a process a service spawned) those in ``$PDSERVE_KEYS_DIR``."""
    global _keys
    if _keys is _UNSET:
        directory = os.environ.get(KEYS_DIR_ENV)
        _keys = load_keys(directory) if directory else None
    return _keys  # type: ignore[return-value]


@dataclass
class BusSecurity:
    """The flags of a service with bus sockets (a config mixin)."""

    keys_dir: str | None = opt(None, "CURVE keys directory of this role (`pdserve keys DIR` makes them): every "
                                     "bus socket is encrypted and admits only the roles' known keys")
    insecure: bool = opt(False, "run without CURVE, even off loopback and even with --keys-dir (without "
                                "keys, only loopback endpoints are allowed)")

    def bus_endpoints(self) -> list[str]:
        """The endpoints this service binds or dials."""
        return [getattr(self, name) for name in ("bind", "kv_bind", "registry") if hasattr(self, name)]


def configure(flags: BusSecurity) -> Keys | None:
    """Apply ``flags`` to this process (and the processes it spawns, through ``$PDSERVE_KEYS_DIR``).

    With a keys directory every socket uses CURVE; ``--insecure`` turns it off; without either,
    an endpoint off loopback raises ``ConfigError`` and loopback gets a one-line warning."""
    keys = None if flags.insecure or not flags.keys_dir else load_keys(flags.keys_dir)
    if keys is None:
        os.environ.pop(KEYS_DIR_ENV, None)
        public = [e for e in flags.bus_endpoints() if not is_loopback(e)]
        if public and not flags.insecure:
            raise ConfigError(f"--keys-dir: {public[0]} is not on loopback: give a --keys-dir (`pdserve keys "
                              "DIR`), or --insecure to run unauthenticated and unencrypted")
        log.warning("bus sockets without CURVE%s", " (--insecure)" if flags.insecure else ": loopback only")
    else:
        os.environ[KEYS_DIR_ENV] = str(Path(flags.keys_dir).resolve())  # type: ignore[arg-type]
    use(keys)
    return keys


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` is reachable from this host only (ipc, inproc, or tcp on a loopback host)."""
    if not endpoint.startswith("tcp://"):
        return endpoint.startswith(("ipc://", "inproc://"))
    return hosts.is_loopback(endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]"))


# -- per socket ---------------------------------------------------------------

def secure_server(sock: zmq.Socket, admits: frozenset[str]) -> bool:
    """Make ``sock`` a CURVE server admitting ``admits`` (roles) when the process has keys; True if it did."""
    keys = current()
    if keys is None:
        return False
    if not admits or not admits <= set(ROLES):
        raise ValueError(f"a server admits some of {ROLES}, not {sorted(admits)}")
    zap.start(sock.context, keys_known)
    sock.curve_server = True
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.zap_domain = zap.domain(admits)
    return True


def keys_known() -> dict[bytes, str]:
    """The public keys the process's keys know (none after ``use(None)``), for the ZAP handler."""
    keys = current()
    return {} if keys is None else keys.known


def secure_client(sock: zmq.Socket, server_role: str) -> None:
    """Make ``sock`` a CURVE client of a ``server_role`` server when the process has keys."""
    keys = current()
    if keys is not None:
        sock.curve_serverkey = keys.server_key(server_role)
        sock.curve_publickey = keys.public
        sock.curve_secretkey = keys.secret
