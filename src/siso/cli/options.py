"""Command-line options derived from the run specification (``siso.config``'s knobs).

Each command is a plain function over its own few arguments (``--out``, ``--overwrite``) and
``**knobs``; :func:`command` gives it the signature typer reads, one option per knob of the settings
classes it takes: the flag, the type, the help with its default (a backbone's preset shown per
family, never typed), the choices. An option the user does not give reaches the command as ``None``
and is left out of the config, so the config's own default is what runs and what run.json records.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..knobs import Knob, knob, knobs, show
from ..presets import per_family


@dataclass(frozen=True, kw_only=True)
class RunTarget:
    """Where an optimising command writes its run: the knobs ``generate`` and ``edit`` share."""

    out: Path = knob(help="Run directory to write (new or empty).")
    overwrite: bool = knob(False, help="Replace an earlier siso run in a non-empty --out (siso never replaces a "
                                       "directory of your own files).")


def cli_type(spec: Knob) -> Any:
    """The type typer parses a knob's value as: tuples become repeatable options."""
    base = spec.value_type
    if typing.get_origin(base) is tuple:
        return list[typing.get_args(base)[0]]
    return base


def default_text(spec: Knob, long_lived: bool = False, fallback: str | None = None) -> str | None:
    """How the help states a knob's default (None: the knob is required; "unset": its help says what
    leaving it out means). ``fallback``: the option whose value a family without a preset value takes (``--lr``)."""
    default = spec.default_for(long_lived)
    if default is MISSING:
        return None
    if default is None and spec.preset is not None:
        return "the backbone's: " + per_family(spec.preset, missing=f"as {fallback}" if fallback else None)
    return "unset" if default is None else show(default)


def help_text(spec: Knob, long_lived: bool = False, fallback: str | None = None) -> str:
    parts = [spec.help]
    if spec.choices and typing.get_origin(spec.value_type) is not tuple:
        parts.append(f"One of: {', '.join(spec.choices)}.")
    elif spec.choices:
        parts.append(f"Any of: {', '.join(spec.choices)}.")
    default = default_text(spec, long_lived, fallback)
    if default is not None:
        parts.append(f"[default: {default}]")
    return " ".join(parts)


def knob_parameters(*owners: type, only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                    long_lived: bool = False, panel: str | None = None,
                    flags: Mapping[str, str] | None = None) -> list[inspect.Parameter]:
    """One keyword parameter per command-line knob of ``owners`` (the first owner's declaration wins
    a name both declare), in declaration order; ``only`` picks and orders, ``exclude`` drops,
    ``flags`` renames (the app's ``--edit-model`` is the edit settings' ``model``)."""
    specs: dict[str, Knob] = {}
    for owner in owners:
        for name, spec in knobs(owner).items():
            specs.setdefault(name, spec)
    names = list(only) if only is not None else [n for n in specs if n not in set(exclude)]
    parameters = []
    for name in names:
        spec = specs[name]
        if not spec.cli:
            continue
        fallback = specs[spec.fallback].option if spec.fallback else None
        parameters.append(knob_parameter(spec, long_lived=long_lived, panel=panel, flag=(flags or {}).get(name),
                                         fallback=fallback))
    return parameters


_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}


def knob_parameter(spec: Knob, *, long_lived: bool = False, panel: str | None = None, flag: str | None = None,
                   name: str | None = None, fallback: str | None = None) -> inspect.Parameter:
    kind = cli_type(spec)
    flag = flag or spec.flag
    declarations = [f"--{flag}/--no-{flag}"] if kind is bool else [f"--{flag}"]
    required = spec.default_for(long_lived) is MISSING
    item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
    metavar = spec.metavar or ("" if kind is bool else _METAVARS.get(item, "TEXT"))
    # The help is shown through rich markup: its [default: ...] must not be read as a markup tag.
    option = typer.Option(*declarations, help=escape(help_text(spec, long_lived, fallback)), show_default=False,
                          metavar=metavar, rich_help_panel=panel)
    annotation = Annotated[kind if required else kind | None, option]
    return inspect.Parameter(name or spec.name, inspect.Parameter.KEYWORD_ONLY,
                             default=inspect.Parameter.empty if required else None, annotation=annotation)


def given(owner: type, values: Mapping[str, Any], long_lived: bool = False) -> dict[str, Any]:
    """The knobs of ``owner`` the user gave (parsed into config values), plus the long-lived defaults
    where the command keeps its models loaded; everything else is left to the config's defaults."""
    out: dict[str, Any] = {}
    for name, spec in knobs(owner).items():
        value = values.get(name)
        if value is None or (isinstance(value, list) and not value):
            if long_lived and spec.long_lived is not MISSING:
                out[name] = spec.long_lived
            continue
        if isinstance(value, list):
            value = tuple(value)
        out[name] = spec.parse(value) if spec.parse is not None else value
    return out


def command(function: Callable[..., Any], *parameters: Iterable[inspect.Parameter]) -> Callable[..., Any]:
    """``function`` with its own parameters followed by ``parameters`` (its ``**knobs``), as typer reads it."""
    own = [p for p in inspect.signature(function, eval_str=True).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    derived = [p for group in parameters for p in group]
    names = [p.name for p in own + derived]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise TypeError(f"{function.__name__}: options declared twice: {sorted(duplicated)}")

    @functools.wraps(function)
    def wrapper(**values: Any) -> Any:
        return function(**values)

    signature = inspect.Signature(own + derived)
    wrapper.__signature__ = signature  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    return wrapper
