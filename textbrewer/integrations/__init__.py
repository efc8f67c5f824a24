"""Bridges to other libraries' model formats, each optional and imported on first use.

:mod:`.huggingface`: teachers and students from local ``from_pretrained`` folders, the
student written with ``save_pretrained`` at each checkpoint (:class:`SavePretrained`), and
LoRA students with peft (:func:`lora_student`, :func:`check_optimizer_params`). transformers
and peft are imported only when a function needs them (``pip install -e '.[peft]'``).
"""
from .huggingface import (Pretrained, SavePretrained, check_optimizer_params, load_pretrained,
                          lora_student, save_pretrained_atomic, trainable_parameters,
                          unwrap_model)

__all__ = ["Pretrained", "SavePretrained", "save_pretrained_atomic", "load_pretrained",
           "lora_student", "trainable_parameters", "check_optimizer_params", "unwrap_model"]
