"""TextBrewer 0.2.1's face of every distiller, in one place.

:class:`TextBrewerFacade` holds the methods and names a 0.2.1 script or subclass calls:
``train()`` and its two halves (``initialize_training``, then ``train_with_num_steps`` or
``train_with_num_epochs``), ``save_and_callback``, ``write_loss``, ``tb_writer``, the
``with distiller:`` context, ``no_op``, and the route by which 0.2.1's
``get_outputs_from_batch`` finds the running student's DDP / compile wrapper.
:class:`~textbrewer.distillers.engine.AbstractDistiller` is the rest: the protocol the loop
(:mod:`textbrewer.training.loop`) runs.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, Optional

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..logs import logger
from ..training.batches import all_modules, map_models, restore_modes, set_modes
from ..training.loop import Session
from ..training.phase import check_optimizer_holds
from ..training.plan import check_train_arguments
from ..training.runtime import full_state_dict, is_fsdp_sharded
from ..training.sources import get_rng_state, set_rng_state
from ..training.state import on_main_then_together

__all__ = ["TextBrewerFacade", "no_op", "ACTIVE_STUDENT_FORWARDS"]

Parts = Dict[str, torch.Tensor]


class no_op:
    """Stands in for TensorBoard's writer when logging is off (TextBrewer 0.2.1's name)."""

    @staticmethod
    def add_scalar(*args, **kwargs) -> None:
        pass


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


class TextBrewerFacade:
    """The TextBrewer 0.2.1 methods of :class:`~textbrewer.distillers.engine.AbstractDistiller`
    (a mixin: it reads the distiller's ``t_config``, ``runtime``, models and hooks)."""

    @property
    def tb_writer(self) -> Any:
        """TensorBoard's ``SummaryWriter`` of the running training (``no_op`` when off or
        outside ``train()``), for subclasses that log their own scalars; a subclass may
        assign its own writer, as in 0.2.1."""
        if self._tb_writer_override is not None:
            return self._tb_writer_override
        writer = self._session.log.writer if self._session is not None else None
        return writer if writer is not None else no_op

    @tb_writer.setter
    def tb_writer(self, writer: Any) -> None:
        self._tb_writer_override = writer

    def write_loss(self, total_loss: torch.Tensor, writer_step: int,
                   losses_dict: Optional[Parts] = None) -> None:
        """Writes a micro-batch's losses to TensorBoard (``scalar/total_loss`` and
        ``scalar/{name}``); the loop has already checked them and counted them in the
        progress bar. Values stay on the device and are copied every ``log_steps``
        micro-batches. An override that does not call this logs them its own way.
        """
        if self._session is None:
            raise RuntimeError("write_loss is called by the training loop, inside train()")
        session = self._session
        session.log.observe(writer_step, session.progress.global_step,
                            {**(losses_dict or {}), "total_loss": total_loss})

    # ---------------------------------------------------------------- context
    def __enter__(self):
        self._modes = (set_modes(self.model_T, False), set_modes(self.model_S, True))
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.end_training()  # idempotent: also when initialize_training failed half-way
        if self._modes is not None:
            restore_modes(self.model_T, self._modes[0])
            restore_modes(self.model_S, self._modes[1])
            self._modes = None

    def record_loss(self, session: Session, writer_step: int, total: torch.Tensor,
                    parts: Parts) -> None:
        if type(self).write_loss is TextBrewerFacade.write_loss:
            session.log.record(writer_step, session.progress.global_step, total, parts)
            return
        # an override gets the values the 0.2.1 way; the check and the progress bar are
        # the loop's whether or not it calls the base method (which then writes them)
        session.log.record(writer_step, session.progress.global_step, total, parts, write=False)
        self.write_loss(total, writer_step, parts)

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
        check_train_arguments(callback, max_grad_norm, batch_postprocessor)
        self.plan_training(dataloader, num_epochs, num_steps, batch_postprocessor)  # checks only
        try:
            optimizer, scheduler, tqdm_disable = self.initialize_training(
                optimizer, scheduler_class, scheduler_args, scheduler)
            if num_steps is not None:
                self.train_with_num_steps(optimizer, scheduler, tqdm_disable, dataloader,
                                          max_grad_norm, num_steps, callback,
                                          batch_postprocessor, **args)
            else:
                self.train_with_num_epochs(optimizer, scheduler, tqdm_disable, dataloader,
                                           max_grad_norm, num_epochs, callback,
                                           batch_postprocessor, **args)
        finally:
            self.end_training()

    def train_with_num_steps(self, optimizer, scheduler, tqdm_disable, dataloader,
                             max_grad_norm, num_steps, callback, batch_postprocessor, **args):
        """Step mode (TextBrewer 0.2.1's signature), after :meth:`initialize_training`."""
        plan, source = self.plan_training(dataloader, None, num_steps, batch_postprocessor)
        self.fit(optimizer, plan, source, scheduler, max_grad_norm, callback, args)

    def train_with_num_epochs(self, optimizer, scheduler, tqdm_disable, dataloader,
                              max_grad_norm, num_epochs, callback, batch_postprocessor, **args):
        """Epoch mode (TextBrewer 0.2.1's signature), after :meth:`initialize_training`."""
        plan, source = self.plan_training(dataloader, num_epochs, None, batch_postprocessor)
        if self.t_config.ckpt_steps is not None:
            logger.warning("TrainingConfig.ckpt_steps=%s is ignored in epoch mode "
                           "(train(num_epochs=...)); checkpoints follow ckpt_frequency and "
                           "ckpt_epoch_frequency. Use train(num_steps=...) for ckpt_steps",
                           self.t_config.ckpt_steps)
        self.fit(optimizer, plan, source, scheduler, max_grad_norm, callback, args)

    def initialize_training(self, optimizer: torch.optim.Optimizer,
                            scheduler_class: Optional[Callable],
                            scheduler_args: Optional[Dict[str, Any]], scheduler: Any):
        """Checks the optimizer and devices, adds the extra modules' param groups, builds
        the LR scheduler, wraps the student for DDP / compile.

        Returns:
            ``(optimizer, scheduler, tqdm_disable)``, as TextBrewer 0.2.1.
        """
        self.runtime.ensure_process_group()  # again after a previous train() destroyed it
        check_optimizer_holds(
            optimizer, "the optimizer", self.model_S.parameters(), "the student's parameters",
            "model_S.parameters()", forbidden=[(
                [p for module in all_modules(self.model_T) for p in module.parameters()],
                "of the teacher's parameters", "the teacher is frozen. Build the optimizer from "
                "model_S.parameters()")])
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
            try:
                scheduler = scheduler_class(optimizer=optimizer, **(scheduler_args or {}))
            except TypeError as error:
                name = getattr(scheduler_class, "__name__", type(scheduler_class).__name__)
                raise TypeError(f"scheduler_class {name} could not be built as {name}(optimizer="
                                f"optimizer, **scheduler_args) with scheduler_args="
                                f"{scheduler_args!r}: {error}") from error
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
        self._teacher_forwards = map_models(self.model_T, self.runtime.maybe_compile)
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

        on_main_then_together(self.runtime, write, f"writing gs{global_step}.pkl")
        if callback is not None:
            logger.info("Running callback at global step %d", global_step)
            rng_state = get_rng_state() if self.t_config.isolate_callback_rng else None
            try:
                callback(model=self.model_S, step=global_step)
            finally:
                if rng_state is not None:
                    set_rng_state(rng_state)
            self.model_S.train()
