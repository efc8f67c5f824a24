"""The shared training loop: errors before training, logging, caching, batches, context."""
import glob
import os

import pytest
import torch
from torch import nn

import textbrewer
from textbrewer import (AdaptorError, BasicDistiller, DistillationConfig, EmptyDataError,
                        GeneralDistiller, RegistryError, TrainingConfig)
from textbrewer.testing import TinyTransformer, make_classification_data, tiny_adaptor


def _dataset(num_examples=16, seed=0):
    data = make_classification_data(num_examples, length=6, vocab_size=12, seed=seed)
    return [{key: value[i] for key, value in data.items()} for i in range(num_examples)]


def _loader(num_examples=16, batch_size=4, shuffle=False):
    return torch.utils.data.DataLoader(_dataset(num_examples), batch_size=batch_size,
                                       shuffle=shuffle)


def _models(hidden_T=16, hidden_S=8, layers_T=2, layers_S=1, seed=0):
    torch.manual_seed(seed)
    teacher = TinyTransformer(vocab_size=12, hidden_size=hidden_T, num_layers=layers_T)
    student = TinyTransformer(vocab_size=12, hidden_size=hidden_S, num_layers=layers_S)
    return teacher, student


def _train_config(tmp_path, **overrides):
    options = dict(device="cpu", output_dir=str(tmp_path / "out"))
    options.update(overrides)
    return TrainingConfig(**options)


def _general(tmp_path, matches=(), train_overrides=None, **distill_overrides):
    teacher, student = _models()
    config = DistillationConfig(intermediate_matches=list(matches), **distill_overrides)
    distiller = GeneralDistiller(_train_config(tmp_path, **(train_overrides or {})), config,
                                 teacher, student, tiny_adaptor, tiny_adaptor)
    return distiller, student


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


# ---------------------------------------------------------------- errors before training
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    teacher, student = _models()
    with pytest.raises(ValueError, match="CUDA is not available"):
        BasicDistiller(TrainingConfig(device="cuda", output_dir=str(tmp_path)),
                       DistillationConfig(), teacher, student, tiny_adaptor, tiny_adaptor)


@pytest.mark.parametrize("num_epochs, num_steps", [(None, None), (1, 5)])
def test_both_or_neither_of_epochs_and_steps(tmp_path, num_epochs, num_steps):
    distiller, student = _general(tmp_path)
    with pytest.raises(ValueError, match="exactly one of num_epochs and num_steps"):
        distiller.train(_sgd(student), _loader(), num_epochs=num_epochs, num_steps=num_steps)


def test_empty_dataloader(tmp_path):
    distiller, student = _general(tmp_path)
    with pytest.raises(EmptyDataError, match="empty"):
        distiller.train(_sgd(student), [], num_epochs=1)
    with pytest.raises(EmptyDataError, match="empty"):
        distiller.train(_sgd(student), [], num_steps=3)
    with pytest.raises(EmptyDataError, match="yielded no batches"):
        distiller.train(_sgd(student), iter([]), num_steps=3)


def test_fewer_batches_than_accumulation_steps(tmp_path):
    distiller, student = _general(tmp_path, train_overrides={"gradient_accumulation_steps": 8})
    with pytest.raises(ValueError, match="fewer than gradient_accumulation_steps=8"):
        distiller.train(_sgd(student), _loader(16, 4), num_epochs=1)


def test_unknown_names_list_valid_choices():
    with pytest.raises(ValueError, match=r"valid choices: \[.*'ce', .*'kl', .*'mse'.*\] "
                                         r"\(did you mean 'ce'\?\)"):
        DistillationConfig(kd_loss_type="cee")
    with pytest.raises(ValueError, match="did you mean 'hidden_mse'"):
        DistillationConfig(intermediate_matches=[{"layer_T": 0, "layer_S": 0, "feature": "hidden",
                                                  "loss": "hiden_mse", "weight": 1}])
    with pytest.raises(ValueError, match="valid choices: \\[.*'linear', 'relu', 'tanh'\\]"):
        DistillationConfig(intermediate_matches=[{"layer_T": 0, "layer_S": 0, "feature": "hidden",
                                                  "loss": "hidden_mse", "weight": 1,
                                                  "proj": ["lin", 8, 16]}])
    with pytest.raises(ValueError, match="linear_decay"):
        DistillationConfig(kd_loss_weight_scheduler="linear")
    with pytest.raises(ValueError, match="takes parameters"):
        DistillationConfig(temperature_scheduler="flsw")
    assert issubclass(RegistryError, KeyError)


def _first_batch_error(tmp_path, matches, adaptor_S=tiny_adaptor, adaptor_T=tiny_adaptor,
                       error=AdaptorError, match=None, **distill):
    teacher, student = _models()
    distiller = GeneralDistiller(_train_config(tmp_path),
                                 DistillationConfig(intermediate_matches=matches, **distill),
                                 teacher, student, adaptor_T, adaptor_S)
    before = [p.detach().clone() for p in student.parameters()]
    with pytest.raises(error, match=match):
        distiller.train(_sgd(student), _loader(), num_epochs=1)
    for old, new in zip(before, student.parameters()):  # nothing was trained
        assert torch.equal(old, new)
    assert not glob.glob(str(tmp_path / "out" / "*.pkl"))


def test_projection_dims_that_do_not_fit(tmp_path):
    _first_batch_error(tmp_path, [{"layer_T": 1, "layer_S": 1, "feature": "hidden",
                                   "loss": "hidden_mse", "weight": 1, "proj": ["linear", 12, 16]}],
                       match=r"intermediate_matches\[0\]: proj \['linear', 12, 16\] expects "
                             r"student hidden width 12 but got \[8\]")


def test_layer_index_past_the_adaptor_output(tmp_path):
    _first_batch_error(tmp_path, [{"layer_T": 7, "layer_S": 1, "feature": "hidden",
                                   "loss": "hidden_mse", "weight": 1, "proj": ["linear", 8, 16]}],
                       match=r"layer_T=7 but the teacher's adaptor returned 3 hidden entries")


def test_match_shapes_that_do_not_fit_the_loss(tmp_path):
    _first_batch_error(tmp_path, [{"layer_T": 1, "layer_S": 1, "feature": "hidden",
                                   "loss": "hidden_mse", "weight": 1}],
                       match=r"intermediate_matches\[0\] \(hidden, hidden_mse.*student "
                             r"\(4, 6, 8\) and teacher \(4, 6, 16\)")


def test_teacher_and_student_logits_of_different_shapes(tmp_path):
    teacher = TinyTransformer(vocab_size=12, hidden_size=8, num_labels=3)
    student = TinyTransformer(vocab_size=12, hidden_size=8, num_labels=4)
    distiller = BasicDistiller(_train_config(tmp_path), DistillationConfig(), teacher, student,
                               tiny_adaptor, tiny_adaptor)
    with pytest.raises(AdaptorError, match=r"student logits \(4, 4\) and teacher logits \(4, 3\)"):
        distiller.train(_sgd(student), _loader(), num_epochs=1)


def test_adaptor_keys_outside_adaptor_keys_warn_once_and_training_goes_on(tmp_path, caplog):
    # TextBrewer's msra_ner example returns the typo 'input_mask'; 0.2.1 ignored it
    def typo_adaptor(batch, outputs):
        return {"logits": outputs["logits"], "input_mask": batch["attention_mask"]}
    teacher, student = _models()
    distiller = GeneralDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                                 DistillationConfig(), teacher, student, tiny_adaptor,
                                 typo_adaptor)
    with caplog.at_level("WARNING", logger="textbrewer"), distiller:
        distiller.train(_sgd(student), _loader(), num_epochs=1)
    warnings = [r.getMessage() for r in caplog.records if "'input_mask'" in r.getMessage()]
    assert len(warnings) == 1
    assert "unknown key 'input_mask' (did you mean 'inputs_mask'?); the built-in losses ignore it" in warnings[0]


def test_adaptor_that_returns_no_dict(tmp_path):
    _first_batch_error(tmp_path, [], adaptor_T=lambda batch, outputs: outputs["logits"],
                       match="the teacher's adaptor must return a dict")


def test_models_on_another_device_than_the_config(tmp_path):
    teacher, student = _models()
    distiller = BasicDistiller(_train_config(tmp_path), DistillationConfig(), teacher,
                               student.to(torch.float32), tiny_adaptor, tiny_adaptor)
    distiller.runtime.device = torch.device("meta")
    with pytest.raises(ValueError, match="model_S is on cpu but TrainingConfig.device is meta"):
        distiller.train(_sgd(student), _loader(), num_epochs=1)


def test_caching_logits_with_num_steps_is_an_error(tmp_path):
    teacher, student = _models()
    distiller = BasicDistiller(_train_config(tmp_path), DistillationConfig(is_caching_logits=True),
                               teacher, student, tiny_adaptor, tiny_adaptor)
    with pytest.raises(ValueError, match="is_caching_logits=True works only with num_epochs"):
        distiller.train(_sgd(student), _loader(), num_steps=2)


# ---------------------------------------------------------------- behaviour
def test_context_manager_sets_and_restores_modes(tmp_path):
    teacher, student = _models()
    teacher.train()
    student.eval()
    distiller = BasicDistiller(_train_config(tmp_path), DistillationConfig(), teacher, student,
                               tiny_adaptor, tiny_adaptor)
    with distiller:
        assert not teacher.training and student.training
    assert teacher.training and not student.training


def test_teacher_gets_no_gradients_and_stays_unchanged(tmp_path):
    distiller, student = _general(tmp_path, hard_label_weight=1)
    teacher_before = {k: v.clone() for k, v in distiller.model_T.state_dict().items()}
    with distiller:
        distiller.train(_sgd(student), _loader(), num_epochs=1)
    for key, value in distiller.model_T.state_dict().items():
        assert torch.equal(value, teacher_before[key])
    assert all(p.grad is None for p in distiller.model_T.parameters())


def test_tensorboard_tags_and_one_point_per_micro_batch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    matches = [{"layer_T": [0, 2], "layer_S": [0, 1], "feature": "hidden", "loss": "nst",
                "weight": 1},
               {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse",
                "weight": 1, "proj": ["linear", 8, 16]}]
    log_dir = tmp_path / "tb"
    distiller, student = _general(tmp_path, matches, {"log_dir": str(log_dir), "log_steps": 3},
                                  hard_label_weight=1)
    with distiller:
        distiller.train(_sgd(student), _loader(16, 4), num_epochs=2)
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = {tag for tag in events.Tags()["scalars"]
            if tag == "scalar/total_loss" or tag.startswith("scalar/unweighted_")}
    # TextBrewer 0.2.1's loss tags (the step scalars beside them: tests/test_tensorboard.py)
    assert tags == {"scalar/total_loss", "scalar/unweighted_kd_loss",
                    "scalar/unweighted_hard_label_loss", "scalar/unweighted_hidden_nst_0-1_0-2",
                    "scalar/unweighted_hidden_hidden_mse_1_2"}
    steps = [event.step for event in events.Scalars("scalar/total_loss")]
    assert steps == list(range(8))
    totals = [event.value for event in events.Scalars("scalar/total_loss")]
    parts = {tag: [e.value for e in events.Scalars(tag)] for tag in tags - {"scalar/total_loss"}}
    # total = kd + hard + nst + hidden_mse (all weights 1) at every micro-batch
    for step in range(8):
        assert totals[step] == pytest.approx(sum(values[step] for values in parts.values()),
                                             rel=1e-5)


def test_weight_schedule_is_applied_after_each_step_without_touching_the_config(tmp_path):
    distiller, student = _general(tmp_path, kd_loss_weight=0.3,
                                  kd_loss_weight_scheduler="linear_decay")
    seen = []
    original = distiller.composer.compose

    def spy(results_S, results_T, custom_terms=(), **kwargs):
        seen.append(distiller.composer.kd_loss_weight)
        return original(results_S, results_T, custom_terms, **kwargs)

    distiller.composer.compose = spy
    with distiller:
        distiller.train(_sgd(student), _loader(16, 4), num_epochs=1)
    # before the first optimizer step: the configured 0.3; then 1 - k/4
    assert seen == pytest.approx([0.3, 0.75, 0.5, 0.25])
    assert distiller.d_config.config.kd_loss_weight == 0.3
    # what a TextBrewer 0.2.1 subclass reads: the current scheduled weight (1 - 4/4)
    assert distiller.d_config.kd_loss_weight == pytest.approx(0.0)


def test_teacher_student_split_batches_and_teacher_cache(tmp_path):
    teacher, student = _models()
    data = _dataset(8)
    plain = torch.utils.data.DataLoader(data, batch_size=4)
    split = [{"teacher": batch, "student": batch} for batch in plain]
    with torch.no_grad():
        teacher.eval()
        cached = [{"teacher": batch, "student": batch, "teacher_cache": teacher(**batch)}
                  for batch in plain]
    results = []
    for batches in (list(plain), split, cached):
        t, s = _models()
        distiller = GeneralDistiller(_train_config(tmp_path), DistillationConfig(
            hard_label_weight=1), t, s, tiny_adaptor, tiny_adaptor)
        with distiller:
            distiller.train(_sgd(s), batches, num_epochs=1)
        results.append(s.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=0, atol=0)
        torch.testing.assert_close(results[2][key], results[0][key], rtol=1e-6, atol=1e-7)


def test_caching_logits_gives_the_same_training_as_without(tmp_path):
    """Caching replaces the teacher pass by stored logits; with an unshuffled cache the run
    is the same as the uncached one (epoch 1's order is the loader's, later epochs reshuffle
    with random.shuffle, so compare one epoch)."""
    import random
    final = []
    for caching in (False, True):
        teacher, student = _models()
        distiller = BasicDistiller(_train_config(tmp_path),
                                   DistillationConfig(is_caching_logits=caching,
                                                      hard_label_weight=1),
                                   teacher, student, tiny_adaptor, tiny_adaptor)
        random.seed(0)
        order = list(range(4))
        random.shuffle(order)
        loader = list(torch.utils.data.DataLoader(_dataset(16), batch_size=4))
        if not caching:
            loader = [loader[i] for i in order]  # the order random.shuffle gives the cache
        random.seed(0)
        with distiller:
            distiller.train(_sgd(student), loader, num_epochs=1)
        final.append(student.state_dict())
        if caching:
            assert len(distiller.logits_cache) == 4
    for key in final[0]:
        torch.testing.assert_close(final[1][key], final[0][key])


def test_custom_matches_add_a_term_and_hooks_are_off_during_callbacks(tmp_path):
    teacher, student = _models()
    projection = nn.Linear(8, 16)

    def mse(output_S, output_T, mask_S, mask_T):
        return ((output_S - output_T) ** 2).mean()

    match = textbrewer.CustomMatch(teacher.layers[1].norm2, student.layers[0].norm2, 2.0, mse,
                                   proj_func=projection, proj_group={"lr": 0.0})
    distiller = GeneralDistiller(_train_config(tmp_path, log_steps=1), DistillationConfig(),
                                 teacher, student, tiny_adaptor, tiny_adaptor,
                                 custom_matches=[match])
    optimizer = _sgd(student)
    calls = []

    def callback(model, step):
        model.eval()
        with torch.no_grad():
            model(**next(iter(_loader())))
        calls.append(len(distiller._captured_S))

    with distiller:
        distiller.train(optimizer, _loader(), num_epochs=1, callback=callback)
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["lr"] == 0.0
    assert optimizer.param_groups[1]["params"][0] is projection.weight
    # the captured dict is cleared before each batch; the callback's forward added nothing
    assert calls == [1]
    # the term is recorded, and it equals the loss recomputed by hand on the captured outputs
    value = distiller._captured_S[0]
    expected = ((projection(value) - distiller._captured_T[0]) ** 2).mean()
    recomputed = distiller.custom_terms({}, {})[0][2]
    torch.testing.assert_close(recomputed, expected)


def test_output_dir_is_created_at_training_not_at_config(tmp_path):
    config = _train_config(tmp_path, output_dir=str(tmp_path / "later"))
    assert not os.path.exists(tmp_path / "later")
    teacher, student = _models()
    distiller = BasicDistiller(config, DistillationConfig(), teacher, student, tiny_adaptor,
                               tiny_adaptor)
    with distiller:
        distiller.train(_sgd(student), _loader(), num_epochs=1)
    assert sorted(os.listdir(tmp_path / "later")) == ["gs4.pkl", "gs4.train_state.pt"]
