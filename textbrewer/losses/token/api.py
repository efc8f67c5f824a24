"""Token-level distillation, the functions and the module users call (see
:mod:`textbrewer.losses.token`)."""
from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from ...registry import TOKEN_LOSSES

from .spec import (DEFAULT_FUSED_CHUNK_SIZE, DIVERGENCES, TokenCount, TopKTeacher,
                   _against_topk, _make_spec)
from .paths import (_apply_chunked, _apply_fused, _check_ce, _check_chunk_size, _check_reduction,
                    _check_vocab, _denominator, _dense, _outputs, _teacher_rows, _valid_tokens)

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
                            vocab_alignment: Optional[str] = None, return_dict: bool = False,
                            kd_weight: float = 1.0
                            ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    """Token-level distillation loss over logits (dense, or chunked with ``chunk_size``).

    Per-token formulas are in the module docstring; p = softmax(z_T/τ), q = softmax(z_S/τ).

    Args:
        logits_S: student logits, (N, V_S) or (B, L, V_S), any float dtype (computed in fp32
            at least).
        logits_T: teacher logits (N, V_T) / (B, L, V_T), or a :class:`TopKTeacher` with
            (..., k) entries: then ``divergence`` is taken against the top-k teacher as
            ``tail`` rebuilds it (``'topk_kl'`` = ``'forward_kl'``). Never receives a
            gradient.
        labels: (N,) / (B, L) int labels aligned with the logits; ``ignore_index`` marks
            invalid tokens. Needed when ``ce_weight > 0``.
        mask: (N,) / (B, L), 1 = keep (e.g. the attention mask).
        divergence: one of :data:`DIVERGENCES`.
        temperature: τ > 0.
        beta: β of ``jsd``, in [0, 1] (0: forward KL, 1: reverse KL).
        alpha: α of ``skew_kl`` / ``skew_reverse_kl``, in [0, 1].
        tail: a top-k teacher only: ``'renormalize'``, ``'uniform'`` or ``'bucket'`` (see
            :class:`TopKTeacher`; the reverse KL needs ``'bucket'`` or ``'uniform'``).
        scale_by_temperature_squared: multiply the KD term by τ² (default False).
        ce_weight: weight of the hard-label cross-entropy (τ = 1) on the same valid tokens.
        kd_weight: weight of the divergence term: ``loss = kd_weight · kd + ce_weight · ce``
            (1: the divergence as it is).
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
        ``'loss'`` (for backward) = kd_weight · ``'kd'`` + ce_weight · ``'ce'``; ``'kd'`` and ``'ce'`` are
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
                      ce_weight, vocab_alignment, kd_weight)
    if isinstance(logits_T, (tuple, list)):
        spec = _against_topk(spec)
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
                                  return_dict: bool = False, kd_weight: float = 1.0
                                  ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    """The same loss as :func:`~textbrewer.losses.token.token_distillation_loss`, fused with both LM heads.

    Logits are ``hidden @ weight.T + bias`` (exactly ``nn.Linear``), computed ``chunk_size``
    tokens at a time under the caller's autocast; each chunk's softmax runs in fp32. The
    gradients wrt ``hidden_S``, ``weight_S`` and ``bias_S`` are computed during forward and
    returned in those tensors' dtypes; teacher inputs get none. No [N, V] tensor is created.
    Anything a model applies after its head (logit scaling, soft-capping) is NOT applied here.

    ``divergence``, ``temperature``, ``beta``, ``alpha``, ``tail``,
    ``scale_by_temperature_squared``, ``ce_weight``, ``kd_weight``, ``ignore_index``,
    ``num_tokens``, ``reduction``, ``vocab_alignment`` and ``return_dict`` are as in
    :func:`~textbrewer.losses.token.token_distillation_loss` (``reduction='none'`` is not available).

    Args:
        hidden_S: student final hidden states, (N, Hs) or (B, L, Hs).
        weight_S: student head weight, (V_S, Hs).
        hidden_T: teacher final hidden states, (N, Ht) or (B, L, Ht); or a
            :class:`TopKTeacher` (then ``weight_T`` must be None; ``divergence`` is taken
            against it as in :func:`token_distillation_loss`).
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
                      ce_weight, vocab_alignment, kd_weight)
    if isinstance(hidden_T, (tuple, list)):
        spec = _against_topk(spec)
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
    are as in :func:`~textbrewer.losses.token.token_distillation_loss`.

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
        """Loss over logits (N, V) / (B, L, V); see :func:`~textbrewer.losses.token.token_distillation_loss`."""
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
        """Loss from hidden states and LM heads; see :func:`~textbrewer.losses.token.fused_token_distillation_loss`."""
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"user token loss {self.divergence!r} has no fused path")
        return fused_token_distillation_loss(
            hidden_S, weight_S, hidden_T, weight_T, labels, mask, bias_S=bias_S, bias_T=bias_T,
            divergence=self.divergence, num_tokens=num_tokens,
            chunk_size=self.chunk_size or DEFAULT_FUSED_CHUNK_SIZE, **self.options)
