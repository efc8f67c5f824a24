"""Language-model distillers: token-level KD for causal and encoder-decoder LMs.

:class:`CausalLMDistiller` and :class:`Seq2SeqLMDistiller` are
:class:`~textbrewer.BasicDistiller` subclasses (through :class:`LMDistillerBase`): they run in the one training loop (accumulation, clipping, DDP, fp16/bf16,
checkpoints, resume) and only say how a batch becomes a loss, with the token losses of
:mod:`textbrewer.losses.token`. Why ``BasicDistiller`` and not ``AbstractDistiller``: the
weights ``kd_loss_weight`` / ``hard_label_weight`` and their schedules, TextBrewer 0.2.1's
``d_config`` view and the adaptor helpers are BasicDistiller's, and an LM distiller is
exactly "BasicDistiller whose KD term is a token-level divergence and whose hard-label
term is the cross-entropy on the same tokens"; its logits caching and intermediate
matches do not apply and are refused or warned about.

One micro-batch, in order:

1. (read ahead for the whole accumulation window, in :meth:`~textbrewer.distillers.engine.AbstractDistiller.count_window_tokens`) the
   batch is prepared on the host: on-policy / sequence-level KD batches are generated,
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
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..configurations import Config, DistillationConfig, TrainingConfig
from ..logs import logger
from ..losses.token import (DIVERGENCES, TopKTeacher, fused_token_distillation_loss,
                            token_distillation_loss)
from .basic import BasicDistiller
from .engine import forward_model

__all__ = ["LMDistillationConfig", "LMDistillerBase", "CausalLMDistiller", "Seq2SeqLMDistiller",
           "PreparedBatch"]

LM_PATHS = ("auto", "dense", "chunked", "fused")
TOPK_TAILS = ("renormalize", "uniform")
VOCAB_ALIGNMENTS = (None, "pad", "truncate")
#: batch keys that are never passed to a model
_NOT_MODEL_INPUTS = ("labels", "example_index")


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
            heads are not run either, see :class:`CausalLMDistiller`), or ``'auto'``:
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


class PreparedBatch(NamedTuple):
    """One micro-batch, ready for the loss (all tensors where the batch had them).

    ``labels`` and ``valid`` are aligned with the logits: (B, L) for a causal LM (the
    target of position t is the token at t + 1), (B, T) decoder positions for seq2seq.
    """

    student: Dict[str, Any]
    teacher: Optional[Dict[str, Any]]
    labels: torch.Tensor
    valid: torch.Tensor
    topk: Optional[TopKTeacher]
    count: int
    source: str  # 'data', 'student' (on-policy) or 'teacher' (sequence-level KD)


def _output_head(model: Any, given: Optional[nn.Module]) -> Optional[nn.Module]:
    """The module that maps final hidden states to logits: ``given``, else the model's
    ``get_output_embeddings()`` when it is a Linear-like module (a 2-D ``weight``)."""
    if given is not None:
        return given
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    weight = getattr(head, "weight", None)
    return head if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _vocab_size(model: Any, head: Optional[nn.Module]) -> Optional[int]:
    """Rows of the output embedding, else ``model.config.vocab_size``, else None."""
    if head is not None:
        return int(head.weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def _logits_of(outputs: Any, role: str) -> torch.Tensor:
    """(B, L, V) logits from a model's output: a tensor, ``.logits``, ``['logits']`` or
    the first element of a tuple."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if hasattr(outputs, "logits") and isinstance(outputs.logits, torch.Tensor):
        return outputs.logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ValueError(f"cannot find logits in the {role}'s output ({type(outputs).__name__}); "
                     f"return a tensor, an object with .logits or a dict with 'logits', or "
                     f"pass an adaptor returning {{'logits': (B, L, V)}}")


def _first_rows(batch: Dict[str, Any], size: int, rows: int) -> Dict[str, Any]:
    """The first ``rows`` examples of a dict batch (tensors whose first dim is ``size``)."""
    return {key: value[:rows] if isinstance(value, torch.Tensor) and value.dim() >= 1
            and value.shape[0] == size else value for key, value in batch.items()}


@contextlib.contextmanager
def _head_skipped(model: nn.Module, head: nn.Module, captured: List[torch.Tensor]):
    """Runs ``model`` with its output head replaced by a capture of the head's input.

    The head returns an empty (..., 0) tensor instead of logits, so the forward pass never
    computes the [tokens, vocab] logits; ``captured`` receives the hidden states the head
    was given. A ``final_logits_bias`` buffer (BART and its family add it after the head)
    is emptied for the call too, so that the addition stays (..., 0).
    """
    had_forward = "forward" in head.__dict__
    previous = head.__dict__.get("forward")

    def capture(hidden, *args, **kwargs):
        captured.append(hidden)
        return hidden.new_empty(*hidden.shape[:-1], 0)

    head.forward = capture
    bias = model._buffers.get("final_logits_bias") if isinstance(model, nn.Module) else None
    if bias is not None:
        model._buffers["final_logits_bias"] = bias[..., :0]
    try:
        yield captured
    finally:
        if had_forward:
            head.forward = previous
        else:
            del head.forward
        if bias is not None:
            model._buffers["final_logits_bias"] = bias


def _head_bias(model: nn.Module, head: nn.Module) -> Optional[torch.Tensor]:
    """The head's bias plus a ``final_logits_bias`` buffer (BART), or None."""
    bias = getattr(head, "bias", None)
    extra = model._buffers.get("final_logits_bias") if isinstance(model, nn.Module) else None
    if extra is not None:
        extra = extra.reshape(-1)
        bias = extra if bias is None else bias + extra
    return bias


class LMDistillerBase(BasicDistiller):
    """What the causal and the encoder-decoder distillers share; see :class:`CausalLMDistiller`."""

    supports_logits_caching = False
    # the fused loss uses the LM head's weight after the forward pass: DDP must not count
    # it as unused there
    ddp_find_unused_parameters = False
    #: whether the logits at t predict labels[t + 1] (causal) or labels[t] (seq2seq)
    shifts_labels = True

    def __init__(self, train_config: TrainingConfig, distill_config: DistillationConfig,
                 model_T: Optional[nn.Module], model_S: nn.Module,
                 adaptor_T: Optional[Callable] = None, adaptor_S: Optional[Callable] = None,
                 lm_config: Optional[LMDistillationConfig] = None, *,
                 lm_head_T: Optional[nn.Module] = None, lm_head_S: Optional[nn.Module] = None):
        if lm_config is None:
            lm_config = LMDistillationConfig()
        if not isinstance(lm_config, LMDistillationConfig):
            raise TypeError(f"lm_config must be an LMDistillationConfig, got "
                            f"{type(lm_config).__name__}")
        if isinstance(distill_config, DistillationConfig):
            if distill_config.temperature_scheduler not in ("none", "constant"):
                raise ValueError(f"{type(self).__name__} uses a fixed temperature; "
                                 f"temperature_scheduler={distill_config.temperature_scheduler!r}"
                                 f" is not supported (use 'none')")
            if distill_config.probability_shift:
                raise ValueError(f"{type(self).__name__} does not support probability_shift="
                                 f"True (a token-level divergence has no single gold label "
                                 f"per example to swap)")
            if distill_config.kd_loss_type != "ce":
                logger.warning("%s ignores kd_loss_type=%r: the KD term is "
                               "LMDistillationConfig.divergence=%r", type(self).__name__,
                               distill_config.kd_loss_type, lm_config.divergence)
        if model_T is not None and not isinstance(model_T, nn.Module):
            raise TypeError(f"model_T must be a torch.nn.Module or None (training from a "
                            f"teacher cache), got {type(model_T).__name__}")
        if model_T is None and lm_config.seq_kd:
            raise ValueError("seq_kd=True needs a teacher to generate, but model_T is None")
        if model_T is None and lm_config.lmbda > 0:
            raise ValueError(f"lmbda={lm_config.lmbda} (on-policy) needs a live teacher to "
                             f"score the student's samples, but model_T is None (a teacher "
                             f"cache only covers the dataset's tokens)")
        super().__init__(train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S)
        self.lm_config = lm_config
        self.head_S = _output_head(model_S, lm_head_S)
        self.head_T = None if model_T is None else _output_head(model_T, lm_head_T)
        self.vocab_size_S = _vocab_size(model_S, self.head_S)
        self.vocab_size_T = None if model_T is None else _vocab_size(model_T, self.head_T)
        self._check_vocabularies()
        self.path = self._resolve_path()
        self._policy_rng = torch.Generator().manual_seed(lm_config.seed)
        self._prepared: List[Tuple[Any, PreparedBatch]] = []
        self._fused_checked = False

    # setup -----------------------------------------------------------------------------------
    def _check_vocabularies(self) -> None:
        v_S, v_T = self.vocab_size_S, self.vocab_size_T
        if v_S is None or v_T is None or v_S == v_T or self.lm_config.vocab_alignment:
            return
        raise ValueError(f"the student's vocabulary has {v_S} entries and the teacher's "
                         f"{v_T} (from the output embeddings, else config.vocab_size); a "
                         f"token-level loss compares the two distributions id by id. If the "
                         f"ids agree (a padded vocabulary), pass LMDistillationConfig("
                         f"vocab_alignment='pad') (missing columns get -inf logits); "
                         f"different tokenizers cannot be distilled token by token")

    def _resolve_path(self) -> str:
        requested = self.lm_config.path
        heads = self.head_S is not None and (self.model_T is None or self.head_T is not None)
        adaptors = self.adaptor_S is not None or self.adaptor_T is not None
        compiled = self.t_config.compile is not False
        live_topk = self.lm_config.divergence == "topk_kl"
        if requested == "fused":
            problems = []
            if self.head_S is None:
                problems.append("the student has no output embedding (get_output_embeddings() "
                                "returned no Linear; pass lm_head_S=)")
            if self.model_T is not None and self.head_T is None:
                problems.append("the teacher has no output embedding (pass lm_head_T=)")
            if adaptors:
                problems.append("adaptors are given (the fused path reads the heads' inputs, "
                                "not an adaptor's logits)")
            if compiled:
                problems.append("TrainingConfig.compile is on (the fused path swaps the head "
                                "for a capture during the forward pass)")
            if live_topk:
                problems.append("divergence='topk_kl' against a live teacher needs the "
                                "teacher's logits")
            if problems:
                raise ValueError("path='fused' is not possible: " + "; ".join(problems))
            return "fused"
        if requested == "auto":
            return "fused" if heads and not adaptors and not compiled and not live_topk \
                else "chunked"
        return requested

    # state -----------------------------------------------------------------------------------
    def extra_state(self) -> Dict[str, Any]:
        """The on-policy generator's state (the coin and the sampling seeds)."""
        return {"policy_rng": self._policy_rng.get_state()}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        if state and state.get("policy_rng") is not None:
            self._policy_rng.set_state(state["policy_rng"])

    # windows ---------------------------------------------------------------------------------
    def count_window_tokens(self, batches: List[Any]) -> int:
        """Prepares the window's micro-batches (generating where on-policy) and returns
        their valid target tokens: the loss of each is its token sum over this count
        (summed over ranks by the loop)."""
        self._prepared = [(batch, self.prepare_batch(batch)) for batch in batches]
        return sum(prepared.count for _, prepared in self._prepared)

    def _take_prepared(self, batch: Any) -> PreparedBatch:
        if self._prepared and self._prepared[0][0] is batch:
            return self._prepared.pop(0)[1]
        # called outside the loop's window (a direct call): prepare now
        self._prepared = []
        return self.prepare_batch(batch)

    def _draw_policy(self) -> Tuple[bool, int]:
        """(on-policy?, sampling seed) for one batch; both are drawn for every batch, so the
        generator's position does not depend on the outcomes."""
        coin = float(torch.rand((), generator=self._policy_rng))
        seed = int(torch.randint(0, 2 ** 62, (), generator=self._policy_rng))
        return coin < self.lm_config.lmbda, seed

    # batches ---------------------------------------------------------------------------------
    def prepare_batch(self, batch: Any) -> PreparedBatch:
        """A dataloader batch to model inputs, aligned targets and the valid-token count.

        Args:
            batch: a dict with ``input_ids`` (B, L), optional ``attention_mask`` (B, L),
                ``labels`` (B, L) (``ignore_index`` where there is no target; for a causal
                LM default: the input ids at attention-masked positions), an optional cached
                teacher top-k under ``lm_config.cache_key``, and other model inputs; or
                ``{'teacher': dict, 'student': dict}`` when the teacher has its own ids.
        """
        config = self.lm_config
        if isinstance(batch, Mapping) and "teacher" in batch and "student" in batch:
            teacher_batch, student_batch, separate = batch["teacher"], batch["student"], True
        else:
            teacher_batch = student_batch = batch
            separate = False
        for role, part in (("student", student_batch), ("teacher", teacher_batch)):
            if not isinstance(part, Mapping) or "input_ids" not in part:
                raise ValueError(f"{type(self).__name__} needs dict batches with 'input_ids' "
                                 f"(B, L); the {role}'s batch is a {type(part).__name__}"
                                 + (f" with keys {sorted(part)}" if isinstance(part, Mapping)
                                    else ""))
        source = "data"
        if config.generates:
            on_policy, seed = self._draw_policy()
            if on_policy or config.seq_kd:
                if separate:
                    raise ValueError("on-policy / sequence-level KD with {'teacher', "
                                     "'student'} batches is not supported: the generated "
                                     "tokens would have to be re-tokenised for the teacher")
                source = "student" if on_policy else "teacher"
                model = self.model_S if on_policy else self.model_T
                student_batch = teacher_batch = self.generated_batch(model, student_batch, seed)
                separate = False
        labels = self._labels(student_batch)
        aligned, valid = self._aligned_targets(student_batch, labels)
        topk = None
        cache = student_batch.get(config.cache_key) if source == "data" else None
        if cache is not None:
            topk, valid = self._cached_topk(cache, valid)
        elif self.model_T is None and self.composer.config.kd_loss_weight != 0:
            raise ValueError(f"model_T is None and the batch carries no {config.cache_key!r} "
                             f"(teacher cache rows): there is no teacher to distil from")
        student_inputs = self._model_inputs(self.model_S, student_batch, labels)
        teacher_inputs = None
        if self.model_T is not None and topk is None:
            if separate:
                teacher_labels = teacher_batch.get("labels", labels)
                teacher_inputs = self._model_inputs(self.model_T, teacher_batch, teacher_labels)
                self._check_same_positions(student_inputs, teacher_inputs)
            else:
                teacher_inputs = self._model_inputs(self.model_T, teacher_batch, labels)
        count = int(valid.sum())  # the dataloader's host tensors: no device sync
        return PreparedBatch(student_inputs, teacher_inputs, aligned, valid, topk, count, source)

    def _labels(self, batch: Mapping) -> torch.Tensor:
        raise NotImplementedError

    def _aligned_targets(self, batch: Mapping, labels: torch.Tensor
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _model_inputs(self, model: Any, batch: Mapping, labels: torch.Tensor) -> Dict[str, Any]:
        raise NotImplementedError

    def _check_same_positions(self, student: Dict[str, Any], teacher: Dict[str, Any]) -> None:
        raise NotImplementedError

    def generated_batch(self, model: nn.Module, batch: Mapping, seed: int) -> Dict[str, Any]:
        """A batch whose targets are ``model``'s generation (see the subclasses)."""
        raise NotImplementedError

    def _cached_topk(self, cache: Mapping, valid: torch.Tensor
                     ) -> Tuple[TopKTeacher, torch.Tensor]:
        """The cached rows as a TopKTeacher aligned with the logits, checked on the host."""
        if not self.shifts_labels:
            raise ValueError(f"{type(self).__name__} cannot train from a teacher cache: the "
                             f"cache is indexed by input_ids positions, the decoder's targets "
                             f"are not")
        missing = [key for key in ("topk_ids", "topk_logprobs", "mask") if key not in cache]
        if missing:
            raise ValueError(f"batch[{self.lm_config.cache_key!r}] lacks {missing}; expected "
                             f"CachedTeacherCollator's dict (topk_ids, topk_logprobs, "
                             f"tail_mass, mask)")
        ids, logprobs, rows = cache["topk_ids"], cache["topk_logprobs"], cache["mask"]
        if tuple(ids.shape[:2]) != tuple(valid.shape):
            raise ValueError(f"cached topk_ids {tuple(ids.shape)} do not cover the batch's "
                             f"positions {tuple(valid.shape)}")
        # The cache keeps a row for position t (the logits at t) when the writer's rule
        # kept t; a target without a row would be silently left out of the KD term.
        uncovered = int((valid & ~rows.to(valid.device).bool()).sum())
        if uncovered:
            raise ValueError(f"the teacher cache has no row for {uncovered} target positions "
                             f"of this batch; write it with positions='shifted_labels' or "
                             f"'attention_mask' for a causal LM (the logits at t predict "
                             f"labels[t + 1])")
        if self.vocab_size_S is not None and ids.numel() and int(ids.max()) >= self.vocab_size_S:
            raise ValueError(f"the teacher cache holds token id {int(ids.max())}, outside the "
                             f"student's vocabulary of {self.vocab_size_S}")
        return TopKTeacher(ids, logprobs), valid

    # models ----------------------------------------------------------------------------------
    def _run_logits(self, forward: Callable, adaptor: Optional[Callable], inputs: Dict[str, Any],
                    args: Dict[str, Any], role: str) -> torch.Tensor:
        outputs = forward_model(forward, inputs, args)
        if adaptor is None:
            return _logits_of(outputs, role)
        results = self.adapt(adaptor, inputs, outputs, f"the {role}'s adaptor")
        if "logits" not in results:
            raise ValueError(f"the {role}'s adaptor returned no 'logits' (B, L, V)")
        return results["logits"][0]

    def _run_hidden(self, model: nn.Module, forward: Callable, head: nn.Module,
                    inputs: Dict[str, Any], args: Dict[str, Any], role: str) -> torch.Tensor:
        """The hidden states the model's head receives, without running the head."""
        if self.lm_config.check_fused_head and not self._fused_checked:
            self._check_fused_head(model, head, inputs, args, role)
        captured: List[torch.Tensor] = []
        with _head_skipped(model, head, captured):
            forward_model(forward, inputs, args)
        if len(captured) != 1:
            raise ValueError(f"path='fused': the {role}'s output head "
                             f"({type(head).__name__}) was called {len(captured)} times in "
                             f"one forward pass, expected once; use path='chunked'")
        return captured[0]

    def _check_fused_head(self, model: nn.Module, head: nn.Module, inputs: Dict[str, Any],
                          args: Dict[str, Any], role: str) -> None:
        """Checks on one example that the model's logits are ``head(hidden) + bias``."""
        size = inputs["input_ids"].shape[0]
        captured: List[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda module, inp: captured.append(inp[0]))
        devices = [self.runtime.device] if self.runtime.device.type == "cuda" else []
        try:
            # its own random numbers (dropout), so checking does not change the training
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                logits = _logits_of(forward_model(model, _first_rows(inputs, size, 1), args),
                                    role)
                if len(captured) != 1:
                    raise ValueError(f"path='fused': the {role}'s output head "
                                     f"({type(head).__name__}) was called {len(captured)} "
                                     f"times in one forward pass, expected once; use "
                                     f"path='chunked'")
                rebuilt = F.linear(captured[0], head.weight, _head_bias(model, head))
        finally:
            handle.remove()
        logits, rebuilt = logits.float(), rebuilt.float()
        scale = max(1.0, float(logits.abs().max())) if logits.numel() else 1.0
        tolerance = 1e-4 if logits.dtype == torch.float32 and rebuilt.dtype == torch.float32 \
            else 2e-2
        difference = float((logits - rebuilt).abs().max()) if logits.numel() else 0.0
        if logits.shape != rebuilt.shape or difference > tolerance * scale:
            raise ValueError(f"path='fused': the {role}'s logits are not its output head "
                             f"applied to the head's input (shapes {tuple(logits.shape)} and "
                             f"{tuple(rebuilt.shape)}, largest difference {difference:.3g}): "
                             f"the model transforms its logits after the head (soft-capping, "
                             f"a logit scale, an extra bias), which the fused path cannot "
                             f"see. Use path='chunked'")

    # the loss --------------------------------------------------------------------------------
    def train_on_batch(self, batch: Any, args: Dict[str, Any]):
        prepared = self._take_prepared(batch)
        return self.compute_token_loss(prepared, args)

    def compute_token_loss(self, prepared: PreparedBatch, args: Dict[str, Any]):
        """``kd_loss_weight · KD + hard_label_weight · CE`` over the valid target tokens,
        divided by the window's count (``self.window_tokens``; the batch's own count when
        called outside the loop).

        Returns:
            ``(total, {'unweighted_kd_loss', 'unweighted_hard_label_loss'})``.
        """
        config, runtime = self.lm_config, self.runtime
        kd_weight = float(self.composer.kd_loss_weight)
        ce_weight = float(self.composer.hard_label_weight)
        labels = runtime.to_device(prepared.labels)
        valid = runtime.to_device(prepared.valid)
        topk = None if prepared.topk is None else TopKTeacher(
            *(runtime.to_device(tensor) for tensor in prepared.topk))
        student_inputs = runtime.to_device(prepared.student)
        # The loss is kd + ce_weight·ce; the KD weight multiplies the whole, so the CE
        # weight is divided by it. With a zero KD weight the teacher is the student itself
        # (detached): the divergence is then exactly 0 with a zero gradient (both sides are
        # the same computation), and only the cross-entropy trains.
        self_teacher = kd_weight == 0
        options = dict(divergence=config.divergence, temperature=float(self.d_config.temperature),
                       beta=config.beta, alpha=config.alpha, tail=config.topk_tail,
                       scale_by_temperature_squared=config.scale_by_temperature_squared,
                       ce_weight=ce_weight if self_teacher else ce_weight / kd_weight,
                       ignore_index=config.ignore_index, num_tokens=self.window_tokens,
                       vocab_alignment=config.vocab_alignment, return_dict=True)
        if topk is not None:
            options["divergence"] = "topk_kl"
        if self_teacher:
            options.update(divergence="forward_kl", vocab_alignment=None)
        run_teacher = not self_teacher and topk is None
        if run_teacher and prepared.teacher is None:
            raise ValueError("no teacher for this batch: model_T is None and the batch has "
                             "no cached teacher rows")
        if self.path == "fused":
            hidden_S = self._run_hidden(self.model_S, self._student_forward, self.head_S,
                                        student_inputs, args, "student")
            bias_S = _head_bias(self.model_S, self.head_S)
            if run_teacher:
                teacher_inputs = runtime.to_device(prepared.teacher)
                with torch.no_grad():
                    hidden_T = self._run_hidden(self.model_T, self._teacher_forwards,
                                                self.head_T, teacher_inputs, args, "teacher")
                weight_T, bias_T = self.head_T.weight, _head_bias(self.model_T, self.head_T)
            elif self_teacher:
                hidden_T, weight_T, bias_T = hidden_S.detach(), self.head_S.weight.detach(), \
                    None if bias_S is None else bias_S.detach()
            else:
                hidden_T, weight_T, bias_T = topk, None, None
            self._fused_checked = True
            parts = fused_token_distillation_loss(
                hidden_S, self.head_S.weight, hidden_T, weight_T, labels, valid, bias_S=bias_S,
                bias_T=bias_T, chunk_size=config.chunk_size, **options)
        else:
            logits_S = self._run_logits(self._student_forward, self.adaptor_S, student_inputs,
                                        args, "student")
            if run_teacher:
                teacher_inputs = runtime.to_device(prepared.teacher)
                with torch.no_grad():
                    logits_T = self._run_logits(self._teacher_forwards, self.adaptor_T,
                                                teacher_inputs, args, "teacher")
                if config.divergence == "topk_kl":
                    logits_T = self._live_topk(logits_T)
            elif self_teacher:
                logits_T = logits_S.detach()
            else:
                logits_T = topk
            parts = token_distillation_loss(
                logits_S, logits_T, labels, valid,
                chunk_size=config.chunk_size if self.path == "chunked" else None, **options)
        loss = parts["loss"] if self_teacher else parts["loss"] * kd_weight
        named = {"unweighted_kd_loss": parts["kd"]}
        if "ce" in parts:
            named["unweighted_hard_label_loss"] = parts["ce"]
        return loss, named

    def _live_topk(self, logits_T: torch.Tensor) -> TopKTeacher:
        """The live teacher's top-k at τ = 1 (ids and log-probs over the full vocabulary),
        as a cache would store them (without the cache's fp16 rounding)."""
        k = self.lm_config.topk
        if k > logits_T.shape[-1]:
            raise ValueError(f"topk={k} is larger than the teacher's vocabulary "
                             f"{logits_T.shape[-1]}")
        logprobs, ids = logits_T.float().log_softmax(-1).topk(k, dim=-1)
        return TopKTeacher(ids, logprobs)

    # generation ------------------------------------------------------------------------------
    def _generation_config(self, model: nn.Module):
        """Every setting explicit; none is taken from ``model.generation_config``."""
        from transformers import GenerationConfig  # only models with .generate get here
        config = self.lm_config
        settings = dict(max_new_tokens=config.max_new_tokens, min_new_tokens=0,
                        do_sample=config.do_sample, num_beams=1,
                        eos_token_id=[] if config.eos_token_id is None else config.eos_token_id,
                        pad_token_id=config.pad_token_id)
        if config.do_sample:
            settings.update(temperature=config.generation_temperature, top_k=config.top_k,
                            top_p=config.top_p)
        decoder_start = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
        if not self.shifts_labels and decoder_start is not None:
            settings["decoder_start_token_id"] = decoder_start
        return GenerationConfig(**settings)

    @contextlib.contextmanager
    def _generating(self, model: nn.Module, seed: int):
        """Eval mode, no gradients, autocast, and the global RNG seeded with ``seed`` then
        restored (sampling draws from it; training's random numbers are left alone). A
        model's own ``generation_config`` is swapped for a neutral one meanwhile, because
        ``generate`` fills every unset option from it."""
        devices = [self.runtime.device] if self.runtime.device.type == "cuda" else []
        was_training = model.training
        saved_config = getattr(model, "generation_config", None)
        try:
            model.eval()
            if saved_config is not None:
                from transformers import GenerationConfig
                model.generation_config = GenerationConfig()
            with torch.random.fork_rng(devices=devices), torch.no_grad(), \
                    self.runtime.autocast():
                torch.manual_seed(seed + self.runtime.rank)
                yield
        finally:
            if saved_config is not None:
                model.generation_config = saved_config
            model.train(was_training)

    def _cut_after_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, G) generated tokens -> lengths (B,) up to and including the first eos."""
        size, length = tokens.shape
        eos = self.lm_config.eos_token_id
        if eos is None:
            return torch.full((size,), length, dtype=torch.long)
        hits = (tokens == eos).cpu()
        first = torch.where(hits.any(1), hits.float().argmax(1) + 1,
                            torch.full((size,), length))
        return first.long()


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
        lm_config: :class:`LMDistillationConfig` (default: forward KL, path 'auto').
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

    shifts_labels = True

    def _labels(self, batch: Mapping) -> torch.Tensor:
        labels = batch.get("labels")
        if labels is not None:
            return labels
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        # as Hugging Face's language-modelling collator does: padding is no target
        return ids if mask is None else ids.masked_fill(mask == 0, self.lm_config.ignore_index)

    def _aligned_targets(self, batch, labels):
        ignore = self.lm_config.ignore_index
        if tuple(labels.shape) != tuple(batch["input_ids"].shape):
            raise ValueError(f"labels {tuple(labels.shape)} and input_ids "
                             f"{tuple(batch['input_ids'].shape)} must have the same shape "
                             f"(B, L) for a causal LM (the model shifts nothing: the "
                             f"distiller scores the logits at t against labels[t + 1])")
        # Shift the labels, not the logits: no copy of the (B, L, V) logits is made, and
        # the last position, which predicts nothing, gets ignore_index.
        aligned = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore)], 1)
        valid = aligned != ignore
        mask = batch.get("attention_mask")
        if mask is not None:
            valid = valid & torch.cat([mask[:, 1:] != 0, mask.new_zeros(mask.shape[0], 1)
                                       .bool()], 1)
        return aligned, valid

    def _model_inputs(self, model, batch, labels):
        skip = set(_NOT_MODEL_INPUTS) | {self.lm_config.cache_key}
        return {key: value for key, value in batch.items() if key not in skip}

    def _check_same_positions(self, student, teacher):
        length_S, length_T = student["input_ids"].shape[1], teacher["input_ids"].shape[1]
        if length_S != length_T:
            raise ValueError(f"the teacher's input_ids have {length_T} positions and the "
                             f"student's {length_S}: with different tokenizers the positions "
                             f"do not correspond, and a token-level loss compares position t "
                             f"of both. {type(self).__name__} needs batches whose two "
                             f"tokenisations have the same length, position by position")

    def generated_batch(self, model: nn.Module, batch: Mapping, seed: int) -> Dict[str, Any]:
        """The batch's prompts followed by ``model``'s continuation, right-padded.

        The prompt of a row is its tokens before the first target (``labels !=
        ignore_index``); without labels, all its attention-masked tokens. Returns a dict
        with ``input_ids``, ``attention_mask`` and ``labels`` (B, P + G): the prompt's
        labels are ``ignore_index``, the generated tokens (up to and including eos) are
        the targets. Other keys of the batch are dropped.
        """
        config = self.lm_config
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        labels = batch.get("labels")
        size, length = ids.shape
        lengths = (mask != 0).long().sum(1).cpu()
        if labels is not None:
            targets = (labels != config.ignore_index).cpu()
            first = torch.where(targets.any(1), targets.float().argmax(1), lengths)
            lengths = torch.minimum(lengths, first.long())
        prompts = [ids[row, :int(lengths[row])].cpu() for row in range(size)]
        if any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("on-policy / seq-KD generation needs a prompt of at least one "
                             "token in every row (a row's first position is a target)")
        device = self.runtime.device
        with self._generating(model, seed):
            if callable(getattr(model, "generate", None)) and \
                    hasattr(model, "generation_config"):
                width = max(len(prompt) for prompt in prompts)
                # decoder-only generation continues the last column: pad on the left
                left = torch.full((size, width), config.pad_token_id, dtype=torch.long)
                left_mask = torch.zeros(size, width, dtype=torch.long)
                for row, prompt in enumerate(prompts):
                    left[row, width - len(prompt):] = prompt
                    left_mask[row, width - len(prompt):] = 1
                out = model.generate(input_ids=left.to(device),
                                     attention_mask=left_mask.to(device),
                                     generation_config=self._generation_config(model))
                new = out[:, width:]
            else:
                new = self._sample_loop(model, prompts, "attention_mask" in batch)
        new = new.cpu()
        kept = self._cut_after_eos(new)
        total = [len(prompt) + int(kept[row]) for row, prompt in enumerate(prompts)]
        width = max(total)
        input_ids = torch.full((size, width), config.pad_token_id, dtype=torch.long)
        attention = torch.zeros(size, width, dtype=torch.long)
        targets = torch.full((size, width), config.ignore_index, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            end, start = total[row], len(prompt)
            input_ids[row, :start] = prompt
            input_ids[row, start:end] = new[row, :end - start]
            attention[row, :end] = 1
            targets[row, start:end] = new[row, :end - start]
        return {"input_ids": input_ids, "attention_mask": attention, "labels": targets}

    def _sample_loop(self, model: nn.Module, prompts: List[torch.Tensor],
                     with_mask: bool) -> torch.Tensor:
        """Generation for plain causal modules (no KV cache): each step runs the whole
        right-padded sequence and samples the next token of every row from the logits at
        its last real position (a causal model does not see the padding after it)."""
        config, device = self.lm_config, self.runtime.device
        size, steps = len(prompts), config.max_new_tokens
        lengths = torch.tensor([len(prompt) for prompt in prompts])
        buffer = torch.full((size, int(lengths.max()) + steps), config.pad_token_id,
                            dtype=torch.long)
        for row, prompt in enumerate(prompts):
            buffer[row, :len(prompt)] = prompt
        buffer, lengths = buffer.to(device), lengths.to(device)
        rows = torch.arange(size, device=device)
        new = torch.full((size, steps), config.pad_token_id, dtype=torch.long, device=device)
        done = torch.zeros(size, dtype=torch.bool, device=device)
        for step in range(steps):
            width = int(lengths.max())
            inputs = {"input_ids": buffer[:, :width]}
            if with_mask:
                inputs["attention_mask"] = (torch.arange(width, device=device)[None, :]
                                            < lengths[:, None]).long()
            logits = _logits_of(forward_model(model, inputs, {}), "generating model")
            scores = logits[rows, lengths - 1].float()
            token = self._sample(scores)
            token = torch.where(done, torch.full_like(token, config.pad_token_id), token)
            new[:, step] = token
            buffer[rows, lengths] = token
            lengths = lengths + 1
            if config.eos_token_id is not None:
                done = done | (token == config.eos_token_id)
        return new

    def _sample(self, scores: torch.Tensor) -> torch.Tensor:
        """Next tokens (B,) from (B, V) scores with the configured settings."""
        config = self.lm_config
        if not config.do_sample:
            return scores.argmax(-1)
        scores = scores / config.generation_temperature
        if 0 < config.top_k < scores.shape[-1]:
            kth = scores.topk(config.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if config.top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            # drop a token when the tokens before it already hold top_p (the first stays)
            drop = (cumulative - ordered.softmax(-1)) >= config.top_p
            scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        return torch.multinomial(scores.softmax(-1), 1).squeeze(-1)


class Seq2SeqLMDistiller(LMDistillerBase):
    """Token-level distillation of an encoder-decoder LM (T5, BART and their families).

    ``labels`` (B, T) are the decoder's targets, aligned with the decoder's logits (the
    model shifts them right into its decoder inputs, so no shift here): valid tokens are
    ``labels != ignore_index`` (and ``decoder_attention_mask == 1`` when given). The
    decoder inputs are ``model.prepare_decoder_input_ids_from_labels(labels)`` (each model
    with its own start token) unless the batch holds ``decoder_input_ids``; a model without
    that method gets ``labels`` and shifts them itself. Everything else is as in
    :class:`CausalLMDistiller` (loss, paths, window normalisation); on-policy generation
    uses the model's ``generate`` (the encoder input is the prompt), and a teacher cache
    is not supported (it is indexed by ``input_ids`` positions).
    """

    shifts_labels = False

    def _labels(self, batch):
        labels = batch.get("labels")
        if labels is None:
            raise ValueError(f"{type(self).__name__} needs 'labels' (B, T), the decoder's "
                             f"targets; the batch has keys {sorted(batch)}")
        return labels

    def _aligned_targets(self, batch, labels):
        valid = labels != self.lm_config.ignore_index
        mask = batch.get("decoder_attention_mask")
        if mask is not None:
            valid = valid & (mask != 0)
        return labels, valid

    def _model_inputs(self, model, batch, labels):
        skip = set(_NOT_MODEL_INPUTS) | {self.lm_config.cache_key}
        inputs = {key: value for key, value in batch.items() if key not in skip}
        if "decoder_input_ids" not in inputs:
            prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
            if callable(prepare):
                inputs["decoder_input_ids"] = prepare(labels=labels)
            else:
                inputs["labels"] = labels  # the model shifts them itself
        return inputs

    def _check_same_positions(self, student, teacher):
        def length(inputs):
            decoder = inputs.get("decoder_input_ids", inputs.get("labels"))
            return None if decoder is None else decoder.shape[1]
        length_S, length_T = length(student), length(teacher)
        if length_S != length_T:
            raise ValueError(f"the teacher's decoder has {length_T} positions and the "
                             f"student's {length_S}: with different tokenizers the positions "
                             f"do not correspond; {type(self).__name__} needs targets of the "
                             f"same length, position by position")

    def generated_batch(self, model: nn.Module, batch: Mapping, seed: int) -> Dict[str, Any]:
        """The batch with ``labels`` replaced by ``model``'s generated decoder sequence
        (without the start token; after eos, ``ignore_index``)."""
        if not callable(getattr(model, "generate", None)):
            raise ValueError(f"{type(self).__name__}: on-policy / seq-KD generation needs "
                             f"model.generate (an encoder-decoder with a decoding loop); "
                             f"{type(model).__name__} has none")
        device = self.runtime.device
        encoder = {"input_ids": batch["input_ids"].to(device)}
        if batch.get("attention_mask") is not None:
            encoder["attention_mask"] = batch["attention_mask"].to(device)
        with self._generating(model, seed):
            out = model.generate(**encoder, generation_config=self._generation_config(model))
        new = out[:, 1:].cpu()  # generate starts with the decoder start token
        kept = self._cut_after_eos(new)
        positions = torch.arange(new.shape[1])[None, :]
        labels = new.masked_fill(positions >= kept[:, None], self.lm_config.ignore_index)
        skip = {"labels", "decoder_input_ids", "decoder_attention_mask",
                self.lm_config.cache_key}
        result = {key: value for key, value in batch.items() if key not in skip}
        result["labels"] = labels
        return result
