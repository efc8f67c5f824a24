"""Checkpoint files, written atomically: a temporary name in the same folder, then a rename.

A crash while writing never leaves a truncated file under the final name, and never
destroys an earlier checkpoint of the same name. Files get the permissions the process
umask gives (as ``torch.save`` to a plain path would), not the 0600 of a temporary file.

A checkpoint is a pair: ``gs{N}.pkl`` (the student's ``state_dict``, TextBrewer's file)
and ``gs{N}.train_state.pt`` (everything needed to resume). The state file is written
second and records the size of the ``.pkl`` it belongs to, so a state file on disk means
a complete pair; a run killed between the two leaves a ``.pkl`` without a state file,
which ``resume_from='latest'`` passes over.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tempfile
import time
from typing import Any, Callable, List, Optional, Tuple

import torch

__all__ = ["atomic_save", "atomic_write_text", "atomic_write_bytes", "student_checkpoint_path", "state_path",
           "latest_state_path", "state_paths_newest_first", "load_state", "load_student_weights",
           "remove_stale_temporaries", "prune_train_states", "set_aside_states",
           "file_fingerprint", "fsync_folder", "CheckpointError"]

_STATE_SUFFIX = ".train_state.pt"
_TEMPORARY_PREFIX = ".tmp-"
_logger = logging.getLogger("textbrewer")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not one of this library's."""


def _current_umask() -> int:
    # /proc is read without touching the process-wide umask (setting it to probe it would
    # race with other threads creating files, TensorBoard's writer among them)
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_folder(folder: str) -> None:
    """Makes a rename in ``folder`` durable (a power loss could otherwise undo it while a
    later unlink persists); a no-op where folders cannot be opened (Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _atomic_write(path: str, write: Callable) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=_TEMPORARY_PREFIX + os.path.basename(path) + "-",
                                         dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates 0600; a plain open() would have given 0666 & ~umask
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
        fsync_folder(folder)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file and an atomic rename."""
    _atomic_write(path, lambda stream: torch.save(obj, stream))


def atomic_write_text(path: str, text: str) -> None:
    """Writes UTF-8 ``text`` to ``path`` through a temporary file and an atomic rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and an atomic rename."""
    _atomic_write(path, lambda stream: stream.write(data))


def student_checkpoint_path(output_dir: str, global_step: int) -> str:
    """``{output_dir}/gs{global_step}.pkl``, TextBrewer's name for the student's weights."""
    return os.path.join(output_dir, f"gs{global_step}.pkl")


def state_path(output_dir: str, global_step: int) -> str:
    """``{output_dir}/gs{global_step}.train_state.pt``: everything needed to resume."""
    return os.path.join(output_dir, f"gs{global_step}{_STATE_SUFFIX}")


def _state_files(output_dir: str) -> List[Tuple[int, str]]:
    found = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), f"gs*{_STATE_SUFFIX}")):
        match = re.fullmatch(r"gs(\d+)" + re.escape(_STATE_SUFFIX), os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def state_paths_newest_first(output_dir: str) -> List[str]:
    """The training-state files in ``output_dir``, highest global step first."""
    return [path for _, path in _state_files(output_dir)]


def set_aside_states(output_dir: str, after_step: int) -> List[str]:
    """Moves the training states of steps above ``after_step`` (another run's, when a run
    starts afresh or from an earlier state in this folder) into
    ``{output_dir}/superseded_train_states/``, so that ``'latest'`` and pruning only see
    this run's. Nothing is deleted. Returns the new paths."""
    moved = []
    for step, path in _state_files(output_dir):
        if step <= after_step:
            continue
        folder = os.path.join(output_dir, "superseded_train_states")
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, os.path.basename(path))
        if os.path.exists(target):
            stem = os.path.basename(path)[:-len(_STATE_SUFFIX)]
            target = os.path.join(folder, f"{stem}.{time.time_ns()}{_STATE_SUFFIX}")
        os.replace(path, target)
        moved.append(target)
    return moved


def file_fingerprint(path: str) -> str:
    """A cheap fingerprint of a file: its size and the SHA-256 of its first, middle and last
    MiB. Survives copies (unlike a modification time); two different students' weights of
    the same size differ in the sampled bytes."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    block = 1 << 20
    with open(path, "rb") as handle:
        for offset in sorted({0, max(0, size // 2 - block // 2), max(0, size - block)}):
            handle.seek(offset)
            digest.update(handle.read(block))
    return digest.hexdigest()


def latest_state_path(output_dir: str) -> Optional[str]:
    """The training-state file with the highest global step in ``output_dir``, or None."""
    paths = state_paths_newest_first(output_dir)
    return paths[0] if paths else None


def _describe(error: BaseException) -> str:
    # torch's own message may advise weights_only=False, which would let a malicious file
    # run code: name the failure without repeating that advice.
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if "weights_only" in str(error) or "Weights only load failed" in str(error):
        return "it holds objects other than tensors and plain values"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _safe_load(path: str, map_location: Any, what: str) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such {what}") from None
    except Exception as error:  # zip, pickle, OS and torch errors alike
        raise CheckpointError(f"{path} is not a valid {what} of this library "
                              f"({_describe(error)}); it may be truncated or corrupt") from None


def load_state(path: str, map_location: Any = "cpu") -> dict:
    """Loads a training-state file, with ``weights_only=True``.

    The file holds only tensors, numbers, strings and containers of them (RNG states are
    stored as tensors, configs as dicts), so the safe loader suffices.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or not a training state.
    """
    state = _safe_load(path, map_location, "training-state file")
    if not isinstance(state, dict) or "progress" not in state or "format" not in state:
        raise CheckpointError(f"{path} is not a training-state file of this library (no "
                              f"'format'/'progress' entries)")
    student = student_checkpoint_path(os.path.dirname(path),
                                      state["progress"]["global_step"])
    expected = state.get("student_file_bytes")
    if not os.path.isfile(student):
        raise CheckpointError(f"{path}: its student weights {student} are missing")
    if expected is not None and os.path.getsize(student) != expected:
        raise CheckpointError(f"{path}: its student weights {student} have "
                              f"{os.path.getsize(student)} bytes, the state recorded {expected} "
                              f"(overwritten or truncated)")
    fingerprint = state.get("student_file_fingerprint")
    if fingerprint is not None and file_fingerprint(student) != fingerprint:
        raise CheckpointError(f"{path}: its student weights {student} were rewritten after the "
                              f"state was saved (by another run?): they do not belong together")
    return state


def load_student_weights(path: str, map_location: Any = "cpu") -> dict:
    """A ``gs{N}.pkl`` state dict, loaded safely (``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt.
    """
    return _safe_load(path, map_location, "student checkpoint")


def remove_stale_temporaries(output_dir: str) -> List[str]:
    """Deletes temporary files a killed run left in ``output_dir``; returns their paths."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), _TEMPORARY_PREFIX + "gs*")):
        if os.path.isfile(path):
            os.unlink(path)
            removed.append(path)
    return removed


def prune_train_states(output_dir: str, keep: Optional[int]) -> List[str]:
    """Deletes all but the ``keep`` newest training-state files (never a ``.pkl``).

    Args:
        output_dir: the checkpoint folder.
        keep: how many to keep; None keeps them all.

    Returns:
        The deleted paths.
    """
    if keep is None:
        return []
    removed = []
    for path in state_paths_newest_first(output_dir)[keep:]:
        os.unlink(path)
        removed.append(path)
    return removed
