"""`siso bench --executor ray` on a real multi-node Ray cluster on this machine, as an operator runs it.

Ray's own multi-node fixture (``ray.cluster_utils.Cluster``) starts a head with no CPUs for work and
worker nodes of one CPU each, every node its own raylet and object store. The bench is a separate
driver process that joins with ``--ray-address``, as a user's would; nodes are removed (their raylet
and workers killed) or added while it runs, and the driver itself is SIGKILLed and run again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torchmetrics")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from helpers import bench_args  # noqa: E402

from siso.eval.results import read_results  # noqa: E402

ITEMS = ("dog", "cat", "teapot", "dog-again")  # four subjects, two prompts each
DEADLINE = 150  # seconds a bench on four tiny items may take here, whatever happens to the cluster


def new_cluster():
    """A head with no CPUs (it schedules, it runs no item) that notices a lost node within about a second
    (Ray's default health check takes ~30 s)."""
    quick = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300, "health_check_timeout_ms": 300,
             "health_check_failure_threshold": 3}
    return cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": quick})


@pytest.fixture(scope="module")
def cluster():
    """One head for the module; each test adds and removes its worker nodes."""
    head = new_cluster()
    yield head
    head.shutdown()


@pytest.fixture
def workers(cluster):
    """``add()`` a 1-CPU worker node (returns it); every node a test added is removed after it."""
    added = []

    class Nodes:
        def add(self):
            node = cluster.add_node(num_cpus=1)
            added.append(node)
            return node

        def remove(self, node):
            cluster.remove_node(node, allow_graceful=False)  # its raylet and workers killed, as a lost machine
            added.remove(node)

    yield Nodes()
    for node in list(added):
        cluster.remove_node(node, allow_graceful=False)
    # The next test starts on a cluster that knows these nodes are gone.
    deadline = time.time() + 30
    head = cluster.head_node.node_id
    while any(entry["Alive"] for entry in cluster.global_state.node_table() if entry["NodeID"] != head):
        assert time.time() < deadline, "the head never noticed the removed nodes"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, dreambench) -> Path:
    photos = {"dog": "dog", "cat": "cat", "teapot": "teapot", "dog-again": "dog"}
    lines = [{"id": item, "class": photos[item], "images": [str(dreambench / photos[item] / "00.jpg")],
              "prompts": [f"a {photos[item]} on the beach", f"a red {photos[item]}"]} for item in ITEMS]
    path = tmp_path_factory.mktemp("cluster-manifest") / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


class Driver:
    """`siso bench ... --executor ray --ray-address ADDRESS` in its own process, its output in a log file."""

    def __init__(self, cluster, manifest, out: Path, sd_dir, dino_dir, eval_dirs, *extra: str) -> None:
        self.out = out
        self.command = [sys.executable, "-m", "siso.cli", *bench_args(
            manifest, out, sd_dir, dino_dir, eval_dirs, "--max-steps", "3", "--executor", "ray",
            "--ray-address", cluster.address, *extra)]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        self.log = self.out.parent / f"{self.out.name}-{self.runs}.log"
        self.handle = self.log.open("w")
        self.process = subprocess.Popen(self.command, env=self.env, stdout=self.handle, stderr=subprocess.STDOUT)
        self.started = time.time()

    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, condition, what: str):
        """``condition()``'s first true value, while the bench runs, within the deadline."""
        while not (value := condition()):
            assert self.process.poll() is None, self.output()
            assert time.time() - self.started < DEADLINE, f"no {what} in {DEADLINE} s\n{self.output()}"
            time.sleep(0.05)
        return value

    def wait_for_results(self, count: int) -> list[dict]:
        def enough() -> list[dict] | None:
            records = read_results(self.out)
            return records if len(records) >= count else None

        return self.wait_until(enough, f"{count} items")

    def wait_for_running_items(self, count: int) -> None:
        """Until ``count`` items are being optimised at once (their run.json says running): with one
        worker per node, every worker is then inside an item."""
        def running() -> bool:
            records = []
            for path in (self.out / "items").glob("*/run/run.json"):
                try:
                    records.append(json.loads(path.read_text()))
                except (OSError, ValueError):
                    continue  # replaced between the listing and the read: asked again next poll
            return sum(record.get("status") == "running" for record in records) >= count

        self.wait_until(running, f"{count} items running")

    def wait_for_output(self, text: str) -> None:
        self.wait_until(lambda: text in self.output(), repr(text))

    def finish(self) -> int:
        try:
            code = self.process.wait(timeout=max(1.0, DEADLINE - (time.time() - self.started)))
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the bench hung\n{self.output()}")
        finally:
            self.handle.close()
        return code


@pytest.fixture
def driver(cluster, manifest, tmp_path, sd_dir, dino_dir, eval_dirs):
    made = []

    def make(*extra: str) -> Driver:
        made.append(Driver(cluster, manifest, tmp_path / "bench", sd_dir, dino_dir, eval_dirs, *extra))
        return made[-1]

    yield make
    for each in made:
        if each.runs and each.process.poll() is None:
            each.process.kill()


def node_of(node) -> str:
    return node.node_id[:8]  # as records and the progress name it


def item_workers_on(node) -> list:
    """The processes running siso's item workers on ``node`` (started by its raylet; Ray titles an
    actor's process after its class)."""
    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return [child for child in raylet.children(recursive=True) if child.name().startswith("ray::ItemWorker")]


def assert_each_item_done_once(out: Path) -> list[dict]:
    records = read_results(out)
    assert sorted(r["id"] for r in records) == sorted(ITEMS), [r["id"] for r in records]
    assert all(r["status"] == "done" for r in records), [(r["id"], r.get("error")) for r in records]
    assert all(r["attempts"] == 1 for r in records)  # nobody's retry was used up by the cluster
    return records


def test_a_lost_node_costs_its_item_nothing_and_the_run_finishes_on_the_rest(workers, driver):
    survivor, doomed = workers.add(), workers.add()
    # Items long enough (a few seconds each) that the doomed worker is surely inside one when its node goes.
    bench = driver("--workers", "2", "--max-steps", "30", "--early-stop-patience", "30")
    bench.start()
    bench.wait_for_results(1)
    bench.wait_for_running_items(2)
    # Suspended first, so the doomed worker cannot hand its item back between the check and the loss.
    for process in item_workers_on(doomed):
        process.suspend()
    workers.remove(doomed)  # mid-run, inside an item: that item goes back to the queue
    removed_at = time.time() + 1.0  # (an item the doomed node returned just before is committed within this)
    assert bench.finish() == 0, bench.output()
    records = assert_each_item_done_once(bench.out)
    text = " ".join(bench.output().split())
    assert any(f"Lost worker {n} ({node_of(doomed)}" in text for n in (1, 2)), text
    assert "[state-dump]" not in text  # the lost raylet's own log stays in the cluster's log files
    # What finished after the loss ran on the node that is left, while the lost worker's replacement waited.
    later = [r for r in records if r["finished_at"] > removed_at]
    assert later and {r["worker"]["node"] for r in later} == {node_of(survivor)}
    # The item the lost node was inside was done again, on the node that is left, at no cost to its retries.
    [lost] = [r for r in records if r["workers_lost"]]
    assert lost["workers_lost"] == 1 and lost["worker"]["node"] == node_of(survivor)
    summary = (bench.out / "summary.md").read_text()
    assert "## Run" in summary and "items done: 4, failed: 0" in summary and "items per hour" in summary


def test_a_node_that_joins_mid_run_gets_work(workers, driver):
    first = workers.add()
    # One worker fits now; the second waits for room.
    bench = driver("--workers", "2", "--max-steps", "30", "--early-stop-patience", "30")
    bench.start()
    bench.wait_for_results(1)  # the run is going, on the one node there is
    # The first node then stalls (a slow machine), so the run cannot end before the new node is up,
    # however long that takes: the items left are the joined node's to take.
    stalled = item_workers_on(first)
    assert stalled, "no siso worker process found on the first node"
    for process in stalled:
        process.suspend()
    try:
        joined = workers.add()
        # Which of the two workers waited for room is Ray's choice: the one that starts on the new node.
        started_there = re.compile(rf"worker [12] \({node_of(joined)}, [^)]*\) started\.")
        bench.wait_until(lambda: started_there.search(bench.output()), "a worker started on the joined node")
        bench.wait_until(lambda: node_of(joined) in {r["worker"]["node"] for r in read_results(bench.out)},
                         "item done on the joined node")
    finally:
        for process in stalled:
            process.resume()
    assert bench.finish() == 0, bench.output()
    records = assert_each_item_done_once(bench.out)
    text = " ".join(bench.output().split())
    assert "1 of 2 workers wait for room on the cluster (it has 1 CPUs)" in text
    assert len(re.findall(r"worker [12] \([^)]*\) started\.", text)) == 1  # the one that waited, once
    assert {node_of(first), node_of(joined)} == {r["worker"]["node"] for r in records}, [r["worker"] for r in records]


def test_a_killed_driver_resumes_without_redoing_or_losing_items(workers, driver):
    workers.add(), workers.add()
    bench = driver("--workers", "2")
    bench.start()
    at_kill = bench.wait_for_results(1)
    bench.process.send_signal(signal.SIGKILL)
    bench.finish()
    committed = {path.parent.name: path.read_bytes() for path in (bench.out / "items").glob("*/result.json")}
    bench.start()  # the same command again
    assert bench.finish() == 0, bench.output()
    records = assert_each_item_done_once(bench.out)  # none lost, none twice
    assert f"Resuming: {len(committed)} of 4" in bench.output()
    for item, record in committed.items():  # finished before the kill: kept byte for byte, not redone
        assert (bench.out / "items" / item / "result.json").read_bytes() == record
    assert {r["id"] for r in at_kill} <= set(committed)
    assert len(records) == 4


def test_a_lost_head_stops_the_driver_saying_what_to_do_and_keeps_the_finished_items(
        manifest, tmp_path, sd_dir, dino_dir, eval_dirs):
    """Without GCS fault tolerance (an external Redis) no Ray cluster outlives its head, and Ray ends its
    drivers a minute later; siso stops first, with what to do, and what finished stays finished."""
    own = new_cluster()  # this test takes the head down: not the module's cluster
    try:
        own.add_node(num_cpus=1)
        bench = Driver(own, manifest, tmp_path / "bench", sd_dir, dino_dir, eval_dirs, "--max-steps", "150",
                       "--early-stop-patience", "150")
        # Ray ends a driver whose head is silent for this long; siso stops at half of it (here 15 s, not 30).
        bench.env["RAY_gcs_rpc_server_reconnect_timeout_s"] = "30"
        bench.start()
        bench.wait_for_results(1)
        own.remove_node(own.head_node, allow_graceful=False)
        lost_at = time.time()
        code = bench.finish()
    finally:
        own.shutdown()
    text = " ".join(bench.output().split())
    assert code == 2, text
    assert time.time() - lost_at < 30  # siso's own stop, before Ray's end of the driver
    assert "The Ray head node does not answer" in text and "The Ray head node stopped answering" in text
    assert "rerun the same command" in text and "Traceback" not in text
    records = read_results(bench.out)
    assert records and all(r["status"] == "done" for r in records)
    for record in records:  # each committed item is whole: a rerun skips it
        assert json.loads((bench.out / "items" / record["id"] / "result.json").read_text()) == record
