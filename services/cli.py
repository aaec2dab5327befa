"""The ``pdserve`` console script: one subcommand per service, plus ``up`` and ``bench``.

Each subcommand's module exposes a config dataclass and ``serve(config)``;
flags come from the dataclass (``common.config``), so every flag has a default
shown in ``--help`` and a ``PDSERVE_<FLAG>`` environment variable.  An engine
subcommand's module also exposes ``ROLES`` (role -> role object): the roles it
runs, the first being its ``--role`` default.  A subcommand whose config has
a ``model`` also takes it as a positional argument (``pdserve up MODEL``), and
a model path that is not a directory is refused before anything starts.
Modules are imported only for the subcommand that runs, so ``pdserve registry``
never imports torch.  An invalid flag prints the subcommand's usage and one line.
A service with bus sockets applies its ``--keys-dir``/``--insecure`` to the
process before it starts (``common.bus.curve.configure``).  ``pdserve keys DIR``
writes CURVE keys, one directory per role.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple

from common.bus.curve import BusSecurity, configure, create_keys
from common.config import ConfigError, add_arguments, from_args, require
from common.service import run_service, setup_logging


class Command(NamedTuple):
    module: str
    config: str
    help: str


COMMANDS: dict[str, Command] = {
    "registry": Command("services.registry", "RegistryConfig", "service discovery: registration, leases, watch"),
    "gateway": Command("services.gateway", "GatewayConfig", "OpenAI-compatible HTTP API and the P/D read-mode flow"),
    "prefill": Command("services.prefill", "EngineServiceConfig", "prefill engine service (role prefill, or both)"),
    "decode": Command("services.decode", "EngineServiceConfig", "decode engine service (role decode, or both)"),
    "up": Command("services.up", "UpConfig", "run registry, gateway, prefill and decode on this machine"),
    "bench": Command("bench.serving", "BenchConfig", "serving benchmark against an OpenAI-compatible server"),
}


def pdserve_version() -> str:
    """The installed distribution's version ("unknown" when run from a source tree that is not installed)."""
    try:
        return version("pdserve")
    except PackageNotFoundError:
        return "unknown"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="pdserve", description="P/D disaggregated LLM serving.")
    parser.add_argument("--version", action="version", version=f"pdserve {pdserve_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if command in (None, name):
            module = importlib.import_module(cmd.module)
            config = getattr(module, cmd.config)
            roles = getattr(module, "ROLES", None)
            add_arguments(p, config, {"role": next(iter(roles))} if roles else None)
            p.usage = f"pdserve {name} [options]"  # an error is two lines; --help lists every flag
            if "model" in {f.name for f in dataclasses.fields(config)}:
                p.add_argument("model_tag", nargs="?", metavar="MODEL", help="the model, instead of --model")
                p.usage = f"pdserve {name} [MODEL] [options]"
    sub.add_parser("keys", help="write CURVE keys: a keypair per role (pdserve keys DIR)")
    return parser


def subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (its errors print its own usage)."""
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


def take_positional_model(sub: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """Move a positional MODEL into ``ns.model``; giving a different ``--model`` as well is an error."""
    tag = getattr(ns, "model_tag", None)
    if tag is None:
        return
    require(ns.model in (tag, sub.get_default("model")), "model", f"the model is given twice ({tag} and "
            f"{ns.model}): give it as MODEL or as --model")
    ns.model = tag


def check_model_path(model: str) -> None:
    """Refuse a model that names a local path which is not a directory (a hub id or ``demo`` passes)."""
    path = Path(model).expanduser()
    looks_like_path = path.exists() or model.startswith(("/", "./", "../", "~"))
    require(path.is_dir() or not looks_like_path, "model",
            f"{model} is not a directory (give a model directory, a Hugging Face hub id, or 'demo')")


def keys_main(argv: list[str]) -> int:
    """``pdserve keys DIR``: a CURVE keypair per role, and each role's keys directory."""
    p = argparse.ArgumentParser(prog="pdserve keys", description="Write a CURVE keypair per role into DIR/<role>/, "
                                "with the public keys of the roles it talks to: give each service its role's "
                                "directory as --keys-dir (secret keys are readable by their owner only).")
    p.add_argument("dir", metavar="DIR")
    args = p.parse_args(argv)
    try:
        dirs = create_keys(args.dir)
    except (ConfigError, OSError) as e:
        p.error(str(e))
    for role, path in dirs.items():
        print(f"{role:9s} --keys-dir {path}")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command == "bench":  # a client tool, not a service: it owns its whole run
        from bench.serving import main as bench_main

        sys.exit(bench_main(argv[1:]))
    if argv and argv[0] == "keys":
        sys.exit(keys_main(argv[1:]))
    parser = build_parser(command or "__none__")
    ns, unknown = parser.parse_known_args(argv)
    cmd = COMMANDS[ns.command]
    sub = subcommand_parser(parser, ns.command)
    if unknown:
        sub.error(f"unrecognized arguments: {' '.join(unknown)}")
    module = importlib.import_module(cmd.module)
    try:
        take_positional_model(sub, ns)
        config = from_args(getattr(module, cmd.config), ns)
        if hasattr(config, "model"):
            check_model_path(config.model)
    except ConfigError as e:
        sub.error(str(e))
    roles = getattr(module, "ROLES", None)
    if roles and config.role not in roles:
        sub.error(f"--role: pdserve {ns.command} runs {' or '.join(roles)}, not {config.role}")
    setup_logging(getattr(config, "log_level", "info"))
    if isinstance(config, BusSecurity):
        try:
            configure(config)
        except ConfigError as e:
            sub.error(str(e))
    sys.exit(run_service(module.serve(config)))


if __name__ == "__main__":
    main()
