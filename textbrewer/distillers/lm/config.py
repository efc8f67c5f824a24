"""The options of the LM distillers: :class:`~textbrewer.distillers.lm.config.LMDistillationConfig`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ...configurations import Config
from ...losses.token import DIVERGENCES

__all__ = ["LMDistillationConfig", "LM_PATHS", "TOPK_TAILS", "VOCAB_ALIGNMENTS"]

#: the loss paths of :class:`~textbrewer.distillers.lm.config.LMDistillationConfig` (``path=``)
LM_PATHS = ("auto", "dense", "chunked", "fused")
#: how a top-k teacher's missing mass is treated (``topk_tail=``)
TOPK_TAILS = ("renormalize", "uniform")
#: what to do with vocabularies of different sizes (``vocab_alignment=``)
VOCAB_ALIGNMENTS = (None, "pad", "truncate")


@dataclass
class LMDistillationConfig(Config):
    """Options of the LM distillers beyond :class:`~textbrewer.DistillationConfig`.

    The temperature τ is ``DistillationConfig.temperature`` (its default is TextBrewer's
    4; token-level KD of LMs usually uses 1); ``kd_loss_weight`` weights the divergence and
    ``hard_label_weight`` the cross-entropy (τ = 1) on the same target tokens.

    Args:
        divergence: a token divergence of :data:`textbrewer.losses.token.DIVERGENCES`:
            ``'forward_kl'``, ``'reverse_kl'``, ``'jsd'``, ``'skew_kl'``,
            ``'skew_reverse_kl'``, ``'tv'``, or ``'topk_kl'`` (against the live teacher's
            top ``topk`` entries). Batches that carry a cached teacher top-k
            (``batch['teacher_topk']``) always use ``'topk_kl'``.
        beta: β of ``'jsd'`` (0: forward KL, 1: reverse KL).
        alpha: α of ``'skew_kl'`` / ``'skew_reverse_kl'``.
        scale_by_temperature_squared: multiply the KD term by τ² (Hinton); off by default
            (TRL and Liger do not).
        path: ``'dense'`` (plain autograd over [tokens, vocab]), ``'chunked'`` (same values,
            ``chunk_size`` tokens at a time), ``'fused'`` (from final hidden states and the
            output-embedding weights: no [tokens, vocab] logits in the loss, and the models'
            heads are not run either, see :class:`~textbrewer.distillers.lm.causal.CausalLMDistiller`), or ``'auto'``:
            fused when both models expose their output embeddings and no adaptor or
            ``torch.compile`` is in use, else chunked.
        chunk_size: tokens per chunk of the chunked and fused paths.
        vocab_alignment: None (different vocabulary sizes are an error at construction),
            ``'pad'`` (the smaller vocabulary's missing columns get −inf logits) or
            ``'truncate'`` (both cut to the shared first ids).
        ignore_index: the label value of positions without a target.
        topk: entries of the live teacher's top-k for ``divergence='topk_kl'``.
        topk_tail: ``'renormalize'`` or ``'uniform'`` (see :class:`~textbrewer.losses.token.TopKTeacher`).
        cache_key: the batch key where :class:`~textbrewer.cache.CachedTeacherCollator`
            puts the cached teacher rows.
        lmbda: probability, per batch, that the student generates the continuation of the
            batch's prompt and is distilled on its own samples (on-policy, GKD). The draw
            comes from a generator seeded with ``seed``, saved in checkpoints.
        seq_kd: off-policy batches get the teacher's generated continuation as targets
            (sequence-level KD) instead of the dataset's; on-policy batches still use the
            student's.
        max_new_tokens: tokens generated per prompt.
        do_sample: sample (True) or decode greedily (False).
        generation_temperature: sampling temperature (not the KD temperature).
        top_k: keep the k most likely tokens when sampling (0: off).
        top_p: nucleus sampling threshold (1.0: off).
        eos_token_id: generation of a sequence stops after this token (kept as a target);
            None: always ``max_new_tokens`` tokens.
        pad_token_id: id used to pad prompts and generations (masked everywhere).
        seed: seed of the on-policy generator (the coin and the sampling seeds).
        check_fused_head: on the first fused batch, check on one example that each
            model's logits are exactly ``head(hidden)`` (catches soft-capping, logit
            scales, biases added after the head, which the fused path cannot see).

    None of the generation settings is read from ``model.generation_config``: the
    distillers pass them all explicitly, on a neutral generation config.
    """

    divergence: str = "forward_kl"
    beta: float = 0.5
    alpha: float = 0.1
    scale_by_temperature_squared: bool = False
    path: str = "auto"
    chunk_size: int = 1024
    vocab_alignment: Optional[str] = None
    ignore_index: int = -100
    topk: Optional[int] = None
    topk_tail: str = "renormalize"
    cache_key: str = "teacher_topk"
    lmbda: float = 0.0
    seq_kd: bool = False
    max_new_tokens: int = 32
    do_sample: bool = True
    generation_temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: Optional[int] = None
    pad_token_id: int = 0
    seed: int = 0
    check_fused_head: bool = True

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {list(DIVERGENCES)}, got "
                             f"{self.divergence!r}")
        if self.path not in LM_PATHS:
            raise ValueError(f"path must be one of {list(LM_PATHS)}, got {self.path!r}")
        if self.topk_tail not in TOPK_TAILS:
            raise ValueError(f"topk_tail must be one of {list(TOPK_TAILS)}, got "
                             f"{self.topk_tail!r}")
        if self.vocab_alignment not in VOCAB_ALIGNMENTS:
            raise ValueError(f"vocab_alignment must be one of {list(VOCAB_ALIGNMENTS)}, got "
                             f"{self.vocab_alignment!r}")
        for name, low, high in (("beta", 0.0, 1.0), ("alpha", 0.0, 1.0), ("lmbda", 0.0, 1.0),
                                ("top_p", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        if self.top_p == 0:
            raise ValueError("top_p must be > 0 (1.0 turns nucleus sampling off), got 0")
        for name, minimum in (("chunk_size", 1), ("max_new_tokens", 1), ("top_k", 0),
                              ("pad_token_id", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.topk is not None and (isinstance(self.topk, bool)
                                      or not isinstance(self.topk, int) or self.topk < 1):
            raise ValueError(f"topk must be None or an integer >= 1, got {self.topk!r}")
        if self.divergence == "topk_kl" and self.topk is None:
            raise ValueError("divergence='topk_kl' against a live teacher needs topk (the "
                             "number of teacher entries kept per token), got topk=None; "
                             "batches from a teacher cache use topk_kl whatever divergence is")
        if not (self.generation_temperature > 0 and math.isfinite(self.generation_temperature)):
            raise ValueError(f"generation_temperature must be a finite number > 0, got "
                             f"{self.generation_temperature!r}")
        if self.eos_token_id is not None and (isinstance(self.eos_token_id, bool) or not
                                              isinstance(self.eos_token_id, int)
                                              or self.eos_token_id < 0):
            raise ValueError(f"eos_token_id must be None or an integer >= 0, got "
                             f"{self.eos_token_id!r}")
        if not isinstance(self.ignore_index, int) or isinstance(self.ignore_index, bool):
            raise ValueError(f"ignore_index must be an integer, got {self.ignore_index!r}")

    @property
    def generates(self) -> bool:
        """Whether some batches are generated (on-policy or sequence-level KD)."""
        return self.lmbda > 0 or self.seq_kd
