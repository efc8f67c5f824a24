"""Read a teacher cache, memory-mapped, and look up the rows of a training batch."""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .manifest import (INDEX_FIELDS, MANIFEST_NAME, SHARD_FIELDS, FileEntry,
                       TeacherCacheManifest, data_fingerprint, example_hash, file_sha256,
                       teacher_fingerprint)
from .writer import _iter_examples

__all__ = ["TeacherCache"]

Indices = Union[Sequence[int], np.ndarray, torch.Tensor]


class TeacherCache:
    """A teacher cache opened read-only; shards are memory-mapped on first use.

    Opening checks, and refuses with a ``ValueError`` or ``FileNotFoundError`` that names
    the path and the problem: a missing or invalid ``manifest.json`` (a writer that did
    not finish leaves shards without it), a missing file, a file of the wrong size, files
    the manifest does not list (leftovers; names starting with '.' are ignored), a vocab
    size other than ``expected_vocab_size``, and with ``verify='checksum'`` a file whose
    sha256 differs. Checksums are off by default because they read every byte (about
    1 s per GB); call :meth:`verify` or ``python -m textbrewer.cache info DIR`` for them.
    Each shard's ``.npy`` header (dtype, shape) is checked when the shard is first mapped.

    Args:
        path: the cache folder.
        expected_vocab_size: the student's vocabulary size V; a cache written for another
            V is refused.
        verify: ``'size'`` (sizes only, instant) or ``'checksum'`` (sizes and sha256).

    Example:
        >>> cache = TeacherCache("cache/", expected_vocab_size=50257)
        >>> rows = cache.lookup([7, 2, 9], input_ids=batch["input_ids"])
        >>> rows["topk_ids"].shape                      # (3, L, k)
    """

    def __init__(self, path: str, *, expected_vocab_size: Optional[int] = None,
                 verify: str = "size"):
        if verify not in ("size", "checksum"):
            raise ValueError(f"verify must be 'size' or 'checksum', got {verify!r}")
        self.path = os.fspath(path)
        self.manifest = TeacherCacheManifest.load(self.path)
        if expected_vocab_size is not None and expected_vocab_size != self.manifest.vocab_size:
            raise ValueError(f"{self.path}: the cache was written for vocab_size="
                             f"{self.manifest.vocab_size}, but expected_vocab_size="
                             f"{expected_vocab_size} (teacher and student vocabularies "
                             f"differ?)")
        self._check_files(checksums=verify == "checksum")
        index = {name: np.load(self._file(self.manifest.index[name]), allow_pickle=False)
                 for name in INDEX_FIELDS}
        count = self.manifest.num_examples
        expected = {"row_offsets": ((count + 1,), np.int64, self.manifest.num_tokens),
                    "seq_offsets": ((count + 1,), np.int64, self.manifest.num_positions),
                    "example_hashes": ((count,), np.uint64, None)}
        for name, (shape, dtype, last) in expected.items():
            array = index[name]
            if array.shape != shape or array.dtype != dtype or (
                    last is not None and int(array[-1]) != last):
                raise ValueError(f"{self._file(self.manifest.index[name])}: holds "
                                 f"{array.dtype}{array.shape}, expected {np.dtype(dtype)}"
                                 f"{shape}{'' if last is None else f' ending at {last}'}")
        self._row_offsets = index["row_offsets"]
        self._seq_offsets = index["seq_offsets"]
        self._hashes = index["example_hashes"]
        self._shard_starts = np.asarray([shard.first_example
                                         for shard in self.manifest.shards], dtype=np.int64)
        self._maps: List[Optional[Dict[str, np.ndarray]]] = [None] * len(self.manifest.shards)

    # -- opening and verification ------------------------------------------------------
    def _file(self, entry: FileEntry) -> str:
        return os.path.join(self.path, entry.name)

    def _check_files(self, checksums: bool) -> None:
        entries = self.manifest.files()
        listed = {entry.name for entry in entries} | {MANIFEST_NAME}
        leftovers = sorted(name for name in os.listdir(self.path)
                           if name not in listed and not name.startswith("."))
        if leftovers:
            raise ValueError(f"{self.path}: files the manifest does not list: "
                             f"{leftovers[:5]}{' ...' if len(leftovers) > 5 else ''} "
                             f"(leftovers of an interrupted or earlier run?); rebuild the "
                             f"cache with overwrite=True or remove them")
        for entry in entries:
            path = self._file(entry)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: listed in the manifest but missing")
            size = os.path.getsize(path)
            if size != entry.bytes:
                raise ValueError(f"{path}: {size} bytes, the manifest says {entry.bytes} "
                                 f"(truncated or replaced file)")
        if checksums:
            self.verify()

    def verify(self) -> None:
        """Check every file's sha256 against the manifest (reads the whole cache).

        Raises:
            ValueError: naming each file whose checksum differs.
        """
        bad = [self._file(entry) for entry in self.manifest.files()
               if file_sha256(self._file(entry)) != entry.sha256]
        if bad:
            raise ValueError(f"{self.path}: sha256 differs from the manifest for "
                             f"{len(bad)} file(s): {bad[:5]} (corrupted cache; rebuild it)")

    def _shard(self, number: int) -> Dict[str, np.ndarray]:
        arrays = self._maps[number]
        if arrays is None:
            shard = self.manifest.shards[number]
            manifest = self.manifest
            expected = {"ids": ((shard.rows, manifest.k), manifest.dtypes["ids"]),
                        "logprobs": ((shard.rows, manifest.k), manifest.dtypes["logprobs"]),
                        "tail_mass": ((shard.rows,), manifest.dtypes["tail_mass"]),
                        "valid": (((shard.positions + 7) // 8,), "uint8")}
            arrays = {}
            for name in SHARD_FIELDS:
                path = self._file(shard.files[name])
                try:
                    array = np.load(path, mmap_mode="r", allow_pickle=False)
                except ValueError as error:
                    raise ValueError(f"{path}: not a readable .npy file ({error})") from None
                shape, dtype = expected[name]
                if array.shape != shape or array.dtype != np.dtype(dtype):
                    raise ValueError(f"{path}: holds {array.dtype}{array.shape}, the "
                                     f"manifest implies {dtype}{shape}")
                arrays[name] = array
            self._maps[number] = arrays
        return arrays

    def __getstate__(self):
        # Memory maps are re-opened in each DataLoader worker rather than pickled.
        state = dict(self.__dict__)
        state["_maps"] = [None] * len(self._maps)
        return state

    # -- facts -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.manifest.num_examples

    @property
    def k(self) -> int:
        """Top-k entries per token."""
        return self.manifest.k

    @property
    def vocab_size(self) -> int:
        """The teacher's vocabulary size V."""
        return self.manifest.vocab_size

    @property
    def num_tokens(self) -> int:
        """Rows (valid positions) over all examples."""
        return self.manifest.num_tokens

    @property
    def bytes_per_token(self) -> float:
        """Bytes of data files per cached token: k·(id bytes + 2) + 4, plus the overhead of
        the valid-position bits (1/8 byte per sequence position), the index (24 bytes per
        example) and .npy headers (128 bytes per file)."""
        return self.manifest.bytes_per_token

    def example_length(self, index: int) -> int:
        """L_i, the length of example ``index``'s input_ids when it was cached."""
        self._check_index(index)
        return int(self._seq_offsets[index + 1] - self._seq_offsets[index])

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: example index {index} out of range; the cache "
                             f"holds {len(self)} examples")

    # -- lookup -------------------------------------------------------------------------
    def lookup(self, example_indices: Indices, input_ids: Optional[torch.Tensor] = None,
               pad_to: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """The cached teacher outputs of some examples, aligned with their positions.

        Args:
            example_indices: (B,) dataset indices of the batch's examples, in batch order.
            input_ids: optional (B, L) batch ids, right-padded; row b must start with
                example b's cached ids (checked against the stored 64-bit hashes).
            pad_to: L of the result; default ``input_ids.shape[1]``, else max L_i.

        Returns:
            dict with ``topk_ids`` (B, L, k) int64, ``topk_logprobs`` (B, L, k) float32
            (log-probs at temperature 1), ``tail_mass`` (B, L) float32 (1 - sum of the
            top-k probabilities) and ``mask`` (B, L) bool (True where a row exists).
            Positions without a row hold id 0, log-prob 0 and tail 0: a valid distribution,
            so a loss computed before masking stays finite.

        Raises:
            IndexError: an index outside [0, len(cache)).
            ValueError: input_ids that do not match the cache (naming the example index),
                or ``pad_to``/``input_ids`` shorter than an example.
        """
        indices = (example_indices.detach().cpu().numpy() if isinstance(
            example_indices, torch.Tensor) else np.asarray(example_indices))
        indices = indices.astype(np.int64).reshape(-1)
        for index in indices:
            self._check_index(int(index))
        lengths = self._seq_offsets[indices + 1] - self._seq_offsets[indices]
        if input_ids is not None:
            self._check_ids(indices, lengths, input_ids)
        width = pad_to if pad_to is not None else (
            input_ids.shape[1] if input_ids is not None else int(lengths.max(initial=0)))
        if len(indices) and width < lengths.max():
            longest = int(indices[int(np.argmax(lengths))])
            raise ValueError(f"pad_to={width} is shorter than example {longest} "
                             f"(L={int(lengths.max())})")
        size, k = len(indices), self.k
        ids = np.zeros((size, width, k), dtype=np.int64)
        logprobs = np.zeros((size, width, k), dtype=np.float32)
        tail = np.zeros((size, width), dtype=np.float32)
        mask = np.zeros((size, width), dtype=bool)
        shard_numbers = np.searchsorted(self._shard_starts, indices, side="right") - 1
        for row, (index, number) in enumerate(zip(indices, shard_numbers)):
            shard, arrays = self.manifest.shards[number], self._shard(int(number))
            first = int(self._row_offsets[index]) - shard.first_row
            last = int(self._row_offsets[index + 1]) - shard.first_row
            start = int(self._seq_offsets[index]) - shard.first_position
            length = int(lengths[row])
            bits = np.unpackbits(arrays["valid"][start // 8:(start + length + 7) // 8])
            valid = bits[start % 8:start % 8 + length].astype(bool)
            positions = np.flatnonzero(valid)
            if len(positions) != last - first:
                raise ValueError(f"{self.path}: example {index} has {len(positions)} valid "
                                 f"positions but {last - first} rows (corrupted cache)")
            ids[row, positions] = arrays["ids"][first:last]
            logprobs[row, positions] = arrays["logprobs"][first:last]
            tail[row, positions] = arrays["tail_mass"][first:last]
            mask[row, positions] = True
        return {"topk_ids": torch.from_numpy(ids), "topk_logprobs": torch.from_numpy(logprobs),
                "tail_mass": torch.from_numpy(tail), "mask": torch.from_numpy(mask)}

    def _check_ids(self, indices: np.ndarray, lengths: np.ndarray,
                   input_ids: torch.Tensor) -> None:
        ids = torch.as_tensor(input_ids).detach().cpu()
        if ids.dim() != 2 or ids.shape[0] != len(indices):
            raise ValueError(f"input_ids must be (B, L) with B={len(indices)} (one row per "
                             f"example index), got shape {tuple(ids.shape)}")
        for row, (index, length) in enumerate(zip(indices, lengths)):
            if length > ids.shape[1]:
                raise ValueError(f"{self.path}: example {index} (batch row {row}) has "
                                 f"{length} cached tokens but input_ids are "
                                 f"{ids.shape[1]} long")
            if example_hash(ids[row, :length]) != int(self._hashes[index]):
                raise ValueError(f"{self.path}: example {index} (batch row {row}): "
                                 f"input_ids do not match the cached example (different "
                                 f"64-bit hash of its first {length} ids); the dataset "
                                 f"changed since the cache was written, or the batch is "
                                 f"not in the cache's indexing, or it is padded on the left")

    # -- whole checks -------------------------------------------------------------------
    def check_matches(self, dataset: Iterable) -> None:
        """Check that a dataset is the one the cache was written for, example by example.

        Args:
            dataset: the same kind of dataset given to the writer (examples with
                ``input_ids``), read in order.

        Raises:
            ValueError: naming the first mismatching example indices (up to 5) and the
                count, or the difference in the number of examples.
        """
        mismatched, count = [], 0
        for index, example in enumerate(_iter_examples(dataset)):
            count += 1
            if index >= len(self):
                continue
            ids = example["input_ids"]
            ids = ids if isinstance(ids, torch.Tensor) else np.asarray(ids)
            if (len(ids) != self.example_length(index)
                    or example_hash(ids) != int(self._hashes[index])):
                mismatched.append(index)
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} example(s) differ from the cached ones, "
                            f"first: {mismatched[:5]}")
        if count != len(self):
            problems.append(f"the dataset has {count} examples, the cache {len(self)}")
        if problems:
            raise ValueError(f"{self.path}: stale cache for this dataset: "
                             + "; ".join(problems))

    def check_teacher(self, teacher: nn.Module) -> None:
        """Check a model against the cache's teacher fingerprint (same mode as written).

        Raises:
            ValueError: the fingerprints differ.
        """
        mode = self.manifest.teacher.get("fingerprint_mode", "full")
        found = teacher_fingerprint(teacher, mode)
        if found != self.manifest.teacher.get("fingerprint"):
            raise ValueError(f"{self.path}: this {type(teacher).__name__} is not the teacher "
                             f"that wrote the cache ({mode} fingerprint {found}, cache "
                             f"{self.manifest.teacher.get('fingerprint')})")

    def data_fingerprint(self) -> str:
        """sha256 over the stored per-example hashes and lengths (as in the manifest)."""
        return data_fingerprint(self._hashes, self._seq_offsets)

    def __repr__(self) -> str:
        return (f"TeacherCache({self.path!r}, examples={len(self)}, tokens={self.num_tokens},"
                f" k={self.k}, vocab_size={self.vocab_size})")
