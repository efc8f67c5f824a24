"""Distillers and the trainer; all share the loop in :mod:`textbrewer.distillers.engine`."""
from .basic import BasicDistiller
from .composer import LossComposer, probability_shift_, select_logits_with_mask
from .engine import AbstractDistiller
from .general import CustomMatch, GeneralDistiller
from .lm import (CausalLMDistiller, DistiLLM2Distiller, LMDistillationConfig,
                 Seq2SeqLMDistiller)
from .multi_task import MultiTaskDistiller
from .multi_teacher import MultiTeacherDistiller
from ..training.runtime import Runtime, move_to_device
from .trainer import BasicTrainer

__all__ = ["AbstractDistiller", "BasicDistiller", "GeneralDistiller", "CustomMatch",
           "MultiTeacherDistiller", "MultiTaskDistiller", "BasicTrainer", "LossComposer",
           "Runtime", "move_to_device", "probability_shift_", "select_logits_with_mask",
           "CausalLMDistiller", "DistiLLM2Distiller", "Seq2SeqLMDistiller", "LMDistillationConfig"]
