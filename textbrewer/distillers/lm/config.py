"""The options of the LM distillers: :class:`~textbrewer.distillers.lm.config.LMDistillationConfig`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from ...configurations import Config
from ...losses.token import (DIVERGENCES, OBJECTIVES, TAID_SCHEDULES, TOPK_TAILS,
                             check_topk_divergence)
from ...losses.token.cross import CROSS_TOKENIZER_MODES, SPAN_DIVERGENCES

__all__ = ["LMDistillationConfig", "LM_PATHS", "TOPK_TAILS", "VOCAB_ALIGNMENTS",
           "TOKEN_ALIGNMENTS", "LM_DIVERGENCES"]

#: every ``divergence=``: the token divergences, then the objectives of
#: :mod:`textbrewer.losses.token.objectives` (dense and chunked paths only)
LM_DIVERGENCES = DIVERGENCES + OBJECTIVES

#: the loss paths of :class:`~textbrewer.distillers.lm.config.LMDistillationConfig` (``path=``)
LM_PATHS = ("auto", "dense", "chunked", "fused")
#: what to do with vocabularies of different sizes (``vocab_alignment=``)
VOCAB_ALIGNMENTS = (None, "pad", "truncate")
#: how two tokenizers' tokens are compared (``token_alignment=``)
TOKEN_ALIGNMENTS = (None,) + CROSS_TOKENIZER_MODES


@dataclass
class LMDistillationConfig(Config):
    """Options of the LM distillers beyond :class:`~textbrewer.DistillationConfig`.

    The temperature τ is ``DistillationConfig.temperature`` (its default is TextBrewer's
    4; token-level KD of LMs usually uses 1); ``kd_loss_weight`` weights the divergence and
    ``hard_label_weight`` the cross-entropy (τ = 1) on the same target tokens.

    Args:
        divergence: a token divergence of :data:`textbrewer.losses.token.DIVERGENCES`:
            ``'forward_kl'``, ``'reverse_kl'``, ``'jsd'``, ``'skew_kl'``,
            ``'skew_reverse_kl'``, ``'tv'``, or ``'topk_kl'`` (the forward KL against
            the live teacher's top ``topk`` entries); or an objective of
            :mod:`textbrewer.losses.token.objectives` (``'taid'``, ``'akl'``). Against a
            top-k teacher (batches that carry cached teacher rows,
            ``batch['teacher_topk']``, or ``topk`` set) the divergence is taken against
            the teacher ``topk_tail`` rebuilds; the objectives need the full teacher.
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
        token_alignment: None (one tokenizer: position t of both models is compared), or
            for a teacher and a student with different tokenizers, batches from
            :class:`~textbrewer.distillers.lm.cross_tokenizer.CrossTokenizerCollator` and
            their aligned token groups compared by ``'span'`` (the teacher's merged
            distribution carried onto the student's vocabulary through the distiller's
            ``vocabulary_map``, then ``divergence``: one of ``'forward_kl'``,
            ``'skew_kl'``, ``'tv'``, ``'jsd'`` with β < 1) or ``'uld'`` (sorted-probability
            L1, Boizard et al. 2024); see :mod:`textbrewer.losses.token.cross`. The
            dense path only; no teacher cache, on-policy or sequence-level KD.
        taid_t_start, taid_t_end: TAID's t at the start and its largest value (paper: 0.4,
            1.0).
        taid_alpha, taid_beta: step size and momentum of TAID's adaptive update (paper:
            5e-4, 0.99).
        taid_schedule: ``'adaptive'`` (the paper's update after each optimizer step, from
            the step's TAID loss) or ``'linear'`` (t_start to t_end over the run).
        akl_mu: μ of ``'akl'``: the teacher mass of the head (paper: 0.5).
        speculative_top_k: None, or K: student-generated (on-policy) batches are generated
            with Speculative KD: each token the student samples is kept when it is in the
            teacher's top K, else replaced by a token sampled from the teacher (Xu et al.,
            ICLR 2025). Causal LMs; the plain sampling loop runs (no ``generate``).
        topk: None, or the live teacher is cut to its k most likely entries per token
            (as a cache would hold them) before ``divergence`` compares; needed by
            ``'topk_kl'``.
        topk_tail: what a top-k teacher does with its missing mass: ``'renormalize'``,
            ``'uniform'`` or ``'bucket'`` (one "any other id" outcome on both sides; see
            :class:`~textbrewer.losses.token.TopKTeacher`). The reverse KL (and JSD with
            β = 1, skew reverse KL with α = 0) is infinite against ``'renormalize'`` and
            is refused there: ``'bucket'`` is the guard (docs/objectives.md).
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
        hard_labels_on_generated: the hard-label cross-entropy (``hard_label_weight``) also
            on student-generated (on-policy) batches, whose targets are the student's own
            samples (True: the behaviour before 2026-12); False (default): the divergence
            alone there, as GKD and TRL's trainer do (on the LM example it improved GKD's
            JSD and reverse-KL rows by 1.9 and 2.8 perplexity points). Sequence-level KD
            batches (the teacher's samples) and dataset batches keep it either way.
        telemetry: after each optimizer step, log the student's and the teacher's mean
            entropy and the mean divergence, overall and by target position, per kind of
            batch (dataset, on-policy, sequence-level KD); see
            :mod:`textbrewer.distillers.lm.telemetry`. Costs one more pass over each
            batch's logits, without gradient (the fused path computes them block by block).
        telemetry_bins: the first target index of each position bin after the first,
            strictly increasing (default: bins 0-15, 16-63, 64-255, 256+).

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
    token_alignment: Optional[str] = None
    taid_t_start: float = 0.4
    taid_t_end: float = 1.0
    taid_alpha: float = 5e-4
    taid_beta: float = 0.99
    taid_schedule: str = "adaptive"
    akl_mu: float = 0.5
    speculative_top_k: Optional[int] = None
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
    hard_labels_on_generated: bool = False
    telemetry: bool = False
    telemetry_bins: Tuple[int, ...] = (16, 64, 256)

    def __post_init__(self) -> None:
        if self.divergence not in LM_DIVERGENCES:
            raise ValueError(f"divergence must be one of {list(LM_DIVERGENCES)}, got "
                             f"{self.divergence!r}")
        if self.divergence in OBJECTIVES and self.path == "fused":
            raise ValueError(f"divergence={self.divergence!r} has no fused path; use path="
                             f"'dense', 'chunked' or 'auto' (the fused path implements "
                             f"{list(DIVERGENCES)})")
        if self.taid_schedule not in TAID_SCHEDULES:
            raise ValueError(f"taid_schedule must be one of {list(TAID_SCHEDULES)}, got "
                             f"{self.taid_schedule!r}")
        if self.path not in LM_PATHS:
            raise ValueError(f"path must be one of {list(LM_PATHS)}, got {self.path!r}")
        if self.topk_tail not in TOPK_TAILS:
            raise ValueError(f"topk_tail must be one of {list(TOPK_TAILS)}, got "
                             f"{self.topk_tail!r}")
        if self.vocab_alignment not in VOCAB_ALIGNMENTS:
            raise ValueError(f"vocab_alignment must be one of {list(VOCAB_ALIGNMENTS)}, got "
                             f"{self.vocab_alignment!r}")
        for name, low, high in (("beta", 0.0, 1.0), ("alpha", 0.0, 1.0), ("lmbda", 0.0, 1.0),
                                ("top_p", 0.0, 1.0), ("taid_t_start", 0.0, 1.0),
                                ("taid_t_end", 0.0, 1.0), ("taid_alpha", 0.0, 1.0),
                                ("taid_beta", 0.0, 1.0), ("akl_mu", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        if self.top_p == 0:
            raise ValueError("top_p must be > 0 (1.0 turns nucleus sampling off), got 0")
        if not self.taid_t_start < self.taid_t_end:
            raise ValueError(f"taid_t_start must be < taid_t_end, got "
                             f"{self.taid_t_start!r} and {self.taid_t_end!r}")
        if self.taid_beta == 1:
            raise ValueError("taid_beta must be < 1 (the momentum would never move), got 1")
        if self.akl_mu == 0:
            raise ValueError("akl_mu must be > 0 (the head would be empty), got 0")
        if self.speculative_top_k is not None and (
                isinstance(self.speculative_top_k, bool)
                or not isinstance(self.speculative_top_k, int) or self.speculative_top_k < 1):
            raise ValueError(f"speculative_top_k must be None or an integer >= 1, got "
                             f"{self.speculative_top_k!r}")
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
                             "batches from a teacher cache need no topk")
        if self.topk is not None:
            self.check_topk_teacher("topk")
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
        if self.token_alignment not in TOKEN_ALIGNMENTS:
            raise ValueError(f"token_alignment must be one of {list(TOKEN_ALIGNMENTS)}, got "
                             f"{self.token_alignment!r}")
        if self.token_alignment is not None:
            self._check_cross_tokenizer()
        self._check_telemetry()

    def _check_telemetry(self) -> None:
        bins = self.telemetry_bins
        if (not isinstance(bins, (tuple, list))
                or any(isinstance(edge, bool) or not isinstance(edge, int) for edge in bins)
                or any(edge <= 0 for edge in bins)
                or any(b <= a for a, b in zip(bins, bins[1:]))):
            raise ValueError(f"telemetry_bins must be strictly increasing integers > 0 (the "
                             f"first target index of each bin after the first), got {bins!r}")
        self.telemetry_bins = tuple(bins)
        if self.telemetry and self.token_alignment is not None:
            raise ValueError(f"telemetry with token_alignment={self.token_alignment!r} is not "
                             f"supported: the divergence is over aligned token groups, not "
                             f"positions")

    def check_topk_teacher(self, why: str) -> None:
        """Raises unless ``divergence`` can be taken against a top-k teacher (``why`` says
        where that teacher comes from: ``'topk'`` or a cache)."""
        if self.divergence in OBJECTIVES:
            raise ValueError(f"divergence={self.divergence!r} needs the teacher's full "
                             f"logits, not a top-k teacher ({why}); use one of "
                             f"{list(DIVERGENCES)} against a top-k teacher")
        if self.token_alignment is not None:
            raise ValueError(f"token_alignment={self.token_alignment!r} needs the teacher's "
                             f"full logits, not a top-k teacher ({why})")
        try:
            check_topk_divergence(self.divergence, self.topk_tail, self.beta, self.alpha)
        except ValueError as error:
            raise ValueError(f"{error} (LMDistillationConfig.topk_tail; the top-k teacher: "
                             f"{why})") from None

    def _check_cross_tokenizer(self) -> None:
        mode = self.token_alignment
        if mode == "span" and (self.divergence not in SPAN_DIVERGENCES
                               or (self.divergence == "jsd" and self.beta >= 1.0)):
            raise ValueError(f"token_alignment='span' supports the divergences "
                             f"{list(SPAN_DIVERGENCES)} (jsd with beta < 1), got "
                             f"divergence={self.divergence!r}: the teacher carried onto the "
                             f"student's vocabulary leaves student tokens without mass, "
                             f"where a student-weighted divergence is infinite")
        if mode == "uld" and self.divergence != "forward_kl":
            raise ValueError(f"token_alignment='uld' is its own distance (sorted-probability "
                             f"L1); leave divergence at 'forward_kl', got "
                             f"{self.divergence!r}")
        if self.path not in ("auto", "dense"):
            raise ValueError(f"token_alignment={mode!r} runs on the dense path; path must "
                             f"be 'auto' or 'dense', got {self.path!r}")
        if self.generates:
            raise ValueError(f"token_alignment={mode!r} with on-policy (lmbda > 0) or "
                             f"sequence-level KD is not supported: generated tokens would "
                             f"have to be re-tokenised for the other model")
        if self.vocab_alignment is not None:
            raise ValueError(f"token_alignment={mode!r} and vocab_alignment="
                             f"{self.vocab_alignment!r} exclude each other (the vocabulary "
                             f"map of the span mode replaces id-by-id alignment)")

    @property
    def generates(self) -> bool:
        """Whether some batches are generated (on-policy or sequence-level KD)."""
        return self.lmbda > 0 or self.seq_kd
