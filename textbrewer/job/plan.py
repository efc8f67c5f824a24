"""``textbrewer plan CONFIG.yaml``: the job's estimated peak memory for each loss path,
from its models built on the meta device (nothing loaded, nothing allocated)."""
from __future__ import annotations

from typing import Dict

import torch

from .build import build_model, configs_of, distilling
from .config import JobConfig

__all__ = ["plan_job", "job_plans"]


def job_plans(config: JobConfig) -> Dict[str, object]:
    """``{path: MemoryPlan}`` for the job (see
    :func:`textbrewer.training.memory.plan_lm_memory_paths`): its models, micro-batch
    (``training.batch_size`` rows of ``data.sequence_length`` tokens), divergence,
    temperature, chunk size, cache k and parameter dtype; AdamW on the student's trainable
    parameters."""
    from ..training.memory import plan_lm_memory_paths
    _, distill_config, lm_config = configs_of(config)
    meta = torch.device("meta")
    student = build_model("student", config.student, config.training.seed, device=meta)
    teacher = build_model("teacher", config.teacher, config.training.seed, device=meta) \
        if config.teacher is not None else None
    return plan_lm_memory_paths(
        student, teacher, batch_size=config.training.batch_size,
        sequence_length=config.data.sequence_length, cache_k=config.cache.k,
        lm_config=lm_config, temperature=distill_config.temperature,
        ce_weight=distill_config.hard_label_weight if distilling(config) else 1.0,
        optimizer="adamw", dtype=getattr(torch, config.student.dtype))


def plan_job(config: JobConfig) -> str:
    """The table ``textbrewer plan`` prints."""
    from ..training.memory import format_memory_plans
    plans = job_plans(config)
    chosen = ("cache" if config.cache.path is not None else config.loss.path)
    header = (f"estimated peak memory of one training step: micro-batch "
              f"{config.training.batch_size} x {config.data.sequence_length} tokens, AdamW, "
              f"{config.student.dtype} parameters (the job's loss path: {chosen})")
    return header + "\n" + format_memory_plans(plans)
