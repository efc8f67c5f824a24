"""Weight and temperature schedules.

Weight schedules map training progress ``x = global_step / total_steps`` in [0, 1] to a
loss weight. As in TextBrewer 0.2.1 the scheduled value *replaces* the configured weight
after each optimizer step (before the first step the configured weight applies); the
configuration itself is never modified: the training loop keeps the current value.

Temperature schedules map ``(logits_S, logits_T, base_temperature)`` to a temperature, a
float or a per-example tensor of shape (N,) for logits (N, C). They run on detached logits.
"""
import math
import numbers
from typing import Any, Callable, Union

import torch

from .registry import TEMPERATURE_SCHEDULERS, WEIGHT_SCHEDULERS

__all__ = ["linear_growth_weight_scheduler", "linear_decay_weight_scheduler",
           "constant_temperature_scheduler", "flsw_temperature_scheduler_builder",
           "cwsm_temperature_scheduler_builder"]

Temperature = Union[float, torch.Tensor]


@WEIGHT_SCHEDULERS.register("linear_growth")
def linear_growth_weight_scheduler(progress: float) -> float:
    """Weight ``x``: grows from 0 to 1 over training."""
    return progress


@WEIGHT_SCHEDULERS.register("linear_decay")
def linear_decay_weight_scheduler(progress: float) -> float:
    """Weight ``1 − x``: decays from 1 to 0 over training."""
    return 1 - progress


@TEMPERATURE_SCHEDULERS.register("constant")
def constant_temperature_scheduler(logits_S: torch.Tensor, logits_T: torch.Tensor,
                                   base_temperature: float) -> float:
    """The base temperature, unchanged."""
    return base_temperature


def _check_number(schedule: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        raise ValueError(f"{schedule}: {name} must be a finite number, got {value!r}")


@TEMPERATURE_SCHEDULERS.register("flsw", builder=True)
def flsw_temperature_scheduler_builder(beta: float, gamma: float, eps: float = 1e-4,
                                       *ignored: Any) -> Callable[..., torch.Tensor]:
    """Builds the FLSW schedule (Li et al., 2020, "dynamic temperature").

    Per example, ``w = (1 − cos(s, t))^gamma`` on the detached logits (each normalised by
    its norm + ``eps``), and ``τ = base + (mean(w) − w)·beta``: examples on which student
    and teacher already agree get a higher temperature.

    Config form: ``['flsw', beta, gamma]``. Extra positional parameters are ignored, as
    TextBrewer 0.2.1 ignored them.

    Returns:
        ``scheduler(logits_S (N, C), logits_T (N, C), base) -> τ (N,)``.

    Raises:
        ValueError: beta, gamma or eps is not a finite number.
    """
    for name, value in (("beta", beta), ("gamma", gamma), ("eps", eps)):
        _check_number("flsw", name, value)

    def flsw_temperature_scheduler(logits_S: torch.Tensor, logits_T: torch.Tensor,
                                   base_temperature: float) -> torch.Tensor:
        with torch.no_grad():
            student = logits_S.detach()
            teacher = logits_T.detach()
            student = student / (torch.norm(student, dim=-1, keepdim=True) + eps)
            teacher = teacher / (torch.norm(teacher, dim=-1, keepdim=True) + eps)
            w = torch.pow(1 - (student * teacher).sum(dim=-1), gamma)
            return base_temperature + (w.mean() - w) * beta

    return flsw_temperature_scheduler


@TEMPERATURE_SCHEDULERS.register("cwsm", builder=True)
def cwsm_temperature_scheduler_builder(beta: float, *ignored: Any) -> Callable[..., torch.Tensor]:
    """Builds the CWSM schedule: confidence-weighted temperature.

    Per example, ``w = 1 / (max softmax(s) + 1e-3)`` and ``τ = base + (mean(w) − w)·beta``:
    examples on which the student is confident get a higher temperature.

    Config form: ``['cwsm', beta]`` (extra parameters ignored, as in 0.2.1).

    Returns:
        ``scheduler(logits_S (N, C), logits_T (N, C), base) -> τ (N,)``.

    Raises:
        ValueError: beta is not a finite number.
    """
    _check_number("cwsm", "beta", beta)

    def cwsm_temperature_scheduler(logits_S: torch.Tensor, logits_T: torch.Tensor,
                                   base_temperature: float) -> torch.Tensor:
        with torch.no_grad():
            confidence = torch.softmax(logits_S.detach(), dim=-1).max(dim=-1).values
            w = 1 / (confidence + 1e-3)
            return base_temperature + (w.mean() - w) * beta

    return cwsm_temperature_scheduler


__all__ += ["warmup_weight_scheduler_builder"]


@WEIGHT_SCHEDULERS.register("warmup", builder=True)
def warmup_weight_scheduler_builder(fraction: float) -> Callable[[float], float]:
    """Builds a linear warm-up: weight ``min(x / fraction, 1)``.

    Grows from 0 to 1 over the first ``fraction`` of training, then stays at 1 (Decoupled
    KD ramps its loss up this way over the first 20 epochs, Zhao et al. 2022,
    arXiv:2203.08679). As every weight schedule, the value replaces the configured weight.

    Config form: ``['warmup', fraction]``, 0 < fraction ≤ 1.

    Raises:
        ValueError: fraction outside (0, 1].
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0 < fraction <= 1:
        raise ValueError(f"warmup: fraction must be a number in (0, 1], got {fraction!r}")

    def warmup_weight_scheduler(progress: float) -> float:
        return min(progress / fraction, 1.0)

    return warmup_weight_scheduler
