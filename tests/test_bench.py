"""`siso bench` end to end on tiny models: a real kill and resume, the DreamBooth manifest, Ray."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RESOLUTION
from helpers import StandInExecutor, bench_args

pytest.importorskip("torchmetrics")


from siso.config import EditSettings, GenerateSettings  # noqa: E402
from siso.errors import SisoError  # noqa: E402
from siso.eval import runner as runner_module  # noqa: E402
from siso.eval.executors import Outcome  # noqa: E402
from siso.eval.manifest import BenchItem, dreambench_items, read_manifest, write_manifest  # noqa: E402
from siso.eval.runner import read_results, run_bench  # noqa: E402
from siso.eval.settings import BenchSettings  # noqa: E402
from siso.images import pil_to_tensor  # noqa: E402

SUBJECTS = {"dog": ("dog", ["a dog in the jungle", "a dog on the beach"]),
            "cat": ("cat", ["a cat in the snow", "a red cat"])}




@pytest.fixture(scope="module")
def manifest(tmp_path_factory, dreambench) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "manifest.jsonl"
    lines = [{"id": name, "class": cls, "images": [str(dreambench / name / "00.jpg")], "prompts": prompts}
             for name, (cls, prompts) in SUBJECTS.items()]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def per_image_metrics(out: Path) -> dict[tuple, float]:
    values = {}
    for record in read_results(out):
        for image in record.get("images", []):
            for name, value in image["metrics"].items():
                values[(record["id"], image["method"], image["index"], name)] = value
    return values


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, manifest, sd_dir, dino_dir, eval_dirs) -> dict:
    """Run `siso bench` in a subprocess, SIGKILL it once the first item is finished, then rerun it."""
    out = tmp_path_factory.mktemp("bench") / "out"
    command = [sys.executable, "-m", "siso.cli", *bench_args(manifest, out, sd_dir, dino_dir, eval_dirs)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = out.parent / "first.log"
    with log.open("w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while not read_results(out):
                assert process.poll() is None, log.read_text()
                assert time.time() < deadline, "the first item never finished"
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
    at_kill = read_results(out)
    first = at_kill[0]["id"]
    second = next(name for name in SUBJECTS if name != first)
    state = {
        "out": out, "first": first, "second": second, "lines_at_kill": len(at_kill),
        "first_result": (out / "items" / first / "result.json").read_bytes(),
        "second_committed_at_kill": (out / "items" / second / "result.json").exists(),
    }
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    state["rerun_output"] = rerun.stdout + rerun.stderr
    return state


def test_killed_run_resumes_without_redoing_or_losing_items(resumed_run):
    out, first, second = resumed_run["out"], resumed_run["first"], resumed_run["second"]
    assert resumed_run["lines_at_kill"] == 1 and not resumed_run["second_committed_at_kill"]
    assert "Resuming: 1 of 2" in resumed_run["rerun_output"]
    records = read_results(out)
    assert sorted(r["id"] for r in records) == sorted(SUBJECTS)  # none lost, none twice
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in records)
    # The finished item was skipped: its committed record is byte for byte what the killed run wrote.
    assert (out / "items" / first / "result.json").read_bytes() == resumed_run["first_result"]
    by_id = {r["id"]: r for r in records}
    assert by_id[first]["worker"]["pid"] != by_id[second]["worker"]["pid"]  # the second was (re)done by the rerun
    for record in records:
        assert record["seconds"] > 0 and record["peak_memory_bytes"] > 0 and record["memory"] == "process_peak_rss"
        assert record["optimize"]["steps"] == 2 and record["optimize"]["prompt"] == f"a photo of a {record['class']}"
        assert [(i["method"], i["prompt"]) for i in record["images"]] == (
            [("siso", p) for p in SUBJECTS[record["id"]][1]] + [("plain", p) for p in SUBJECTS[record["id"]][1]])
        for image in record["images"]:
            assert (out / image["path"]).is_file()
            assert set(image["metrics"]) == {"dino", "clip_i", "clip_t", "diversity"}
        assert (out / "items" / record["id"] / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_summary_agrees_with_results(resumed_run):
    out = resumed_run["out"]
    records = read_results(out)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    overall = {row["method"]: row for row in rows if row["scope"] == "overall"}
    assert set(overall) == {"siso", "plain"}
    for method, row in overall.items():
        for name in ("dino", "clip_i", "clip_t", "diversity"):
            values = [i["metrics"][name] for r in records for i in r["images"] if i["method"] == method]
            assert len(values) == int(row["images"]) == 4
            assert float(row[name]) == pytest.approx(sum(values) / len(values), rel=1e-9)
    for row in (r for r in rows if r["scope"] == "subject"):
        record = next(r for r in records if r["id"] == row["subject"])
        values = [i["metrics"]["dino"] for i in record["images"] if i["method"] == row["method"]]
        assert float(row["dino"]) == pytest.approx(sum(values) / 2, rel=1e-9)
        assert float(row["seconds"]) == pytest.approx(record["seconds"])
    # siso is measured against the plain model's images; the reference set gets no row of its own.
    assert all(overall["siso"][k] != "" for k in ("fid", "kid", "kid_std", "cmmd"))
    assert all(overall["plain"][k] == "" for k in ("fid", "kid", "cmmd"))
    assert float(overall["siso"]["seconds"]) == pytest.approx(sum(r["seconds"] for r in records) / 2)
    markdown = (out / "summary.md").read_text()
    assert "DINO ↑" in markdown and "FID ↓" in markdown and "peak resident memory" in markdown


def test_rerun_with_other_settings_is_refused(run_siso, monkeypatch, resumed_run, manifest, sd_dir, dino_dir,
                                              eval_dirs):
    args = bench_args(manifest, resumed_run["out"], sd_dir, dino_dir, eval_dirs)
    args[args.index("--max-steps") + 1] = "3"
    code, text = run_siso(*args)
    assert code == 2 and "different settings" in text and "--max-steps 2 -> 3" in " ".join(text.split())


def test_ray_executor_gives_the_local_results(run_siso, monkeypatch, tmp_path, resumed_run, manifest, sd_dir,
                                               dino_dir, eval_dirs):
    pytest.importorskip("ray")
    # The same two subjects, plus one whose photo is not an image: retried once, then recorded as failed.
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a photo")
    items = read_manifest(manifest) + [BenchItem(id="broken", class_name="dog", images=(broken,),
                                                 prompts=("a dog",))]
    ray_manifest = write_manifest(items, tmp_path / "manifest.jsonl")
    out = tmp_path / "ray"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, text = run_siso(*bench_args(ray_manifest, out, sd_dir, dino_dir, eval_dirs,
                                                          "--executor", "ray", "--workers", "2"))
    assert code == 4, text  # a benchmark with a failed item says so to scripts
    assert "1 item(s) failed" in text
    records = {r["id"]: r for r in read_results(out)}
    assert records["broken"]["status"] == "failed" and records["broken"]["attempts"] == 2
    assert "broken.jpg" in records["broken"]["error"]
    assert "Retrying" in text and "Failed" in text
    local, remote = per_image_metrics(resumed_run["out"]), per_image_metrics(out)
    assert local.keys() == remote.keys()
    for key, value in local.items():  # the runs are deterministic on the CPU
        assert remote[key] == pytest.approx(value, abs=1e-6), key
    rows = {(r["scope"], r["method"]): r for r in csv.DictReader((out / "summary.csv").open())}
    local_rows = {(r["scope"], r["method"]): r for r in csv.DictReader((resumed_run["out"] / "summary.csv").open())}
    for name in ("fid", "kid", "cmmd"):  # near 0 here (2 tiny steps), so compared absolutely
        assert float(rows[("overall", "siso")][name]) == pytest.approx(
            float(local_rows[("overall", "siso")][name]), rel=1e-4, abs=1e-6)
    assert "broken" in (out / "summary.md").read_text()


def test_failed_items_are_retried_once_then_recorded(monkeypatch, tmp_path, subject_photo):
    """The runner's policy with a stand-in executor: one flaky item, one broken, one fine."""
    items = [BenchItem(id=name, class_name="dog", images=(subject_photo,), prompts=("a dog",))
             for name in ("fine", "flaky", "broken")]
    calls: list[str] = []

    class StandIn(StandInExecutor):
        def outcome(self, item):
            calls.append(item.id)
            if item.id == "broken" or (item.id == "flaky" and calls.count("flaky") == 1):
                return Outcome(item, None, "RuntimeError: boom")
            return super().outcome(item)

    monkeypatch.setattr(runner_module, "make_executor", StandIn)
    settings = BenchSettings(run=GenerateSettings(device="cpu"))
    report = run_bench(items, settings, tmp_path / "out")
    assert calls == ["fine", "flaky", "broken", "flaky", "broken"]
    assert report.done == ["fine", "flaky"] and report.failed == ["broken"]
    records = {r["id"]: r for r in read_results(tmp_path / "out")}
    assert records["flaky"]["attempts"] == 2 and records["broken"]["error"] == "RuntimeError: boom"
    assert "broken: RuntimeError: boom" in (tmp_path / "out" / "summary.md").read_text()
    # A rerun skips the finished items and tries the failed one again.
    calls.clear()
    report = run_bench(items, settings, tmp_path / "out")
    assert calls == ["broken", "broken"] and report.skipped == 2


def test_a_lost_worker_is_not_the_items_failure_unless_it_keeps_happening(monkeypatch, tmp_path, subject_photo):
    """The runner's policy: an item whose worker is lost runs again without using up its retry; one that
    loses its worker every time (it is what kills them, say) is failed after MAX_WORKER_LOSSES, then retried."""
    items = [BenchItem(id=name, class_name="dog", images=(subject_photo,), prompts=("a dog",))
             for name in ("unlucky", "killer")]
    calls: list[str] = []
    notes: list[str] = []

    class StandIn(StandInExecutor):
        def start(self):
            self.note("2 workers")
            return super().start()

        def outcome(self, item):
            calls.append(item.id)
            if item.id == "killer" or calls.count("unlucky") <= 2:
                return Outcome(item, None, "worker 1 was lost: its node died", lost_worker=True)
            return super().outcome(item)

    class Watching(runner_module._Silent):
        def note(self, message):
            notes.append(message)

        def item_requeued(self, item, error):
            notes.append(f"again: {item.id}")

    monkeypatch.setattr(runner_module, "make_executor", StandIn)
    report = run_bench(items, BenchSettings(run=GenerateSettings(device="cpu")), tmp_path / "out", progress=Watching())
    records = {r["id"]: r for r in read_results(tmp_path / "out")}
    assert records["unlucky"]["status"] == "done" and records["unlucky"]["attempts"] == 1
    assert records["unlucky"]["workers_lost"] == 2
    losses = runner_module.MAX_WORKER_LOSSES
    # killer: requeued until its losses reach the limit, then an ordinary failure with its one retry
    assert calls.count("killer") == losses + 1 and report.failed == ["killer"]
    assert records["killer"]["attempts"] == 2 and records["killer"]["workers_lost"] == losses + 1
    assert notes[0] == "2 workers" and notes.count("again: unlucky") == 2
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "items done: 1, failed: 1" in summary
    assert f"workers lost under an item (it ran again): {losses + 3}" in summary


def test_dreambench_manifest_from_a_dreambooth_layout(dreambench, tmp_path):
    """The reader on conftest's synthetic dataset/ folder (DreamBooth's layout and file format)."""
    items = dreambench_items(dreambench)
    assert [item.id for item in items] == ["dog", "cat", "teapot"]  # the table's order
    by_id = {item.id: item for item in items}
    dog, teapot = by_id["dog"], by_id["teapot"]
    assert dog.class_name == "dog" and dog.extra["live"] and by_id["cat"].extra["live"]
    assert dog.subject_photo == (dreambench / "dog" / "00.jpg").resolve()
    assert [p.name for p in dog.images] == ["00.jpg", "01.jpg"]
    # Live subjects get the second list, objects the first; the unique token is dropped.
    assert dog.prompts == ("a dog in the jungle", "a dog wearing a red hat", "a red dog")
    assert not teapot.extra["live"] and teapot.class_name == "teapot"
    assert teapot.prompts == ("a teapot in the jungle", "a teapot on the beach", "a red teapot")
    # The checkout root works as well as its dataset/ folder.
    assert [i.to_record() for i in dreambench_items(dreambench.parent)] == [i.to_record() for i in items]
    # A subject the table lists without photos, and a folder without the file, are clear errors.
    broken = tmp_path / "dataset"
    shutil.copytree(dreambench, broken)
    shutil.rmtree(broken / "teapot")
    with pytest.raises(SisoError, match="lists the subject 'teapot'"):
        dreambench_items(broken)
    with pytest.raises(SisoError, match="has no prompts_and_classes.txt"):
        dreambench_items(dreambench / "dog")


def test_dreambench_manifest_from_the_real_file(real_dreambench):
    """The real DreamBooth dataset: 30 subjects, 25 prompts each (skipped, saying so, where it is absent)."""
    items = dreambench_items(real_dreambench)
    assert len(items) == 30 and all(len(item.prompts) == 25 for item in items)
    assert sum(len(item.prompts) for item in items) == 750
    by_id = {item.id: item for item in items}
    dog = by_id["dog"]
    assert dog.class_name == "dog" and dog.extra["live"]
    assert dog.subject_photo == (real_dreambench / "dog" / "00.jpg").resolve()
    assert dog.prompts[0] == "a dog in the jungle" and "a dog wearing a red hat" in dog.prompts
    assert dog.prompts[-1] == "a cube shaped dog"
    assert by_id["bear_plushie"].class_name == "stuffed animal"
    assert by_id["bear_plushie"].prompts[1] == "a stuffed animal in the snow"
    assert "a backpack with a wheat field in the background" in by_id["backpack_dog"].prompts
    assert not by_id["backpack"].extra["live"] and "a backpack wearing a red hat" not in by_id["backpack"].prompts
    assert by_id["pink_sunglasses"].class_name == "glasses"
    assert sum(item.extra["live"] for item in items) == 9  # DreamBooth's cats and dogs
    assert [p.name for p in by_id["duck_toy"].images] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]
    # The checkout root works as well as its dataset/ folder.
    assert [i.to_record() for i in dreambench_items(real_dreambench.parent)] == [i.to_record() for i in items]


def test_dreambench_option_mistakes(run_siso, monkeypatch, tmp_path, dreambench):
    out = tmp_path / "out"
    code, text = run_siso("bench", "--dreambench", str(dreambench), "--out", str(out),
                         "--subjects", "dog,cat", "--max-prompts", "3", "--task", "edit")
    assert code == 2 and 'has no "scene"' in text  # DreamBooth's manifest is for generation
    code, text = run_siso("bench", "--dreambench", str(dreambench), "--out", str(out),
                         "--task", "edit", "--baseline", "plain")
    assert code == 2 and "--baseline plain is for --task generate" in text
    code, text = run_siso("bench", "--dreambench", str(dreambench), "--out", str(out),
                         "--subjects", "unicorn")
    assert code == 2 and "unicorn" in text
    code, text = run_siso("bench", "--out", str(out))
    assert code == 2 and "--dreambench" in text


def test_manifest_mistakes_are_reported(tmp_path, subject_photo):
    path = tmp_path / "m.jsonl"
    cases = {
        '{"id": "a", "class": "dog", "images": ["%s"], "prompts": ["x"]}\n' * 2: "appears twice",
        '{"id": "a", "images": ["%s"], "prompts": ["x"]}\n': "no \"class\"",
        '{"id": "../up", "class": "dog", "images": ["%s"]}\n': "names a folder",
        '{"id": "a", "class": "dog"}\n': "no subject photo",
        'not json\n': "not valid JSON",
    }
    for text, message in cases.items():
        path.write_text(text.replace("%s", str(subject_photo)))
        with pytest.raises(SisoError, match=message):
            read_manifest(path)
    path.write_text(json.dumps({"class": "dog", "images": ["missing.jpg"], "prompts": ["x"]}) + "\n")
    items = read_manifest(path)
    assert items[0].id == tmp_path.name  # the id defaults to the photo's folder
    with pytest.raises(SisoError, match="does not exist"):
        run_bench(items, BenchSettings(run=GenerateSettings(device="cpu")), tmp_path / "out")


def test_fid_default_needs_torch_fidelity(run_siso, monkeypatch, tmp_path, manifest):
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        code, text = run_siso("bench", str(manifest), "--out", str(tmp_path / "out"),
                             "--baseline", "plain")
        assert code == 2 and "torch-fidelity" in text and not (tmp_path / "out").exists()
    else:  # pragma: no cover - environments with torch-fidelity
        pytest.skip("torch-fidelity is installed")


def test_the_cli_loads_no_benchmark_libraries_until_asked():
    code = ("import sys, siso.cli, siso.eval; "
            "print(sorted(m for m in ('torchmetrics', 'ray', 'torch') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"


def test_edit_benchmark_measures_the_background_outside_the_mask(monkeypatch, tmp_path, sd_dir, dino_dir, eval_dirs,
                                                                subject_photo, scene_photo):
    """--task edit through siso.editing, with a given mask and an injected LPIPS network."""
    import numpy as np
    from PIL import Image

    from siso.eval import metrics as metrics_module

    def squared_difference(a, b):
        return (a - b).square().mean(dim=(1, 2, 3))

    monkeypatch.setattr(metrics_module, "default_lpips_net", lambda net_type="alex": squared_difference)
    width, height = Image.open(scene_photo).size
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255  # the cat to replace, roughly
    Image.fromarray(mask).save(tmp_path / "mask.png")
    item = BenchItem(id="dog-for-cat", class_name="dog", images=(subject_photo,),
                     scene=scene_photo, scene_class="cat", scene_mask=tmp_path / "mask.png")
    settings = BenchSettings(task="edit", run=EditSettings(model=str(sd_dir), dino_model=str(dino_dir), max_steps=1,
                                                           resolution=RESOLUTION, device="cpu"),
                             clip_model=str(eval_dirs["clip"]), cmmd_model=str(eval_dirs["clip"]),
                             crop_model=str(eval_dirs["detector"]), fid_features="dino")
    out = tmp_path / "out"
    report = run_bench([item], settings, out)
    assert report.done == ["dog-for-cat"]
    (record,) = read_results(out)
    assert record["labels"] == {"subject": "dog", "input": "cat"} and record["optimize"]["steps"] == 1
    (image,) = record["images"]
    assert image["prompt"] == "a photo of a dog"
    assert set(image["metrics"]) == {"dino", "clip_i", "clip_t", "diversity", "lpips"}
    # BG-LPIPS by hand from the files: the edit against the framed scene, the object's region grey in both.
    run = out / "items" / "dog-for-cat" / "run"
    edited, scene = pil_to_tensor(Image.open(out / image["path"])), pil_to_tensor(Image.open(run / "input.png"))
    background = 1.0 - (pil_to_tensor(Image.open(run / "mask.png").convert("RGB"))[:, :1] > 0.5).float()
    assert 0 < background.mean() < 1
    expected = squared_difference((2 * edited - 1) * background, (2 * scene - 1) * background).item()
    assert image["metrics"]["lpips"] == pytest.approx(expected, rel=1e-5)
    summary = (out / "summary.md").read_text()
    assert "BG-LPIPS ↓" in summary and "could not be computed" in summary  # FID needs 2 images; here is 1
