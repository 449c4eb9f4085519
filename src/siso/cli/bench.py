"""`siso bench`: measure SISO like the paper, resumably, on one process or a Ray cluster.

A thin layer over :func:`siso.eval.run_bench`. Its options are derived from the benchmark's settings
(:class:`siso.eval.settings.BenchSettings`, :class:`~siso.eval.settings.ExecutorSettings`) and from
both tasks' run knobs (:class:`siso.config.GenerateSettings`, :class:`~siso.config.EditSettings`):
a knob of one task given with the other ``--task`` is refused. Heavy imports wait until it runs.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import EditSettings, GenerateSettings, RunSettings
from ..eval.settings import RUN_SETTINGS, BenchSettings, ExecutorSettings
from ..knobs import knobs
from .options import command, default_text, given, knob_parameter, knob_parameters

PANELS = {"generate": "Run knobs, --task generate", "edit": "Run knobs, --task edit"}


def _run_parameters() -> list[inspect.Parameter]:
    """Every run knob of either task, once: shared knobs whose defaults differ by task say both."""
    shared, generate, edit = knobs(RunSettings), knobs(GenerateSettings), knobs(EditSettings)
    every = {**generate, **edit}
    parameters = []
    for name, spec in every.items():
        if not spec.cli:
            continue
        fallback = every[spec.fallback].option if spec.fallback else None
        if name in shared:
            texts = {task: default_text(specs[name], long_lived=True) for task, specs in
                     (("generate", generate), ("edit", edit))}
            if texts["generate"] != texts["edit"]:
                spec = _with_help(spec, f"{shared[name].help} [default: --task generate: {texts['generate']}; "
                                        f"--task edit: {texts['edit']}]")
            parameters.append(knob_parameter(spec, long_lived=True, panel="Run knobs, both tasks"))
        else:
            task = "generate" if name in generate else "edit"
            parameters.append(knob_parameter(spec, long_lived=True, panel=PANELS[task], fallback=fallback))
    return parameters


def _with_help(spec, help_with_default: str):
    """``spec`` whose help already states its default (a Knob with no default of its own to show)."""
    from dataclasses import MISSING, replace

    return replace(spec, help=help_with_default, default=None, preset=None, long_lived=MISSING)


def _bench(
    out: Annotated[Path, typer.Option(metavar="PATH",
                                      help="Benchmark directory; rerun with the same options to resume.")],
    manifest: Annotated[Path | None, typer.Argument(
        metavar="MANIFEST",
        help="JSONL manifest, one subject per line: {\"id\", \"class\", \"images\": [...], \"prompts\": [...]} "
             "(editing: \"scene\" instead of prompts).")] = None,
    dreambench: Annotated[Path | None, typer.Option(
        metavar="PATH", help="Build the generation manifest from the DreamBooth dataset (its dataset/ folder): 30 "
                             "subjects x 25 prompts.")] = None,
    subjects: Annotated[str | None, typer.Option(
        metavar="A,B", help="Comma-separated ids/subjects to run (unset: all).")] = None,
    max_prompts: Annotated[int | None, typer.Option(
        metavar="INT", help="Render at most this many prompts per subject.")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Start an earlier siso benchmark in --out afresh instead of resuming it (siso never replaces a "
             "directory of your own files).")] = False,
    **values: Any,
) -> None:
    """Benchmark SISO on a manifest of subjects: optimise, render every prompt, score, summarise.

    Writes DIR/results.jsonl (one line per finished subject) and DIR/summary.md/.csv.
    """
    from rich.markup import escape

    from ..errors import EXIT_FAILED_ITEMS, SisoError
    from ..eval.manifest import dreambench_items, read_manifest, select
    from ..eval.runner import run_bench
    from .output import console, quiet_libraries

    if (manifest is None) == (dreambench is None):
        raise SisoError("Pass either a MANIFEST file or --dreambench PATH (not both).")
    bench = given(BenchSettings, values)
    task = bench.get("task", "generate")
    other = "edit" if task == "generate" else "generate"
    stray = [name for name in given(RUN_SETTINGS[other], values) if name not in knobs(RUN_SETTINGS[task])]
    if stray:
        flags = ", ".join(RUN_SETTINGS[other].flag(name) for name in stray)
        raise SisoError(f"{flags} applies to --task {other}; this benchmark runs --task {task}.")
    run = RUN_SETTINGS[task](**given(RUN_SETTINGS[task], values, long_lived=True))
    settings = BenchSettings(run=run, **bench)
    executor = ExecutorSettings(**given(ExecutorSettings, values))
    quiet_libraries()
    items = dreambench_items(dreambench) if dreambench is not None else read_manifest(manifest)
    wanted = [s.strip() for s in subjects.split(",") if s.strip()] if subjects else None
    if max_prompts is not None and max_prompts < 1:
        raise SisoError(f"--max-prompts must be >= 1, got {max_prompts}.")
    items = select(items, wanted, max_prompts)
    if settings.notice:
        console.print(f"[yellow]{escape(settings.notice)}[/]")
    with _RichProgress(console) as progress:
        report = run_bench(items, settings, out, executor=executor, progress=progress, overwrite=overwrite)
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
    """A rich progress bar over the benchmark's items (done of total, failed, items per hour, ETA); failures,
    retries and what happens to the workers are printed as they happen."""

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
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console,
        )
        self.task = None
        self.failed = 0
        self.done_now = 0  # by this run (a resumed run's earlier items do not count toward its speed)
        self.since = time.monotonic()

    def __enter__(self):
        self.status.start()  # transient: gone when the bar appears, or when an error is printed
        return self

    def __exit__(self, *_exc_info):
        self.status.stop()
        if self.task is not None:
            self.progress.stop()

    def started(self, total: int, finished: int, workers: list[dict[str, str]]) -> None:
        from rich.markup import escape

        if finished:
            self.console.print(f"Resuming: {finished} of {total} subjects already finished.")
        if len(workers) > 1 or any("node" in w for w in workers):
            self.console.print(f"{len(workers)} worker(s): " + ", ".join(escape(where(w)) for w in workers))
        self.status.stop()
        self.progress.start()
        self.since = time.monotonic()
        self.task = self.progress.add_task("Benchmarking", total=total, completed=finished, rate="")

    def item_done(self, record) -> None:
        from rich.markup import escape

        self.done_now += 1
        if record["status"] != "done":
            self.failed += 1
            self.console.print(f"[red]Failed[/] {escape(record['id'])}: {escape(str(record.get('error')))}")
        failed = f", {self.failed} failed" if self.failed else ""
        per_hour = self.done_now / max(time.monotonic() - self.since, 1e-9) * 3600
        self.progress.update(self.task, advance=1, rate=f"{per_hour:.0f} items/h",
                             description=escape(f"Benchmarking (last: {record['id']}{failed})"))

    def item_retry(self, item, error: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]Retrying[/] {escape(item.id)} after: {escape(error)}")

    def item_requeued(self, item, error: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]Running {escape(item.id)} again[/] on another worker (a lost worker is not the "
                           f"item's failure): {escape(error)}")

    def note(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(escape(message))


def where(worker: dict[str, str]) -> str:
    """``node 1a2b3c4d on host (cuda:0)``, or ``host:cuda:0`` outside Ray."""
    if "node" in worker:
        return f"node {worker['node']} on {worker['host']} ({worker['device']})"
    return f"{worker['host']}:{worker['device']}"


bench = command(_bench, knob_parameters(BenchSettings, exclude=("run",)), knob_parameters(ExecutorSettings),
                _run_parameters())
