"""Quantization-aware distillation: a fake-quantised student learns from a float teacher.

The student is prepared for quantization-aware training with PyTorch's eager-mode
``torch.ao.quantization`` (:func:`prepare_qat_student`: a QAT qconfig of a CPU backend,
optional fusion, ``prepare_qat``), trained by :class:`QATDistiller` (KD, hard labels and
intermediate matches as :class:`~textbrewer.GeneralDistiller`, through fake-quantised
weights and activations), then converted to an int8 model with :func:`convert_to_int8`.

Eager mode needs the student to mark where tensors enter and leave the quantised region:
a ``torch.ao.quantization.QuantStub`` on its inputs and a ``DeQuantStub`` on its outputs,
with quantisable layers in between (``Linear``, ``Conv``, ``ReLU``, ...). The observers'
state (ranges, scales, zero points, on/off flags) is part of the student's
``state_dict``, so ``gs{N}.pkl`` checkpoints and exact resume carry it.
"""
from __future__ import annotations

import copy
import io
import warnings
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn

from ..configurations import DistillationConfig, TrainingConfig
from ..distillers.general import CustomMatch, GeneralDistiller

__all__ = ["QATDistiller", "prepare_qat_student", "convert_to_int8", "state_dict_bytes",
           "default_backend", "fake_quant_modules", "set_observers", "materialize_observers"]


def _quantization():
    """``torch.ao.quantization``, imported without its deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch.ao.quantization as quantization
    return quantization


def default_backend() -> str:
    """The first of ``'x86'``, ``'fbgemm'``, ``'qnnpack'`` this torch build supports.

    Raises:
        RuntimeError: this build has no quantised CPU engine.
    """
    engines = list(torch.backends.quantized.supported_engines)
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in engines:
            return name
    raise RuntimeError(f"this torch build has no quantized CPU engine (supported_engines="
                       f"{engines}); quantization-aware training needs x86, fbgemm or qnnpack")


def _check_backend(backend: Optional[str]) -> str:
    backend = backend or default_backend()
    engines = list(torch.backends.quantized.supported_engines)
    if backend not in engines:
        raise ValueError(f"backend {backend!r} is not supported by this torch build; "
                         f"supported: {[e for e in engines if e != 'none']}")
    return backend


def fake_quant_modules(model: nn.Module) -> List[nn.Module]:
    """The fake-quantize modules of a prepared model (weights and activations)."""
    base = _quantization().FakeQuantizeBase
    return [module for module in model.modules() if isinstance(module, base)]


def set_observers(model: nn.Module, enabled: bool) -> None:
    """Turns the observers of every fake-quantize module on or off (ranges frozen when
    off; the fake quantisation itself stays on)."""
    for module in fake_quant_modules(model):
        if enabled:
            module.enable_observer()
        else:
            module.disable_observer()


@torch.no_grad()
def materialize_observers(model: nn.Module) -> int:
    """Gives the weights' per-channel observers their shapes by observing the weights.

    A freshly prepared model's per-channel weight observers hold empty ``min_val`` /
    ``max_val`` buffers until the first forward pass, so its ``state_dict`` has shapes
    ``(0,)`` where a trained one has ``(channels,)``: loading a checkpoint into it would
    be refused as a shape mismatch. Observing each weight once fixes the shapes; it is
    what the first training forward does anyway (the first observation sets the range,
    and observing the unchanged weight again leaves it as it is), so training is unchanged.

    Returns:
        the number of weight fake-quantize modules observed.
    """
    count = 0
    for module in model.modules():
        fake_quant = getattr(module, "weight_fake_quant", None)
        weight = getattr(module, "weight", None)
        if fake_quant is None or not isinstance(weight, torch.Tensor):
            continue
        observer = getattr(fake_quant, "activation_post_process", None)
        empty = getattr(observer, "min_val", None)
        if isinstance(empty, torch.Tensor) and empty.numel() == 0 \
                and bool(fake_quant.observer_enabled[0]):
            fake_quant(weight.detach())
            count += 1
    return count


def prepare_qat_student(model: nn.Module, backend: Optional[str] = None,
                        fuse: Optional[Sequence[Sequence[str]]] = None,
                        qconfig: Any = None, inplace: bool = False) -> nn.Module:
    """Prepares a float model for quantization-aware training (eager mode).

    Args:
        model: a float model with ``QuantStub`` / ``DeQuantStub`` around its quantised part.
        backend: ``'x86'``, ``'fbgemm'`` or ``'qnnpack'`` (default :func:`default_backend`);
            also set as ``torch.backends.quantized.engine``.
        fuse: lists of submodule names to fuse first, e.g. ``[['fc1', 'relu1']]``.
        qconfig: a QAT qconfig (default ``get_default_qat_qconfig(backend)``).
        inplace: prepare ``model`` itself instead of a copy.

    Returns:
        the prepared model, in train mode, with fake-quantize modules (state in its
        ``state_dict``) and its weight observers materialised
        (:func:`materialize_observers`).

    Raises:
        ValueError: the model has no QuantStub (nothing would be quantised), or an
            unsupported backend.
    """
    quantization = _quantization()
    backend = _check_backend(backend)
    if not any(isinstance(m, quantization.QuantStub) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no torch.ao.quantization.QuantStub: "
                         f"eager-mode quantization needs one on the inputs (and a "
                         f"DeQuantStub on the outputs) to know what to quantise")
    if fake_quant_modules(model):
        raise ValueError(f"{type(model).__name__} is already prepared for QAT")
    model = model if inplace else copy.deepcopy(model)
    torch.backends.quantized.engine = backend
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # the default qconfigs still pass reduce_range, which torch now warns about
        warnings.filterwarnings("ignore", message=".*reduce_range.*", category=UserWarning)
        if fuse:
            quantization.fuse_modules_qat(model, [list(names) for names in fuse], inplace=True)
        model.qconfig = qconfig if qconfig is not None else \
            quantization.get_default_qat_qconfig(backend)
        quantization.prepare_qat(model, inplace=True)
    materialize_observers(model)
    return model


def convert_to_int8(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """An int8 copy of a QAT-trained model (on the CPU, in eval mode); ``model`` is left
    as it is.

    Args:
        model: the fake-quantised model (:func:`prepare_qat_student`, then trained).
        backend: the quantised engine to run it with (default: the current engine if it
            is supported, else :func:`default_backend`).

    Raises:
        ValueError: ``model`` has no fake-quantize modules (it was not prepared).
    """
    if not fake_quant_modules(model):
        raise ValueError(f"{type(model).__name__} has no fake-quantize modules: prepare it "
                         f"with prepare_qat_student before training, then convert")
    current = torch.backends.quantized.engine
    backend = _check_backend(backend or (current if current != "none" else None))
    torch.backends.quantized.engine = backend
    converted = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)  # quantize_per_channel's notice
        _quantization().convert(converted, inplace=True)
    return converted


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the model's size on disk."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


class QATDistiller(GeneralDistiller):
    """Distils a float teacher into a fake-quantised student (quantization-aware KD).

    The loss is :class:`~textbrewer.GeneralDistiller`'s (KD, hard labels, intermediate and
    custom matches); the student runs with fake-quantised weights and activations, so it
    learns weights that survive int8 conversion (:func:`convert_to_int8` afterwards).

    What this class adds to the loop:

    * observer freezing: after ``freeze_observers_at`` of training (a fraction of the total
      steps) the quantisation ranges stop moving, and after ``freeze_bn_at`` the fused
      batch norms stop updating their statistics (the usual end of QAT). Both follow from
      the step, so a resumed run freezes at the same step;
    * callbacks see the student with its observers off (evaluating at a checkpoint does
      not move the quantisation ranges), restored afterwards;
    * the student's weight observers are materialised (:func:`materialize_observers`), so
      a checkpoint of it loads into a freshly prepared student (resume included).

    Args:
        train_config, distill_config, model_T, adaptor_T, adaptor_S, custom_matches: as
            for :class:`~textbrewer.GeneralDistiller`; ``model_T`` is the float teacher.
        model_S: the student, prepared by :func:`prepare_qat_student` (or by
            ``torch.ao.quantization.prepare_qat``).
        freeze_observers_at: fraction of the total steps in [0, 1] after which observers
            are off (None: never).
        freeze_bn_at: fraction after which fused batch norms freeze their statistics
            (None: never).

    Raises:
        ValueError: the student has no fake-quantize modules, or a fraction outside [0, 1].
    """

    def __init__(self, train_config: TrainingConfig, distill_config: DistillationConfig,
                 model_T: Any, model_S: nn.Module, adaptor_T: Callable, adaptor_S: Callable,
                 custom_matches: Optional[Sequence[CustomMatch]] = None,
                 freeze_observers_at: Optional[float] = None,
                 freeze_bn_at: Optional[float] = None):
        if isinstance(model_S, nn.Module) and not fake_quant_modules(model_S):
            raise ValueError(f"model_S ({type(model_S).__name__}) has no fake-quantize "
                             f"modules: prepare it with textbrewer.schemes.prepare_qat_student "
                             f"(or torch.ao.quantization.prepare_qat) first")
        for name, value in (("freeze_observers_at", freeze_observers_at),
                            ("freeze_bn_at", freeze_bn_at)):
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name} must be a fraction of training in [0, 1] or None, "
                                 f"got {value!r}")
        super().__init__(train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S,
                         custom_matches)
        self.freeze_observers_at = freeze_observers_at
        self.freeze_bn_at = freeze_bn_at
        materialize_observers(model_S)

    def update_schedules(self, progress: float) -> None:
        super().update_schedules(progress)
        if self.freeze_observers_at is not None and progress >= self.freeze_observers_at:
            set_observers(self.model_S, False)
        if self.freeze_bn_at is not None and progress >= self.freeze_bn_at:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                from torch.ao.nn.intrinsic.qat import freeze_bn_stats
            self.model_S.apply(freeze_bn_stats)

    def reset_schedules(self) -> None:
        super().reset_schedules()
        if self.freeze_observers_at == 0:
            set_observers(self.model_S, False)

    def save_and_callback(self, global_step: int, step: int, epoch: int,
                          callback: Optional[Callable]) -> None:
        """As the base class (the saved weights include the observers' state), with the
        student's observers off while the callback runs."""
        if callback is None:
            return super().save_and_callback(global_step, step, epoch, callback)

        def observed_callback(model: nn.Module, step: int) -> None:
            modules = fake_quant_modules(model)
            flags = [module.observer_enabled.clone() for module in modules]
            set_observers(model, False)
            try:
                callback(model=model, step=step)
            finally:
                for module, flag in zip(modules, flags):
                    module.observer_enabled.copy_(flag)

        return super().save_and_callback(global_step, step, epoch, observed_callback)
