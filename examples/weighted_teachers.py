"""Several teachers, weighted: fixed weights and per-sample confidence, on handwritten digits.

scikit-learn's bundled digits (8x8 images, no download), a fixed stratified split per
seed: 1347 training images, of which the students see the first ``--train-size`` (default
300), and 450 test images. Three teachers of unequal quality, each an MLP trained on the
whole training split, each looking at part of the image:

* ``full``: all 64 pixels;  ``top``: the top 4 rows only;  ``left``: the left 4 columns only.

The student (an MLP 64 -> 32 -> 10 on the full image) is trained ``--steps`` optimizer
steps from the same initial weights in each run:

1. student alone, on the labels (``BasicTrainer``);
2. ``average``: ``MultiTeacherDistiller``, the plain average of the teachers' logits;
3. ``fixed``: ``WeightedMultiTeacherDistiller(weighting='fixed', weights=[2, 1, 1])``;
4. ``entropy``: per-sample weights ∝ exp(−entropy / tau) of each teacher's prediction;
5. ``gold``: per-sample weights ∝ (the teacher's probability of the gold class)^(1/tau).

KD is KL at temperature 4 plus the labels. It prints the test accuracy, mean ± std over
``--seeds``, and writes ``{output_dir}/results.json``.

Run:
    python examples/weighted_teachers.py            # 3 seeds
    python examples/weighted_teachers.py --quick    # seconds (the tests' run)
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import textbrewer
from textbrewer import (BasicTrainer, DistillationConfig, MultiTeacherDistiller,
                        TrainingConfig)
from textbrewer.schemes import WeightedMultiTeacherDistiller


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


def loader(examples, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- models
VIEWS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "full": lambda image: image,
    "top": lambda image: image[:, :4, :],
    "left": lambda image: image[:, :, :4],
}


class MLP(nn.Module):
    """``image`` (B, 8, 8) -> the ``view`` of it, flattened -> ``{'logits': (B, 10)}``."""

    def __init__(self, view: str, width: int, dropout: float = 0.0):
        super().__init__()
        self.view = view
        pixels = VIEWS[view](torch.zeros(1, 8, 8)).numel()
        self.net = nn.Sequential(nn.Linear(pixels, width), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(width, 10))

    def forward(self, image: torch.Tensor, labels: Optional[torch.Tensor] = None):
        return {"logits": self.net(VIEWS[self.view](image).flatten(1))}


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
SCHEMES = {"average": None,
           "fixed": dict(weighting="fixed", weights=[2.0, 1.0, 1.0]),
           "entropy": dict(weighting="entropy"),
           "gold": dict(weighting="gold")}


def run_seed(args: argparse.Namespace, seed: int) -> Dict[str, float]:
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

    teachers = []
    for index, view in enumerate(VIEWS):
        torch.manual_seed(seed + 10 * index)
        teacher = MLP(view, 128, dropout=0.1)
        train(teacher, BasicTrainer(config(f"teacher_{view}"), teacher, adaptor),
              args.teacher_steps, "teacher_train")
        teachers.append(teacher)
    torch.manual_seed(seed + 1)
    initial = MLP("full", 32)
    result = {f"teacher_{view}": accuracy(t, data["test"]) for view, t in zip(VIEWS, teachers)}

    alone = copy.deepcopy(initial)
    train(alone, BasicTrainer(config("student_alone"), alone, adaptor), args.steps)
    result["student_alone"] = accuracy(alone, data["test"])
    distill_config = DistillationConfig(kd_loss_type="kl", temperature=args.temperature,
                                        kd_loss_weight=1.0, hard_label_weight=1.0)
    for name, options in SCHEMES.items():
        student = copy.deepcopy(initial)
        if options is None:
            distiller = MultiTeacherDistiller(config(name), distill_config, teachers, student,
                                              adaptor, adaptor)
        else:
            distiller = WeightedMultiTeacherDistiller(config(name), distill_config, teachers,
                                                      student, adaptor, adaptor,
                                                      tau=args.tau, **options)
        train(student, distiller, args.steps)
        result[name] = accuracy(student, data["test"])
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="./output_weighted_teachers")
    parser.add_argument("--quick", action="store_true", help="one seed, few steps (tests)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default 0 1 2 (0 with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of each student (default 600; 60 with --quick)")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="default 600 (100 with --quick)")
    parser.add_argument("--train-size", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--tau", type=float, default=1.0, help="confidence temperature")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.steps = args.steps or (60 if args.quick else 600)
    args.teacher_steps = args.teacher_steps or (100 if args.quick else 600)
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
                                   "per_seed": values}
    results["run"] = {k: v for k, v in vars(args).items() if k != "output_dir"}
    results["run"].update(textbrewer=textbrewer.__version__,
                          seconds=round(time.perf_counter() - started, 1))
    print(f"\ntest accuracy, mean ± std over seeds {args.seeds} ({args.train_size} training "
          f"images for the students, {args.steps} steps each)")
    print(f"{'model':<20}{'accuracy':>20}")
    for name, row in results["models"].items():
        print(f"{name:<20}{row['accuracy']:>11.4f} ± {row['std']:.4f}")
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "results.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(f"wrote {path} ({results['run']['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
