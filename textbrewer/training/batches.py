"""Batches on their way into the models: calling a model on a batch, splitting the
teacher's and the student's parts, counting examples, grouping micro-batches into
accumulation windows, and the train/eval modes of (lists, dicts of) models."""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["forward_model", "split_batch", "batch_size", "windows", "all_modules",
           "map_models", "set_modes", "restore_modes"]


def forward_model(model: Callable, batch: Any, args: dict) -> Any:
    """``model(**batch, **args)`` for a mapping, ``model(*batch, **args)`` for a list/tuple,
    ``model(batch, **args)`` for anything else (a single tensor)."""
    if isinstance(batch, Mapping):
        return model(**batch, **args)
    if isinstance(batch, (list, tuple)):
        return model(*batch, **args)
    return model(batch, **args)


def split_batch(batch: Any) -> Tuple[Any, Any, Any]:
    """(teacher_batch, student_batch, teacher_cache) of a batch.

    ``{'teacher': ..., 'student': ...}`` feeds the models separately; a ``'teacher_cache'``
    entry (in that form or in a plain dict batch) replaces the teacher's forward pass.
    """
    if isinstance(batch, Mapping) and "teacher" in batch and "student" in batch:
        return batch["teacher"], batch["student"], batch.get("teacher_cache")
    if isinstance(batch, Mapping) and "teacher_cache" in batch:
        rest = {k: v for k, v in batch.items() if k != "teacher_cache"}
        return rest, rest, batch["teacher_cache"]
    return batch, batch, None


def batch_size(batch: Any) -> int:
    """Examples in a batch: the first dimension of the first tensor found (0 if none)."""
    if isinstance(batch, torch.Tensor):
        return batch.size(0) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = batch_size(item)
            if size:
                return size
    return 0


def windows(batches: Iterable, accumulation: int) -> Iterator[List[Any]]:
    """The micro-batches in lists of one accumulation window (the last may be short).

    Windows start at multiples of ``accumulation`` micro-batches into the epoch (a resumed
    run starts at a window boundary: checkpoints are taken there)."""
    iterator = iter(batches)
    while True:
        window = list(itertools.islice(iterator, accumulation))
        if not window:
            return
        yield window


def all_modules(models: Any) -> List[nn.Module]:
    """The modules of a model, a list or a dict of them (None: none)."""
    if models is None:
        return []
    if isinstance(models, dict):
        return [m for v in models.values() for m in all_modules(v)]
    if isinstance(models, (list, tuple)):
        return [m for v in models for m in all_modules(v)]
    return [models]


def map_models(models: Any, function: Callable) -> Any:
    """``function`` applied to each model of a model, list or dict, keeping the structure."""
    if models is None:
        return None
    if isinstance(models, dict):
        return {k: map_models(v, function) for k, v in models.items()}
    if isinstance(models, (list, tuple)):
        return [map_models(v, function) for v in models]
    return function(models)


def set_modes(models: Any, mode: Optional[bool] = None) -> Any:
    """Records (and optionally sets) the train/eval mode of a model, list or dict of models."""
    if models is None:
        return None
    if isinstance(models, dict):
        return {k: set_modes(v, mode) for k, v in models.items()}
    if isinstance(models, (list, tuple)):
        return [set_modes(v, mode) for v in models]
    was_training = models.training
    if mode is not None:
        models.train(mode)
    return was_training


def restore_modes(models: Any, modes: Any) -> None:
    """Puts back the modes :func:`set_modes` recorded."""
    if models is None or modes is None:
        return
    if isinstance(models, dict):
        for k, v in models.items():
            restore_modes(v, modes[k])
    elif isinstance(models, (list, tuple)):
        for v, m in zip(models, modes):
            restore_modes(v, m)
    else:
        models.train(modes)
