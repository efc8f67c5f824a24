"""Quantization-aware distillation on handwritten digits: an int8 student taught by a float
teacher.

scikit-learn's bundled digits (8x8 images, no download), a fixed stratified split per
seed: 1347 training images, of which the students see the first ``--train-size`` (default
300: a small-data regime, where a teacher's soft labels matter), and 450 test images.
Models:

* teacher: a float MLP 64 -> 256 -> 256 -> 10, trained on the labels of the whole
  training split (``BasicTrainer``): a teacher that knows more than the student's data;
* student: ``QuantMLP`` 64 -> 64 -> 10 with a ``QuantStub`` / ``DeQuantStub`` around it.

Runs, each ``--steps`` optimizer steps from the same initial student weights:

1. student alone: the float student trained on the labels (``BasicTrainer``);
2. QAT alone: the student prepared for quantization-aware training
   (``textbrewer.schemes.prepare_qat_student``: the CPU backend's default QAT qconfig,
   ``Linear + ReLU`` fused), trained on the labels only (``QATDistiller`` with
   ``kd_loss_weight=0``), then converted to int8 (``convert_to_int8``);
3. QAT distilled: the same, with KD from the float teacher (KL at ``--temperature``, default 1,
   plus the labels).

The observers freeze after 80% of the steps. It prints the test accuracy (int8 after
conversion for 2 and 3) and the size of each saved ``state_dict``, mean ± std over
``--seeds``, and writes ``{output_dir}/results.json``.

Run:
    python examples/qat.py                  # 3 seeds
    python examples/qat.py --quick          # seconds (the tests' run)
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub

import textbrewer
from textbrewer import BasicTrainer, DistillationConfig, TrainingConfig
from textbrewer.schemes import (QATDistiller, convert_to_int8, prepare_qat_student,
                                state_dict_bytes)


# ---------------------------------------------------------------------------------- data
def load_data(seed: int, train_size: Optional[int]) -> Dict[str, List[Dict[str, torch.Tensor]]]:
    """Examples ``{'image': (8, 8) float in [0, 1], 'labels': () long}``: ``teacher_train``
    (the whole training split, 1347), ``train`` (its first ``train_size``), ``test`` (450)."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
    examples = lambda xs, ys: [{"image": torch.from_numpy(x), "labels": torch.tensor(int(y))}
                               for x, y in zip(xs, ys)]
    teacher_train = examples(train_x, train_y)
    return {"teacher_train": teacher_train, "train": teacher_train[:train_size or None],
            "test": examples(test_x, test_y)}


def loader(examples, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- models
class Teacher(nn.Module):
    """A float MLP: ``image`` (B, 8, 8) -> ``{'logits': (B, 10)}``."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(width, width), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(width, 10))

    def forward(self, image: torch.Tensor, labels: Optional[torch.Tensor] = None):
        return {"logits": self.net(image)}


class QuantMLP(nn.Module):
    """A quantisable MLP: QuantStub -> fc1 -> relu1 -> fc2 -> DeQuantStub.

    ``image`` (B, 8, 8) -> ``{'logits': (B, 10)}``; flattening happens before the stub, so
    the quantised region holds only Linear and ReLU.
    """

    def __init__(self, width: int = 64):
        super().__init__()
        self.quant = QuantStub()
        self.fc1 = nn.Linear(64, width)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(width, 10)
        self.dequant = DeQuantStub()

    def forward(self, image: torch.Tensor, labels: Optional[torch.Tensor] = None):
        x = self.quant(image.flatten(1))
        return {"logits": self.dequant(self.fc2(self.relu1(self.fc1(x))))}


def adaptor(batch, outputs):
    return {"logits": outputs["logits"], "labels": batch["labels"],
            "losses": F.cross_entropy(outputs["logits"], batch["labels"])}


@torch.no_grad()
def accuracy(model: nn.Module, examples) -> float:
    was_training = model.training
    model.eval()
    images = torch.stack([e["image"] for e in examples])
    labels = torch.stack([e["labels"] for e in examples])
    score = (model(image=images)["logits"].argmax(-1) == labels).float().mean().item()
    model.train(was_training)
    return score


# ---------------------------------------------------------------------------------- runs
def run_seed(args: argparse.Namespace, seed: int) -> Dict[str, Any]:
    data = load_data(seed, args.train_size)

    def config(name: str) -> TrainingConfig:
        return TrainingConfig(device="cpu", output_dir=os.path.join(args.output_dir,
                                                                    f"seed{seed}", name),
                              seed=seed, log_steps=1000)

    def train(model, trainer, steps, split="train") -> None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        with trainer:
            trainer.train(optimizer, loader(data[split], args.batch_size, seed),
                          num_steps=steps)

    torch.manual_seed(seed)
    teacher = Teacher()
    train(teacher, BasicTrainer(config("teacher"), teacher, adaptor), args.teacher_steps,
          "teacher_train")
    torch.manual_seed(seed + 1)
    initial = QuantMLP()

    alone = copy.deepcopy(initial)
    train(alone, BasicTrainer(config("student_alone"), alone, adaptor), args.steps)

    students = {}
    for name, kd_weight in (("qat_student_alone", 0.0), ("qat_distilled", 1.0)):
        student = prepare_qat_student(initial, fuse=[["fc1", "relu1"]])
        distiller = QATDistiller(config(name), DistillationConfig(
            kd_loss_type="kl", temperature=args.temperature, kd_loss_weight=kd_weight,
            hard_label_weight=1.0), teacher, student, adaptor, adaptor,
            freeze_observers_at=0.8)
        train(student, distiller, args.steps)
        students[name] = student

    result = {"teacher": {"accuracy": accuracy(teacher, data["test"]),
                          "bytes": state_dict_bytes(teacher)},
              "student_alone": {"accuracy": accuracy(alone, data["test"]),
                                "bytes": state_dict_bytes(alone)}}
    for name, student in students.items():
        int8 = convert_to_int8(student)
        result[name] = {"accuracy": accuracy(int8, data["test"]),
                        "int8_accuracy": accuracy(int8, data["test"]),
                        "fake_quant_accuracy": accuracy(student, data["test"]),
                        "bytes": state_dict_bytes(int8),
                        "int8_bytes": state_dict_bytes(int8),
                        "fake_quant_bytes": state_dict_bytes(student)}
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="./output_qat")
    parser.add_argument("--quick", action="store_true", help="one seed, few steps (tests)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default 0 1 2 (0 with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of each student (default 600; 60 with --quick)")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="default 600 (150 with --quick)")
    parser.add_argument("--train-size", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="KD temperature (higher hurt here, see docs/schemes/qat.md)")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.steps = args.steps or (60 if args.quick else 600)
    args.teacher_steps = args.teacher_steps or (150 if args.quick else 600)
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    logging.getLogger("textbrewer").setLevel(logging.WARNING)  # the table, not the steps
    started = time.perf_counter()
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(args, seed))
        print(f"seed {seed}: " + ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in
                                           runs[-1].items()), flush=True)
    results: Dict[str, Any] = {"models": {}}
    for name in runs[0]:
        row: Dict[str, Any] = {}
        for key in runs[0][name]:
            values = [run[name][key] for run in runs]
            row[key] = statistics.fmean(values)
            if key.endswith("accuracy"):
                row[key.replace("accuracy", "std")] = (statistics.stdev(values)
                                                        if len(values) > 1 else 0.0)
                row[key.replace("accuracy", "per_seed")] = values
        row["bytes"] = int(row["bytes"])
        results["models"][name] = row
    results["backend"] = torch.backends.quantized.engine
    results["run"] = {k: v for k, v in vars(args).items() if k != "output_dir"}
    results["run"].update(textbrewer=textbrewer.__version__, torch=torch.__version__,
                          seconds=round(time.perf_counter() - started, 1))

    print(f"\ntest accuracy, mean ± std over seeds {args.seeds} ({args.train_size} training "
          f"images, {args.steps} steps per student; backend {results['backend']})")
    print(f"{'model':<20}{'precision':>11}{'accuracy':>20}{'state_dict bytes':>18}")
    for name, row in results["models"].items():
        precision = "int8" if name.startswith("qat") else "float32"
        print(f"{name:<20}{precision:>11}{row['accuracy']:>11.4f} ± {row['std']:.4f}"
              f"{row['bytes']:>18,d}")
    for name in ("qat_student_alone", "qat_distilled"):
        row = results["models"][name]
        print(f"{name}: fake-quantised before conversion {row['fake_quant_accuracy']:.4f}")
    ratio = results["models"]["student_alone"]["bytes"] / results["models"]["qat_distilled"]["bytes"]
    print(f"the int8 student's state_dict is {ratio:.1f}x smaller than the float student's")
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "results.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(f"wrote {path} ({results['run']['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
