"""Where micro-batches come from, with enough state to resume a run exactly.

A source records the random-number state right before it creates a data iterator
(which is when a shuffling sampler draws its permutation). A resumed run restores that
state, recreates the iterator, skips the batches already consumed, and then restores the
state saved at the checkpoint: the data order and every later random draw match an
uninterrupted run bit for bit.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["get_rng_state", "set_rng_state", "EpochSource", "CycleSource", "CachedSource",
           "TaskSource", "EmptyDataError"]


class EmptyDataError(ValueError):
    """A dataloader yielded no batches."""


def get_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, as tensors and plain values."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores what :func:`get_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _generator_of(loader: Any) -> Optional[torch.Generator]:
    generator = getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


class _Pass:
    """One pass over an iterable, resumable at a batch index."""

    def __init__(self, loader: Any, postprocess: Optional[Callable]):
        self.loader = loader
        self.postprocess = postprocess
        self.start_state: Optional[Dict[str, Any]] = None
        self.consumed = 0
        self._replay: Optional[Dict[str, Any]] = None

    def begin(self) -> Iterator:
        replay = self._replay
        self._replay = None
        skip = 0
        if replay is not None:
            set_rng_state(replay["rng"])
            if "generator" in replay and _generator_of(self.loader) is not None:
                _generator_of(self.loader).set_state(replay["generator"])
            skip = replay["consumed"]
        self.start_state = {"rng": get_rng_state()}
        generator = _generator_of(self.loader)
        if generator is not None:
            self.start_state["generator"] = generator.get_state()
        if skip and hasattr(self.loader, "__len__") and skip >= len(self.loader):
            # resumed at the end of a pass (an epoch-end checkpoint): nothing is left to
            # read, and the saved RNG state is restored after positioning anyway
            self.consumed = skip
            return iter(())
        iterator = iter(self.loader)
        for _ in range(skip):
            next(iterator)
        self.consumed = skip
        return iterator

    def take(self, iterator: Iterator) -> Any:
        batch = next(iterator)
        self.consumed += 1
        return self.postprocess(batch) if self.postprocess is not None else batch

    def state_dict(self) -> Dict[str, Any]:
        return {**(self.start_state or {}), "consumed": self.consumed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._replay = state if "rng" in state else None
        self.consumed = state["consumed"]

    @property
    def replay_pending(self) -> bool:
        return self._replay is not None


def _drain(pass_: _Pass, iterator: Iterator) -> Iterator[Any]:
    while True:
        try:
            yield pass_.take(iterator)
        except StopIteration:
            return


class EpochSource:
    """Epoch mode: one pass over the dataloader per epoch (``set_epoch`` on its sampler)."""

    def __init__(self, loader: Any, postprocess: Optional[Callable] = None):
        self.loader = loader
        self.pass_ = _Pass(loader, postprocess)

    def epoch(self, epoch: int) -> Iterator[Any]:
        """The epoch's batches. The data iterator is created now, not at the first batch."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        return _drain(self.pass_, self.pass_.begin())

    def state_dict(self) -> Dict[str, Any]:
        return {"pass": self.pass_.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.pass_.load_state_dict(state["pass"])


class CycleSource:
    """Step mode: cycles the dataloader forever (a new pass, reshuffled, when one ends)."""

    def __init__(self, loader: Any, postprocess: Optional[Callable] = None, name: str = ""):
        self.loader = loader
        self.name = name
        self.pass_ = _Pass(loader, postprocess)
        self.passes = 0
        self._iterator: Optional[Iterator] = None

    def _begin_pass(self) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.passes)
        self._iterator = self.pass_.begin()

    def position(self) -> None:
        """After a resume: recreate the interrupted pass now (before the RNG is restored)."""
        if self.pass_.replay_pending:
            self._begin_pass()

    def next(self) -> Any:
        for attempt in range(2):
            if self._iterator is None:
                self._begin_pass()
            try:
                return self.pass_.take(self._iterator)
            except StopIteration:
                self._iterator = None
                self.passes += 1
                if attempt == 1 or self.pass_.consumed == 0:
                    break
        label = f"dataloader {self.name!r}" if self.name else "the dataloader"
        raise EmptyDataError(f"{label} yielded no batches")

    def epoch(self, epoch: int) -> Iterator[Any]:
        self.position()
        return self._forever()

    def _forever(self) -> Iterator[Any]:
        while True:
            yield self.next()

    def state_dict(self) -> Dict[str, Any]:
        return {"pass": self.pass_.state_dict(), "passes": self.passes}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.passes = state["passes"]
        self.pass_.load_state_dict(state["pass"])
        self._iterator = None


class CachedSource:
    """Epoch mode over cached (batch, teacher logits) pairs, reshuffled with ``random.shuffle``."""

    def __init__(self, entries: List[Any]):
        self.entries = list(enumerate(entries))
        self.consumed = 0

    def epoch(self, epoch: int) -> Iterator[Any]:
        if self.consumed == 0:
            random.shuffle(self.entries)
        return self._drain()

    def _drain(self) -> Iterator[Any]:
        while self.consumed < len(self.entries):
            entry = self.entries[self.consumed][1]
            self.consumed += 1
            yield entry
        self.consumed = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"order": [index for index, _ in self.entries], "consumed": self.consumed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        by_index = dict(self.entries)
        self.entries = [(index, by_index[index]) for index in state["order"]]
        self.consumed = state["consumed"]


class TaskSource:
    """Multi-task: each micro-batch picks a task with probability ∝ len(loader)^tau.

    Tasks are drawn with ``np.random.choice`` (as TextBrewer 0.2.1 did, so a seeded run
    picks the same tasks); if any dataloader has no length, tasks are drawn uniformly.
    Yields ``(batch, task_name)``.
    """

    def __init__(self, loaders: Dict[str, Any], tau: float,
                 postprocessors: Optional[Dict[str, Callable]] = None):
        self.sources = {name: CycleSource(loader, (postprocessors or {}).get(name), name)
                        for name, loader in loaders.items()}
        self.task_names = tuple(loaders)
        if all(hasattr(loader, "__len__") for loader in loaders.values()):
            sizes = [len(loaders[name]) ** tau for name in self.task_names]
            normaliser = sum(sizes)
            self.probabilities: Optional[Sequence[float]] = [size / normaliser for size in sizes]
        else:
            self.probabilities = None

    def epoch(self, epoch: int) -> Iterator[Any]:
        for source in self.sources.values():
            source.position()
        return self._forever()

    def _forever(self) -> Iterator[Any]:
        while True:
            task = np.random.choice(self.task_names, p=self.probabilities)
            yield self.sources[str(task)].next(), str(task)

    def state_dict(self) -> Dict[str, Any]:
        return {name: source.state_dict() for name, source in self.sources.items()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name, source in self.sources.items():
            source.load_state_dict(state[name])
