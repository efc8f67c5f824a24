"""Teacher sources backed by a model in this process, by a cache, or by both."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..checkpoint import atomic_save
from .base import ROW_KEYS, TeacherRows, TeacherSource, empty_rows, row_lengths

__all__ = ["LocalTeacher", "CachedTeacherSource", "CacheThenLiveTeacher"]


class LocalTeacher(TeacherSource):
    """A teacher module run here, under ``no_grad`` in eval mode, reduced to its top-k.

    The same rows :func:`~textbrewer.cache.write_teacher_cache` would store for the batch,
    before the cache's float16 rounding (the same functions compute them).

    Args:
        model: the teacher (its mode is restored after each batch).
        k: entries per row, 1 <= k <= V.
        device: where it runs; default its first parameter's device.
        logits_fn: ``(model, batch) -> (B, L, V)``; default
            :func:`~textbrewer.cache.writer.default_logits_fn`.
        positions: which positions get a row (``'attention_mask'``, ``'labels'`` or
            ``'shifted_labels'``, as for the cache writer).
    """

    def __init__(self, model: nn.Module, k: int, device: Optional[str] = None,
                 logits_fn: Optional[Callable[[nn.Module, Dict[str, Any]], torch.Tensor]] = None,
                 positions: str = "attention_mask"):
        from ..cache.manifest import POSITION_RULES
        from ..cache.writer import default_logits_fn
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if positions not in POSITION_RULES:
            raise ValueError(f"positions must be one of {sorted(POSITION_RULES)}, got "
                             f"{positions!r}")
        self.model, self.k, self.positions = model, k, positions
        self.logits_fn = logits_fn or default_logits_fn
        first = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu"))
        self.vocab_size = None

    @torch.no_grad()
    def rows(self, batch: Mapping, examples: Sequence[Mapping] = ()) -> TeacherRows:
        from ..cache.writer import _top_k_rows, _valid_positions
        size, length = batch["input_ids"].shape
        valid = _valid_positions(dict(batch), row_lengths(batch), self.positions)
        inputs = {key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                  for key, value in batch.items() if key in ("input_ids", "attention_mask")}
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.logits_fn(self.model, inputs)
        finally:
            self.model.train(was_training)
        vocab = logits.shape[-1]
        if self.k > vocab:
            raise ValueError(f"k={self.k} is larger than the teacher's vocabulary of {vocab}")
        self.vocab_size = vocab
        top_ids, top_logprobs, tails = _top_k_rows(logits.reshape(-1, vocab), self.k)
        rows = {"topk_ids": top_ids.view(size, length, self.k).cpu(),
                "topk_logprobs": top_logprobs.view(size, length, self.k).float().cpu(),
                "tail_mass": tails.view(size, length).float().cpu(),
                "mask": valid.view(size, length)}
        # positions without a row: id 0, log-prob 0, tail 0, as the cache's lookup has them
        empty = ~rows["mask"]
        rows["topk_ids"][empty] = 0
        rows["topk_logprobs"][empty] = 0.0
        rows["tail_mass"][empty] = 0.0
        return rows


def _indices(examples: Sequence[Mapping], index_key: str, who: str) -> List[int]:
    missing = [n for n, example in enumerate(examples)
               if not isinstance(example, Mapping) or index_key not in example]
    if missing:
        raise ValueError(f"{who}: examples {missing[:5]} of the batch have no {index_key!r}: "
                         f"wrap the dataset in textbrewer.cache.IndexedDataset")
    return [int(example[index_key]) for example in examples]


class CachedTeacherSource(TeacherSource):
    """A teacher cache (:class:`~textbrewer.cache.TeacherCache`) as a source: rows looked
    up by the examples' dataset index (the same rows
    :class:`~textbrewer.cache.CachedTeacherCollator` attaches).

    Args:
        cache: the opened cache.
        index_key: the examples' index field.
        check_ids: compare each example's ids with the cache's stored hash.
    """

    def __init__(self, cache: Any, index_key: str = "example_index", check_ids: bool = True):
        self.cache, self.index_key, self.check_ids = cache, index_key, check_ids
        self.k, self.vocab_size = cache.k, cache.vocab_size

    def rows(self, batch: Mapping, examples: Sequence[Mapping]) -> TeacherRows:
        indices = torch.tensor(_indices(examples, self.index_key, "CachedTeacherSource"),
                               dtype=torch.long)
        rows = self.cache.lookup(indices, input_ids=batch["input_ids"] if self.check_ids
                                 else None, pad_to=batch["input_ids"].shape[1])
        return {key: rows[key] for key in ("topk_ids", "topk_logprobs", "tail_mass", "mask")}


class CacheThenLiveTeacher(TeacherSource):
    """The cache where it has the example, the live teacher where it does not.

    An example is a miss when its index is outside the cache or its ids no longer match
    the cache's stored hash (the data changed). Misses are computed by ``live`` and, with
    ``write_back``, saved to ``{cache.path}/live_rows/{index}.pt`` (atomically), where
    later batches find them without the teacher: a cache built once, grown as new data
    arrives.

    Args:
        cache: the opened :class:`~textbrewer.cache.TeacherCache`.
        live: the source for misses (usually a :class:`LocalTeacher` or a served teacher)
            with the same ``k``.
        write_back: save misses beside the cache.
        index_key: the examples' index field.

    Attributes:
        hits: examples found in the cache or among the written-back rows so far.
        misses: examples the live teacher computed so far.
        written: examples written back so far.
    """

    def __init__(self, cache: Any, live: TeacherSource, write_back: bool = False,
                 index_key: str = "example_index"):
        if live.k != cache.k:
            raise ValueError(f"the cache keeps k={cache.k} entries per row and the live "
                             f"teacher k={live.k}; give them the same k")
        self.cache, self.live, self.write_back, self.index_key = cache, live, write_back, \
            index_key
        self.k, self.vocab_size = cache.k, cache.vocab_size
        self.folder = os.path.join(os.fspath(cache.path), "live_rows")
        self.hits = self.misses = self.written = 0

    def _cached(self, index: int, ids: torch.Tensor, length: int
                ) -> Optional[Dict[str, torch.Tensor]]:
        """The cache's rows of example ``index`` padded to ``length`` (1, length, ...), or
        None when the cache lacks it or holds other ids for it."""
        if not 0 <= index < len(self.cache):
            return None
        try:
            return self.cache.lookup(torch.tensor([index]), input_ids=ids[None], pad_to=length)
        except ValueError:  # the ids differ from the cached example's
            return None

    def _saved(self, index: int, ids: torch.Tensor, length: int
               ) -> Optional[Dict[str, torch.Tensor]]:
        """The written-back rows of example ``index`` padded to ``length``, or None."""
        path = os.path.join(self.folder, f"{index}.pt")
        if not os.path.exists(path):
            return None
        saved = torch.load(path, weights_only=True)
        if not torch.equal(saved["input_ids"], ids):
            return None
        return {key: _padded(saved[key], length) for key in ROW_KEYS}

    def rows(self, batch: Mapping, examples: Sequence[Mapping]) -> TeacherRows:
        indices = _indices(examples, self.index_key, "CacheThenLiveTeacher")
        ids = batch["input_ids"]
        size, length = ids.shape
        lengths = row_lengths(batch)
        out = empty_rows(size, length, self.k)
        live_rows = []
        for row, index in enumerate(indices):
            own = ids[row, :lengths[row]]
            found = self._cached(index, own, length)
            if found is None:
                found = self._saved(index, own, length)
            if found is None:
                live_rows.append(row)
                continue
            self.hits += 1
            for key in out:
                out[key][row] = found[key][0]
        if live_rows:
            sub = {key: value[live_rows] for key, value in batch.items()
                   if isinstance(value, torch.Tensor) and value.shape[:1] == (size,)}
            computed = self.live.rows(sub, [examples[r] for r in live_rows])
            self.misses += len(live_rows)
            for position, row in enumerate(live_rows):
                for key in out:
                    out[key][row] = computed[key][position]
                if self.write_back:
                    self._write(indices[row], ids[row, :lengths[row]],
                                {key: computed[key][position, :lengths[row]] for key in out})
        return out

    def _write(self, index: int, ids: torch.Tensor, rows: Dict[str, torch.Tensor]) -> None:
        os.makedirs(self.folder, exist_ok=True)
        atomic_save(dict(rows, input_ids=ids.clone()),
                    os.path.join(self.folder, f"{index}.pt"))
        self.written += 1


def _padded(value: torch.Tensor, length: int) -> torch.Tensor:
    """A saved row (L_i, ...) padded with zeros to (1, length, ...)."""
    padded = value.new_zeros((length,) + tuple(value.shape[1:]))
    padded[:value.shape[0]] = value
    return padded[None]
