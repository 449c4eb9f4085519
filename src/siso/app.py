"""The web app: watch each iteration, stop when it looks right, take the LoRA home.

A Gradio front end over the same library calls as the CLI (``start_generation`` / ``GenerationRun``):
no second implementation of the loop. Every run also lands in an ordinary run directory under
``runs_dir``, so nothing is lost when the tab closes.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from .app_settings import AppSettings
from .config import EditConfig, GenerateConfig, RenderConfig
from .errors import SisoError
from .files import write_png
from .generation import start_generation
from .images import tensor_to_pil
from .knobs import knobs
from .loop import StepEvent
from .lora import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME
from .models import ModelCache
from .rendering import render_backbone, render_with
from .run import Run

__all__ = ["AppSettings", "SisoApp", "build_app", "launch"]

GPU_QUEUE = "gpu"  # every event that runs a model shares this queue: one job per GPU at a time
#: Stop goes through the queue (a notice needs a queued event) but never waits behind a job
STOP_QUEUE = {"concurrency_id": "stop", "concurrency_limit": None}
STOPPING = "Stopping after this iteration; the best iteration so far is kept."
CONTINUE_STEPS = 10
#: the page's controls: which knobs each tab offers, in order (their labels, help and defaults are the knobs')
GENERATE_CONTROLS = ("seed", "resolution", "max_steps", "learning_rate", "early_stop_patience")
EDIT_CONTROLS = ("seed", "max_steps", "bg_weight")
RENDER_CONTROLS = ("steps", "seed", "resolution")


@dataclass
class BrowserSession:
    """What one browser tab is doing: its current run, and what it may download."""

    run: Run | None = None
    events: list[StepEvent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    note: str = ""  # why the app itself stopped the run (its time limit), shown with the status


class SisoApp:
    """The app's state: one model cache (one GPU), and the runs of each browser tab."""

    def __init__(self, settings: AppSettings, cache: ModelCache | None = None) -> None:
        self.settings = settings
        self.cache = cache or ModelCache()
        self.sessions: dict[str, BrowserSession] = {}

    def page_defaults(self) -> dict[str, Any]:
        """What the operator set for every run (``siso app --max-steps ...``): the controls' values, and
        what a run gets where a client (the page, or the API) leaves a control empty."""
        return {"resolution": self.settings.resolution, "max_steps": self.settings.max_steps}

    def session(self, request: gr.Request, tab: str = "generate") -> BrowserSession:
        """The state of one tab (generate or edit) of one browser session."""
        key = f"{request.session_hash or 'anonymous'}/{tab}"
        return self.sessions.setdefault(key, BrowserSession())

    def new_run_dir(self, kind: str) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return self.settings.runs_dir / f"{stamp}-{kind}-{uuid.uuid4().hex[:6]}"

    # -- generate ---------------------------------------------------------------------------
    def start(self, request: gr.Request, photos, prompt: str, model: str, *values: Any) -> Iterator[tuple]:
        """Start: ``values`` are the :data:`GENERATE_CONTROLS`' in order (empty ones: their defaults)."""
        session = self.session(request)
        if not photos:
            raise gr.Error("Upload at least one photo of the subject first.")
        try:
            options = {**self.page_defaults(), **self._options(GenerateConfig, GENERATE_CONTROLS, values)}
            config = GenerateConfig(
                subjects=tuple(Path(_path_of(p)) for p in photos), prompt=prompt or "",
                model=self.settings.check_model((model or self.settings.model).strip()),
                dino_model=self.settings.dino_model, ir_model=self.settings.ir_model, device=self.settings.device,
                compile=self.settings.compile, **options,
            )
            with session.lock:
                session.run = start_generation(config, self.new_run_dir("generate"), cache=self.cache)
                session.events = []
        except SisoError as err:
            raise gr.Error(str(err)) from err
        yield from self._stream(session)

    def _options(self, owner: type, names: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
        """The controls' values by knob name; empty ones, and 0 in a knob the backbone's preset fills
        (gradio's number box cannot be empty), are left to the config. The server's iteration limit applies."""
        options = {}
        for name, value in zip(names, values, strict=True):
            spec = knobs(owner)[name]
            if value in (None, "") or (spec.preset is not None and value == 0):
                continue
            options[name] = _number(spec, value) if spec.value_type in (int, float) else value
        for name in ("max_steps", "steps"):  # optimisation iterations, render steps
            if name in options:
                options[name] = self.settings.check_steps(options[name])
        return options

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

    def stop(self, request: gr.Request, tab: str = "generate") -> None:
        """Ask the tab's run to stop after its iteration in progress. The answer is a notice, not the
        status line: only the run's own stream writes that, so a late answer to Stop cannot overwrite
        the "Finished" that the stream wrote after it."""
        session = self.session(request, tab)
        if session.run is None:
            gr.Warning("Nothing is running.")
            return
        session.run.session.request_stop()
        gr.Info(STOPPING)

    # Gradio hands ``request`` over by its annotation, so each tab's buttons get their own methods.
    def resume_edit(self, request: gr.Request) -> Iterator[tuple]:
        yield from self.resume(request, "edit")

    def stop_edit(self, request: gr.Request) -> None:
        self.stop(request, "edit")

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
    def edit(self, request: gr.Request, subject, scene, subject_class: str, input_class: str, mask, model: str,
             *values: Any) -> Iterator[tuple]:
        """Edit: ``values`` are the :data:`EDIT_CONTROLS`' in order."""
        from .editing import start_edit

        session = self.session(request, "edit")
        if not subject or not scene:
            raise gr.Error("Upload a photo of the subject and the scene photo first.")
        try:
            options = {**self.page_defaults(), **self._options(EditConfig, EDIT_CONTROLS, values)}
            config = EditConfig(
                subject=Path(_path_of(subject)), input=Path(_path_of(scene)),
                subject_class=(subject_class or "").strip() or None, input_class=(input_class or "").strip() or None,
                mask=Path(_path_of(mask)) if mask else None,
                model=self.settings.check_model((model or "").strip() or self.settings.edit_model),
                dino_model=self.settings.dino_model,
                ir_model=self.settings.ir_model, device=self.settings.device, compile=self.settings.compile,
                **options,
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
        elif run.session.optimization.stop_requested:
            status += f" · {STOPPING}"
        if session.note:
            status += f" · {session.note}"
        for note in run.session.task.notes:
            status += f" · {note}"
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
    def render(self, request: gr.Request, model: str, lora_file, use_last: bool, prompt: str,
               *values: Any, progress: Callable[..., Any] | None = None) -> tuple[str, str]:
        """Render: ``values`` are the :data:`RENDER_CONTROLS`' in order; ``progress`` is gradio's
        ``gr.Progress`` (each denoising step). The server's job limits apply: the steps are capped
        as iterations are, and a render past the time limit is stopped."""
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
                                  prompt=prompt or "", lora=lora, device=self.settings.device,
                                  **{"resolution": self.settings.resolution,
                                     **self._options(RenderConfig, RENDER_CONTROLS, values)})
            deadline = time.monotonic() + 60 * self.settings.max_job_minutes

            def step_done(done: int, total: int) -> None:
                if progress is not None:
                    progress((done, total), desc="Rendering")
                if time.monotonic() > deadline and done < total:
                    raise SisoError(f"Stopped the render at the server's limit of {self.settings.max_job_minutes:g} "
                                    f"minutes per job, after {done} of {total} steps; ask for fewer steps.")

            with render_backbone(config, self.cache) as backbone:
                image = render_with(backbone, config, step_done)
        except SisoError as err:
            raise gr.Error(str(err)) from err
        path = self.new_run_dir("render").with_suffix(".png")
        write_png(image, path)
        return str(path), str(path)


def _number(spec, value: Any) -> int | float:
    """A number control's value as its knob's type (gradio sends floats; an API client may send anything)."""
    kind = "a whole number" if spec.value_type is int else "a number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SisoError(f"{spec.label} must be {kind}, got {value!r}.") from None
    if spec.value_type is int:
        if not number.is_integer():
            raise SisoError(f"{spec.label} must be {kind}, got {value!r}.")
        return int(number)
    return number


def mask_overlay(edit_session) -> Image.Image:
    """The scene with the object to replace tinted red: what the edit will change."""
    task = edit_session.task
    scene = task.scene.convert("RGB")
    mask = task.mask.to_image().resize(scene.size)
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


def knob_controls(owner: type, names: Sequence[str], prefix: str, values: dict[str, Any]) -> list:
    """One form control per knob: its label, its help as the hint, its default (or the page's, from
    ``values``); a knob the backbone's preset fills starts at 0, which means "the backbone's" (a gradio
    number box cannot be empty). Element ids are the knobs' flags (``max-steps``), after ``prefix``."""
    controls = []
    for name in names:
        spec = knobs(owner)[name]
        value = values.get(name, spec.default)
        from_preset = spec.preset is not None and value is None
        label = spec.label + (" (0: the backbone's)" if from_preset else "")
        options = {"label": label, "info": spec.help, "elem_id": f"{prefix}{spec.flag}"}
        if spec.value_type is bool:
            controls.append(gr.Checkbox(value=bool(value), **options))
        elif spec.value_type in (int, float):
            controls.append(gr.Number(value=0 if from_preset or value is MISSING else value,
                                      precision=0 if spec.value_type is int else None, **options))
        else:
            controls.append(gr.Textbox(value="" if value in (None, MISSING) else str(value), **options))
    return controls


def build_app(settings: AppSettings, cache: ModelCache | None = None) -> gr.Blocks:
    app = SisoApp(settings, cache)
    page_defaults = app.page_defaults()
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
                        controls = knob_controls(GenerateConfig, GENERATE_CONTROLS, "", page_defaults)
                    start, stop, resume = _run_buttons("")
                with gr.Column(scale=2):
                    outputs = _live_view("")
            inputs = [photos, prompt, model, *controls]
            start.click(app.start, inputs, outputs, concurrency_limit=1, concurrency_id=GPU_QUEUE)
            resume.click(app.resume, None, outputs, concurrency_limit=1, concurrency_id=GPU_QUEUE)
            stop.click(app.stop, None, None, **STOP_QUEUE)
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
                        e_controls = knob_controls(EditConfig, EDIT_CONTROLS, "edit-", page_defaults)
                    e_start, e_stop, e_resume = _run_buttons("edit-")
                with gr.Column(scale=2):
                    e_overlay = gr.Image(label="What will be replaced", type="pil", interactive=False, height=320,
                                         elem_id="edit-overlay")
                    e_outputs = [e_overlay, *_live_view("edit-")]
            e_inputs = [e_subject, e_scene, e_subject_class, e_input_class, e_mask, e_model, *e_controls]
            e_start.click(app.edit, e_inputs, e_outputs, concurrency_limit=1, concurrency_id=GPU_QUEUE)
            e_resume.click(app.resume_edit, None, e_outputs, concurrency_limit=1, concurrency_id=GPU_QUEUE)
            e_stop.click(app.stop_edit, None, None, **STOP_QUEUE)
        with gr.Tab("Render"):
            with gr.Row():
                with gr.Column():
                    r_model = gr.Textbox(label="Backbone the LoRA was learned on", value=settings.model)
                    r_use_last = gr.Checkbox(label="Use this tab's last LoRA", value=True)
                    r_lora = gr.File(label="...or upload a LoRA (.safetensors)", file_types=[".safetensors"])
                    r_prompt = gr.Textbox(label="Prompt", value="a dog on the beach")
                    with gr.Accordion("Advanced settings", open=False):
                        r_controls = knob_controls(RenderConfig, RENDER_CONTROLS, "render-", page_defaults)
                    r_go = gr.Button("Render", variant="primary")
                with gr.Column():
                    r_image = gr.Image(label="Image", type="filepath", interactive=False)
                    r_file = gr.File(label="Download", interactive=False)

            def render_job(request: gr.Request, model: str, lora_file, use_last: bool, prompt: str,
                           progress=gr.Progress(), *values: Any) -> tuple[str, str]:  # noqa: B008 - how gradio asks
                return app.render(request, model, lora_file, use_last, prompt, *values, progress=progress)

            r_go.click(render_job, [r_model, r_lora, r_use_last, r_prompt, *r_controls],
                       [r_image, r_file], concurrency_limit=1, concurrency_id=GPU_QUEUE)
    demo.queue(default_concurrency_limit=1)
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
