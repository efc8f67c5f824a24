"""Faults and their handling: interrupted or corrupt checkpoints, bad inputs, non-finite
numbers, finished runs, callbacks and random numbers, logging, and 0.2.1 subclasses.

Every test trains tiny models on CPU for a few steps and checks files, exact values and
messages. Simulated kills are file states a killed run leaves: a ``gs{N}.pkl`` without its
state file, a truncated file, a leftover temporary.
"""
import collections
import contextlib
import importlib.util
import io
import logging
import math
import os
import re
import sys

import pytest
import torch

import textbrewer
from textbrewer import (AdaptorError, BasicDistiller, DistillationConfig, GeneralDistiller,
                        MultiTeacherDistiller, NonFiniteLossError, TrainingConfig)
from textbrewer.checkpoint import CheckpointError
from textbrewer.losses import kd_ce_loss
from textbrewer.testing import TinyTransformer, make_classification_data, tiny_adaptor

_LOGGER = logging.getLogger("textbrewer")


# ---------------------------------------------------------------- helpers
def _dataset(num_examples=16, seed=0):
    data = make_classification_data(num_examples, length=6, vocab_size=12, seed=seed)
    return [{key: value[i] for key, value in data.items()} for i in range(num_examples)]


def _loader(num_examples=16, batch_size=4, shuffle=False):
    return torch.utils.data.DataLoader(_dataset(num_examples), batch_size=batch_size,
                                       shuffle=shuffle)


def _models(dropout=0.0, student_seed=0, hidden_S=8, labels_S=3, labels_T=3):
    torch.manual_seed(0)  # the teacher is the same (pretrained) model every run
    teacher = TinyTransformer(vocab_size=12, hidden_size=16, num_layers=2, num_labels=labels_T,
                              dropout=dropout)
    torch.manual_seed(student_seed)
    student = TinyTransformer(vocab_size=12, hidden_size=hidden_S, num_layers=1,
                              num_labels=labels_S, dropout=dropout)
    return teacher, student


def _config(output_dir, **overrides):
    return TrainingConfig(device="cpu", output_dir=str(output_dir), **overrides)


def _general(output_dir, distill=None, dropout=0.0, student_seed=0, adaptor_S=tiny_adaptor,
             adaptor_T=tiny_adaptor, **train):
    teacher, student = _models(dropout, student_seed)
    config = DistillationConfig(**({"hard_label_weight": 0.5} if distill is None else distill))
    distiller = GeneralDistiller(_config(output_dir, **train), config, teacher, student,
                                 adaptor_T, adaptor_S)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    return distiller, student, optimizer


def _weights(model):
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _files(folder):
    """name -> (size, mtime) of every file in ``folder``."""
    if not os.path.isdir(folder):
        return {}
    return {name: (os.path.getsize(os.path.join(folder, name)),
                   os.stat(os.path.join(folder, name)).st_mtime_ns)
            for name in sorted(os.listdir(folder))}


def _counting(adaptor, calls):
    def counted(batch, outputs):
        calls.append(1)
        return adaptor(batch, outputs)
    return counted


def _messages(caplog, level=logging.WARNING):
    return [record.getMessage() for record in caplog.records
            if record.name == "textbrewer" and record.levelno == level]


# A resumable step-mode run: dropout and a shuffling loader, so resuming must restore the
# random-number state and the data position; every state file is kept.
RESUMABLE = dict(ckpt_steps=2, keep_train_states=None, seed=0)


def _complete_run(output_dir):
    distiller, student, optimizer = _general(output_dir, dropout=0.1, **RESUMABLE)
    with distiller:
        distiller.train(optimizer, _loader(shuffle=True), num_steps=6)
    assert sorted(os.listdir(output_dir)) == [
        "gs2.pkl", "gs2.train_state.pt", "gs4.pkl", "gs4.train_state.pt", "gs6.pkl",
        "gs6.train_state.pt"]
    return _weights(student), optimizer


def _resume_latest(output_dir, **train):
    """A relaunch: another initialisation, another global RNG state; counts micro-batches."""
    torch.manual_seed(4321)
    calls = []
    distiller, student, optimizer = _general(output_dir, dropout=0.1, student_seed=77,
                                             resume_from="latest",
                                             **{**RESUMABLE, **train})
    distiller.adaptor_S = _counting(distiller.adaptor_S, calls)
    with distiller:
        distiller.train(optimizer, _loader(shuffle=True), num_steps=6)
    return _weights(student), optimizer, len(calls)


def _truncate(path, keep=0.5):
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: int(len(data) * keep)])


# ---------------------------------------------------------------- 1. callbacks and the RNG
def _callback_run(output_dir, draw, isolate=False):
    distiller, student, optimizer = _general(output_dir, dropout=0.1, seed=0, ckpt_frequency=2,
                                             isolate_callback_rng=isolate)
    steps = []

    def callback(model, step):
        steps.append(step)
        if draw:
            torch.rand(1)  # an evaluation that draws random numbers

    with distiller:
        distiller.train(optimizer, _loader(shuffle=True), num_epochs=2, callback=callback)
    assert steps == [2, 4, 6, 8]
    return _weights(student)


def test_callbacks_share_the_rng_with_training_by_default(tmp_path):
    drawing = _callback_run(tmp_path / "draw", draw=True)
    quiet = _callback_run(tmp_path / "quiet", draw=False)
    assert not _same(drawing, quiet)


def test_isolate_callback_rng_makes_the_callback_invisible(tmp_path):
    drawing = _callback_run(tmp_path / "draw", draw=True, isolate=True)
    quiet = _callback_run(tmp_path / "quiet", draw=False, isolate=True)
    assert _same(drawing, quiet)


def test_step_mode_resume_from_an_explicit_older_state_with_a_drawing_callback(tmp_path):
    def run(resume_from=None, student_seed=0):
        distiller, student, optimizer = _general(tmp_path, dropout=0.1, student_seed=student_seed,
                                                 resume_from=resume_from, **RESUMABLE)
        scheduler_args = {"step_size": 2, "gamma": 0.5}
        with distiller:
            distiller.train(optimizer, _loader(shuffle=True), num_steps=8,
                            callback=lambda model, step: torch.rand(3),
                            scheduler_class=torch.optim.lr_scheduler.StepLR,
                            scheduler_args=scheduler_args, max_grad_norm=1.0)
        return _weights(student), optimizer

    reference, reference_optimizer = run()
    assert sorted(name for name in os.listdir(tmp_path) if "train_state" in name) == [
        "gs2.train_state.pt", "gs4.train_state.pt", "gs6.train_state.pt", "gs8.train_state.pt"]
    reference_gs8 = torch.load(tmp_path / "gs8.pkl", weights_only=True)
    torch.manual_seed(999)  # everything must come from the file
    resumed, resumed_optimizer = run(str(tmp_path / "gs4.train_state.pt"), student_seed=5)
    assert _same(resumed, reference)
    assert _same(torch.load(tmp_path / "gs8.pkl", weights_only=True), reference_gs8)
    assert resumed_optimizer.param_groups[0]["lr"] == reference_optimizer.param_groups[0]["lr"]
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 4)


# ---------------------------------------------------------------- 2. permissions, pruning
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoint_files_get_the_umask_permissions(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        distiller, student, optimizer = _general(tmp_path)
        with distiller:
            distiller.train(optimizer, _loader(), num_epochs=1)
    finally:
        os.umask(previous)
    assert sorted(os.listdir(tmp_path)) == ["gs4.pkl", "gs4.train_state.pt"]
    for name in ("gs4.pkl", "gs4.train_state.pt"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name


@pytest.mark.parametrize("keep, states", [
    ("default", [8]), (2, [6, 8]), (None, [2, 4, 6, 8])])
def test_keep_train_states_prunes_states_never_weights(tmp_path, keep, states):
    train = {} if keep == "default" else {"keep_train_states": keep}
    distiller, student, optimizer = _general(tmp_path, ckpt_frequency=2, **train)
    with distiller:
        distiller.train(optimizer, _loader(), num_epochs=2)
    names = os.listdir(tmp_path)
    assert sorted(n for n in names if n.endswith(".pkl")) == [
        "gs2.pkl", "gs4.pkl", "gs6.pkl", "gs8.pkl"]
    assert sorted(n for n in names if n.endswith(".train_state.pt")) == sorted(
        f"gs{step}.train_state.pt" for step in states)
    assert len(names) == 4 + len(states)


# ---------------------------------------------------------------- 3. torn checkpoints
def test_state_records_the_size_of_its_weights_file(tmp_path):
    _complete_run(tmp_path)
    for step in (2, 4, 6):
        state = torch.load(tmp_path / f"gs{step}.train_state.pt", weights_only=True)
        assert state["student_file_bytes"] == os.path.getsize(tmp_path / f"gs{step}.pkl")
        assert state["progress"]["global_step"] == step


def test_weights_without_their_state_resume_from_the_previous_pair(tmp_path, caplog):
    reference, _ = _complete_run(tmp_path)
    # killed after gs6.pkl was written, before its state file
    os.remove(tmp_path / "gs6.train_state.pt")
    caplog.set_level(logging.INFO, logger="textbrewer")
    resumed, _, micro_batches = _resume_latest(tmp_path)
    assert micro_batches == 2  # steps 5 and 6 again
    assert _same(resumed, reference)
    assert any("Resumed from" in m and "gs4.train_state.pt" in m and "global step 4" in m
               for m in _messages(caplog, logging.INFO))
    assert os.path.exists(tmp_path / "gs6.train_state.pt")


def test_a_leftover_temporary_is_removed_at_the_start_of_a_fresh_run(tmp_path, caplog):
    leftover = tmp_path / ".tmp-gs4.pkl-abc"
    leftover.write_bytes(b"half a checkpoint")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep me")
    distiller, student, optimizer = _general(tmp_path)
    with distiller:
        distiller.train(optimizer, _loader(), num_steps=2)
    assert not leftover.exists()
    assert unrelated.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["gs2.pkl", "gs2.train_state.pt", "notes.txt"]
    warnings = [m for m in _messages(caplog) if ".tmp-gs4.pkl-abc" in m]
    assert len(warnings) == 1 and "temporary file left by an interrupted run" in warnings[0]


def test_newest_weights_truncated_latest_skips_with_a_warning(tmp_path, caplog):
    reference, _ = _complete_run(tmp_path)
    size = os.path.getsize(tmp_path / "gs6.pkl")
    _truncate(tmp_path / "gs6.pkl")
    resumed, _, micro_batches = _resume_latest(tmp_path)
    assert micro_batches == 2
    assert _same(resumed, reference)
    skipped = [m for m in _messages(caplog) if "skipping" in m]
    assert len(skipped) == 1
    assert "gs6.train_state.pt" in skipped[0] and "gs6.pkl" in skipped[0]
    assert f"the state recorded {size}" in skipped[0]
    assert os.path.getsize(tmp_path / "gs6.pkl") == size  # rewritten by the resumed run


def test_newest_weights_overwritten_by_another_file_latest_skips(tmp_path, caplog):
    reference, _ = _complete_run(tmp_path)
    torch.save({"something": torch.zeros(3)}, tmp_path / "gs6.pkl")
    resumed, _, micro_batches = _resume_latest(tmp_path)
    assert micro_batches == 2 and _same(resumed, reference)
    assert any("gs6.train_state.pt" in m and "overwritten or truncated" in m
               for m in _messages(caplog))


def test_no_usable_state_is_an_error_not_a_fresh_start(tmp_path):
    _complete_run(tmp_path)
    for step in (2, 4, 6):
        _truncate(tmp_path / f"gs{step}.pkl")
    before = _files(tmp_path)
    distiller, student, optimizer = _general(tmp_path, resume_from="latest", **RESUMABLE)
    initial = _weights(student)
    with pytest.raises(CheckpointError, match="no usable training state") as error:
        distiller.train(optimizer, _loader(shuffle=True), num_steps=6)
    for step in (2, 4, 6):
        assert f"gs{step}.train_state.pt" in str(error.value)
    assert _same(_weights(student), initial)
    assert _files(tmp_path) == before  # the broken run's files are not overwritten


# ---------------------------------------------------------------- 4. corrupt state files
class NotAllowed:
    """A custom class: torch.load(weights_only=True) refuses to unpickle it."""

    def __init__(self):
        self.value = 1


def _corrupt_truncated(path):
    _truncate(path)


def _corrupt_garbage(path):
    with open(path, "wb") as handle:
        handle.write(bytes(range(256)) * 8)


def _corrupt_custom_object(path):
    state = torch.load(path, weights_only=True)
    state["distiller"] = {"object": NotAllowed()}
    torch.save(state, path)


CORRUPTIONS = {"truncated": _corrupt_truncated, "garbage": _corrupt_garbage,
               "custom_object": _corrupt_custom_object}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_state_file_named_explicitly_is_a_clear_error(tmp_path, corruption):
    _complete_run(tmp_path)
    path = tmp_path / "gs6.train_state.pt"
    CORRUPTIONS[corruption](path)
    before = _files(tmp_path)
    distiller, student, optimizer = _general(tmp_path, resume_from=str(path), **RESUMABLE)
    initial = _weights(student)
    with pytest.raises(CheckpointError) as error:
        distiller.train(optimizer, _loader(shuffle=True), num_steps=6)
    message = str(error.value)
    assert str(path) in message
    assert "is not a valid training-state file of this library" in message
    assert "weights_only" not in message
    if corruption == "custom_object":
        assert "objects other than tensors and plain values" in message
    assert _same(_weights(student), initial)
    assert _files(tmp_path) == before


def test_a_torch_file_that_is_not_a_state_is_refused(tmp_path):
    path = tmp_path / "gs3.train_state.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    distiller, student, optimizer = _general(tmp_path / "out", resume_from=str(path))
    with pytest.raises(CheckpointError, match=r"gs3.train_state.pt is not a training-state "
                                              r"file of this library"):
        distiller.train(optimizer, _loader(), num_steps=2)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_newest_state_latest_falls_back(tmp_path, caplog, corruption):
    reference, _ = _complete_run(tmp_path)
    CORRUPTIONS[corruption](tmp_path / "gs6.train_state.pt")
    resumed, _, micro_batches = _resume_latest(tmp_path)
    assert micro_batches == 2
    assert _same(resumed, reference)
    skipped = [m for m in _messages(caplog) if "skipping" in m]
    assert len(skipped) == 1 and "gs6.train_state.pt" in skipped[0]
    assert "weights_only" not in skipped[0]


# ---------------------------------------------------------------- 5. finished runs
@pytest.mark.parametrize("mode", ["steps", "epochs"])
def test_relaunching_a_finished_run_trains_nothing(tmp_path, caplog, mode):
    train = dict(ckpt_steps=2) if mode == "steps" else dict(ckpt_frequency=2)
    length = dict(num_steps=4) if mode == "steps" else dict(num_epochs=1)
    distiller, student, optimizer = _general(tmp_path, **train)
    with distiller:
        distiller.train(optimizer, _loader(), **length)
    finished, finished_optimizer = _weights(student), optimizer.state_dict()
    before = _files(tmp_path)
    assert sorted(before) == ["gs2.pkl", "gs4.pkl", "gs4.train_state.pt"]

    # the same script, launched again
    calls = []
    distiller, student, optimizer = _general(tmp_path, resume_from="latest",
                                             adaptor_S=_counting(tiny_adaptor, calls), **train)
    with distiller:
        distiller.train(optimizer, _loader(), **length)
    assert calls == []
    assert _files(tmp_path) == before
    assert _same(_weights(student), finished)  # the finished run's weights, not one step more
    state = optimizer.state_dict()["state"]
    assert len(state) == len(finished_optimizer["state"])
    for index, saved in finished_optimizer["state"].items():
        assert float(state[index]["step"]) == 4.0 == float(saved["step"])
        assert torch.equal(state[index]["exp_avg"], saved["exp_avg"])
    complete = [m for m in _messages(caplog) if "is complete" in m]
    assert len(complete) == 1 and str(tmp_path) in complete[0]
    assert "global step 4 of 4" in complete[0]


def test_relaunching_a_finished_run_leaves_live_objects_untouched(tmp_path):
    distiller, student, optimizer = _general(tmp_path, ckpt_steps=2)
    with distiller:
        distiller.train(optimizer, _loader(), num_steps=4)
    weights, optimizer_state = _weights(student), optimizer.state_dict()
    before = _files(tmp_path)
    # launched again in the same process, with the very objects that finished the run
    fresh = GeneralDistiller(_config(tmp_path, resume_from="latest", ckpt_steps=2),
                             DistillationConfig(hard_label_weight=0.5), distiller.model_T,
                             student, tiny_adaptor, tiny_adaptor)
    with fresh:
        fresh.train(optimizer, _loader(), num_steps=4)
    assert _same(_weights(student), weights)
    after = optimizer.state_dict()
    for index, saved in optimizer_state["state"].items():
        for key, value in saved.items():
            assert torch.equal(torch.as_tensor(after["state"][index][key]),
                               torch.as_tensor(value)), key
    assert _files(tmp_path) == before


# ---------------------------------------------------------------- 6. missing terms warn once
def test_kd_weight_without_student_logits_warns_once_and_trains(tmp_path, caplog):
    def no_logits(batch, outputs):
        result = tiny_adaptor(batch, outputs)
        del result["logits"]
        return result

    distiller, student, optimizer = _general(
        tmp_path, distill={"kd_loss_weight": 1.0, "hard_label_weight": 1.0}, adaptor_S=no_logits,
        log_steps=1)
    initial = _weights(student)
    with distiller:
        distiller.train(optimizer, _loader(), num_epochs=2)
    warnings = [m for m in _messages(caplog) if "the KD term is left out" in m]
    assert len(warnings) == 1
    assert "kd_loss_weight=1.0" in warnings[0] and "student's adaptor" in warnings[0]
    assert not _same(_weights(student), initial)
    assert sorted(os.listdir(tmp_path))[-1] == "gs8.train_state.pt"


@pytest.mark.parametrize("losses", ["absent", "none"])
def test_hard_label_weight_without_losses_warns_once_and_trains(tmp_path, caplog, losses):
    def adaptor(batch, outputs):
        result = tiny_adaptor(batch, outputs)
        result.pop("losses", None)
        if losses == "none":
            result["losses"] = None  # transformers' outputs.loss on a batch without labels
        return result

    distiller, student, optimizer = _general(tmp_path, distill={"hard_label_weight": 0.7},
                                             adaptor_S=adaptor, log_steps=1)
    initial = _weights(student)
    with distiller:
        distiller.train(optimizer, _loader(), num_epochs=2)
    warnings = [m for m in _messages(caplog) if "hard-label term is left out" in m]
    assert len(warnings) == 1 and "hard_label_weight=0.7" in warnings[0]
    assert not _same(_weights(student), initial)
    assert os.path.exists(tmp_path / "gs8.pkl")


# ---------------------------------------------------------------- 7. optimizer mistakes
@pytest.mark.parametrize("holds", ["teacher", "teacher_and_student", "other"])
def test_optimizer_over_the_wrong_parameters_fails_before_training(tmp_path, holds):
    distiller, student, _ = _general(tmp_path / "out")
    teacher = distiller.model_T
    parameters = {"teacher": list(teacher.parameters()),
                  "teacher_and_student": list(student.parameters()) + list(teacher.parameters()),
                  "other": list(torch.nn.Linear(3, 3).parameters())}[holds]
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    initial_S, initial_T = _weights(student), _weights(teacher)
    expected = "none of the student's parameters" if holds == "other" else \
        "of the teacher's parameters; the teacher is frozen"
    with pytest.raises(ValueError, match=expected):
        distiller.train(optimizer, _loader(), num_epochs=1)
    assert _same(_weights(student), initial_S) and _same(_weights(teacher), initial_T)
    assert not (tmp_path / "out").exists()
    assert len(optimizer.param_groups) == 1


# ---------------------------------------------------------------- 8. non-finite numbers
def _nan_teacher_logits(at_call):
    calls = []

    def adaptor(batch, outputs):
        calls.append(1)
        result = tiny_adaptor(batch, outputs)
        if len(calls) == at_call:
            result["logits"] = result["logits"] * float("nan")
        return result
    return adaptor


def _nan_student_losses(at_call):
    calls = []

    def adaptor(batch, outputs):
        calls.append(1)
        result = tiny_adaptor(batch, outputs)
        if len(calls) == at_call:
            result["losses"] = result["losses"] * float("inf")
        return result
    return adaptor


@pytest.mark.parametrize("term", ["unweighted_kd_loss", "unweighted_hard_label_loss"])
def test_check_finite_every_step_stops_before_the_bad_step(tmp_path, term):
    adaptors = ({"adaptor_T": _nan_teacher_logits(3)} if term == "unweighted_kd_loss"
                else {"adaptor_S": _nan_student_losses(3)})
    distiller, student, optimizer = _general(tmp_path, check_finite_every_step=True,
                                             ckpt_steps=1, **adaptors)
    after_step = {}

    def callback(model, step):
        after_step[step] = _weights(model)

    value = "nan" if term == "unweighted_kd_loss" else "inf"
    with pytest.raises(NonFiniteLossError) as error:
        with distiller:
            distiller.train(optimizer, _loader(), num_steps=4, callback=callback)
    assert str(error.value).startswith(
        f"loss term '{term}' is {value} at micro-batch 2 (during optimizer step 3); detected at "
        f"the next check, after 2 optimizer steps had been applied; stopping training")
    assert "total_loss" not in str(error.value).split(";")[0]
    assert sorted(after_step) == [1, 2]
    assert _same(_weights(student), after_step[2])  # no step after the bad micro-batch
    assert sorted(os.listdir(tmp_path)) == ["gs1.pkl", "gs2.pkl", "gs2.train_state.pt"]
    assert all(float(s["step"]) == 2.0 for s in optimizer.state.values())


def test_late_check_names_the_term_and_the_steps_applied(tmp_path):
    distiller, student, optimizer = _general(tmp_path, log_steps=50,
                                             adaptor_T=_nan_teacher_logits(2))
    with pytest.raises(NonFiniteLossError) as error:
        with distiller:
            distiller.train(optimizer, _loader(), num_epochs=1)
    message = str(error.value)
    # found at the next host copy: the progress line after step 2 (every step in a short run)
    assert message.startswith("loss term 'unweighted_kd_loss' is nan at micro-batch 1 (during "
                              "optimizer step 2); detected at the next check, after 2 optimizer "
                              "steps had been applied (1 of them after the bad micro-batch")
    assert "check_finite_every_step=True" in message
    assert os.listdir(tmp_path) == []  # gs4 of a non-finite student was not written


def test_non_finite_weights_with_a_finite_loss_are_not_checkpointed(tmp_path):
    distiller, student, optimizer = _general(tmp_path, ckpt_steps=2, log_steps=1)
    steps = []

    def poison(opt, args, kwargs):
        steps.append(1)
        if len(steps) == 4:  # after the last step: every loss of the run was finite
            with torch.no_grad():
                student.classifier.bias[1] = float("nan")

    optimizer.register_step_post_hook(poison)
    with pytest.raises(NonFiniteLossError) as error:
        with distiller:
            distiller.train(optimizer, _loader(), num_steps=4)
    message = str(error.value)
    assert "parameters are not finite after optimizer step 4" in message
    assert "['classifier.bias']" in message
    assert "gs4.pkl was not written" in message
    assert sorted(os.listdir(tmp_path)) == ["gs2.pkl", "gs2.train_state.pt"]


# ---------------------------------------------------------------- 9. fractional epochs
@pytest.mark.parametrize("examples, steps, total, checkpoints", [
    (32, 12, 12.0, ["gs12.pkl", "gs8.pkl"]),
    (28, 10, 10.5, ["gs10.pkl", "gs7.pkl"])])
def test_fractional_epochs(tmp_path, examples, steps, total, checkpoints):
    distiller, student, optimizer = _general(
        tmp_path, distill={"kd_loss_weight_scheduler": "linear_decay", "hard_label_weight": 0.5})
    applied = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: applied.append(1))
    saved = []
    with distiller:
        distiller.train(optimizer, _loader(examples), num_epochs=1.5,
                        callback=lambda model, step: saved.append(step))
    assert len(applied) == steps
    assert distiller.d_config.kd_loss_weight == 1 - steps / total
    assert distiller.composer.kd_loss_weight == 1 - steps / total
    assert distiller.d_config.config.kd_loss_weight == 1  # the user's config is unchanged
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pkl")) == checkpoints
    assert saved[-1] == steps
    state = torch.load(tmp_path / f"gs{steps}.train_state.pt", weights_only=True)
    assert state["plan"]["total_steps"] == total


# ---------------------------------------------------------------- 10. clear errors
def test_multi_teacher_logits_of_different_widths(tmp_path):
    first = TinyTransformer(vocab_size=12, hidden_size=8, num_labels=3)
    second = TinyTransformer(vocab_size=12, hidden_size=8, num_labels=4)
    student = TinyTransformer(vocab_size=12, hidden_size=8, num_labels=3)
    distiller = MultiTeacherDistiller(_config(tmp_path / "out"), DistillationConfig(),
                                      [first, second], student, tiny_adaptor, tiny_adaptor)
    initial = _weights(student)
    with pytest.raises(ValueError, match=r"logits head 0: the teachers' logits have different "
                                         r"shapes \[\(4, 3\), \(4, 4\)\]"):
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), _loader(), num_epochs=1)
    assert _same(_weights(student), initial)
    assert not list((tmp_path / "out").glob("*.pkl"))


PROJECTED = [{"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse",
              "weight": 1, "proj": ["linear", 8, 16]}]


def test_projection_added_between_run_and_resume(tmp_path):
    distiller, student, optimizer = _general(tmp_path, ckpt_steps=2, keep_train_states=None)
    with distiller:
        distiller.train(optimizer, _loader(), num_steps=4)
    os.remove(tmp_path / "gs4.train_state.pt")  # resume from gs2
    distiller, student, optimizer = _general(
        tmp_path, distill={"intermediate_matches": PROJECTED}, ckpt_steps=2,
        keep_train_states=None, resume_from="latest")
    with pytest.raises(CheckpointError, match=r"the checkpoint holds 0 modules trained with the "
                                              r"student .* this run has 1"):
        distiller.train(optimizer, _loader(), num_steps=4)


def test_param_group_added_between_run_and_resume(tmp_path):
    distiller, student, optimizer = _general(tmp_path, ckpt_steps=2, keep_train_states=None)
    with distiller:
        distiller.train(optimizer, _loader(), num_steps=4)
    os.remove(tmp_path / "gs4.train_state.pt")
    distiller, student, _ = _general(tmp_path, ckpt_steps=2, resume_from="latest")
    parameters = list(student.parameters())
    optimizer = torch.optim.AdamW([{"params": parameters[:3]}, {"params": parameters[3:]}],
                                  lr=1e-2)
    with pytest.raises(CheckpointError, match=r"the saved optimizer has 1 parameter groups, "
                                              r"this run's has 2"):
        distiller.train(optimizer, _loader(), num_steps=4)


def test_resuming_into_a_student_of_another_shape(tmp_path):
    distiller, student, optimizer = _general(tmp_path)
    with distiller:
        distiller.train(optimizer, _loader(), num_steps=2)
    teacher, student = _models(labels_S=4, labels_T=4)
    distiller = GeneralDistiller(_config(tmp_path, resume_from="latest"),
                                 DistillationConfig(), teacher, student, tiny_adaptor,
                                 tiny_adaptor)
    initial = _weights(student)
    with pytest.raises(CheckpointError) as error:
        distiller.train(torch.optim.AdamW(student.parameters()), _loader(), num_steps=2)
    message = str(error.value)
    assert "classifier.weight: saved (3, 8), model_S (4, 8)" in message
    assert "gs2.pkl" in message
    assert _same(_weights(student), initial)


def test_numpy_logits_are_an_adaptor_error(tmp_path):
    def numpy_logits(batch, outputs):
        result = tiny_adaptor(batch, outputs)
        result["logits"] = result["logits"].detach().numpy()
        return result

    distiller, student, optimizer = _general(tmp_path / "out", adaptor_S=numpy_logits)
    with pytest.raises(AdaptorError, match=r"the student's adaptor returned 'logits' as "
                                           r"numpy\.ndarray; expected a torch\.Tensor"):
        distiller.train(optimizer, _loader(), num_epochs=1)
    assert not list((tmp_path / "out").glob("*.pkl"))


def test_all_zero_logits_mask_gives_a_zero_kd_term_warned_once_and_training_goes_on(tmp_path,
                                                                                  caplog):
    torch.manual_seed(0)
    teacher = TinyTransformer(vocab_size=12, hidden_size=16, token_level=True)
    student = TinyTransformer(vocab_size=12, hidden_size=8, token_level=True)

    def adaptor(batch, outputs):
        logits = outputs["logits"]
        return {"logits": logits, "logits_mask": torch.zeros(logits.shape[:2]),
                "losses": logits.pow(2).mean()}  # something to train on

    distiller = GeneralDistiller(_config(tmp_path, log_steps=1, check_finite_every_step=True),
                                 DistillationConfig(hard_label_weight=1.0), teacher, student,
                                 adaptor, adaptor)
    batch = {"input_ids": torch.randint(0, 12, (4, 6))}
    results_S = distiller.adapt(adaptor, batch, student(**batch), "the student's adaptor")
    results_T = distiller.adapt(adaptor, batch, teacher(**batch), "the teacher's adaptor")
    with caplog.at_level(logging.WARNING, logger="textbrewer"):
        total, parts = distiller.compute_loss(results_S, results_T)
        assert parts["unweighted_kd_loss"].item() == 0.0
        assert torch.equal(total, parts["unweighted_hard_label_loss"])
        rows = [{"input_ids": batch["input_ids"][i]} for i in range(4)]
        initial = _weights(student)
        with distiller:
            distiller.train(torch.optim.SGD(student.parameters(), lr=0.1),
                            torch.utils.data.DataLoader(rows, batch_size=2), num_epochs=2)
    warned = [m for m in _messages(caplog) if "logits_mask" in m]
    assert warned == ["logits_mask selects no position of logits head 0 (all zeros) in a "
                      "batch: its KD term is 0 there. logits_mask is 1 at the positions to "
                      "distil (warned once)"]
    assert not _same(_weights(student), initial)
    assert all(torch.isfinite(v).all() for v in student.state_dict().values())
    assert os.path.exists(tmp_path / "gs4.pkl")


def test_inputs_mask_of_the_wrong_shape(tmp_path):
    def short_mask(batch, outputs):
        result = tiny_adaptor(batch, outputs)
        result["inputs_mask"] = result["inputs_mask"][:, :5]
        return result

    distiller, student, optimizer = _general(
        tmp_path / "out", distill={"intermediate_matches": PROJECTED}, adaptor_S=short_mask)
    with pytest.raises(AdaptorError, match=r"'inputs_mask' has shape \(4, 5\) but the student's "
                                           r"hidden \(4, 6, 16\) needs \(batch, length\) = "
                                           r"\(4, 6\)"):
        distiller.train(optimizer, _loader(), num_epochs=1)


def test_resuming_with_a_changed_distillation_config_warns_and_goes_on(tmp_path, caplog):
    distiller, student, optimizer = _general(tmp_path, ckpt_steps=2, keep_train_states=None)
    with distiller:
        distiller.train(optimizer, _loader(), num_steps=4)
    os.remove(tmp_path / "gs4.train_state.pt")
    calls = []
    distiller, student, optimizer = _general(
        tmp_path, distill={"hard_label_weight": 0.25, "temperature": 2},
        adaptor_S=_counting(tiny_adaptor, calls), ckpt_steps=2, keep_train_states=None,
        resume_from="latest")
    with distiller:
        distiller.train(optimizer, _loader(), num_steps=4)
    changed = [m for m in _messages(caplog) if "DistillationConfig differs" in m]
    assert len(changed) == 1
    assert "['hard_label_weight', 'temperature']" in changed[0]
    assert "gs2.train_state.pt" in changed[0]
    assert len(calls) == 2 and os.path.exists(tmp_path / "gs4.train_state.pt")


class Encoding(collections.UserDict):
    """A Mapping that is not a dict, like transformers' BatchEncoding."""


def test_a_mapping_batch_reaches_the_adaptors_with_its_own_type(tmp_path):
    seen = []

    def adaptor(batch, outputs):
        seen.append(type(batch))
        return tiny_adaptor(dict(batch), outputs)

    data = make_classification_data(8, length=6, vocab_size=12)
    batches = [Encoding({key: value[i:i + 4] for key, value in data.items()}) for i in (0, 4)]
    distiller, student, optimizer = _general(tmp_path, adaptor_S=adaptor, adaptor_T=adaptor)
    with distiller:
        distiller.train(optimizer, batches, num_epochs=1)
    assert seen == [Encoding] * 4
    assert os.path.exists(tmp_path / "gs2.pkl")


def test_transformers_batch_encoding_keeps_its_type(tmp_path):
    transformers = pytest.importorskip("transformers")
    seen = []

    def adaptor(batch, outputs):
        seen.append(type(batch))
        return tiny_adaptor(batch, outputs)

    data = make_classification_data(8, length=6, vocab_size=12)
    batches = [transformers.BatchEncoding({key: value[i:i + 4] for key, value in data.items()})
               for i in (0, 4)]
    distiller, student, optimizer = _general(tmp_path, adaptor_S=adaptor, adaptor_T=adaptor)
    with distiller:
        distiller.train(optimizer, batches, num_epochs=1)
    assert seen == [transformers.BatchEncoding] * 4


# ---------------------------------------------------------------- 11. silent nonsense
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -float("inf")])
def test_non_finite_temperature(value):
    with pytest.raises(ValueError, match=r"temperature must be a finite number"):
        DistillationConfig(temperature=value)


@pytest.mark.parametrize("field", ["kd_loss_weight", "hard_label_weight"])
def test_negative_weights(field):
    with pytest.raises(ValueError, match=rf"{field} must be >= 0, got -0.5"):
        DistillationConfig(**{field: -0.5})


def test_negative_match_weight():
    with pytest.raises(ValueError, match=r"intermediate_matches\[0\]: .*weight must be >= 0, "
                                         r"got -1"):
        DistillationConfig(intermediate_matches=[{"layer_T": 0, "layer_S": 0, "weight": -1,
                                                  "loss": "hidden_mse", "feature": "hidden"}])


@pytest.mark.parametrize("log_dir", ["", "   "])
def test_empty_log_dir(log_dir):
    with pytest.raises(ValueError, match=r"log_dir=.* is not a folder; use log_dir=None"):
        TrainingConfig(device="cpu", log_dir=log_dir)


def test_ckpt_steps_in_epoch_mode_is_ignored_with_a_warning(tmp_path, caplog):
    distiller, student, optimizer = _general(tmp_path, ckpt_steps=1)
    with distiller:
        distiller.train(optimizer, _loader(), num_epochs=1)
    warnings = [m for m in _messages(caplog) if "ckpt_steps=1 is ignored in epoch mode" in m]
    assert len(warnings) == 1
    assert sorted(os.listdir(tmp_path)) == ["gs4.pkl", "gs4.train_state.pt"]


# ---------------------------------------------------------------- 12. visibility
@contextlib.contextmanager
def bare_root_logger():
    """No handler on the root logger; pytest's own (added around the test call, so a
    fixture cannot remove them) and the library logger's level are put back afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], _LOGGER.level
    for handler in saved_handlers:
        root.removeHandler(handler)
    try:
        yield root
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        _LOGGER.setLevel(saved_level)


PROGRESS = r"INFO textbrewer: step {step}/4 \(epoch 1/1\) loss [0-9.e+-]+, [0-9.]+ samples/s"


def _train_quietly(tmp_path, **train):
    distiller, student, optimizer = _general(tmp_path, **train)
    with distiller:
        distiller.train(optimizer, _loader(), num_epochs=1)


def test_library_handler_prints_progress_without_root_handlers(tmp_path, capsys):
    with bare_root_logger():
        _train_quietly(tmp_path)
    err = capsys.readouterr().err
    for step in range(1, 5):
        assert re.search(PROGRESS.format(step=step), err), err
    assert "Training finished after 4 optimizer steps" in err
    assert err.count("step 4/4") == 1


def test_library_handler_is_silent_when_the_root_logger_has_a_handler(tmp_path, capsys):
    stream = io.StringIO()
    with bare_root_logger() as root:
        root.addHandler(logging.StreamHandler(stream))
        _train_quietly(tmp_path)
    assert "textbrewer" not in capsys.readouterr().err
    assert stream.getvalue().count("step 4/4 (epoch 1/1) loss") == 1


def test_set_verbosity_warning_hides_progress(tmp_path, capsys):
    with bare_root_logger():
        textbrewer.logs.set_verbosity("warning")
        assert textbrewer.logs.get_verbosity() == logging.WARNING
        _train_quietly(tmp_path, ckpt_steps=1)
        textbrewer.logs.set_verbosity("INFO")
        assert textbrewer.logs.get_verbosity() == logging.INFO
    err = capsys.readouterr().err
    assert "step 4/4" not in err and "INFO" not in err
    # warnings still print
    assert err.count("WARNING textbrewer: TrainingConfig.ckpt_steps=1 is ignored") == 1
    assert os.path.exists(tmp_path / "gs4.pkl")


def test_unknown_verbosity_lists_the_choices():
    level = _LOGGER.level
    with pytest.raises(ValueError, match=r"unknown verbosity 'loud'; valid choices: \['debug', "
                                         r"'info', 'warning', 'error', 'critical'\]"):
        textbrewer.logs.set_verbosity("loud")
    assert _LOGGER.level == level


# ---------------------------------------------------------------- 13. bf16 on CPU
@pytest.mark.parametrize("native, warns", [(False, True), (True, False), (None, False)])
def test_bf16_on_a_cpu_without_native_bf16_warns(tmp_path, caplog, monkeypatch, native, warns):
    from textbrewer.training import runtime
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    teacher, student = _models()
    BasicDistiller(_config(tmp_path, mixed_precision="bf16"), DistillationConfig(), teacher,
                   student, tiny_adaptor, tiny_adaptor)
    warnings = [m for m in _messages(caplog) if "bf16" in m]
    if warns:
        assert len(warnings) == 1
        assert "without native bf16" in warnings[0]
        assert "mixed_precision='no' will be faster" in warnings[0]
    else:
        assert warnings == []


# ---------------------------------------------------------------- 14. 0.2.1 subclasses
def _legacy_source():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "test_parity_textbrewer021.py")
    spec = importlib.util.spec_from_file_location("_parity_textbrewer021_source", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module.LEGACY_SUBCLASS_SOURCE


def test_textbrewer021_module_paths_import():
    import textbrewer.distiller_basic as basic
    import textbrewer.distiller_general as general
    import textbrewer.distiller_multitask as multitask
    import textbrewer.distiller_multiteacher as multiteacher
    import textbrewer.distiller_train as train
    import textbrewer.distiller_utils as utils
    assert basic.BasicDistiller is textbrewer.BasicDistiller
    assert general.GeneralDistiller is textbrewer.GeneralDistiller
    assert multitask.MultiTaskDistiller is textbrewer.MultiTaskDistiller
    assert multiteacher.MultiTeacherDistiller is textbrewer.MultiTeacherDistiller
    assert train.BasicTrainer is textbrewer.BasicTrainer
    for name in ("get_outputs_from_batch", "post_adaptor", "select_logits_with_mask",
                 "probability_shift_", "PROJ_MAP", "MATCH_LOSS_MAP", "FEATURES", "logger"):
        assert hasattr(utils, name) and hasattr(basic, name), name


def test_textbrewer021_style_subclass_runs_on_this_library(tmp_path):
    namespace = {}
    exec(compile(_legacy_source().replace("LIB", "textbrewer"), "legacy_subclass", "exec"),
         namespace)
    teacher, student = _models(dropout=0.1)
    user_config = DistillationConfig(kd_loss_weight=0.7, kd_loss_weight_scheduler="linear_decay",
                                     hard_label_weight=0.5, is_caching_logits=True)
    distiller = namespace["LayerAverageDistiller"](
        _config(tmp_path, ckpt_frequency=2), user_config, teacher, student, tiny_adaptor,
        tiny_adaptor, proj=["linear", 8, 16])
    # the subclass's `self.d_config.is_caching_logits = False` stays in the distiller
    assert distiller.d_config.is_caching_logits is False
    assert user_config.is_caching_logits is True
    assert not distiller.caching_logits
    projections = list(distiller.projs)
    assert len(projections) == 2
    before = [_weights(p) for p in projections]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    weights_seen = {}

    def callback(model, step):
        weights_seen[step] = distiller.d_config.kd_loss_weight

    with distiller:
        distiller.train(optimizer, _loader(shuffle=True), num_epochs=2, callback=callback)
    # 8 steps; kd weight = 1 - step / 8 as each checkpoint is written
    assert weights_seen == {2: 0.75, 4: 0.5, 6: 0.25, 8: 0.0}
    assert distiller.d_config.kd_loss_weight == 0.0
    assert user_config.kd_loss_weight == 0.7
    assert user_config.to_dict()["kd_loss_weight_scheduler"] == "linear_decay"
    assert distiller.logits_cache == []
    assert len(optimizer.param_groups) == 3
    for group, projection, old in zip(optimizer.param_groups[1:], projections, before):
        assert [id(p) for p in group["params"]] == [id(p) for p in projection.parameters()]
        assert not _same(_weights(projection), old)  # trained
    state = torch.load(tmp_path / "gs8.train_state.pt", weights_only=True)
    assert len(state["extras"]) == 2
    assert torch.equal(state["extras"][0]["weight"], projections[0].weight.detach())


# ---------------------------------------------------------------- 15. KD over heads
@pytest.mark.parametrize("kd_over_heads", ["last", "sum"])
def test_kd_over_two_heads(tmp_path, kd_over_heads):
    distiller, _, _ = _general(tmp_path, distill={"temperature": 2.0, "kd_loss_weight": 0.5,
                                                  "kd_over_heads": kd_over_heads})
    generator = torch.Generator().manual_seed(0)
    logits_S = [torch.randn(4, 3, generator=generator), torch.randn(4, 5, generator=generator)]
    logits_T = [torch.randn(4, 3, generator=generator), torch.randn(4, 5, generator=generator)]
    first = kd_ce_loss(logits_S[0], logits_T[0], 2.0)
    last = kd_ce_loss(logits_S[1], logits_T[1], 2.0)
    assert not math.isclose(first.item(), last.item())
    total, parts = distiller.compute_loss({"logits": logits_S}, {"logits": logits_T})
    expected = first + last if kd_over_heads == "sum" else last
    torch.testing.assert_close(parts["unweighted_kd_loss"], expected, rtol=0, atol=0)
    torch.testing.assert_close(total, expected * 0.5, rtol=0, atol=0)
    assert set(parts) == {"unweighted_kd_loss"}
