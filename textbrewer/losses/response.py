"""Response-based losses: the student's logits against the teacher's.

Temperature convention (stated once, here): ``kd_ce_loss`` is TextBrewer's ``ce`` and has
**no** τ² factor; ``kd_kl_loss`` (``'kl'``) is Hinton et al.'s form, τ²·KL(p_T ‖ p_S),
whose gradient scale does not shrink as τ grows.

A temperature may be a float or a per-example tensor of shape (N,) (or the logits' shape
without the class dimension); it is broadcast over the class dimension.
"""
from typing import Union

import torch
import torch.nn.functional as F

from ..registry import KD_LOSSES

__all__ = ["kd_ce_loss", "kd_mse_loss", "kd_kl_loss"]

Temperature = Union[float, torch.Tensor]


def _per_class(temperature: Temperature) -> Temperature:
    """A per-example temperature gets a trailing class dimension so it broadcasts."""
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        return temperature.unsqueeze(-1)
    return temperature


@KD_LOSSES.register("ce")
def kd_ce_loss(logits_S: torch.Tensor, logits_T: torch.Tensor,
               temperature: Temperature = 1) -> torch.Tensor:
    """Cross-entropy between softened distributions, mean over rows (no τ² factor).

    ``-Σ_c softmax(T/τ)_c · log_softmax(S/τ)_c``, averaged over all leading dimensions.

    Args:
        logits_S: student logits, (N, C) or (B, L, C).
        logits_T: teacher logits, same shape.
        temperature: float, or a tensor of shape (N,) / (B, L).

    Returns:
        Scalar tensor.
    """
    temperature = _per_class(temperature)
    probs_T = F.softmax(logits_T / temperature, dim=-1)
    return -(probs_T * F.log_softmax(logits_S / temperature, dim=-1)).sum(dim=-1).mean()


@KD_LOSSES.register("mse")
def kd_mse_loss(logits_S: torch.Tensor, logits_T: torch.Tensor,
                temperature: Temperature = 1) -> torch.Tensor:
    """Mean squared error between temperature-scaled logits, mean over all elements.

    Args:
        logits_S: student logits, (N, C) or (B, L, C).
        logits_T: teacher logits, same shape.
        temperature: float, or a tensor of shape (N,) / (B, L).

    Returns:
        Scalar tensor.
    """
    temperature = _per_class(temperature)
    return F.mse_loss(logits_S / temperature, logits_T / temperature)


@KD_LOSSES.register("kl")
def kd_kl_loss(logits_S: torch.Tensor, logits_T: torch.Tensor,
               temperature: Temperature = 1) -> torch.Tensor:
    """τ² · KL(softmax(T/τ) ‖ softmax(S/τ)), mean over rows (Hinton et al., 2015).

    Zero when the student's logits equal the teacher's. Not in TextBrewer 0.2.1.

    Args:
        logits_S: student logits, (N, C) or (B, L, C).
        logits_T: teacher logits, same shape.
        temperature: float, or a tensor of shape (N,) / (B, L).

    Returns:
        Scalar tensor.
    """
    temperature = _per_class(temperature)
    log_probs_T = F.log_softmax(logits_T / temperature, dim=-1)
    log_probs_S = F.log_softmax(logits_S / temperature, dim=-1)
    kl_rows = (log_probs_T.exp() * (log_probs_T - log_probs_S)).sum(dim=-1)
    if isinstance(temperature, torch.Tensor):
        scale = temperature.squeeze(-1) ** 2 if temperature.dim() > 0 else temperature ** 2
    else:
        scale = temperature ** 2
    return (kl_rows * scale).mean()
