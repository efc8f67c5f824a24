"""Hugging Face in and out: local ``from_pretrained`` folders, ``save_pretrained`` checkpoints
and LoRA students with peft.

* :func:`load_pretrained` reads a teacher or a student from a local folder written by
  ``save_pretrained`` (``AutoModelForCausalLM``, ``AutoModelForSeq2SeqLM`` or ``AutoModel``,
  with the folder's tokenizer when it has one; an adapter folder on a given base).
  Nothing is downloaded: ``local_files_only=True``.
* :class:`SavePretrained` is a ``callback=`` for any distiller's ``train``: at each
  checkpoint it writes the student with ``save_pretrained`` (and its tokenizer) to
  ``{output_dir}/gs{N}/``, a folder transformers (or peft, for a LoRA student) reloads
  alone; :meth:`SavePretrained.save_final` writes ``{output_dir}/final/``. Each folder is
  written under a temporary name and renamed into place (:func:`save_pretrained_atomic`):
  a crash never leaves a half-written folder under the final name, nor loses one written
  before.
* :func:`lora_student` wraps a pre-trained student with LoRA adapters (peft), its base
  frozen; :func:`trainable_parameters` is what its optimizer should hold, and
  :func:`check_optimizer_params` refuses an optimizer that holds a frozen or quantised
  parameter, naming them.

transformers and peft are imported when a function needs them, never at import time.

Example::

    from textbrewer.integrations.huggingface import (SavePretrained, load_pretrained,
                                                     lora_student, trainable_parameters)
    teacher, _ = load_pretrained("models/teacher")             # AutoModelForCausalLM
    base, tokenizer = load_pretrained("models/student-base")
    student = lora_student(base, r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    optimizer = torch.optim.AdamW(trainable_parameters(student), lr=1e-3)
    saver = SavePretrained("out/hf", tokenizer=tokenizer)
    with distiller:
        distiller.train(optimizer, loader, num_steps=1000, callback=saver)
    saver.save_final(student)                                   # out/hf/final
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checkpoint import fsync_folder

__all__ = ["Pretrained", "SavePretrained", "save_pretrained_atomic", "load_pretrained",
           "lora_student", "trainable_parameters", "check_optimizer_params", "unwrap_model"]

_TEMPORARY_PREFIX = ".tmp-pretrained-"
_OLD_PREFIX = ".old-pretrained-"
_SUFFIX = r"[0-9a-f]{12}"
_KINDS = {"causal_lm": "AutoModelForCausalLM", "seq2seq_lm": "AutoModelForSeq2SeqLM",
          "model": "AutoModel"}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
_QUANTISED_TYPES = ("Params4bit", "Int8Params")


# ------------------------------------------------------------------------------ models
def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside its wrappers: ``DistributedDataParallel`` / ``DataParallel``
    (``.module``) and ``torch.compile`` (``._orig_mod``), in any nesting.

    Args:
        model: a module, wrapped or not.

    Returns:
        The innermost module (``model`` itself when it is not wrapped).
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _peft_model_class() -> Optional[type]:
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return PeftModel


def _is_peft(model: nn.Module) -> bool:
    peft_model = _peft_model_class()
    return peft_model is not None and isinstance(model, peft_model)


def _require_savable(model: Any) -> str:
    """``'peft'`` or ``'transformers'``; a TypeError naming the type otherwise."""
    if _is_peft(model):
        return "peft"
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        PreTrainedModel = None
    if PreTrainedModel is not None and isinstance(model, PreTrainedModel):
        return "transformers"
    kind = type(model)
    raise TypeError(f"save_pretrained needs a transformers PreTrainedModel or a peft "
                    f"PeftModel, got {kind.__module__}.{kind.__qualname__}; save a plain "
                    f"module's state_dict instead (the distiller's gs{{N}}.pkl already is)")


# ------------------------------------------------------------------------------ saving
def _fsync_tree(folder: str) -> None:
    for directory, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_folder(directory)


def _leftovers(parent: str, prefix: str, name: str) -> List[str]:
    pattern = re.compile(re.escape(prefix + name + "-") + _SUFFIX)
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return []
    return sorted((os.path.join(parent, e) for e in entries if pattern.fullmatch(e)),
                  key=os.path.getmtime)


def _recover(parent: str, name: str) -> None:
    """What an earlier save of ``name`` killed mid-way left: its temporary folder goes;
    a folder set aside while being replaced comes back if nothing took its place."""
    for temporary in _leftovers(parent, _TEMPORARY_PREFIX, name):
        shutil.rmtree(temporary, ignore_errors=True)
    path = os.path.join(parent, name)
    for old in reversed(_leftovers(parent, _OLD_PREFIX, name)):  # the newest first
        if not os.path.lexists(path):
            os.rename(old, path)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _swap_in(temporary: str, path: str) -> None:
    """Renames the complete folder ``temporary`` to ``path``; an existing ``path`` is set
    aside first and removed only once the new one is in place (put back on failure)."""
    parent, name = os.path.split(path)
    if not os.path.lexists(path):
        os.rename(temporary, path)
        fsync_folder(parent)
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise FileExistsError(f"save_pretrained: {path} exists and is not a folder; it was "
                              f"left as it is")
    old = os.path.join(parent, f"{_OLD_PREFIX}{name}-{uuid.uuid4().hex[:12]}")
    os.rename(path, old)
    try:
        os.rename(temporary, path)
    except BaseException:
        os.rename(old, path)
        raise
    fsync_folder(parent)
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained_atomic(model: nn.Module, path: Union[str, os.PathLike],
                           tokenizer: Any = None, state_dict: Optional[Dict[str, Any]] = None,
                           **save_kwargs: Any) -> str:
    """``model.save_pretrained(path)`` (and ``tokenizer.save_pretrained(path)``), written
    into a temporary folder beside ``path`` and renamed into place.

    A transformers model writes ``config.json`` and its weights; a peft model writes its
    adapters the peft way (``adapter_config.json``, ``adapter_model.safetensors``), not the
    frozen base. Wrappers (DDP, ``torch.compile``) are removed first. If anything fails,
    the temporary folder is removed and an earlier ``path`` is left as it was; a folder
    that a killed process left half-written is cleaned up by the next save of ``path``.

    Args:
        model: a ``transformers.PreTrainedModel`` or a ``peft.PeftModel``, possibly wrapped.
        path: the folder to write; its parent is created.
        tokenizer: anything with ``save_pretrained(folder)`` (a tokenizer, a processor).
        state_dict: the weights to write instead of ``model.state_dict()`` (for an
            FSDP2-sharded model, the gathered full state dict: :class:`SavePretrained`
            gathers it on every process and passes it here on the main one).
        save_kwargs: passed to ``model.save_pretrained``.

    Returns:
        The absolute path written.

    Raises:
        TypeError: the model is neither (the message names its type).
        FileExistsError: ``path`` exists and is not a folder.
    """
    model = unwrap_model(model)
    _require_savable(model)
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    _recover(parent, name)
    temporary = os.path.join(parent, f"{_TEMPORARY_PREFIX}{name}-{uuid.uuid4().hex[:12]}")
    os.mkdir(temporary)  # the process umask's permissions, like any folder save_pretrained makes
    try:
        if state_dict is not None:
            save_kwargs = dict(save_kwargs, state_dict=state_dict)
        model.save_pretrained(temporary, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        _fsync_tree(temporary)
        _swap_in(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return path


def _is_main_process() -> bool:
    distributed = torch.distributed
    return not (distributed.is_available() and distributed.is_initialized()) \
        or distributed.get_rank() == 0


class SavePretrained:
    """A ``callback=`` for a distiller's ``train`` that writes the student with
    ``save_pretrained`` at each checkpoint.

    The loop calls ``callback(model=student, step=global_step)`` after writing
    ``gs{N}.pkl``; this writes ``{output_dir}/gs{N}/`` (:func:`save_pretrained_atomic`:
    the student's ``config.json`` and weights, or a peft student's adapters, plus the
    tokenizer), on the main process only, then calls ``callback`` (on every process, as the
    loop does). :meth:`save_final` writes ``{output_dir}/final/`` after training.

    Args:
        output_dir: the folder of the ``gs{N}`` folders (may be ``TrainingConfig.output_dir``
            or a subfolder of it).
        tokenizer: saved into each folder when given (anything with ``save_pretrained``).
        callback: a user callback chained after the save, ``callback(model=, step=)``.
        is_main_process: whether this process writes; default: rank 0, or True without a
            process group.
        save_kwargs: passed to ``model.save_pretrained``.

    Attributes:
        saved: the folders written, in order.

    Example::

        saver = SavePretrained(os.path.join(train_config.output_dir, "hf"), tokenizer)
        distiller.train(optimizer, loader, num_steps=1000, callback=saver)
        saver.save_final(student)
    """

    def __init__(self, output_dir: Union[str, os.PathLike], tokenizer: Any = None,
                 callback: Optional[Callable[..., Any]] = None,
                 is_main_process: Optional[bool] = None, **save_kwargs: Any):
        if callback is not None and not callable(callback):
            raise TypeError(f"SavePretrained: callback must be callable, got "
                            f"{type(callback).__name__}")
        self.output_dir = os.fspath(output_dir)
        self.tokenizer = tokenizer
        self.callback = callback
        self.is_main_process = is_main_process
        self.save_kwargs = save_kwargs
        self.saved: List[str] = []

    def path(self, name: Union[int, str]) -> str:
        """``{output_dir}/gs{step}`` for a step, ``{output_dir}/{name}`` for a name."""
        folder = f"gs{name}" if isinstance(name, int) else name
        return os.path.join(self.output_dir, folder)

    def _main(self) -> bool:
        return _is_main_process() if self.is_main_process is None else self.is_main_process

    def save(self, model: nn.Module, name: Union[int, str]) -> Optional[str]:
        """Writes ``model`` (and the tokenizer) to :meth:`path` ``(name)``; the path, or None
        on a process that does not write.

        An FSDP2-sharded model's full weights are gathered first, a collective: every
        process must call this (the loop calls the callback on every process)."""
        from ..training.runtime import full_state_dict, is_fsdp_sharded
        model = unwrap_model(model)
        gathered = full_state_dict(model) if is_fsdp_sharded(model) else None
        if not self._main():
            return None
        path = save_pretrained_atomic(model, self.path(name), self.tokenizer,
                                      state_dict=gathered, **self.save_kwargs)
        self.saved.append(path)
        return path

    def __call__(self, model: nn.Module, step: int, **kwargs: Any) -> None:
        self.save(model, int(step))
        if self.callback is not None:
            self.callback(model=model, step=step, **kwargs)

    def save_final(self, model: nn.Module, name: str = "final") -> Optional[str]:
        """Writes the trained ``model`` to ``{output_dir}/{name}`` (default ``final``)."""
        return self.save(model, name)


# ------------------------------------------------------------------------------ loading
class Pretrained(NamedTuple):
    """What :func:`load_pretrained` returns: the model and the folder's tokenizer (None
    when the folder has none, or when it was not asked for)."""
    model: nn.Module
    tokenizer: Any


def _listing(folder: str) -> str:
    names = sorted(os.listdir(folder))
    return ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "") \
        if names else "nothing"


def _auto_class(kind: str) -> Any:
    if kind not in _KINDS:
        raise ValueError(f"load_pretrained: kind must be one of {sorted(_KINDS)}, got {kind!r}")
    import transformers
    return getattr(transformers, _KINDS[kind])


def load_pretrained(folder: Union[str, os.PathLike], kind: str = "causal_lm",
                    tokenizer: bool = True, base: Union[None, str, os.PathLike, nn.Module] = None,
                    adapter_trainable: bool = False, **from_pretrained_kwargs: Any) -> Pretrained:
    """A model (and its tokenizer) from a local ``save_pretrained`` folder; never a download.

    Args:
        folder: a local folder with ``config.json`` and weights (``model.safetensors``,
            ``pytorch_model.bin`` or their sharded indexes), or a peft adapter folder
            (``adapter_config.json``), which needs ``base``.
        kind: ``'causal_lm'`` (``AutoModelForCausalLM``), ``'seq2seq_lm'``
            (``AutoModelForSeq2SeqLM``) or ``'model'`` (``AutoModel``).
        tokenizer: also load the folder's tokenizer (``AutoTokenizer``) when it has one
            (``tokenizer_config.json`` or ``tokenizer.json``).
        base: for an adapter folder: the base model, or a local folder to load it from with
            the same ``kind``; its tokenizer is used when ``folder`` has none.
        adapter_trainable: for an adapter folder: load the adapters trainable (to go on
            training them) rather than for inference.
        from_pretrained_kwargs: passed to ``from_pretrained`` (e.g. ``torch_dtype``); the
            base's when loading adapters.

    Returns:
        :class:`Pretrained` ``(model, tokenizer)``, tokenizer None when there is none.

    Raises:
        FileNotFoundError: the folder does not exist, or lacks what a model needs (the
            message names the folder, what is missing and what it holds).
        ValueError: an unknown ``kind``, or an adapter folder without ``base``.
    """
    folder = os.fspath(folder)
    auto = _auto_class(kind)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"load_pretrained: {folder!r} is not a local folder (only "
                                f"folders written by save_pretrained are read; nothing is "
                                f"downloaded)")
    has = set(os.listdir(folder))
    found_tokenizer = None
    if tokenizer and has & set(_TOKENIZER_FILES):
        from transformers import AutoTokenizer
        found_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if "adapter_config.json" in has and "config.json" not in has:
        if not has & set(_ADAPTER_WEIGHT_FILES):
            raise FileNotFoundError(f"load_pretrained: {folder!r} has adapter_config.json but "
                                    f"no adapter weights ({' or '.join(_ADAPTER_WEIGHT_FILES)});"
                                    f" it holds {_listing(folder)}")
        if base is None:
            raise ValueError(f"load_pretrained: {folder!r} holds peft adapters, not a whole "
                             f"model: pass base= (the base model, or its local folder)")
        if not isinstance(base, nn.Module):
            base, base_tokenizer = load_pretrained(base, kind, tokenizer,
                                                   **from_pretrained_kwargs)
            found_tokenizer = found_tokenizer or base_tokenizer
        from peft import PeftModel
        model = PeftModel.from_pretrained(base, folder, is_trainable=adapter_trainable)
        return Pretrained(model, found_tokenizer)
    if "config.json" not in has:
        raise FileNotFoundError(f"load_pretrained: {folder!r} has no config.json, so it is not "
                                f"a save_pretrained folder; it holds {_listing(folder)}")
    if not has & set(_WEIGHT_FILES):
        raise FileNotFoundError(f"load_pretrained: {folder!r} has config.json but no weights "
                                f"(one of {', '.join(_WEIGHT_FILES)}); it holds "
                                f"{_listing(folder)}")
    model = auto.from_pretrained(folder, local_files_only=True, **from_pretrained_kwargs)
    return Pretrained(model, found_tokenizer)


# ------------------------------------------------------------------------------ LoRA
def _uses_conv1d(model: nn.Module, target_modules: Any) -> bool:
    """Whether LoRA would wrap GPT-2's transposed ``Conv1D`` layers (peft then needs
    ``fan_in_fan_out=True``, and warns if it has to set it itself)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    if target_modules is None:
        target_modules = ["c_attn"]  # peft's default for GPT-2
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return any(isinstance(m, Conv1D) and pattern.fullmatch(name)
                   for name, m in model.named_modules())
    targets = set(target_modules)
    return any(isinstance(m, Conv1D) and name.split(".")[-1] in targets
               for name, m in model.named_modules())


def lora_student(model: nn.Module, r: int = 8, alpha: float = 16,
                 target_modules: Union[None, str, Sequence[str]] = None, dropout: float = 0.0,
                 **lora_options: Any) -> nn.Module:
    """The pre-trained ``model`` with LoRA adapters of rank ``r`` (peft), its base frozen.

    Each targeted linear layer ``W`` (out × in) becomes ``W x + (alpha / r) · B A x`` with
    ``A`` (r × in) random and ``B`` (out × r) zero, so the wrapped model starts as the
    base. Only ``A`` and ``B`` require grad (build the optimizer from
    :func:`trainable_parameters`); :class:`SavePretrained` saves only them.
    ``model`` is modified in place (peft injects the layers into it): wrap a fresh copy.

    Args:
        model: a transformers model (possibly wrapped in DDP / ``torch.compile``).
        r: the rank of the adapters, at least 1.
        alpha: the LoRA scale numerator (scale ``alpha / r``).
        target_modules: names (last component, e.g. ``['q_proj', 'v_proj']``,
            ``['c_attn']`` for GPT-2), a regular expression, ``'all-linear'``, or None for
            peft's default for the model type.
        dropout: dropout on the adapters' input, in [0, 1).
        lora_options: more ``peft.LoraConfig`` fields (``task_type``, ``bias``,
            ``modules_to_save``, ...).

    Returns:
        A ``peft.PeftModel``.

    Raises:
        ValueError: ``r``, ``alpha`` or ``dropout`` out of range.
        ImportError: peft is not installed.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_student: r must be an integer of at least 1, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"lora_student: alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_student: dropout must be in [0, 1), got {dropout!r}")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("lora_student needs peft: pip install peft (or "
                          "pip install -e '.[peft]')") from error
    model = unwrap_model(model)
    if "fan_in_fan_out" not in lora_options and _uses_conv1d(model, target_modules):
        lora_options["fan_in_fan_out"] = True
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules,
                        lora_dropout=dropout, **lora_options)
    return get_peft_model(model, config)


def _is_quantised(parameter: torch.Tensor) -> bool:
    return (not (parameter.is_floating_point() or parameter.is_complex())
            or type(parameter).__name__ in _QUANTISED_TYPES
            or getattr(parameter, "quant_state", None) is not None)


def trainable_parameters(model: nn.Module, named: bool = False
                         ) -> Union[List[nn.Parameter], List[Tuple[str, nn.Parameter]]]:
    """The parameters an optimizer should hold: those that require grad and are not
    quantised (for a :func:`lora_student`, its adapters).

    Args:
        model: any module, possibly wrapped.
        named: return ``(name, parameter)`` pairs.

    Returns:
        A list, in ``named_parameters()`` order.
    """
    pairs = [(name, p) for name, p in unwrap_model(model).named_parameters()
             if p.requires_grad and not _is_quantised(p)]
    return pairs if named else [p for _, p in pairs]


def _describe(entries: List[str], limit: int = 5) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def check_optimizer_params(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Refuses an optimizer that holds a parameter it must never train: one with
    ``requires_grad=False`` (a frozen base, e.g. a LoRA student's) or a quantised one
    (an integer dtype, bitsandbytes' ``Params4bit`` / ``Int8Params``).

    Args:
        optimizer: the optimizer to check.
        model: the model it trains (possibly wrapped): the message names its parameters;
            one that is not the model's is named by its place in ``param_groups``.

    Raises:
        TypeError: not a ``torch.optim.Optimizer``.
        ValueError: some such parameters (the message names them).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"check_optimizer_params: expected a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    names = {}
    for name, parameter in unwrap_model(model).named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), name)
    frozen, quantised = [], []
    for g, group in enumerate(optimizer.param_groups):
        for i, parameter in enumerate(group["params"]):
            name = names.get(id(parameter), f"param_groups[{g}]['params'][{i}] (not the "
                                            f"model's)")
            if _is_quantised(parameter):
                quantised.append(f"{name} ({type(parameter).__name__}, {parameter.dtype})")
            elif not parameter.requires_grad:
                frozen.append(name)
    problems = []
    if frozen:
        problems.append(f"{len(frozen)} frozen parameters (requires_grad=False): "
                        f"{_describe(frozen)}")
    if quantised:
        problems.append(f"{len(quantised)} quantised parameters: {_describe(quantised)}")
    if problems:
        raise ValueError("the optimizer holds " + "; and ".join(problems) + ". A frozen or "
                         "quantised base is never given to the optimizer: build it from "
                         "trainable_parameters(model)")
