"""Small mask helpers shared by the loss modules."""
from typing import Callable, Optional, Sequence, Union

import torch


def as_weights(mask: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """The mask as 0/1 weights of ``like``'s dtype and device, or None."""
    if mask is None:
        return None
    return mask.to(device=like.device, dtype=like.dtype)


def safe_divide(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count`` with the count clamped to 1, so an all-masked batch gives 0, not NaN.

    No Python branch on a tensor value: this keeps the step free of host syncs.
    """
    return total / count.clamp(min=1)


def rescaled(value: torch.Tensor, width: int, count: torch.Tensor) -> torch.Tensor:
    """``value · width / count``: a mean over ``width`` entries made a mean over ``count``.

    Where ``count == width`` (nothing masked) the factor is exactly 1.0 and the result is
    ``value`` bit for bit, so a loss keeps its arithmetic on unmasked inputs without a host
    sync to find out whether anything is masked. Computed in at least fp32 and cast back
    (a bf16 factor such as 6/5 would be off by 0.3%); ``count`` is clamped to 1.

    Args:
        value: a mean over ``width`` entries (any shape broadcastable with ``count``).
        width: the number of entries the mean was taken over.
        count: how many of them are kept (an integer or float tensor).
    """
    wide = torch.promote_types(value.dtype, torch.float32)
    kept = count.to(device=value.device, dtype=wide).clamp(min=1)
    factor = torch.full_like(kept, float(width)) / kept  # n / n is exactly 1.0
    return (value.to(wide) * factor).to(value.dtype)


#: Whether :func:`plain_first` runs a loss's plain formula first on the CPU (tests turn it
#: off to run the guarded formulas on finite inputs, as accelerators do).
PLAIN_FIRST_ON_CPU = True


def plain_first(plain: Callable[[], torch.Tensor], like: torch.Tensor,
                teacher: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``plain()`` if it is finite and the tensors are on the CPU, else None.

    The losses guard their formulas against -inf entries with a few extra element-wise
    passes that change no bit on finite inputs and need no host sync. On an accelerator
    that is the cheap way; on the CPU the passes cost more than the loss itself, while
    reading a value back costs nothing. So there a loss computes its plain formula first,
    through this function, and its guarded one only when this returns None: the plain
    result is not finite (-inf entries make it NaN or inf), or ``teacher`` holds -inf
    (for a formula that -inf in the teacher's input leaves finite but wrong). Either way
    the result is the guarded formula's, bit for bit, on every device.
    """
    if not (PLAIN_FIRST_ON_CPU and like.device.type == "cpu"):
        return None
    if teacher is not None and teacher.numel() and bool(torch.isneginf(teacher.amin())):
        return None  # (one pass: a NaN minimum is not -inf, and then plain() is NaN)
    value = plain()
    return value if bool(torch.isfinite(value)) else None


Features = Union[torch.Tensor, Sequence[torch.Tensor]]

_FEATURE_ADVICE = (
    "features must be finite everywhere, padded positions included (a mask drops them from "
    "the mean, but they still enter the arithmetic, and inf · 0 is NaN): replace them in the "
    "adaptor, e.g. hidden.masked_fill(~mask.bool()[..., None], 0.0). -inf is a masking value "
    "for logits and attention scores, not for hidden states; under fp16 an overflow gives "
    "inf (train in bf16 or fp32)")


def finite_features(loss: torch.Tensor, name: str, student: Features,
                    teacher: Features) -> torch.Tensor:
    """``loss`` unchanged, or a ValueError naming ``name`` when an infinite input made it so.

    Feature losses have no meaning for -inf / inf entries (-inf is a masking value for
    logits and attention scores), so rather than return a NaN that the training loop
    reports later without a reason, this says which side holds what. It reads one bool of
    the scalar loss, which is free on the CPU; on an accelerator that read is a host sync
    per call, so there the loss is returned unchecked and a non-finite one is caught by the
    training loop's check (batched, every ``log_steps``), which names the term. The inputs
    are scanned only when the loss is not finite. NaN inputs (a diverged model) are left to
    the loop's check, which stops every process together; a loss that is not finite
    although its inputs are is returned as it is, too.

    Raises:
        ValueError: the loss is not finite and the student's or teacher's features hold
            -inf or inf.
    """
    if loss.device.type != "cpu" or bool(torch.isfinite(loss)):
        return loss
    for side, features in (("student", student), ("teacher", teacher)):
        tensors = features if isinstance(features, (list, tuple)) else [features]
        for index, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                continue
            counts = {"-inf": int(torch.isneginf(tensor).sum()),
                      "inf": int(torch.isposinf(tensor).sum())}
            kinds = [kind for kind, count in counts.items() if count]
            if kinds:
                which = f"{side}'s features" if len(tensors) == 1 \
                    else f"{side}'s features [{index}]"
                raise ValueError(f"{name}: the {which} contain {' and '.join(kinds)} "
                                 f"({sum(counts.values())} of {tensor.numel()} entries), so "
                                 f"the loss is {float(loss.detach())}; {_FEATURE_ADVICE}")
    return loss
