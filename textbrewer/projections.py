"""Projections that map a student feature (…, dim_in) to the teacher's width (…, dim_out).

They are applied to the student's side only. Weights are drawn from N(0, 0.02) and biases
zeroed, as in TextBrewer 0.2.1 (the layer is built first with PyTorch's default init, so a
seeded run draws the same random numbers as the original).
"""
from typing import Callable

from torch import nn

from .registry import PROJECTIONS

__all__ = ["linear_projection", "projection_with_activation", "initializer_builder"]


def initializer_builder(std: float) -> Callable[[nn.Module], None]:
    """Returns ``init(module)``: N(0, std) weights for Linear/Embedding, zero Linear bias."""

    def init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    return init_weights


@PROJECTIONS.register("linear")
def linear_projection(dim_in: int, dim_out: int) -> nn.Module:
    """``nn.Linear(dim_in, dim_out)``: (…, dim_in) -> (…, dim_out)."""
    layer = nn.Linear(in_features=dim_in, out_features=dim_out, bias=True)
    initializer_builder(0.02)(layer)
    return layer


def projection_with_activation(activation: str) -> Callable[[int, int], nn.Module]:
    """Builder of ``Linear(dim_in, dim_out)`` followed by ``torch.nn.<activation>()``."""
    activation_class = getattr(nn, activation)

    def projection(dim_in: int, dim_out: int) -> nn.Module:
        layer = nn.Sequential(nn.Linear(in_features=dim_in, out_features=dim_out, bias=True),
                              activation_class())
        layer.apply(initializer_builder(0.02))
        return layer

    projection.__name__ = f"linear_{activation.lower()}_projection"
    return projection


PROJECTIONS.add("relu", projection_with_activation("ReLU"))
PROJECTIONS.add("tanh", projection_with_activation("Tanh"))


__all__ += ["conv1x1_projection"]


@PROJECTIONS.register("conv1x1")
def conv1x1_projection(dim_in: int, dim_out: int) -> nn.Module:
    """1×1 convolution + batch norm, for CNN feature maps: (N, dim_in, H, W) -> (N, dim_out, H, W).

    The learned regressor of FitNets (Romero et al., 2015, arXiv:1412.6550) in the form most
    later work uses (e.g. CRD's ``ConvReg``): ``BatchNorm2d(Conv2d(dim_in, dim_out, 1))``,
    PyTorch's default initialisation. For (…, dim) features use ``'linear'``.
    """
    return nn.Sequential(nn.Conv2d(dim_in, dim_out, kernel_size=1, bias=False),
                         nn.BatchNorm2d(dim_out))
