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
import os
import statistics
import sys
from typing import Any, Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)

from textbrewer import BasicDistiller, BasicTrainer, DistillationConfig  # noqa: E402
from textbrewer.schemes import SelfDistiller, born_again  # noqa: E402


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


def exits_adaptor(batch, outputs):
    """Be Your Own Teacher: every exit (shallowest first) and its feature."""
    return {"logits": outputs["exit_logits"], "hidden": outputs["exit_features"],
            "labels": batch["labels"]}


# The plain network: the deepest exit ('logits') and its cross entropy.
deepest_adaptor = common.labels_adaptor


@torch.no_grad()
def exit_accuracies(model: ExitNet, test: Dict[str, torch.Tensor]) -> List[float]:
    """The test accuracy of each exit, shallowest first."""
    with common.evaluating(model):
        exit_logits = model(image=test["image"])["exit_logits"]
    return [(z.argmax(-1) == test["labels"]).float().mean().item() for z in exit_logits]


# ---------------------------------------------------------------------------------- runs
def run_seed(args: argparse.Namespace, seed: int) -> Dict[str, Any]:
    """Examples ``{'image': (8, 8), 'labels': ()}``: the first ``--train-size`` training
    images, the 450 test images."""
    torch.manual_seed(seed)
    data = common.digits_data(seed, train_size=args.train_size)
    test = common.stack(data["test"])
    initial = ExitNet()
    runs = common.SeedRuns(args, seed, log_steps=1000)

    def train(model, trainer) -> None:
        runs.train_steps(trainer, model, runs.loader(data["train"]), args.steps)

    alone = copy.deepcopy(initial)
    train(alone, BasicTrainer(runs.config("student_alone"), alone, deepest_adaptor))

    byot = copy.deepcopy(initial)
    distill_config = DistillationConfig(kd_loss_type="kl", temperature=args.temperature,
                                        kd_loss_weight=args.alpha,
                                        hard_label_weight=1 - args.alpha)
    train(byot, SelfDistiller(runs.config("self_distilled"), distill_config, byot,
                              exits_adaptor, feature_weight=args.feature_weight))

    def train_generation(student, teacher, generation):
        torch.manual_seed(seed + 100 * generation)  # a new initialisation per generation
        student.load_state_dict(ExitNet().state_dict())
        distiller = BasicDistiller(runs.config(f"born_again_gen{generation}"),
                                   DistillationConfig(
                                       kd_loss_type="kl", temperature=args.ban_temperature,
                                       kd_loss_weight=1.0,
                                       hard_label_weight=args.ban_hard_label_weight),
                                   teacher, student, deepest_adaptor, deepest_adaptor)
        train(student, distiller)

    generations = born_again(lambda g: ExitNet(), train_generation, args.generations,
                             evaluate=lambda m: exit_accuracies(m, test)[-1],
                             first_model=alone)
    result = {"student_alone": exit_accuracies(alone, test)[-1],
              "self_distilled": exit_accuracies(byot, test)[-1],
              "self_distilled_exits": exit_accuracies(byot, test),
              "student_alone_exits": exit_accuracies(alone, test)}
    for generation in generations[1:]:
        result[f"born_again_gen{generation.index}"] = generation.metric
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.ExampleParser(__doc__, "./output_self_distillation",
                                  quick_help="one seed, few steps (tests)")
    parser.add_seeds()
    parser.add_quick_argument("--steps", 60, 600, "optimizer steps of every run")
    parser.add_argument("--train-size", type=int, default=300)
    parser.add_quick_argument("--generations", 1, 2, "born-again generations")
    parser.add_training_options(lr=3e-3, temperature=3.0)
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="kd_loss_weight; hard_label_weight is 1 - alpha")
    parser.add_argument("--feature-weight", type=float, default=0.03)
    parser.add_argument("--ban-temperature", type=float, default=1.0,
                        help="born-again KD temperature")
    parser.add_argument("--ban-hard-label-weight", type=float, default=0.0,
                        help="born-again hard-label weight (0: the teacher's outputs only, "
                             "as in the paper)")
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(threads=1, quiet=True)  # the table, not the steps
    runs = common.run_seeds(args, run_seed)
    names = ["student_alone", "self_distilled"] + [f"born_again_gen{g}" for g in
                                                    range(1, args.generations + 1)]
    results: Dict[str, Any] = {"models": common.summarise(runs, names)}
    for name in ("self_distilled", "student_alone"):
        results["models"][name]["exit_accuracies"] = [
            statistics.fmean(values) for values in zip(*(r[f"{name}_exits"] for r in runs))]
    results["run"] = common.run_record(args, started)

    common.print_accuracies(
        results["models"], f"\ntest accuracy of the deepest exit, mean ± std over seeds "
        f"{args.seeds} ({args.train_size} training images, {args.steps} steps each)\n"
        f"{'model':<22}{'accuracy':>18}", 22, 10)
    exits = results["models"]["self_distilled"]["exit_accuracies"]
    print("self_distilled exits (shallow to deep): " + ", ".join(f"{a:.4f}" for a in exits))
    path = common.write_results(args.output_dir, results)
    print(f"wrote {path} ({results['run']['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
