"""Config objects and how they become command-line flags.

A service's config is a ``@dataclass`` whose fields carry ``help`` in their
metadata.  ``add_arguments`` turns each field into ``--field-name`` with its
default shown in ``--help``; the environment variable ``PDSERVE_FIELD_NAME``
overrides the default; a flag given on the command line overrides both.
``from_args`` builds the dataclass and calls its ``validate()``, whose
``ConfigError`` the CLI prints as one clear line.  A ``Literal`` field (or one
with ``choices``) accepts only its values; a boolean field also gets
``--no-field-name``.

    @dataclass
    class RegistryConfig:
        bind: str = opt("tcp://127.0.0.1:7100", "ROUTER address to bind")
        lease_ttl_s: float = opt(6.0, "expire an instance after this long without a heartbeat")

        def validate(self) -> None:
            require(self.lease_ttl_s > 0, "lease_ttl_s", "must be > 0")
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

ENV_PREFIX = "PDSERVE_"

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value is invalid; ``str()`` names the flag and the reason."""


def opt(default: Any, help: str, *, choices: tuple | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A config field with a default and a help text (lists get copied per instance); ``aliases``: more flags."""
    meta = {"help": help, "choices": choices, "aliases": aliases}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def require(ok: bool, field: str, reason: str) -> None:
    """Raise ``ConfigError`` naming ``--field`` when ``ok`` is false."""
    if not ok:
        raise ConfigError(f"--{field.replace('_', '-')}: {reason}")


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the scalar type, whether None is allowed) of a field annotation."""
    optional = False
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        tp = args[0] if len(args) == 1 else str
        origin = get_origin(tp)
    return tp, optional


def _parser_for(tp: Any, optional: bool, field: str, choices: tuple | None = None):
    """A function parsing one string into the field's type (one of ``choices`` when given)."""
    origin = get_origin(tp)
    if origin is Literal or choices:
        values = get_args(tp) if origin is Literal else choices

        def parse_literal(s: str):
            if s not in values:
                raise argparse.ArgumentTypeError(f"{s!r} is not one of {', '.join(map(str, values))}")
            return s

        return parse_literal
    if origin is list:
        (item,) = get_args(tp) or (str,)
        inner = _parser_for(item, False, field)
        return lambda s: [inner(x.strip()) for x in s.split(",") if x.strip()]
    if tp is bool:

        def parse_bool(s: str) -> bool:
            low = s.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"{s!r} is not a boolean")

        return parse_bool

    def parse_scalar(s: str):
        if optional and s.strip().lower() in ("", "none"):
            return None
        try:
            return tp(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{s!r} is not a valid {getattr(tp, '__name__', tp)}")

    return parse_scalar


def add_arguments(parser: argparse.ArgumentParser, config_cls: type, defaults: dict[str, Any] | None = None) -> None:
    """Add one flag per field of ``config_cls`` to ``parser``; ``defaults`` replace field defaults."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        tp, optional = _base_type(hints[f.name])
        choices = get_args(tp) if get_origin(tp) is Literal else f.metadata.get("choices")
        parse = _parser_for(tp, optional, f.name, choices)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        default = (defaults or {}).get(f.name, default)
        env = os.environ.get(env_name(f.name))
        if env is not None:
            try:
                default = parse(env)
            except argparse.ArgumentTypeError as e:
                parser.error(f"{env_name(f.name)}: {e}")
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{f.metadata.get('help', '')} (default: {shown}; env {env_name(f.name)})".replace("%", "%%")
        kwargs: dict[str, Any] = dict(dest=f.name, default=default, help=help_text, type=parse)
        if choices:
            kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        if tp is bool:
            kwargs["nargs"] = "?"
            kwargs["const"] = True
        parser.add_argument(flag_name(f.name), *f.metadata.get("aliases", ()), **kwargs)
        if tp is bool:
            parser.add_argument("--no-" + flag_name(f.name)[2:], dest=f.name, action="store_false",
                                help=f"the same as {flag_name(f.name)} false")


def from_args(config_cls: type[C], ns: argparse.Namespace) -> C:
    """Build and validate ``config_cls`` from parsed flags (extra attributes are ignored)."""
    names = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    config = config_cls(**{k: v for k, v in vars(ns).items() if k in names})
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config
