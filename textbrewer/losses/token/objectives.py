"""Token-level objectives of 2024–2025 LM distillation papers (see :mod:`textbrewer.losses.token`).

Per valid token (vocabulary V, temperature τ): p = softmax(z_T / τ) is the teacher's
distribution, q = softmax(z_S / τ) the student's. Validity and normalisation are those of
every token loss here (``labels != ignore_index`` and ``mask != 0``; ``Σ_valid / max(count,
1)``, or ``num_tokens`` for the whole accumulation window); no τ² factor unless
``scale_by_temperature_squared=True``; the optional hard-label CE at τ = 1 on the same
tokens: ``loss = kd_weight · kd + ce_weight · ce``.

==========  ===================================================================================
name        per-token value
==========  ===================================================================================
``taid``    KL(p_t ‖ q), p_t = softmax(((1−t)·sg(z_S) + t·z_T) / τ)  (Shing et al., ICLR 2025);
            t from :class:`TAIDSchedule`; sg = stop-gradient
``akl``     w_head·KL(p‖q) + w_tail·KL(q‖p), w = g / (g_head + g_tail) from the head/tail
            gaps Σ|p − q| (Wu et al., COLING 2025); the weights carry no gradient
==========  ===================================================================================

:func:`distillm2_loss` (Ko et al., ICML 2025) takes two batches: the student's logits on
teacher-generated responses (skew KL, pulled up) and on its own responses (skew reverse
KL, pushed down).

These objectives have a dense path and a ``chunk_size`` path (rows in chunks under
activation checkpointing: the softmax temporaries of one chunk at a time, recomputed in
backward); they have no fused path (:func:`~textbrewer.losses.token.fused_token_distillation_loss`
implements :data:`~textbrewer.losses.token.DIVERGENCES` only).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .paths import (_check_chunk_size, _check_reduction, _denominator, _outputs,
                    _valid_tokens)
from .spec import TokenCount, _aligned_width, _fit, _kl_rows, _log_mix, _make_spec, _up

__all__ = ["OBJECTIVES", "TAID_SCHEDULES", "taid_loss", "akl_loss", "akl_weights",
           "distillm2_loss", "TAIDSchedule"]

#: the objectives of this module that ``LMDistillationConfig(divergence=...)`` accepts
OBJECTIVES = ("taid", "akl")
#: how :class:`TAIDSchedule` moves t (``mode=``)
TAID_SCHEDULES = ("adaptive", "linear")

Loss = Union[torch.Tensor, Dict[str, torch.Tensor]]


# ---------------------------------------------------------------------------------------
# per-token rows (rows = tokens, columns = vocabulary; logits already aligned)
# ---------------------------------------------------------------------------------------
def _taid_rows(z_S: torch.Tensor, z_T: torch.Tensor, t: float, tau: float) -> torch.Tensor:
    """KL(p_t ‖ q) per row; the target's student part is detached."""
    z_S, z_T = _up(z_S), _up(z_T).to(_up(z_S).dtype)
    if t == 1.0:  # the ends exactly (0 · (−inf) would be NaN on a padded column)
        target = z_T
    elif t == 0.0:
        target = z_S.detach()
    else:
        target = (1.0 - t) * z_S.detach() + t * z_T
    log_p_t = torch.log_softmax(target / tau, dim=-1)
    log_q = torch.log_softmax(z_S / tau, dim=-1)
    return _kl_rows(log_p_t, log_q)


def _akl_weight_rows(p: torch.Tensor, q: torch.Tensor,
                     mu: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(w_head, w_tail) per row from probabilities p (teacher) and q (student), no grad."""
    p, q = p.detach(), q.detach()
    p_sorted, order = p.sort(dim=-1, descending=True, stable=True)
    gap = (p_sorted - q.gather(-1, order)).abs()
    before = p_sorted.cumsum(-1) - p_sorted  # teacher mass strictly before each token
    head = before < mu  # the shortest prefix whose mass reaches mu
    g_head = gap.masked_fill(~head, 0.0).sum(-1)
    g_tail = gap.masked_fill(head, 0.0).sum(-1)
    total = g_head + g_tail
    safe = total.clamp(min=torch.finfo(total.dtype).tiny)
    half = torch.full_like(total, 0.5)  # q = p: both KLs are 0, any weights do
    return (torch.where(total > 0, g_head / safe, half),
            torch.where(total > 0, g_tail / safe, half))


def _akl_rows(z_S: torch.Tensor, z_T: torch.Tensor, mu: float, tau: float) -> torch.Tensor:
    z_S = _up(z_S)
    log_q = torch.log_softmax(z_S / tau, dim=-1)
    log_p = torch.log_softmax(_up(z_T).to(z_S.dtype) / tau, dim=-1)
    w_head, w_tail = _akl_weight_rows(log_p.exp(), log_q.exp(), mu)
    return w_head * _kl_rows(log_p, log_q) + w_tail * _kl_rows(log_q, log_p)


def _skew_kl_rows(z_S: torch.Tensor, z_T: torch.Tensor, alpha: float,
                  tau: float) -> torch.Tensor:
    """KL(p ‖ αp + (1−α)q) per row."""
    z_S = _up(z_S)
    log_q = torch.log_softmax(z_S / tau, dim=-1)
    log_p = torch.log_softmax(_up(z_T).to(z_S.dtype) / tau, dim=-1)
    return _kl_rows(log_p, _log_mix(log_p, log_q, alpha))


def _skew_reverse_kl_rows(z_S: torch.Tensor, z_T: torch.Tensor, alpha: float, tau: float,
                          detach_mixture: bool) -> torch.Tensor:
    """KL(q ‖ αq + (1−α)p) per row (the student part of the mixture detached if asked)."""
    z_S = _up(z_S)
    log_q = torch.log_softmax(z_S / tau, dim=-1)
    log_p = torch.log_softmax(_up(z_T).to(z_S.dtype) / tau, dim=-1)
    mix = _log_mix(log_q.detach() if detach_mixture else log_q, log_p, alpha)
    return _kl_rows(log_q, mix)


# ---------------------------------------------------------------------------------------
# shared plumbing: inputs, chunks, reduction
# ---------------------------------------------------------------------------------------
def _rows(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z_S: torch.Tensor,
          z_T: torch.Tensor, chunk_size: Optional[int]) -> torch.Tensor:
    """fn over all rows, or ``chunk_size`` rows at a time under activation checkpointing."""
    n = z_S.shape[0]
    if chunk_size is None or n <= chunk_size:
        return fn(z_S, z_T)
    grad = torch.is_grad_enabled() and z_S.requires_grad
    parts = []
    for start in range(0, n, chunk_size):
        s, t = z_S[start:start + chunk_size], z_T[start:start + chunk_size]
        parts.append(checkpoint(fn, s, t, use_reentrant=False) if grad else fn(s, t))
    return torch.cat(parts)


def _check_unit(name: str, value: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in {'(' if low_open else '['}0, 1], "
                         f"got {value!r}")
    value = float(value)
    if not ((0.0 < value) if low_open else (0.0 <= value)) or value > 1.0:
        raise ValueError(f"{name} must be a number in {'(' if low_open else '['}0, 1], "
                         f"got {value!r}")
    return value


class _Inputs:
    """Flattened, validated inputs of one objective (N = tokens)."""

    def __init__(self, logits_S: torch.Tensor, logits_T: torch.Tensor,
                 labels: Optional[torch.Tensor], mask: Optional[torch.Tensor], *,
                 temperature: float, scale_by_temperature_squared: bool, ce_weight: float,
                 kd_weight: float, ignore_index: int, num_tokens: Optional[TokenCount],
                 reduction: str, chunk_size: Optional[int], vocab_alignment: Optional[str],
                 what: str):
        self.spec = _make_spec("forward_kl", temperature, 0.5, 0.1, "renormalize",
                               scale_by_temperature_squared, ce_weight, vocab_alignment,
                               kd_weight)
        self.chunk_size = _check_chunk_size(chunk_size, None)
        _check_reduction(reduction, "dense")
        self.reduction = reduction
        if not isinstance(logits_S, torch.Tensor) or logits_S.dim() < 2:
            raise ValueError(f"{what}: logits_S must be a (N, V) or (B, L, V) tensor, got "
                             f"{tuple(getattr(logits_S, 'shape', ()))}")
        if not isinstance(logits_T, torch.Tensor):
            raise ValueError(f"{what}: logits_T must be a tensor of teacher logits, got "
                             f"{type(logits_T).__name__} (a cached top-k teacher has too "
                             f"little of the distribution for this objective)")
        lead = logits_S.shape[:-1]
        if tuple(logits_T.shape[:-1]) != tuple(lead):
            raise ValueError(f"{what}: teacher logits {tuple(logits_T.shape)} and student "
                             f"logits {tuple(logits_S.shape)} differ in their token dimensions")
        if self.spec.ce_weight > 0 and labels is None:
            raise ValueError(f"{what}: ce_weight > 0 needs labels")
        self.lead, n = lead, math.prod(lead)
        v_S, v_T = logits_S.shape[-1], logits_T.shape[-1]
        self.width = _aligned_width(self.spec, v_S, v_T)
        self.z_S = _fit(logits_S.reshape(n, v_S), self.width)
        self.z_T = _fit(logits_T.reshape(n, v_T).detach(), self.width)
        self.raw_S = logits_S.reshape(n, v_S)
        self.valid = _valid_tokens(lead, logits_S.device, labels, mask, ignore_index, "logits_S")
        self.labels = None if labels is None else labels.reshape(-1).to(logits_S.device).long()
        wide = torch.float64 if logits_S.dtype == torch.float64 else torch.float32
        self.denom = _denominator(reduction, self.valid, num_tokens, wide)

    def finish(self, rows: torch.Tensor, return_dict: bool) -> Loss:
        """The reduced loss (and parts) from the per-token divergence rows."""
        spec, valid = self.spec, self.valid
        kd_rows = rows.masked_fill(~valid, 0.0) * spec.kd_scale  # invalid rows may be inf
        ce_rows = None
        if spec.ce_weight != 0:
            ce = F.cross_entropy(_up(self.raw_S), self.labels.clamp(min=0), reduction="none")
            ce_rows = ce.masked_fill(~valid, 0.0)
        if self.reduction == "none":
            kd, ce = kd_rows.reshape(self.lead), (
                None if ce_rows is None else ce_rows.reshape(self.lead))
        else:
            denom = self.denom if self.reduction == "mean" else 1.0
            kd = kd_rows.sum() / denom
            ce = None if ce_rows is None else ce_rows.sum() / denom
        loss = kd if spec.kd_weight == 1.0 else kd * spec.kd_weight
        if ce is not None:
            loss = loss + spec.ce_weight * ce
        return _outputs(loss, kd.detach(), None if ce is None else ce.detach(), return_dict)


# ---------------------------------------------------------------------------------------
# TAID
# ---------------------------------------------------------------------------------------
def taid_loss(logits_S: torch.Tensor, logits_T: torch.Tensor,
              labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, *,
              t: float, temperature: float = 1.0, scale_by_temperature_squared: bool = False,
              ce_weight: float = 0.0, kd_weight: float = 1.0, ignore_index: int = -100,
              num_tokens: Optional[TokenCount] = None, reduction: str = "mean",
              chunk_size: Optional[int] = None, vocab_alignment: Optional[str] = None,
              return_dict: bool = False) -> Loss:
    """TAID (Shing et al., "TAID: Temporally Adaptive Interpolated Distillation", ICLR 2025).

    Per valid token, the target interpolates the (detached) student and the teacher in
    logit space, and the student is pulled to it by the forward KL::

        p_t = softmax(((1 − t)·sg(z_S) + t·z_T) / τ),   loss_token = KL(p_t ‖ q)

    t = 1 is the forward KL; t = 0 gives 0 (the target is the student itself). t comes
    from a :class:`TAIDSchedule`. The value is the true KL (0 when q = p_t); the official
    code reports the cross-entropy −Σ p_t log q instead (same gradient, larger value).

    Args:
        logits_S: (N, V) or (B, L, V) student logits.
        logits_T: teacher logits of the same shape (never receives a gradient).
        labels: (N,) / (B, L), ``ignore_index`` at ignored tokens (and the CE targets).
        mask: (N,) / (B, L), 1 = keep.
        t: interpolation in [0, 1].
        chunk_size: None (dense) or rows per checkpointed chunk.

    ``temperature``, ``scale_by_temperature_squared``, ``ce_weight``, ``kd_weight``,
    ``ignore_index``, ``num_tokens``, ``reduction``, ``vocab_alignment`` and ``return_dict``
    are as in :func:`~textbrewer.losses.token.token_distillation_loss`.

    Returns:
        The scalar loss (per token with ``reduction='none'``), or ``{'loss', 'kd'[, 'ce']}``.

    Raises:
        ValueError: t outside [0, 1], mismatching shapes, or a bad shared option.
    """
    t = _check_unit("t (taid)", t)
    inputs = _Inputs(logits_S, logits_T, labels, mask, temperature=temperature,
                     scale_by_temperature_squared=scale_by_temperature_squared,
                     ce_weight=ce_weight, kd_weight=kd_weight, ignore_index=ignore_index,
                     num_tokens=num_tokens, reduction=reduction, chunk_size=chunk_size,
                     vocab_alignment=vocab_alignment, what="taid_loss")
    tau = inputs.spec.temperature
    rows = _rows(lambda s, z: _taid_rows(s, z, t, tau), inputs.z_S, inputs.z_T,
                 inputs.chunk_size)
    return inputs.finish(rows, return_dict)


class TAIDSchedule:
    """The interpolation t of TAID over training, as state that checkpoints keep.

    ``mode='linear'``: after each optimizer step, ``t = t_start + (t_end − t_start)·progress``
    (progress = steps done / total steps).

    ``mode='adaptive'`` (the update rule of the paper's Algorithm 1 and its official code;
    two differences: J here is the true KL, the official code feeds the soft cross-entropy
    −Σ p_t log q, larger by the entropy of p_t, so the relative changes differ; and t moves
    once per optimizer step on the window's loss summed over ranks, where the official code
    moves it at every forward pass): the first update
    only records the loss J; from then on, with J_prev the previous update's loss::

        δ = (J_prev − J) / (J_prev + 1e-15)              relative decrease of the loss
        m = β·m + (1 − β)·δ                              momentum (m₀ = 0)
        t = min(t_end, max(t_linear, t + α·sigmoid(m)·(1 − t)))

    so t never falls behind the linear schedule and moves faster while the loss drops.

    Args:
        t_start: t at the start, in [0, 1) (paper: 0.4).
        t_end: the largest t, in (t_start, 1] (paper: 1.0).
        alpha: step size α of the adaptive update, in [0, 1] (paper: 5e-4).
        beta: momentum β, in [0, 1) (paper: 0.99).
        mode: ``'adaptive'`` or ``'linear'``.

    Raises:
        ValueError: an option outside its range.
    """

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
                 beta: float = 0.99, mode: str = "adaptive"):
        if mode not in TAID_SCHEDULES:
            raise ValueError(f"mode must be one of {list(TAID_SCHEDULES)}, got {mode!r}")
        t_start, t_end = _check_unit("t_start", t_start), _check_unit("t_end", t_end)
        if not t_start < t_end:
            raise ValueError(f"t_start must be < t_end, got t_start={t_start}, t_end={t_end}")
        alpha, beta = _check_unit("alpha", alpha), _check_unit("beta", beta)
        if beta == 1.0:
            raise ValueError("beta must be < 1 (the momentum would never move), got 1.0")
        self.t_start, self.t_end, self.alpha, self.beta, self.mode = \
            t_start, t_end, alpha, beta, mode
        self.reset()

    def reset(self) -> None:
        """Back to t_start, no loss seen, zero momentum (a fresh run)."""
        self.t = self.t_start
        self.prev_loss: Optional[float] = None
        self.momentum = 0.0

    def linear(self, progress: float) -> float:
        """t_start + (t_end − t_start) · progress, progress clamped to [0, 1]."""
        progress = min(max(float(progress), 0.0), 1.0)
        return self.t_start + (self.t_end - self.t_start) * progress

    def update(self, loss: Optional[float], progress: float) -> float:
        """One step of the schedule after an optimizer step; returns the new t.

        Args:
            loss: the step's TAID loss (any float; unused by ``'linear'``).
            progress: optimizer steps done / total steps.
        """
        if self.mode == "linear":
            self.t = self.linear(progress)
            return self.t
        loss = float(loss)
        if not math.isfinite(loss):
            return self.t  # a skipped (non-finite) step moves nothing
        if self.prev_loss is None:
            self.prev_loss = loss
            return self.t
        relative = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * relative
        delta = self.alpha * (1.0 / (1.0 + math.exp(-self.momentum))) * (1.0 - self.t)
        self.t = min(self.t_end, max(self.linear(progress), self.t + delta))
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> Dict[str, Optional[float]]:
        return {"t": self.t, "prev_loss": self.prev_loss, "momentum": self.momentum}

    def load_state_dict(self, state: Dict[str, Optional[float]]) -> None:
        self.t = float(state["t"])
        self.prev_loss = None if state.get("prev_loss") is None else float(state["prev_loss"])
        self.momentum = float(state.get("momentum", 0.0))

    def __repr__(self) -> str:
        return (f"TAIDSchedule(t={self.t:.6g}, t_start={self.t_start}, t_end={self.t_end}, "
                f"alpha={self.alpha}, beta={self.beta}, mode={self.mode!r})")


# ---------------------------------------------------------------------------------------
# AKL
# ---------------------------------------------------------------------------------------
def akl_weights(logits_S: torch.Tensor, logits_T: torch.Tensor, *, mu: float = 0.5,
                temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """AKL's weights (w_head, w_tail) per token, each (N,) / (B, L), without gradient.

    The teacher's tokens sorted by p, the head is the shortest prefix whose mass reaches
    ``mu`` (a token is in the head when the mass strictly before it is < mu, so the
    most likely token always is)::

        g_head = Σ_head |p − q|,  g_tail = Σ_tail |p − q|,
        w_head = g_head / (g_head + g_tail),  w_tail = g_tail / (g_head + g_tail)

    and 0.5, 0.5 where p = q. Ties in p are broken by token id (a stable sort).

    Raises:
        ValueError: mu outside (0, 1], or mismatching shapes.
    """
    mu = _check_unit("mu (akl)", mu, low_open=True)
    if logits_S.shape != logits_T.shape:
        raise ValueError(f"akl_weights: logits_S {tuple(logits_S.shape)} and logits_T "
                         f"{tuple(logits_T.shape)} must have the same shape")
    spec = _make_spec("forward_kl", temperature, 0.5, 0.1, "renormalize", False, 0.0, None)
    z_S = _up(logits_S.detach())
    q = torch.softmax(z_S / spec.temperature, dim=-1)
    p = torch.softmax(_up(logits_T.detach()).to(z_S.dtype) / spec.temperature, dim=-1)
    return _akl_weight_rows(p, q, mu)


def akl_loss(logits_S: torch.Tensor, logits_T: torch.Tensor,
             labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, *,
             mu: float = 0.5, temperature: float = 1.0,
             scale_by_temperature_squared: bool = False, ce_weight: float = 0.0,
             kd_weight: float = 1.0, ignore_index: int = -100,
             num_tokens: Optional[TokenCount] = None, reduction: str = "mean",
             chunk_size: Optional[int] = None, vocab_alignment: Optional[str] = None,
             return_dict: bool = False) -> Loss:
    """AKL (Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for
    Large Language Models", COLING 2025).

    Per valid token, an adaptive mix of the forward and the reverse KL::

        loss_token = w_head · KL(p‖q) + w_tail · KL(q‖p)

    with the weights of :func:`akl_weights` (detached: no gradient flows through them).
    The forward KL fixes the head (the teacher's likely tokens), the reverse KL the tail.
    The head is the shortest prefix of the teacher's sorted tokens whose mass reaches μ
    (the paper's M = argmin_m Σ_{j≤m} p_j ≥ μ); the authors' released code puts the token
    that crosses μ in the tail instead, which only matters when it exists.

    Args:
        mu: μ in (0, 1] (paper: 0.5).

    The other arguments are as in :func:`taid_loss`.

    Returns:
        The scalar loss (per token with ``reduction='none'``), or ``{'loss', 'kd'[, 'ce']}``.

    Raises:
        ValueError: mu outside (0, 1], mismatching shapes, or a bad shared option.
    """
    mu = _check_unit("mu (akl)", mu, low_open=True)
    inputs = _Inputs(logits_S, logits_T, labels, mask, temperature=temperature,
                     scale_by_temperature_squared=scale_by_temperature_squared,
                     ce_weight=ce_weight, kd_weight=kd_weight, ignore_index=ignore_index,
                     num_tokens=num_tokens, reduction=reduction, chunk_size=chunk_size,
                     vocab_alignment=vocab_alignment, what="akl_loss")
    tau = inputs.spec.temperature
    rows = _rows(lambda s, z: _akl_rows(s, z, mu, tau), inputs.z_S, inputs.z_T,
                 inputs.chunk_size)
    return inputs.finish(rows, return_dict)


# ---------------------------------------------------------------------------------------
# DistiLLM-2
# ---------------------------------------------------------------------------------------
def distillm2_loss(logits_S_on_teacher: torch.Tensor, logits_T_on_teacher: torch.Tensor,
                   logits_S_on_student: torch.Tensor, logits_T_on_student: torch.Tensor,
                   mask_on_teacher: Optional[torch.Tensor] = None,
                   mask_on_student: Optional[torch.Tensor] = None, *,
                   alpha_teacher: float = 0.1, alpha_student: float = 0.1,
                   weight_teacher: float = 1.0, weight_student: float = 1.0,
                   temperature: float = 1.0, detach_mixture: bool = True,
                   num_tokens_on_teacher: Optional[TokenCount] = None,
                   num_tokens_on_student: Optional[TokenCount] = None,
                   return_dict: bool = False) -> Loss:
    """DistiLLM-2's contrastive objective (Ko et al., "DistiLLM-2: A Contrastive Approach
    Boosts the Distillation of LLMs", ICML 2025).

    Two batches of the same prompts: responses generated by the teacher (y_t) and by the
    student (y_s), both scored by both models. On the teacher's responses the skew KL pulls
    the student's likelihood up; on the student's own the skew reverse KL pushes it down::

        loss = weight_teacher · mean_{tokens of y_t} KL(p ‖ α₁p + (1−α₁)q)
             + weight_student · mean_{tokens of y_s} KL(q ‖ α₂q + (1−α₂)p)

    Each mean is over its batch's valid tokens (``mask != 0``), or divided by
    ``num_tokens_on_*`` (that batch's tokens over the whole window). With
    ``detach_mixture=True`` (the official code) the student's share α₂q of the skew reverse
    KL's mixture is a constant, so that term's gradient flows only through its first q
    (the skew KL's mixture keeps its gradient, as there). Deviations from the official
    code: per-token means over the batch rather than per-sequence means then a batch mean;
    the α curriculum (adaptive α per sequence, off by default there) is not implemented.

    Args:
        logits_S_on_teacher, logits_T_on_teacher: (N₁, V) / (B₁, L₁, V) on teacher responses.
        logits_S_on_student, logits_T_on_student: (N₂, V) / (B₂, L₂, V) on student responses.
        mask_on_teacher, mask_on_student: 1 = a response token to score (shift labels yourself).
        alpha_teacher: α₁ of the skew KL, in [0, 1] (paper: 0.1).
        alpha_student: α₂ of the skew reverse KL, in [0, 1] (paper: 0.1).
        weight_teacher, weight_student: weights ≥ 0 of the two terms.
        temperature: τ > 0 for both distributions.
        return_dict: ``{'loss', 'teacher_responses', 'student_responses'}`` (parts detached).

    Raises:
        ValueError: an α outside [0, 1], a negative weight, or mismatching shapes.
    """
    alpha_teacher = _check_unit("alpha_teacher", alpha_teacher)
    alpha_student = _check_unit("alpha_student", alpha_student)
    for name, weight in (("weight_teacher", weight_teacher), ("weight_student", weight_student)):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {weight!r}")
    common = dict(temperature=temperature, scale_by_temperature_squared=False, ce_weight=0.0,
                  kd_weight=1.0, ignore_index=-100, reduction="mean", chunk_size=None,
                  vocab_alignment=None)
    on_teacher = _Inputs(logits_S_on_teacher, logits_T_on_teacher, None, mask_on_teacher,
                         num_tokens=num_tokens_on_teacher, what="distillm2_loss (teacher "
                         "responses)", **common)
    on_student = _Inputs(logits_S_on_student, logits_T_on_student, None, mask_on_student,
                         num_tokens=num_tokens_on_student, what="distillm2_loss (student "
                         "responses)", **common)
    tau = on_teacher.spec.temperature
    pull = on_teacher.finish(_skew_kl_rows(on_teacher.z_S, on_teacher.z_T, alpha_teacher, tau),
                             False)
    push = on_student.finish(_skew_reverse_kl_rows(on_student.z_S, on_student.z_T,
                                                   alpha_student, tau, detach_mixture), False)
    loss = float(weight_teacher) * pull + float(weight_student) * push
    if not return_dict:
        return loss
    return {"loss": loss, "teacher_responses": pull.detach(),
            "student_responses": push.detach()}
