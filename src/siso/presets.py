"""The method's numbers per model family: what fills every knob the user leaves to "the backbone's".

Pure data (no torch), so the command line can print each family's defaults in its help without
loading diffusers. Each adapter in ``siso.backbones`` names its preset; every value and its source
(the authors' reference commands, or siso's own choice where they ran no such model) is in
docs/fidelity.md, which ``tests/test_fidelity.py`` checks against these objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: peft ``target_modules`` of the UNets' LoRA and of CLIP text encoders' LoRA (the reference's, and
#: the layout diffusers' own loaders and training scripts use)
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_FORMATS = ("diffusers", "kohya")


@dataclass(frozen=True)
class BackbonePreset:
    """One family's defaults. The fields named like a knob of ``siso.config`` fill that knob when
    the user gives none (``knob(..., preset=...)``); the others describe the family to the loop."""

    family: str  # the name docs/fidelity.md uses: sd-turbo, sdxl-turbo, ...
    title: str  # what the help text calls it
    learning_rate: float = 2e-4
    adam_weight_decay: float = 1e-2  # AdamW's, on the denoiser's LoRA
    denoise_steps: int = 1
    grad_steps: int = 1
    guidance_scale: float = 0.0
    early_stop_patience: int = 7
    render_steps: int = 4
    train_text_encoder: bool = False
    #: the text encoders' LoRA in its own AdamW group; None: the denoiser's values
    text_encoder_learning_rate: float | None = None
    text_encoder_weight_decay: float | None = None
    #: prompt tokens while optimising (T5 / Gemma); None: the pipeline's default. Rendering afterwards
    #: uses the pipeline's default, as the reference does.
    prompt_max_tokens: int | None = None
    lora_targets: tuple[str, ...] = UNET_LORA_TARGETS
    #: empty: the family's text encoder is never trained (a language model, not CLIP)
    text_encoder_lora_targets: tuple[str, ...] = CLIP_LORA_TARGETS
    #: the LoRA file layouts that load back into this family, and those written by default
    lora_formats: tuple[str, ...] = ("diffusers",)
    lora_format: tuple[str, ...] = ("diffusers",)
    #: the file of the two that ComfyUI's LoRA loader takes whole (checked against its own loader in
    #: tests/test_comfyui_lora.py); None where that is not yet checked
    comfyui_lora_format: str | None = None

    def to_record(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


# SD-Turbo: the paper generates with SDXL-Turbo, FLUX and Sana, so SD-Turbo takes SDXL-Turbo's numbers,
# without the text-encoder LoRA (the cheapest setting). The kohya file is small and is what ComfyUI and
# A1111 load, so SD and SDXL write it by default too.
SD_TURBO = BackbonePreset(family="sd-turbo", title="SD-Turbo", lora_formats=LORA_FORMATS, lora_format=LORA_FORMATS,
                          comfyui_lora_format="kohya")
# SDXL-Turbo as the reference's SDXL command runs it: the text encoders' LoRA on, in the denoiser's group.
SDXL_TURBO = BackbonePreset(family="sdxl-turbo", title="SDXL-Turbo", train_text_encoder=True,
                            lora_formats=LORA_FORMATS, lora_format=LORA_FORMATS, comfyui_lora_format="kohya")
# FLUX.1-schnell as the reference runs it: one step while optimising (more gives poor images), no guidance,
# 4 to render; weight decay 1e-4; the CLIP text encoder's LoRA on, in its own AdamW group (lr 5e-6, weight
# decay 1e-3); T5 prompts of 256 tokens while optimising (512 to render). Its LoRA covers the attention
# projections of both streams and the double blocks' feed-forward layers (the reference's
# siso_generation_flux.py default, as diffusers' FLUX DreamBooth script). A kohya file in diffusers' key
# names does not load back (FLUX's kohya loaders expect Black Forest Labs' block names): diffusers only.
FLUX_SCHNELL = BackbonePreset(
    family="flux-schnell", title="FLUX.1-schnell", adam_weight_decay=1e-4, train_text_encoder=True,
    text_encoder_learning_rate=5e-6, text_encoder_weight_decay=1e-3, prompt_max_tokens=256,
    lora_targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                  "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    comfyui_lora_format="diffusers",
)
# Sana as the reference's command runs it: 20 steps, gradients through the last 3, guidance 4.5, lr 8e-4,
# weight decay 1e-4, patience 5, Gemma prompts of 256 tokens while optimising (300 to render); LoRA on
# to_q/to_k/to_v (the reference's and diffusers' train_dreambooth_lora_sana.py default). Gemma-2 is never
# trained, and SanaPipeline loads no kohya files.
SANA = BackbonePreset(
    family="sana", title="Sana", learning_rate=8e-4, adam_weight_decay=1e-4, denoise_steps=20, grad_steps=3,
    guidance_scale=4.5, early_stop_patience=5, render_steps=20, prompt_max_tokens=256,
    lora_targets=("to_k", "to_q", "to_v"), text_encoder_lora_targets=(),
)


# The families the authors never ran: siso's own choices, by the paper's rules and by analogy with the
# nearest model the reference does run (docs/fidelity.md, "Models the paper did not run", gives the reasons).
# Distilled flow-matching transformers take FLUX.1-schnell's numbers: one step while optimising, the
# gradient through it, lr 2e-4, weight decay 1e-4, patience 7; render steps are the model card's.
#: the MM-DiT's attention projections of both streams and its feed-forward layers, as FLUX.1's reference LoRA
MMDIT_LORA_TARGETS = FLUX_SCHNELL.lora_targets
# SD3.5 Large Turbo: 4 steps, guidance 0 (its model card); CLIP-L and CLIP-G are CLIP and small, so they
# carry a LoRA in their own AdamW group as FLUX.1's CLIP does; T5 stays frozen.
SD35_TURBO = BackbonePreset(
    family="sd3.5-turbo", title="SD3.5-Turbo", adam_weight_decay=1e-4, train_text_encoder=True,
    text_encoder_learning_rate=5e-6, text_encoder_weight_decay=1e-3, lora_targets=MMDIT_LORA_TARGETS,
    comfyui_lora_format="diffusers",
)
# Sana-Sprint: Sana distilled to 1-4 steps (2 by default) with the guidance embedded (4.5): Sana's optimiser
# numbers (lr 8e-4, patience 5), one step while optimising, Sana's LoRA targets; Gemma-2 stays frozen.
SANA_SPRINT = BackbonePreset(
    family="sana-sprint", title="Sana-Sprint", learning_rate=8e-4, adam_weight_decay=1e-4, guidance_scale=4.5,
    early_stop_patience=5, render_steps=2, lora_targets=("to_k", "to_q", "to_v"), text_encoder_lora_targets=(),
)
# FLUX.2 [klein] 4B: distilled to 4 steps, guidance 1.0 (no classifier-free guidance; its model card). The
# LoRA covers what diffusers' FLUX.2 DreamBooth script targets (the attention projections, the single blocks'
# fused input projection to_qkv_mlp_proj and their output projections, single_transformer_blocks.N.attn.to_out,
# which the adapter names per block) plus, as FLUX.1's reference does, the double blocks' context projections
# and feed-forward layers of both streams; Qwen3 stays frozen.
FLUX2_KLEIN = BackbonePreset(
    family="flux2-klein", title="FLUX.2-klein", adam_weight_decay=1e-4, guidance_scale=1.0,
    lora_targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                  "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                  "to_qkv_mlp_proj"),
    text_encoder_lora_targets=(),
)
# Z-Image-Turbo: distilled to 8-9 steps, guidance 0 (its model card: 9). One step of an 8-step model is far
# from its training; two are the fewest that plausibly give a coherent image, the gradient through the last.
# The LoRA covers the attention projections and the SwiGLU feed-forward; Qwen3 stays frozen.
Z_IMAGE_TURBO = BackbonePreset(
    family="z-image-turbo", title="Z-Image-Turbo", adam_weight_decay=1e-4, denoise_steps=2, render_steps=9,
    lora_targets=("to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    text_encoder_lora_targets=(),
)

#: every family, in the order the help text lists them
PRESETS: dict[str, BackbonePreset] = {p.family: p for p in (SD_TURBO, SDXL_TURBO, FLUX_SCHNELL, SANA, SD35_TURBO,
                                                             SANA_SPRINT, FLUX2_KLEIN, Z_IMAGE_TURBO)}


def per_family(attribute: str, missing: str | None = None) -> str:
    """``attribute``'s value in every family, families sharing a value grouped: how the help text
    says what "the backbone's" default is (``SD-Turbo, SDXL-Turbo, FLUX.1-schnell 2e-4; Sana 8e-4``).
    ``missing`` stands for a family's ``None`` (e.g. "as --lr")."""
    from .knobs import show

    groups: dict[str, list[str]] = {}
    for preset in PRESETS.values():
        value = getattr(preset, attribute)
        groups.setdefault(show(value) if value is not None else (missing or "none"), []).append(preset.title)
    return "; ".join(f"{', '.join(titles)} {value}" for value, titles in groups.items())
