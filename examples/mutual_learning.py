"""Deep mutual learning on handwritten digits: two small MLPs teach each other.

scikit-learn's bundled digits (1797 images of 8x8 pixels, no download), flattened to 64
features in [0, 1]. For each seed, on one fixed, seeded train/test split (1347 / 450):

1. ``student_alone``: an MLP 64 -> 32 -> 10 (dropout 0.2) trained on the labels alone
   (``BasicTrainer``), the baseline;
2. ``student0`` and ``student1``: two such MLPs (student0 from the baseline's very
   initial weights) trained together with ``MutualLearningDistiller``: each on its labels
   plus KL (temperature 1) to the other's predictions, each with its own Adam;

all for the same number of epochs and the same batches. No teacher is involved.

It prints the test accuracy of each model, for each seed and as mean ± std over the
seeds, and writes them to ``{output_dir}/results.json``.

Run:
    python examples/mutual_learning.py                 # 3 seeds, about 30 s on 2 CPU cores
    python examples/mutual_learning.py --quick         # 1 seed, a few epochs (the tests)
    python examples/mutual_learning.py --seeds 0 1 2 3 4 --epochs 40
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from typing import Any, Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import textbrewer
from textbrewer import BasicTrainer, DistillationConfig, TrainingConfig
from textbrewer.schemes import MutualLearningDistiller, peer_checkpoint_path
from textbrewer.utils import count_parameters, seed_everything


class MLP(nn.Module):
    """(B, 64) pixels -> {'logits': (B, 10)} (+ 'loss' with ``labels``)."""

    def __init__(self, hidden: int = 32, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 10))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def adaptor(batch, outputs):
    result = {"logits": outputs["logits"]}
    if "loss" in outputs:
        result["losses"] = [outputs["loss"]]
    return result


def load_data(seed: int):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(
        x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
    train = [{"x": torch.from_numpy(a), "labels": torch.tensor(b)}
             for a, b in zip(train_x, train_y)]
    test = (torch.from_numpy(test_x), torch.from_numpy(test_y))
    return train, test


@torch.no_grad()
def accuracy(model: nn.Module, test) -> float:
    was = model.training
    model.eval()
    correct = (model(test[0])["logits"].argmax(-1) == test[1]).float().mean().item()
    model.train(was)
    return correct


def loader(train, batch_size: int, seed: int):
    return torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def run_seed(seed: int, args) -> Dict[str, float]:
    seed_everything(seed)
    train, test = load_data(seed)
    torch.manual_seed(seed)
    init = MLP(args.hidden)
    alone, student0 = copy.deepcopy(init), copy.deepcopy(init)
    torch.manual_seed(seed + 1000)
    student1 = MLP(args.hidden)
    out = os.path.join(args.output_dir, f"seed{seed}")

    config = TrainingConfig(device="cpu", output_dir=os.path.join(out, "student_alone"),
                            seed=seed, log_steps=100,
                            ckpt_epoch_frequency=max(1, args.epochs // 3))
    trainer = BasicTrainer(config, alone, adaptor)
    with trainer:
        trainer.train(torch.optim.Adam(alone.parameters(), lr=args.lr),
                      loader(train, args.batch_size, seed), num_epochs=args.epochs)

    config = TrainingConfig(device="cpu", output_dir=os.path.join(out, "mutual"), seed=seed,
                            log_steps=100, ckpt_epoch_frequency=max(1, args.epochs // 3))
    distiller = MutualLearningDistiller(
        config, DistillationConfig(kd_loss_type="kl", temperature=1.0, kd_loss_weight=1.0,
                                   hard_label_weight=1.0),
        [student0, student1], adaptor_S=adaptor)
    with distiller:
        # student1 gets an Adam of its own with the same settings
        distiller.train(torch.optim.Adam(student0.parameters(), lr=args.lr),
                        loader(train, args.batch_size, seed), num_epochs=args.epochs)
    final_step = args.epochs * len(loader(train, args.batch_size, seed))
    assert os.path.isfile(peer_checkpoint_path(os.path.join(out, "mutual"), final_step, 1))
    return {"student_alone": accuracy(alone, test), "student0": accuracy(student0, test),
            "student1": accuracy(student1, test)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="./output_mutual_learning")
    parser.add_argument("--quick", action="store_true", help="one seed, 3 epochs (seconds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default 0 1 2 (0 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="default 30 (3 with --quick)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    args.epochs = args.epochs if args.epochs is not None else (3 if args.quick else 30)
    return args


def summarise(per_seed: List[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    models = {}
    for name in per_seed[0]:
        values = [row[name] for row in per_seed]
        models[name] = {"accuracy": statistics.mean(values),
                        "std": statistics.pstdev(values), "per_seed": values}
    return models


def print_table(models, seeds) -> None:
    print(f"\n{'model':<16}{'test accuracy (mean ± std over seeds ' + str(seeds) + ')':>48}")
    for name, row in models.items():
        print(f"{name:<16}{row['accuracy']:>38.4f} ± {row['std']:.4f}")


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)  # tiny models: one thread is fastest (and avoids oversubscription)
    per_seed = []
    for seed in args.seeds:
        row = run_seed(seed, args)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
        per_seed.append(row)
    models = summarise(per_seed)
    for row in models.values():
        row["parameters"] = count_parameters(MLP(args.hidden))
    print_table(models, args.seeds)
    results = {"models": models, "scheme": "mutual",
               "run": {"seeds": args.seeds, "epochs": args.epochs, "lr": args.lr,
                       "hidden": args.hidden, "batch_size": args.batch_size,
                       "quick": args.quick, "textbrewer": textbrewer.__version__,
                       "seconds": round(time.perf_counter() - started, 1)}}
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "results.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(f"{results['run']['seconds']:.0f} s; wrote {path}")
    return results


if __name__ == "__main__":
    main()
