"""transformers 5 without friction: attention maps under sdpa, 0.2.1 presets, missing labels.

Real ``BertForSequenceClassification`` models, built tiny from a ``BertConfig`` (nothing is
downloaded), go through ``GeneralDistiller`` as a user's script would send them.
"""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from textbrewer import (MATCHES, MATCHES_TRANSFORMERS, DistillationConfig,  # noqa: E402
                        GeneralDistiller, TrainingConfig)
from textbrewer.adaptors import AdaptorError  # noqa: E402

VOCAB, LENGTH, LABELS = 40, 8, 3


def _bert(layers, width=16, heads=2, attn_implementation=None, seed=0):
    options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    config = BertConfig(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * width,
                        max_position_embeddings=LENGTH, num_labels=LABELS, **options)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def _batches(count=2, with_labels=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        batch = {"input_ids": torch.randint(1, VOCAB, (4, LENGTH), generator=generator),
                 "attention_mask": torch.ones(4, LENGTH, dtype=torch.long)}
        batch["attention_mask"][0, LENGTH // 2:] = 0  # one padded example
        if with_labels:
            batch["labels"] = torch.randint(0, LABELS, (4,), generator=generator)
        batches.append(batch)
    return batches


def adaptor(batch, outputs):
    # What TextBrewer users write for transformers models: everything straight from outputs.
    return {"logits": outputs.logits, "hidden": outputs.hidden_states,
            "attention": outputs.attentions, "inputs_mask": batch["attention_mask"],
            "losses": outputs.loss}


def _distil(tmp_path, teacher, student, matches, batches=None, hard_label_weight=0.0):
    """One epoch of GeneralDistiller; returns the named loss parts of every batch."""
    distiller = GeneralDistiller(
        TrainingConfig(device="cpu", output_dir=str(tmp_path), ckpt_frequency=1, log_steps=1),
        DistillationConfig(temperature=2, hard_label_weight=hard_label_weight,
                           intermediate_matches=matches),
        model_T=teacher, model_S=student, adaptor_T=adaptor, adaptor_S=adaptor)
    parts_seen = []
    compute_loss = distiller.compute_loss

    def recording_compute_loss(results_S, results_T):
        total, parts = compute_loss(results_S, results_T)
        parts_seen.append({name: float(value.detach()) for name, value in parts.items()})
        return total, parts

    distiller.compute_loss = recording_compute_loss
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    with distiller:
        distiller.train(optimizer, batches if batches is not None else _batches(), num_epochs=1,
                        output_attentions=True, output_hidden_states=True)
    return parts_seen


ATTENTION_MATCH = [{"layer_T": 1, "layer_S": 0, "feature": "attention",
                    "loss": "attention_mse", "weight": 1}]


# ------------------------------------------------------------------ 1. sdpa attention
def test_sdpa_returns_no_attentions_and_the_error_says_to_use_eager(tmp_path):
    teacher, student = _bert(2, seed=0), _bert(1, seed=1)
    # the premise: transformers 5 builds sdpa attention by default, which returns no maps
    outputs = student(**_batches(1)[0], output_attentions=True)
    assert outputs.attentions is None or len(outputs.attentions) == 0 or all(
        a is None for a in outputs.attentions)
    with pytest.raises(AdaptorError) as raised:
        _distil(tmp_path, teacher, student, ATTENTION_MATCH)
    message = str(raised.value)
    assert "intermediate_matches[0]" in message and "'attention'" in message
    assert "attn_implementation='eager'" in message
    assert "BertConfig(..., attn_implementation='eager')" in message
    assert "from_pretrained(..., attn_implementation='eager')" in message


def test_eager_attention_distils(tmp_path):
    teacher = _bert(2, attn_implementation="eager", seed=0)
    student = _bert(1, attn_implementation="eager", seed=1)
    parts = _distil(tmp_path, teacher, student, ATTENTION_MATCH)
    assert len(parts) == 2
    for step in parts:
        assert math.isfinite(step["unweighted_attention_attention_mse_0_1"])
        assert step["unweighted_attention_attention_mse_0_1"] > 0


@pytest.mark.parametrize("empty", [(), [], (None, None)])
def test_empty_or_none_attention_lists_get_the_eager_hint(tmp_path, empty):
    # An adaptor that copies outputs.attentions into a list, or a version that returns Nones
    teacher, student = _bert(2, seed=0), _bert(1, seed=1)

    def list_adaptor(batch, outputs):
        return {"logits": outputs.logits, "attention": empty}

    distiller = GeneralDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                                 DistillationConfig(intermediate_matches=ATTENTION_MATCH),
                                 teacher, student, list_adaptor, list_adaptor)
    with pytest.raises(AdaptorError, match="attn_implementation='eager'"), distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.01), _batches(1),
                        num_epochs=1)


def test_missing_hidden_states_error_has_no_attention_hint(tmp_path):
    teacher, student = _bert(2, seed=0), _bert(1, seed=1)
    match = [{"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse",
              "weight": 1}]
    distiller = GeneralDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                                 DistillationConfig(intermediate_matches=match),
                                 teacher, student, adaptor, adaptor)
    with pytest.raises(AdaptorError) as raised, distiller:
        # no output_hidden_states=True: outputs.hidden_states is None
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.01), _batches(1),
                        num_epochs=1)
    assert "output_hidden_states=True" in str(raised.value)
    assert "attn_implementation" not in str(raised.value)


# ------------------------------------------------------------ 2. 0.2.1 presets' index base
def test_textbrewer_021_attention_preset_on_transformers_points_to_matches_transformers(
        tmp_path):
    # MATCHES['L4_attention_mse']: teacher attentions 3, 6, 9, 12 (0.2.1 counted from 1);
    # a 12-layer transformers BERT returns 12 attentions, indices 0..11
    teacher = _bert(12, attn_implementation="eager", seed=0)
    student = _bert(4, attn_implementation="eager", seed=1)
    with pytest.raises(AdaptorError) as raised:
        _distil(tmp_path, teacher, student, MATCHES["L4_attention_mse"])
    message = str(raised.value)
    # the student's layer_S=4 (of 4 attentions) is the first index checked past the end
    assert "returned 4 attention entries (valid: 0..3)" in message
    assert "MATCHES_TRANSFORMERS" in message
    assert "counts attention layers from 1" in message and "counts from 0" in message


def test_matches_transformers_preset_distils_a_12_layer_bert(tmp_path):
    teacher = _bert(12, attn_implementation="eager", seed=0)
    student = _bert(4, attn_implementation="eager", seed=1)
    parts = _distil(tmp_path, teacher, student, MATCHES_TRANSFORMERS["L4_attention_mse"])
    names = sorted(name for name in parts[0] if name.startswith("unweighted_attention"))
    assert names == sorted(f"unweighted_attention_attention_mse_{s}_{t}"
                           for s, t in ((0, 2), (1, 5), (2, 8), (3, 11)))
    assert all(math.isfinite(value) for step in parts for value in step.values())


def test_hidden_index_out_of_range_error_has_no_attention_hint(tmp_path):
    teacher, student = _bert(2, seed=0), _bert(1, seed=1)
    match = [{"layer_T": 3, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse",
              "weight": 1}]
    with pytest.raises(AdaptorError) as raised:
        _distil(tmp_path, teacher, student, match)
    assert "layer_T=3 but the teacher's adaptor returned 3 hidden entries" in str(raised.value)
    assert "MATCHES_TRANSFORMERS" not in str(raised.value)


# --------------------------------------------------------- 3. 'losses': out.loss is None
def test_batch_without_labels_drops_the_none_loss_with_a_warning(tmp_path, caplog):
    teacher, student = _bert(2, seed=0), _bert(1, seed=1)
    before = [p.detach().clone() for p in student.parameters()]
    with caplog.at_level("WARNING", logger="textbrewer"):
        parts = _distil(tmp_path, teacher, student, [], batches=_batches(with_labels=False),
                        hard_label_weight=1.0)
    # the premise: without labels transformers returns loss=None
    assert student(**_batches(1, with_labels=False)[0]).loss is None
    assert len(parts) == 2
    for step in parts:
        assert "unweighted_hard_label_loss" not in step  # no term, rather than a crash
        assert math.isfinite(step["unweighted_kd_loss"])
    warnings = [r.getMessage() for r in caplog.records if "hard_label_weight" in r.getMessage()]
    assert len(warnings) == 1  # once, not per batch
    assert "returns no 'losses' (or None)" in warnings[0]
    # the KD term alone still trained the student
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_batch_with_labels_keeps_the_hard_label_term(tmp_path):
    teacher, student = _bert(2, seed=0), _bert(1, seed=1)
    parts = _distil(tmp_path, teacher, student, [], hard_label_weight=1.0)
    assert all(step["unweighted_hard_label_loss"] > 0 for step in parts)
