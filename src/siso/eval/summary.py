"""summary.md and summary.csv from results.jsonl: mean and standard error of every metric, overall
and per subject, the set metrics (FID, KID, CMMD) over all images, and the cost per subject.

Everything here is recomputed from the committed records, so a summary is always consistent
with results.jsonl, however often the run was interrupted and resumed.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_path
from .results import SETTINGS_FILE, latest_results
from .worker import FEATURES_FILE, PER_IMAGE_METRICS

LABELS = {"dino": "DINO", "ir": "IR", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "diversity": "Diversity (MSE)",
          "lpips": "BG-LPIPS", "fid": "FID", "kid": "KID", "cmmd": "CMMD"}
# The metric classes' higher_is_better flags (a test keeps the two in step).
HIGHER_IS_BETTER = {"dino": True, "ir": True, "clip_i": True, "clip_t": True, "diversity": True, "lpips": False,
                    "fid": False, "kid": False, "cmmd": False}
SET_METRICS = ("fid", "kid", "cmmd")
MEMORY_KINDS = {
    "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated during the item",
    "process_peak_rss": "the worker process's peak resident memory (RSS) so far; no GPU was used",
    "unavailable": "not measurable on this platform",
}
GIB = 1024**3


def mean_sem(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n))."""
    n = len(values)
    if n == 0:
        return None, None, 0
    mean = sum(values) / n
    if n == 1:
        return mean, None, 1
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n), n


def _stats(values: Sequence[float]) -> dict[str, Any]:
    mean, sem, n = mean_sem(values)
    return {"mean": mean, "sem": sem, "n": n}


def _methods(records: Sequence[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for record in records:
        for image in record.get("images", []):
            seen.setdefault(image["method"], None)
    return list(seen)


def _metric_names(records: Sequence[dict]) -> list[str]:
    present = {name for r in records for image in r.get("images", []) for name in image["metrics"]}
    return [name for name in PER_IMAGE_METRICS if name in present]


def _per_image(records: Sequence[dict], method: str, metric: str) -> list[float]:
    return [image["metrics"][metric] for r in records for image in r.get("images", [])
            if image["method"] == method and metric in image["metrics"]]


def _set_metrics(out_dir: Path, records: Sequence[dict], methods: Sequence[str],
                 settings: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], str | None]:
    """FID, KID (with its std over subsets) and CMMD of each method against the reference set."""
    if settings.get("task") == "edit":
        reference = "reference"
    elif settings.get("baseline") == "plain":
        reference = "plain"
    else:
        return {}, "FID, KID and CMMD need a reference set: rerun with --baseline plain (the untouched model's images)."
    from safetensors.torch import load_file

    features: dict[str, list] = {}
    for record in records:
        if record.get("features"):
            for key, value in load_file(str(out_dir / "items" / record["id"] / FEATURES_FILE)).items():
                features.setdefault(key, []).append(value)
    import torch

    from .distribution import CMMD, FID, KID, Precomputed

    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method == reference:
            continue
        values: dict[str, Any] = {}
        try:
            real, fake = torch.cat(features[f"{reference}.fid"]), torch.cat(features[f"{method}.fid"])
            fid = FID(feature=Precomputed(real.shape[1]))
            fid.update(real, real=True)
            fid.update(fake, real=False)
            values["fid"] = float(fid.compute())
            kid = KID(feature=Precomputed(real.shape[1]))
            kid.update(real, real=True)
            kid.update(fake, real=False)
            kid_mean, kid_std = kid.compute_with_std()
            values["kid"], values["kid_std"] = float(kid_mean), float(kid_std)
            real, fake = torch.cat(features[f"{reference}.cmmd"]), torch.cat(features[f"{method}.cmmd"])
            cmmd = CMMD(Precomputed(real.shape[1]))
            cmmd.update(real, real=True)
            cmmd.update(fake, real=False)
            values["cmmd"] = float(cmmd.compute())
        except (KeyError, RuntimeError, ValueError) as err:
            values["error"] = f"{type(err).__name__}: {err}"
        values["reference"] = reference
        results[method] = values
    return results, None


def summarise(out_dir: str | Path) -> dict[str, Any]:

    out_dir = Path(out_dir)
    try:
        settings = json.loads((out_dir / SETTINGS_FILE).read_text())["settings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        settings = {}
    latest = latest_results(out_dir)
    done = [r for r in latest.values() if r.get("status") == "done"]
    failed = [r for r in latest.values() if r.get("status") != "done"]
    methods = _methods(done)
    metrics = _metric_names(done)
    overall = {m: {name: _stats(_per_image(done, m, name)) for name in metrics} for m in methods}
    for m in methods:
        overall[m]["images"] = sum(1 for r in done for image in r.get("images", []) if image["method"] == m)
    subjects: dict[str, dict[str, Any]] = {}
    for subject in dict.fromkeys(r.get("subject") or r["id"] for r in done):
        mine = [r for r in done if (r.get("subject") or r["id"]) == subject]
        subjects[subject] = {
            "items": [r["id"] for r in mine],
            "seconds": sum(r["seconds"] for r in mine),
            "peak_memory_bytes": max(r.get("peak_memory_bytes", 0) for r in mine),
            "methods": {m: {**{name: _stats(_per_image(mine, m, name)) for name in metrics},
                            "images": sum(1 for r in mine for i in r.get("images", []) if i["method"] == m)}
                        for m in methods},
        }
    set_metrics, set_note = _set_metrics(out_dir, done, methods, settings) if done else ({}, None)
    seconds = [s["seconds"] for s in subjects.values()]
    run = _throughput(latest, done, settings)
    memory_kinds = sorted({r.get("memory", "unavailable") for r in done})
    return {
        "settings": settings, "methods": methods, "metrics": metrics, "overall": overall, "set_metrics": set_metrics,
        "set_metrics_note": set_note, "subjects": subjects, "failed": {r["id"]: r.get("error") for r in failed},
        "cost": {"seconds_per_subject": _stats(seconds), "total_seconds": sum(seconds),
                 "peak_memory_bytes": max((s["peak_memory_bytes"] for s in subjects.values()), default=0),
                 "memory": memory_kinds},
        "run": run,
    }


def _throughput(latest: dict[str, dict], done: Sequence[dict], settings: dict[str, Any]) -> dict[str, Any]:
    """Items done and failed, items per hour over the wall time the finished items span (a pause
    between a killed run and its resume included), and what each worker did."""
    timed = [r for r in done if isinstance(r.get("finished_at"), int | float)]
    wall = (max(r["finished_at"] for r in timed) - min(r["finished_at"] - r["seconds"] for r in timed)) if timed \
        else None
    workers: dict[str, dict[str, Any]] = {}
    for record in done:
        place = record.get("worker") or {}
        key = "/".join(str(place.get(k, "?")) for k in ("node", "host", "pid", "device") if k in place) or "?"
        entry = workers.setdefault(key, {**{k: str(v) for k, v in place.items()}, "items": 0, "seconds": 0.0})
        entry["items"] += 1
        entry["seconds"] += float(record.get("seconds", 0.0))
    return {
        "done": len(done), "failed": len(latest) - len(done),
        "workers_lost": sum(int(r.get("workers_lost") or 0) for r in latest.values()),
        "wall_seconds": wall, "items_per_hour": len(timed) / wall * 3600 if wall else None,
        "workers": list(workers.values()),
    }


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _pm(stats: dict[str, Any], digits: int = 4) -> str:
    if stats["mean"] is None:
        return "–"
    return _fmt(stats["mean"], digits) + (f" ± {_fmt(stats['sem'], digits)}" if stats["sem"] is not None else "")


def _csv(summary: dict[str, Any]) -> str:
    metrics = summary["metrics"]
    header = ["scope", "subject", "method", "images"]
    for name in metrics:
        header += [name, f"{name}_sem"]
    header += ["fid", "kid", "kid_std", "cmmd", "seconds", "seconds_sem", "peak_memory_gib"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    cost = summary["cost"]
    for method in summary["methods"]:
        row: list[Any] = ["overall", "", method, summary["overall"][method]["images"]]
        for name in metrics:
            stats = summary["overall"][method][name]
            row += [_num(stats["mean"]), _num(stats["sem"])]
        sets = summary["set_metrics"].get(method, {})
        row += [_num(sets.get(k)) for k in ("fid", "kid", "kid_std", "cmmd")]
        row += [_num(cost["seconds_per_subject"]["mean"]), _num(cost["seconds_per_subject"]["sem"]),
                _num(cost["peak_memory_bytes"] / GIB)]
        writer.writerow(row)
    for subject, info in summary["subjects"].items():
        for method in summary["methods"]:
            stats_by_name = info["methods"][method]
            row = ["subject", subject, method, stats_by_name["images"]]
            for name in metrics:
                row += [_num(stats_by_name[name]["mean"]), _num(stats_by_name[name]["sem"])]
            row += ["", "", "", "", _num(info["seconds"]), "", _num(info["peak_memory_bytes"] / GIB)]
            writer.writerow(row)
    return buffer.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _label(name: str) -> str:
    return f"{LABELS.get(name, name)} {'↑' if HIGHER_IS_BETTER.get(name, True) else '↓'}"


def _markdown(summary: dict[str, Any]) -> str:
    settings = summary["settings"]
    options = settings.get("run", {})
    metrics, methods = summary["metrics"], summary["methods"]
    lines = [f"# siso bench: {settings.get('task', '?')}", ""]
    lines.append(f"- model: `{options.get('model', '?')}`, seed {options.get('seed', '?')}, "
                 f"resolution {options.get('resolution', '?')}, at most {options.get('max_steps', '?')} iterations")
    lines.append(f"- subjects finished: {len(summary['subjects'])}; items failed: {len(summary['failed'])}")
    detector = settings.get("crop_model")
    compared = f"both images cropped to the subject by `{detector}`" if detector else "whole images (no cropping)"
    lines.append(f"- identity metrics (DINO, IR, CLIP-I) compare {compared}")
    lines.append(f"- CLIP: `{settings.get('clip_model')}`; CMMD: `{settings.get('cmmd_model')}`; "
                 f"FID/KID features: {settings.get('fid_features')}")
    lines += ["", "## Overall", "", "Mean ± standard error over images; FID, KID (± std over subsets) and CMMD over "
              "all images against the reference set.", ""]
    columns = ["method", "images", *[_label(n) for n in metrics], *[_label(n) for n in SET_METRICS]]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for method in methods:
        sets = summary["set_metrics"].get(method, {})
        kid = _fmt(sets.get("kid"), 5) + (f" ± {_fmt(sets.get('kid_std'), 5)}" if sets.get("kid_std") is not None
                                           else "")
        cells = [method, str(summary["overall"][method]["images"]),
                 *[_pm(summary["overall"][method][n]) for n in metrics],
                 _fmt(sets.get("fid"), 2) or "–", kid or "–", _fmt(sets.get("cmmd"), 4) or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["set_metrics_note"]:
        lines += ["", summary["set_metrics_note"]]
    for method, sets in summary["set_metrics"].items():
        if sets.get("error"):
            lines += ["", f"Set metrics of {method} could not be computed: {sets['error']}"]
    cost = summary["cost"]
    kinds = "; ".join(MEMORY_KINDS.get(k, k) for k in cost["memory"]) or "–"
    lines += ["", "## Cost", "",
              f"- seconds per subject (optimise, render, evaluate): {_pm(cost['seconds_per_subject'], 1)}; "
              f"total {cost['total_seconds']:.1f} s",
              f"- peak memory: {cost['peak_memory_bytes'] / GIB:.2f} GiB ({kinds})", ""]
    run = summary["run"]
    per_hour = f"{run['items_per_hour']:.1f} items per hour over {run['wall_seconds']:.0f} s of wall time" \
        if run["items_per_hour"] else "–"
    lines += ["## Run", "",
              f"- items done: {run['done']}, failed: {run['failed']}; workers lost under an item (it ran again): "
              f"{run['workers_lost']}",
              f"- throughput: {per_hour}", "",
              "| worker | host | device | items | seconds per item |", "|---|---|---|---|---|"]
    for number, worker in enumerate(run["workers"], 1):
        name = f"node {worker['node']}" if "node" in worker else f"process {worker.get('pid', '?')}"
        lines.append(f"| {number}: {name} | {worker.get('host', '?')} | {worker.get('device', '?')} | "
                     f"{worker['items']} | {worker['seconds'] / worker['items']:.1f} |")
    lines += ["", "## Per subject", ""]
    columns = ["subject", "method", "images", *[_label(n) for n in metrics], "seconds", "peak memory (GiB)"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for subject, info in summary["subjects"].items():
        for method in methods:
            stats = info["methods"][method]
            lines.append("| " + " | ".join([subject, method, str(stats["images"]), *[_pm(stats[n]) for n in metrics],
                                            f"{info['seconds']:.1f}", f"{info['peak_memory_bytes'] / GIB:.2f}"]) + " |")
    if summary["failed"]:
        lines += ["", "## Failed items", ""]
        lines += [f"- {item}: {error}" for item, error in summary["failed"].items()]
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | Path) -> dict[str, Any]:
    out_dir = Path(out_dir)
    summary = summarise(out_dir)
    with atomic_path(out_dir / "summary.csv") as tmp:
        tmp.write_text(_csv(summary))
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text(_markdown(summary))
    return summary
