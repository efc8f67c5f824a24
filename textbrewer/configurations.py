"""TrainingConfig, DistillationConfig and IntermediateMatch.

The constructors take TextBrewer 0.2.1's arguments, in its order and with its defaults,
and validate everything up front: a bad value is a ``ValueError`` that names the field,
what came and what is allowed. Configs are plain data: nothing here touches the disk or
the process group, and training never modifies them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar, Union

import torch

from .capture import CAPTURE_CHOICES
from .match_presets import FEATURES, MATCHES
from .registry import (KD_LOSSES, LOSS_MODULES, MATCH_LOSSES, PROJECTIONS,
                       TEMPERATURE_SCHEDULERS, WEIGHT_SCHEDULERS)

__all__ = ["Config", "TrainingConfig", "DistillationConfig", "IntermediateMatch",
           "MIXED_PRECISION_CHOICES"]

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
KD_OVER_HEADS_CHOICES = ("sum", "last")
#: our 0.3.0 name of ``'last'`` (then the default), still accepted with a warning
KD_OVER_HEADS_ALIASES = {"compatible": "last"}
ConfigT = TypeVar("ConfigT", bound="Config")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class Config:
    """Shared (de)serialisation: ``from_dict``, ``from_json_file``, ``to_dict``, ``to_json_file``."""

    @classmethod
    def from_dict(cls: Type[ConfigT], dict_object: Dict[str, Any]) -> ConfigT:
        """Builds a config from a dict of constructor arguments; unknown keys are an error."""
        if not isinstance(dict_object, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got "
                            f"{type(dict_object).__name__}")
        valid = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(dict_object) - set(valid))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; valid keys: {valid}")
        return cls(**dict_object)

    @classmethod
    def from_json_file(cls: Type[ConfigT], json_filename: Union[str, os.PathLike]) -> ConfigT:
        """Builds a config from a JSON file holding a dict of constructor arguments."""
        with open(json_filename, "r", encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def to_dict(self) -> Dict[str, Any]:
        """Constructor arguments as plain JSON-able values; ``from_dict`` round-trips them."""
        result = {}
        for item in dataclasses.fields(self):
            if item.init:
                result[item.name] = _plain(getattr(self, item.name))
        return result

    def to_json_string(self) -> str:
        """``to_dict()`` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def to_json_file(self, json_filename: Union[str, os.PathLike]) -> None:
        """Writes ``to_dict()`` as JSON, atomically (temporary name, then rename)."""
        from .checkpoint import atomic_write_text
        atomic_write_text(json_filename, self.to_json_string())

    def __str__(self) -> str:
        lines = [f"{self.__class__.__name__}:"]
        for key, value in self.to_dict().items():
            lines.append(f"  {key}: {value!r}")
        return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, Config) or isinstance(value, IntermediateMatch):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, torch.device):
        return str(value)
    return value


@dataclass
class TrainingConfig(Config):
    """How to train: accumulation, checkpoints, logging, device and precision.

    Args:
        gradient_accumulation_steps: micro-batches per optimizer step.
        ckpt_frequency: checkpoints per epoch (epoch mode).
        ckpt_epoch_frequency: checkpoint every this many epochs (the last epoch always).
        ckpt_steps: checkpoint every this many optimizer steps (step mode, i.e.
            ``train(num_steps=...)``); ``None`` saves only at the end.
        log_dir: TensorBoard directory; ``None`` disables TensorBoard.
        output_dir: where ``gs{global_step}.pkl`` checkpoints are written (created when
            training starts, not here).
        device: ``'cuda'``, ``'cuda:1'``, ``'cpu'`` or a ``torch.device``.
        fp16: TextBrewer 0.2.1's switch; ``True`` means ``mixed_precision='fp16'``
            (torch.amp autocast + GradScaler; apex is not used).
        fp16_opt_level: accepted for compatibility (apex's levels 'O0'..'O3'); only
            'O0' changes anything: it turns ``fp16=True`` back into fp32.
        data_parallel: wrap the student in ``torch.nn.DataParallel`` (single process,
            several GPUs). Mutually exclusive with distributed training.
        local_rank: this process's GPU index under distributed training; -1 (default)
            takes it from the ``LOCAL_RANK`` environment variable that torchrun sets,
            if any.
        mixed_precision: ``'no'``, ``'fp16'`` or ``'bf16'`` autocast.
        compile: ``torch.compile`` the teacher(s) and the student: ``False``, ``True``,
            or a dict of ``torch.compile`` keyword arguments.
        log_steps: loss terms stay on the device and are copied to the host (one sync)
            every this many micro-batches, for TensorBoard, the progress bar and the
            non-finite check. TensorBoard still gets one point per micro-batch.
        seed: if set, seeds ``random``, ``numpy`` and ``torch`` when training starts.
        resume_from: a training-state file written by a previous run, or ``'latest'``
            for the newest complete one in ``output_dir`` (nothing to resume from is not an
            error with ``'latest'``: training starts from scratch; an incomplete or
            unreadable newest state is skipped, with a warning, for the one before it).
        keep_train_states: how many of the newest resumable ``gs{N}.train_state.pt`` files
            to keep (default 1; ``None`` keeps all). The ``gs{N}.pkl`` student weights are
            never deleted.
        isolate_callback_rng: restore the random-number state after each callback, so an
            evaluation that draws random numbers does not shift training. Off by default:
            TextBrewer 0.2.1 shares the generators with the callback, and its published
            results include that effect.
        check_finite_every_step: check every micro-batch's loss terms for NaN/inf before
            its optimizer step (one host sync per micro-batch) instead of every
            ``log_steps`` micro-batches, so no step is ever applied after a non-finite loss.
        ddp_find_unused_parameters: passed to ``DistributedDataParallel``. True lets a
            student have parameters its loss does not use (a pooler the adaptor ignores),
            as TextBrewer 0.2.1 did; False skips that search in every step. None (default):
            True when nothing is trained with the student, False when projections or loss
            modules are (they run after the student's forward, which DDP's search would
            count as unused; give every student parameter a part in the loss then).
    """

    gradient_accumulation_steps: int = 1
    ckpt_frequency: int = 1
    ckpt_epoch_frequency: int = 1
    ckpt_steps: Optional[int] = None
    log_dir: Optional[str] = None
    output_dir: str = "./saved_models"
    device: Union[str, torch.device] = "cuda"
    fp16: bool = False
    fp16_opt_level: str = "O1"
    data_parallel: bool = False
    local_rank: int = -1
    mixed_precision: Optional[str] = None
    compile: Union[bool, Dict[str, Any]] = False
    log_steps: int = 20
    seed: Optional[int] = None
    resume_from: Optional[str] = None
    keep_train_states: Optional[int] = 1
    isolate_callback_rng: bool = False
    check_finite_every_step: bool = False
    ddp_find_unused_parameters: Optional[bool] = None

    def __post_init__(self) -> None:
        _check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _check_int("ckpt_frequency", self.ckpt_frequency, 1)
        _check_int("ckpt_epoch_frequency", self.ckpt_epoch_frequency, 1)
        if self.ckpt_steps is not None:
            _check_int("ckpt_steps", self.ckpt_steps, 1)
        _check_int("log_steps", self.log_steps, 1)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        if not isinstance(self.device, (str, torch.device)):
            raise ValueError(f"device must be a string or torch.device, got {self.device!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device={self.device!r} is not a valid torch device: {error}") from None
        if self.fp16_opt_level not in ("O0", "O1", "O2", "O3"):
            raise ValueError(f"fp16_opt_level must be one of ['O0', 'O1', 'O2', 'O3'], "
                             f"got {self.fp16_opt_level!r}")
        legacy = "fp16" if (self.fp16 and self.fp16_opt_level != "O0") else "no"
        if self.mixed_precision is None:
            self.mixed_precision = legacy
        elif self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(f"mixed_precision must be one of {list(MIXED_PRECISION_CHOICES)}, "
                             f"got {self.mixed_precision!r}")
        elif self.fp16 and self.mixed_precision != legacy:
            raise ValueError(f"fp16=True and mixed_precision={self.mixed_precision!r} disagree; "
                             f"set only one of them")
        if not isinstance(self.compile, (bool, dict)):
            raise ValueError(f"compile must be False, True or a dict of torch.compile options, "
                             f"got {self.compile!r}")
        if isinstance(self.local_rank, bool) or not isinstance(self.local_rank, int) \
                or self.local_rank < -1:
            raise ValueError(f"local_rank must be -1 or a GPU index >= 0, got {self.local_rank!r}")
        if self.data_parallel and self.local_rank != -1:
            raise ValueError("data_parallel=True and local_rank >= 0 (distributed training) are "
                             "mutually exclusive; set only one of them")
        if self.resume_from is not None and not isinstance(self.resume_from, (str, os.PathLike)):
            raise ValueError(f"resume_from must be a path or 'latest', got {self.resume_from!r}")
        if self.keep_train_states is not None:
            _check_int("keep_train_states", self.keep_train_states, 1)
        for name in ("isolate_callback_rng", "check_finite_every_step"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.ddp_find_unused_parameters not in (None, True, False):
            raise ValueError(f"ddp_find_unused_parameters must be None, True or False, got "
                             f"{self.ddp_find_unused_parameters!r}")
        for name in ("log_dir", "output_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name} must be a path, got {value!r}")
            if isinstance(value, str) and not value.strip():
                raise ValueError(f"{name}={value!r} is not a folder"
                                 + ("; use log_dir=None to turn TensorBoard off"
                                    if name == "log_dir" else
                                    "; give the folder for the gs{N}.pkl checkpoints, e.g. "
                                    "output_dir='./saved_models' (the default), or "
                                    "output_dir='.' for the current folder"))


_RELATION_LOSSES = ("fsp", "gram", "mmd", "nst", "mmd_normalized", "nst_normalized")


@dataclass
class IntermediateMatch:
    """One intermediate-feature match: ``loss(proj(feature_S[layer_S]), feature_T[layer_T])``.

    Args:
        layer_T: index into the teacher adaptor's ``hidden``/``attention`` list, or a list
            of two indices for two-layer (relation) losses such as ``'fsp'`` and ``'nst'``.
        layer_S: the student's index (or two), same form as ``layer_T``.
        weight: multiplies this term in the total loss.
        loss: a name in :data:`~textbrewer.MATCH_LOSS_MAP`.
        feature: ``'hidden'`` or ``'attention'``.
        proj: ``[name, dim_in, dim_out]`` or ``[name, dim_in, dim_out, param_group_options]``:
            a projection (``'linear'``, ``'relu'``, ``'tanh'``, ``'conv1x1'``, ...) from the
            student's width ``dim_in`` to the teacher's ``dim_out``, trained with the student
            in its own optimizer param group (options such as ``{'lr': 1e-3}``).
        module_T: instead of ``layer_T``: the name of a teacher submodule (as in
            ``model.named_modules()``, e.g. ``'layer3'`` or ``'encoder.layer.3.output'``)
            whose output is captured by a forward hook (see :mod:`textbrewer.capture`).
        module_S: the student's submodule, with ``module_T``.
        capture: ``'output'`` (default) or ``'input'`` of the named modules.
        loss_options: keyword arguments of the loss: for a loss that owns weights (a name
            in :data:`~textbrewer.registry.LOSS_MODULES` such as ``'crd'`` or ``'vid'``),
            its constructor's (e.g. ``{'dim_in': 64, 'dim_out': 128}``); for a loss
            function, extra keyword arguments of each call.
    """

    layer_T: Optional[Union[int, List[int]]] = None
    layer_S: Optional[Union[int, List[int]]] = None
    weight: float = 1.0
    loss: str = "hidden_mse"
    feature: str = "hidden"
    proj: Optional[List[Any]] = None
    module_T: Optional[str] = None
    module_S: Optional[str] = None
    capture: str = "output"
    loss_options: Optional[Dict[str, Any]] = None

    @property
    def by_module(self) -> bool:
        """Whether the features are captured from named modules (not adaptor lists)."""
        return self.module_T is not None

    @property
    def owns_weights(self) -> bool:
        """Whether the loss is a module with weights of its own (``LOSS_MODULES``)."""
        return self.loss in LOSS_MODULES

    def __post_init__(self) -> None:
        modules = (self.module_T, self.module_S)
        if any(m is not None for m in modules):
            where = f"intermediate match (module_T={self.module_T!r}, module_S={self.module_S!r})"
            self._check_module_match(where)
        else:
            where = f"intermediate match (layer_T={self.layer_T!r}, layer_S={self.layer_S!r})"
            if self.layer_T is None or self.layer_S is None:
                raise ValueError(f"{where}: give layer_T and layer_S (indices into the adaptors' "
                                 f"features), or module_T and module_S (submodule names)")
        if self.feature not in FEATURES:
            raise ValueError(f"{where}: feature must be one of {list(FEATURES)}, "
                             f"got {self.feature!r}")
        if self.loss_options is not None and not isinstance(self.loss_options, dict):
            raise ValueError(f"{where}: loss_options must be a dict, got {self.loss_options!r}")
        self.loss_options = dict(self.loss_options or {})
        if not (isinstance(self.loss, str) and self.loss in LOSS_MODULES):
            try:
                MATCH_LOSSES.validate(self.loss)
            except KeyError as error:
                raise ValueError(f"{where}: {error}; losses with weights of their own: "
                                 f"{LOSS_MODULES.names()}") from None
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not math.isfinite(self.weight):
            raise ValueError(f"{where}: weight must be a finite number, got {self.weight!r}")
        if self.weight < 0:
            raise ValueError(f"{where}: weight must be >= 0, got {self.weight!r}")
        if self.proj is not None:
            self.proj = self._checked_proj(where, self.proj)
        if self.by_module:
            return
        layers_are_lists = [isinstance(x, (list, tuple)) for x in (self.layer_T, self.layer_S)]
        if layers_are_lists[0] != layers_are_lists[1]:
            raise ValueError(f"{where}: layer_T and layer_S must both be ints or both be lists")
        for side, layer in (("layer_T", self.layer_T), ("layer_S", self.layer_S)):
            layers = layer if isinstance(layer, (list, tuple)) else [layer]
            if not layers or any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
                raise ValueError(f"{where}: {side} must be an int or a list of ints, "
                                 f"got {layer!r}")
        if isinstance(self.layer_T, (list, tuple)):
            self.layer_T, self.layer_S = list(self.layer_T), list(self.layer_S)
        if self.loss in _RELATION_LOSSES and not (
                layers_are_lists[0] and len(self.layer_T) == 2 and len(self.layer_S) == 2):
            raise ValueError(f"{where}: loss {self.loss!r} relates two layers; give layer_T and "
                             f"layer_S as lists of two indices, e.g. [0, 4]")

    def _check_module_match(self, where: str) -> None:
        if self.layer_T is not None or self.layer_S is not None:
            raise ValueError(f"{where}: give either layer_T/layer_S or module_T/module_S, "
                             f"not both")
        for side in ("module_T", "module_S"):
            value = getattr(self, side)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}: {side} must be a submodule name (a non-empty "
                                 f"string), got {value!r}")
        if self.capture not in CAPTURE_CHOICES:
            raise ValueError(f"{where}: capture must be one of {list(CAPTURE_CHOICES)}, got "
                             f"{self.capture!r}")
        if self.loss in _RELATION_LOSSES:
            raise ValueError(f"{where}: loss {self.loss!r} relates two layers of each model; "
                             f"use layer_T/layer_S lists with an adaptor")

    @staticmethod
    def _checked_proj(where: str, proj: Sequence[Any]) -> List[Any]:
        if not isinstance(proj, (list, tuple)) or len(proj) not in (3, 4):
            raise ValueError(f"{where}: proj must be [name, dim_in, dim_out] or "
                             f"[name, dim_in, dim_out, param_group_options], got {proj!r}")
        try:
            PROJECTIONS.validate(proj[0])
        except KeyError as error:
            raise ValueError(f"{where}: {error}") from None
        for position, dim in ((1, proj[1]), (2, proj[2])):
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"{where}: proj[{position}] must be a positive int "
                                 f"(feature width), got {dim!r}")
        if len(proj) == 4 and not isinstance(proj[3], dict):
            raise ValueError(f"{where}: proj[3] must be a dict of param-group options, "
                             f"got {proj[3]!r}")
        options = dict(proj[3]) if len(proj) == 4 else {}
        if "params" in options:
            raise ValueError(f"{where}: proj[3] must not set 'params' (the projection's own "
                             f"parameters are used)")
        return [proj[0], proj[1], proj[2], options]

    @property
    def name(self) -> str:
        """TensorBoard name: ``unweighted_{feature}_{loss}_{layer_S}_{layer_T}``
        (``unweighted_module_{loss}_{module_S}_{module_T}`` for named modules)."""
        if self.by_module:
            return f"unweighted_module_{self.loss}_{self.module_S}_{self.module_T}"

        def join(layer):
            return "-".join(map(str, layer)) if isinstance(layer, list) else str(layer)
        return f"unweighted_{self.feature}_{self.loss}_{join(self.layer_S)}_{join(self.layer_T)}"

    def to_dict(self) -> Dict[str, Any]:
        """The constructor arguments (proj always with its options dict); the fields added
        after TextBrewer 0.2.1 only when set."""
        result = {"layer_T": self.layer_T, "layer_S": self.layer_S, "weight": self.weight,
                  "loss": self.loss, "feature": self.feature,
                  "proj": None if self.proj is None else list(self.proj)}
        if self.by_module:
            result.update(module_T=self.module_T, module_S=self.module_S, capture=self.capture)
        if self.loss_options:
            result["loss_options"] = _plain(self.loss_options)
        return result

    @classmethod
    def from_dict(cls, dict_object: Optional[Dict[str, Any]]) -> Optional["IntermediateMatch"]:
        """Builds a match from a dict (``None`` gives ``None``, as in 0.2.1)."""
        if dict_object is None:
            return None
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(dict_object) - set(valid))
        if unknown:
            raise ValueError(f"intermediate match: unknown keys {unknown}; valid keys: {valid}")
        return cls(**dict_object)


def _check_schedule(name: str, spec: Any, registry) -> None:
    if spec == "none":
        return
    try:
        registry.validate(spec)
    except KeyError as error:
        named = "takes parameters" in str(error) or str(error).startswith("unknown")
        raise ValueError(f"{name}: {error}" + (" (or 'none')" if named else "")) from None
    if isinstance(spec, (list, tuple)) and registry.is_builder(spec[0]):
        try:  # builders are pure: building now reports bad parameter values up front
            registry.resolve(spec)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name}={list(spec)!r}: {error}") from None


def _check_matches_list(matches: Any) -> None:
    """``intermediate_matches`` must be a list (or tuple) of dicts / IntermediateMatch."""
    if matches is None or isinstance(matches, (list, tuple)):
        return
    given = f"{type(matches).__name__} {matches!r}"
    if len(given) > 200:
        given = given[:200] + " ..."
    hint = ""
    if isinstance(matches, (dict, IntermediateMatch)):
        hint = "; wrap a single match in a list: intermediate_matches=[{...}]"
    elif isinstance(matches, str) and matches in MATCHES:
        hint = f"; for the preset, write intermediate_matches=textbrewer.MATCHES[{matches!r}]"
    raise ValueError(f"intermediate_matches must be a list of dicts (or IntermediateMatch), "
                     f"one per match, got a {given}{hint}")


@dataclass
class DistillationConfig(Config):
    """What to distil: the total loss

    ``kd_loss_weight · Σ_heads KD(S/τ, T/τ) + hard_label_weight · Σ mean(losses)
    + Σ_i weight_i · match_i``.

    Args:
        temperature: τ for the KD loss.
        temperature_scheduler: ``'none'``, ``'constant'``, ``['flsw', beta, gamma]`` or
            ``['cwsm', beta]`` (see :data:`~textbrewer.TEMPERATURE_SCHEDULER`).
        hard_label_weight: weight of the student adaptor's ``losses``.
        hard_label_weight_scheduler: ``'none'``, ``'linear_decay'`` or ``'linear_growth'``.
        kd_loss_type: ``'ce'``, ``'mse'`` (TextBrewer's) or ``'kl'`` (τ²-scaled KL).
        kd_loss_weight: weight of the KD term.
        kd_loss_weight_scheduler: as ``hard_label_weight_scheduler``.
        probability_shift: swap, in the teacher's logits, the largest entry with the gold
            label's (labels from the student adaptor's ``labels``).
        intermediate_matches: list of dicts (or :class:`IntermediateMatch`) with keys
            ``layer_T, layer_S, feature, loss, weight, proj``.
        is_caching_logits: BasicDistiller and MultiTeacherDistiller, epoch mode: run the
            teacher once over the data and reuse its logits every epoch.
        kd_over_heads: with several logits heads, ``'sum'`` (default) sums the KD loss
            over every head in every distiller, as TextBrewer 0.2.1.post1 (the release
            ``pip install textbrewer`` gives) does; ``'last'`` reproduces TextBrewer 0.2.1,
            whose GeneralDistiller and MultiTaskDistiller keep only the LAST head's KD loss
            unless ``probability_shift`` is on (the other distillers sum in both releases).
            ``'compatible'``, this option's name in textbrewer 0.3.0, means ``'last'``
            (deprecated).
    """

    temperature: float = 4
    temperature_scheduler: Union[str, List[Any]] = "none"
    hard_label_weight: float = 0
    hard_label_weight_scheduler: str = "none"
    kd_loss_type: str = "ce"
    kd_loss_weight: float = 1
    kd_loss_weight_scheduler: str = "none"
    probability_shift: bool = False
    intermediate_matches: Optional[List[Union[Dict[str, Any], IntermediateMatch]]] = None
    is_caching_logits: bool = False
    kd_over_heads: str = "sum"

    def __post_init__(self) -> None:
        if self.kd_over_heads in KD_OVER_HEADS_ALIASES:
            replacement = KD_OVER_HEADS_ALIASES[self.kd_over_heads]
            warnings.warn(f"kd_over_heads={self.kd_over_heads!r} is deprecated: it means "
                          f"kd_over_heads={replacement!r} (TextBrewer 0.2.1's last head only); "
                          f"the default is now 'sum', as TextBrewer 0.2.1.post1",
                          DeprecationWarning, stacklevel=3)
            self.kd_over_heads = replacement
        if self.kd_over_heads not in KD_OVER_HEADS_CHOICES:
            raise ValueError(f"kd_over_heads must be one of {list(KD_OVER_HEADS_CHOICES)}, got "
                             f"{self.kd_over_heads!r}")
        for name in ("temperature", "hard_label_weight", "kd_loss_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        for name in ("hard_label_weight", "kd_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r} (a negative "
                                 f"weight maximises the term; register a loss that returns its "
                                 f"negative if that is really meant)")
        try:
            KD_LOSSES.validate(self.kd_loss_type)
        except KeyError as error:
            raise ValueError(f"kd_loss_type: {error}") from None
        if isinstance(self.temperature_scheduler, tuple):
            self.temperature_scheduler = list(self.temperature_scheduler)
        _check_schedule("temperature_scheduler", self.temperature_scheduler,
                        TEMPERATURE_SCHEDULERS)
        _check_schedule("hard_label_weight_scheduler", self.hard_label_weight_scheduler,
                        WEIGHT_SCHEDULERS)
        _check_schedule("kd_loss_weight_scheduler", self.kd_loss_weight_scheduler,
                        WEIGHT_SCHEDULERS)
        matches = []
        _check_matches_list(self.intermediate_matches)
        for index, match in enumerate(self.intermediate_matches or []):
            try:
                if isinstance(match, IntermediateMatch):
                    matches.append(match)
                elif isinstance(match, dict):
                    matches.append(IntermediateMatch.from_dict(match))
                else:
                    raise ValueError(f"expected a dict, got {type(match).__name__}")
            except (ValueError, TypeError) as error:
                raise ValueError(f"intermediate_matches[{index}]: {error}") from None
        self.intermediate_matches = matches
