"""Feature-based losses: hidden states and attention maps of one layer each side.

Interface: ``loss(feature_S, feature_T, mask=None) -> scalar tensor``.
``mask`` is (B, L) with 1 for real tokens and 0 for padding. Normalisation counts only
kept positions, with the count clamped to 1, so an all-padding batch gives 0.

Attention maps are (B, H, L, L) or (B, L, L). Without a mask, attention entries at or
below -1e-3 are treated as masked out (TextBrewer 0.2.1's convention for pre-softmax
scores produced with additive -inf/-10000 masking).

Non-finite entries. Attention scores masked with -inf are handled (finite values, finite
gradients, 0 at the -inf entries): pairs the mask drops add nothing whatever their scores,
a score that is -inf on both sides adds 0 to the squared error, and the cross-entropy
losses use 0 · log 0 = 0 (a query row that is -inf everywhere has no distribution and adds
0). A score that is -inf on one side only is an infinite error (``+inf``). On finite scores
the guards change no bit (on the CPU the plain formula runs first, the guarded one only when
that is not finite: ``plain_first`` in ``textbrewer/losses/_masking.py``). Hidden states
must be finite: the hidden-state losses raise a ``ValueError`` naming the loss and the side
when a -inf or inf feature makes the loss non-finite (one host sync per call; NaN is left to
the training loop's check; see ``finite_features`` in ``textbrewer/losses/_masking.py``).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ..registry import MATCH_LOSSES
from ._masking import as_weights, finite_features, plain_first, safe_divide

__all__ = ["att_mse_loss", "att_mse_sum_loss", "att_ce_loss", "att_ce_mean_loss",
           "hid_mse_loss", "cos_loss", "pkd_loss"]

_MASKED_SCORE = -1e-3
_COSINE_EPS = 1e-12  # the epsilon F.cosine_embedding_loss adds to each squared norm


def _check_attention(attention_S: torch.Tensor, attention_T: torch.Tensor) -> None:
    if attention_S.dim() not in (3, 4):
        raise ValueError(f"attention maps must be (B, H, L, L) or (B, L, L), "
                         f"got shape {tuple(attention_S.shape)}")
    if attention_S.shape != attention_T.shape:
        raise ValueError(f"student attention {tuple(attention_S.shape)} and teacher attention "
                         f"{tuple(attention_T.shape)} differ in shape")


def _row_and_column_weights(mask: torch.Tensor, attention: torch.Tensor):
    """(B, L) mask -> weights broadcastable over query rows i and key columns j."""
    weights = as_weights(mask, attention)
    head_dims = [1] * (attention.dim() - 3)
    batch, length = weights.shape
    rows = weights.view(batch, *head_dims, length, 1)
    columns = weights.view(batch, *head_dims, 1, length)
    return rows, columns


def _zero_masked_scores(scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.where(scores <= _MASKED_SCORE, torch.zeros_like(values), values)


def _pairwise_masked_mse(attention_S, attention_T, mask):
    """Σ (S−T)²·m_i·m_j over (B, [H], L, L) / (H · Σ_b len_b²)."""
    if mask is None:
        return F.mse_loss(_zero_masked_scores(attention_S, attention_S),
                          _zero_masked_scores(attention_T, attention_T))
    rows, columns = _row_and_column_weights(mask, attention_S)
    pair_weights = rows * columns
    heads = attention_S[..., 0, 0].numel() // attention_S.size(0)
    plain = plain_first(lambda: safe_divide(((attention_S - attention_T).pow(2) * pair_weights)
                                            .sum(), pair_weights.sum() * heads), attention_S)
    if plain is not None:
        return plain
    # Dropped pairs, and scores masked (-inf) on both sides, add 0 rather than inf · 0 or
    # (-inf) − (-inf) = NaN; only non-finite differences change, so finite scores keep
    # their bits (values and gradients).
    difference = attention_S - attention_T
    ignored = ~torch.isfinite(difference) & (
        (pair_weights == 0) | (torch.isneginf(attention_S) & torch.isneginf(attention_T)))
    squared = torch.where(ignored, 0.0, difference).pow(2) * pair_weights
    return safe_divide(squared.sum(), pair_weights.sum() * heads)


def _plain_attention_ce(attention_S, attention_T, mask):
    """TextBrewer 0.2.1's formula, for finite scores (see :func:`_masked_attention_ce`)."""
    probs_T = F.softmax(attention_T, dim=-1)
    log_probs_S = F.log_softmax(attention_S, dim=-1)
    if mask is None:
        probs_T = _zero_masked_scores(attention_T, probs_T)
        return -(probs_T * log_probs_S).sum(dim=-1).mean()
    rows, columns = _row_and_column_weights(mask, attention_S)
    heads = attention_S[..., 0, 0].numel() // attention_S.size(0)
    per_row = (probs_T * log_probs_S * columns).sum(dim=-1, keepdim=True) * rows
    return -safe_divide(per_row.sum(), rows.sum() * heads)


def _softmax_rows(scores: torch.Tensor, log: bool) -> torch.Tensor:
    """(log_)softmax over the last dimension; a row of -inf scores only (a query that
    attends to nothing) gets probability 0 / log-probability -inf everywhere rather than
    NaN, with finite gradients (its scores are replaced by zeros before the softmax)."""
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    safe = torch.where(empty, 0.0, scores)
    if log:
        return torch.where(empty, float("-inf"), F.log_softmax(safe, dim=-1))
    return torch.where(empty, 0.0, F.softmax(safe, dim=-1))


def _masked_attention_ce(attention_S, attention_T, mask):
    """−Σ_{b,[h],i} m_i Σ_j P_T·log_softmax(S)·m_j / Σ_{b,[h],i} m_i."""
    # Without a mask, the teacher's -inf are looked for first: the -1e-3 threshold would
    # hide a row of them (all -inf: NaN probabilities, and NaN gradients for the teacher).
    plain = plain_first(lambda: _plain_attention_ce(attention_S, attention_T, mask),
                        attention_S, teacher=attention_T if mask is None else None)
    if plain is not None:
        return plain
    probs_T = _softmax_rows(attention_T, log=False)
    log_probs_S = _softmax_rows(attention_S, log=True)
    if mask is None:
        probs_T = _zero_masked_scores(attention_T, probs_T)
        # 0 · log 0 = 0: only entries that would be 0 · (-inf) = NaN change
        log_probs_S = torch.where(torch.isneginf(log_probs_S) & (probs_T == 0), 0.0,
                                  log_probs_S)
        return -(probs_T * log_probs_S).sum(dim=-1).mean()
    rows, columns = _row_and_column_weights(mask, attention_S)
    heads = attention_S[..., 0, 0].numel() // attention_S.size(0)
    # ... and at dropped keys and query rows, whatever the teacher's probability (never
    # -inf · 0); only -inf entries change, so finite scores keep their bits
    ignored = torch.isneginf(log_probs_S) & ((probs_T == 0) | (columns == 0) | (rows == 0))
    log_probs_S = torch.where(ignored, 0.0, log_probs_S)
    per_row = (probs_T * log_probs_S * columns).sum(dim=-1, keepdim=True) * rows
    return -safe_divide(per_row.sum(), rows.sum() * heads)


@MATCH_LOSSES.register("attention_mse")
def att_mse_loss(attention_S: torch.Tensor, attention_T: torch.Tensor,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE between attention maps, per head.

    Args:
        attention_S: (B, H, L, L) or (B, L, L).
        attention_T: same shape.
        mask: (B, L), 1 = keep. With a mask the sum of squared errors over kept (i, j)
            pairs is divided by H·Σ_b len_b²; without one, entries ≤ -1e-3 are zeroed on
            each side and the plain mean is taken.

    Returns:
        Scalar tensor.
    """
    _check_attention(attention_S, attention_T)
    return _pairwise_masked_mse(attention_S, attention_T, mask)


@MATCH_LOSSES.register("attention_mse_sum")
def att_mse_sum_loss(attention_S: torch.Tensor, attention_T: torch.Tensor,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE between attention maps summed over heads (student and teacher head counts may differ).

    Args:
        attention_S: (B, H_S, L, L) or (B, L, L).
        attention_T: (B, H_T, L, L) or (B, L, L).
        mask: (B, L), 1 = keep; the denominator is Σ_b len_b².

    Returns:
        Scalar tensor.
    """
    if attention_S.dim() == 4:
        attention_S = attention_S.sum(dim=1)
    if attention_T.dim() == 4:
        attention_T = attention_T.sum(dim=1)
    _check_attention(attention_S, attention_T)
    return _pairwise_masked_mse(attention_S, attention_T, mask)


@MATCH_LOSSES.register("attention_ce")
def att_ce_loss(attention_S: torch.Tensor, attention_T: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy between attention distributions, per head and query row.

    Args:
        attention_S: pre-softmax scores, (B, H, L, L) or (B, L, L).
        attention_T: same shape.
        mask: (B, L), 1 = keep: padded keys are left out of each row's sum and padded
            query rows out of the mean. Without a mask, the teacher's probabilities are
            zeroed where its scores are ≤ -1e-3.

    Returns:
        Scalar tensor.
    """
    _check_attention(attention_S, attention_T)
    return _masked_attention_ce(attention_S, attention_T, mask)


@MATCH_LOSSES.register("attention_ce_mean")
def att_ce_mean_loss(attention_S: torch.Tensor, attention_T: torch.Tensor,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """As :func:`att_ce_loss`, on attention scores averaged over heads first.

    Args:
        attention_S: (B, H_S, L, L) or (B, L, L).
        attention_T: (B, H_T, L, L) or (B, L, L).
        mask: (B, L), 1 = keep.

    Returns:
        Scalar tensor.
    """
    if attention_S.dim() == 4:
        attention_S = attention_S.mean(dim=1)
    if attention_T.dim() == 4:
        attention_T = attention_T.mean(dim=1)
    _check_attention(attention_S, attention_T)
    return _masked_attention_ce(attention_S, attention_T, mask)


@MATCH_LOSSES.register("hidden_mse")
def hid_mse_loss(state_S: torch.Tensor, state_T: torch.Tensor,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE between hidden states.

    Args:
        state_S: (B, L, D).
        state_T: (B, L, D).
        mask: (B, L), 1 = keep; the squared errors of kept positions are divided by
            Σ mask · D.

    Returns:
        Scalar tensor.
    """
    if mask is None:
        loss = F.mse_loss(state_S, state_T)
    else:
        weights = as_weights(mask, state_S)
        squared = (state_S - state_T).pow(2) * weights.unsqueeze(-1)
        loss = safe_divide(squared.sum(), weights.sum() * state_S.size(-1))
    return finite_features(loss, "hidden_mse", state_S, state_T)


@MATCH_LOSSES.register("cos")
def cos_loss(state_S: torch.Tensor, state_T: torch.Tensor,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of 1 − cos(s, t) over (kept) positions, as ``F.cosine_embedding_loss`` with target 1.

    Args:
        state_S: (B, L, D) or (N, D).
        state_T: same shape.
        mask: (B, L), 1 = keep.

    Returns:
        Scalar tensor.
    """
    dot = (state_S * state_T).sum(dim=-1)
    norms = ((state_S * state_S).sum(dim=-1) + _COSINE_EPS) * \
            ((state_T * state_T).sum(dim=-1) + _COSINE_EPS)
    distance = 1 - dot / norms.sqrt()
    if mask is None:
        loss = distance.mean()
    else:
        weights = as_weights(mask, distance)
        loss = safe_divide((distance * weights).sum(), weights.sum())
    return finite_features(loss, "cos", state_S, state_T)


@MATCH_LOSSES.register("pkd")
def pkd_loss(state_S: torch.Tensor, state_T: torch.Tensor,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Patient-KD loss (Sun et al., 2019) on the first position ([CLS]).

    Each side's vector is L2-normalised; the loss is Σ_d (ŝ − t̂)², averaged over the batch.

    Args:
        state_S: (B, L, D) (position 0 is used) or (B, D).
        state_T: same layout.
        mask: unused (kept for the common signature).

    Returns:
        Scalar tensor.
    """
    cls_S = state_S[:, 0] if state_S.dim() == 3 else state_S
    cls_T = state_T[:, 0] if state_T.dim() == 3 else state_T
    normed_S = cls_S / torch.norm(cls_S, dim=1, keepdim=True)
    normed_T = cls_T / torch.norm(cls_T, dim=1, keepdim=True)
    return finite_features((normed_S - normed_T).pow(2).sum(dim=-1).mean(), "pkd", cls_S,
                           cls_T)


# ============================================================================ literature
# CNN feature maps (N, C, H, W) and transformer states (N, L, D) share one layout here:
# (N, P, D) = (example, position, channel), with the H·W spatial positions (row-major) of
# a map as its P positions. A mask is per position: (N, L) for states, (N, H, W) or
# (N, H·W) for maps.

__all__ += ["fitnet_loss", "attention_transfer_loss"]


def _positions(feature: torch.Tensor, mask: Optional[torch.Tensor], name: str, side: str):
    """(N, C, H, W) / (N, L, D) / (N, D) -> ((N, P, D), (N, P) weights or None)."""
    if feature.dim() == 4:
        positions = feature.flatten(2).transpose(1, 2)
    elif feature.dim() == 3:
        positions = feature
    elif feature.dim() == 2:
        positions = feature.unsqueeze(1)
    else:
        raise ValueError(f"{name}: {side} features must be (N, C, H, W), (N, L, D) or (N, D), "
                         f"got shape {tuple(feature.shape)}")
    if mask is None:
        return positions, None
    weights = as_weights(mask, positions).reshape(mask.shape[0], -1)
    if weights.shape != positions.shape[:2]:
        raise ValueError(f"{name}: a mask of shape {tuple(mask.shape)} does not fit {side} "
                         f"features {tuple(feature.shape)} ({positions.size(1)} positions per "
                         f"example)")
    return positions, weights


@MATCH_LOSSES.register("fitnet")
def fitnet_loss(feature_S: torch.Tensor, feature_T: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FitNets hint loss (Romero, Ballas, Kahou, Chassang, Gatta, Bengio, 2015, arXiv:1412.6550).

    ``mean (r(F_S) − F_T)²`` over all elements, where r is a learned regressor applied to
    the student's side beforehand (the match's projection: ``'conv1x1'`` for maps,
    ``'linear'`` for states), so the shapes agree here. The paper writes ½‖·‖²; the mean
    keeps the scale independent of the feature size.

    Args:
        feature_S: (N, C, H, W), (N, L, D) or (N, D), after the regressor.
        feature_T: same shape.
        mask: optional, 1 = keep: (N, L) for states, (N, H, W) or (N, H·W) for maps, (N,)
            for vectors; the squared errors of kept positions are divided by Σ mask · D.

    Returns:
        Scalar tensor.
    """
    if feature_S.shape != feature_T.shape:
        raise ValueError(f"fitnet: student features {tuple(feature_S.shape)} and teacher "
                         f"features {tuple(feature_T.shape)} differ in shape (a projection, "
                         f"'conv1x1' or 'linear', maps the student's width to the teacher's)")
    if mask is None:
        loss = F.mse_loss(feature_S, feature_T)
    else:
        positions_S, weights = _positions(feature_S, mask, "fitnet", "student")
        positions_T, _ = _positions(feature_T, None, "fitnet", "teacher")
        squared = (positions_S - positions_T).pow(2) * weights.unsqueeze(-1)
        loss = safe_divide(squared.sum(), weights.sum() * positions_S.size(-1))
    return finite_features(loss, "fitnet", feature_S, feature_T)


def _attention_map(positions: torch.Tensor, weights: Optional[torch.Tensor],
                   p: float) -> torch.Tensor:
    """(N, P, D) -> (N, P): Σ_d |A_d|^p per position, masked, L2-normalised per example."""
    energy = positions.abs().pow(p).sum(dim=-1)
    if weights is not None:
        energy = energy * weights
    return F.normalize(energy, p=2.0, dim=1)


@MATCH_LOSSES.register("at")
def attention_transfer_loss(feature_S: torch.Tensor, feature_T: torch.Tensor,
                            mask: Optional[torch.Tensor] = None, p: float = 2) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, 2017, arXiv:1612.03928).

    Activation-based spatial attention ``Q = vec(Σ_c |A_c|^p)``, then ``Q / ‖Q‖₂`` per
    example (p = 2 as in the paper). The loss is the **mean squared difference** of the
    normalised maps, ``mean_{n, position} (Q_S/‖Q_S‖ − Q_T/‖Q_T‖)²``, as in the authors'
    code (the paper writes β/2 · ‖Q_S/‖Q_S‖ − Q_T/‖Q_T‖‖₂, a norm, with β = 10³ put in
    the match's weight). Channel counts of student and teacher may differ; positions
    (H·W or L) must agree. Invariant to a positive per-example scale of either feature.

    For (N, L, D) states the map is over the L tokens (``Σ_d |h_{l,d}|^p``); padded tokens are
    removed before the normalisation.

    Args:
        feature_S: (N, C_S, H, W) or (N, L, D_S).
        feature_T: (N, C_T, H, W) or (N, L, D_T).
        mask: optional, 1 = keep: (N, L) for states, (N, H, W) or (N, H·W) for maps; the
            squared differences of kept positions are divided by Σ mask.
        p: the exponent of the attention map.

    Returns:
        Scalar tensor.
    """
    if feature_S.dim() not in (3, 4) or feature_T.dim() != feature_S.dim():
        raise ValueError(f"at: features must both be (N, C, H, W) or both (N, L, D), got "
                         f"student {tuple(feature_S.shape)} and teacher "
                         f"{tuple(feature_T.shape)}")
    positions_S, weights = _positions(feature_S, mask, "at", "student")
    positions_T, _ = _positions(feature_T, None, "at", "teacher")
    if positions_S.shape[:2] != positions_T.shape[:2]:
        raise ValueError(f"at: student features {tuple(feature_S.shape)} and teacher features "
                         f"{tuple(feature_T.shape)} differ in batch size or positions")
    squared = (_attention_map(positions_S, weights, p)
               - _attention_map(positions_T, weights, p)).pow(2)
    if weights is None:
        loss = squared.mean()
    else:
        loss = safe_divide((squared * weights).sum(), weights.sum())
    return finite_features(loss, "at", feature_S, feature_T)
