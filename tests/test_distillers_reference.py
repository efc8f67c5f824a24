"""Every distiller against a plain PyTorch loop written from the formulas of TextBrewer 0.2.1.

Each test trains a tiny student twice from the same start: once with our distiller, once
with the loop below (teacher forward under ``no_grad``, the loss terms written out with
torch ops, backward divided by the accumulation, clip the student's parameters only,
optimizer step, LR-scheduler step, zero_grad, weight schedules). The final students must
agree to 1e-5, every ``gs*.pkl`` must hold the reference student of its step, and the
callback must see the student at exactly those steps, in train mode each time.

Dropout is on in the student and every dataloader shuffles with its own generator, so the
loop must also make the same forward passes over the same batches in the same order.
"""
from __future__ import annotations

import copy
import glob
import os
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from textbrewer import (BasicDistiller, BasicTrainer, DistillationConfig, GeneralDistiller,
                        MultiTaskDistiller, MultiTeacherDistiller, TrainingConfig)
from textbrewer.testing import TinyTransformer, make_classification_data, tiny_adaptor

VOCAB, LENGTH, BATCH = 12, 6, 4
TOLERANCE = dict(atol=1e-5, rtol=1e-5)
LR_SCHEDULE = dict(scheduler_class=torch.optim.lr_scheduler.LinearLR,
                   scheduler_args={"start_factor": 1.0, "end_factor": 0.3, "total_iters": 8})


# ---------------------------------------------------------------- models and data
def _teacher(seed: int) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2,
                           num_labels=3, max_length=LENGTH, dropout=0.1)


def _student() -> TinyTransformer:
    torch.manual_seed(100)
    return TinyTransformer(vocab_size=VOCAB, hidden_size=8, num_layers=1, num_heads=2,
                           num_labels=3, max_length=LENGTH, dropout=0.1)


def _examples(num_examples: int, seed: int = 10) -> List[Dict[str, torch.Tensor]]:
    data = make_classification_data(num_examples, length=LENGTH, vocab_size=VOCAB, seed=seed)
    return [{key: value[i] for key, value in data.items()} for i in range(num_examples)]


def _loader(examples, seed: int = 5) -> torch.utils.data.DataLoader:
    """Shuffles with its own generator: the order depends only on how many passes were made."""
    return torch.utils.data.DataLoader(examples, batch_size=BATCH, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def _cycle(loader) -> Iterator[Any]:
    while True:
        for batch in loader:
            yield batch


def _optimizer(student: nn.Module) -> torch.optim.Optimizer:
    # SGD, not Adam: the attention key bias has an exactly zero gradient (softmax ignores a
    # per-row shift), so its gradient is pure rounding noise, which Adam would normalise
    # into lr-sized steps that differ between two ways of writing the same formula.
    return torch.optim.SGD(student.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)


def _projection(dim_in: int, dim_out: int) -> nn.Linear:
    """A 'linear' projection: N(0, 0.02) weights, zero bias (drawn after the default init)."""
    layer = nn.Linear(dim_in, dim_out)
    nn.init.normal_(layer.weight, mean=0.0, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


def _state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


# ---------------------------------------------------------------- the formulas, by hand
def kd_ce(logits_S, logits_T, temperature):
    """−Σ_c softmax(T/τ)·log_softmax(S/τ), mean over rows; a per-row τ is (N,)."""
    if torch.is_tensor(temperature):
        temperature = temperature[:, None]
    p_T = torch.exp(logits_T / temperature) / torch.exp(logits_T / temperature).sum(-1, True)
    log_p_S = logits_S / temperature - torch.logsumexp(logits_S / temperature, -1, True)
    return -(p_T * log_p_S).sum(-1).mean()


def kd_mse(logits_S, logits_T, temperature):
    """mse(S/τ, T/τ), mean over all elements."""
    if torch.is_tensor(temperature):
        temperature = temperature[:, None]
    return ((logits_S / temperature - logits_T / temperature) ** 2).mean()


def flsw(logits_S, logits_T, base, beta, gamma):
    """τ = base + (mean(w) − w)·beta, w = (1 − cos(S, T))^gamma, norms + 1e-4."""
    s, t = logits_S.detach(), logits_T.detach()
    s = s / (torch.sqrt((s * s).sum(-1, True)) + 1e-4)
    t = t / (torch.sqrt((t * t).sum(-1, True)) + 1e-4)
    w = (1 - (s * t).sum(-1)) ** gamma
    return base + (w.mean() - w) * beta


def cwsm(logits_S, base, beta):
    """τ = base + (mean(w) − w)·beta, w = 1 / (max softmax(S) + 1e-3)."""
    w = 1 / (torch.softmax(logits_S.detach(), -1).max(-1).values + 1e-3)
    return base + (w.mean() - w) * beta


def shifted(logits_T, labels):
    """The teacher's logits with each row's largest entry swapped with the gold label's."""
    logits_T = logits_T.clone()
    for row, label in enumerate(labels.tolist()):
        top = int(logits_T[row].argmax())
        top_value, gold_value = float(logits_T[row, top]), float(logits_T[row, label])
        logits_T[row, top], logits_T[row, label] = gold_value, top_value
    return logits_T


def hidden_mse(state_S, state_T, mask):
    """Σ(S−T)²·m / (Σm · hidden)."""
    m = mask.float()
    return ((state_S - state_T) ** 2 * m[:, :, None]).sum() / (m.sum() * state_S.size(-1))


def attention_mse(attention_S, attention_T, mask):
    """Σ(S−T)²·m_i·m_j over (b, h, i, j) / Σ_{b,h} len_b²."""
    m = mask.float()
    pairs = m[:, None, :, None] * m[:, None, None, :]
    lengths_squared = (m.sum(1) ** 2)[:, None].expand(-1, attention_S.size(1))
    return ((attention_S - attention_T) ** 2 * pairs).sum() / lengths_squared.sum()


# ---------------------------------------------------------------- the reference loop
class ReferenceRun:
    """A plain loop. ``loss_of(batch)`` gives the total loss of one micro-batch;
    ``schedule(progress)`` runs after every optimizer step with global_step / total."""

    def __init__(self, student, optimizer, loss_of: Callable, accumulation: int = 1,
                 max_grad_norm: float = -1.0, schedule: Optional[Callable] = None):
        self.student, self.optimizer, self.loss_of = student, optimizer, loss_of
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm
        self.schedule = schedule or (lambda progress: None)
        self.scheduler = LR_SCHEDULE["scheduler_class"](optimizer, **LR_SCHEDULE["scheduler_args"])
        self.global_step = 0
        self.states: Dict[int, Dict[str, torch.Tensor]] = {}  # student after each step

    def micro_batch(self, batch) -> None:
        (self.loss_of(batch) / self.accumulation).backward()

    def optimizer_step(self, total: int) -> None:
        if self.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.global_step += 1
        self.schedule(self.global_step / total)
        self.states[self.global_step] = _state(self.student)

    def epochs(self, loader, num_epochs: int) -> "ReferenceRun":
        self.student.train()
        total = len(loader) // self.accumulation * num_epochs
        for _ in range(num_epochs):
            self.optimizer.zero_grad()
            for index, batch in enumerate(loader):
                self.micro_batch(batch)
                if (index + 1) % self.accumulation == 0:
                    self.optimizer_step(total)
        return self

    def steps(self, next_batch: Callable[[], Any], num_steps: int) -> "ReferenceRun":
        self.student.train()
        self.optimizer.zero_grad()
        while self.global_step < num_steps:
            for _ in range(self.accumulation):
                self.micro_batch(next_batch())
            self.optimizer_step(num_steps)
        return self


def teacher_forward(teacher: nn.Module, batch) -> Dict[str, Any]:
    teacher.eval()
    with torch.no_grad():
        return teacher(**batch)


# ---------------------------------------------------------------- running ours
class Recorder:
    """The callback: records (step, is the student, in train mode) and leaves it in eval."""

    def __init__(self, student):
        self.student, self.calls = student, []

    def __call__(self, model, step):
        self.calls.append((step, model is self.student, model.training))
        model.eval()  # the distiller must put the student back in train mode


def _train_config(tmp_path, **options) -> TrainingConfig:
    return TrainingConfig(device="cpu", output_dir=str(tmp_path / "out"), **options)


def _train_ours(distiller, student, loader, mode, seed=7, max_grad_norm=-1.0) -> Recorder:
    recorder = Recorder(student)
    torch.manual_seed(seed)  # dropout
    with distiller:
        distiller.train(_optimizer(student), loader, callback=recorder,
                        max_grad_norm=max_grad_norm, **LR_SCHEDULE, **mode)
    return recorder


def _checkpoints(tmp_path) -> Dict[int, Dict[str, torch.Tensor]]:
    paths = glob.glob(os.path.join(str(tmp_path / "out"), "gs*.pkl"))
    return {int(os.path.basename(path)[2:-4]): torch.load(path, weights_only=True)
            for path in paths}


def _compare(student, reference: ReferenceRun, recorder: Recorder, tmp_path,
             expected_checkpoints: List[int]) -> None:
    difference = max(float((a - b).abs().max()) for a, b in
                     zip(_state(student).values(), _state(reference.student).values()))
    print(f"\n[reference] max |ours - reference| = {difference:.3g}")
    torch.testing.assert_close(_state(student), _state(reference.student), **TOLERANCE)
    assert _state(student).keys() == reference.states[1].keys()
    moved = max(float((a - b).abs().max()) for a, b in
                zip(_state(student).values(), _state(_student()).values()))
    assert moved > 1e-3, "training did not move the student: the comparison is vacuous"
    saved = _checkpoints(tmp_path)
    assert sorted(saved) == expected_checkpoints
    for step, weights in saved.items():
        torch.testing.assert_close(weights, reference.states[step], **TOLERANCE)
    assert recorder.calls == [(step, True, True) for step in expected_checkpoints]
    assert student.training


def _epoch_checkpoints(steps_per_epoch: int, num_epochs: int, ckpt_frequency: int,
                       ckpt_epoch_frequency: int) -> List[int]:
    """TEXTBREWER_0.2.1.md: at int(steps_per_epoch·i / ckpt_frequency) within the epochs
    where (epoch+1) % ckpt_epoch_frequency == 0, and the last."""
    offsets = {int(steps_per_epoch * i / ckpt_frequency) for i in range(ckpt_frequency)}
    steps = []
    for epoch in range(num_epochs):
        if (epoch + 1) % ckpt_epoch_frequency == 0 or epoch + 1 == num_epochs:
            steps += [epoch * steps_per_epoch + k for k in range(1, steps_per_epoch + 1)
                      if k % steps_per_epoch in offsets]
    return steps


# ---------------------------------------------------------------- checkpoint schedules
def test_epoch_checkpoint_schedule_formula():
    # 3 steps per epoch, twice per epoch, every second epoch and the last
    assert _epoch_checkpoints(3, 3, 2, 2) == [4, 6, 7, 9]
    assert _epoch_checkpoints(4, 2, 1, 1) == [4, 8]
    assert _epoch_checkpoints(5, 1, 3, 1) == [1, 3, 5]


# ---------------------------------------------------------------- BasicTrainer
@pytest.mark.parametrize("mode", ["epochs", "steps"])
def test_basic_trainer_matches_reference(tmp_path, mode):
    examples = _examples(12 if mode == "epochs" else 20)
    student = _student()
    reference_student = copy.deepcopy(student)
    if mode == "epochs":  # 3 batches, 3 steps per epoch
        config = _train_config(tmp_path, ckpt_frequency=2, ckpt_epoch_frequency=2)
        run_mode, expected, accumulation = {"num_epochs": 3}, [4, 6, 7, 9], 1
    else:  # 5 batches cycled, 2 micro-batches per step
        config = _train_config(tmp_path, ckpt_steps=3, gradient_accumulation_steps=2)
        run_mode, expected, accumulation = {"num_steps": 7}, [3, 6, 7], 2
    trainer = BasicTrainer(config, student, tiny_adaptor)
    recorder = _train_ours(trainer, student, _loader(examples), run_mode, max_grad_norm=0.5)

    torch.manual_seed(7)
    reference = ReferenceRun(reference_student, _optimizer(reference_student),
                             lambda batch: reference_student(**batch)["loss"].mean(),
                             accumulation=accumulation, max_grad_norm=0.5)
    if mode == "epochs":
        reference.epochs(_loader(examples), 3)
    else:
        batches = _cycle(_loader(examples))
        reference.steps(lambda: next(batches), 7)
    _compare(student, reference, recorder, tmp_path, expected)


# ---------------------------------------------------------------- BasicDistiller
def test_basic_distiller_epochs_matches_reference(tmp_path):
    """ce + flsw temperature, kd weight linear_decay, hard-label weight linear_growth,
    2 micro-batches per step (5 batches: one left over each epoch), clipping."""
    examples = _examples(20)
    teacher, student = _teacher(1), _student()
    reference_student = copy.deepcopy(student)
    config = DistillationConfig(temperature=2, temperature_scheduler=["flsw", 1, 2],
                                hard_label_weight=0.5, kd_loss_weight_scheduler="linear_decay",
                                hard_label_weight_scheduler="linear_growth")
    distiller = BasicDistiller(
        _train_config(tmp_path, ckpt_frequency=2, ckpt_epoch_frequency=2,
                      gradient_accumulation_steps=2),
        config, teacher, student, tiny_adaptor, tiny_adaptor)
    student.eval()
    teacher.train()
    recorder = _train_ours(distiller, student, _loader(examples), {"num_epochs": 3},
                           max_grad_norm=0.5)
    assert not student.training and teacher.training  # `with` restored both modes
    student.train()

    weights = {"kd": 1.0, "hard": 0.5}

    def loss_of(batch):
        logits_T = teacher_forward(teacher, batch)["logits"]
        outputs_S = reference_student(**batch)
        tau = flsw(outputs_S["logits"], logits_T, 2, 1, 2)
        return (weights["kd"] * kd_ce(outputs_S["logits"], logits_T, tau)
                + weights["hard"] * outputs_S["loss"].mean())

    def schedule(progress):
        weights.update(kd=1 - progress, hard=progress)

    torch.manual_seed(7)
    reference = ReferenceRun(reference_student, _optimizer(reference_student), loss_of,
                             accumulation=2, max_grad_norm=0.5, schedule=schedule)
    reference.epochs(_loader(examples), 3)
    # 2 steps per epoch: offsets {0, 1}, epochs 2 and 3
    expected = _epoch_checkpoints(2, 3, 2, 2)
    assert expected == [3, 4, 5, 6]
    _compare(student, reference, recorder, tmp_path, expected)


def test_basic_distiller_steps_matches_reference(tmp_path):
    """mse + cwsm temperature + probability_shift, step mode cycling 5 batches."""
    examples = _examples(20)
    teacher, student = _teacher(1), _student()
    reference_student = copy.deepcopy(student)
    config = DistillationConfig(kd_loss_type="mse", temperature=3,
                                temperature_scheduler=["cwsm", 1], probability_shift=True,
                                hard_label_weight=0.3)
    distiller = BasicDistiller(_train_config(tmp_path, ckpt_steps=3), config, teacher, student,
                               tiny_adaptor, tiny_adaptor)
    recorder = _train_ours(distiller, student, _loader(examples), {"num_steps": 7})

    def loss_of(batch):
        logits_T = shifted(teacher_forward(teacher, batch)["logits"], batch["labels"])
        outputs_S = reference_student(**batch)
        tau = cwsm(outputs_S["logits"], 3, 1)
        return kd_mse(outputs_S["logits"], logits_T, tau) + 0.3 * outputs_S["loss"].mean()

    torch.manual_seed(7)
    reference = ReferenceRun(reference_student, _optimizer(reference_student), loss_of)
    batches = _cycle(_loader(examples))
    reference.steps(lambda: next(batches), 7)
    _compare(student, reference, recorder, tmp_path, [3, 6, 7])


# ---------------------------------------------------------------- GeneralDistiller
GENERAL_MATCHES = [
    # student hidden 8 -> teacher 16 through a projection with its own learning rate
    {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1.0,
     "proj": ["linear", 8, 16, {"lr": 3e-3}]},
    {"layer_T": 1, "layer_S": 0, "feature": "attention", "loss": "attention_mse",
     "weight": 0.5},
]


@pytest.mark.parametrize("mode", ["epochs", "steps"])
def test_general_distiller_matches_reference(tmp_path, mode):
    """KD + hard label + a projected, masked hidden_mse + a masked attention_mse."""
    examples = _examples(20)
    teacher, student = _teacher(1), _student()
    reference_student = copy.deepcopy(student)
    config = DistillationConfig(temperature=2, hard_label_weight=0.5,
                                intermediate_matches=copy.deepcopy(GENERAL_MATCHES))
    if mode == "epochs":
        train_config = _train_config(tmp_path, ckpt_frequency=2, gradient_accumulation_steps=2)
        run_mode, expected = {"num_epochs": 2}, [1, 2, 3, 4]
    else:
        train_config = _train_config(tmp_path, ckpt_steps=3, gradient_accumulation_steps=2)
        run_mode, expected = {"num_steps": 7}, [3, 6, 7]
    torch.manual_seed(3)  # the projection is drawn when the distiller is built
    distiller = GeneralDistiller(train_config, config, teacher, student, tiny_adaptor,
                                 tiny_adaptor)
    recorder = _train_ours(distiller, student, _loader(examples), run_mode, max_grad_norm=0.1)

    torch.manual_seed(3)
    projection = _projection(8, 16)

    def loss_of(batch):
        outputs_T = teacher_forward(teacher, batch)
        outputs_S = reference_student(**batch)
        mask = outputs_S["attention_mask"]
        return (kd_ce(outputs_S["logits"], outputs_T["logits"], 2)
                + 0.5 * outputs_S["loss"].mean()
                + 1.0 * hidden_mse(projection(outputs_S["hidden_states"][1]),
                                   outputs_T["hidden_states"][2], mask)
                + 0.5 * attention_mse(outputs_S["attentions"][0], outputs_T["attentions"][1],
                                      mask))

    optimizer = _optimizer(reference_student)
    optimizer.add_param_group({"params": list(projection.parameters()), "lr": 3e-3})
    torch.manual_seed(7)
    reference = ReferenceRun(reference_student, optimizer, loss_of, accumulation=2,
                             max_grad_norm=0.1)  # clips the student only, not the projection
    if mode == "epochs":
        reference.epochs(_loader(examples), 2)
    else:
        batches = _cycle(_loader(examples))
        reference.steps(lambda: next(batches), 7)
    _compare(student, reference, recorder, tmp_path, expected)
    trained_projection = distiller.extra_trainable_modules()[0][0]
    torch.testing.assert_close(_state(trained_projection), _state(projection), **TOLERANCE)


# ---------------------------------------------------------------- MultiTeacherDistiller
@pytest.mark.parametrize("mode", ["epochs", "steps"])
def test_multi_teacher_distiller_matches_reference(tmp_path, mode):
    """KD against the mean of two teachers' raw logits."""
    examples = _examples(16)
    teachers, student = [_teacher(1), _teacher(2)], _student()
    reference_student = copy.deepcopy(student)
    config = DistillationConfig(temperature=3, hard_label_weight=0.2,
                                kd_loss_weight_scheduler="linear_decay")
    if mode == "epochs":
        train_config = _train_config(tmp_path)
        run_mode, expected, total = {"num_epochs": 2}, [4, 8], 8
    else:
        train_config = _train_config(tmp_path, ckpt_steps=4)
        run_mode, expected, total = {"num_steps": 6}, [4, 6], 6
    distiller = MultiTeacherDistiller(train_config, config, teachers, student, tiny_adaptor,
                                      tiny_adaptor)
    recorder = _train_ours(distiller, student, _loader(examples), run_mode)

    weights = {"kd": 1.0}

    def loss_of(batch):
        logits_T = [teacher_forward(teacher, batch)["logits"] for teacher in teachers]
        outputs_S = reference_student(**batch)
        mean_T = (logits_T[0] + logits_T[1]) / 2
        return (weights["kd"] * kd_ce(outputs_S["logits"], mean_T, 3)
                + 0.2 * outputs_S["loss"].mean())

    torch.manual_seed(7)
    reference = ReferenceRun(reference_student, _optimizer(reference_student), loss_of,
                             schedule=lambda progress: weights.update(kd=1 - progress))
    if mode == "epochs":
        reference.epochs(_loader(examples), 2)
    else:
        batches = _cycle(_loader(examples))
        reference.steps(lambda: next(batches), 6)
    assert reference.global_step == total
    _compare(student, reference, recorder, tmp_path, expected)


# ---------------------------------------------------------------- MultiTaskDistiller
def test_multi_task_distiller_matches_reference(tmp_path):
    """Two tasks (6 and 3 batches), a task drawn per micro-batch with p ∝ len(loader),
    each loader cycling; a projected, masked hidden match applies to both tasks."""
    data = {"a": _examples(24, seed=11), "b": _examples(12, seed=12)}
    teachers, student = {"a": _teacher(1), "b": _teacher(2)}, _student()
    reference_student = copy.deepcopy(student)
    match = dict(GENERAL_MATCHES[0], proj=["linear", 8, 16, {"lr": 3e-3}])
    config = DistillationConfig(temperature=2, hard_label_weight=0.5,
                                hard_label_weight_scheduler="linear_growth",
                                intermediate_matches=[match])
    torch.manual_seed(3)
    distiller = MultiTaskDistiller(
        _train_config(tmp_path, ckpt_steps=3, gradient_accumulation_steps=2), config, teachers,
        student, {"a": tiny_adaptor, "b": tiny_adaptor}, {"a": tiny_adaptor, "b": tiny_adaptor})
    recorder = Recorder(student)
    np.random.seed(4)
    torch.manual_seed(7)
    with distiller:
        distiller.train(_optimizer(student),
                        {"a": _loader(data["a"], 5), "b": _loader(data["b"], 6)},
                        num_steps=7, tau=1, callback=recorder, max_grad_norm=0.5,
                        **LR_SCHEDULE)

    torch.manual_seed(3)
    projection = _projection(8, 16)
    weights = {"hard": 0.5}
    loaders = {"a": _loader(data["a"], 5), "b": _loader(data["b"], 6)}
    cycles = {task: _cycle(loader) for task, loader in loaders.items()}
    sizes = {task: len(loader) for task, loader in loaders.items()}
    tasks_seen = []

    def next_batch():
        task = np.random.choice(["a", "b"], p=[sizes["a"] / 9, sizes["b"] / 9])
        tasks_seen.append(str(task))
        return str(task), next(cycles[str(task)])

    def loss_of(task_and_batch):
        task, batch = task_and_batch
        outputs_T = teacher_forward(teachers[task], batch)
        outputs_S = reference_student(**batch)
        return (kd_ce(outputs_S["logits"], outputs_T["logits"], 2)
                + weights["hard"] * outputs_S["loss"].mean()
                + hidden_mse(projection(outputs_S["hidden_states"][1]),
                             outputs_T["hidden_states"][2], outputs_S["attention_mask"]))

    optimizer = _optimizer(reference_student)
    optimizer.add_param_group({"params": list(projection.parameters()), "lr": 3e-3})
    np.random.seed(4)
    torch.manual_seed(7)
    reference = ReferenceRun(reference_student, optimizer, loss_of, accumulation=2,
                             max_grad_norm=0.5,
                             schedule=lambda progress: weights.update(hard=progress))
    reference.steps(next_batch, 7)
    assert sizes == {"a": 6, "b": 3} and set(tasks_seen) == {"a", "b"}
    _compare(student, reference, recorder, tmp_path, [3, 6, 7])
    trained_projection = distiller.extra_trainable_modules()[0][0]
    torch.testing.assert_close(_state(trained_projection), _state(projection), **TOLERANCE)
