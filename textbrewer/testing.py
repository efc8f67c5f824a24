"""Tiny models and adaptors, shipped for tests, examples and users' own tests.

:class:`TinyTransformer` is a small BERT-like encoder (post-LayerNorm) written in plain
PyTorch that returns what distillation needs: logits, every layer's hidden states (the
embeddings first) and every layer's pre-softmax attention scores.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyTransformer", "tiny_adaptor", "make_classification_data", "train_tokenizer",
           "TOKENIZER_KINDS"]


class _SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by "
                             f"num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_size = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor):
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_size) \
            .permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size) + additive_mask
        probs = self.dropout(F.softmax(scores, dim=-1))
        context = (probs @ v).transpose(1, 2).reshape(batch, length, -1)
        return self.out(context), scores


class _Layer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.attention = _SelfAttention(hidden_size, num_heads, dropout)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.feed_forward = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(),
                                          nn.Linear(4 * hidden_size, hidden_size))
        self.norm2 = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, additive_mask):
        attended, scores = self.attention(x, additive_mask)
        x = self.norm1(x + self.dropout(attended))
        x = self.norm2(x + self.dropout(self.feed_forward(x)))
        return x, scores


class TinyTransformer(nn.Module):
    """A small transformer encoder for sequence or token classification.

    Args:
        vocab_size: embed token ids (B, L); or None and give ``input_dim``.
        input_dim: project real-valued features (B, L, input_dim) instead of ids.
        hidden_size: width D.
        num_layers: encoder layers.
        num_heads: attention heads H.
        num_labels: classes C.
        max_length: longest sequence L (learned position embeddings).
        dropout: dropout probability.
        token_level: logits per position (B, L, C) instead of per sequence (B, C).

    Forward args:
        input_ids: (B, L) long, or ``features``: (B, L, input_dim) float.
        attention_mask: (B, L), 1 = real token (default all ones).
        labels: (B,) or (B, L) (-100 = ignore) to also return a cross-entropy ``loss``.

    Returns:
        dict with ``logits`` (B, C) or (B, L, C); ``hidden_states``, a tuple of
        num_layers + 1 tensors (B, L, D) (embeddings first); ``attentions``, a tuple of
        num_layers pre-softmax score tensors (B, H, L, L) (padded keys at -10000);
        ``attention_mask``; and ``loss`` when labels are given.
    """

    def __init__(self, vocab_size: Optional[int] = None, input_dim: Optional[int] = None,
                 hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                 num_labels: int = 3, max_length: int = 16, dropout: float = 0.0,
                 token_level: bool = False):
        super().__init__()
        if (vocab_size is None) == (input_dim is None):
            raise ValueError("give exactly one of vocab_size (token ids) and input_dim "
                             "(real-valued features)")
        self.token_level = token_level
        self.embed = (nn.Embedding(vocab_size, hidden_size) if vocab_size is not None
                      else nn.Linear(input_dim, hidden_size))
        self.positions = nn.Embedding(max_length, hidden_size)
        self.embed_norm = nn.LayerNorm(hidden_size)
        self.layers = nn.ModuleList(_Layer(hidden_size, num_heads, dropout)
                                    for _ in range(num_layers))
        self.classifier = nn.Linear(hidden_size, num_labels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Optional[torch.Tensor] = None,
                features: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        inputs = input_ids if input_ids is not None else features
        if inputs is None:
            raise ValueError("TinyTransformer needs input_ids or features")
        batch, length = inputs.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, device=inputs.device)
        positions = torch.arange(length, device=inputs.device)
        x = self.embed_norm(self.embed(inputs) + self.positions(positions))
        x = self.dropout(x)
        additive_mask = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * -10000.0
        hidden_states, attentions = [x], []
        for layer in self.layers:
            x, scores = layer(x, additive_mask)
            hidden_states.append(x)
            attentions.append(scores)
        if self.token_level:
            logits = self.classifier(x)
        else:
            weights = attention_mask.to(x.dtype).unsqueeze(-1)
            pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1)
            logits = self.classifier(pooled)
        outputs = {"logits": logits, "hidden_states": tuple(hidden_states),
                   "attentions": tuple(attentions), "attention_mask": attention_mask}
        if labels is not None:
            outputs["loss"] = F.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                              labels.reshape(-1), ignore_index=-100)
        return outputs


def tiny_adaptor(batch: Any, outputs: Dict[str, Any]) -> Dict[str, Any]:
    """Adaptor for :class:`TinyTransformer`: logits, hidden, attention, inputs_mask, losses."""
    result = {"logits": outputs["logits"], "hidden": list(outputs["hidden_states"]),
              "attention": list(outputs["attentions"]),
              "inputs_mask": outputs["attention_mask"]}
    if "loss" in outputs:
        result["losses"] = outputs["loss"]
    if isinstance(batch, dict) and "labels" in batch:
        result["labels"] = batch["labels"]
    return result


def make_classification_data(num_examples: int = 64, length: int = 8, vocab_size: int = 20,
                             num_labels: int = 3, seed: int = 0, padded: bool = True
                             ) -> Dict[str, torch.Tensor]:
    """A small synthetic sequence-classification set whose label depends on the tokens.

    The label is (number of tokens below ``vocab_size // 2``) mod ``num_labels``, so
    models can learn it. Returns ``input_ids`` (N, L), ``attention_mask`` (N, L) with
    random padding at the end when ``padded``, and ``labels`` (N,).
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (num_examples, length), generator=generator)
    if padded:
        lengths = torch.randint(length // 2, length + 1, (num_examples,), generator=generator)
    else:
        lengths = torch.full((num_examples,), length)
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask
    labels = (((input_ids < vocab_size // 2) & (attention_mask == 1)).sum(1)) % num_labels
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


#: the kinds of tokenizer :func:`train_tokenizer` trains
TOKENIZER_KINDS = ("byte_bpe", "sentencepiece_bpe", "wordpiece", "unigram")


def train_tokenizer(kind: str, texts: Any, vocab_size: int) -> Any:
    """A real tokenizer trained offline on ``texts`` in seconds (the ``tokenizers``
    library, which transformers installs), for cross-tokenizer tests and examples.

    ``'byte_bpe'``: GPT-2-style byte-level BPE, ``<s> … </s>`` around each text (ids 1 and
    2; ``<pad>`` is 0). ``'wordpiece'``: BERT-style (whitespace dropped, punctuation split,
    ``##`` continuations), ``[CLS] … [SEP]``, ``[PAD]`` = 0. ``'sentencepiece_bpe'``:
    Llama-style BPE over ``▁``-marked words (characters, ``<unk>`` for unseen ones), ``<s>``
    in front (id 1; ``<pad>`` 0, ``<unk>`` 2). ``'unigram'``: SentencePiece-style Unigram
    with ``▁`` word starts, ``</s>`` at the end, ``<pad>`` = 0.

    The two BPE kinds train to the same vocabulary on every run; the WordPiece and Unigram
    trainers of ``tokenizers`` break ties differently from run to run (even on one thread),
    so save those (``tokenizer.save(path)``) where runs must agree.

    Args:
        kind: one of :data:`TOKENIZER_KINDS`.
        texts: an iterable of strings.
        vocab_size: the vocabulary to learn (special tokens included).

    Returns:
        a ``tokenizers.Tokenizer``.
    """
    from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors, trainers)
    texts = list(texts)
    if kind == "byte_bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      special_tokens=["<pad>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer)
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    elif kind == "sentencepiece_bpe":
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      special_tokens=["<pad>", "<s>", "<unk>"])
        tokenizer.train_from_iterator(texts, trainer)
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)])
    elif kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                            special_tokens=["[PAD]", "[UNK]", "[CLS]",
                                                            "[SEP]"])
        tokenizer.train_from_iterator(texts, trainer)
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    elif kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, show_progress=False,
                                          special_tokens=["<pad>", "<unk>", "</s>"],
                                          unk_token="<unk>")
        tokenizer.train_from_iterator(texts, trainer)
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", 2)])
    else:
        raise ValueError(f"kind must be one of {list(TOKENIZER_KINDS)}, got {kind!r}")
    return tokenizer
