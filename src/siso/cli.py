"""The command line: thin typed commands over the library; user mistakes exit 2 with one message."""

from __future__ import annotations

import os

# Before diffusers/transformers are imported: their import-time notices are noise for CLI users.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import dataclasses  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated  # noqa: E402

import typer  # noqa: E402
from rich.markup import escape  # noqa: E402

# Shared with the commands in their own modules (see cli_shared's docstring); the old private names stay.
from .cli_shared import (  # noqa: E402, F401
    Device,
    DinoModel,
    Dtype,
    EarlyStopPct,
    IrModel,
    LoraFormat,
    LoraRank,
    MaxSteps,
    Overwrite,
    Resolution,
    Seed,
    Similarity,
    StopSignals,
    announce_device,
    console,
    exit_after_signal,
    ir_model_option,
    lora_formats,
    print_summary,
    run_with_progress,
    similarity_hint,
)
from .cli_shared import quiet_libraries as _quiet_libraries  # noqa: E402
from .cli_shared import split_similarity as _split_similarity  # noqa: E402
from .cli_speed import Compile, LowMemory, announce_speed  # noqa: E402
from .config import DEFAULT_DINO_MODEL, DEFAULT_GENERATION_MODEL, GenerateConfig  # noqa: E402
from .errors import SisoError  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="SISO: personalise a text-to-image model from one photo of a subject, at inference time.",
)


@app.command()
def generate(
    subject: Annotated[list[Path], typer.Option(help="Photo of the subject; repeat for several photos.")],
    prompt: Annotated[str, typer.Option(help='A simple prompt naming the subject, e.g. "a photo of a dog".')],
    out: Annotated[Path, typer.Option(help="Run directory to write (must be new or empty).")],
    model: Annotated[str, typer.Option(help="Hub id or directory of a diffusers SD, SDXL, FLUX or Sana pipeline.")] = (
        DEFAULT_GENERATION_MODEL
    ),
    seed: Seed = 42,
    resolution: Resolution = 512,
    max_steps: MaxSteps = 50,
    lr: Annotated[float | None, typer.Option(
        help="AdamW learning rate (default: the backbone's: SD-Turbo, SDXL-Turbo, FLUX 2e-4; Sana 8e-4).")] = None,
    early_stop_pct: EarlyStopPct = 3.0,
    early_stop_patience: Annotated[
        int | None, typer.Option(help="Stop after this many iterations without one (default: the backbone's: 7; "
                                 "Sana 5).")
    ] = None,
    denoise_steps: Annotated[int | None, typer.Option(
        help="Denoising steps per iteration (default: the backbone's: 1; Sana 20).")] = None,
    grad_steps: Annotated[int | None, typer.Option(
        help="How many final steps carry gradients (default: the backbone's: 1; Sana 3).")] = None,
    lora_rank: LoraRank = 4,
    train_text_encoder: Annotated[bool | None, typer.Option(
        "--train-text-encoder/--no-train-text-encoder",
        help="Also put LoRA on the CLIP text encoder(s) (default: on for SDXL-Turbo and FLUX.1-schnell, as the "
             "paper ran them; off for SD-Turbo; Sana has none).")] = None,
    text_encoder_lr: Annotated[float | None, typer.Option(
        help="Learning rate of the text encoders' LoRA (default: FLUX 5e-6; others the --lr).")] = None,
    low_memory: LowMemory = None,
    compile: Compile = False,
    dino_model: DinoModel = DEFAULT_DINO_MODEL,
    ir_model: IrModel = "auto",
    similarity: Similarity = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    overwrite: Overwrite = False,
    lora_format: LoraFormat = None,
) -> None:
    """Optimise a LoRA so the model's image of PROMPT shows the subject; write images, LoRA and run.json."""
    from .generation import run_generation

    _quiet_libraries()
    formats = lora_formats(lora_format)
    config = GenerateConfig(
        subjects=tuple(subject), prompt=prompt, model=model, seed=seed, resolution=resolution,
        max_steps=max_steps, learning_rate=lr, early_stop_pct=early_stop_pct,
        early_stop_patience=early_stop_patience, denoise_steps=denoise_steps, grad_steps=grad_steps,
        lora_rank=lora_rank, train_text_encoder=train_text_encoder, text_encoder_learning_rate=text_encoder_lr,
        low_memory=low_memory, compile=compile, dino_model=dino_model, ir_model=ir_model_option(ir_model),
        similarity=_split_similarity(similarity), device=device, dtype=dtype, lora_format=formats,
    )
    announce_device(device, dtype)
    similarity_hint(config)
    signals = StopSignals()
    result = run_with_progress(
        lambda **hooks: run_generation(config, out, overwrite=overwrite, **hooks), config.max_steps,
        on_session=announce_speed, signals=signals,
    )
    print_summary(result)
    exit_after_signal(result, signals)


@app.command()
def render(
    model: Annotated[str, typer.Option(help="The model the LoRA was learned on (Hub id or directory).")],
    prompt: Annotated[str, typer.Option(help="Any prompt; name the subject's class, e.g. 'a dog in the snow'.")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")],
    lora: Annotated[Path | None, typer.Option(help="The lora/ directory of a siso run.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the backbone's: 4; Sana 20).")] = None,
    seed: Seed = 42,
    resolution: Resolution = 512,
    device: Device = "auto",
    dtype: Dtype = "auto",
    prompt_tokens: Annotated[int | None, typer.Option(
        help="FLUX/Sana prompt length (default: the pipeline's, FLUX 512, Sana 300); the optimisation used 256, "
             "so 256 with --steps 1 (FLUX) renders its best image again.")] = None,
) -> None:
    """Render PROMPT with a learned LoRA (the second stage: more steps, any prompt)."""
    from .rendering import render as render_image

    _quiet_libraries()
    announce_device(device, dtype)
    with console.status(f"Rendering with {escape(model)}"):
        render_image(model, prompt, lora=lora, out=out, steps=steps, seed=seed, resolution=resolution,
                     device=device, dtype=dtype, prompt_tokens=prompt_tokens)
    console.print(f"[green]Wrote[/] {escape(str(out))}")


@app.command("convert-ir")
def convert_ir(
    checkpoint: Annotated[Path | None, typer.Argument(
        help="The published IR checkpoint (PyTorch pickle, read safely); omit it with --download.")] = None,
    download: Annotated[bool, typer.Option(
        "--download", help="Fetch the checkpoint from Kaggle (louieshao/guieweights0732) with kagglehub first."
    )] = False,
    out: Annotated[Path | None, typer.Option(
        help="Directory to write config.json and model.safetensors into (default: siso's cache, where "
             "--ir-model auto finds it).")] = None,
) -> None:
    """Convert the IR (image retrieval) model once into a safetensors directory: the paper's loss is DINO + IR."""
    from .convert_ir import convert_ir_checkpoint
    from .ir_cache import default_ir_dir, download_ir_checkpoint

    if (checkpoint is None) == (not download):
        raise SisoError("Pass either the CHECKPOINT file or --download (which fetches it from Kaggle), not both.")
    target = out if out is not None else default_ir_dir()
    if checkpoint is None:
        with console.status("Downloading the IR checkpoint from Kaggle (about 2.5 GB)"):
            checkpoint = download_ir_checkpoint()
    with console.status(f"Converting {escape(str(checkpoint))}"):
        written = convert_ir_checkpoint(checkpoint, target)
    usage = "it is used automatically (--ir-model auto)" if out is None else f"use it with --ir-model {written}"
    console.print(f"[green]Wrote[/] {escape(str(written))}; {escape(usage)}.")


@app.command("app")
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
    _quiet_libraries()
    from .app import AppSettings, launch

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
    from .ir_cache import DINO_ONLY_NOTICE, resolve_ir_model

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


# -- commands defined in their own modules (one module per command) ------------------------------
# (each line: from .<module> import <function>; app.command("<name>")(<function>))
from .bench_cli import bench; app.command("bench")(bench)  # noqa: E402, E702, I001
from .edit_cli import edit; app.command("edit")(edit)  # noqa: E402, E702, I001
# -- end of command registrations -------------------------------------------------------------------


def main() -> None:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    try:
        app()
    except SisoError as err:
        # The message quotes user paths, which may contain [brackets]: never read it as markup.
        console.print(f"[red]Error:[/] {escape(str(err))}", highlight=False)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
