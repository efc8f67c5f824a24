"""Several teachers as one source: a weighted mixture of their distributions, or each
example routed to one teacher by a key."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Optional, Sequence

import torch

from .base import TeacherRows, TeacherSource, empty_rows
from .served import EMPTY_LOGPROB

__all__ = ["MixtureTeacher", "RoutedTeacher"]


class MixtureTeacher(TeacherSource):
    """The weighted average of several teachers' distributions, as a top-k row.

    Per position, with each teacher's top-k rows p_i (and tail mass t_i):
    p(v) = Σ_i w_i · p_i(v), where p_i(v) is teacher i's probability of v when v is in its
    top-k, else t_i / (V − k_i) with ``tail='uniform'`` (its tail spread evenly, needs
    ``vocab_size``) or 0 with ``tail='renormalize'``. The row keeps the k most likely
    tokens of the union of the teachers' top-k; its tail is 1 − their mass. With k = V on
    every teacher it is exactly log Σ_i w_i softmax(z_i).

    Args:
        sources: the teachers (same vocabulary).
        weights: one per source, ≥ 0, not all 0 (normalised to sum to 1); default equal.
        k: entries of the mixed row; default the sources' largest k.
        tail: ``'uniform'`` or ``'renormalize'`` (above).
        vocab_size: V, for ``tail='uniform'``; default the sources' own.

    A position has a row where every source has one.
    """

    def __init__(self, sources: Sequence[TeacherSource], weights: Optional[Sequence[float]] = None,
                 k: Optional[int] = None, tail: str = "uniform",
                 vocab_size: Optional[int] = None):
        sources = list(sources)
        if not sources:
            raise ValueError("MixtureTeacher needs at least one source")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"{len(weights)} weights for {len(sources)} sources")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be >= 0 and not all 0, got {weights}")
        if tail not in ("uniform", "renormalize"):
            raise ValueError(f"tail must be 'uniform' or 'renormalize', got {tail!r}")
        self.sources = sources
        self.weights = [w / sum(weights) for w in weights]
        largest = max(source.k for source in sources)
        if k is not None and not 1 <= k <= largest:
            raise ValueError(f"k must be in 1..{largest} (the sources' largest k), got {k!r}")
        self.k = k if k is not None else largest
        self.tail = tail
        self.vocab_size = vocab_size

    def _vocab(self) -> Optional[int]:
        if self.vocab_size is not None:
            return self.vocab_size
        sizes = {source.vocab_size for source in self.sources} - {None}
        if len(sizes) > 1:
            raise ValueError(f"the teachers' vocabularies differ: {sorted(sizes)}")
        return sizes.pop() if sizes else None

    def rows(self, batch: Mapping, examples: Sequence[Mapping]) -> TeacherRows:
        parts = [source.rows(batch, examples) for source in self.sources]
        vocab = self._vocab()
        if self.tail == "uniform" and vocab is None:
            raise ValueError("MixtureTeacher(tail='uniform') needs vocab_size (the sources "
                             "do not report one)")
        union = torch.cat([part["topk_ids"] for part in parts], dim=-1)       # (B, L, n·k)
        mixed = torch.zeros(union.shape, dtype=torch.float64)
        for weight, part in zip(self.weights, parts):
            ids, probs = part["topk_ids"], part["topk_logprobs"].double().exp()
            same = union.unsqueeze(-1) == ids.unsqueeze(-2)                  # (B, L, n·k, k)
            inside = (same * probs.unsqueeze(-2)).sum(-1)
            if self.tail == "uniform":
                spread = part["tail_mass"].double() / max(vocab - ids.shape[-1], 1)
                inside = torch.where(same.any(-1), inside, spread.unsqueeze(-1))
            mixed += weight * inside
        # an id in several teachers' top-k appears several times in the union: keep one
        earlier = (union.unsqueeze(-1) == union.unsqueeze(-2)).tril(-1).any(-1)
        mixed = mixed.masked_fill(earlier, -1.0)
        k = min(self.k, union.shape[-1])
        values, order = mixed.topk(k, dim=-1)
        ids = union.gather(-1, order)
        mask = torch.stack([part["mask"].bool() for part in parts]).all(0)
        tail = (1.0 - values.clamp(min=0).sum(-1)).clamp(min=0.0)
        logprobs = values.clamp(min=0).log()
        # an id no teacher gives mass keeps a finite log-probability, as the cache stores it
        logprobs = logprobs.clamp(min=EMPTY_LOGPROB)
        rows = {"topk_ids": ids, "topk_logprobs": logprobs.float(), "tail_mass": tail.float(),
                "mask": mask}
        rows["topk_ids"] = rows["topk_ids"].masked_fill(~mask.unsqueeze(-1), 0)
        rows["topk_logprobs"] = rows["topk_logprobs"].masked_fill(~mask.unsqueeze(-1), 0.0)
        rows["tail_mass"] = rows["tail_mass"].masked_fill(~mask, 0.0)
        return rows


class RoutedTeacher(TeacherSource):
    """Each example to one teacher, chosen by ``example[key]`` (e.g. its task).

    Args:
        sources: ``{value: source}``; all with the same ``k``.
        key: the example field that names the source.
        default: the value used when an example lacks ``key`` (None: an error).
    """

    def __init__(self, sources: Mapping[str, TeacherSource], key: str,
                 default: Optional[str] = None):
        if not sources:
            raise ValueError("RoutedTeacher needs at least one source")
        ks = {name: source.k for name, source in sources.items()}
        if len(set(ks.values())) > 1:
            raise ValueError(f"the routed sources keep different k: {ks}; give them one k")
        if default is not None and default not in sources:
            raise ValueError(f"default={default!r} is not one of the sources {sorted(sources)}")
        self.sources, self.key, self.default = dict(sources), key, default
        self.k = next(iter(ks.values()))
        sizes = {source.vocab_size for source in sources.values()} - {None}
        self.vocab_size = sizes.pop() if len(sizes) == 1 else None

    def rows(self, batch: Mapping, examples: Sequence[Mapping]) -> TeacherRows:
        size, length = batch["input_ids"].shape
        routes: Dict[str, list] = {}
        for row, example in enumerate(examples):
            value = example.get(self.key, self.default) if isinstance(example, Mapping) \
                else self.default
            if value not in self.sources:
                raise ValueError(f"example {row} of the batch has {self.key}={value!r}; the "
                                 f"sources are {sorted(self.sources)}")
            routes.setdefault(value, []).append(row)
        out = empty_rows(size, length, self.k)
        for value, chosen in routes.items():
            sub = {name: tensor[chosen] for name, tensor in batch.items()
                   if isinstance(tensor, torch.Tensor) and tensor.shape[:1] == (size,)}
            part = self.sources[value].rows(sub, [examples[r] for r in chosen])
            for name in out:
                out[name][chosen] = part[name].to(out[name].dtype)
        return out
