"""Response-based losses: the student's logits against the teacher's.

Temperature convention (stated once, here): ``kd_ce_loss`` is TextBrewer's ``ce`` and has
**no** τ² factor; ``kd_kl_loss`` (``'kl'``) is Hinton et al.'s form, τ²·KL(p_T ‖ p_S),
whose gradient scale does not shrink as τ grows.

A temperature may be a float or a per-example tensor of shape (N,) (or the logits' shape
without the class dimension); it is broadcast over the class dimension.

Masked classes. A logit of ``-inf`` marks a class as impossible (a padded vocabulary, a label
mask written as -inf). Every loss here gives a finite, correct value for it, with finite
gradients (0 at the -inf entries), or an error that says why it cannot:

- the distribution losses (``ce``, ``kl``, ``reverse_kl``, ``jsd``, ``dkd``,
  ``logit_std``) use 0 · log 0 = 0, as ``torch.xlogy`` does: with -inf at the same classes
  on both sides they equal the same loss on the logits with those classes removed. A
  divergence that is really infinite stays ``+inf`` (KL(p‖q) where the student's logit is
  -inf and the teacher's probability is not 0), except that ``reverse_kl``, infinite
  wherever the teacher's logit is -inf and the student's is not, raises a ``ValueError``
  that says so;
- ``dist`` leaves the teacher's -inf classes out of its correlations, ``logit_std`` out of
  the standardisation (they stay -inf);
- the element-wise losses (``mse``, ``bce``) leave the entries where the teacher's logit is
  -inf out of their mean, whatever the student's logit there.

On finite logits the guards change no bit of the values or the gradients, and cost no host
sync (``reverse_kl`` reads one bool, whether its result is finite, to raise that error). On
the CPU, where their extra passes cost more than a host sync, ``ce``, ``mse``, ``kl``,
``reverse_kl`` and ``jsd`` compute the plain formula first and the guarded one only when
that is not finite (``plain_first`` in ``_masking.py``): the same bits either way.
"""
from typing import Union

import torch
import torch.nn.functional as F

from ..registry import KD_LOSSES
from ._masking import plain_first, rescaled

__all__ = ["kd_ce_loss", "kd_mse_loss", "kd_kl_loss"]

Temperature = Union[float, torch.Tensor]


def _per_class(temperature: Temperature) -> Temperature:
    """A per-example temperature gets a trailing class dimension so it broadcasts."""
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        return temperature.unsqueeze(-1)
    return temperature


def _log_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``log a − log b``, with 0 where a = 0 (log a = -inf): the factor of a · (…) in a KL.

    Only entries where ``log_a`` is -inf change, so finite inputs keep their bits; there
    ``a · (log a − log b)`` is 0 (0 · log 0 = 0) instead of NaN, in the value and in the
    gradients (the difference is zeroed before it meets the zero, not after).
    """
    return torch.where(torch.isneginf(log_a), 0.0, log_a - log_b)


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
        Scalar tensor. A class whose teacher logit is -inf adds 0 (0 · log 0 = 0, even where
        the student's logit is -inf too).
    """
    temperature = _per_class(temperature)
    probs_T = F.softmax(logits_T / temperature, dim=-1)
    log_probs_S = F.log_softmax(logits_S / temperature, dim=-1)
    plain = plain_first(lambda: -(probs_T * log_probs_S).sum(dim=-1).mean(), probs_T)
    if plain is not None:
        return plain
    # 0 · (-inf) would be NaN: only those entries change, so finite logits keep 0.2.1's bits
    log_probs_S = torch.where(torch.isneginf(log_probs_S) & (probs_T == 0), 0.0, log_probs_S)
    return -(probs_T * log_probs_S).sum(dim=-1).mean()


@KD_LOSSES.register("mse")
def kd_mse_loss(logits_S: torch.Tensor, logits_T: torch.Tensor,
                temperature: Temperature = 1) -> torch.Tensor:
    """Mean squared error between temperature-scaled logits, mean over all elements.

    Entries where the teacher's logit is -inf (a masked class) are left out, of the sum and
    of the count, whatever the student's logit there: the squared error against -inf has no
    use. (With none of them, this is ``F.mse_loss`` as in TextBrewer 0.2.1, bit for bit.)

    Args:
        logits_S: student logits, (N, C) or (B, L, C).
        logits_T: teacher logits, same shape.
        temperature: float, or a tensor of shape (N,) / (B, L).

    Returns:
        Scalar tensor.
    """
    temperature = _per_class(temperature)
    plain = plain_first(lambda: F.mse_loss(logits_S / temperature, logits_T / temperature),
                        logits_T)
    if plain is not None:
        return plain
    masked = torch.isneginf(logits_T)
    scaled_S = torch.where(masked, 0.0, logits_S / temperature)
    scaled_T = torch.where(masked, 0.0, logits_T / temperature)
    return rescaled(F.mse_loss(scaled_S, scaled_T), masked.numel(),
                    masked.numel() - masked.sum())


@KD_LOSSES.register("kl")
def kd_kl_loss(logits_S: torch.Tensor, logits_T: torch.Tensor,
               temperature: Temperature = 1) -> torch.Tensor:
    """τ² · KL(softmax(T/τ) ‖ softmax(S/τ)), mean over rows (Hinton et al., 2015).

    Zero when the student's logits equal the teacher's. Not in TextBrewer 0.2.1. A class
    whose teacher logit is -inf adds 0; ``+inf`` where the student's logit is -inf and the
    teacher's probability is not 0.

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
    if isinstance(temperature, torch.Tensor):
        scale = temperature.squeeze(-1) ** 2 if temperature.dim() > 0 else temperature ** 2
    else:
        scale = temperature ** 2
    plain = plain_first(lambda: ((log_probs_T.exp() * (log_probs_T - log_probs_S)).sum(dim=-1)
                                 * scale).mean(), log_probs_T)
    if plain is not None:
        return plain
    kl_rows = (log_probs_T.exp() * _log_ratio(log_probs_T, log_probs_S)).sum(dim=-1)
    return (kl_rows * scale).mean()


# ============================================================================ literature
# Losses from the KD literature, each checked against its paper's formula in
# tests/test_literature_losses.py. Every one of them carries the τ² factor of Hinton et al.
# (as 'kl' does), so their gradient scale does not shrink as τ grows.
#
# DKD, DIST and logit standardisation are in textbrewer.losses.structured.
#
# Some take parameters. Their registry entry is then both the loss with the paper's default
# parameters (``'dkd'``) and, called with parameters instead of tensors, a builder
# (``['dkd', alpha, beta]``, resolved by :meth:`Registry.resolve`).

import functools  # noqa: E402  (appended section)
import math  # noqa: E402
from typing import Any, Callable, Tuple  # noqa: E402

__all__ += ["kd_reverse_kl_loss", "kd_jsd_loss", "reverse_kl_loss", "jsd_loss", "bce_loss"]


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
# ``kd_reverse_kl_loss`` and ``kd_jsd_loss`` are the response-level losses ('reverse_kl',
# 'jsd' here): τ²-scaled, mean over rows. textbrewer.losses.token has token-level ones
# (``token_reverse_kl_loss``, ``token_jsd_loss``: no τ², mean over valid tokens, β-JSD).
@KD_LOSSES.register("reverse_kl")
def kd_reverse_kl_loss(logits_S: torch.Tensor, logits_T: torch.Tensor,
                       temperature: Temperature = 1) -> torch.Tensor:
    """Reverse KL: τ² · KL(q ‖ p), q = softmax(S/τ) the student's, p = softmax(T/τ).

    ``Σ_c q_c (log q_c − log p_c)`` per row, times τ², mean over rows. Mode-seeking: the
    student is pushed to put its mass where the teacher has mass, rather than to cover all
    of it (used for generative LMs, e.g. MiniLLM, Gu et al. 2023, arXiv:2306.08543).
    Registered as ``'reverse_kl'``; the token-level loss for LMs, without τ², is
    :func:`textbrewer.losses.token.token_reverse_kl_loss`.

    A class whose student logit is -inf adds 0 (0 · log 0 = 0). A class whose teacher logit
    is -inf (masked) while the student's is finite makes KL(q‖p) infinite, which is an
    error that says so (mask the student's logits at the same classes, or use ``'kl'`` /
    ``'jsd'``, finite there); finding out costs one host sync per call.

    Args:
        logits_S: student logits, (N, C) or (B, L, C).
        logits_T: teacher logits, same shape.
        temperature: float, or a tensor of the logits' shape without C.

    Returns:
        Scalar tensor; 0 when the two distributions are equal.

    Raises:
        ValueError: the teacher's logits are -inf where the student's are not.
    """
    rows_S, rows_T, tau, tau_squared = _as_rows(logits_S, logits_T, temperature, "reverse_kl")
    log_q = F.log_softmax(rows_S / tau, dim=-1)
    log_p = F.log_softmax(rows_T / tau, dim=-1)
    plain = plain_first(lambda: ((log_q.exp() * (log_q - log_p)).sum(dim=-1)
                                 * tau_squared).mean(), log_q)
    if plain is not None:
        return plain
    per_row = (log_q.exp() * _log_ratio(log_q, log_p)).sum(dim=-1)
    loss = (per_row * tau_squared).mean()
    if not bool(torch.isfinite(loss)):  # the one host sync; the inputs are scanned only now
        leaked = torch.isneginf(rows_T) & ~torch.isneginf(rows_S)
        if bool(leaked.any()):
            raise ValueError(
                f"reverse_kl: the teacher's logits are -inf (a masked class) at "
                f"{int(leaked.sum())} entries where the student's are finite, so KL(q‖p) is "
                f"infinite: the student puts mass where the teacher has none. Mask the "
                f"student's logits at the same classes (logits_S.masked_fill("
                f"torch.isneginf(logits_T), float('-inf'))), or use 'kl' or 'jsd', which are "
                f"finite there")
    return loss


def reverse_kl_loss(logits_S: torch.Tensor, logits_T: torch.Tensor,
                    temperature: Temperature = 1) -> torch.Tensor:
    """Alias of :func:`kd_reverse_kl_loss` (τ² · KL(q ‖ p), mean over rows).

    Kept because ``textbrewer.losses`` exported the response-level reverse KL under this
    name before; ``textbrewer.losses.token``'s old ``reverse_kl_loss`` is the token-level
    loss (no τ²), now :func:`~textbrewer.losses.token.token_reverse_kl_loss`. Prefer the
    names that say which one.
    """
    return kd_reverse_kl_loss(logits_S, logits_T, temperature)


@KD_LOSSES.register("jsd")
def kd_jsd_loss(logits_S: torch.Tensor, logits_T: torch.Tensor,
                temperature: Temperature = 1) -> torch.Tensor:
    """Jensen–Shannon divergence between the softened distributions, times τ².

    Convention: natural logarithm, equal weights,
    ``JSD(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)`` with ``m = ½ (p + q)``, p = softmax(T/τ),
    q = softmax(S/τ); per row it lies in [0, ln 2] before the τ² factor. (The generalised
    JSD of Agarwal et al. 2024, arXiv:2306.13649, with β = 0.5.) Mean over rows.
    Registered as ``'jsd'``; the token-level β-JSD for LMs, without τ², is
    :func:`textbrewer.losses.token.token_jsd_loss`.

    Always finite: a class with a -inf logit on one side adds that side's 0 · log 0 = 0.

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

    def plain_jsd() -> torch.Tensor:
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2)
        return ((0.5 * (log_p.exp() * (log_p - log_m)).sum(dim=-1)
                 + 0.5 * (log_q.exp() * (log_q - log_m)).sum(dim=-1)) * tau_squared).mean()

    plain = plain_first(plain_jsd, log_p)
    if plain is not None:
        return plain
    # Clamped to the lowest finite value (a no-op on finite entries): logsumexp's gradient
    # at (-inf, -inf) is NaN, even where it is multiplied by 0 afterwards.
    lowest = torch.finfo(log_p.dtype).min
    log_m = torch.logsumexp(torch.stack([log_p, log_q]).clamp(min=lowest), dim=0) \
        - math.log(2)
    per_row = 0.5 * (log_p.exp() * _log_ratio(log_p, log_m)).sum(dim=-1) \
        + 0.5 * (log_q.exp() * _log_ratio(log_q, log_m)).sum(dim=-1)
    return (per_row * tau_squared).mean()


def jsd_loss(logits_S: torch.Tensor, logits_T: torch.Tensor,
             temperature: Temperature = 1) -> torch.Tensor:
    """Alias of :func:`kd_jsd_loss` (τ² · JSD with equal weights, mean over rows).

    Kept because ``textbrewer.losses`` exported the response-level JSD under this name
    before; ``textbrewer.losses.token``'s old ``jsd_loss`` is the token-level β-JSD (no
    τ²), now :func:`~textbrewer.losses.token.token_jsd_loss`. Prefer the names that say
    which one.
    """
    return kd_jsd_loss(logits_S, logits_T, temperature)


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

    Entries where the teacher's logit is -inf (masked labels) are left out of the mean,
    whatever the student's logit there; a student logit of -inf gives 0 against a target
    of 0 and ``+inf`` against a positive one.

    Args:
        logits_S: student logits, (N, C) or (B, L, C).
        logits_T: teacher logits, same shape.
        temperature: float, or a tensor of the logits' shape without C.

    Returns:
        Scalar tensor.
    """
    rows_S, rows_T, tau, tau_squared = _as_rows(logits_S, logits_T, temperature, "bce")
    masked = torch.isneginf(rows_T)
    scaled_S = rows_S / tau
    targets = torch.sigmoid(rows_T / tau)
    absent = torch.isneginf(scaled_S)  # σ = 0: the entry is 0 · log 0 + log 1, or +inf
    ignored = masked | absent
    per_entry = F.binary_cross_entropy_with_logits(torch.where(ignored, 0.0, scaled_S),
                                                   targets, reduction="none")
    per_entry = torch.where(ignored, 0.0, per_entry)
    per_entry = torch.where(absent & ~masked & (targets > 0), float("inf"), per_entry)
    per_row = rescaled(per_entry.mean(dim=-1), rows_S.size(-1), (~masked).sum(dim=-1))
    return (per_row * tau_squared).mean()
