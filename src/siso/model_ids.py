"""Every model siso downloads by default, by role: the one place a Hub id is written.

Knob declarations (``siso.config``, the benchmark's settings) take their defaults from here, and
each id's licence is in the README's models table.
"""

from __future__ import annotations

from dataclasses import dataclass

GENERATION_MODEL = "stabilityai/sdxl-turbo"
EDITING_MODEL = "stabilityai/sd-turbo"  # the paper's editing backbone
DINO_MODEL = "facebook/dinov2-large"
#: names the subject and the replaced object when editing (zero-shot); CLIP-I and CLIP-T in the benchmark
CLIP_MODEL = "openai/clip-vit-large-patch14"
CMMD_MODEL = "openai/clip-vit-large-patch14-336"  # CMMD (Jayasumana et al. 2024)
#: finds the object to replace when editing (the reference's choice; grounding-dino-base is the larger one)
DETECTOR_MODEL = "IDEA-Research/grounding-dino-tiny"
#: crops images to the subject for the benchmark's identity metrics: the larger detector, for the measurement
CROP_MODEL = "IDEA-Research/grounding-dino-base"
SEGMENTER_MODEL = "facebook/sam-vit-base"
#: the IR model is not on the Hub: a Kaggle dataset, converted once by ``siso convert-ir --download``
IR_KAGGLE_DATASET = "louieshao/guieweights0732"


@dataclass(frozen=True)
class Checkpoint:
    """A family's reference checkpoint on the Hub and its licence, as the Hub's model cards spell it:
    ``license`` is the Hub's identifier; ``other`` comes with a name and a link to the terms."""

    repo_id: str
    license: str
    license_name: str | None = None
    license_link: str | None = None


def _other(repo_id: str, name: str) -> Checkpoint:
    return Checkpoint(repo_id, "other", name, f"https://huggingface.co/{repo_id}")


#: each family's reference checkpoint (its preset is chosen for it; the README's models table lists
#: them): what the ComfyUI node offers and what a LoRA's model card names as its licence
FAMILY_CHECKPOINTS: dict[str, Checkpoint] = {
    "sd-turbo": _other(EDITING_MODEL, "sai-nc-community"),
    "sdxl-turbo": _other(GENERATION_MODEL, "sai-nc-community"),
    "flux-schnell": Checkpoint("black-forest-labs/FLUX.1-schnell", "apache-2.0"),
    "sana": _other("Efficient-Large-Model/Sana_1600M_512px_diffusers", "nvidia-nscl-v2-custom"),
    "sd3.5-turbo": _other("stabilityai/stable-diffusion-3.5-large-turbo", "stabilityai-ai-community"),
    "sana-sprint": _other("Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers", "nvidia-nscl-v2-custom"),
    "flux2-klein": Checkpoint("black-forest-labs/FLUX.2-klein-4B", "apache-2.0"),
    "z-image-turbo": Checkpoint("Tongyi-MAI/Z-Image-Turbo", "apache-2.0"),
}
