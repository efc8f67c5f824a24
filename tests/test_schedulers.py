"""Weight and temperature schedules (textbrewer/schedulers.py) against TEXTBREWER_0.2.1.md.

flsw and cwsm are checked against the formulas written out as loops over examples.
"""
import math

import pytest
import torch
from torch.testing import assert_close

import textbrewer  # noqa: F401  (fills the registries)
from textbrewer.registry import TEMPERATURE_SCHEDULERS, WEIGHT_SCHEDULERS, RegistryError
from textbrewer.schedulers import (constant_temperature_scheduler,
                                   cwsm_temperature_scheduler_builder,
                                   flsw_temperature_scheduler_builder,
                                   linear_decay_weight_scheduler,
                                   linear_growth_weight_scheduler)

DOUBLE = torch.float64


def _randn(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=DOUBLE)


def _ref_flsw(logits_S, logits_T, base, beta, gamma, eps=1e-4):
    """w_n = (1 − cos_eps(s_n, t_n))^gamma; τ_n = base + (mean(w) − w_n)·beta."""
    weights = []
    for s, t in zip(logits_S.tolist(), logits_T.tolist()):
        norm_s = math.sqrt(sum(x * x for x in s)) + eps
        norm_t = math.sqrt(sum(x * x for x in t)) + eps
        similarity = sum((x / norm_s) * (y / norm_t) for x, y in zip(s, t))
        weights.append((1 - similarity) ** gamma)
    mean = sum(weights) / len(weights)
    return [base + (mean - w) * beta for w in weights]


def _ref_cwsm(logits_S, base, beta):
    """w_n = 1 / (max_c softmax(s_n)_c + 1e-3); τ_n = base + (mean(w) − w_n)·beta."""
    weights = []
    for s in logits_S.tolist():
        top = max(s)
        total = sum(math.exp(x - top) for x in s)
        weights.append(1 / (1 / total + 1e-3))   # max softmax = exp(0) / total
    mean = sum(weights) / len(weights)
    return [base + (mean - w) * beta for w in weights]


# ------------------------------------------------------------------ weight schedules
@pytest.mark.parametrize("progress, expected", [(0.0, 0.0), (0.25, 0.25), (0.5, 0.5), (1.0, 1.0)])
def test_linear_growth_is_progress(progress, expected):
    assert linear_growth_weight_scheduler(progress) == pytest.approx(expected)
    assert WEIGHT_SCHEDULERS["linear_growth"](progress) == pytest.approx(expected)


@pytest.mark.parametrize("progress, expected", [(0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (1.0, 0.0)])
def test_linear_decay_is_one_minus_progress(progress, expected):
    assert linear_decay_weight_scheduler(progress) == pytest.approx(expected)
    assert WEIGHT_SCHEDULERS["linear_decay"](progress) == pytest.approx(expected)


def test_weight_schedules_at_global_step_over_total_steps():
    total_steps = 8
    growth = [WEIGHT_SCHEDULERS.resolve("linear_growth")(step / total_steps)
              for step in range(total_steps + 1)]
    decay = [WEIGHT_SCHEDULERS.resolve("linear_decay")(step / total_steps)
             for step in range(total_steps + 1)]
    assert growth == pytest.approx([step / 8 for step in range(9)])
    assert decay == pytest.approx([1 - step / 8 for step in range(9)])


# ------------------------------------------------------------------ temperature schedules
def test_constant_returns_the_base_temperature():
    logits = _randn(3, 4, seed=1)
    assert constant_temperature_scheduler(logits, logits, 4.0) == 4.0
    assert TEMPERATURE_SCHEDULERS.resolve("constant")(logits, -logits, 2.5) == 2.5


@pytest.mark.parametrize("beta, gamma", [(1.0, 1.0), (2.0, 2.0), (0.5, 3.0)])
def test_flsw_matches_the_formula(beta, gamma):
    logits_S, logits_T = _randn(5, 4, seed=1), _randn(5, 4, seed=2)
    scheduler = flsw_temperature_scheduler_builder(beta, gamma)
    tau = scheduler(logits_S, logits_T, 4.0)
    assert tau.shape == (5,)
    assert_close(tau, torch.tensor(_ref_flsw(logits_S, logits_T, 4.0, beta, gamma), dtype=DOUBLE))


def test_flsw_by_hand():
    # Row 0: identical directions -> cos ≈ 1 -> w ≈ 0; row 1: opposite -> cos ≈ -1 -> w ≈ 2
    # (gamma = 1). mean(w) ≈ 1, so τ ≈ base + [1, -1]·beta.
    logits_S = torch.tensor([[3.0, 4.0], [3.0, 4.0]], dtype=DOUBLE)
    logits_T = torch.tensor([[3.0, 4.0], [-3.0, -4.0]], dtype=DOUBLE)
    tau = flsw_temperature_scheduler_builder(beta=2.0, gamma=1.0)(logits_S, logits_T, 4.0)
    assert_close(tau, torch.tensor([6.0, 2.0], dtype=DOUBLE), atol=1e-3, rtol=0)


def test_flsw_eps_is_added_to_the_norm():
    # With a tiny logit vector the eps term dominates: s = t = [1e-4, 0]
    # -> normalised entries 1e-4 / 2e-4 = 0.5, cos = 0.25, w = 0.75; other row w = 0.
    logits = torch.tensor([[1e-4, 0.0], [1.0, 0.0]], dtype=DOUBLE)
    tau = flsw_temperature_scheduler_builder(beta=1.0, gamma=1.0)(logits, logits, 1.0)
    w = [0.75, (1 - (1 / 1.0001) ** 2)]
    mean = sum(w) / 2
    assert_close(tau, torch.tensor([1 + mean - w[0], 1 + mean - w[1]], dtype=DOUBLE))


@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_cwsm_matches_the_formula(beta):
    logits_S, logits_T = _randn(6, 3, seed=3), _randn(6, 3, seed=4)
    tau = cwsm_temperature_scheduler_builder(beta)(logits_S, logits_T, 2.0)
    assert tau.shape == (6,)
    assert_close(tau, torch.tensor(_ref_cwsm(logits_S, 2.0, beta), dtype=DOUBLE))


def test_cwsm_by_hand():
    # Row 0 uniform over 2 -> max p = 0.5; row 1 confident -> max p ≈ 1.
    logits_S = torch.tensor([[0.0, 0.0], [100.0, 0.0]], dtype=DOUBLE)
    tau = cwsm_temperature_scheduler_builder(beta=1.0)(logits_S, logits_S, 4.0)
    w = [1 / 0.501, 1 / 1.001]
    mean = sum(w) / 2
    assert_close(tau, torch.tensor([4 + mean - w[0], 4 + mean - w[1]], dtype=DOUBLE))
    # the confident example gets the higher temperature
    assert tau[1] > tau[0]


@pytest.mark.parametrize("spec", [["flsw", 1.0, 2.0], ["cwsm", 1.0]])
def test_temperature_schedules_do_not_track_gradients(spec):
    logits_S = _randn(4, 3, seed=5).requires_grad_(True)
    logits_T = _randn(4, 3, seed=6)
    tau = TEMPERATURE_SCHEDULERS.resolve(spec)(logits_S, logits_T, 4.0)
    assert not tau.requires_grad


def test_temperature_schedules_average_to_the_base():
    # mean(τ) = base + (mean(w) − mean(w))·beta = base, for both schedules
    logits_S, logits_T = _randn(7, 5, seed=7), _randn(7, 5, seed=8)
    for spec in (["flsw", 1.5, 2.0], ["cwsm", 2.0]):
        tau = TEMPERATURE_SCHEDULERS.resolve(spec)(logits_S, logits_T, 3.0)
        assert_close(tau.mean(), torch.tensor(3.0, dtype=DOUBLE))


# ------------------------------------------------------------------ resolving by name
def test_resolve_flsw_with_parameters_builds_the_scheduler():
    logits_S, logits_T = _randn(5, 4, seed=9), _randn(5, 4, seed=10)
    scheduler = TEMPERATURE_SCHEDULERS.resolve(["flsw", 1.0, 2.0])
    assert callable(scheduler)
    assert_close(scheduler(logits_S, logits_T, 4.0),
                 torch.tensor(_ref_flsw(logits_S, logits_T, 4.0, 1.0, 2.0), dtype=DOUBLE))


def test_resolve_tuple_spec():
    logits = _randn(3, 4, seed=11)
    scheduler = TEMPERATURE_SCHEDULERS.resolve(("cwsm", 1.0))
    assert_close(scheduler(logits, logits, 1.0),
                 torch.tensor(_ref_cwsm(logits, 1.0, 1.0), dtype=DOUBLE))


@pytest.mark.parametrize("name", ["flsw", "cwsm"])
def test_builder_without_parameters_names_the_form(name):
    assert TEMPERATURE_SCHEDULERS.is_builder(name)
    with pytest.raises(RegistryError, match=rf"takes parameters: write it as \['{name}', param"):
        TEMPERATURE_SCHEDULERS.resolve(name)
    with pytest.raises(RegistryError, match=rf"\['{name}'"):
        TEMPERATURE_SCHEDULERS.resolve([name])


def test_unknown_temperature_scheduler_lists_choices():
    with pytest.raises(RegistryError, match=r"unknown temperature scheduler 'flws'.*"
                                            r"'constant', 'cwsm', 'flsw'.*did you mean 'flsw'"):
        TEMPERATURE_SCHEDULERS.resolve(["flws", 1, 1])


def test_registered_schedule_names_match_textbrewer():
    assert {"linear_decay", "linear_growth"} <= set(WEIGHT_SCHEDULERS.names())
    assert {"constant", "flsw", "cwsm"} <= set(TEMPERATURE_SCHEDULERS.names())
    assert not TEMPERATURE_SCHEDULERS.is_builder("constant")
