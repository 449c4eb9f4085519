"""One benchmark worker: runs items one at a time, keeping every model loaded between them.

The local executor holds one; the Ray executor runs one per GPU as an actor. An item's task
function (:data:`TASK_RUNNERS`: generate, edit) produces images as :class:`ItemOutputs`;
:meth:`ItemWorker.evaluate` scores them the same way for every task. A new task is one more
function there.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..devices import resolve_device, resolve_dtype
from ..errors import SisoError
from ..files import atomic_path, write_png
from ..images import load_image, pil_to_tensor, working_copy
from ..models import ModelCache
from .manifest import BenchItem
from .settings import BenchSettings

PER_IMAGE_METRICS = ("dino", "ir", "clip_i", "clip_t", "diversity", "lpips")
FEATURES_FILE = "features.safetensors"


@dataclass
class MethodImages:
    """The images one method made for an item, in prompt order."""

    prompts: list[str] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # (1, 3, H, W) in [0, 1], as saved
    paths: list[str] = field(default_factory=list)  # relative to the benchmark directory


@dataclass
class ItemOutputs:
    """What a task function hands to the evaluation.

    ``reference``: the item's share of the naturalness reference set (editing: its input scene);
    for generation it is None and the "plain" method's images are the reference.
    ``scenes`` and ``subject_masks`` (editing): LPIPS is measured between each output and its
    scene outside the mask of the replaced object.
    """

    methods: dict[str, MethodImages]
    subject: torch.Tensor  # (1, 3, H, W): the photo the identity metrics compare with
    reference: list[torch.Tensor] | None = None
    scenes: list[torch.Tensor] | None = None
    subject_masks: list[torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)


TaskRunner = Callable[["ItemWorker", BenchItem, Path], ItemOutputs]


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory of this item on CUDA, else this process's peak resident set size (since it started)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return 0, "unavailable"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024), "process_peak_rss"


def ray_node_id() -> str | None:
    """The Ray node this process runs on (its id's first 8 hex digits, as `ray status` shows), or None
    outside Ray: a catalogue run's records say which node made each item."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()[:8]


class ItemWorker:
    def __init__(self, settings: BenchSettings, out_dir: str | Path) -> None:
        self.settings = settings
        self.out = Path(out_dir)
        self.cache = ModelCache()
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self._models: dict[str, Any] = {}

    # -- models, loaded once per worker ---------------------------------------------------------
    def warm_up(self) -> dict[str, str]:
        """Load the evaluation models now, so a wrong model path fails before any item runs."""
        self.metrics()
        if self.settings.has_reference_set:
            self.set_feature_models()
        return self.where()

    def where(self) -> dict[str, str]:
        """Host, process, device and (on Ray) node of this worker."""
        place = {"host": socket.gethostname(), "pid": str(os.getpid()), "device": str(self.device)}
        node = ray_node_id()
        return {**place, "node": node} if node else place

    def _model(self, key: str, load: Callable[[], Any]) -> Any:
        if key not in self._models:
            self._models[key] = load()
        return self._models[key]

    def clip(self, source: str):
        from .clip import CLIPEmbedder

        return self._model(f"clip:{source}", lambda: CLIPEmbedder.from_pretrained(source, self.device, self.dtype))

    def cropper(self):
        source = self.settings.crop_model
        if not source:
            return None
        from .cropping import GroundingDinoCropper, RememberingCropper

        return self._model("detector", lambda: RememberingCropper(GroundingDinoCropper.from_pretrained(
            source, self.device)))

    def metrics(self):
        """The per-image metrics as one ``torchmetrics.MetricCollection``: identity (DINO, IR, CLIP-I,
        sharing one cropper), prompt adherence (CLIP-T), diversity, and for edits background LPIPS."""
        def build():
            from torchmetrics import MetricCollection

            from .metrics import BackgroundLPIPS, CLIPIScore, CLIPTScore, DINOScore, DiversityMSE, IRScore

            run = self.settings.run
            clip = self.clip(self.settings.clip_model)
            cropper = self.cropper()
            metrics = {"dino": DINOScore(self.cache.similarity("dino", run.dino_model, self.device, self.dtype),
                                         cropper)}
            if run.ir_model:
                metrics["ir"] = IRScore(self.cache.similarity("ir", run.ir_model, self.device, self.dtype), cropper)
            metrics["clip_i"] = CLIPIScore(clip, cropper)
            metrics["clip_t"] = CLIPTScore(clip)
            metrics["diversity"] = DiversityMSE()
            if self.settings.task == "edit":
                metrics["lpips"] = BackgroundLPIPS()
            # compute_groups off: metrics whose first scores happen to be equal must not share their states
            return MetricCollection(metrics, compute_groups=False).to(self.device)

        return self._model("metrics", build)

    def set_feature_models(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Feature extractors for FID/KID and CMMD; their features are saved per item and the
        distances computed over all items in the summary."""

        def build():
            from .distribution import EmbedderFeatures, InceptionFeatures

            kind = self.settings.fid_features
            if kind == "inception":
                fid = InceptionFeatures(self.settings.inception_weights).to(self.device)
            elif kind == "dino":
                fid = EmbedderFeatures(self.cache.similarity("dino", self.settings.run.dino_model, self.device,
                                                             self.dtype))
            else:
                fid = EmbedderFeatures(self.clip(self.settings.clip_model))
            return {"fid": fid, "cmmd": self.clip(self.settings.cmmd_model).embed}

        return self._model("set_features", build)

    # -- one item -----------------------------------------------------------------------------------
    def run(self, item: BenchItem) -> dict[str, Any]:
        """Make and score the item's images from scratch (anything left by an earlier try is removed).

        Returns the item's record; the driver commits it (result.json, results.jsonl).
        """
        runner = TASK_RUNNERS.get(self.settings.task)
        if runner is None:
            raise SisoError(task_unavailable_message(self.settings.task))
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        item_dir = self.out / "items" / item.id
        shutil.rmtree(item_dir, ignore_errors=True)
        item_dir.mkdir(parents=True)
        outputs = runner(self, item, item_dir)
        made = time.perf_counter()
        cropper = self.cropper()
        misses = cropper.cropper.misses if cropper is not None else 0
        with torch.no_grad():
            images, features = self.evaluate(item, outputs)
        if features:
            from safetensors.torch import save_file

            with atomic_path(item_dir / FEATURES_FILE) as tmp:
                save_file({k: v.float().cpu().contiguous() for k, v in features.items()}, str(tmp))
        means = {}
        for method in outputs.methods:
            values: dict[str, list[float]] = {}
            for image in images:
                if image["method"] == method:
                    for name, value in image["metrics"].items():
                        values.setdefault(name, []).append(value)
            means[method] = {name: sum(v) / len(v) for name, v in values.items()}
        memory, memory_kind = peak_memory(self.device)
        finished = time.perf_counter()
        return {
            "id": item.id, "subject": item.subject, "class": item.class_name, "status": "done",
            "seconds": round(finished - started, 3),
            "timings": {"make_seconds": round(made - started, 3), "evaluate_seconds": round(finished - made, 3)},
            "peak_memory_bytes": memory, "memory": memory_kind,
            "worker": self.where(),
            **outputs.info,
            "metrics": means,
            "images": images,
            "features": FEATURES_FILE if features else None,
            # images the detector found no subject in, so compared whole: a high count means the crops failed
            "crop_misses": cropper.cropper.misses - misses if cropper is not None else None,
            "item": item.to_record(),
        }

    def evaluate(self, item: BenchItem, outputs: ItemOutputs) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """Per-image metrics of every method's images (the metric collection, one update per batch),
        and the features of the set metrics."""
        metrics = self.metrics()
        cropper = self.cropper()
        set_models = self.set_feature_models() if self.settings.has_reference_set else None
        subject = outputs.subject.to(self.device)
        records: list[dict] = []
        collected: dict[str, list[torch.Tensor]] = {}
        size = self.settings.eval_batch_size
        for method, made in outputs.methods.items():
            metrics.reset()
            for start in range(0, len(made.images), size):
                batch = torch.cat(made.images[start : start + size]).to(self.device)
                inputs = {"preds": batch, "target": subject, "labels": item.class_name,
                          "prompts": made.prompts[start : start + size]}
                if outputs.subject_masks is not None and outputs.scenes is not None:
                    inputs["scene"] = torch.cat(outputs.scenes[start : start + size]).to(self.device)
                    inputs["subject_mask"] = torch.cat(outputs.subject_masks[start : start + size]).to(self.device)
                metrics.update(**inputs)
                if set_models is not None:
                    for kind, extract in set_models.items():
                        collected.setdefault(f"{method}.{kind}", []).append(extract(batch).float())
            scores = {name: metric.per_image() for name, metric in metrics.items()}
            for index, prompt in enumerate(made.prompts):
                records.append({
                    "method": method, "index": index, "prompt": prompt, "path": made.paths[index],
                    "metrics": {name: float(values[index]) for name, values in scores.items()},
                })
        metrics.reset()
        if cropper is not None:
            cropper.forget()
        if set_models is not None and outputs.reference is not None:
            for start in range(0, len(outputs.reference), size):
                batch = torch.cat(outputs.reference[start : start + size]).to(self.device)
                for kind, extract in set_models.items():
                    collected.setdefault(f"reference.{kind}", []).append(extract(batch).float())
        return records, {key: torch.cat(parts) for key, parts in collected.items()}


# -- tasks -----------------------------------------------------------------------------------------

def generate_item(worker: ItemWorker, item: BenchItem, item_dir: Path) -> ItemOutputs:
    """The two-stage protocol: optimise once with "a photo of a {class}", then render every prompt
    with the learned LoRA through the plain diffusers pipeline (and, with the plain baseline,
    without it), on the backbone the optimisation loaded (the model cache lends it to each stage)."""
    from ..config import RenderConfig
    from ..generation import run_generation
    from ..rendering import load_lora_file, render_with

    if not item.prompts:
        raise SisoError(f'Item {item.id} has no "prompts" to render; a generation manifest needs them.')
    settings = worker.settings
    config = settings.generate_config(item.subject_photo, f"a photo of a {item.class_name}")
    result = run_generation(config, item_dir / "run", cache=worker.cache)
    if result.stop_reason == "interrupted":
        raise KeyboardInterrupt  # a Ctrl-C inside the loop: stop the benchmark, redo this item next time
    if result.lora_dir is None:
        raise SisoError(f"Item {item.id}: the optimisation finished no iteration, so there is no LoRA to render.")

    def render_all(method: str, lora: Path | None) -> MethodImages:
        made = MethodImages()
        with worker.cache.lease(config.model, worker.device, worker.dtype) as backbone:
            if lora is not None:
                load_lora_file(backbone, lora)
            for index, prompt in enumerate(item.prompts):
                image = render_with(backbone, RenderConfig(
                    model=config.model, prompt=prompt, steps=settings.render_steps, seed=config.seed,
                    resolution=config.resolution, device=config.device, dtype=config.dtype,
                ))
                relative = Path("items") / item.id / "images" / method / f"{index:02d}.png"
                write_png(image, worker.out / relative)
                made.prompts.append(prompt)
                made.images.append(pil_to_tensor(image))
                made.paths.append(relative.as_posix())
        return made

    methods = {"siso": render_all("siso", result.lora_dir)}
    if settings.baseline == "plain":
        methods["plain"] = render_all("plain", None)
    subject = pil_to_tensor(working_copy(load_image(item.subject_photo)))
    history = result.history
    return ItemOutputs(methods=methods, subject=subject, info={"optimize": {
        "prompt": config.prompt, "steps": len(history), "best_step": result.best_step,
        "stop_reason": result.stop_reason,
        "best_loss": history[result.best_step]["total"] if result.best_step is not None else None,
        "run_dir": (Path("items") / item.id / "run").as_posix(),
    }})


def edit_item(worker: ItemWorker, item: BenchItem, item_dir: Path) -> ItemOutputs:
    """One edit: the subject into the item's scene (siso.editing); its best image is the output,
    the framed scene the reference, and the replaced object's mask bounds the background LPIPS."""
    from ..editing import run_edit

    if item.scene is None:
        raise SisoError(f'Item {item.id} has no "scene" to edit; an editing manifest needs one per item.')
    settings = worker.settings
    config = settings.edit_config(item.subject_photo, item.scene, item.class_name, item.scene_class, item.scene_mask)
    result = run_edit(config, item_dir / "run", cache=worker.cache)
    if result.stop_reason == "interrupted":
        raise KeyboardInterrupt
    if result.image is None:
        raise SisoError(f"Item {item.id}: the edit finished no iteration, so there is no edited image.")
    relative = Path("items") / item.id / "images" / "siso" / "00.png"
    write_png(result.image, worker.out / relative)
    edit = result.task
    scene = pil_to_tensor(edit.scene)
    labels = {role: label.text for role, label in edit.labels.items()}
    made = MethodImages(prompts=[f"a photo of a {labels.get('subject', item.class_name)}"],
                        images=[pil_to_tensor(result.image)], paths=[relative.as_posix()])
    history = result.history
    return ItemOutputs(
        methods={"siso": made}, subject=pil_to_tensor(working_copy(load_image(item.subject_photo))),
        reference=[scene], scenes=[scene], subject_masks=[edit.mask.mask.float().cpu()],
        info={"labels": labels, "optimize": {
            "steps": len(history), "best_step": result.best_step, "stop_reason": result.stop_reason,
            "best_loss": history[result.best_step]["total"] if result.best_step is not None else None,
            "run_dir": (Path("items") / item.id / "run").as_posix(),
        }},
    )


#: task name -> the function that makes an item's images.
TASK_RUNNERS: dict[str, TaskRunner] = {"generate": generate_item, "edit": edit_item}


def task_unavailable_message(task: str) -> str:
    return f"--task {task} is not a benchmark task; use one of {', '.join(TASK_RUNNERS)}."


def check_task(task: str) -> None:
    if task not in TASK_RUNNERS:
        raise SisoError(task_unavailable_message(task))
