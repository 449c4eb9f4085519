"""Where items run: in this process (one worker, one model cache), or on Ray (one worker actor per GPU).

Both take items with ``submit`` and hand back one :class:`Outcome` at a time from
``next_outcome``, in completion order; retrying is the runner's business.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SisoError
from ._deps import require
from .manifest import BenchItem
from .settings import BenchSettings, ExecutorSettings
from .worker import ItemWorker

# Passed on to Ray workers, so they find models the way this process does.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "TRANSFORMERS_VERBOSITY",
                  "DIFFUSERS_VERBOSITY", "SISO_DREAMBENCH")


@dataclass
class Outcome:
    item: BenchItem
    record: dict[str, Any] | None  # the item's record when it succeeded
    error: str | None = None  # what went wrong when it did not


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class LocalExecutor:
    """Items one after another in this process, all sharing one :class:`ItemWorker`."""

    name = "local"

    def __init__(self, settings: BenchSettings, out_dir: Path) -> None:
        self.worker = ItemWorker(settings, out_dir)
        self.queue: deque[BenchItem] = deque()

    def start(self) -> list[dict[str, str]]:
        return [self.worker.warm_up()]

    def submit(self, item: BenchItem) -> None:
        self.queue.append(item)

    def pending(self) -> int:
        return len(self.queue)

    def next_outcome(self) -> Outcome:
        item = self.queue.popleft()
        try:
            return Outcome(item, self.worker.run(item))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # one bad item must not stop a catalogue run
            return Outcome(item, None, describe(err))

    def close(self) -> None:
        self.queue.clear()


class RayExecutor:
    """One :class:`ItemWorker` actor per GPU (``num_gpus=1``), or CPU actors (``num_cpus=1``) where
    there is no GPU; each keeps its models loaded across the items it is given.

    Connects to ``address`` (an existing cluster: "auto" or "ray://host:10001"), else starts Ray
    on this machine. Output and photos must be on a filesystem every node sees at the same path.
    """

    name = "ray"

    def __init__(self, settings: BenchSettings, out_dir: Path, address: str | None = None,
                 workers: int | None = None) -> None:
        self.settings = settings
        self.out_dir = Path(out_dir).resolve()
        self.address = address
        self.workers = workers
        self.queue: deque[BenchItem] = deque()
        self.in_flight: dict[Any, tuple[BenchItem, Any]] = {}
        self.idle: list[Any] = []
        self.actors: list[Any] = []
        self.started_ray = False

    def start(self) -> list[dict[str, str]]:
        ray = require("ray", "--executor ray")
        if not ray.is_initialized():
            env = {name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ}
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if env:
                options["runtime_env"] = {"env_vars": env}
            try:
                ray.init(address=self.address, **options)
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = self.address or "a new local instance"
                raise SisoError(f"Could not start or reach Ray ({where}): {err}") from err
            self.started_ray = True
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = gpus > 0 and self.settings.device != "cpu"
        if use_gpu:
            count = min(self.workers or gpus, gpus)
            resources = {"num_gpus": 1, "num_cpus": 1}
        else:
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            count = min(self.workers or 1, cpus)
            resources = {"num_gpus": 0, "num_cpus": 1}
        self.actor_class = ray.remote(ItemWorker).options(**resources)
        self.actors = [self._new_actor() for _ in range(count)]
        try:
            described = ray.get([actor.warm_up.remote() for actor in self.actors])
        except ray.exceptions.RayError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, SisoError):
                raise SisoError(str(cause)) from err
            raise SisoError(f"The Ray workers could not start: {describe(cause or err)}") from err
        self.idle = list(self.actors)
        return described

    def _new_actor(self):
        return self.actor_class.remote(self.settings, str(self.out_dir))

    def submit(self, item: BenchItem) -> None:
        self.queue.append(item)

    def pending(self) -> int:
        return len(self.queue) + len(self.in_flight)

    def _dispatch(self) -> None:
        while self.queue and self.idle:
            actor = self.idle.pop()
            item = self.queue.popleft()
            self.in_flight[actor.run.remote(item)] = (item, actor)

    def next_outcome(self) -> Outcome:
        import ray

        self._dispatch()
        ready, _ = ray.wait(list(self.in_flight), num_returns=1)
        item, actor = self.in_flight.pop(ready[0])
        try:
            record = ray.get(ready[0])
        except ray.exceptions.RayActorError as err:  # the worker process died (e.g. killed for memory)
            self.actors.remove(actor)
            replacement = self._new_actor()
            self.actors.append(replacement)
            self.idle.append(replacement)
            return Outcome(item, None, f"the Ray worker died: {describe(err)}")
        except ray.exceptions.RayTaskError as err:
            self.idle.append(actor)
            cause = getattr(err, "cause", None)
            return Outcome(item, None, describe(cause) if cause is not None else describe(err))
        self.idle.append(actor)
        return Outcome(item, record)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.idle, self.in_flight = [], [], {}
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def make_executor(executor: ExecutorSettings, settings: BenchSettings, out_dir: Path):
    if executor.executor == "ray":
        return RayExecutor(settings, out_dir, executor.ray_address, executor.workers)
    return LocalExecutor(settings, out_dir)
