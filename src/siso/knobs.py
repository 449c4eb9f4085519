"""How a knob is declared: a dataclass field whose metadata carries everything a surface needs.

As in peft's configs and transformers' ``HfArgumentParser``, the default and the help live on the
field itself (``knob(50, help="...")``); the command line, the web app's controls, the benchmark's
options and ``docs/cli.md`` are derived from these declarations (``siso.cli.options``,
``siso.app``), so a default or a help text is written in exactly one place.

No torch, no I/O: importing this (and ``siso.config``) costs nothing, so ``siso --help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from typing import Any

#: metadata keys of a knob field (dataclasses keep the mapping read-only; these are its only entries)
_KEYS = ("help", "flag", "choices", "preset", "fallback", "cli", "label", "parse", "long_lived", "metavar")


def knob(default: Any = MISSING, *, help: str, flag: str | None = None, choices: tuple[str, ...] | None = None,
         preset: str | None = None, fallback: str | None = None, cli: bool = True, label: str | None = None,
         parse: Callable[[Any], Any] | None = None, long_lived: Any = MISSING, metavar: str | None = None) -> Any:
    """A dataclass field that is a user-facing knob.

    - ``help``: one sentence on what it does (no default in it: every surface appends the default).
    - ``flag``: the command-line name without dashes (default: the field name with dashes).
    - ``choices``: the values it takes (checked by the config; the CLI shows them).
    - ``preset``: the :class:`~siso.presets.BackbonePreset` attribute that fills it when left ``None``;
      ``fallback``: the knob whose resolved value fills it when the preset has ``None`` too.
    - ``cli``: False for knobs recorded but not offered on the command line (Adam's betas).
    - ``label``: a short name for form controls (the web app); ``metavar``: the CLI's placeholder.
    - ``parse``: turns the command line's value into the config's (``"none"`` -> ``None``, a
      comma-separated list -> a tuple).
    - ``long_lived``: the default where the process keeps its models loaded (the app, the benchmark).
    """
    metadata = {"help": help, "flag": flag, "choices": choices, "preset": preset, "fallback": fallback,
                "cli": cli, "label": label, "parse": parse, "long_lived": long_lived, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        raise TypeError("a knob's default must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=metadata)


def like(owner: type, name: str, **changes: Any) -> Any:
    """The knob ``name`` of ``owner`` again, with ``changes`` (another default, no preset, ...): how a
    subclass or another settings class takes a knob over without writing its help a second time."""
    source = _fields(owner)[name]
    metadata = {key: source.metadata.get(key) for key in _KEYS}
    metadata["long_lived"] = source.metadata.get("long_lived", MISSING)
    default = changes.pop("default", source.default)
    metadata.update(changes)
    return knob(default, **metadata)


@dataclass(frozen=True)
class Knob:
    """A knob as the surfaces see it: the field, its resolved type and its metadata."""

    name: str
    type: Any
    default: Any
    help: str
    flag: str
    choices: tuple[str, ...] | None
    preset: str | None
    fallback: str | None
    cli: bool
    label: str
    parse: Callable[[Any], Any] | None
    long_lived: Any
    metavar: str | None

    @property
    def value_type(self) -> Any:
        """The type of a given value: ``int`` for ``int | None``."""
        if isinstance(self.type, types.UnionType) or typing.get_origin(self.type) is typing.Union:
            args = [a for a in typing.get_args(self.type) if a is not type(None)]
            return args[0] if len(args) == 1 else self.type
        return self.type

    @property
    def option(self) -> str:
        """The command-line spelling: ``--max-steps``."""
        return f"--{self.flag}"

    def default_for(self, long_lived: bool = False) -> Any:
        """The default a command uses: ``long_lived`` processes (app, bench) may have their own."""
        return self.long_lived if long_lived and self.long_lived is not MISSING else self.default


def _fields(owner: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(owner)}


def knobs(owner: type) -> dict[str, Knob]:
    """Every knob of a settings dataclass, in declaration order (fields without help are not knobs)."""
    hints = typing.get_type_hints(owner)
    found = {}
    for field in dataclasses.fields(owner):
        meta: Mapping[str, Any] = field.metadata
        if "help" not in meta:
            continue
        found[field.name] = Knob(
            name=field.name, type=hints[field.name], default=field.default, help=meta["help"],
            flag=meta["flag"] or field.name.replace("_", "-"), choices=meta["choices"], preset=meta["preset"],
            fallback=meta["fallback"], cli=meta["cli"], label=meta["label"] or _label(field.name),
            parse=meta["parse"], long_lived=meta.get("long_lived", MISSING), metavar=meta["metavar"],
        )
    return found


def option(owner: type, name: str) -> str:
    """The command-line spelling of a knob, for messages: ``option(GenerateConfig, "learning_rate")`` is ``--lr``."""
    return knobs(owner)[name].option


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def show(value: Any) -> str:
    """A default as a person reads it: ``2e-4`` rather than ``0.0002``, ``on``/``off``, lists joined."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-2:
            mantissa, exponent = f"{value:.6e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(show(v) for v in value)
    if value is None:
        return "none"
    return str(value)
