"""`gruserve serve`'s settings on the command line and in the environment, derived from the
declarations in `gruserve.runtime.config` (nothing here repeats a default or a bound).

Precedence: a flag on the command line, else its `GRUSERVE_*` environment variable, else the
declared default. An empty variable counts as unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

from .config import ConfigError, ServerConfig, env_of, field_type, flag_of, sections

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}

PRECEDENCE_NOTE = (
    "Every setting can also be given as an environment variable, GRUSERVE_ followed by the "
    "flag's name in capitals with underscores (--num-slots: GRUSERVE_NUM_SLOTS; booleans take "
    "1/0, true/false, yes/no, on/off). Precedence: flag > environment > default."
)


def _parse(kind: type, text: str) -> Any:
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"not a boolean (use one of {', '.join(_TRUE + _FALSE)}): {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"not {_TYPE_NAMES.get(kind, kind.__name__)}: {text!r}") from None


def _argparse_type(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return _parse(kind, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = kind.__name__  # what argparse names in its own messages
    return convert


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _cli_fields():
    """(section name, section class, field) of every setting the command line offers."""
    for section, cls in sections().items():
        for f in dataclasses.fields(cls):
            if f.metadata["setting"].cli:
                yield section, cls, f


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, grouped by section; the help shows default and variable."""
    groups = {}
    for section, cls, f in _cli_fields():
        if section not in groups:
            doc = (cls.__doc__ or "").strip().splitlines()[0]
            groups[section] = parser.add_argument_group(f"{section}: {doc}")
        spec = f.metadata["setting"]
        flag = flag_of(f)
        kind = field_type(cls, f)
        kwargs: dict[str, Any] = dict(
            dest=f.name, default=argparse.SUPPRESS,
            help=f"{spec.help} (default {_shown(f.default)}; env {env_of(flag)})",
        )
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _argparse_type(kind)
            if spec.choices:
                kwargs["choices"] = spec.choices
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
        groups[section].add_argument(flag, **kwargs)


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """The ServerConfig the flags and variables describe; raises ConfigError naming the flag
    (and the variable, when the value came from one)."""
    environ = os.environ if environ is None else environ
    values: dict[str, dict[str, Any]] = {name: {} for name in sections()}
    from_env: dict[str, str] = {}  # flag -> variable its value came from
    for section, cls, f in _cli_fields():
        flag = flag_of(f)
        if hasattr(args, f.name):
            values[section][f.name] = getattr(args, f.name)
            continue
        env = env_of(flag)
        text = environ.get(env, "")
        if text == "":
            continue
        try:
            values[section][f.name] = _parse(field_type(cls, f), text)
        except ValueError as exc:
            raise ConfigError(flag, f"{exc} (from ${env})") from None
        from_env[flag] = env
    try:
        return ServerConfig(**{name: cls(**values[name]) for name, cls in sections().items()})
    except ConfigError as exc:
        if exc.flag in from_env:
            raise ConfigError(exc.flag, f"{exc.reason} (from ${from_env[exc.flag]})") from None
        raise
