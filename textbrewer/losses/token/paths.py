"""Token-level distillation, the paths: inputs and denominators, then the dense, chunked
and fused computations (see :mod:`textbrewer.losses.token`)."""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .spec import (TokenCount, _REDUCTIONS, _Spec, _aligned_width, _ce_from_log_probs,
                   _ce_reuses_log_probs, _ce_rows, _chunk, _divergence_rows, _log_probs,
                   _topk_divergence_rows, _topk_is_analytic, _topk_rows, _up, _weighted)

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
    v_S = z_S.shape[-1]
    if spec.divergence == "topk_kl":
        ids, logprobs = teacher
        # invalid rows may hold anything (−inf padding): their rows are zeroed below, but a
        # NaN local derivative would still reach the gradient through autograd (0 · NaN)
        logprobs = logprobs.masked_fill(~valid.unsqueeze(-1), 0.0)
        width = v_S
        log_q = torch.log_softmax(z_S / spec.temperature, dim=-1)
        if _topk_is_analytic(spec):
            rows, _ = _topk_rows(spec, log_q, ids, logprobs, want_target=False)
        else:
            rows = _topk_divergence_rows(spec, log_q, ids, logprobs)
    else:
        width = _aligned_width(spec, v_S, teacher.shape[-1])
        log_p = _log_probs(spec, _up(teacher).to(z_S.dtype), width)
        log_q = _log_probs(spec, z_S, width)
        rows = _divergence_rows(spec, log_q, log_p)
    kd_rows = torch.where(valid, rows, 0.0) * spec.kd_scale
    ce_rows = None
    if spec.ce_weight != 0:
        if _ce_reuses_log_probs(spec, width, v_S):
            ce, _ = _ce_from_log_probs(log_q, labels, want_grad=False)
        else:
            ce, _ = _ce_rows(z_S, labels, want_grad=False)
        ce_rows = torch.where(valid, ce, 0.0)
    if reduction == "none":
        total = _weighted(spec, kd_rows, ce_rows)
        return total.reshape(lead), kd_rows.detach().reshape(lead), (
            None if ce_rows is None else ce_rows.detach().reshape(lead))
    kd = kd_rows.sum() / denom
    ce = None if ce_rows is None else ce_rows.sum() / denom
    loss = _weighted(spec, kd, ce)
    return loss, kd.detach(), None if ce is None else ce.detach()


#: Bytes of one fp32 [rows, V] temporary of the per-token arithmetic (softmaxes, the
#: divergence, the gradient). The chunked and fused paths run that arithmetic on blocks of at
#: most ``chunk_size`` rows whose temporaries stay this small: below glibc's largest dynamic
#: mmap threshold (32 MiB on 64-bit), so a freed temporary is reused from the heap by the next
#: block instead of being mapped and page-faulted afresh (on CPU, faulting in a 512 MiB
#: [1024, 128k] tensor cost several times the exp over it), and within a server CPU's L3
#: between the passes over it. Each row's values do not depend on the block it is in; only
#: the order in which the per-block sums are added does.
_BLOCK_BYTES = 16 * 2 ** 20


def _block_rows(width: int, limit: int, itemsize: int) -> int:
    """Rows per block of the arithmetic: [rows, width] compute-dtype tensors ≤ _BLOCK_BYTES."""
    return max(1, min(limit, _BLOCK_BYTES // (itemsize * max(width, 1))))


def _compute_itemsize(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float64 else 4  # fp16/bf16 are up-cast to fp32


class _ChunkedLoss(torch.autograd.Function):
    """Loss over given logits, block by block; the gradient is computed in forward.

    Blocks have at most ``chunk_size`` rows, fewer when the vocabulary is wide (see
    ``_BLOCK_BYTES``): memory only goes down, and the values are the same.
    """

    @staticmethod
    def forward(ctx, logits_S, logits_T, ids, logprobs, labels, valid, denom, spec, chunk_size,
                need_grad):
        n = logits_S.shape[0]
        v_T = 0 if logits_T is None else logits_T.shape[-1]
        block = _block_rows(max(logits_S.shape[-1], v_T), chunk_size,
                            _compute_itemsize(logits_S.dtype))
        grad = torch.empty_like(logits_S) if need_grad else None
        kd = denom.new_zeros(())  # stays 0 for an empty input
        ce = denom.new_zeros(()) if spec.ce_weight != 0 else None
        for start in range(0, n, block):
            rows = slice(start, start + block)
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
        loss = _weighted(spec, kd, ce)
        ce_out = torch.zeros_like(kd) if ce is None else ce
        ctx.save_for_backward(grad)
        kd_out = kd.clone()
        ctx.mark_non_differentiable(kd_out, ce_out)
        return loss, kd_out, ce_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype),) + (None,) * 9


def _logits_buffer(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   rows: int) -> Optional[torch.Tensor]:
    """A [rows, V] buffer that every chunk's logits are written into, or None (then each
    chunk gets a fresh ``F.linear`` result): under autocast (``F.linear`` casts, an ``out=``
    matmul would not) and when the dtypes differ (``F.linear`` raises its own error)."""
    try:
        autocast = torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (meta): plain F.linear
        return None
    if autocast or x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        return None
    return torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=weight.device)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            buffer: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, into ``buffer[:len(x)]`` when there is one: the same
    kernel (``mm`` / ``addmm``), so the same bits, without a fresh [rows, V] tensor."""
    if buffer is None:
        return F.linear(x, weight, bias)
    out = buffer[:x.shape[0]]
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


class _FusedLoss(torch.autograd.Function):
    """Loss from hidden states and LM heads, chunk by chunk; no [N, V] tensor is created.

    Each chunk's logits are computed under the caller's autocast, into one [chunk, V] buffer
    per model that every chunk reuses (without autocast). The per-token arithmetic runs on
    blocks of those rows (see ``_BLOCK_BYTES``), each block up-cast for the softmax, and
    each block's gradient wrt its logits overwrites them in the student's buffer (in the
    logits' dtype), so the gradients wrt the student hidden states, head weight and bias are
    one matmul per chunk, as large as ``chunk_size`` makes them.
    """

    @staticmethod
    def forward(ctx, hidden_S, weight_S, bias_S, hidden_T, weight_T, bias_T, ids, logprobs,
                labels, valid, denom, spec, chunk_size, needs):
        need_h, need_w, need_b = needs
        need_grad = need_h or need_w or need_b
        n = hidden_S.shape[0]
        v_T = 0 if weight_T is None else weight_T.shape[0]
        rows_max = min(chunk_size, n)
        buffer_S = _logits_buffer(hidden_S, weight_S, bias_S, rows_max)
        buffer_T = None if hidden_T is None else _logits_buffer(hidden_T, weight_T, bias_T,
                                                                rows_max)
        block = _block_rows(max(weight_S.shape[0], v_T), rows_max,
                            _compute_itemsize(weight_S.dtype))
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
            z_S = _linear(h, weight_S, bias_S, buffer_S)  # becomes the gradient, block by block
            z_T = None if hidden_T is None else _linear(hidden_T[rows], weight_T, bias_T,
                                                        buffer_T)
            m = h.shape[0]
            for first in range(0, m, block):
                last = min(first + block, m)  # a block never crosses into the next chunk
                sub, token = slice(first, last), slice(start + first, start + last)
                if z_T is None:
                    def teacher(token=token):
                        return ids[token], logprobs[token]
                else:
                    def teacher(sub=sub):
                        return z_T[sub]
                kd_c, ce_c, grad_c = _chunk(spec, [_up(z_S[sub])], teacher, v_T,
                                            None if labels is None else labels[token],
                                            valid[token], need_grad, denom)
                kd = kd + kd_c
                if ce_c is not None:
                    ce = ce + ce_c
                if need_grad:  # these rows' logits are used up: their memory takes the
                    z_S[sub] = grad_c  # gradient, cast to the logits' dtype
            z_T = None  # the teacher's logits are used up (freed here without a buffer)
            if not need_grad:
                continue
            # In the logits' dtype, so the matmuls run like the forward one (bf16 under
            # autocast) and dtypes match without autocast.
            grad_z = z_S
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
        loss = _weighted(spec, kd, ce)
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
