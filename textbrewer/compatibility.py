"""TextBrewer 0.2.1's ``textbrewer.compatibility`` module: ``mask_dtype`` and
``is_apex_available``, for scripts and subclasses that import them."""
import importlib.util

import torch

__all__ = ["mask_dtype", "is_apex_available"]

#: The dtype of boolean masks (``torch.bool``; 0.2.1 used uint8 on torch < 1.2).
mask_dtype = torch.bool


def is_apex_available() -> bool:
    """Whether NVIDIA apex can be imported (this library never needs it: fp16 uses torch.amp)."""
    return importlib.util.find_spec("apex") is not None
