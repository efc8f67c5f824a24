"""Token-level distillation, the arithmetic: divergences per token row, the top-k teacher,
and one chunk's value and gradient (see :mod:`textbrewer.losses.token`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F




#: The divergences every path (dense, chunked, fused) implements.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv", "topk_kl")
#: how a top-k teacher's missing mass is rebuilt (``tail=``, see :class:`TopKTeacher`)
TOPK_TAILS = ("renormalize", "uniform", "bucket")
_TAILS = TOPK_TAILS
#: The least tail mass 1 − Σ exp(logprobs), and the least entry, a top-k teacher is given
#: when a divergence other than the forward KL compares against it (``tail='uniform'`` or
#: ``'bucket'``): an fp16 cache's rounded top-k can sum to 1 or more, a masked logit gives an
#: entry of −inf, and either makes a divergence weighted by the student (reverse KL)
#: infinite.
TOPK_TAIL_FLOOR = 1e-6
#: Divergences that are infinite against a teacher that is 0 somewhere the student is not,
#: as a renormalised top-k teacher is outside its k ids (with the option that makes them so).
_STUDENT_WEIGHTED = {"reverse_kl": None, "jsd": ("beta", 1.0), "skew_reverse_kl": ("alpha", 0.0)}
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

    * ``'bucket'``: the k ids and one more outcome, "any other id", whose teacher
      probability is the tail mass; the student's is its own mass outside the k ids (both at
      τ = 1). Both are distributions over k + 1 outcomes, tempered as such and compared
      there.

    With ``'renormalize'`` and ``'uniform'`` the student's side is its full softmax over
    V, so ``topk_kl`` is the true KL(p̂‖q) between two distributions over V (0 when
    q = p̂); with ``'bucket'`` it is the KL between the two bucketed distributions, which at
    τ = 1 is at most the KL over V against the uniform tail (merging outcomes never
    increases a divergence).

    Any divergence of :data:`DIVERGENCES` can be taken against a top-k teacher (pass the
    teacher and ``divergence=``; ``'topk_kl'`` is the forward KL). The reverse KL KL(q‖p̂)
    weights the student's mass where p̂ is 0, so against a renormalised top-k it is
    infinite: the reverse KL, JSD with β = 1 and skew reverse KL with α = 0 need ``'bucket'``
    (the student's mass outside the k ids is pulled to the teacher's tail mass, not left
    free) or ``'uniform'``. With either, for every divergence but the forward KL (whose
    closed form is kept as it was), a tail or an entry below :data:`TOPK_TAIL_FLOOR`
    counts as that.
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
    kd_weight: float = 1.0
    #: against a top-k teacher (``divergence == 'topk_kl'``): the divergence compared there
    topk_divergence: str = "forward_kl"


def _make_spec(divergence: str, temperature: float, beta: float, alpha: float, tail: str,
               scale_by_temperature_squared: bool, ce_weight: float,
               vocab_alignment: Optional[str], kd_weight: float = 1.0) -> _Spec:
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
    kd_weight = float(kd_weight)
    if kd_weight < 0 or not math.isfinite(kd_weight):
        raise ValueError(f"kd_weight must be a finite number >= 0, got {kd_weight}")
    kd_scale = temperature ** 2 if scale_by_temperature_squared else 1.0
    return _Spec(divergence, temperature, float(beta), float(alpha), tail, kd_scale, ce_weight,
                 vocab_alignment, kd_weight)


def check_topk_divergence(divergence: str, tail: str, beta: float = 0.5,
                          alpha: float = 0.1) -> None:
    """Raises unless ``divergence`` is finite against a top-k teacher rebuilt by ``tail``.

    Against ``tail='renormalize'`` (the teacher is 0 outside its k ids) a divergence that
    weights the student's mass there is infinite: ``'reverse_kl'``, ``'jsd'`` with β = 1,
    ``'skew_reverse_kl'`` with α = 0. Those need ``'bucket'`` or ``'uniform'``.

    Raises:
        ValueError: naming the divergence, the option and the tails that work.
    """
    if tail not in _TAILS:
        raise ValueError(f"tail must be one of {list(_TAILS)}, got {tail!r}")
    rule = _STUDENT_WEIGHTED.get(divergence, False)
    if rule is False or tail != "renormalize":
        return
    if rule is not None and {"beta": beta, "alpha": alpha}[rule[0]] != rule[1]:
        return
    option = "" if rule is None else f" with {rule[0]}={rule[1]}"
    raise ValueError(f"divergence={divergence!r}{option} against a top-k teacher with tail="
                     f"'renormalize' is infinite: the teacher is 0 outside its k ids and the "
                     f"student is not. Use tail='bucket' (the student's mass outside the k ids "
                     f"is matched to the teacher's tail mass) or 'uniform'")


def _against_topk(spec: _Spec) -> _Spec:
    """The spec for a :class:`TopKTeacher`: ``divergence`` becomes ``'topk_kl'`` (the
    teacher's layout) and the divergence asked for moves to ``topk_divergence``.

    Raises:
        ValueError: a divergence that is infinite against a renormalised top-k teacher.
    """
    if spec.divergence == "topk_kl":
        return spec
    check_topk_divergence(spec.divergence, spec.tail, spec.beta, spec.alpha)
    return replace(spec, divergence="topk_kl", topk_divergence=spec.divergence)


def _weighted(spec: _Spec, kd: torch.Tensor, ce: Optional[torch.Tensor]) -> torch.Tensor:
    """``kd_weight · kd + ce_weight · ce`` (a weight of 1 multiplies nothing: same bits)."""
    total = kd if spec.kd_weight == 1.0 else kd * spec.kd_weight
    return total if ce is None else total + spec.ce_weight * ce


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


def _divergence_rows(spec: _Spec, log_q: torch.Tensor, log_p: torch.Tensor,
                     name: Optional[str] = None) -> torch.Tensor:
    """Per-token divergence (n,) from student log q and teacher log p, both (n, V);
    ``name`` (default ``spec.divergence``) picks the formula."""
    name = spec.divergence if name is None else name
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


def _topk_is_analytic(spec: _Spec) -> bool:
    """The forward KL against a renormalised or uniform-tail top-k: q − p̂, no autograd."""
    return spec.topk_divergence == "forward_kl" and spec.tail != "bucket"


def _topk_support(spec: _Spec, log_q: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probabilities where a top-k divergence compares them.

    Args:
        log_q: (n, V) student log-probabilities at τ (may require grad).
        ids: (n, k) int64; logprobs: (n, k) teacher log-probs at τ = 1.

    Returns:
        (log q, log p̂): both (n, V) for ``'renormalize'`` and ``'uniform'`` (p̂ as in
        :class:`TopKTeacher`), both (n, k + 1) for ``'bucket'`` (the k ids, then the rest):
        each side bucketed at τ = 1, then tempered as a (k + 1)-outcome distribution, so
        that a student equal to the teacher has divergence 0 at every τ.
    """
    vocab, k = log_q.shape[-1], ids.shape[-1]
    tau = spec.temperature
    if spec.tail == "renormalize" or k >= vocab:
        log_p = torch.full_like(log_q, float("-inf"))
        scaled = logprobs.to(log_q.dtype) / tau
        return log_q, log_p.scatter_(-1, ids, torch.log_softmax(scaled, dim=-1))
    floor = math.log(TOPK_TAIL_FLOOR)
    logprobs = logprobs.to(log_q.dtype)
    # log(1 − Σ p) at τ = 1, floored: the tail an fp16-rounded top-k can leave empty
    top_mass = torch.logsumexp(logprobs, dim=-1).clamp(max=0.0)
    log_tail = torch.log(-torch.expm1(top_mass)).clamp(min=floor)
    # an entry the teacher gives no mass (−inf: a masked logit) is floored too, so that a
    # divergence weighted by the student stays finite there
    logprobs = logprobs.clamp(min=floor)
    if spec.tail == "bucket":
        log_p = torch.log_softmax(torch.cat([logprobs, log_tail.unsqueeze(-1)], -1) / tau, -1)
        # the student at τ = 1 (log_softmax(τ · log q) is log_softmax(z)), bucketed, tempered
        log_q1 = torch.log_softmax(log_q * tau, dim=-1) if tau != 1.0 else log_q
        # 0 outside the k ids, −inf on them: log_q1 + outside sums the student's rest
        outside = torch.zeros_like(log_q1).scatter_(-1, ids, float("-inf"))
        log_q_rest = torch.logsumexp(log_q1 + outside, dim=-1, keepdim=True)
        buckets = torch.cat([log_q1.gather(-1, ids), log_q_rest], -1)
        return (torch.log_softmax(buckets / tau, dim=-1) if tau != 1.0 else buckets), log_p
    # 'uniform': each of the V − k other ids holds tail / (V − k), then all of it tempered
    log_u = (log_tail - math.log(vocab - k)) / tau
    log_p = log_u.unsqueeze(-1).expand_as(log_q).clone().scatter_(-1, ids, logprobs / tau)
    return log_q, torch.log_softmax(log_p, dim=-1)


def _topk_divergence_rows(spec: _Spec, log_q: torch.Tensor, ids: torch.Tensor,
                          logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token ``spec.topk_divergence`` (n,) against a top-k teacher (autograd-able).

    Args:
        log_q: (n, V) student log-probabilities at τ; ids: (n, k) int64; logprobs: (n, k)
            teacher log-probs at τ = 1 (see :func:`_topk_support`).
    """
    log_q_s, log_p_s = _topk_support(spec, log_q, ids, logprobs)
    return _divergence_rows(spec, log_q_s, log_p_s, spec.topk_divergence)


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


def _ce_from_log_probs(log_q: torch.Tensor, labels: torch.Tensor,
                       want_grad: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`_ce_rows` from the student's log-softmax at τ = 1 over its own vocabulary,
    (n, V), which the divergence computes anyway: the same rows and gradient without a
    second logsumexp pass over the logits."""
    safe = labels.clamp(min=0).unsqueeze(-1)  # ignore_index rows are masked by the caller
    rows = -log_q.gather(-1, safe).squeeze(-1)
    grad = None
    if want_grad:
        grad = log_q.exp()
        grad.scatter_add_(-1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
    return rows, grad


def _ce_reuses_log_probs(spec: _Spec, width: int, v_S: int) -> bool:
    """Whether the hard-label CE can be read off the divergence's student log-softmax: τ = 1
    and no vocabulary alignment on the student's side."""
    return spec.ce_weight != 0 and spec.temperature == 1.0 and width == v_S


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
        of ``(kd_weight · kd_sum + ce_weight · ce_sum) / denom`` wrt z_S (n, V_S), or None.
    """
    z_S = student.pop()
    v_S = z_S.shape[-1]
    tau = spec.temperature
    invalid = ~valid.unsqueeze(-1)
    name, beta = spec.divergence, spec.beta
    topk = name == "topk_kl"
    analytic = (_topk_is_analytic(spec) if topk else name in ("forward_kl", "reverse_kl")) or (
        name == "jsd" and beta in (0.0, 1.0))
    width = v_S if topk else _aligned_width(spec, v_S, v_T)
    ce_from_log_q = _ce_reuses_log_probs(spec, width, v_S) and (analytic or not need_grad)
    ce_sum = ce_grad = None
    if spec.ce_weight != 0 and not ce_from_log_q:  # first, so z_S can be dropped early
        ce, ce_grad = _ce_rows(z_S, labels, need_grad)
        ce_sum = ce.masked_fill(~valid, 0.0).sum()
    grad_s = None
    if analytic or not need_grad:
        log_q = _log_probs(spec, z_S, width)
        del z_S
        if ce_from_log_q:  # before the branches below overwrite log_q in place
            ce, ce_grad = _ce_from_log_probs(log_q, labels, need_grad)
            ce_sum = ce.masked_fill(~valid, 0.0).sum()
        if topk and analytic:
            ids, logprobs = teacher()
            rows, target = _topk_rows(spec, log_q, ids, logprobs, need_grad)
            if need_grad:  # d KL(p̂‖q) / d(z/τ) = q − p̂
                grad_s = log_q.exp_().sub_(target)
        elif topk:
            rows = _topk_divergence_rows(spec, log_q, *teacher())
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
        if topk:
            ids, logprobs = teacher()
            with torch.enable_grad():
                rows = _topk_divergence_rows(spec, torch.log_softmax(leaf, dim=-1), ids,
                                             logprobs)
        else:
            log_p = _log_probs(spec, _up(teacher()).to(leaf.dtype), width)
            with torch.enable_grad():
                rows = _divergence_rows(spec, torch.log_softmax(leaf, dim=-1), log_p)
        with torch.enable_grad():
            (grad_s,) = torch.autograd.grad(rows.masked_fill(~valid, 0.0).sum(), leaf)
        rows = rows.detach()
    kd_sum = rows.masked_fill(~valid, 0.0).sum() * spec.kd_scale
    grad = None
    if need_grad:  # invalid rows are zeroed, not multiplied by 0: they may hold inf
        grad = _unalign(grad_s.masked_fill_(invalid, 0.0), v_S)
        grad.mul_(spec.kd_scale * spec.kd_weight / tau)
        if ce_grad is not None:
            grad.add_(ce_grad.masked_fill_(invalid, 0.0), alpha=spec.ce_weight)
        grad.div_(denom)
    return kd_sum, ce_sum, grad
