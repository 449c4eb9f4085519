"""`siso app`: serve the web app (the command is "app"; the module is not, so it cannot shadow the
``siso.cli.app`` Typer object). Its options are :class:`siso.app_settings.AppSettings`' knobs plus
where to serve."""

from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..app_settings import AppSettings
from ..errors import SisoError
from .options import command, given, knob_parameters
from .output import announce_device, console, quiet_libraries

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _web_app(
    host: Annotated[str, typer.Option(
        metavar="TEXT", help="Interface to bind; 0.0.0.0 exposes the app to your network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="INT", help="Port to serve on.")] = 7860,
    auth: Annotated[str | None, typer.Option(
        metavar="USER:PASSWORD",
        help="The login the page asks for (gradio's); also read from $SISO_APP_AUTH.")] = None,
    **knobs: Any,
) -> None:
    """Serve the web app: upload a photo, watch each iteration, stop when it looks right."""
    quiet_libraries()
    from ..app import launch
    from ..ir_cache import DINO_ONLY_NOTICE, resolve_ir_model

    credentials = _parse_auth(auth or os.environ.get("SISO_APP_AUTH"))
    settings = AppSettings(**given(AppSettings, knobs))
    local = host in LOOPBACK
    if settings.model_allowlist is None and not local:
        # clients must not make the server load arbitrary paths
        settings = dataclasses.replace(settings, model_allowlist=(settings.model, settings.edit_model))
    if not local:
        login = ("a login is required (--auth)" if credentials else
                 "there is NO login: anyone who can reach it can use your GPU; add one with --auth USER:PASSWORD")
        console.print(f"[yellow]Serving on {escape(host)}: {login}; the page may load only "
                      f"{escape(', '.join(settings.model_allowlist))} (--model-allowlist).[/]")
    announce_device(settings.device, "auto")
    if resolve_ir_model(settings.ir_model) is None:
        console.print(f"[yellow]{escape(DINO_ONLY_NOTICE)}[/]")
    console.print(f"Serving on http://{escape(host)}:{port}  (runs are written to {escape(str(settings.runs_dir))})")
    launch(settings, host=host, port=port, auth=credentials)


def _parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SisoError("--auth takes USER:PASSWORD (both non-empty).")
    return user, password


web_app = command(_web_app, knob_parameters(AppSettings))
