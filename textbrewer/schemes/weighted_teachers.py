"""Several teachers, weighted: fixed per-teacher weights or per-sample confidence.

:class:`~textbrewer.MultiTeacherDistiller` distils into the plain average of the teachers'
logits. :class:`WeightedMultiTeacherDistiller` replaces that average by a weighted one::

    target[n] = Σ_k w[n, k] · z_k[n]        with Σ_k w[n, k] = 1

for every row ``n`` (a sample, or a position of token-level logits), where ``z_k`` are
teacher ``k``'s raw logits and the weights are

* ``'fixed'``: ``w[n, k] = weights[k] / Σ_j weights[j]`` (the same for every sample);
* ``'entropy'``: ``w[n, k] ∝ weights[k] · exp(−H(softmax(z_k[n])) / tau)``: a teacher
  sure of itself (low entropy) counts more on that sample;
* ``'gold'``: ``w[n, k] ∝ weights[k] · softmax(z_k[n])[y_n] ** (1 / tau)``: the probability
  the teacher gives the gold class (needs ``labels``); rows with the label ``-100`` fall
  back to the fixed weights.

The rest of the loss (KD loss, temperature, hard labels, schedules) is
:class:`~textbrewer.MultiTeacherDistiller`'s, whose own behaviour is unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..adaptors import AdaptorError
from ..configurations import DistillationConfig, TrainingConfig
from ..distillers.multi_teacher import MultiTeacherDistiller

__all__ = ["WeightedMultiTeacherDistiller", "teacher_weights", "weighted_teacher_logits",
           "WEIGHTINGS"]

#: the weighting schemes :func:`teacher_weights` knows
WEIGHTINGS = ("fixed", "entropy", "gold")


def teacher_weights(logits: Sequence[torch.Tensor], weighting: str = "fixed",
                    weights: Optional[Sequence[float]] = None, tau: float = 1.0,
                    labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row weights of K teachers, summing to one over the teachers.

    Args:
        logits: K tensors of the same shape ``(..., C)``: each teacher's raw logits.
        weighting: ``'fixed'``, ``'entropy'`` or ``'gold'`` (see the module docstring).
        weights: K non-negative prior weights (default all ones); for ``'fixed'`` the
            weights themselves, for the others a prior multiplied in.
        tau: the temperature of the confidence: > 0; smaller is sharper.
        labels: ``(...)`` gold classes (``-100`` = none), for ``'gold'``.

    Returns:
        ``(..., K)`` weights (float32 or the logits' dtype), each row summing to 1.

    Raises:
        ValueError: an unknown weighting, a wrong number of weights, negative or all-zero
            weights, ``tau ≤ 0``, or ``'gold'`` without labels.
    """
    count = len(logits)
    if count == 0:
        raise ValueError("teacher_weights needs the logits of at least one teacher")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
    if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a positive number, got {tau!r}")
    prior = _prior(weights, count)
    stacked = torch.stack([z.float() for z in logits], dim=-1)  # (..., C, K)
    prior_t = torch.tensor(prior, dtype=stacked.dtype, device=stacked.device)
    if weighting == "fixed":
        return (prior_t / prior_t.sum()).expand(stacked.shape[:-2] + (count,)).clone()
    log_probs = F.log_softmax(stacked, dim=-2)  # over classes
    if weighting == "entropy":
        entropy = -(log_probs.exp() * log_probs).sum(dim=-2)  # (..., K)
        score = -entropy / tau
    else:
        if labels is None:
            raise ValueError("weighting='gold' needs the gold labels: return 'labels' from "
                             "the teachers' (or the student's) adaptor")
        labels = labels.to(stacked.device)
        if tuple(labels.shape) != tuple(stacked.shape[:-2]):
            raise ValueError(f"weighting='gold': labels of shape {tuple(labels.shape)} for "
                             f"logits of shape {tuple(logits[0].shape)}; expected "
                             f"{tuple(stacked.shape[:-2])}")
        valid = labels != -100
        index = torch.where(valid, labels, torch.zeros_like(labels)).long()
        gold = log_probs.gather(-2, index[..., None, None].expand(
            index.shape + (1, count))).squeeze(-2)  # (..., K): log p_k(y)
        score = torch.where(valid[..., None], gold / tau, torch.zeros_like(gold))
    # log-prior + score, normalised over the teachers (a zero prior gives weight 0)
    score = score + torch.log(prior_t)
    return torch.softmax(score, dim=-1)


def _prior(weights: Optional[Sequence[float]], count: int) -> List[float]:
    if weights is None:
        return [1.0] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ValueError(f"weights: {len(values)} teacher weights for {count} teachers "
                         f"(one per teacher, in model_T's order)")
    if any(not math.isfinite(w) or w < 0 for w in values) or not any(values):
        raise ValueError(f"teacher weights must be finite, ≥ 0 and not all 0, got {values}")
    # scaled so that equal weights become exactly 1.0 (then the weighted target is the
    # plain average bit for bit)
    top = max(values)
    return [w / top for w in values]


def weighted_teacher_logits(logits: Sequence[torch.Tensor], weighting: str = "fixed",
                            weights: Optional[Sequence[float]] = None, tau: float = 1.0,
                            labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weighted KD target ``Σ_k w[..., k] · z_k`` of K teachers' logits.

    Args:
        logits, weighting, weights, tau, labels: as :func:`teacher_weights`.

    Returns:
        a tensor of the logits' shape ``(..., C)`` and dtype. With ``'fixed'`` and equal
        weights it is ``sum(logits) / K`` exactly (MultiTeacherDistiller's target).
    """
    if weighting == "fixed":
        prior = _prior(weights, len(logits))
        if len(set(prior)) == 1:
            return sum(logits) / len(logits)
        total = sum(prior)
        return sum(z * (w / total) for z, w in zip(logits, prior))
    w = teacher_weights(logits, weighting, weights, tau, labels).to(logits[0].dtype)
    return sum(z * w[..., k, None] for k, z in enumerate(logits))


class WeightedMultiTeacherDistiller(MultiTeacherDistiller):
    """MultiTeacherDistiller with a weighted KD target (fixed or per-sample confidence).

    The target of each logits head is :func:`weighted_teacher_logits` of the teachers'
    logits; everything else is :class:`~textbrewer.MultiTeacherDistiller`'s. With
    ``weighting='fixed'`` and equal (or no) weights it *is* MultiTeacherDistiller, bit for
    bit.

    Args:
        train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S: as for
            :class:`~textbrewer.MultiTeacherDistiller` (``model_T`` a list of K teachers).
        weighting: ``'fixed'``, ``'entropy'`` or ``'gold'``.
        weights: K prior weights (default all equal).
        tau: confidence temperature (``'entropy'``, ``'gold'``).

    For ``'gold'`` the labels are the first teacher adaptor's ``labels``, one tensor per
    logits head or one for all heads, shaped like the logits without their class
    dimension: the weights are computed per row before any ``logits_mask`` selection.

    The last batch's mean weight of each teacher is kept in ``self.last_mean_weights``
    (a ``(K,)`` tensor, first head) for inspection.
    """

    def __init__(self, train_config: TrainingConfig, distill_config: DistillationConfig,
                 model_T: Sequence[nn.Module], model_S: nn.Module,
                 adaptor_T: Union[Callable, Sequence[Callable]], adaptor_S: Callable,
                 weighting: str = "fixed", weights: Optional[Sequence[float]] = None,
                 tau: float = 1.0):
        super().__init__(train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        if not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f"tau must be a positive number, got {tau!r}")
        _prior(weights, len(self.model_T))  # validates
        self.weighting = weighting
        self.weights = None if weights is None else [float(w) for w in weights]
        self.tau = float(tau)
        self.last_mean_weights: Optional[torch.Tensor] = None

    def adapt_teacher(self, teacher_batch: Any, outputs: List[Any]) -> Dict[str, Any]:
        """Each teacher's adaptor output, then the per-head weighted target."""
        results, per_head = self.adapted_teachers(teacher_batch, outputs)
        targets = []
        for head, logits in enumerate(per_head):
            labels = self._labels(results[0], head) if self.weighting == "gold" else None
            targets.append(weighted_teacher_logits(logits, self.weighting, self.weights,
                                                   self.tau, labels))
            if head == 0:
                with torch.no_grad():
                    w = teacher_weights(logits, self.weighting, self.weights, self.tau, labels)
                    self.last_mean_weights = w.reshape(-1, len(logits)).mean(0)
        combined = dict(results[0])
        combined["logits"] = targets
        return combined

    @staticmethod
    def _labels(result: Dict[str, Any], head: int) -> torch.Tensor:
        labels = result.get("labels")
        if not labels:
            raise AdaptorError("weighting='gold' needs 'labels' from the teachers' adaptor "
                               "(the gold class of each row)")
        return labels[head if len(labels) > 1 else 0]
