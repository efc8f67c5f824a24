"""The models' side of the LM distillers: finding logits in an output, calling a model
with a clear error, and the output-head swap of the fused path (the hidden states a head
receives, without the [tokens, vocab] logits it would compute)."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...training.batches import forward_model

__all__ = ["output_head", "vocab_size", "logits_of", "call_model", "first_rows", "head_skipped",
           "head_bias", "check_fused_head", "hidden_before_head"]


def output_head(model: Any, given: Optional[nn.Module]) -> Optional[nn.Module]:
    """The module that maps final hidden states to logits: ``given``, else the model's
    ``get_output_embeddings()`` when it is a Linear-like module (a 2-D ``weight``)."""
    if given is not None:
        return given
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    weight = getattr(head, "weight", None)
    return head if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def vocab_size(model: Any, head: Optional[nn.Module]) -> Optional[int]:
    """Rows of the output embedding, else ``model.config.vocab_size``, else None."""
    if head is not None:
        return int(head.weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def logits_of(outputs: Any, role: str) -> torch.Tensor:
    """(B, L, V) logits from a model's output: a tensor, ``.logits``, ``['logits']`` or
    the first element of a tuple."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if hasattr(outputs, "logits") and isinstance(outputs.logits, torch.Tensor):
        return outputs.logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ValueError(f"cannot find logits in the {role}'s output ({type(outputs).__name__}); "
                     f"return a tensor, an object with .logits or a dict with 'logits', or "
                     f"pass an adaptor returning {{'logits': (B, L, V)}}")


def call_model(forward: Callable, inputs: Dict[str, Any], args: Dict[str, Any],
                role: str) -> Any:
    """``forward(**inputs, **args)``; a keyword the model does not take is an error that says
    where the keywords come from."""
    try:
        return forward_model(forward, inputs, args)
    except TypeError as error:
        if "keyword argument" not in str(error):
            raise
        raise TypeError(f"the {role} was called as model(**batch, **train_kwargs) with the batch "
                        f"keys {sorted(inputs)} and train() keyword arguments {sorted(args)}: "
                        f"{error}. Every batch key but 'labels', 'example_index' and "
                        f"LMDistillationConfig.cache_key goes to the model: drop the others in "
                        f"the collate function or a batch_postprocessor") from error


def first_rows(batch: Dict[str, Any], size: int, rows: int) -> Dict[str, Any]:
    """The first ``rows`` examples of a dict batch (tensors whose first dim is ``size``)."""
    return {key: value[:rows] if isinstance(value, torch.Tensor) and value.dim() >= 1
            and value.shape[0] == size else value for key, value in batch.items()}


@contextlib.contextmanager
def head_skipped(model: nn.Module, head: nn.Module, captured: List[torch.Tensor]):
    """Runs ``model`` with its output head replaced by a capture of the head's input.

    The head returns an empty (..., 0) tensor instead of logits, so the forward pass never
    computes the [tokens, vocab] logits; ``captured`` receives the hidden states the head
    was given. A ``final_logits_bias`` buffer (BART and its family add it after the head)
    is emptied for the call too, so that the addition stays (..., 0).
    """
    had_forward = "forward" in head.__dict__
    previous = head.__dict__.get("forward")

    def capture(hidden, *args, **kwargs):
        captured.append(hidden)
        return hidden.new_empty(*hidden.shape[:-1], 0)

    head.forward = capture
    bias = model._buffers.get("final_logits_bias") if isinstance(model, nn.Module) else None
    if bias is not None:
        model._buffers["final_logits_bias"] = bias[..., :0]
    try:
        yield captured
    finally:
        if had_forward:
            head.forward = previous
        else:
            del head.forward
        if bias is not None:
            model._buffers["final_logits_bias"] = bias


def head_bias(model: nn.Module, head: nn.Module) -> Optional[torch.Tensor]:
    """The head's bias plus a ``final_logits_bias`` buffer (BART), or None."""
    bias = getattr(head, "bias", None)
    extra = model._buffers.get("final_logits_bias") if isinstance(model, nn.Module) else None
    if extra is not None:
        extra = extra.reshape(-1)
        bias = extra if bias is None else bias + extra
    return bias


def check_fused_head(model: nn.Module, head: nn.Module, inputs: Dict[str, Any],
                     args: Dict[str, Any], role: str, device: torch.device) -> None:
    """Checks on one example that the model's logits are ``head(hidden) + bias``.

    Raises:
        ValueError: the head is called more than once per forward, or the model changes
            its logits after the head (soft-capping, a logit scale, an extra bias).
    """
    size = inputs["input_ids"].shape[0]
    captured: List[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, inp: captured.append(inp[0]))
    devices = [device] if device.type == "cuda" else []
    try:
        # its own random numbers (dropout), so checking does not change the training
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            logits = logits_of(call_model(model, first_rows(inputs, size, 1), args, role), role)
            if len(captured) != 1:
                raise ValueError(_called_times(role, head, len(captured)))
            rebuilt = F.linear(captured[0], head.weight, head_bias(model, head))
    finally:
        handle.remove()
    logits, rebuilt = logits.float(), rebuilt.float()
    scale = max(1.0, float(logits.abs().max())) if logits.numel() else 1.0
    tolerance = 1e-4 if logits.dtype == torch.float32 and rebuilt.dtype == torch.float32 \
        else 2e-2
    difference = float((logits - rebuilt).abs().max()) if logits.numel() else 0.0
    if logits.shape != rebuilt.shape or difference > tolerance * scale:
        raise ValueError(f"path='fused': the {role}'s logits are not its output head "
                         f"applied to the head's input (shapes {tuple(logits.shape)} and "
                         f"{tuple(rebuilt.shape)}, largest difference {difference:.3g}): "
                         f"the model transforms its logits after the head (soft-capping, "
                         f"a logit scale, an extra bias), which the fused path cannot "
                         f"see. Use path='chunked'")


def hidden_before_head(model: nn.Module, forward: Callable, head: nn.Module,
                       inputs: Dict[str, Any], args: Dict[str, Any], role: str) -> torch.Tensor:
    """The (B, L, H) hidden states ``head`` receives in ``forward``'s pass over ``inputs``,
    without running the head (``forward`` is ``model`` or its DDP / compile wrapper)."""
    captured: List[torch.Tensor] = []
    with head_skipped(model, head, captured):
        call_model(forward, inputs, args, role)
    if len(captured) != 1:
        raise ValueError(_called_times(role, head, len(captured)))
    return captured[0]


def _called_times(role: str, head: nn.Module, times: int) -> str:
    return (f"path='fused': the {role}'s output head ({type(head).__name__}) was called "
            f"{times} times in one forward pass, expected once; use path='chunked'")
