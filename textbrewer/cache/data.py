"""Training against a teacher cache: know each example's index, attach its cached rows."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .reader import TeacherCache
from .writer import pad_collate

__all__ = ["IndexedDataset", "CachedTeacherCollator"]


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose examples also carry their index (``'example_index'``).

    Wrap the very dataset given to :func:`~textbrewer.cache.write_teacher_cache`; any
    sampler (shuffling, DDP) may then reorder it, and the collator finds each example's
    cached rows by index.

    Args:
        dataset: map-style dataset of dicts with ``input_ids`` (L_i,).
        key: the name of the added field.
    """

    def __init__(self, dataset: Sequence[Mapping], key: str = "example_index"):
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        example = self.dataset[index]
        if not isinstance(example, Mapping):
            raise ValueError(f"example {index} is a {type(example).__name__}; expected a dict "
                             f"with 'input_ids'")
        return {**example, self.key: index}


class CachedTeacherCollator:
    """Collate examples of an :class:`IndexedDataset` and attach their cached teacher rows.

    The batch holds what ``collate_fn`` returns (default :func:`~textbrewer.cache.writer.pad_collate`: right-padded
    ``input_ids``, ``attention_mask`` and ``labels``, each (B, L)), minus the index field,
    plus ``batch[key]``: the dict of :meth:`~textbrewer.cache.reader.TeacherCache.lookup` (``topk_ids`` (B, L, k)
    int64, ``topk_logprobs`` (B, L, k) float32, ``tail_mass`` (B, L), ``mask`` (B, L)) and
    ``example_index`` (B,) int64. The student must not receive ``batch[key]``: pop it
    before ``student(**batch)``, or let the LM distiller do so.

    Args:
        cache: the opened cache.
        collate_fn: list of examples (without the index field) -> batch dict with
            right-padded ``input_ids`` (B, L).
        key: where the cached rows go.
        index_key: the field :class:`IndexedDataset` added.
        check_ids: compare each example's ids with the cache's stored hash (one blake2b
            per example; cheap) and fail naming the example if the data changed.

    Example:
        >>> loader = DataLoader(IndexedDataset(train_set), batch_size=8, shuffle=True,
        ...                     collate_fn=CachedTeacherCollator(TeacherCache("cache/")))
        >>> batch = next(iter(loader))
        >>> teacher = batch.pop("teacher_topk")      # topk_ids, topk_logprobs, ...
    """

    def __init__(self, cache: TeacherCache,
                 collate_fn: Optional[Callable[[List[Any]], Dict[str, Any]]] = None,
                 key: str = "teacher_topk", index_key: str = "example_index",
                 check_ids: bool = True):
        if not isinstance(cache, TeacherCache):
            raise TypeError(f"cache must be an opened TeacherCache, e.g. "
                            f"CachedTeacherCollator(TeacherCache({cache!r})), got "
                            f"{type(cache).__name__}" if isinstance(cache, (str, os.PathLike))
                            else f"cache must be an opened TeacherCache, got "
                                 f"{type(cache).__name__}")
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn must be a function list of examples -> batch, got "
                            f"{type(collate_fn).__name__}")
        self.cache, self.collate_fn = cache, collate_fn or pad_collate
        self.key, self.index_key, self.check_ids = key, index_key, check_ids

    def __call__(self, examples: List[Mapping]) -> Dict[str, Any]:
        missing = [number for number, example in enumerate(examples)
                   if not isinstance(example, Mapping) or self.index_key not in example]
        if missing:
            raise ValueError(f"examples {missing[:5]} of the batch have no "
                             f"{self.index_key!r}: wrap the dataset in IndexedDataset")
        indices = torch.tensor([int(example[self.index_key]) for example in examples],
                               dtype=torch.long)
        batch = self.collate_fn([{key: value for key, value in example.items()
                                  if key != self.index_key} for example in examples])
        teacher = self.cache.lookup(indices, input_ids=batch["input_ids"] if self.check_ids
                                    else None, pad_to=batch["input_ids"].shape[1])
        teacher["example_index"] = indices
        batch[self.key] = teacher
        return batch
