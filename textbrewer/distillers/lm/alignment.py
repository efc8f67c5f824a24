"""Targets aligned with the logits, one rule for each kind of LM.

A causal LM's logits at position t predict the token at t + 1, so its targets are the
labels shifted left (the last position has none); an encoder-decoder model shifts inside,
and its decoder logits at t are scored against ``labels[t]``. Each rule also says which
batch keys go to a model, how to check that a separately tokenised teacher batch has the
student's positions, and where a cached teacher top-k fits.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch

from ...losses.token import TopKTeacher
from ...losses.token.cross import TokenGroups

__all__ = ["PreparedBatch", "CausalAlignment", "Seq2SeqAlignment", "cached_topk",
           "valid_row_index", "gather_rows"]

#: batch keys that are never passed to a model
NOT_MODEL_INPUTS = ("labels", "example_index")


class PreparedBatch(NamedTuple):
    """One micro-batch, ready for the loss (all tensors where the batch had them).

    ``labels`` and ``valid`` are aligned with the logits: (B, L) for a causal LM (the
    target of position t is the token at t + 1), (B, T) decoder positions for seq2seq.
    ``groups``: the aligned token groups of a cross-tokenizer batch (those whose student
    targets are all valid), else None.
    """

    student: Dict[str, Any]
    teacher: Optional[Dict[str, Any]]
    labels: torch.Tensor
    valid: torch.Tensor
    topk: Optional[TopKTeacher]
    count: int
    source: str  # 'data', 'student' (on-policy) or 'teacher' (sequence-level KD)
    groups: Optional[TokenGroups] = None


class CausalAlignment:
    """Decoder-only LMs: the logits at t against ``labels[t + 1]``.

    Args:
        ignore_index: the label of positions without a target.
        cache_key: the batch key of cached teacher rows (never a model input).
    """

    shifts_labels = True

    def __init__(self, ignore_index: int, cache_key: str):
        self.ignore_index = ignore_index
        self.cache_key = cache_key

    def labels(self, batch: Mapping) -> torch.Tensor:
        """``batch['labels']`` (B, L), else the input ids with padding as ``ignore_index``
        (as Hugging Face's language-modelling collator does)."""
        labels = batch.get("labels")
        if labels is not None:
            return labels
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        return ids if mask is None else ids.masked_fill(mask == 0, self.ignore_index)

    def aligned_targets(self, batch: Mapping, labels: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(targets (B, L), valid (B, L) bool) aligned with the logits."""
        ignore = self.ignore_index
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

    def model_inputs(self, model: Any, batch: Mapping, labels: torch.Tensor) -> Dict[str, Any]:
        """The batch's keys but the labels and the cache: the model computes no loss."""
        skip = set(NOT_MODEL_INPUTS) | {self.cache_key}
        return {key: value for key, value in batch.items() if key not in skip}

    def check_same_positions(self, student: Dict[str, Any], teacher: Dict[str, Any],
                             distiller: str) -> None:
        """A teacher batch tokenised apart must have the student's positions."""
        length_S, length_T = student["input_ids"].shape[1], teacher["input_ids"].shape[1]
        if length_S != length_T:
            raise ValueError(f"the teacher's input_ids have {length_T} positions and the "
                             f"student's {length_S}: with different tokenizers the positions "
                             f"do not correspond, and a token-level loss compares position t "
                             f"of both. {distiller} needs batches whose two "
                             f"tokenisations have the same length, position by position")


class Seq2SeqAlignment(CausalAlignment):
    """Encoder-decoder LMs: the decoder logits at t against ``labels[t]`` (the model shifts
    the labels right into its decoder inputs)."""

    shifts_labels = False

    def labels(self, batch: Mapping) -> torch.Tensor:
        labels = batch.get("labels")
        if labels is None:
            raise ValueError(f"an encoder-decoder distiller needs 'labels' (B, T), the "
                             f"decoder's targets; the batch has keys {sorted(batch)}")
        return labels

    def aligned_targets(self, batch: Mapping, labels: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        valid = labels != self.ignore_index
        mask = batch.get("decoder_attention_mask")
        if mask is not None:
            valid = valid & (mask != 0)
        return labels, valid

    def model_inputs(self, model: Any, batch: Mapping, labels: torch.Tensor) -> Dict[str, Any]:
        """The batch's keys with the decoder inputs each model builds from the labels
        (``prepare_decoder_input_ids_from_labels``, its own start token), or the labels
        for a model without that method (it shifts them itself)."""
        inputs = super().model_inputs(model, batch, labels)
        if "decoder_input_ids" not in inputs:
            prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
            if callable(prepare):
                inputs["decoder_input_ids"] = prepare(labels=labels)
            else:
                inputs["labels"] = labels
        return inputs

    def check_same_positions(self, student: Dict[str, Any], teacher: Dict[str, Any],
                             distiller: str) -> None:
        def length(inputs):
            decoder = inputs.get("decoder_input_ids", inputs.get("labels"))
            return None if decoder is None else decoder.shape[1]
        length_S, length_T = length(student), length(teacher)
        if length_S != length_T:
            raise ValueError(f"the teacher's decoder has {length_T} positions and the "
                             f"student's {length_S}: with different tokenizers the positions "
                             f"do not correspond; {distiller} needs targets of the "
                             f"same length, position by position")


def cached_topk(cache: Mapping, valid: torch.Tensor, alignment: CausalAlignment,
                vocab_size_S: Optional[int], distiller: str) -> TopKTeacher:
    """A batch's cached teacher rows as a TopKTeacher aligned with the logits, checked on
    the host: every target position has a row, every id is in the student's vocabulary.

    Args:
        cache: CachedTeacherCollator's dict: ``topk_ids`` / ``topk_logprobs`` (B, L, k),
            ``mask`` (B, L).
        valid: (B, L) the target positions.
    """
    if not alignment.shifts_labels:
        raise ValueError(f"{distiller} cannot train from a teacher cache: the cache is "
                         f"indexed by input_ids positions, the decoder's targets are not")
    missing = [key for key in ("topk_ids", "topk_logprobs", "mask") if key not in cache]
    if missing:
        raise ValueError(f"batch[{alignment.cache_key!r}] lacks {missing}; expected "
                         f"CachedTeacherCollator's dict (topk_ids, topk_logprobs, "
                         f"tail_mass, mask)")
    ids, logprobs, rows = cache["topk_ids"], cache["topk_logprobs"], cache["mask"]
    if tuple(ids.shape[:2]) != tuple(valid.shape):
        raise ValueError(f"cached topk_ids {tuple(ids.shape)} do not cover the batch's "
                         f"positions {tuple(valid.shape)}")
    # The cache keeps a row for position t (the logits at t) when the writer's rule kept
    # t; a target without a row would be silently left out of the KD term.
    uncovered = int((valid & ~rows.to(valid.device).bool()).sum())
    if uncovered:
        raise ValueError(f"the teacher cache has no row for {uncovered} target positions "
                         f"of this batch; write it with positions='shifted_labels' or "
                         f"'attention_mask' for a causal LM (the logits at t predict "
                         f"labels[t + 1])")
    if vocab_size_S is not None and ids.numel() and int(ids.max()) >= vocab_size_S:
        raise ValueError(f"the teacher cache holds token id {int(ids.max())}, outside the "
                         f"student's vocabulary of {vocab_size_S}")
    return TopKTeacher(ids, logprobs)


#: Per loss path, the share of valid target tokens below which the loss runs over the valid
#: rows only, gathered first. Gathering costs about three passes over the valid rows' logits
#: (the copy, and in backward a zero fill and a scatter); the loss on the padded rows costs
#: six to ten passes over them. Measured on the CPU (benchmarks/lm_padding.py, V 4,096 and
#: 32,000, docs/benchmarks.md), gathering pays from 0.85 valid down on the dense path and
#: from 0.65-0.75 on the chunked one, and costs up to 1.3x at 0.95. The fused path always
#: gathers: it gathers hidden states, (n, H), V / H times smaller than the logits, and saves
#: the head's matmul on the padding too (0.90x its time at 0.95 valid, 0.49x at 0.5).
GATHER_BELOW = {"dense": 0.9, "chunked": 0.7, "fused": 1.0}


def valid_row_index(valid: torch.Tensor, count: int, path: str) -> Optional[torch.Tensor]:
    """The flat indices, (n,) int64, of the valid target tokens of a batch, or None when the
    loss should run over every position.

    Args:
        valid: (B, L) bool, the batch's valid targets; only a host tensor is read (on an
            accelerator, finding the indices would wait for the device).
        count: ``valid.sum()``, already known (:class:`PreparedBatch`).
        path: the loss path, ``'dense'``, ``'chunked'`` or ``'fused'``: gather when fewer
            than ``GATHER_BELOW[path]`` of the positions are valid.
    """
    total = valid.numel()
    if valid.device.type != "cpu" or count >= GATHER_BELOW[path] * total:
        return None
    return valid.reshape(-1).nonzero().squeeze(1)


def gather_rows(x: Any, index: torch.Tensor, lead: Tuple[int, ...], name: str) -> Any:
    """``x`` (B, L, ...) -> (n, ...) at the flat positions ``index``; a (ids, logprobs) pair
    of cached teacher rows is gathered member by member, None stays None.

    Raises:
        ValueError: ``x``'s first two dimensions are not ``lead``, the (B, L) of the batch's
            targets (a model or adaptor that adds or drops positions): gathered, such rows
            would be the wrong tokens.
    """
    if x is None:
        return None
    if isinstance(x, tuple):
        members = [gather_rows(member, index, lead, name) for member in x]
        return type(x)(*members) if hasattr(x, "_fields") else tuple(members)
    if tuple(x.shape[:2]) != tuple(lead):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, whose positions "
                         f"{tuple(x.shape[:2])} differ from the batch's targets {tuple(lead)} "
                         f"(labels / input_ids): the model or adaptor adds or drops positions")
    return x.reshape(-1, *x.shape[2:]).index_select(0, index)
