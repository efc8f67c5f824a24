"""Consistent teaching: the teacher and the student see the same view of each example.

Beyer et al. ("Knowledge distillation: A good teacher is patient and consistent", CVPR
2022) found that KD works when the teacher's targets are computed on exactly the input the
student is trained on (not on a clean or differently augmented copy), on inputs that vary
(mixup: "function matching"), over long schedules. Three pieces give that to any
distiller, through the arguments every ``train()`` already has:

- :class:`FunctionMatching`: a ``batch_postprocessor`` that mixes each batch with a
  shuffled copy of itself (mixup, or cutmix for images). The distiller feeds the one mixed
  batch to both models, so the teacher labels the very view the student learns from.
- :class:`AugmentedViews`: a dataset of ``views_per_example`` fixed augmented views of
  each example, each view drawn from a generator seeded by its index (the same view in
  every epoch, after a resume, in every worker), and tagged with its index.
- :class:`CachedTeacher`: wraps the teacher so that its forward pass on a view is run once
  and served from memory afterwards; :func:`views_for_both` (a ``batch_postprocessor``)
  gives the tagged batch to the teacher and the same batch without the tag to the student.

Nothing here depends on the rest of the package: these are plain callables and modules.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy
import torch
from torch import nn

__all__ = ["mixup", "cutmix", "FunctionMatching", "AugmentedViews", "CachedTeacher",
           "views_for_both"]

BatchKey = Union[str, int]


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or alpha <= 0:
        raise ValueError(f"alpha (the Beta(alpha, alpha) parameter of the mixing weight) must be "
                         f"a finite number > 0, got {alpha!r}")
    return float(alpha)


def _mixing_weight(alpha: float, generator: torch.Generator) -> float:
    # torch's Beta sampler reads the global generator; numpy's takes a seed, drawn here from
    # ours, so the weight follows from FunctionMatching's seed alone
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())
    return float(numpy.random.default_rng(seed).beta(alpha, alpha))


def _check_weight(weight: Any) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise ValueError(f"the mixing weight must be a number in [0, 1], got {weight!r}")


def mixup(inputs: torch.Tensor, partner: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * inputs + (1 - weight) * inputs[partner]`` (Zhang et al., 2018).

    Args:
        inputs: (B, ...) floating-point inputs.
        partner: (B,) int64 index of the example mixed into each one.
        weight: the mixing weight λ in [0, 1].

    Returns:
        (B, ...) mixed inputs (the labels' counterpart is λ·CE(y) + (1 − λ)·CE(y[partner])), the dtype and device of ``inputs``.
    """
    _check_weight(weight)
    if not inputs.is_floating_point():
        raise TypeError(f"mixup needs floating-point inputs, got dtype {inputs.dtype}: mix "
                        f"embeddings or pixel values, not token ids")
    return inputs * weight + inputs[partner] * (1.0 - weight)


def cutmix(images: torch.Tensor, partner: torch.Tensor, weight: float,
           generator: torch.Generator) -> Tuple[torch.Tensor, float]:
    """Pastes a box of each partner image into each image (Yun et al., 2019).

    The box covers a fraction ``1 - weight`` of the area (clipped at the borders) at a
    position drawn from ``generator``; the same box for the whole batch. Channels first:
    the last two dimensions are height and width.

    Args:
        images: (B, H, W) or (B, C, H, W).
        partner: (B,) int64 index of the image pasted into each one.
        weight: λ, the fraction of each image kept before clipping.
        generator: a CPU generator for the box's centre.

    Returns:
        ((B, ...) mixed images, the fraction of the area actually kept).
    """
    _check_weight(weight)
    if images.dim() not in (3, 4):
        raise ValueError(f"cutmix needs channels-first (B, H, W) or (B, C, H, W) images, got "
                         f"shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    cut = math.sqrt(1.0 - weight)
    box_h, box_w = int(round(height * cut)), int(round(width * cut))
    centre_y = int(torch.randint(0, height, (1,), generator=generator).item())
    centre_x = int(torch.randint(0, width, (1,), generator=generator).item())
    top, bottom = max(centre_y - box_h // 2, 0), min(centre_y + (box_h + 1) // 2, height)
    left, right = max(centre_x - box_w // 2, 0), min(centre_x + (box_w + 1) // 2, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images[partner][..., top:bottom, left:right]
    kept = 1.0 - (bottom - top) * (right - left) / float(height * width)
    return mixed, kept


def _get(batch: Any, key: BatchKey) -> torch.Tensor:
    try:
        value = batch[key]
    except (KeyError, IndexError, TypeError):
        where = sorted(batch) if isinstance(batch, Mapping) else f"{len(batch)} items"
        raise KeyError(f"FunctionMatching: the batch has no input {key!r} to mix (it has "
                       f"{where})") from None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"FunctionMatching: batch[{key!r}] is a {type(value).__name__}, "
                        f"not a tensor")
    return value


def _put(batch: Any, key: BatchKey, value: torch.Tensor) -> Any:
    if isinstance(batch, Mapping):
        return {**batch, key: value}
    items = list(batch)
    items[key] = value
    if hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*items)
    return type(batch)(items) if isinstance(batch, tuple) else items


def _drop(batch: Any, key: Optional[BatchKey]) -> Any:
    if key is None or not isinstance(batch, Mapping):
        return batch
    return {name: value for name, value in batch.items() if name != key}


class FunctionMatching:
    """A ``batch_postprocessor`` that mixes each batch with a shuffled copy of itself.

    The distiller gives the returned batch to the teacher and to the student alike, so both
    see the same mixed view: the student matches the teacher's function on inputs between
    the training examples (Beyer et al., 2022). The labels of a mixed example are not its
    own: by default they are removed from the batch (``labels='drop'``), and the student
    learns from the teacher alone (``hard_label_weight`` has nothing to weigh).

    Args:
        input_key: the batch's input to mix: a key of a dict batch, or an index into a
            tuple / list batch. (B, ...) floating point; for ``'cutmix'``, (B, H, W) or
            (B, C, H, W).
        mode: ``'mixup'`` or ``'cutmix'``.
        alpha: λ ~ Beta(alpha, alpha) (Beyer et al. use 1 for mixup).
        probability: the fraction of batches that are mixed; the others keep their
            inputs (and lose their labels under ``labels='drop'``, like the mixed ones).
        labels: ``'drop'`` removes ``label_key`` from dict batches (also from the batches
            left unmixed, so that every batch has the same loss terms); ``'keep'`` leaves
            the batch's labels as they are: mixup's own label loss is
            ``λ·CE(y) + (1 − λ)·CE(y[partner])``, which an adaptor can build from
            ``last_weight`` and ``last_partner``. Tuple and list batches need
            ``'keep'`` (their labels have no name to remove).
        label_key: the key ``labels='drop'`` removes.
        seed: seeds the generator of partners, weights and boxes.

    Function matching draws a new mix at every call: it does not combine with
    :class:`CachedTeacher`, which serves one output per view id (a batch that carries a
    ``view_id`` is refused).

    Attributes:
        last_weight: the λ of the last mixed batch (the kept fraction for cutmix), None
            when the last batch was left unmixed.
        last_partner: (B,) int64, the example mixed into each one, or None.

    State: :meth:`state_dict` / :meth:`load_state_dict` carry the generator, so a run that
    restores it draws the same mixes. The distillers do not save it in their checkpoints:
    a resumed run starts the stream again from ``seed`` unless the script restores it.
    """

    MODES = ("mixup", "cutmix")

    def __init__(self, input_key: BatchKey = "features", mode: str = "mixup",
                 alpha: float = 1.0, probability: float = 1.0, labels: str = "drop",
                 label_key: str = "labels", seed: int = 0):
        if mode not in self.MODES:
            raise ValueError(f"FunctionMatching mode must be one of {self.MODES}, got {mode!r}")
        if labels not in ("drop", "keep"):
            raise ValueError(f"FunctionMatching labels must be 'drop' or 'keep', got {labels!r}")
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) \
                or not 0 <= probability <= 1:
            raise ValueError(f"FunctionMatching probability must be in [0, 1], got "
                             f"{probability!r}")
        self.input_key, self.mode, self.alpha = input_key, mode, _check_alpha(alpha)
        self.probability, self.labels, self.label_key = float(probability), labels, label_key
        self.generator = torch.Generator().manual_seed(int(seed))
        self.last_weight: Optional[float] = None
        self.last_partner: Optional[torch.Tensor] = None

    def __call__(self, batch: Any) -> Any:
        """The batch with ``input_key`` mixed (B ≥ 2; a batch of one passes unmixed), the
        labels dropped as ``labels`` says; the input batch is not modified."""
        if isinstance(batch, Mapping) and "view_id" in batch:
            raise ValueError("FunctionMatching draws a new mix at each call, but this batch "
                             "carries 'view_id' for a CachedTeacher, which would serve the "
                             "teacher's output on another mix: use one or the other")
        if self.labels == "drop" and not isinstance(batch, Mapping):
            raise ValueError(f"FunctionMatching(labels='drop') removes a key from dict "
                             f"batches; this batch is a {type(batch).__name__}: pass "
                             f"labels='keep' and leave the hard-label weight at 0")
        inputs = _get(batch, self.input_key)
        mix = self.probability >= 1 or \
            float(torch.rand((), generator=self.generator)) < self.probability
        if not mix or inputs.size(0) < 2:
            self.last_weight, self.last_partner = None, None
            return _drop(batch, self.label_key) if self.labels == "drop" else batch
        partner = torch.randperm(inputs.size(0), generator=self.generator).to(inputs.device)
        weight = _mixing_weight(self.alpha, self.generator)
        if self.mode == "mixup":
            mixed = mixup(inputs, partner, weight)
        else:
            mixed, weight = cutmix(inputs, partner, weight, self.generator)
        self.last_weight, self.last_partner = weight, partner
        batch = _put(batch, self.input_key, mixed)
        return _drop(batch, self.label_key) if self.labels == "drop" else batch

    def state_dict(self) -> Dict[str, Any]:
        """The generator's state."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""
        self.generator.set_state(state["generator"])


class AugmentedViews(torch.utils.data.Dataset):
    """``views_per_example`` fixed augmented views of each example of ``dataset``.

    Item ``j`` is view ``j % views_per_example`` of example ``j // views_per_example``:
    ``augment(example, generator)`` with a generator seeded from ``(seed, j)``, so item ``j``
    is the same tensor in every epoch, after a resume and in any dataloader worker. An
    augment that draws from torch's, numpy's or Python's global generators instead (most
    transform libraries do) is fixed too: it runs with those seeded from ``(seed, j)`` and
    restored after. The example's tensors are cloned first, so an in-place augment leaves
    the dataset alone. The item gets ``view_key``: a 0-dim int64 ``j`` (collated to (B,)),
    which :class:`CachedTeacher` uses to serve the teacher's outputs on that view.

    Fixed views trade variety for compute: Beyer et al. (2022) found that targets
    precomputed on a fixed set of views let the student overfit them, and that KD keeps
    improving with a fresh view at every step (:class:`FunctionMatching`). Use many views
    per example (tens), or fresh views where the teacher's forward is affordable. A shuffled loader with ``num_samples=len(dataset)``
    (``RandomSampler``) visits one view per example per epoch on average.

    Args:
        dataset: a map-style dataset of dict examples.
        augment: ``(example dict, torch.Generator) -> example dict``; view 0 is augmented
            too (pass an augment that leaves it alone to keep the originals).
        views_per_example: the number of fixed views of each example (≥ 1).
        seed: offsets every view's seed.
        view_key: the key added to each item.
    """

    def __init__(self, dataset: Sequence[Dict[str, Any]], augment: Callable[[Dict[str, Any],
                 torch.Generator], Dict[str, Any]], views_per_example: int, seed: int = 0,
                 view_key: str = "view_id"):
        if isinstance(views_per_example, bool) or not isinstance(views_per_example, int) \
                or views_per_example < 1:
            raise ValueError(f"views_per_example must be an int >= 1, got {views_per_example!r}")
        if not callable(augment):
            raise TypeError(f"augment must be a function (example, generator) -> example, got "
                            f"{type(augment).__name__}")
        self.dataset, self.augment, self.views = dataset, augment, views_per_example
        self.seed, self.view_key = int(seed), view_key

    def __len__(self) -> int:
        return len(self.dataset) * self.views

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"view {index} out of range for {len(self)} views")
        example = self.dataset[index // self.views]
        if not isinstance(example, Mapping):
            raise TypeError(f"AugmentedViews needs dict examples, got {type(example).__name__}")
        if self.view_key in example:
            raise KeyError(f"the examples already have a {self.view_key!r} key: choose another "
                           f"view_key")
        view_seed = int(numpy.random.SeedSequence([self.seed, index]).generate_state(1,
                                                                                   numpy.uint64)[0])
        generator = torch.Generator().manual_seed(view_seed)
        copied = {key: value.clone() if isinstance(value, torch.Tensor) else value
                  for key, value in example.items()}
        python_state, numpy_state = random.getstate(), numpy.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed)
                random.seed(view_seed)
                numpy.random.seed(view_seed % 2 ** 32)
                view = dict(self.augment(copied, generator))
        finally:
            random.setstate(python_state)
            numpy.random.set_state(numpy_state)
        view[self.view_key] = torch.tensor(index, dtype=torch.long)
        return view


def views_for_both(view_key: str = "view_id") -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    """A ``batch_postprocessor``: ``{'teacher': batch, 'student': batch without view_key}``.

    Both models get the same tensors (the same view); only the teacher, a
    :class:`CachedTeacher`, receives the view ids (B,) it caches by.
    """
    def split(batch: Dict[str, Any]) -> Dict[str, Any]:
        if not isinstance(batch, Mapping) or view_key not in batch:
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(f"views_for_both: the batch has no {view_key!r} (it has {found}); "
                           f"batches of AugmentedViews carry it")
        return {"teacher": dict(batch), "student": _drop(batch, view_key)}
    return split


def _rows(outputs: Any, batch: int, where: str = "output") -> Any:
    """Per-example slices of a nested output: tensors whose first dimension is ``batch``;
    0-dim tensors (a batch-mean loss) become None. Any other shape is an error."""
    if isinstance(outputs, torch.Tensor):
        if outputs.dim() == 0:
            return [None] * batch
        if outputs.size(0) != batch:
            raise ValueError(f"CachedTeacher caches per example: the teacher's {where} has "
                             f"shape {tuple(outputs.shape)}, whose first dimension is not the "
                             f"{batch} rows it was run on (pass keys= to cache only the "
                             f"outputs that have one)")
        return [row.detach().clone() for row in outputs.unbind(0)]
    if isinstance(outputs, Mapping):
        keys = list(outputs)
        columns = [_rows(outputs[k], batch, f"{where}[{k!r}]") for k in keys]
        return [dict(zip(keys, row)) for row in zip(*columns)] if keys \
            else [{} for _ in range(batch)]
    if isinstance(outputs, (list, tuple)):
        columns = [_rows(item, batch, f"{where}[{i}]") for i, item in enumerate(outputs)]
        return [tuple(row) for row in zip(*columns)] if columns else [() for _ in range(batch)]
    if outputs is None:
        return [None] * batch
    raise TypeError(f"CachedTeacher: cannot cache the teacher's {where} of type "
                    f"{type(outputs).__name__} (tensors, dicts, lists and tuples of them)")


def _stack(rows: List[Any], like: Any) -> Any:
    """The rows stacked back into the structure (and container types) of ``like``."""
    first = rows[0]
    if isinstance(like, torch.Tensor):
        return None if first is None else torch.stack(rows)
    if isinstance(like, Mapping):
        stacked = {key: _stack([row[key] for row in rows], like[key]) for key in first}
        stacked = {key: value for key, value in stacked.items() if value is not None}
        try:
            return type(like)(**stacked)  # a ModelOutput or another dict type
        except Exception:
            return stacked
    if isinstance(like, (list, tuple)):
        items = [_stack([row[i] for row in rows], like[i]) for i in range(len(first))]
        return list(items) if isinstance(like, list) else tuple(items)
    return None


def _select(value: Any, rows: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == batch:
        return value.index_select(0, rows.to(value.device))
    if isinstance(value, Mapping):
        return {key: _select(item, rows, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_select(item, rows, batch) for item in value)
    return value


class CachedTeacher(nn.Module):
    """A frozen teacher whose outputs on each view are computed once, then served from memory.

    ``forward(**batch)`` takes the view ids from ``batch[view_key]`` ((B,) int64), runs the
    teacher on the rows it has not seen (every input tensor whose first dimension is B,
    indexed to those rows) and returns the outputs of all B rows in the structure and
    container types the teacher returned them (a ``ModelOutput`` stays one), on the device
    the teacher returned them. The teacher must be deterministic in eval mode (a cached row
    equals a fresh forward of that view); filling the cache in train mode is refused.
    Outputs without a batch dimension (the mean loss a model returns when it gets labels)
    are not cached: they come back as None, and dict outputs without them.

    Memory: every cached view keeps each cached output's row, e.g. (L, H) hidden states
    per layer: pass ``keys`` to keep only what the adaptor reads (for a dict output), and
    ``device='cpu'`` to keep them off the accelerator. Reading the ids costs one
    device-to-host copy per batch.

    Args:
        teacher: the teacher module, in eval mode.
        view_key: the batch key of the view ids.
        keys: the keys of a dict output to cache (default: all).
        device: where cached rows are kept (default: where the teacher returned them).

    Attributes:
        forwards: teacher forward passes run (batches with rows not yet cached).
        rows_computed: views computed.
    """

    def __init__(self, teacher: nn.Module, view_key: str = "view_id",
                 keys: Optional[Sequence[str]] = None,
                 device: Optional[Union[str, torch.device]] = None):
        super().__init__()
        self.teacher, self.view_key = teacher, view_key
        self.keys = None if keys is None else list(keys)
        self.cache_device = torch.device(device) if device is not None else None
        self._rows: Dict[int, Any] = {}
        self._like: Any = None  # the first output (structure and container types)
        self._output_device: Optional[torch.device] = None
        self.forwards = 0
        self.rows_computed = 0

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        """Forgets every cached view and the counts (after the teacher changed)."""
        self._rows.clear()
        self._like, self.forwards, self.rows_computed = None, 0, 0

    def _keep(self, outputs: Any) -> Any:
        if isinstance(outputs, Mapping) and self.keys is not None:
            missing = [key for key in self.keys if key not in outputs]
            if missing:
                raise KeyError(f"CachedTeacher(keys=...): the teacher's output has no "
                               f"{missing} (it has {list(outputs)})")
            kept = {key: outputs[key] for key in self.keys}
            try:
                return type(outputs)(**kept)
            except Exception:
                return kept
        return outputs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The teacher's outputs on the batch's B views (cached rows, computed rows)."""
        if self.view_key not in kwargs:
            raise KeyError(f"CachedTeacher needs the view ids as keyword {self.view_key!r} "
                           f"(got {sorted(kwargs)}); feed it with views_for_both() batches")
        ids = kwargs.pop(self.view_key)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
            raise ValueError(f"CachedTeacher: {self.view_key!r} must be a (B,) tensor of view "
                             f"ids, got {ids!r:.80}")
        keys = [int(k) for k in ids.tolist()]
        batch = len(keys)
        first_row: Dict[int, int] = {}
        for position, key in enumerate(keys):
            if key not in self._rows:
                first_row.setdefault(key, position)  # a view twice in a batch: computed once
        if first_row:
            if self.teacher.training:
                raise RuntimeError("CachedTeacher: the teacher is in train mode (dropout would "
                                   "be frozen into the cache): call teacher.eval()")
            rows = torch.tensor(list(first_row.values()), dtype=torch.long)
            with torch.no_grad():
                outputs = self.teacher(*_select(list(args), rows, batch),
                                       **_select(kwargs, rows, batch))
            outputs = self._keep(outputs)
            if self._like is None:
                self._like = outputs
                self._output_device = _first_device(outputs)
            if self.cache_device is not None:
                outputs = _to(outputs, self.cache_device)
            for key, row in zip(first_row, _rows(outputs, len(first_row))):
                self._rows[key] = row
            self.forwards += 1
            self.rows_computed += len(first_row)
        result = _stack([self._rows[key] for key in keys], self._like)
        if self.cache_device is not None and self._output_device is not None:
            result = _to(result, self._output_device)
        return result


def _first_device(value: Any) -> Optional[torch.device]:
    if isinstance(value, torch.Tensor):
        return value.device
    items = value.values() if isinstance(value, Mapping) else \
        value if isinstance(value, (list, tuple)) else ()
    for item in items:
        device = _first_device(item)
        if device is not None:
            return device
    return None


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        moved = {key: _to(item, device) for key, item in value.items()}
        try:
            return type(value)(**moved)
        except Exception:
            return moved
    if isinstance(value, (list, tuple)):
        items = [_to(item, device) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value
