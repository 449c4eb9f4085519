"""The command line: one module per command (``generate``, ``render``, ``convert_ir``, ``edit``, ``bench``,
``push``, ``web`` for `siso app`), each a thin typed function over a library call, on shared option types
(``options``) and one way of showing a run (``output``). This entry point imports the commands and
registers them; no command imports it back. User mistakes exit 2 with one message, never a traceback.
"""

from __future__ import annotations

import os

# Before diffusers/transformers are imported: their import-time notices are noise for CLI users.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import sys  # noqa: E402

import typer  # noqa: E402
from rich.markup import escape  # noqa: E402

from ..errors import SisoError  # noqa: E402
from . import bench, convert_ir, edit, generate, push, render, web  # noqa: E402
from .output import console  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="SISO: personalise a text-to-image model from one photo of a subject, at inference time.",
)
app.command("generate")(generate.generate)
app.command("render")(render.render)
app.command("convert-ir")(convert_ir.convert_ir)
app.command("app")(web.web_app)
app.command("bench")(bench.bench)
app.command("edit")(edit.edit)
app.command("push")(push.push)


def main() -> None:
    """Entry point: user errors print one line and exit with the error's code, never a traceback."""
    try:
        app()
    except SisoError as err:
        # The message quotes user paths, which may contain [brackets]: never read it as markup.
        console.print(f"[red]Error:[/] {escape(str(err))}", highlight=False)
        if getattr(err, "end_process", False):
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(err.exit_code)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/]")
        sys.exit(130)
