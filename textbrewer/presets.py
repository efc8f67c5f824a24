"""TextBrewer 0.2.1's maps and constants, and ready-made intermediate-match presets.

``KD_LOSS_MAP``, ``MATCH_LOSS_MAP``, ``PROJ_MAP``, ``WEIGHT_SCHEDULER`` and
``TEMPERATURE_SCHEDULER`` are the registries themselves: reading, assigning and
:func:`register_new` all go to the one registry that the distillers look names up in.
"""
import collections  # noqa: F401  (0.2.1's presets imported it)
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F  # noqa: F401  (0.2.1's presets exposed it)

from . import losses as _losses  # noqa: F401  (fills the loss registries)
from . import projections as _projections  # noqa: F401
from . import schedulers as _schedulers  # noqa: F401
# TextBrewer 0.2.1's presets star-imported its losses and schedulers and imported the three
# helpers below, so scripts could take all of them from textbrewer.presets.
from .losses import (att_ce_loss, att_ce_mean_loss, att_mse_loss, att_mse_sum_loss,  # noqa: F401
                     cos_loss, fsp_loss, hid_mse_loss, kd_ce_loss, kd_mse_loss, mmd_loss,
                     pkd_loss)
from .projections import linear_projection, projection_with_activation  # noqa: F401
from .registry import (KD_LOSSES, MATCH_LOSSES, PROJECTIONS, TEMPERATURE_SCHEDULERS,
                       WEIGHT_SCHEDULERS, Registry)
from .schedulers import (constant_temperature_scheduler,  # noqa: F401
                         cwsm_temperature_scheduler_builder,
                         flsw_temperature_scheduler_builder, linear_decay_weight_scheduler,
                         linear_growth_weight_scheduler)
from .match_presets import FEATURES, MATCHES, MATCHES_TRANSFORMERS, layer_matches  # noqa: F401
from .utils import cycle  # noqa: F401

__all__ = ["ADAPTOR_KEYS", "FEATURES", "KD_LOSS_MAP", "MATCH_LOSS_MAP", "PROJ_MAP",
           "WEIGHT_SCHEDULER", "TEMPERATURE_SCHEDULER", "MAPS", "register_new", "MATCHES",
           "MATCHES_TRANSFORMERS", "layer_matches"]

#: Keys an adaptor may return.
ADAPTOR_KEYS = ["logits", "logits_mask", "losses", "inputs_mask", "labels", "hidden", "attention"]

KD_LOSS_MAP: Registry = KD_LOSSES
MATCH_LOSS_MAP: Registry = MATCH_LOSSES
PROJ_MAP: Registry = PROJECTIONS
WEIGHT_SCHEDULER: Registry = WEIGHT_SCHEDULERS
TEMPERATURE_SCHEDULER: Registry = TEMPERATURE_SCHEDULERS

#: ``register_new``'s map names, spelled as in TextBrewer 0.2.1 ('match_Loss' with a capital L).
MAPS: Dict[str, Registry] = {
    "kd_loss": KD_LOSS_MAP,
    "match_Loss": MATCH_LOSS_MAP,
    "projection": PROJ_MAP,
    "weight_scheduler": WEIGHT_SCHEDULER,
    "temperature_scheduler": TEMPERATURE_SCHEDULER,
}


def register_new(map_name: str, name: str, func: Callable) -> None:
    """Registers ``func`` under ``name`` in one of the maps, so configs can name it.

    Args:
        map_name: 'kd_loss', 'match_Loss' (also accepted: 'match_loss'), 'projection',
            'weight_scheduler' or 'temperature_scheduler'.
        name: the key configs will use.
        func: the callable, with the signature of that map's entries.

    Raises:
        ValueError: unknown ``map_name``.
        TypeError: ``func`` is not callable.
    """
    key = "match_Loss" if map_name == "match_loss" else map_name
    if key not in MAPS:
        raise ValueError(f"unknown map_name {map_name!r}; valid choices: {list(MAPS)}")
    MAPS[key].add(name, func, overwrite=True)


# ---------------------------------------------------------------- TextBrewer 0.2.1 names
#: The dtype of boolean masks (0.2.1's ``compatibility.mask_dtype``, reachable from its
#: presets through ``from .losses import *``).
mask_dtype = torch.bool


class DynamicKeyDict:
    """TextBrewer 0.2.1's dict whose keys may carry arguments for a builder.

    0.2.1's ``TEMPERATURE_SCHEDULER`` was one of these; today it is a registry
    (:data:`textbrewer.registry.TEMPERATURE_SCHEDULERS`) that reads the same keys. This
    class is kept for scripts that build their own.

    ``d[name]`` is ``store[name]``; ``d[[name, *args]]`` (a list or tuple) calls the builder,
    ``store[name](*args)``, or ``store[name](**kwargs)`` for ``d[[name, kwargs]]`` with one
    dict. ``store`` is the dict given, not a copy: assignments write to it.

    Args:
        kv_dict: name -> value (or builder).

    Example:
        >>> d = DynamicKeyDict({'scale': lambda k: (lambda x: k * x)})
        >>> d[['scale', 3]](2), d[('scale', {'k': 4})](2), ['scale', 1] in d
        (6, 8, True)
    """

    def __init__(self, kv_dict: Dict[Any, Any]):
        self.store = kv_dict

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, (list, tuple)):
            return self.store[key]
        name, args = key[0], key[1:]
        if len(args) == 1 and isinstance(args[0], dict):
            return self.store[name](**args[0])
        return self.store[name](*args)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.store[key] = value

    def __contains__(self, key: Any) -> bool:
        return (key[0] if isinstance(key, (list, tuple)) else key) in self.store


__all__ += [
    # TextBrewer 0.2.1's presets namespace
    "kd_mse_loss", "kd_ce_loss", "att_mse_loss", "att_mse_sum_loss", "att_ce_loss",
    "att_ce_mean_loss", "hid_mse_loss", "cos_loss", "pkd_loss", "fsp_loss", "mmd_loss",
    "linear_growth_weight_scheduler", "linear_decay_weight_scheduler",
    "constant_temperature_scheduler", "flsw_temperature_scheduler_builder",
    "cwsm_temperature_scheduler_builder", "cycle", "linear_projection",
    "projection_with_activation", "DynamicKeyDict", "mask_dtype",
]
