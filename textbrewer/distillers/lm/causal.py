"""Token-level distillation of decoder-only LMs: :class:`~textbrewer.distillers.lm.causal.CausalLMDistiller`."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict

from torch import nn

from .alignment import CausalAlignment
from .base import LMDistillerBase

__all__ = ["CausalLMDistiller"]


class CausalLMDistiller(LMDistillerBase):
    """Token-level distillation of a decoder-only (causal) LM.

    Loss per micro-batch (over the valid target tokens t of the accumulation window,
    N = their number over micro-batches and DDP ranks)::

        kd_loss_weight · Σ_t D(p_t ‖ q_t) / N  +  hard_label_weight · Σ_t CE_t / N

    with D the configured divergence at τ = ``DistillationConfig.temperature`` and the CE
    at τ = 1, both computed on the logits at t against the token ``labels[t + 1]``
    (valid: ``labels[t + 1] != ignore_index`` and ``attention_mask[t + 1] == 1``).

    Models. Transformers causal LMs are the expected case: they are called as
    ``model(input_ids=..., attention_mask=..., **other_batch_keys)``; ``labels`` are never
    passed (the distiller computes the loss; the model would compute a second one over
    full logits). A plain module works too: called the same way, returning (B, L, V)
    logits (a tensor, ``.logits``, ``['logits']``) or anything an adaptor turns into
    ``{'logits': ...}``.

    The fused path (``path='fused'``, or ``'auto'`` when both models have an output
    embedding and no adaptor) never materialises [tokens, vocab] logits: during each
    forward pass the output head (``get_output_embeddings()``, or ``lm_head_S``/``lm_head_T``)
    is replaced by a capture of its input, so the models run their own code (through DDP
    for the student) but skip the head, and the loss is computed chunk by chunk from the
    final hidden states and the heads' weights (and biases, plus BART's
    ``final_logits_bias``). Anything a model does to its logits after the head is invisible
    to it: the first batch is checked on one example (``check_fused_head``) and such a model
    is refused with a clear error.

    Args:
        train_config: :class:`~textbrewer.TrainingConfig`.
        distill_config: :class:`~textbrewer.DistillationConfig`: ``temperature``,
            ``kd_loss_weight``, ``hard_label_weight`` and their weight schedules.
        model_T: the teacher, or None when every batch carries cached teacher rows
            (:class:`~textbrewer.cache.CachedTeacherCollator`).
        model_S: the student.
        adaptor_T, adaptor_S: optional ``adaptor(inputs, outputs) -> {'logits': (B, L, V)}``
            (dense and chunked paths).
        lm_config: :class:`~textbrewer.distillers.lm.config.LMDistillationConfig` (default: forward KL, path 'auto').
        lm_head_T, lm_head_S: output heads for the fused path when the models have no
            ``get_output_embeddings()``.

    Raises:
        ValueError: different vocabulary sizes without ``vocab_alignment`` (naming both),
            an impossible ``path='fused'``, a temperature schedule, ``probability_shift``,
            on-policy or seq-KD without a teacher.

    Example:
        >>> distiller = CausalLMDistiller(TrainingConfig(device='cpu'),
        ...                               DistillationConfig(temperature=1, hard_label_weight=0.5),
        ...                               teacher, student,
        ...                               lm_config=LMDistillationConfig(divergence='jsd'))
        >>> with distiller:
        ...     distiller.train(optimizer, loader, num_steps=1000)
    """

    alignment_class = CausalAlignment

    def generated_batch(self, model: nn.Module, batch: Mapping, seed: int) -> Dict[str, Any]:
        """The batch's prompts followed by ``model``'s continuation (see
        :meth:`~textbrewer.distillers.lm.generation.Sampler.causal_batch`)."""
        return self.sampler.causal_batch(model, batch, seed)
