"""TextBrewer 0.2.1's ``textbrewer.distiller_utils``, for custom distillers written against it.

Published subclasses start with ``from textbrewer.distiller_utils import *`` and use what
that brought in: the helpers below (``get_outputs_from_batch``, ``post_adaptor``,
``select_logits_with_mask``, ``probability_shift_``, ``move_to_device``, ...), the presets'
maps (``KD_LOSS_MAP``, ``MATCH_LOSS_MAP``, ``PROJ_MAP``, ``FEATURES``, ...), ``logger``, and
the modules and typing names 0.2.1 happened to import (``torch``, ``nn``, ``np``, ``os``,
``random``, ``Optional``, ``Dict``, ...). They are thin adapters over this library's one
training loop: a 0.2.1-style ``train_on_batch`` / ``compute_loss`` runs inside it.
"""
# The names 0.2.1's star import exported, so that `import *` gives what subclasses used.
import json  # noqa: F401
import logging  # noqa: F401
import os  # noqa: F401
import random  # noqa: F401
from collections import OrderedDict, abc  # noqa: F401
from typing import Any, Dict, List, Optional, Tuple, Union  # noqa: F401

import numpy as np  # noqa: F401
import torch
from torch import nn  # noqa: F401
from tqdm import tqdm  # noqa: F401

from .compatibility import is_apex_available, mask_dtype  # noqa: F401
from .configurations import DistillationConfig, TrainingConfig  # noqa: F401
from .distillers.composer import probability_shift_, select_logits_with_mask  # noqa: F401
from .distillers.engine import (ACTIVE_STUDENT_FORWARDS, AbstractDistiller,  # noqa: F401
                                forward_model, no_op, split_batch)
from .distillers.general import CustomMatch  # noqa: F401
from .training.runtime import move_to_device  # noqa: F401
from .logs import logger  # noqa: F401
from .presets import *  # noqa: F401,F403
from .presets import ADAPTOR_KEYS, FEATURES  # noqa: F401

has_apex = is_apex_available()


class DistillationContext:
    """``with`` block that puts ``self.model_T`` in eval and ``self.model_S`` in train mode,
    restoring both on exit (0.2.1's base class of the distillers)."""

    def __init__(self):
        self.model_S = None
        self.model_T = None

    def __enter__(self):
        from .training.batches import set_modes
        self._context_modes = (set_modes(self.model_T, False), set_modes(self.model_S, True))
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        from .training.batches import restore_modes
        restore_modes(self.model_T, self._context_modes[0])
        restore_modes(self.model_S, self._context_modes[1])


class BasicAdaptor:
    """0.2.1's adaptor base class: remembers the last batch and model outputs."""

    def __init__(self):
        self.batch = None
        self.model_outputs = None

    def __call__(self, batch, model_outputs):
        self.batch = batch
        self.model_outputs = model_outputs

    def __getattr__(self, item):
        raise NotImplementedError(item)


def post_adaptor(dict_object: Dict[str, Any]) -> Dict[str, Any]:
    """Wraps single ``logits``, ``logits_mask``, ``losses`` and ``labels`` in lists
    (in place, as 0.2.1); other keys are left as they are."""
    for key in ("logits", "logits_mask", "losses", "labels"):
        if key in dict_object and not isinstance(dict_object[key], (list, tuple)):
            dict_object[key] = [dict_object[key]]
    return dict_object


def auto_forward(model: Any, batch: Any, args: Dict[str, Any]) -> Any:
    """Runs a model, or each model of a list / dict, on a batch (``**batch`` for mappings,
    ``*batch`` otherwise)."""
    if isinstance(model, (list, tuple)):
        return [forward_model(m, batch, args) for m in model]
    if isinstance(model, dict):
        return {name: forward_model(m, batch, args) for name, m in model.items()}
    return forward_model(model, batch, args)


def get_outputs_from_batch(batch: Any, device: Any, model_T: Any, model_S: nn.Module,
                           args: Dict[str, Any], no_teacher_forward: bool = False):
    """Moves a batch to ``device`` and runs teacher(s) and student, as 0.2.1 did.

    ``{'teacher': ..., 'student': ...}`` batches feed the models separately and a
    ``'teacher_cache'`` entry replaces the teacher's forward. During training the student
    runs through the loop's DDP / ``torch.compile`` wrapper.

    Returns:
        ``((teacher_batch, results_T), (student_batch, results_S))``; ``results_T`` is
        None with ``no_teacher_forward=True``.
    """
    teacher_batch, student_batch, cache = split_batch(batch)
    same = teacher_batch is student_batch
    teacher_batch = move_to_device(teacher_batch, device)
    student_batch = teacher_batch if same else move_to_device(student_batch, device)
    if no_teacher_forward:
        results_T = None
    elif cache is not None:
        results_T = move_to_device(cache, device)
    else:
        with torch.no_grad():
            results_T = auto_forward(model_T, teacher_batch, args)
    student = ACTIVE_STUDENT_FORWARDS.get(id(model_S), model_S)
    results_S = forward_model(student, student_batch, args)
    return (teacher_batch, results_T), (student_batch, results_S)
