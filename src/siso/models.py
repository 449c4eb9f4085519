"""Keep loaded models across runs, and lend each backbone to one run at a time, handed back clean.

Loading SDXL takes longer than a whole personalisation, so the web app and the benchmark's workers
keep one cache each (a plain CLI run uses a cache of its own). A backbone is *lent*: one holder at a
time, and when it is handed back (or taken from an idle holder for another run) it is
:meth:`~siso.backbones.base.Backbone.reset`, so whatever a run did (its LoRA, parked text encoders,
memory savers) never reaches the next one. No caller detaches anything by hand.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Protocol

import torch

from .backbones import Backbone, backbone_class_for, load_backbone
from .errors import SisoError
from .similarity import SimilarityModel, load_similarity


class Holder(Protocol):
    """Who may borrow a backbone: a run's session, or a :meth:`ModelCache.lease`.

    A holder that is ``busy`` (preparing, iterating) keeps the backbone; an idle one (a suspended run
    of the web app) is asked to ``suspend``: it takes its own state off (its LoRA) and will ask for
    the backbone again when it runs next.
    """

    busy: bool

    def suspend(self) -> None: ...


class _Lease:
    busy = True  # for exactly as long as its ``with`` block runs

    def suspend(self) -> None:  # pragma: no cover - a busy holder is never asked
        raise AssertionError("a lease is never idle")


class ModelCache:
    """Loaded backbones and similarity models by (source, device, dtype). One GPU's worth: the app and
    the benchmark serialise their jobs, and a backbone is lent to one holder at a time."""

    def __init__(self) -> None:
        self._backbones: dict[tuple, Backbone] = {}
        self._holders: dict[tuple, Holder] = {}
        self._similarity: dict[tuple, SimilarityModel] = {}
        self._lock = threading.RLock()

    def borrow(self, model: str, device: torch.device, dtype: torch.dtype, holder: Holder) -> Backbone:
        """Lend the backbone (loading it if needed) to ``holder`` until :meth:`give_back`.

        An idle previous holder is suspended first, and the backbone reset; a busy one means two runs
        at once on one backbone, which is refused.
        """
        key = (model, str(device), dtype)
        with self._lock:
            current = self._holders.get(key)
            if current is not None and current is not holder:
                if current.busy:
                    raise SisoError(f"{model} is in use by another run in this process; wait for it to finish.")
                current.suspend()
                self._backbones[key].reset()
                del self._holders[key]
            if key not in self._backbones:
                self._backbones[key] = load_backbone(model, device, dtype)
            self._holders[key] = holder
            return self._backbones[key]

    def backbone_class(self, model: str, device: torch.device, dtype: torch.dtype) -> type[Backbone]:
        """The adapter class ``model`` loads as: a loaded backbone's own, else the one its
        model_index.json names (read, not loaded: what fails fast before any weights move)."""
        loaded = self._backbones.get((model, str(device), dtype))
        return type(loaded) if loaded is not None else backbone_class_for(model)

    def give_back(self, backbone: Backbone, holder: Holder) -> None:
        """``holder`` is done with ``backbone``: reset it for the next run (nothing if it was taken already)."""
        with self._lock:
            for key, held in list(self._holders.items()):
                if held is holder and self._backbones.get(key) is backbone:
                    del self._holders[key]
                    backbone.reset()

    def holds(self, backbone: Backbone, holder: Holder) -> bool:
        """Whether ``backbone`` is still lent to ``holder`` (not taken by another run since)."""
        with self._lock:
            return any(held is holder and self._backbones.get(key) is backbone for key, held in self._holders.items())

    @contextlib.contextmanager
    def lease(self, model: str, device: torch.device, dtype: torch.dtype) -> Iterator[Backbone]:
        """``with cache.lease(...) as backbone:`` the backbone, reset when the block ends, however it ends."""
        holder = _Lease()
        backbone = self.borrow(model, device, dtype, holder)
        try:
            yield backbone
        finally:
            self.give_back(backbone, holder)

    def similarity(self, name: str, source: str, device: torch.device, dtype: torch.dtype) -> SimilarityModel:
        key = (name, source, str(device), dtype)
        if key not in self._similarity:
            self._similarity[key] = load_similarity(name, source, device, dtype)
        return self._similarity[key]

    def has_similarity(self, name: str, source: str) -> bool:
        """Whether a similarity model from ``source`` is loaded (on any device)."""
        return any(key[:2] == (name, source) for key in self._similarity)

    def add_backbone(self, model: str, device: torch.device, dtype: torch.dtype, backbone: Backbone) -> None:
        """Register an already-built backbone under ``model`` (benchmarks build random-weight ones)."""
        self._backbones[(model, str(device), dtype)] = backbone

    def add_similarity(self, name: str, source: str, device: torch.device, dtype: torch.dtype,
                       model: SimilarityModel) -> None:
        """Register an already-built similarity model (benchmarks build random-weight ones)."""
        self._similarity[(name, source, str(device), dtype)] = model

    def clear(self) -> None:
        self._backbones.clear()
        self._holders.clear()
        self._similarity.clear()
