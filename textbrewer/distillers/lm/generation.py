"""On-policy and sequence-level KD: the batches a model generates itself.

:class:`Sampler` draws, for every batch, whether it is on-policy (the student continues
the batch's prompts) from its own seeded generator (saved in checkpoints), and generates
with every setting explicit: none is read from ``model.generation_config``. Models with a
``generate`` method (Transformers) use it; a plain causal module gets a simple sampling
loop over the whole right-padded sequence.

Two additions from the literature: :class:`AdaptiveOffPolicySchedule` (DistiLLM's
probability of student-generated batches, raised when the validation loss rises) and
:func:`speculative_replace` (Speculative KD: the teacher keeps the student's proposed token
when it is in its top-K, else replaces it by a token it samples), which the sampling loop
applies when ``LMDistillationConfig.speculative_top_k`` is set.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ...training.batches import forward_model
from .config import LMDistillationConfig
from .heads import logits_of

__all__ = ["Sampler", "AdaptiveOffPolicySchedule", "speculative_replace",
           "check_generation_options", "check_end_of_sequence"]


def speculative_replace(proposed: torch.Tensor, teacher_logits: torch.Tensor, top_k: int, *,
                        temperature: float = 1.0,
                        generator: Optional[torch.Generator] = None,
                        replacement: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Speculative KD's verification of one generation step (Xu et al., "Speculative
    Knowledge Distillation: Bridging the Teacher-Student Gap Through Interleaved
    Sampling", ICLR 2025).

    The student proposes a token per row; the teacher keeps it when it is among the
    teacher's ``top_k`` most likely tokens at that position (a token tied with the k-th
    logit counts as in), else replaces it by a token drawn from the teacher's
    distribution softmax(teacher_logits / temperature). A replacement is drawn for every
    row, kept or not, so the generator's position does not depend on the outcomes.

    Args:
        proposed: (B,) integer token ids proposed by the student.
        teacher_logits: (B, V) the teacher's next-token logits at the same positions.
        top_k: K >= 1 (at most V).
        temperature: > 0, of the teacher's replacement draws.
        generator: a seeded ``torch.Generator`` on the logits' device, or None for the
            global one.
        replacement: (B,) the teacher's tokens to use where the student's are rejected,
            drawn by the caller (the distillers draw them with the generation settings:
            greedy, top-k, top-p, temperature); None: drawn here from
            softmax(teacher_logits / temperature).

    Returns:
        ``(tokens, accepted)``: (B,) int64 ids, and (B,) bool, True where the student's
        token was kept.

    A proposed id >= V (a student vocabulary padded beyond the teacher's) is never in the
    teacher's top-K, so it is always replaced.

    Raises:
        ValueError: shapes that do not match, K outside [1, V], a negative proposed id, a
            temperature <= 0.
    """
    if proposed.dim() != 1 or teacher_logits.dim() != 2 \
            or teacher_logits.shape[0] != proposed.shape[0]:
        raise ValueError(f"speculative_replace needs proposed (B,) and teacher_logits (B, V), "
                         f"got {tuple(proposed.shape)} and {tuple(teacher_logits.shape)}")
    if proposed.dtype.is_floating_point:
        raise ValueError(f"proposed must hold integer token ids, got {proposed.dtype}")
    vocab = teacher_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be an integer in [1, {vocab}] (the teacher's "
                         f"vocabulary), got {top_k!r}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    proposed = proposed.long().to(teacher_logits.device)
    if proposed.numel() and int(proposed.min()) < 0:
        raise ValueError(f"proposed token ids must be >= 0, got {int(proposed.min())}")
    scores = teacher_logits.float()
    kth = scores.topk(top_k, dim=-1).values[:, -1]
    inside = proposed < vocab  # beyond the teacher's (padded) vocabulary: never in its top-K
    accepted = inside & (scores.gather(-1, proposed.clamp(max=vocab - 1)[:, None]).squeeze(-1)
                         >= kth)
    if replacement is not None:
        if tuple(replacement.shape) != tuple(proposed.shape):
            raise ValueError(f"replacement must be (B,) like proposed, got "
                             f"{tuple(replacement.shape)}")
        drawn = replacement.long().to(proposed.device)
    else:
        drawn = torch.multinomial((scores / temperature).softmax(-1), 1,
                                  generator=generator).squeeze(-1)
    return torch.where(accepted, proposed, drawn), accepted


class AdaptiveOffPolicySchedule:
    """DistiLLM's adaptive off-policy schedule (Ko et al., "DistiLLM: Towards Streamlined
    Distillation for Large Language Models", ICML 2024): the probability φ that a batch is
    generated by the student rises when the validation loss stops improving.

    Call :meth:`update` with each validation loss L (e.g. from a training callback). The
    first call only records L as the reference L_ref; after it::

        if L >= L_ref + loss_eps:   φ = min(φ + step, maximum),   L_ref = L

    (the reference moves only when φ does, as in the official code). Given to an LM
    distiller (``off_policy_schedule=``), φ replaces ``LMDistillationConfig.lmbda`` as the
    per-batch probability of student generation, and its state is saved in checkpoints.
    DistiLLM's replay buffer of student samples is not implemented: every student batch
    is generated fresh.

    Args:
        initial: φ at the start, in [0, 1] (DistiLLM: 0).
        step: the increase per rise of the loss, in (0, 1] (DistiLLM: 0.1).
        maximum: the largest φ, in [initial, 1] (DistiLLM: 1).
        loss_eps: how much the loss must rise, >= 0 (DistiLLM's official default 0.1; its
            OpenLLaMA scripts use 0.2). The official code also mixes in a replay buffer of
            earlier generations; here φ is the probability of a fresh student generation.
            Under DDP give every rank the same validation loss.

    Raises:
        ValueError: an option outside its range.
    """

    def __init__(self, initial: float = 0.0, step: float = 0.1, maximum: float = 1.0,
                 loss_eps: float = 0.1):
        for name, value in (("initial", initial), ("step", step), ("maximum", maximum),
                            ("loss_eps", loss_eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 < step <= 1:
            raise ValueError(f"step must be in (0, 1], got {step!r}")
        if not initial <= maximum <= 1:
            raise ValueError(f"need 0 <= initial <= maximum <= 1, got initial={initial!r}, "
                             f"maximum={maximum!r}")
        self.initial, self.step, self.maximum, self.loss_eps = \
            float(initial), float(step), float(maximum), float(loss_eps)
        self.probability = self.initial
        self.reference: Optional[float] = None

    def update(self, validation_loss: float) -> float:
        """Record one validation loss; returns the (possibly raised) probability."""
        loss = float(validation_loss)
        if not math.isfinite(loss):
            raise ValueError(f"validation_loss must be finite, got {validation_loss!r}")
        if self.reference is None:
            self.reference = loss
        elif loss >= self.reference + self.loss_eps:
            self.probability = min(self.probability + self.step, self.maximum)
            self.reference = loss
        return self.probability

    def state_dict(self) -> Dict[str, Optional[float]]:
        return {"probability": self.probability, "reference": self.reference}

    def load_state_dict(self, state: Dict[str, Optional[float]]) -> None:
        self.probability = float(state["probability"])
        self.reference = None if state.get("reference") is None else float(state["reference"])

    def __repr__(self) -> str:
        return (f"AdaptiveOffPolicySchedule(probability={self.probability}, step={self.step}, "
                f"maximum={self.maximum}, loss_eps={self.loss_eps})")


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
        #: the teacher that verifies the student's tokens (Speculative KD) while a
        #: :meth:`verifying` block runs; None otherwise
        self.verifier: Optional[nn.Module] = None

    # the coin --------------------------------------------------------------------------------
    def draw(self, probability: Optional[float] = None) -> Tuple[bool, int]:
        """(on-policy?, sampling seed) for one batch; both are drawn for every batch, so the
        generator's position does not depend on the outcomes. ``probability`` replaces
        ``config.lmbda`` (an :class:`AdaptiveOffPolicySchedule`'s current value)."""
        coin = float(torch.rand((), generator=self.rng))
        seed = int(torch.randint(0, 2 ** 62, (), generator=self.rng))
        return coin < (self.config.lmbda if probability is None else probability), seed

    @contextlib.contextmanager
    def verifying(self, teacher: Optional[nn.Module]):
        """Within the block, the student's generations are verified by ``teacher`` with
        :func:`speculative_replace` (nothing changes when ``teacher`` is None)."""
        saved, self.verifier = self.verifier, teacher
        try:
            yield
        finally:
            self.verifier = saved

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
        after it). With a :attr:`verifier` (Speculative KD), the teacher runs on the same
        sequence at every step and :func:`speculative_replace` keeps or replaces each
        sampled token before it is appended; the replacement draws use the same seeded
        RNG as the sampling."""
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
            if self.verifier is not None:  # Speculative KD: the teacher keeps or replaces
                verdict = logits_of(forward_model(self.verifier, inputs, {}), "verifying teacher")
                # the teacher's ids beyond the student's vocabulary (a padded alignment)
                # cannot be fed back to the student: they are never drawn
                teacher_scores = verdict[rows, lengths - 1].float()[:, :scores.shape[-1]]
                # the replacement follows the run's decoding settings, as the student's does
                token, _ = speculative_replace(token, teacher_scores,
                                               min(config.speculative_top_k,
                                                   teacher_scores.shape[-1]),
                                               replacement=self.sample(teacher_scores))
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
            # Speculative KD needs the teacher at every step: always the plain loop
            if self.verifier is None and callable(getattr(model, "generate", None)) and \
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


# ---------------------------------------------------------------------------------------
# checks made when a distiller is built, before anything is generated
# ---------------------------------------------------------------------------------------
def check_generation_options(config: LMDistillationConfig, model_T: Optional[nn.Module],
                             schedule: Optional["AdaptiveOffPolicySchedule"], causal: bool,
                             distiller: str) -> None:
    """The off-policy schedule and Speculative KD, checked against the rest of the set-up
    (``causal``: the distiller's logits at t predict t + 1; ``distiller``: its name)."""
    if schedule is not None:
        if not isinstance(schedule, AdaptiveOffPolicySchedule):
            raise TypeError(f"off_policy_schedule must be an AdaptiveOffPolicySchedule, "
                            f"got {type(schedule).__name__}")
        if model_T is None:
            raise ValueError("off_policy_schedule (student-generated batches) needs a live "
                             "teacher to score the student's samples, but model_T is None")
        if config.token_alignment is not None:
            raise ValueError(f"off_policy_schedule with token_alignment="
                             f"{config.token_alignment!r} is not supported: generated "
                             f"tokens would have to be re-tokenised for the teacher")
    if config.speculative_top_k is not None:
        if config.lmbda == 0 and schedule is None:
            raise ValueError(f"speculative_top_k={config.speculative_top_k} verifies the "
                             f"student's generations, but no batch is student-generated: "
                             f"set lmbda > 0 or pass off_policy_schedule=")
        if not causal:
            raise ValueError(f"speculative_top_k is for causal LMs; {distiller} is not one")
        if model_T is None:
            raise ValueError("speculative_top_k needs a live teacher (model_T is None)")


def _eos_ids(model: Optional[nn.Module], vocab: Optional[int]) -> set:
    """The EOS ids a model's ``config`` names, inside its vocabulary (a default left over
    from another vocabulary, GPT-2's 50256 in a 64-token model, names nothing)."""
    value = getattr(getattr(model, "config", None), "eos_token_id", None)
    ids = value if isinstance(value, (list, tuple)) else [value]
    return {int(i) for i in ids if isinstance(i, int) and (vocab is None or 0 <= i < vocab)}


def check_end_of_sequence(config: LMDistillationConfig,
                          schedule: Optional["AdaptiveOffPolicySchedule"],
                          model_S: nn.Module, model_T: Optional[nn.Module],
                          vocab_S: Optional[int], vocab_T: Optional[int]) -> None:
    """For runs that generate: the generation's EOS is one the student ends with, and the
    teacher ends sequences with the same token (a teacher that scores text past the
    student's end of turn is behind the on-policy collapse users report); the student can
    hold its prompt and ``max_new_tokens``."""
    if not (config.lmbda > 0 or config.seq_kd or schedule is not None):
        return
    eos_S, eos_T = _eos_ids(model_S, vocab_S), _eos_ids(model_T, vocab_T)
    if config.eos_token_id is not None and eos_S and config.eos_token_id not in eos_S:
        raise ValueError(f"LMDistillationConfig.eos_token_id={config.eos_token_id} but the "
                         f"student's config ends sequences with {sorted(eos_S)}: generation "
                         f"would not stop where the student's text ends; set eos_token_id "
                         f"to the student's")
    if eos_S and eos_T and not eos_S & eos_T:
        raise ValueError(f"the student ends sequences with token {sorted(eos_S)} and the "
                         f"teacher with {sorted(eos_T)}: on student-generated batches the "
                         f"teacher would score text past its own end of sequence; give "
                         f"both models the same tokenizer and EOS")
    model_config = getattr(model_S, "config", None)
    positions = getattr(model_config, "n_positions", None) or \
        getattr(model_config, "max_position_embeddings", None)
    if isinstance(positions, int) and config.max_new_tokens >= positions:
        raise ValueError(f"max_new_tokens={config.max_new_tokens} leaves no room for a "
                         f"prompt in the student's {positions} positions")
