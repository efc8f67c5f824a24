"""Exact resume: a run stopped half-way and resumed ends bit-identical to an uninterrupted one."""
import os

import pytest
import torch

from textbrewer import (BasicDistiller, DistillationConfig, GeneralDistiller, MultiTaskDistiller,
                        TrainingConfig)
from textbrewer.checkpoint import latest_state_path, state_path
from textbrewer.utils import seed_everything
from textbrewer.testing import TinyTransformer, make_classification_data, tiny_adaptor


class Interrupt(Exception):
    pass


def _dataset(seed=0, num_examples=20):
    data = make_classification_data(num_examples, length=6, vocab_size=12, seed=seed)
    return [{key: value[i] for key, value in data.items()} for i in range(num_examples)]


def _loader(seed=0):
    # shuffled every pass (global RNG) and dropout in the models: resume must restore both
    return torch.utils.data.DataLoader(_dataset(seed), batch_size=3, shuffle=True)


MATCHES = [{"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
            "proj": ["linear", 8, 16]},
           {"layer_T": 1, "layer_S": 0, "feature": "attention", "loss": "attention_mse_sum",
            "weight": 1}]


def _build(kind, output_dir, resume_from=None, init_seed=0, stop_at=None, **train):
    torch.manual_seed(0)  # the teachers are fixed (pretrained) models, the same every run
    teacher = TinyTransformer(vocab_size=12, hidden_size=16, num_layers=2, dropout=0.1)
    second = TinyTransformer(vocab_size=12, hidden_size=16, num_layers=2, dropout=0.1)
    torch.manual_seed(init_seed)
    student = TinyTransformer(vocab_size=12, hidden_size=8, num_layers=1, dropout=0.1)
    config = TrainingConfig(device="cpu", output_dir=str(output_dir), resume_from=resume_from,
                            **train)
    if kind == "multitask":
        distiller = MultiTaskDistiller(config, DistillationConfig(hard_label_weight=0.5,
                                                                  intermediate_matches=MATCHES),
                                       {"a": teacher, "b": second}, student,
                                       {"a": tiny_adaptor, "b": tiny_adaptor},
                                       {"a": tiny_adaptor, "b": tiny_adaptor})
    elif kind == "caching":
        distiller = BasicDistiller(config, DistillationConfig(is_caching_logits=True,
                                                              hard_label_weight=0.5,
                                                              kd_loss_weight_scheduler="linear_decay"),
                                   teacher, student, tiny_adaptor, tiny_adaptor)
    else:
        distiller = GeneralDistiller(config, DistillationConfig(
            hard_label_weight=0.5, hard_label_weight_scheduler="linear_growth",
            temperature_scheduler=["flsw", 1, 2], intermediate_matches=MATCHES),
            teacher, student, tiny_adaptor, tiny_adaptor)
    if stop_at is not None:
        # "killed" at the first micro-batch after checkpoint stop_at was completely written
        # (weights, callback, then the training state)
        finished = state_path(str(output_dir), stop_at)
        adaptor_S = distiller.adaptor_S

        def interrupting(name=None):
            def adaptor(batch, outputs):
                if os.path.exists(finished):
                    raise Interrupt
                return (adaptor_S[name] if name else adaptor_S)(batch, outputs)
            return adaptor
        distiller.adaptor_S = ({name: interrupting(name) for name in adaptor_S}
                               if isinstance(adaptor_S, dict) else interrupting())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    return distiller, student, optimizer


def _run(kind, output_dir, stop_at=None, resume_from=None, init_seed=0, **train):
    distiller, student, optimizer = _build(kind, output_dir, resume_from, init_seed, stop_at,
                                           **train)

    def callback(model, step):
        # evaluation draws random numbers (a DataLoader iterator does); as in TextBrewer
        # 0.2.1 they shift training, and the resumed run must continue from them
        torch.rand(3)

    train_args = dict(scheduler_class=torch.optim.lr_scheduler.StepLR,
                      scheduler_args={"step_size": 2, "gamma": 0.5}, max_grad_norm=1.0,
                      callback=callback)
    if kind == "multitask":
        train_args.pop("scheduler_class"), train_args.pop("scheduler_args")
        train_args["scheduler"] = None
    try:
        with distiller:
            if kind == "multitask":
                distiller.train(optimizer, {"a": _loader(0), "b": _loader(1)}, num_steps=9,
                                tau=1, **train_args)
            elif kind == "steps":
                distiller.train(optimizer, _loader(), num_steps=9, **train_args)
            else:
                distiller.train(optimizer, _loader(), num_epochs=3, **train_args)
    except Interrupt:
        return None
    return {k: v.clone() for k, v in student.state_dict().items()}, optimizer


CASES = {
    # kind: (train config, the step at which the first run is interrupted)
    "epochs": (dict(ckpt_frequency=3, gradient_accumulation_steps=2), 4),
    "steps": (dict(ckpt_steps=2, gradient_accumulation_steps=2), 4),
    "multitask": (dict(ckpt_steps=3), 6),
    "caching": (dict(ckpt_frequency=2), 10),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_resume_is_bit_identical(tmp_path, kind):
    train, stop_at = CASES[kind]
    seed_everything(1234)
    reference, reference_optimizer = _run(kind, tmp_path / "full", **train)

    seed_everything(1234)
    assert _run(kind, tmp_path / "cut", stop_at=stop_at, **train) is None
    path = latest_state_path(str(tmp_path / "cut"))
    assert os.path.basename(path) == f"gs{stop_at}.train_state.pt"

    seed_everything(999)  # a different process state: everything must come from the file
    resumed, resumed_optimizer = _run(kind, tmp_path / "cut", resume_from="latest",
                                      init_seed=77, **train)
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    for group_a, group_b in zip(reference_optimizer.param_groups, resumed_optimizer.param_groups):
        assert group_a["lr"] == group_b["lr"]
    # the resumed run wrote the later checkpoints, identical to the uninterrupted run's
    for name in sorted(os.listdir(tmp_path / "full")):
        if name.endswith(".pkl"):
            full = torch.load(tmp_path / "full" / name, weights_only=True)
            cut = torch.load(tmp_path / "cut" / name, weights_only=True)
            assert all(torch.equal(full[k], cut[k]) for k in full), name


def test_resume_refuses_a_different_plan(tmp_path):
    train, stop_at = CASES["epochs"]
    _run("epochs", tmp_path, stop_at=stop_at, **train)
    distiller, student, optimizer = _build("epochs", tmp_path, "latest", **train)
    with pytest.raises(ValueError, match="num_epochs=3, this run has num_epochs=4"):
        distiller.train(optimizer, _loader(), num_epochs=4)


def test_resume_latest_without_state_starts_fresh_and_missing_file_is_an_error(tmp_path):
    distiller, student, optimizer = _build("steps", tmp_path / "empty", "latest")
    distiller.train(optimizer, _loader(), num_steps=2)
    assert sorted(os.listdir(tmp_path / "empty")) == ["gs2.pkl", "gs2.train_state.pt"]
    distiller, student, optimizer = _build("steps", tmp_path, str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        distiller.train(optimizer, _loader(), num_steps=2)


def test_state_file_loads_with_weights_only(tmp_path):
    _run("steps", tmp_path, **CASES["steps"][0])
    state = torch.load(tmp_path / "gs9.train_state.pt", weights_only=True)
    assert state["progress"]["global_step"] == 9
    assert state["train_config"]["ckpt_steps"] == 2
    assert state["distill_config"]["intermediate_matches"][0]["proj"] == ["linear", 8, 16, {}]
