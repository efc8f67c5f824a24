"""The teacher-source protocol and the collator that attaches a source's rows to a batch.

A **teacher source** answers one question for a batch: the teacher's top-k next-token
distribution at each position. Its answer, :data:`rows <TeacherRows>`, has the layout of
:meth:`~textbrewer.cache.reader.TeacherCache.lookup` (``topk_ids`` (B, L, k) int64,
``topk_logprobs`` (B, L, k) float32 at temperature 1, ``tail_mass`` (B, L) float32,
``mask`` (B, L) bool), so that every LM distiller trains from any source the way it
trains from a cache: ``model_T=None`` and batches from :class:`TeacherSourceCollator`.
Position t's row is the distribution the logits at t give (of the token at t + 1).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["TeacherSource", "TeacherRows", "TeacherSourceCollator", "check_rows", "ROW_KEYS",
           "empty_rows", "row_lengths"]

#: what every source returns (see the module docstring)
TeacherRows = Dict[str, torch.Tensor]
ROW_KEYS = ("topk_ids", "topk_logprobs", "tail_mass", "mask")


class TeacherSource:
    """The protocol: ``rows(batch, examples) -> TeacherRows``.

    Attributes:
        k: entries per row.
        vocab_size: the teacher's vocabulary (None when the source cannot tell).

    ``batch`` is the collated batch (``input_ids`` (B, L), ``attention_mask`` (B, L)
    when present); ``examples`` the batch's examples as the dataset gave them (with their
    ``example_index`` when the dataset is an :class:`~textbrewer.cache.IndexedDataset`), for
    sources that look rows up by example or route examples by a key.
    """

    k: int
    vocab_size: Optional[int] = None

    def rows(self, batch: Mapping, examples: Sequence[Mapping]) -> TeacherRows:
        raise NotImplementedError


def empty_rows(size: int, length: int, k: int) -> TeacherRows:
    """Rows for a (size, length) batch with no position filled: id 0, log-prob 0, tail 0,
    ``mask`` False (the cache's lookup fills missing positions the same way)."""
    return {"topk_ids": torch.zeros(size, length, k, dtype=torch.int64),
            "topk_logprobs": torch.zeros(size, length, k, dtype=torch.float32),
            "tail_mass": torch.zeros(size, length, dtype=torch.float32),
            "mask": torch.zeros(size, length, dtype=torch.bool)}


def row_lengths(batch: Mapping) -> List[int]:
    """Each right-padded row's length: its ``attention_mask`` sum, else the full width."""
    size, length = batch["input_ids"].shape
    mask = batch.get("attention_mask")
    return [int(n) for n in mask.sum(1)] if mask is not None else [length] * size


def check_rows(rows: Mapping, batch: Mapping, k: int, where: str) -> None:
    """Raises ValueError naming ``where`` unless ``rows`` has the protocol's keys and shapes
    for ``batch``."""
    missing = [key for key in ROW_KEYS if key not in rows]
    if missing:
        raise ValueError(f"{where} returned rows without {missing}; a teacher source returns "
                         f"{list(ROW_KEYS)}")
    size, length = batch["input_ids"].shape
    expected = {"topk_ids": (size, length, k), "topk_logprobs": (size, length, k),
                "tail_mass": (size, length), "mask": (size, length)}
    for key, shape in expected.items():
        if tuple(rows[key].shape) != shape:
            raise ValueError(f"{where}: rows[{key!r}] has shape {tuple(rows[key].shape)}; "
                             f"expected {shape} for a batch of {size} x {length} with k={k}")


class TeacherSourceCollator:
    """Collates examples and attaches ``source.rows(...)`` as ``batch[key]``.

    Args:
        source: a :class:`TeacherSource`.
        collate_fn: examples (without ``index_key``) -> a batch with right-padded
            ``input_ids`` (B, L); default :func:`~textbrewer.cache.pad_collate`.
        key: where the rows go (``LMDistillationConfig.cache_key``).
        index_key: the dataset index field of :class:`~textbrewer.cache.IndexedDataset`,
            dropped before ``collate_fn`` and kept in the examples given to the source.

    A live or served source runs its teacher inside the collator: keep the
    ``DataLoader``'s ``num_workers=0`` for a teacher on a GPU (a worker process would need
    its own copy).

    Example:
        >>> source = LocalTeacher(teacher, k=32)
        >>> loader = DataLoader(dataset, batch_size=8, collate_fn=TeacherSourceCollator(source))
        >>> distiller = CausalLMDistiller(train_config, distill_config, model_T=None,
        ...                               model_S=student)
    """

    def __init__(self, source: TeacherSource,
                 collate_fn: Optional[Callable[[List[Any]], Dict[str, Any]]] = None,
                 key: str = "teacher_topk", index_key: str = "example_index"):
        if not callable(getattr(source, "rows", None)):
            raise TypeError(f"source must be a teacher source (with rows(batch, examples)), "
                            f"got {type(source).__name__}")
        if collate_fn is None:
            from ..cache import pad_collate
            collate_fn = pad_collate
        self.source, self.collate_fn, self.key, self.index_key = source, collate_fn, key, \
            index_key

    def __call__(self, examples: List[Mapping]) -> Dict[str, Any]:
        batch = self.collate_fn([{k: v for k, v in example.items() if k != self.index_key}
                                 if isinstance(example, Mapping) else example
                                 for example in examples])
        rows = self.source.rows(batch, examples)
        check_rows(rows, batch, self.source.k, type(self.source).__name__)
        batch[self.key] = rows
        return batch
