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

from .config import (
    ConfigError,
    LoggingConfig,
    ServerConfig,
    env_of,
    field_type,
    flag_of,
    sections,
)

LOGGING_SECTION = {"logging": LoggingConfig}

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


def _cli_fields(of: dict[str, type]):
    """(section name, section class, field) of every setting the command line offers."""
    for section, cls in of.items():
        for f in dataclasses.fields(cls):
            if f.metadata["setting"].cli:
                yield section, cls, f


def add_config_arguments(
    parser: argparse.ArgumentParser, of: dict[str, type] | None = None
) -> None:
    """One flag per setting of the sections `of` (default: ServerConfig's), grouped by
    section; the help shows default and variable."""
    groups = {}
    for section, cls, f in _cli_fields(sections() if of is None else of):
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


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """--log-level and --log-format, which every command takes."""
    add_config_arguments(parser, LOGGING_SECTION)


def _sections_from_args(
    of: dict[str, type], args: argparse.Namespace, environ: Mapping[str, str] | None
) -> dict[str, Any]:
    """section name -> the section the flags and variables describe; raises ConfigError
    naming the flag (and the variable, when the value came from one)."""
    environ = os.environ if environ is None else environ
    values: dict[str, dict[str, Any]] = {name: {} for name in of}
    from_env: dict[str, str] = {}  # flag -> variable its value came from
    for section, cls, f in _cli_fields(of):
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
        return {name: cls(**values[name]) for name, cls in of.items()}
    except ConfigError as exc:
        if exc.flag in from_env:
            raise ConfigError(exc.flag, f"{exc.reason} (from ${from_env[exc.flag]})") from None
        raise


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """The ServerConfig the flags and variables describe; raises ConfigError naming the flag
    (and the variable, when the value came from one)."""
    return ServerConfig(**_sections_from_args(sections(), args, environ))


def logging_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> LoggingConfig:
    return _sections_from_args(LOGGING_SECTION, args, environ)["logging"]


TABLE_BEGIN = "<!-- settings table: generated by `python -m gruserve.runtime.cli_config FILE` -->"
TABLE_END = "<!-- end of settings table -->"


def settings_table() -> str:
    """Every setting's variable, flag, default and help, as a Markdown table."""
    rows = ["| variable | flag | default | what |", "|---|---|---|---|"]
    for of in (LOGGING_SECTION, sections()):
        for _, _, f in _cli_fields(of):
            flag = flag_of(f)
            text = f.metadata["setting"].help.replace("|", "\\|")
            rows.append(f"| `{env_of(flag)}` | `{flag}` | {_shown(f.default)} | {text} |")
    return "\n".join(rows)


def write_settings_table(path: str) -> bool:
    """Replaces the table between the markers in `path`; returns whether it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, begin, rest = text.partition(TABLE_BEGIN)
    _, end, tail = rest.partition(TABLE_END)
    if not (begin and end):
        raise SystemExit(f"{path}: no settings table markers ({TABLE_BEGIN!r} ... {TABLE_END!r})")
    new = f"{head}{TABLE_BEGIN}\n{settings_table()}\n{TABLE_END}{tail}"
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or ["docs/operations.md"]:
        print(f"{name}: {'updated' if write_settings_table(name) else 'up to date'}")
