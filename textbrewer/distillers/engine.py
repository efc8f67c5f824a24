"""The distiller's side of the training loop: :class:`AbstractDistiller`, the base of every
distiller and trainer, and TextBrewer 0.2.1's method structure on it.

A distiller says how a batch becomes a loss (:meth:`AbstractDistiller.train_on_batch`) and
what else a step updates (:meth:`AbstractDistiller.phases`); the loop itself is
:func:`textbrewer.training.loop.run`, which calls it through the small protocol of
:class:`textbrewer.training.loop.Task` (implemented here). The 0.2.1 structure is kept, so a
0.2.1-style subclass runs unchanged: ``train()`` calls
:meth:`~textbrewer.distillers.compat.TextBrewerFacade.initialize_training`, then
:meth:`~textbrewer.distillers.compat.TextBrewerFacade.train_with_num_steps` or
:meth:`~textbrewer.distillers.compat.TextBrewerFacade.train_with_num_epochs`; each micro-batch goes through
:meth:`~AbstractDistiller.train_on_batch` and :meth:`~textbrewer.distillers.compat.TextBrewerFacade.write_loss`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..adaptors import AdaptorError, normalize_adaptor_output
from ..configurations import DistillationConfig, TrainingConfig
from ..training import loop
from ..training.batches import all_modules, forward_model, split_batch
from ..training.loop import Session
from ..training.phase import Phase, check_phase
from ..training.plan import Progress, TrainingPlan, make_plan
from ..training.runtime import Runtime
from ..training.state import (FunctionsEntry, ModulesEntry, OptimizerEntry, OptionalEntry,
                              PhasesEntry, TrainState)
from .compat import ACTIVE_STUDENT_FORWARDS, TextBrewerFacade, no_op

__all__ = ["AbstractDistiller", "Phase", "TrainingPlan", "forward_model", "split_batch", "no_op"]

Parts = Dict[str, torch.Tensor]


class AbstractDistiller(TextBrewerFacade):
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
        self._session: Optional[Session] = None  # the running train()'s
        #: units (tokens) in the current accumulation window over all processes, when
        #: :meth:`count_window_tokens` is implemented
        self.window_tokens: Optional[int] = None
        self._phases: List[Phase] = []
        self._wrappers: Dict[int, Callable] = {}
        self._tb_writer_override: Any = None
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

    def prepare_window(self, batches: List[Any]) -> Tuple[List[Any], Optional[int]]:
        """A window-normalised loss's window: the micro-batches as its loss receives them
        (default: unchanged) and this process's units in them (default:
        :meth:`count_window_tokens`). The loop sums the count over processes into
        ``self.window_tokens`` and hands each item to the phases' losses."""
        return batches, self.count_window_tokens(batches)

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
    def plan_training(self, dataloader, num_epochs, num_steps, batch_postprocessor):
        """The plan and data source of ``train()`` (:func:`~textbrewer.training.plan.make_plan`);
        a subclass may replace the source (the teacher's cached logits, several tasks)."""
        return make_plan(self.t_config, dataloader, num_epochs, num_steps, batch_postprocessor)

    def fit(self, optimizer, plan: TrainingPlan, source, scheduler, max_grad_norm, callback,
            args) -> None:
        """Runs the loop (:func:`textbrewer.training.loop.run`) on this distiller."""
        loop.run(self, optimizer, plan, source, scheduler, max_grad_norm, callback, args)
    # ---------------------------------------------------------------- the loop's protocol
    def train_state(self, optimizer, scheduler, phases: List[Phase],
                    progress: Progress) -> TrainState:
        """The resumable state: progress, the student's optimizer, scheduler and scaler,
        the modules trained with it, the extra phases, :meth:`extra_state`."""
        state = TrainState()
        state.register("progress", progress)
        state.register("extras", ModulesEntry([m for m, _ in self.extra_trainable_modules()]))
        state.register("optimizer", OptimizerEntry(self.model_S, optimizer))
        state.register("scheduler", OptionalEntry(scheduler))
        state.register("scaler", OptionalEntry(self.runtime.scaler))
        state.register("phases", PhasesEntry(phases))
        state.register("distiller", FunctionsEntry(self.extra_state, self.load_extra_state))
        return state

    def before_training(self, plan: TrainingPlan, source,
                        saved_extra: Optional[Dict[str, Any]]) -> None:
        """Run once before the first batch (e.g. caching the teacher's logits).

        ``saved_extra`` is what :meth:`extra_state` returned in the checkpoint being
        resumed from, or None for a fresh run.
        """

    def reset_schedules(self) -> None:
        """Back to the configured weights (a fresh run)."""

    def start_schedules(self, progress: float) -> None:
        if progress == 0:
            self.reset_schedules()
        else:
            self.update_schedules(progress)

    def step_values(self, phases: List[Phase]) -> Dict[str, Any]:
        values = dict(self.observed_values())
        for phase in phases:
            prefix = "lr" if phase.is_student else f"{phase.name}/lr"
            for index, group in enumerate(phase.optimizer.param_groups):
                values[f"{prefix}/group{index}"] = float(group["lr"])
        return values

    def counts_window_tokens(self) -> bool:
        return (type(self).count_window_tokens is not AbstractDistiller.count_window_tokens
                or type(self).prepare_window is not AbstractDistiller.prepare_window)

    def begin_training(self, session: Session) -> None:
        self._session = session
        ACTIVE_STUDENT_FORWARDS[id(self.model_S)] = self._student_forward
        self.attach_training_hooks()

    def end_training(self) -> None:
        """When training ends, also on error (idempotent): the hooks removed, and under DDP
        this training's wrappers dropped (they hold the process group) and the group
        destroyed if the runtime initialised it (:meth:`~textbrewer.training.runtime.Runtime.close`), so that its threads
        are joined here and not left running into interpreter shutdown. A group the script
        initialised is left to it. The next ``train()`` wraps the modules again."""
        if self._session is not None:
            self._session = None
            ACTIVE_STUDENT_FORWARDS.pop(id(self.model_S), None)
            self.remove_training_hooks()
        if not self.runtime.distributed:
            return
        self._trainable = self.model_S
        self._student_forward = self.model_S
        self._teacher_forwards = self.model_T
        self._wrappers = {}
        for phase in self._phases:
            phase.trainables = []
        self.runtime.close()

    def build_phases(self, optimizer, scheduler, max_grad_norm) -> List[Phase]:
        """The student's phase (on :meth:`train_on_batch`) and those :meth:`phases` adds,
        checked, their modules on the device and wrapped for DDP / compile."""
        student = Phase("student", optimizer, self.train_on_batch, [self.model_S], scheduler,
                        max_grad_norm, list(self.model_S.parameters()), [self._trainable],
                        self.runtime.scaler, is_student=True)
        phases = self.phases(student)
        where = f"{type(self).__name__}.phases()"
        if not isinstance(phases, (list, tuple)) or \
                not all(isinstance(phase, Phase) for phase in phases):
            raise TypeError(f"{where} must return a list of Phase objects, got "
                            f"{type(phases).__name__} {phases!r}"[:300])
        count = sum(phase is student for phase in phases)
        if count != 1 or sum(phase.is_student for phase in phases) != 1:
            raise ValueError(f"{where} must return the student phase it was given exactly once, "
                             f"with the scheme's own phases; it returned {count} times the "
                             f"student phase, in {[phase.name for phase in phases]}")
        names = [phase.name for phase in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must differ, got {names}")
        student_parameters = list(self._trainable.parameters()) + list(self.model_S.parameters())
        for phase in phases:
            if phase.is_student:
                continue
            check_phase(phase, student_parameters)
            phase.clip_parameters = [p for m in phase.modules for p in m.parameters()]
            phase.scaler = self.runtime.new_scaler()
            phase.trainables = []
            for module in phase.modules:
                module.to(self.runtime.device)
                if id(module) not in self._wrappers:
                    wrapper = self.runtime.wrap_trainable(module)
                    self._wrappers[id(module)] = self.runtime.maybe_compile(wrapper)
                    phase.trainables.append(wrapper)
        self._phases = phases
        return phases
    # ---------------------------------------------------------------- setup
    def _check_devices(self) -> None:
        device = self.runtime.device
        for role, models in (("model_S", self.model_S), ("model_T", self.model_T)):
            for module in all_modules(models):
                parameter = next(module.parameters(), None)
                if parameter is not None and parameter.device.type != device.type:
                    raise ValueError(f"{role} is on {parameter.device} but TrainingConfig.device "
                                     f"is {device}; move it with .to({str(device)!r}) first")
