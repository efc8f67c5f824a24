"""MultiTeacherDistiller: KD against the average of several teachers' logits."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

from ..configurations import DistillationConfig, TrainingConfig
from .basic import BasicDistiller

__all__ = ["MultiTeacherDistiller"]


class MultiTeacherDistiller(BasicDistiller):
    """Distils several teachers of the same task into one student.

    The KD target of each logits head is the arithmetic mean of the teachers' raw logits
    for that head (``logits_mask`` taken from the first teacher's adaptor). Intermediate
    matches are not used (as in TextBrewer 0.2.1).

    Args:
        train_config, distill_config, model_S, adaptor_S: as for BasicDistiller.
        model_T: list of teacher models.
        adaptor_T: one adaptor for all teachers, or a list with one per teacher.
    """

    def __init__(self, train_config: TrainingConfig, distill_config: DistillationConfig,
                 model_T: Sequence[nn.Module], model_S: nn.Module,
                 adaptor_T: Union[Callable, Sequence[Callable]], adaptor_S: Callable):
        if not isinstance(model_T, (list, tuple)) or not model_T:
            raise TypeError(f"MultiTeacherDistiller needs model_T as a non-empty list of teachers, "
                            f"got {type(model_T).__name__}")
        if isinstance(adaptor_T, (list, tuple)) and len(adaptor_T) != len(model_T):
            raise ValueError(f"adaptor_T has {len(adaptor_T)} adaptors for {len(model_T)} teachers")
        super().__init__(train_config, distill_config, list(model_T), model_S, adaptor_T,
                         adaptor_S)

    def _teacher_adaptors(self) -> List[Callable]:
        if isinstance(self.adaptor_T, (list, tuple)):
            return list(self.adaptor_T)
        return [self.adaptor_T] * len(self.model_T)

    def teacher_outputs(self, teacher_batch: Any, args: Dict[str, Any]) -> List[Any]:
        return [self.forward_teacher(model, teacher_batch, args)
                for model in self._teacher_forwards]

    def adapted_teachers(self, teacher_batch: Any, outputs: List[Any]
                         ) -> Tuple[List[Dict[str, Any]], List[List[torch.Tensor]]]:
        """Each teacher's normalised adaptor output, and per logits head the teachers'
        logits (checked: same number of heads, same shapes).

        Returns:
            ``(results, heads)``: one dict per teacher, and for each head a list with one
            tensor per teacher.
        """
        if not isinstance(outputs, (list, tuple)) or len(outputs) != len(self.model_T):
            raise ValueError(f"expected a list of {len(self.model_T)} teacher outputs "
                             f"(teacher_cache included), got {type(outputs).__name__}")
        results = [self.adapt(adaptor, teacher_batch, output, f"teacher {index}'s adaptor")
                   for index, (adaptor, output)
                   in enumerate(zip(self._teacher_adaptors(), outputs))]
        heads = {len(result.get("logits", [])) for result in results}
        if len(heads) != 1:
            raise ValueError(f"the teachers' adaptors returned different numbers of logits "
                             f"heads: {[len(r.get('logits', [])) for r in results]}")
        per_head = [list(logits) for logits in zip(*(result["logits"] for result in results))]
        for head, logits in enumerate(per_head):
            shapes = [tuple(value.shape) for value in logits]
            if len(set(shapes)) != 1:
                raise ValueError(f"logits head {head}: the teachers' logits have different "
                                 f"shapes {shapes}; they are combined, so every teacher must "
                                 f"predict the same classes")
        return results, per_head

    def adapt_teacher(self, teacher_batch: Any, outputs: List[Any]) -> Dict[str, Any]:
        """Each teacher's adaptor output, then the per-head mean of their logits."""
        results, per_head = self.adapted_teachers(teacher_batch, outputs)
        averaged = dict(results[0])
        averaged["logits"] = [sum(logits) / len(logits) for logits in per_head]
        return averaged
