"""Feature capture by module name (textbrewer/capture.py) and matches that use it."""
import collections
import copy

import pytest
import torch
from torch import nn

from textbrewer import DistillationConfig, GeneralDistiller, IntermediateMatch, TrainingConfig
from textbrewer.capture import ModuleCapture, first_tensor
from textbrewer.testing import TinyTransformer, make_classification_data, tiny_adaptor


class _Pair(nn.Module):
    """Returns a tuple, like a transformer layer (hidden, attention)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(x), x.sum()


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), _Pair(), nn.Sequential(nn.ReLU()))


def test_captures_outputs_inputs_and_the_first_tensor_of_tuples():
    net = _net()
    x = torch.randn(2, 4)
    outputs = ModuleCapture(net, ["0", "1"], "output", "student")
    inputs = ModuleCapture(net, ["1"], "input", "student")
    with outputs, inputs:
        net[2](net[1](net[0](x))[0])
    hidden = net[0](x)
    torch.testing.assert_close(outputs["0"], hidden)
    torch.testing.assert_close(inputs["1"], hidden)          # what layer "1" received
    torch.testing.assert_close(outputs["1"], net[1].linear(hidden))  # tuple -> first tensor
    outputs.remove()
    inputs.remove()
    assert not net[0]._forward_hooks and not net[1]._forward_pre_hooks


def test_records_only_while_active_and_names_modules_that_did_not_run():
    net = _net()
    capture = ModuleCapture(net, ["0", "2"], role="teacher")
    capture.attach()
    net[0](torch.randn(2, 4))  # outside the with-block: an evaluation, say
    with capture:
        net[0](torch.randn(2, 4))
        with pytest.raises(KeyError, match="the teacher's module '2' did not run"):
            capture["2"]
        with pytest.raises(KeyError, match="'9' is not captured"):
            capture["9"]
    capture.remove()


def test_unknown_module_name_lists_the_closest_names():
    model = TinyTransformer(vocab_size=12, hidden_size=8, num_layers=2)
    with pytest.raises(ValueError, match=r"the student \(TinyTransformer\) has no submodule "
                                         r"'layers\.5'; closest: \['layers\.1', 'layers\.0'"):
        ModuleCapture(model, ["layers.5"], role="student")


def test_first_tensor_of_mappings_tuples_and_errors():
    tensor = torch.ones(2)
    output = collections.OrderedDict(loss=None, logits=tensor, hidden=torch.zeros(1))
    assert first_tensor(output) is tensor  # a ModelOutput skips its None entries
    assert first_tensor(((tensor, 1), 2)) is tensor
    with pytest.raises(TypeError, match="no tensor in a captured str"):
        first_tensor("text")


def test_match_validation():
    with pytest.raises(ValueError, match="give either layer_T/layer_S or module_T/module_S"):
        IntermediateMatch(layer_T=1, layer_S=0, module_T="a", module_S="b")
    with pytest.raises(ValueError, match="module_S must be a submodule name"):
        IntermediateMatch(module_T="a")
    with pytest.raises(ValueError, match="give layer_T and layer_S"):
        IntermediateMatch()
    with pytest.raises(ValueError, match="capture must be one of \\['output', 'input'\\]"):
        IntermediateMatch(module_T="a", module_S="b", capture="grad")
    match = IntermediateMatch(module_T="layers.1", module_S="layers.0", loss="crd",
                              loss_options={"dim_in": 8, "dim_out": 16})
    assert IntermediateMatch.from_dict(match.to_dict()) == match
    assert match.name == "unweighted_module_crd_layers.0_layers.1"
    # a 0.2.1 match serialises exactly as before (no new keys)
    assert sorted(IntermediateMatch(2, 1).to_dict()) == ["feature", "layer_S", "layer_T", "loss",
                                                         "proj", "weight"]


def _train(tmp_path, matches, adaptor=tiny_adaptor, **train):
    torch.manual_seed(0)
    teacher = TinyTransformer(vocab_size=12, hidden_size=16, num_layers=2)
    student = TinyTransformer(vocab_size=12, hidden_size=8, num_layers=1, dropout=0.1)
    data = make_classification_data(16, length=6, vocab_size=12, seed=3)
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in data.items()} for i in range(16)],
                                         batch_size=4, shuffle=True)
    torch.manual_seed(1)
    distiller = GeneralDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path), **train),
                                 DistillationConfig(hard_label_weight=0.5,
                                                    intermediate_matches=matches),
                                 teacher, student, adaptor, adaptor)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    torch.manual_seed(2)
    with distiller:
        distiller.train(optimizer, loader, num_epochs=2)
    return student, distiller, optimizer


def test_a_module_named_match_trains_exactly_as_the_adaptor_index_match(tmp_path):
    # TinyTransformer's layers.i returns (hidden, scores): hidden_states[i + 1]
    by_index = [{"layer_T": 2, "layer_S": 1, "loss": "hidden_mse", "proj": ["linear", 8, 16]}]
    by_name = [{"module_T": "layers.1", "module_S": "layers.0", "loss": "hidden_mse",
                "proj": ["linear", 8, 16]}]
    reference, _, _ = _train(tmp_path / "index", by_index)
    student, distiller, _ = _train(tmp_path / "name", by_name)
    for key, value in reference.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key
    # the hooks exist only while training
    assert not student.layers[0]._forward_hooks
    assert not distiller.model_T.layers[1]._forward_hooks


def test_a_loss_with_weights_trains_and_resumes(tmp_path):
    crd = [{"module_T": "classifier", "module_S": "classifier", "capture": "input",
            "loss": "crd", "weight": 0.5,
            "loss_options": {"dim_in": 8, "dim_out": 16, "feat_dim": 4, "queue_size": 8}}]
    student, distiller, optimizer = _train(tmp_path / "crd", crd, keep_train_states=None)
    module = distiller.composer.loss_modules["0"]
    # the loss module joined the optimizer and was trained (its own param group)
    assert len(optimizer.param_groups) == 2
    assert {id(p) for p in module.parameters()} == {id(p) for p in optimizer.param_groups[1]["params"]}
    state = torch.load(tmp_path / "crd" / "gs4.train_state.pt", weights_only=True)
    assert len(state["extras"]) == 1 and any("queue" in key for key in state["extras"][0])


def test_module_matches_under_compile_and_bf16(tmp_path):
    by_name = [{"module_T": "layers.1", "module_S": "layers.0", "loss": "hidden_mse",
                "proj": ["linear", 8, 16]},
               {"module_T": "classifier", "module_S": "classifier", "capture": "input",
                "loss": "rkd_distance", "weight": 0.5}]
    eager, _, _ = _train(tmp_path / "eager", by_name)
    # torch.compile traces the hooks into the graph (backend 'eager': no code generation)
    compiled, distiller, _ = _train(tmp_path / "compiled", by_name, compile={"backend": "eager"})
    assert hasattr(distiller._student_forward, "_orig_mod")
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    bf16, distiller, _ = _train(tmp_path / "bf16", by_name, mixed_precision="bf16")
    assert all(torch.isfinite(p).all() for p in bf16.parameters())
    assert not bf16.layers[0]._forward_hooks


def test_a_conv1x1_projection_between_feature_maps(tmp_path):
    """FitNets on conv maps from the config: the projection's widths are the channels."""
    class Net(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv = nn.Conv2d(1, channels, 3, padding=1)
            self.head = nn.Linear(channels * 36, 3)

        def forward(self, x):
            return {"logits": self.head(self.conv(x).flatten(1))}

    torch.manual_seed(0)
    teacher, student = Net(8), Net(4)
    loader = [(torch.randn(4, 1, 6, 6),)] * 2

    def adaptor(batch, outputs):
        return {"logits": outputs["logits"]}
    match = {"module_T": "conv", "module_S": "conv", "loss": "fitnet",
             "proj": ["conv1x1", 4, 8]}
    distiller = GeneralDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                                 DistillationConfig(intermediate_matches=[match]), teacher,
                                 student, adaptor, adaptor)
    projection = copy.deepcopy(distiller.projs[0])
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), loader, num_epochs=1)
    assert not torch.equal(projection[0].weight, distiller.projs[0][0].weight)  # trained
    bad = dict(match, proj=["conv1x1", 6, 8])
    distiller = GeneralDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path / "b")),
                                 DistillationConfig(intermediate_matches=[bad]), teacher,
                                 student, adaptor, adaptor)
    with pytest.raises(Exception, match=r"expects student hidden width 6 but got \[4\]"):
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), loader, num_epochs=1)
