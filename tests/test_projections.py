"""Projections (textbrewer/projections.py): shapes, N(0, 0.02) init, zero bias, activations,
and the same random-number consumption as TextBrewer 0.2.1 (build nn.Linear, then normal_)."""
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import textbrewer  # noqa: F401  (fills the registries)
from textbrewer.projections import (initializer_builder, linear_projection,
                                    projection_with_activation)
from textbrewer.registry import PROJECTIONS

NAMES = ["linear", "relu", "tanh"]


def _linear(module):
    return module if isinstance(module, nn.Linear) else module[0]


def test_registered_names_are_textbrewer_s():
    assert set(NAMES) <= set(PROJECTIONS.names())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 3), (2, 2, 4, 3)])
def test_output_shape_maps_the_last_dimension(name, shape):
    torch.manual_seed(0)
    projection = PROJECTIONS[name](3, 7)
    assert projection(torch.randn(*shape)).shape == (*shape[:-1], 7)


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_normal_with_std_002_and_bias_zero(name):
    torch.manual_seed(0)
    layer = _linear(PROJECTIONS[name](256, 512))   # 131072 weights: sample std within ~1e-4
    weight = layer.weight.detach()
    assert weight.shape == (512, 256)
    assert abs(weight.std().item() - 0.02) < 1e-3
    assert abs(weight.mean().item()) < 1e-3
    # not PyTorch's default kaiming-uniform: that would be bounded by 1/sqrt(256) = 0.0625
    # with std ≈ 0.036; a normal has tails past 4 std (0.08)
    assert weight.abs().max().item() > 0.0625
    assert torch.count_nonzero(layer.bias) == 0
    assert layer.bias.shape == (512,)


def test_linear_is_a_bare_linear_layer():
    projection = PROJECTIONS["linear"](3, 4)
    assert type(projection) is nn.Linear
    x = torch.randn(2, 3)
    assert_close(projection(x), x @ projection.weight.T)   # bias is zero


@pytest.mark.parametrize("name, activation", [("relu", torch.relu), ("tanh", torch.tanh)])
def test_activation_is_applied_after_the_linear_layer(name, activation):
    torch.manual_seed(1)
    projection = PROJECTIONS[name](4, 6)
    assert isinstance(projection, nn.Sequential) and len(projection) == 2
    assert isinstance(projection[1], {"relu": nn.ReLU, "tanh": nn.Tanh}[name])
    x = torch.randn(3, 4) * 10
    pre_activation = x @ projection[0].weight.T
    output = projection(x)
    assert_close(output, activation(pre_activation))
    if name == "relu":
        assert (output >= 0).all() and (output == 0).any()
    else:
        assert (output.abs() < 1).all() and (output < 0).any()


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_weights_as_linear_then_normal(name):
    """TextBrewer 0.2.1 built nn.Linear (default init draws numbers) and then normal_(0, 0.02):
    a seeded run must draw the same numbers and leave the generator in the same state."""
    torch.manual_seed(1234)
    expected = nn.Linear(6, 5, bias=True)
    expected.weight.data.normal_(mean=0.0, std=0.02)
    expected.bias.data.zero_()
    next_expected = torch.rand(3)

    torch.manual_seed(1234)
    layer = _linear(PROJECTIONS[name](6, 5))
    next_actual = torch.rand(3)

    assert torch.equal(layer.weight, expected.weight)
    assert torch.equal(layer.bias, expected.bias)
    assert torch.equal(next_actual, next_expected)


def test_projection_parameters_are_trainable():
    projection = PROJECTIONS["relu"](3, 4)
    parameters = list(projection.parameters())
    assert len(parameters) == 2 and all(p.requires_grad for p in parameters)
    projection(torch.randn(2, 3) + 1).sum().backward()
    assert all(p.grad is not None for p in parameters)


def test_initializer_builder_on_embedding_and_linear_without_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(300, 100), nn.Linear(100, 50, bias=False))
    model.apply(initializer_builder(0.5))
    assert abs(model[0].weight.std().item() - 0.5) < 0.01
    assert abs(model[1].weight.std().item() - 0.5) < 0.02


def test_projection_with_activation_builds_named_activation():
    build = projection_with_activation("GELU")
    projection = build(2, 3)
    assert isinstance(projection[1], nn.GELU)
    assert build.__name__ == "linear_gelu_projection"


