"""Loss logging without per-step host syncs: TensorBoard, progress bar, console.

Loss terms are kept on the device, detached, and copied to the host together every
``log_steps`` micro-batches. TensorBoard still gets one point per micro-batch (the same
tags and steps as TextBrewer 0.2.1: ``scalar/total_loss``, ``scalar/unweighted_kd_loss``,
...). The same copy checks that every term is finite.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["LossLog", "NonFiniteLossError", "logger"]

logger = logging.getLogger("textbrewer")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the step and the term."""


class LossLog:
    """Buffers per-micro-batch loss terms on the device and flushes them every N.

    Args:
        log_dir: TensorBoard directory, or None for no TensorBoard.
        log_steps: flush (one device-to-host copy) every this many records.
        is_main: only the main process writes TensorBoard and shows progress.
        progress_total: micro-batches in the run, for the progress bar (None: unknown).
    """

    def __init__(self, log_dir: Optional[str], log_steps: int, is_main: bool,
                 progress_total: Optional[int] = None, progress_initial: int = 0):
        self.log_steps = log_steps
        self.writer = None
        if log_dir is not None and is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=log_dir)
        self.progress = None
        if is_main:
            from tqdm.auto import tqdm
            self.progress = tqdm(total=progress_total, initial=progress_initial,
                                 disable=None, unit="batch", dynamic_ncols=True)
        self._pending: List[Tuple[int, int, Tuple[str, ...], torch.Tensor]] = []
        self.last_values: Dict[str, float] = {}

    def record(self, writer_step: int, global_step: int, total: torch.Tensor,
               parts: Dict[str, torch.Tensor]) -> None:
        """Keeps ``total`` and ``parts`` (detached, on the device) for the next flush."""
        names = ("total_loss",) + tuple(parts)
        reference = total if isinstance(total, torch.Tensor) else None
        values = [_as_tensor(total, reference)] + [_as_tensor(v, reference)
                                                   for v in parts.values()]
        self._pending.append((writer_step, global_step, names, torch.stack(values)))
        if self.progress is not None:
            self.progress.update(1)
        if len(self._pending) >= self.log_steps:
            self.flush()

    def flush(self) -> None:
        """Copies pending values to the host (one sync), checks them, writes them."""
        if not self._pending:
            return
        host = torch.cat([values for *_, values in self._pending]).cpu()
        offset = 0
        for writer_step, global_step, names, values in self._pending:
            row = host[offset: offset + len(names)].tolist()
            offset += len(names)
            for name, value in zip(names, row):
                if not math.isfinite(value):
                    self._pending.clear()
                    raise NonFiniteLossError(
                        f"loss term '{name}' is {value} at micro-batch {writer_step} "
                        f"(after {global_step} optimizer steps); stopping training")
                if self.writer is not None:
                    self.writer.add_scalar(f"scalar/{name}", value, writer_step)
            self.last_values = dict(zip(names, row))
        self._pending.clear()
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{self.last_values['total_loss']:.4g}", refresh=False)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Writes one extra scalar (already on the host) to TensorBoard, if enabled."""
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flushes and closes TensorBoard and the progress bar."""
        try:
            self.flush()
        finally:
            if self.writer is not None:
                self.writer.close()
            if self.progress is not None:
                self.progress.close()


def _as_tensor(value, reference: Optional[torch.Tensor]) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(())
    device = reference.device if reference is not None else "cpu"
    return torch.tensor(float(value), device=device)
