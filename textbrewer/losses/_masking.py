"""Small mask helpers shared by the loss modules."""
from typing import Optional

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
