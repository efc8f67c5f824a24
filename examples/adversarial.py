"""Adversarial distillation on handwritten digits: a discriminator tells the teacher's
predictions from the student's, and the student learns to fool it on top of KD.

scikit-learn's bundled digits (1797 images of 8x8 pixels, no download), flattened to 64
features in [0, 1]. For each seed, on one fixed, seeded train/test split (1347 / 450):

1. ``teacher``: an MLP 64 -> 256 -> 256 -> 10, trained on the labels (``BasicTrainer``);
2. ``student_alone``: an MLP 64 -> 16 -> 10 trained on the labels alone, the baseline;
3. ``kd_student``: the same student (same initial weights) with ``GeneralDistiller``: KD
   (``kd_loss_type='kl'``, temperature 4) + hard labels: the ablation without the
   discriminator;
4. ``adversarial_student``: the same with ``AdversarialDistiller``: those terms plus
   ``0.1 · BCE(D(softmax(s)), 1)``, D an :class:`~textbrewer.schemes.MLPDiscriminator`
   (10 -> 64 -> 1) trained in its own phase to tell ``softmax(t)`` from ``softmax(s)``;

the students for the same number of epochs on the same batches.

It prints the test accuracy of each model, per seed and as mean ± std over the seeds,
and writes them to ``{output_dir}/results.json``.

Run:
    python examples/adversarial.py                  # 3 seeds
    python examples/adversarial.py --quick          # 1 seed, a few epochs (the tests)
    python examples/adversarial.py --seeds 0 1 2 3 4 --epochs 40
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
from textbrewer import BasicTrainer, DistillationConfig, GeneralDistiller, TrainingConfig
from textbrewer.schemes import AdversarialDistiller
from textbrewer.utils import count_parameters, seed_everything


class MLP(nn.Module):
    """(B, 64) pixels -> {'logits': (B, 10)} (+ 'loss' with ``labels``)."""

    def __init__(self, hidden: List[int], dropout: float = 0.1):
        super().__init__()
        layers, width = [], 64
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)

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
    return train, (torch.from_numpy(test_x), torch.from_numpy(test_y))


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


def config(out: str, name: str, seed: int, epochs: int) -> TrainingConfig:
    return TrainingConfig(device="cpu", output_dir=os.path.join(out, name), seed=seed,
                          log_steps=100, ckpt_epoch_frequency=max(1, epochs // 3))


def run_seed(seed: int, args) -> Dict[str, float]:
    seed_everything(seed)
    train, test = load_data(seed)
    out = os.path.join(args.output_dir, f"seed{seed}")
    torch.manual_seed(seed)
    teacher = MLP([256, 256])
    trainer = BasicTrainer(config(out, "teacher", seed, args.teacher_epochs), teacher, adaptor)
    with trainer:
        trainer.train(torch.optim.Adam(teacher.parameters(), lr=1e-3),
                      loader(train, args.batch_size, seed), num_epochs=args.teacher_epochs)
    teacher.eval()

    torch.manual_seed(seed + 1)
    init = MLP([args.hidden])
    alone, kd, adversarial = (copy.deepcopy(init) for _ in range(3))
    trainer = BasicTrainer(config(out, "student_alone", seed, args.epochs), alone, adaptor)
    with trainer:
        trainer.train(torch.optim.Adam(alone.parameters(), lr=args.lr),
                      loader(train, args.batch_size, seed), num_epochs=args.epochs)

    distill_config = DistillationConfig(kd_loss_type="kl", temperature=args.temperature,
                                        kd_loss_weight=1.0, hard_label_weight=1.0)
    distiller = GeneralDistiller(config(out, "kd_student", seed, args.epochs), distill_config,
                                 teacher, kd, adaptor, adaptor)
    with distiller:
        distiller.train(torch.optim.Adam(kd.parameters(), lr=args.lr),
                        loader(train, args.batch_size, seed), num_epochs=args.epochs)

    torch.manual_seed(seed + 2)
    distiller = AdversarialDistiller(
        config(out, "adversarial_student", seed, args.epochs), distill_config, teacher,
        adversarial, adaptor, adaptor, adversarial_weight=args.adversarial_weight,
        feature="logits", temperature=1.0, input_dim=10, hidden_size=64,
        discriminator_lr=args.discriminator_lr)
    with distiller:
        distiller.train(torch.optim.Adam(adversarial.parameters(), lr=args.lr),
                        loader(train, args.batch_size, seed), num_epochs=args.epochs)
    return {"teacher": accuracy(teacher, test), "student_alone": accuracy(alone, test),
            "kd_student": accuracy(kd, test),
            "adversarial_student": accuracy(adversarial, test)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="./output_adversarial")
    parser.add_argument("--quick", action="store_true", help="one seed, a few epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default 0 1 2 (0 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="default 20 (2 with --quick)")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help="default 20 (3 with --quick)")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--adversarial-weight", type=float, default=0.1)
    parser.add_argument("--discriminator-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    args.epochs = args.epochs if args.epochs is not None else (2 if args.quick else 20)
    if args.teacher_epochs is None:
        args.teacher_epochs = 3 if args.quick else 20
    return args


def summarise(per_seed: List[Dict[str, float]]) -> Dict[str, Dict[str, Any]]:
    models = {}
    for name in per_seed[0]:
        values = [row[name] for row in per_seed]
        models[name] = {"accuracy": statistics.mean(values),
                        "std": statistics.pstdev(values), "per_seed": values}
    return models


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
    models["teacher"]["parameters"] = count_parameters(MLP([256, 256]))
    for name in ("student_alone", "kd_student", "adversarial_student"):
        models[name]["parameters"] = count_parameters(MLP([args.hidden]))
    print(f"\n{'model':<22}test accuracy, mean ± std over seeds {args.seeds}")
    for name, row in models.items():
        print(f"{name:<22}{row['accuracy']:.4f} ± {row['std']:.4f}")
    results = {"models": models, "scheme": "adversarial",
               "run": {"seeds": args.seeds, "epochs": args.epochs,
                       "teacher_epochs": args.teacher_epochs, "lr": args.lr,
                       "temperature": args.temperature, "hidden": args.hidden,
                       "adversarial_weight": args.adversarial_weight,
                       "discriminator_lr": args.discriminator_lr,
                       "batch_size": args.batch_size, "quick": args.quick,
                       "textbrewer": textbrewer.__version__,
                       "seconds": round(time.perf_counter() - started, 1)}}
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "results.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(f"{results['run']['seconds']:.0f} s; wrote {path}")
    return results


if __name__ == "__main__":
    main()
