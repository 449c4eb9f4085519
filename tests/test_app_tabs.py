"""Two tabs of the web app on one cached backbone: whatever order their buttons are pressed in, each tab
gets exactly what it gets alone. Driven through the app's own button handlers (what gradio calls), so the
app's sessions, its model cache and its run directories are all in play."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from conftest import RESOLUTION
from PIL import Image
from safetensors.torch import load_file

from siso.images import pil_to_tensor

pytest.importorskip("gradio")

# Tab A: Start, then Continue. Tab B: Start, Render with its LoRA, then Continue. Different seeds and prompts,
# so a tab that got the other's LoRA, optimiser state or image would be told apart.
TABS = {"A": ("start", "continue"), "B": ("start", "render", "continue")}
PROMPTS = {"A": "a photo of a dog", "B": "a dog on the beach"}
SEEDS = {"A": 1, "B": 2}
STEPS = 2  # iterations a Start runs; a Continue runs as many more (the server's per-job cap)


def interleavings() -> list[str]:
    """Every order of the tabs' presses that keeps each tab's own order: 10 for 2 + 3 presses."""
    orders = []
    for places in itertools.combinations(range(5), len(TABS["A"])):
        orders.append("".join("A" if i in places else "B" for i in range(5)))
    return orders


def test_there_are_ten_orders():
    orders = interleavings()
    assert len(orders) == len(set(orders)) == 10 and "AABBB" in orders and "BBBAA" in orders


@pytest.fixture(scope="module")
def press(sd_dir, dino_dir, subject_photo, tmp_path_factory):
    """``press(app, tab, button)`` -> what the tab then shows, as tensors."""
    from siso.app import SisoApp

    def make_app(name: str) -> SisoApp:
        from siso.app import AppSettings

        return SisoApp(AppSettings(model=str(sd_dir), dino_model=str(dino_dir), resolution=RESOLUTION,
                                   max_steps=STEPS, device="cpu", runs_dir=tmp_path_factory.mktemp(name),
                                   max_job_steps=2 * STEPS))

    def run(app: SisoApp, tab: str, button: str) -> dict[str, torch.Tensor]:
        request = SimpleNamespace(session_hash=tab)
        if button == "start":  # the generate controls: seed, resolution, max steps, lr, patience
            views = list(app.start(request, [str(subject_photo)], PROMPTS[tab], str(sd_dir), SEEDS[tab], RESOLUTION,
                                   STEPS, 5e-3, 10))
        elif button == "continue":
            views = list(app.resume(request))
        else:  # the render controls: steps, seed, resolution
            path, _ = app.render(request, str(sd_dir), None, True, PROMPTS[tab], 2, SEEDS[tab], RESOLUTION)
            return {"render": pil_to_tensor(Image.open(path))}
        status = views[-1][4]
        assert "**Finished**" in status, status
        session = app.session(request)
        shown = {f"iteration-{e.step}": e.image for e in session.events}
        shown["losses"] = torch.tensor([e.losses["total"] for e in session.events])
        shown["best"] = pil_to_tensor(Image.open(session.run.out_dir / "best.png"))
        lora = load_file(session.run.out_dir / "lora" / "pytorch_lora_weights.safetensors")
        return {**shown, **{f"lora:{key}": value for key, value in lora.items()}}

    run.make_app = make_app
    return run


def test_every_order_of_two_tabs_presses_gives_each_tab_what_it_gets_alone(press):
    alone = {}
    for tab, buttons in TABS.items():
        app = press.make_app(f"alone-{tab}")
        alone[tab] = [press(app, tab, button) for button in buttons]
    assert len(alone["A"][1]["losses"]) == 2 * STEPS  # Continue added its iterations to the same run
    assert not torch.equal(alone["A"][0]["best"], alone["B"][0]["best"])  # the tabs are told apart

    for order in interleavings():
        app = press.make_app(f"order-{order}")
        pressed = {tab: 0 for tab in TABS}
        for tab in order:
            button = TABS[tab][pressed[tab]]
            got, expected = press(app, tab, button), alone[tab][pressed[tab]]
            assert got.keys() == expected.keys(), (order, tab, button)
            for key in expected:
                assert torch.equal(got[key], expected[key]), f"order {order}: tab {tab}'s {button} differs in {key}"
            pressed[tab] += 1
