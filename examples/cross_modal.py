"""Cross-modal distillation on handwritten digits: the teacher sees the image, the student
only its row and column profiles.

scikit-learn's bundled digits (8x8 images, no download), a fixed stratified split per
seed: 1347 training images and 450 test images. The teacher learns from every training
image and its label; the students get the labels of the first ``--train-size`` (default
300) only. The distilled student also sees the other training images, without their
labels: paired data, the image for the teacher and its profiles for the student, the
"supervision transfer" of Gupta et al. (the teacher's predictions are the only signal on
those rows).

* teacher: an MLP on the full 8x8 image (64 pixels), trained on the whole training split;
* student: an MLP on a different modality, the 8 row means and 8 column means of the
  image (``textbrewer.schemes.row_column_profiles``: 16 numbers, a "projection" sensor).

Each batch is ``{'teacher': {'image', 'labels'}, 'student': {'profiles', 'labels'}}``,
built by ``textbrewer.schemes.TwoViewCollate`` in the DataLoader, and the unchanged
``BasicDistiller`` feeds each model its own view. Runs, each ``--steps`` optimizer steps
from the same initial student weights:

1. student alone: the profile MLP on the labelled images (``BasicTrainer``), at
   ``--alone-lr``;
2. cross-modal distilled: the same, with KD from the image teacher (τ²-scaled KL at
   ``--temperature`` plus the labels' cross-entropy on the labelled rows) on all training
   images, at ``--lr``. ``--no-transfer`` distils on the labelled images only.

The learning rates and the temperature are those chosen on held-out training images
(``--validation 270``; the table in docs/schemes/cross_modal.md).

It prints the test accuracy, mean ± std over ``--seeds``, and writes
``{output_dir}/results.json``.

Run:
    python examples/cross_modal.py                # 5 seeds
    python examples/cross_modal.py --quick        # seconds (the tests' run)
    python examples/cross_modal.py --validation 270 --lr 1e-2   # tuning: no test image
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any, Dict, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)

from textbrewer import BasicDistiller, BasicTrainer, DistillationConfig  # noqa: E402
from textbrewer.schemes import TwoViewCollate, row_column_profiles  # noqa: E402


# ---------------------------------------------------------------------------------- data
def image_view(example):
    return {"image": example["image"], "labels": example["labels"]}


def profile_view(example):
    return {"profiles": row_column_profiles(example["image"]), "labels": example["labels"]}


# ---------------------------------------------------------------------------------- models
class MLP(nn.Module):
    """``inputs`` (B, ...) flattened to (B, in_features) -> ``{'logits': (B, 10)}``."""

    def __init__(self, in_features: int, width: int, key: str, dropout: float = 0.0):
        super().__init__()
        self.key = key
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(width, 10))

    def forward(self, labels: Optional[torch.Tensor] = None, **inputs: torch.Tensor):
        return {"logits": self.net(inputs[self.key].flatten(1))}


# ---------------------------------------------------------------------------------- runs
def run_seed(args: argparse.Namespace, seed: int) -> Dict[str, float]:
    """Examples ``{'image': (8, 8), 'labels': ()}``, seen by each model through its view:
    the teacher on the whole training split, the student alone on its first
    ``--train-size``, the distilled student on all of it (the rest without labels)."""
    data = common.transfer_split(seed, args.train_size, args.validation, args.transfer)
    images = data["test"]
    profiles = {"profiles": row_column_profiles(images["image"]), "labels": images["labels"]}
    runs = common.SeedRuns(args, seed, log_steps=1000)

    torch.manual_seed(seed)
    teacher = MLP(64, 256, "image", dropout=0.1)
    runs.train_steps(BasicTrainer(runs.config("teacher"), teacher, common.labels_adaptor),
                     teacher, runs.loader([image_view(e) for e in data["teacher_train"]]),
                     args.teacher_steps, lr=args.teacher_lr)
    torch.manual_seed(seed + 1)
    initial = MLP(16, 128, "profiles")

    alone = copy.deepcopy(initial)
    runs.train_steps(BasicTrainer(runs.config("student_alone"), alone, common.labels_adaptor),
                     alone, runs.loader([profile_view(e) for e in data["labelled"]]),
                     args.steps, lr=args.alone_lr)

    distilled = copy.deepcopy(initial)
    two_views = TwoViewCollate(teacher_view=image_view, student_view=profile_view)
    distiller = BasicDistiller(runs.config("cross_modal_distilled"), DistillationConfig(
        kd_loss_type="kl", temperature=args.temperature, kd_loss_weight=1.0,
        hard_label_weight=1.0), teacher, distilled, common.logits_adaptor,
        common.masked_adaptor)
    runs.train_steps(distiller, distilled, runs.loader(data["transfer"], collate_fn=two_views),
                     args.steps)
    return {"teacher": common.accuracy(teacher, images, "image"),
            "student_alone": common.accuracy(alone, profiles, "profiles"),
            "cross_modal_distilled": common.accuracy(distilled, profiles, "profiles")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.ExampleParser(__doc__, "./output_cross_modal",
                                  quick_help="one seed, few steps (tests)")
    parser.add_seeds(full=(0, 1, 2, 3, 4))
    parser.add_quick_argument("--steps", 60, 600, "optimizer steps of each student")
    parser.add_quick_argument("--teacher-steps", 150, 600, "optimizer steps of the teacher")
    parser.add_transfer_options()
    parser.add_training_options(lr=1e-2, temperature=4.0,
                                lr_help="learning rate of the distilled student")
    parser.add_argument("--alone-lr", type=float, default=3e-3,
                        help="learning rate of the student alone")
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    common.at_least_one(parser, args, "train_size")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(threads=1, quiet=True)  # the table, not the steps
    results: Dict[str, Any] = {"models": common.summarise(common.run_seeds(args, run_seed))}
    for name, row in results["models"].items():
        row["inputs"] = "image (64)" if name == "teacher" else "row/column profiles (16)"
    results["run"] = common.run_record(args, started)
    scored = common.scored_split(args.validation)
    print(f"\n{scored} accuracy, mean ± std over seeds {args.seeds} ({args.train_size} "
          f"labelled training images for the students, {args.steps} steps each)")
    print(f"{'model':<24}{'inputs':>26}{'accuracy':>20}")
    for name, row in results["models"].items():
        print(f"{name:<24}{row['inputs']:>26}{common.pm(row['accuracy'], row['std'], 11)}")
    path = common.write_results(args.output_dir, results)
    print(f"wrote {path} ({results['run']['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
