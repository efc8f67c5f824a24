"""Per-step token telemetry of the LM distillers (``LMDistillationConfig(telemetry=True)``).

What an on-policy run that is about to collapse shows first: the student's entropy falls
(or explodes) on its own samples while the teacher's rises, and the divergence grows with
the position in the continuation. After each optimizer step the distiller logs, for each
kind of batch of that step (``dataset``, ``on_policy``: student-generated, ``seq_kd``:
teacher-generated), to TensorBoard:

* ``telemetry/{kind}/student_entropy``: mean H(q) over the valid target tokens, at τ = 1
  (the distribution the student samples from, before any generation temperature);
* ``telemetry/{kind}/teacher_entropy``: mean H(p), at τ = 1; for a top-k teacher the
  entropy of the distribution its ``topk_tail`` rebuilds (over k ids, k + 1 buckets or V);
* ``telemetry/{kind}/divergence``: the mean per-token divergence the loss trains on (its
  ``divergence``, temperature and τ² option; not for the objectives ``taid``/``akl``);
* ``telemetry/{kind}/divergence_by_position/{first}-{last}``: the same mean over the
  targets whose index among their row's targets is in that bin (0 = the row's first
  target, e.g. the first generated token), bins from ``telemetry_bins``.

The sums stay on the device (no host sync per batch); the token counts come from the host
tensors of the prepared batch. The statistics are computed only in a process that writes
TensorBoard (``TrainingConfig.log_dir`` set; under DDP rank 0), over that process's tokens:
its ``divergence`` is its local sum over its local count, where the loss's KD term divides
by the window's count over every rank.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ...losses.token import OBJECTIVES, TopKTeacher, token_distillation_loss
from ...losses.token.spec import _make_spec, _topk_support

__all__ = ["TokenTelemetry", "token_statistics", "BATCH_KINDS", "logit_row_slices",
           "head_row_slices", "topk_row_slices"]

#: a prepared batch's ``source`` -> its name in the telemetry
BATCH_KINDS = {"data": "dataset", "student": "on_policy", "teacher": "seq_kd"}
#: rows of one block of the statistics: its fp32 [rows, V] temporaries stay this small
_BLOCK_BYTES = 32 * 2 ** 20

Rows = Callable[[slice], Union[torch.Tensor, TopKTeacher, None]]


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """−Σ p log p per row (0·log 0 = 0), (m, V) -> (m,)."""
    probs = log_probs.exp()
    return -(probs * log_probs).masked_fill(probs == 0, 0.0).sum(-1)


@torch.no_grad()
def token_statistics(student: Rows, teacher: Rows, rows: int, width: int,
                     options: Dict[str, object]
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-token student entropy, teacher entropy and divergence, block by block.

    Args:
        student: ``student(rows_slice)`` -> (m, V_S) student logits of those flattened rows.
        teacher: ``teacher(rows_slice)`` -> (m, V_T) teacher logits, a
            :class:`~textbrewer.losses.token.TopKTeacher` of (m, k) entries, or None (no
            teacher: the student is its own).
        rows: N, the number of flattened token rows.
        width: the widest vocabulary of the two (sizes the blocks).
        options: the loss's ``divergence``, ``temperature``, ``beta``, ``alpha``, ``tail``,
            ``scale_by_temperature_squared`` and ``vocab_alignment``.

    Returns:
        (N,) fp32 student entropies; (N,) teacher entropies or None; (N,) divergences or
        None (no teacher, or an objective without a per-token divergence here).
    """
    keys = ("divergence", "temperature", "beta", "alpha", "tail",
            "scale_by_temperature_squared", "vocab_alignment")
    loss_options = {key: options[key] for key in keys if key in options}
    per_token = loss_options.get("divergence") not in OBJECTIVES
    at_one = _make_spec("topk_kl", 1.0, 0.5, 0.1, loss_options.get("tail", "renormalize"),
                        False, 0.0, None)
    block = max(1, _BLOCK_BYTES // (4 * max(width, 1)))
    entropy_S, entropy_T, divergence = [], [], []
    for start in range(0, rows, block):
        part = slice(start, min(start + block, rows))
        z_S = student(part).float()
        log_q = torch.log_softmax(z_S, dim=-1)
        entropy_S.append(_entropy(log_q))
        target = teacher(part)
        if target is None:
            continue
        if isinstance(target, (tuple, list)):
            ids, logprobs = target
            target = TopKTeacher(ids.long(), logprobs.float())
            _, log_p = _topk_support(at_one, log_q, target.ids, target.logprobs)
        else:
            target = target.float()
            log_p = torch.log_softmax(target, dim=-1)
        entropy_T.append(_entropy(log_p))
        if per_token:
            divergence.append(token_distillation_loss(z_S, target, reduction="none",
                                                      **loss_options).float())
    return (torch.cat(entropy_S), torch.cat(entropy_T) if entropy_T else None,
            torch.cat(divergence) if divergence else None)


class TokenTelemetry:
    """Sums of :func:`token_statistics` over one optimizer step, by kind of batch.

    Args:
        bins: the first target index of each position bin after the first (strictly
            increasing, > 0): ``(16, 64)`` gives the bins 0-15, 16-63 and 64+.
    """

    def __init__(self, bins: Sequence[int]):
        self.bins = tuple(int(edge) for edge in bins)
        self._edges = torch.tensor(self.bins, dtype=torch.int64)
        starts = (0,) + self.bins
        self.bin_names = [f"{first}-{last - 1}" for first, last in zip(starts, self.bins)] + [
            f"{starts[-1]}+"]
        self._sums: Dict[str, Dict[str, torch.Tensor]] = {}
        self._counts: Dict[str, torch.Tensor] = {}

    def record(self, source: str, valid: torch.Tensor, entropy_S: torch.Tensor,
               entropy_T: Optional[torch.Tensor], divergence: Optional[torch.Tensor]) -> None:
        """Adds one micro-batch.

        Args:
            source: the prepared batch's ``source`` (``'data'``, ``'student'``,
                ``'teacher'``).
            valid: (B, L) bool, the valid targets (a host tensor: the counts read it).
            entropy_S, entropy_T, divergence: (B·L,) per-token values on the device
                (:func:`token_statistics`); invalid rows are ignored, whatever they hold.
        """
        kind = BATCH_KINDS.get(source, source)
        valid = valid.detach().to("cpu", torch.bool)
        position = valid.long().cumsum(-1) - 1  # index among the row's targets
        bin_of = torch.bucketize(position, self._edges, right=True).reshape(-1)
        flat = valid.reshape(-1)
        counts = torch.bincount(bin_of[flat], minlength=len(self.bin_names))
        self._counts[kind] = counts + self._counts.get(kind, 0)
        device = entropy_S.device
        mask = flat.to(device, non_blocking=True)
        sums = self._sums.setdefault(kind, {})

        def add(name: str, values: torch.Tensor) -> None:
            total = values.float().masked_fill(~mask, 0.0).sum()
            sums[name] = total + sums[name] if name in sums else total
        add("student_entropy", entropy_S)
        if entropy_T is not None:
            add("teacher_entropy", entropy_T)
        if divergence is not None:
            add("divergence", divergence)
            by_bin = torch.zeros(len(self.bin_names), device=device).scatter_add_(
                0, bin_of.to(device, non_blocking=True),
                divergence.float().masked_fill(~mask, 0.0))
            sums["by_position"] = by_bin + sums["by_position"] if "by_position" in sums \
                else by_bin

    def values(self) -> Dict[str, torch.Tensor]:
        """The step's means as 0-dim tensors (``telemetry/...``), then starts afresh."""
        values: Dict[str, torch.Tensor] = {}
        for kind, sums in self._sums.items():
            counts = self._counts[kind]
            tokens = int(counts.sum())
            if tokens == 0:
                continue
            prefix = f"telemetry/{kind}/"
            for name in ("student_entropy", "teacher_entropy", "divergence"):
                if name in sums:
                    values[prefix + name] = sums[name] / tokens
            if "by_position" in sums:
                for index, name in enumerate(self.bin_names):
                    if int(counts[index]) > 0:
                        values[f"{prefix}divergence_by_position/{name}"] = \
                            sums["by_position"][index] / int(counts[index])
        self._sums, self._counts = {}, {}
        return values

    def reset(self) -> None:
        self._sums, self._counts = {}, {}


# ------------------------------------------------------------ the rows token_statistics reads
def logit_row_slices(logits: torch.Tensor) -> Callable[[slice], torch.Tensor]:
    """Row slices of (B, L, V) logits, flattened to (B·L, V), without gradient."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    return lambda rows: flat[rows]


def head_row_slices(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
                    ) -> Callable[[slice], torch.Tensor]:
    """Row slices of the logits ``hidden @ weight.T + bias`` from (B, L, H) hidden states,
    computed per slice (the fused path never holds them all)."""
    flat = hidden.detach().reshape(-1, hidden.shape[-1])
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    return lambda rows: torch.nn.functional.linear(flat[rows], weight, bias)


def topk_row_slices(teacher: TopKTeacher) -> Callable[[slice], TopKTeacher]:
    """Row slices of a (B, L, k) top-k teacher, flattened to (B·L, k)."""
    ids, logprobs = (part.reshape(-1, part.shape[-1]) for part in teacher)
    return lambda rows: TopKTeacher(ids[rows], logprobs[rows])

