"""Small helpers with no better home: parameter tables, seeding."""
from __future__ import annotations

import random
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar, Union

import numpy as np
import torch

from .projections import initializer_builder

__all__ = ["display_parameters", "ParameterNode", "count_parameters", "seed_everything",
           # TextBrewer 0.2.1
           "cycle", "initializer_builder", "LayerNode"]


class ParameterNode:
    """A node of the module tree with its total element count and memory (MB).

    Attributes:
        name: this level's name ('model' at the root).
        fullname: dotted path from the root.
        children: child nodes by name, in state-dict order.
        value: ``[number of elements, megabytes]`` summed over the subtree.
    """

    def __init__(self, name: str, fullname: str):
        self.name = name
        self.fullname = fullname
        self.children: Dict[str, "ParameterNode"] = {}
        self.value = [0, 0.0]

    def __getitem__(self, key: str) -> "ParameterNode":
        return self.children[key]

    def __contains__(self, key: str) -> bool:
        return key in self.children

    def walk(self, level: int = 0, max_level: Optional[int] = None
             ) -> Iterator[Tuple[int, "ParameterNode"]]:
        """(level, node) pairs, depth first, down to ``max_level``."""
        yield level, self
        if max_level is None or level < max_level:
            for child in self.children.values():
                yield from child.walk(level + 1, max_level)

    def format(self, max_level: Optional[int] = None) -> str:
        """The table: name (indented by depth), #params, share of the total, memory (MB)."""
        rows = list(self.walk(max_level=max_level))
        width = max(len("--" + "  " * level + node.name) + 1 for level, node in rows)
        total = max(self.value[0], 1)
        lines = ["", f"{'LAYER NAME':<{width}}\t{'#PARAMS':>15}\t{'RATIO':>10}\t{'MEM(MB)':>8}"]
        for level, node in rows:
            label = "  " * level + "--" + node.name + ":"
            lines.append(f"{label:<{width}}\t{node.value[0]:15,d}\t"
                         f"{node.value[0] / total:>10.2%}\t{node.value[1]:>8.2f}")
        return "\n".join(lines) + "\n"


def display_parameters(model: Union[torch.nn.Module, Dict[str, torch.Tensor]],
                       max_level: Optional[int] = None) -> Tuple[str, ParameterNode]:
    """Numbers of parameters (and buffers) and their memory, per module, as a table.

    Tensors shared between entries (tied weights) are counted once.

    Args:
        model: a module, or a state dict.
        max_level: deepest level shown (None: all).

    Returns:
        ``(table, root)``: the formatted table and the tree of :class:`ParameterNode`.
    """
    if isinstance(model, torch.nn.Module):
        state_dict = model.state_dict()
    elif isinstance(model, dict):
        state_dict = model
    else:
        raise TypeError(f"model must be a torch.nn.Module or a state dict, got "
                        f"{type(model).__name__}")
    root = ParameterNode("model", "model")
    seen = set()
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        identity = (tensor.data_ptr(), tensor.numel(), tensor.dtype) if tensor.numel() else None
        if identity is not None and identity in seen:
            continue
        seen.add(identity)
        count, megabytes = tensor.numel(), tensor.numel() * tensor.element_size() / 2 ** 20
        path: List[ParameterNode] = [root]
        names = key.split(".")
        for depth, name in enumerate(names):
            node = path[-1]
            if name not in node.children:
                node.children[name] = ParameterNode(name, ".".join(names[:depth + 1]))
            path.append(node.children[name])
        for node in path:
            node.value[0] += count
            node.value[1] += megabytes
    return root.format(max_level), root


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (each shared tensor once)."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if (trainable_only and not parameter.requires_grad) or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    return total


def seed_everything(seed: int) -> None:
    """Seeds Python's ``random``, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- TextBrewer 0.2.1 names
# initializer_builder (imported above from .projections) is re-exported here, where 0.2.1
# defined it.

_T = TypeVar("_T")


def cycle(iterable: Iterable[_T]) -> Iterator[_T]:
    """Yields the items of ``iterable`` forever, iterating it afresh on every pass.

    Unlike ``itertools.cycle`` nothing is cached: each pass calls ``iter(iterable)`` again,
    so a shuffling ``DataLoader`` reshuffles (and draws random numbers) at each pass, as in
    TextBrewer 0.2.1.

    Args:
        iterable: something that can be iterated more than once (a list, a DataLoader).

    Returns:
        An endless iterator over the items.

    Raises:
        ValueError: a pass yields nothing (an empty iterable, or a one-shot iterator
            already used up), where 0.2.1 looped forever without yielding.

    Example:
        >>> from itertools import islice
        >>> list(islice(cycle([1, 2, 3]), 7))
        [1, 2, 3, 1, 2, 3, 1]
    """
    while True:
        empty = True
        for item in iterable:
            empty = False
            yield item
        if empty:
            raise ValueError("cycle(): the iterable yielded no items on a pass (is it empty, "
                             "or an iterator that can only be read once?)")


class LayerNode:
    """A node of a module tree whose ``value`` sums its leaves, as TextBrewer 0.2.1 had it.

    TextBrewer 0.2.1's ``display_parameters`` built these, one per dotted-name component
    of a state dict, with ``value = [number of elements, megabytes]``. Today's
    :func:`display_parameters` builds :class:`ParameterNode` instead; this class is kept
    for code that builds or formats such trees itself, and :meth:`format` prints the same
    table 0.2.1 printed for the same tree.

    Attributes:
        name: this level's name.
        parent: the parent node (None at the root).
        value: this node's value (``[count, megabytes]`` in the parameter table), or None.
        fullname: dotted path from the root, if given.
        children_name: child nodes by name, in insertion order.

    Note:
        0.2.1 ignored the ``value`` argument of the constructor (every node started with
        ``None``); it is kept here.

    Example:
        >>> root = LayerNode('model', fullname='model')
        >>> root['fc'] = LayerNode('fc', parent=root, fullname='fc')
        >>> root['fc']['weight'] = LayerNode('weight', parent=root['fc'], fullname='fc.weight')
        >>> root['fc']['weight'].value = [6, 0.5]
        >>> root['fc']['weight'].update([6, 0.5])
        >>> root.value, root['fc'].value
        ([6, 0.5], [6, 0.5])
    """

    def __init__(self, name: str, parent: Optional["LayerNode"] = None, value: Any = None,
                 fullname: Optional[str] = None):
        self.name = name
        self.fullname = fullname
        self.value = value
        self.children_name: Dict[str, "LayerNode"] = {}
        self.parent = parent

    def __contains__(self, key: str) -> bool:
        return key in self.children_name

    def __getitem__(self, key: str) -> "LayerNode":
        return self.children_name[key]

    def __setitem__(self, key: str, value: "LayerNode") -> None:
        self.children_name[key] = value

    def update(self, value: Any) -> None:
        """Adds ``value`` to every ancestor's value (this node's own value is left alone).

        An ancestor whose value is None takes ``value`` itself; a list or tuple is added
        element-wise into a new list (as long as ``value``); anything else with ``+=``.

        Args:
            value: what to add, e.g. ``[count, megabytes]``.
        """
        node = self.parent
        while node is not None:
            if node.value is None:
                node.value = value
            elif isinstance(value, (tuple, list)):
                node.value = [node.value[i] + value[i] for i in range(len(value))]
            else:
                node.value += value
            node = node.parent

    def format(self, level: int = 0, total: Optional[int] = None, indent: str = "--",
               max_level: Optional[int] = None, max_length: Optional[int] = None) -> str:
        """The parameter table of this subtree, as TextBrewer 0.2.1 printed it.

        One row per node, depth first: the name indented two spaces per level after
        ``indent``, its count, its share of ``total`` and its memory in MB. A node with
        exactly one child (above ``max_level``) is printed as its bare name, without
        numbers. Values must be ``[int count, float megabytes]``.

        Args:
            level: depth of this node (0 starts a table: a blank line and the header).
            total: the count that ratios are relative to (default: this node's count).
            indent: prefix of this node's name.
            max_level: deepest level printed (None: all).
            max_length: width of the name column (computed at level 0).

        Returns:
            The table, one ``\\n``-terminated line per row.
        """
        if total is None:
            total = self.value[0]
        if level == 0 or max_length is None:
            max_length = self._max_name_length(indent, "  ", max_level=max_level) + 1
        lines = []
        if level == 0:
            lines.append("\n")
            lines.append(f"{'LAYER NAME':<{max_length}}\t{'#PARAMS':>15}\t{'RATIO':>10}\t"
                         f"{'MEM(MB)':>8}\n")
        deepest = max_level is not None and level == max_level
        if not deepest and len(self.children_name) == 1:
            lines.append(f"{indent + self.name:<{max_length}}\n")
        else:
            lines.append(f"{indent + self.name + ':':<{max_length}}\t{self.value[0]:15,d}\t"
                         f"{self.value[0] / total:>10.2%}\t{self.value[1]:>8.2f}\n")
        if not deepest:
            for child in self.children_name.values():
                lines.append(child.format(level + 1, total, indent="  " + indent,
                                          max_level=max_level, max_length=max_length))
        return "".join(lines)

    def _max_name_length(self, indent1: str = "--", indent2: str = "  ", level: int = 0,
                         max_level: Optional[int] = None) -> int:
        """Longest indented name in the subtree, down to ``max_level``."""
        longest = len(self.name) + len(indent1) + level * len(indent2)
        if max_level is None or level < max_level:
            for child in self.children_name.values():
                longest = max(longest, child._max_name_length(indent1, indent2, level + 1,
                                                              max_level))
        return longest
