"""Presets and TextBrewer 0.2.1's maps (textbrewer/presets.py), the adaptor contract
(textbrewer/adaptors.py) and display_parameters (textbrewer/utils.py)."""
import copy

import pytest
import torch
from torch import nn

import textbrewer
from textbrewer import DistillationConfig, IntermediateMatch
from textbrewer.adaptors import AdaptorError, normalize_adaptor_output
from textbrewer.losses import mmd_loss
from textbrewer.presets import (ADAPTOR_KEYS, FEATURES, KD_LOSS_MAP, MAPS, MATCH_LOSS_MAP,
                                MATCHES, MATCHES_TRANSFORMERS, PROJ_MAP, TEMPERATURE_SCHEDULER,
                                WEIGHT_SCHEDULER, layer_matches, register_new)
from textbrewer.registry import (KD_LOSSES, MATCH_LOSSES, PROJECTIONS, TEMPERATURE_SCHEDULERS,
                                 WEIGHT_SCHEDULERS)
from textbrewer.utils import display_parameters

ATTENTION_VARIANTS = ["mse", "ce", "mse_sum", "ce_mean"]
PRESET_NAMES = sorted(
    [f"L3_attention_{v}" for v in ATTENTION_VARIANTS]
    + [f"L4_attention_{v}" for v in ATTENTION_VARIANTS]
    + ["L3_hidden_mse", "L3n_hidden_mse", "L3_hidden_smmd", "L4_hidden_smmd", "L4t_hidden_mse",
       "L4t_hidden_sgram", "L6_hidden_mse", "L6_hidden_smmd", "small_hidden_mse",
       "small_hidden_smmd"])


def _layers(preset):
    return [m["layer_T"] for m in preset], [m["layer_S"] for m in preset]


def _pairs(layers):
    return [[layer, layer] for layer in layers]


# ================================================================== preset contents
def test_preset_names():
    assert sorted(MATCHES) == PRESET_NAMES
    assert sorted(MATCHES_TRANSFORMERS) == PRESET_NAMES


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_l3_attention_presets(variant):
    preset = MATCHES[f"L3_attention_{variant}"]
    assert _layers(preset) == ([4, 8, 12], [1, 2, 3])
    for match in preset:
        assert match["feature"] == "attention" and match["loss"] == f"attention_{variant}"
        assert match["weight"] == 1 and "proj" not in match


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_l4_attention_presets(variant):
    preset = MATCHES[f"L4_attention_{variant}"]
    assert _layers(preset) == ([3, 6, 9, 12], [1, 2, 3, 4])
    assert all(m["feature"] == "attention" and m["loss"] == f"attention_{variant}"
               for m in preset)


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_transformers_attention_indices_are_one_lower(variant):
    assert _layers(MATCHES_TRANSFORMERS[f"L3_attention_{variant}"]) == ([3, 7, 11], [0, 1, 2])
    assert _layers(MATCHES_TRANSFORMERS[f"L4_attention_{variant}"]) == \
        ([2, 5, 8, 11], [0, 1, 2, 3])


def test_transformers_hidden_presets_are_unchanged():
    for name in PRESET_NAMES:
        if "hidden" in name:
            assert MATCHES_TRANSFORMERS[name] == MATCHES[name], name


@pytest.mark.parametrize("name, layers_T, layers_S, loss, proj", [
    ("L3_hidden_mse", [0, 4, 8, 12], [0, 1, 2, 3], "hidden_mse", None),
    ("L3n_hidden_mse", [0, 4, 8, 12], [0, 1, 2, 3], "hidden_mse", ["linear", 384, 768]),
    ("L4t_hidden_mse", [0, 3, 6, 9, 12], [0, 1, 2, 3, 4], "hidden_mse", ["linear", 312, 768]),
    ("L6_hidden_mse", [0, 2, 4, 6, 8, 10, 12], [0, 1, 2, 3, 4, 5, 6], "hidden_mse", None),
    ("small_hidden_mse", list(range(13)), list(range(13)), "hidden_mse",
     ["linear", 256, 768]),
])
def test_hidden_mse_presets(name, layers_T, layers_S, loss, proj):
    preset = MATCHES[name]
    assert _layers(preset) == (layers_T, layers_S)
    for match in preset:
        assert match["feature"] == "hidden" and match["loss"] == loss and match["weight"] == 1
        assert match.get("proj") == proj


@pytest.mark.parametrize("name, layers_T, layers_S", [
    ("L3_hidden_smmd", [0, 4, 8, 12], [0, 1, 2, 3]),
    ("L4_hidden_smmd", [0, 3, 6, 9, 12], [0, 1, 2, 3, 4]),
    ("L6_hidden_smmd", [0, 2, 4, 6, 8, 10, 12], [0, 1, 2, 3, 4, 5, 6]),
    ("small_hidden_smmd", list(range(13)), list(range(13))),
])
def test_smmd_presets_pair_each_layer_with_itself(name, layers_T, layers_S):
    preset = MATCHES[name]
    assert _layers(preset) == (_pairs(layers_T), _pairs(layers_S))
    for match in preset:
        assert match["loss"] == "nst" and MATCH_LOSSES[match["loss"]] is mmd_loss
        assert match["feature"] == "hidden" and "proj" not in match


def test_l4t_hidden_sgram():
    preset = MATCHES["L4t_hidden_sgram"]
    assert _layers(preset) == (_pairs([0, 3, 6, 9, 12]), _pairs([0, 1, 2, 3, 4]))
    for match in preset:
        assert match["loss"] == "gram" and match["proj"] == ["linear", 312, 768]


@pytest.mark.parametrize("table", ["MATCHES", "MATCHES_TRANSFORMERS"])
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_builds_a_valid_distillation_config(table, name):
    preset = {"MATCHES": MATCHES, "MATCHES_TRANSFORMERS": MATCHES_TRANSFORMERS}[table][name]
    before = copy.deepcopy(preset)
    config = DistillationConfig(intermediate_matches=preset)
    assert len(config.intermediate_matches) == len(preset)
    assert all(isinstance(m, IntermediateMatch) for m in config.intermediate_matches)
    assert preset == before   # building a config leaves the shared preset alone
    # and it survives a dict round trip
    assert DistillationConfig.from_dict(config.to_dict()) == config


def test_presets_are_exported_from_the_package():
    assert textbrewer.MATCHES is MATCHES
    assert textbrewer.MATCHES_TRANSFORMERS is MATCHES_TRANSFORMERS


def test_layer_matches_helper():
    assert layer_matches([2, 4], [1, 2], "hidden", "cos", weight=3, proj=("relu", 2, 4)) == [
        {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "cos", "weight": 3,
         "proj": ["relu", 2, 4]},
        {"layer_T": 4, "layer_S": 2, "feature": "hidden", "loss": "cos", "weight": 3,
         "proj": ["relu", 2, 4]}]
    with pytest.raises(ValueError, match="layers_T has 2 entries but layers_S has 1"):
        layer_matches([1, 2], [1], "hidden", "cos")


# ================================================================== maps and constants
def test_adaptor_keys_and_features_are_textbrewer_s():
    assert list(ADAPTOR_KEYS) == ["logits", "logits_mask", "losses", "inputs_mask", "labels",
                                  "hidden", "attention"]
    assert list(FEATURES) == ["hidden", "attention"]
    assert textbrewer.ADAPTOR_KEYS is ADAPTOR_KEYS and textbrewer.FEATURES is FEATURES


def test_maps_are_the_registries():
    assert KD_LOSS_MAP is KD_LOSSES and MATCH_LOSS_MAP is MATCH_LOSSES
    assert PROJ_MAP is PROJECTIONS and WEIGHT_SCHEDULER is WEIGHT_SCHEDULERS
    assert TEMPERATURE_SCHEDULER is TEMPERATURE_SCHEDULERS
    assert set(MAPS) == {"kd_loss", "match_Loss", "projection", "weight_scheduler",
                         "temperature_scheduler"}


@pytest.fixture
def cleanup():
    """Names registered during a test are removed from the global registries afterwards."""
    added = []
    yield added
    for registry, name in added:
        if name in registry:
            del registry[name]


def _double_loss(feature_S, feature_T, mask=None):
    return 2 * (feature_S - feature_T).abs().mean()


@pytest.mark.parametrize("map_name, registry", [
    ("kd_loss", KD_LOSSES), ("match_Loss", MATCH_LOSSES), ("match_loss", MATCH_LOSSES),
    ("projection", PROJECTIONS), ("weight_scheduler", WEIGHT_SCHEDULERS),
    ("temperature_scheduler", TEMPERATURE_SCHEDULERS)])
def test_register_new_goes_to_the_registry(map_name, registry, cleanup):
    name = f"test_presets_{map_name}"
    cleanup.append((registry, name))

    def entry(*args):
        return args

    register_new(map_name, name, entry)
    assert registry[name] is entry
    assert registry.resolve(name) is entry
    assert not registry.is_builder(name)


def test_registered_names_are_usable_in_configs(cleanup):
    cleanup.extend([(KD_LOSSES, "test_presets_kd"), (MATCH_LOSSES, "test_presets_match"),
                    (PROJECTIONS, "test_presets_proj"),
                    (WEIGHT_SCHEDULERS, "test_presets_weight"),
                    (TEMPERATURE_SCHEDULERS, "test_presets_temperature")])
    register_new("kd_loss", "test_presets_kd", lambda s, t, tau=1: (s - t).abs().mean())
    register_new("match_Loss", "test_presets_match", _double_loss)
    register_new("projection", "test_presets_proj", lambda d_in, d_out: nn.Linear(d_in, d_out))
    register_new("weight_scheduler", "test_presets_weight", lambda x: x ** 2)
    register_new("temperature_scheduler", "test_presets_temperature", lambda s, t, base: base)
    config = DistillationConfig(
        kd_loss_type="test_presets_kd", kd_loss_weight_scheduler="test_presets_weight",
        temperature_scheduler="test_presets_temperature",
        intermediate_matches=[{"layer_T": 1, "layer_S": 1, "feature": "hidden",
                               "loss": "test_presets_match", "weight": 1,
                               "proj": ["test_presets_proj", 2, 3]}])
    assert config.intermediate_matches[0].loss == "test_presets_match"
    value = MATCH_LOSS_MAP["test_presets_match"](torch.ones(2), torch.zeros(2))
    assert value.item() == 2.0


def test_register_new_replaces_without_warning(cleanup):
    import warnings
    cleanup.append((MATCH_LOSSES, "test_presets_twice"))
    register_new("match_Loss", "test_presets_twice", _double_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_new("match_Loss", "test_presets_twice", lambda s, t, mask=None: 0)
    assert MATCH_LOSSES["test_presets_twice"] is not _double_loss


def test_register_new_unknown_map_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown map_name 'loss'; valid choices: "
                                         r"\['kd_loss', 'match_Loss', 'projection', "
                                         r"'weight_scheduler', 'temperature_scheduler'\]"):
        register_new("loss", "whatever", _double_loss)


def test_register_new_rejects_non_callables():
    with pytest.raises(TypeError, match="must be callable"):
        register_new("match_Loss", "test_presets_not_callable", 3)
    assert "test_presets_not_callable" not in MATCH_LOSSES


def test_dict_style_assignment_on_a_map(cleanup):
    cleanup.append((MATCH_LOSSES, "test_presets_assigned"))
    MATCH_LOSS_MAP["test_presets_assigned"] = _double_loss
    assert MATCH_LOSSES["test_presets_assigned"] is _double_loss


# ================================================================== adaptor output
class TestNormalizeAdaptorOutput:
    @pytest.mark.parametrize("output", [None, [1, 2], (torch.zeros(1),), torch.zeros(2)])
    def test_non_dict_is_an_error_naming_role_and_keys(self, output):
        with pytest.raises(AdaptorError, match=r"the student's adaptor must return a dict with "
                                               r"keys from \['logits', 'logits_mask'"):
            normalize_adaptor_output(output, "the student's adaptor")

    def test_adaptor_error_is_a_value_error(self):
        assert issubclass(AdaptorError, ValueError)
        assert textbrewer.AdaptorError is AdaptorError

    def test_unknown_keys_are_dropped_with_one_warning_naming_the_closest_key(self, caplog):
        output = {"logits": torch.zeros(1), "logit": torch.zeros(1), "hiddens": [], "zzz": 1}
        with caplog.at_level("WARNING", logger="textbrewer"):
            result = normalize_adaptor_output(output, "the teacher's test adaptor")
            normalize_adaptor_output(output, "the teacher's test adaptor")  # warned once only
        # kept for a subclass's compute_loss (as 0.2.1 did), ignored by the built-in losses
        assert sorted(result) == ["hiddens", "logit", "logits", "zzz"]
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 3
        assert any("unknown key 'logit' (did you mean 'logits'?)" in m for m in messages)
        assert any("unknown key 'hiddens' (did you mean 'hidden'?)" in m for m in messages)
        assert any("'zzz'; the built-in losses ignore it" in m for m in messages)
        assert all("Valid keys: ['logits', 'logits_mask', 'losses', 'inputs_mask', 'labels', "
                   "'hidden', 'attention']" in m for m in messages)

    def test_single_tensors_become_lists_and_features_stay(self):
        logits, labels, loss = torch.zeros(2, 3), torch.zeros(2), torch.tensor(1.0)
        hidden = torch.zeros(3, 2, 4, 5)   # stacked layers stay a tensor
        mask = torch.ones(2, 4)
        output = {"logits": logits, "labels": labels, "losses": loss, "hidden": hidden,
                  "inputs_mask": mask, "logits_mask": mask}
        result = normalize_adaptor_output(output, "adaptor")
        assert result["logits"] == [logits] and result["labels"] == [labels]
        assert result["losses"] == [loss] and result["logits_mask"] == [mask]
        assert result["hidden"] is hidden and result["inputs_mask"] is mask
        assert output["logits"] is logits   # the adaptor's dict is not modified

    def test_lists_stay_lists(self):
        heads = [torch.zeros(2, 3), torch.zeros(2, 5)]
        result = normalize_adaptor_output({"logits": heads, "attention": [torch.zeros(1)]}, "a")
        assert result["logits"] is heads

    def test_empty_dict_is_fine(self):
        assert normalize_adaptor_output({}, "adaptor") == {}


# ================================================================== display_parameters
class TestDisplayParameters:
    def _model(self):
        # Linear(3, 2): 6 + 2 = 8; ReLU: nothing; Linear(2, 1, bias=False): 2. Total 10.
        return nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1, bias=False))

    def test_counts_by_hand(self):
        table, root = display_parameters(self._model())
        assert root.value[0] == 10
        assert root.value[1] == pytest.approx(10 * 4 / 2 ** 20)
        assert root["0"].value[0] == 8
        assert root["0"]["weight"].value[0] == 6 and root["0"]["bias"].value[0] == 2
        assert root["2"].value[0] == 2
        assert "1" not in root   # ReLU has no parameters
        assert root["0"]["weight"].fullname == "0.weight"

    def test_table_rows(self):
        table, _ = display_parameters(self._model())
        lines = table.strip("\n").split("\n")
        assert lines[0].split() == ["LAYER", "NAME", "#PARAMS", "RATIO", "MEM(MB)"]
        assert lines[1].split() == ["--model:", "10", "100.00%", "0.00"]
        assert lines[2].split() == ["--0:", "8", "80.00%", "0.00"]
        assert lines[3].split() == ["--weight:", "6", "60.00%", "0.00"]
        assert lines[3].startswith("    --weight:")   # indented two levels
        assert len(lines) == 1 + 6   # model, 0, 0.weight, 0.bias, 2, 2.weight

    def test_max_level(self):
        table, _ = display_parameters(self._model(), max_level=1)
        lines = table.strip("\n").split("\n")
        assert [line.split()[0] for line in lines[1:]] == ["--model:", "--0:", "--2:"]

    def test_buffers_count_with_their_own_element_size(self):
        # BatchNorm1d(2): weight 2, bias 2, running_mean 2, running_var 2 (float32)
        # and num_batches_tracked 1 (int64, 8 bytes): 9 elements, 4·8 + 8 = 40 bytes.
        _, root = display_parameters(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
        assert root["1"].value[0] == 9
        assert root["1"].value[1] == pytest.approx(40 / 2 ** 20)
        assert root.value[0] == 8 + 9
        assert root.value[1] == pytest.approx((32 + 40) / 2 ** 20)

    def test_shared_tensors_count_once(self):
        layer = nn.Linear(2, 2, bias=False)
        _, root = display_parameters(nn.Sequential(layer, layer))
        assert root.value[0] == 4

    def test_state_dict_input(self):
        state = {"encoder.weight": torch.zeros(4, 5), "encoder.bias": torch.zeros(4),
                 "head.weight": torch.zeros(2, 4, dtype=torch.float64)}
        _, root = display_parameters(state)
        assert root.value[0] == 20 + 4 + 8
        assert root["encoder"].value[0] == 24
        assert root["head"].value[1] == pytest.approx(8 * 8 / 2 ** 20)

    def test_wrong_type(self):
        with pytest.raises(TypeError, match="torch.nn.Module or a state dict, got list"):
            display_parameters([1, 2])
