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


# ============================================================================ literature
# Losses from the KD literature, each checked against its paper's formula in
# tests/test_literature_losses.py. Every one of them carries the τ² factor of Hinton et al.
# (as 'kl' does), so their gradient scale does not shrink as τ grows.
#
# Some take parameters. Their registry entry is then both the loss with the paper's default
# parameters (``'dkd'``) and, called with parameters instead of tensors, a builder
# (``['dkd', alpha, beta]``, resolved by :meth:`Registry.resolve`).

import functools  # noqa: E402  (appended section)
import inspect  # noqa: E402
import math  # noqa: E402
from typing import Any, Callable, Optional, Tuple  # noqa: E402

from ._masking import safe_divide  # noqa: E402

__all__ += ["reverse_kl_loss", "jsd_loss", "dkd_loss", "dkd_loss_builder", "dist_loss",
            "dist_loss_builder", "logit_standardization", "standardized_loss_builder",
            "bce_loss"]


def _as_rows(logits_S: torch.Tensor, logits_T: torch.Tensor, temperature: Temperature,
             name: str) -> Tuple[torch.Tensor, torch.Tensor, Temperature, Temperature]:
    """Flattens (…, C) logits to rows (R, C).

    Returns the two (R, C) views, the temperature broadcastable over them (a float, a 0-d
    tensor or an (R, 1) tensor) and τ² per row (a float, a 0-d tensor or an (R,) tensor).
    """
    if logits_S.shape != logits_T.shape:
        raise ValueError(f"{name}: student logits {tuple(logits_S.shape)} and teacher logits "
                         f"{tuple(logits_T.shape)} differ in shape")
    if logits_S.dim() < 1:
        raise ValueError(f"{name}: logits need a class dimension, got a scalar")
    classes = logits_S.size(-1)
    rows_S, rows_T = logits_S.reshape(-1, classes), logits_T.reshape(-1, classes)
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        if temperature.numel() == 1:
            temperature = temperature.reshape(())
        elif tuple(temperature.shape) != tuple(logits_S.shape[:-1]):
            raise ValueError(f"{name}: a per-example temperature must have the logits' shape "
                             f"without the class dimension, {tuple(logits_S.shape[:-1])}; got "
                             f"{tuple(temperature.shape)}")
        else:
            column = temperature.reshape(-1, 1)
            return rows_S, rows_T, column, column.squeeze(-1) ** 2
    return rows_S, rows_T, temperature, temperature ** 2


def _loss_with_parameters(loss: Callable[..., torch.Tensor],
                          builder: Callable[..., Callable[..., torch.Tensor]]
                          ) -> Callable[..., Any]:
    """One registry entry for a loss with parameters.

    Called on tensors (``entry(logits_S, logits_T, temperature)``) it is ``loss`` with its
    default parameters; called with parameters (``entry(alpha, beta)``, which is what
    ``[name, alpha, beta]`` in a config does) it returns ``builder(alpha, beta)``.
    ``inspect.signature(entry)`` is the loss's, so a caller that looks for a ``labels``
    parameter finds it.
    """

    @functools.wraps(loss)
    def entry(*args: Any, **kwargs: Any) -> Any:
        if (args and isinstance(args[0], torch.Tensor)) or "logits_S" in kwargs:
            return loss(*args, **kwargs)
        return builder(*args, **kwargs)

    return entry


# ---------------------------------------------------------------------- reverse KL, JSD
@KD_LOSSES.register("reverse_kl")
def reverse_kl_loss(logits_S: torch.Tensor, logits_T: torch.Tensor,
                    temperature: Temperature = 1) -> torch.Tensor:
    """Reverse KL: τ² · KL(q ‖ p), q = softmax(S/τ) the student's, p = softmax(T/τ).

    ``Σ_c q_c (log q_c − log p_c)`` per row, times τ², mean over rows. Mode-seeking: the
    student is pushed to put its mass where the teacher has mass, rather than to cover all
    of it (used for generative LMs, e.g. MiniLLM, Gu et al. 2023, arXiv:2306.08543).

    Args:
        logits_S: student logits, (N, C) or (B, L, C).
        logits_T: teacher logits, same shape.
        temperature: float, or a tensor of the logits' shape without C.

    Returns:
        Scalar tensor; 0 when the two distributions are equal.
    """
    rows_S, rows_T, tau, tau_squared = _as_rows(logits_S, logits_T, temperature, "reverse_kl")
    log_q = F.log_softmax(rows_S / tau, dim=-1)
    log_p = F.log_softmax(rows_T / tau, dim=-1)
    per_row = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    return (per_row * tau_squared).mean()


@KD_LOSSES.register("jsd")
def jsd_loss(logits_S: torch.Tensor, logits_T: torch.Tensor,
             temperature: Temperature = 1) -> torch.Tensor:
    """Jensen–Shannon divergence between the softened distributions, times τ².

    Convention: natural logarithm, equal weights,
    ``JSD(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)`` with ``m = ½ (p + q)``, p = softmax(T/τ),
    q = softmax(S/τ); per row it lies in [0, ln 2] before the τ² factor. (The generalised
    JSD of Agarwal et al. 2024, arXiv:2306.13649, with β = 0.5.) Mean over rows.

    Args:
        logits_S: student logits, (N, C) or (B, L, C).
        logits_T: teacher logits, same shape.
        temperature: float, or a tensor of the logits' shape without C.

    Returns:
        Scalar tensor; 0 when the two distributions are equal.
    """
    rows_S, rows_T, tau, tau_squared = _as_rows(logits_S, logits_T, temperature, "jsd")
    log_q = F.log_softmax(rows_S / tau, dim=-1)
    log_p = F.log_softmax(rows_T / tau, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2)
    per_row = 0.5 * (log_p.exp() * (log_p - log_m)).sum(dim=-1) \
        + 0.5 * (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    return (per_row * tau_squared).mean()


# ---------------------------------------------------------------------- DKD
def _target_and_rest(scaled: torch.Tensor, gold: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(R, C) scaled logits and a one-hot (R, C) gold mask ->

    ``log b`` (R, 2): log [p_t, 1 − p_t], and ``log p̂`` (R, C): the log-distribution over the
    non-target classes (0 at the target, where it is not used).
    """
    log_all = torch.logsumexp(scaled, dim=-1)
    rest = scaled.masked_fill(gold, float("-inf"))
    log_rest = torch.logsumexp(rest, dim=-1)
    log_target = (scaled * gold).sum(dim=-1)
    log_binary = torch.stack([log_target - log_all, log_rest - log_all], dim=-1)
    log_hat = (rest - log_rest.unsqueeze(-1)).masked_fill(gold, 0.0)
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
    tckd = (log_b_T.exp() * (log_b_T - log_b_S)).sum(dim=-1)
    hat_T = log_hat_T.exp().masked_fill(gold, 0.0)
    nckd = (hat_T * (log_hat_T - log_hat_S)).sum(dim=-1)
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
def _pearson_rows(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row pair of two (R, K) tensors -> (R,).

    A constant row has no correlation defined; it gets 0 (its norm is clamped, not added to).
    """
    first = first - first.mean(dim=-1, keepdim=True)
    second = second - second.mean(dim=-1, keepdim=True)
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
    inter = ((1 - _pearson_rows(probs_S, probs_T)) * tau_squared).mean()
    mean_tau_squared = tau_squared.mean() if isinstance(tau_squared, torch.Tensor) \
        else tau_squared
    intra = (1 - _pearson_rows(probs_S.t(), probs_T.t())).mean() * mean_tau_squared
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

    Args:
        logits: (…, C), C ≥ 2.
        eps: floor of the standard deviation.

    Returns:
        Tensor of the same shape, each row with mean 0 and (unbiased) std 1.
    """
    centred = logits - logits.mean(dim=-1, keepdim=True)
    variance = (centred * centred).sum(dim=-1, keepdim=True) / (logits.size(-1) - 1)
    return centred / variance.clamp(min=eps * eps).sqrt()


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


# ---------------------------------------------------------------------- multi-label
@KD_LOSSES.register("bce")
def bce_loss(logits_S: torch.Tensor, logits_T: torch.Tensor,
             temperature: Temperature = 1) -> torch.Tensor:
    """Multi-label KD: binary cross-entropy against the teacher's sigmoid soft targets.

    Each of the C labels is its own binary problem:
    ``−[σ(T/τ) log σ(S/τ) + (1 − σ(T/τ)) log(1 − σ(S/τ))]``, times τ², mean over all
    N·C (or B·L·C) entries (as ``nn.BCEWithLogitsLoss``). At S == T it is the teacher's
    binary entropy per label: minimal there, not 0 (subtract that entropy for the binary
    KL). For multi-label tasks, where a softmax over labels is the wrong model.

    Args:
        logits_S: student logits, (N, C) or (B, L, C).
        logits_T: teacher logits, same shape.
        temperature: float, or a tensor of the logits' shape without C.

    Returns:
        Scalar tensor.
    """
    rows_S, rows_T, tau, tau_squared = _as_rows(logits_S, logits_T, temperature, "bce")
    per_entry = F.binary_cross_entropy_with_logits(rows_S / tau, torch.sigmoid(rows_T / tau),
                                                   reduction="none")
    return (per_entry.mean(dim=-1) * tau_squared).mean()
