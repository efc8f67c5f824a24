"""Adversarial distillation: a discriminator tells the teacher's outputs from the
student's, and the student learns to fool it on top of the usual KD terms.

After Xu, Hsu, Huang, "Training Shallow and Thin Networks for Acceleration via Knowledge
Distillation with Conditional Adversarial Networks" (arXiv:1709.00513) and Wang et al.,
"KDGAN" (NeurIPS 2018): a GAN whose "real" samples are the teacher's outputs and whose
generator is the student.

One training step is two phases over the same micro-batches:

1. ``discriminator``: ``BCE(D(t), 1) + BCE(D(s), 0)`` on the teacher's and the student's
   (detached) outputs; only D is updated.
2. ``student``: the :class:`~textbrewer.GeneralDistiller` loss plus
   ``adversarial_weight · BCE(D(s), 1)`` (the non-saturating generator loss). D is frozen
   in this phase: it is evaluated with detached parameters, so no gradient reaches it.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..adaptors import AdaptorError
from ..configurations import DistillationConfig, TrainingConfig
from ..distillers.engine import Phase
from ..training.phase import check_optimizer_holds
from ..distillers.general import CustomMatch, GeneralDistiller

__all__ = ["AdversarialDistiller", "MLPDiscriminator", "frozen_call"]


def frozen_call(module: nn.Module, *args, **kwargs) -> Any:
    """``module(*args, **kwargs)`` with its parameters detached: gradients flow to the
    inputs but never reach (or accumulate in) the module's parameters, and no DDP wrapper
    is involved. Buffers (batch-norm running statistics) behave as in a normal call."""
    parameters = {name: parameter.detach() for name, parameter in module.named_parameters()}
    return functional_call(module, parameters, args, kwargs)


class MLPDiscriminator(nn.Module):
    """A small MLP scoring each input vector: real (teacher) vs fake (student).

    Args:
        input_dim: D, the width of the discriminated vectors.
        hidden_size: width of the hidden layers.
        num_layers: hidden layers (≥ 1).

    Forward: (N, D) -> (N,) logits of "this came from the teacher".
    """

    def __init__(self, input_dim: int, hidden_size: int = 64, num_layers: int = 1):
        super().__init__()
        if input_dim < 1 or hidden_size < 1 or num_layers < 1:
            raise ValueError(f"MLPDiscriminator needs positive sizes, got input_dim="
                             f"{input_dim}, hidden_size={hidden_size}, num_layers={num_layers}")
        #: D, the width of the rows it scores
        self.input_dim = input_dim
        layers: List[nn.Module] = []
        width = input_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.LeakyReLU(0.2)]
            width = hidden_size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class AdversarialDistiller(GeneralDistiller):
    """GeneralDistiller plus a discriminator phase and an adversarial term for the student.

    Args:
        train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S, custom_matches:
            as for :class:`~textbrewer.GeneralDistiller` (every KD, hard-label and
            intermediate-match term is kept).
        discriminator: ``D: (N, D) -> (N,)`` (or (N, 1)) logits; default an
            :class:`MLPDiscriminator` of ``input_dim`` (required then).
        discriminator_optimizer: the optimizer over D's parameters; default
            ``Adam(D.parameters(), lr=discriminator_lr, betas=(0.5, 0.999))``.
        discriminator_scheduler: an LR scheduler stepped with it, or None.
        adversarial_weight: weight of ``BCE(D(s), 1)`` in the student's loss.
        feature: what D sees: ``'logits'`` (head ``index`` of the adaptors' logits) or
            ``'hidden'`` (layer ``index`` of their ``hidden`` list). The teacher's and the
            student's must have the same last dimension D; any leading dimensions
            (B, or B and L) are flattened into N rows (``logits_mask`` / ``inputs_mask``
            select the rows when the adaptors return them).
        index: which logits head or hidden layer.
        temperature: for ``feature='logits'``, D sees ``softmax(logits / temperature)``
            (probabilities, whose scale does not give the student away); None: raw logits.
        input_dim, hidden_size: the default discriminator's sizes.
        discriminator_lr: the default optimizer's learning rate.
        discriminator_max_grad_norm: clip D's gradients (≤ 0: no clipping).

    Logged terms: ``discriminator/bce`` and ``discriminator/accuracy`` (share of rows D
    classifies right), ``student/unweighted_adversarial_loss`` beside the usual ones.
    """

    def __init__(self, train_config: TrainingConfig, distill_config: DistillationConfig,
                 model_T: Any, model_S: nn.Module, adaptor_T: Callable, adaptor_S: Callable,
                 custom_matches: Optional[Sequence[CustomMatch]] = None, *,
                 discriminator: Optional[nn.Module] = None,
                 discriminator_optimizer: Optional[torch.optim.Optimizer] = None,
                 discriminator_scheduler: Any = None, adversarial_weight: float = 0.1,
                 feature: str = "logits", index: int = -1, temperature: Optional[float] = 1.0,
                 input_dim: Optional[int] = None, hidden_size: int = 64,
                 discriminator_lr: float = 1e-3, discriminator_max_grad_norm: float = -1.0):
        super().__init__(train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S,
                         custom_matches)
        if model_T is not None and not isinstance(model_T, nn.Module):
            raise TypeError(f"AdversarialDistiller needs one teacher nn.Module (or None, with "
                            f"the teacher's outputs in the batches), got "
                            f"{type(model_T).__name__}")
        if feature not in ("logits", "hidden"):
            raise ValueError(f"feature must be 'logits' or 'hidden', got {feature!r}")
        for name, value in (("temperature", temperature),
                            ("adversarial_weight", adversarial_weight),
                            ("discriminator_lr", discriminator_lr)):
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature must be positive or None, got {temperature!r}")
        if adversarial_weight < 0:
            raise ValueError(f"adversarial_weight must be ≥ 0, got {adversarial_weight!r}")
        if discriminator is None:
            if input_dim is None:
                raise ValueError("give a discriminator, or input_dim (the width of the "
                                 f"discriminated {feature}) to build the default MLPDiscriminator")
            discriminator = MLPDiscriminator(input_dim, hidden_size)
        elif not isinstance(discriminator, nn.Module):
            raise TypeError(f"discriminator must be an nn.Module, got "
                            f"{type(discriminator).__name__}")
        discriminator.to(self.runtime.device)
        if discriminator_optimizer is None:
            discriminator_optimizer = torch.optim.Adam(discriminator.parameters(),
                                                       lr=discriminator_lr, betas=(0.5, 0.999))
        else:
            check_optimizer_holds(discriminator_optimizer, "discriminator_optimizer",
                                  discriminator.parameters(), "the discriminator's parameters",
                                  "discriminator.parameters()",
                                  changes="the discriminator's phase",
                                  forbidden=[(model_S.parameters(), "parameters of the student",
                                              "the student has its own optimizer (the one "
                                              "given to train())")])
        #: the discriminator D and its optimizer / scheduler
        self.discriminator = discriminator
        self.discriminator_optimizer = discriminator_optimizer
        self.discriminator_scheduler = discriminator_scheduler
        self.adversarial_weight = float(adversarial_weight)
        self.feature = feature
        self.index = index
        self.temperature = temperature
        self.discriminator_max_grad_norm = discriminator_max_grad_norm

    # ------------------------------------------------------------------------------ phases
    def phases(self, student_phase: Phase) -> List[Phase]:
        """The discriminator's phase, then the student's."""
        return [Phase("discriminator", self.discriminator_optimizer, self.discriminator_loss,
                      [self.discriminator], self.discriminator_scheduler,
                      self.discriminator_max_grad_norm), student_phase]

    def discriminated(self, results: Dict[str, Any], side: str) -> torch.Tensor:
        """The rows D sees from one adaptor's output: (N, D)."""
        key = "logits" if self.feature == "logits" else "hidden"
        values = results.get(key)
        if values is None:
            raise AdaptorError(f"AdversarialDistiller(feature={self.feature!r}) needs {key!r} "
                               f"from the {side}'s adaptor, which returned {sorted(results)}")
        try:
            value = values[self.index]
        except IndexError:
            raise AdaptorError(f"AdversarialDistiller: index={self.index} but the {side}'s "
                               f"adaptor returned {len(values)} {key} entries") from None
        mask_key = "logits_mask" if key == "logits" else "inputs_mask"
        mask = results.get(mask_key)
        if isinstance(mask, list):
            mask = mask[self.index if len(mask) > 1 else 0]
        if value.dim() == 3 and isinstance(mask, torch.Tensor) and mask.shape == value.shape[:2]:
            value = value[mask.to(torch.bool)]
        value = value.reshape(-1, value.size(-1))
        if key == "logits" and self.temperature is not None:
            value = F.softmax(value.float() / self.temperature, dim=-1)
        return value

    def _scores(self, rows: torch.Tensor, frozen: bool) -> torch.Tensor:
        discriminator = self.discriminator
        expected = getattr(discriminator, "input_dim", None)
        if isinstance(expected, int) and rows.shape[-1] != expected:
            raise AdaptorError(f"AdversarialDistiller: the discriminator takes rows of width "
                               f"{expected} (input_dim), but the {self.feature} rows it is "
                               f"given are {tuple(rows.shape)} (index={self.index}); set "
                               f"input_dim={rows.shape[-1]}")
        try:
            scores = (frozen_call(discriminator, rows) if frozen
                      else self.wrapped(discriminator)(rows))
        except RuntimeError as error:
            if isinstance(error, torch.cuda.OutOfMemoryError):
                raise
            raise AdaptorError(f"AdversarialDistiller: the discriminator "
                               f"({type(discriminator).__name__}) failed on the {self.feature} "
                               f"rows of shape {tuple(rows.shape)}: {error}") from error
        return scores.reshape(-1).float()

    def discriminator_loss(self, batch: Any, args: Dict[str, Any]):
        """The discriminator phase: ``BCE(D(t), 1) + BCE(D(s), 0)`` (means over rows), on
        outputs computed without gradients (teacher and student are not trained here)."""
        with torch.no_grad():
            results_S, results_T = self.run_models(batch, args)
            real = self.discriminated(results_T, "teacher").detach()
            fake = self.discriminated(results_S, "student").detach()
        if real.shape[-1] != fake.shape[-1]:
            raise AdaptorError(f"AdversarialDistiller: the teacher's {self.feature} rows "
                               f"{tuple(real.shape)} and the student's {tuple(fake.shape)} "
                               f"differ in width; D needs the same last dimension")
        score_real, score_fake = self._scores(real, False), self._scores(fake, False)
        loss = (F.binary_cross_entropy_with_logits(score_real, torch.ones_like(score_real))
                + F.binary_cross_entropy_with_logits(score_fake, torch.zeros_like(score_fake)))
        with torch.no_grad():
            accuracy = torch.cat([(score_real > 0), (score_fake <= 0)]).float().mean()
        return loss, {"bce": loss, "accuracy": accuracy}

    def compute_loss(self, results_S: Dict[str, Any], results_T: Dict[str, Any]):
        """GeneralDistiller's terms plus ``adversarial_weight · BCE(D(s), 1)`` (D frozen)."""
        total, parts = super().compute_loss(results_S, results_T)
        if self.adversarial_weight == 0:
            return total, parts
        score = self._scores(self.discriminated(results_S, "student"), True)
        adversarial = F.binary_cross_entropy_with_logits(score, torch.ones_like(score))
        parts["unweighted_adversarial_loss"] = adversarial
        return total + self.adversarial_weight * adversarial, parts
