"""Several tasks, one student: MultiTaskDistiller on handwritten digits.

scikit-learn's bundled digits (8x8 images, no download), a fixed stratified split per
seed: 1347 training and 450 test images. Three tasks on them, each with its own labelled
data as separate data sets would have:

* ``digit``: which digit (10 classes);
* ``parity``: is the digit even or odd (2 classes);
* ``high``: is the digit 5 or more (2 classes).

The training images are dealt to the three tasks in turn (disjoint thirds); a student sees
the labels of the first ``--train-size`` images of each task's third, for that task only
(a small-data regime); the distilled student also sees the rest of the third without
labels (each task's teacher is the only signal there; ``--no-transfer`` turns it off).
Each task has its own teacher, an MLP 64 -> 256 -> C trained on
the whole training split with that task's labels.

The student is one MLP with a shared trunk (64 -> 32) and a head per task. A student
adaptor per task picks that task's head, so ``MultiTaskDistiller`` trains the one student
on all three tasks, each micro-batch from one task (drawn ∝ its data size) and distilled
from that task's teacher. Both students start from the same weights and run the same
number of optimizer steps with the same task draws and data order:

1. ``student_alone``: the labels only (the same loop, ``kd_loss_weight=0``), at
   ``--alone-lr``;
2. ``distilled_student``: KD (τ²-scaled KL at temperature ``--temperature``) from the
   task's teacher, plus the labels, at ``--lr``. The defaults were chosen on held-out
   training images (``--validation 270``; examples/README.md).

It prints the test accuracy per task and their mean (mean ± std over ``--seeds``), the
parameter counts and the speed-up of the one student over running the three teachers,
and writes ``{output_dir}/results.json``.

Run:
    python examples/multi_task.py            # 5 seeds
    python examples/multi_task.py --quick    # seconds (the tests' run)
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)

from textbrewer import BasicTrainer, DistillationConfig, MultiTaskDistiller  # noqa: E402
from textbrewer.utils import count_parameters  # noqa: E402

# task name -> (number of classes, digit -> the task's label)
TASKS: Dict[str, Any] = {
    "digit": (10, lambda digit: digit),
    "parity": (2, lambda digit: digit % 2),
    "high": (2, lambda digit: int(digit >= 5)),
}


# ---------------------------------------------------------------------------------- data
def load_data(seed: int, train_size: Optional[int], validation: int = 0,
              transfer: bool = True) -> Dict[str, Any]:
    """Per task: ``teacher_train`` (every training image, that task's labels), ``train``
    (the first ``train_size`` of the task's third of the training images: the students'
    labels), ``transfer`` (the whole third, the images past ``train_size`` with label
    :data:`common.UNLABELLED`: the distilled student's data; ``train`` without
    ``transfer``) and ``test``: the test split, or with ``validation = N`` the last N
    training images, then held out of all training. Examples are ``{'image': (8, 8)
    float in [0, 1], 'labels': () long}``."""
    train_x, test_x, train_y, test_y = common.digits_split(seed)
    train_x, test_x = common.hold_out(train_x, test_x, validation)
    train_y, test_y = common.hold_out(train_y, test_y, validation)
    data = {}
    for index, (task, (_, label_of)) in enumerate(TASKS.items()):
        own = slice(index, None, len(TASKS))  # images index, index + 3, ...: disjoint thirds
        labelled, transfer_examples = common.labelled_and_transfer(
            common.digit_examples(train_x[own], train_y[own], label_of=label_of), train_size,
            transfer)
        data[task] = {
            "teacher_train": common.digit_examples(train_x, train_y, label_of=label_of),
            "train": labelled, "transfer": transfer_examples,
            "test": common.digit_examples(test_x, test_y, label_of=label_of)}
    return data


# ---------------------------------------------------------------------------------- models
class Teacher(nn.Module):
    """One task: ``image`` (B, 8, 8) -> ``{'logits': (B, C)}``."""

    def __init__(self, num_labels: int, width: int = 256, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(width, num_labels))

    def forward(self, image: torch.Tensor, labels: Optional[torch.Tensor] = None):
        return {"logits": self.net(image)}


class MultiTaskStudent(nn.Module):
    """A shared trunk and one head per task: ``image`` -> ``{task: (B, C_task)}``."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU())
        self.heads = nn.ModuleDict({task: nn.Linear(width, num_labels)
                                    for task, (num_labels, _) in TASKS.items()})

    def forward(self, image: torch.Tensor, labels: Optional[torch.Tensor] = None):
        shared = self.trunk(image)
        return {task: head(shared) for task, head in self.heads.items()}


def adaptor(batch, outputs):
    """The teachers' adaptor (and BasicTrainer's): logits and the labels' cross-entropy."""
    return {"logits": outputs["logits"],
            "losses": F.cross_entropy(outputs["logits"], batch["labels"])}


def student_adaptor(task: str) -> Callable:
    """The student's adaptor for ``task``: that task's head and its cross-entropy over the
    labelled rows (:func:`common.masked_adaptor`)."""
    def adapt(batch, outputs):
        return common.masked_adaptor(batch, {"logits": outputs[task]})
    return adapt


@torch.no_grad()
def evaluate(teachers: Dict[str, nn.Module], student: Optional[nn.Module],
             data: Dict[str, Any]) -> Dict[str, float]:
    """Test accuracy per task and their mean (the student, or each task's teacher)."""
    models = [*teachers.values()] + ([student] if student is not None else [])
    scores = {}
    with common.evaluating(*models):
        for task in TASKS:
            test = common.stack(data[task]["test"])
            if student is None:
                logits = teachers[task](test["image"])["logits"]
            else:
                logits = student(test["image"])[task]
            scores[task] = (logits.argmax(-1) == test["labels"]).float().mean().item()
    scores["mean"] = statistics.fmean(scores[task] for task in TASKS)
    return scores


@torch.no_grad()
def seconds_per_pass(run: Callable, images: torch.Tensor, batch_size: int = 64,
                     repeats: int = 30) -> float:
    """Fastest of ``repeats`` passes over ``images`` in batches (after a warm-up)."""
    batches = images.split(batch_size)
    for batch in batches[:3]:
        run(batch)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            run(batch)
        best = min(best, time.perf_counter() - started)
    return best


# ---------------------------------------------------------------------------------- runs
def run_seed(args: argparse.Namespace, seed: int) -> Dict[str, Any]:
    data = load_data(seed, args.train_size, args.validation, args.transfer)
    runs = common.SeedRuns(args, seed, log_steps=1000)

    teachers = {}
    for index, (task, (num_labels, _)) in enumerate(TASKS.items()):
        torch.manual_seed(seed + 10 * index)
        teacher = Teacher(num_labels)
        runs.train_steps(BasicTrainer(runs.config(f"teacher_{task}"), teacher, adaptor),
                         teacher, runs.loader(data[task]["teacher_train"]),
                         args.teacher_steps, lr=args.teacher_lr)
        teachers[task] = teacher.eval()

    torch.manual_seed(seed + 1)
    initial = MultiTaskStudent(args.width)
    students = {}
    for name, kd_weight, examples, lr in (
            ("student_alone", 0.0, "train", args.alone_lr),
            ("distilled_student", args.kd_weight, "transfer", args.lr)):
        student = copy.deepcopy(initial)
        distill_config = DistillationConfig(kd_loss_type="kl", temperature=args.temperature,
                                            kd_loss_weight=kd_weight, hard_label_weight=1.0)
        distiller = MultiTaskDistiller(runs.config(name), distill_config, model_T=teachers,
                                       model_S=student,
                                       adaptor_T={t: common.logits_adaptor for t in TASKS},
                                       adaptor_S={t: student_adaptor(t) for t in TASKS})
        # the same shuffles for both students
        loaders = {task: runs.loader(data[task][examples]) for task in TASKS}
        runs.train_steps(distiller, student, loaders, args.steps, lr=lr)
        students[name] = student

    images = common.stack(data["digit"]["test"])["image"]
    teacher_seconds = seconds_per_pass(
        lambda batch: [teacher(batch) for teacher in teachers.values()], images)
    student_seconds = seconds_per_pass(students["distilled_student"], images)
    return {"scores": {"teachers": evaluate(teachers, None, data),
                       **{name: evaluate({}, student, data)
                          for name, student in students.items()}},
            "parameters": {"teachers": sum(count_parameters(t) for t in teachers.values()),
                           "teacher_per_task": {t: count_parameters(m)
                                                for t, m in teachers.items()},
                           "student": count_parameters(initial)},
            "speedup": teacher_seconds / student_seconds,
            "train_sizes": {task: len(data[task]["train"]) for task in TASKS}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.ExampleParser(__doc__, "./output_multi_task",
                                  quick_help="one seed, few steps (tests)")
    parser.add_seeds(full=(0, 1, 2, 3, 4))
    parser.add_quick_argument("--steps", 90, 900,
                              "optimizer steps of each student, all tasks together")
    parser.add_quick_argument("--teacher-steps", 100, 600, "optimizer steps of each teacher")
    parser.add_transfer_options(train_size=100, train_size_help="labelled training images "
                                "per task for the students")
    parser.add_argument("--width", type=int, default=32, help="the student's shared width")
    parser.add_training_options(lr=1e-2, temperature=2.0,
                                lr_help="learning rate of the distilled student")
    parser.add_argument("--alone-lr", type=float, default=1e-2,
                        help="learning rate of the student alone")
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--kd-weight", type=float, default=1.0)
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(threads=1, quiet=True)  # the table, not the steps
    runs = common.run_seeds(args, run_seed, lambda run: "; ".join(
        f"{name} " + ", ".join(f"{task} {score:.4f}" for task, score in scores.items())
        for name, scores in run["scores"].items()))

    parameters = runs[0]["parameters"]
    speedups = [run["speedup"] for run in runs]
    results: Dict[str, Any] = {"models": {}}
    for name in runs[0]["scores"]:
        row: Dict[str, Any] = {"accuracy": {}, "std": {}, "per_seed": {}}
        for task in [*TASKS, "mean"]:
            values = [run["scores"][name][task] for run in runs]
            row["accuracy"][task], row["std"][task] = common.mean_std(values)
            row["per_seed"][task] = values
        row["parameters"] = parameters["teachers" if name == "teachers" else "student"]
        row["speedup"] = 1.0 if name == "teachers" else statistics.median(speedups)
        results["models"][name] = row
    results["models"]["teachers"]["parameters_per_task"] = parameters["teacher_per_task"]
    results["size_ratio"] = parameters["teachers"] / parameters["student"]
    results["speedup"] = statistics.median(speedups)
    results["data"] = {"train_per_task": runs[0]["train_sizes"],
                       "test": args.validation or 450, "teacher_train": 1347 - args.validation,
                       "transfer": args.transfer}
    results["run"] = common.run_record(args, started)

    scored = common.scored_split(args.validation)
    print(f"\n{scored} accuracy, mean ± std over seeds {args.seeds} ({args.train_size} labelled "
          f"images per task for the students, {args.steps} steps each)")
    header = "".join(f"{task:>18}" for task in [*TASKS, "mean"])
    print(f"{'model':<19}{header}{'parameters':>12}{'speed-up':>10}")
    for name, row in results["models"].items():
        cells = "".join(common.pm(row["accuracy"][task], row["std"][task], 9)
                        for task in [*TASKS, "mean"])
        print(f"{name:<19}{cells}{row['parameters']:>12,d}{row['speedup']:>9.1f}x")
    gain = (results["models"]["distilled_student"]["accuracy"]["mean"]
            - results["models"]["student_alone"]["accuracy"]["mean"])
    print(f"one student, {results['size_ratio']:.1f}x smaller and {results['speedup']:.1f}x "
          f"faster than running the {len(TASKS)} teachers; distillation changed its mean "
          f"accuracy by {100 * gain:+.2f} points")
    path = common.write_results(args.output_dir, results)
    print(f"wrote {path} ({results['run']['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
