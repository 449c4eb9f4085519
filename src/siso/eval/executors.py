"""Where items run: in this process (one worker, one model cache), or on Ray (one worker actor per GPU).

Both take items with ``submit`` and hand back one :class:`Outcome` at a time from
``next_outcome``, in completion order; retrying is the runner's business.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ClusterLostError, SisoError
from ._deps import require
from .manifest import BenchItem
from .settings import BenchSettings, ExecutorSettings
from .worker import ItemWorker

# Passed on to Ray workers, so they find models the way this process does.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "TRANSFORMERS_VERBOSITY",
                  "DIFFUSERS_VERBOSITY", "SISO_DREAMBENCH")

Note = Callable[[str], None]  # where an executor tells the person watching what happens to its workers


@dataclass
class Outcome:
    item: BenchItem
    record: dict[str, Any] | None  # the item's record when it succeeded
    error: str | None = None  # what went wrong when it did not
    #: the worker process (or its whole node) went away under the item: not the item's own failure
    lost_worker: bool = False


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _ignore(_message: str) -> None:
    pass


class LocalExecutor:
    """Items one after another in this process, all sharing one :class:`ItemWorker`."""

    name = "local"

    def __init__(self, settings: BenchSettings, out_dir: Path, note: Note = _ignore) -> None:
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


@dataclass(eq=False)
class _Actor:
    """One worker actor and what the driver knows of it."""

    handle: Any
    number: int  # 1, 2, ...: how the progress names it
    ready: bool = False  # warmed up: its models load, it takes items
    place: dict[str, str] = field(default_factory=dict)  # host, pid, device, node (from its warm-up)
    item: BenchItem | None = None  # the item it is running

    def __str__(self) -> str:
        where = ", ".join(self.place[k] for k in ("node", "host", "device") if k in self.place)
        return f"worker {self.number}" + (f" ({where})" if where else "")


class RayExecutor:
    """``workers`` :class:`ItemWorker` actors, one GPU each (``num_gpus=1``), or one CPU each where the
    cluster has no GPU; each keeps its models loaded across the items it is given.

    The driver hands an item to whichever worker is free, so a cluster that shrinks never stalls the
    run: a worker lost with its node (or killed) gives its item back to the queue for the workers
    that remain, and a replacement is asked of Ray at once; it starts when the cluster has room
    again (a node joins). Ray's own actor restarts and task retries are not used on purpose: they
    tie the retry to the same actor, which waits for room on the lost node's behalf while the other
    workers could run the item.

    Connects to ``address`` (an existing cluster: "auto", "HOST:6379" or "ray://HOST:10001"), else
    starts Ray on this machine. Output and photos must be on a filesystem every node sees at the
    same path.
    """

    name = "ray"
    POLL_SECONDS = 5.0  # how often a wait with no news checks the worker timeout, and the head is asked
    SILENT_POLL_SECONDS = 1.0  # how often a head that has stopped answering is asked again
    HEAD_ASK_TIMEOUT = 2.0  # seconds one question to the head may take

    def __init__(self, settings: BenchSettings, out_dir: Path, executor: ExecutorSettings | None = None,
                 note: Note = _ignore) -> None:
        executor = executor or ExecutorSettings(executor="ray")
        self.settings = settings
        self.out_dir = Path(out_dir).resolve()
        self.address = executor.ray_address
        self.workers = executor.workers
        self.worker_timeout = float(executor.worker_timeout)
        self.note = note
        self.queue: deque[BenchItem] = deque()
        self.actors: list[_Actor] = []
        self.waiting: dict[Any, _Actor] = {}  # object ref -> the actor whose warm-up or item it is
        self.started_ray = False
        self.wants_gpu = False
        self.head_lost = False
        self._numbers = 0
        self._alone_since: float | None = None  # since when no worker has been ready
        self._head_asked = 0.0
        self._head_answered = time.monotonic()  # when the head last answered (or Ray connected)
        self._head_silent = False  # its last question went unanswered
        self._restore_printer: Callable[[], None] = lambda: None

    # -- the cluster ------------------------------------------------------------------------------
    def start(self) -> list[dict[str, str]]:
        ray = require("ray", "--executor ray")
        if not ray.is_initialized():
            env = {name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ}
            # The raylets' and workers' own logs stay in the cluster's log files: the console is the bench's.
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                       "logging_level": "warning"}
            if env:
                options["runtime_env"] = {"env_vars": env}
            try:
                ray.init(address=self.address, **options)
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = self.address or "a new local instance"
                raise SisoError(f"Could not start or reach Ray ({where}): {err}") from err
            self.started_ray = True
        self._head_answered = time.monotonic()
        self._restore_printer = _quiet_cluster_errors(self.note)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self.wants_gpu = gpus > 0 and self.settings.device != "cpu"
        count = self.workers or (gpus if self.wants_gpu else 1)
        room = gpus if self.wants_gpu else int(resources.get("CPU", 0))
        # SPREAD: one worker per node where it can, so losing a node loses as few workers as possible.
        self.actor_class = ray.remote(ItemWorker).options(
            num_gpus=1 if self.wants_gpu else 0, num_cpus=1, scheduling_strategy="SPREAD")
        for _ in range(count):
            self._spawn()
        self._alone_since = time.monotonic()
        while not any(actor.ready for actor in self.actors):  # a wrong model path fails here, before any item
            self._wait_once(ray)
        if count > room:
            self.note(f"{count - room} of {count} workers wait for room on the cluster (it has {room} "
                      f"{'GPU' if self.wants_gpu else 'CPU'}s); they start when it grows.")
        return [actor.place for actor in self.actors if actor.ready]

    def _spawn(self) -> None:
        self._numbers += 1
        actor = _Actor(self.actor_class.remote(self.settings, str(self.out_dir)), self._numbers)
        self.actors.append(actor)
        self.waiting[actor.handle.warm_up.remote()] = actor

    def _lose(self, actor: _Actor, error: BaseException) -> None:
        """Forget a dead worker and ask Ray for another, which starts wherever there is room."""
        import ray

        self.actors.remove(actor)
        ray.kill(actor.handle, no_restart=True)
        self.note(f"Lost {actor}: {_death(error)}. A replacement starts when the cluster has room.")
        self._spawn()

    # -- the items --------------------------------------------------------------------------------
    def submit(self, item: BenchItem) -> None:
        self.queue.append(item)

    def pending(self) -> int:
        return len(self.queue) + sum(1 for actor in self.actors if actor.item is not None)

    def _dispatch(self) -> None:
        for actor in self.actors:
            if not self.queue:
                return
            if actor.ready and actor.item is None:
                actor.item = self.queue.popleft()
                self.waiting[actor.handle.run.remote(actor.item)] = actor

    def next_outcome(self) -> Outcome:
        import ray

        while True:
            self._dispatch()
            outcome = self._wait_once(ray)
            if outcome is not None:
                return outcome

    def _wait_once(self, ray) -> Outcome | None:
        """Wait for one warm-up or item to finish (at most the poll interval); the item's outcome if it was one."""
        self._check_head()
        done, _ = ray.wait(list(self.waiting), num_returns=1, timeout=self._poll_seconds)
        if not done:
            self._check_timeout()
            return None
        actor = self.waiting.pop(done[0])
        item = actor.item
        try:
            value = ray.get(done[0])
        except ray.exceptions.RayActorError as err:  # its process, or its whole node, is gone
            if err.actor_init_failed:  # ItemWorker() itself raised: every replacement would too
                raise SisoError(f"The Ray workers could not start: {err}") from err
            self._lose(actor, err)
            return Outcome(item, None, f"{actor} was lost: {_death(err)}", lost_worker=True) if item else None
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if item is None:  # its warm-up: the models do not load, which no other worker would do better
                if isinstance(cause, SisoError):
                    raise SisoError(str(cause)) from err
                raise SisoError(f"The Ray workers could not start: {describe(cause or err)}") from err
            actor.item = None
            return Outcome(item, None, describe(cause) if cause is not None else describe(err))
        actor.item = None
        if item is None:  # a warm-up: the worker takes items from now on
            first = not any(other.ready for other in self.actors)
            actor.ready, actor.place = True, value
            self._alone_since = None
            if not first or self._numbers > len(self.actors):
                self.note(f"{actor} started.")
            return None
        return Outcome(item, value)

    def _check_timeout(self) -> None:
        if any(actor.ready for actor in self.actors):
            self._alone_since = None
            return
        if self._alone_since is None:
            self._alone_since = time.monotonic()
            self.note("No worker is running: waiting for the cluster to have room for one (a node with a free "
                      f"{'GPU' if self.wants_gpu else 'CPU'}).")
        if time.monotonic() - self._alone_since > self.worker_timeout:
            raise SisoError(
                f"No Ray worker has been running for {self.worker_timeout:.0f} s: the cluster has no node with room "
                "for one (nodes lost, or all busy). Finished items are kept; rerun the same command to resume once "
                "the cluster has room (--worker-timeout sets the wait)."
            )

    @property
    def _poll_seconds(self) -> float:
        """How long a wait with no news lasts, and how often the head is asked: shorter once it is silent."""
        return self.SILENT_POLL_SECONDS if self._head_silent else self.POLL_SECONDS

    def _check_head(self) -> None:
        """Ask the head (its GCS) whether it is there: every poll interval, and every second once it
        has stopped answering.

        Without GCS fault tolerance (an external Redis), a cluster does not survive its head: Ray
        ends every driver once the head has not answered for its reconnect timeout (60 s). siso stops
        by itself, and says what to do, once the head has been silent for half of that, counted from
        its last answer (so the stop comes well before Ray's, however the polls fall); with fault
        tolerance, the head is back within that time and the run goes on.
        """
        now = time.monotonic()
        if now - self._head_asked < self._poll_seconds:
            return
        self._head_asked = now
        try:
            from ray._private.worker import global_worker

            global_worker.gcs_client.internal_kv_exists(b"siso", b"siso", timeout=self.HEAD_ASK_TIMEOUT)
        except (AttributeError, ImportError):  # a Ray without this client: Ray's own handling applies
            return
        except Exception:  # noqa: BLE001 - whatever the RPC layer raises, the head did not answer
            if not self._head_silent:
                self._head_silent = True
                self.note("The Ray head node does not answer; waiting for it (a head with GCS fault tolerance "
                          "comes back by itself).")
            if time.monotonic() - self._head_answered > head_timeout():
                self.head_lost = True
                raise ClusterLostError(
                    "The Ray head node stopped answering, and a Ray cluster does not outlive its head unless it "
                    "runs with GCS fault tolerance (an external Redis). Finished items are kept: restart the "
                    "cluster, then rerun the same command (with the new --ray-address) to resume."
                ) from None
            return
        self._head_answered = time.monotonic()
        if self._head_silent:
            self.note("The Ray head node answers again.")
        self._head_silent = False

    def close(self) -> None:
        import ray

        self._restore_printer()
        if self.head_lost:  # nothing to ask of a cluster without a head; the workers go with this driver
            self.actors, self.waiting = [], {}
            return
        for actor in self.actors:
            ray.kill(actor.handle, no_restart=True)
        self.actors, self.waiting = [], {}
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def head_timeout() -> float:
    """Seconds siso waits for a silent head: half of Ray's own wait before it ends the driver
    (``RAY_gcs_rpc_server_reconnect_timeout_s``, 60 s unless the cluster's operator set it)."""
    try:
        return float(os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", 60)) / 2  # noqa: SIM112 - Ray spells it so
    except ValueError:
        return 30.0


def _death(error: BaseException) -> str:
    """Why a worker died, in a few words: Ray's message says whether its node died or only its process."""
    import ray

    if isinstance(error, ray.exceptions.ActorUnavailableError):  # the connection went first: node or process
        return "it stopped answering (its node or its process is gone)"
    text = str(error).lower()
    if "node has died" in text or "node died" in text:
        return "its node died"
    if "out of memory" in text or "oom" in text:
        return "its process was killed for memory"
    if "worker process has died" in text or "worker died" in text:
        return "its process died"
    return type(error).__name__


def _quiet_cluster_errors(note: Note) -> Callable[[], None]:
    """Hand the errors a Ray cluster pushes to its drivers to ``note``, first line only.

    Ray's driver prints each of them whole from a background thread, whatever ``log_to_driver``
    says: a lost node is twenty lines of its raylet's ``[state-dump]`` in the middle of the progress.
    Their first line says what happened; the rest stays in the cluster's logs. The printer is Ray's
    private ``print_to_stdstream``, looked up at each call: where a Ray version lacks it, Ray's own
    printing is left as it is. Returns what puts Ray's printer back.
    """
    from ray._private import worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if not callable(original):
        return lambda: None

    said: set[str] = set()

    def first_line(data: dict, *_args: object, **_kwargs: object) -> None:  # and Ray's ignore_prefix=
        for text in data.get("lines", [])[:1]:
            line = re.sub(r"\s*Last \d+ lines of the \w+ logs:\s*$", "", (text or "").splitlines()[0] if text else "")
            if line and line not in said:  # every driver hears of a lost raylet more than once
                said.add(line)
                note(f"Ray ({data.get('pid', 'cluster')}): {line}")

    ray_worker.print_to_stdstream = first_line

    def restore() -> None:
        ray_worker.print_to_stdstream = original

    return restore


def make_executor(executor: ExecutorSettings, settings: BenchSettings, out_dir: Path, note: Note = _ignore):
    if executor.executor == "ray":
        return RayExecutor(settings, out_dir, executor, note)
    return LocalExecutor(settings, out_dir, note)
