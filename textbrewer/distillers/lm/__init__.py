"""Language-model distillers: token-level KD for causal and encoder-decoder LMs.

:class:`~textbrewer.distillers.lm.causal.CausalLMDistiller` and :class:`~textbrewer.distillers.lm.seq2seq.Seq2SeqLMDistiller` are
:class:`~textbrewer.BasicDistiller` subclasses (through :class:`~textbrewer.distillers.lm.base.LMDistillerBase`): they run
in the one training loop (accumulation, clipping, DDP, fp16/bf16, checkpoints, resume) and only say how a batch becomes a loss, with the token losses of
:mod:`textbrewer.losses.token`. Why ``BasicDistiller`` and not ``AbstractDistiller``: the
weights ``kd_loss_weight`` / ``hard_label_weight`` and their schedules, TextBrewer 0.2.1's
``d_config`` view and the adaptor helpers are BasicDistiller's, and an LM distiller is
exactly "BasicDistiller whose KD term is a token-level divergence and whose hard-label
term is the cross-entropy on the same tokens"; its logits caching and intermediate
matches do not apply and are refused or warned about.

One micro-batch, in order:

1. (read ahead for the whole accumulation window, in
   :meth:`~textbrewer.distillers.engine.AbstractDistiller.count_window_tokens`) the batch
   is prepared on the host: on-policy / sequence-level KD batches are generated,
   the targets are aligned with the logits (causal shift), and the valid target tokens
   are counted, so the loss is normalised by the window's tokens over all ranks;
2. the student runs (through the loop's DDP/compile wrapper) and, unless the batch carries
   a cached teacher top-k, the teacher runs without gradients;
3. ``loss = kd_loss_weight · KD + hard_label_weight · CE``, both summed over the valid
   target tokens and divided by the window's count (``num_tokens``).

Positions (causal LMs, the Hugging Face convention): the logits at position t predict the
token at t + 1, so the target of position t is ``labels[t + 1]`` and the last position has
none. Encoder-decoder models shift inside: the decoder logits at t are scored against
``labels[t]``.

The package, by concern: :mod:`.config` (the options), :mod:`.alignment` (targets aligned
with the logits, per kind of LM), :mod:`.generation` (on-policy and sequence-level
batches), :mod:`.heads` (logits from outputs, and the output-head swap of the fused path),
:mod:`.base` (the loss of one batch), :mod:`.causal` and :mod:`.seq2seq` (the distillers),
:mod:`.distillm2` (DistiLLM-2's contrastive distiller),
:mod:`.cross_tokenizer` (two tokenizers: aligned token groups, the vocabulary map, the
collator; the losses are in :mod:`textbrewer.losses.token.cross`).
"""
from .alignment import PreparedBatch
from .base import LMDistillerBase
from .causal import CausalLMDistiller
from .config import LMDistillationConfig
from .cross_tokenizer import CrossTokenizerCollator, align_token_groups, vocabulary_map
from .distillm2 import DistiLLM2Distiller
from .seq2seq import Seq2SeqLMDistiller

__all__ = ["LMDistillationConfig", "LMDistillerBase", "CausalLMDistiller", "Seq2SeqLMDistiller",
           "DistiLLM2Distiller", "PreparedBatch", "CrossTokenizerCollator", "align_token_groups",
           "vocabulary_map"]
