"""Cross-modal distillation on handwritten digits: the teacher sees the image, the student
only its row and column profiles.

scikit-learn's bundled digits (8x8 images, no download), a fixed stratified split per
seed: 1347 training images, of which the students see the first ``--train-size`` (default
300), and 450 test images.

* teacher: an MLP on the full 8x8 image (64 pixels), trained on the whole training split;
* student: an MLP on a different modality, the 8 row means and 8 column means of the
  image (``textbrewer.schemes.row_column_profiles``: 16 numbers, a "projection" sensor).

Each batch is ``{'teacher': {'image', 'labels'}, 'student': {'profiles', 'labels'}}``,
built by ``textbrewer.schemes.TwoViewCollate`` in the DataLoader, and the unchanged
``BasicDistiller`` feeds each model its own view. Runs, each ``--steps`` optimizer steps
from the same initial student weights:

1. student alone: the profile MLP on the labels (``BasicTrainer``);
2. cross-modal distilled: the same, with KD from the image teacher (KL at temperature 4
   plus the labels).

It prints the test accuracy, mean ± std over ``--seeds``, and writes
``{output_dir}/results.json``.

Run:
    python examples/cross_modal.py                # 3 seeds
    python examples/cross_modal.py --quick        # seconds (the tests' run)
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

import textbrewer
from textbrewer import BasicDistiller, BasicTrainer, DistillationConfig, TrainingConfig
from textbrewer.schemes import TwoViewCollate, row_column_profiles


# ---------------------------------------------------------------------------------- data
def load_data(seed: int, train_size: Optional[int]) -> Dict[str, List[Dict[str, torch.Tensor]]]:
    """Examples ``{'image': (8, 8) float in [0, 1], 'labels': () long}``: ``teacher_train``
    (the whole training split), ``train`` (its first ``train_size``), ``test``."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
    examples = lambda xs, ys: [{"image": torch.from_numpy(x), "labels": torch.tensor(int(y))}
                               for x, y in zip(xs, ys)]
    teacher_train = examples(train_x, train_y)
    return {"teacher_train": teacher_train, "train": teacher_train[:train_size or None],
            "test": examples(test_x, test_y)}


def image_view(example):
    return {"image": example["image"], "labels": example["labels"]}


def profile_view(example):
    return {"profiles": row_column_profiles(example["image"]), "labels": example["labels"]}


def loader(examples, batch_size: int, seed: int, collate=None) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed),
                                       collate_fn=collate)


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


def adaptor(batch, outputs):
    return {"logits": outputs["logits"], "labels": batch["labels"],
            "losses": F.cross_entropy(outputs["logits"], batch["labels"])}


@torch.no_grad()
def accuracy(model: nn.Module, examples, view) -> float:
    was_training = model.training
    model.eval()
    batch = torch.utils.data.default_collate([view(e) for e in examples])
    score = (model(**batch)["logits"].argmax(-1) == batch["labels"]).float().mean().item()
    model.train(was_training)
    return score


# ---------------------------------------------------------------------------------- runs
def run_seed(args: argparse.Namespace, seed: int) -> Dict[str, float]:
    data = load_data(seed, args.train_size)

    def config(name: str) -> TrainingConfig:
        return TrainingConfig(device="cpu", output_dir=os.path.join(args.output_dir,
                                                                    f"seed{seed}", name),
                              seed=seed, log_steps=1000)

    def train(model, trainer, steps, dataloader) -> None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        with trainer:
            trainer.train(optimizer, dataloader, num_steps=steps)

    torch.manual_seed(seed)
    teacher = MLP(64, 256, "image", dropout=0.1)
    train(teacher, BasicTrainer(config("teacher"), teacher, adaptor), args.teacher_steps,
          loader([image_view(e) for e in data["teacher_train"]], args.batch_size, seed))
    torch.manual_seed(seed + 1)
    initial = MLP(16, 128, "profiles")

    alone = copy.deepcopy(initial)
    train(alone, BasicTrainer(config("student_alone"), alone, adaptor), args.steps,
          loader([profile_view(e) for e in data["train"]], args.batch_size, seed))

    distilled = copy.deepcopy(initial)
    two_views = TwoViewCollate(teacher_view=image_view, student_view=profile_view)
    distiller = BasicDistiller(config("cross_modal_distilled"), DistillationConfig(
        kd_loss_type="kl", temperature=args.temperature, kd_loss_weight=1.0,
        hard_label_weight=1.0), teacher, distilled, adaptor, adaptor)
    train(distilled, distiller, args.steps,
          loader(data["train"], args.batch_size, seed, collate=two_views))
    return {"teacher": accuracy(teacher, data["test"], image_view),
            "student_alone": accuracy(alone, data["test"], profile_view),
            "cross_modal_distilled": accuracy(distilled, data["test"], profile_view)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="./output_cross_modal")
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
    parser.add_argument("--temperature", type=float, default=4.0)
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
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in runs[-1].items()),
              flush=True)
    results: Dict[str, Any] = {"models": {}}
    for name in runs[0]:
        values = [run[name] for run in runs]
        results["models"][name] = {"accuracy": statistics.fmean(values),
                                   "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                   "per_seed": values,
                                   "inputs": "image (64)" if name == "teacher"
                                   else "row/column profiles (16)"}
    results["run"] = {k: v for k, v in vars(args).items() if k != "output_dir"}
    results["run"].update(textbrewer=textbrewer.__version__,
                          seconds=round(time.perf_counter() - started, 1))
    print(f"\ntest accuracy, mean ± std over seeds {args.seeds} ({args.train_size} training "
          f"images for the students, {args.steps} steps each)")
    print(f"{'model':<24}{'inputs':>26}{'accuracy':>20}")
    for name, row in results["models"].items():
        print(f"{name:<24}{row['inputs']:>26}{row['accuracy']:>11.4f} ± {row['std']:.4f}")
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "results.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(f"wrote {path} ({results['run']['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
