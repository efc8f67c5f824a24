"""Phases: the updates of one training step, each a loss, the optimizer that minimises it
and the modules it trains (a discriminator, a generator, a second student: a scheme's
extra phases run in the same loop as the student's).

:func:`run_phase` is one phase over one accumulation window's micro-batches: forward,
loss and backward after each, then, when the window ends, clipping, the optimizer step
and the LR scheduler's. A phase may run only every k-th step (``every``), several times
per step (``repeat``), and keep modules it reads but must not change frozen (``frozen``:
no gradients into their parameters, batch norm in eval mode so its running statistics
stay).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..adaptors import AdaptorError

__all__ = ["Phase", "check_phase", "check_optimizer_holds", "as_loss_and_parts", "frozen",
           "run_phase"]

Parts = Dict[str, torch.Tensor]


@dataclasses.dataclass
class Phase:
    """One update within a training step: a loss, the optimizer that minimises it, and the
    modules it trains.

    A step runs the phases in order, each over the same micro-batches of the accumulation
    window (forward, loss, backward after each), and each steps its own optimizer when the
    window ends: e.g. a discriminator, then the student; or two students that teach each
    other. Precision (one grad scaler per phase under fp16), accumulation, clipping, DDP,
    logging (terms as ``{name}/...``) and checkpoints (its optimizer, scheduler and modules
    are saved and restored) work for every phase. See
    :meth:`~textbrewer.distillers.engine.AbstractDistiller.phases`.

    Args:
        name: the phase's name in logs and checkpoints.
        optimizer: the optimizer over ``modules``' parameters.
        loss: ``loss(batch, args) -> (total, {name: term})`` (or just ``total``).
        modules: the modules this phase trains; under DDP each is wrapped, and the loss
            must call it through :meth:`~textbrewer.distillers.engine.AbstractDistiller.wrapped`.
        scheduler: an LR scheduler stepped with ``optimizer``, or None.
        max_grad_norm: clip these modules' gradients to this norm (≤ 0: no clipping).
        every: run on one optimizer step of the student in ``every`` (steps 1, 1 + k, ...).
        repeat: updates per step it runs in: the window's micro-batches are run (forward,
            backward, optimizer step) this many times over (e.g. DFAD's 5 student updates
            per generator update).
        frozen: modules the loss reads but this phase must not change: during its
            forward and backward their parameters take no gradient and they are in eval
            mode (batch norm uses, and keeps, its running statistics).
    """

    name: str
    optimizer: torch.optim.Optimizer
    loss: Callable[[Any, Dict[str, Any]], Any]
    modules: Sequence[nn.Module] = ()
    scheduler: Any = None
    max_grad_norm: float = -1.0
    clip_parameters: List[nn.Parameter] = dataclasses.field(default_factory=list)
    trainables: List[nn.Module] = dataclasses.field(default_factory=list)
    scaler: Any = None
    is_student: bool = False
    every: int = 1
    repeat: int = 1
    frozen: Sequence[nn.Module] = ()

    def runs_at(self, global_step: int) -> bool:
        """Whether it runs in the step that follows ``global_step`` optimizer steps."""
        return global_step % self.every == 0


def check_optimizer_holds(optimizer: Any, name: str, own: Iterable[nn.Parameter], own_what: str,
                          build_from: str, changes: str = "training",
                          forbidden: Sequence[Tuple[Iterable[nn.Parameter], str, str]] = ()
                          ) -> None:
    """The one ownership rule for every optimizer the loop steps: it must be an optimizer,
    hold some of the parameters it is meant to train, and none that another optimizer (or
    nobody) trains.

    Args:
        optimizer: the optimizer to check.
        name: how the message names it (``'the optimizer'``, ``"phase 'd': its optimizer"``).
        own: the parameters it is meant to train; ``own_what`` names them.
        build_from: what to build it from instead (``'model_S.parameters()'``).
        changes: what would change nothing if it held none of them.
        forbidden: ``(parameters, what, why)`` it must not hold.

    Raises:
        TypeError: not a ``torch.optim.Optimizer``.
        ValueError: none of ``own``, or some forbidden parameters.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{name} must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    own_ids = {id(p) for p in own}
    for parameters, what, why in forbidden:
        overlap = held & ({id(p) for p in parameters} - own_ids)
        if overlap:
            raise ValueError(f"{name} holds {len(overlap)} {what}; {why}")
    if own_ids and not held & own_ids:
        raise ValueError(f"{name} holds none of {own_what} ({len(held)} others), so {changes} "
                         f"would change nothing; build it from {build_from}")


def check_phase(phase: Phase, student_parameters: Iterable[nn.Parameter]) -> None:
    """A scheme's extra phase, checked before the first step (names the phase)."""
    if not isinstance(phase.name, str) or not phase.name or "/" in phase.name:
        raise ValueError(f"a phase's name must be a non-empty string without '/' (it prefixes "
                         f"its logged terms, '{{name}}/...'), got {phase.name!r}")
    where = f"phase {phase.name!r}"
    if not callable(phase.loss):
        raise TypeError(f"{where}: loss must be a function (batch, args) -> loss or "
                        f"(loss, {{name: term}}), got {type(phase.loss).__name__}")
    for key in ("modules", "frozen"):
        modules = getattr(phase, key)
        if isinstance(modules, nn.Module) or not isinstance(modules, (list, tuple)) \
                or not all(isinstance(module, nn.Module) for module in modules):
            raise TypeError(f"{where}: {key} must be a list of nn.Module objects, e.g. "
                            f"{key}=[discriminator], got {type(modules).__name__}")
    if isinstance(phase.max_grad_norm, bool) or \
            not isinstance(phase.max_grad_norm, numbers.Real) or math.isnan(phase.max_grad_norm):
        raise ValueError(f"{where}: max_grad_norm must be a number (<= 0: no clipping), got "
                         f"{phase.max_grad_norm!r}")
    for key in ("every", "repeat"):
        value = getattr(phase, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    check_optimizer_holds(
        phase.optimizer, f"{where}: its optimizer",
        [p for module in phase.modules for p in module.parameters()],
        f"the parameters of its modules {[type(m).__name__ for m in phase.modules]}",
        "their parameters()", changes="this phase",
        forbidden=[(student_parameters, "parameters of the student (or of the modules trained "
                    "with it)", "the student phase's optimizer steps them: each phase needs an "
                    "optimizer over its own modules only")])


def as_loss_and_parts(result: Any, phase: Optional[str] = None) -> Tuple[torch.Tensor, Parts]:
    """A loss function's result as ``(total, parts)``; a bare tensor has no parts."""
    if isinstance(result, tuple) and len(result) == 2:
        total, parts = result
    else:
        total, parts = result, {}
    if phase is not None and not isinstance(total, torch.Tensor):
        raise TypeError(f"phase {phase!r}: its loss returned {type(total).__name__}, expected a "
                        f"loss tensor, or (loss tensor, {{name: term}})")
    if not isinstance(total, torch.Tensor):
        raise AdaptorError("nothing to optimise: the adaptors returned no logits, losses or "
                           "matched features (train_on_batch gave "
                           f"{type(total).__name__} instead of a loss tensor)")
    return total, dict(parts or {})


@contextlib.contextmanager
def frozen(modules: Sequence[nn.Module]):
    """``modules`` in eval mode with ``requires_grad`` off, then put back as they were."""
    saved = [(module.training, [(p, p.requires_grad) for p in module.parameters()])
             for module in modules]
    try:
        for module in modules:
            module.eval()
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        yield
    finally:
        for module, (training, flags) in zip(modules, saved):
            module.train(training)
            for parameter, flag in flags:
                parameter.requires_grad_(flag)


_UNUSED_PARAMETERS = ("DistributedDataParallel: some parameter of the trained modules got no "
                      "gradient in the previous step (a pooler or head the loss does not use). "
                      "Give it a part in the loss, call requires_grad_(False) on it, or, when "
                      "nothing is trained with the student (no projections or loss modules), "
                      "set TrainingConfig(ddp_find_unused_parameters=True)")


def run_phase(phase: Phase, group: List[Any], args: Dict[str, Any], *, runtime: Any,
              starts_window: bool, ends_window: bool, accumulation: int,
              window_normalised: bool, record: Callable[[int, torch.Tensor, Parts], None]
              ) -> None:
    """Forward, loss and backward of ``phase`` on ``group``'s micro-batches, then its
    optimizer step when the group ends an accumulation window (``repeat`` times over).

    Args:
        group: the micro-batches (one, or a whole window).
        runtime: the :class:`~textbrewer.training.runtime.Runtime` (autocast, backward,
            DDP's no_sync, the optimizer step).
        starts_window: whether ``group`` starts an accumulation window.
        ends_window: whether it ends one (the optimizer steps then).
        accumulation: micro-batches per window (the loss is divided by it), unless
            ``window_normalised`` (the loss is already over the window's tokens: it is
            multiplied by the world size, which DDP's gradient mean divides out).
        record: ``record(offset, total, parts)`` for each micro-batch's loss.
    """
    # a short last window of an epoch takes no optimizer step: it is run once
    for _ in range(phase.repeat if ends_window else 1):
        if starts_window:
            # Another phase's backward may have reached these modules (the student's loss
            # through a discriminator, say): a window starts from clean gradients.
            phase.optimizer.zero_grad()
        with frozen(phase.frozen) if phase.frozen else contextlib.nullcontext():
            for offset, batch in enumerate(group):
                last = ends_window and offset == len(group) - 1
                with runtime.no_sync(phase.trainables, skip=not last):
                    with runtime.autocast():
                        try:
                            total, parts = as_loss_and_parts(
                                phase.loss(batch, args), None if phase.is_student else phase.name)
                        except RuntimeError as error:
                            if "Expected to have finished reduction" not in str(error):
                                raise
                            raise RuntimeError(_UNUSED_PARAMETERS) from error
                    record(offset, total, parts)
                    runtime.backward(total * runtime.world_size if window_normalised
                                     else total / accumulation, phase.scaler)
        if ends_window:
            runtime.optimizer_step(phase.optimizer, phase.clip_parameters, phase.max_grad_norm,
                                   phase.scaler)
            if phase.scheduler is not None:
                phase.scheduler.step()
            phase.optimizer.zero_grad()
