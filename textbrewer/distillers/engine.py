"""The one training loop, shared by every distiller and trainer.

A distiller says how a batch becomes a loss (:meth:`AbstractDistiller.train_on_batch`);
everything else lives here, once: device and precision (through :class:`Runtime`),
gradient accumulation, clipping, optimizer and LR-scheduler steps, weight schedules,
logging, checkpoints, callbacks, resuming and distributed training.

One optimizer step, in order: forward + loss for each micro-batch of the accumulation
window (backward after each), then clip, optimizer step, LR-scheduler step, zero_grad,
weight schedules, and, when due, checkpoint + callback.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint as ckpt
from ..adaptors import AdaptorError, normalize_adaptor_output
from ..configurations import DistillationConfig, TrainingConfig
from ..logs import LossLog, logger
from ..utils import seed_everything
from .runtime import Runtime
from .sources import CycleSource, EmptyDataError, EpochSource, get_rng_state, set_rng_state

__all__ = ["AbstractDistiller", "TrainingPlan", "forward_model", "split_batch"]

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


@dataclasses.dataclass
class TrainingPlan:
    """How long to train and when to save.

    ``num_epochs`` is 1 in step mode (the data source cycles forever).
    """

    mode: str  # 'epochs' or 'steps'
    num_epochs: int
    total_steps: float
    steps_per_epoch: Optional[int]
    checkpoint_offsets: Tuple[int, ...] = ()
    ckpt_epoch_frequency: int = 1
    ckpt_steps: Optional[int] = None

    def is_checkpoint(self, global_step: int, epoch: int) -> bool:
        """Whether to save after optimizer step ``global_step`` in ``epoch`` (0-based)."""
        if self.mode == "steps":
            return (self.ckpt_steps is not None and global_step % self.ckpt_steps == 0) \
                or global_step == self.total_steps
        in_epoch = global_step % self.steps_per_epoch in self.checkpoint_offsets
        epoch_due = (epoch + 1) % self.ckpt_epoch_frequency == 0 or epoch + 1 == self.num_epochs
        return in_epoch and epoch_due


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


class AbstractDistiller:
    """Base class of every distiller: the training loop; subclasses say how a batch
    becomes a loss.

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

    # ---------------------------------------------------------------- what subclasses give
    def train_on_batch(self, batch: Any, args: Dict[str, Any]) -> Tuple[torch.Tensor, Parts]:
        """One micro-batch to ``(total_loss, {name: unweighted term})``. Override this."""
        raise NotImplementedError

    def extra_trainable_modules(self) -> List[Tuple[nn.Module, Dict[str, Any]]]:
        """Modules trained with the student (projections), each with its param-group options."""
        return []

    def extra_state(self) -> Dict[str, Any]:
        """Extra training state of a subclass, saved in resumable checkpoints."""
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        """Restores what :meth:`extra_state` returned."""

    def update_schedules(self, progress: float) -> None:
        """Called after every optimizer step with ``global_step / total_steps``."""

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
            num_epochs: train for this many passes over ``dataloader``.
            scheduler_class: LR-scheduler class (or factory), built as
                ``scheduler_class(optimizer=optimizer, **scheduler_args)`` after the
                projections join the optimizer.
            scheduler_args: keyword arguments for ``scheduler_class``.
            scheduler: a ready LR scheduler (deprecated in TextBrewer; it will not see the
                projections' param groups).
            max_grad_norm: clip the student's gradient norm to this (≤ 0: no clipping).
            num_steps: train for this many optimizer steps, cycling ``dataloader`` (which
                may have no length). Exactly one of ``num_epochs`` and ``num_steps``.
            callback: ``callback(model=student, step=global_step)`` after each checkpoint.
            batch_postprocessor: ``batch -> batch`` applied to every batch first.
            **args: extra keyword arguments for every model call.

        Raises:
            ValueError: both or neither of ``num_epochs``/``num_steps``, an empty
                dataloader, or a setting this distiller does not support.
        """
        if (num_epochs is None) == (num_steps is None):
            raise ValueError(f"give exactly one of num_epochs and num_steps (got "
                             f"num_epochs={num_epochs!r}, num_steps={num_steps!r})")
        plan, source = self._plan(dataloader, num_epochs, num_steps, batch_postprocessor)
        self._fit(optimizer, plan, source, scheduler_class, scheduler_args, scheduler,
                  max_grad_norm, callback, args)

    def _plan(self, dataloader, num_epochs, num_steps, batch_postprocessor):
        """The plan and data source for ``train()``; subclasses may replace the source."""
        accumulation = self.t_config.gradient_accumulation_steps
        if num_steps is not None:
            if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
                raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
            if hasattr(dataloader, "__len__") and len(dataloader) == 0:
                raise EmptyDataError("the dataloader is empty (len(dataloader) == 0)")
            plan = TrainingPlan("steps", 1, int(num_steps), None,
                                ckpt_steps=self.t_config.ckpt_steps)
            return plan, CycleSource(dataloader, batch_postprocessor)
        if isinstance(num_epochs, bool) or not isinstance(num_epochs, (int, float)) \
                or int(num_epochs) < 1:
            raise ValueError(f"num_epochs must be a number >= 1, got {num_epochs!r}")
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
        frequency = self.t_config.ckpt_frequency
        offsets = tuple(sorted({int(steps_per_epoch * i / frequency) for i in range(frequency)}))
        plan = TrainingPlan("epochs", int(num_epochs), steps_per_epoch * num_epochs,
                            steps_per_epoch, offsets, self.t_config.ckpt_epoch_frequency)
        return plan, EpochSource(dataloader, batch_postprocessor)

    # The loop --------------------------------------------------------------------------------
    def _fit(self, optimizer, plan: TrainingPlan, source, scheduler_class, scheduler_args,
             scheduler, max_grad_norm, callback, args) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self._check_devices()
        if self.t_config.seed is not None:
            seed_everything(self.t_config.seed + self.runtime.rank)
        optimizer, scheduler = self._prepare(optimizer, scheduler_class, scheduler_args,
                                             scheduler)
        progress = _Progress()
        saved = self._load_resume_state(plan)
        self._before_training(plan, source, saved["distiller"] if saved else None)
        resume_rng = self._apply_resume(saved, optimizer, scheduler, source, progress)
        os.makedirs(self.t_config.output_dir, exist_ok=True)
        if progress.global_step == 0:
            self._reset_schedules()
        else:
            self.update_schedules(progress.global_step / plan.total_steps)
        runtime, accumulation = self.runtime, self.t_config.gradient_accumulation_steps
        micro_total = (len(getattr(source, "loader", ())) * plan.num_epochs
                       if plan.mode == "epochs" and hasattr(getattr(source, "loader", None),
                                                            "__len__")
                       else int(plan.total_steps) * accumulation)
        log = LossLog(self.t_config.log_dir, self.t_config.log_steps, runtime.is_main,
                      micro_total, progress.writer_step)
        modes = (_set_modes(self.model_T, False), _set_modes(self.model_S, True))
        clip_parameters = list(self.model_S.parameters())
        logger.info("Training: %s, %s optimizer steps, checkpoints to %s", plan.mode,
                    plan.total_steps, self.t_config.output_dir)
        try:
            for epoch in range(progress.epoch, plan.num_epochs):
                progress.epoch = epoch
                if progress.micro_in_epoch == 0:
                    optimizer.zero_grad()
                batches = source.epoch(epoch)  # creates the data iterator (draws a shuffle)
                if resume_rng is not None:
                    set_rng_state(resume_rng)  # the source is positioned: now the saved RNG
                    resume_rng = None
                for batch in batches:
                    ends_window = (progress.micro_in_epoch + 1) % accumulation == 0
                    with runtime.no_sync(self._trainable, skip=not ends_window):
                        with runtime.autocast():
                            total, parts = self.train_on_batch(batch, args)
                        if not isinstance(total, torch.Tensor):
                            raise AdaptorError("nothing to optimise: the adaptors returned no "
                                               "logits, losses or matched features")
                        log.record(progress.writer_step, progress.global_step, total, parts)
                        runtime.backward(total / accumulation)
                    progress.writer_step += 1
                    progress.micro_in_epoch += 1
                    if not ends_window:
                        continue
                    runtime.optimizer_step(optimizer, clip_parameters, max_grad_norm)
                    if scheduler is not None:
                        scheduler.step()
                    optimizer.zero_grad()
                    progress.global_step += 1
                    self.update_schedules(progress.global_step / plan.total_steps)
                    if progress.global_step % max(1, int(plan.total_steps) // self.print_freq) == 0:
                        logger.info("Global step: %d/%s, epoch %d", progress.global_step,
                                    plan.total_steps, epoch + 1)
                    if plan.is_checkpoint(progress.global_step, epoch):
                        log.flush()
                        self._save(progress, optimizer, scheduler, plan, source)
                        self.save_and_callback(progress.global_step, progress.micro_in_epoch - 1,
                                               epoch, callback)
                    if progress.global_step >= plan.total_steps:
                        break
                progress.micro_in_epoch = 0
                if progress.global_step >= plan.total_steps:
                    break
        finally:
            if runtime.scaler is not None:
                skipped = int(runtime.skipped_steps)
                log.add_scalar("scalar/fp16_skipped_steps", skipped, progress.writer_step)
                logger.info("fp16: the grad scaler skipped %d of %d optimizer steps", skipped,
                            progress.global_step)
            log.close()
            _restore_modes(self.model_T, modes[0])
            _restore_modes(self.model_S, modes[1])
        logger.info("Training finished after %d optimizer steps", progress.global_step)

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

    def _prepare(self, optimizer, scheduler_class, scheduler_args, scheduler):
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
        self._trainable = self.runtime.wrap_trainable(trainable)
        self._student_forward = self.runtime.maybe_compile(self._trainable)
        self._teacher_forwards = _map_models(self.model_T, self.runtime.maybe_compile)
        return optimizer, scheduler

    # ---------------------------------------------------------------- checkpoints
    def save_and_callback(self, global_step: int, step: int, epoch: int,
                          callback: Optional[Callable]) -> None:
        """Saves ``gs{global_step}.pkl`` (main process), then runs the callback.

        The callback gets the unwrapped student, ``callback(model=student, step=global_step)``,
        and the student is put back in train mode afterwards.
        """
        if self.runtime.is_main:
            path = ckpt.student_checkpoint_path(self.t_config.output_dir, global_step)
            logger.info("Saving %s (epoch %d, epoch step %d)", path, epoch + 1, step + 1)
            ckpt.atomic_save(self.model_S.state_dict(), path)
            if callback is not None:
                logger.info("Running callback at global step %d", global_step)
                # Evaluation must not change training: random numbers the callback draws
                # (a DataLoader iterator draws one) would shift every later draw, and a
                # resumed run, whose state was saved before the callback, would diverge.
                rng_state = get_rng_state()
                try:
                    callback(model=self.model_S, step=global_step)
                finally:
                    set_rng_state(rng_state)
                self.model_S.train()
        self.runtime.barrier()

    def _local_state(self, source) -> Dict[str, Any]:
        return {"rng": get_rng_state(), "source": source.state_dict()}

    def _save(self, progress: _Progress, optimizer, scheduler, plan: TrainingPlan,
              source) -> None:
        local = self._local_state(source)
        if self.runtime.distributed:
            gathered: List[Any] = [None] * self.runtime.world_size
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        if not self.runtime.is_main:
            return
        state = {
            "format": 1,
            "progress": dataclasses.asdict(progress),
            "plan": {"mode": plan.mode, "total_steps": plan.total_steps,
                     "num_epochs": plan.num_epochs},
            "extras": [module.state_dict() for module, _ in self.extra_trainable_modules()],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if hasattr(scheduler, "state_dict") else None,
            "scaler": self.runtime.scaler.state_dict() if self.runtime.scaler else None,
            "per_rank": gathered,
            "distiller": self.extra_state(),
            "train_config": self.t_config.to_dict(),
            "distill_config": self.d_config.to_dict() if self.d_config is not None else None,
        }
        ckpt.atomic_save(state, ckpt.state_path(self.t_config.output_dir, progress.global_step))

    def _load_resume_state(self, plan: TrainingPlan) -> Optional[Dict[str, Any]]:
        """The training state named by ``resume_from``, checked against this run, or None."""
        target = self.t_config.resume_from
        if target is None:
            return None
        if target == "latest":
            path = ckpt.latest_state_path(self.t_config.output_dir)
            if path is None:
                logger.info("resume_from='latest': no training state in %s; starting fresh",
                            self.t_config.output_dir)
                return None
        else:
            path = str(target)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"resume_from={target!r}: no such file")
        state = ckpt.load_state(path)
        for key in ("mode", "num_epochs", "total_steps"):
            saved, current = state["plan"][key], getattr(plan, key)
            if saved != current:
                raise ValueError(f"resume_from={path!r}: the checkpoint was written by a run with "
                                 f"{key}={saved!r}, this run has {key}={current!r}")
        if len(state["per_rank"]) != self.runtime.world_size:
            raise ValueError(f"resume_from={path!r}: saved by {len(state['per_rank'])} processes, "
                             f"this run has {self.runtime.world_size}")
        state["path"] = path
        return state

    def _apply_resume(self, state, optimizer, scheduler, source, progress) -> Optional[dict]:
        """Loads weights, optimizer, scheduler, scaler and data position; returns the RNG
        state to restore once the data source is positioned."""
        if state is None:
            return None
        global_step = state["progress"]["global_step"]
        weights = ckpt.student_checkpoint_path(os.path.dirname(state["path"]), global_step)
        self.model_S.load_state_dict(torch.load(weights, map_location=self.runtime.device,
                                                weights_only=True))
        for (module, _), module_state in zip(self.extra_trainable_modules(), state["extras"]):
            module.load_state_dict(module_state)
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        if self.runtime.scaler is not None and state["scaler"] is not None:
            self.runtime.scaler.load_state_dict(state["scaler"])
        self.load_extra_state(state["distiller"])
        local = state["per_rank"][self.runtime.rank]
        source.load_state_dict(local["source"])
        for key, value in state["progress"].items():
            setattr(progress, key, value)
        logger.info("Resumed from %s at global step %d", state["path"], global_step)
        return local["rng"]


def _map_models(models: Any, function: Callable) -> Any:
    if models is None:
        return None
    if isinstance(models, dict):
        return {k: _map_models(v, function) for k, v in models.items()}
    if isinstance(models, (list, tuple)):
        return [_map_models(v, function) for v in models]
    return function(models)


