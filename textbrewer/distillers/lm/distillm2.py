"""DistiLLM-2 as a distiller: :class:`~textbrewer.distillers.lm.distillm2.DistiLLM2Distiller`.

Every micro-batch holds prompts followed by the teacher's responses (prepared offline, as
DistiLLM-2 does: the labels mark the response tokens, ``ignore_index`` on the prompt). The
distiller generates the student's responses to the same prompts on the fly, scores both
batches with both models and trains on
:func:`~textbrewer.losses.token.objectives.distillm2_loss`.
"""
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...configurations import DistillationConfig, TrainingConfig
from ...losses.token import distillm2_loss
from .alignment import NOT_MODEL_INPUTS, PreparedBatch
from .causal import CausalLMDistiller
from .config import LMDistillationConfig
from .generation import check_end_of_sequence

__all__ = ["DistiLLM2Distiller", "DistiLLM2Batch"]

#: the only model inputs of a DistiLLM-2 batch: the two batches run as one forward pass
MODEL_INPUTS = ("input_ids", "attention_mask")


class DistiLLM2Batch(NamedTuple):
    """One DistiLLM-2 micro-batch, ready for the loss.

    ``teacher_responses``: the dataset's batch (prompts + the teacher's responses), B rows
    of L₁ positions; ``student_responses``: the same B prompts followed by the student's
    generation, L₂ positions (both :class:`~textbrewer.distillers.lm.alignment.PreparedBatch`,
    targets aligned with the logits). ``num_tokens_on_teacher`` / ``num_tokens_on_student``:
    the valid target tokens of each kind over the whole accumulation window and all DDP
    ranks (the batch's own counts when it is prepared outside the training loop).
    """

    teacher_responses: PreparedBatch
    student_responses: PreparedBatch
    num_tokens_on_teacher: int
    num_tokens_on_student: int


def _check_unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class DistiLLM2Distiller(CausalLMDistiller):
    """DistiLLM-2 (Ko et al., "DistiLLM-2: A Contrastive Approach Boosts the Distillation of
    LLMs", ICML 2025) for decoder-only LMs.

    Each micro-batch is a dict with ``input_ids`` (B, L₁), optional ``attention_mask``
    (B, L₁) and ``labels`` (B, L₁): a prompt, then the **teacher's response** (generated
    offline, or any reference response), the labels ``ignore_index`` on the prompt and the
    response's ids after it. For every micro-batch the distiller

    1. generates the **student's response** to the same prompts (the tokens before each
       row's first label) with the run's generation settings
       (:class:`~textbrewer.distillers.lm.generation.Sampler`, ``max_new_tokens``,
       ``eos_token_id``, ``do_sample``, ...), seeded by a draw of the run's generator (saved
       in checkpoints, so a resumed run generates the same responses);
    2. runs the student and, without gradients, the teacher on both batches (one forward
       pass per model, the two batches stacked: (2B, max(L₁, L₂)));
    3. computes, with N₁ / N₂ the valid response tokens of each kind over the accumulation
       window and the DDP ranks::

           KD = weight_teacher · Σ_{y_t} KL(p ‖ α₁p + (1−α₁)q) / N₁
              + weight_student · Σ_{y_s} KL(q ‖ α₂q + (1−α₂)p) / N₂
           loss = kd_loss_weight · KD + hard_label_weight · Σ_{y_t} CE / N₁

       (:func:`~textbrewer.losses.token.objectives.distillm2_loss`, p the teacher's and q
       the student's distribution at τ = ``DistillationConfig.temperature``; the CE, at
       τ = 1, is on the teacher's responses only).

    Deviations from the paper and its code: token means over the window, not sequence
    means then a batch mean; the student's responses are generated fresh for every batch
    by the student being trained (the official pipeline generates them offline, with vLLM,
    outside the training step); the α
    curriculum (adaptive α per sequence, off by default there) is not implemented.

    Args:
        train_config, distill_config: as for
            :class:`~textbrewer.distillers.lm.causal.CausalLMDistiller`.
        model_T: the teacher, a live model (it scores the student's responses).
        model_S: the student.
        adaptor_T, adaptor_S: optional ``adaptor(inputs, outputs) -> {'logits': (B, L, V)}``;
            they receive the two batches stacked.
        lm_head_T, lm_head_S: accepted as by the causal distiller (the loss reads logits).
        lm_config: :class:`~textbrewer.distillers.lm.config.LMDistillationConfig` with the
            generation settings: ``max_new_tokens``, ``eos_token_id`` (required), sampling
            options, ``seed``, ``pad_token_id``, ``ignore_index``. Its ``divergence``,
            ``lmbda``, ``seq_kd``, ``speculative_top_k``, ``vocab_alignment``,
            ``token_alignment``, ``telemetry`` and ``path='fused'`` do not apply and must
            stay at their defaults; the loss runs on the dense path (``chunk_size`` is
            unused).
        alpha_teacher: α₁ of the skew KL on the teacher's responses, in [0, 1] (paper 0.1).
        alpha_student: α₂ of the skew reverse KL on the student's responses, in [0, 1]
            (paper 0.1).
        weight_teacher, weight_student: the two terms' weights, finite and >= 0.
        detach_mixture: the student's share α₂q of the skew reverse KL's mixture is a
            constant (True, the official code).

    Raises:
        ValueError: an option outside its range (naming the value and the range), no
            teacher, no ``eos_token_id``, an ``lm_config`` option that does not apply, or
            the on-policy start checks of the causal distiller (EOS, room for a prompt).

    Example:
        >>> lm = LMDistillationConfig(max_new_tokens=128, eos_token_id=tokenizer.eos_token_id,
        ...                           pad_token_id=tokenizer.pad_token_id)
        >>> distiller = DistiLLM2Distiller(TrainingConfig(device='cuda'),
        ...                                DistillationConfig(temperature=1), teacher, student,
        ...                                lm_config=lm, alpha_teacher=0.1, alpha_student=0.1)
        >>> with distiller:
        ...     distiller.train(optimizer, loader, num_steps=1000)   # prompt + teacher response
    """

    def __init__(self, train_config: TrainingConfig, distill_config: DistillationConfig,
                 model_T: nn.Module, model_S: nn.Module,
                 adaptor_T: Optional[Callable] = None, adaptor_S: Optional[Callable] = None,
                 lm_config: Optional[LMDistillationConfig] = None, *,
                 alpha_teacher: float = 0.1, alpha_student: float = 0.1,
                 weight_teacher: float = 1.0, weight_student: float = 1.0,
                 detach_mixture: bool = True,
                 lm_head_T: Optional[nn.Module] = None, lm_head_S: Optional[nn.Module] = None):
        self.alpha_teacher = _check_unit("alpha_teacher", alpha_teacher)
        self.alpha_student = _check_unit("alpha_student", alpha_student)
        self.weight_teacher = _check_weight("weight_teacher", weight_teacher)
        self.weight_student = _check_weight("weight_student", weight_student)
        if not isinstance(detach_mixture, bool):
            raise ValueError(f"detach_mixture must be True or False, got {detach_mixture!r}")
        self.detach_mixture = detach_mixture
        if model_T is None:
            raise ValueError("DistiLLM2Distiller needs a live teacher (model_T is None): the "
                             "teacher scores the student's responses, generated during "
                             "training, which no teacher cache holds")
        self._check_lm_config(lm_config)
        super().__init__(train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S,
                         lm_config, lm_head_T=lm_head_T, lm_head_S=lm_head_S)
        # the causal distiller's on-policy start checks (EOS of both models, room for a
        # prompt): they run for configs that generate, which this one always does
        check_end_of_sequence(dataclasses.replace(lm_config, lmbda=1.0), None, self.model_S,
                              self.model_T, self.vocab_size_S, self.vocab_size_T)

    @staticmethod
    def _check_lm_config(config: Optional[LMDistillationConfig]) -> None:
        if config is None or not isinstance(config, LMDistillationConfig):
            raise ValueError("DistiLLM2Distiller generates the student's responses: pass "
                             "lm_config=LMDistillationConfig(max_new_tokens=..., "
                             "eos_token_id=...) with the generation settings, got "
                             f"lm_config={config!r}")
        if config.eos_token_id is None:
            raise ValueError("DistiLLM2Distiller needs LMDistillationConfig.eos_token_id (the "
                             "token that ends a response, e.g. tokenizer.eos_token_id), got "
                             "None: every student response would run to max_new_tokens="
                             f"{config.max_new_tokens}")
        default = LMDistillationConfig()
        for name in ("divergence", "lmbda", "seq_kd", "speculative_top_k", "vocab_alignment",
                     "token_alignment"):
            value = getattr(config, name)
            if value != getattr(default, name):
                raise ValueError(f"LMDistillationConfig.{name}={value!r} does not apply to "
                                 f"DistiLLM2Distiller (its loss is distillm2_loss, and every "
                                 f"batch gets the student's responses): leave it at "
                                 f"{getattr(default, name)!r}")
        if getattr(config, "telemetry", False):  # the token loss's telemetry; not this loss's
            raise ValueError("LMDistillationConfig.telemetry=True is not supported by "
                             "DistiLLM2Distiller (its steps log distillm2_teacher_responses "
                             "and distillm2_student_responses instead); leave it False")
        if config.path == "fused":
            raise ValueError("DistiLLM2Distiller runs on the dense path (distillm2_loss "
                             "needs the logits); path must be 'auto', 'dense' or 'chunked', "
                             "got 'fused'")

    def _resolve_path(self) -> str:
        return "dense"

    # batches ---------------------------------------------------------------------------------
    def prepare_batch(self, batch: Any) -> DistiLLM2Batch:
        """The dataset's batch (prompts + teacher responses) and the student's responses to
        the same prompts, generated here, both with targets aligned; the token counts are
        the batch's own (:meth:`prepare_window` replaces them by the window's).

        Args:
            batch: ``{'input_ids': (B, L₁), 'labels': (B, L₁), 'attention_mask': (B, L₁)
                (optional)}``, the labels ``ignore_index`` on each row's prompt.
        """
        config = self.lm_config
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError(f"DistiLLM2Distiller needs dict batches with 'input_ids', "
                             f"'labels' (and 'attention_mask'); got {type(batch).__name__}"
                             + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping)
                                else ""))
        if batch.get("labels") is None:
            raise ValueError(f"DistiLLM2Distiller needs 'labels' (B, L): ignore_index="
                             f"{config.ignore_index} on each prompt, the teacher's response "
                             f"after it; the batch has keys {sorted(batch)}")
        extra = sorted(set(batch) - set(MODEL_INPUTS) - {"labels"} - set(NOT_MODEL_INPUTS))
        if extra:
            raise ValueError(f"DistiLLM2Distiller passes only {list(MODEL_INPUTS)} to the "
                             f"models (the student's generated batch has no other inputs); "
                             f"the batch also has {extra}")
        teacher_responses = super().prepare_batch(batch)  # lmbda = 0: the dataset's tokens
        _, seed = self.sampler.draw(1.0)  # the run's generator, as on-policy batches draw
        generated = self.generated_batch(self.model_S, batch, seed)
        self._record_generation(generated)
        student_responses = super().prepare_batch(generated)
        return DistiLLM2Batch(teacher_responses, student_responses, teacher_responses.count,
                              student_responses.count)

    def prepare_window(self, batches: List[Any]) -> Tuple[List[DistiLLM2Batch], int]:
        """The window's micro-batches prepared (:meth:`prepare_batch`), each carrying the
        window's teacher-response and student-response token counts summed over the DDP
        ranks (each term of the loss is its tokens' sum over its own count)."""
        prepared = [self.prepare_batch(batch) for batch in batches]
        on_teacher = sum(item.num_tokens_on_teacher for item in prepared)
        on_student = sum(item.num_tokens_on_student for item in prepared)
        total_teacher = self.runtime.all_reduce_sum(on_teacher)
        total_student = self.runtime.all_reduce_sum(on_student)
        prepared = [item._replace(num_tokens_on_teacher=total_teacher,
                                  num_tokens_on_student=total_student) for item in prepared]
        return prepared, on_teacher + on_student

    # the loss --------------------------------------------------------------------------------
    def train_on_batch(self, batch: Any, args: Dict[str, Any]):
        prepared = batch if isinstance(batch, DistiLLM2Batch) else self.prepare_batch(batch)
        return self.compute_distillm2_loss(prepared, args)

    def compute_distillm2_loss(self, prepared: DistiLLM2Batch, args: Dict[str, Any]):
        """``kd_loss_weight · distillm2_loss + hard_label_weight · CE`` of one micro-batch
        (see the class docstring).

        Returns:
            ``(total, {'unweighted_kd_loss', 'distillm2_teacher_responses',
            'distillm2_student_responses'[, 'unweighted_hard_label_loss']})``.
        """
        runtime = self.runtime
        kd_weight = float(self.composer.kd_loss_weight)
        ce_weight = float(self.composer.hard_label_weight)
        on_teacher, on_student = prepared.teacher_responses, prepared.student_responses
        rows, length_T = on_teacher.valid.shape
        length_S = on_student.valid.shape[1]
        inputs = runtime.to_device(self._stacked_inputs(on_teacher.student,
                                                        on_student.student))
        logits_S = self._run_logits(self._student_forward, self.adaptor_S, inputs, args,
                                    "student")
        valid_T = runtime.to_device(on_teacher.valid)
        valid_S = runtime.to_device(on_student.valid)
        named: Dict[str, torch.Tensor] = {}
        if kd_weight != 0:
            with torch.no_grad():
                logits_T = self._run_logits(self._teacher_forwards, self.adaptor_T, inputs,
                                            args, "teacher")
            parts = distillm2_loss(
                logits_S[:rows, :length_T], logits_T[:rows, :length_T],
                logits_S[rows:, :length_S], logits_T[rows:, :length_S], valid_T, valid_S,
                alpha_teacher=self.alpha_teacher, alpha_student=self.alpha_student,
                weight_teacher=self.weight_teacher, weight_student=self.weight_student,
                temperature=float(self.d_config.temperature),
                detach_mixture=self.detach_mixture,
                num_tokens_on_teacher=prepared.num_tokens_on_teacher,
                num_tokens_on_student=prepared.num_tokens_on_student, return_dict=True)
            kd = parts["loss"]
            named.update(distillm2_teacher_responses=parts["teacher_responses"],
                         distillm2_student_responses=parts["student_responses"])
        else:  # no KD this step (a weight schedule at 0): no teacher runs
            kd = logits_S.sum() * 0.0
        loss = kd_weight * kd
        named = {"unweighted_kd_loss": kd.detach(), **named}
        if ce_weight != 0:
            targets = runtime.to_device(on_teacher.labels)
            rows_logits = logits_S[:rows, :length_T][valid_T].float()
            ce = F.cross_entropy(rows_logits, targets[valid_T], reduction="sum") \
                / max(prepared.num_tokens_on_teacher, 1)
            loss = loss + ce_weight * ce
            named["unweighted_hard_label_loss"] = ce.detach()
        return loss, named

    def _stacked_inputs(self, teacher_inputs: Dict[str, torch.Tensor],
                        student_inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The two batches as one (2B, max(L₁, L₂)) model input, right-padded with
        ``pad_token_id`` (attention mask 0: a causal model's logits at the real positions do
        not see it)."""
        width = max(teacher_inputs["input_ids"].shape[1], student_inputs["input_ids"].shape[1])
        ids, masks = [], []
        for part in (teacher_inputs, student_inputs):
            part_ids = part["input_ids"]
            mask = part.get("attention_mask")
            mask = torch.ones_like(part_ids) if mask is None else mask.to(part_ids.dtype)
            pad = width - part_ids.shape[1]
            ids.append(F.pad(part_ids, (0, pad), value=self.lm_config.pad_token_id))
            masks.append(F.pad(mask, (0, pad), value=0))
        return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}
