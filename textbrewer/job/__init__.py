"""Distillation jobs described by a config file: what ``textbrewer distill CONFIG.yaml``
runs (see :mod:`textbrewer.cli` and docs/cli.md).

``load_job_config(path, overrides)`` reads and validates a job; ``run_job(config)``
trains it. Needs the ``cli`` extra (omegaconf, transformers).
"""
from .config import (CacheSpec, ConfigError, DataSpec, JobConfig, LoraSpec,  # noqa: F401
                     LossSpec, ModelSpec, OutputSpec, TrainingSpec, config_to_yaml,
                     load_job_config)
from .run import run_job  # noqa: F401

__all__ = ["JobConfig", "ModelSpec", "LoraSpec", "DataSpec", "LossSpec", "CacheSpec",
           "TrainingSpec", "OutputSpec", "ConfigError", "load_job_config", "config_to_yaml",
           "run_job"]
