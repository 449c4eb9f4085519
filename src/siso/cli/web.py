"""`siso app`: serve the web app (the command is "app"; the module is not, so it cannot shadow the
``siso.cli.app`` Typer object)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..config import DEFAULT_DINO_MODEL, DEFAULT_GENERATION_MODEL
from ..errors import SisoError
from .options import Device, IrModel, Resolution, ir_model_option
from .output import announce_device, console, quiet_libraries


def web_app(
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 exposes the app to your network.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
    model: Annotated[str, typer.Option(help="Default backbone shown in the page.")] = DEFAULT_GENERATION_MODEL,
    dino_model: Annotated[str, typer.Option(help="DINOv2 Hub id or directory.")] = DEFAULT_DINO_MODEL,
    ir_model: IrModel = "auto",
    resolution: Resolution = 512,
    max_steps: Annotated[int, typer.Option(help="Default most iterations.")] = 50,
    device: Device = "auto",
    runs_dir: Annotated[Path, typer.Option(help="Where every run's directory is written.")] = Path("siso-runs"),
    max_upload_mb: Annotated[int, typer.Option(help="Largest accepted upload, in MB.")] = 25,
    compile: Annotated[bool | None, typer.Option(
        "--compile/--no-compile",
        help="torch.compile the models (default: on for CUDA GPUs): the models stay loaded, so the first run's "
             "compile (cached on disk: minutes once per machine, then seconds) pays back over every later run.",
    )] = None,
    max_job_steps: Annotated[int, typer.Option(
        help="Most iterations one job may run (Continue included), so no client holds the GPU queue.")] = 200,
    max_job_minutes: Annotated[float, typer.Option(help="Longest one Start or Continue may run, in minutes.")] = 30.0,
    auth: Annotated[str | None, typer.Option(
        help="USER:PASSWORD that the page asks for (gradio's login); also read from $SISO_APP_AUTH.")] = None,
    model_allowlist: Annotated[str | None, typer.Option(
        help="Comma-separated models (Hub ids or directories) the page may load (default: any on 127.0.0.1; "
             "only --model and the editing model when serving beyond it).")] = None,
) -> None:
    """Serve the web app: upload a photo, watch each iteration, stop when it looks right."""
    quiet_libraries()
    from ..app import AppSettings, launch

    credentials = _parse_auth(auth or os.environ.get("SISO_APP_AUTH"))
    local = host in ("127.0.0.1", "localhost", "::1")
    allowed = tuple(m.strip() for m in model_allowlist.split(",") if m.strip()) if model_allowlist else None
    settings = AppSettings(model=model, dino_model=dino_model, ir_model=ir_model_option(ir_model),
                           resolution=resolution, max_steps=max_steps, device=device, runs_dir=runs_dir,
                           max_upload_mb=max_upload_mb, max_job_steps=max_job_steps, max_job_minutes=max_job_minutes,
                           compile=compile)
    if allowed is None and not local:
        allowed = (settings.model, settings.edit_model)  # clients must not make the server load arbitrary paths
    settings = dataclasses.replace(settings, model_allowlist=allowed)
    if not local:
        login = ("a login is required (--auth)" if credentials else
                 "there is NO login: anyone who can reach it can use your GPU; add one with --auth USER:PASSWORD")
        console.print(f"[yellow]Serving on {escape(host)}: {login}; the page may load only "
                      f"{escape(', '.join(allowed))} (--model-allowlist).[/]")
    announce_device(device, "auto")
    from ..ir_cache import DINO_ONLY_NOTICE, resolve_ir_model

    if resolve_ir_model(settings.ir_model) is None:
        console.print(f"[yellow]{escape(DINO_ONLY_NOTICE)}[/]")
    console.print(f"Serving on http://{escape(host)}:{port}  (runs are written to {escape(str(runs_dir))})")
    launch(settings, host=host, port=port, auth=credentials)


def _parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SisoError("--auth takes USER:PASSWORD (both non-empty).")
    return user, password
