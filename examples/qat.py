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
3. QAT distilled: the same, with KD from the float teacher (τ²-scaled KL at
   ``--temperature``, default 2) on all 1347 training images, the hard labels on the
   labelled ``--train-size`` only (the other images are unlabelled transfer data, label
   -100, masked out of the cross-entropy).

The students alone run ``--alone-steps`` at ``--alone-lr``, the distilled one ``--steps``
at ``--lr``: each tuned on a validation split held out of the training images
(``--validation 247``), the same grid of learning rates and steps for both
(docs/schemes/qat.md).

The observers freeze after 80% of the steps. It prints the test accuracy (int8 after
conversion for 2 and 3) and the size of each saved ``state_dict``, mean ± std over
``--seeds``, and writes ``{output_dir}/results.json``.

Run:
    python examples/qat.py                  # 5 seeds
    python examples/qat.py --quick          # seconds (the tests' run)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)

from textbrewer import BasicTrainer, DistillationConfig  # noqa: E402
from textbrewer.schemes import (QATDistiller, convert_to_int8, prepare_qat_student,  # noqa: E402
                                state_dict_bytes)


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


# ---------------------------------------------------------------------------------- runs
def run_seed(args: argparse.Namespace, seed: int, only: Any = None) -> Dict[str, Any]:
    """Examples ``{'image': (8, 8), 'labels': ()}``: the teacher learns from the whole
    training split (1347), the students from the labels of its first ``--train-size`` (and
    the distilled student from the teacher on all of it); all are scored on the 450 test
    images (or the ``--validation`` images). ``only``: the students to train (tuning)."""
    data = common.transfer_split(seed, args.train_size, args.validation, args.transfer)
    test = data["test"]
    runs = common.SeedRuns(args, seed, log_steps=1000)

    torch.manual_seed(seed)
    teacher = Teacher()
    runs.train_steps(BasicTrainer(runs.config("teacher"), teacher, common.labels_adaptor),
                     teacher, runs.loader(data["teacher_train"]), args.teacher_steps,
                     lr=args.teacher_lr)
    torch.manual_seed(seed + 1)
    initial = QuantMLP()
    result = {"teacher": {"accuracy": common.accuracy(teacher, test),
                          "bytes": state_dict_bytes(teacher)}}

    if only is None or "student_alone" in only:
        alone = copy.deepcopy(initial)
        runs.train_steps(BasicTrainer(runs.config("student_alone"), alone,
                                      common.masked_adaptor),
                         alone, runs.loader(data["labelled"]), args.alone_steps,
                         lr=args.alone_lr)
        result["student_alone"] = {"accuracy": common.accuracy(alone, test),
                                   "bytes": state_dict_bytes(alone)}

    for name, kd_weight, loader, lr, steps in (
            ("qat_student_alone", 0.0, "labelled", args.alone_lr, args.alone_steps),
            ("qat_distilled", args.kd_weight, "transfer", args.lr, args.steps)):
        if only is not None and name not in only:
            continue
        student = prepare_qat_student(initial, fuse=[["fc1", "relu1"]])
        distiller = QATDistiller(runs.config(name), DistillationConfig(
            kd_loss_type="kl", temperature=args.temperature, kd_loss_weight=kd_weight,
            hard_label_weight=1.0), teacher, student, common.logits_adaptor, common.masked_adaptor,
            freeze_observers_at=0.8)
        runs.train_steps(distiller, student, runs.loader(data[loader]), steps, lr=lr)
        int8 = convert_to_int8(student)
        result[name] = {"accuracy": common.accuracy(int8, test),
                        "int8_accuracy": common.accuracy(int8, test),
                        "fake_quant_accuracy": common.accuracy(student, test),
                        "bytes": state_dict_bytes(int8),
                        "int8_bytes": state_dict_bytes(int8),
                        "fake_quant_bytes": state_dict_bytes(student)}
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.ExampleParser(__doc__, "./output_qat",
                                  quick_help="one seed, few steps (tests)")
    parser.add_seeds(full=(0, 1, 2, 3, 4))
    parser.add_quick_argument("--steps", 60, 3000, "optimizer steps of the distilled student")
    parser.add_quick_argument("--alone-steps", 60, 6000,
                              "optimizer steps of the students trained on the labels alone")
    parser.add_quick_argument("--teacher-steps", 150, 600, "optimizer steps of the teacher")
    parser.add_transfer_options()
    parser.add_training_options(lr=1e-2, lr_help="learning rate of the distilled student")
    parser.add_argument("--alone-lr", type=float, default=1e-3,
                        help="learning rate of the students trained on the labels alone")
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=2.0,
                        help="KD temperature (τ²-scaled KL)")
    parser.add_argument("--kd-weight", type=float, default=1.0)
    args = parser.parse_args(argv)
    common.at_least_one(parser, args, "train_size")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(threads=1, quiet=True)  # the table, not the steps
    runs = common.run_seeds(args, run_seed, lambda row: ", ".join(
        f"{k} {v['accuracy']:.4f}" for k, v in row.items()))
    results: Dict[str, Any] = {"models": {}}
    for name in runs[0]:
        row: Dict[str, Any] = {}
        for key in runs[0][name]:
            values = [run[name][key] for run in runs]
            row[key], std = common.mean_std(values)
            if key.endswith("accuracy"):
                row[key.replace("accuracy", "std")] = std
                row[key.replace("accuracy", "per_seed")] = values
        row["bytes"] = int(row["bytes"])
        results["models"][name] = row
    results["backend"] = torch.backends.quantized.engine
    results["run"] = common.run_record(args, started, torch=torch.__version__)

    print(f"\ntest accuracy, mean ± std over seeds {args.seeds} ({args.train_size} training "
          f"labelled images; {args.alone_steps} steps alone, {args.steps} distilled; "
          f"backend {results['backend']})")
    print(f"{'model':<20}{'precision':>11}{'accuracy':>20}{'state_dict bytes':>18}")
    for name, row in results["models"].items():
        precision = "int8" if name.startswith("qat") else "float32"
        print(f"{name:<20}{precision:>11}{common.pm(row['accuracy'], row['std'], 11)}"
              f"{row['bytes']:>18,d}")
    for name in ("qat_student_alone", "qat_distilled"):
        row = results["models"][name]
        print(f"{name}: fake-quantised before conversion {row['fake_quant_accuracy']:.4f}")
    per_seed = {name: row["per_seed"] for name, row in results["models"].items()}
    btw = common.better_tied_worse(per_seed["qat_distilled"], per_seed["qat_student_alone"])
    results["better_tied_worse"] = {"qat_distilled vs qat_student_alone": btw}
    print(f"qat_distilled vs qat_student_alone: better/tied/worse on {btw[0]}/{btw[1]}/"
          f"{btw[2]} seeds")
    ratio = (results["models"]["student_alone"]["bytes"]
             / results["models"]["qat_distilled"]["bytes"])
    print(f"the int8 student's state_dict is {ratio:.1f}x smaller than the float student's")
    path = common.write_results(args.output_dir, results)
    print(f"wrote {path} ({results['run']['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
