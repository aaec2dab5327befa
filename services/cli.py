"""The ``pdserve`` console script: one subcommand per service, plus ``up`` and ``bench``.

Each subcommand's module exposes a config dataclass and ``serve(config)``;
flags come from the dataclass (``common.config``), so every flag has a default
shown in ``--help`` and a ``PDSERVE_<FLAG>`` environment variable.  An engine
subcommand's module also exposes ``ROLES`` (role -> role object): the roles it
runs, the first being its ``--role`` default.  Modules are
imported only for the subcommand that runs, so ``pdserve registry`` never
imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from common.config import ConfigError, add_arguments, from_args
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="pdserve", description="P/D disaggregated LLM serving.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if command in (None, name):
            module = importlib.import_module(cmd.module)
            roles = getattr(module, "ROLES", None)
            add_arguments(p, getattr(module, cmd.config), {"role": next(iter(roles))} if roles else None)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command == "bench":  # a client tool, not a service: it owns its whole run
        from bench.serving import main as bench_main

        sys.exit(bench_main(argv[1:]))
    parser = build_parser(command or "__none__")
    ns = parser.parse_args(argv)
    cmd = COMMANDS[ns.command]
    module = importlib.import_module(cmd.module)
    try:
        config = from_args(getattr(module, cmd.config), ns)
    except ConfigError as e:
        parser.error(str(e))
    roles = getattr(module, "ROLES", None)
    if roles and config.role not in roles:
        parser.error(f"--role: pdserve {ns.command} runs {' or '.join(roles)}, not {config.role}")
    setup_logging(getattr(config, "log_level", "info"))
    sys.exit(run_service(module.serve(config)))


if __name__ == "__main__":
    main()
