"""docs/cli.md, generated from the command line itself (so from the knob declarations it derives from).

``python -m siso.cli.reference docs/cli.md`` writes it; ``--check`` exits 1 when the file is stale
(tests/test_cli_reference.py runs the same comparison).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
import typer

HEADER = """# Command-line reference

Every command, option, default and help text below is read off the `siso` command line itself, whose
options are derived from the knob declarations (`src/siso/config.py`, `src/siso/app_settings.py`,
`src/siso/eval/settings.py`). Regenerate it with `python -m siso.cli.reference docs/cli.md`; a test fails
when it is stale. "The backbone's" defaults come from each family's preset (`src/siso/presets.py`; their
sources: [fidelity.md](fidelity.md)).
"""
_DEFAULT = re.compile(r"\s*\[default: (?P<value>.*)\]\s*$")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _option_row(param: click.Parameter) -> str:
    help_text = (getattr(param, "help", None) or "").replace("\\[", "[")
    match = _DEFAULT.search(help_text)
    default = match["value"] if match else ""
    if match:
        help_text = help_text[: match.start()]
    if param.required:
        default = "required"
    elif not default and getattr(param, "show_default", True) is not False and param.default not in (None, (), False):
        default = str(param.default)
    names = " / ".join(f"`{name}`" for name in [*param.opts, *getattr(param, "secondary_opts", [])])
    if isinstance(param, click.Argument):
        names = f"`{param.human_readable_name}` (argument)"
    return f"| {names} | {_cell(default)} | {_cell(help_text)} |"


def render() -> str:
    """The whole page, in the order the commands are registered."""
    from . import app

    group = typer.main.get_command(app)
    lines = [HEADER]
    for name, command in group.commands.items():
        summary = (command.help or "").strip().replace("\\[", "[")
        lines += [f"## `siso {name}`", "", summary, "", "| option | default | what it does |", "|---|---|---|"]
        lines += [_option_row(param) for param in command.params if param.name != "help"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    target = Path(paths[0]) if paths else Path("docs/cli.md")
    text = render()
    if check:
        current = target.read_text() if target.is_file() else ""
        if current != text:
            print(f"{target} is stale: regenerate it with `python -m siso.cli.reference {target}`.")
            return 1
        return 0
    target.write_text(text)
    print(f"Wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
