"""One writer per directory: a run or benchmark directory another process is writing is refused (with who
writes it), `--overwrite` included; a killed writer leaves no lock; `siso bench` writes only its own
directories. Real second processes throughout: the lock is the OS's, between processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import StandInExecutor
from test_nothing_lost import generate_args, start_run, strict_json, wait_for_step

from siso.config import GenerateSettings
from siso.errors import SisoError
from siso.eval import runner as runner_module
from siso.eval.manifest import BenchItem
from siso.eval.runner import read_results, run_bench
from siso.eval.settings import BenchSettings
from siso.locks import LOCK_FILE

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows: siso locks nothing there")


def test_a_run_being_written_refuses_a_second_writer_even_with_overwrite(run_siso, tmp_path, sd_dir, dino_dir,
                                                                         subject_photo):
    out = tmp_path / "run"
    first = start_run(tmp_path, sd_dir, dino_dir, subject_photo, out)
    try:
        wait_for_step(first, out, 2)
        code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--overwrite", "--max-steps", "2"))
        assert code == 2, text
        text = " ".join(text.split())
        assert f"is being written by another siso process (process {first.pid} on" in text and "generate" in text
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    record = strict_json(out / "run.json")  # the first run, whole: nothing of the refused one in it
    assert record["status"] == "finished" and record["config"]["max_steps"] == 500
    steps = sorted(p.name for p in (out / "steps").iterdir())
    assert steps == [f"{i:04d}.png" for i in range(len(record["losses"]))]
    # Once the first writer is gone, --overwrite replaces its run as usual.
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--overwrite", "--max-steps", "2"))
    assert code == 0, text
    assert strict_json(out / "run.json")["config"]["max_steps"] == 2


def test_a_killed_writer_leaves_no_lock(run_siso, tmp_path, sd_dir, dino_dir, subject_photo):
    out = tmp_path / "run"
    first = start_run(tmp_path, sd_dir, dino_dir, subject_photo, out)
    try:
        wait_for_step(first, out, 1)
        first.kill()  # SIGKILL: no handler runs, the OS drops the lock
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert (out / LOCK_FILE).is_file()  # the file stays; the lock on it died with its process
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--overwrite", "--max-steps", "2"))
    assert code == 0, text


@pytest.fixture
def bench(monkeypatch, subject_photo):
    monkeypatch.setattr(runner_module, "make_executor", StandInExecutor)
    items = [BenchItem(id=name, class_name="dog", images=(subject_photo,), prompts=("a dog",))
             for name in ("dog", "cat")]
    settings = BenchSettings(run=GenerateSettings(device="cpu"))
    return lambda out, **options: run_bench(items, settings, out, **options)


def test_bench_refuses_a_directory_that_is_not_a_siso_benchmark(bench, tmp_path, run_siso, sd_dir, dino_dir,
                                                                subject_photo):
    own = tmp_path / "mine"
    (own / "items" / "dog").mkdir(parents=True)
    (own / "items" / "dog" / "precious.txt").write_text("keep me")
    (own / "results.jsonl").write_text('{"id": "dog", "mine": true}\n')
    with pytest.raises(SisoError, match="is not a siso benchmark"):
        bench(own)
    with pytest.raises(SisoError, match="is not a siso benchmark"):
        bench(own, overwrite=True)
    assert (own / "items" / "dog" / "precious.txt").read_text() == "keep me"
    assert (own / "results.jsonl").read_text() == '{"id": "dog", "mine": true}\n'
    assert not (own / "summary.md").exists() and not (own / LOCK_FILE).exists()
    # A generate run is not a benchmark either.
    run = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, run, "--max-steps", "1"))
    assert code == 0, text
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(SisoError, match="is not a siso benchmark"):
        bench(run)
    assert sorted(p.name for p in run.iterdir()) == before


def test_bench_overwrite_starts_its_own_benchmark_afresh(bench, tmp_path):
    out = tmp_path / "bench"
    bench(out)
    first = read_results(out)
    assert [r["id"] for r in first] == ["dog", "cat"]
    report = bench(out)  # resumed: nothing to do
    assert report.skipped == 2 and len(read_results(out)) == 2
    (out / "items" / "dog" / "from-the-first-run").write_text("")
    report = bench(out, overwrite=True)
    assert report.skipped == 0 and report.done == ["dog", "cat"]
    again = read_results(out)
    assert [r["id"] for r in again] == ["dog", "cat"] and again[0]["finished_at"] >= first[-1]["finished_at"]
    assert not (out / "items" / "dog" / "from-the-first-run").exists()  # the items were made again, not kept


def test_two_benchmarks_on_one_directory_the_second_is_refused(bench, tmp_path):
    out = tmp_path / "bench"
    bench(out)  # a siso benchmark
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from siso.locks import lock_directory; "
        f"lock_directory(Path({str(out)!r})); print('locked', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        lines = (out / "results.jsonl").read_text()
        with pytest.raises(SisoError, match=f"being written by another siso process \\(process {holder.pid} on"):
            bench(out)
        with pytest.raises(SisoError, match="being written by another siso process"):
            bench(out, overwrite=True)
        assert (out / "results.jsonl").read_text() == lines  # nothing run twice, nothing removed
    finally:
        holder.kill()
        holder.wait(timeout=30)
    deadline = time.time() + 10
    while True:  # the killed holder's lock is gone with it
        try:
            assert bench(out).skipped == 2
            break
        except SisoError:
            assert time.time() < deadline
            time.sleep(0.1)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
