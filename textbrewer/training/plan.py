"""How long to train and when to save: :class:`TrainingPlan`, the run's :class:`Progress`,
and :func:`make_plan`, which checks ``train()``'s length arguments and picks the data
source."""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from ..configurations import TrainingConfig
from .sources import CycleSource, EmptyDataError, EpochSource

__all__ = ["TrainingPlan", "Progress", "make_plan", "check_train_arguments"]



@dataclasses.dataclass
class TrainingPlan:
    """How long to train and when to save.

    ``num_epochs`` is what ``train()`` was given (1 in step mode, where the data source
    cycles forever); it may be fractional. ``total_steps`` sizes the weight schedules
    (``global_step / total_steps``, as TextBrewer 0.2.1: ``steps_per_epoch · num_epochs``),
    and training stops after ``final_step = floor(total_steps)`` optimizer steps.
    """

    mode: str  # 'epochs' or 'steps'
    num_epochs: float
    total_steps: float
    steps_per_epoch: Optional[int]
    checkpoint_offsets: Tuple[int, ...] = ()
    ckpt_epoch_frequency: int = 1
    ckpt_steps: Optional[int] = None

    @property
    def final_step(self) -> int:
        """The last optimizer step of the run."""
        return int(self.total_steps)

    @property
    def epochs_to_run(self) -> int:
        """Passes over the data: ``ceil(num_epochs)`` (the last one may stop early)."""
        return math.ceil(self.num_epochs)

    def is_checkpoint(self, global_step: int, epoch: int) -> bool:
        """Whether to save after optimizer step ``global_step`` in ``epoch`` (0-based)."""
        if self.mode == "steps":
            return (self.ckpt_steps is not None and global_step % self.ckpt_steps == 0) \
                or global_step == self.total_steps
        in_epoch = global_step % self.steps_per_epoch in self.checkpoint_offsets
        epoch_due = (epoch + 1) % self.ckpt_epoch_frequency == 0 \
            or epoch + 1 == self.epochs_to_run
        # a fractional num_epochs ends inside an epoch: its last step is saved too
        return (in_epoch and epoch_due) or global_step == self.final_step


@dataclasses.dataclass


@dataclasses.dataclass
class Progress:
    """Where the run is: the epoch (0-based), optimizer steps taken, micro-batches seen
    (TensorBoard's x axis) and micro-batches into the current epoch. A
    :class:`~textbrewer.training.state.TrainState` entry."""

    epoch: int = 0
    global_step: int = 0
    writer_step: int = 0
    micro_in_epoch: int = 0

    def state_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def make_plan(train_config: TrainingConfig, dataloader: Iterable, num_epochs: Optional[float],
              num_steps: Optional[int], batch_postprocessor: Optional[Callable] = None
              ) -> Tuple[TrainingPlan, Any]:
    """The plan and the data source of ``train(dataloader, num_epochs=... | num_steps=...)``.

    Step mode cycles ``dataloader`` (which may have no length); epoch mode passes over it
    ``num_epochs`` times (possibly fractional). Checks everything before any batch is read.

    Returns:
        ``(plan, source)``: the source is an :class:`~textbrewer.training.sources.EpochSource`
        or a :class:`~textbrewer.training.sources.CycleSource`.

    Raises:
        ValueError: a non-positive count, an empty dataloader, fewer batches than
            ``gradient_accumulation_steps``, less than one optimizer step in all.
    """
    accumulation = train_config.gradient_accumulation_steps
    if num_steps is not None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, float)) \
                or int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if hasattr(dataloader, "__len__") and len(dataloader) == 0:
            raise EmptyDataError("the dataloader is empty (len(dataloader) == 0)")
        plan = TrainingPlan("steps", 1, int(num_steps), None,
                            ckpt_steps=train_config.ckpt_steps)
        return plan, CycleSource(dataloader, batch_postprocessor)
    if isinstance(num_epochs, bool) or not isinstance(num_epochs, (int, float)) \
            or not math.isfinite(num_epochs) or num_epochs <= 0:
        raise ValueError(f"num_epochs must be a positive number, got {num_epochs!r}")
    if not hasattr(dataloader, "__len__"):
        raise ValueError("num_epochs needs a dataloader with a length; use num_steps for "
                         "iterables without one")
    if len(dataloader) == 0:
        raise EmptyDataError("the dataloader is empty (len(dataloader) == 0)")
    steps_per_epoch = len(dataloader) // accumulation
    if steps_per_epoch == 0:
        raise ValueError(f"the dataloader has {len(dataloader)} batches, fewer than "
                         f"gradient_accumulation_steps={accumulation}: no optimizer step "
                         f"would ever be taken")
    if int(steps_per_epoch * num_epochs) < 1:
        raise ValueError(f"num_epochs={num_epochs!r} of {steps_per_epoch} optimizer steps "
                         f"per epoch is less than one optimizer step")
    frequency = train_config.ckpt_frequency
    offsets = tuple(sorted({int(steps_per_epoch * i / frequency) for i in range(frequency)}))
    plan = TrainingPlan("epochs", num_epochs, steps_per_epoch * num_epochs,
                        steps_per_epoch, offsets, train_config.ckpt_epoch_frequency)
    return plan, EpochSource(dataloader, batch_postprocessor)


def check_train_arguments(callback: Any, max_grad_norm: Any, batch_postprocessor: Any) -> None:
    """``train()``'s callback, clipping norm and postprocessor, checked before any step."""
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real) \
            or math.isnan(max_grad_norm):
        raise ValueError(f"max_grad_norm must be a number (<= 0: no clipping), got "
                         f"{max_grad_norm!r}")
    if batch_postprocessor is not None and not callable(batch_postprocessor):
        raise TypeError(f"batch_postprocessor must be a function batch -> batch, got "
                        f"{type(batch_postprocessor).__name__}")
    if callback is None:
        return
    if not callable(callback):
        raise TypeError(f"callback must be a function called as callback(model=student, "
                        f"step=global_step), got {type(callback).__name__} {callback!r}")
    try:
        signature = inspect.signature(callback)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read
        return
    try:
        signature.bind(model=None, step=0)
    except TypeError as error:
        name = getattr(callback, "__qualname__", type(callback).__name__)
        raise TypeError(f"callback {name}{signature} cannot be called as callback(model=student, "
                        f"step=global_step) ({error}); give it the parameters model and step, "
                        f"e.g. def callback(model, step): ..., or accept **kwargs") from None
