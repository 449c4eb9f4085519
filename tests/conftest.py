"""Session-wide tiny models, saved in their real layouts and loaded through siso's own code path."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests must never reach for the Hub
# siso's own cache (the converted IR model that --ir-model auto finds): never the user's real one.
os.environ["SISO_CACHE_DIR"] = __import__("tempfile").mkdtemp(prefix="siso-test-cache-")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import tiny  # noqa: E402
import torch  # noqa: E402

# The real DreamBooth dataset (CC-BY 4.0, never committed), for the few tests that are about that data:
# SISO_DREAMBENCH (the dataset/ folder of a google/dreambooth checkout), else the project's shared folder
# beside the checkout. Every other test uses the synthetic photos of tiny.photos.py.
_SHARED_DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench" / "dataset"
REAL_DREAMBENCH = Path(os.environ.get("SISO_DREAMBENCH") or _SHARED_DREAMBENCH)
RESOLUTION = 32  # tiny models: 32 px images, 16 px latents


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory) -> Path:
    return tiny.diffusion.save(tiny.diffusion.sd_pipeline(), tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory) -> Path:
    return tiny.diffusion.save(tiny.diffusion.sdxl_pipeline(), tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session", params=["sd", "sdxl"])
def model_dir(request, sd_dir, sdxl_dir) -> Path:
    return {"sd": sd_dir, "sdxl": sdxl_dir}[request.param]


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-flux")
    tiny.transformer.flux_pipeline().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def flux_dev_dir(tmp_path_factory):
    """FLUX.1-dev's structure: a guidance embedding and sigmas shifted by the image's token count."""
    directory = tmp_path_factory.mktemp("tiny-flux-dev")
    tiny.transformer.flux_pipeline(guidance_embeds=True, dynamic_shifting=True).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def sana_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-sana")
    tiny.transformer.sana_pipeline().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def dino_dir(tmp_path_factory) -> Path:
    return tiny.diffusion.save(tiny.similarity.dino_model(), tmp_path_factory.mktemp("tiny-dino"))


@pytest.fixture(scope="session")
def ir_dir(tmp_path_factory) -> Path:
    return tiny.similarity.ir_dir(tmp_path_factory.mktemp("tiny-ir"))


@pytest.fixture(scope="session")
def eval_dirs(tmp_path_factory) -> dict[str, Path]:
    """The benchmark's tiny evaluation models: CLIP (CLIP-I/T, CMMD) and Grounding DINO (crops)."""
    root = tmp_path_factory.mktemp("bench-models")
    return {"clip": tiny.metrics.clip_dir(root / "clip"),
            "detector": tiny.metrics.grounding_dino_dir(root / "detector")}


@pytest.fixture(scope="session")
def dreambench(tmp_path_factory) -> Path:
    """A synthetic DreamBooth ``dataset/`` folder: dog (2 photos), cat (a scene), teapot, prompts_and_classes.txt."""
    return tiny.photos.write_dreambench(tmp_path_factory.mktemp("dreambench"))


@pytest.fixture(scope="session")
def subject_photo(dreambench) -> Path:
    """The synthetic dog: a portrait JPEG with a clear brown shape the tiny models can be steered towards."""
    return dreambench / "dog" / "00.jpg"


@pytest.fixture(scope="session")
def scene_photo(dreambench) -> Path:
    """The synthetic scene for editing: a landscape JPEG, a grey cat in the middle."""
    return dreambench / "cat" / "00.jpg"


@pytest.fixture(scope="session")
def real_dreambench() -> Path:
    """The real DreamBooth dataset folder, for the tests that are about that data.

    Skipped, saying why, where it is absent (a fresh clone); a failure instead when SISO_DREAMBENCH
    names a folder that is not the dataset, or when SISO_REQUIRE_DREAMBENCH=1 (CI: nothing may skip).
    """
    if (REAL_DREAMBENCH / "prompts_and_classes.txt").is_file():
        return REAL_DREAMBENCH
    reason = (f"needs the real DreamBooth dataset (CC-BY 4.0, not part of this repository), not found at "
              f"{REAL_DREAMBENCH}: set SISO_DREAMBENCH to the dataset/ folder of a checkout of "
              "https://github.com/google/dreambooth to run it")
    if os.environ.get("SISO_DREAMBENCH"):
        pytest.fail(f"SISO_DREAMBENCH={os.environ['SISO_DREAMBENCH']} has no prompts_and_classes.txt; {reason}")
    if os.environ.get("SISO_REQUIRE_DREAMBENCH") == "1":
        pytest.fail(f"SISO_REQUIRE_DREAMBENCH=1 but this test {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any backbone load fails the test: what must be refused before the models load."""
    from siso import models

    # Patched where the model cache looks it up (models.py imports the name).
    monkeypatch.setattr(models, "load_backbone", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.fixture
def run_siso(monkeypatch, capsys):
    """``run_siso(*argv) -> (exit code, output)``: the CLI in-process, through ``main()`` (so its
    error handling and exit codes are what is tested). The output must never hold a traceback."""
    import sys

    from siso import cli
    from siso.cli import output

    # Off a terminal rich wraps at 80 columns, which would split messages (and paths) across lines.
    # Every command prints through this one console object.
    monkeypatch.setattr(output.console, "_width", 10_000)

    def run(*argv) -> tuple[int, str]:
        capsys.readouterr()  # drop whatever fixtures printed
        monkeypatch.setattr(sys, "argv", ["siso", *map(str, argv)])
        code = 0
        try:
            cli.main()
        except SystemExit as exit_:
            code = exit_.code or 0
        captured = capsys.readouterr()
        output = captured.out + captured.err
        assert "Traceback" not in output
        return code, output

    return run
