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
from typing import Any, Dict, Mapping

from .presets import ADAPTOR_KEYS

__all__ = ["normalize_adaptor_output", "AdaptorError"]

_LISTED_KEYS = ("logits", "logits_mask", "losses", "labels")


class AdaptorError(ValueError):
    """An adaptor returned something the distiller cannot use."""


def normalize_adaptor_output(output: Any, role: str) -> Dict[str, Any]:
    """Checks an adaptor's output and puts it in canonical form.

    ``logits``, ``logits_mask``, ``losses`` and ``labels`` become lists; ``hidden`` and
    ``attention`` stay as given (a list per layer, or a stacked tensor indexed by layer).

    Args:
        output: what the adaptor returned.
        role: who returned it, for error messages (e.g. ``"the student's adaptor"``).

    Raises:
        AdaptorError: ``output`` is not a dict, or has keys outside ``ADAPTOR_KEYS``.
    """
    if not isinstance(output, Mapping):
        raise AdaptorError(f"{role} must return a dict with keys from {list(ADAPTOR_KEYS)}, "
                           f"got {type(output).__name__}")
    unknown = [key for key in output if key not in ADAPTOR_KEYS]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), ADAPTOR_KEYS, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise AdaptorError(f"{role} returned unknown keys {', '.join(hints)}; valid keys: "
                           f"{list(ADAPTOR_KEYS)}")
    result = dict(output)
    for key in _LISTED_KEYS:
        if key in result and not isinstance(result[key], (list, tuple)):
            result[key] = [result[key]]
    return result
