"""Checkpoint files, written atomically: a temporary name in the same folder, then a rename.

A crash while writing never leaves a truncated file under the final name, and never
destroys an earlier checkpoint of the same name.
"""
from __future__ import annotations

import glob
import os
import re
import tempfile
from typing import Any, Optional

import torch

__all__ = ["atomic_save", "atomic_write_text", "student_checkpoint_path", "state_path",
           "latest_state_path", "load_state"]

_STATE_SUFFIX = ".train_state.pt"


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-",
                                         dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file and an atomic rename."""
    _atomic_write(path, lambda stream: torch.save(obj, stream))


def atomic_write_text(path: str, text: str) -> None:
    """Writes UTF-8 ``text`` to ``path`` through a temporary file and an atomic rename."""
    _atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def student_checkpoint_path(output_dir: str, global_step: int) -> str:
    """``{output_dir}/gs{global_step}.pkl``, TextBrewer's name for the student's weights."""
    return os.path.join(output_dir, f"gs{global_step}.pkl")


def state_path(output_dir: str, global_step: int) -> str:
    """``{output_dir}/gs{global_step}.train_state.pt``: everything needed to resume."""
    return os.path.join(output_dir, f"gs{global_step}{_STATE_SUFFIX}")


def latest_state_path(output_dir: str) -> Optional[str]:
    """The training-state file with the highest global step in ``output_dir``, or None."""
    best, best_step = None, -1
    for path in glob.glob(os.path.join(glob.escape(output_dir), f"gs*{_STATE_SUFFIX}")):
        match = re.fullmatch(r"gs(\d+)" + re.escape(_STATE_SUFFIX), os.path.basename(path))
        if match and int(match.group(1)) > best_step:
            best, best_step = path, int(match.group(1))
    return best


def load_state(path: str, map_location: Any = "cpu") -> dict:
    """Loads a training-state file, with ``weights_only=True``.

    The file holds only tensors, numbers, strings and containers of them (RNG states are
    stored as tensors, configs as dicts), so the safe loader suffices.
    """
    return torch.load(path, map_location=map_location, weights_only=True)
