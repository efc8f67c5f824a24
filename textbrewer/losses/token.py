"""Token-level distillation losses for language models: dense, chunked, and fused with the LM heads.

Per valid token (vocabulary V, temperature τ): p = softmax(z_T / τ) is the teacher's
distribution and q = softmax(z_S / τ) the student's. Every divergence here is a TRUE
divergence (the teacher's entropy is included), so it is 0 when q = p:

===================  ========================================================================
name                 per-token value
===================  ========================================================================
``forward_kl``       KL(p‖q) = Σ_v p_v (log p_v − log q_v)
``reverse_kl``       KL(q‖p) = Σ_v q_v (log q_v − log p_v)
``jsd``              m = (1−β)q + βp;  JSD_β = β·KL(p‖m) + (1−β)·KL(q‖m);  β = 0 is KL(p‖q)
                     and β = 1 is KL(q‖p) *by definition* (TRL GKD / Liger convention)
``skew_kl``          KL(p ‖ αp + (1−α)q)
``skew_reverse_kl``  KL(q ‖ αq + (1−α)p)
``tv``               ``½ Σ_v |p_v − q_v|``
``topk_kl``          KL(p̂‖q) against a cached teacher's top-k (see :class:`TopKTeacher`)
===================  ========================================================================

Validity and normalisation. A token counts when ``labels != ignore_index`` (if labels are
given) and ``mask != 0`` (if a mask is given). The default reduction is
``Σ_valid value / max(count, 1)``; ``num_tokens`` replaces the local count by the count of
the whole accumulation window (summed over micro-batches and DDP ranks), so that k
micro-batches of B/k add up exactly to one batch of B. Labels are aligned with the logits
(shift them yourself for a causal LM).

Temperature convention: no τ² factor unless ``scale_by_temperature_squared=True`` (Liger and
TRL do not apply it; Hinton et al. do, to keep gradient magnitudes comparable across τ).
The optional hard-label cross-entropy is always computed at τ = 1 on the same valid tokens,
with the same denominator, and weighted by ``ce_weight``:
``loss = kd + ce_weight · ce`` where ``kd`` includes the τ² factor when it is on.

Three paths compute the same value and the same gradients:

* dense: plain autograd over all tokens (``chunk_size=None``);
* chunked: logits given, processed ``chunk_size`` tokens at a time by a custom
  ``autograd.Function`` that computes the gradient wrt the student logits inside forward,
  so the fp32 up-cast and softmax intermediates exist for one chunk at a time;
* fused: hidden states and LM-head weights given; each chunk's logits are computed,
  used and dropped, so no [N, V] tensor of either model exists. Backward only rescales the
  stored gradients by grad_output. This path is wrapped in ``torch.compiler.disable``: a
  ``torch.compile``'d caller graph-breaks around it and it runs eagerly (a Python loop
  over chunks with a nested autograd call is not something to trace).

Teacher inputs never receive gradients (they are treated as constants on every path).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import TOKEN_LOSSES

__all__ = ["TopKTeacher", "TokenDistillationLoss", "token_distillation_loss",
           "fused_token_distillation_loss", "count_valid_tokens", "forward_kl_loss",
           "reverse_kl_loss", "jsd_loss", "skew_kl_loss", "skew_reverse_kl_loss", "tv_loss",
           "topk_kl_loss", "DIVERGENCES"]

#: The divergences every path (dense, chunked, fused) implements.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv", "topk_kl")
_TAILS = ("renormalize", "uniform")
_ALIGNMENTS = (None, "pad", "truncate")
_REDUCTIONS = ("mean", "sum", "none")
DEFAULT_FUSED_CHUNK_SIZE = 1024

TokenCount = Union[int, torch.Tensor]


class TopKTeacher(NamedTuple):
    """A cached teacher: its k most likely tokens per position.

    Attributes:
        ids: (..., k) integer token ids (distinct within a row), any integer dtype.
        logprobs: (..., k) float teacher log-probabilities at temperature 1 (over the full
            vocabulary, so Σ exp(logprobs) ≤ 1; the rest is the tail mass).

    The teacher's full distribution p̂ is rebuilt from them according to ``tail``:

    * ``'renormalize'``: p̂ = softmax(logprobs / τ) on the k ids, 0 elsewhere;
    * ``'uniform'``: at τ = 1 the tail mass 1 − Σ exp(logprobs) is spread evenly over the
      other V − k ids; p̂ is that V-entry distribution tempered, softmax(log p̂₁ / τ).

    The student's side is always its full softmax over V, so ``topk_kl`` is the true
    KL(p̂‖q) between two distributions over V (0 when q = p̂).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor


@dataclass(frozen=True)
class _Spec:
    """The options that define the objective, validated once by :func:`_make_spec`."""

    divergence: str
    temperature: float
    beta: float
    alpha: float
    tail: str
    kd_scale: float
    ce_weight: float
    vocab_alignment: Optional[str]


def _make_spec(divergence: str, temperature: float, beta: float, alpha: float, tail: str,
               scale_by_temperature_squared: bool, ce_weight: float,
               vocab_alignment: Optional[str]) -> _Spec:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {list(DIVERGENCES)}, got {divergence!r}")
    temperature = float(temperature)
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta (jsd) must be in [0, 1], got {beta}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha (skew_kl) must be in [0, 1], got {alpha}")
    if tail not in _TAILS:
        raise ValueError(f"tail must be one of {list(_TAILS)}, got {tail!r}")
    if vocab_alignment not in _ALIGNMENTS:
        raise ValueError(f"vocab_alignment must be one of {list(_ALIGNMENTS)}, "
                         f"got {vocab_alignment!r}")
    ce_weight = float(ce_weight)
    if ce_weight < 0 or not math.isfinite(ce_weight):
        raise ValueError(f"ce_weight must be a finite number >= 0, got {ce_weight}")
    kd_scale = temperature ** 2 if scale_by_temperature_squared else 1.0
    return _Spec(divergence, temperature, float(beta), float(alpha), tail, kd_scale, ce_weight,
                 vocab_alignment)


# ---------------------------------------------------------------------------------------
# per-token divergences over log-probabilities (rows = tokens, columns = vocabulary)
# ---------------------------------------------------------------------------------------
def _up(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for the softmax; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor,
             a: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_v a_v (log a_v − log b_v) per row, a = exp(log_a).

    Entries with a_v = 0 contribute exactly 0 (0·log 0 = 0), in the value AND the gradient:
    the difference is zeroed before it meets the zero, so a −inf column (padded vocabulary,
    empty top-k tail) never produces 0·inf = NaN. (``masked_fill`` rather than
    ``torch.where``: the same gradient, a few times faster on CPU.)
    """
    if a is None:
        a = log_a.exp()
    return (a * (log_a - log_b).masked_fill(a == 0, 0.0)).sum(-1)


def _log_mix(log_x: torch.Tensor, log_y: torch.Tensor, weight_x: float) -> torch.Tensor:
    """log(w·x + (1−w)·y) from log x and log y, as a logsumexp of two terms.

    Never NaN when a probability underflows: the two operands are clamped to the dtype's
    most negative finite value, because logaddexp's gradient at (−inf, −inf) is NaN.
    """
    lowest = torch.finfo(log_x.dtype).min
    log_w = math.log(weight_x) if weight_x > 0 else float("-inf")
    log_1mw = math.log1p(-weight_x) if weight_x < 1 else float("-inf")
    return torch.logaddexp((log_x + log_w).clamp(min=lowest), (log_y + log_1mw).clamp(min=lowest))


def _divergence_rows(spec: _Spec, log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Per-token divergence (n,) from student log q and teacher log p, both (n, V)."""
    name = spec.divergence
    if name == "jsd":
        beta = spec.beta
        if beta == 0.0:  # the ends are definitions (TRL/Liger), not limits of the formula
            return _kl_rows(log_p, log_q)
        if beta == 1.0:
            return _kl_rows(log_q, log_p)
        log_m = _log_mix(log_p, log_q, beta)  # m = β·p + (1−β)·q
        return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)
    if name == "forward_kl":
        return _kl_rows(log_p, log_q)
    if name == "reverse_kl":
        return _kl_rows(log_q, log_p)
    if name == "skew_kl":
        return _kl_rows(log_p, _log_mix(log_p, log_q, spec.alpha))
    if name == "skew_reverse_kl":
        return _kl_rows(log_q, _log_mix(log_q, log_p, spec.alpha))
    if name == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"divergence {name!r} has no dense formula here")  # pragma: no cover


def _topk_rows(spec: _Spec, log_q: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
               want_target: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """KL(p̂‖q) per token against a top-k teacher, and optionally p̂ as an (n, V) tensor.

    Args:
        log_q: (n, V) student log-probabilities at τ.
        ids: (n, k) int64; logprobs: (n, k) teacher log-probs at τ = 1.
        want_target: also return p̂ (n, V), used for the gradient q − p̂.
    """
    vocab, k = log_q.shape[-1], ids.shape[-1]
    scaled = logprobs.to(log_q.dtype) / spec.temperature
    log_q_k = log_q.gather(-1, ids)
    if spec.tail == "renormalize" or k >= vocab:  # k = V: no tail, both options agree
        log_p_k = torch.log_softmax(scaled, dim=-1)
        p_k = log_p_k.exp()
        rows = _kl_rows(log_p_k, log_q_k, p_k)
        target = None
        if want_target:
            target = torch.zeros_like(log_q).scatter_(-1, ids, p_k)
        return rows, target
    # 'uniform': at τ = 1 every one of the V − k other ids has log-prob log(tail / (V − k)).
    n_tail = vocab - k
    tail = (1.0 - logprobs.to(log_q.dtype).exp().sum(-1)).clamp(min=0.0)
    log_u = (tail / n_tail).log() / spec.temperature  # (n,), −inf when the tail is empty
    log_z = torch.logsumexp(torch.cat([scaled, (log_u + math.log(n_tail)).unsqueeze(-1)], -1),
                            dim=-1)
    log_p_k = scaled - log_z.unsqueeze(-1)
    p_k = log_p_k.exp()
    log_p_u = log_u - log_z  # one tail entry
    p_u = log_p_u.exp()
    head = _kl_rows(log_p_k, log_q_k, p_k)
    # Σ_{j∉topk} p_u (log p_u − log q_j) = (V−k)·p_u·log p_u − p_u·(Σ_all log q − Σ_topk log q)
    sum_log_q_tail = log_q.sum(-1) - log_q_k.sum(-1)
    tail_rows = torch.where(p_u > 0, n_tail * p_u * torch.where(p_u > 0, log_p_u, 0.0)
                            - p_u * sum_log_q_tail, 0.0)
    target = None
    if want_target:
        target = p_u.unsqueeze(-1).expand_as(log_q).clone().scatter_(-1, ids, p_k)
    return head + tail_rows, target


# ---------------------------------------------------------------------------------------
# one chunk: value and gradient wrt the student's logits
# ---------------------------------------------------------------------------------------
def _aligned_width(spec: _Spec, v_S: int, v_T: int) -> int:
    """The common vocabulary width (see ``vocab_alignment``)."""
    if v_S == v_T:
        return v_S
    if spec.vocab_alignment == "pad":
        return max(v_S, v_T)
    if spec.vocab_alignment == "truncate":
        return min(v_S, v_T)
    raise ValueError(f"student vocabulary size {v_S} != teacher vocabulary size {v_T}; "
                     f"pass vocab_alignment='pad' (missing columns get -inf logits) or "
                     f"'truncate' if the ids agree on the shared range")


def _fit(z: torch.Tensor, width: int) -> torch.Tensor:
    """Logits over ``width`` columns: missing columns are impossible tokens (−inf, never 0)."""
    if z.shape[-1] == width:
        return z
    if z.shape[-1] > width:
        return z[..., :width]
    return F.pad(z, (0, width - z.shape[-1]), value=float("-inf"))


def _unalign(grad: torch.Tensor, v_S: int) -> torch.Tensor:
    """Gradient over the aligned vocabulary -> gradient over the student's own columns."""
    width = grad.shape[-1]
    if width == v_S:
        return grad
    if width > v_S:
        return grad[..., :v_S]
    return F.pad(grad, (0, v_S - width))


def _ce_rows(z_S: torch.Tensor, labels: torch.Tensor,
             want_grad: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Hard-label cross-entropy at τ = 1 per token, and its gradient softmax(z) − onehot."""
    safe = labels.clamp(min=0).unsqueeze(-1)  # ignore_index rows are masked by the caller
    lse = torch.logsumexp(z_S, dim=-1)
    rows = lse - z_S.gather(-1, safe).squeeze(-1)
    grad = None
    if want_grad:
        grad = (z_S - lse.unsqueeze(-1)).exp_()
        grad.scatter_add_(-1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
    return rows, grad


def _log_probs(spec: _Spec, z: torch.Tensor, width: int) -> torch.Tensor:
    """log softmax(z / τ) over the aligned vocabulary."""
    z = _fit(z, width)
    return torch.log_softmax(z / spec.temperature if spec.temperature != 1.0 else z, dim=-1)


def _chunk(spec: _Spec, student: list, teacher: Callable[[], object], v_T: int,
           labels: Optional[torch.Tensor], valid: torch.Tensor, need_grad: bool,
           denom: torch.Tensor
           ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Sums over one chunk's valid tokens, and the gradient of the chunk's share of the loss.

    Memory is the point of the chunked paths, so this function keeps few [n, V] tensors
    alive: it takes the student's logits out of ``student`` (a one-element list it empties,
    so that it holds the only reference and can drop them once used) and calls ``teacher()``
    only after the student's log-softmax exists; after the softmaxes it works in place on
    tensors it created, never on its inputs.

    Args:
        student: [z_S], (n, V_S) student logits in the compute dtype (fp32 or fp64), no grad.
        teacher: returns the (n, V_T) teacher logits, or a (ids, logprobs) pair for
            ``topk_kl``.
        v_T: the teacher's vocabulary size (unused for ``topk_kl``).
        labels: (n,) int64 or None; valid: (n,) bool.
        need_grad: compute the gradient.
        denom: 0-dim divisor of the loss (the gradient is divided by it).

    Returns:
        kd_sum (τ² factor included), ce_sum (None when ``ce_weight`` is 0), and the gradient
        of ``(kd_sum + ce_weight · ce_sum) / denom`` wrt z_S (n, V_S), or None.
    """
    z_S = student.pop()
    v_S = z_S.shape[-1]
    tau = spec.temperature
    invalid = ~valid.unsqueeze(-1)
    ce_sum = ce_grad = None
    if spec.ce_weight != 0:  # first, so z_S can be dropped early
        ce, ce_grad = _ce_rows(z_S, labels, need_grad)
        ce_sum = ce.masked_fill(~valid, 0.0).sum()
    name, beta = spec.divergence, spec.beta
    analytic = name in ("forward_kl", "reverse_kl", "topk_kl") or (
        name == "jsd" and beta in (0.0, 1.0))
    width = v_S if name == "topk_kl" else _aligned_width(spec, v_S, v_T)
    grad_s = None
    if analytic or not need_grad:
        log_q = _log_probs(spec, z_S, width)
        del z_S
        if name == "topk_kl":
            ids, logprobs = teacher()
            rows, target = _topk_rows(spec, log_q, ids, logprobs, need_grad)
            if need_grad:  # d KL(p̂‖q) / d(z/τ) = q − p̂
                grad_s = log_q.exp_().sub_(target)
        elif not analytic:
            log_p = _log_probs(spec, _up(teacher()).to(log_q.dtype), width)
            rows = _divergence_rows(spec, log_q, log_p)
        elif name == "forward_kl" or (name == "jsd" and beta == 0.0):  # d/d(z/τ) = q − p
            log_p = _log_probs(spec, _up(teacher()).to(log_q.dtype), width)
            p = log_p.exp()
            rows = log_p.sub_(log_q).masked_fill_(p == 0, 0.0).mul_(p).sum(-1)
            del log_p
            if need_grad:
                grad_s = log_q.exp_().sub_(p)
        else:  # reverse KL: d KL(q‖p) / d(z/τ) = q ⊙ (log q − log p − KL)
            log_p = _log_probs(spec, _up(teacher()).to(log_q.dtype), width)
            q = log_q.exp()
            diff = log_q.sub_(log_p).masked_fill_(q == 0, 0.0)
            del log_p
            rows = (q * diff).sum(-1)
            if need_grad:
                grad_s = diff.sub_(rows.unsqueeze(-1)).mul_(q)
    else:  # the other divergences: autograd on this chunk only
        z_S = _fit(z_S, width)
        leaf = (z_S / tau if tau != 1.0 else z_S).detach().requires_grad_()
        del z_S
        log_p = _log_probs(spec, _up(teacher()).to(leaf.dtype), width)
        with torch.enable_grad():
            rows = _divergence_rows(spec, torch.log_softmax(leaf, dim=-1), log_p)
            (grad_s,) = torch.autograd.grad(rows.masked_fill(~valid, 0.0).sum(), leaf)
        rows = rows.detach()
    kd_sum = rows.masked_fill(~valid, 0.0).sum() * spec.kd_scale
    grad = None
    if need_grad:  # invalid rows are zeroed, not multiplied by 0: they may hold inf
        grad = _unalign(grad_s.masked_fill_(invalid, 0.0), v_S)
        grad.mul_(spec.kd_scale / tau)
        if ce_grad is not None:
            grad.add_(ce_grad.masked_fill_(invalid, 0.0), alpha=spec.ce_weight)
        grad.div_(denom)
    return kd_sum, ce_sum, grad


# ---------------------------------------------------------------------------------------
# inputs: flattening, validity, denominators
# ---------------------------------------------------------------------------------------
def _valid_tokens(shape: torch.Size, device: torch.device, labels: Optional[torch.Tensor],
                  mask: Optional[torch.Tensor], ignore_index: int, what: str) -> torch.Tensor:
    """(N,) bool: labels != ignore_index and mask != 0, checked against ``shape``."""
    valid = torch.ones(shape, dtype=torch.bool, device=device)
    for name, tensor in (("labels", labels), ("mask", mask)):
        if tensor is None:
            continue
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {what} expects "
                             f"{tuple(shape)} (one entry per token)")
        tensor = tensor.to(device)
        valid = valid & ((tensor != ignore_index) if name == "labels" else (tensor != 0))
    return valid.reshape(-1)


def count_valid_tokens(labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                       ignore_index: int = -100) -> torch.Tensor:
    """The number of tokens these losses count, as a 0-dim int64 tensor (no host sync).

    Sum it over the micro-batches of an accumulation window (and all-reduce it over DDP
    ranks) and pass it as ``num_tokens``.

    Args:
        labels: (B, L) or (N,) with ``ignore_index`` at ignored positions, or None.
        mask: same shape, 1 = keep (e.g. the attention mask), or None.
        ignore_index: the label value that marks an ignored position.

    Returns:
        0-dim int64 tensor.

    Raises:
        ValueError: both are None, or their shapes differ.
    """
    ref = labels if labels is not None else mask
    if ref is None:
        raise ValueError("count_valid_tokens needs labels or mask")
    return _valid_tokens(ref.shape, ref.device, labels, mask, ignore_index,
                         "count_valid_tokens").sum()


def _denominator(reduction: str, valid: torch.Tensor, num_tokens: Optional[TokenCount],
                 dtype: torch.dtype) -> torch.Tensor:
    """The divisor of the summed loss, clamped to ≥ 1 (an all-masked batch gives 0, not NaN)."""
    if reduction != "mean":
        if num_tokens is not None:
            raise ValueError(f"num_tokens only applies to reduction='mean', got "
                             f"reduction={reduction!r}")
        return torch.ones((), dtype=dtype, device=valid.device)
    if num_tokens is None:
        count = valid.sum()
    else:
        count = torch.as_tensor(num_tokens, device=valid.device)
    return count.to(dtype).clamp(min=1)


def _check_reduction(reduction: str, path: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
    if reduction == "none" and path != "dense":
        raise ValueError(f"reduction='none' (per-token values) is only available on the dense "
                         f"path (chunk_size=None), not the {path} path")


def _check_ce(spec: _Spec, labels: Optional[torch.Tensor]) -> None:
    if spec.ce_weight != 0 and labels is None:
        raise ValueError(f"ce_weight={spec.ce_weight} needs labels for the hard-label term")


def _teacher_rows(spec: _Spec, logits_T, rows: int, lead: torch.Size, what: str):
    """The teacher flattened to rows: (N, V_T) logits or an (ids, logprobs) pair."""
    if spec.divergence == "topk_kl":
        if not (isinstance(logits_T, (tuple, list)) and len(logits_T) == 2):
            raise ValueError("divergence 'topk_kl' needs the teacher as TopKTeacher(ids, "
                             f"logprobs), got {type(logits_T).__name__}")
        ids, logprobs = logits_T
        if ids.shape != logprobs.shape or tuple(ids.shape[:-1]) != tuple(lead):
            raise ValueError(f"topk ids {tuple(ids.shape)} and logprobs "
                             f"{tuple(logprobs.shape)} must both be {tuple(lead)} + (k,)")
        if ids.dtype.is_floating_point:
            raise ValueError(f"topk ids must be integers, got {ids.dtype}")
        return ids.reshape(rows, -1).long(), logprobs.reshape(rows, -1).detach()
    if isinstance(logits_T, (tuple, list)):
        raise ValueError(f"a TopKTeacher needs divergence='topk_kl', not {spec.divergence!r}")
    if tuple(logits_T.shape[:-1]) != tuple(lead):
        raise ValueError(f"teacher {what} shape {tuple(logits_T.shape)} and student "
                         f"{tuple(lead)} + (..,) differ in their token dimensions")
    return logits_T.reshape(rows, logits_T.shape[-1]).detach()


def _check_vocab(spec: _Spec, v_S: int, v_T: int) -> None:
    _aligned_width(spec, v_S, v_T)  # raises the error that names both sizes


def _outputs(loss: torch.Tensor, kd: torch.Tensor, ce: Optional[torch.Tensor],
             return_dict: bool):
    if not return_dict:
        return loss
    parts = {"loss": loss, "kd": kd}
    if ce is not None:
        parts["ce"] = ce
    return parts


# ---------------------------------------------------------------------------------------
# the three paths
# ---------------------------------------------------------------------------------------
def _dense(spec, z_S, teacher, labels, valid, denom, reduction, lead):
    """Plain autograd over all tokens: the reference path, and the only one with 'none'."""
    z_S = _up(z_S)
    if spec.divergence == "topk_kl":
        ids, logprobs = teacher
        log_q = torch.log_softmax(z_S / spec.temperature, dim=-1)
        rows, _ = _topk_rows(spec, log_q, ids, logprobs, want_target=False)
    else:
        width = _aligned_width(spec, z_S.shape[-1], teacher.shape[-1])
        log_p = _log_probs(spec, _up(teacher).to(z_S.dtype), width)
        rows = _divergence_rows(spec, _log_probs(spec, z_S, width), log_p)
    kd_rows = torch.where(valid, rows, 0.0) * spec.kd_scale
    ce_rows = None
    if spec.ce_weight != 0:
        ce, _ = _ce_rows(z_S, labels, want_grad=False)
        ce_rows = torch.where(valid, ce, 0.0)
    if reduction == "none":
        total = kd_rows if ce_rows is None else kd_rows + spec.ce_weight * ce_rows
        return total.reshape(lead), kd_rows.detach().reshape(lead), (
            None if ce_rows is None else ce_rows.detach().reshape(lead))
    kd = kd_rows.sum() / denom
    ce = None if ce_rows is None else ce_rows.sum() / denom
    loss = kd if ce is None else kd + spec.ce_weight * ce
    return loss, kd.detach(), None if ce is None else ce.detach()


class _ChunkedLoss(torch.autograd.Function):
    """Loss over given logits, chunk by chunk; the gradient is computed in forward."""

    @staticmethod
    def forward(ctx, logits_S, logits_T, ids, logprobs, labels, valid, denom, spec, chunk_size,
                need_grad):
        n = logits_S.shape[0]
        v_T = 0 if logits_T is None else logits_T.shape[-1]
        grad = torch.empty_like(logits_S) if need_grad else None
        kd = denom.new_zeros(())  # stays 0 for an empty input
        ce = denom.new_zeros(()) if spec.ce_weight != 0 else None
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            if logits_T is None:
                def teacher(rows=rows):
                    return ids[rows], logprobs[rows]
            else:
                def teacher(rows=rows):
                    return logits_T[rows]
            kd_c, ce_c, grad_c = _chunk(spec, [_up(logits_S[rows])], teacher, v_T,
                                        None if labels is None else labels[rows], valid[rows],
                                        need_grad, denom)
            kd = kd + kd_c
            if ce_c is not None:
                ce = ce + ce_c
            if need_grad:
                grad[rows] = grad_c  # cast to the logits' dtype on assignment
        kd = kd / denom
        ce = None if ce is None else ce / denom
        loss = kd if ce is None else kd + spec.ce_weight * ce
        ce_out = torch.zeros_like(kd) if ce is None else ce
        ctx.save_for_backward(grad)
        kd_out = kd.clone()
        ctx.mark_non_differentiable(kd_out, ce_out)
        return loss, kd_out, ce_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype),) + (None,) * 9


class _FusedLoss(torch.autograd.Function):
    """Loss from hidden states and LM heads, chunk by chunk; no [N, V] tensor is created.

    Each chunk's logits are computed under the caller's autocast, up-cast for the softmax,
    and turned into gradients wrt the student hidden states, head weight and bias at once.
    """

    @staticmethod
    def forward(ctx, hidden_S, weight_S, bias_S, hidden_T, weight_T, bias_T, ids, logprobs,
                labels, valid, denom, spec, chunk_size, needs):
        need_h, need_w, need_b = needs
        need_grad = need_h or need_w or need_b
        n = hidden_S.shape[0]
        v_T = 0 if weight_T is None else weight_T.shape[0]
        grad_h = torch.zeros_like(hidden_S) if need_h else None
        # Accumulate head gradients in at least fp32: many chunks add up into them.
        acc = torch.float64 if weight_S.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(weight_S.shape, dtype=acc, device=weight_S.device) if need_w else None
        grad_b = torch.zeros(bias_S.shape, dtype=acc, device=bias_S.device) if need_b else None
        kd = denom.new_zeros(())  # stays 0 for an empty input
        ce = denom.new_zeros(()) if spec.ce_weight != 0 else None
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden_S[rows]
            z_S = F.linear(h, weight_S, bias_S)
            logits_dtype = z_S.dtype
            student = [_up(z_S)]
            del z_S  # the up-cast copy (or z_S itself) now lives only in `student`
            if hidden_T is None:
                def teacher(rows=rows):
                    return ids[rows], logprobs[rows]
            else:
                def teacher(rows=rows):
                    return F.linear(hidden_T[rows], weight_T, bias_T)
            kd_c, ce_c, grad_z = _chunk(spec, student, teacher, v_T,
                                        None if labels is None else labels[rows], valid[rows],
                                        need_grad, denom)
            kd = kd + kd_c
            if ce_c is not None:
                ce = ce + ce_c
            if not need_grad:
                continue
            # In the logits' dtype, so the matmuls run like the forward one (bf16 under
            # autocast) and dtypes match without autocast.
            grad_z = grad_z.to(logits_dtype)
            if need_h:
                grad_h[rows] = grad_z @ weight_S.to(grad_z.dtype)
            if need_w:
                if grad_w.dtype == grad_z.dtype:  # no [V, Hs] temporary
                    grad_w.addmm_(grad_z.transpose(0, 1), h)
                else:
                    grad_w += (grad_z.transpose(0, 1) @ h.to(grad_z.dtype)).to(acc)
            if need_b:
                grad_b += grad_z.sum(0).to(acc)
        kd = kd / denom
        ce = None if ce is None else ce / denom
        loss = kd if ce is None else kd + spec.ce_weight * ce
        ce_out = torch.zeros_like(kd) if ce is None else ce
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight_S.dtype),
                              None if grad_b is None else grad_b.to(bias_S.dtype))
        kd_out = kd.clone()
        ctx.mark_non_differentiable(kd_out, ce_out)
        return loss, kd_out, ce_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        scaled = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
        return scaled + (None,) * 11


def _eager_only(function):
    """``torch.compiler.disable(function)``, applied at the first call: decorating at import
    would import torch._dynamo, seconds that every ``import textbrewer`` would pay."""
    disabled = None

    @functools.wraps(function)
    def call(*args):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(function)
        return disabled(*args)
    return call


@_eager_only
def _apply_chunked(*args):
    # Runs eagerly inside a torch.compile'd caller (graph break): see the module docstring.
    return _ChunkedLoss.apply(*args)


@_eager_only
def _apply_fused(*args):
    return _FusedLoss.apply(*args)


def _check_chunk_size(chunk_size: Optional[int], default: Optional[int]) -> Optional[int]:
    if chunk_size is None:
        return default
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


# ---------------------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------------------
def token_distillation_loss(logits_S: torch.Tensor,
                            logits_T: Union[torch.Tensor, TopKTeacher],
                            labels: Optional[torch.Tensor] = None,
                            mask: Optional[torch.Tensor] = None, *,
                            divergence: str = "forward_kl", temperature: float = 1.0,
                            beta: float = 0.5, alpha: float = 0.1, tail: str = "renormalize",
                            scale_by_temperature_squared: bool = False, ce_weight: float = 0.0,
                            ignore_index: int = -100, num_tokens: Optional[TokenCount] = None,
                            reduction: str = "mean", chunk_size: Optional[int] = None,
                            vocab_alignment: Optional[str] = None, return_dict: bool = False
                            ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    """Token-level distillation loss over logits (dense, or chunked with ``chunk_size``).

    Per-token formulas are in the module docstring; p = softmax(z_T/τ), q = softmax(z_S/τ).

    Args:
        logits_S: student logits, (N, V_S) or (B, L, V_S), any float dtype (computed in fp32
            at least).
        logits_T: teacher logits (N, V_T) / (B, L, V_T), or a :class:`TopKTeacher` with
            (..., k) entries for ``divergence='topk_kl'``. Never receives a gradient.
        labels: (N,) / (B, L) int labels aligned with the logits; ``ignore_index`` marks
            invalid tokens. Needed when ``ce_weight > 0``.
        mask: (N,) / (B, L), 1 = keep (e.g. the attention mask).
        divergence: one of :data:`DIVERGENCES`.
        temperature: τ > 0.
        beta: β of ``jsd``, in [0, 1] (0: forward KL, 1: reverse KL).
        alpha: α of ``skew_kl`` / ``skew_reverse_kl``, in [0, 1].
        tail: ``topk_kl`` only: ``'renormalize'`` or ``'uniform'`` (see :class:`TopKTeacher`).
        scale_by_temperature_squared: multiply the KD term by τ² (default False).
        ce_weight: weight of the hard-label cross-entropy (τ = 1) on the same valid tokens.
        ignore_index: label value of ignored tokens.
        num_tokens: int or 0-dim tensor: valid tokens in the whole accumulation window (over
            micro-batches and ranks); replaces the local count as the divisor.
        reduction: ``'mean'`` (Σ / max(count, 1)), ``'sum'``, or ``'none'`` (per token, dense
            path only; zeros at invalid tokens).
        chunk_size: None for the dense path; an int for the chunked path (that many tokens
            at a time).
        vocab_alignment: None (differing vocabularies are an error), ``'pad'`` (the smaller
            vocabulary's missing columns get −inf logits) or ``'truncate'`` (both cut to the
            shared first min(V_S, V_T) ids).
        return_dict: return ``{'loss', 'kd'[, 'ce']}`` instead of the loss alone.

    Returns:
        The loss: a scalar (or (N,) / (B, L) with ``reduction='none'``). With ``return_dict``,
        ``'loss'`` (for backward) = ``'kd'`` + ce_weight · ``'ce'``; ``'kd'`` and ``'ce'`` are
        detached, for logging; ``'ce'`` only when ``ce_weight > 0``.

    Raises:
        ValueError: an unknown option, mismatching shapes, or different vocabulary sizes
            without ``vocab_alignment``.

    Example:
        >>> s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
        >>> labels = torch.tensor([[1, 2, -100, 3, 4], [5, -100, -100, 6, 7]])
        >>> loss = token_distillation_loss(s, t, labels, divergence='jsd', beta=0.5)
    """
    spec = _make_spec(divergence, temperature, beta, alpha, tail, scale_by_temperature_squared,
                      ce_weight, vocab_alignment)
    chunk_size = _check_chunk_size(chunk_size, None)
    path = "dense" if chunk_size is None else "chunked"
    _check_reduction(reduction, path)
    _check_ce(spec, labels)
    if logits_S.dim() < 2:
        raise ValueError(f"logits_S must be (N, V) or (B, L, V), got {tuple(logits_S.shape)}")
    lead = logits_S.shape[:-1]
    n, v_S = math.prod(lead), logits_S.shape[-1]
    teacher = _teacher_rows(spec, logits_T, n, lead, "logits")
    if spec.divergence != "topk_kl":
        _check_vocab(spec, v_S, teacher.shape[-1])
    valid = _valid_tokens(lead, logits_S.device, labels, mask, ignore_index, "logits_S")
    flat_labels = None if labels is None else labels.reshape(-1).to(logits_S.device).long()
    z_S = logits_S.reshape(n, v_S)
    denom = _denominator(reduction, valid, num_tokens,
                         torch.float64 if z_S.dtype == torch.float64 else torch.float32)
    if path == "dense":
        loss, kd, ce = _dense(spec, z_S, teacher, flat_labels, valid, denom, reduction, lead)
        return _outputs(loss, kd, ce, return_dict)
    need_grad = torch.is_grad_enabled() and logits_S.requires_grad
    logits_T_rows, ids, logprobs = (None, *teacher) if spec.divergence == "topk_kl" else (
        teacher, None, None)
    loss, kd, ce = _apply_chunked(z_S, logits_T_rows, ids, logprobs, flat_labels, valid, denom,
                                  spec, chunk_size, need_grad)
    return _outputs(loss, kd, ce if spec.ce_weight != 0 else None, return_dict)


def fused_token_distillation_loss(hidden_S: torch.Tensor, weight_S: torch.Tensor,
                                  hidden_T: Union[torch.Tensor, TopKTeacher],
                                  weight_T: Optional[torch.Tensor] = None,
                                  labels: Optional[torch.Tensor] = None,
                                  mask: Optional[torch.Tensor] = None, *,
                                  bias_S: Optional[torch.Tensor] = None,
                                  bias_T: Optional[torch.Tensor] = None,
                                  divergence: str = "forward_kl", temperature: float = 1.0,
                                  beta: float = 0.5, alpha: float = 0.1,
                                  tail: str = "renormalize",
                                  scale_by_temperature_squared: bool = False,
                                  ce_weight: float = 0.0, ignore_index: int = -100,
                                  num_tokens: Optional[TokenCount] = None,
                                  reduction: str = "mean",
                                  chunk_size: Optional[int] = DEFAULT_FUSED_CHUNK_SIZE,
                                  vocab_alignment: Optional[str] = None,
                                  return_dict: bool = False
                                  ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    """The same loss as :func:`token_distillation_loss`, fused with both LM heads.

    Logits are ``hidden @ weight.T + bias`` (exactly ``nn.Linear``), computed ``chunk_size``
    tokens at a time under the caller's autocast; each chunk's softmax runs in fp32. The
    gradients wrt ``hidden_S``, ``weight_S`` and ``bias_S`` are computed during forward and
    returned in those tensors' dtypes; teacher inputs get none. No [N, V] tensor is created.
    Anything a model applies after its head (logit scaling, soft-capping) is NOT applied here.

    ``divergence``, ``temperature``, ``beta``, ``alpha``, ``tail``,
    ``scale_by_temperature_squared``, ``ce_weight``, ``ignore_index``, ``num_tokens``,
    ``reduction``, ``vocab_alignment`` and ``return_dict`` are as in
    :func:`token_distillation_loss` (``reduction='none'`` is not available).

    Args:
        hidden_S: student final hidden states, (N, Hs) or (B, L, Hs).
        weight_S: student head weight, (V_S, Hs).
        hidden_T: teacher final hidden states, (N, Ht) or (B, L, Ht); or a
            :class:`TopKTeacher` (then ``weight_T`` must be None and divergence ``'topk_kl'``).
        weight_T: teacher head weight, (V_T, Ht).
        labels: (N,) / (B, L), ``ignore_index`` at ignored tokens.
        mask: (N,) / (B, L), 1 = keep.
        bias_S: (V_S,) or None.  bias_T: (V_T,) or None.
        chunk_size: tokens per chunk (default 1024).

    Returns:
        Scalar loss, or ``{'loss', 'kd'[, 'ce']}`` with ``return_dict``.

    Raises:
        ValueError: mismatching shapes, unknown options, different vocabulary sizes without
            ``vocab_alignment``.
    """
    spec = _make_spec(divergence, temperature, beta, alpha, tail, scale_by_temperature_squared,
                      ce_weight, vocab_alignment)
    chunk_size = _check_chunk_size(chunk_size, DEFAULT_FUSED_CHUNK_SIZE)
    _check_reduction(reduction, "fused")
    _check_ce(spec, labels)
    if hidden_S.dim() < 2 or weight_S.dim() != 2 or hidden_S.shape[-1] != weight_S.shape[1]:
        raise ValueError(f"hidden_S {tuple(hidden_S.shape)} must be (..., Hs) and weight_S "
                         f"{tuple(weight_S.shape)} must be (V_S, Hs) with the same Hs")
    v_S = weight_S.shape[0]
    if bias_S is not None and tuple(bias_S.shape) != (v_S,):
        raise ValueError(f"bias_S must be ({v_S},), got {tuple(bias_S.shape)}")
    lead = hidden_S.shape[:-1]
    n = math.prod(lead)
    ids = logprobs = hidden_T_rows = None
    if spec.divergence == "topk_kl":
        if weight_T is not None or bias_T is not None:
            raise ValueError("with a TopKTeacher, weight_T and bias_T must be None")
        ids, logprobs = _teacher_rows(spec, hidden_T, n, lead, "hidden states")
    else:
        if isinstance(hidden_T, (tuple, list)):
            raise ValueError(f"a TopKTeacher needs divergence='topk_kl', not {divergence!r}")
        if weight_T is None or weight_T.dim() != 2 or hidden_T.shape[-1] != weight_T.shape[1]:
            raise ValueError(f"hidden_T {tuple(hidden_T.shape)} must be (..., Ht) and weight_T "
                             f"{None if weight_T is None else tuple(weight_T.shape)} must be "
                             f"(V_T, Ht) with the same Ht")
        if tuple(hidden_T.shape[:-1]) != tuple(lead):
            raise ValueError(f"hidden_T {tuple(hidden_T.shape)} and hidden_S "
                             f"{tuple(hidden_S.shape)} differ in their token dimensions")
        if bias_T is not None and tuple(bias_T.shape) != (weight_T.shape[0],):
            raise ValueError(f"bias_T must be ({weight_T.shape[0]},), got {tuple(bias_T.shape)}")
        _check_vocab(spec, v_S, weight_T.shape[0])
        hidden_T_rows = hidden_T.reshape(n, hidden_T.shape[-1]).detach()
        weight_T = weight_T.detach()
        bias_T = None if bias_T is None else bias_T.detach()
    valid = _valid_tokens(lead, hidden_S.device, labels, mask, ignore_index, "hidden_S")
    flat_labels = None if labels is None else labels.reshape(-1).to(hidden_S.device).long()
    wide = torch.float64 if hidden_S.dtype == torch.float64 else torch.float32
    denom = _denominator(reduction, valid, num_tokens, wide)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden_S.requires_grad, grad_on and weight_S.requires_grad,
             grad_on and bias_S is not None and bias_S.requires_grad)
    loss, kd, ce = _apply_fused(hidden_S.reshape(n, hidden_S.shape[-1]), weight_S, bias_S,
                                hidden_T_rows, weight_T, bias_T, ids, logprobs, flat_labels,
                                valid, denom, spec, chunk_size, needs)
    return _outputs(loss, kd, ce if spec.ce_weight != 0 else None, return_dict)


# ---------------------------------------------------------------------------------------
# module front
# ---------------------------------------------------------------------------------------
class TokenDistillationLoss(nn.Module):
    """Token-level LM distillation loss; one object for the dense, chunked and fused paths.

    ``temperature``, ``beta``, ``alpha``, ``tail``, ``scale_by_temperature_squared``,
    ``ce_weight``, ``ignore_index``, ``reduction``, ``vocab_alignment`` and ``return_dict``
    are as in :func:`token_distillation_loss`.

    Args:
        divergence: ``'forward_kl'``, ``'reverse_kl'``, ``'jsd'``, ``'skew_kl'``,
            ``'skew_reverse_kl'``, ``'tv'``, ``'topk_kl'``; or the name of a user entry in
            :data:`textbrewer.registry.TOKEN_LOSSES` (dense path only, called as
            ``fn(logits_S, logits_T, mask=valid, **options)``).
        chunk_size: None: ``forward`` is dense and ``fused`` uses 1024 tokens per chunk; an
            int: both paths use chunks of that many tokens.

    Example:
        >>> loss_fn = TokenDistillationLoss('jsd', beta=0.5, chunk_size=256, return_dict=True)
        >>> parts = loss_fn(logits_S, logits_T, labels=labels)            # (B, L, V) logits
        >>> parts = loss_fn.fused(hidden_S, head_S.weight, hidden_T, head_T.weight,
        ...                       labels=labels)                           # (B, L, H) hidden
        >>> parts['loss'].backward()
    """

    def __init__(self, divergence: str = "forward_kl", *, temperature: float = 1.0,
                 beta: float = 0.5, alpha: float = 0.1, tail: str = "renormalize",
                 scale_by_temperature_squared: bool = False, ce_weight: float = 0.0,
                 ignore_index: int = -100, chunk_size: Optional[int] = None,
                 vocab_alignment: Optional[str] = None, reduction: str = "mean",
                 return_dict: bool = False):
        super().__init__()
        if divergence not in DIVERGENCES and divergence not in TOKEN_LOSSES:
            raise ValueError(f"unknown divergence {divergence!r}; built-in: {list(DIVERGENCES)}, "
                             f"registered: {TOKEN_LOSSES.names()}")
        self.divergence = divergence
        self.chunk_size = _check_chunk_size(chunk_size, None)
        self.options = dict(temperature=temperature, beta=beta, alpha=alpha, tail=tail,
                            scale_by_temperature_squared=scale_by_temperature_squared,
                            ce_weight=ce_weight, ignore_index=ignore_index,
                            vocab_alignment=vocab_alignment, reduction=reduction,
                            return_dict=return_dict)
        if divergence in DIVERGENCES:  # validate now rather than on the first batch
            _make_spec(divergence, temperature, beta, alpha, tail,
                       scale_by_temperature_squared, ce_weight, vocab_alignment)
            _check_reduction(reduction, "dense" if chunk_size is None else "chunked")

    def extra_repr(self) -> str:
        return f"divergence={self.divergence!r}, chunk_size={self.chunk_size}, " + ", ".join(
            f"{k}={v!r}" for k, v in self.options.items())

    def forward(self, logits_S: torch.Tensor, logits_T: Union[torch.Tensor, TopKTeacher],
                labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                num_tokens: Optional[TokenCount] = None
                ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss over logits (N, V) / (B, L, V); see :func:`token_distillation_loss`."""
        if self.divergence not in DIVERGENCES:  # a user-registered entry
            if self.chunk_size is not None:
                raise ValueError(f"user token loss {self.divergence!r} only has a dense path; "
                                 f"use chunk_size=None")
            lead = logits_S.shape[:-1]
            valid = _valid_tokens(lead, logits_S.device, labels, mask,
                                  self.options["ignore_index"], "logits_S").reshape(lead)
            return TOKEN_LOSSES[self.divergence](logits_S, logits_T, mask=valid)
        return token_distillation_loss(logits_S, logits_T, labels, mask,
                                       divergence=self.divergence, num_tokens=num_tokens,
                                       chunk_size=self.chunk_size, **self.options)

    def fused(self, hidden_S: torch.Tensor, weight_S: torch.Tensor,
              hidden_T: Union[torch.Tensor, TopKTeacher], weight_T: Optional[torch.Tensor] = None,
              labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, *,
              bias_S: Optional[torch.Tensor] = None, bias_T: Optional[torch.Tensor] = None,
              num_tokens: Optional[TokenCount] = None
              ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss from hidden states and LM heads; see :func:`fused_token_distillation_loss`."""
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"user token loss {self.divergence!r} has no fused path")
        return fused_token_distillation_loss(
            hidden_S, weight_S, hidden_T, weight_T, labels, mask, bias_S=bias_S, bias_T=bias_T,
            divergence=self.divergence, num_tokens=num_tokens,
            chunk_size=self.chunk_size or DEFAULT_FUSED_CHUNK_SIZE, **self.options)


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
def reverse_kl_loss(logits_S, logits_T, mask=None, **options):
    """KL(q‖p) = Σ_v q_v (log q_v − log p_v) per token, mean over valid tokens.

    Args: see :func:`token_distillation_loss`.
    """
    return token_distillation_loss(logits_S, logits_T, mask=mask, divergence="reverse_kl",
                                   **options)


@TOKEN_LOSSES.register("jsd")
def jsd_loss(logits_S, logits_T, mask=None, **options):
    """Generalised JSD: m = (1−β)q + βp, β·KL(p‖m) + (1−β)·KL(q‖m); β=0: KL(p‖q), β=1: KL(q‖p).

    ``beta`` (default 0.5) is an option. Args: see :func:`token_distillation_loss`.
    """
    return token_distillation_loss(logits_S, logits_T, mask=mask, divergence="jsd", **options)


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
