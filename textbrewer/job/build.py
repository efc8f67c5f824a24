"""What a job config turns into: the library's configs, the models, the tokenizer, the
data blocks, the optimizer and its schedule. Each function builds one thing and names the
config key in its errors."""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..configurations import DistillationConfig, TrainingConfig
from ..distillers.lm import LMDistillationConfig
from .config import PRECISIONS, ConfigError, JobConfig, ModelSpec

__all__ = ["configs_of", "build_model", "model_config", "Tokenizer", "load_tokenizer",
           "read_documents", "pack_blocks", "optimizer_and_schedule", "lr_factor"]

BYTES_VOCAB_SIZE = 256
BYTES_SEPARATOR = 0  # the NUL byte, which text does not contain


def distilling(config: JobConfig) -> bool:
    """Whether the job has a teacher term (a live teacher or a cache)."""
    return config.teacher is not None or config.cache.path is not None


def configs_of(config: JobConfig) -> Tuple[TrainingConfig, DistillationConfig,
                                           LMDistillationConfig]:
    """The library's three configs of a job (their own validation runs here)."""
    training, loss = config.training, config.loss
    with _section("training"):
        train_config = TrainingConfig(
            device=training.device, output_dir=config.output.dir,
            ckpt_steps=training.ckpt_steps or training.steps, seed=training.seed,
            log_steps=training.log_steps, mixed_precision=PRECISIONS[training.precision],
            compile=training.compile,
            gradient_accumulation_steps=training.gradient_accumulation_steps,
            log_dir=os.path.join(config.output.dir, "tensorboard") if training.tensorboard
            else None)
    with _section("loss"):
        distill_config = DistillationConfig(
            temperature=loss.temperature,
            kd_loss_weight=loss.kd_weight if distilling(config) else 0.0,
            hard_label_weight=loss.hard_label_weight if distilling(config) else 1.0)
        lm_config = LMDistillationConfig(
            divergence=loss.divergence, beta=loss.beta, alpha=loss.alpha, path=loss.path,
            chunk_size=loss.chunk_size, topk=loss.topk, topk_tail=config.cache.tail)
    return train_config, distill_config, lm_config


@contextlib.contextmanager
def _section(name: str):
    """The library configs' ValueErrors as ConfigErrors under the job's key names
    (``divergence must be ...`` -> ``loss.divergence must be ...``)."""
    try:
        yield
    except ValueError as error:
        raise ConfigError(f"{name}.{error}") from None


# ------------------------------------------------------------------------------ models
def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover
        raise ConfigError("jobs build models with transformers: pip install "
                          "'textbrewer[cli]'") from None
    return transformers


def model_config(name: str, spec: ModelSpec) -> Any:
    """The ``transformers`` config of a model spec (read from its folder, or built)."""
    transformers = _transformers()
    if spec.pretrained is not None:
        return transformers.AutoConfig.from_pretrained(spec.pretrained, local_files_only=True)
    options = dict(spec.config)
    model_type = options.pop("model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **options)
    except ValueError as error:
        raise ConfigError(f"{name}.config: {error}") from None


def _dtype_option(dtype: torch.dtype) -> Dict[str, Any]:
    """``from_pretrained`` / ``from_config``'s dtype keyword: nothing for float32 (their
    default), ``dtype`` on transformers >= 4.56, ``torch_dtype`` before (renamed there)."""
    if dtype == torch.float32:
        return {}
    import transformers
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def build_model(name: str, spec: ModelSpec, default_seed: int,
                device: Optional[torch.device] = None) -> nn.Module:
    """The causal LM of ``spec``: loaded from ``pretrained``, or built from ``config`` after
    ``torch.manual_seed(init_seed)``; then ``weights`` loaded; then LoRA adapters.

    ``device='meta'`` builds the architecture without memory (for ``textbrewer plan``)."""
    transformers = _transformers()
    dtype = getattr(torch, spec.dtype)
    if device is not None and device.type == "meta":
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(model_config(name, spec),
                                                                  **_dtype_option(dtype))
    elif spec.pretrained is not None:
        from ..integrations.huggingface import load_pretrained
        model = load_pretrained(spec.pretrained, "causal_lm", tokenizer=False,
                                **_dtype_option(dtype)).model
    else:
        torch.manual_seed(default_seed if spec.init_seed is None else spec.init_seed)
        model = transformers.AutoModelForCausalLM.from_config(model_config(name, spec),
                                                              **_dtype_option(dtype))
    if spec.weights is not None and (device is None or device.type != "meta"):
        state = torch.load(spec.weights, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{name}.weights={spec.weights!r} does not fit {name}: missing "
                              f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    if spec.lora is not None:
        from ..integrations.huggingface import lora_student
        model = lora_student(model, r=spec.lora.r, alpha=spec.lora.alpha,
                             dropout=spec.lora.dropout,
                             target_modules=spec.lora.target_modules)
    return model


# --------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """Text -> ids for a job: UTF-8 bytes, or a ``tokenizers``/Hugging Face tokenizer.

    Attributes:
        vocab_size: ids are below it.
        separator_id: the id put after each document (NUL for bytes, else the tokenizer's
            EOS).
        saved: what ``save_pretrained`` writes next to the student (None for bytes).
    """

    def __init__(self, encode: Callable[[str], List[int]], vocab_size: int,
                 separator_id: int, description: str, saved: Any = None):
        self.encode, self.vocab_size = encode, vocab_size
        self.separator_id, self.description, self.saved = separator_id, description, saved


def _bytes_encode(text: str) -> List[int]:
    return list(text.encode("utf-8"))


def load_tokenizer(config: JobConfig) -> Tokenizer:
    """The job's tokenizer (``tokenizer`` key, default the student's folder)."""
    path = config.tokenizer or config.student.pretrained
    if path == "bytes":
        if config.data.separator_token is not None:
            raise ConfigError("data.separator_token: tokenizer: bytes always separates "
                              "documents with NUL; leave it unset")
        return Tokenizer(_bytes_encode, BYTES_VOCAB_SIZE, BYTES_SEPARATOR,
                         "bytes (UTF-8), NUL between documents")
    transformers = _transformers()
    if os.path.isfile(path):
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    else:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError(f"tokenizer={path!r}: no tokenizer could be read there: "
                              f"{error}") from None
    token = config.data.separator_token
    if token is not None:
        separator = tokenizer.convert_tokens_to_ids(token)
        if separator is None or separator == tokenizer.unk_token_id and token != \
                tokenizer.unk_token:
            raise ConfigError(f"data.separator_token={token!r} is not a token of "
                              f"tokenizer={path!r}")
    else:
        separator = tokenizer.eos_token_id
    if separator is None:
        raise ConfigError(f"tokenizer={path!r} has no EOS token, which jobs put between "
                          f"documents: set data.separator_token (e.g. '</s>')")

    def encode(text: str) -> List[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return Tokenizer(encode, len(tokenizer), separator, f"{type(tokenizer).__name__} {path}",
                     saved=tokenizer)


# -------------------------------------------------------------------------------- data
def read_documents(path: str, text_field: str, key: str) -> List[str]:
    """The documents of a ``.jsonl`` file, a ``.txt`` file, or a ``datasets`` folder."""
    if os.path.isdir(path):
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"{key}={path!r} is a folder: reading a datasets folder needs "
                              f"`pip install datasets`") from None
        table = datasets.load_from_disk(path)
        if isinstance(table, datasets.DatasetDict):
            raise ConfigError(f"{key}={path!r} holds several splits {list(table)}: point "
                              f"{key} at one split's folder")
        if text_field not in table.column_names:
            raise ConfigError(f"{key}={path!r} has no column {text_field!r} (data.text_field);"
                              f" its columns are {table.column_names}")
        return list(table[text_field])
    if path.endswith(".jsonl"):
        documents = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{key}={path!r} line {number}: not JSON: {error}") \
                        from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ConfigError(f"{key}={path!r} line {number}: expected an object with "
                                      f"a string at {text_field!r} (data.text_field)")
                documents.append(record[text_field])
        return documents
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as handle:
            return [handle.read()]
    raise ConfigError(f"{key}={path!r}: expected a .jsonl file, a .txt file or a datasets "
                      f"folder")


def pack_blocks(documents: Sequence[str], tokenizer: Tokenizer, sequence_length: int,
                max_blocks: Optional[int] = None) -> Tuple[torch.Tensor, float]:
    """Documents tokenised, each followed by the separator, as one stream cut into blocks.

    Returns:
        ``(blocks, bytes_per_token)``: (num_blocks, sequence_length) int64 ids (the last
        partial block dropped; then the first ``max_blocks``), and the stream's UTF-8 bytes
        (a separator counts as one) per token, for perplexity per byte.
    """
    stream: List[int] = []
    num_bytes = 0
    for text in documents:
        stream += tokenizer.encode(text) + [tokenizer.separator_id]
        num_bytes += len(text.encode("utf-8")) + 1
    usable = len(stream) // sequence_length * sequence_length
    blocks = torch.tensor(stream[:usable], dtype=torch.long).view(-1, sequence_length)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    if blocks.size(0) == 0:
        raise ConfigError(f"the documents make {len(stream)} tokens, less than one block of "
                          f"data.sequence_length={sequence_length}")
    return blocks, num_bytes / len(stream)


# --------------------------------------------------------------------------- optimizer
def lr_factor(step: int, total_steps: int, warmup_ratio: float, schedule: str,
              min_ratio: float) -> float:
    """The learning-rate multiplier at ``step`` (0-based): linear warm-up over
    ``max(1, int(warmup_ratio · total_steps))`` steps, then ``schedule`` from 1 down to
    ``min_ratio`` at the last step (``'constant'`` stays at 1)."""
    warmup = max(1, int(warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if schedule == "linear":
        return max(min_ratio, 1.0 - (1.0 - min_ratio) * progress)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1)))
    return 1.0


def optimizer_and_schedule(config: JobConfig, parameters: Sequence[nn.Parameter]
                           ) -> Tuple[torch.optim.Optimizer, Dict[str, Any]]:
    """AdamW over ``parameters`` and the ``train`` arguments of its schedule."""
    training = config.training
    optimizer = torch.optim.AdamW(parameters, lr=training.lr, weight_decay=training.weight_decay)

    def factor(step: int) -> float:
        return lr_factor(step, training.steps, training.warmup_ratio, training.schedule,
                         training.min_lr_ratio)
    return optimizer, dict(scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                           scheduler_args={"lr_lambda": factor})
