"""BasicDistiller: KD on logits plus the student's own (hard-label) losses."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..configurations import DistillationConfig, TrainingConfig
from ..logs import logger
from .composer import LossComposer
from .engine import AbstractDistiller, TrainingPlan, split_batch
from .legacy import LegacyDistillationView
from ..training.sources import CachedSource, get_rng_state, set_rng_state

__all__ = ["BasicDistiller"]


class BasicDistiller(AbstractDistiller):
    """Single-teacher, single-task distillation on logits (and hard labels).

    Loss: ``kd_loss_weight · Σ_heads KD(S, T) + hard_label_weight · Σ mean(losses_S)``.

    Args:
        train_config: :class:`~textbrewer.TrainingConfig`.
        distill_config: :class:`~textbrewer.DistillationConfig` (intermediate matches are
            ignored here; use :class:`~textbrewer.GeneralDistiller` for them).
        model_T: the teacher (frozen: eval mode, no gradients).
        model_S: the student.
        adaptor_T: ``adaptor_T(batch, teacher_outputs) -> dict`` with at least ``logits``.
        adaptor_S: ``adaptor_S(batch, student_outputs) -> dict`` with at least ``logits``.

    Example:
        >>> with distiller:
        ...     distiller.train(optimizer, dataloader, num_epochs=3)
    """

    #: whether ``is_caching_logits`` is honoured by this class
    supports_logits_caching = True
    uses_intermediate_matches = False

    def __init__(self, train_config: TrainingConfig, distill_config: DistillationConfig,
                 model_T: Any, model_S: nn.Module, adaptor_T: Any, adaptor_S: Callable):
        if not isinstance(distill_config, DistillationConfig):
            raise TypeError(f"distill_config must be a DistillationConfig, got "
                            f"{type(distill_config).__name__}")
        super().__init__(train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S)
        if distill_config.intermediate_matches and not self.uses_intermediate_matches:
            logger.warning("%s ignores intermediate_matches (as TextBrewer 0.2.1 did); use "
                           "GeneralDistiller to train them", type(self).__name__)
        if distill_config.is_caching_logits and not self.supports_logits_caching:
            logger.warning("%s does not cache logits (is_caching_logits ignored, as in "
                           "TextBrewer 0.2.1)", type(self).__name__)
        self.composer = LossComposer(distill_config, use_matches=self.uses_intermediate_matches,
                                     require_logits=not self.uses_intermediate_matches)
        self.composer.to(self.runtime.device)
        #: TextBrewer 0.2.1's view of the configuration (resolved schedules, current weights)
        self.d_config = LegacyDistillationView(distill_config, self.composer)
        #: the KD loss function (0.2.1's attribute)
        self.kd_loss = self.composer.kd_loss
        #: one projection (or None) per intermediate match, and its param-group options
        #: (0.2.1's attributes; a subclass may replace them, see extra_trainable_modules)
        self.projs = self.composer.projections_per_match()
        self.projs_group = [None if projection is None else dict(options) for projection, options
                            in zip(self.projs, self.composer.groups_per_match())]
        self.logits_cache: List[Any] = []
        self._cache_rng: Optional[Dict[str, Any]] = None

    def extra_trainable_modules(self) -> List[Tuple[nn.Module, Dict[str, Any]]]:
        """Projections (``self.projs``), then the losses with weights of their own."""
        modules = super().extra_trainable_modules()
        return modules + [(module, {}) for module in self.composer.loss_modules.values()]

    def observed_values(self) -> Dict[str, Any]:
        """The current KD / hard-label weights and the last temperature (a scheduled one
        is averaged over the examples)."""
        values = {"kd_loss_weight": self.composer.kd_loss_weight,
                  "hard_label_weight": self.composer.hard_label_weight}
        if self.composer.last_temperature is not None:
            values["temperature"] = self.composer.last_temperature
        return values

    @property
    def caching_logits(self) -> bool:
        """Whether the teacher's logits are cached (read when training starts, as 0.2.1 did)."""
        return bool(self.d_config.is_caching_logits) and self.supports_logits_caching

    # schedules -------------------------------------------------------------------------------
    def update_schedules(self, progress: float) -> None:
        self.composer.update_weights(progress)

    def reset_schedules(self) -> None:
        self.composer.reset_weights()

    # models ------------------------------------------------------------------------------------
    def teacher_outputs(self, teacher_batch: Any, args: Dict[str, Any]) -> Any:
        """The teacher's raw outputs on a device-resident batch (no gradients)."""
        return self.forward_teacher(self._teacher_forwards, teacher_batch, args)

    def adapt_teacher(self, teacher_batch: Any, outputs: Any) -> Dict[str, Any]:
        """The teacher adaptor's normalised output."""
        return self.adapt(self.adaptor_T, teacher_batch, outputs, "the teacher's adaptor")

    def run_models(self, batch: Any, args: Dict[str, Any]):
        """Moves the batch, runs teacher and student, applies both adaptors.

        Returns:
            ``(results_S, results_T)``, the adaptors' normalised dicts.
        """
        teacher_batch, student_batch, cache = split_batch(batch)
        same = teacher_batch is student_batch
        teacher_batch = self.runtime.to_device(teacher_batch)
        student_batch = teacher_batch if same else self.runtime.to_device(student_batch)
        if cache is not None:
            outputs_T = self.runtime.to_device(cache)
        elif self.model_T is None:
            raise ValueError(f"{type(self).__name__}: model_T is None and the batch carries no "
                             f"'teacher_cache' (the teacher's outputs): give a teacher, or "
                             f"batches from textbrewer.teachers.TeacherOutputsCollator")
        else:
            outputs_T = self.teacher_outputs(teacher_batch, args)
        outputs_S = self.forward_student(student_batch, args)
        results_T = self.adapt_teacher(teacher_batch, outputs_T)
        results_S = self.adapt(self.adaptor_S, student_batch, outputs_S, "the student's adaptor")
        return results_S, results_T

    def train_on_batch(self, batch: Any, args: Dict[str, Any]):
        if self.caching_logits:
            cached_batch, cached_logits = batch
            _, student_batch, _ = split_batch(cached_batch)
            outputs_S = self.forward_student(student_batch, args)
            results_S = self.adapt(self.adaptor_S, student_batch, outputs_S,
                                   "the student's adaptor")
            results_T = {"logits": [logits.to(self.runtime.device) for logits in cached_logits]}
            if "logits_mask" in results_S:
                results_T["logits_mask"] = results_S["logits_mask"]
        else:
            results_S, results_T = self.run_models(batch, args)
        return self.compute_loss(results_S, results_T)

    def compute_loss(self, results_S: Dict[str, Any], results_T: Dict[str, Any]):
        """The total loss and its unweighted parts from the two adaptors' outputs
        (TextBrewer 0.2.1's method; override it to add a term)."""
        return self.composer.compose(results_S, results_T, projections=self.projs)

    # logits caching -------------------------------------------------------------------------
    def plan_training(self, dataloader, num_epochs, num_steps, batch_postprocessor):
        plan, source = super().plan_training(dataloader, num_epochs, num_steps, batch_postprocessor)
        if self.caching_logits:
            if plan.mode == "steps":
                raise ValueError("is_caching_logits=True works only with num_epochs (the cache "
                                 "is one pass over the data); got num_steps")
            self._cache_loader = (dataloader, batch_postprocessor)
            source = CachedSource([])
        return plan, source

    def cached_teacher_logits(self, teacher_batch: Any, args: Dict[str, Any]) -> List[torch.Tensor]:
        """The teacher's logits heads for one batch, as stored in the cache."""
        results_T = self.adapt_teacher(teacher_batch, self.teacher_outputs(teacher_batch, args))
        return [logits for logits in results_T["logits"]]

    def before_training(self, plan: TrainingPlan, source, saved_extra) -> None:
        if not self.caching_logits:
            return
        if saved_extra and saved_extra.get("cache_rng") is not None:
            set_rng_state(saved_extra["cache_rng"])  # rebuild the very same cache
        self._cache_rng = get_rng_state()
        dataloader, postprocessor = self._cache_loader
        logger.info("Caching batches and the teacher's logits...")
        self.logits_cache = []
        with self.runtime.autocast():
            for batch in dataloader:
                if postprocessor is not None:
                    batch = postprocessor(batch)
                batch = self.runtime.to_device(batch)
                teacher_batch, _, _ = split_batch(batch)
                logits = self.cached_teacher_logits(teacher_batch, {})
                self.logits_cache.append([batch, [head.to("cpu") for head in logits]])
        source.entries = list(enumerate(self.logits_cache))

    def extra_state(self) -> Dict[str, Any]:
        return {"cache_rng": self._cache_rng} if self.caching_logits else {}
