"""The command line: thin typed commands over the library; user mistakes exit 2 with one message."""

from __future__ import annotations

import os

# Before diffusers/transformers are imported: their import-time notices are noise for CLI users.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import contextlib  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from .config import DEFAULT_DINO_MODEL, DEFAULT_GENERATION_MODEL, GenerateConfig  # noqa: E402
from .errors import SisoError  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="SISO: personalise a text-to-image model from one photo of a subject, at inference time.",
)
console = Console(stderr=True)

Device = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
Dtype = Annotated[str, typer.Option(help="Frozen-weight precision: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.")]
Seed = Annotated[int, typer.Option(help="Seed of the fixed initial noise (as torch.Generator(device).manual_seed).")]
Resolution = Annotated[int, typer.Option(help="Image side in pixels.")]


def _quiet_libraries() -> None:
    """Library download/loading bars would fight with ours; siso reports its own progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    logging.getLogger("torch").setLevel(logging.ERROR)


@contextlib.contextmanager
def _stop_on_ctrl_c(request_stop) -> Iterator[None]:
    """First Ctrl-C: finish this iteration, then save. Second: stop at once (the best is still saved)."""
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if handler.pressed:  # type: ignore[attr-defined]
            raise KeyboardInterrupt
        handler.pressed = True  # type: ignore[attr-defined]
        request_stop()
        console.print("[yellow]Stopping after this iteration; press Ctrl-C again to stop at once.[/]")

    handler.pressed = False  # type: ignore[attr-defined]
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _split_similarity(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


@app.command()
def generate(
    subject: Annotated[list[Path], typer.Option(help="Photo of the subject; repeat for several photos.")],
    prompt: Annotated[str, typer.Option(help='A simple prompt naming the subject, e.g. "a photo of a dog".')],
    out: Annotated[Path, typer.Option(help="Run directory to write (must be new or empty).")],
    model: Annotated[str, typer.Option(help="Hub id or directory of a diffusers SD/SDXL pipeline.")] = (
        DEFAULT_GENERATION_MODEL
    ),
    seed: Seed = 42,
    resolution: Resolution = 512,
    max_steps: Annotated[int, typer.Option(help="Most optimisation iterations.")] = 50,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate [default: the backbone's, 2e-4].")] = None,
    early_stop_pct: Annotated[float, typer.Option(help="An improvement counts when the loss drops by this %.")] = 3.0,
    early_stop_patience: Annotated[
        int | None, typer.Option(help="Stop after this many iterations without one [default: 7].")
    ] = None,
    denoise_steps: Annotated[int | None, typer.Option(help="Denoising steps per iteration [default: 1].")] = None,
    grad_steps: Annotated[int | None, typer.Option(help="How many final steps carry gradients [default: 1].")] = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank (alpha equals it).")] = 4,
    train_text_encoder: Annotated[bool, typer.Option(help="Also put LoRA on the text encoder(s).")] = False,
    dino_model: Annotated[str, typer.Option(help="DINOv2 Hub id or directory.")] = DEFAULT_DINO_MODEL,
    ir_model: Annotated[
        str | None, typer.Option(help="IR model directory made by `siso convert-ir` (adds the IR loss).")
    ] = None,
    similarity: Annotated[
        str | None, typer.Option(help="Comma-separated: dino, ir [default: dino,ir with --ir-model, else dino].")
    ] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    overwrite: Annotated[bool, typer.Option(help="Write into a non-empty --out (siso's files are replaced).")] = False,
    lora_format: Annotated[
        list[str], typer.Option(help="diffusers (always written) and/or kohya (ComfyUI/A1111).")
    ] = ["diffusers"],  # noqa: B006 - typer needs a literal default
) -> None:
    """Optimise a LoRA so the model's image of PROMPT shows the subject; write images, LoRA and run.json."""
    from .generation import run_generation

    _quiet_libraries()
    formats = tuple(dict.fromkeys(["diffusers", *lora_format]))
    config = GenerateConfig(
        subjects=tuple(subject), prompt=prompt, model=model, seed=seed, resolution=resolution,
        max_steps=max_steps, learning_rate=lr, early_stop_pct=early_stop_pct,
        early_stop_patience=early_stop_patience, denoise_steps=denoise_steps, grad_steps=grad_steps,
        lora_rank=lora_rank, train_text_encoder=train_text_encoder, dino_model=dino_model, ir_model=ir_model,
        similarity=_split_similarity(similarity), device=device, dtype=dtype, lora_format=formats,
    )
    if similarity is None and ir_model is None:
        console.print("[dim]Similarity: DINO only. Add the IR loss with --ir-model DIR "
                      "(make DIR once with `siso convert-ir CHECKPOINT --out DIR`).[/]")

    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[losses]}"), TimeElapsedColumn(), console=console, transient=False,
    )
    stack = contextlib.ExitStack()
    with progress, stack:
        task = progress.add_task("Loading", total=config.max_steps, losses="")

        def on_session(session) -> None:
            stack.enter_context(_stop_on_ctrl_c(session.request_stop))
            progress.update(task, description="Optimising", total=session.config.max_steps)

        def on_step(event) -> None:
            parts = [f"{k} {v:.4f}" for k, v in event.losses.items() if k != "step"]
            parts.append(f"best step {event.best_step}")
            progress.update(task, completed=event.step + 1, losses=" | ".join(parts))

        result = run_generation(
            config, out, overwrite=overwrite, on_step=on_step,
            status=lambda message: progress.update(task, description=escape(message)), on_session=on_session,
        )
    reasons = {
        "early_stop": "stopped early (no further improvement)",
        "max_steps": "reached --max-steps",
        "interrupted": "interrupted; the best iteration so far was kept",
        "nan": "stopped: the loss became NaN; the best finite iteration was kept",
    }
    console.print(f"[green]Done[/]: {reasons.get(result.stop_reason, result.stop_reason)}. "
                  f"Best iteration {result.best_step} of {len(result.history)}.")
    console.print(f"  best image: {escape(str(result.run_dir / 'best.png'))}")
    if result.lora_dir is not None:
        console.print(f"  LoRA:       {escape(str(result.lora_dir))}  (diffusers: pipe.load_lora_weights(...))")
    console.print(f"  record:     {escape(str(result.run_dir / 'run.json'))}")


@app.command()
def render(
    model: Annotated[str, typer.Option(help="The model the LoRA was learned on (Hub id or directory).")],
    prompt: Annotated[str, typer.Option(help="Any prompt; name the subject's class, e.g. 'a dog in the snow'.")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")],
    lora: Annotated[Path | None, typer.Option(help="The lora/ directory of a siso run.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps [default: the backbone's, 4].")] = None,
    seed: Seed = 42,
    resolution: Resolution = 512,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Render PROMPT with a learned LoRA (the second stage: more steps, any prompt)."""
    from .rendering import render as render_image

    _quiet_libraries()
    with console.status(f"Rendering with {escape(model)}"):
        render_image(model, prompt, lora=lora, out=out, steps=steps, seed=seed, resolution=resolution,
                     device=device, dtype=dtype)
    console.print(f"[green]Wrote[/] {escape(str(out))}")


@app.command("convert-ir")
def convert_ir(
    checkpoint: Annotated[Path, typer.Argument(help="The published IR checkpoint (PyTorch pickle, read safely).")],
    out: Annotated[Path, typer.Option(help="Directory to write config.json and model.safetensors into.")],
) -> None:
    """Convert the IR (image retrieval) checkpoint once into a safetensors model directory."""
    from .convert_ir import convert_ir_checkpoint

    with console.status(f"Converting {escape(str(checkpoint))}"):
        written = convert_ir_checkpoint(checkpoint, out)
    console.print(f"[green]Wrote[/] {escape(str(written))}; use it with --ir-model {escape(str(written))}")


@app.command("app")
def web_app(
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 exposes the app to your network.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
    model: Annotated[str, typer.Option(help="Default backbone shown in the page.")] = DEFAULT_GENERATION_MODEL,
    dino_model: Annotated[str, typer.Option(help="DINOv2 Hub id or directory.")] = DEFAULT_DINO_MODEL,
    ir_model: Annotated[str | None, typer.Option(help="IR model directory (adds the IR loss).")] = None,
    resolution: Resolution = 512,
    max_steps: Annotated[int, typer.Option(help="Default most iterations.")] = 50,
    device: Device = "auto",
    runs_dir: Annotated[Path, typer.Option(help="Where every run's directory is written.")] = Path("siso-runs"),
    max_upload_mb: Annotated[int, typer.Option(help="Largest accepted upload, in MB.")] = 25,
) -> None:
    """Serve the web app: upload a photo, watch each iteration, stop when it looks right."""
    _quiet_libraries()
    from .app import AppSettings, launch

    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]Serving on {escape(host)}: anyone who can reach this machine can use your GPU.[/]")
    settings = AppSettings(model=model, dino_model=dino_model, ir_model=ir_model, resolution=resolution,
                           max_steps=max_steps, device=device, runs_dir=runs_dir, max_upload_mb=max_upload_mb)
    console.print(f"Serving on http://{escape(host)}:{port}  (runs are written to {escape(str(runs_dir))})")
    launch(settings, host=host, port=port)


# -- commands defined in their own modules (one module per command) ------------------------------
# (each line: from .<module> import <function>; app.command("<name>")(<function>))
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
