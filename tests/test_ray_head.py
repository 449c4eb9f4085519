"""The driver's watch on the Ray head, on a simulated clock: a silent head stops the run before Ray
ends the driver, wherever the loss falls between the driver's polls; a head that comes back does not."""

from __future__ import annotations

import types

import pytest

from siso.config import GenerateSettings
from siso.errors import ClusterLostError
from siso.eval import executors
from siso.eval.executors import RayExecutor, _Actor
from siso.eval.settings import BenchSettings

RAY_RECONNECT_TIMEOUT = 30.0  # Ray ends a driver whose head has been silent this long (set as the test cluster's)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def watched(monkeypatch, tmp_path):
    """``watched(down=(start, end))`` -> (the time the driver stopped, or None; its notes): the driver's
    wait loop (ask the head, then wait for news that never comes), for 120 simulated seconds, with the
    head silent from ``start`` to ``end``."""
    ray_worker = pytest.importorskip("ray._private.worker")
    monkeypatch.setenv("RAY_gcs_rpc_server_reconnect_timeout_s", str(RAY_RECONNECT_TIMEOUT))

    def run(down: tuple[float, float]) -> tuple[float | None, list[str]]:
        clock = Clock()
        monkeypatch.setattr(executors, "time", types.SimpleNamespace(monotonic=clock.monotonic))

        def internal_kv_exists(namespace, key, timeout):
            if down[0] <= clock.now < down[1]:
                clock.now += timeout  # a silent head: the question times out
                raise ConnectionError("GCS unavailable")
            return False

        gcs = types.SimpleNamespace(internal_kv_exists=internal_kv_exists)
        monkeypatch.setattr(ray_worker, "global_worker", types.SimpleNamespace(gcs_client=gcs))
        notes: list[str] = []
        executor = RayExecutor(BenchSettings(run=GenerateSettings(device="cpu")), tmp_path, note=notes.append)
        executor.actors = [_Actor(handle=None, number=1, ready=True)]

        def wait(refs, num_returns, timeout):
            clock.now += timeout  # no item finishes: the whole poll passes
            return [], refs

        fake_ray = types.SimpleNamespace(wait=wait)
        while clock.now < 120:
            try:
                executor._wait_once(fake_ray)
            except ClusterLostError:
                return clock.now, notes
        return None, notes

    return run


@pytest.mark.parametrize("lost_at", [20 + 0.25 * i for i in range(40)])  # every phase of the 5 s polls
def test_a_lost_head_stops_the_driver_before_ray_does_wherever_the_polls_fall(watched, lost_at):
    stopped, notes = watched(down=(lost_at, float("inf")))
    assert stopped is not None
    half = RAY_RECONNECT_TIMEOUT / 2
    # siso's stop: half of Ray's wait after the head's last answer, within one silent poll and question.
    assert lost_at + half - RayExecutor.POLL_SECONDS <= stopped
    assert stopped <= lost_at + half + RayExecutor.SILENT_POLL_SECONDS + RayExecutor.HEAD_ASK_TIMEOUT
    assert stopped < lost_at + RAY_RECONNECT_TIMEOUT - 10  # well before Ray's own end of the driver
    assert sum("does not answer" in note for note in notes) == 1


def test_a_head_back_within_the_wait_keeps_the_run_going(watched):
    # Silence is counted from the last answer, which can be one poll before the loss.
    outage = RAY_RECONNECT_TIMEOUT / 2 - RayExecutor.POLL_SECONDS - RayExecutor.HEAD_ASK_TIMEOUT
    stopped, notes = watched(down=(20.0, 20.0 + outage))
    assert stopped is None
    assert [n.split(";")[0].split(" (")[0] for n in notes] == ["The Ray head node does not answer",
                                                               "The Ray head node answers again."]
