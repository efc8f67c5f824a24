"""The one training loop, shared by every distiller and trainer.

A distiller says how a batch becomes a loss (:meth:`AbstractDistiller.train_on_batch`);
everything else lives here, once: device and precision (through
:class:`~textbrewer.distillers.runtime.Runtime`), gradient accumulation, clipping,
optimizer and LR-scheduler steps, weight schedules, logging, checkpoints, callbacks,
resuming and distributed training.

One optimizer step, in order: forward + loss for each micro-batch of the accumulation
window (backward after each), then clip, optimizer step, LR-scheduler step, zero_grad,
weight schedules, and, when due, the student's weights (``gs{N}.pkl``), the callback, and
the resumable state (``gs{N}.train_state.pt``, written after the callback so that a
resumed run continues from the random-number state the callback left, as an
uninterrupted run does).

TextBrewer 0.2.1's method structure is kept, so a 0.2.1-style subclass runs unchanged:
``train()`` calls :meth:`AbstractDistiller.initialize_training`, then
:meth:`~AbstractDistiller.train_with_num_steps` or
:meth:`~AbstractDistiller.train_with_num_epochs`; each micro-batch goes through
:meth:`~AbstractDistiller.train_on_batch` and :meth:`~AbstractDistiller.write_loss`.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Mapping
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence,
                    Tuple)

import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint as ckpt
from ..adaptors import AdaptorError, normalize_adaptor_output
from ..checkpoint import CheckpointError
from ..configurations import DistillationConfig, TrainingConfig
from ..logs import LossLog, NonFiniteLossError, logger
from ..utils import seed_everything
from .runtime import (Runtime, full_optimizer_state, full_state_dict, is_fsdp_sharded,
                      load_full_optimizer_state, load_full_state_dict)
from .sources import CycleSource, EmptyDataError, EpochSource, get_rng_state, set_rng_state

__all__ = ["AbstractDistiller", "Phase", "TrainingPlan", "forward_model", "split_batch", "no_op"]

Parts = Dict[str, torch.Tensor]


def forward_model(model: Callable, batch: Any, args: Dict[str, Any]) -> Any:
    """``model(**batch, **args)`` for a mapping, ``model(*batch, **args)`` for a list/tuple,
    ``model(batch, **args)`` for anything else (a single tensor)."""
    if isinstance(batch, Mapping):
        return model(**batch, **args)
    if isinstance(batch, (list, tuple)):
        return model(*batch, **args)
    return model(batch, **args)


def split_batch(batch: Any) -> Tuple[Any, Any, Any]:
    """(teacher_batch, student_batch, teacher_cache) of a batch.

    ``{'teacher': ..., 'student': ...}`` feeds the models separately; a ``'teacher_cache'``
    entry (in that form or in a plain dict batch) replaces the teacher's forward pass.
    """
    if isinstance(batch, Mapping) and "teacher" in batch and "student" in batch:
        return batch["teacher"], batch["student"], batch.get("teacher_cache")
    if isinstance(batch, Mapping) and "teacher_cache" in batch:
        rest = {k: v for k, v in batch.items() if k != "teacher_cache"}
        return rest, rest, batch["teacher_cache"]
    return batch, batch, None


class no_op:
    """Stands in for TensorBoard's writer when logging is off (TextBrewer 0.2.1's name)."""

    @staticmethod
    def add_scalar(*args, **kwargs) -> None:
        pass


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
class Phase:
    """One update within a training step: a loss, the optimizer that minimises it, and the
    modules it trains.

    A step runs the phases in order, each over the same micro-batches of the accumulation
    window (forward, loss, backward after each), and each steps its own optimizer when the
    window ends: e.g. a discriminator, then the student; or two students that teach each
    other. Precision (one grad scaler per phase under fp16), accumulation, clipping, DDP,
    logging (terms as ``{name}/...``) and checkpoints (its optimizer, scheduler and modules
    are saved and restored) work for every phase. See :meth:`AbstractDistiller.phases`.

    Args:
        name: the phase's name in logs and checkpoints.
        optimizer: the optimizer over ``modules``' parameters.
        loss: ``loss(batch, args) -> (total, {name: term})`` (or just ``total``).
        modules: the modules this phase trains; under DDP each is wrapped, and the loss
            must call it through :meth:`AbstractDistiller.wrapped`.
        scheduler: an LR scheduler stepped with ``optimizer``, or None.
        max_grad_norm: clip these modules' gradients to this norm (≤ 0: no clipping).
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


@dataclasses.dataclass
class _Progress:
    epoch: int = 0
    global_step: int = 0
    writer_step: int = 0
    micro_in_epoch: int = 0


def _set_modes(models: Any, mode: Optional[bool] = None) -> Any:
    """Records (and optionally sets) the train/eval mode of a model, list or dict of models."""
    if models is None:
        return None
    if isinstance(models, dict):
        return {k: _set_modes(v, mode) for k, v in models.items()}
    if isinstance(models, (list, tuple)):
        return [_set_modes(v, mode) for v in models]
    was_training = models.training
    if mode is not None:
        models.train(mode)
    return was_training


def _restore_modes(models: Any, modes: Any) -> None:
    if models is None or modes is None:
        return
    if isinstance(models, dict):
        for k, v in models.items():
            _restore_modes(v, modes[k])
    elif isinstance(models, (list, tuple)):
        for v, m in zip(models, modes):
            _restore_modes(v, m)
    else:
        models.train(modes)


def _batch_size(batch: Any) -> int:
    """Examples in a batch: the first dimension of the first tensor found (0 if none)."""
    if isinstance(batch, torch.Tensor):
        return batch.size(0) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = _batch_size(item)
            if size:
                return size
    return 0


def _all_modules(models: Any) -> List[nn.Module]:
    if models is None:
        return []
    if isinstance(models, dict):
        return [m for v in models.values() for m in _all_modules(v)]
    if isinstance(models, (list, tuple)):
        return [m for v in models for m in _all_modules(v)]
    return [models]


class _Trainable(nn.Module):
    """The student and the modules trained with it (projections), as one module.

    Distributed training wraps this in DistributedDataParallel, so the projections'
    gradients are averaged with the student's. Calling it runs the student.
    """

    def __init__(self, student: nn.Module, extras: nn.ModuleList):
        super().__init__()
        self.student = student
        self.extras = extras

    def forward(self, *args, **kwargs):
        return self.student(*args, **kwargs)


#: Student forwards in use by running trainings, by id(student): TextBrewer 0.2.1-style
#: code calls ``model_S(...)`` itself (``get_outputs_from_batch``); routing it through the
#: same DDP/compile wrapper as our own path keeps gradient synchronisation working.
ACTIVE_STUDENT_FORWARDS: Dict[int, Callable] = {}


class AbstractDistiller:
    """Base class of every distiller: the training loop; subclasses say how a batch
    becomes a loss.

    Class attribute ``ddp_find_unused_parameters`` (default True, TextBrewer 0.2.1's
    setting): what ``TrainingConfig.ddp_find_unused_parameters=None`` means for this
    distiller when nothing is trained with the student; a subclass that uses student
    parameters after the forward pass (an LM head in a fused loss) sets it to False.

    A subclass implements :meth:`train_on_batch` (and, if it trains extra modules such as
    projections, :meth:`extra_trainable_modules`). See ``docs/custom_distiller.md``.

    Args:
        train_config: :class:`~textbrewer.TrainingConfig`.
        distill_config: :class:`~textbrewer.DistillationConfig` (None for a trainer).
        model_T: teacher model, or a list / dict of them (None for a trainer).
        model_S: the student model, the one that is trained.
        adaptor_T: teacher adaptor(s): ``adaptor(batch, outputs) -> dict``.
        adaptor_S: student adaptor(s).

    Used as ``with distiller: distiller.train(...)``: inside the block the teachers are in
    eval mode and the student in train mode; both are restored afterwards.
    """

    ddp_find_unused_parameters = True

    def __init__(self, train_config: TrainingConfig, distill_config: Optional[DistillationConfig],
                 model_T: Any, model_S: nn.Module, adaptor_T: Any, adaptor_S: Any):
        if not isinstance(train_config, TrainingConfig):
            raise TypeError(f"train_config must be a TrainingConfig, got "
                            f"{type(train_config).__name__}")
        if distill_config is not None and not isinstance(distill_config, DistillationConfig):
            raise TypeError(f"distill_config must be a DistillationConfig, got "
                            f"{type(distill_config).__name__}")
        if not isinstance(model_S, nn.Module):
            raise TypeError(f"model_S must be a torch.nn.Module, got {type(model_S).__name__}")
        self.t_config = train_config
        self.d_config = distill_config
        self.model_T = model_T
        self.model_S = model_S
        self.adaptor_T = adaptor_T
        self.adaptor_S = adaptor_S
        self.runtime = Runtime(train_config)
        self.local_rank = self.runtime.local_rank
        self.rank = self.runtime.rank
        self.print_freq = 20
        self._modes = None
        self._trainable: nn.Module = model_S
        self._student_forward: Callable = model_S
        self._teacher_forwards: Any = model_T
        self._loss_log: Optional[LossLog] = None
        self._progress = _Progress()
        #: units (tokens) in the current accumulation window over all processes, when
        #: :meth:`count_window_tokens` is implemented
        self.window_tokens: Optional[int] = None
        self._phases: List[Phase] = []
        self._wrappers: Dict[int, Callable] = {}
        self._tb_writer_override: Any = None
        self._recorded = False

    # ---------------------------------------------------------------- what subclasses give
    def train_on_batch(self, batch: Any, args: Dict[str, Any]) -> Tuple[torch.Tensor, Parts]:
        """One micro-batch to ``(total_loss, {name: unweighted term})`` (or just the total
        loss, as TextBrewer 0.2.1's BasicTrainer returned). Override this."""
        raise NotImplementedError

    def extra_trainable_modules(self) -> List[Tuple[nn.Module, Dict[str, Any]]]:
        """Modules trained with the student, each with its param-group options.

        By default, TextBrewer 0.2.1's contract: the modules in ``self.projs`` (``None``
        entries skipped) with the options in ``self.projs_group``.
        """
        projections = getattr(self, "projs", None) or []
        groups = list(getattr(self, "projs_group", None) or [])
        groups += [None] * (len(projections) - len(groups))
        modules, seen = [], set()
        for module, group in zip(projections, groups):
            if isinstance(module, nn.Module) and id(module) not in seen:
                seen.add(id(module))
                modules.append((module, dict(group or {})))
        return modules

    def extra_state(self) -> Dict[str, Any]:
        """Extra training state of a subclass, saved in resumable checkpoints."""
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        """Restores what :meth:`extra_state` returned."""

    def update_schedules(self, progress: float) -> None:
        """Called after every optimizer step with ``global_step / total_steps``."""

    def phases(self, student_phase: Phase) -> List[Phase]:
        """The phases of one training step, in order (default: the student's alone).

        ``student_phase`` trains the student (and the projections) with the optimizer,
        scheduler and ``max_grad_norm`` given to ``train()``, on :meth:`train_on_batch`.
        A scheme with more updates per step (a discriminator, a generator, a second
        student) returns it together with its own :class:`Phase` objects.
        """
        return [student_phase]

    def wrapped(self, module: nn.Module) -> Callable:
        """The callable that runs ``module`` in training: through its DDP / compile wrapper
        when it is trained by a phase, else the module itself."""
        return self._wrappers.get(id(module), module)

    def count_window_tokens(self, batches: List[Any]) -> Optional[int]:
        """The number of units (valid tokens, say) in the micro-batches of one accumulation
        window, for losses normalised over the whole window; None (default) for the usual
        mean over micro-batches.

        When a subclass returns a count, the loop reads each window's micro-batches ahead,
        sums this count over processes, exposes it as ``self.window_tokens`` while the
        window's micro-batches run, and back-propagates each micro-batch's loss as it is
        (not divided by ``gradient_accumulation_steps``): a loss that is a *sum* over its
        micro-batch divided by ``self.window_tokens`` then makes one micro-batch of B equal
        k micro-batches of B/k, and DDP over N processes equal one process on N·B.

        Args:
            batches: the window's micro-batches, as the data source yields them (on the
                host: count without a device sync).
        """
        return None

    def observed_values(self) -> Dict[str, Any]:
        """Scalars logged to TensorBoard after each optimizer step (``scalar/{name}``), e.g.
        the scheduled weights and the temperature; tensors may stay on the device."""
        return {}

    def attach_training_hooks(self) -> None:
        """Called when training starts (e.g. to register feature-capture hooks)."""

    def remove_training_hooks(self) -> None:
        """Called when training ends, also on error: undoes :meth:`attach_training_hooks`."""

    # ---------------------------------------------------------------- helpers for subclasses
    def forward_student(self, batch: Any, args: Dict[str, Any]) -> Any:
        """The student's outputs on a (device-resident) batch, through DDP/compile wrappers."""
        return forward_model(self._student_forward, batch, args)

    def forward_teacher(self, model: Callable, batch: Any, args: Dict[str, Any]) -> Any:
        """A teacher's outputs, without gradients."""
        with torch.no_grad():
            return forward_model(model, batch, args)

    def adapt(self, adaptor: Callable, batch: Any, outputs: Any, role: str) -> Dict[str, Any]:
        """Runs an adaptor and checks/normalises its output (see :mod:`textbrewer.adaptors`)."""
        if not callable(adaptor):
            raise AdaptorError(f"{role} is not callable (got {type(adaptor).__name__})")
        return normalize_adaptor_output(adaptor(batch, outputs), role)

    @property
    def tb_writer(self) -> Any:
        """TensorBoard's ``SummaryWriter`` of the running training (``no_op`` when off or
        outside ``train()``), for subclasses that log their own scalars; a subclass may
        assign its own writer, as in 0.2.1."""
        if self._tb_writer_override is not None:
            return self._tb_writer_override
        writer = self._loss_log.writer if self._loss_log is not None else None
        return writer if writer is not None else no_op

    @tb_writer.setter
    def tb_writer(self, writer: Any) -> None:
        self._tb_writer_override = writer

    def write_loss(self, total_loss: torch.Tensor, writer_step: int,
                   losses_dict: Optional[Parts] = None) -> None:
        """Records a micro-batch's losses for TensorBoard (``scalar/total_loss`` and
        ``scalar/{name}``), the progress bar and the non-finite check.

        Values stay on the device and are copied every ``log_steps`` micro-batches.
        """
        if self._loss_log is None:
            raise RuntimeError("write_loss is called by the training loop, inside train()")
        self._recorded = True
        self._loss_log.record(writer_step, self._progress.global_step, total_loss,
                              losses_dict or {})

    # ---------------------------------------------------------------- context
    def __enter__(self):
        self._modes = (_set_modes(self.model_T, False), _set_modes(self.model_S, True))
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        if self._modes is not None:
            _restore_modes(self.model_T, self._modes[0])
            _restore_modes(self.model_S, self._modes[1])
            self._modes = None

    # ---------------------------------------------------------------- training
    def train(self, optimizer: torch.optim.Optimizer, dataloader: Iterable,
              num_epochs: Optional[float] = None, scheduler_class: Optional[Callable] = None,
              scheduler_args: Optional[Dict[str, Any]] = None, scheduler: Any = None,
              max_grad_norm: float = -1.0, num_steps: Optional[int] = None,
              callback: Optional[Callable] = None,
              batch_postprocessor: Optional[Callable] = None, **args) -> None:
        """Trains the student.

        Args:
            optimizer: optimizer over the student's parameters (projections are added to it
                as extra param groups).
            dataloader: iterable of batches: dicts (``model(**batch, **args)``), tuples
                (``model(*batch, **args)``) or ``{'teacher': ..., 'student': ...}``.
            num_epochs: train for this many passes over ``dataloader`` (may be fractional:
                1.5 stops half-way through the second pass).
            scheduler_class: LR-scheduler class (or factory), built as
                ``scheduler_class(optimizer=optimizer, **scheduler_args)`` after the
                projections join the optimizer.
            scheduler_args: keyword arguments for ``scheduler_class``.
            scheduler: a ready LR scheduler (deprecated in TextBrewer; it will not see the
                projections' param groups).
            max_grad_norm: clip the student's gradient norm to this (≤ 0: no clipping).
            num_steps: train for this many optimizer steps, cycling ``dataloader`` (which
                may have no length). Exactly one of ``num_epochs`` and ``num_steps``.
            callback: ``callback(model=student, step=global_step)`` after each checkpoint
                (main process only). It receives the unwrapped student, left in whatever
                mode the callback puts it (usually ``eval()``); training puts it back in
                train mode afterwards.
            batch_postprocessor: ``batch -> batch`` applied to every batch first.
            **args: extra keyword arguments for every model call.

        Raises:
            ValueError: both or neither of ``num_epochs``/``num_steps``, an empty
                dataloader, an optimizer that holds none of the student's parameters, or a
                setting this distiller does not support.
        """
        if (num_epochs is None) == (num_steps is None):
            raise ValueError(f"give exactly one of num_epochs and num_steps (got "
                             f"num_epochs={num_epochs!r}, num_steps={num_steps!r})")
        self._plan(dataloader, num_epochs, num_steps, batch_postprocessor)  # checks, no effects
        optimizer, scheduler, tqdm_disable = self.initialize_training(
            optimizer, scheduler_class, scheduler_args, scheduler)
        if num_steps is not None:
            self.train_with_num_steps(optimizer, scheduler, tqdm_disable, dataloader,
                                      max_grad_norm, num_steps, callback, batch_postprocessor,
                                      **args)
        else:
            self.train_with_num_epochs(optimizer, scheduler, tqdm_disable, dataloader,
                                       max_grad_norm, num_epochs, callback, batch_postprocessor,
                                       **args)

    def train_with_num_steps(self, optimizer, scheduler, tqdm_disable, dataloader,
                             max_grad_norm, num_steps, callback, batch_postprocessor, **args):
        """Step mode (TextBrewer 0.2.1's signature), after :meth:`initialize_training`."""
        plan, source = self._plan(dataloader, None, num_steps, batch_postprocessor)
        self._fit(optimizer, plan, source, scheduler, max_grad_norm, callback, args)

    def train_with_num_epochs(self, optimizer, scheduler, tqdm_disable, dataloader,
                              max_grad_norm, num_epochs, callback, batch_postprocessor, **args):
        """Epoch mode (TextBrewer 0.2.1's signature), after :meth:`initialize_training`."""
        plan, source = self._plan(dataloader, num_epochs, None, batch_postprocessor)
        if self.t_config.ckpt_steps is not None:
            logger.warning("TrainingConfig.ckpt_steps=%s is ignored in epoch mode "
                           "(train(num_epochs=...)); checkpoints follow ckpt_frequency and "
                           "ckpt_epoch_frequency. Use train(num_steps=...) for ckpt_steps",
                           self.t_config.ckpt_steps)
        self._fit(optimizer, plan, source, scheduler, max_grad_norm, callback, args)

    def _plan(self, dataloader, num_epochs, num_steps, batch_postprocessor):
        """The plan and data source for ``train()``; subclasses may replace the source."""
        accumulation = self.t_config.gradient_accumulation_steps
        if num_steps is not None:
            if isinstance(num_steps, bool) or not isinstance(num_steps, (int, float)) \
                    or int(num_steps) != num_steps or num_steps < 1:
                raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
            if hasattr(dataloader, "__len__") and len(dataloader) == 0:
                raise EmptyDataError("the dataloader is empty (len(dataloader) == 0)")
            plan = TrainingPlan("steps", 1, int(num_steps), None,
                                ckpt_steps=self.t_config.ckpt_steps)
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
        frequency = self.t_config.ckpt_frequency
        offsets = tuple(sorted({int(steps_per_epoch * i / frequency) for i in range(frequency)}))
        plan = TrainingPlan("epochs", num_epochs, steps_per_epoch * num_epochs,
                            steps_per_epoch, offsets, self.t_config.ckpt_epoch_frequency)
        return plan, EpochSource(dataloader, batch_postprocessor)

    # The loop --------------------------------------------------------------------------------
    def _fit(self, optimizer, plan: TrainingPlan, source, scheduler, max_grad_norm, callback,
             args) -> None:
        if self.t_config.seed is not None:
            seed_everything(self.t_config.seed + self.runtime.rank)
        progress = self._progress = _Progress()
        self._phases = self._build_phases(optimizer, scheduler, max_grad_norm)
        saved = self._load_resume_state(plan)
        if self.runtime.is_main and os.path.isdir(self.t_config.output_dir):
            for path in ckpt.remove_stale_temporaries(self.t_config.output_dir):
                logger.warning("Removed %s, a temporary file left by an interrupted run", path)
            start = saved["progress"]["global_step"] if saved else 0
            moved = ckpt.set_aside_states(self.t_config.output_dir, start)
            if moved:
                logger.warning("This run starts at step %d in %s, which holds training states of "
                               "later steps from another run: moved %d of them to %s, so that "
                               "resume_from='latest' finds this run's", start,
                               self.t_config.output_dir, len(moved), os.path.dirname(moved[0]))
        self._before_training(plan, source, saved["distiller"] if saved else None)
        resume_rng = self._apply_resume(saved, optimizer, scheduler, source, progress)
        if progress.global_step >= plan.final_step:
            logger.warning("Nothing to do: the run in %s is complete (global step %d of %d). "
                           "Use another output_dir, or resume_from=None, to train again",
                           self.t_config.output_dir, progress.global_step, plan.final_step)
            return
        os.makedirs(self.t_config.output_dir, exist_ok=True)
        if progress.global_step == 0:
            self._reset_schedules()
        else:
            self.update_schedules(progress.global_step / plan.total_steps)
        runtime, accumulation = self.runtime, self.t_config.gradient_accumulation_steps
        strict = self.t_config.check_finite_every_step
        loader = getattr(source, "loader", None)
        micro_total = (int(len(loader) * plan.num_epochs)
                       if plan.mode == "epochs" and hasattr(loader, "__len__")
                       else plan.final_step * accumulation)
        log = self._loss_log = LossLog(
            self.t_config.log_dir, self.t_config.log_steps, runtime.is_main, micro_total,
            progress.writer_step, runtime.all_reduce_sum if runtime.distributed else None)
        modes = (_set_modes(self.model_T, False), _set_modes(self.model_S, True))
        phases = self._phases
        print_every = max(1, plan.final_step // self.print_freq)
        epochs = plan.epochs_to_run if plan.mode == "epochs" else None
        window_normalised = (type(self).count_window_tokens
                             is not AbstractDistiller.count_window_tokens)
        # Several phases run the same micro-batches in turn, so a window is read ahead;
        # one phase streams them (a postprocessor's random draws stay where 0.2.1 had them).
        by_window = len(phases) > 1 or window_normalised
        ACTIVE_STUDENT_FORWARDS[id(self.model_S)] = self._student_forward
        self.attach_training_hooks()
        logger.info("Training: %s, %s optimizer steps, checkpoints to %s", plan.mode,
                    plan.final_step, self.t_config.output_dir)
        try:
            for epoch in range(progress.epoch, plan.epochs_to_run):
                progress.epoch = epoch
                if progress.micro_in_epoch == 0:
                    for phase in phases:
                        phase.optimizer.zero_grad()
                batches = source.epoch(epoch)  # creates the data iterator (draws a shuffle)
                if resume_rng is not None:
                    set_rng_state(resume_rng)  # the source is positioned: now the saved RNG
                    resume_rng = None
                groups = (self._windows(batches, accumulation, window_normalised) if by_window
                          else ([batch] for batch in batches))
                for group in groups:
                    window_ends = (progress.micro_in_epoch + len(group)) % accumulation == 0
                    for phase in phases:
                        self._run_phase(phase, group, window_ends, len(phases) > 1,
                                        window_normalised, args)
                    progress.writer_step += len(group)
                    progress.micro_in_epoch += len(group)
                    if not window_ends:
                        continue
                    progress.global_step += 1
                    self.update_schedules(progress.global_step / plan.total_steps)
                    if log.writer is not None:  # only TensorBoard reads these values
                        log.observe(progress.writer_step - 1, progress.global_step,
                                    self._step_values())
                    if progress.global_step % print_every == 0:
                        line = log.progress_line(progress.global_step, plan.final_step, epoch,
                                                 epochs, progress.global_step)
                        if runtime.is_main:
                            logger.info(line)
                    if plan.is_checkpoint(progress.global_step, epoch):
                        log.flush(progress.global_step)
                        self._check_student_is_finite(progress.global_step)
                        self.save_and_callback(progress.global_step, progress.micro_in_epoch - 1,
                                               epoch, callback)
                        self._save(progress, optimizer, scheduler, plan, source)
                    if progress.global_step >= plan.final_step:
                        break
                progress.micro_in_epoch = 0
                if progress.global_step >= plan.final_step:
                    break
            log.flush(progress.global_step)
        finally:
            ACTIVE_STUDENT_FORWARDS.pop(id(self.model_S), None)
            self.remove_training_hooks()
            if runtime.scaler is not None:
                skipped = int(runtime.skipped_steps)
                log.add_scalar("scalar/fp16_skipped_steps", skipped, progress.writer_step)
                if skipped:
                    logger.warning("fp16: the grad scaler skipped %d of %d optimizer steps "
                                   "(inf/NaN gradients)", skipped, progress.global_step)
            self._loss_log = None
            log.discard_pending()
            log.close()
            _restore_modes(self.model_T, modes[0])
            _restore_modes(self.model_S, modes[1])
        logger.info("Training finished after %d optimizer steps", progress.global_step)

    def _load_phases(self, path: str, saved: Dict[str, Any]) -> None:
        extra = [phase for phase in self._phases if not phase.is_student]
        if sorted(saved) != sorted(phase.name for phase in extra):
            raise _phase_state_error(path, sorted(saved), sorted(p.name for p in extra))
        for phase in extra:
            state = saved[phase.name]
            if len(state["modules"]) != len(phase.modules):
                raise _phase_state_error(path, [f"{phase.name}: {len(state['modules'])} modules"],
                                         [f"{phase.name}: {len(phase.modules)} modules"])
            for module, module_state in zip(phase.modules, state["modules"]):
                _check_fits(f"resume_from={path!r}: phase {phase.name!r}'s "
                            f"{type(module).__name__}", module_state, module.state_dict(),
                            "this run's module")
                module.load_state_dict(module_state)
            phase.optimizer.load_state_dict(state["optimizer"])
            if phase.scheduler is not None and state["scheduler"] is not None:
                phase.scheduler.load_state_dict(state["scheduler"])
            if phase.scaler is not None and state["scaler"] is not None:
                phase.scaler.load_state_dict(state["scaler"])

    def _step_values(self) -> Dict[str, Any]:
        values = dict(self.observed_values())
        for phase in self._phases:
            prefix = "lr" if phase.is_student else f"{phase.name}/lr"
            for index, group in enumerate(phase.optimizer.param_groups):
                values[f"{prefix}/group{index}"] = float(group["lr"])
        return values

    def _build_phases(self, optimizer, scheduler, max_grad_norm) -> List[Phase]:
        student = Phase("student", optimizer, self.train_on_batch, [self.model_S], scheduler,
                        max_grad_norm, list(self.model_S.parameters()), [self._trainable],
                        self.runtime.scaler, is_student=True)
        phases = self.phases(student)
        if not phases or sum(phase.is_student for phase in phases) != 1:
            raise ValueError(f"{type(self).__name__}.phases() must return the student phase it "
                             f"was given once, with the scheme's own phases")
        names = [phase.name for phase in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must differ, got {names}")
        for phase in phases:
            if phase.is_student:
                continue
            if not isinstance(phase.optimizer, torch.optim.Optimizer):
                raise TypeError(f"phase {phase.name!r}: optimizer must be a "
                                f"torch.optim.Optimizer, got {type(phase.optimizer).__name__}")
            phase.clip_parameters = [p for m in phase.modules for p in m.parameters()]
            phase.scaler = self.runtime.new_scaler()
            phase.trainables = []
            for module in phase.modules:
                module.to(self.runtime.device)
                if id(module) not in self._wrappers:
                    wrapper = self.runtime.wrap_trainable(module)
                    self._wrappers[id(module)] = self.runtime.maybe_compile(wrapper)
                    phase.trainables.append(wrapper)
        return phases

    def _windows(self, batches: Iterable, accumulation: int,
                 count_tokens: bool) -> Iterator[List[Any]]:
        """The micro-batches in lists of one accumulation window (the last may be short),
        setting ``self.window_tokens`` for each when ``count_tokens``.

        Windows start at multiples of ``accumulation`` micro-batches into the epoch (a
        resumed run starts at a window boundary: checkpoints are taken there)."""
        iterator = iter(batches)
        while True:
            window = list(itertools.islice(iterator, accumulation))
            if not window:
                return
            if count_tokens:
                count = self.count_window_tokens(window)
                self.window_tokens = self.runtime.all_reduce_sum(int(count))
            yield window

    def _run_phase(self, phase: "Phase", group: List[Any], window_ends: bool, named: bool,
                   window_normalised: bool, args: Dict[str, Any]) -> None:
        """Forward, loss and backward of one phase on ``group``'s micro-batches, then its
        optimizer step when the group ends an accumulation window."""
        runtime, log = self.runtime, self._loss_log
        progress, accumulation = self._progress, self.t_config.gradient_accumulation_steps
        if progress.micro_in_epoch % accumulation == 0:
            # Another phase's backward may have reached these modules (the student's loss
            # through a discriminator, say): a window starts from clean gradients.
            phase.optimizer.zero_grad()
        for offset, batch in enumerate(group):
            ends_window = window_ends and offset == len(group) - 1
            with runtime.no_sync(phase.trainables, skip=not ends_window):
                with runtime.autocast():
                    try:
                        total, parts = _as_loss_and_parts(phase.loss(batch, args))
                    except RuntimeError as error:
                        if "Expected to have finished reduction" not in str(error):
                            raise
                        raise RuntimeError(
                            "DistributedDataParallel: some parameter of the trained modules got "
                            "no gradient in the previous step (a pooler or head the loss does not "
                            "use). Give it a part in the loss, call requires_grad_(False) on it, "
                            "or, when nothing is trained with the student (no projections or "
                            "loss modules), set TrainingConfig(ddp_find_unused_parameters=True)"
                        ) from error
                if named:
                    log.record(progress.writer_step + offset, progress.global_step, total,
                               {f"{phase.name}/{key}": value for key, value in parts.items()},
                               total_name=f"{phase.name}/total_loss")
                else:
                    self._recorded = False
                    self.write_loss(total, progress.writer_step + offset, parts)
                    if not self._recorded:
                        # an override that does not call the base method still gets the
                        # non-finite check and the progress bar (its TensorBoard is its own)
                        log.record(progress.writer_step + offset, progress.global_step, total,
                                   parts, write=False)
                if phase is self._phases[0]:
                    log.count_samples(_batch_size(batch))
                if self.t_config.check_finite_every_step:
                    log.flush(progress.global_step)
                runtime.backward(total * runtime.world_size if window_normalised
                                 else total / accumulation, phase.scaler)
        if window_ends:
            runtime.optimizer_step(phase.optimizer, phase.clip_parameters, phase.max_grad_norm,
                                   phase.scaler)
            if phase.scheduler is not None:
                phase.scheduler.step()
            phase.optimizer.zero_grad()

    def _check_student_is_finite(self, global_step: int) -> None:
        """Refuses to checkpoint non-finite weights (one host sync per checkpoint; under
        FSDP2 each process checks its shards and the verdict is shared)."""
        named = [(name, parameter.detach()) for name, parameter in self.model_S.named_parameters()]
        local = [(name, value.to_local() if hasattr(value, "to_local") else value)
                 for name, value in named]
        bad = [name for name, value in local if not bool(value.isfinite().all())] \
            if local and not bool(torch.stack([v.isfinite().all() for _, v in local]).all()) \
            else []
        if is_fsdp_sharded(self.model_S) and self.runtime.all_reduce_sum(len(bad)) and not bad:
            bad = ["(on another process)"]
        if bad:
            raise NonFiniteLossError(f"the student's parameters are not finite after optimizer "
                                     f"step {global_step} (e.g. {bad[:3]}); gs{global_step}.pkl "
                                     f"was not written, the newest checkpoint is an earlier one")

    def _before_training(self, plan: TrainingPlan, source,
                         saved_extra: Optional[Dict[str, Any]]) -> None:
        """Hook run once before the first batch (e.g. caching the teacher's logits).

        ``saved_extra`` is what :meth:`extra_state` returned in the checkpoint being
        resumed from, or None for a fresh run.
        """

    def _reset_schedules(self) -> None:
        """Back to the configured weights (a fresh run)."""

    # ---------------------------------------------------------------- setup
    def _check_devices(self) -> None:
        device = self.runtime.device
        for role, models in (("model_S", self.model_S), ("model_T", self.model_T)):
            for module in _all_modules(models):
                parameter = next(module.parameters(), None)
                if parameter is not None and parameter.device.type != device.type:
                    raise ValueError(f"{role} is on {parameter.device} but TrainingConfig.device "
                                     f"is {device}; move it with .to({str(device)!r}) first")

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        student = {id(p) for p in self.model_S.parameters()}
        teacher = {id(p) for module in _all_modules(self.model_T)
                   for p in module.parameters()} - student
        if held & teacher:
            raise ValueError(f"the optimizer holds {len(held & teacher)} of the teacher's "
                             f"parameters; the teacher is frozen. Build the optimizer from "
                             f"model_S.parameters()")
        if not held & student:
            raise ValueError(f"the optimizer holds none of the student's parameters (it holds "
                             f"{len(held)} others), so training would change nothing. Build it "
                             f"from model_S.parameters()")

    def initialize_training(self, optimizer: torch.optim.Optimizer,
                            scheduler_class: Optional[Callable],
                            scheduler_args: Optional[Dict[str, Any]], scheduler: Any):
        """Checks the optimizer and devices, adds the extra modules' param groups, builds
        the LR scheduler, wraps the student for DDP / compile.

        Returns:
            ``(optimizer, scheduler, tqdm_disable)``, as TextBrewer 0.2.1.
        """
        self._check_optimizer(optimizer)
        self._check_devices()
        extras = self.extra_trainable_modules()
        existing = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for module, options in extras:
            module.to(self.runtime.device)
            parameters = [p for p in module.parameters() if id(p) not in existing]
            if parameters:
                optimizer.add_param_group({"params": parameters, **options})
                existing.update(id(p) for p in parameters)
        if scheduler_class is not None:
            scheduler = scheduler_class(optimizer=optimizer, **(scheduler_args or {}))
        trainable = _Trainable(self.model_S, nn.ModuleList([m for m, _ in extras]))
        find_unused = self.t_config.ddp_find_unused_parameters
        if find_unused and extras and self.runtime.distributed:
            raise ValueError("TrainingConfig.ddp_find_unused_parameters=True cannot be used with "
                             "modules trained with the student (projections, loss modules): "
                             "they run after the student's forward pass, which DDP's search "
                             "would count as unused. Leave it None, and give every student "
                             "parameter a part in the loss (or requires_grad_(False) on those "
                             "that have none)")
        if find_unused is None:
            find_unused = self.ddp_find_unused_parameters and not extras
        self._trainable = self.runtime.wrap_trainable(trainable,
                                                      find_unused_parameters=find_unused)
        self._student_forward = self.runtime.maybe_compile(self._trainable)
        self._teacher_forwards = _map_models(self.model_T, self.runtime.maybe_compile)
        return optimizer, scheduler, None if self.runtime.is_main else True

    # ---------------------------------------------------------------- checkpoints
    def save_and_callback(self, global_step: int, step: int, epoch: int,
                          callback: Optional[Callable]) -> None:
        """Saves ``gs{global_step}.pkl`` (main process), then runs the callback.

        As in TextBrewer 0.2.1, every process runs the callback once the weights are saved
        (a distributed evaluation, like its NER example's, synchronises inside it; a
        callback that should run once checks the rank). It gets the unwrapped student,
        ``callback(model=student, step=global_step)``, and the student is put back in
        train mode afterwards. It shares the random-number generators with training, as in
        0.2.1, unless ``TrainingConfig.isolate_callback_rng`` is set.
        """
        sharded = is_fsdp_sharded(self.model_S)
        weights = full_state_dict(self.model_S) if sharded else None  # a collective

        def write():
            path = ckpt.student_checkpoint_path(self.t_config.output_dir, global_step)
            # a training state of this step from another run must not pair with these weights
            stale = ckpt.state_path(self.t_config.output_dir, global_step)
            if os.path.exists(stale):
                os.unlink(stale)
            logger.info("Saving %s (epoch %d, epoch step %d)", path, epoch + 1, step + 1)
            ckpt.atomic_save(weights if sharded else self.model_S.state_dict(), path)

        self._on_main_then_together(write, f"writing gs{global_step}.pkl")
        if callback is not None:
            logger.info("Running callback at global step %d", global_step)
            rng_state = get_rng_state() if self.t_config.isolate_callback_rng else None
            try:
                callback(model=self.model_S, step=global_step)
            finally:
                if rng_state is not None:
                    set_rng_state(rng_state)
            self.model_S.train()

    def _on_main_then_together(self, work: Callable[[], None], what: str) -> None:
        """Runs ``work`` on the main process; every process then learns whether it failed,
        so a full disk on the main process stops all of them instead of leaving the others
        waiting in the next collective."""
        error = None
        if self.runtime.is_main:
            try:
                work()
            except BaseException as caught:  # re-raised below, after telling the others
                error = caught
        if self.runtime.distributed:
            failed = self.runtime.all_reduce_sum(int(error is not None))
            if failed and error is None:
                raise RuntimeError(f"the main process failed while {what}; see its log")
        if error is not None:
            raise error

    def _local_state(self, source) -> Dict[str, Any]:
        return {"rng": get_rng_state(), "source": source.state_dict()}

    def _save(self, progress: _Progress, optimizer, scheduler, plan: TrainingPlan,
              source) -> None:
        local = self._local_state(source)
        optimizer_state = full_optimizer_state(self.model_S, optimizer)  # FSDP2: a collective
        if self.runtime.distributed:
            gathered: List[Any] = [None] * self.runtime.world_size
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        self._on_main_then_together(
            lambda: self._write_state(progress, optimizer_state, scheduler, plan, gathered),
            f"writing gs{progress.global_step}.train_state.pt")

    def _write_state(self, progress: _Progress, optimizer_state: Dict[str, Any], scheduler,
                     plan: TrainingPlan, gathered: List[Any]) -> None:
        output_dir = self.t_config.output_dir
        student_file = ckpt.student_checkpoint_path(output_dir, progress.global_step)
        state = {
            "format": 1,
            "progress": dataclasses.asdict(progress),
            "plan": {"mode": plan.mode, "total_steps": plan.total_steps,
                     "num_epochs": plan.num_epochs},
            "student_file_bytes": os.path.getsize(student_file),
            "student_file_fingerprint": ckpt.file_fingerprint(student_file),
            "extras": [module.state_dict() for module, _ in self.extra_trainable_modules()],
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict() if hasattr(scheduler, "state_dict") else None,
            "scaler": self.runtime.scaler.state_dict() if self.runtime.scaler else None,
            "per_rank": gathered,
            "phases": {phase.name: {
                "modules": [module.state_dict() for module in phase.modules],
                "optimizer": phase.optimizer.state_dict(),
                "scheduler": (phase.scheduler.state_dict()
                              if hasattr(phase.scheduler, "state_dict") else None),
                "scaler": phase.scaler.state_dict() if phase.scaler is not None else None,
            } for phase in self._phases if not phase.is_student},
            "distiller": self.extra_state(),
            "train_config": self.t_config.to_dict(),
            "distill_config": self.d_config.to_dict() if self.d_config is not None else None,
        }
        ckpt.atomic_save(state, ckpt.state_path(output_dir, progress.global_step))
        for path in ckpt.prune_train_states(output_dir, self.t_config.keep_train_states):
            logger.debug("Removed the older training state %s (keep_train_states=%s)", path,
                         self.t_config.keep_train_states)

    def _load_resume_state(self, plan: TrainingPlan) -> Optional[Dict[str, Any]]:
        """The training state named by ``resume_from``, checked against this run, or None."""
        target = self.t_config.resume_from
        if target is None:
            return None
        if target == "latest":
            state = self._latest_complete_state()
            if state is None:
                return None
            path = state["path"]
        else:
            path = os.fspath(target)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"resume_from={target!r}: no such file")
            state = ckpt.load_state(path)
            state["path"] = path
        for key in ("mode", "num_epochs", "total_steps"):
            saved, current = state["plan"][key], getattr(plan, key)
            if saved != current:
                if key == "total_steps" and plan.mode == "steps":
                    raise ValueError(f"resume_from={path!r}: the checkpoint was written by a run "
                                     f"with num_steps={saved!r}, this run has num_steps="
                                     f"{current!r}; a run resumes with the plan it started with "
                                     f"(the schedules are sized by it): to train longer, start a "
                                     f"new run from its gs{{N}}.pkl weights")
                raise ValueError(f"resume_from={path!r}: the checkpoint was written by a run with "
                                 f"{key}={saved!r}, this run has {key}={current!r}")
        if len(state["per_rank"]) != self.runtime.world_size:
            raise ValueError(f"resume_from={path!r}: saved by {len(state['per_rank'])} processes, "
                             f"this run has {self.runtime.world_size}")
        if self.d_config is not None and state.get("distill_config") is not None:
            current = self.d_config.to_dict()
            changed = sorted(key for key in set(current) | set(state["distill_config"])
                             if current.get(key) != state["distill_config"].get(key))
            if changed:
                logger.warning("resume_from=%r: the DistillationConfig differs from the one the "
                               "checkpoint was written with, in %s; training goes on with the "
                               "new values", path, changed)
        return state

    def _latest_complete_state(self) -> Optional[Dict[str, Any]]:
        output_dir = self.t_config.output_dir
        candidates = ckpt.state_paths_newest_first(output_dir) if os.path.isdir(output_dir) \
            else []
        problems = []
        for path in candidates:
            try:
                state = ckpt.load_state(path)
            except CheckpointError as error:
                problems.append(str(error))
                logger.warning("resume_from='latest': skipping %s", error)
                continue
            state["path"] = path
            return state
        if problems:
            # Starting afresh would overwrite the gs{N}.pkl files of the broken run.
            raise CheckpointError(f"resume_from='latest': no usable training state in "
                                  f"{output_dir}: " + "; ".join(problems))
        logger.info("resume_from='latest': no training state in %s; starting fresh", output_dir)
        return None

    def _apply_resume(self, state, optimizer, scheduler, source, progress) -> Optional[dict]:
        """Loads weights, optimizer, scheduler, scaler and data position; returns the RNG
        state to restore once the data source is positioned."""
        if state is None:
            return None
        path, global_step = state["path"], state["progress"]["global_step"]
        weights_path = ckpt.student_checkpoint_path(os.path.dirname(path), global_step)
        weights = ckpt.load_student_weights(weights_path, map_location=self.runtime.device)
        _check_fits(f"resume_from={path!r}: the saved student {weights_path}", weights,
                    _unsharded_shapes(self.model_S), "model_S")
        extras = self.extra_trainable_modules()
        if len(state["extras"]) != len(extras):
            raise CheckpointError(f"resume_from={path!r}: the checkpoint holds "
                                  f"{len(state['extras'])} modules trained with the student "
                                  f"(projections, custom-match projections), this run has "
                                  f"{len(extras)}: intermediate_matches' proj entries or "
                                  f"custom_matches changed since it was written")
        saved_groups = len(state["optimizer"]["param_groups"])
        if saved_groups != len(optimizer.param_groups):
            raise CheckpointError(f"resume_from={path!r}: the saved optimizer has {saved_groups} "
                                  f"parameter groups, this run's has {len(optimizer.param_groups)}"
                                  f" (the optimizer's construction or the projections changed)")
        for index, ((module, _), module_state) in enumerate(zip(extras, state["extras"])):
            _check_fits(f"resume_from={path!r}: trained module {index} "
                        f"({type(module).__name__})", module_state, module.state_dict(),
                        "this run's module")
        load_full_state_dict(self.model_S, weights)
        for (module, _), module_state in zip(extras, state["extras"]):
            module.load_state_dict(module_state)
        try:
            load_full_optimizer_state(self.model_S, optimizer, state["optimizer"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"resume_from={path!r}: the saved optimizer state does not fit "
                                  f"this optimizer ({error})") from None
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        if self.runtime.scaler is not None and state["scaler"] is not None:
            self.runtime.scaler.load_state_dict(state["scaler"])
        self._load_phases(path, state.get("phases", {}))
        self.load_extra_state(state["distiller"])
        local = state["per_rank"][self.runtime.rank]
        source.load_state_dict(local["source"])
        for key, value in state["progress"].items():
            setattr(progress, key, value)
        logger.info("Resumed from %s at global step %d", path, global_step)
        return local["rng"]


def _phase_state_error(path: str, saved: List[str], current: List[str]) -> CheckpointError:
    return CheckpointError(f"resume_from={path!r}: the checkpoint was written with the extra "
                           f"phases {saved}, this run has {current}")


def _check_fits(what: str, saved: Dict[str, Any], current: Dict[str, Any], target: str) -> None:
    """A clear error when a saved state dict does not fit a module's (keys, shapes)."""
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    # an empty current tensor is a buffer its module sizes on first use (a quantisation
    # observer's min/max): its own load_state_dict takes the saved size
    mismatched = [f"{key}: saved {tuple(saved[key].shape)}, {target} {tuple(current[key].shape)}"
                  for key in current if key in saved and isinstance(saved[key], torch.Tensor)
                  and saved[key].shape != current[key].shape and current[key].numel() > 0]
    if missing or unexpected or mismatched:
        details = []
        if mismatched:
            details.append(f"shapes differ for {len(mismatched)} entries ({'; '.join(mismatched[:3])})")
        if missing:
            details.append(f"missing {missing[:5]}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}")
        raise CheckpointError(f"{what} does not fit {target}: " + ", ".join(details))


def _unsharded_shapes(module: nn.Module) -> Dict[str, Any]:
    """The module's state-dict entries with their full shapes (a DTensor's global shape)."""
    return {key: torch.empty(tuple(value.shape), device="meta")
            if isinstance(value, torch.Tensor) else value
            for key, value in module.state_dict().items()}


def _as_loss_and_parts(result: Any) -> Tuple[torch.Tensor, Parts]:
    """``train_on_batch``'s result as ``(total, parts)``; a bare tensor has no parts."""
    if isinstance(result, tuple) and len(result) == 2:
        total, parts = result
    else:
        total, parts = result, {}
    if not isinstance(total, torch.Tensor):
        raise AdaptorError("nothing to optimise: the adaptors returned no logits, losses or "
                           "matched features (train_on_batch gave "
                           f"{type(total).__name__} instead of a loss tensor)")
    return total, dict(parts or {})


def _map_models(models: Any, function: Callable) -> Any:
    if models is None:
        return None
    if isinstance(models, dict):
        return {k: _map_models(v, function) for k, v in models.items()}
    if isinstance(models, (list, tuple)):
        return [_map_models(v, function) for v in models]
    return function(models)


