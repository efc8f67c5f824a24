"""What the causal and the encoder-decoder distillers share: :class:`~textbrewer.distillers.lm.base.LMDistillerBase`."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ...configurations import DistillationConfig, TrainingConfig
from ...logs import logger
from ...losses.token import (OBJECTIVES, TAIDSchedule, TopKTeacher, akl_loss,
                             fused_token_distillation_loss, taid_loss, token_distillation_loss)
from ...losses.token.cross import TokenGroups, cross_tokenizer_loss
from ..basic import BasicDistiller
from ..composer import check_same_device
from .alignment import (CausalAlignment, PreparedBatch, cached_topk, gather_rows,
                        valid_row_index)
from .config import LMDistillationConfig
from .generation import (AdaptiveOffPolicySchedule, Sampler, check_end_of_sequence,
                         check_generation_options)
from .telemetry import (TokenTelemetry, head_row_slices, logit_row_slices, token_statistics,
                        topk_row_slices)
from .heads import (call_model, check_fused_head, head_bias, hidden_before_head, logits_of,
                    output_head, vocab_size)

__all__ = ["LMDistillerBase"]


class LMDistillerBase(BasicDistiller):
    """What the causal and the encoder-decoder distillers share; see
    :class:`~textbrewer.distillers.lm.CausalLMDistiller`.

    A subclass names its target rule (``alignment_class``: how the logits line up with
    the labels, which keys a model gets) and how a model's own continuation becomes a
    batch (:meth:`generated_batch`).

    ``off_policy_schedule``: an optional
    :class:`~textbrewer.distillers.lm.generation.AdaptiveOffPolicySchedule` (DistiLLM)
    whose probability replaces ``lm_config.lmbda`` as the chance that a batch is
    student-generated; the caller updates it with validation losses. With
    ``lm_config.divergence='taid'``, :attr:`taid` holds TAID's t
    (:class:`~textbrewer.losses.token.TAIDSchedule`), updated after every optimizer step.
    Both are saved in the training state (:meth:`extra_state`).
    """

    supports_logits_caching = False
    # the fused loss uses the LM head's weight after the forward pass: DDP must not count
    # it as unused there
    ddp_find_unused_parameters = False
    #: the target rule: :class:`~textbrewer.distillers.lm.alignment.CausalAlignment` or
    #: :class:`~textbrewer.distillers.lm.alignment.Seq2SeqAlignment`
    alignment_class = CausalAlignment

    def __init__(self, train_config: TrainingConfig, distill_config: DistillationConfig,
                 model_T: Optional[nn.Module], model_S: nn.Module,
                 adaptor_T: Optional[Callable] = None, adaptor_S: Optional[Callable] = None,
                 lm_config: Optional[LMDistillationConfig] = None, *,
                 lm_head_T: Optional[nn.Module] = None, lm_head_S: Optional[nn.Module] = None,
                 vocabulary_map: Optional[torch.Tensor] = None,
                 off_policy_schedule: Optional[AdaptiveOffPolicySchedule] = None):
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
        kd_off = isinstance(distill_config, DistillationConfig) and \
            distill_config.kd_loss_weight == 0 and \
            distill_config.kd_loss_weight_scheduler in (None, "none")
        if model_T is None and not kd_off:  # every batch brings cached rows: a top-k teacher
            lm_config.check_topk_teacher("model_T is None: cached teacher rows")
        if model_T is not None and lm_config.topk is not None and \
                lm_config.divergence != "topk_kl":
            logger.warning("%s: topk=%d cuts the live teacher to its top %d entries for "
                           "divergence=%r (topk_tail=%r); before 2026-12 only 'topk_kl' read "
                           "topk", type(self).__name__, lm_config.topk, lm_config.topk,
                           lm_config.divergence, lm_config.topk_tail)
        if model_T is None and lm_config.seq_kd:
            raise ValueError("seq_kd=True needs a teacher to generate, but model_T is None")
        if model_T is None and lm_config.lmbda > 0:
            raise ValueError(f"lmbda={lm_config.lmbda} (on-policy) needs a live teacher to "
                             f"score the student's samples, but model_T is None (a teacher "
                             f"cache only covers the dataset's tokens)")
        if lm_config.token_alignment is not None:
            if not self.alignment_class.shifts_labels:
                raise ValueError(f"token_alignment={lm_config.token_alignment!r} is for "
                                 f"causal LMs; {type(self).__name__} is not one")
            if model_T is None:
                raise ValueError(f"token_alignment={lm_config.token_alignment!r} needs a "
                                 f"live teacher (model_T is None; a teacher cache is kept "
                                 f"in the teacher's own token positions)")
        check_generation_options(lm_config, model_T, off_policy_schedule,
                                 self.alignment_class.shifts_labels, type(self).__name__)
        if vocabulary_map is not None and lm_config.token_alignment != "span":
            raise ValueError(f"vocabulary_map is used by token_alignment='span' only, got "
                             f"token_alignment={lm_config.token_alignment!r}")
        super().__init__(train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S)
        self.lm_config = lm_config
        self.alignment = self.alignment_class(lm_config.ignore_index, lm_config.cache_key)
        self.sampler = Sampler(lm_config, self.runtime, self.alignment.shifts_labels)
        #: DistiLLM's adaptive probability of student-generated batches (replaces lmbda)
        self.off_policy_schedule = off_policy_schedule
        #: TAID's t (``divergence='taid'``), updated after every optimizer step
        self.taid = None if lm_config.divergence != "taid" else TAIDSchedule(
            lm_config.taid_t_start, lm_config.taid_t_end, lm_config.taid_alpha,
            lm_config.taid_beta, lm_config.taid_schedule)
        self._taid_window: Optional[torch.Tensor] = None  # the window's TAID loss so far
        # (generated tokens, rows, rows that reached the EOS) since the last telemetry read
        self._generated: Optional[Tuple[int, int, int]] = None
        #: entropies and divergence by position, per step (``lm_config.telemetry``)
        self.telemetry = TokenTelemetry(lm_config.telemetry_bins) if lm_config.telemetry \
            else None
        self.head_S = output_head(model_S, lm_head_S)
        self.head_T = None if model_T is None else output_head(model_T, lm_head_T)
        self.vocab_size_S = vocab_size(model_S, self.head_S)
        self.vocab_size_T = None if model_T is None else vocab_size(model_T, self.head_T)
        self.vocabulary_map = self._checked_map(vocabulary_map)
        self._check_vocabularies()
        check_end_of_sequence(lm_config, off_policy_schedule, self.model_S, self.model_T,
                              self.vocab_size_S, self.vocab_size_T)
        self.path = self._resolve_path()
        self._fused_checked = False
        self._told_cached = False  # the cached-rows divergence notice, once

    @property
    def lm_config(self) -> LMDistillationConfig:
        """The :class:`~textbrewer.distillers.lm.config.LMDistillationConfig`; assigning another reaches the sampler and the
        target rule too."""
        return self._lm_config

    @lm_config.setter
    def lm_config(self, config: LMDistillationConfig) -> None:
        self._lm_config = config
        if hasattr(self, "sampler"):
            self.sampler.config = config
            self.alignment.ignore_index, self.alignment.cache_key = \
                config.ignore_index, config.cache_key

    @property
    def shifts_labels(self) -> bool:
        """Whether the logits at t predict ``labels[t + 1]`` (causal) or ``labels[t]``."""
        return self.alignment.shifts_labels

    # setup -----------------------------------------------------------------------------------
    def _checked_map(self, vocabulary_map: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The span mode's map (V_T,), checked against both vocabularies."""
        if self.lm_config.token_alignment != "span":
            return None
        v_S, v_T = self.vocab_size_S, self.vocab_size_T
        if vocabulary_map is None:
            if v_S is not None and v_S == v_T:
                return None  # one vocabulary: the identity
            raise ValueError(f"token_alignment='span' with the teacher's vocabulary of {v_T} "
                             f"and the student's of {v_S} needs vocabulary_map= (V_T,), the "
                             f"student id of each teacher id: build it with "
                             f"textbrewer.distillers.lm.vocabulary_map(tokenizer_T, "
                             f"tokenizer_S)")
        if not isinstance(vocabulary_map, torch.Tensor) or vocabulary_map.dim() != 1 \
                or vocabulary_map.dtype != torch.int64:
            raise ValueError(f"vocabulary_map must be a 1-D int64 tensor, got "
                             f"{type(vocabulary_map).__name__}"
                             + (f" {vocabulary_map.dtype} {tuple(vocabulary_map.shape)}"
                                if isinstance(vocabulary_map, torch.Tensor) else ""))
        if v_T is not None and vocabulary_map.shape[0] != v_T:
            raise ValueError(f"vocabulary_map has {vocabulary_map.shape[0]} entries; the "
                             f"teacher's vocabulary has {v_T} (pass vocab_size_T= to "
                             f"vocabulary_map when the model's is larger than its tokenizer)")
        if v_S is not None and vocabulary_map.numel() and int(vocabulary_map.max()) >= v_S:
            raise ValueError(f"vocabulary_map names student id {int(vocabulary_map.max())}, "
                             f"outside the student's vocabulary of {v_S}")
        return vocabulary_map

    def _check_vocabularies(self) -> None:
        v_S, v_T = self.vocab_size_S, self.vocab_size_T
        if v_S is None or v_T is None or v_S == v_T or self.lm_config.vocab_alignment \
                or self.lm_config.token_alignment:
            return
        raise ValueError(f"the student's vocabulary has {v_S} entries and the teacher's "
                         f"{v_T} (from the output embeddings, else config.vocab_size); a "
                         f"token-level loss compares the two distributions id by id. If the "
                         f"ids agree (a padded vocabulary), pass LMDistillationConfig("
                         f"vocab_alignment='pad') (missing columns get -inf logits); "
                         f"different tokenizers cannot be distilled token by token")

    def _resolve_path(self) -> str:
        requested = self.lm_config.path
        if self.lm_config.token_alignment is not None:
            return "dense"  # the config allows only 'auto' and 'dense' here
        heads = self.head_S is not None and (self.model_T is None or self.head_T is not None)
        adaptors = self.adaptor_S is not None or self.adaptor_T is not None
        compiled = self.t_config.compile is not False
        live_topk = self.lm_config.topk is not None and self.model_T is not None
        if self.lm_config.divergence in OBJECTIVES:  # the config refuses 'fused' for them
            return "chunked" if requested == "auto" else requested
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
                problems.append("topk (a live teacher cut to its top k) needs the "
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
        """The on-policy generator's state (the coin and the sampling seeds), TAID's t and
        the off-policy schedule's probability."""
        state = dict(self.sampler.state_dict())
        if self.taid is not None:
            state["taid"] = self.taid.state_dict()
        if self.off_policy_schedule is not None:
            state["off_policy_schedule"] = self.off_policy_schedule.state_dict()
        return state

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        state = state or {}
        if self.taid is not None and state.get("taid") is not None:
            self.taid.load_state_dict(state["taid"])
        if self.off_policy_schedule is not None and state.get("off_policy_schedule"):
            self.off_policy_schedule.load_state_dict(state["off_policy_schedule"])

    # schedules -------------------------------------------------------------------------------
    def update_schedules(self, progress: float) -> None:
        """The weight schedules, then TAID's t from the step's TAID loss (summed over the
        window's micro-batches: each is its tokens' sum over the window's count, and over
        DDP ranks)."""
        super().update_schedules(progress)
        if self.taid is None:
            return
        window, self._taid_window = self._taid_window, None
        if self.runtime.distributed:  # every rank joins, with or without a TAID loss
            device = self.runtime.device if self.runtime.device.type == "cuda" else "cpu"
            packed = torch.zeros(2, dtype=torch.float64, device=device)
            if window is not None:
                packed[0], packed[1] = window.detach().double(), 1.0
            dist.all_reduce(packed)
            window = packed[0] if float(packed[1]) > 0 else None
        if window is None:
            return  # e.g. the call at a resumed run's start: no step was taken yet
        self.taid.update(float(window), progress)

    def reset_schedules(self) -> None:
        super().reset_schedules()
        if self.taid is not None:
            self.taid.reset()
        self._taid_window = None

    def _record_generation(self, batch: Mapping) -> None:
        """Counts a student-generated batch for the step's telemetry: its generated tokens
        (the targets, host tensors: no device sync) and the rows that reached the EOS."""
        labels = batch["labels"]
        targets = labels != self.lm_config.ignore_index
        eos = self.lm_config.eos_token_id
        ended = int((labels == eos).any(1).sum()) if eos is not None else 0
        tokens, rows, ends = self._generated or (0, 0, 0)
        self._generated = (tokens + int(targets.sum()), rows + labels.shape[0], ends + ended)

    def observed_values(self) -> Dict[str, Any]:
        """The step's values for TensorBoard: TAID's t, the off-policy probability, and for
        the student-generated rows since the last call their mean generated length and the
        share that ended with the EOS (``on_policy/...``); with ``lm_config.telemetry`` the
        step's entropies and divergence by position (``telemetry/...``, see
        :mod:`textbrewer.distillers.lm.telemetry`)."""
        values = super().observed_values()
        generated, self._generated = self._generated, None
        if generated is not None:
            tokens, rows, ends = generated
            values["on_policy/generated_length"] = tokens / max(rows, 1)
            if self.lm_config.eos_token_id is not None:
                values["on_policy/eos_rate"] = ends / max(rows, 1)
        if self.taid is not None:
            values["taid_t"] = self.taid.t
        if self.off_policy_schedule is not None:
            values["off_policy_probability"] = self.off_policy_schedule.probability
        if self.telemetry is not None:
            values.update(self.telemetry.values())
        return values

    # windows ---------------------------------------------------------------------------------
    def prepare_window(self, batches: List[Any]) -> Tuple[List[PreparedBatch], int]:
        """The window's micro-batches prepared (generated where on-policy, targets aligned)
        and their valid target tokens: the loop hands the prepared batches to
        :meth:`train_on_batch` and sums the count over ranks (each batch's loss is its token
        sum over that count)."""
        # a window that took no optimizer step (an epoch's short last one) must not carry
        # its TAID loss into the next window's
        self._taid_window = None
        if self.telemetry is not None:  # nor its telemetry
            self.telemetry.reset()
        prepared = [self.prepare_batch(batch) for batch in batches]
        return prepared, sum(item.count for item in prepared)

    def count_window_tokens(self, batches: List[Any]) -> int:
        """The valid target tokens of a window's micro-batches (prepares them: see
        :meth:`prepare_window`, which the loop calls instead)."""
        return self.prepare_window(batches)[1]

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
        config, alignment = self.lm_config, self.alignment
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
        groups = None
        if config.token_alignment is not None:
            groups = self._token_groups(batch, separate)
        source = "data"
        schedule = self.off_policy_schedule
        if config.generates or schedule is not None:
            on_policy, seed = self.sampler.draw(
                None if schedule is None else schedule.probability)
            if on_policy or config.seq_kd:
                if separate:
                    raise ValueError("on-policy / sequence-level KD with {'teacher', "
                                     "'student'} batches is not supported: the generated "
                                     "tokens would have to be re-tokenised for the teacher")
                source = "student" if on_policy else "teacher"
                model = self.model_S if on_policy else self.model_T
                verifier = self.model_T if on_policy and config.speculative_top_k else None
                with self.sampler.verifying(verifier):
                    student_batch = teacher_batch = self.generated_batch(model, student_batch,
                                                                         seed)
                if on_policy:
                    self._record_generation(student_batch)
                separate = False
        labels = alignment.labels(student_batch)
        aligned, valid = alignment.aligned_targets(student_batch, labels)
        topk = None
        cache = student_batch.get(config.cache_key) if source == "data" else None
        if cache is None:
            misplaced = [key for key, value in student_batch.items()
                         if isinstance(value, Mapping) and "topk_ids" in value]
            if misplaced:
                raise ValueError(f"batch[{misplaced[0]!r}] holds teacher-cache rows, but "
                                 f"LMDistillationConfig.cache_key={config.cache_key!r}: set "
                                 f"cache_key={misplaced[0]!r} (or the collator's key="
                                 f"{config.cache_key!r})")
        if cache is not None:
            topk = cached_topk(cache, valid, alignment, self.vocab_size_S, type(self).__name__)
        elif self.model_T is None and self.composer.config.kd_loss_weight != 0:
            raise ValueError(f"model_T is None and the batch carries no {config.cache_key!r} "
                             f"(teacher cache rows): there is no teacher to distil from (the "
                             f"batch has keys {sorted(student_batch)}; batches from "
                             f"CachedTeacherCollator carry them)")
        student_inputs = alignment.model_inputs(self.model_S, student_batch, labels)
        teacher_inputs = None
        if groups is not None and topk is not None:
            raise ValueError(f"token_alignment={config.token_alignment!r} cannot use "
                             f"cached teacher rows (they are in the teacher's positions "
                             f"only through the student's tokens)")
        if self.model_T is not None and topk is None:
            if separate:
                teacher_labels = teacher_batch.get("labels", labels)
                teacher_inputs = alignment.model_inputs(self.model_T, teacher_batch,
                                                        teacher_labels)
                if groups is None:
                    alignment.check_same_positions(student_inputs, teacher_inputs,
                                                   type(self).__name__)
                else:  # the positions differ by design; the groups say which correspond
                    groups = self._valid_groups(groups, valid, teacher_batch)
            else:
                teacher_inputs = alignment.model_inputs(self.model_T, teacher_batch, labels)
        count = int(valid.sum())  # the dataloader's host tensors: no device sync
        return PreparedBatch(student_inputs, teacher_inputs, aligned, valid, topk, count, source,
                             groups)

    def _token_groups(self, batch: Any, separate: bool) -> TokenGroups:
        """The batch's aligned token groups (from CrossTokenizerCollator)."""
        groups = batch.get("token_groups") if isinstance(batch, Mapping) else None
        if not separate or groups is None:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"token_alignment={self.lm_config.token_alignment!r} needs "
                             f"batches {{'teacher': ..., 'student': ..., 'token_groups': "
                             f"TokenGroups}} as CrossTokenizerCollator builds them; got "
                             f"{keys}")
        if isinstance(groups, Mapping):
            groups = TokenGroups(groups["batch"], groups["teacher"], groups["student"])
        if not isinstance(groups, TokenGroups):
            groups = TokenGroups(*groups)
        return groups

    def _valid_groups(self, groups: TokenGroups, valid: torch.Tensor,
                      teacher_batch: Mapping) -> TokenGroups:
        """The groups whose student tokens are all valid targets and whose teacher tokens
        are all attended (host tensors: no device sync)."""
        if groups.batch.numel() == 0:
            return groups
        rows = groups.batch.unsqueeze(1)
        present_S, present_T = groups.student >= 0, groups.teacher >= 0
        # the logits at t - 1 predict the token at t
        targets_ok = valid[rows, (groups.student - 1).clamp(min=0)] | ~present_S
        keep = targets_ok.all(1)
        mask_T = teacher_batch.get("attention_mask")
        if mask_T is not None:
            attended = (mask_T[rows, groups.teacher.clamp(min=0)] != 0) | ~present_T
            keep = keep & attended.all(1)
        return TokenGroups(groups.batch[keep], groups.teacher[keep], groups.student[keep])

    def generated_batch(self, model: nn.Module, batch: Mapping, seed: int) -> Dict[str, Any]:
        """A batch whose targets are ``model``'s generation (see the subclasses)."""
        raise NotImplementedError

    # models ----------------------------------------------------------------------------------
    def _run_logits(self, forward: Callable, adaptor: Optional[Callable], inputs: Dict[str, Any],
                    args: Dict[str, Any], role: str) -> torch.Tensor:
        outputs = call_model(forward, inputs, args, role)
        if adaptor is None:
            logits = logits_of(outputs, role)
        else:
            results = self.adapt(adaptor, inputs, outputs, f"the {role}'s adaptor")
            if "logits" not in results:
                raise ValueError(f"the {role}'s adaptor returned no 'logits' (B, L, V)")
            logits = results["logits"][0]
        if logits.dim() != 3:
            raise ValueError(f"the {role}'s logits have shape {tuple(logits.shape)}; a token-level "
                             f"loss needs (batch, length, vocab) logits, one row per position"
                             + (" (from its adaptor)" if adaptor is not None else ""))
        return logits

    def _run_hidden(self, model: nn.Module, forward: Callable, head: nn.Module,
                    inputs: Dict[str, Any], args: Dict[str, Any], role: str) -> torch.Tensor:
        """The hidden states the model's head receives, without running the head."""
        if self.lm_config.check_fused_head and not self._fused_checked:
            check_fused_head(model, head, inputs, args, role, self.runtime.device)
        return hidden_before_head(model, forward, head, inputs, args, role)

    # the loss --------------------------------------------------------------------------------
    def train_on_batch(self, batch: Any, args: Dict[str, Any]):
        # a window's batches come prepared from the loop (prepare_window); a direct call
        # with a dataloader batch prepares it here
        prepared = batch if isinstance(batch, PreparedBatch) else self.prepare_batch(batch)
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
        if prepared.source == "student" and not config.hard_labels_on_generated:
            ce_weight = 0.0  # the student's own samples are no targets (GKD, TRL)
        labels = runtime.to_device(prepared.labels)
        valid = runtime.to_device(prepared.valid)
        topk = None if prepared.topk is None else TopKTeacher(
            *(runtime.to_device(tensor) for tensor in prepared.topk))
        student_inputs = runtime.to_device(prepared.student)
        # loss = kd_weight·kd + ce_weight·ce, both weights given to the token loss. With a
        # zero KD weight the teacher is the student itself (detached): the divergence is then
        # exactly 0 with a zero gradient (both sides are the same computation), so no
        # teacher runs and 0 · (a non-finite divergence) cannot happen.
        self_teacher = kd_weight == 0
        options = dict(divergence=config.divergence, temperature=float(self.d_config.temperature),
                       beta=config.beta, alpha=config.alpha, tail=config.topk_tail,
                       scale_by_temperature_squared=config.scale_by_temperature_squared,
                       kd_weight=kd_weight, ce_weight=ce_weight,
                       ignore_index=config.ignore_index, num_tokens=self.window_tokens,
                       vocab_alignment=config.vocab_alignment, return_dict=True)
        if topk is not None and not self_teacher:  # names the config's options
            config.check_topk_teacher("the batch's cached teacher rows")
            if config.divergence not in ("forward_kl", "topk_kl") and not self._told_cached:
                self._told_cached = True
                logger.warning("%s: divergence=%r is taken against the cached teacher rows "
                               "(topk_tail=%r); before 2026-12 cached batches always used "
                               "the forward KL", type(self).__name__, config.divergence,
                               config.topk_tail)
        if self_teacher:  # τ 1: the CE then reads the one log-softmax, whatever τ says
            options.update(divergence="forward_kl", vocab_alignment=None, temperature=1.0)
        run_teacher = not self_teacher and topk is None
        if run_teacher and prepared.teacher is None:
            raise ValueError("no teacher for this batch: model_T is None and the batch has "
                             "no cached teacher rows")
        # The loss runs over the valid target tokens only, gathered, where that pays
        # (alignment.GATHER_BELOW); a cross-tokenizer loss reads positions through its groups.
        index = None if prepared.groups is not None else valid_row_index(
            prepared.valid, prepared.count, self.path)
        if index is not None:
            index = runtime.to_device(index)

        def rows(x, name):
            return x if index is None else gather_rows(x, index, prepared.valid.shape, name)
        if self.path == "fused":
            hidden_S = self._run_hidden(self.model_S, self._student_forward, self.head_S,
                                        student_inputs, args, "student")
            bias_S = head_bias(self.model_S, self.head_S)
            if run_teacher:
                teacher_inputs = runtime.to_device(prepared.teacher)
                with torch.no_grad():
                    hidden_T = self._run_hidden(self.model_T, self._teacher_forwards,
                                                self.head_T, teacher_inputs, args, "teacher")
                weight_T, bias_T = self.head_T.weight, head_bias(self.model_T, self.head_T)
            elif self_teacher:
                hidden_T, weight_T, bias_T = hidden_S.detach(), self.head_S.weight.detach(), \
                    None if bias_S is None else bias_S.detach()
            else:
                hidden_T, weight_T, bias_T = topk, None, None
            self._fused_checked = True
            parts = fused_token_distillation_loss(
                rows(hidden_S, "the student's hidden states"), self.head_S.weight,
                rows(hidden_T, "the teacher's hidden states"), weight_T,
                rows(labels, "labels"), rows(valid, "valid"), bias_S=bias_S, bias_T=bias_T,
                chunk_size=config.chunk_size, **options)
            if self._telemetry_on():
                self._record_telemetry(prepared, options, head_row_slices(
                    hidden_S, self.head_S.weight, bias_S), None if self_teacher else (
                    topk_row_slices(topk) if weight_T is None else
                    head_row_slices(hidden_T, weight_T, bias_T)))
        else:
            logits_S = self._run_logits(self._student_forward, self.adaptor_S, student_inputs,
                                        args, "student")
            if run_teacher:
                teacher_inputs = runtime.to_device(prepared.teacher)
                with torch.no_grad():
                    logits_T = self._run_logits(self._teacher_forwards, self.adaptor_T,
                                                teacher_inputs, args, "teacher")
                if config.topk is not None:
                    logits_T = self._live_topk(logits_T)
            elif self_teacher:
                logits_T = logits_S.detach()
            else:
                logits_T = topk
            check_same_device("'logits'", logits_S, logits_T)
            if prepared.groups is not None and run_teacher:
                parts = self._cross_tokenizer_loss(
                    prepared.groups, logits_S, logits_T, student_inputs["input_ids"],
                    teacher_inputs["input_ids"], labels, valid, options)
            elif options["divergence"] in OBJECTIVES:
                parts = self._objective_loss(
                    rows(logits_S, "student logits"), rows(logits_T, "teacher logits"),
                    rows(labels, "labels"), rows(valid, "valid"), options)
            else:
                parts = token_distillation_loss(
                    rows(logits_S, "student logits"), rows(logits_T, "teacher logits"),
                    rows(labels, "labels"), rows(valid, "valid"),
                    chunk_size=config.chunk_size if self.path == "chunked" else None,
                    **options)
            if self._telemetry_on():
                teacher_rows = None if self_teacher else topk_row_slices(logits_T) if \
                    isinstance(logits_T, tuple) else logit_row_slices(logits_T)
                self._record_telemetry(prepared, options, logit_row_slices(logits_S),
                                       teacher_rows)
        loss = parts["loss"]
        named = {"unweighted_kd_loss": parts["kd"]}
        if "ce" in parts:
            named["unweighted_hard_label_loss"] = parts["ce"]
        return loss, named

    def _objective_loss(self, logits_S: torch.Tensor, logits_T: torch.Tensor,
                        labels: torch.Tensor, valid: torch.Tensor,
                        options: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """The parts of a TAID or AKL batch (:mod:`textbrewer.losses.token.objectives`); a
        TAID batch's loss is added to the window's, for the update of t after the step."""
        config = self.lm_config
        common = dict(temperature=options["temperature"],
                      scale_by_temperature_squared=options["scale_by_temperature_squared"],
                      kd_weight=options["kd_weight"], ce_weight=options["ce_weight"],
                      ignore_index=options["ignore_index"], num_tokens=options["num_tokens"],
                      vocab_alignment=options["vocab_alignment"], return_dict=True,
                      chunk_size=config.chunk_size if self.path == "chunked" else None)
        if options["divergence"] == "akl":
            return akl_loss(logits_S, logits_T, labels, valid, mu=config.akl_mu, **common)
        parts = taid_loss(logits_S, logits_T, labels, valid, t=self.taid.t, **common)
        kd = parts["kd"].detach()
        self._taid_window = kd if self._taid_window is None else self._taid_window + kd
        return parts

    def _cross_tokenizer_loss(self, groups: TokenGroups, logits_S: torch.Tensor,
                              logits_T: torch.Tensor, ids_S: torch.Tensor, ids_T: torch.Tensor,
                              labels: torch.Tensor, valid: torch.Tensor,
                              options: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """The parts of a batch whose two models have different tokenizers (the token
        loss's ``options``, on the aligned groups)."""
        return cross_tokenizer_loss(
            logits_S, logits_T, ids_S, ids_T, groups,
            mode=self.lm_config.token_alignment, vocabulary_map=self.vocabulary_map,
            divergence=options["divergence"], temperature=options["temperature"],
            beta=options["beta"], alpha=options["alpha"],
            scale_by_temperature_squared=options["scale_by_temperature_squared"],
            labels_S=labels, valid_S=valid, ce_weight=options["ce_weight"],
            kd_weight=options["kd_weight"], num_tokens=options["num_tokens"],
            return_dict=True)

    def _telemetry_on(self) -> bool:
        """Telemetry is asked for and this process writes TensorBoard (nothing else reads
        it: without a writer the extra pass would be wasted)."""
        session = self._session
        return self.telemetry is not None and session is not None and \
            session.log.writer is not None

    def _record_telemetry(self, prepared: PreparedBatch, options: Dict[str, Any],
                          student: Callable, teacher: Optional[Callable]) -> None:
        width = max(self.vocab_size_S, self.vocab_size_T or 0)
        statistics = token_statistics(student, teacher or (lambda rows: None),
                                      prepared.valid.numel(), width, options)
        self.telemetry.record(prepared.source, prepared.valid, *statistics)

    def _live_topk(self, logits_T: torch.Tensor) -> TopKTeacher:
        """The live teacher's top-k at τ = 1 (ids and log-probs over the full vocabulary),
        as a cache would store them (without the cache's fp16 rounding)."""
        k = self.lm_config.topk
        if k > logits_T.shape[-1]:
            raise ValueError(f"topk={k} is larger than the teacher's vocabulary "
                             f"{logits_T.shape[-1]}")
        logprobs, ids = logits_T.float().log_softmax(-1).topk(k, dim=-1)
        return TopKTeacher(ids, logprobs)

