"""Data-free distillation: the student never sees real data.

Two schemes:

* **DeepInversion** (Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via
  DeepInversion", CVPR 2020, arXiv:1912.08795): a batch of inputs is optimised from
  noise so that the statistics of the teacher's batch-norm inputs match the teacher's
  running statistics, the teacher classifies it as chosen target classes, and image
  priors (total variation, L2) keep it smooth; the student is then distilled on the
  synthesised inputs. :class:`DeepInversionSynthesizer` is that optimisation as a
  training run of the one loop (its "student" is the :class:`SyntheticBatch`, so it
  checkpoints and resumes like any run); :func:`synthesize_deep_inversion` makes a data
  set of several batches; any distiller then distils on it.
* **DFAD** (Fang et al., "Data-Free Adversarial Distillation", arXiv:1912.11006): a
  generator ``G(z)`` and the student play a game. Each step has two phases:
  ``generator`` maximises the teacher–student discrepancy ``mean |T(G(z)) - S(G(z))|``
  (teacher and student frozen), then ``student`` minimises it on ``G(z)`` (generator
  frozen). :class:`DFADDistiller`; its data are noise batches (:class:`NoiseBatches`,
  the default), so ``train(optimizer, num_steps=...)`` needs no dataloader.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..adaptors import AdaptorError
from ..configurations import DistillationConfig, TrainingConfig
from ..distillers.basic import BasicDistiller
from ..distillers.engine import AbstractDistiller, Phase, forward_model
from ..training.phase import check_optimizer_holds
from .adversarial import frozen_call

__all__ = ["NoiseBatches", "MLPGenerator", "DFADDistiller", "SyntheticBatch",
           "DeepInversionSynthesizer", "synthesize_deep_inversion", "total_variation"]

Shape = Union[int, Sequence[int]]


def _shape(shape: Shape) -> Tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"a shape of positive sizes is needed, got {shape!r}")
    return shape


def _logits_of(outputs: Any) -> Any:
    """The default adaptor of the data-free schemes: a tensor output is the logits, a dict
    gives its ``'logits'``."""
    if isinstance(outputs, torch.Tensor):
        return {"logits": outputs}
    if isinstance(outputs, dict) and "logits" in outputs:
        return {"logits": outputs["logits"]}
    raise AdaptorError(f"the model returned {type(outputs).__name__}; give an adaptor that "
                       f"returns {{'logits': ...}}")


class NoiseBatches:
    """A sized, resumable iterable of Gaussian noise batches: the "dataloader" of a
    data-free run.

    Args:
        batch_size: B.
        shape: the shape of one noise vector (e.g. ``noise_dim``, or ``(C, H, W)``).
        num_batches: batches per pass (``len()``; an epoch in ``train(num_epochs=...)``).
        seed: seeds its own ``torch.Generator`` (exposed as ``.generator``, which the
            training loop saves and restores: a resumed run draws the same noise). Under
            DDP give each process its own seed (``seed + rank``).

    Yields:
        ``(B, *shape)`` float32 tensors on the CPU.
    """

    def __init__(self, batch_size: int, shape: Shape, num_batches: int = 1, seed: int = 0):
        if batch_size < 1 or num_batches < 1:
            raise ValueError(f"NoiseBatches needs batch_size ≥ 1 and num_batches ≥ 1, got "
                             f"{batch_size} and {num_batches}")
        self.batch_size = batch_size
        self.shape = _shape(shape)
        self.num_batches = num_batches
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.num_batches):
            yield torch.randn((self.batch_size, *self.shape), generator=self.generator)


class MLPGenerator(nn.Module):
    r"""A small generator ``z -> x`` (DFAD's, as an MLP): Linear, BatchNorm, LeakyReLU
    blocks, then a Linear to the output and an optional squashing.

    Args:
        noise_dim: Z.
        output_shape: the shape of one generated input (e.g. 64, or (8, 8)).
        hidden_size: width of the hidden layers.
        num_layers: hidden layers.
        output_activation: ``'sigmoid'`` (inputs in [0, 1]), ``'tanh'`` ([-1, 1]) or None.

    Forward: (B, Z) -> (B, \*output_shape).
    """

    def __init__(self, noise_dim: int, output_shape: Shape, hidden_size: int = 128,
                 num_layers: int = 2, output_activation: Optional[str] = "sigmoid"):
        super().__init__()
        if output_activation not in ("sigmoid", "tanh", None):
            raise ValueError(f"output_activation must be 'sigmoid', 'tanh' or None, got "
                             f"{output_activation!r}")
        self.noise_dim = noise_dim
        self.output_shape = _shape(output_shape)
        layers: List[nn.Module] = []
        width = noise_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.BatchNorm1d(hidden_size),
                       nn.LeakyReLU(0.2)]
            width = hidden_size
        out = 1
        for size in self.output_shape:
            out *= size
        layers.append(nn.Linear(width, out))
        self.net = nn.Sequential(*layers)
        self.output_activation = output_activation

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.size(1) != self.noise_dim:
            raise ValueError(f"MLPGenerator expects noise of shape (B, {self.noise_dim}), got "
                             f"{tuple(z.shape)}")
        x = self.net(z)
        if self.output_activation == "sigmoid":
            x = torch.sigmoid(x)
        elif self.output_activation == "tanh":
            x = torch.tanh(x)
        return x.view(z.size(0), *self.output_shape)


# ---------------------------------------------------------------------------------- DFAD
class DFADDistiller(BasicDistiller):
    """Data-free adversarial distillation: a generator phase, then the student's.

    ``generator`` phase: ``-D(T(G(z)), S(G(z)))``, gradients to G only (teacher and
    student run with detached parameters). ``student`` phase: ``D(S(x), T(x))`` on
    ``x = G(z)`` computed without gradients. ``D`` is the mean absolute difference of the
    logits (``discrepancy='l1'``, the paper's), or the configured KD loss
    (``discrepancy='kd'``: ``kd_loss_type`` at ``temperature``).

    Args:
        train_config, distill_config, model_T, model_S: as for
            :class:`~textbrewer.BasicDistiller` (``distill_config`` is used by
            ``discrepancy='kd'`` only; hard labels do not exist here).
        adaptor_T, adaptor_S: ``adaptor(batch, outputs) -> {'logits': ...}``; default
            (None): a tensor output is the logits, a dict output gives its ``'logits'``.
        generator: ``G: (B, *noise_shape) -> inputs``.
        generator_optimizer: default ``Adam(G.parameters(), lr=generator_lr)``.
        generator_scheduler: an LR scheduler stepped with it, or None.
        noise_shape: the shape of one noise vector (default ``generator.noise_dim``).
        batch_size: B of the default noise batches.
        to_batch: ``x -> batch`` as the models take it (default: ``x`` itself, called as
            ``model(x)``; e.g. ``lambda x: {'features': x}``).
        discrepancy: ``'l1'`` or ``'kd'``.
        generator_lr: the default optimizer's learning rate.
        generator_max_grad_norm: clip G's gradients (≤ 0: no clipping).

    The data: each micro-batch is a noise tensor ``z`` of shape ``(B, *noise_shape)``, as
    :class:`NoiseBatches` yields (``train(optimizer, num_steps=...)`` without a
    dataloader builds ``NoiseBatches(batch_size, noise_shape, seed=TrainingConfig.seed +
    rank)``); any other batch (say, the items of ``range(n)``) stands for one draw of ``z``
    from torch's global generator in each phase.

    Logged terms: ``generator/discrepancy``, ``student/discrepancy``.
    """

    supports_logits_caching = False

    def __init__(self, train_config: TrainingConfig, distill_config: DistillationConfig,
                 model_T: nn.Module, model_S: nn.Module, adaptor_T: Optional[Callable] = None,
                 adaptor_S: Optional[Callable] = None, *, generator: nn.Module,
                 generator_optimizer: Optional[torch.optim.Optimizer] = None,
                 generator_scheduler: Any = None, noise_shape: Optional[Shape] = None,
                 batch_size: int = 64, to_batch: Optional[Callable] = None,
                 discrepancy: str = "l1", generator_lr: float = 1e-3,
                 generator_max_grad_norm: float = -1.0):
        if not isinstance(model_T, nn.Module):
            raise TypeError(f"DFADDistiller needs one teacher nn.Module, got "
                            f"{type(model_T).__name__}")
        if not isinstance(generator, nn.Module):
            raise TypeError(f"generator must be an nn.Module, got {type(generator).__name__}")
        if discrepancy not in ("l1", "kd"):
            raise ValueError(f"discrepancy must be 'l1' or 'kd', got {discrepancy!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1 (noise vectors per batch), "
                             f"got {batch_size!r}")
        if generator_optimizer is not None and \
                not isinstance(generator_optimizer, torch.optim.Optimizer):
            raise TypeError(f"generator_optimizer must be a torch.optim.Optimizer over the "
                            f"generator's parameters (or None for Adam), got "
                            f"{type(generator_optimizer).__name__}")
        if noise_shape is None:
            if not hasattr(generator, "noise_dim"):
                raise ValueError("give noise_shape (the shape of one noise vector): the "
                                 "generator has no noise_dim attribute")
            noise_shape = generator.noise_dim
        super().__init__(train_config, distill_config, model_T, model_S,
                         adaptor_T or (lambda batch, outputs: _logits_of(outputs)),
                         adaptor_S or (lambda batch, outputs: _logits_of(outputs)))
        self.generator = generator.to(self.runtime.device)
        if generator_optimizer is None:
            generator_optimizer = torch.optim.Adam(generator.parameters(), lr=generator_lr)
        check_optimizer_holds(generator_optimizer, "generator_optimizer", generator.parameters(),
                              "the generator's parameters", "generator.parameters()",
                              changes="the generator's phase",
                              forbidden=[(model_S.parameters(), "parameters of the student",
                                          "the student has its own optimizer")])
        self.generator_optimizer = generator_optimizer
        self.generator_scheduler = generator_scheduler
        self.generator_max_grad_norm = generator_max_grad_norm
        self.noise_shape = _shape(noise_shape)
        self.batch_size = batch_size
        self.to_batch = to_batch
        self.discrepancy_type = discrepancy

    def train(self, optimizer: torch.optim.Optimizer, dataloader: Any = None, *args,
              **kwargs) -> None:
        """As :meth:`~textbrewer.distillers.compat.TextBrewerFacade.train`; without a
        ``dataloader``, noise batches (:class:`NoiseBatches`, one batch per "epoch")."""
        if dataloader is None:
            seed = (self.t_config.seed or 0) + self.runtime.rank
            dataloader = NoiseBatches(self.batch_size, self.noise_shape, 1, seed)
        return super().train(optimizer, dataloader, *args, **kwargs)

    def phases(self, student_phase: Phase) -> List[Phase]:
        """The generator's phase, then the student's."""
        return [Phase("generator", self.generator_optimizer, self.generator_loss,
                      [self.generator], self.generator_scheduler, self.generator_max_grad_norm),
                student_phase]

    def noise(self, batch: Any) -> torch.Tensor:
        """``z`` ``(B, *noise_shape)`` on the device: the batch itself when it is a floating
        tensor, else a fresh draw from torch's global generator."""
        if isinstance(batch, torch.Tensor) and batch.is_floating_point():
            if tuple(batch.shape[1:]) != self.noise_shape:
                raise ValueError(f"a noise batch of shape {tuple(batch.shape)} but "
                                 f"noise_shape={self.noise_shape}")
            return self.runtime.to_device(batch)
        return torch.randn((self.batch_size, *self.noise_shape), device=self.runtime.device)

    def _model_batch(self, x: torch.Tensor) -> Any:
        return self.to_batch(x) if self.to_batch is not None else x

    def discrepancy(self, results_S: Dict[str, Any], results_T: Dict[str, Any]) -> torch.Tensor:
        """``mean |logits_S - logits_T|`` summed over heads (``'l1'``), or the KD term."""
        logits_S, logits_T, _ = self.composer.select_logits(results_S, results_T)
        if self.discrepancy_type == "kd":
            return self.composer.kd_term(logits_S, logits_T, None)
        total = 0
        for head_S, head_T in zip(logits_S, logits_T):
            total = total + (head_S.float() - head_T.float()).abs().mean()
        return total

    def generator_loss(self, batch: Any, args: Dict[str, Any]):
        """The generator phase: ``-discrepancy`` on ``G(z)``; teacher and student frozen."""
        x = self.wrapped(self.generator)(self.noise(batch))
        model_batch = self._model_batch(x)
        try:
            outputs_T = forward_model(functools.partial(frozen_call, self.model_T), model_batch,
                                      args)
        except RuntimeError as error:
            if isinstance(error, torch.cuda.OutOfMemoryError):
                raise
            raise ValueError(f"DFADDistiller: the teacher failed on the generator's output of "
                             f"shape {tuple(x.shape)} ({error}); the generator must produce the "
                             f"inputs the models take (its output_shape, or to_batch)"
                             ) from error
        outputs_S = forward_model(functools.partial(frozen_call, self.model_S), model_batch, args)
        results_T = self.adapt_teacher(model_batch, outputs_T)
        results_S = self.adapt(self.adaptor_S, model_batch, outputs_S, "the student's adaptor")
        gap = self.discrepancy(results_S, results_T)
        return -gap, {"discrepancy": gap.detach()}

    def train_on_batch(self, batch: Any, args: Dict[str, Any]):
        """The student phase: ``discrepancy`` on ``G(z)`` made without gradients."""
        with torch.no_grad():
            x = self.generator(self.noise(batch))
        model_batch = self._model_batch(x)
        outputs_T = self.teacher_outputs(model_batch, args)
        outputs_S = self.forward_student(model_batch, args)
        results_T = self.adapt_teacher(model_batch, outputs_T)
        results_S = self.adapt(self.adaptor_S, model_batch, outputs_S, "the student's adaptor")
        gap = self.discrepancy(results_S, results_T)
        return gap, {"discrepancy": gap}


# ------------------------------------------------------------------------------ DeepInversion
def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic TV).

    Args:
        x: (B, ..., H, W) images.

    Returns:
        () the mean over both directions.
    """
    if x.dim() < 3:
        raise ValueError(f"total_variation needs (B, ..., H, W) images, got {tuple(x.shape)}")
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
            + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())


class SyntheticBatch(nn.Module):
    r"""A batch of inputs being optimised, and the classes they should become.

    Args:
        inputs: (B, \*input_shape) initial values (e.g. noise); becomes a Parameter.
        targets: (B,) long target classes.

    Forward: () -> the (B, \*input_shape) inputs.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        super().__init__()
        if targets.dim() != 1 or targets.size(0) != inputs.size(0):
            raise ValueError(f"targets must be (B,) = ({inputs.size(0)},), got "
                             f"{tuple(targets.shape)}")
        self.inputs = nn.Parameter(inputs.detach().clone().float())
        self.register_buffer("targets", targets.detach().clone().long())

    def forward(self) -> torch.Tensor:
        return self.inputs


class DeepInversionSynthesizer(AbstractDistiller):
    """DeepInversion: optimises a :class:`SyntheticBatch` against a frozen teacher.

    The run's "student" is the batch: ``train(optimizer, num_steps=iterations)`` with an
    optimizer over ``batch.parameters()`` (Adam, lr about 0.05-0.1) takes ``iterations``
    steps on

    ``bn_weight · Σ_l w_l (‖μ_l(x) - μ_l‖₂ + ‖σ²_l(x) - σ²_l‖₂) + ce_weight · CE(T(x), y)
    + tv_weight · TV(x) + l2_weight · mean(x²)``

    where ``μ_l(x), σ²_l(x)`` are the per-channel mean and (biased) variance of the input
    of the teacher's batch-norm layer ``l`` on the batch, ``μ_l, σ²_l`` its running
    statistics, ``w_0 = first_bn_weight`` and ``w_l = 1`` after. The teacher stays in eval
    mode and its parameters get no gradient. Checkpoints (``gs{N}.pkl``) hold the batch.

    Args:
        train_config: :class:`~textbrewer.TrainingConfig` (``output_dir`` receives the
            batch's checkpoints).
        model_T: the teacher, with batch-norm layers (else only CE and priors remain).
        batch: the :class:`SyntheticBatch` to optimise.
        adaptor_T: ``adaptor(batch, outputs) -> {'logits': (B, C)}``; default: a tensor
            output is the logits, a dict gives its ``'logits'``.
        to_batch: ``x -> batch`` as the teacher takes it (default: ``model_T(x)``).
        bn_weight, ce_weight, tv_weight, l2_weight: the terms' weights.
        first_bn_weight: extra weight of the first batch-norm layer (the paper's code: 10).
        image_shape: ``(H, W)`` to view each input as an image for TV (default: the
            inputs' last two dimensions, when they have them).
    """

    def __init__(self, train_config: TrainingConfig, model_T: nn.Module, batch: SyntheticBatch,
                 adaptor_T: Optional[Callable] = None, to_batch: Optional[Callable] = None,
                 bn_weight: float = 1.0, ce_weight: float = 1.0, tv_weight: float = 0.0,
                 l2_weight: float = 0.0, first_bn_weight: float = 1.0,
                 image_shape: Optional[Tuple[int, int]] = None):
        if not isinstance(batch, SyntheticBatch):
            raise TypeError(f"batch must be a SyntheticBatch, got {type(batch).__name__}")
        if not isinstance(model_T, nn.Module):
            raise TypeError(f"model_T must be one nn.Module, got {type(model_T).__name__}")
        super().__init__(train_config, None, model_T, batch,
                         adaptor_T or (lambda b, outputs: _logits_of(outputs)), None)
        self.to_batch = to_batch
        self.weights = dict(bn=bn_weight, ce=ce_weight, tv=tv_weight, l2=l2_weight)
        self.first_bn_weight = first_bn_weight
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self._bn_layers = [m for m in model_T.modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if bn_weight > 0 and not self._bn_layers:
            raise ValueError("bn_weight > 0 but the teacher has no batch-norm layer: "
                             "DeepInversion's main term needs one (or set bn_weight=0)")
        self._bn_terms: List[torch.Tensor] = []
        self._handles: List[Any] = []
        self._targets_checked = False

    def train(self, optimizer: torch.optim.Optimizer, dataloader: Any = None, *args,
              **kwargs) -> None:
        """As the loop's ``train``; the data are unused (default: one dummy batch)."""
        return super().train(optimizer, range(1) if dataloader is None else dataloader,
                             *args, **kwargs)

    def _bn_hook(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: Any) -> None:
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.float().mean(dim=dims)
        var = x.float().var(dim=dims, unbiased=False)
        self._bn_terms.append(torch.linalg.vector_norm(mean - module.running_mean.float())
                              + torch.linalg.vector_norm(var - module.running_var.float()))

    def attach_training_hooks(self) -> None:
        self._handles = [m.register_forward_hook(self._bn_hook) for m in self._bn_layers]

    def remove_training_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def train_on_batch(self, batch: Any, args: Dict[str, Any]):
        """The DeepInversion loss of the current inputs (``batch`` is ignored).

        Returns:
            ``(total, {'bn', 'ce', 'tv', 'l2', 'accuracy'})``.
        """
        x = self._student_forward()
        model_batch = self.to_batch(x) if self.to_batch is not None else x
        self._bn_terms = []
        outputs = forward_model(functools.partial(frozen_call, self.model_T), model_batch, args)
        bn_terms, self._bn_terms = self._bn_terms, []
        logits = self.adapt(self.adaptor_T, model_batch, outputs,
                            "the teacher's adaptor")["logits"][0]
        targets = self.model_S.targets
        if not self._targets_checked and targets.numel() and \
                not 0 <= int(targets.min()) <= int(targets.max()) < logits.size(-1):
            raise ValueError(f"SyntheticBatch targets must be classes in [0, {logits.size(-1)}) "
                             f"of the teacher's logits {tuple(logits.shape)}, got "
                             f"{targets.tolist()[:8]}")
        self._targets_checked = True  # once: the check reads them on the host
        zero = x.sum() * 0
        bn = zero
        for index, term in enumerate(bn_terms):
            bn = bn + term * (self.first_bn_weight if index == 0 else 1.0)
        ce = F.cross_entropy(logits.float(), targets)
        if self.image_shape is not None:
            images = x.reshape(x.size(0), -1, *self.image_shape)
        else:
            images = x
        if self.weights["tv"] > 0 and images.dim() < 3:
            raise ValueError(f"tv_weight > 0 needs images: give image_shape=(H, W) for inputs "
                             f"of shape {tuple(x.shape)}")
        tv = total_variation(images) if images.dim() >= 3 else zero
        l2 = x.float().pow(2).mean()
        w = self.weights
        total = w["bn"] * bn + w["ce"] * ce + w["tv"] * tv + w["l2"] * l2
        accuracy = (logits.detach().argmax(-1) == targets).float().mean()
        return total, {"bn": bn, "ce": ce, "tv": tv, "l2": l2, "accuracy": accuracy}


def synthesize_deep_inversion(model_T: nn.Module, input_shape: Shape, num_classes: int,
                              num_batches: int, batch_size: int, iterations: int,
                              output_dir: str, lr: float = 0.1, device: Any = "cpu",
                              seed: int = 0, init: Optional[Callable] = None,
                              **options) -> Tuple[torch.Tensor, torch.Tensor]:
    """Synthesises ``num_batches · batch_size`` inputs with :class:`DeepInversionSynthesizer`.

    Each batch starts from ``init(shape, generator)`` (default: standard normal noise),
    has balanced target classes (``arange(B) % num_classes``, shuffled), and is optimised
    for ``iterations`` Adam steps (lr ``lr``) in a training run of its own, with its
    checkpoint in ``{output_dir}/batch{k}`` (a run there that completed is not redone).

    Args:
        model_T: the teacher (its mode is restored afterwards).
        input_shape: one input's shape, e.g. ``64`` or ``(1, 8, 8)``.
        num_classes: C.
        num_batches, batch_size, iterations: as said.
        output_dir: where the runs write.
        lr: Adam's learning rate on the inputs.
        device: the training device.
        seed: seeds the noise, the targets and the runs.
        init: ``init(shape, generator) -> tensor`` for the initial inputs.
        **options: for :class:`DeepInversionSynthesizer` (weights, ``to_batch``,
            ``adaptor_T``, ``image_shape``).

    Returns:
        ``(inputs, targets)``: ``(N, *input_shape)`` float and (N,) long, on the CPU.
    """
    shape = _shape(input_shape)
    generator = torch.Generator().manual_seed(seed)
    all_inputs, all_targets = [], []
    for index in range(num_batches):
        if init is not None:
            start = init((batch_size, *shape), generator)
        else:
            start = torch.randn((batch_size, *shape), generator=generator)
        targets = (torch.arange(batch_size) % num_classes)[
            torch.randperm(batch_size, generator=generator)]
        batch = SyntheticBatch(start, targets).to(device)
        config = TrainingConfig(device=device, output_dir=os.path.join(output_dir,
                                                                       f"batch{index}"),
                                seed=seed + index, resume_from="latest", log_steps=iterations)
        synthesizer = DeepInversionSynthesizer(config, model_T, batch, **options)
        optimizer = torch.optim.Adam(batch.parameters(), lr=lr)
        with synthesizer:
            synthesizer.train(optimizer, num_steps=iterations)
        all_inputs.append(batch.inputs.detach().cpu())
        all_targets.append(batch.targets.cpu())
    return torch.cat(all_inputs), torch.cat(all_targets)
