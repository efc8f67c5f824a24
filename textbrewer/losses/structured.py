"""Response-based losses from the KD literature with a structure of their own: DKD
(decoupled target / non-target KD), DIST (inter- and intra-class correlations) and logit
standardisation. Each is checked against its paper's formula in
tests/test_literature_losses.py, carries the τ² factor, and is finite on -inf (masked)
classes as :mod:`textbrewer.losses.response` describes.
"""
import inspect
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..registry import KD_LOSSES
from ._masking import rescaled, safe_divide
from .response import (Temperature, _as_rows, _log_ratio, _loss_with_parameters, kd_kl_loss)

__all__ = ["dkd_loss", "dkd_loss_builder", "dist_loss", "dist_loss_builder",
           "logit_standardization", "standardized_loss_builder"]


# ---------------------------------------------------------------------- DKD
def _target_and_rest(scaled: torch.Tensor, gold: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(R, C) scaled logits and a one-hot (R, C) gold mask ->

    ``log b`` (R, 2): log [p_t, 1 − p_t], and ``log p̂`` (R, C): the log-distribution over the
    non-target classes (0 at the target, where it is not used).

    -inf logits (masked classes) stay finite where they must: the target's logit is picked
    without multiplying the others by 0, and a row whose non-target logits are all -inf
    (no non-target mass) gets ``log p̂ = -inf`` everywhere, not NaN, with finite gradients.
    """
    log_all = torch.logsumexp(scaled, dim=-1)
    rest = scaled.masked_fill(gold, float("-inf"))
    empty = torch.isneginf(rest).all(dim=-1, keepdim=True)
    # logsumexp's gradient over an all -inf row is NaN: such rows get zeros, then -inf back
    log_rest = torch.where(empty, float("-inf"), torch.logsumexp(
        torch.where(empty, 0.0, rest), dim=-1, keepdim=True)).squeeze(-1)
    log_target = torch.where(gold, scaled, 0.0).sum(dim=-1)
    log_binary = torch.stack([log_target - log_all, log_rest - log_all], dim=-1)
    log_hat = (rest - torch.where(empty, 0.0, log_rest.unsqueeze(-1))).masked_fill(gold, 0.0)
    return log_binary, log_hat


def dkd_loss(logits_S: torch.Tensor, logits_T: torch.Tensor, temperature: Temperature = 1,
             *, labels: Optional[torch.Tensor] = None, alpha: float = 1.0,
             beta: float = 8.0) -> torch.Tensor:
    """Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu, Liang, 2022, arXiv:2203.08679).

    With t the gold class, p = softmax(T/τ) and q = softmax(S/τ):

    - TCKD = KL(b^T ‖ b^S), b = [p_t, 1 − p_t] (target vs all non-target classes);
    - NCKD = KL(p̂^T ‖ p̂^S), p̂_c = p_c / (1 − p_t) for c ≠ t (the non-target distribution);
    - per row, the classical KD is ``KL(p ‖ q) = TCKD + (1 − p_t^T) · NCKD`` (p_t^T the
      *teacher's* target probability); DKD frees the weights:
      ``loss = τ² · (α · TCKD + β · NCKD)``, mean over rows.

    Rows whose label is negative (e.g. -100 padding) are left out of the mean (an
    all-ignored batch gives 0). Labels must otherwise lie in [0, C). The paper ramps the DKD
    term up over the first epochs: use the ``['warmup', fraction]`` weight schedule on the
    KD weight for that.

    Classes with a -inf teacher logit (masked) add 0 to both terms (0 · log 0 = 0); with
    -inf at the same classes on both sides the loss equals DKD on the logits without them.

    Config forms: ``'dkd'`` (α = 1, β = 8, the paper's CIFAR-100 setting) or
    ``['dkd', alpha, beta]``.

    Args:
        logits_S: student logits, (N, C) or (B, L, C), C ≥ 2.
        logits_T: teacher logits, same shape.
        temperature: float, or a tensor of the logits' shape without C.
        labels: gold classes, (N,) or (B, L) (anything with one entry per row), integer.
        alpha: weight of TCKD.
        beta: weight of NCKD.

    Returns:
        Scalar tensor; 0 when the student's distribution equals the teacher's.

    Raises:
        ValueError: no labels, a label count that is not one per row, or C < 2.
    """
    if labels is None:
        raise ValueError("dkd (Decoupled KD) needs the gold labels: call it with labels=..., "
                         "and have the student's adaptor return 'labels'")
    rows_S, rows_T, tau, tau_squared = _as_rows(logits_S, logits_T, temperature, "dkd")
    classes = rows_S.size(-1)
    if classes < 2:
        raise ValueError(f"dkd: needs at least 2 classes, got logits of shape "
                         f"{tuple(logits_S.shape)}")
    labels = labels.reshape(-1).to(rows_S.device)
    if labels.numel() != rows_S.size(0):
        raise ValueError(f"dkd: {labels.numel()} labels (shape {tuple(labels.shape)}) for "
                         f"{rows_S.size(0)} rows of logits {tuple(logits_S.shape)}")
    kept = labels >= 0
    gold = torch.arange(classes, device=rows_S.device) == labels.clamp(min=0).unsqueeze(-1)
    log_b_S, log_hat_S = _target_and_rest(rows_S / tau, gold)
    log_b_T, log_hat_T = _target_and_rest(rows_T / tau, gold)
    tckd = (log_b_T.exp() * _log_ratio(log_b_T, log_b_S)).sum(dim=-1)
    hat_T = log_hat_T.exp().masked_fill(gold, 0.0)
    nckd = (hat_T * _log_ratio(log_hat_T, log_hat_S)).sum(dim=-1)
    per_row = (alpha * tckd + beta * nckd) * tau_squared
    weights = kept.to(per_row.dtype)
    return safe_divide((per_row * weights).sum(), weights.sum())


def dkd_loss_builder(alpha: float = 1.0, beta: float = 8.0) -> Callable[..., torch.Tensor]:
    """``['dkd', alpha, beta]``: :func:`dkd_loss` with the given weights.

    Returns:
        ``loss(logits_S, logits_T, temperature=1, *, labels) -> scalar``.
    """

    def dkd(logits_S: torch.Tensor, logits_T: torch.Tensor, temperature: Temperature = 1,
            *, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return dkd_loss(logits_S, logits_T, temperature, labels=labels, alpha=alpha, beta=beta)

    dkd.__doc__ = f"Decoupled KD with alpha={alpha}, beta={beta}; see dkd_loss."
    return dkd


KD_LOSSES.add("dkd", _loss_with_parameters(dkd_loss, dkd_loss_builder))


# ---------------------------------------------------------------------- DIST
def _kept_mean(values: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Mean of finite (R, K) ``values`` over each row's kept entries (``kept``: 0/1 of their
    dtype) -> (R, 1); exactly ``values.mean(-1, keepdim=True)`` on rows where all are kept."""
    return rescaled((values * kept).mean(dim=-1, keepdim=True), values.size(-1),
                    kept.sum(dim=-1, keepdim=True))


def _pearson_rows(first: torch.Tensor, second: torch.Tensor,
                  kept: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row pair of two finite (R, K) tensors, over the row's
    kept entries (``kept``: 0/1 of their dtype) -> (R,).

    A constant row has no correlation defined; it gets 0 (its norm is clamped, not added to).
    (Multiplying by a 1 changes no bit, and keeps the values' memory layout, so the
    reductions run in the same order as without a mask.)
    """
    first = (first - _kept_mean(first, kept)) * kept
    second = (second - _kept_mean(second, kept)) * kept
    tiny = torch.finfo(first.dtype).tiny
    norms = ((first * first).sum(dim=-1) * (second * second).sum(dim=-1)).clamp(min=tiny)
    return (first * second).sum(dim=-1) / norms.sqrt()


def dist_loss(logits_S: torch.Tensor, logits_T: torch.Tensor, temperature: Temperature = 1,
              *, beta: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """DIST (Huang, You, Wang, Qian, Xu, 2022, arXiv:2205.10536): relations, not values.

    With Y^S = softmax(S/τ) and Y^T = softmax(T/τ) as (R, C) matrices (all leading
    dimensions flattened into R rows) and ρ the Pearson correlation:

    - inter-class: ``1 − mean_i ρ(Y^S_i,:, Y^T_i,:)`` (each row's class ranking);
    - intra-class: ``1 − mean_c ρ(Y^S_:,c, Y^T_:,c)`` (each class over the batch);
    - ``loss = β · τ² · inter + γ · τ² · intra``.

    Both correlations are invariant to a positive scale and a shift, so the student only
    has to match the teacher up to those. With a per-row temperature, the inter-class term
    weights each row by its τ², the intra-class term (which mixes rows) by the mean τ².
    Defaults β = γ = 1 as in the authors' code (``['dist', beta, gamma]`` for others).

    Entries whose teacher logit is -inf (masked classes) are left out of both
    correlations, and a class masked in every row out of the intra-class mean: with -inf
    in the same columns of every row, the loss is DIST on the logits without them.

    Args:
        logits_S: student logits, (N, C) or (B, L, C); at least 2 rows for the intra term.
        logits_T: teacher logits, same shape.
        temperature: float, or a tensor of the logits' shape without C.
        beta: weight of the inter-class relation.
        gamma: weight of the intra-class relation.

    Returns:
        Scalar tensor; 0 when the student's probabilities equal the teacher's.
    """
    rows_S, rows_T, tau, tau_squared = _as_rows(logits_S, logits_T, temperature, "dist")
    probs_S = F.softmax(rows_S / tau, dim=-1)
    probs_T = F.softmax(rows_T / tau, dim=-1)
    kept = (~torch.isneginf(rows_T)).to(probs_S.dtype)
    inter = ((1 - _pearson_rows(probs_S, probs_T, kept)) * tau_squared).mean()
    mean_tau_squared = tau_squared.mean() if isinstance(tau_squared, torch.Tensor) \
        else tau_squared
    kept_classes = kept.amax(dim=0)
    per_class = (1 - _pearson_rows(probs_S.t(), probs_T.t(), kept.t())) * kept_classes
    intra = rescaled(per_class.mean(), per_class.numel(), kept_classes.sum()) \
        * mean_tau_squared
    return beta * inter + gamma * intra


def dist_loss_builder(beta: float = 1.0, gamma: float = 1.0) -> Callable[..., torch.Tensor]:
    """``['dist', beta, gamma]``: :func:`dist_loss` with the given weights.

    Returns:
        ``loss(logits_S, logits_T, temperature=1) -> scalar``.
    """

    def dist(logits_S: torch.Tensor, logits_T: torch.Tensor,
             temperature: Temperature = 1) -> torch.Tensor:
        return dist_loss(logits_S, logits_T, temperature, beta=beta, gamma=gamma)

    dist.__doc__ = f"DIST with beta={beta}, gamma={gamma}; see dist_loss."
    return dist


KD_LOSSES.add("dist", _loss_with_parameters(dist_loss, dist_loss_builder))


# ---------------------------------------------------------------------- logit standardisation
def logit_standardization(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-scores each row of logits (Sun, Ren, Li, Wang, Cao, 2024, arXiv:2403.01427).

    ``Z(z) = (z − mean(z)) / std(z)`` over the class dimension, with the unbiased (Bessel)
    standard deviation as in the authors' code; the variance is clamped at eps² (a constant
    row gives zeros rather than NaN).

    -inf entries (masked classes) are left out of the mean and the deviation and stay -inf,
    so a row with -inf columns is standardised as the row without them would be.

    Args:
        logits: (…, C), C ≥ 2.
        eps: floor of the standard deviation.

    Returns:
        Tensor of the same shape, each row with mean 0 and (unbiased) std 1 over its finite
        entries.
    """
    masked = torch.isneginf(logits)
    classes = logits.size(-1)
    count = classes - masked.sum(dim=-1, keepdim=True)
    finite = torch.where(masked, 0.0, logits)
    mean = rescaled(finite.mean(dim=-1, keepdim=True), classes, count)
    # × 1 and + 0 away from the masked entries: no bit changes there, and unlike a
    # torch.where they keep the layout of the values, so backward reduces in the same order
    centred = (finite - mean) * (~masked).to(finite.dtype)
    variance = rescaled((centred * centred).sum(dim=-1, keepdim=True) / (classes - 1),
                        classes - 1, count - 1)
    standardized = centred / variance.clamp(min=eps * eps).sqrt()
    return standardized + torch.where(masked, float("-inf"), 0.0).to(standardized.dtype)


def standardized_loss_builder(base: Any = "kl") -> Callable[..., torch.Tensor]:
    """``['logit_std', base]``: the KD loss ``base`` on z-scored logits (Sun et al., 2024).

    ``loss(S, T, τ) = base(Z(S), Z(T), τ)`` with Z from :func:`logit_standardization`; τ
    then acts as the paper's base temperature on standardised logits. ``base`` is any
    registered KD loss spec (``'kl'``, ``['dkd', 1, 8]``, …) or a callable; keyword
    arguments (``labels=``) are passed through, and the returned loss has ``base``'s
    signature.

    Returns:
        ``loss(logits_S, logits_T, temperature=1, **kwargs) -> scalar``.
    """
    inner = base if callable(base) else KD_LOSSES.resolve(base)

    def standardized(logits_S: torch.Tensor, logits_T: torch.Tensor,
                     temperature: Temperature = 1, **kwargs: Any) -> torch.Tensor:
        return inner(logit_standardization(logits_S), logit_standardization(logits_T),
                     temperature, **kwargs)

    standardized.__signature__ = inspect.signature(inner)
    standardized.__doc__ = f"{base!r} on standardised logits; see standardized_loss_builder."
    return standardized


def _standardized_kl(logits_S: torch.Tensor, logits_T: torch.Tensor,
                     temperature: Temperature = 1) -> torch.Tensor:
    """τ² · KL on z-scored logits (Sun et al., 2024, arXiv:2403.01427): ``'logit_std'``.

    ``['logit_std', base]`` wraps any other registered KD loss; see
    :func:`standardized_loss_builder`.
    """
    return kd_kl_loss(logit_standardization(logits_S), logit_standardization(logits_T),
                      temperature)


KD_LOSSES.add("logit_std", _loss_with_parameters(_standardized_kl, standardized_loss_builder))
