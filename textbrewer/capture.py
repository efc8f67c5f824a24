"""Feature capture by module name: forward hooks instead of adaptors or model edits.

``ModuleCapture(model, ['layer3', 'encoder.layer.3.output'])`` keeps, while active, what
each named submodule returned (or received) on the last forward pass. Intermediate
matches name modules this way (``module_T`` / ``module_S``), so any ``nn.Module`` can be
distilled without an adaptor returning its features.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

__all__ = ["ModuleCapture", "first_tensor", "CAPTURE_CHOICES"]

CAPTURE_CHOICES = ("output", "input")


def first_tensor(value: Any) -> torch.Tensor:
    """The tensor a module's output stands for: itself, the first element of a tuple or
    list, or the first value of a mapping (a ``transformers`` ``ModelOutput``: its
    ``last_hidden_state`` / ``logits``).

    Raises:
        TypeError: no tensor inside.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        values = [v for v in value.values() if v is not None]
        if values:
            return first_tensor(values[0])
    elif isinstance(value, (tuple, list)) and value:
        return first_tensor(value[0])
    raise TypeError(f"no tensor in a captured {type(value).__name__}")


def _summary(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(value)[:8]}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {[type(v).__name__ for v in value][:8]}"
    return f"a {type(value).__name__}"


class ModuleCapture:
    """Forward hooks on named submodules of ``model``, recording their outputs (or inputs).

    Args:
        model: the model whose submodules are named (names as in ``model.named_modules()``).
        names: the submodules to capture, e.g. ``['layer3', 'encoder.layer.3.output']``.
        what: ``'output'`` (default) or ``'input'`` (the first positional input).
        role: ``'teacher'`` or ``'student'``, for messages.

    Raises:
        ValueError: a name that is not a submodule of ``model``; the message lists the
            closest names.

    Example:
        >>> capture = ModuleCapture(model, ['layer3'])
        >>> with capture:
        ...     model(x)
        >>> capture['layer3'].shape      # the tensor layer3 returned
    """

    def __init__(self, model: nn.Module, names: Sequence[str], what: str = "output",
                 role: str = "model"):
        if what not in CAPTURE_CHOICES:
            raise ValueError(f"what must be one of {list(CAPTURE_CHOICES)}, got {what!r}")
        if isinstance(names, str) or not all(isinstance(name, str) for name in names):
            raise TypeError(f"names must be a list of submodule names, e.g. "
                            f"[{names if isinstance(names, str) else 'layer3'!r}], got "
                            f"{type(names).__name__} {names!r}")
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules:
                valid = [n for n in modules if n]
                close = difflib.get_close_matches(name, valid, n=5, cutoff=0.4)
                hint = f"; closest: {close}" if close else ""
                raise ValueError(f"the {role} ({type(model).__name__}) has no submodule {name!r}"
                                 f"{hint}; its submodules include {valid[:12]}"
                                 f"{' ...' if len(valid) > 12 else ''}")
        self.names: List[str] = list(dict.fromkeys(names))
        self.what = what
        self.role = role
        self._modules = {name: modules[name] for name in self.names}
        self._values: Dict[str, Any] = {}
        self._handles: List[Any] = []
        self._active = False

    def attach(self) -> None:
        """Registers the hooks (idempotent)."""
        if self._handles:
            return
        for name, module in self._modules.items():
            if self.what == "output":
                hook = module.register_forward_hook(self._record_output(name))
            else:
                hook = module.register_forward_pre_hook(self._record_input(name))
            self._handles.append(hook)

    def remove(self) -> None:
        """Removes the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._values.clear()

    def _record_output(self, name: str):
        def hook(module, inputs, output):
            if self._active:
                self._values[name] = output
        return hook

    def _record_input(self, name: str):
        def hook(module, inputs):
            if self._active:
                self._values[name] = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
        return hook

    def __enter__(self) -> "ModuleCapture":
        self.attach()
        self._values.clear()
        self._active = True
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self._active = False

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor captured for ``name`` on the last forward pass.

        Raises:
            KeyError: ``name`` was not captured (not a captured name, or its module did
                not run in the forward pass).
        """
        if name not in self._values:
            raise KeyError(f"the {self.role}'s module {name!r} did not run during the forward "
                           f"pass (captured: {sorted(self._values)})" if name in self._modules
                           else f"{name!r} is not captured (captured names: {self.names})")
        try:
            return first_tensor(self._values[name])
        except TypeError:
            raise TypeError(f"the {self.role}'s module {name!r} "
                            f"({type(self._modules[name]).__name__}) gave no tensor as its "
                            f"{self.what} (it was {_summary(self._values[name])}); match "
                            f"another module, or the other of capture='output' / 'input'"
                            ) from None
