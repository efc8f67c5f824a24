"""TrainingConfig, DistillationConfig, IntermediateMatch (textbrewer/configurations.py).

Defaults and argument order are TextBrewer 0.2.1's; every bad value is a ValueError that
names the field and what is allowed; configs round-trip through dicts and JSON files and
touch nothing (no directories, no process group) when built.
"""
import json
import os

import pytest
import torch

from textbrewer import DistillationConfig, IntermediateMatch, TrainingConfig
from textbrewer.configurations import MIXED_PRECISION_CHOICES

TEXTBREWER_TRAINING_DEFAULTS = {
    "gradient_accumulation_steps": 1, "ckpt_frequency": 1, "ckpt_epoch_frequency": 1,
    "ckpt_steps": None, "log_dir": None, "output_dir": "./saved_models", "device": "cuda",
    "fp16": False, "fp16_opt_level": "O1", "data_parallel": False, "local_rank": -1,
}
TEXTBREWER_DISTILLATION_DEFAULTS = {
    "temperature": 4, "temperature_scheduler": "none", "hard_label_weight": 0,
    "hard_label_weight_scheduler": "none", "kd_loss_type": "ce", "kd_loss_weight": 1,
    "kd_loss_weight_scheduler": "none", "probability_shift": False,
    "intermediate_matches": None, "is_caching_logits": False,
}


def _match(**overrides):
    match = {"layer_T": 4, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1}
    match.update(overrides)
    return match


# ================================================================== TrainingConfig
class TestTrainingConfigDefaults:
    def test_defaults_equal_textbrewer_0_2_1(self):
        config = TrainingConfig()
        for name, value in TEXTBREWER_TRAINING_DEFAULTS.items():
            assert getattr(config, name) == value, name

    def test_new_fields_default_to_off(self):
        config = TrainingConfig()
        assert config.mixed_precision == "no"
        assert config.compile is False
        assert config.seed is None and config.resume_from is None
        assert config.log_steps == 20

    def test_positional_arguments_follow_textbrewer_order(self):
        config = TrainingConfig(2, 3, 4, 5, "logs", "out", "cpu", False, "O2", False, -1)
        assert [getattr(config, name) for name in TEXTBREWER_TRAINING_DEFAULTS] == \
            [2, 3, 4, 5, "logs", "out", "cpu", False, "O2", False, -1]

    def test_constructor_creates_no_directory(self, tmp_path):
        output_dir = tmp_path / "not_yet"
        TrainingConfig(output_dir=str(output_dir), log_dir=str(tmp_path / "logs"))
        assert not output_dir.exists() and not (tmp_path / "logs").exists()

    def test_device_may_be_a_torch_device(self):
        assert TrainingConfig(device=torch.device("cpu")).device == torch.device("cpu")
        TrainingConfig(device="cuda:1")   # valid name even without a GPU here


class TestTrainingConfigPrecision:
    def test_fp16_true_means_mixed_precision_fp16(self):
        assert TrainingConfig(fp16=True).mixed_precision == "fp16"

    def test_fp16_with_opt_level_o0_stays_fp32(self):
        assert TrainingConfig(fp16=True, fp16_opt_level="O0").mixed_precision == "no"

    @pytest.mark.parametrize("level", ["O1", "O2", "O3"])
    def test_fp16_with_other_opt_levels_is_fp16(self, level):
        assert TrainingConfig(fp16=True, fp16_opt_level=level).mixed_precision == "fp16"

    @pytest.mark.parametrize("choice", MIXED_PRECISION_CHOICES)
    def test_mixed_precision_choices(self, choice):
        config = TrainingConfig(mixed_precision=choice)
        assert config.mixed_precision == choice and config.fp16 is False

    def test_fp16_and_matching_mixed_precision_agree(self):
        assert TrainingConfig(fp16=True, mixed_precision="fp16").mixed_precision == "fp16"

    @pytest.mark.parametrize("choice", ["bf16", "no"])
    def test_fp16_and_conflicting_mixed_precision_name_both(self, choice):
        with pytest.raises(ValueError, match=rf"fp16=True and mixed_precision='{choice}' "
                                             r"disagree; set only one of them"):
            TrainingConfig(fp16=True, mixed_precision=choice)

    def test_choices_are_no_fp16_bf16(self):
        assert tuple(MIXED_PRECISION_CHOICES) == ("no", "fp16", "bf16")


class TestTrainingConfigValidation:
    @pytest.mark.parametrize("name", ["gradient_accumulation_steps", "ckpt_frequency",
                                      "ckpt_epoch_frequency", "ckpt_steps", "log_steps"])
    @pytest.mark.parametrize("value", [0, -3, 1.5, "2", True])
    def test_counts_must_be_positive_integers(self, name, value):
        with pytest.raises(ValueError, match=rf"^{name} must be an integer >= 1, got "):
            TrainingConfig(**{name: value})

    def test_seed_must_be_a_non_negative_integer(self):
        TrainingConfig(seed=0)
        with pytest.raises(ValueError, match=r"^seed must be an integer >= 0, got -1"):
            TrainingConfig(seed=-1)

    def test_mixed_precision_names_field_and_choices(self):
        with pytest.raises(ValueError, match=r"mixed_precision must be one of "
                                             r"\['no', 'fp16', 'bf16'\], got 'fp8'"):
            TrainingConfig(mixed_precision="fp8")

    def test_fp16_opt_level_names_field_and_choices(self):
        with pytest.raises(ValueError, match=r"fp16_opt_level must be one of "
                                             r"\['O0', 'O1', 'O2', 'O3'\], got 'O4'"):
            TrainingConfig(fp16_opt_level="O4")

    def test_device_string_is_checked(self):
        with pytest.raises(ValueError, match=r"device='gpu' is not a valid torch device.*cpu"):
            TrainingConfig(device="gpu")

    def test_device_of_wrong_type(self):
        with pytest.raises(ValueError, match=r"device must be a string or torch.device, got 0"):
            TrainingConfig(device=0)

    def test_compile_names_its_choices(self):
        with pytest.raises(ValueError, match=r"compile must be False, True or a dict"):
            TrainingConfig(compile="yes")
        assert TrainingConfig(compile={"mode": "reduce-overhead"}).compile == \
            {"mode": "reduce-overhead"}

    @pytest.mark.parametrize("value", [-2, 1.0, True])
    def test_local_rank(self, value):
        with pytest.raises(ValueError, match=r"local_rank must be -1 or a GPU index >= 0"):
            TrainingConfig(local_rank=value)

    def test_data_parallel_and_distributed_conflict_names_both(self):
        with pytest.raises(ValueError, match=r"data_parallel=True and local_rank >= 0 .* "
                                             r"mutually exclusive"):
            TrainingConfig(data_parallel=True, local_rank=0)
        TrainingConfig(data_parallel=True)
        TrainingConfig(local_rank=0)

    def test_resume_from(self):
        assert TrainingConfig(resume_from="latest").resume_from == "latest"
        with pytest.raises(ValueError, match=r"resume_from must be a path or 'latest'"):
            TrainingConfig(resume_from=3)


class TestTrainingConfigSerialisation:
    def test_dict_round_trip(self):
        config = TrainingConfig(gradient_accumulation_steps=2, ckpt_steps=10, log_dir="logs",
                                output_dir="out", device="cpu", fp16=True, seed=7,
                                compile={"dynamic": False})
        data = config.to_dict()
        assert data["mixed_precision"] == "fp16" and data["device"] == "cpu"
        assert TrainingConfig.from_dict(data) == config

    def test_torch_device_serialises_as_a_string(self):
        data = TrainingConfig(device=torch.device("cpu")).to_dict()
        assert data["device"] == "cpu"
        json.dumps(data)

    def test_from_dict_with_textbrewer_keys_only(self):
        config = TrainingConfig.from_dict({"ckpt_frequency": 2, "device": "cpu", "fp16": True})
        assert config.ckpt_frequency == 2 and config.mixed_precision == "fp16"

    def test_from_dict_unknown_key_lists_valid_keys(self):
        with pytest.raises(ValueError, match=r"TrainingConfig: unknown keys \['gradient_steps'\]; "
                                             r"valid keys: \['gradient_accumulation_steps'"):
            TrainingConfig.from_dict({"gradient_steps": 2})

    def test_from_dict_requires_a_dict(self):
        with pytest.raises(TypeError, match="expects a dict, got list"):
            TrainingConfig.from_dict([("device", "cpu")])

    def test_json_file_round_trip(self, tmp_path):
        config = TrainingConfig(ckpt_steps=5, device="cpu", mixed_precision="bf16", log_steps=3)
        path = tmp_path / "nested" / "train.json"
        config.to_json_file(path)
        with open(path, encoding="utf-8") as handle:
            assert json.load(handle) == config.to_dict()
        assert TrainingConfig.from_json_file(path) == config
        # written atomically: no temporary file left next to it
        assert os.listdir(path.parent) == ["train.json"]

    def test_from_json_file_written_by_hand(self, tmp_path):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"gradient_accumulation_steps": 4, "device": "cpu"}))
        config = TrainingConfig.from_json_file(str(path))
        assert config.gradient_accumulation_steps == 4 and config.device == "cpu"

    def test_str_lists_fields(self):
        text = str(TrainingConfig(device="cpu"))
        assert text.startswith("TrainingConfig:") and "device: 'cpu'" in text


# ================================================================== IntermediateMatch
class TestIntermediateMatch:
    def test_fields_and_positional_order_follow_textbrewer(self):
        match = IntermediateMatch(4, 1, 2.0, "attention_mse", "attention")
        assert (match.layer_T, match.layer_S, match.weight, match.loss, match.feature,
                match.proj) == (4, 1, 2.0, "attention_mse", "attention", None)

    def test_proj_gets_an_options_dict_as_in_textbrewer(self):
        proj = ["linear", 384, 768]
        match = IntermediateMatch(**_match(proj=proj))
        assert match.proj == ["linear", 384, 768, {}]
        assert proj == ["linear", 384, 768]   # the caller's list is left alone

    def test_proj_with_param_group_options(self):
        match = IntermediateMatch(**_match(proj=("relu", 3, 5, {"lr": 1e-3})))
        assert match.proj == ["relu", 3, 5, {"lr": 1e-3}]

    def test_two_layer_loss_with_lists(self):
        match = IntermediateMatch(layer_T=(0, 4), layer_S=[0, 1], weight=1, loss="nst",
                                  feature="hidden")
        assert match.layer_T == [0, 4] and match.layer_S == [0, 1]

    def test_tensorboard_name(self):
        assert IntermediateMatch(**_match()).name == "unweighted_hidden_hidden_mse_1_4"
        match = IntermediateMatch(layer_T=[0, 4], layer_S=[0, 1], weight=1, loss="fsp",
                                  feature="hidden")
        assert match.name == "unweighted_hidden_fsp_0-1_0-4"

    def test_from_dict_none_is_none(self):
        assert IntermediateMatch.from_dict(None) is None

    def test_dict_round_trip(self):
        match = IntermediateMatch(**_match(proj=["tanh", 2, 3, {"lr": 0.1}]))
        assert IntermediateMatch.from_dict(match.to_dict()) == match

    def test_from_dict_unknown_key(self):
        with pytest.raises(ValueError, match=r"intermediate match: unknown keys \['layer'\]; "
                                             r"valid keys: \['layer_T', 'layer_S'"):
            IntermediateMatch.from_dict({"layer": 1, "layer_T": 1, "layer_S": 1})

    @pytest.mark.parametrize("overrides, pattern", [
        ({"feature": "hid"},
         r"\(layer_T=4, layer_S=1\): feature must be one of \['hidden', 'attention'\], got 'hid'"),
        ({"loss": "hiden_mse"},
         r"unknown match loss 'hiden_mse'; valid choices: \[.*'hidden_mse'.*\] "
         r"\(did you mean 'hidden_mse'\?\)"),
        ({"weight": "1"}, r"weight must be a finite number, got '1'"),
        ({"weight": True}, r"weight must be a finite number, got True"),
        ({"layer_T": [0, 4]}, r"layer_T and layer_S must both be ints or both be lists"),
        ({"layer_S": 1.0}, r"layer_S must be an int or a list of ints, got 1.0"),
        ({"layer_T": [], "layer_S": []}, r"layer_T must be an int or a list of ints, got \[\]"),
        ({"loss": "nst"}, r"loss 'nst' relates two layers; give layer_T and layer_S as lists "
                          r"of two indices"),
        ({"loss": "fsp", "layer_T": [0, 1, 2], "layer_S": [0, 1, 2]}, r"loss 'fsp' relates two"),
        ({"proj": ["lin", 3, 4]},
         r"unknown projection 'lin'; valid choices: \[.*'linear', 'relu', 'tanh'\] "
         r"\(did you mean 'linear'\?\)"),
        ({"proj": ["linear", 3]}, r"proj must be \[name, dim_in, dim_out\] or "
                                  r"\[name, dim_in, dim_out, param_group_options\]"),
        ({"proj": "linear"}, r"proj must be \[name, dim_in, dim_out\]"),
        ({"proj": ["linear", "3", 4]}, r"proj\[1\] must be a positive int \(feature width\)"),
        ({"proj": ["linear", 3, 0]}, r"proj\[2\] must be a positive int"),
        ({"proj": ["linear", 3, 4, 0.1]}, r"proj\[3\] must be a dict of param-group options"),
        ({"proj": ["linear", 3, 4, {"params": []}]}, r"proj\[3\] must not set 'params'"),
    ])
    def test_validation_messages(self, overrides, pattern):
        with pytest.raises(ValueError, match=pattern):
            IntermediateMatch(**_match(**overrides))


# ================================================================== DistillationConfig
class TestDistillationConfig:
    def test_defaults_equal_textbrewer_0_2_1(self):
        config = DistillationConfig()
        for name, value in TEXTBREWER_DISTILLATION_DEFAULTS.items():
            if name == "intermediate_matches":
                assert config.intermediate_matches == []
            else:
                assert getattr(config, name) == value, name

    def test_positional_arguments_follow_textbrewer_order(self):
        config = DistillationConfig(8, "constant", 0.5, "linear_decay", "mse", 2,
                                    "linear_growth", True, None, True)
        assert (config.temperature, config.temperature_scheduler, config.hard_label_weight,
                config.hard_label_weight_scheduler, config.kd_loss_type, config.kd_loss_weight,
                config.kd_loss_weight_scheduler, config.probability_shift,
                config.intermediate_matches, config.is_caching_logits) == \
            (8, "constant", 0.5, "linear_decay", "mse", 2, "linear_growth", True, [], True)

    def test_matches_become_intermediate_match_objects(self):
        config = DistillationConfig(intermediate_matches=[
            _match(), IntermediateMatch(layer_T=[0, 4], layer_S=[0, 1], weight=1, loss="nst",
                                        feature="hidden")])
        assert all(isinstance(m, IntermediateMatch) for m in config.intermediate_matches)
        assert config.intermediate_matches[0].layer_T == 4
        assert config.intermediate_matches[1].loss == "nst"

    @pytest.mark.parametrize("spec", ["none", "constant", ["flsw", 1, 2], ["cwsm", 1]])
    def test_temperature_scheduler_forms(self, spec):
        assert DistillationConfig(temperature_scheduler=spec).temperature_scheduler == spec

    def test_temperature_scheduler_tuple_becomes_a_list(self):
        config = DistillationConfig(temperature_scheduler=("flsw", 1, 2))
        assert config.temperature_scheduler == ["flsw", 1, 2]

    @pytest.mark.parametrize("kd_loss_type", ["ce", "mse", "kl"])
    def test_kd_loss_types(self, kd_loss_type):
        assert DistillationConfig(kd_loss_type=kd_loss_type).kd_loss_type == kd_loss_type

    @pytest.mark.parametrize("kwargs, pattern", [
        ({"kd_loss_type": "cee"},
         r"^kd_loss_type: unknown kd_loss 'cee'; valid choices: \[.*'ce'.*'mse'.*\] "
         r"\(did you mean 'ce'\?\)"),
        ({"temperature": 0}, r"^temperature must be > 0, got 0"),
        ({"temperature": -1.0}, r"^temperature must be > 0"),
        ({"temperature": "4"}, r"^temperature must be a number, got '4'"),
        ({"hard_label_weight": None}, r"^hard_label_weight must be a number, got None"),
        ({"kd_loss_weight": True}, r"^kd_loss_weight must be a number, got True"),
        ({"temperature_scheduler": "flsw"},
         r"^temperature_scheduler: temperature scheduler 'flsw' takes parameters: "
         r"write it as \['flsw', param, \.\.\.\] \(or 'none'\)"),
        ({"temperature_scheduler": "linear"},
         r"^temperature_scheduler: unknown temperature scheduler 'linear'; valid choices: "
         r"\['constant', 'cwsm', 'flsw'\].*\(or 'none'\)"),
        ({"hard_label_weight_scheduler": "linear"},
         r"^hard_label_weight_scheduler: unknown weight scheduler 'linear'; valid choices: "
         r"\[.*'linear_decay', 'linear_growth'.*\].*\(or 'none'\)"),
        ({"kd_loss_weight_scheduler": "decay"},
         r"^kd_loss_weight_scheduler: unknown weight scheduler 'decay'; valid choices: "
         r"\[.*'linear_decay', 'linear_growth'.*\]"),
        ({"intermediate_matches": [_match(), _match(feature="hid")]},
         r"^intermediate_matches\[1\]: intermediate match \(layer_T=4, layer_S=1\): "
         r"feature must be one of \['hidden', 'attention'\]"),
        ({"intermediate_matches": [_match(proj=["lin", 3, 4])]},
         r"^intermediate_matches\[0\]: .*unknown projection 'lin'; valid choices: "
         r"\[.*'linear', 'relu', 'tanh'.*\]"),
        ({"intermediate_matches": [_match(bogus=1)]},
         r"^intermediate_matches\[0\]: intermediate match: unknown keys \['bogus'\]"),
        ({"intermediate_matches": [("hidden", 1, 4)]},
         r"^intermediate_matches\[0\]: expected a dict, got tuple"),
        ({"intermediate_matches": [{"layer_T": 1}]},
         r"^intermediate_matches\[0\]: .*layer_S"),
    ])
    def test_validation_messages(self, kwargs, pattern):
        with pytest.raises(ValueError, match=pattern):
            DistillationConfig(**kwargs)

    def test_dict_round_trip(self):
        config = DistillationConfig(
            temperature=8, temperature_scheduler=["flsw", 1, 2], hard_label_weight=0.5,
            kd_loss_weight_scheduler="linear_decay", probability_shift=True,
            intermediate_matches=[
                _match(proj=["linear", 3, 4]),
                {"layer_T": [0, 4], "layer_S": [0, 1], "feature": "hidden", "loss": "nst",
                 "weight": 2}])
        data = config.to_dict()
        assert data["intermediate_matches"][0] == {
            "layer_T": 4, "layer_S": 1, "weight": 1, "loss": "hidden_mse", "feature": "hidden",
            "proj": ["linear", 3, 4, {}]}
        assert data["temperature_scheduler"] == ["flsw", 1, 2]
        assert DistillationConfig.from_dict(data) == config

    def test_json_file_round_trip(self, tmp_path):
        config = DistillationConfig(kd_loss_type="mse", temperature_scheduler=["cwsm", 2],
                                    intermediate_matches=[_match(loss="cos")])
        path = tmp_path / "distill.json"
        config.to_json_file(str(path))
        with open(path, encoding="utf-8") as handle:
            assert json.load(handle) == config.to_dict()
        assert DistillationConfig.from_json_file(path) == config

    def test_from_json_file_in_textbrewer_form(self, tmp_path):
        path = tmp_path / "distill.json"
        path.write_text(json.dumps({
            "temperature": 8, "hard_label_weight": 0.3,
            "intermediate_matches": [{"layer_T": 8, "layer_S": 2, "feature": "attention",
                                      "loss": "attention_mse", "weight": 1}]}))
        config = DistillationConfig.from_json_file(path)
        assert config.temperature == 8 and config.hard_label_weight == 0.3
        assert config.intermediate_matches[0] == IntermediateMatch(
            layer_T=8, layer_S=2, weight=1, loss="attention_mse", feature="attention")

    def test_from_dict_unknown_key(self):
        with pytest.raises(ValueError, match=r"DistillationConfig: unknown keys \['temp'\]"):
            DistillationConfig.from_dict({"temp": 2})

    def test_caller_s_match_dicts_are_not_modified(self):
        matches = [_match(proj=["linear", 3, 4])]
        DistillationConfig(intermediate_matches=matches)
        assert matches == [_match(proj=["linear", 3, 4])]
