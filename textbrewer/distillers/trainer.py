"""BasicTrainer: plain supervised training (of a teacher, say) on the same loop."""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch
from torch import nn

from ..adaptors import AdaptorError
from ..configurations import TrainingConfig
from .composer import hard_label_sum
from .engine import AbstractDistiller

__all__ = ["BasicTrainer"]


class BasicTrainer(AbstractDistiller):
    """Trains ``model`` on the sum of the averaged ``losses`` its adaptor returns.

    Args:
        train_config: :class:`~textbrewer.TrainingConfig`.
        model: the model to train.
        adaptor: ``adaptor(batch, model_outputs) -> dict`` with a ``losses`` entry.

    Example:
        >>> trainer = BasicTrainer(train_config, model, adaptor)
        >>> with trainer:
        ...     trainer.train(optimizer, dataloader, num_epochs=2)
    """

    def __init__(self, train_config: TrainingConfig, model: nn.Module, adaptor: Callable):
        super().__init__(train_config, None, None, model, None, adaptor)
        self.model = model
        self.adaptor = adaptor

    def train_on_batch(self, batch: Any, args: Dict[str, Any]) -> torch.Tensor:
        """The sum of the averaged ``losses`` for one micro-batch (a tensor, as in 0.2.1)."""
        batch = self.runtime.to_device(batch)
        results = self.adapt(self.adaptor, batch, self.forward_student(batch, args),
                             "the adaptor")
        if not results.get("losses"):
            raise AdaptorError(f"the adaptor returned no 'losses' (keys: {sorted(results)}); "
                               f"BasicTrainer has nothing to optimise")
        return hard_label_sum(results["losses"])
