"""Published distillation recipes, ready to use: DistilBERT's, and TinyBERT's layer mapping.

- :func:`distilbert_recipe`: DistilBERT's loss (Sanh, Debut, Chaumond, Wolf, 2019,
  arXiv:1910.01108) as a :class:`~textbrewer.DistillationConfig`: τ²-scaled KL between
  the softened masked-LM distributions at the masked positions, the student's own
  masked-LM loss, and a cosine loss between the last hidden states.
- :func:`init_student_from_teacher`: DistilBERT's initialisation: the student (half the
  layers, same width) gets the teacher's embeddings and one encoder layer out of two.
- :func:`mlm_adaptor`: the adaptor those two need, for ``transformers`` masked-LM models.
- :func:`tinybert_layer_mapping`: TinyBERT's uniform layer mapping (Jiao et al., 2020,
  arXiv:1909.10351) as ``intermediate_matches``, for any pair of depths and widths.
- :class:`PatientTeacher`: Beyer et al.'s patient and consistent teacher (CVPR 2022): KD
  only, function matching with mixup, warm-up and cosine decay over a long schedule.

``transformers`` is imported inside the functions that need it, never by
``import textbrewer``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .adaptors import AdaptorError
from .configurations import DistillationConfig
from .presets import layer_matches

__all__ = ["distilbert_recipe", "init_student_from_teacher", "mlm_adaptor",
           "tinybert_layer_mapping", "ATTENTION_INDEX_BASES", "PatientTeacher", "WarmupCosine"]


# ------------------------------------------------------------------------------ DistilBERT
def _check_weight(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def distilbert_recipe(temperature: float = 2.0, alpha_ce: float = 5.0, alpha_mlm: float = 2.0,
                      alpha_cos: float = 1.0, layer_T: int = -1, layer_S: int = -1,
                      proj: Optional[List[Any]] = None) -> DistillationConfig:
    """DistilBERT's loss as a :class:`~textbrewer.DistillationConfig`.

    With :func:`mlm_adaptor` on both sides (and ``output_hidden_states=True`` passed to the
    models, e.g. as a keyword argument of ``train()``) the total loss of a batch is::

        alpha_ce  · τ² · mean_{masked rows r} KL(softmax(z_T[r]/τ) ‖ softmax(z_S[r]/τ))
      + alpha_mlm · the student's masked-LM cross-entropy (its ``outputs.loss``)
      + alpha_cos · mean_{real tokens t} (1 − cos(h_S[t], h_T[t]))

    where the masked rows are the positions whose label is not -100 (``logits_mask``), the
    real tokens those with ``attention_mask`` 1 (``inputs_mask``), and ``h`` the hidden
    states ``layer_S`` / ``layer_T`` (default: the last). The defaults are DistilBERT's
    published ones (``--temperature 2 --alpha_ce 5 --alpha_mlm 2 --alpha_cos 1``; its
    ``alpha_mse`` and ``alpha_clm`` are 0 and left out). ``'kl'`` is the τ²-scaled KL
    (:func:`textbrewer.losses.kd_kl_loss`), as DistilBERT's ``KLDivLoss(reduction=
    'batchmean') · τ²``.

    Args:
        temperature: τ (> 0).
        alpha_ce: weight of the soft-target (KL) term.
        alpha_mlm: weight of the student's masked-LM loss (``hard_label_weight``).
        alpha_cos: weight of the cosine term; 0 leaves the match out.
        layer_T: the teacher's hidden-state index for the cosine term (-1: the last).
        layer_S: the student's.
        proj: a projection ``['linear', width_S, width_T]`` for the cosine term when the
            student is narrower than the teacher (DistilBERT keeps the width: None).

    Returns:
        A :class:`~textbrewer.DistillationConfig` (``kd_loss_type='kl'``).

    Raises:
        ValueError: a negative or non-finite weight, a temperature ≤ 0, a layer that is
            not an int.

    Example:
        >>> config = distilbert_recipe()
        >>> config.kd_loss_type, config.kd_loss_weight, config.hard_label_weight
        ('kl', 5.0, 2.0)
    """
    _check_weight("temperature", temperature, positive=True)
    for name, value in (("alpha_ce", alpha_ce), ("alpha_mlm", alpha_mlm),
                        ("alpha_cos", alpha_cos)):
        _check_weight(name, value)
    for name, value in (("layer_T", layer_T), ("layer_S", layer_S)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int (a hidden-state index, -1 = the last), "
                             f"got {value!r}")
    matches = []
    if alpha_cos > 0:
        match: Dict[str, Any] = {"layer_T": layer_T, "layer_S": layer_S, "feature": "hidden",
                                 "loss": "cos", "weight": float(alpha_cos)}
        if proj is not None:
            match["proj"] = list(proj)
        matches.append(match)
    return DistillationConfig(temperature=float(temperature), kd_loss_type="kl",
                              kd_loss_weight=float(alpha_ce),
                              hard_label_weight=float(alpha_mlm),
                              intermediate_matches=matches)


def mlm_adaptor(labels_key: str = "labels", attention_mask_key: str = "attention_mask",
                hidden: bool = True, ignore_index: int = -100) -> Callable:
    """An adaptor for ``transformers`` masked-LM models (``BertForMaskedLM``, ...).

    The batch is a dict such as ``{'input_ids', 'attention_mask', 'labels'}`` (each
    (B, L)), passed as ``model(**batch)``; labels are -100 except at the masked positions.

    The adaptor returns:

    - ``logits``: (B, L, V) the model's ``logits``;
    - ``logits_mask``: (B, L) bool, ``labels != ignore_index`` (the KD term only looks at
      the masked positions);
    - ``losses``: the model's own masked-LM loss (when it computed one);
    - ``inputs_mask``: (B, L) the attention mask (the cosine term skips padding);
    - ``hidden``: the ``hidden_states`` tuple, L + 1 tensors (B, L, D), embeddings first
      (with ``hidden=True``; the models must be called with ``output_hidden_states=True``).

    Args:
        labels_key: the batch's key for the masked-LM labels.
        attention_mask_key: the batch's key for the attention mask.
        hidden: return the hidden states (needed by the cosine term).
        ignore_index: the label of positions that are not predicted.

    Returns:
        ``adaptor(batch, outputs) -> dict``.
    """
    for name, value in (("labels_key", labels_key), ("attention_mask_key", attention_mask_key)):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string (a key of the batch dicts), got {value!r}")

    def adaptor(batch: Mapping[str, torch.Tensor], outputs: Any) -> Dict[str, Any]:
        if not isinstance(batch, Mapping):
            raise AdaptorError(f"mlm_adaptor needs dict batches (keys {labels_key!r}, "
                               f"{attention_mask_key!r}, ...), got {type(batch).__name__}")
        for key in (labels_key, attention_mask_key):
            if key not in batch:
                raise AdaptorError(f"mlm_adaptor: the batch has no {key!r} (keys: "
                                   f"{sorted(batch)})")
        if not isinstance(outputs, Mapping) or outputs.get("logits") is None:
            raise AdaptorError(f"mlm_adaptor needs the model to return a dict-like output with "
                               f"'logits' (a transformers ModelOutput; return_dict=True), got "
                               f"{type(outputs).__name__}")
        labels = batch[labels_key]
        result: Dict[str, Any] = {"logits": outputs["logits"],
                                  "logits_mask": labels != ignore_index,
                                  "inputs_mask": batch[attention_mask_key]}
        if outputs.get("loss") is not None:
            result["losses"] = outputs["loss"]
        if hidden:
            states = outputs.get("hidden_states")
            if states is None:
                raise AdaptorError("mlm_adaptor(hidden=True): the model returned no "
                                   "hidden_states; call it with output_hidden_states=True "
                                   "(e.g. distiller.train(..., output_hidden_states=True))")
            result["hidden"] = list(states)
        return result

    return adaptor


# ------------------------------------------------------------ DistilBERT's initialisation
# A model is read as canonical parts, so a BERT teacher can initialise a DistilBERT
# student (the original recipe) as well as a shallower BERT.
_LAYER_PARTS = ("query", "key", "value", "attention_output", "attention_norm",
                "intermediate", "output", "output_norm")


def _bert_layer(layer: nn.Module) -> Dict[str, nn.Module]:
    return {"query": layer.attention.self.query, "key": layer.attention.self.key,
            "value": layer.attention.self.value,
            "attention_output": layer.attention.output.dense,
            "attention_norm": layer.attention.output.LayerNorm,
            "intermediate": layer.intermediate.dense, "output": layer.output.dense,
            "output_norm": layer.output.LayerNorm}


def _distilbert_layer(layer: nn.Module) -> Dict[str, nn.Module]:
    return {"query": layer.attention.q_lin, "key": layer.attention.k_lin,
            "value": layer.attention.v_lin, "attention_output": layer.attention.out_lin,
            "attention_norm": layer.sa_layer_norm, "intermediate": layer.ffn.lin1,
            "output": layer.ffn.lin2, "output_norm": layer.output_layer_norm}


def _structure(model: nn.Module, role: str) -> Dict[str, Any]:
    """The parts of a BERT / DistilBERT model: embeddings, layers, MLM head, settings."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - exercised only without transformers
        raise ImportError("init_student_from_teacher needs transformers "
                          "(pip install 'textbrewer[transformers]')") from None
    bert_types = (transformers.BertModel, transformers.DistilBertModel)
    backbone = model if isinstance(model, bert_types) else None
    for name in ("bert", "distilbert"):
        if backbone is None and isinstance(getattr(model, name, None), bert_types):
            backbone = getattr(model, name)
    if backbone is None:
        raise TypeError(f"init_student_from_teacher: the {role} is a {type(model).__name__}; "
                        f"supported: transformers BertModel, DistilBertModel and the models "
                        f"built on them (BertForMaskedLM, DistilBertForMaskedLM, ...)")
    config, embeddings = backbone.config, backbone.embeddings
    if isinstance(backbone, transformers.BertModel):
        kind, layers = "bert", [_bert_layer(layer) for layer in backbone.encoder.layer]
        heads, activation = config.num_attention_heads, config.hidden_act
        token_type = embeddings.token_type_embeddings
        position_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if position_type != "absolute":
            raise ValueError(f"init_student_from_teacher: the {role} uses "
                             f"position_embedding_type={position_type!r}; only 'absolute' "
                             f"position embeddings are supported")
    else:
        kind, layers = "distilbert", [_distilbert_layer(layer)
                                      for layer in backbone.transformer.layer]
        heads, activation, token_type = config.n_heads, config.activation, None
    head = None
    if isinstance(model, transformers.BertForMaskedLM):
        predictions = model.cls.predictions
        head = {"transform": predictions.transform.dense,
                "transform_norm": predictions.transform.LayerNorm,
                "decoder": predictions.decoder, "bias": predictions.bias}
    elif isinstance(model, transformers.DistilBertForMaskedLM):
        head = {"transform": model.vocab_transform, "transform_norm": model.vocab_layer_norm,
                "decoder": model.vocab_projector, "bias": model.vocab_projector.bias}
    return {"kind": kind, "word": embeddings.word_embeddings,
            "position": embeddings.position_embeddings, "token_type": token_type,
            "embedding_norm": embeddings.LayerNorm, "layers": layers, "heads": heads,
            "activation": activation, "head": head,
            "sinusoidal": bool(getattr(config, "sinusoidal_pos_embds", False))}


def _copy(target: torch.Tensor, source: torch.Tensor, where: str) -> None:
    if target.shape != source.shape:
        raise ValueError(f"init_student_from_teacher: {where}: the student's shape "
                         f"{tuple(target.shape)} differs from the teacher's "
                         f"{tuple(source.shape)} (the student must have the teacher's "
                         f"width, feed-forward size, vocabulary and maximum length)")
    target.copy_(source)


def _copy_module(target: nn.Module, source: nn.Module, where: str) -> None:
    for name, parameter in source.named_parameters(recurse=False):
        _copy(getattr(target, name), parameter, f"{where}.{name}")


@torch.no_grad()
def init_student_from_teacher(teacher: nn.Module, student: nn.Module,
                              layer_map: Optional[Sequence[int]] = None,
                              copy_head: bool = True) -> List[int]:
    """DistilBERT's initialisation: teacher embeddings and every other layer into the student.

    Student layer ``i`` becomes a copy of teacher layer ``layer_map[i]`` (default
    ``2 i``, for a student with half the teacher's layers); the embeddings (word,
    position, token type, LayerNorm) and, with ``copy_head``, the masked-LM head are
    copied too. Works for ``transformers`` BERT and DistilBERT models in either role
    (a BERT teacher into a DistilBERT student is the original recipe): between the two
    families the weights are matched by role (``query`` ↔ ``q_lin``, ...). DistilBERT
    has no token-type embeddings: from a BERT teacher, its token type 0 row is added to
    the student's position embeddings (so the embeddings agree for ``token_type_ids=0``);
    into a BERT student from a DistilBERT teacher, the token-type rows are zeroed.

    Args:
        teacher: ``BertModel`` / ``DistilBertModel`` or a model built on one
            (``BertForMaskedLM``, ``DistilBertForMaskedLM``, ...).
        student: the same kinds; same width, feed-forward size, heads, activation,
            vocabulary and maximum length as the teacher.
        layer_map: the teacher layer (0-based) copied into each student layer; needed
            when the teacher does not have exactly twice the student's layers.
        copy_head: also copy the masked-LM head (transform, LayerNorm, output bias; the
            decoder weight is tied to the word embeddings) when both models have one.

    Returns:
        The layer map used (one teacher index per student layer).

    Raises:
        TypeError: a model that is not one of the supported kinds.
        ValueError: a bad ``layer_map``, or a shape, head-count or activation mismatch
            (the message names the parameter).
    """
    parts_T, parts_S = _structure(teacher, "teacher"), _structure(student, "student")
    layers_T, layers_S = len(parts_T["layers"]), len(parts_S["layers"])
    if layer_map is None:
        if layers_T != 2 * layers_S:
            uniform = [round(i * (layers_T - 1) / max(layers_S - 1, 1)) for i in range(layers_S)]
            raise ValueError(f"init_student_from_teacher: the default layer_map (teacher layer "
                             f"2i into student layer i) needs a teacher with twice the "
                             f"student's layers, got {layers_T} and {layers_S}; pass layer_map, "
                             f"e.g. {uniform}")
        layer_map = [2 * i for i in range(layers_S)]
    layer_map = list(layer_map)
    if len(layer_map) != layers_S:
        raise ValueError(f"init_student_from_teacher: layer_map has {len(layer_map)} entries "
                         f"but the student has {layers_S} layers")
    for position, index in enumerate(layer_map):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < layers_T:
            raise ValueError(f"init_student_from_teacher: layer_map[{position}]={index!r} is "
                             f"not a teacher layer (0..{layers_T - 1})")
    if parts_T["heads"] != parts_S["heads"]:
        raise ValueError(f"init_student_from_teacher: the teacher has {parts_T['heads']} "
                         f"attention heads and the student {parts_S['heads']}; copied layers "
                         f"need the same number")
    if parts_T["activation"] != parts_S["activation"]:
        raise ValueError(f"init_student_from_teacher: the teacher's activation is "
                         f"{parts_T['activation']!r} and the student's "
                         f"{parts_S['activation']!r}; copied layers need the same one")
    if parts_S["sinusoidal"]:
        raise ValueError("init_student_from_teacher: the student has sinusoidal_pos_embds=True "
                         "(fixed position embeddings); copying the teacher's learned ones needs "
                         "sinusoidal_pos_embds=False")

    _copy(parts_S["word"].weight, parts_T["word"].weight, "embeddings.word_embeddings.weight")
    position = parts_T["position"].weight
    if parts_T["token_type"] is not None and parts_S["token_type"] is None:
        position = position + parts_T["token_type"].weight[0]  # fold token type 0 in
    _copy(parts_S["position"].weight, position, "embeddings.position_embeddings.weight")
    if parts_S["token_type"] is not None:
        if parts_T["token_type"] is not None:
            _copy(parts_S["token_type"].weight, parts_T["token_type"].weight,
                  "embeddings.token_type_embeddings.weight")
        else:
            parts_S["token_type"].weight.zero_()
    _copy_module(parts_S["embedding_norm"], parts_T["embedding_norm"], "embeddings.LayerNorm")
    for index_S, index_T in enumerate(layer_map):
        for part in _LAYER_PARTS:
            _copy_module(parts_S["layers"][index_S][part], parts_T["layers"][index_T][part],
                         f"layer {index_S} (teacher layer {index_T}) {part}")
    head_T, head_S = parts_T["head"], parts_S["head"]
    if copy_head and head_T is not None and head_S is not None:
        _copy_module(head_S["transform"], head_T["transform"], "mlm head transform")
        _copy_module(head_S["transform_norm"], head_T["transform_norm"],
                     "mlm head transform LayerNorm")
        if head_S["decoder"].weight is not parts_S["word"].weight:  # untied output layer
            _copy(head_S["decoder"].weight, head_T["decoder"].weight, "mlm head decoder.weight")
        _copy(head_S["bias"], head_T["bias"], "mlm head bias")
    return layer_map


# ---------------------------------------------------------------------------- TinyBERT
#: ``attention_index_base`` choices of :func:`tinybert_layer_mapping`.
ATTENTION_INDEX_BASES = ("transformers", "textbrewer")
_DEFAULT_LOSSES = {"hidden": "hidden_mse", "attention": "attention_mse"}


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def tinybert_layer_mapping(teacher_layers: int, student_layers: int, teacher_width: int,
                           student_width: int,
                           features: Sequence[str] = ("hidden", "attention"),
                           loss: Union[None, str, Mapping[str, str]] = None,
                           attention_index_base: str = "transformers",
                           weight: float = 1.0) -> List[Dict[str, Any]]:
    """TinyBERT's uniform layer mapping as ``intermediate_matches``, for any depths and widths.

    Student layer ``m`` (1..M) learns from teacher layer ``g(m) = m·N/M`` (N teacher
    layers, M student layers; rounded half up, ``floor(m·N/M + ½)``, when M does not
    divide N, so ``g(M) = N`` always). Hidden states also match the embeddings,
    ``g(0) = 0``.

    Index conventions (what the adaptor's lists hold):

    - ``hidden``: the adaptor returns N + 1 (M + 1) hidden states, **index 0 is the
      embeddings' output** and index ``m`` the output of layer ``m`` (as ``transformers``'
      ``hidden_states``). So the hidden matches are ``(g(m), m)`` for m = 0..M, the same
      in both conventions. A projection ``['linear', student_width, teacher_width]`` is
      added when the widths differ.
    - ``attention``: there is no attention for the embeddings. ``'transformers'`` (default):
      ``outputs.attentions`` has one entry per layer from 0, so layer ``m`` is index
      ``m − 1`` and the matches are ``(g(m) − 1, m − 1)`` (as
      :data:`textbrewer.MATCHES_TRANSFORMERS`). ``'textbrewer'``: the attention list counts
      layers from 1, as TextBrewer's examples' adaptors did (:data:`textbrewer.MATCHES`),
      so the matches are ``(g(m), m)``. Attention losses need the same number of heads on
      both sides (or a loss that averages or sums over heads, e.g.
      ``'attention_ce_mean'``).

    With ``(12, 4, 768, 312)`` and ``features=('hidden',)`` this is
    ``MATCHES['L4t_hidden_mse']``; with ``('attention',)`` and ``'textbrewer'``,
    ``MATCHES['L4_attention_mse']``.

    Args:
        teacher_layers: N, the teacher's number of layers.
        student_layers: M ≤ N, the student's.
        teacher_width: the teacher's hidden size.
        student_width: the student's hidden size.
        features: which matches, in this order: ``'hidden'`` and/or ``'attention'``.
        loss: None (``'hidden_mse'`` / ``'attention_mse'``, TinyBERT's), one loss name
            for every feature, or a dict ``{feature: loss}``.
        attention_index_base: ``'transformers'`` or ``'textbrewer'`` (see above).
        weight: the weight of every match.

    Returns:
        A list of match dicts (``layer_T, layer_S, feature, loss, weight`` and ``proj``
        where the widths differ), for ``DistillationConfig(intermediate_matches=...)``.

    Raises:
        ValueError: a non-positive size, a student deeper than the teacher, an unknown
            feature or index base, a loss dict with a feature not asked for.
    """
    for name, value in (("teacher_layers", teacher_layers), ("student_layers", student_layers),
                        ("teacher_width", teacher_width), ("student_width", student_width)):
        _check_positive_int(name, value)
    if student_layers > teacher_layers:
        raise ValueError(f"student_layers={student_layers} exceeds teacher_layers="
                         f"{teacher_layers}; TinyBERT's mapping assigns each student layer a "
                         f"distinct teacher layer")
    if attention_index_base not in ATTENTION_INDEX_BASES:
        raise ValueError(f"attention_index_base must be one of {list(ATTENTION_INDEX_BASES)}, "
                         f"got {attention_index_base!r}")
    if isinstance(features, str):
        features = (features,)
    features = list(features)
    unknown = [f for f in features if f not in _DEFAULT_LOSSES]
    if not features or unknown or len(set(features)) != len(features):
        raise ValueError(f"features must be distinct names from {list(_DEFAULT_LOSSES)}, got "
                         f"{features!r}")
    if loss is None:
        losses = {f: _DEFAULT_LOSSES[f] for f in features}
    elif isinstance(loss, str):
        losses = {f: loss for f in features}
    elif isinstance(loss, Mapping):
        extra = sorted(set(loss) - set(features))
        if extra:
            raise ValueError(f"loss names features {extra} that are not in features="
                             f"{features!r}")
        losses = {f: loss.get(f, _DEFAULT_LOSSES[f]) for f in features}
    else:
        raise ValueError(f"loss must be None, a loss name or a dict {{feature: loss name}}, "
                         f"got {loss!r}")
    _check_weight("weight", weight)

    def g(m: int) -> int:  # floor(m·N/M + 1/2) in integers
        return (2 * m * teacher_layers + student_layers) // (2 * student_layers)

    matches: List[Dict[str, Any]] = []
    for feature in features:
        if feature == "hidden":
            proj = (None if student_width == teacher_width
                    else ["linear", student_width, teacher_width])
            matches += layer_matches([g(m) for m in range(student_layers + 1)],
                                     list(range(student_layers + 1)), "hidden",
                                     losses["hidden"], weight, proj=proj)
        else:
            offset = 1 if attention_index_base == "transformers" else 0
            layers = range(1, student_layers + 1)
            matches += layer_matches([g(m) - offset for m in layers],
                                     [m - offset for m in layers], "attention",
                                     losses["attention"], weight)
    return matches


# ------------------------------------------------------------------------- patient teacher
class WarmupCosine:
    """``lr_lambda`` for ``torch.optim.lr_scheduler.LambdaLR``: a linear warm-up over
    ``warmup_steps``, then a cosine decay to ``final_fraction`` of the rate at
    ``total_steps`` (and that fraction after it). A step is one optimizer step (one
    ``LambdaLR.step()``). An object, not a lambda, so the scheduler's ``state_dict`` holds
    its settings."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0):
        _check_positive_int("total_steps", total_steps)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) \
                or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}), "
                             f"got {warmup_steps!r}")
        _check_weight("final_fraction", final_fraction)
        if final_fraction > 1:
            raise ValueError(f"final_fraction must be in [0, 1] (a fraction of the peak rate), "
                             f"got {final_fraction!r}")
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.final_fraction = float(final_fraction)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        done = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * done))


class PatientTeacher:
    """Beyer et al.'s recipe (CVPR 2022, "a good teacher is patient and consistent"):
    KD only (τ²-scaled KL at ``temperature``, no hard labels), the teacher and the student
    on the same mixed view of each batch (:class:`~textbrewer.teaching.FunctionMatching`),
    a long schedule with warm-up and cosine decay.

    Attributes:
        distill_config: the ``DistillationConfig`` (``kd_loss_type='kl'``,
            ``hard_label_weight=0``, ``kd_loss_weight=1``).
        batch_postprocessor: the ``FunctionMatching`` (None with ``mix=None``).
        scheduler_class: ``torch.optim.lr_scheduler.LambdaLR``.
        scheduler_args: ``{'lr_lambda': WarmupCosine(total_steps, warm-up steps)}``.

    ``distiller.train(optimizer, data, num_steps=total_steps, **recipe.train_options())``.

    Args:
        total_steps: optimizer steps of the whole schedule.
        input_key: the batch's input to mix (see ``FunctionMatching``).
        mix: ``'mixup'``, ``'cutmix'`` or None (no mixing).
        alpha: the Beta(alpha, alpha) of the mixing weight.
        temperature: the KD temperature τ.
        warmup_fraction: the share of ``total_steps`` spent warming up.
        seed: the mixing's seed.
        mix_probability: the fraction of batches mixed.
        **distill_options: further ``DistillationConfig`` fields (e.g. intermediate matches);
            ``hard_label_weight`` > 0 needs ``mix=None`` (mixed batches carry no labels).
    """

    def __init__(self, total_steps: int, input_key: Any = "features",
                 mix: Optional[str] = "mixup", alpha: float = 1.0, temperature: float = 1.0,
                 warmup_fraction: float = 0.05, seed: int = 0, mix_probability: float = 1.0,
                 **distill_options: Any):
        from .teaching import FunctionMatching
        _check_positive_int("total_steps", total_steps)
        _check_weight("temperature", temperature, positive=True)
        if isinstance(warmup_fraction, bool) or not isinstance(warmup_fraction, (int, float)) \
                or not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
        options = dict(temperature=temperature, kd_loss_type="kl", kd_loss_weight=1,
                       hard_label_weight=0)
        options.update(distill_options)
        self.distill_config = DistillationConfig(**options)
        self.total_steps = total_steps
        if mix is not None and options["hard_label_weight"]:
            raise ValueError("PatientTeacher: FunctionMatching drops the labels of every batch, "
                             "so hard_label_weight has nothing to weigh; pass mix=None to "
                             "train on the labels too")
        self.batch_postprocessor = None if mix is None else FunctionMatching(
            input_key, mode=mix, alpha=alpha, probability=mix_probability, seed=seed)
        self.scheduler_class = torch.optim.lr_scheduler.LambdaLR
        self.scheduler_args = {"lr_lambda": WarmupCosine(
            total_steps, int(warmup_fraction * total_steps))}

    def train_options(self) -> Dict[str, Any]:
        """``scheduler_class``, ``scheduler_args`` and ``batch_postprocessor`` for
        ``train()``."""
        options: Dict[str, Any] = dict(scheduler_class=self.scheduler_class,
                                       scheduler_args=dict(self.scheduler_args))
        if self.batch_postprocessor is not None:
            options["batch_postprocessor"] = self.batch_postprocessor
        return options
