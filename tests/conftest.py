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
import tiny_models  # noqa: E402
import torch  # noqa: E402

# DreamBooth photos (CC-BY 4.0) are never committed: they come from the project's shared folder beside
# the checkout, or from SISO_DREAMBENCH (the dataset/ folder of a google/dreambooth checkout).
_SHARED_DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench" / "dataset"
DREAMBENCH = Path(os.environ.get("SISO_DREAMBENCH", _SHARED_DREAMBENCH))
RESOLUTION = 32  # tiny models: 32 px images, 16 px latents


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory) -> Path:
    return tiny_models.save(tiny_models.sd_pipeline(), tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory) -> Path:
    return tiny_models.save(tiny_models.sdxl_pipeline(), tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session", params=["sd", "sdxl"])
def model_dir(request, sd_dir, sdxl_dir) -> Path:
    return {"sd": sd_dir, "sdxl": sdxl_dir}[request.param]


@pytest.fixture(scope="session")
def dino_dir(tmp_path_factory) -> Path:
    return tiny_models.save(tiny_models.dino_model(), tmp_path_factory.mktemp("tiny-dino"))


@pytest.fixture(scope="session")
def ir_dir(tmp_path_factory) -> Path:
    return tiny_models.ir_dir(tmp_path_factory.mktemp("tiny-ir"))


@pytest.fixture(scope="session")
def subject_photo() -> Path:
    """A real DreamBooth photo (CC-BY 4.0, from ../shared; never copied into the repository)."""
    path = DREAMBENCH / "dog" / "00.jpg"
    if not path.exists():
        pytest.fail(f"{path} is missing: set SISO_DREAMBENCH to the dataset/ folder of a google/dreambooth checkout")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def run_siso(monkeypatch, capsys):
    """``run_siso(*argv) -> (exit code, output)``: the CLI in-process, through ``main()`` (so its
    error handling and exit codes are what is tested). The output must never hold a traceback."""
    import sys

    from rich.console import Console

    from siso import cli

    # Off a terminal rich wraps at 80 columns, which would split messages (and paths) across lines.
    monkeypatch.setattr(cli, "console", Console(stderr=True, width=10_000))

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
