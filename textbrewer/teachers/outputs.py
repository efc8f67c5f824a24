"""Teacher sources for the classifier distillers and schemes: the teacher's outputs per batch.

A classifier distiller (:class:`~textbrewer.GeneralDistiller`, :class:`~textbrewer.BasicDistiller`,
the schemes built on them) already trains from a batch's ``'teacher_cache'`` entry instead
of running ``model_T`` (see :func:`textbrewer.training.batches.split_batch`). An **outputs
source** fills that entry: ``outputs(batch, examples)`` returns what the teacher would
return on the batch, in the form the teacher's adaptor reads, and
:class:`TeacherOutputsCollator` attaches it, so the distiller runs with ``model_T=None``:

* :class:`LocalOutputs`: a module here (eval mode, no gradients);
* :class:`CachedOutputs`: arrays written once by :func:`write_teacher_outputs`, read by the
  examples' ``example_index`` (:class:`~textbrewer.cache.IndexedDataset`), with the data
  checked against the ids the cache was written from;
* :class:`MixtureOutputs`: several teachers, their logits averaged (as
  :class:`~textbrewer.MultiTeacherDistiller`) or their probabilities (log Σ w softmax);
* :class:`RoutedOutputs`: each example to the source its key names.

Outputs are dicts of tensors (B, ...) (e.g. ``{'logits': (B, C)}``); write the teacher's
adaptor against those keys (``lambda batch, outputs: {'logits': outputs['logits']}``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..training.runtime import move_to_device

__all__ = ["OutputsSource", "LocalOutputs", "CachedOutputs", "MixtureOutputs",
           "RoutedOutputs", "TeacherOutputsCollator", "write_teacher_outputs",
           "MIXTURE_MODES"]

#: how :class:`MixtureOutputs` combines the teachers' logits
MIXTURE_MODES = ("logits", "probabilities")
_MANIFEST = "outputs_manifest.json"
Outputs = Dict[str, torch.Tensor]


class OutputsSource:
    """The protocol: ``outputs(batch, examples) -> {name: (B, ...) tensor}``.

    ``batch`` is the collated batch (the model's inputs); ``examples`` the examples as the
    dataset gave them (with ``example_index`` from an
    :class:`~textbrewer.cache.IndexedDataset`), for sources that look up by example or route
    by a field.
    """

    def outputs(self, batch: Any, examples: Sequence[Any]) -> Outputs:
        raise NotImplementedError


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def _as_dict(outputs: Any, keys: Optional[Sequence[str]], who: str) -> Outputs:
    """A model's outputs as a dict of tensors, restricted to ``keys`` when given."""
    if isinstance(outputs, torch.Tensor):
        outputs = {"logits": outputs}
    elif isinstance(outputs, (list, tuple)) and not isinstance(outputs, Mapping):
        if keys is None or len(keys) > len(outputs):
            raise ValueError(f"{who}: the model returned a {type(outputs).__name__} of "
                             f"{len(outputs)}; give keys=(...) naming its entries in order")
        outputs = dict(zip(keys, outputs))
    elif not isinstance(outputs, Mapping):
        raise ValueError(f"{who}: the model returned a {type(outputs).__name__}; expected a "
                         f"tensor, a tuple or a dict of tensors")
    wanted = list(outputs) if keys is None else list(keys)
    missing = [key for key in wanted if key not in outputs]
    if missing:
        raise ValueError(f"{who}: the model's outputs have no {missing}; they have "
                         f"{sorted(outputs)}")
    result = {}
    for key in wanted:
        value = outputs[key]
        if isinstance(value, torch.Tensor):
            result[key] = value.detach()
        elif keys is not None:
            raise ValueError(f"{who}: output {key!r} is a {type(value).__name__}, not a tensor")
    return result


class LocalOutputs(OutputsSource):
    """A teacher module in this process: eval mode, no gradients.

    Args:
        model: the teacher.
        keys: the outputs to keep (None: every tensor of a dict output; required, in
            order, when the model returns a tuple).
        forward: ``forward(model, batch)`` -> outputs; default ``model(**batch)`` for a
            dict batch.
        device: where the model runs (default: where its parameters are); the outputs
            come back on the CPU, as a collator's batch does.
    """

    def __init__(self, model: nn.Module, keys: Optional[Sequence[str]] = None,
                 forward: Optional[Callable[[nn.Module, Any], Any]] = None,
                 device: Optional[torch.device] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model, self.keys, self.forward = model, None if keys is None else list(keys), \
            forward or _default_forward
        self.device = device if device is not None else next(
            (p.device for p in model.parameters()), torch.device("cpu"))

    def outputs(self, batch: Any, examples: Sequence[Any] = ()) -> Outputs:
        moved = move_to_device(batch, self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                raw = self.forward(self.model, moved)
        finally:
            self.model.train(was_training)
        return {key: value.cpu() for key, value in
                _as_dict(raw, self.keys, "LocalOutputs").items()}


def _example_hash(example: Any, key: str) -> str:
    """blake2b of an example's ``key`` tensor (its bytes and shape), '' when it has none."""
    if not isinstance(example, Mapping) or key not in example:
        return ""
    value = torch.as_tensor(example[key]).detach().cpu().contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(tuple(value.shape)).encode())
    digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def write_teacher_outputs(model: nn.Module, dataset: Sequence[Any], output_dir: str, *,
                          keys: Sequence[str] = ("logits",), batch_size: int = 32,
                          collate_fn: Optional[Callable[[List[Any]], Any]] = None,
                          forward: Optional[Callable[[nn.Module, Any], Any]] = None,
                          device: Optional[torch.device] = None, hash_key: str = "input_ids",
                          dtype: torch.dtype = torch.float32, overwrite: bool = False
                          ) -> Dict[str, Any]:
    """Runs the teacher once over a map-style dataset and stores the outputs ``keys``.

    Each key becomes one array ``{key}.npy`` of shape (N, ...): every example's output must
    have the same shape (pad token-level inputs to one length). The manifest holds the
    shapes and a hash of each example's ``hash_key`` tensor (its values, shape and dtype:
    int32 ids where the cache saw int64 read as changed data), so that
    :class:`CachedOutputs` can tell when the data changed. Written into a temporary
    folder, then renamed: an
    interrupted write leaves nothing, and an existing cache is replaced only with
    ``overwrite=True``, after the new one is complete.

    Args:
        model: the teacher.
        dataset: examples in index order (what :class:`~textbrewer.cache.IndexedDataset`
            will wrap).
        output_dir: the cache folder.
        keys: the outputs to store (as :class:`LocalOutputs`).
        batch_size, collate_fn: how examples are batched for the teacher (default
            :func:`torch.utils.data.default_collate`).
        forward, device: as :class:`LocalOutputs`.
        hash_key: the example field hashed for the data check ('' to skip it).
        dtype: the stored float dtype (float32 or float16).
        overwrite: replace an existing cache in ``output_dir``.

    Returns:
        The manifest (``count``, ``keys``, ``shapes``, ``dtype``).

    Raises:
        ValueError: an empty dataset, an existing non-empty folder without ``overwrite``,
            outputs whose shapes differ between examples (naming both), a bad dtype.
    """
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    count = len(dataset)
    if count == 0:
        raise ValueError("write_teacher_outputs: the dataset is empty")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(f"{output_dir!r} is not empty; pass overwrite=True to replace it")
    collate = collate_fn or torch.utils.data.default_collate
    source = LocalOutputs(model, keys, forward, device)
    arrays: Dict[str, Optional[np.ndarray]] = {key: None for key in keys}
    hashes = []
    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".outputs-", dir=parent)
    try:
        for start in range(0, count, batch_size):
            examples = [dataset[index] for index in range(start, min(start + batch_size, count))]
            hashes.extend(_example_hash(example, hash_key) for example in examples)
            outputs = source.outputs(collate(examples), examples)
            for key in keys:
                value = outputs[key]
                if value.shape[0] != len(examples):
                    raise ValueError(f"output {key!r} has {value.shape[0]} rows for a batch of "
                                     f"{len(examples)} examples (its first dimension must be "
                                     f"the batch)")
                if arrays[key] is None:
                    arrays[key] = np.lib.format.open_memmap(
                        os.path.join(staging, f"{key}.npy"), mode="w+",
                        dtype=np.float32 if dtype == torch.float32 else np.float16,
                        shape=(count,) + tuple(value.shape[1:]))
                stored = arrays[key].shape[1:]
                if tuple(value.shape[1:]) != stored:
                    last = start + len(examples) - 1
                    raise ValueError(f"output {key!r}: examples {start}..{last} give shape "
                                     f"{tuple(value.shape[1:])}, earlier ones "
                                     f"{tuple(stored)}; every example must have the same "
                                     f"shape (pad the inputs to one length)")
                arrays[key][start:start + len(examples)] = value.to(dtype).numpy()
        manifest = {"format": "textbrewer-teacher-outputs-1", "count": count,
                    "keys": list(keys), "dtype": str(dtype).replace("torch.", ""),
                    "shapes": {key: list(arrays[key].shape[1:]) for key in keys},
                    "hash_key": hash_key, "hashes": hashes}
        for key in keys:  # flushed and closed before the folder moves
            arrays[key].flush()
            arrays[key] = None
        with open(os.path.join(staging, _MANIFEST), "w") as handle:
            json.dump(manifest, handle)
        if os.path.isdir(output_dir):
            old = output_dir.rstrip("/") + ".old-" + os.path.basename(staging)
            os.rename(output_dir, old)
            try:
                os.rename(staging, output_dir)
            except BaseException:
                os.rename(old, output_dir)  # the previous cache back in its place
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


class CachedOutputs(OutputsSource):
    """Outputs written by :func:`write_teacher_outputs`, looked up by ``example_index``.

    Args:
        path: the cache folder.
        index_key: the examples' index field (:class:`~textbrewer.cache.IndexedDataset`).
        check_ids: compare each example's ``hash_key`` tensor with the stored hash and fail
            naming the example when the data changed.

    Raises:
        ValueError: no cache in ``path``; on lookup, an example without its index, an index
            outside the cache, or changed data.
    """

    def __init__(self, path: str, index_key: str = "example_index", check_ids: bool = True):
        manifest_path = os.path.join(path, _MANIFEST)
        if not os.path.isfile(manifest_path):
            raise ValueError(f"{path!r} holds no teacher outputs ({_MANIFEST} is missing); "
                             f"write them with write_teacher_outputs")
        with open(manifest_path) as handle:
            self.manifest = json.load(handle)
        if self.manifest.get("format") != "textbrewer-teacher-outputs-1":
            raise ValueError(f"{manifest_path}: unknown format {self.manifest.get('format')!r}")
        self.path, self.index_key, self.check_ids = path, index_key, check_ids
        self.arrays = {key: np.load(os.path.join(path, f"{key}.npy"), mmap_mode="r")
                       for key in self.manifest["keys"]}
        for key, array in self.arrays.items():
            expected = (self.manifest["count"], *self.manifest["shapes"][key])
            if tuple(array.shape) != tuple(expected):
                raise ValueError(f"{path}: {key}.npy has shape {tuple(array.shape)}, the "
                                 f"manifest says {tuple(expected)} (a damaged cache)")

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def indices(self, examples: Sequence[Any]) -> List[int]:
        """The examples' indices, checked against the cache (and their data, if asked)."""
        result = []
        for position, example in enumerate(examples):
            if not isinstance(example, Mapping) or self.index_key not in example:
                raise ValueError(f"CachedOutputs: example {position} of the batch has no "
                                 f"{self.index_key!r}; wrap the dataset in IndexedDataset")
            index = int(example[self.index_key])
            if not 0 <= index < len(self):
                raise ValueError(f"CachedOutputs: example_index {index} is outside the cache "
                                 f"({len(self)} examples)")
            if self.check_ids and self.manifest.get("hash_key"):
                data = {k: v for k, v in example.items() if k != self.index_key}
                if _example_hash(data, self.manifest["hash_key"]) != \
                        self.manifest["hashes"][index]:
                    raise ValueError(f"CachedOutputs: example {index}'s "
                                     f"{self.manifest['hash_key']!r} differs from the data the "
                                     f"cache was written from (rewrite the cache)")
            result.append(index)
        return result

    def outputs(self, batch: Any, examples: Sequence[Any]) -> Outputs:
        rows = np.asarray(self.indices(examples), dtype=np.int64)
        return {key: torch.from_numpy(np.ascontiguousarray(array[rows])).float()
                for key, array in self.arrays.items()}


class MixtureOutputs(OutputsSource):
    """Several teachers' outputs combined, ``key`` by ``key``.

    Args:
        sources: the teachers' sources (the same classes, the same output shapes).
        weights: one per source, ≥ 0, not all 0 (normalised to sum to 1; default equal).
        mode: ``'logits'``: Σ w_i z_i, the weighted mean of the raw logits (with equal
            weights, :class:`~textbrewer.MultiTeacherDistiller`'s target); or
            ``'probabilities'``: log Σ w_i softmax(z_i), whose softmax at τ = 1 is the
            mixture of the teachers' distributions (a temperature τ ≠ 1 then tempers the
            mixture). These are log-probabilities, not logits: they suit the softmax-based
            KD losses (``'ce'``, ``'kl'``, DKD), not ``'mse'`` on raw logits.
        keys: the outputs combined (default ``('logits',)``); every other output is the
            first source's.
    """

    def __init__(self, sources: Sequence[OutputsSource],
                 weights: Optional[Sequence[float]] = None, mode: str = "logits",
                 keys: Sequence[str] = ("logits",)):
        if not sources:
            raise ValueError("MixtureOutputs needs at least one source")
        if mode not in MIXTURE_MODES:
            raise ValueError(f"mode must be one of {list(MIXTURE_MODES)}, got {mode!r}")
        values = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(values) != len(sources):
            raise ValueError(f"{len(values)} weights for {len(sources)} sources")
        if any(not np.isfinite(w) or w < 0 for w in values) or sum(values) == 0:
            raise ValueError(f"weights must be finite, ≥ 0 and not all 0, got {values}")
        self.sources, self.mode, self.keys = list(sources), mode, list(keys)
        self.weights = [w / sum(values) for w in values]

    def outputs(self, batch: Any, examples: Sequence[Any]) -> Outputs:
        answers = [source.outputs(batch, examples) for source in self.sources]
        combined = dict(answers[0])
        for key in self.keys:
            shapes = [tuple(answer[key].shape) if key in answer else None for answer in answers]
            if len(set(shapes)) != 1 or shapes[0] is None:
                raise ValueError(f"MixtureOutputs: the sources' {key!r} outputs have shapes "
                                 f"{shapes}; they must all have it, with one shape")
            stacked = torch.stack([answer[key].float() for answer in answers])  # (K, B, ..., C)
            weights = torch.tensor(self.weights).view(-1, *([1] * (stacked.dim() - 1)))
            if self.mode == "logits":
                combined[key] = (weights * stacked).sum(0)
            else:
                combined[key] = torch.logsumexp(
                    torch.log_softmax(stacked, dim=-1) + weights.log(), dim=0)
        return combined


class RoutedOutputs(OutputsSource):
    """Each example's outputs from the source its ``key`` field names.

    Args:
        sources: ``{route: source}``.
        key: the example field that names the route.
        default: the route of examples without the field (None: an error).

    The batch is split by rows, each part goes to its source, and the answers are put back
    in the batch's order. A tensor whose first dimension is the batch size B, and a list
    or tuple of B items (collated strings), are split; anything else goes to every route
    whole. Every route must answer with the same outputs and shapes per example.
    """

    def __init__(self, sources: Mapping[str, OutputsSource], key: str = "task",
                 default: Optional[str] = None):
        if not sources:
            raise ValueError("RoutedOutputs needs at least one source")
        if default is not None and default not in sources:
            raise ValueError(f"default={default!r} is not a route; routes: {sorted(sources)}")
        self.sources, self.key, self.default = dict(sources), key, default

    def _route(self, position: int, example: Any) -> str:
        route = example.get(self.key, self.default) if isinstance(example, Mapping) \
            else self.default
        if route not in self.sources:
            raise ValueError(f"RoutedOutputs: example {position} of the batch routes to "
                             f"{route!r} (field {self.key!r}); routes: {sorted(self.sources)}")
        return route

    def outputs(self, batch: Any, examples: Sequence[Any]) -> Outputs:
        routes = [self._route(position, example) for position, example in enumerate(examples)]
        result: Outputs = {}
        names = None
        for route in dict.fromkeys(routes):
            rows = [i for i, r in enumerate(routes) if r == route]
            index = torch.tensor(rows)
            part = self.sources[route].outputs(_rows(batch, index, len(examples)),
                                               [examples[i] for i in rows])
            if names is None:
                names, first = sorted(part), route
            elif sorted(part) != names:
                raise ValueError(f"RoutedOutputs: route {route!r} gives the outputs "
                                 f"{sorted(part)}, route {first!r} {names}: every route must "
                                 f"give the same")
            for name, value in part.items():
                if name not in result:
                    result[name] = value.new_zeros((len(examples),) + tuple(value.shape[1:]))
                elif tuple(result[name].shape[1:]) != tuple(value.shape[1:]):
                    raise ValueError(f"RoutedOutputs: route {route!r} gives {name!r} of shape "
                                     f"{tuple(value.shape[1:])} per example, another route "
                                     f"{tuple(result[name].shape[1:])}")
                result[name][index] = value
        return result


def _rows(batch: Any, index: torch.Tensor, size: int) -> Any:
    """The batch's rows ``index`` (tensors whose first dimension is the batch)."""
    if isinstance(batch, torch.Tensor):
        return batch[index] if batch.dim() and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {key: _rows(value, index, size) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        if len(batch) == size and not any(isinstance(v, torch.Tensor) for v in batch):
            return type(batch)(batch[i] for i in index.tolist())  # one item per example
        return type(batch)(_rows(value, index, size) for value in batch)
    return batch


class TeacherOutputsCollator:
    """Collates examples and attaches ``source.outputs(...)`` as ``batch['teacher_cache']``.

    The classifier distillers then skip the teacher's forward pass and give the teacher's
    adaptor these outputs (train with ``model_T=None``). ``'teacher_cache'`` never reaches
    the student. For a batch with separate ``'teacher'`` and ``'student'`` inputs
    (:class:`~textbrewer.schemes.cross_modal.TwoViewCollate`), the source gets the
    teacher's.

    Args:
        source: an :class:`OutputsSource`.
        collate_fn: examples (without ``index_key``) -> a dict batch (default
            :func:`torch.utils.data.default_collate`).
        index_key: the :class:`~textbrewer.cache.IndexedDataset` field, dropped before
            ``collate_fn`` and kept in the examples given to the source.

    Example:
        >>> source = CachedOutputs("teacher_logits/")
        >>> loader = DataLoader(IndexedDataset(train_set), batch_size=32, shuffle=True,
        ...                     collate_fn=TeacherOutputsCollator(source))
        >>> distiller = GeneralDistiller(train_config, distill_config, None, student,
        ...                              lambda batch, outputs: {'logits': outputs['logits']},
        ...                              adaptor_S)
    """

    def __init__(self, source: OutputsSource,
                 collate_fn: Optional[Callable[[List[Any]], Any]] = None,
                 index_key: str = "example_index"):
        if not callable(getattr(source, "outputs", None)):
            raise TypeError(f"source must be an outputs source (with outputs(batch, "
                            f"examples)), got {type(source).__name__}")
        self.source, self.collate_fn, self.index_key = source, \
            collate_fn or torch.utils.data.default_collate, index_key

    def __call__(self, examples: List[Any]) -> Dict[str, Any]:
        batch = self.collate_fn([{k: v for k, v in example.items() if k != self.index_key}
                                 if isinstance(example, Mapping) else example
                                 for example in examples])
        if not isinstance(batch, Mapping):
            raise ValueError(f"TeacherOutputsCollator needs dict batches (the teacher's "
                             f"outputs go under 'teacher_cache'); collate_fn returned a "
                             f"{type(batch).__name__}")
        two_views = "teacher" in batch and "student" in batch
        outputs = self.source.outputs(batch["teacher"] if two_views else batch, examples)
        return {**batch, "teacher_cache": outputs}
