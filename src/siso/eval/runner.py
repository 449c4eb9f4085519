"""The benchmark driver: resumable, streaming, executor-agnostic.

Layout of the benchmark directory::

    DIR/bench.json            the settings (a rerun must match them), library versions
    DIR/manifest.jsonl        the items of the latest run
    DIR/items/<id>/           one item's outputs: run/ (the optimisation), images/<method>/NN.png,
                              features.safetensors (for FID/KID/CMMD), result.json (written last)
    DIR/results.jsonl         one line per finished (or failed) item, in completion order
    DIR/summary.md, .csv      means and standard errors, overall and per subject

An item is finished when its result.json says "done": the driver writes it atomically after the
worker returns, then appends the same record to results.jsonl. A rerun skips finished items and
redoes everything else from scratch (the worker clears the item's folder first), so killing a
run at any moment loses at most the items in progress. A failed item is retried once, then
recorded as failed; a rerun tries it again. An item whose worker is lost under it (a node gone, a
process killed) runs again elsewhere without using up that retry.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import SisoError
from ..files import check_name_lengths, write_json
from ..knobs import knobs
from ..locks import LOCK_FILE, DirectoryLock, check_not_locked, lock_directory, only_the_lock
from ..run_directory import check_writable, library_versions
from .executors import make_executor
from .manifest import BenchItem, write_manifest
from .results import RESULT_FILE, RESULTS_FILE, SETTINGS_FILE, append_result, read_results
from .settings import BenchSettings, ExecutorSettings
from .worker import check_task

MAX_ATTEMPTS = 2  # a failed item is retried once
# A lost worker (its node gone, its process killed) is not the item's failure: the item runs again
# without using up its retry. An item whose worker dies this many times is likely what kills it (out
# of memory), and from then on counts as failing.
MAX_WORKER_LOSSES = 3


class BenchProgress(Protocol):
    def started(self, total: int, finished: int, workers: list[dict[str, str]]) -> None: ...

    def item_done(self, record: dict[str, Any]) -> None: ...

    def item_retry(self, item: BenchItem, error: str) -> None: ...

    def item_requeued(self, item: BenchItem, error: str) -> None: ...

    def note(self, message: str) -> None: ...


class _Silent:
    def started(self, total, finished, workers):
        pass

    def item_done(self, record):
        pass

    def item_retry(self, item, error):
        pass

    def item_requeued(self, item, error):
        pass

    def note(self, message):
        pass


@dataclass
class BenchReport:
    out_dir: Path
    total: int
    skipped: int  # finished by an earlier run
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _read_result_file(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _reconcile(out_dir: Path) -> None:
    """Make results.jsonl agree with the committed result.json files after a killed run.

    A cut-off last line is dropped; an item committed just before the kill, but not yet listed,
    is appended.
    """
    path = out_dir / RESULTS_FILE
    text = path.read_text() if path.is_file() else ""
    records = read_results(out_dir)
    if text and (not text.endswith("\n") or len(records) != len(text.splitlines())):
        from ..files import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    listed = {r["id"] for r in records if r.get("status") == "done"}
    items_dir = out_dir / "items"
    if items_dir.is_dir():
        for folder in sorted(items_dir.iterdir()):
            record = _read_result_file(folder / RESULT_FILE)
            if record and record.get("status") == "done" and record.get("id") not in listed:
                append_result(out_dir, record)


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append((f"{prefix}{key}", a, b))
    return keys


def _spelled(path: str, settings: BenchSettings) -> str:
    """A bench.json key as the user types it: ``run.max_steps`` -> ``--max-steps``."""
    owner, _, name = path.rpartition(".")
    specs = knobs(type(settings.run)) if owner == "run" else knobs(BenchSettings) if not owner else {}
    return specs[name].option if name in specs else path


def _check_settings(out_dir: Path, settings: BenchSettings) -> None:
    path = out_dir / SETTINGS_FILE
    wanted = json.loads(json.dumps(settings.to_record(), default=str))
    if path.is_file():
        try:
            stored = json.loads(path.read_text()).get("settings")
        except (OSError, json.JSONDecodeError, AttributeError):
            stored = None
        if stored is not None and stored != wanted:
            changes = [f"{_spelled(key, settings)} {a!r} -> {b!r}" for key, a, b in _differences(stored, wanted)]
            raise SisoError(
                f"--out {out_dir} holds a benchmark run with different settings ({'; '.join(changes)}); "
                "rerun with the same options to resume it, or choose a new --out."
            )
        if stored is not None:
            return
    write_json({"settings": wanted, "versions": library_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
               path)


def _finished(out_dir: Path, items: Sequence[BenchItem]) -> set[str]:
    finished = set()
    for item in items:
        record = _read_result_file(out_dir / "items" / item.id / RESULT_FILE)
        if not record or record.get("status") != "done":
            continue
        if record.get("item") != json.loads(json.dumps(item.to_record())):
            raise SisoError(
                f"Item {item.id} in {out_dir} was finished with different inputs (photos, class or prompts) than "
                "the manifest now gives; choose a new --out for the changed manifest."
            )
        finished.add(item.id)
    return finished


def _check_items(items: Sequence[BenchItem], task: str) -> None:
    for item in items:
        if task == "generate" and not item.prompts:
            raise SisoError(f'Item {item.id} has no "prompts"; --task generate renders each of them.')
        if task == "edit" and item.scene is None:
            raise SisoError(f'Item {item.id} has no "scene" (the image to edit); --task edit needs one per item.')
        paths = (item.subject_photo, item.scene, item.scene_mask)
        missing = [str(p) for p in paths if p is not None and not Path(p).is_file()]
        if missing:
            raise SisoError(f"Item {item.id}: {', '.join(missing)} does not exist.")


def run_bench(items: Sequence[BenchItem], settings: BenchSettings, out: str | Path, *,
              executor: ExecutorSettings | None = None, progress: BenchProgress | None = None,
              overwrite: bool = False) -> BenchReport:
    """Run (or resume) the benchmark of ``items`` into ``out`` (on ``executor``: local by default) and
    write its summary; ``overwrite`` starts an earlier siso benchmark there afresh."""
    from ._deps import require

    progress = progress or _Silent()
    require("torchmetrics", "siso bench")
    check_task(settings.task)
    _check_items(items, settings.task)
    if settings.has_reference_set and settings.fid_features == "inception":
        require("torch_fidelity", "FID/KID with --fid-features inception (Inception-v3)")
    from ..sources import check_source

    for source, flag in settings.model_sources():  # a missing path, or an unreachable Hub, before any worker
        check_source(source, flag)
    out_dir = Path(out)
    lock = prepare_bench_dir(out_dir, overwrite)
    try:
        return _run_locked(items, settings, out_dir, executor, progress)
    finally:
        lock.release()


def is_siso_bench(directory: Path) -> bool:
    """Whether ``directory`` holds a siso benchmark: a bench.json that siso wrote (it has the settings)."""
    try:
        record = json.loads((directory / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("settings"), dict)


def prepare_bench_dir(out_dir: Path, overwrite: bool) -> DirectoryLock:
    """The benchmark directory, locked for this process: new, empty, or a siso benchmark (resumed, or with
    ``overwrite`` started afresh); never a directory of the user's own files, nor one another process writes."""
    check_name_lengths(out_dir, "--out")
    if out_dir.exists() and not out_dir.is_dir():
        raise SisoError(f"--out {out_dir} is a file; pass a directory for the benchmark.")
    if out_dir.is_dir():
        check_not_locked(out_dir)
        if not only_the_lock(out_dir) and not is_siso_bench(out_dir):
            raise SisoError(f"--out {out_dir} is not empty and is not a siso benchmark (it has no siso "
                            f"{SETTINGS_FILE}); siso bench writes and resumes only its own directories. Choose a new "
                            "directory.")
    check_writable(out_dir)  # only once it is siso's to write: a refused directory gets no write test
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_directory(out_dir)
    if overwrite and not only_the_lock(out_dir):
        # The old benchmark's files, not the lock this process holds; bench.json last, so a run killed
        # half-way leaves a directory that is still a siso benchmark (and --overwrite finishes the job).
        for entry in sorted(out_dir.iterdir(), key=lambda e: e.name == SETTINGS_FILE):
            if entry.name != LOCK_FILE:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return lock


def _run_locked(items: Sequence[BenchItem], settings: BenchSettings, out_dir: Path,
                executor: ExecutorSettings | None, progress: BenchProgress) -> BenchReport:
    from .summary import write_summary

    _check_settings(out_dir, settings)
    _reconcile(out_dir)
    finished = _finished(out_dir, items)
    write_manifest(items, out_dir / "manifest.jsonl")
    todo = [item for item in items if item.id not in finished]
    report = BenchReport(out_dir=out_dir, total=len(items), skipped=len(finished))
    if todo:
        runner = make_executor(executor or ExecutorSettings(), settings, out_dir, progress.note)
        try:
            described = runner.start()
            progress.started(len(items), len(finished), described)
            attempts = {item.id: 1 for item in todo}
            losses = {item.id: 0 for item in todo}
            for item in todo:
                runner.submit(item)
            while runner.pending():
                outcome = runner.next_outcome()
                item = outcome.item
                if outcome.lost_worker:
                    losses[item.id] += 1
                    if losses[item.id] < MAX_WORKER_LOSSES:
                        progress.item_requeued(item, outcome.error or "the worker was lost")
                        runner.submit(item)
                        continue
                if outcome.record is None and attempts[item.id] < MAX_ATTEMPTS:
                    progress.item_retry(item, outcome.error or "unknown error")
                    attempts[item.id] += 1
                    runner.submit(item)
                    continue
                record = outcome.record or {
                    "id": item.id, "subject": item.subject, "class": item.class_name, "status": "failed",
                    "error": outcome.error, "item": item.to_record(),
                }
                record["attempts"] = attempts[item.id]
                record["workers_lost"] = losses[item.id]
                record["finished_at"] = round(time.time(), 3)  # for items per hour across a run's workers
                write_json(record, out_dir / "items" / item.id / RESULT_FILE)
                append_result(out_dir, record)
                (report.done if record["status"] == "done" else report.failed).append(item.id)
                progress.item_done(record)
        finally:
            runner.close()
    else:
        progress.started(len(items), len(finished), [])
    report.summary = write_summary(out_dir)
    return report
