"""Wall time of one `siso bench --executor ray` with 1 worker, then with N, on the same items.

Tiny random-weight models (the test suite's builders) on a Ray cluster on this machine: a head with
no CPUs for work and N one-CPU worker nodes, each its own raylet (``ray.cluster_utils.Cluster``),
the bench a separate driver joining with ``--ray-address``, as on a real cluster. What is measured
is the executor's scaling (scheduling, model loading per worker, the driver's bookkeeping), not GPU
speed: the per-subject GPU figures are in docs/performance.md and the cost model in docs/scale.md.

    python benchmarks/ray_scaling.py                      # 2 workers vs 1, 8 subjects: ~2 min on 2 cores
    python benchmarks/ray_scaling.py --workers 4 --items 16 --max-steps 40

Writes benchmarks/results/ray-scaling-cpu.json: each run's wall time (driver start to exit, so
Ray's connection and each worker's start are in it), items per hour, and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny-model builders


def build_inputs(root: Path, items: int) -> dict[str, Path]:
    import tiny

    models = {
        "sd": tiny.diffusion.save(tiny.diffusion.sd_pipeline(), root / "sd"),
        "dino": tiny.diffusion.save(tiny.similarity.dino_model(), root / "dino"),
        "clip": tiny.metrics.clip_dir(root / "clip"),
        "detector": tiny.metrics.grounding_dino_dir(root / "detector"),
    }
    photos = tiny.photos.write_dreambench(root / "dreambench")
    classes = ("dog", "cat", "teapot")
    kinds = [classes[i % len(classes)] for i in range(items)]
    lines = [{"id": f"{kind}-{i}", "class": kind, "images": [str(photos / kind / "00.jpg")],
              "prompts": [f"a {kind} on the beach", f"a red {kind}"]} for i, kind in enumerate(kinds)]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {**models, "manifest": manifest}


def bench_once(inputs: dict[str, Path], out: Path, address: str, workers: int, max_steps: int) -> dict:
    command = [sys.executable, "-m", "siso.cli", "bench", str(inputs["manifest"]), "--out", str(out),
               "--model", str(inputs["sd"]), "--dino-model", str(inputs["dino"]), "--clip-model", str(inputs["clip"]),
               "--cmmd-model", str(inputs["clip"]), "--crop-model", str(inputs["detector"]), "--fid-features", "dino",
               "--max-steps", str(max_steps), "--early-stop-patience", str(max_steps), "--render-steps", "1",
               "--resolution", "32", "--device", "cpu", "--executor", "ray", "--ray-address", address,
               "--workers", str(workers)]
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"siso bench failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {"workers": workers, "wall_seconds": round(wall, 2), "items": len(records),
            "items_per_hour": round(len(records) / wall * 3600, 1),
            "seconds_per_item_median": sorted(r["seconds"] for r in records)[len(records) // 2],
            "nodes_used": len({r["worker"]["node"] for r in records})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="workers (and 1-CPU nodes) of the second run")
    parser.add_argument("--items", type=int, default=8, help="subjects in the benchmark (two prompts each)")
    parser.add_argument("--max-steps", type=int, default=30, help="SISO iterations per subject")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ray-scaling-cpu.json")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    with tempfile.TemporaryDirectory(prefix="siso-ray-scaling-") as scratch:
        root = Path(scratch)
        inputs = build_inputs(root, args.items)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            for _ in range(args.workers):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            runs = [bench_once(inputs, root / f"out-{n}", cluster.address, n, args.max_steps)
                    for n in (1, args.workers)]
        finally:
            cluster.shutdown()
    one, many = runs
    result = {
        "what": f"siso bench --executor ray, {args.items} tiny subjects, 1 worker vs {args.workers}",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ray": ray.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "max_steps": args.max_steps,
        "runs": runs,
        "speed_up": round(one["wall_seconds"] / many["wall_seconds"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
