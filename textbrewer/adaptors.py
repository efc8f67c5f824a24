"""The adaptor contract.

An adaptor is ``adaptor(batch, model_outputs) -> dict`` that tells the distiller where
things are in a model's outputs. Keys (``ADAPTOR_KEYS``):

- ``logits``: (B, C) or (B, L, C) tensor, or a list of them (one per head).
- ``logits_mask``: (B, L) masks selecting positions of 3-D logits, one per head or one for all.
- ``labels``: (B,) or (B, L) gold labels, one per head (for ``probability_shift``).
- ``losses``: scalar (or per-example) losses of the student; each is averaged, then summed.
- ``inputs_mask``: (B, L) 1 for real tokens; passed to intermediate-match losses.
- ``hidden``: list of (B, L, D) hidden states, one per layer.
- ``attention``: list of (B, H, L, L) or (B, L, L) attention scores, one per layer.
"""
import difflib
import logging
from typing import Any, Dict, Mapping, Set, Tuple

import torch

from .presets import ADAPTOR_KEYS

__all__ = ["normalize_adaptor_output", "AdaptorError"]

_LISTED_KEYS = ("logits", "logits_mask", "losses", "labels")
_TENSOR_KEYS = ("logits", "logits_mask", "labels", "inputs_mask")
_logger = logging.getLogger("textbrewer")
_warned_unknown: Set[Tuple[str, str]] = set()


class AdaptorError(ValueError):
    """An adaptor returned something the distiller cannot use."""


def _warn_unknown_keys(output: Mapping, role: str) -> None:
    for key in output:
        if key in ADAPTOR_KEYS or (role, str(key)) in _warned_unknown:
            continue
        _warned_unknown.add((role, str(key)))
        close = difflib.get_close_matches(str(key), ADAPTOR_KEYS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        # TextBrewer 0.2.1 ignored such keys and a published example returns the typo
        # 'input_mask': warn once and go on rather than stop a working script.
        _logger.warning("%s returned the unknown key %r%s; the built-in losses ignore it. "
                        "Valid keys: %s",
                        role, key, hint, list(ADAPTOR_KEYS))


def _check_tensors(key: str, value: Any, role: str) -> None:
    items = value if isinstance(value, (list, tuple)) else [value]
    for index, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            where = f"{key!r}" + (f"[{index}]" if isinstance(value, (list, tuple)) else "")
            raise AdaptorError(f"{role} returned {where} as {type(item).__module__}."
                               f"{type(item).__name__}; expected a torch.Tensor (or a list of "
                               f"them), e.g. torch.as_tensor(...) on the training device")


def normalize_adaptor_output(output: Any, role: str) -> Dict[str, Any]:
    """Checks an adaptor's output and puts it in canonical form.

    ``logits``, ``logits_mask``, ``losses`` and ``labels`` become lists; ``hidden`` and
    ``attention`` stay as given (a list per layer, or a stacked tensor indexed by layer).
    Keys outside ``ADAPTOR_KEYS`` are kept (a subclass's ``compute_loss`` may use them, as in
    0.2.1) but ignored by the built-in losses, with a warning (once per key and role).

    Args:
        output: what the adaptor returned.
        role: who returned it, for messages (e.g. ``"the student's adaptor"``).

    Raises:
        AdaptorError: ``output`` is not a dict, or ``logits``/masks/labels are not tensors.
    """
    if not isinstance(output, Mapping):
        raise AdaptorError(f"{role} must return a dict with keys from {list(ADAPTOR_KEYS)}, "
                           f"got {type(output).__name__}")
    if any(key not in ADAPTOR_KEYS for key in output):
        # kept in the result: 0.2.1 passed them on, and a subclass's compute_loss may read them
        _warn_unknown_keys(output, role)
    # e.g. 'losses': outputs.loss, which transformers sets to None on a batch without labels
    result = {key: value for key, value in output.items()
              if not (key in _LISTED_KEYS and value is None)}
    for key in _TENSOR_KEYS:
        if result.get(key) is not None:
            _check_tensors(key, result[key], role)
    for key in _LISTED_KEYS:
        if key in result and not isinstance(result[key], (list, tuple)):
            result[key] = [result[key]]
    return result
