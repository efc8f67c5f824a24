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

The 2024–2025 objectives of :mod:`textbrewer.losses.token.objectives` (``taid``, ``akl``,
registered too; :func:`distillm2_loss` over two batches) follow the same validity and
normalisation rules, on a dense and a checkpointed-chunk path (no fused path).

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
from .api import (TokenDistillationLoss, fused_token_distillation_loss,  # noqa: F401
                  token_distillation_loss)
from .paths import count_valid_tokens  # noqa: F401
from .registered import (forward_kl_loss, jsd_loss, reverse_kl_loss,  # noqa: F401
                         skew_kl_loss, skew_reverse_kl_loss, token_jsd_loss,
                         token_reverse_kl_loss, topk_kl_loss, tv_loss)
from .spec import (DIVERGENCES, TOPK_TAIL_FLOOR, TOPK_TAILS, TopKTeacher,  # noqa: F401
                   check_topk_divergence)
from .objectives import (OBJECTIVES, TAID_SCHEDULES, TAIDSchedule, akl_loss,  # noqa: F401
                         akl_weights, distillm2_loss, taid_loss)
from .registered import akl_token_loss, taid_token_loss  # noqa: F401

__all__ = ["TopKTeacher", "TokenDistillationLoss", "token_distillation_loss",
           "fused_token_distillation_loss", "count_valid_tokens", "forward_kl_loss",
           "token_reverse_kl_loss", "token_jsd_loss", "skew_kl_loss", "skew_reverse_kl_loss",
           "tv_loss", "topk_kl_loss", "DIVERGENCES", "TOPK_TAILS", "TOPK_TAIL_FLOOR",
           "check_topk_divergence",
           "OBJECTIVES", "TAID_SCHEDULES", "TAIDSchedule", "taid_loss", "akl_loss", "akl_weights",
           "distillm2_loss", "taid_token_loss", "akl_token_loss",
           "reverse_kl_loss", "jsd_loss"]  # the last two: aliases kept for old imports
