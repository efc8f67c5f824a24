"""Small helpers with no better home: parameter tables, seeding."""
from __future__ import annotations

import random
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["display_parameters", "ParameterNode", "count_parameters", "seed_everything"]


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
