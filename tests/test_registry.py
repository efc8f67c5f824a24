"""Registry (textbrewer/registry.py): decorator registration, duplicate warning, helpful
lookup errors, builders, and behaviour as a MutableMapping (TextBrewer 0.2.1's dict maps)."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from textbrewer.registry import (KD_LOSSES, MATCH_LOSSES, PROJECTIONS, TEMPERATURE_SCHEDULERS,
                                 WEIGHT_SCHEDULERS, Registry, RegistryError)


@pytest.fixture
def registry():
    things = Registry("thing")

    @things.register("double")
    def double(x):
        return 2 * x

    @things.register()
    def triple(x):
        return 3 * x

    @things.register("scale", builder=True)
    def scale_builder(factor):
        return lambda x: factor * x

    return things


# ------------------------------------------------------------------ registration
def test_decorator_registers_under_given_name_and_returns_the_function():
    things = Registry("thing")

    def negate(x):
        return -x

    assert things.register("neg")(negate) is negate
    assert things["neg"] is negate
    assert things.resolve("neg")(4) == -4


def test_decorator_defaults_to_the_function_name(registry):
    assert "triple" in registry
    assert registry.resolve("triple")(2) == 6


def test_duplicate_name_warns_and_replaces(registry):
    def other(x):
        return x

    with pytest.warns(UserWarning, match="thing 'double' is already registered"):
        registry.register("double")(other)
    assert registry["double"] is other


def test_same_function_again_or_overwrite_does_not_warn(registry):
    double = registry["double"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registry.add("double", double)
        registry.add("double", lambda x: x, overwrite=True)
        registry["triple"] = lambda x: x   # dict-style assignment, as 0.2.1 scripts do


def test_bad_names_and_non_callables_are_rejected(registry):
    with pytest.raises(ValueError, match="non-empty strings"):
        registry.add("", lambda x: x)
    with pytest.raises(ValueError, match="non-empty strings"):
        registry.add(3, lambda x: x)
    with pytest.raises(TypeError, match="must be callable, got int"):
        registry.add("number", 3)


# ------------------------------------------------------------------ lookup errors
def test_unknown_name_lists_valid_names_and_suggests_the_close_one(registry):
    with pytest.raises(RegistryError) as info:
        registry["dobule"]
    message = str(info.value)
    assert "unknown thing 'dobule'" in message
    assert "valid choices: ['double', 'scale', 'triple']" in message
    assert "did you mean 'double'?" in message


def test_unknown_name_without_a_close_one_has_no_suggestion(registry):
    with pytest.raises(RegistryError) as info:
        registry["zzzzzz"]
    assert "did you mean" not in str(info.value)
    assert "valid choices" in str(info.value)


def test_registry_error_is_both_key_error_and_value_error(registry):
    assert issubclass(RegistryError, KeyError) and issubclass(RegistryError, ValueError)
    with pytest.raises(KeyError):
        registry["nope"]
    with pytest.raises(ValueError):
        registry.resolve("nope")


def test_registry_error_prints_the_message_not_its_repr():
    assert str(RegistryError("unknown thing 'x'")) == "unknown thing 'x'"
    assert str(RegistryError()) == ""


def test_unhashable_lookup_is_a_registry_error(registry):
    with pytest.raises(RegistryError, match="unknown thing"):
        registry[{"double": 1}]


def test_list_lookup_builds_like_textbrewer_021_dynamic_key_dict():
    """0.2.1's TEMPERATURE_SCHEDULER[['flsw', beta, gamma]] (or [name, {kwargs}]) built the
    scheduler, and ``in`` looked at the name only."""
    from textbrewer import TEMPERATURE_SCHEDULER
    logits_S = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logits_T = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    # by hand: w = 1 - cos = [0, 1] (eps-normalised, ~), tau = 4 + (mean(w) - w) * 1
    expected = torch.tensor([4.5, 3.5])
    for spec in (["flsw", 1, 1], ["flsw", {"beta": 1, "gamma": 1}]):
        assert spec in TEMPERATURE_SCHEDULER
        tau = TEMPERATURE_SCHEDULER[spec](logits_S, logits_T, 4)
        torch.testing.assert_close(tau, expected, atol=2e-4, rtol=0)
    assert ["nope", 1] not in TEMPERATURE_SCHEDULER


def test_global_registry_error_suggests_close_loss():
    with pytest.raises(RegistryError, match="did you mean 'hidden_mse'"):
        MATCH_LOSSES["hiden_mse"]
    with pytest.raises(RegistryError, match=r"unknown kd_loss 'cee'.*'ce'.*'mse'"):
        KD_LOSSES.resolve("cee")


# ------------------------------------------------------------------ builders
def test_builder_resolves_with_parameters(registry):
    assert registry.is_builder("scale") and not registry.is_builder("double")
    assert registry.resolve(["scale", 5])(2) == 10
    assert registry.resolve(("scale", 0.5))(4) == 2


def test_builder_without_parameters_is_an_error(registry):
    with pytest.raises(RegistryError, match=r"thing 'scale' takes parameters: "
                                            r"write it as \['scale', param, \.\.\.\]"):
        registry.resolve("scale")
    with pytest.raises(RegistryError, match="takes parameters"):
        registry.validate(["scale"])


def test_non_builder_with_parameters_is_called_with_them(registry):
    # TextBrewer 0.2.1's DynamicKeyDict called any entry given [name, *args]
    assert registry.resolve(["double", 21]) == 42


def test_empty_spec_is_an_error(registry):
    with pytest.raises(RegistryError, match=r"empty thing specification \[\]"):
        registry.resolve([])


def test_reassigning_a_builder_by_item_makes_it_a_plain_entry(registry):
    registry["scale"] = lambda x: x + 1
    assert not registry.is_builder("scale")
    assert registry.resolve("scale")(1) == 2


def test_validate_accepts_valid_specs(registry):
    registry.validate("double")
    registry.validate(["scale", 2])


# ------------------------------------------------------------------ mapping behaviour
def test_mapping_protocol(registry):
    assert len(registry) == 3
    assert sorted(registry) == ["double", "scale", "triple"]
    assert registry.names() == ["double", "scale", "triple"]
    assert sorted(registry.keys()) == registry.names()
    assert dict(registry)["double"] is registry["double"]
    assert "double" in registry and "nope" not in registry
    assert ["double"] in registry and ["nope"] not in registry and 3 not in registry
    assert registry.get("nope") is None
    assert registry.get("nope", "default") == "default"
    assert registry.get("double")(1) == 2


def test_setitem_update_and_delete(registry):
    registry["half"] = lambda x: x / 2
    assert registry.resolve("half")(3) == 1.5
    registry.update({"quarter": lambda x: x / 4})
    assert registry["quarter"](4) == 1
    del registry["half"]
    assert "half" not in registry
    del registry["scale"]
    assert not registry.is_builder("scale")
    with pytest.raises(RegistryError, match="unknown thing 'half'"):
        del registry["half"]


def test_repr_names_kind_and_entries(registry):
    assert repr(registry) == "Registry('thing', ['double', 'scale', 'triple'])"


def test_global_registries_hold_textbrewer_names():
    assert {"ce", "mse"} <= set(KD_LOSSES)
    assert {"attention_mse_sum", "attention_mse", "attention_ce_mean", "attention_ce",
            "hidden_mse", "cos", "pkd", "gram", "fsp", "mmd", "nst"} <= set(MATCH_LOSSES)
    assert {"linear", "relu", "tanh"} <= set(PROJECTIONS)
    assert {"linear_decay", "linear_growth"} <= set(WEIGHT_SCHEDULERS)
    assert {"constant", "flsw", "cwsm"} <= set(TEMPERATURE_SCHEDULERS)


def test_registries_are_filled_by_importing_only_the_registry_module():
    code = ("from textbrewer.registry import KD_LOSSES, MATCH_LOSSES, PROJECTIONS, "
            "WEIGHT_SCHEDULERS, TEMPERATURE_SCHEDULERS as T\n"
            "assert 'ce' in KD_LOSSES and 'nst' in MATCH_LOSSES and 'relu' in PROJECTIONS\n"
            "assert 'linear_decay' in WEIGHT_SCHEDULERS and T.is_builder('flsw')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
