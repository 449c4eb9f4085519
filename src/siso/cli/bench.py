"""`siso bench`: measure SISO like the paper, resumably, on one process or a Ray cluster.

A thin typed layer over :func:`siso.eval.run_bench`; heavy imports wait until the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import DEFAULT_DINO_MODEL, DEFAULT_EDITING_MODEL, DEFAULT_GENERATION_MODEL

_DEFAULT_CLIP = "openai/clip-vit-large-patch14"
_DEFAULT_CMMD = "openai/clip-vit-large-patch14-336"
_DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-base"


def bench(
    out: Annotated[Path, typer.Option(help="Benchmark directory; rerun with the same options to resume.")],
    manifest: Annotated[Path | None, typer.Argument(
        help="JSONL manifest, one subject per line: {\"id\", \"class\", \"images\": [...], \"prompts\": [...]} "
             "(editing: \"scene\" instead of prompts).")] = None,
    dreambench: Annotated[Path | None, typer.Option(
        help="Build the generation manifest from the DreamBooth dataset (its dataset/ folder): 30 subjects x 25 "
             "prompts.")] = None,
    task: Annotated[str, typer.Option(help="generate or edit.")] = "generate",
    subjects: Annotated[str | None, typer.Option(help="Comma-separated ids/subjects to run (default: all).")] = None,
    max_prompts: Annotated[int | None, typer.Option(help="Render at most this many prompts per subject.")] = None,
    baseline: Annotated[str, typer.Option(
        help="plain: also render every prompt with the untouched model (same seeds); it is the FID/KID/CMMD "
             "reference set.")] = "none",
    executor: Annotated[str, typer.Option(help="local (this process) or ray (one worker per GPU).")] = "local",
    ray_address: Annotated[str | None, typer.Option(
        help="Existing Ray cluster to join (e.g. auto or ray://head:10001); default: start Ray here.")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Ray workers (default: one per GPU in the cluster; 1 without GPUs).")] = None,
    model: Annotated[str | None, typer.Option(help=(
        f"Hub id or directory of the diffusers pipeline (default: {DEFAULT_GENERATION_MODEL} to generate, "
        f"{DEFAULT_EDITING_MODEL} to edit)."))] = None,
    dino_model: Annotated[str, typer.Option(help="DINOv2 (loss and DINO metric).")] = DEFAULT_DINO_MODEL,
    ir_model: Annotated[str, typer.Option(
        help="IR model directory from `siso convert-ir` (adds the IR loss and metric); auto: the one `siso "
             "convert-ir --download` cached, if any; none: no IR.")] = "auto",
    clip_model: Annotated[str, typer.Option(help="CLIP for CLIP-I and CLIP-T.")] = _DEFAULT_CLIP,
    cmmd_model: Annotated[str, typer.Option(help="CLIP for CMMD.")] = _DEFAULT_CMMD,
    detector_model: Annotated[str, typer.Option(
        help="Grounding DINO that crops images to the subject for DINO/IR/CLIP-I.")] = _DEFAULT_DETECTOR,
    no_crop: Annotated[bool, typer.Option("--no-crop", help="Compare whole images (no Grounding DINO).")] = False,
    fid_features: Annotated[str, typer.Option(
        help="FID/KID features: inception (as in the paper; needs torch-fidelity), dino or clip.")] = "inception",
    inception_weights: Annotated[Path | None, typer.Option(
        help="Local copy of the FID Inception weights (pt_inception-2015-12-05-6726825d.pth).")] = None,
    max_steps: Annotated[int, typer.Option(help="Most optimisation iterations per subject.")] = 50,
    lr: Annotated[float | None, typer.Option(
        help="AdamW learning rate (default: the backbone's to generate, 3e-4 to edit).")] = None,
    resolution: Annotated[int, typer.Option(help="Image side in pixels.")] = 512,
    render_steps: Annotated[int | None, typer.Option(
        help="Denoising steps when rendering the prompts (default: the backbone's, 4).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for optimisation and every render.")] = 42,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32.")] = "auto",
    compile: Annotated[bool | None, typer.Option(
        "--compile/--no-compile",
        help="torch.compile the models (default: on for CUDA GPUs): each worker keeps its models loaded, so the "
             "first item's compile (cached on disk) pays back over the others.")] = None,
    low_memory: Annotated[bool | None, typer.Option(
        "--low-memory/--no-low-memory",
        help="Gradient checkpointing (exact): on, off, or (default) chosen from the GPU's free memory.")] = None,
) -> None:
    """Benchmark SISO on a manifest of subjects: optimise, render every prompt, score, summarise.

    Writes DIR/results.jsonl (one line per finished subject) and DIR/summary.md/.csv.
    """
    from rich.markup import escape

    from ..errors import EXIT_FAILED_ITEMS, SisoError
    from ..eval.manifest import dreambench_items, read_manifest, select
    from ..eval.runner import run_bench
    from ..eval.settings import BenchSettings
    from .options import ir_model_option
    from .output import console, quiet_libraries

    if (manifest is None) == (dreambench is None):
        raise SisoError("Pass either a MANIFEST file or --dreambench PATH (not both).")
    quiet_libraries()
    items = dreambench_items(dreambench) if dreambench is not None else read_manifest(manifest)
    wanted = [s.strip() for s in subjects.split(",") if s.strip()] if subjects else None
    if max_prompts is not None and max_prompts < 1:
        raise SisoError(f"--max-prompts must be >= 1, got {max_prompts}.")
    items = select(items, wanted, max_prompts)
    options = {"model": model, "dino_model": dino_model, "ir_model": ir_model_option(ir_model), "max_steps": max_steps,
               "learning_rate": lr, "resolution": resolution, "seed": seed, "device": device, "dtype": dtype}
    if task == "edit" and not no_crop:
        options["detector_model"] = detector_model  # the same Grounding DINO finds the object to replace
    options = {k: v for k, v in options.items() if v is not None or k == "ir_model"}
    options["compile"] = compile  # None is kept: auto, on for GPUs (the configs' own default is off)
    if low_memory is not None:
        options["low_memory"] = low_memory
    settings = BenchSettings(
        task=task, options=options,
        render_steps=render_steps,
        baseline=baseline, clip_model=clip_model,
        cmmd_model=cmmd_model, detector_model=None if no_crop else detector_model, fid_features=fid_features,
        inception_weights=str(inception_weights) if inception_weights else None,
    )
    if settings.notice:
        console.print(f"[yellow]{escape(settings.notice)}[/]")
    with _RichProgress(console) as progress:
        report = run_bench(items, settings, out, executor=executor, ray_address=ray_address, workers=workers,
                           progress=progress)
    summary = report.summary
    console.print(f"[green]Done[/]: {len(report.done)} subjects run now, {report.skipped} finished earlier, "
                  f"{len(report.failed)} failed.")
    for method in summary["methods"]:
        parts = [f"{name} {stats['mean']:.4f}" for name, stats in summary["overall"][method].items()
                 if isinstance(stats, dict) and stats["mean"] is not None]
        parts += [f"{name} {value:.4f}" for name, value in summary["set_metrics"].get(method, {}).items()
                  if name in ("fid", "kid", "cmmd")]
        console.print(f"  {method}: " + ", ".join(parts))
    console.print(f"  summary: {escape(str(out / 'summary.md'))} (and summary.csv; per item: results.jsonl)")
    if report.failed:
        # Scripts and schedulers must see that the benchmark is incomplete; rerunning retries the failed items.
        console.print(f"[red]{len(report.failed)} item(s) failed[/] (see results.jsonl); rerun the same command to "
                      "retry them.")
        raise typer.Exit(EXIT_FAILED_ITEMS)


class _RichProgress:
    """A rich progress bar with ETA over the benchmark's items; failures are printed as they happen."""

    def __init__(self, console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.status = console.status("Checking the manifest and loading the models")
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
        )
        self.task = None

    def __enter__(self):
        self.status.start()  # transient: gone when the bar appears, or when an error is printed
        return self

    def __exit__(self, *exc):
        self.status.stop()
        if self.task is not None:
            self.progress.stop()

    def started(self, total: int, finished: int, workers: list[dict[str, str]]) -> None:
        from rich.markup import escape

        if finished:
            self.console.print(f"Resuming: {finished} of {total} subjects already finished.")
        if len(workers) > 1:
            self.console.print(f"{len(workers)} workers: " + ", ".join(
                escape(f"{w['host']}:{w['device']}") for w in workers))
        self.status.stop()
        self.progress.start()
        self.task = self.progress.add_task("Benchmarking", total=total, completed=finished)

    def item_done(self, record) -> None:
        from rich.markup import escape

        if record["status"] != "done":
            self.console.print(f"[red]Failed[/] {escape(record['id'])}: {escape(str(record.get('error')))}")
        self.progress.update(self.task, advance=1, description=escape(f"Benchmarking (last: {record['id']})"))

    def item_retry(self, item, error: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]Retrying[/] {escape(item.id)} after: {escape(error)}")
