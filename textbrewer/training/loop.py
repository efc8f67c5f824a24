"""The training loop: :func:`run`, read top to bottom.

One optimizer step, in order: for each phase (the student's, and a scheme's own), forward
+ loss for each micro-batch of the accumulation window (backward after each), then clip,
optimizer step, LR-scheduler step, zero_grad; then the weight schedules, logging, and,
when due, the student's weights (``gs{N}.pkl``), the callback, and the resumable state
(``gs{N}.train_state.pt``, written after the callback so that a resumed run continues
from the random-number state the callback left, as an uninterrupted run does).

The loop asks the object it trains (a distiller) for what is particular to it, through a
small protocol (:class:`Task`); everything else (device and precision through the
:class:`~textbrewer.training.runtime.Runtime`, accumulation, phases, schedules, logging,
checkpoints, resume) is here or in this package.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Protocol

import torch

from ..logs import LossLog, NonFiniteLossError, logger
from ..utils import seed_everything
from .batches import batch_size, restore_modes, set_modes, windows
from .phase import Phase, run_phase
from .plan import Progress, TrainingPlan
from .runtime import is_fsdp_sharded
from .sources import set_rng_state
from .state import Checkpointer, TrainState

__all__ = ["Task", "Session", "run", "check_student_is_finite"]


class Task(Protocol):
    """What :func:`run` needs from the object it trains (every distiller implements it).

    Attributes: ``runtime``, ``t_config`` (:class:`~textbrewer.TrainingConfig`),
    ``d_config``, ``model_T``, ``model_S``, ``print_freq``, and ``window_tokens`` (set by
    the loop for window-normalised losses, see ``count_window_tokens``).
    """

    def build_phases(self, optimizer: Any, scheduler: Any, max_grad_norm: float) -> List[Phase]:
        """The step's phases, the student's among them."""

    def train_state(self, optimizer: Any, scheduler: Any, phases: List[Phase],
                    progress: Progress) -> TrainState:
        """The run's resumable state, with every entry registered."""

    def before_training(self, plan: TrainingPlan, source: Any,
                        saved_extra: Optional[Dict[str, Any]]) -> None:
        """Once before the first batch (e.g. caching the teacher's logits)."""

    def start_schedules(self, progress: float) -> None:
        """The weight schedules at the run's start (0: a fresh run)."""

    def update_schedules(self, progress: float) -> None:
        """After every optimizer step, with ``global_step / total_steps``."""

    def step_values(self, phases: List[Phase]) -> Dict[str, Any]:
        """Scalars for TensorBoard after each optimizer step."""

    def counts_window_tokens(self) -> bool:
        """Whether the loss is normalised over each window's tokens."""

    def prepare_window(self, batches: List[Any]) -> Any:
        """``(items, count)``: a window's micro-batches as the losses receive them, and this
        process's units (tokens) in them."""

    def begin_training(self, session: "Session") -> None:
        """Training starts: hooks attached, the session's log open."""

    def end_training(self) -> None:
        """Training ended, also on error: hooks removed, wrappers and groups released."""

    def record_loss(self, session: "Session", writer_step: int, total: torch.Tensor,
                    parts: Dict[str, torch.Tensor]) -> None:
        """A student micro-batch's losses (0.2.1's ``write_loss`` lives behind this)."""

    def save_and_callback(self, global_step: int, step: int, epoch: int,
                          callback: Optional[Callable]) -> None:
        """Writes ``gs{N}.pkl`` and runs the callback."""


class Session:
    """One run of :func:`run`: its progress, log and phases, which the task may read while
    it trains (``tb_writer``, ``write_loss``)."""

    def __init__(self, progress: Progress, log: LossLog, phases: List[Phase]):
        self.progress = progress
        self.log = log
        self.phases = phases


def check_student_is_finite(model_S: torch.nn.Module, runtime: Any, global_step: int) -> None:
    """Refuses to checkpoint non-finite weights (one host sync per checkpoint; under FSDP2
    each process checks its shards and the verdict is shared)."""
    named = [(name, parameter.detach()) for name, parameter in model_S.named_parameters()]
    local = [(name, value.to_local() if hasattr(value, "to_local") else value)
             for name, value in named]
    bad = [name for name, value in local if not bool(value.isfinite().all())] \
        if local and not bool(torch.stack([v.isfinite().all() for _, v in local]).all()) \
        else []
    if is_fsdp_sharded(model_S) and runtime.all_reduce_sum(len(bad)) and not bad:
        bad = ["(on another process)"]
    if bad:
        raise NonFiniteLossError(f"the student's parameters are not finite after optimizer "
                                 f"step {global_step} (e.g. {bad[:3]}); gs{global_step}.pkl "
                                 f"was not written, the newest checkpoint is an earlier one")


def _groups(task: Task, batches: Iterable, accumulation: int, by_window: bool,
            normalised: bool) -> Iterator[List[Any]]:
    if not by_window:
        return ([batch] for batch in batches)
    if not normalised:
        return windows(batches, accumulation)

    def counted():
        for window in windows(batches, accumulation):
            items, count = task.prepare_window(window)
            task.window_tokens = task.runtime.all_reduce_sum(int(count))
            yield items
    return counted()


def run(task: Task, optimizer: torch.optim.Optimizer, plan: TrainingPlan, source: Any,
        scheduler: Any, max_grad_norm: float, callback: Optional[Callable],
        args: Dict[str, Any]) -> None:
    """Trains ``task`` by ``plan`` on the batches of ``source``, resuming first if
    ``TrainingConfig.resume_from`` says so; ``task.end_training()`` runs at the end, also
    on error."""
    try:
        _run(task, optimizer, plan, source, scheduler, max_grad_norm, callback, args)
    finally:
        task.end_training()


def _run(task: Task, optimizer, plan: TrainingPlan, source, scheduler, max_grad_norm,
         callback, args) -> None:
    config, runtime = task.t_config, task.runtime
    if config.seed is not None:
        seed_everything(config.seed + runtime.rank)
    progress = Progress()
    phases = task.build_phases(optimizer, scheduler, max_grad_norm)
    state = task.train_state(optimizer, scheduler, phases, progress)
    checkpointer = Checkpointer(runtime, config, task.d_config)
    saved = checkpointer.find(plan)
    checkpointer.remove_stale_temporaries()
    task.before_training(plan, source, saved["distiller"] if saved else None)
    resume_rng = checkpointer.restore(saved, state, task.model_S, source) if saved else None
    # another run's later states are set aside at this run's first checkpoint
    set_aside_from: Optional[int] = progress.global_step
    if progress.global_step >= plan.final_step:
        logger.warning("Nothing to do: the run in %s is complete (global step %d of %d). "
                       "Use another output_dir, or resume_from=None, to train again",
                       config.output_dir, progress.global_step, plan.final_step)
        return
    os.makedirs(config.output_dir, exist_ok=True)
    task.start_schedules(progress.global_step / plan.total_steps)

    accumulation = config.gradient_accumulation_steps
    loader = getattr(source, "loader", None)
    micro_total = (int(len(loader) * plan.num_epochs)
                   if plan.mode == "epochs" and hasattr(loader, "__len__")
                   else plan.final_step * accumulation)
    log = LossLog(config.log_dir, config.log_steps, runtime.is_main, micro_total,
                  progress.writer_step, runtime.all_reduce_sum if runtime.distributed else None)
    session = Session(progress, log, phases)
    modes = (set_modes(task.model_T, False), set_modes(task.model_S, True))
    print_every = max(1, plan.final_step // task.print_freq)
    epochs = plan.epochs_to_run if plan.mode == "epochs" else None
    normalised = task.counts_window_tokens()
    several = len(phases) > 1
    # Several phases run the same micro-batches in turn, so a window is read ahead; one
    # phase streams them (a postprocessor's random draws stay where 0.2.1 had them).
    by_window = several or normalised or any(p.repeat > 1 or p.every > 1 for p in phases)

    def recorder(phase: Phase, group_start: int, group: List[Any]):
        def record(offset, total, parts):
            writer_step = group_start + offset
            if several:
                log.record(writer_step, progress.global_step, total,
                           {f"{phase.name}/{key}": value for key, value in parts.items()},
                           total_name=f"{phase.name}/total_loss")
            else:
                task.record_loss(session, writer_step, total, parts)
            if phase is phases[0]:
                log.count_samples(batch_size(group[offset]))
            if config.check_finite_every_step:
                log.flush(progress.global_step)
        return record

    try:
        task.begin_training(session)
        logger.info("Training: %s, %s optimizer steps, checkpoints to %s", plan.mode,
                    plan.final_step, config.output_dir)
        for epoch in range(progress.epoch, plan.epochs_to_run):
            progress.epoch = epoch
            if progress.micro_in_epoch == 0:
                for phase in phases:
                    phase.optimizer.zero_grad()
            batches = source.epoch(epoch)  # creates the data iterator (draws a shuffle)
            if resume_rng is not None:
                set_rng_state(resume_rng)  # the source is positioned: now the saved RNG
                resume_rng = None
            for group in _groups(task, batches, accumulation, by_window, normalised):
                starts = progress.micro_in_epoch % accumulation == 0
                ends = (progress.micro_in_epoch + len(group)) % accumulation == 0
                for phase in phases:
                    if phase.runs_at(progress.global_step):
                        run_phase(phase, group, args, runtime=runtime, starts_window=starts,
                                  ends_window=ends, accumulation=accumulation,
                                  window_normalised=normalised,
                                  record=recorder(phase, progress.writer_step, group))
                progress.writer_step += len(group)
                progress.micro_in_epoch += len(group)
                if not ends:
                    continue
                progress.global_step += 1
                task.update_schedules(progress.global_step / plan.total_steps)
                if log.writer is not None:  # only TensorBoard reads these values
                    log.observe(progress.writer_step - 1, progress.global_step,
                                task.step_values(phases))
                if progress.global_step % print_every == 0:
                    line = log.progress_line(progress.global_step, plan.final_step, epoch,
                                             epochs, progress.global_step)
                    if runtime.is_main:
                        logger.info(line)
                if plan.is_checkpoint(progress.global_step, epoch):
                    log.flush(progress.global_step)
                    check_student_is_finite(task.model_S, runtime, progress.global_step)
                    if set_aside_from is not None:
                        checkpointer.set_aside_later_states(set_aside_from)
                        set_aside_from = None
                    task.save_and_callback(progress.global_step, progress.micro_in_epoch - 1,
                                           epoch, callback)
                    checkpointer.write(progress, plan, state, source)
                if progress.global_step >= plan.final_step:
                    break
            progress.micro_in_epoch = 0
            if progress.global_step >= plan.final_step:
                break
        log.flush(progress.global_step)
    finally:
        if runtime.scaler is not None:
            skipped = int(runtime.skipped_steps)
            log.add_scalar("scalar/fp16_skipped_steps", skipped, progress.writer_step)
            if skipped:
                logger.warning("fp16: the grad scaler skipped %d of %d optimizer steps "
                               "(inf/NaN gradients)", skipped, progress.global_step)
        log.discard_pending()
        log.close()
        restore_modes(task.model_T, modes[0])
        restore_modes(task.model_S, modes[1])
    logger.info("Training finished after %d optimizer steps", progress.global_step)
