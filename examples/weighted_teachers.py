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
import os
import sys
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)

from textbrewer import BasicTrainer, DistillationConfig, MultiTeacherDistiller  # noqa: E402
from textbrewer.schemes import WeightedMultiTeacherDistiller  # noqa: E402

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


# ---------------------------------------------------------------------------------- runs
SCHEMES = {"average": None,
           "fixed": dict(weighting="fixed", weights=[2.0, 1.0, 1.0]),
           "entropy": dict(weighting="entropy"),
           "gold": dict(weighting="gold")}


def run_seed(args: argparse.Namespace, seed: int) -> Dict[str, float]:
    """Examples ``{'image': (8, 8), 'labels': ()}``: the teachers see the whole training
    split, the students its first ``--train-size``."""
    data = common.digits_data(seed, train_size=args.train_size)
    test = common.stack(data["test"])
    runs = common.SeedRuns(args, seed, log_steps=1000)
    adaptor = common.labels_adaptor

    teachers = []
    for index, view in enumerate(VIEWS):
        torch.manual_seed(seed + 10 * index)
        teacher = MLP(view, 128, dropout=0.1)
        runs.train_steps(BasicTrainer(runs.config(f"teacher_{view}"), teacher, adaptor),
                         teacher, runs.loader(data["teacher_train"]), args.teacher_steps)
        teachers.append(teacher)
    torch.manual_seed(seed + 1)
    initial = MLP("full", 32)
    result = {f"teacher_{view}": common.accuracy(t, test) for view, t in zip(VIEWS, teachers)}

    alone = copy.deepcopy(initial)
    runs.train_steps(BasicTrainer(runs.config("student_alone"), alone, adaptor), alone,
                     runs.loader(data["train"]), args.steps)
    result["student_alone"] = common.accuracy(alone, test)
    distill_config = DistillationConfig(kd_loss_type="kl", temperature=args.temperature,
                                        kd_loss_weight=1.0, hard_label_weight=1.0)
    for name, options in SCHEMES.items():
        student = copy.deepcopy(initial)
        if options is None:
            distiller = MultiTeacherDistiller(runs.config(name), distill_config, teachers,
                                              student, adaptor, adaptor)
        else:
            distiller = WeightedMultiTeacherDistiller(runs.config(name), distill_config,
                                                      teachers, student, adaptor, adaptor,
                                                      tau=args.tau, **options)
        runs.train_steps(distiller, student, runs.loader(data["train"]), args.steps)
        result[name] = common.accuracy(student, test)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.ExampleParser(__doc__, "./output_weighted_teachers",
                                  quick_help="one seed, few steps (tests)")
    parser.add_seeds()
    parser.add_quick_argument("--steps", 60, 600, "optimizer steps of each student")
    parser.add_quick_argument("--teacher-steps", 100, 600, "optimizer steps of each teacher")
    parser.add_argument("--train-size", type=int, default=300)
    parser.add_training_options(lr=3e-3, temperature=4.0)
    parser.add_argument("--tau", type=float, default=1.0, help="confidence temperature")
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(threads=1, quiet=True)  # the table, not the steps
    results: Dict[str, Any] = {"models": common.summarise(common.run_seeds(args, run_seed))}
    results["run"] = common.run_record(args, started)
    common.print_accuracies(
        results["models"], f"\ntest accuracy, mean ± std over seeds {args.seeds} "
        f"({args.train_size} training images for the students, {args.steps} steps each)\n"
        f"{'model':<20}{'accuracy':>20}", 20, 11)
    path = common.write_results(args.output_dir, results)
    print(f"wrote {path} ({results['run']['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
