"""Self-distillation on handwritten digits: Be Your Own Teacher and born-again networks.

No separate teacher model. scikit-learn's bundled digits (8x8 images, no download), a
fixed stratified split per seed, ``--train-size`` training images (default 300: a small-
data regime, where a teacher's soft labels matter most), the 450 test images.

The network (``ExitNet``): three blocks ``Linear + ReLU`` of width 64; after each block an
exit, a bottleneck ``Linear + ReLU`` (the exit's feature) and a classifier. Runs, each
``--steps`` optimizer steps from the same initial weights:

1. student alone: the network trained on the labels at its deepest exit only (the
   shallow exits unused), with ``BasicTrainer``;
2. Be Your Own Teacher (``textbrewer.schemes.SelfDistiller``): every exit learns from the
   labels, the deepest exit teaches the shallow ones (KL at temperature 3 and a feature
   hint, ``hidden_mse`` between exit features);
3. born-again networks (``textbrewer.schemes.born_again``): generation 0 is run 1's
   model; generation g is a freshly initialised network distilled from generation g − 1
   with ``BasicDistiller`` (KL at temperature 1 on the teacher's outputs only, as in the
   paper), ``--generations`` times.

It prints the test accuracy of each (the deepest exit), mean ± std over ``--seeds``, and
writes ``{output_dir}/results.json``.

Run:
    python examples/self_distillation.py                 # 3 seeds
    python examples/self_distillation.py --quick         # seconds (the tests' run)
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
from textbrewer.schemes import SelfDistiller, born_again


# ---------------------------------------------------------------------------------- data
def load_data(seed: int, train_size: Optional[int]) -> Dict[str, List[Dict[str, torch.Tensor]]]:
    """Examples ``{'image': (8, 8) float in [0, 1], 'labels': () long}``."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
    if train_size:
        train_x, train_y = train_x[:train_size], train_y[:train_size]
    examples = lambda xs, ys: [{"image": torch.from_numpy(x), "labels": torch.tensor(int(y))}
                               for x, y in zip(xs, ys)]
    return {"train": examples(train_x, train_y), "test": examples(test_x, test_y)}


def loader(examples, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- model
class ExitNet(nn.Module):
    """Blocks with an exit after each.

    Forward: ``image`` (B, 8, 8) -> dict with ``exit_logits``, a list of ``num_blocks``
    tensors (B, 10) (shallowest first), ``exit_features``, a list of (B, width), and
    ``logits``, the deepest exit's.
    """

    def __init__(self, width: int = 64, num_blocks: int = 3, num_labels: int = 10):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64 if i == 0 else width, width),
                                                  nn.ReLU()) for i in range(num_blocks))
        self.bottlenecks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU())
                                         for _ in range(num_blocks))
        self.classifiers = nn.ModuleList(nn.Linear(width, num_labels)
                                         for _ in range(num_blocks))

    def forward(self, image: torch.Tensor, labels: Optional[torch.Tensor] = None):
        x = image.flatten(1)
        logits, features = [], []
        for block, bottleneck, classifier in zip(self.blocks, self.bottlenecks,
                                                 self.classifiers):
            x = block(x)
            feature = bottleneck(x)
            features.append(feature)
            logits.append(classifier(feature))
        return {"logits": logits[-1], "exit_logits": logits, "exit_features": features}


def deepest_adaptor(batch, outputs):
    """The plain network: the deepest exit and its cross entropy."""
    return {"logits": outputs["logits"], "labels": batch["labels"],
            "losses": F.cross_entropy(outputs["logits"], batch["labels"])}


def exits_adaptor(batch, outputs):
    """Be Your Own Teacher: every exit (shallowest first) and its feature."""
    return {"logits": outputs["exit_logits"], "hidden": outputs["exit_features"],
            "labels": batch["labels"]}


@torch.no_grad()
def exit_accuracies(model: ExitNet, examples) -> List[float]:
    was_training = model.training
    model.eval()
    images = torch.stack([e["image"] for e in examples])
    labels = torch.stack([e["labels"] for e in examples])
    scores = [(z.argmax(-1) == labels).float().mean().item()
              for z in model(image=images)["exit_logits"]]
    model.train(was_training)
    return scores


# ---------------------------------------------------------------------------------- runs
def run_seed(args: argparse.Namespace, seed: int) -> Dict[str, Any]:
    torch.manual_seed(seed)
    data = load_data(seed, args.train_size)
    initial = ExitNet()

    def config(name: str) -> TrainingConfig:
        return TrainingConfig(device="cpu", output_dir=os.path.join(args.output_dir,
                                                                    f"seed{seed}", name),
                              seed=seed, log_steps=1000)

    def train(model, trainer) -> None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        with trainer:
            trainer.train(optimizer, loader(data["train"], args.batch_size, seed),
                          num_steps=args.steps)

    alone = copy.deepcopy(initial)
    train(alone, BasicTrainer(config("student_alone"), alone, deepest_adaptor))

    byot = copy.deepcopy(initial)
    distill_config = DistillationConfig(kd_loss_type="kl", temperature=args.temperature,
                                        kd_loss_weight=args.alpha,
                                        hard_label_weight=1 - args.alpha)
    train(byot, SelfDistiller(config("self_distilled"), distill_config, byot, exits_adaptor,
                              feature_weight=args.feature_weight))

    def train_generation(student, teacher, generation):
        torch.manual_seed(seed + 100 * generation)  # a new initialisation per generation
        student.load_state_dict(ExitNet().state_dict())
        distiller = BasicDistiller(config(f"born_again_gen{generation}"), DistillationConfig(
            kd_loss_type="kl", temperature=args.ban_temperature, kd_loss_weight=1.0,
            hard_label_weight=args.ban_hard_label_weight), teacher, student, deepest_adaptor, deepest_adaptor)
        train(student, distiller)

    generations = born_again(lambda g: ExitNet(), train_generation, args.generations,
                             evaluate=lambda m: exit_accuracies(m, data["test"])[-1],
                             first_model=alone)
    result = {"student_alone": exit_accuracies(alone, data["test"])[-1],
              "self_distilled": exit_accuracies(byot, data["test"])[-1],
              "self_distilled_exits": exit_accuracies(byot, data["test"]),
              "student_alone_exits": exit_accuracies(alone, data["test"])}
    for generation in generations[1:]:
        result[f"born_again_gen{generation.index}"] = generation.metric
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="./output_self_distillation")
    parser.add_argument("--quick", action="store_true", help="one seed, few steps (tests)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default 0 1 2 (0 with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of every run (default 600; 60 with --quick)")
    parser.add_argument("--train-size", type=int, default=300)
    parser.add_argument("--generations", type=int, default=None,
                        help="born-again generations (default 2; 1 with --quick)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=3.0)
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="kd_loss_weight; hard_label_weight is 1 - alpha")
    parser.add_argument("--feature-weight", type=float, default=0.03)
    parser.add_argument("--ban-temperature", type=float, default=1.0,
                        help="born-again KD temperature")
    parser.add_argument("--ban-hard-label-weight", type=float, default=0.0,
                        help="born-again hard-label weight (0: the teacher's outputs only, "
                             "as in the paper)")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.steps = args.steps or (60 if args.quick else 600)
    args.generations = args.generations or (1 if args.quick else 2)
    return args


def summarise(values: List[float]) -> Dict[str, Any]:
    return {"accuracy": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    logging.getLogger("textbrewer").setLevel(logging.WARNING)  # the table, not the steps
    started = time.perf_counter()
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(args, seed))
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in runs[-1].items()
                                           if isinstance(v, float)), flush=True)
    names = ["student_alone", "self_distilled"] + [f"born_again_gen{g}" for g in
                                                    range(1, args.generations + 1)]
    results: Dict[str, Any] = {"models": {name: summarise([r[name] for r in runs])
                                          for name in names}}
    results["models"]["self_distilled"]["exit_accuracies"] = [
        statistics.fmean(values) for values in zip(*(r["self_distilled_exits"] for r in runs))]
    results["models"]["student_alone"]["exit_accuracies"] = [
        statistics.fmean(values) for values in zip(*(r["student_alone_exits"] for r in runs))]
    results["run"] = {k: v for k, v in vars(args).items() if k != "output_dir"}
    results["run"].update(textbrewer=textbrewer.__version__,
                          seconds=round(time.perf_counter() - started, 1))

    print(f"\ntest accuracy of the deepest exit, mean ± std over seeds {args.seeds} "
          f"({args.train_size} training images, {args.steps} steps each)")
    print(f"{'model':<22}{'accuracy':>18}")
    for name in names:
        row = results["models"][name]
        print(f"{name:<22}{row['accuracy']:>10.4f} ± {row['std']:.4f}")
    exits = results["models"]["self_distilled"]["exit_accuracies"]
    print("self_distilled exits (shallow to deep): " + ", ".join(f"{a:.4f}" for a in exits))
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "results.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(f"wrote {path} ({results['run']['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
