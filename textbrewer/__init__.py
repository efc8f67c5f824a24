"""textbrewer: knowledge distillation for PyTorch, compatible with TextBrewer 0.2.1.

The names TextBrewer 0.2.1 exported come first, unchanged; new names follow.
"""
__version__ = "0.3.0"

from .configurations import DistillationConfig, IntermediateMatch, TrainingConfig
from .distillers import (AbstractDistiller, BasicDistiller, BasicTrainer, CustomMatch,
                         GeneralDistiller, MultiTaskDistiller, MultiTeacherDistiller)
from .presets import (ADAPTOR_KEYS, FEATURES, KD_LOSS_MAP, MATCH_LOSS_MAP, MATCHES,
                      MATCHES_TRANSFORMERS, PROJ_MAP, TEMPERATURE_SCHEDULER, WEIGHT_SCHEDULER,
                      register_new)
from . import (capture, checkpoint, data_utils, logs, losses, presets, recipes, registry,
               teaching, utils)
from .adaptors import AdaptorError
from .capture import ModuleCapture
from .checkpoint import CheckpointError
from .distillers.engine import Phase
from .distillers.lm import (CausalLMDistiller, DistiLLM2Distiller, LMDistillationConfig,
                            Seq2SeqLMDistiller)
from .logs import NonFiniteLossError, set_verbosity
from .training.sources import EmptyDataError
from .losses.token import TokenDistillationLoss
from .registry import RegistryError

Distillers = {
    "Basic": BasicDistiller,
    "General": GeneralDistiller,
    "MultiTeacher": MultiTeacherDistiller,
    "MultiTask": MultiTaskDistiller,
    "Train": BasicTrainer,
}

__all__ = [
    # TextBrewer 0.2.1
    "BasicTrainer", "BasicDistiller", "GeneralDistiller", "MultiTaskDistiller",
    "MultiTeacherDistiller", "TrainingConfig", "DistillationConfig", "FEATURES", "ADAPTOR_KEYS",
    "KD_LOSS_MAP", "MATCH_LOSS_MAP", "PROJ_MAP", "WEIGHT_SCHEDULER", "TEMPERATURE_SCHEDULER",
    "register_new", "Distillers", "losses", "utils", "presets",
    # new
    "AbstractDistiller", "CustomMatch", "IntermediateMatch", "MATCHES", "MATCHES_TRANSFORMERS",
    "registry", "AdaptorError", "NonFiniteLossError", "EmptyDataError", "RegistryError",
    "CheckpointError", "Phase", "ModuleCapture", "TokenDistillationLoss", "set_verbosity",
    "capture", "checkpoint", "data_utils", "logs", "CausalLMDistiller", "Seq2SeqLMDistiller",
    "DistiLLM2Distiller", "LMDistillationConfig", "recipes", "teaching",
]
