"""Run a teacher LM once over a dataset and write its top-k outputs to a cache folder.

Crash safety: every file is written as ``NAME.tmp``, flushed, fsynced and renamed into
place, first in a hidden staging folder inside the cache folder; once every data file is
written they are moved into the cache folder (an old cache's files out first, its
manifest before them) and ``manifest.json`` is renamed into place last. A folder without
``manifest.json`` is therefore never a complete cache, and
:class:`~textbrewer.cache.TeacherCache` refuses it (as it refuses files the manifest does
not list); a run that fails before the end leaves the folder as it found it.
"""
from __future__ import annotations

import datetime
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoint import fsync_folder
from .manifest import (CACHE_FILE_PATTERN, INDEX_FIELDS, LOGPROB_DTYPE, MANIFEST_NAME,
                       POSITION_RULES, TAIL_DTYPE, FileEntry, ShardInfo,
                       TeacherCacheManifest, data_fingerprint, example_hash, file_sha256,
                       id_dtype_for_vocab, index_file_name, shard_file_name,
                       teacher_fingerprint)

__all__ = ["write_teacher_cache", "pad_collate", "default_logits_fn"]

LogitsFn = Callable[[nn.Module, Dict[str, Any]], torch.Tensor]
# fp16's most negative finite value: lower log-probs are stored as this, not -inf, so that
# p · log p stays 0 (not NaN) in a loss.
_FP16_MIN = float(np.finfo(np.float16).min)
# Rows of (rows, V) float32 log-probs computed at once: bounds the writer's extra memory
# to ~256 MB whatever the batch and vocabulary.
_CHUNK_ELEMENTS = 1 << 26
# The new cache is written in a hidden folder inside output_dir (the reader ignores names
# starting with '.'), then moved into place: a failing run leaves the old cache as it was.
_STAGING_PREFIX = ".staging-"


def pad_collate(examples: Sequence[Mapping], pad_token_id: int = 0) -> Dict[str, Any]:
    """Right-pad a list of examples into a batch.

    Args:
        examples: dicts with ``input_ids`` (L_i,), optional ``attention_mask`` (L_i,) and
            ``labels`` (L_i,); other keys are collated by ``torch.utils.data.default_collate``.
        pad_token_id: id written at padded positions of ``input_ids``.

    Returns:
        dict with ``input_ids`` (B, L) int64, ``attention_mask`` (B, L) int64 (0 at padding),
        ``labels`` (B, L) int64 (-100 at padding) when the examples have labels, and the
        other keys. L = max L_i. Position t of row b is position t of example b.
    """
    if not examples:
        raise ValueError("pad_collate: no examples")
    for number, example in enumerate(examples):
        if not isinstance(example, Mapping) or "input_ids" not in example:
            raise ValueError(f"example {number} of the batch is a {type(example).__name__}"
                             f"{'' if not isinstance(example, Mapping) else ' without input_ids'}"
                             f"; expected a dict with 'input_ids' (L,)")
    ids = [_as_1d_long(example["input_ids"], "input_ids") for example in examples]
    length = max(len(row) for row in ids)
    batch = {"input_ids": torch.full((len(ids), length), pad_token_id, dtype=torch.long),
             "attention_mask": torch.zeros(len(ids), length, dtype=torch.long)}
    with_labels = ["labels" in example for example in examples]
    if any(with_labels) and not all(with_labels):
        raise ValueError("pad_collate: some examples have 'labels' and others do not")
    if all(with_labels):
        batch["labels"] = torch.full((len(ids), length), -100, dtype=torch.long)
    for row, (example, tokens) in enumerate(zip(examples, ids)):
        size = len(tokens)
        batch["input_ids"][row, :size] = tokens
        mask = example.get("attention_mask")
        batch["attention_mask"][row, :size] = (1 if mask is None else
                                               _as_1d_long(mask, "attention_mask", size))
        if "labels" in batch:
            batch["labels"][row, :size] = _as_1d_long(example["labels"], "labels", size)
    others = [key for key in examples[0] if key not in batch]
    for key in others:
        batch[key] = torch.utils.data.default_collate([example[key] for example in examples])
    return batch


def _as_1d_long(values: Any, name: str, length: Optional[int] = None) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D (L,), got shape {tuple(tensor.shape)}")
    if length is not None and len(tensor) != length:
        raise ValueError(f"{name} has length {len(tensor)}, input_ids has {length}")
    return tensor.long()


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def default_logits_fn(teacher: nn.Module, batch: Dict[str, Any]) -> torch.Tensor:
    """Logits of a teacher for a batch.

    Calls ``teacher(input_ids=..., attention_mask=...)`` when its ``forward`` takes those
    names (Hugging Face causal LMs, :class:`textbrewer.testing.TinyTransformer`), else
    ``teacher(input_ids)`` (e.g. ``nn.Sequential``). Labels are not passed, so no loss is
    computed. The output may be a tensor, have ``.logits``, be a dict with ``'logits'``, or
    a tuple whose first element is the logits.

    Returns:
        (B, L, V) logits.
    """
    if _accepts(teacher, "input_ids"):
        kwargs = {"input_ids": batch["input_ids"]}
        if "attention_mask" in batch and _accepts(teacher, "attention_mask"):
            kwargs["attention_mask"] = batch["attention_mask"]
        outputs = teacher(**kwargs)
    else:
        outputs = teacher(batch["input_ids"])
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ValueError(f"cannot find logits in the teacher's output ({type(outputs).__name__});"
                     f" pass logits_fn(teacher, batch) -> (B, L, V) logits")


def _iter_examples(dataset: Iterable) -> Iterator[Any]:
    # Map-style datasets by index, so that "example i" is dataset[i] even for datasets
    # whose __iter__ would shuffle or that only define __getitem__/__len__.
    if (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
            and not isinstance(dataset, torch.utils.data.IterableDataset)):
        for index in range(len(dataset)):
            yield dataset[index]
    else:
        yield from dataset


def _batches(dataset: Iterable, batch_size: int) -> Iterator[List[Any]]:
    batch = []
    for example in _iter_examples(dataset):
        batch.append(example)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _valid_positions(batch: Dict[str, Any], lengths: List[int], rule: str) -> torch.Tensor:
    """(B, L) bool: the positions that get a row, by the rule (see POSITION_RULES)."""
    ids = batch["input_ids"]
    size, length = ids.shape
    within = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    mask = batch.get("attention_mask")
    valid = within & (mask.cpu().bool() if mask is not None else True)
    if rule != "attention_mask":
        labels = batch.get("labels")
        if labels is None:
            raise ValueError(f"positions={rule!r} needs 'labels' in every batch; this batch "
                             f"has keys {sorted(batch)}")
        keep = labels.cpu() != -100
        if rule == "shifted_labels":
            # Logits at t are scored against labels[t + 1]; the last position has none.
            keep = torch.cat([keep[:, 1:], torch.zeros(size, 1, dtype=torch.bool)], dim=1)
        valid = valid & keep
    return valid


def _move(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor)
            else value for key, value in batch.items()}


def _top_k_rows(logits: torch.Tensor, k: int):
    """(n, V) logits -> top-k ids (n, k), log-probs (n, k) float32, tail mass (n,) float32."""
    chunk = max(1, _CHUNK_ELEMENTS // logits.shape[-1])
    ids, logprobs, tails = [], [], []
    # max(..., 1): a batch without valid positions still yields (0, k) arrays.
    for start in range(0, max(logits.shape[0], 1), chunk):
        part = logits[start:start + chunk].float().log_softmax(dim=-1)
        values, indices = part.topk(k, dim=-1)
        # Tail as the sum of the other V - k probabilities rather than 1 - sum(top-k): no
        # cancellation, so a tail of 1e-9 keeps its digits; exactly 0 when k == V. In place
        # (part is ours; values and indices are copies), and no max-shift needed: p <= 1.
        rest = part.scatter_(-1, indices, float("-inf")).exp_().sum(dim=-1)
        ids.append(indices)
        logprobs.append(values)
        tails.append(rest)
    return torch.cat(ids), torch.cat(logprobs), torch.cat(tails)


def _write_file(folder: str, name: str, write: Callable[[Any], None]) -> FileEntry:
    path = os.path.join(folder, name)
    temporary = path + ".tmp"
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    entry = FileEntry(name=name, bytes=os.path.getsize(temporary),
                      sha256=file_sha256(temporary))
    os.replace(temporary, path)
    return entry


def _write_npy(folder: str, name: str, array: np.ndarray) -> FileEntry:
    return _write_file(folder, name, lambda handle: np.save(handle, array))


def _prepare_folder(path: str, overwrite: bool) -> None:
    """Checks that ``path`` may receive a cache; deletes nothing but a killed writer's
    staging folders: an existing cache is replaced only once the new one is complete."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path}: output_dir exists and is not a folder")
    os.makedirs(path, exist_ok=True)
    for entry in os.listdir(path):
        if entry.startswith(_STAGING_PREFIX):  # a writer killed before it finished
            shutil.rmtree(os.path.join(path, entry), ignore_errors=True)
    entries = sorted(os.listdir(path))
    if not entries:
        return
    if not overwrite:
        what = ("a teacher cache" if MANIFEST_NAME in entries else
                "an incomplete teacher cache (no manifest.json)"
                if all(CACHE_FILE_PATTERN.match(entry) for entry in entries) else
                f"{len(entries)} files")
        raise FileExistsError(f"{path}: output_dir is not empty (it holds {what}); pass "
                              f"overwrite=True to replace a cache, or choose another folder")
    foreign = [entry for entry in entries if not CACHE_FILE_PATTERN.match(entry)
               or not os.path.isfile(os.path.join(path, entry))]
    if foreign:
        raise ValueError(f"{path}: overwrite=True only replaces a teacher cache, and this "
                         f"folder holds other files: {foreign[:5]}"
                         f"{' ...' if len(foreign) > 5 else ''}")


def _replace_cache(path: str, staging: str, manifest_text: str) -> None:
    """Moves the complete new cache from ``staging`` into ``path`` in place of the old one:
    the old manifest goes first (from then on the folder is not a complete cache), then the
    old cache files; the new files come in, and the new manifest last."""
    fsync_folder(staging)
    entries = sorted(os.listdir(path))
    if MANIFEST_NAME in entries:
        os.remove(os.path.join(path, MANIFEST_NAME))
        fsync_folder(path)
    for entry in entries:
        if entry != MANIFEST_NAME and CACHE_FILE_PATTERN.match(entry) \
                and os.path.isfile(os.path.join(path, entry)):
            os.remove(os.path.join(path, entry))
    for entry in sorted(os.listdir(staging)):
        os.replace(os.path.join(staging, entry), os.path.join(path, entry))
    os.rmdir(staging)
    # Data files are durable before the manifest appears: the rename is the commit point.
    fsync_folder(path)
    _write_file(path, MANIFEST_NAME, lambda handle: handle.write(manifest_text.encode("utf-8")))
    fsync_folder(path)


class _CacheWriter:
    """Buffers rows example by example and writes a shard each time it holds enough."""

    def __init__(self, folder: str, k: int, id_dtype: np.dtype, shard_tokens: int):
        self.folder, self.k, self.id_dtype, self.shard_tokens = folder, k, id_dtype, shard_tokens
        self.shards: List[ShardInfo] = []
        self.row_offsets, self.seq_offsets, self.hashes = [0], [0], []
        self._reset_buffer()

    def _reset_buffer(self):
        self.buffer: Dict[str, list] = {"ids": [], "logprobs": [], "tail_mass": [],
                                        "valid": []}
        self.buffer_rows = self.buffer_examples = self.buffer_positions = 0

    def add(self, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray,
            valid: np.ndarray, hashed: int) -> None:
        for name, value in (("ids", ids), ("logprobs", logprobs), ("tail_mass", tail),
                            ("valid", valid)):
            self.buffer[name].append(value)
        self.buffer_rows += len(ids)
        self.buffer_examples += 1
        self.buffer_positions += len(valid)
        self.row_offsets.append(self.row_offsets[-1] + len(ids))
        self.seq_offsets.append(self.seq_offsets[-1] + len(valid))
        self.hashes.append(hashed)
        # Shards close at example boundaries, so an example never spans two shards.
        if self.buffer_rows >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buffer_examples:
            return
        number = len(self.shards)
        arrays = {
            "ids": np.concatenate(self.buffer["ids"]).astype(self.id_dtype, copy=False)
            .reshape(-1, self.k),
            "logprobs": np.concatenate(self.buffer["logprobs"]).astype(LOGPROB_DTYPE,
                                                                        copy=False)
            .reshape(-1, self.k),
            "tail_mass": np.concatenate(self.buffer["tail_mass"]).astype(TAIL_DTYPE,
                                                                          copy=False),
            "valid": np.packbits(np.concatenate(self.buffer["valid"]).astype(bool)),
        }
        files = {name: _write_npy(self.folder, shard_file_name(number, name), array)
                 for name, array in arrays.items()}
        previous = self.shards[-1] if self.shards else None
        self.shards.append(ShardInfo(
            first_example=previous.first_example + previous.num_examples if previous else 0,
            num_examples=self.buffer_examples,
            first_row=previous.first_row + previous.rows if previous else 0,
            rows=self.buffer_rows,
            first_position=(previous.first_position + previous.positions if previous
                            else 0),
            positions=self.buffer_positions, files=files))
        self._reset_buffer()

    def write_index(self) -> Dict[str, FileEntry]:
        arrays = {"row_offsets": np.asarray(self.row_offsets, dtype=np.int64),
                  "seq_offsets": np.asarray(self.seq_offsets, dtype=np.int64),
                  "example_hashes": np.asarray(self.hashes, dtype=np.uint64)}
        return {name: _write_npy(self.folder, index_file_name(name), arrays[name])
                for name in INDEX_FIELDS}


def write_teacher_cache(teacher: nn.Module, dataset: Iterable[Mapping], output_dir: str,
                        k: int, *, batch_size: int = 8,
                        collate_fn: Optional[Callable[[List[Any]], Dict[str, Any]]] = None,
                        device: Optional[str] = None, logits_fn: Optional[LogitsFn] = None,
                        positions: str = "attention_mask", shard_tokens: int = 1_000_000,
                        overwrite: bool = False, fingerprint: str = "full",
                        progress: bool = False) -> TeacherCacheManifest:
    """Run the teacher once over a dataset and cache its top-k log-probs per valid token.

    The dataset is read in order (``dataset[0]``, ``dataset[1]``, ... for a map-style
    dataset): example i of the dataset is example i of the cache. For every valid position
    (see ``positions``) the cache keeps the teacher's k most likely token ids, their
    log-probs (log-softmax at temperature 1, stored as float16) and the tail mass
    1 - sum of the top-k probabilities (float32, computed from the other V - k entries).

    Args:
        teacher: the teacher; put in eval mode while writing (its mode is restored after),
            run under ``torch.inference_mode``. Moved to ``device`` when one is given.
        dataset: examples, each a dict with ``input_ids`` (L_i,) and optional
            ``attention_mask`` (L_i,) and ``labels`` (L_i,).
        output_dir: the cache folder; created if needed, must be empty unless
            ``overwrite``.
        k: entries kept per token, 1 <= k <= V.
        batch_size: examples per teacher forward.
        collate_fn: list of examples -> batch dict with ``input_ids`` (B, L) and optional
            ``attention_mask``/``labels`` (B, L). It must pad on the right (position t of
            row b is position t of example b; checked). Default :func:`pad_collate`.
        device: where the teacher runs; default: the device of its first parameter.
        logits_fn: ``(teacher, batch) -> (B, L, V) logits``; default
            :func:`default_logits_fn`.
        positions: which positions get a row: ``'attention_mask'``, ``'labels'`` or
            ``'shifted_labels'`` (see :data:`~textbrewer.cache.manifest.POSITION_RULES`).
        shard_tokens: rows per shard file (a shard closes at the first example boundary at
            or past this many rows).
        overwrite: replace the cache already in ``output_dir`` (only cache files are
            deleted; a folder with other files is refused). The old cache stays as it is
            until the new one is complete: a run that fails leaves it intact.
        fingerprint: ``'full'`` (sha256 of every weight: reads the whole model once) or
            ``'structure'`` (names, shapes, dtypes: instant). See
            :func:`~textbrewer.cache.manifest.teacher_fingerprint`.
        progress: show a tqdm progress bar.

    Returns:
        The manifest written to ``output_dir/manifest.json``.

    Raises:
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is False.
        ValueError: bad arguments, an empty dataset, malformed examples, a collate that
            pads on the left, or logits whose shape is not (B, L, V) with a constant V.

    Example:
        >>> manifest = write_teacher_cache(teacher, train_set, "cache/", k=32)
        >>> cache = TeacherCache("cache/", expected_vocab_size=student_vocab_size)
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    for name, value in (("batch_size", batch_size), ("shard_tokens", shard_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if positions not in POSITION_RULES:
        raise ValueError(f"positions must be one of {sorted(POSITION_RULES)}, got "
                         f"{positions!r}")
    if fingerprint not in ("full", "structure"):
        raise ValueError(f"fingerprint must be 'full' or 'structure', got {fingerprint!r}")
    output_dir = os.fspath(output_dir)
    _prepare_folder(output_dir, overwrite)
    staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=output_dir)
    try:
        manifest, text = _write_staged(teacher, dataset, staging, k, batch_size, collate_fn,
                                       device, logits_fn, positions, shard_tokens, fingerprint,
                                       progress)
        _replace_cache(output_dir, staging, text)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a success
    return manifest


def _write_staged(teacher, dataset, output_dir, k, batch_size, collate_fn, device, logits_fn,
                  positions, shard_tokens, fingerprint, progress):
    """The cache's data files in ``output_dir`` (the staging folder); returns the manifest
    and its JSON text, not yet written."""
    collate_fn = collate_fn or pad_collate
    logits_fn = logits_fn or default_logits_fn
    if device is not None:
        teacher.to(device)
        run_device = torch.device(device)
    else:
        first = next(teacher.parameters(), None)
        run_device = first.device if first is not None else torch.device("cpu")

    writer: Optional[_CacheWriter] = None
    vocab_size = None
    batches = _batches(dataset, batch_size)
    if progress:
        from tqdm.auto import tqdm
        total = len(dataset) if hasattr(dataset, "__len__") else None
        batches = tqdm(batches, total=None if total is None else -(-total // batch_size),
                       desc="teacher cache", unit="batch")
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.inference_mode():
            seen = 0
            for examples in batches:
                batch = collate_fn(examples)
                lengths = _check_batch(examples, batch, seen)
                valid = _valid_positions(batch, lengths, positions)
                logits = logits_fn(teacher, _move(batch, run_device))
                if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(valid.shape):
                    raise ValueError(f"examples {seen}..{seen + len(examples) - 1}: logits "
                                     f"have shape {tuple(logits.shape)}, expected (B, L, V) "
                                     f"with (B, L) = {tuple(valid.shape)}")
                if vocab_size is None:
                    vocab_size = logits.shape[-1]
                    if k > vocab_size:
                        raise ValueError(f"k={k} is larger than the teacher's vocab_size="
                                         f"{vocab_size}")
                    writer = _CacheWriter(output_dir, k, id_dtype_for_vocab(vocab_size),
                                          shard_tokens)
                elif logits.shape[-1] != vocab_size:
                    raise ValueError(f"examples {seen}..{seen + len(examples) - 1}: logits "
                                     f"have vocab size {logits.shape[-1]}, earlier batches "
                                     f"{vocab_size}")
                # Boolean indexing copies the logits; skip it when every position is kept.
                rows = (logits.reshape(-1, vocab_size) if bool(valid.all())
                        else logits[valid.to(logits.device)])
                ids, logprobs, tail = _top_k_rows(rows, k)
                ids = ids.cpu().numpy()
                logprobs = logprobs.clamp(min=_FP16_MIN).to(torch.float16).cpu().numpy()
                tail = tail.cpu().numpy()
                counts = valid.sum(dim=1).tolist()
                start = 0
                for row, (example, count) in enumerate(zip(examples, counts)):
                    writer.add(ids[start:start + count], logprobs[start:start + count],
                               tail[start:start + count],
                               valid[row, :lengths[row]].numpy(),
                               example_hash(example["input_ids"]))
                    start += count
                seen += len(examples)
    finally:
        teacher.train(was_training)
    if writer is None:
        raise ValueError("the dataset is empty: nothing to cache")
    writer.flush()
    index = writer.write_index()
    hashes = np.asarray(writer.hashes, dtype=np.uint64)
    seq_offsets = np.asarray(writer.seq_offsets, dtype=np.int64)
    manifest = TeacherCacheManifest(
        k=k, vocab_size=vocab_size, num_examples=len(writer.hashes),
        num_tokens=writer.row_offsets[-1], num_positions=writer.seq_offsets[-1],
        dtypes={"ids": writer.id_dtype.name, "logprobs": LOGPROB_DTYPE,
                "tail_mass": TAIL_DTYPE},
        positions=positions, temperature=1.0,
        teacher={"fingerprint": teacher_fingerprint(teacher, fingerprint),
                 "fingerprint_mode": fingerprint, "class": type(teacher).__name__,
                 "num_parameters": sum(p.numel() for p in teacher.parameters())},
        data={"fingerprint": data_fingerprint(hashes, seq_offsets),
              "example_hash": "blake2b-64 of input_ids as little-endian int64, "
                              "stored in index.example_hashes.npy"},
        index=index, shards=writer.shards,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return manifest, json.dumps(manifest.to_dict(), indent=1)


def _check_batch(examples: List[Any], batch: Dict[str, Any], seen: int) -> List[int]:
    """Example lengths; checks the collate kept example positions (right padding)."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(f"collate_fn must return a dict with 'input_ids' (B, L); got "
                         f"{type(batch).__name__}")
    ids = batch["input_ids"].cpu()
    if ids.dim() != 2 or ids.shape[0] != len(examples):
        raise ValueError(f"collate_fn returned input_ids of shape {tuple(ids.shape)} for "
                         f"{len(examples)} examples; expected (B, L)")
    lengths = []
    for row, example in enumerate(examples):
        if not isinstance(example, Mapping) or "input_ids" not in example:
            raise ValueError(f"example {seen + row} is a {type(example).__name__}; expected "
                             f"a dict with 'input_ids' (L,)")
        tokens = _as_1d_long(example["input_ids"], f"example {seen + row}: input_ids")
        if len(tokens) > ids.shape[1] or not torch.equal(ids[row, :len(tokens)], tokens):
            raise ValueError(f"example {seen + row}: the collated input_ids do not start "
                             f"with the example's input_ids; collate_fn must pad on the "
                             f"right and keep every token (position t of the batch row is "
                             f"position t of the example)")
        lengths.append(len(tokens))
    return lengths
