"""The README's figure, made the way the test suite makes its planted-subject experiment: honest about
what it shows (a tiny random-weight model, not a real one; no real model can be downloaded here).

A tiny SD pipeline's own image under a hidden random LoRA is the "subject photo"; siso, started from the
untouched model, optimises its LoRA with the DINO + IR loss until the image is that photo again. The
figure shows the photo, iterations of the run and the loss.

    python docs/make_figure.py docs/images/planted-subject.png
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny-model kit (tests/tiny) and the planted-subject helper


def main(out: Path) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tiny
    import torch
    from helpers import plant_subject, tiny_config

    from siso.generation import start_generation

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sd = tiny.diffusion.save(tiny.diffusion.sd_pipeline(), root / "sd")
        dino = tiny.diffusion.save(tiny.similarity.dino_model(), root / "dino")
        ir = tiny.similarity.ir_dir(root / "ir")
        photos = tiny.photos.write_dreambench(root / "photos")
        config = tiny_config(sd, photos / "dog" / "00.jpg", dino, ir_model=str(ir), max_steps=30,
                             learning_rate=2e-2, early_stop_patience=30)
        target, planted, _ = plant_subject(config, root)
        run = start_generation(dataclasses.replace(config, subjects=(target,)), root / "run")
        events = list(run.steps())
        run.finish()
        run.close()
    shown = [0, 2, 5, 10, 20, len(events) - 1]
    figure = plt.figure(figsize=(10, 5.2), dpi=110)
    grid = figure.add_gridspec(3, len(shown) + 1, height_ratios=[1.15, 1.15, 1])
    panels = [("subject photo\n(planted)", planted)] + [(f"iteration {i}", events[i].image) for i in shown]
    gain = 8.0
    for column, (title, image) in enumerate(panels):
        axis = figure.add_subplot(grid[0, column])
        axis.imshow(image[0].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axis.set_title(title, fontsize=9)
        axis.axis("off")
        difference = figure.add_subplot(grid[1, column])
        gap = ((image - planted).abs() * gain).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        difference.imshow(gap, interpolation="nearest")
        difference.axis("off")
        if column == 0:
            difference.set_title(f"|render - photo| x {gain:g}", fontsize=8)
    losses = figure.add_subplot(grid[2, :])
    steps = [e.step for e in events]
    for name in ("total", "dino", "ir"):
        losses.plot(steps, [e.losses[name] for e in events], label=name, linewidth=2 if name == "total" else 1)
    losses.set_xlabel("iteration")
    losses.set_ylabel("1 - cosine")
    losses.legend(fontsize=8, loc="upper right")
    losses.grid(alpha=0.3)
    figure.suptitle("siso on a tiny random-weight test model (32 px): the LoRA is optimised until the render is "
                    "the subject photo again", fontsize=9)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    print(f"Wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "images" / "planted-subject.png")
