"""Token-level distillation of encoder-decoder LMs: :class:`~textbrewer.distillers.lm.seq2seq.Seq2SeqLMDistiller`."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict

from torch import nn

from .alignment import Seq2SeqAlignment
from .base import LMDistillerBase

__all__ = ["Seq2SeqLMDistiller"]


class Seq2SeqLMDistiller(LMDistillerBase):
    """Token-level distillation of an encoder-decoder LM (T5, BART and their families).

    ``labels`` (B, T) are the decoder's targets, aligned with the decoder's logits (the
    model shifts them right into its decoder inputs, so no shift here): valid tokens are
    ``labels != ignore_index`` (and ``decoder_attention_mask == 1`` when given). The
    decoder inputs are ``model.prepare_decoder_input_ids_from_labels(labels)`` (each model
    with its own start token) unless the batch holds ``decoder_input_ids``; a model without
    that method gets ``labels`` and shifts them itself. Everything else is as in
    :class:`~textbrewer.distillers.lm.causal.CausalLMDistiller` (loss, paths, window normalisation); on-policy generation
    uses the model's ``generate`` (the encoder input is the prompt), and a teacher cache
    is not supported (it is indexed by ``input_ids`` positions).
    """

    alignment_class = Seq2SeqAlignment

    def generated_batch(self, model: nn.Module, batch: Mapping, seed: int) -> Dict[str, Any]:
        """The batch with ``model``'s generated decoder sequence as its labels (see
        :meth:`~textbrewer.distillers.lm.generation.Sampler.seq2seq_batch`)."""
        return self.sampler.seq2seq_batch(model, batch, seed)
