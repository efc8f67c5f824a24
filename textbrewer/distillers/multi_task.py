"""MultiTaskDistiller: several single-task teachers into one multi-task student."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from torch import nn

from ..configurations import DistillationConfig, TrainingConfig
from .engine import TrainingPlan
from .general import GeneralDistiller
from ..training.sources import EmptyDataError, TaskSource

__all__ = ["MultiTaskDistiller"]


def _check_same_tasks(**named: Dict[str, Any]) -> None:
    names = list(named)
    reference = set(named[names[0]])
    for name in names[1:]:
        keys = set(named[name])
        if keys != reference:
            raise ValueError(f"task names differ: {names[0]} has {sorted(reference)}, {name} has "
                             f"{sorted(keys)}")


class MultiTaskDistiller(GeneralDistiller):
    """Distils one teacher per task into a single student, sampling a task per micro-batch.

    Each micro-batch comes from task ``d`` with probability ∝ ``len(dataloader_d) ** tau``
    (uniform if a dataloader has no length); each dataloader cycles. Intermediate matches
    apply to every task.

    Args:
        train_config, distill_config, model_S: as for GeneralDistiller.
        model_T: dict task name -> teacher model.
        adaptor_T: dict task name -> teacher adaptor.
        adaptor_S: dict task name -> student adaptor.
    """

    def __init__(self, train_config: TrainingConfig, distill_config: DistillationConfig,
                 model_T: Dict[str, nn.Module], model_S: nn.Module,
                 adaptor_T: Dict[str, Callable], adaptor_S: Dict[str, Callable]):
        for name, value in (("model_T", model_T), ("adaptor_T", adaptor_T),
                            ("adaptor_S", adaptor_S)):
            if not isinstance(value, dict) or not value:
                raise TypeError(f"MultiTaskDistiller needs {name} as a non-empty dict keyed by "
                                f"task name, got {type(value).__name__}")
        _check_same_tasks(model_T=model_T, adaptor_T=adaptor_T, adaptor_S=adaptor_S)
        super().__init__(train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S)

    def train(self, optimizer, dataloaders: Dict[str, Any], num_steps: int,
              scheduler_class: Optional[Callable] = None,
              scheduler_args: Optional[Dict[str, Any]] = None, scheduler: Any = None,
              max_grad_norm: float = -1.0, tau: float = 1, callback: Optional[Callable] = None,
              batch_postprocessors: Optional[Dict[str, Callable]] = None, **args) -> None:
        """Trains the student for ``num_steps`` optimizer steps.

        Args:
            optimizer: optimizer over the student's parameters.
            dataloaders: dict task name -> dataloader (the same keys as ``model_T``).
            num_steps: optimizer steps.
            scheduler_class, scheduler_args, scheduler, max_grad_norm, callback: as in
                :meth:`~textbrewer.distillers.compat.TextBrewerFacade.train`.
            tau: sampling temperature over dataset sizes.
            batch_postprocessors: dict task name -> ``batch -> batch``.
            **args: extra keyword arguments for every model call.
        """
        if not isinstance(dataloaders, dict) or not dataloaders:
            raise TypeError("dataloaders must be a non-empty dict task name -> dataloader")
        _check_same_tasks(model_T=self.model_T, dataloaders=dataloaders)
        if batch_postprocessors is not None:
            unknown = sorted(set(batch_postprocessors) - set(dataloaders))
            if unknown:
                raise ValueError(f"batch_postprocessors has unknown tasks {unknown}; tasks: "
                                 f"{sorted(dataloaders)}")
        for name, loader in dataloaders.items():
            if hasattr(loader, "__len__") and len(loader) == 0:
                raise EmptyDataError(f"dataloader {name!r} is empty")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        plan = TrainingPlan("steps", 1, num_steps, None, ckpt_steps=self.t_config.ckpt_steps)
        source = TaskSource(dataloaders, tau, batch_postprocessors)
        optimizer, scheduler, _ = self.initialize_training(optimizer, scheduler_class,
                                                           scheduler_args, scheduler)
        self.fit(optimizer, plan, source, scheduler, max_grad_norm, callback, args)

    def train_on_batch(self, batch: Any, args: Dict[str, Any]):
        batch, task = batch
        self._task = task
        return super().train_on_batch(batch, args)

    def teacher_outputs(self, teacher_batch: Any, args: Dict[str, Any]) -> Any:
        return self.forward_teacher(self._teacher_forwards[self._task], teacher_batch, args)

    def adapt_teacher(self, teacher_batch: Any, outputs: Any) -> Dict[str, Any]:
        return self.adapt(self.adaptor_T[self._task], teacher_batch, outputs,
                          f"the teacher's adaptor for task {self._task!r}")

    def run_models(self, batch: Any, args: Dict[str, Any]):
        adaptor_S = self.adaptor_S
        self.adaptor_S = adaptor_S[self._task]
        try:
            return super().run_models(batch, args)
        finally:
            self.adaptor_S = adaptor_S
