"""Loss logging without per-step host syncs: TensorBoard, progress bar, console.

Loss terms are kept on the device, detached, and copied to the host together every
``log_steps`` micro-batches. TensorBoard still gets one point per micro-batch (the same
tags and steps as TextBrewer 0.2.1: ``scalar/total_loss``, ``scalar/unweighted_kd_loss``,
...). The same copy checks that every term is finite.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

__all__ = ["LossLog", "NonFiniteLossError", "logger", "set_verbosity", "get_verbosity",
           "disable_default_handler", "enable_default_handler", "read_scalars", "plot_curves"]

logger = logging.getLogger("textbrewer")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


class _DefaultHandler(logging.StreamHandler):
    """Prints the library's records to stderr unless the application configured logging.

    When the root logger has handlers (``logging.basicConfig`` or similar), records reach
    them by propagation and this handler stays silent, so nothing is printed twice and the
    application's format wins. Otherwise the library is not mute in a batch job, where the
    progress bar is off because stderr is not a terminal.
    """

    def __init__(self):
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s textbrewer: %(message)s",
                                            datefmt="%Y-%m-%d %H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        self.stream = sys.stderr  # follow a redirected stderr (pytest's capture, say)
        super().emit(record)


_default_handler = _DefaultHandler()


def set_verbosity(level: Union[int, str]) -> None:
    """Sets the level of the ``'textbrewer'`` logger: ``'info'`` (default: progress lines),
    ``'warning'`` (only problems), ``'debug'``, ... or a ``logging`` level number.

    The environment variable ``TEXTBREWER_VERBOSITY`` sets the initial level.
    """
    if isinstance(level, str):
        if level.lower() not in _LEVELS:
            raise ValueError(f"unknown verbosity {level!r}; valid choices: {list(_LEVELS)}")
        level = _LEVELS[level.lower()]
    logger.setLevel(level)


def get_verbosity() -> int:
    """The ``'textbrewer'`` logger's effective level."""
    return logger.getEffectiveLevel()


def disable_default_handler() -> None:
    """Stops the library's own stderr handler (records still propagate to the root logger)."""
    logger.removeHandler(_default_handler)


def enable_default_handler() -> None:
    """Restores the library's stderr handler (on by default)."""
    if _default_handler not in logger.handlers:
        logger.addHandler(_default_handler)


enable_default_handler()
set_verbosity(os.environ.get("TEXTBREWER_VERBOSITY", "info"))


class NonFiniteLossError(FloatingPointError):
    """A loss term (or the student's weights) became NaN or infinite.

    The message names the first non-finite term, the micro-batch, and how many optimizer
    steps had been applied when it was detected.
    """


class LossLog:
    """Buffers per-micro-batch loss terms on the device and flushes them every N.

    Args:
        log_dir: TensorBoard directory, or None for no TensorBoard.
        log_steps: flush (one device-to-host copy) every this many records.
        is_main: only the main process writes TensorBoard and shows progress.
        progress_total: micro-batches in the run, for the progress bar (None: unknown).
        all_reduce_sum: under DDP, sums an int over the processes, so that a non-finite
            value on one process stops every process at the same flush (flushes happen at
            the same points on all of them).
    """

    def __init__(self, log_dir: Optional[str], log_steps: int, is_main: bool,
                 progress_total: Optional[int] = None, progress_initial: int = 0,
                 all_reduce_sum: Optional[Callable[[int], int]] = None):
        self.log_steps = log_steps
        self.all_reduce_sum = all_reduce_sum
        self.writer = None
        if log_dir is not None and is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=log_dir)
        self.progress = None
        if is_main:
            from tqdm.auto import tqdm
            self.progress = tqdm(total=progress_total, initial=progress_initial,
                                 disable=None, unit="batch", dynamic_ncols=True)
        self._pending: List[Tuple[int, int, Tuple[str, ...], torch.Tensor, bool]] = []
        self.last_values: Dict[str, float] = {}
        self._samples = 0
        self._loss_records = 0
        self._last_writer_step = progress_initial
        self._clock = time.perf_counter()

    def count_samples(self, samples: int) -> None:
        """Adds a micro-batch's number of examples (for samples/s in progress lines)."""
        self._samples += samples

    def progress_line(self, global_step: int, total_steps: float, epoch: int,
                      num_epochs: Optional[int], applied_steps: Optional[int] = None) -> str:
        """``step N/T (epoch e/E) loss x, S samples/s`` since the previous line (flushes)."""
        self.flush(applied_steps)
        now = time.perf_counter()
        rate = self._samples / max(now - self._clock, 1e-9)
        self._samples, self._clock = 0, now
        self.add_scalar("scalar/samples_per_second", rate, self._last_writer_step)
        loss = self.student_loss()
        epochs = f" (epoch {epoch + 1}/{num_epochs})" if num_epochs else ""
        total = int(total_steps) if float(total_steps).is_integer() else total_steps
        return (f"step {global_step}/{total}{epochs} loss "
                f"{'n/a' if loss is None else f'{loss:.4g}'}, {rate:.1f} samples/s")

    def record(self, writer_step: int, global_step: int, total: torch.Tensor,
               parts: Dict[str, torch.Tensor], total_name: str = "total_loss",
               write: bool = True) -> None:
        """Keeps ``total`` and ``parts`` (detached, on the device) for the next flush
        (``write=False``: checked and shown in progress, not written to TensorBoard)."""
        names = tuple(parts) + (total_name,)
        reference = total if isinstance(total, torch.Tensor) else None
        values = [_as_tensor(v, reference) for v in parts.values()] + \
            [_as_tensor(total, reference)]
        self._pending.append((writer_step, global_step, names, torch.stack(values), write))
        if self.progress is not None and total_name in ("total_loss", "student/total_loss"):
            self.progress.update(1)
        self._loss_records += 1
        if self._loss_records >= self.log_steps:
            self.flush()

    def observe(self, writer_step: int, global_step: int, values: Dict[str, Any]) -> None:
        """Keeps other scalars of a step (temperature, weights, learning rates: tensors stay
        on the device, numbers as they are) for TensorBoard, written at the next flush."""
        if not values or self.writer is None:
            return
        reference = next((v for v in values.values() if isinstance(v, torch.Tensor)), None)
        stacked = torch.stack([_as_tensor(v, reference) for v in values.values()])
        self._pending.append((writer_step, global_step, tuple(values), stacked, True))

    def flush(self, applied_steps: Optional[int] = None, collective: bool = True) -> None:
        """Copies pending values to the host (one sync), checks them, writes them.

        Args:
            applied_steps: optimizer steps applied so far, for the error message.
            collective: under DDP, share the non-finite verdict with the other processes
                (every process must then flush at the same point).

        Raises:
            NonFiniteLossError: a pending value is NaN or infinite (the first one is named),
                here or on another process.
        """
        if not self._pending:
            self._share_verdict(0, collective, applied_steps)
            return
        host = torch.cat([pending[3].to(self._pending[0][3].device)
                          for pending in self._pending]).cpu()
        self._share_verdict(int(not bool(torch.isfinite(host).all())), collective,
                            applied_steps)
        self._last_writer_step = self._pending[-1][0]
        offset = 0
        for writer_step, global_step, names, values, write in self._pending:
            row = host[offset: offset + len(names)].tolist()
            offset += len(names)
            for name, value in zip(names, row):
                if not math.isfinite(value):
                    self._pending.clear()
                    applied = global_step if applied_steps is None else applied_steps
                    late = applied - global_step
                    raise NonFiniteLossError(
                        f"loss term '{name}' is {value} at micro-batch {writer_step} (during "
                        f"optimizer step {global_step + 1}); detected at the next check, after "
                        f"{applied} optimizer steps had been applied"
                        + (f" ({late} of them after the bad micro-batch, so the student's "
                           f"weights are probably no longer finite)" if late > 0 else "")
                        + f"; stopping training. No checkpoint was written after it. Losses are "
                        f"checked every log_steps={self.log_steps} micro-batches; "
                        f"TrainingConfig(check_finite_every_step=True) checks every micro-batch "
                        f"before its optimizer step (one host sync each)")
                if self.writer is not None and write:
                    self.writer.add_scalar(f"scalar/{name}", value, writer_step)
            self.last_values.update(zip(names, row))
        self._pending.clear()
        self._loss_records = 0
        if self.progress is not None:
            if self.student_loss() is not None:
                self.progress.set_postfix(loss=f"{self.student_loss():.4g}", refresh=False)

    def _share_verdict(self, local_bad: int, collective: bool,
                       applied_steps: Optional[int]) -> None:
        if self.all_reduce_sum is None or not collective:
            return
        if self.all_reduce_sum(local_bad) and not local_bad:
            self._pending.clear()
            raise NonFiniteLossError(f"a loss term became NaN or infinite on another process "
                                     f"(after {applied_steps} optimizer steps); stopping "
                                     f"training on every process. That process's log names "
                                     f"the term and the micro-batch")

    def student_loss(self) -> Optional[float]:
        """The student's last flushed total loss (None before the first flush)."""
        return self.last_values.get("total_loss", self.last_values.get("student/total_loss"))

    def discard_pending(self) -> None:
        """Drops values not yet flushed (after an error, so closing does not raise again)."""
        self._pending.clear()
        self._loss_records = 0

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Writes one extra scalar (already on the host) to TensorBoard, if enabled."""
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self, applied_steps: Optional[int] = None) -> None:
        """Flushes (without collectives) and closes TensorBoard and the progress bar."""
        try:
            self.flush(applied_steps, collective=False)
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


def read_scalars(log_dir: str) -> Dict[str, List[Tuple[int, float]]]:
    """The TensorBoard scalars a training wrote to ``log_dir``: tag -> [(step, value), ...].

    Tags are those of TextBrewer 0.2.1 (``scalar/total_loss``, ``scalar/unweighted_*``) and,
    after each optimizer step, ``scalar/kd_loss_weight``, ``scalar/hard_label_weight``,
    ``scalar/temperature``, ``scalar/lr/group{i}`` and ``scalar/samples_per_second``.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def plot_curves(log_dir: str, path: str, tags: Optional[List[str]] = None) -> List[str]:
    """Writes a PNG of a training's TensorBoard curves (one panel per tag), atomically.

    Args:
        log_dir: the ``TrainingConfig.log_dir`` of the run.
        path: the PNG file to write.
        tags: the tags to plot (default: all).

    Returns:
        The tags plotted.

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib``).
        ValueError: ``log_dir`` holds none of the tags.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_curves needs matplotlib: pip install matplotlib") from error
    scalars = read_scalars(log_dir)
    chosen = [tag for tag in (tags or sorted(scalars)) if tag in scalars]
    if not chosen:
        raise ValueError(f"no scalars {tags or ''} in {log_dir!r}; it has {sorted(scalars)}")
    columns = min(3, len(chosen))
    rows = -(-len(chosen) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.6 * rows), squeeze=False)
    for axis, tag in zip(axes.flat, chosen):
        steps, values = zip(*scalars[tag])
        axis.plot(steps, values, linewidth=1)
        axis.set_title(tag.replace("scalar/", ""), fontsize=9)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(chosen):]:
        axis.set_visible(False)
    figure.tight_layout()
    from .checkpoint import atomic_write_bytes
    import io
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return chosen
