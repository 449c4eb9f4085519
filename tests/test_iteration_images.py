"""--no-iteration-images: a run without steps/, and otherwise the very run it would have been."""

from __future__ import annotations

import json

from helpers import bench_args, generate_args
from safetensors.torch import load_file

from siso.eval.results import read_results
from siso.lora import DIFFUSERS_WEIGHT_NAME


def test_a_run_without_iteration_images_is_the_same_run_without_steps(run_siso, tmp_path, sd_dir, dino_dir,
                                                                      subject_photo):
    runs = {}
    for name, flag in (("with", "--iteration-images"), ("without", "--no-iteration-images")):
        out = tmp_path / name
        code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--lr", "5e-3", "--max-steps", "4",
                                             "--ir-model", "none", flag))
        assert code == 0, text
        runs[name] = out
    with_steps, without = runs["with"], runs["without"]
    assert sorted(p.name for p in (with_steps / "steps").iterdir()) == [f"{i:04d}.png" for i in range(4)]
    assert not (without / "steps").exists()
    records = {name: json.loads((out / "run.json").read_text()) for name, out in runs.items()}
    assert records["without"]["config"]["iteration_images"] is False
    assert records["with"]["config"]["iteration_images"] is True
    for key in ("best_step", "lora_step", "stop_reason"):
        assert records["without"][key] == records["with"][key], key
    strip = [{k: v for k, v in entry.items() if k != "seconds"} for entry in records["without"]["losses"]]
    assert strip == [{k: v for k, v in entry.items() if k != "seconds"} for entry in records["with"]["losses"]]
    # The same best image and the same LoRA, tensor for tensor.
    assert (without / "best.png").read_bytes() == (with_steps / "best.png").read_bytes()
    lora_with, lora_without = (load_file(out / "lora" / DIFFUSERS_WEIGHT_NAME) for out in (with_steps, without))
    assert lora_with.keys() == lora_without.keys()
    assert all(lora_with[key].equal(lora_without[key]) for key in lora_with)
    assert (without / "losses.png").is_file()


def test_a_benchmark_without_iteration_images_writes_no_steps(run_siso, tmp_path, sd_dir, dino_dir, eval_dirs,
                                                             subject_photo):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"id": "dog", "class": "dog", "images": [str(subject_photo)],
                                    "prompts": ["a dog on the beach"]}) + "\n")
    out = tmp_path / "bench"
    code, text = run_siso(*bench_args(manifest, out, sd_dir, dino_dir, eval_dirs, "--no-iteration-images"))
    assert code == 0, text
    [record] = read_results(out)
    assert record["status"] == "done"
    run_dir = out / "items" / "dog" / "run"
    assert (run_dir / "best.png").is_file() and (run_dir / "lora" / DIFFUSERS_WEIGHT_NAME).is_file()
    assert not (run_dir / "steps").exists()
