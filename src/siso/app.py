"""The web app: watch each iteration, stop when it looks right, take the LoRA home.

A Gradio front end over the same library calls as the CLI (``start_generation`` / ``GenerationRun``):
no second implementation of the loop. Every run also lands in an ordinary run directory under
``runs_dir``, so nothing is lost when the tab closes.
"""

from __future__ import annotations

import math
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from .config import (
    DEFAULT_DINO_MODEL,
    DEFAULT_EDITING_MODEL,
    DEFAULT_GENERATION_MODEL,
    GenerateConfig,
    RenderConfig,
)
from .errors import SisoError
from .files import write_png
from .generation import GenerationRun, start_generation
from .images import tensor_to_pil
from .ir_cache import IR_AUTO
from .lora import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME
from .models import ModelCache
from .optimize import StepEvent
from .rendering import load_render_backbone, lora_loaded, render_with

GPU_QUEUE = "gpu"  # every event that runs a model shares this queue: one job per GPU at a time
CONTINUE_STEPS = 10


@dataclass(frozen=True)
class AppSettings:
    """What ``siso app`` was started with; the defaults shown in the page."""

    model: str = DEFAULT_GENERATION_MODEL
    edit_model: str = DEFAULT_EDITING_MODEL
    dino_model: str = DEFAULT_DINO_MODEL
    ir_model: str | None = IR_AUTO  # auto: the cached IR conversion if there is one
    resolution: int = 512
    max_steps: int = 50
    device: str = "auto"
    runs_dir: Path = Path("siso-runs")
    max_upload_mb: int = 25
    #: --compile; None: on for CUDA GPUs (the models stay loaded, so one compile serves every run)
    compile: bool | None = None
    #: one job may not hold the only GPU queue for ever: at most this many iterations (Continue
    #: included) and this long per Start or Continue
    max_job_steps: int = 200
    max_job_minutes: float = 30.0
    #: the models the page may ask for (Hub ids or directories); None: any
    model_allowlist: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_upload_mb < 1:
            raise SisoError(f"--max-upload-mb must be at least 1, got {self.max_upload_mb}.")
        if self.max_job_steps < 1 or not (self.max_job_minutes > 0 and math.isfinite(self.max_job_minutes)):
            raise SisoError("--max-job-steps and --max-job-minutes must be positive.")
        if not 1 <= self.max_steps <= self.max_job_steps:
            raise SisoError(f"--max-steps must be from 1 to --max-job-steps ({self.max_job_steps}), "
                            f"got {self.max_steps}.")
        if self.runs_dir.exists() and not self.runs_dir.is_dir():
            raise SisoError(f"--runs-dir {self.runs_dir} is a file; pass a directory for the runs.")

    def check_model(self, model: str) -> str:
        """``model`` if the page may load it; the allowlist keeps clients off arbitrary server paths."""
        if self.model_allowlist is not None and model not in self.model_allowlist:
            raise SisoError(f"This server only runs {', '.join(self.model_allowlist)}; {model!r} is not allowed "
                            "(its operator can add it with --model-allowlist).")
        return model

    def check_steps(self, steps: int) -> int:
        if steps > self.max_job_steps:
            raise SisoError(f"This server allows at most {self.max_job_steps} iterations per job; asked for {steps}.")
        return steps


@dataclass
class BrowserSession:
    """What one browser tab is doing: its current run, and what it may download."""

    run: GenerationRun | None = None
    events: list[StepEvent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    note: str = ""  # why the app itself stopped the run (its time limit), shown with the status


class SisoApp:
    """The app's state: one model cache (one GPU), and the runs of each browser tab."""

    def __init__(self, settings: AppSettings, cache: ModelCache | None = None) -> None:
        self.settings = settings
        self.cache = cache or ModelCache()
        self.sessions: dict[str, BrowserSession] = {}

    def session(self, request: gr.Request, tab: str = "generate") -> BrowserSession:
        """The state of one tab (generate or edit) of one browser session."""
        key = f"{request.session_hash or 'anonymous'}/{tab}"
        return self.sessions.setdefault(key, BrowserSession())

    def new_run_dir(self, kind: str) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return self.settings.runs_dir / f"{stamp}-{kind}-{uuid.uuid4().hex[:6]}"

    # -- generate ---------------------------------------------------------------------------
    def start(self, photos, prompt: str, model: str, seed: float, resolution: float, max_steps: float,
              learning_rate: float, patience: float, request: gr.Request) -> Iterator[tuple]:
        session = self.session(request)
        if not photos:
            raise gr.Error("Upload at least one photo of the subject first.")
        try:
            config = GenerateConfig(
                subjects=tuple(Path(_path_of(p)) for p in photos), prompt=prompt or "",
                model=self.settings.check_model((model or self.settings.model).strip()), seed=int(seed),
                resolution=int(resolution), max_steps=self.settings.check_steps(int(max_steps)),
                learning_rate=float(learning_rate) if learning_rate else None,
                early_stop_patience=int(patience) if patience else None,
                dino_model=self.settings.dino_model, ir_model=self.settings.ir_model, device=self.settings.device,
                compile=self.settings.compile,
            )
            with session.lock:
                session.run = start_generation(config, self.new_run_dir("generate"), cache=self.cache)
                session.events = []
        except SisoError as err:
            raise gr.Error(str(err)) from err
        yield from self._stream(session)

    def resume(self, request: gr.Request, tab: str = "generate") -> Iterator[tuple]:
        session = self.session(request, tab)
        if session.run is None:
            raise gr.Error("Nothing to continue: start a run first.")
        optimization = session.run.session.optimization
        extra = min(CONTINUE_STEPS, self.settings.max_job_steps - len(optimization.history))
        if extra < 1:
            raise gr.Error(f"This run has reached the server's limit of {self.settings.max_job_steps} iterations.")
        optimization.extend(extra)
        yield from self._stream(session, self._extra(session, tab))

    def stop(self, request: gr.Request, tab: str = "generate") -> str:
        session = self.session(request, tab)
        if session.run is None:
            return "Nothing is running."
        session.run.session.request_stop()
        return "Stopping after this iteration; the best iteration so far is kept."

    # Gradio hands ``request`` over by its annotation, so each tab's buttons get their own methods.
    def resume_edit(self, request: gr.Request) -> Iterator[tuple]:
        yield from self.resume(request, "edit")

    def stop_edit(self, request: gr.Request) -> str:
        return self.stop(request, "edit")

    def _stream(self, session: BrowserSession, extra: tuple = ()) -> Iterator[tuple]:
        """The live view of a run; ``extra`` outputs (the edit tab's mask overlay) lead each update."""
        run = session.run
        session.note = ""
        deadline = time.monotonic() + 60 * self.settings.max_job_minutes
        try:
            for event in run.steps():
                session.events.append(event)
                if time.monotonic() > deadline and not session.note:
                    run.session.request_stop()  # this iteration was the last: the queue is shared
                    limit = self.settings.max_job_minutes
                    session.note = f"Stopped at the server's limit of {limit:g} minutes per job."
                yield extra + self._view(session, finished=False)
            run.finish()
        except SisoError as err:
            raise gr.Error(str(err)) from err
        yield extra + self._view(session, finished=True)

    def _extra(self, session: BrowserSession, tab: str) -> tuple:
        return (mask_overlay(session.run.session),) if tab == "edit" else ()

    # -- edit -------------------------------------------------------------------------------
    def edit(self, subject, scene, subject_class: str, input_class: str, mask, model: str, seed: float,
             max_steps: float, bg_weight: float, request: gr.Request) -> Iterator[tuple]:
        from .config import EditConfig
        from .editing import start_edit

        session = self.session(request, "edit")
        if not subject or not scene:
            raise gr.Error("Upload a photo of the subject and the scene photo first.")
        try:
            config = EditConfig(
                subject=Path(_path_of(subject)), input=Path(_path_of(scene)),
                subject_class=(subject_class or "").strip() or None, input_class=(input_class or "").strip() or None,
                mask=Path(_path_of(mask)) if mask else None,
                model=self.settings.check_model((model or "").strip() or self.settings.edit_model),
                seed=int(seed), resolution=self.settings.resolution,
                max_steps=self.settings.check_steps(int(max_steps)),
                bg_weight=float(bg_weight), dino_model=self.settings.dino_model, ir_model=self.settings.ir_model,
                device=self.settings.device, compile=self.settings.compile,
            )
            with session.lock:
                session.run = start_edit(config, self.new_run_dir("edit"), cache=self.cache)
                session.events = []
        except SisoError as err:
            raise gr.Error(str(err)) from err
        yield from self._stream(session, self._extra(session, "edit"))

    def _view(self, session: BrowserSession, finished: bool) -> tuple:
        run = session.run
        events = session.events
        latest = events[-1] if events else None
        best_step = latest.best_step if latest else None
        out = run.out_dir
        steps = [str(out / "steps" / f"{e.step:04d}.png") for e in events]
        if latest is None:
            status = "No iteration finished."
        else:
            losses = " · ".join(f"{k} {v:.4f}" for k, v in latest.losses.items() if k != "step")
            # Numbered as in steps/NNNN.png and run.json.
            status = f"Iteration {latest.step} · {losses} · best iteration {best_step}"
        if finished:
            reason = run.session.optimization.stop_reason
            status = f"**Finished** ({reason}). " + status + f" · run directory `{out}`"
        if session.note:
            status += f" · {session.note}"
        downloads = None
        if finished and (out / "lora" / DIFFUSERS_WEIGHT_NAME).is_file():
            # The kohya file is there for SD and SDXL runs (ComfyUI / A1111 load it); FLUX and Sana have none.
            loras = [out / "lora" / name for name in (DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME)]
            downloads = [str(out / "best.png"), *(str(path) for path in loras if path.is_file())]
        return (
            tensor_to_pil(latest.image) if latest else None,
            steps[-24:],  # the gallery shows the latest iterations
            _loss_table(events),
            str(out / "best.png") if best_step is not None else None,
            status,
            downloads,
        )

    # -- render -----------------------------------------------------------------------------
    def render(self, model: str, lora_file, use_last: bool, prompt: str, steps: float, seed: float,
               resolution: float, request: gr.Request) -> tuple[str, str]:
        session = self.session(request)
        lora: Path | None = None
        if lora_file:
            lora = Path(_path_of(lora_file))
        elif use_last:
            if session.run is None or not (session.run.out_dir / "lora" / DIFFUSERS_WEIGHT_NAME).is_file():
                raise gr.Error("This tab has no finished run yet: generate first, or upload a LoRA file.")
            lora = session.run.out_dir / "lora"
        try:
            config = RenderConfig(model=self.settings.check_model((model or self.settings.model).strip()),
                                  prompt=prompt or "", lora=lora,
                                  steps=int(steps) if steps else None, seed=int(seed),
                                  resolution=int(resolution), device=self.settings.device)
            backbone = load_render_backbone(config, self.cache)
            with lora_loaded(backbone, lora):
                image = render_with(backbone, config)
        except SisoError as err:
            raise gr.Error(str(err)) from err
        path = self.new_run_dir("render").with_suffix(".png")
        write_png(image, path)
        return str(path), str(path)


def mask_overlay(edit_session) -> Image.Image:
    """The scene with the object to replace tinted red: what the edit will change."""
    scene = edit_session.scene.convert("RGB")
    mask = edit_session.mask.to_image().resize(scene.size)
    red = Image.new("RGB", scene.size, (255, 40, 40))
    return Image.composite(Image.blend(scene, red, 0.5), scene, mask)


def _path_of(upload: Any) -> str:
    """Gradio hands uploads over as paths or as objects with a ``name``/``path``."""
    if isinstance(upload, (str, Path)):
        return str(upload)
    return str(getattr(upload, "path", None) or upload.name)


def _loss_table(events: list[StepEvent]):
    import pandas as pd  # a gradio dependency

    rows = [
        {"iteration": e.step, "loss": name, "value": value}
        for e in events for name, value in e.losses.items() if name != "step"
    ]
    return pd.DataFrame(rows, columns=["iteration", "loss", "value"])


def _run_buttons(prefix: str) -> tuple[gr.Button, gr.Button, gr.Button]:
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id=f"{prefix}start")
        stop = gr.Button("Stop", variant="stop", elem_id=f"{prefix}stop")
        resume = gr.Button("Continue", elem_id=f"{prefix}continue")
    return start, stop, resume


DOWNLOADS_LABEL = (f"Downloads: best image, LoRA for diffusers ({DIFFUSERS_WEIGHT_NAME}), "
                   f"LoRA for ComfyUI / A1111 ({KOHYA_WEIGHT_NAME}; SD and SDXL)")


def _live_view(prefix: str) -> list:
    """current image, gallery, loss plot, best image, status, downloads (the order ``_view`` fills)."""
    status = gr.Markdown("Upload the photos and press Start.", elem_id=f"{prefix}status")
    with gr.Row():
        current = gr.Image(label="Current iteration", type="pil", elem_id=f"{prefix}current", interactive=False,
                           height=320)
        best = gr.Image(label="Best so far", type="filepath", elem_id=f"{prefix}best", interactive=False,
                        height=320)
    plot = gr.LinePlot(x="iteration", y="value", color="loss", label="Losses", elem_id=f"{prefix}losses")
    gallery = gr.Gallery(label="Iterations", columns=8, height=180, elem_id=f"{prefix}iterations")
    downloads = gr.File(label=DOWNLOADS_LABEL, file_count="multiple", interactive=False, elem_id=f"{prefix}downloads")
    return [current, gallery, plot, best, status, downloads]


def build_app(settings: AppSettings, cache: ModelCache | None = None) -> gr.Blocks:
    app = SisoApp(settings, cache)
    # delete_cache: gradio removes the uploads it keeps in its temporary folder once they are an hour
    # old (checked every 10 minutes, and when the app closes); the runs themselves live in runs_dir.
    with gr.Blocks(title="siso: single-image personalisation", delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            "# siso\nPersonalise a text-to-image model from **one photo**. Watch the subject appear, "
            "press **Stop** when you like it, and take the LoRA home."
        )
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    photos = gr.File(label="Subject photo(s)", file_count="multiple", file_types=["image"],
                                     elem_id="subject-photos")
                    prompt = gr.Textbox(label="Prompt (name the subject's class)", value="a photo of a dog",
                                        elem_id="prompt")
                    model = gr.Textbox(label="Backbone (Hub id or directory)", value=settings.model,
                                       elem_id="model")
                    with gr.Accordion("Advanced settings", open=False):
                        seed = gr.Number(label="Seed", value=42, precision=0)
                        resolution = gr.Number(label="Resolution", value=settings.resolution, precision=0)
                        max_steps = gr.Number(label="Max iterations", value=settings.max_steps, precision=0,
                                              elem_id="max-steps")
                        learning_rate = gr.Number(label="Learning rate (0: the backbone's)", value=0)
                        patience = gr.Number(label="Early-stop patience (0: the backbone's)", value=0,
                                             precision=0, elem_id="patience")
                    start, stop, resume = _run_buttons("")
                with gr.Column(scale=2):
                    outputs = _live_view("")
            inputs = [photos, prompt, model, seed, resolution, max_steps, learning_rate, patience]
            start.click(app.start, inputs, outputs, concurrency_limit=1, concurrency_id=GPU_QUEUE)
            resume.click(app.resume, None, outputs, concurrency_limit=1, concurrency_id=GPU_QUEUE)
            stop.click(app.stop, None, outputs[4], queue=False)
        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column(scale=1):
                    e_subject = gr.Image(label="Subject photo", type="filepath", elem_id="edit-subject")
                    e_scene = gr.Image(label="Scene photo (its object is replaced)", type="filepath",
                                       elem_id="edit-scene")
                    e_subject_class = gr.Textbox(label="Subject class (empty: recognised)", value="")
                    e_input_class = gr.Textbox(label="Object to replace (empty: recognised)", value="")
                    e_mask = gr.Image(label="Mask (optional; white = replace; else Grounding DINO + SAM)",
                                      type="filepath", elem_id="edit-mask")
                    e_model = gr.Textbox(label="Backbone", value=settings.edit_model)
                    with gr.Accordion("Advanced settings", open=False):
                        e_seed = gr.Number(label="Seed", value=42, precision=0)
                        e_max_steps = gr.Number(label="Max iterations", value=settings.max_steps, precision=0)
                        e_bg_weight = gr.Number(label="Background weight", value=10.0)
                    e_start, e_stop, e_resume = _run_buttons("edit-")
                with gr.Column(scale=2):
                    e_overlay = gr.Image(label="What will be replaced", type="pil", interactive=False, height=320,
                                         elem_id="edit-overlay")
                    e_outputs = [e_overlay, *_live_view("edit-")]
            e_inputs = [e_subject, e_scene, e_subject_class, e_input_class, e_mask, e_model, e_seed, e_max_steps,
                        e_bg_weight]
            e_start.click(app.edit, e_inputs, e_outputs, concurrency_limit=1, concurrency_id=GPU_QUEUE)
            e_resume.click(app.resume_edit, None, e_outputs, concurrency_limit=1, concurrency_id=GPU_QUEUE)
            e_stop.click(app.stop_edit, None, e_outputs[5], queue=False)
        with gr.Tab("Render"):
            with gr.Row():
                with gr.Column():
                    r_model = gr.Textbox(label="Backbone the LoRA was learned on", value=settings.model)
                    r_use_last = gr.Checkbox(label="Use this tab's last LoRA", value=True)
                    r_lora = gr.File(label="...or upload a LoRA (.safetensors)", file_types=[".safetensors"])
                    r_prompt = gr.Textbox(label="Prompt", value="a dog on the beach")
                    with gr.Accordion("Advanced settings", open=False):
                        r_steps = gr.Number(label="Denoising steps (0: the backbone's)", value=0,
                                            precision=0)
                        r_seed = gr.Number(label="Seed", value=42, precision=0)
                        r_resolution = gr.Number(label="Resolution", value=settings.resolution, precision=0)
                    r_go = gr.Button("Render", variant="primary")
                with gr.Column():
                    r_image = gr.Image(label="Image", type="filepath", interactive=False)
                    r_file = gr.File(label="Download", interactive=False)
            r_go.click(app.render, [r_model, r_lora, r_use_last, r_prompt, r_steps, r_seed, r_resolution],
                       [r_image, r_file], concurrency_limit=1, concurrency_id=GPU_QUEUE)
    demo.queue(default_concurrency_limit=1)
    demo.siso_app = app  # for tests and embedding
    return demo


def check_port(host: str, port: int) -> None:
    """Refuse a port that cannot be served, before any model or page is built."""
    if not 1 <= port <= 65535:
        raise SisoError(f"--port must be from 1 to 65535, got {port}.")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise SisoError(f"Cannot serve on {host}:{port} ({err.strerror or err}): another program uses the port, "
                            "or the address is not this machine's. Pass another one with --port (and --host).") from err


def launch(settings: AppSettings, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
           auth: tuple[str, str] | None = None):
    """Serve the app. Binds loopback unless told otherwise; uploads are size-limited; only the
    files the app itself wrote (its runs directory) can be downloaded; ``auth`` asks for a login."""
    check_port(host, port)
    try:
        settings.runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SisoError(f"--runs-dir {settings.runs_dir} cannot be created ({err.strerror or err}).") from err
    demo = build_app(settings)
    demo.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
        max_file_size=f"{settings.max_upload_mb}mb", allowed_paths=[str(settings.runs_dir.resolve())],
        quiet=not block, auth=auth,
    )
    return demo
