"""What many tests do the same way: a tiny run's config, the plain diffusers render a LoRA must
reproduce, a run iterated to its end with its session and events kept, and the planted-subject experiment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from conftest import RESOLUTION
from diffusers import DiffusionPipeline
from PIL import Image

from siso.backbones import backbone_class_for
from siso.config import GenerateConfig
from siso.files import write_png
from siso.generation import prepare_generation, run_generation
from siso.images import pil_to_tensor, tensor_to_pil
from siso.run import RunResult

PROMPT = "a photo of a dog"


def bench_args(manifest: Path, out: Path, sd_dir: Path, dino_dir: Path, eval_dirs: dict[str, Path], *extra: str):
    """`siso bench` on tiny models (see conftest's ``eval_dirs``): two iterations, one render step."""
    return ["bench", str(manifest), "--out", str(out), "--model", str(sd_dir), "--dino-model", str(dino_dir),
            "--clip-model", str(eval_dirs["clip"]), "--cmmd-model", str(eval_dirs["clip"]),
            "--crop-model", str(eval_dirs["detector"]), "--fid-features", "dino", "--baseline", "plain",
            "--max-steps", "2", "--render-steps", "1", "--resolution", str(RESOLUTION), "--device", "cpu", *extra]


def generate_args(model_dir, dino_dir, subject, out, *extra) -> list[str]:
    """`siso generate` on the tiny models (CPU, 32 px); ``extra`` flags follow (a repeated flag: the last wins)."""
    return ["generate", "--subject", str(subject), "--prompt", PROMPT, "--out", str(out), "--model", str(model_dir),
            "--dino-model", str(dino_dir), "--resolution", str(RESOLUTION), "--device", "cpu", *extra]


def tiny_config(model_dir, subject, dino_dir, **overrides) -> GenerateConfig:
    """A generation on the tiny models: CPU, 32 px, a few iterations at a learning rate they feel."""
    options = dict(subjects=(subject,), prompt=PROMPT, model=str(model_dir), dino_model=str(dino_dir),
                   resolution=RESOLUTION, device="cpu", max_steps=6, learning_rate=5e-3)
    options.update(overrides)
    return GenerateConfig(**options)


def plain_render(model_dir, steps: int = 1, seed: int = 42, lora_dir=None, weight_name=None,
                 prompt: str = PROMPT) -> torch.Tensor:
    """What an ordinary diffusers user gets, loaded independently of siso: the model's own pipeline,
    the LoRA through ``load_lora_weights``, the backbone's guidance, and the optimisation's prompt
    length (FLUX and Sana optimise with shorter prompts than they render with by default)."""
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, weight_name=weight_name)
    backbone_class = backbone_class_for(str(model_dir))
    with torch.no_grad():
        return pipe(  # prompt by keyword: Flux2KleinPipeline.__call__ takes an image first
            prompt=prompt, num_inference_steps=steps, guidance_scale=backbone_class.preset.guidance_scale,
            height=RESOLUTION, width=RESOLUTION, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
            **optimisation_pipeline_kwargs(backbone_class, steps),
        ).images


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs a compiled call (what ``nn.Module.compile`` sets)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def lora_parameters(adapter) -> list[torch.nn.Parameter]:
    """Every trained parameter of a ``siso.lora.LoraAdapter``."""
    return [p for modules in adapter.parameters.values() for pair in modules.values() for p in pair.values()]


def weight_modules(backbone) -> dict[str, torch.nn.Module]:
    """Every weight-holding component of a backbone's pipeline (what must stay frozen)."""
    modules = {name: getattr(backbone.pipeline, name) for name in backbone.pipeline.components}
    return {name: m for name, m in modules.items() if isinstance(m, torch.nn.Module)}


def optimisation_pipeline_kwargs(backbone_class, steps: int) -> dict:
    """What a plain ``pipeline(...)`` call of ``steps`` steps needs to render exactly what the optimisation
    rendered: the backbone's own plain-call arguments and the preset's shorter prompt, where it shortens it."""
    tokens = backbone_class.preset.prompt_max_tokens
    return {**backbone_class.plain_pipeline_kwargs(steps), **({"max_sequence_length": tokens} if tokens else {})}


@dataclasses.dataclass
class Captured:
    """A run iterated to its end, as every surface iterates it (``run.steps()``), with its session and
    its events kept, so tests can look at float tensors before PNG quantisation."""

    result: RunResult
    session: object
    events: list


def run_captured(run) -> Captured:
    """Iterate ``run`` (a ``siso.run.Run``) to its end, finish it and hand its backbone back."""
    try:
        events = list(run.steps())
        return Captured(run.finish(), run.session, events)
    finally:
        run.close()


def plant_subject(config: GenerateConfig, directory: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """The model's own image under a hidden random LoRA, saved as the subject photo: a subject the
    loop can recover exactly. Returns the photo, the planted image and the untouched model's image."""
    hidden = prepare_generation(config)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(123)
        for p in hidden.optimization.parameters:
            p.copy_(torch.randn(p.shape, generator=generator))
        planted = hidden.optimization.render()
        untouched = prepare_generation(config).optimization.render()
    target = directory / "planted.png"
    write_png(tensor_to_pil(planted).resize((128, 128), Image.Resampling.NEAREST), target)
    return target, planted, untouched


def assert_planted_subject_recovered(config: GenerateConfig, directory: Path) -> RunResult:
    """The loop, started from the untouched model, closes most of the gap to the planted subject."""
    target, planted, untouched = plant_subject(config, directory)
    result = run_generation(dataclasses.replace(config, subjects=(target,)), directory / "run")
    totals = [h["total"] for h in result.history]
    start, best = totals[0], min(totals)
    # Tiny random embedders see little difference between images, so the gap is small in absolute
    # terms; what must hold is that most of it is closed.
    assert start > 1e-3, "the planted subject must differ from the untouched model's image"
    assert best < 0.2 * start, f"similarity gap closed only from {start:.5f} to {best:.5f}"
    # And the image itself moved towards the planted one, not merely the embeddings.
    best_image = pil_to_tensor(result.image)
    assert ((best_image - planted) ** 2).mean() < 0.8 * ((untouched - planted) ** 2).mean()
    return result


def assert_streams_exactly_when_the_gpu_is_too_small(monkeypatch, model_dir) -> None:
    """A family that may stream keeps its block weights in CPU memory exactly on GPUs smaller than loading
    or the lightest loop needs (computed here by hand from the loaded weights and the counted
    activations), and is then checkpointed; on a GPU just large enough it loads as it is."""
    from siso.backbones import load_backbone, memory

    cpu = torch.device("cpu")
    probe = load_backbone(str(model_dir), cpu, torch.float32)
    assert type(probe).streams_when_short
    gib = 2**30
    every = sum(p.numel() * p.element_size() for m in probe.pipeline.components.values()
                if isinstance(m, torch.nn.Module) for p in m.parameters()) / gib
    trained = probe.text_encoder_names if probe.preset.train_text_encoder else ()
    looped = sum(p.numel() * p.element_size() for name in (probe.denoiser_name, "vae", *trained)
                 for p in getattr(probe.pipeline, name).parameters()) / gib
    activations = probe.activation_estimate()["checkpoint-all"] * 2 * memory.ACTIVATION_HEADROOM  # fp32: x2
    need = max(every + memory.SIMILARITY_WEIGHTS_GIB + probe.memory_margin_gib,
               looped + memory.SIMILARITY_WEIGHTS_GIB + activations + probe.memory_margin_gib)
    for gpu, streams in ((need + 0.01, False), (need - 0.01, True)):
        monkeypatch.setattr(memory, "cuda_memory_gib", lambda device, gpu=gpu: gpu)
        backbone = load_backbone(str(model_dir), cpu, torch.float32)
        assert backbone.streams_denoiser == streams and backbone.denoiser.is_gradient_checkpointing == streams, gpu
        assert backbone.load_time_tier == ("checkpoint-all" if streams else "plain")
        streamed = [m for m in backbone.denoiser.modules() if torch.nn.utils.parametrize.is_parametrized(m, "weight")]
        assert bool(streamed) == streams


def assert_only_the_last_steps_carry_gradients(backbone, steps: int, grad_steps: int) -> list[torch.nn.Parameter]:
    """Render ``steps`` steps with a non-zero LoRA: the denoiser runs under autograd in the last ``grad_steps``
    only, truncating the graph changes nothing forward, and backward reaches the LoRA. Returns its parameters
    (the caller asserts how many got a gradient)."""
    from siso.backbones import render
    from siso.lora import attach_lora

    params = lora_parameters(attach_lora(backbone, rank=4, train_text_encoder=False, seed=0))
    with torch.no_grad():
        for p in params:  # a non-zero LoRA, so every step depends on the parameters
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    grad_modes: list[bool] = []
    hook = backbone.denoiser.register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    cond = backbone.encode_prompt(PROMPT, RESOLUTION)
    try:
        image = render(backbone, cond, seed=42, resolution=RESOLUTION, num_steps=steps, grad_steps=grad_steps)
        # Guidance runs both prompts as one batch where a family has it: one denoiser call per step.
        assert grad_modes == [False] * (steps - grad_steps) + [True] * grad_steps
        grad_modes.clear()
        with torch.no_grad():
            reference = render(backbone, cond, seed=42, resolution=RESOLUTION, num_steps=steps, grad_steps=steps)
        assert grad_modes == [False] * steps
    finally:
        hook.remove()
    assert torch.equal(image.detach(), reference)
    image.mean().backward()
    return params


class StandInExecutor:
    """A benchmark executor for tests of the runner's policy: items in submission order, each one's outcome
    from :meth:`outcome` (by default: done at once). Subclass it and override ``outcome``."""

    def __init__(self, executor=None, settings=None, out_dir=None, note=None) -> None:
        self.queue: list = []
        self.note = note or (lambda _message: None)

    def start(self) -> list[dict[str, str]]:
        return [{"host": "here", "pid": "1", "device": "cpu"}]

    def submit(self, item) -> None:
        self.queue.append(item)

    def pending(self) -> int:
        return len(self.queue)

    def next_outcome(self):
        return self.outcome(self.queue.pop(0))

    def outcome(self, item):
        from siso.eval.executors import Outcome

        return Outcome(item, {"id": item.id, "subject": item.id, "class": "dog", "status": "done", "seconds": 1.0,
                              "peak_memory_bytes": 1, "memory": "process_peak_rss", "metrics": {}, "images": [],
                              "item": item.to_record()})

    def close(self) -> None:
        pass

