"""The token losses of the registry (``TOKEN_LOSSES``): ``fn(logits_S, logits_T,
mask=None, **options) -> scalar`` (see :mod:`textbrewer.losses.token`)."""
from __future__ import annotations

from ...registry import TOKEN_LOSSES

from .api import (token_distillation_loss)
from .objectives import akl_loss, taid_loss

# ---------------------------------------------------------------------------------------
# registry entries: fn(logits_S, logits_T, mask=None, **options) -> scalar
# ---------------------------------------------------------------------------------------
@TOKEN_LOSSES.register("forward_kl")
def forward_kl_loss(logits_S, logits_T, mask=None, **options):
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v) per token, mean over valid tokens.

    Args: see :func:`token_distillation_loss` (logits (N, V) or (B, L, V), mask (N,)/(B, L)).
    """
    return token_distillation_loss(logits_S, logits_T, mask=mask, divergence="forward_kl",
                                   **options)


@TOKEN_LOSSES.register("reverse_kl")
def token_reverse_kl_loss(logits_S, logits_T, mask=None, **options):
    """KL(q‖p) = Σ_v q_v (log q_v − log p_v) per token, mean over valid tokens.

    Token-level (no τ² factor unless ``scale_by_temperature_squared=True``); the KD loss
    ``'reverse_kl'`` on logits, τ²-scaled and averaged over rows, is
    :func:`textbrewer.losses.kd_reverse_kl_loss`. Args: see :func:`token_distillation_loss`.
    """
    return token_distillation_loss(logits_S, logits_T, mask=mask, divergence="reverse_kl",
                                   **options)


@TOKEN_LOSSES.register("jsd")
def token_jsd_loss(logits_S, logits_T, mask=None, **options):
    """Generalised JSD: m = (1−β)q + βp, β·KL(p‖m) + (1−β)·KL(q‖m); β=0: KL(p‖q), β=1: KL(q‖p).

    ``beta`` (default 0.5) is an option. Token-level (no τ² factor unless
    ``scale_by_temperature_squared=True``); the KD loss ``'jsd'`` on logits (β = 0.5,
    τ²-scaled, averaged over rows) is :func:`textbrewer.losses.kd_jsd_loss`. Args: see
    :func:`token_distillation_loss`.
    """
    return token_distillation_loss(logits_S, logits_T, mask=mask, divergence="jsd", **options)


def reverse_kl_loss(logits_S, logits_T, mask=None, **options):
    """Alias of :func:`token_reverse_kl_loss` (token-level KL(q‖p), no τ²).

    Kept because this module exported it under this name before; ``textbrewer.losses``'s
    ``reverse_kl_loss`` is the other convention (τ², mean over rows,
    :func:`textbrewer.losses.kd_reverse_kl_loss`). Prefer the names that say which one.
    """
    return token_reverse_kl_loss(logits_S, logits_T, mask=mask, **options)


def jsd_loss(logits_S, logits_T, mask=None, **options):
    """Alias of :func:`token_jsd_loss` (token-level β-JSD, no τ²).

    Kept because this module exported it under this name before; ``textbrewer.losses``'s
    ``jsd_loss`` is the other convention (β = 0.5, τ², mean over rows,
    :func:`textbrewer.losses.kd_jsd_loss`). Prefer the names that say which one.
    """
    return token_jsd_loss(logits_S, logits_T, mask=mask, **options)


@TOKEN_LOSSES.register("skew_kl")
def skew_kl_loss(logits_S, logits_T, mask=None, **options):
    """Skew KL: KL(p ‖ αp + (1−α)q) per token (``alpha``, default 0.1).

    Args: see :func:`token_distillation_loss`.
    """
    return token_distillation_loss(logits_S, logits_T, mask=mask, divergence="skew_kl",
                                   **options)


@TOKEN_LOSSES.register("skew_reverse_kl")
def skew_reverse_kl_loss(logits_S, logits_T, mask=None, **options):
    """Skew reverse KL: KL(q ‖ αq + (1−α)p) per token (``alpha``, default 0.1).

    Args: see :func:`token_distillation_loss`.
    """
    return token_distillation_loss(logits_S, logits_T, mask=mask, divergence="skew_reverse_kl",
                                   **options)


@TOKEN_LOSSES.register("tv")
def tv_loss(logits_S, logits_T, mask=None, **options):
    """Total variation ``½ Σ_v |p_v − q_v|`` per token, mean over valid tokens.

    Args: see :func:`token_distillation_loss`.
    """
    return token_distillation_loss(logits_S, logits_T, mask=mask, divergence="tv", **options)


@TOKEN_LOSSES.register("topk_kl")
def topk_kl_loss(logits_S, logits_T, mask=None, **options):
    """KL(p̂‖q) against a cached top-k teacher; ``logits_T`` is a :class:`TopKTeacher`.

    ``tail`` option: ``'renormalize'`` or ``'uniform'``. Args: see
    :func:`token_distillation_loss`.
    """
    return token_distillation_loss(logits_S, logits_T, mask=mask, divergence="topk_kl",
                                   **options)


@TOKEN_LOSSES.register("taid")
def taid_token_loss(logits_S, logits_T, mask=None, *, t=0.4, **options):
    """TAID: KL(p_t ‖ q), p_t = softmax(((1−t)·sg(z_S) + t·z_T) / τ) (Shing et al., ICLR 2025).

    ``t`` defaults to the paper's t_start, 0.4; in training it comes from a
    :class:`~textbrewer.losses.token.objectives.TAIDSchedule` (the LM distillers keep one).
    Args: see :func:`~textbrewer.losses.token.objectives.taid_loss`.
    """
    return taid_loss(logits_S, logits_T, mask=mask, t=t, **options)


@TOKEN_LOSSES.register("akl")
def akl_token_loss(logits_S, logits_T, mask=None, **options):
    """AKL: w_head·KL(p‖q) + w_tail·KL(q‖p) (Wu et al., COLING 2025); ``mu`` default 0.5.

    Args: see :func:`~textbrewer.losses.token.objectives.akl_loss`.
    """
    return akl_loss(logits_S, logits_T, mask=mask, **options)
