"""textbrewer.recipes: DistilBERT's recipe and initialisation, TinyBERT's layer mapping."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from textbrewer import MATCHES, MATCHES_TRANSFORMERS, GeneralDistiller, TrainingConfig
from textbrewer.adaptors import AdaptorError
from textbrewer.recipes import (distilbert_recipe, init_student_from_teacher, mlm_adaptor,
                                tinybert_layer_mapping)

VOCAB, WIDTH, LENGTH = 50, 16, 12


# ------------------------------------------------------------------------------- models
def _bert(layers, seed, width=WIDTH, heads=2, **overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=2 * width,
                  max_position_embeddings=LENGTH, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    config.update(overrides)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**config))
    with torch.no_grad():  # random LayerNorms and biases, so a missed copy shows
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                parameter.normal_(0.0, 0.5).add_(1.0 if name.endswith("weight") else 0.0)
    return model.eval()


def _distilbert(layers, seed, width=WIDTH, heads=2, **overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB, dim=width, n_layers=layers, n_heads=heads,
                  hidden_dim=2 * width, max_position_embeddings=LENGTH, dropout=0.0,
                  attention_dropout=0.0)
    config.update(overrides)
    return transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(**config)).eval()


def _batch(seed=0, batch_size=3):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (batch_size, LENGTH), generator=generator)
    attention_mask = torch.ones(batch_size, LENGTH, dtype=torch.long)
    attention_mask[1, 8:] = 0  # padding in one row
    attention_mask[2, 5:] = 0
    input_ids[attention_mask == 0] = 0
    chosen = (torch.rand(batch_size, LENGTH, generator=generator) < 0.3) & (attention_mask == 1)
    chosen[0, 1] = chosen[1, 2] = chosen[2, 0] = True  # every row predicts something
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    input_ids = torch.where(chosen, torch.full_like(input_ids, 4), input_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _params(module):
    return {name: parameter.detach().clone() for name, parameter in module.named_parameters()}


# ----------------------------------------------------------------- DistilBERT's initialisation
def test_student_layer_i_is_teacher_layer_2i_and_embeddings_equal():
    teacher, student = _bert(4, seed=1), _bert(2, seed=2)
    assert init_student_from_teacher(teacher, student) == [0, 2]
    for index_S, index_T in ((0, 0), (1, 2)):
        layer_T = _params(teacher.bert.encoder.layer[index_T])
        layer_S = _params(student.bert.encoder.layer[index_S])
        assert layer_T.keys() == layer_S.keys()
        for name, value in layer_T.items():
            torch.testing.assert_close(layer_S[name], value, rtol=0, atol=0)
    for name, value in _params(teacher.bert.embeddings).items():
        torch.testing.assert_close(_params(student.bert.embeddings)[name], value, rtol=0, atol=0)
    for name, value in _params(teacher.cls).items():
        torch.testing.assert_close(_params(student.cls)[name], value, rtol=0, atol=0)
    # the decoder is still tied to the (copied) word embeddings
    assert student.cls.predictions.decoder.weight is student.bert.embeddings.word_embeddings.weight


def test_layer_map_picks_the_layers_and_every_weight_is_copied():
    teacher, student = _bert(3, seed=1), _bert(3, seed=2)
    init_student_from_teacher(teacher, student, layer_map=[0, 1, 2])
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(student(**batch).logits, teacher(**batch).logits)
    student = _bert(2, seed=3)
    assert init_student_from_teacher(teacher, student, layer_map=[2, 0]) == [2, 0]
    torch.testing.assert_close(student.bert.encoder.layer[0].output.dense.weight,
                               teacher.bert.encoder.layer[2].output.dense.weight)


def test_bert_teacher_into_distilbert_student_computes_the_same_function():
    """All layers copied (layer_map = identity): the two families agree on every logit."""
    teacher, student = _bert(2, seed=1, type_vocab_size=2), _distilbert(2, seed=2)
    init_student_from_teacher(teacher, student, layer_map=[0, 1])
    batch = _batch()
    with torch.no_grad():
        logits_T = teacher(**batch).logits  # token_type_ids default to 0
        logits_S = student(**batch).logits
    torch.testing.assert_close(logits_S, logits_T, rtol=1e-4, atol=1e-4)


def test_bert_teacher_into_half_depth_distilbert_student_takes_every_other_layer():
    teacher, student = _bert(4, seed=1), _distilbert(2, seed=2)
    assert init_student_from_teacher(teacher, student) == [0, 2]
    for index_S, index_T in ((0, 0), (1, 2)):
        layer_T = teacher.bert.encoder.layer[index_T]
        layer_S = student.distilbert.transformer.layer[index_S]
        for module_T, module_S in ((layer_T.attention.self.query, layer_S.attention.q_lin),
                                   (layer_T.attention.output.LayerNorm, layer_S.sa_layer_norm),
                                   (layer_T.output.dense, layer_S.ffn.lin2)):
            torch.testing.assert_close(module_S.weight, module_T.weight, rtol=0, atol=0)
            torch.testing.assert_close(module_S.bias, module_T.bias, rtol=0, atol=0)
    # the embeddings' output (position + token type 0 folded in) is the teacher's
    ids = _batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(student.distilbert.embeddings(ids),
                                   teacher.bert.embeddings(input_ids=ids))


def test_distilbert_teacher_into_bert_student_zeroes_token_types():
    teacher, student = _distilbert(2, seed=1), _bert(2, seed=2)
    init_student_from_teacher(teacher, student, layer_map=[0, 1])
    assert torch.count_nonzero(student.bert.embeddings.token_type_embeddings.weight) == 0
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(student(**batch).logits, teacher(**batch).logits,
                                   rtol=1e-4, atol=1e-4)


def test_copy_head_false_leaves_the_head():
    teacher, student = _bert(4, seed=1), _bert(2, seed=2)
    before = _params(student.cls.predictions.transform)
    init_student_from_teacher(teacher, student, copy_head=False)
    for name, value in _params(student.cls.predictions.transform).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


@pytest.mark.parametrize("make_student, layer_map, error, words", [
    (lambda: _bert(3, seed=2), None, ValueError, ["twice", "pass layer_map", "4 and 3"]),
    (lambda: _bert(2, seed=2), [0], ValueError, ["1 entries", "2 layers"]),
    (lambda: _bert(2, seed=2), [0, 4], ValueError, ["layer_map[1]=4", "0..3"]),
    (lambda: _bert(2, seed=2), [0, True], ValueError, ["layer_map[1]=True"]),
    (lambda: _bert(2, seed=2, width=8), None, ValueError,
     ["embeddings.word_embeddings.weight", "(50, 8)", "(50, 16)"]),
    (lambda: _bert(2, seed=2, heads=4), None, ValueError, ["2 attention heads", "student 4"]),
    (lambda: _bert(2, seed=2, hidden_act="relu"), None, ValueError, ["'gelu'", "'relu'"]),
    (lambda: _bert(2, seed=2, max_position_embeddings=LENGTH + 4), None, ValueError,
     ["position_embeddings", f"({LENGTH + 4}, 16)"]),
    (lambda: _distilbert(2, seed=2, sinusoidal_pos_embds=True), None, ValueError,
     ["sinusoidal_pos_embds"]),
    (lambda: torch.nn.Linear(2, 2), None, TypeError, ["student is a Linear", "BertForMaskedLM"]),
])
def test_initialisation_errors_name_the_problem(make_student, layer_map, error, words):
    teacher = _bert(4, seed=1)
    with pytest.raises(error) as raised:
        init_student_from_teacher(teacher, make_student(), layer_map=layer_map)
    for word in words:
        assert word in str(raised.value)


# --------------------------------------------------------------------------- the recipe
def test_recipe_config_is_distilberts():
    config = distilbert_recipe()
    assert (config.temperature, config.kd_loss_type, config.kd_loss_weight,
            config.hard_label_weight) == (2.0, "kl", 5.0, 2.0)
    (match,) = config.intermediate_matches
    assert (match.layer_T, match.layer_S, match.feature, match.loss, match.weight) == \
        (-1, -1, "hidden", "cos", 1.0)
    assert distilbert_recipe(alpha_cos=0).intermediate_matches == []
    narrow = distilbert_recipe(proj=["linear", 8, 16]).intermediate_matches[0]
    assert narrow.proj[:3] == ["linear", 8, 16]


@pytest.mark.parametrize("bad, words", [
    (dict(temperature=0), ["temperature", "> 0"]),
    (dict(alpha_ce=-1), ["alpha_ce", ">= 0"]),
    (dict(alpha_mlm=float("nan")), ["alpha_mlm", "finite"]),
    (dict(alpha_cos="1"), ["alpha_cos"]),
    (dict(layer_T=1.5), ["layer_T", "int"]),
])
def test_recipe_rejects_bad_values(bad, words):
    with pytest.raises(ValueError) as raised:
        distilbert_recipe(**bad)
    for word in words:
        assert word in str(raised.value)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_recipe_loss_on_one_batch_equals_the_formula(tmp_path, family):
    teacher = _bert(4, seed=1)
    student = _bert(2, seed=2) if family == "bert" else _distilbert(2, seed=2)
    init_student_from_teacher(teacher, student)
    with torch.no_grad():  # let the student differ from its initialisation
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    temperature, alpha_ce, alpha_mlm, alpha_cos = 3.0, 5.0, 2.0, 1.5
    config = distilbert_recipe(temperature=temperature, alpha_ce=alpha_ce, alpha_mlm=alpha_mlm,
                               alpha_cos=alpha_cos)
    distiller = GeneralDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path),
                                                log_dir=None),
                                 config, model_T=teacher, model_S=student,
                                 adaptor_T=mlm_adaptor(), adaptor_S=mlm_adaptor())
    batch = _batch()
    total, parts = distiller.train_on_batch(batch, {"output_hidden_states": True})

    with torch.no_grad():
        outputs_T = teacher(**batch, output_hidden_states=True)
        outputs_S = student(**batch, output_hidden_states=True)
    masked = batch["labels"] != -100
    # τ² · KL(p_T ‖ p_S) averaged over the masked positions only
    log_p_T = F.log_softmax(outputs_T.logits[masked] / temperature, dim=-1)
    log_p_S = F.log_softmax(outputs_S.logits[masked] / temperature, dim=-1)
    kl = temperature ** 2 * (log_p_T.exp() * (log_p_T - log_p_S)).sum(-1).mean()
    # the student's own masked-LM cross-entropy, over the masked positions
    mlm = F.cross_entropy(outputs_S.logits[masked], batch["labels"][masked])
    # 1 − cos between the last hidden states, averaged over the real (unpadded) tokens
    real = batch["attention_mask"].bool()
    cos = (1 - F.cosine_similarity(outputs_S.hidden_states[-1][real],
                                   outputs_T.hidden_states[-1][real], dim=-1)).mean()

    torch.testing.assert_close(parts["unweighted_kd_loss"].detach(), kl)
    torch.testing.assert_close(parts["unweighted_hard_label_loss"].detach(), mlm)
    torch.testing.assert_close(parts["unweighted_hidden_cos_-1_-1"].detach(), cos)
    torch.testing.assert_close(total.detach(), alpha_ce * kl + alpha_mlm * mlm + alpha_cos * cos)
    assert kl > 0 and cos > 0


def test_mlm_adaptor_outputs_and_errors():
    model = _bert(2, seed=1)
    batch = _batch()
    outputs = model(**batch, output_hidden_states=True)
    result = mlm_adaptor()(batch, outputs)
    assert set(result) == {"logits", "logits_mask", "inputs_mask", "losses", "hidden"}
    assert torch.equal(result["logits_mask"], batch["labels"] != -100)
    assert len(result["hidden"]) == 3 and result["hidden"][0].shape == (3, LENGTH, WIDTH)
    assert "hidden" not in mlm_adaptor(hidden=False)(batch, model(**batch))
    with pytest.raises(AdaptorError, match="output_hidden_states=True"):
        mlm_adaptor()(batch, model(**batch))
    with pytest.raises(AdaptorError, match="dict batches"):
        mlm_adaptor()((batch["input_ids"],), outputs)
    with pytest.raises(AdaptorError, match="'labels'"):
        mlm_adaptor()({"input_ids": batch["input_ids"],
                       "attention_mask": batch["attention_mask"]}, outputs)
    with pytest.raises(ValueError, match="labels_key"):
        mlm_adaptor(labels_key=3)


def test_import_textbrewer_does_not_import_transformers():
    code = ("import sys, textbrewer, textbrewer.recipes; "
            "sys.exit('transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------- TinyBERT mapping
def _hidden(pairs, proj=None):
    matches = []
    for layer_T, layer_S in pairs:
        match = {"layer_T": layer_T, "layer_S": layer_S, "feature": "hidden",
                 "loss": "hidden_mse", "weight": 1}
        if proj:
            match["proj"] = proj
        matches.append(match)
    return matches


def _attention(pairs):
    return [{"layer_T": layer_T, "layer_S": layer_S, "feature": "attention",
             "loss": "attention_mse", "weight": 1} for layer_T, layer_S in pairs]


@pytest.mark.parametrize("teacher_layers, student_layers, widths, hidden, attention", [
    # hidden pairs include the embeddings (0, 0); attention pairs in transformers' indices
    (12, 4, (768, 312), [(0, 0), (3, 1), (6, 2), (9, 3), (12, 4)],
     [(2, 0), (5, 1), (8, 2), (11, 3)]),
    (12, 6, (768, 768), [(0, 0), (2, 1), (4, 2), (6, 3), (8, 4), (10, 5), (12, 6)],
     [(1, 0), (3, 1), (5, 2), (7, 3), (9, 4), (11, 5)]),
    (6, 3, (256, 128), [(0, 0), (2, 1), (4, 2), (6, 3)], [(1, 0), (3, 1), (5, 2)]),
    (24, 6, (1024, 384), [(0, 0), (4, 1), (8, 2), (12, 3), (16, 4), (20, 5), (24, 6)],
     [(3, 0), (7, 1), (11, 2), (15, 3), (19, 4), (23, 5)]),
])
def test_tinybert_mapping_equals_the_hand_written_one(teacher_layers, student_layers, widths,
                                                      hidden, attention):
    teacher_width, student_width = widths
    proj = None if teacher_width == student_width else ["linear", student_width, teacher_width]
    expected = _hidden(hidden, proj) + _attention(attention)
    assert tinybert_layer_mapping(teacher_layers, student_layers, teacher_width,
                                  student_width) == expected
    textbrewer_base = _hidden(hidden, proj) + _attention([(t + 1, s + 1) for t, s in attention])
    assert tinybert_layer_mapping(teacher_layers, student_layers, teacher_width, student_width,
                                  attention_index_base="textbrewer") == textbrewer_base


def test_tinybert_mapping_equals_the_presets():
    assert tinybert_layer_mapping(12, 4, 768, 312, features=("hidden",)) == \
        MATCHES["L4t_hidden_mse"]
    assert tinybert_layer_mapping(12, 4, 768, 768, features=("attention",),
                                  attention_index_base="textbrewer") == MATCHES["L4_attention_mse"]
    assert tinybert_layer_mapping(12, 4, 768, 768, features=("attention",)) == \
        MATCHES_TRANSFORMERS["L4_attention_mse"]
    assert tinybert_layer_mapping(12, 6, 768, 768, features="hidden") == MATCHES["L6_hidden_mse"]


def test_tinybert_mapping_options():
    # uneven depths round half up and still end on the last layers
    matches = tinybert_layer_mapping(12, 5, 64, 64, features=("hidden",))
    assert [(m["layer_T"], m["layer_S"]) for m in matches] == \
        [(0, 0), (2, 1), (5, 2), (7, 3), (10, 4), (12, 5)]
    matches = tinybert_layer_mapping(4, 2, 64, 32, features=("attention", "hidden"),
                                     loss={"attention": "attention_ce"}, weight=0.5)
    assert [m["feature"] for m in matches] == ["attention"] * 2 + ["hidden"] * 3
    assert {m["loss"] for m in matches} == {"attention_ce", "hidden_mse"}
    assert {m["weight"] for m in matches} == {0.5}
    assert {m["loss"] for m in tinybert_layer_mapping(4, 2, 64, 64, loss="cos",
                                                      features=("hidden",))} == {"cos"}


@pytest.mark.parametrize("arguments, words", [
    (dict(teacher_layers=0), ["teacher_layers", "positive int", "0"]),
    (dict(student_layers=2.0), ["student_layers", "2.0"]),
    (dict(student_width=True), ["student_width"]),
    (dict(student_layers=13), ["student_layers=13", "teacher_layers=12"]),
    (dict(features=("hidden", "logits")), ["features", "'logits'"]),
    (dict(features=()), ["features"]),
    (dict(features=("hidden", "hidden")), ["features"]),
    (dict(attention_index_base="bert"), ["attention_index_base", "'bert'", "transformers"]),
    (dict(loss={"logits": "kl"}), ["['logits']", "features"]),
    (dict(loss=3), ["loss must be"]),
    (dict(weight=-1), ["weight", ">= 0"]),
])
def test_tinybert_mapping_rejects_bad_inputs(arguments, words):
    settings = dict(teacher_layers=12, student_layers=4, teacher_width=768, student_width=312)
    settings.update(arguments)
    with pytest.raises(ValueError) as raised:
        tinybert_layer_mapping(**settings)
    for word in words:
        assert word in str(raised.value)
