"""The config file of one distillation job (``textbrewer distill CONFIG.yaml``).

The schema is the dataclasses below, read and merged by OmegaConf: a YAML file, then
``key=value`` overrides (OmegaConf's dot-list syntax: ``training.steps=100``,
``teacher=null``, ``loss.divergence=jsd``). An unknown key, a value of the wrong type or a
value outside its choices is a :class:`ConfigError` that names the key (``training.stepz``)
and what it accepts, before anything is built or trained.

Relative paths in the file are read from the file's folder (so a config and its data can
move together); relative paths in overrides from the current folder (what a shell user
means). The resolved config, with absolute paths, is what a run writes to
``{output.dir}/config.yaml`` and what ``--resume`` compares against.

Example (the causal LM example, examples/configs/lm_student.yaml)::

    teacher: {pretrained: ../../output_cli/teacher/final}
    student:
      config: {model_type: gpt2, n_embd: 48, n_layer: 2, n_head: 2, vocab_size: 256,
               n_positions: 64}
    tokenizer: bytes
    data: {train: data/train.jsonl, validation: data/validation.jsonl, sequence_length: 64}
    loss: {divergence: forward_kl, temperature: 1.0, kd_weight: 1.0, hard_label_weight: 1.0}
    training: {steps: 250, batch_size: 16, lr: 3.0e-3}
    output: {dir: ../../output_cli/student}
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["ConfigError", "ModelSpec", "LoraSpec", "DataSpec", "LossSpec", "CacheSpec",
           "TrainingSpec", "OutputSpec", "JobConfig", "load_job_config", "config_to_yaml",
           "config_differences", "PATH_KEYS"]

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
SCHEDULES = ("linear", "cosine", "constant")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
#: Keys whose values are paths (made absolute against the file's or the current folder).
PATH_KEYS = ("teacher.pretrained", "teacher.weights", "student.pretrained", "student.weights",
             "tokenizer", "data.train", "data.validation", "cache.path", "output.dir")


class ConfigError(ValueError):
    """A config file or override that is wrong; the message names the key."""


@dataclass
class LoraSpec:
    """A LoRA student (peft): only the adapters train (see
    :func:`textbrewer.integrations.huggingface.lora_student`)."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[List[str]] = None


@dataclass
class ModelSpec:
    """A causal LM: exactly one of ``pretrained`` (a local ``save_pretrained`` folder; never
    a download) and ``config`` (a ``transformers`` config as a dict with ``model_type``,
    built from scratch with ``init_seed``). ``weights``: a state-dict file (``gs{N}.pkl``)
    loaded into it afterwards. ``dtype``: the parameters' dtype."""
    pretrained: Optional[str] = None
    config: Optional[Dict[str, Any]] = None
    init_seed: Optional[int] = None
    weights: Optional[str] = None
    dtype: str = "float32"
    lora: Optional[LoraSpec] = None


@dataclass
class DataSpec:
    """Documents, tokenised, joined with the separator token and cut into blocks.

    ``train`` / ``validation``: a ``.jsonl`` file (one document per line, at
    ``text_field``), a ``.txt`` file (one document), or a folder written by
    ``datasets.Dataset.save_to_disk`` (column ``text_field``). ``max_blocks`` keeps the
    first blocks of the training split, ``max_eval_blocks`` of the validation split.
    ``separator_token``: the token put after each document (default: the tokenizer's EOS;
    NUL for ``tokenizer: bytes``)."""
    train: str = "???"
    validation: Optional[str] = None
    text_field: str = "text"
    separator_token: Optional[str] = None
    sequence_length: int = 128
    max_blocks: Optional[int] = None
    max_eval_blocks: Optional[int] = None


@dataclass
class LossSpec:
    """``kd_weight · D(teacher ‖ student) + hard_label_weight · CE`` per target token (see
    :class:`~textbrewer.LMDistillationConfig` for the divergences and paths). Without a
    teacher and a cache, the cross-entropy alone (weight 1)."""
    divergence: str = "forward_kl"
    temperature: float = 1.0
    kd_weight: float = 1.0
    hard_label_weight: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    path: str = "auto"
    chunk_size: int = 1024
    topk: Optional[int] = None


@dataclass
class CacheSpec:
    """Train from a teacher top-k cache instead of a live teacher. ``path``: the cache
    folder; ``build``: write it from ``teacher`` first when it does not exist (then the
    teacher leaves memory before the student trains); ``k`` entries per token."""
    path: Optional[str] = None
    build: bool = False
    k: int = 16
    tail: str = "uniform"


@dataclass
class TrainingSpec:
    """AdamW on the student's trainable parameters; the learning rate warms up linearly
    over ``warmup_ratio`` of the steps, then follows ``schedule`` down to
    ``min_lr_ratio · lr``. ``seed`` seeds the run and the data order; the model's initial
    weights use ``ModelSpec.init_seed`` (default: this seed)."""
    steps: int = "???"  # type: ignore[assignment]  (required: OmegaConf's missing value)
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    schedule: str = "linear"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "fp32"
    device: str = "cpu"
    compile: bool = False
    ckpt_steps: Optional[int] = None
    log_steps: int = 20
    threads: Optional[int] = None
    tensorboard: bool = False


@dataclass
class OutputSpec:
    """``dir`` holds ``config.yaml``, the ``gs{N}.pkl`` checkpoints and training states,
    ``hf/gs{N}`` and ``final`` (``save_pretrained`` folders, when ``save_pretrained``) and
    ``results.json``."""
    dir: str = "???"
    save_pretrained: bool = True


@dataclass
class JobConfig:
    """One job: a teacher (optional), a student, their tokenizer, data, loss, training and
    output. ``tokenizer``: ``'bytes'`` (UTF-8 bytes, vocabulary 256, NUL between
    documents), a ``tokenizer.json`` file or a local tokenizer folder; default: the
    student's ``pretrained`` folder."""
    student: ModelSpec = field(default_factory=ModelSpec)
    teacher: Optional[ModelSpec] = None
    tokenizer: Optional[str] = None
    data: DataSpec = field(default_factory=DataSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    output: OutputSpec = field(default_factory=OutputSpec)


# ----------------------------------------------------------------------------- loading
def _omegaconf():
    try:
        import omegaconf
    except ImportError:  # pragma: no cover
        raise ConfigError("config files need omegaconf: pip install 'textbrewer[cli]'") from None
    return omegaconf


def _valid_keys(node_type: Any) -> List[str]:
    return [f.name for f in dataclasses.fields(node_type)] if dataclasses.is_dataclass(
        node_type) else []


def _spec_at(key: str) -> Any:
    """The dataclass holding ``key``'s last part (``training.stepz`` -> TrainingSpec), read
    from the schema's field types (``Optional[X]`` -> X)."""
    node: Any = JobConfig
    for part in key.split(".")[:-1]:
        hint = typing.get_type_hints(node).get(part) if dataclasses.is_dataclass(node) else None
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = inner[0] if typing.get_origin(hint) is typing.Union and inner else hint
        if not dataclasses.is_dataclass(hint):
            return node
        node = hint
    return node


def _translate(error: Exception, source: str) -> ConfigError:
    """An OmegaConf error as a ConfigError naming the key and the choices."""
    omegaconf = _omegaconf()
    key = getattr(error, "full_key", None) or ""
    if isinstance(error, omegaconf.errors.ConfigKeyError) and key:
        parent = ".".join(key.split(".")[:-1])
        valid = _valid_keys(_spec_at(key))
        import difflib
        close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
        hint = f" (did you mean {(parent + '.' if parent else '') + close[0]!r}?)" if close else ""
        return ConfigError(f"{source}: unknown key {key!r}{hint}; the keys of "
                           f"{parent or 'the config'!r} are {valid}")
    message = str(error).split("\n")[0]
    return ConfigError(f"{source}: {key or 'config'}: {message}")


def _absolute(node: Any, base: str) -> None:
    """Makes the relative paths at :data:`PATH_KEYS` in ``node`` absolute against ``base``."""
    omegaconf = _omegaconf()
    for key in PATH_KEYS:
        value = omegaconf.OmegaConf.select(node, key, default=None, throw_on_missing=False)
        if isinstance(value, str) and value not in ("???", "bytes") \
                and not os.path.isabs(os.path.expanduser(value)):
            omegaconf.OmegaConf.update(node, key, os.path.normpath(os.path.join(base, value)),
                                       merge=False)
        elif isinstance(value, str) and value.startswith("~"):
            omegaconf.OmegaConf.update(node, key, os.path.expanduser(value), merge=False)


def load_job_config(path: Optional[str], overrides: Sequence[str] = ()) -> JobConfig:
    """The job config of a YAML file (or none) with ``key=value`` overrides, validated.

    Args:
        path: the YAML file; None starts from the defaults (every required key then comes
            from the overrides).
        overrides: OmegaConf dot-list items, applied in order after the file.

    Returns:
        the :class:`JobConfig`, with absolute paths.

    Raises:
        ConfigError: a missing file, bad YAML, an unknown key, a wrong type, a value outside
            its choices or a required key left unset (``???``).
    """
    omegaconf = _omegaconf()
    OmegaConf = omegaconf.OmegaConf
    merged = OmegaConf.structured(JobConfig)
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as error:  # yaml.YAMLError and friends, named by the file
            raise ConfigError(f"{path}: not a valid YAML file: {error}") from None
        if not isinstance(loaded, omegaconf.DictConfig):
            raise ConfigError(f"{path}: the file must hold a mapping of keys (teacher, "
                              f"student, data, ...), got a {type(loaded).__name__}")
        _absolute(loaded, os.path.dirname(os.path.abspath(path)))
        try:
            merged = OmegaConf.merge(merged, loaded)
        except omegaconf.errors.OmegaConfBaseException as error:
            raise _translate(error, path) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. training.steps=100)")
        try:
            parsed = OmegaConf.from_dotlist([item])
            _absolute(parsed, os.getcwd())
            merged = OmegaConf.merge(merged, parsed)
        except omegaconf.errors.OmegaConfBaseException as error:
            raise _translate(error, f"override {item!r}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"required keys not set: {missing} (set them in the file or as "
                          f"key=value overrides)")
    try:
        config = OmegaConf.to_object(merged)
    except omegaconf.errors.OmegaConfBaseException as error:
        raise _translate(error, path or "overrides") from None
    validate(config)
    return config


# --------------------------------------------------------------------------- validation
def _choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: must be one of {list(choices)}")


def _at_least(key: str, value: Optional[float], low: float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < low:
        raise ConfigError(f"{key}={value!r}: must be at least {low}")


def _check_model(name: str, spec: ModelSpec) -> None:
    if (spec.pretrained is None) == (spec.config is None):
        raise ConfigError(f"{name}: set exactly one of {name}.pretrained (a local "
                          f"save_pretrained folder) and {name}.config (a transformers config "
                          f"dict with model_type), got "
                          f"{'both' if spec.pretrained is not None else 'neither'}")
    if spec.config is not None and "model_type" not in spec.config:
        raise ConfigError(f"{name}.config: needs a 'model_type' (e.g. gpt2, llama), got keys "
                          f"{sorted(spec.config)}")
    if spec.pretrained is not None and not os.path.isdir(spec.pretrained):
        raise ConfigError(f"{name}.pretrained={spec.pretrained!r}: no such folder (only local "
                          f"save_pretrained folders are read; nothing is downloaded)")
    if spec.weights is not None and not os.path.isfile(spec.weights):
        raise ConfigError(f"{name}.weights={spec.weights!r}: no such file")
    _choice(f"{name}.dtype", spec.dtype, MODEL_DTYPES)
    if spec.lora is not None:
        if name != "student":
            raise ConfigError(f"{name}.lora: only the student can be a LoRA model")
        _at_least("student.lora.r", spec.lora.r, 1)


def validate(config: JobConfig) -> None:
    """Checks what can be checked without building anything; raises :class:`ConfigError`."""
    _check_model("student", config.student)
    if config.teacher is not None:
        _check_model("teacher", config.teacher)
    if config.tokenizer is None and config.student.pretrained is None:
        raise ConfigError("tokenizer: not set, and the student has no pretrained folder to "
                          "take one from; set tokenizer: bytes, a tokenizer.json file or a "
                          "tokenizer folder")
    if config.tokenizer not in (None, "bytes") and not os.path.exists(config.tokenizer):
        raise ConfigError(f"tokenizer={config.tokenizer!r}: no such file or folder (use "
                          f"'bytes', a tokenizer.json file or a local tokenizer folder)")
    for key in ("train", "validation"):
        value = getattr(config.data, key)
        if value is not None and not os.path.exists(value):
            raise ConfigError(f"data.{key}={value!r}: no such file or folder")
    _at_least("data.sequence_length", config.data.sequence_length, 2)
    _at_least("data.max_blocks", config.data.max_blocks, 1, allow_none=True)
    _at_least("data.max_eval_blocks", config.data.max_eval_blocks, 1, allow_none=True)
    cache = config.cache
    if cache.path is None and cache.build:
        raise ConfigError("cache.build=true needs cache.path (where to write the cache)")
    if cache.path is not None:
        if cache.build and config.teacher is None:
            raise ConfigError("cache.build=true needs a teacher to write the cache from")
        if not cache.build and not os.path.isdir(cache.path):
            raise ConfigError(f"cache.path={cache.path!r}: no such cache folder (set "
                              f"cache.build=true to write it from the teacher first)")
        _at_least("cache.k", cache.k, 1)
        from ..losses.token import OBJECTIVES, TOPK_TAILS, check_topk_divergence
        _choice("cache.tail", cache.tail, TOPK_TAILS)
        if config.loss.divergence in OBJECTIVES:
            raise ConfigError(f"loss.divergence={config.loss.divergence!r} needs the teacher's "
                              f"full logits; with cache.path it cannot be used (a cache holds "
                              f"the top {cache.k})")
        try:  # before anything is built: the loss against the cached rows must be finite
            check_topk_divergence(config.loss.divergence, cache.tail, config.loss.beta,
                                  config.loss.alpha)
        except ValueError as error:
            raise ConfigError(f"loss.divergence={config.loss.divergence!r} with cache.tail="
                              f"{cache.tail!r}: {error}") from None
    training = config.training
    _at_least("training.steps", training.steps, 1)
    _at_least("training.batch_size", training.batch_size, 1)
    _at_least("training.gradient_accumulation_steps", training.gradient_accumulation_steps, 1)
    if not training.lr > 0:
        raise ConfigError(f"training.lr={training.lr!r}: must be positive")
    if not 0 <= training.warmup_ratio < 1:
        raise ConfigError(f"training.warmup_ratio={training.warmup_ratio!r}: must be in [0, 1)")
    if not 0 <= training.min_lr_ratio <= 1:
        raise ConfigError(f"training.min_lr_ratio={training.min_lr_ratio!r}: must be in [0, 1]")
    _choice("training.schedule", training.schedule, SCHEDULES)
    _choice("training.precision", training.precision, list(PRECISIONS))
    _at_least("training.seed", training.seed, 0)
    _at_least("training.ckpt_steps", training.ckpt_steps, 1, allow_none=True)
    _at_least("training.log_steps", training.log_steps, 1)
    _at_least("training.threads", training.threads, 1, allow_none=True)
    _at_least("loss.temperature", config.loss.temperature, 1e-6)
    # the library's own checks (divergences, paths, devices), under the job's section names
    from .build import configs_of
    configs_of(config)


# ------------------------------------------------------------------------------ writing
def config_to_yaml(config: JobConfig) -> str:
    """The resolved config as YAML (every key, absolute paths)."""
    OmegaConf = _omegaconf().OmegaConf
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        flat: Dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def config_differences(old: JobConfig, new: JobConfig, ignore: Sequence[str] = ()) -> List[str]:
    """``key: old -> new`` for every leaf that differs (the keys in ``ignore`` left out)."""
    before, after = _flatten(old), _flatten(new)
    return [f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
            for key in sorted(set(before) | set(after))
            if key not in ignore and before.get(key) != after.get(key)]


def load_resolved(path: str) -> JobConfig:
    """A ``config.yaml`` a run wrote (absolute paths; not re-validated)."""
    OmegaConf = _omegaconf().OmegaConf
    try:
        merged = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(path))
        return OmegaConf.to_object(merged)
    except Exception as error:
        raise ConfigError(f"{path}: cannot read the previous run's config: {error}") from None
