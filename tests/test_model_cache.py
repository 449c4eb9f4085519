"""A cached backbone is lent out and comes back clean: whatever ran on it before, a generation, an edit,
a render and a benchmark item give exactly what they give on a freshly loaded model; and a run paused
between two of its iterations (the web app between Start and Continue) is not disturbed by what other
runs do on the same model meanwhile."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import RESOLUTION
from helpers import tiny_config
from PIL import Image
from safetensors.torch import load_file

from siso.config import EditConfig, GenerateSettings
from siso.editing import run_edit
from siso.eval.manifest import BenchItem
from siso.eval.settings import BenchSettings
from siso.eval.worker import generate_item
from siso.generation import run_generation, start_generation
from siso.images import pil_to_tensor
from siso.models import ModelCache
from siso.rendering import render

CPU = torch.device("cpu")


def de_bruijn(symbols: str) -> str:
    """A sequence in which every ordered pair of ``symbols`` (a symbol followed by itself too) follows
    each other exactly once: what ran before each operation, in every combination, in one pass."""
    k, sequence, word = len(symbols), [], [0, 0, 0]

    def extend(t: int, p: int) -> None:  # the classic recursive construction (Lyndon words), order 2
        if t > 2:
            if 2 % p == 0:
                sequence.extend(word[1 : p + 1])
            return
        word[t] = word[t - p]
        extend(t + 1, p)
        for j in range(word[t - p] + 1, k):
            word[t] = j
            extend(t + 1, t)

    extend(1, 1)
    order = [symbols[i] for i in sequence]
    return "".join(order + order[:1])  # wrap around: the last pair too


def test_the_sequence_holds_every_ordered_pair():
    sequence = de_bruijn("GERB")
    pairs = [sequence[i : i + 2] for i in range(len(sequence) - 1)]
    assert sorted(pairs) == sorted(a + b for a in "GERB" for b in "GERB") and len(sequence) == 17


@pytest.fixture(scope="module")
def operations(sd_dir, dino_dir, subject_photo, scene_photo, tmp_path_factory):
    """``name -> operation(cache, directory) -> what it produced, as tensors``."""
    root = tmp_path_factory.mktemp("lease")
    size = Image.open(scene_photo).size
    mask = np.zeros(size[::-1], np.uint8)
    mask[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = 255
    Image.fromarray(mask).save(root / "mask.png")
    # A LoRA to render with, learned once (with text-encoder LoRA, so a render loads that too).
    lora = run_generation(tiny_config(sd_dir, subject_photo, dino_dir, max_steps=3, train_text_encoder=True),
                          root / "lora-run").lora_dir

    def outputs(result) -> dict[str, torch.Tensor]:
        state = load_file(result.lora_dir / "pytorch_lora_weights.safetensors")
        return {"losses": torch.tensor([h["total"] for h in result.history]),
                "best": pil_to_tensor(Image.open(result.run_dir / "best.png")), **state}

    def generate(cache, directory):
        config = tiny_config(sd_dir, subject_photo, dino_dir, max_steps=3, train_text_encoder=True)
        return outputs(run_generation(config, directory / "run", cache=cache))

    def edit(cache, directory):
        config = EditConfig(subject=subject_photo, input=scene_photo, subject_class="dog", input_class="cat",
                            mask=root / "mask.png", model=str(sd_dir), dino_model=str(dino_dir),
                            resolution=RESOLUTION, device="cpu", max_steps=3, learning_rate=5e-3)
        result = run_edit(config, directory / "run", cache=cache)
        return {**outputs(result), "reconstruction": result.task.reconstruction}

    def render_with_lora(cache, directory):
        image = render(str(sd_dir), "a dog on the beach", lora=lora, cache=cache, steps=2, resolution=RESOLUTION,
                       device="cpu")
        return {"image": pil_to_tensor(image)}

    def bench_item(cache, directory):
        settings = BenchSettings(run=GenerateSettings(model=str(sd_dir), dino_model=str(dino_dir), max_steps=2,
                                                      learning_rate=5e-3, resolution=RESOLUTION, device="cpu"),
                                 render_steps=1, baseline="plain")
        worker = SimpleNamespace(settings=settings, cache=cache, device=CPU, dtype=torch.float32, out=directory)
        item = BenchItem(id="dog", class_name="dog", images=(subject_photo,), prompts=("a dog", "a dog on a sofa"))
        made = generate_item(worker, item, directory / "item")
        return {f"{method}-{i}": image for method, images in made.methods.items()
                for i, image in enumerate(images.images)}

    return {"G": generate, "E": edit, "R": render_with_lora, "B": bench_item}


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys(), what
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{what}: {key} differs from a fresh model's"


def test_every_order_on_one_cached_backbone_gives_fresh_results(operations, tmp_path):
    fresh = {name: run(ModelCache(), tmp_path / f"fresh-{name}") for name, run in operations.items()}
    cache = ModelCache()
    sequence = de_bruijn("".join(operations))
    for index, name in enumerate(sequence):
        got = operations[name](cache, tmp_path / f"{index:02d}-{name}")
        before = sequence[index - 1] if index else "nothing"
        assert_same(got, fresh[name], f"{name} after {before} (step {index} of {sequence})")
    # Nothing is lent out once they are all done, and the model carries no adapter.
    assert not cache._holders
    (backbone,) = cache._backbones.values()
    assert all(not getattr(module, "peft_config", None) for module in backbone.lora_modules().values())


def test_a_paused_run_continues_as_if_alone(operations, sd_dir, dino_dir, subject_photo, tmp_path):
    """Tab A starts (2 iterations) and pauses; tab B generates, edits and renders on the same model; tab A's
    Continue (2 more) then gives exactly what A gives with nothing in between, iteration by iteration."""

    def paused_run(cache, meanwhile):
        config = tiny_config(sd_dir, subject_photo, dino_dir, max_steps=2, train_text_encoder=True,
                             early_stop_patience=10)
        run = start_generation(config, tmp_path / f"a-{len(meanwhile)}", cache=cache)
        first = list(run.steps())
        run.finish()
        for name in meanwhile:
            operations[name](cache, tmp_path / f"meanwhile-{name}")
        run.session.optimization.extend(2)
        second = list(run.steps())
        result = run.finish()
        run.close()
        images = [e.image for e in first + second]
        return [e.losses["total"] for e in first + second], images, load_file(
            result.lora_dir / "pytorch_lora_weights.safetensors")

    alone = paused_run(ModelCache(), "")
    shared = paused_run(ModelCache(), "GERB")
    assert shared[0] == alone[0] and len(alone[0]) == 4
    assert all(torch.equal(a, b) for a, b in zip(shared[1], alone[1], strict=True))
    assert alone[2].keys() == shared[2].keys() and all(torch.equal(alone[2][k], shared[2][k]) for k in alone[2])


def test_a_busy_backbone_is_not_lent_twice(sd_dir, dino_dir, subject_photo, tmp_path):
    """While a run iterates, another borrower of the same model is refused (not silently interleaved)."""
    from siso.errors import SisoError

    cache = ModelCache()
    run = start_generation(tiny_config(sd_dir, subject_photo, dino_dir, max_steps=3), tmp_path / "a", cache=cache)
    steps = run.steps()
    next(steps)  # the run is mid-iteration: busy
    with pytest.raises(SisoError, match="in use by another run"), cache.lease(str(sd_dir), CPU, torch.float32):
        pass
    for _ in steps:
        pass
    run.finish()
    run.close()
    with cache.lease(str(sd_dir), CPU, torch.float32) as backbone:  # handed back: lent again
        assert backbone.model_id == str(sd_dir)
