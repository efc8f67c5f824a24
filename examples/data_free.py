"""Data-free distillation on handwritten digits: the student never sees a real image.

scikit-learn's bundled digits (1797 images of 8x8 pixels, no download), flattened to 64
features in [0, 1]. For each seed, on one fixed, seeded train/test split (1347 / 450):

1. ``teacher``: an MLP 64 -> 256 -> 256 -> 10 with batch norm, trained on the real
   training images (the only model that sees them);
2. ``student_alone``: an MLP 64 -> 32 -> 10 trained on the real labelled images for
   ``--steps`` steps: the reference a data-free student would like to reach (it *has*
   the data);
3. ``noise_kd_student``: the student distilled (KD, ``kd_loss_type='kl'``, T = 4) on
   uniform noise images for ``--steps`` steps: the naive data-free baseline;
4. ``dfad_student``: :class:`~textbrewer.schemes.DFADDistiller`: a generator (noise 32 ->
   64 pixels, an MLP with batch norm) maximises the L1 distance of the teacher's and the
   student's logits on its images, the student minimises it, one phase each per step,
   ``--steps`` steps;
5. ``deepinversion_student``: :func:`~textbrewer.schemes.synthesize_deep_inversion`
   optimises ``--di-batches`` batches of 64 images from noise (batch-norm statistics +
   class CE + TV + L2) against the teacher; the student is then distilled (KD as in 3)
   on them for ``--steps`` steps.

All students start from the same initial weights and take the same number of optimizer
steps of batches of 64. Test accuracy is on the real test images.

Run:
    python examples/data_free.py                    # 3 seeds
    python examples/data_free.py --quick            # 1 seed, small (the tests)
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
from textbrewer import BasicDistiller, BasicTrainer, DistillationConfig, TrainingConfig
from textbrewer.schemes import (DFADDistiller, MLPGenerator, NoiseBatches,
                                synthesize_deep_inversion)
from textbrewer.utils import count_parameters, seed_everything


class MLP(nn.Module):
    """(B, 64) pixels -> {'logits': (B, 10)} (+ 'loss' with ``labels``)."""

    def __init__(self, hidden: List[int], batch_norm: bool = False):
        super().__init__()
        layers, width = [], 64
        for size in hidden:
            layers += [nn.Linear(width, size)]
            layers += [nn.BatchNorm1d(size)] if batch_norm else []
            layers += [nn.ReLU()]
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


def config(out: str, name: str, seed: int) -> TrainingConfig:
    return TrainingConfig(device="cpu", output_dir=os.path.join(out, name), seed=seed,
                          log_steps=200)


def run_seed(seed: int, args) -> Dict[str, float]:
    seed_everything(seed)
    train, test = load_data(seed)
    out = os.path.join(args.output_dir, f"seed{seed}")
    batch = 64
    real = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    teacher = MLP([256, 256], batch_norm=True)
    trainer = BasicTrainer(config(out, "teacher", seed), teacher, adaptor)
    with trainer:
        trainer.train(torch.optim.Adam(teacher.parameters(), lr=1e-3), real,
                      num_steps=args.teacher_steps)
    teacher.eval()

    torch.manual_seed(seed + 1)
    init = MLP([args.hidden])
    alone, noise_kd, dfad, inverted = (copy.deepcopy(init) for _ in range(4))
    trainer = BasicTrainer(config(out, "student_alone", seed), alone, adaptor)
    with trainer:
        trainer.train(torch.optim.Adam(alone.parameters(), lr=args.lr), real,
                      num_steps=args.steps)

    kd_config = DistillationConfig(kd_loss_type="kl", temperature=4.0, hard_label_weight=0)
    # 3. KD on uniform noise images: NoiseBatches' normal draws through the normal CDF
    noise = NoiseBatches(batch, 64, num_batches=1, seed=seed)
    distiller = BasicDistiller(config(out, "noise_kd_student", seed), kd_config, teacher,
                               noise_kd, adaptor, adaptor)
    with distiller:
        distiller.train(torch.optim.Adam(noise_kd.parameters(), lr=args.lr), noise,
                        num_steps=args.steps,
                        batch_postprocessor=lambda z: (0.5 * (1 + torch.erf(z / 2 ** 0.5)),))

    # 4. DFAD
    torch.manual_seed(seed + 2)
    generator = MLPGenerator(noise_dim=32, output_shape=64, hidden_size=128,
                             output_activation="sigmoid")
    distiller = DFADDistiller(config(out, "dfad_student", seed), kd_config, teacher, dfad,
                              generator=generator, noise_shape=32, batch_size=batch,
                              generator_lr=args.generator_lr)
    with distiller:
        distiller.train(torch.optim.Adam(dfad.parameters(), lr=args.lr), num_steps=args.steps)

    # 5. DeepInversion, then KD on the synthesised images
    images, _ = synthesize_deep_inversion(
        teacher, 64, num_classes=10, num_batches=args.di_batches, batch_size=batch,
        iterations=args.di_iterations, output_dir=os.path.join(out, "deepinversion"),
        lr=0.05, seed=seed, init=lambda shape, g: torch.rand(shape, generator=g),
        bn_weight=1.0, ce_weight=1.0, tv_weight=0.05, l2_weight=0.01, image_shape=(8, 8))
    synthetic = torch.utils.data.DataLoader(
        [(image,) for image in images.clamp(0, 1)], batch_size=batch, shuffle=True,
        generator=torch.Generator().manual_seed(seed))
    distiller = BasicDistiller(config(out, "deepinversion_student", seed), kd_config,
                               teacher, inverted, adaptor, adaptor)
    with distiller:
        distiller.train(torch.optim.Adam(inverted.parameters(), lr=args.lr), synthetic,
                        num_steps=args.steps)
    return {"teacher": accuracy(teacher, test), "student_alone": accuracy(alone, test),
            "noise_kd_student": accuracy(noise_kd, test), "dfad_student": accuracy(dfad, test),
            "deepinversion_student": accuracy(inverted, test)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="./output_data_free")
    parser.add_argument("--quick", action="store_true", help="one seed, small")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default 0 1 2 (0 with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of every student (default 1500; 150 with --quick)")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="default 800 (300 with --quick)")
    parser.add_argument("--di-batches", type=int, default=None,
                        help="DeepInversion batches of 64 images (default 16; 4 with --quick)")
    parser.add_argument("--di-iterations", type=int, default=None,
                        help="Adam steps per DeepInversion batch (default 200; 60 with --quick)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--generator-lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    quick = args.quick
    args.seeds = args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2])
    defaults = {"steps": (150, 1500), "teacher_steps": (300, 800), "di_batches": (4, 16),
                "di_iterations": (60, 200)}
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)  # tiny models: one thread is fastest (and avoids oversubscription)
    per_seed = []
    for seed in args.seeds:
        row = run_seed(seed, args)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
        per_seed.append(row)
    models = {}
    for name in per_seed[0]:
        values = [row[name] for row in per_seed]
        models[name] = {"accuracy": statistics.mean(values), "std": statistics.pstdev(values),
                        "per_seed": values,
                        "parameters": count_parameters(MLP([256, 256], True) if name == "teacher"
                                                       else MLP([args.hidden]))}
    print(f"\n{'model':<24}test accuracy, mean ± std over seeds {args.seeds}")
    for name, row in models.items():
        print(f"{name:<24}{row['accuracy']:.4f} ± {row['std']:.4f}")
    results = {"models": models, "scheme": "data_free",
               "run": {**{k: v for k, v in vars(args).items() if k != "output_dir"},
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
