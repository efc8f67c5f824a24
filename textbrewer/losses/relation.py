"""Relation-based losses: relations between two layers, compared across models.

Interface: ``loss([state_S_0, state_S_1], [state_T_0, state_T_1], mask=None)``, each state
(B, L, D). The student's and the teacher's widths may differ for the MMD/NST loss (the
relation matrices are L×L); for FSP/Gram they must agree (D×D), which a projection gives.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..registry import MATCH_LOSSES
from ._masking import as_weights, safe_divide

__all__ = ["fsp_loss", "mmd_loss", "mmd_normalized_loss"]


def _two_layers(states: Sequence[torch.Tensor], side: str):
    if not isinstance(states, (list, tuple)) or len(states) != 2:
        raise ValueError(f"{side}: relation losses take a list of two layers' states, "
                         f"got {type(states).__name__}"
                         f"{'' if not isinstance(states, (list, tuple)) else f' of {len(states)}'}")
    return states


def _fsp_matrix(first: torch.Tensor, second: torch.Tensor,
                weights: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, L, D) × (B, L, D) -> (B, D, D) = firstᵀ·second / length."""
    if weights is None:
        return torch.bmm(first.transpose(1, 2), second) / second.size(1)
    weights = weights.unsqueeze(-1)
    lengths = weights.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.bmm((first * weights).transpose(1, 2), second * weights) / lengths


@MATCH_LOSSES.register("fsp")
@MATCH_LOSSES.register("gram")
def fsp_loss(state_S: Sequence[torch.Tensor], state_T: Sequence[torch.Tensor],
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flow-of-solution-procedure loss (Yim et al., 2017): MSE between Gram matrices.

    G = X0ᵀ·X1 / length, shape (B, D, D), for each side; loss = mse(G_S, G_T).

    Args:
        state_S: two student states, each (B, L, D).
        state_T: two teacher states, each (B, L, D) (same D as the student, after projection).
        mask: (B, L), 1 = keep; states are multiplied by it and each example's Gram matrix
            divided by its own length.

    Returns:
        Scalar tensor.
    """
    s0, s1 = _two_layers(state_S, "student")
    t0, t1 = _two_layers(state_T, "teacher")
    weights = as_weights(mask, s0)
    return F.mse_loss(_fsp_matrix(s0, s1, weights), _fsp_matrix(t0, t1, weights))


def _masked_gram_mse(gram_S: torch.Tensor, gram_T: torch.Tensor,
                     mask: Optional[torch.Tensor]) -> torch.Tensor:
    """MSE between (B, L, L) relation matrices; with a mask, over kept (i, j) pairs / Σ_b len_b²."""
    if mask is None:
        return F.mse_loss(gram_S, gram_T)
    weights = as_weights(mask, gram_S)
    pair_weights = weights.unsqueeze(-1) * weights.unsqueeze(1)
    squared = (gram_S - gram_T).pow(2) * pair_weights
    return safe_divide(squared.sum(), pair_weights.sum())


def _token_gram(first: torch.Tensor, second: torch.Tensor, divisor: int) -> torch.Tensor:
    """(B, L, D) × (B, L, D) -> (B, L, L) = first·secondᵀ / divisor."""
    return torch.bmm(first, second.transpose(1, 2)) / divisor


@MATCH_LOSSES.register("mmd")
@MATCH_LOSSES.register("nst")
def mmd_loss(state_S: Sequence[torch.Tensor], state_T: Sequence[torch.Tensor],
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Neuron-selectivity-transfer style loss: MSE between token-similarity matrices,
    exactly as TextBrewer 0.2.1 computes it.

    Without a mask, G = X0·X1ᵀ / D (D is that side's width, so student and teacher widths
    may differ) and loss = mse(G_S, G_T). With a mask, TextBrewer 0.2.1 divides G by the
    length L instead of D, and the squared errors of kept (i, j) pairs are divided by
    Σ_b len_b². The published ``*_smmd`` recipes are tuned to that, so it is kept here;
    :func:`mmd_normalized_loss` (``'mmd_normalized'`` / ``'nst_normalized'``) divides by D
    in both cases (see docs/differences.md).

    Args:
        state_S: two student states, each (B, L, D_S).
        state_T: two teacher states, each (B, L, D_T).
        mask: (B, L), 1 = keep.

    Returns:
        Scalar tensor.
    """
    s0, s1 = _two_layers(state_S, "student")
    t0, t1 = _two_layers(state_T, "teacher")
    # 0.2.1's size(1) with a mask (the length), size(2) without (the width)
    divisor_dim = 2 if mask is None else 1
    return _masked_gram_mse(_token_gram(s0, s1, s1.size(divisor_dim)),
                            _token_gram(t0, t1, t1.size(divisor_dim)), mask)


@MATCH_LOSSES.register("mmd_normalized")
@MATCH_LOSSES.register("nst_normalized")
def mmd_normalized_loss(state_S: Sequence[torch.Tensor], state_T: Sequence[torch.Tensor],
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """As :func:`mmd_loss`, with G = X0·X1ᵀ / D whether or not a mask is given.

    With a mask, :func:`mmd_loss` (TextBrewer 0.2.1) divides by the length L, which scales
    the term by (D/L)² relative to the unmasked one; this variant does not, so an all-ones
    mask gives the unmasked value.

    Args:
        state_S: two student states, each (B, L, D_S).
        state_T: two teacher states, each (B, L, D_T).
        mask: (B, L), 1 = keep; squared errors of kept (i, j) pairs / Σ_b len_b².

    Returns:
        Scalar tensor.
    """
    s0, s1 = _two_layers(state_S, "student")
    t0, t1 = _two_layers(state_T, "teacher")
    return _masked_gram_mse(_token_gram(s0, s1, s1.size(2)), _token_gram(t0, t1, t1.size(2)),
                            mask)
