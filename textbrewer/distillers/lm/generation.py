"""On-policy and sequence-level KD: the batches a model generates itself.

:class:`Sampler` draws, for every batch, whether it is on-policy (the student continues
the batch's prompts) from its own seeded generator (saved in checkpoints), and generates
with every setting explicit: none is read from ``model.generation_config``. Models with a
``generate`` method (Transformers) use it; a plain causal module gets a simple sampling
loop over the whole right-padded sequence.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ...training.batches import forward_model
from .config import LMDistillationConfig
from .heads import logits_of

__all__ = ["Sampler"]


class Sampler:
    """Generates the continuations of on-policy and sequence-level KD batches.

    Args:
        config: the distiller's :class:`~textbrewer.distillers.lm.LMDistillationConfig`
            (``lmbda``, ``seed`` and the generation settings).
        runtime: the loop's :class:`~textbrewer.training.runtime.Runtime` (device, rank,
            autocast).
        shifts_labels: True for a causal LM, False for an encoder-decoder one.
    """

    def __init__(self, config: LMDistillationConfig, runtime: Any, shifts_labels: bool):
        self.config = config
        self.runtime = runtime
        self.shifts_labels = shifts_labels
        self.rng = torch.Generator().manual_seed(config.seed)

    # the coin --------------------------------------------------------------------------------
    def draw(self) -> Tuple[bool, int]:
        """(on-policy?, sampling seed) for one batch; both are drawn for every batch, so the
        generator's position does not depend on the outcomes."""
        coin = float(torch.rand((), generator=self.rng))
        seed = int(torch.randint(0, 2 ** 62, (), generator=self.rng))
        return coin < self.config.lmbda, seed

    def state_dict(self) -> Dict[str, Any]:
        return {"policy_rng": self.rng.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state and state.get("policy_rng") is not None:
            self.rng.set_state(state["policy_rng"])

    # generating ------------------------------------------------------------------------------
    def generation_config(self, model: nn.Module):
        """Every setting explicit; none is taken from ``model.generation_config``."""
        from transformers import GenerationConfig  # only models with .generate get here
        config = self.config
        settings = dict(max_new_tokens=config.max_new_tokens, min_new_tokens=0,
                        do_sample=config.do_sample, num_beams=1,
                        eos_token_id=[] if config.eos_token_id is None else config.eos_token_id,
                        pad_token_id=config.pad_token_id)
        if config.do_sample:
            settings.update(temperature=config.generation_temperature, top_k=config.top_k,
                            top_p=config.top_p)
        decoder_start = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
        if not self.shifts_labels and decoder_start is not None:
            settings["decoder_start_token_id"] = decoder_start
        return GenerationConfig(**settings)

    @contextlib.contextmanager
    def generating(self, model: nn.Module, seed: int):
        """Eval mode, no gradients, autocast, and the global RNG seeded with ``seed`` then
        restored (sampling draws from it; training's random numbers are left alone). A
        model's own ``generation_config`` is swapped for a neutral one meanwhile, because
        ``generate`` fills every unset option from it."""
        devices = [self.runtime.device] if self.runtime.device.type == "cuda" else []
        was_training = model.training
        saved_config = getattr(model, "generation_config", None)
        try:
            model.eval()
            if saved_config is not None:
                from transformers import GenerationConfig
                model.generation_config = GenerationConfig()
            with torch.random.fork_rng(devices=devices), torch.no_grad(), \
                    self.runtime.autocast():
                torch.manual_seed(seed + self.runtime.rank)
                yield
        finally:
            if saved_config is not None:
                model.generation_config = saved_config
            model.train(was_training)

    def cut_after_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, G) generated tokens -> lengths (B,) up to and including the first eos."""
        size, length = tokens.shape
        eos = self.config.eos_token_id
        if eos is None:
            return torch.full((size,), length, dtype=torch.long)
        hits = (tokens == eos).cpu()
        first = torch.where(hits.any(1), hits.float().argmax(1) + 1,
                            torch.full((size,), length))
        return first.long()

    def sample(self, scores: torch.Tensor) -> torch.Tensor:
        """Next tokens (B,) from (B, V) scores with the configured settings."""
        config = self.config
        if not config.do_sample:
            return scores.argmax(-1)
        scores = scores / config.generation_temperature
        if 0 < config.top_k < scores.shape[-1]:
            kth = scores.topk(config.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if config.top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            # drop a token when the tokens before it already hold top_p (the first stays)
            drop = (cumulative - ordered.softmax(-1)) >= config.top_p
            scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        return torch.multinomial(scores.softmax(-1), 1).squeeze(-1)

    def sample_loop(self, model: nn.Module, prompts: List[torch.Tensor],
                    with_mask: bool) -> torch.Tensor:
        """(B, max_new_tokens) continuations for plain causal modules (no KV cache): each
        step runs the whole right-padded sequence and samples the next token of every row
        from the logits at its last real position (a causal model does not see the padding
        after it)."""
        config, device = self.config, self.runtime.device
        size, steps = len(prompts), config.max_new_tokens
        lengths = torch.tensor([len(prompt) for prompt in prompts])
        buffer = torch.full((size, int(lengths.max()) + steps), config.pad_token_id,
                            dtype=torch.long)
        for row, prompt in enumerate(prompts):
            buffer[row, :len(prompt)] = prompt
        buffer, lengths = buffer.to(device), lengths.to(device)
        rows = torch.arange(size, device=device)
        new = torch.full((size, steps), config.pad_token_id, dtype=torch.long, device=device)
        done = torch.zeros(size, dtype=torch.bool, device=device)
        for step in range(steps):
            width = int(lengths.max())
            inputs = {"input_ids": buffer[:, :width]}
            if with_mask:
                inputs["attention_mask"] = (torch.arange(width, device=device)[None, :]
                                            < lengths[:, None]).long()
            logits = logits_of(forward_model(model, inputs, {}), "generating model")
            scores = logits[rows, lengths - 1].float()
            token = self.sample(scores)
            token = torch.where(done, torch.full_like(token, config.pad_token_id), token)
            new[:, step] = token
            buffer[rows, lengths] = token
            lengths = lengths + 1
            if config.eos_token_id is not None:
                done = done | (token == config.eos_token_id)
        return new

    # the generated batches -------------------------------------------------------------------
    def causal_batch(self, model: nn.Module, batch: Mapping, seed: int) -> Dict[str, Any]:
        """The batch's prompts followed by ``model``'s continuation, right-padded.

        The prompt of a row is its tokens before the first target (``labels !=
        ignore_index``); without labels, all its attention-masked tokens. Returns a dict
        with ``input_ids``, ``attention_mask`` and ``labels`` (B, P + G): the prompt's
        labels are ``ignore_index``, the generated tokens (up to and including eos) are
        the targets. Other keys of the batch are dropped.
        """
        config = self.config
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        labels = batch.get("labels")
        size, length = ids.shape
        lengths = (mask != 0).long().sum(1).cpu()
        if labels is not None:
            targets = (labels != config.ignore_index).cpu()
            first = torch.where(targets.any(1), targets.float().argmax(1), lengths)
            lengths = torch.minimum(lengths, first.long())
        prompts = [ids[row, :int(lengths[row])].cpu() for row in range(size)]
        if any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("on-policy / seq-KD generation needs a prompt of at least one "
                             "token in every row (a row's first position is a target)")
        device = self.runtime.device
        with self.generating(model, seed):
            if callable(getattr(model, "generate", None)) and \
                    hasattr(model, "generation_config"):
                width = max(len(prompt) for prompt in prompts)
                # decoder-only generation continues the last column: pad on the left
                left = torch.full((size, width), config.pad_token_id, dtype=torch.long)
                left_mask = torch.zeros(size, width, dtype=torch.long)
                for row, prompt in enumerate(prompts):
                    left[row, width - len(prompt):] = prompt
                    left_mask[row, width - len(prompt):] = 1
                out = model.generate(input_ids=left.to(device),
                                     attention_mask=left_mask.to(device),
                                     generation_config=self.generation_config(model))
                new = out[:, width:]
            else:
                new = self.sample_loop(model, prompts, "attention_mask" in batch)
        new = new.cpu()
        kept = self.cut_after_eos(new)
        total = [len(prompt) + int(kept[row]) for row, prompt in enumerate(prompts)]
        width = max(total)
        input_ids = torch.full((size, width), config.pad_token_id, dtype=torch.long)
        attention = torch.zeros(size, width, dtype=torch.long)
        targets = torch.full((size, width), config.ignore_index, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            end, start = total[row], len(prompt)
            input_ids[row, :start] = prompt
            input_ids[row, start:end] = new[row, :end - start]
            attention[row, :end] = 1
            targets[row, start:end] = new[row, :end - start]
        return {"input_ids": input_ids, "attention_mask": attention, "labels": targets}

    def seq2seq_batch(self, model: nn.Module, batch: Mapping, seed: int) -> Dict[str, Any]:
        """The batch with ``labels`` replaced by ``model``'s generated decoder sequence
        (without the start token; after eos, ``ignore_index``)."""
        if not callable(getattr(model, "generate", None)):
            raise ValueError(f"on-policy / seq-KD generation with an encoder-decoder needs "
                             f"model.generate (a decoding loop); {type(model).__name__} has "
                             f"none")
        device = self.runtime.device
        encoder = {"input_ids": batch["input_ids"].to(device)}
        if batch.get("attention_mask") is not None:
            encoder["attention_mask"] = batch["attention_mask"].to(device)
        with self.generating(model, seed):
            out = model.generate(**encoder, generation_config=self.generation_config(model))
        new = out[:, 1:].cpu()  # generate starts with the decoder start token
        kept = self.cut_after_eos(new)
        positions = torch.arange(new.shape[1])[None, :]
        labels = new.masked_fill(positions >= kept[:, None], self.config.ignore_index)
        skip = {"labels", "decoder_input_ids", "decoder_attention_mask", self.config.cache_key}
        result = {key: value for key, value in batch.items() if key not in skip}
        result["labels"] = labels
        return result
