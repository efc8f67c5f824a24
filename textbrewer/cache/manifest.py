"""The teacher cache's on-disk format: the manifest, file names, dtypes and fingerprints.

A cache is one folder::

    manifest.json                 written last; its presence means "complete"
    index.row_offsets.npy         int64 (N + 1,)  first row of example i; last = num_tokens
    index.seq_offsets.npy         int64 (N + 1,)  first sequence position of example i
                                                  (cumulative example lengths L_i)
    index.example_hashes.npy      uint64 (N,)     64-bit hash of each example's input_ids
    shard-00000.ids.npy           (rows, k) uint8/uint16/int32   top-k token ids
    shard-00000.logprobs.npy      (rows, k) float16              their log-probs (T = 1)
    shard-00000.tail_mass.npy     (rows,)   float32              1 - sum of top-k probs
    shard-00000.valid.npy         (ceil(P / 8),) uint8           packed bits, one per
                                                  sequence position of the shard's
                                                  examples: 1 = this position has a row
    shard-00001.*.npy ...

A row is one valid token position. Rows are stored example after example, in dataset
order, positions ascending; an example never spans two shards. All files are plain
``.npy`` files and are opened with ``np.load(mmap_mode='r')``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Dict, List

import numpy as np
import torch

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "POSITION_RULES", "FileEntry",
           "ShardInfo", "TeacherCacheManifest", "id_dtype_for_vocab", "example_hash",
           "data_fingerprint", "teacher_fingerprint", "file_sha256"]

FORMAT_NAME = "textbrewer-teacher-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LOGPROB_DTYPE = "float16"
# float32, not float16: the tail of a confident teacher is often below 6e-8, where
# float16 has no normal numbers left; 2 extra bytes per token keep it to ~7 digits.
TAIL_DTYPE = "float32"
SHARD_FIELDS = ("ids", "logprobs", "tail_mass", "valid")
INDEX_FIELDS = ("row_offsets", "seq_offsets", "example_hashes")
#: Names the writer creates (``.tmp`` while a file is being written): the only files that
#: ``overwrite=True`` may delete.
CACHE_FILE_PATTERN = re.compile(
    r"^(manifest\.json|index\.[a-z_]+\.npy|shard-\d+\.[a-z_]+\.npy)(\.tmp)?$")


def shard_file_name(number: int, field: str) -> str:
    """``shard-00012.ids.npy``."""
    return f"shard-{number:05d}.{field}.npy"


def index_file_name(field: str) -> str:
    """``index.row_offsets.npy``."""
    return f"index.{field}.npy"

#: How the writer chooses the positions that get a row (``positions=`` argument).
POSITION_RULES = {
    "attention_mask": "every position t < L_i with attention_mask[t] == 1 "
                      "(all positions when there is no attention_mask)",
    "labels": "attention_mask[t] == 1 and labels[t] != -100 (labels already aligned "
              "with the logits, e.g. pre-shifted or token classification)",
    "shifted_labels": "attention_mask[t] == 1 and labels[t + 1] != -100 (Hugging Face "
                      "causal-LM convention: the logits at t predict token t + 1; the "
                      "last position never has a row)",
}


def id_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest integer dtype that holds every token id 0 .. vocab_size - 1.

    uint8 up to V = 256, uint16 up to V = 65,536 (so V = 32,768 fits, where int16 would
    not be safe past id 32,767), int32 beyond (Llama 3's 128,256).
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size <= 2 ** 8:
        return np.dtype(np.uint8)
    if vocab_size <= 2 ** 16:
        return np.dtype(np.uint16)
    if vocab_size <= 2 ** 31:
        return np.dtype(np.int32)
    raise ValueError(f"vocab_size={vocab_size} does not fit int32 ids")


def example_hash(input_ids: Any) -> int:
    """64-bit hash of one example's token ids: blake2b-64 of their little-endian int64 bytes.

    Args:
        input_ids: (L,) ids as a tensor, array or list (the dtype does not matter).

    Returns:
        An int in [0, 2**64).
    """
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.detach().cpu().numpy()
    ids = np.ascontiguousarray(np.asarray(input_ids).reshape(-1), dtype="<i8")
    return int.from_bytes(hashlib.blake2b(ids.tobytes(), digest_size=8).digest(), "little")


def data_fingerprint(example_hashes: np.ndarray, seq_offsets: np.ndarray) -> str:
    """sha256 over every example's 64-bit hash and length, in order."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(example_hashes, dtype="<u8").tobytes())
    digest.update(np.ascontiguousarray(np.diff(seq_offsets), dtype="<i8").tobytes())
    return "sha256:" + digest.hexdigest()


def teacher_fingerprint(model: torch.nn.Module, mode: str = "full") -> str:
    """A fingerprint of a model's weights, to tell which teacher wrote a cache.

    ``'full'`` hashes (sha256) every entry of ``state_dict()``: its name, shape, dtype and
    bytes. Cost: every weight is read once and copied to the host one tensor at a time,
    about 1 to 2 s per GB on a current CPU (~15-30 s for a 7B model in bf16).
    ``'structure'`` hashes names, shapes and dtypes only: instant, tells architectures
    apart, but not two checkpoints of the same architecture.

    Args:
        model: the teacher.
        mode: ``'full'`` or ``'structure'``.

    Returns:
        ``'sha256:<hex>'``.
    """
    if mode not in ("full", "structure"):
        raise ValueError(f"fingerprint mode must be 'full' or 'structure', got {mode!r}")
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        if mode == "full":
            # view as bytes: works for bf16 and other dtypes NumPy does not know.
            flat = tensor.detach().reshape(-1).contiguous().cpu()
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def file_sha256(path: str, chunk_bytes: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class FileEntry:
    """One file of the cache: its name in the folder, size in bytes and sha256."""
    name: str
    bytes: int
    sha256: str


@dataclasses.dataclass
class ShardInfo:
    """One shard: a run of whole examples and their rows.

    Attributes:
        first_example, num_examples: the examples it holds.
        first_row, rows: its rows (token positions with teacher outputs).
        first_position, positions: the sequence positions of its examples (valid or not),
            one bit each in the ``valid`` file.
        files: field name (``ids``, ``logprobs``, ``tail_mass``, ``valid``) -> FileEntry.
    """
    first_example: int
    num_examples: int
    first_row: int
    rows: int
    first_position: int
    positions: int
    files: Dict[str, FileEntry]


@dataclasses.dataclass
class TeacherCacheManifest:
    """Everything ``manifest.json`` says about a cache. See the module docstring for files.

    Attributes:
        k: top-k entries per token.
        vocab_size: V, the width of the teacher's logits.
        num_examples: N.
        num_tokens: number of rows (valid positions) over all examples.
        num_positions: sum of the examples' lengths L_i.
        dtypes: field -> NumPy dtype name (``ids``, ``logprobs``, ``tail_mass``).
        positions: the position rule (a key of :data:`POSITION_RULES`).
        temperature: the softmax temperature of the stored log-probs (always 1.0).
        teacher: ``fingerprint``, ``fingerprint_mode``, ``class``, ``num_parameters``.
        data: ``fingerprint`` (sha256 over per-example hashes and lengths) and
            ``example_hash`` (how each example's 64-bit hash is computed).
        index: field (``row_offsets``, ``seq_offsets``, ``example_hashes``) -> FileEntry.
        shards: the shards, in order.
        format, format_version, created: identification.
    """
    k: int
    vocab_size: int
    num_examples: int
    num_tokens: int
    num_positions: int
    dtypes: Dict[str, str]
    positions: str
    temperature: float
    teacher: Dict[str, Any]
    data: Dict[str, Any]
    index: Dict[str, FileEntry]
    shards: List[ShardInfo]
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created: str = ""

    def files(self) -> List[FileEntry]:
        """Every data file the manifest lists (index first, then shards)."""
        entries = [self.index[name] for name in INDEX_FIELDS]
        for shard in self.shards:
            entries.extend(shard.files[name] for name in SHARD_FIELDS)
        return entries

    @property
    def data_bytes(self) -> int:
        """Bytes of all data files (shards and index; the manifest itself not counted)."""
        return sum(entry.bytes for entry in self.files())

    @property
    def row_bytes(self) -> int:
        """Bytes of one row: k · (id bytes + 2) + tail bytes."""
        return (self.k * (np.dtype(self.dtypes["ids"]).itemsize +
                          np.dtype(self.dtypes["logprobs"]).itemsize) +
                np.dtype(self.dtypes["tail_mass"]).itemsize)

    @property
    def bytes_per_token(self) -> float:
        """data_bytes / num_tokens: row_bytes plus the overhead (see docs/teacher_cache.md)."""
        return self.data_bytes / max(self.num_tokens, 1)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (the content of ``manifest.json``), identification first."""
        raw = dataclasses.asdict(self)
        first = {key: raw.pop(key) for key in ("format", "format_version", "created")}
        return {**first, **raw}

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], source: str = "manifest") -> "TeacherCacheManifest":
        """Parse and validate a manifest dict; ``source`` names it in errors.

        Raises:
            ValueError: wrong format name or version, a missing or ill-typed field, or
                counts that do not add up.
        """
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise ValueError(f"{source}: not a teacher-cache manifest (format="
                             f"{raw.get('format') if isinstance(raw, dict) else None!r}, "
                             f"expected {FORMAT_NAME!r})")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{source}: format_version {raw.get('format_version')!r} is not "
                             f"supported (this textbrewer reads {FORMAT_VERSION})")
        try:
            fields = dict(raw)
            fields["index"] = {name: FileEntry(**fields["index"][name])
                               for name in INDEX_FIELDS}
            fields["shards"] = [
                ShardInfo(**{**shard, "files": {name: FileEntry(**shard["files"][name])
                                                for name in SHARD_FIELDS}})
                for shard in fields["shards"]]
            manifest = cls(**fields)
        except (KeyError, TypeError) as error:
            raise ValueError(f"{source}: malformed manifest ({type(error).__name__}: "
                             f"{error})") from None
        manifest._validate(source)
        return manifest

    def _validate(self, source: str) -> None:
        problems = []
        if self.k < 1 or self.k > self.vocab_size:
            problems.append(f"k={self.k} not in [1, vocab_size={self.vocab_size}]")
        if self.positions not in POSITION_RULES:
            problems.append(f"unknown position rule {self.positions!r}")
        row = example = position = 0
        for number, shard in enumerate(self.shards):
            if (shard.first_row, shard.first_example, shard.first_position) != \
                    (row, example, position):
                problems.append(f"shard {number} does not start where shard {number - 1} "
                                f"ends")
            row += shard.rows
            example += shard.num_examples
            position += shard.positions
        if (row, example, position) != (self.num_tokens, self.num_examples,
                                        self.num_positions):
            problems.append(f"shards hold {row} rows, {example} examples, {position} "
                            f"positions; the header says {self.num_tokens}, "
                            f"{self.num_examples}, {self.num_positions}")
        if problems:
            raise ValueError(f"{source}: inconsistent manifest: " + "; ".join(problems))

    @classmethod
    def load(cls, folder: str) -> "TeacherCacheManifest":
        """Read ``folder/manifest.json``.

        Raises:
            FileNotFoundError: the folder or its manifest does not exist (a cache whose
                writer did not finish has shards but no manifest).
            ValueError: the manifest is not valid JSON or not a valid manifest.
        """
        if os.path.isfile(folder):
            raise FileNotFoundError(f"{folder}: is a file; a teacher cache is the folder "
                                    f"write_teacher_cache wrote (here perhaps "
                                    f"{os.path.dirname(folder) or '.'!r})")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: no such teacher-cache folder")
        path = os.path.join(folder, MANIFEST_NAME)
        if not os.path.isfile(path):
            present = sorted(name for name in os.listdir(folder) if not name.startswith("."))
            hint = (f"; it holds {len(present)} other files: the cache is incomplete (its "
                    f"writer stopped before the manifest, which is written last); rebuild "
                    f"it with overwrite=True" if present else "; the folder is empty")
            raise FileNotFoundError(f"{path}: missing{hint}")
        try:
            with open(path, encoding="utf-8") as handle:
                raw = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        return cls.from_dict(raw, source=path)

    def summary(self) -> str:
        """A few human-readable lines: sizes, dtypes, fingerprints."""
        lines = [
            f"format        {self.format} v{self.format_version} (created {self.created})",
            f"examples      {self.num_examples}",
            f"tokens        {self.num_tokens} (of {self.num_positions} positions; rule "
            f"{self.positions!r})",
            f"top-k         k={self.k} of vocab_size={self.vocab_size}, temperature "
            f"{self.temperature}",
            f"dtypes        ids {self.dtypes['ids']}, logprobs {self.dtypes['logprobs']}, "
            f"tail_mass {self.dtypes['tail_mass']}",
            f"shards        {len(self.shards)}, {self.data_bytes} bytes of data",
            f"bytes/token   {self.bytes_per_token:.2f} (rows alone: {self.row_bytes})",
            f"teacher       {self.teacher.get('class')} "
            f"({self.teacher.get('num_parameters')} parameters), "
            f"{self.teacher.get('fingerprint_mode')} fingerprint "
            f"{self.teacher.get('fingerprint')}",
            f"data          {self.data.get('fingerprint')}",
        ]
        return "\n".join(lines)
