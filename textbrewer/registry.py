"""Name -> callable registries for losses, projections and schedules.

Every place that asks for a loss, a projection or a schedule takes a string name that is
looked up here. A registry is also a ``MutableMapping``, so TextBrewer 0.2.1's maps
(``KD_LOSS_MAP['ce']``, ``MATCH_LOSS_MAP['my_loss'] = fn``) are the registries themselves.

Some entries are *builders* that need parameters: the temperature scheduler ``'flsw'`` is
written ``['flsw', beta, gamma]`` and :meth:`Registry.resolve` calls the builder with them.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import warnings
from collections.abc import MutableMapping
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

__all__ = ["Registry", "RegistryError"]

Spec = Union[str, Sequence[Any]]


class RegistryError(KeyError, ValueError):
    """An unknown name, or a name used without the parameters it needs.

    Subclasses both ``KeyError`` (what TextBrewer's dict-maps raised) and ``ValueError``
    (what a bad argument raises), so either ``except`` clause catches it.
    """

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class Registry(MutableMapping):
    """A named collection of callables of one kind (e.g. ``'kd_loss'``).

    Args:
        kind: what the entries are, used in error messages ("unknown kd_loss 'cee'").
        filled_by: the module whose import registers the built-in entries; it is imported
            the first time the registry is read, so that a module can check names against
            a registry (the configurations do) without importing every loss itself.

    Example:
        >>> losses = Registry('kd_loss')
        >>> @losses.register('double')
        ... def double(x):
        ...     return 2 * x
        >>> losses.resolve('double')(3)
        6
    """

    def __init__(self, kind: str, filled_by: Optional[str] = None):
        self.kind = kind
        self._table: Dict[str, Callable] = {}
        self._builders: set = set()
        self._filled_by = filled_by

    @property
    def _entries(self) -> Dict[str, Callable]:
        if self._filled_by is not None:
            module, self._filled_by = self._filled_by, None
            importlib.import_module(module)  # its registrations come back here
        return self._table

    # registration ---------------------------------------------------------------------
    def register(self, name: Optional[str] = None, *, builder: bool = False,
                 overwrite: bool = False) -> Callable[[Callable], Callable]:
        """Decorator that registers a function under ``name`` (default: its ``__name__``).

        Args:
            name: the key users write in configs.
            builder: the entry takes parameters and returns the real callable
                (written ``[name, *params]`` in configs).
            overwrite: replace an existing entry silently; otherwise a duplicate name warns.
        """

        def decorator(func: Callable) -> Callable:
            self.add(name or func.__name__, func, builder=builder, overwrite=overwrite)
            return func

        return decorator

    def add(self, name: str, func: Callable, *, builder: bool = False,
            overwrite: bool = False) -> None:
        """Registers ``func`` under ``name``; see :meth:`register`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if not callable(func):
            raise TypeError(f"{self.kind} {name!r}: the registered object must be callable, "
                            f"got {type(func).__name__}")
        if name in self._entries and not overwrite and self._entries[name] is not func:
            warnings.warn(f"{self.kind} {name!r} is already registered; replacing it",
                          stacklevel=3)
        self._entries[name] = func
        if builder:
            self._builders.add(name)
        else:
            self._builders.discard(name)

    def is_builder(self, name: str) -> bool:
        """Whether ``name`` needs parameters (``[name, *params]``)."""
        return name in self._entries and name in self._builders

    # lookup ---------------------------------------------------------------------------
    def names(self) -> List[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def _unknown(self, name: Any) -> RegistryError:
        valid = self.names()
        message = f"unknown {self.kind} {name!r}; valid choices: {valid}"
        if isinstance(name, str):
            close = difflib.get_close_matches(name, valid, n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        return RegistryError(message)

    def __getitem__(self, name: Spec) -> Callable:
        if isinstance(name, (list, tuple)):  # TextBrewer 0.2.1: MAP[['flsw', 1, 2]] builds
            return self.resolve(name)
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self._unknown(name) from None

    def __setitem__(self, name: str, func: Callable) -> None:
        self.add(name, func, overwrite=True)

    def __delitem__(self, name: str) -> None:
        if name not in self._entries:
            raise self._unknown(name)
        del self._entries[name]
        self._builders.discard(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, (list, tuple)):
            return bool(name) and isinstance(name[0], str) and name[0] in self._entries
        return isinstance(name, str) and name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

    def validate(self, spec: Spec) -> None:
        """Raises :class:`RegistryError` if ``spec`` would not resolve.

        ``spec`` is a name, or ``[name, *params]`` for a builder.
        """
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise RegistryError(f"empty {self.kind} specification []")
            name, params = spec[0], spec[1:]
        else:
            name, params = spec, ()
        if name not in self:
            raise self._unknown(name)
        if self.is_builder(name) and not params:
            raise RegistryError(f"{self.kind} {name!r} takes parameters: write it as "
                                f"[{name!r}, param, ...]")
        if self.is_builder(name):
            self._check_parameters(name, params)

    def usage(self, name: str) -> str:
        """How a builder is written in a config, e.g. ``['flsw', beta, gamma]`` (its
        parameters without defaults; ``[name, param, ...]`` when they cannot be read)."""
        try:
            parameters = inspect.signature(self._entries[name]).parameters.values()
        except (TypeError, ValueError):
            return f"[{name!r}, param, ...]"
        required = [p.name for p in parameters if p.default is p.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return "[" + ", ".join([repr(name)] + required) + "]"

    def _check_parameters(self, name: str, params: Sequence[Any]) -> None:
        """Raises :class:`RegistryError` when the builder cannot take ``params``."""
        try:
            signature = inspect.signature(self._entries[name])
        except (TypeError, ValueError):
            return
        try:
            if len(params) == 1 and isinstance(params[0], dict):
                signature.bind(**params[0])
            else:
                signature.bind(*params)
        except TypeError as error:
            shown = ", ".join(str(p.replace(annotation=p.empty))
                              for p in signature.parameters.values())
            raise RegistryError(f"{self.kind} {name!r} is written {self.usage(name)} (its "
                                f"parameters: {shown}); got {[name, *params]!r}: "
                                f"{error}") from None

    def resolve(self, spec: Spec) -> Callable:
        """The callable for ``spec``: a name, or ``[name, *params]``.

        ``[name, *params]`` calls the entry with the parameters and returns the result,
        as TextBrewer 0.2.1 did for any entry (``[name, {'beta': 1}]`` passes keyword
        arguments); a builder named without parameters is an error.
        """
        self.validate(spec)
        if isinstance(spec, (list, tuple)):
            params = spec[1:]
            if len(params) == 1 and isinstance(params[0], dict):
                return self._entries[spec[0]](**params[0])
            return self._entries[spec[0]](*params)
        return self._entries[spec]


#: KD losses on logits: ``fn(logits_S, logits_T, temperature) -> scalar``.
KD_LOSSES = Registry("kd_loss", filled_by="textbrewer.losses")
#: Intermediate-match losses: ``fn(feature_S, feature_T, mask=None) -> scalar``.
MATCH_LOSSES = Registry("match loss", filled_by="textbrewer.losses")
#: Projections: ``builder(dim_in, dim_out) -> nn.Module`` mapping student width to teacher width.
PROJECTIONS = Registry("projection", filled_by="textbrewer.projections")
#: Weight schedules: ``fn(progress in [0, 1]) -> weight``.
WEIGHT_SCHEDULERS = Registry("weight scheduler", filled_by="textbrewer.schedulers")
#: Temperature schedules: ``fn(logits_S, logits_T, base_temperature) -> float or (N,) tensor``.
TEMPERATURE_SCHEDULERS = Registry("temperature scheduler",
                                  filled_by="textbrewer.schedulers")
#: Token-level LM divergences: ``fn(logits_S, logits_T, mask=None, **options) -> scalar``
#: (see :mod:`textbrewer.losses.token`).
TOKEN_LOSSES = Registry("token loss", filled_by="textbrewer.losses")
#: Losses that own trainable weights (regressors, embedding heads, negative queues):
#: ``cls(**options) -> nn.Module`` whose ``forward(feature_S, feature_T, mask=None)`` is a scalar.
LOSS_MODULES = Registry("loss module", filled_by="textbrewer.losses")
