"""Turns the adaptors' outputs into the total loss and its named parts.

``total = kd_loss_weight · Σ_heads KD + hard_label_weight · Σ mean(losses) + Σ_i w_i · match_i``

One object for every distiller, so the formula exists once. Weights follow their
schedules through :meth:`LossComposer.update_weights`; the configuration is never modified.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..adaptors import AdaptorError
from ..configurations import DistillationConfig, IntermediateMatch
from ..logs import logger
from ..registry import (KD_LOSSES, LOSS_MODULES, MATCH_LOSSES, PROJECTIONS,
                        TEMPERATURE_SCHEDULERS, WEIGHT_SCHEDULERS)

__all__ = ["LossComposer", "select_logits_with_mask", "probability_shift_", "check_same_device",
           "hard_label_sum"]

Parts = Dict[str, torch.Tensor]


def select_logits_with_mask(logits_list: Sequence[torch.Tensor],
                            masks_list: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Keeps the masked positions of 3-D logits: (B, L, C) with mask (B, L) -> (N_kept, C).

    2-D logits pass through unchanged. ``masks_list`` has one mask per head, or one for all.
    """
    if len(masks_list) not in (1, len(logits_list)):
        raise AdaptorError(f"logits_mask has {len(masks_list)} masks for {len(logits_list)} "
                           f"logits heads; give one mask per head or a single mask")
    selected = []
    for index, logits in enumerate(logits_list):
        mask = masks_list[index if len(masks_list) > 1 else 0]
        if logits.dim() == 3:
            selected.append(logits[mask.to(torch.bool)])
        else:
            selected.append(logits)
    return selected


def probability_shift_(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Swaps, in each row, the largest logit with the gold label's logit (in place).

    Args:
        logits: (N, C) or (B, L, C) teacher logits.
        labels: (N,) or (B, L) gold labels; a negative label leaves its row unchanged.

    Returns:
        ``logits``, modified.
    """
    if logits.dim() not in (2, 3):
        raise ValueError(f"probability_shift needs logits of rank 2 or 3, got shape "
                         f"{tuple(logits.shape)}")
    rows = logits.view(-1, logits.size(-1))
    labels = labels.reshape(-1).to(rows.device)
    if labels.numel() != rows.size(0):
        raise AdaptorError(f"probability_shift: {labels.numel()} labels for {rows.size(0)} "
                           f"rows of logits {tuple(logits.shape)}")
    max_position = rows.argmax(dim=-1)
    gold = torch.where(labels < 0, max_position, labels)
    index = torch.arange(rows.size(0), device=rows.device)
    max_values = rows[index, max_position].clone()
    gold_values = rows[index, gold].clone()
    rows[index, max_position] = gold_values
    rows[index, gold] = max_values
    return logits


def _accepts_keyword(function: Any, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


#: match losses that compare attention maps, (batch, heads, len, len) or (batch, len, len)
ATTENTION_LOSSES = ("attention_mse", "attention_mse_sum", "attention_ce", "attention_ce_mean")


def _describe_match(index: int, match: IntermediateMatch) -> str:
    """``intermediate_matches[2] (hidden, hidden_mse, layer_T=4, layer_S=1)`` for messages."""
    if match.by_module:
        return (f"intermediate_matches[{index}] ({match.loss}, module_T={match.module_T!r}, "
                f"module_S={match.module_S!r})")
    return (f"intermediate_matches[{index}] ({match.feature}, {match.loss}, "
            f"layer_T={match.layer_T}, layer_S={match.layer_S})")


def _check_attention_maps(index: int, match: IntermediateMatch, feature_S: Any,
                          feature_T: Any, masked: bool) -> None:
    """An attention loss on tensors that are not (batch, [heads,] len, len) maps (hidden
    states (batch, len, hidden), say) is an error naming the match and the shapes. Maps of
    (batch, heads, queries, keys) with queries != keys (cross-attention) pass unmasked."""
    for side, value in (("student", feature_S), ("teacher", feature_T)):
        for tensor in (value if isinstance(value, list) else [value]):
            if not isinstance(tensor, torch.Tensor):
                continue
            square = tensor.dim() in (3, 4) and tensor.size(-1) == tensor.size(-2)
            if square or (tensor.dim() == 4 and not masked):
                continue
            hint = ""
            if tensor.dim() == 3 and match.feature == "hidden":
                hint = (": these look like hidden states (batch, len, hidden); use a "
                        "hidden-state loss such as 'hidden_mse', or feature='attention' for "
                        "the adaptor's attention maps")
            elif tensor.dim() == 3:
                hint = (": these look like hidden states (batch, len, hidden); the adaptor's "
                        "'attention' should hold the attention maps (e.g. outputs.attentions)")
            raise AdaptorError(
                f"{_describe_match(index, match)}: loss {match.loss!r} compares attention maps "
                f"of shape (batch, heads, len, len) or (batch, len, len), but the {side}'s "
                f"{match.feature} has shape {tuple(tensor.shape)} (student {_shape(feature_S)}, "
                f"teacher {_shape(feature_T)}){hint}")


def hard_label_sum(losses: Sequence[torch.Tensor]) -> Any:
    """The hard-label term of TextBrewer 0.2.1: the sum over the adaptor's ``losses`` of
    each one's mean (a scalar loss stays itself); 0 when there are none. The one place it
    is computed, in the order 0.2.1 adds them (its numbers depend on it)."""
    total: Any = 0
    for loss in losses:
        total = total + loss.mean()
    return total


def check_same_device(what: str, student: Any, teacher: Any) -> None:
    """The student's and the teacher's tensors that a loss combines must share a device:
    otherwise an error naming the key and both devices (rather than torch's)."""
    def devices(value):
        return {t.device for t in (value if isinstance(value, (list, tuple)) else [value])
                if isinstance(t, torch.Tensor)}
    found_S, found_T = devices(student), devices(teacher)
    if found_S and found_T and (len(found_S | found_T) > 1):
        raise AdaptorError(f"{what}: the student's adaptor returned it on "
                           f"{', '.join(map(str, sorted(found_S, key=str)))}, the teacher's on "
                           f"{', '.join(map(str, sorted(found_T, key=str)))}; the loss needs "
                           f"both on the training device (TrainingConfig.device): return the "
                           f"models' outputs where they are, or move them with .to(device)")


def _shape(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return [_shape(v) for v in value]
    return type(value).__name__


class LossComposer(nn.Module):
    """KD + hard-label + intermediate-match terms, with the projections they own.

    Args:
        config: the distillation configuration.
        use_matches: build and apply ``config.intermediate_matches`` (GeneralDistiller,
            MultiTaskDistiller); BasicDistiller ignores them, as TextBrewer did.
        require_logits: a missing ``logits`` key is an error (BasicDistiller) rather than
            "no KD term" (GeneralDistiller).
    """

    def __init__(self, config: DistillationConfig, use_matches: bool = True,
                 require_logits: bool = True):
        super().__init__()
        self.config = config
        self.require_logits = require_logits
        self.kd_loss = KD_LOSSES.resolve(config.kd_loss_type)
        # losses that need the gold labels (DKD) declare a `labels` parameter
        self.kd_loss_takes_labels = _accepts_keyword(self.kd_loss, "labels")
        self.temperature_scheduler = (None if config.temperature_scheduler == "none"
                                      else TEMPERATURE_SCHEDULERS.resolve(
                                          config.temperature_scheduler))
        self.kd_weight_schedule = (None if config.kd_loss_weight_scheduler == "none"
                                   else WEIGHT_SCHEDULERS.resolve(config.kd_loss_weight_scheduler))
        self.hard_label_weight_schedule = (
            None if config.hard_label_weight_scheduler == "none"
            else WEIGHT_SCHEDULERS.resolve(config.hard_label_weight_scheduler))
        self.kd_loss_weight = config.kd_loss_weight
        self.hard_label_weight = config.hard_label_weight
        self.matches: List[IntermediateMatch] = list(config.intermediate_matches) \
            if use_matches else []
        # TextBrewer 0.2.1's GeneralDistiller overwrote (=) instead of adding (+=) the KD
        # loss of each head unless probability_shift was on; 0.2.1.post1 sums (the default)
        self.last_head_only = (config.kd_over_heads == "last" and use_matches
                               and not config.probability_shift)
        # Built in match order, so a seeded run draws the same numbers as TextBrewer.
        self.projections = nn.ModuleList()
        self.projection_of_match: List[Optional[int]] = []
        self.projection_groups: List[dict] = []
        for match in self.matches:
            if match.proj is None:
                self.projection_of_match.append(None)
                continue
            name, dim_in, dim_out, options = match.proj
            self.projection_of_match.append(len(self.projections))
            self.projections.append(PROJECTIONS[name](dim_in, dim_out))
            self.projection_groups.append(dict(options))
        # Losses with weights of their own (CRD, VID) are built after every projection, so
        # the projections draw the same random numbers as in TextBrewer 0.2.1.
        self.loss_modules = nn.ModuleDict()
        self.match_losses: List[Any] = []
        for index, match in enumerate(self.matches):
            if match.owns_weights:
                try:
                    module = LOSS_MODULES[match.loss](**match.loss_options)
                except TypeError as error:
                    raise ValueError(f"intermediate_matches[{index}]: loss {match.loss!r} could "
                                     f"not be built from loss_options={match.loss_options}: "
                                     f"{error}") from None
                self.loss_modules[str(index)] = module
                self.match_losses.append(module)
            elif match.loss_options:
                self.match_losses.append(functools.partial(MATCH_LOSSES[match.loss],
                                                           **match.loss_options))
            else:
                self.match_losses.append(MATCH_LOSSES[match.loss])
        self._warned: set = set()
        #: the temperature of the last KD term (a float, or the mean of a scheduled one)
        self.last_temperature: Any = None

    def projections_per_match(self) -> List[Optional[nn.Module]]:
        """The projection of each intermediate match, or None (TextBrewer 0.2.1's ``projs``)."""
        return [None if index is None else self.projections[index]
                for index in self.projection_of_match]

    def groups_per_match(self) -> List[dict]:
        """The param-group options of each match's projection ({} without one)."""
        return [{} if index is None else self.projection_groups[index]
                for index in self.projection_of_match]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # weights ------------------------------------------------------------------------------
    def update_weights(self, progress: float) -> None:
        """Sets the scheduled weights for training progress ``global_step / total_steps``."""
        if self.kd_weight_schedule is not None:
            self.kd_loss_weight = self.kd_weight_schedule(progress)
        if self.hard_label_weight_schedule is not None:
            self.hard_label_weight = self.hard_label_weight_schedule(progress)

    def reset_weights(self) -> None:
        """Back to the configured weights (start of training)."""
        self.kd_loss_weight = self.config.kd_loss_weight
        self.hard_label_weight = self.config.hard_label_weight

    # terms ----------------------------------------------------------------------------------
    def kd_term(self, logits_S: Sequence[torch.Tensor], logits_T: Sequence[torch.Tensor],
                labels: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """Σ over heads of the KD loss between (already mask-selected) logits."""
        if self.config.probability_shift and labels is None:
            raise AdaptorError("probability_shift=True needs 'labels' from the student's adaptor")
        if self.kd_loss_takes_labels and labels is None:
            raise AdaptorError(f"kd_loss_type={self.config.kd_loss_type!r} needs the gold labels: "
                               f"return 'labels' from the student's adaptor")
        total = 0
        heads = list(enumerate(zip(logits_S, logits_T)))
        for head, (head_S, head_T) in heads[-1:] if self.last_head_only else heads:
            if labels is not None and self.config.probability_shift:
                head_T = probability_shift_(head_T, labels[head])
            if head_S.dim() >= 1 and head_S.size(0) == 0:
                # logits_mask kept no position: a mean over no rows would be NaN
                self._warn_once("empty_logits_mask", f"logits_mask selects no position of logits "
                                f"head {head} (all zeros) in a batch: its KD term is 0 there. "
                                f"logits_mask is 1 at the positions to distil (warned once)")
                total = total + head_S.sum() * 0
                continue
            temperature = self.config.temperature
            if self.temperature_scheduler is not None:
                temperature = self.temperature_scheduler(head_S, head_T, temperature)
            self.last_temperature = (temperature.detach().float().mean()
                                     if isinstance(temperature, torch.Tensor) else temperature)
            if self.kd_loss_takes_labels:
                total = total + self.kd_loss(head_S, head_T, temperature, labels=labels[head])
            else:
                total = total + self.kd_loss(head_S, head_T, temperature)
        return total

    def compose(self, results_S: Dict[str, Any], results_T: Dict[str, Any],
                custom_terms: Sequence[Tuple[str, float, torch.Tensor]] = (),
                projections: Optional[Sequence[Optional[nn.Module]]] = None
                ) -> Tuple[torch.Tensor, Parts]:
        """The total loss and its unweighted parts (TensorBoard names without 'scalar/').

        Args:
            results_S: the student adaptor's normalised output.
            results_T: the teacher's (for several teachers, logits already averaged).
            custom_terms: extra ``(name, weight, loss)`` terms (custom matches).
            projections: one module (or None) per intermediate match, applied to the
                student's feature; default: the ones built from the configuration.
        """
        parts: Parts = {}
        total = 0
        if "logits" in results_S and "logits" in results_T:
            logits_S, logits_T, labels = self.select_logits(results_S, results_T)
            kd = self.kd_term(logits_S, logits_T, labels)
            total = total + kd * self.kd_loss_weight
            parts["unweighted_kd_loss"] = kd
        elif self.require_logits:
            side = "student's" if "logits" not in results_S else "teacher's"
            raise AdaptorError(f"the {side} adaptor returned no 'logits' (needed for the KD loss)")
        elif self.config.kd_loss_weight > 0:
            side = "student's" if "logits" not in results_S else "teacher's"
            # 0.2.1 skipped the term silently and feature-only recipes rely on that
            self._warn_once("kd", f"kd_loss_weight={self.config.kd_loss_weight} but the {side} "
                                  f"adaptor returns no 'logits': the KD term is left out. Set "
                                  f"kd_loss_weight=0 if that is intended")
        for index, match in enumerate(self.matches):
            loss = self.match_term(index, match, results_S, results_T, projections)
            total = total + loss * match.weight
            parts[match.name] = loss
        for name, weight, loss in custom_terms:
            total = total + loss * weight
            parts[name] = loss
        if "losses" in results_S:
            hard = hard_label_sum(results_S["losses"])
            total = total + hard * self.hard_label_weight
            parts["unweighted_hard_label_loss"] = hard
        elif self.config.hard_label_weight > 0:
            self._warn_once("hard", f"hard_label_weight={self.config.hard_label_weight} but the "
                                    f"student's adaptor returns no 'losses' (or None): the "
                                    f"hard-label term is left out")
        return total, parts

    def select_logits(self, results_S, results_T):
        """Mask-selected student and teacher logits (and labels), checked for equal shapes."""
        logits_S, logits_T = list(results_S["logits"]), list(results_T["logits"])
        if len(logits_S) != len(logits_T):
            raise AdaptorError(f"the student's adaptor returned {len(logits_S)} logits heads and "
                               f"the teacher's {len(logits_T)}")
        for head, (head_S, head_T) in enumerate(zip(logits_S, logits_T)):
            check_same_device(f"'logits' head {head}", head_S, head_T)
        labels = results_S.get("labels")
        if "logits_mask" in results_S:
            masks = results_S["logits_mask"]
            if labels is not None and (self.config.probability_shift
                                       or self.kd_loss_takes_labels):
                labels = [label if label.dim() < 2 else
                          label[masks[i if len(masks) > 1 else 0].to(torch.bool)]
                          for i, label in enumerate(labels)]
            logits_S = select_logits_with_mask(logits_S, masks)
        if "logits_mask" in results_T:
            logits_T = select_logits_with_mask(logits_T, results_T["logits_mask"])
        for head, (head_S, head_T) in enumerate(zip(logits_S, logits_T)):
            if head_S.shape != head_T.shape:
                raise AdaptorError(f"logits head {head}: student logits {tuple(head_S.shape)} and "
                                   f"teacher logits {tuple(head_T.shape)} differ in shape"
                                   + (" (after logits_mask selection)"
                                      if "logits_mask" in results_S else ""))
        return logits_S, logits_T, labels

    @staticmethod
    def _check_inputs_mask(index: int, match: IntermediateMatch, mask: Any, feature_S: Any):
        if not isinstance(mask, torch.Tensor):
            raise AdaptorError(f"the student's adaptor returned 'inputs_mask' as "
                               f"{type(mask).__name__}; expected a (batch, length) tensor")
        first = feature_S[0] if isinstance(feature_S, list) else feature_S
        if match.feature == "attention":
            expected = (first.size(0), first.size(-1))
        elif first.dim() >= 3:
            expected = (first.size(0), first.size(1))
        else:
            return  # (batch, width) features have no positions to mask
        if tuple(mask.shape) != expected:
            raise AdaptorError(f"intermediate_matches[{index}] ({match.feature}, {match.loss}): "
                               f"'inputs_mask' has shape {tuple(mask.shape)} but the student's "
                               f"{match.feature} {tuple(first.shape)} needs (batch, length) = "
                               f"{expected}")

    @staticmethod
    def _module_feature(results: Dict[str, Any], name: str, side: str, index: int):
        captured = results.get("modules") or {}
        if name not in captured:
            raise AdaptorError(f"intermediate_matches[{index}]: nothing was captured from the "
                               f"{side}'s module {name!r} (captured: {sorted(captured)})")
        return captured[name]

    def _features(self, results, feature, layers, side, index, match):
        available = results.get(feature)
        # transformers' default 'sdpa' attention gives () (or Nones) for output_attentions=True
        eager = (" transformers' default 'sdpa' attention returns no attention maps: load or "
                 "build the model with attn_implementation='eager' (BertConfig(..., "
                 "attn_implementation='eager') or from_pretrained(..., "
                 "attn_implementation='eager'))." if feature == "attention" else "")
        if available is None or len(available) == 0 or (
                isinstance(available, (list, tuple)) and all(a is None for a in available)):
            raise AdaptorError(f"intermediate_matches[{index}] ({match.loss}, layer_T="
                               f"{match.layer_T}, layer_S={match.layer_S}) needs feature "
                               f"{feature!r} but the {side}'s adaptor returned none (None, empty "
                               f"or all None); it returned "
                               f"{sorted(k for k, v in results.items() if v is not None)}"
                               f" (a transformers model needs output_hidden_states=True / "
                               f"output_attentions=True, e.g. as keyword arguments of train())."
                               + eager)
        count = len(available)
        picked = []
        for layer in (layers if isinstance(layers, list) else [layers]):
            if not -count <= layer < count:
                # 0.2.1's MATCHES count attention layers from 1 (teacher 1..12)
                base = (" textbrewer.MATCHES counts attention layers from 1 (TextBrewer 0.2.1's "
                        "adaptors); transformers' outputs.attentions counts from 0: use "
                        "textbrewer.MATCHES_TRANSFORMERS (every attention index one lower)."
                        if feature == "attention" and layer >= count else "")
                raise AdaptorError(f"intermediate_matches[{index}]: layer_{side[0].upper()}="
                                   f"{layer} but the {side}'s adaptor returned {count} "
                                   f"{feature} entries (valid: 0..{count - 1})." + base)
            picked.append(available[layer])
        return picked if isinstance(layers, list) else picked[0]

    def match_term(self, index: int, match: IntermediateMatch, results_S, results_T,
                   projections: Optional[Sequence[Optional[nn.Module]]] = None):
        """One intermediate-match loss, with a clear error on bad layers or shapes."""
        if match.by_module:
            feature_S = self._module_feature(results_S, match.module_S, "student", index)
            feature_T = self._module_feature(results_T, match.module_T, "teacher", index)
        else:
            feature_S = self._features(results_S, match.feature, match.layer_S, "student",
                                       index, match)
            feature_T = self._features(results_T, match.feature, match.layer_T, "teacher",
                                       index, match)
        check_same_device(f"{_describe_match(index, match)}: "
                          f"{'the captured output' if match.by_module else repr(match.feature)}",
                          feature_S, feature_T)
        projection_index = self.projection_of_match[index]
        projection = None if projection_index is None else self.projections[projection_index]
        if projections is not None:
            projection = projections[index] if index < len(projections) else None
        if projection is not None and match.proj is None:
            feature_S = ([projection(state) for state in feature_S]
                         if isinstance(feature_S, list) else projection(feature_S))
        elif projection is not None:
            _, dim_in, dim_out, _ = match.proj
            for value, dim, side in ((feature_S, dim_in, "student"), (feature_T, dim_out,
                                                                       "teacher")):
                # channels of (N, C, H, W) maps, the last dimension of (B, L, D) / (N, D)
                widths = {t.size(1) if t.dim() == 4 else t.size(-1)
                          for t in (value if isinstance(value, list) else [value])}
                if widths != {dim}:
                    raise AdaptorError(
                        f"intermediate_matches[{index}]: proj {match.proj[:3]} expects "
                        f"{side} {match.feature} width {dim} but got {sorted(widths)} "
                        f"(shapes {_shape(value)})")
            if isinstance(feature_S, list):
                feature_S = [projection(state) for state in feature_S]
            else:
                feature_S = projection(feature_S)
        mask = results_S.get("inputs_mask")
        if match.loss in ATTENTION_LOSSES:
            _check_attention_maps(index, match, feature_S, feature_T,
                                  masked=mask is not None and not match.by_module)
        if match.by_module and (mask is None or feature_S.dim() != 3
                                or tuple(mask.shape) != tuple(feature_S.shape[:2])):
            mask = None  # a captured (N, C, H, W) map or (N, D) embedding has no positions
        if mask is not None:
            self._check_inputs_mask(index, match, mask, feature_S)
        try:
            return self.match_losses[index](feature_S, feature_T, mask=mask)
        except (RuntimeError, ValueError, IndexError) as error:
            raise AdaptorError(f"{_describe_match(index, match)}: student "
                               f"{_shape(feature_S)} and teacher {_shape(feature_T)} do not fit "
                               f"this loss: {error}") from error
