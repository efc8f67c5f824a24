"""Running one job: check, build, train with :class:`~textbrewer.CausalLMDistiller`,
save, score. :func:`run_job` is what ``textbrewer distill`` calls."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..checkpoint import atomic_write_text
from ..distillers.lm import CausalLMDistiller
from ..utils import count_parameters
from .build import (Tokenizer, build_model, configs_of, distilling, load_tokenizer,
                    optimizer_and_schedule, pack_blocks, read_documents)
from .config import (ConfigError, JobConfig, config_differences, config_to_yaml,
                     load_resolved)

__all__ = ["run_job", "perplexity", "prepare_output"]

CONFIG_NAME = "config.yaml"
RESULTS_NAME = "results.json"


def prepare_output(config: JobConfig, resume: bool) -> None:
    """Refuses to mix runs in one folder, then writes the resolved ``config.yaml``.

    A folder with a previous run's ``config.yaml`` needs ``resume`` (and the same config,
    key for key); ``resume`` with no previous run starts one. Nothing there is overwritten
    before these checks pass."""
    folder = config.output.dir
    previous = os.path.join(folder, CONFIG_NAME)
    if os.path.exists(previous):
        if not resume:
            raise ConfigError(f"output.dir={folder!r} already holds a run ({CONFIG_NAME}); "
                              f"pass --resume to continue it, or choose another output.dir")
        differences = config_differences(load_resolved(previous), config)
        if differences:
            raise ConfigError(f"--resume: the config differs from the run in {folder!r} "
                              f"({previous}): " + "; ".join(differences))
        return
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(previous, config_to_yaml(config))


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, device: torch.device,
               batch_size: int = 64) -> Dict[str, float]:
    """Next-token cross-entropy over every predicted position of ``blocks`` (N, L).

    Returns:
        ``{'nll_sum', 'tokens', 'perplexity'}``: summed nats, predicted positions
        (N·(L−1)), and exp(mean nats per token)."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    try:
        for start in range(0, blocks.size(0), batch_size):
            ids = blocks[start:start + batch_size].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()  # position t predicts t + 1
            loss_sum += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                reduction="sum").item()
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return {"nll_sum": loss_sum, "tokens": count, "perplexity": math.exp(loss_sum / max(count, 1))}


def _check_vocabulary(name: str, model: nn.Module, tokenizer: Tokenizer) -> None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    size = head.weight.shape[0] if head is not None else getattr(model.config, "vocab_size",
                                                                 None)
    if size is not None and size < tokenizer.vocab_size:
        raise ConfigError(f"{name}: its vocabulary has {size} entries but the tokenizer "
                          f"({tokenizer.description}) makes ids up to {tokenizer.vocab_size - 1}"
                          f"; set {name}.config.vocab_size >= {tokenizer.vocab_size}")


def _loader(blocks: torch.Tensor, config: JobConfig, collate_fn=None, indexed: bool = False):
    examples = [{"input_ids": row} for row in blocks]
    if indexed:
        from ..cache import IndexedDataset
        examples = IndexedDataset(examples)
    # a generator of its own: the same order for every run with this seed, resumable
    return torch.utils.data.DataLoader(
        examples, batch_size=config.training.batch_size, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(config.training.seed), collate_fn=collate_fn)


def _cache_and_loader(config: JobConfig, teacher: Optional[nn.Module], blocks: torch.Tensor,
                      device: torch.device):
    """The training batches: plain, or carrying the cache's rows (written first if asked)."""
    if config.cache.path is None:
        return _loader(blocks, config), teacher
    from ..cache import CachedTeacherCollator, TeacherCache, write_teacher_cache
    path = config.cache.path
    if config.cache.build and not os.path.exists(os.path.join(path, "manifest.json")):
        write_teacher_cache(teacher.to(device), [{"input_ids": row} for row in blocks], path,
                            k=config.cache.k, batch_size=config.training.batch_size,
                            device=str(device), progress=False)
    cache = TeacherCache(path, expected_vocab_size=None)
    loader = _loader(blocks, config, collate_fn=CachedTeacherCollator(cache), indexed=True)
    return loader, None  # the teacher is not needed any more: it leaves memory


def run_job(config: JobConfig, resume: bool = False) -> Dict[str, Any]:
    """Trains the job's student and writes everything to ``config.output.dir``.

    Order: the configs and data are checked and the models built before the output folder
    is touched; then ``config.yaml``; then training (checkpoints every
    ``training.ckpt_steps``, ``save_pretrained`` folders beside them); then
    ``final/`` and ``results.json`` (validation perplexity per token and per byte).

    Args:
        config: a validated job (:func:`~textbrewer.job.load_job_config`).
        resume: continue the run already in ``output.dir`` from its newest training state.

    Returns:
        the results written to ``results.json``.
    """
    started = time.perf_counter()
    if config.training.threads is not None:
        torch.set_num_threads(config.training.threads)
    train_config, distill_config, lm_config = configs_of(config)
    if resume:
        train_config.resume_from = "latest"
    device = torch.device(config.training.device)
    tokenizer = load_tokenizer(config)
    train_blocks, _ = pack_blocks(read_documents(config.data.train, config.data.text_field,
                                                 "data.train"),
                                  tokenizer, config.data.sequence_length, config.data.max_blocks)
    if train_blocks.size(0) < config.training.batch_size:
        raise ConfigError(f"data.train makes {train_blocks.size(0)} blocks of "
                          f"{config.data.sequence_length} tokens, fewer than one batch of "
                          f"training.batch_size={config.training.batch_size}")
    validation = None
    if config.data.validation is not None:
        validation = pack_blocks(read_documents(config.data.validation, config.data.text_field,
                                                "data.validation"),
                                 tokenizer, config.data.sequence_length,
                                 config.data.max_eval_blocks)
    student = build_model("student", config.student, config.training.seed)
    _check_vocabulary("student", student, tokenizer)
    teacher = None
    if config.teacher is not None:
        teacher = build_model("teacher", config.teacher, config.training.seed)
        _check_vocabulary("teacher", teacher, tokenizer)
        teacher.eval().requires_grad_(False)
    prepare_output(config, resume)

    loader, teacher = _cache_and_loader(config, teacher, train_blocks, device)
    student.to(device)
    if teacher is not None:
        teacher.to(device)
    from ..integrations.huggingface import SavePretrained, trainable_parameters
    optimizer, schedule = optimizer_and_schedule(config, trainable_parameters(student))
    saver = SavePretrained(os.path.join(config.output.dir, "hf"), tokenizer.saved) \
        if config.output.save_pretrained else None
    distiller = CausalLMDistiller(train_config, distill_config, model_T=teacher,
                                  model_S=student, lm_config=lm_config)
    with distiller:
        distiller.train(optimizer, loader, num_steps=config.training.steps,
                        max_grad_norm=config.training.max_grad_norm, callback=saver,
                        **schedule)
    final = None
    if config.output.save_pretrained:  # beside the checkpoints, not under hf/
        from ..integrations.huggingface import save_pretrained_atomic
        final = save_pretrained_atomic(student, os.path.join(config.output.dir, "final"),
                                       tokenizer.saved)

    results: Dict[str, Any] = {
        "steps": config.training.steps, "distilled": distilling(config),
        "tokenizer": tokenizer.description, "train_blocks": train_blocks.size(0),
        "parameters": {"student": count_parameters(student),
                       "student_trainable": count_parameters(student, trainable_only=True)},
        "final": final}
    if teacher is not None:
        results["parameters"]["teacher"] = count_parameters(teacher)
    if validation is not None:
        blocks, bytes_per_token = validation
        scores = perplexity(student, blocks, device)
        scores["perplexity_per_byte"] = math.exp(
            scores["nll_sum"] / max(scores["tokens"] * bytes_per_token, 1e-12))
        scores["blocks"] = blocks.size(0)
        results["validation"] = scores
    results["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(os.path.join(config.output.dir, RESULTS_NAME),
                      json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results
