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

import copy
import os
import sys
from typing import Any, Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)

from textbrewer import BasicTrainer, DistillationConfig  # noqa: E402
from textbrewer.schemes import MutualLearningDistiller, peer_checkpoint_path  # noqa: E402
from textbrewer.utils import count_parameters, seed_everything  # noqa: E402


def mlp(hidden: int) -> common.MLP:
    """(B, 64) pixels -> {'logits': (B, 10)}: 64 -> hidden (ReLU, dropout 0.2) -> 10."""
    return common.MLP([hidden], dropout=0.2)


def run_seed(args, seed: int) -> Dict[str, float]:
    seed_everything(seed)
    data = common.transfer_split(seed, args.train_size or None, args.validation,
                                 args.transfer, key="x", flat=True)
    train, test = data["labelled"], data["test"]
    # with --transfer the peers also teach each other on the unlabelled images
    mutual_train = data["transfer"]
    torch.manual_seed(seed)
    init = mlp(args.hidden)
    alone, student0 = copy.deepcopy(init), copy.deepcopy(init)
    torch.manual_seed(seed + 1000)
    student1 = mlp(args.hidden)
    runs = common.SeedRuns(args, seed, log_steps=100,
                           ckpt_epoch_frequency=max(1, args.epochs // 3))

    steps = args.epochs * len(runs.loader(train))  # the same steps for every model
    common.fit(BasicTrainer(runs.config("student_alone"), alone, common.masked_adaptor),
               torch.optim.Adam(alone.parameters(), lr=args.alone_lr), runs.loader(train),
               num_steps=steps)

    distiller = MutualLearningDistiller(
        runs.config("mutual"), DistillationConfig(kd_loss_type="kl", temperature=1.0,
                                                  kd_loss_weight=1.0, hard_label_weight=1.0),
        [student0, student1], adaptor_S=common.masked_adaptor)
    # student1 gets an Adam of its own with the same settings
    common.fit(distiller, torch.optim.Adam(student0.parameters(), lr=args.lr),
               runs.loader(mutual_train), num_steps=steps)
    assert os.path.isfile(peer_checkpoint_path(runs.output_dir("mutual"), steps, 1))
    return {"student_alone": common.accuracy(alone, test, "x"),
            "student0": common.accuracy(student0, test, "x"),
            "student1": common.accuracy(student1, test, "x")}


def parse_args(argv=None):
    parser = common.ExampleParser(__doc__, "./output_mutual_learning",
                                  quick_help="one seed, 3 epochs (seconds)")
    parser.add_seeds()
    parser.add_quick_argument("--epochs", 3, 30)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_training_options(lr=2e-3, lr_help="learning rate of the two peers")
    parser.add_argument("--alone-lr", type=float, default=2e-3,
                        help="learning rate of the student alone")
    parser.add_argument("--train-size", type=int, default=0,
                        help="labelled training images (default 0: all)")
    parser.add_argument("--transfer", action="store_true",
                        help="the peers also learn from each other on the other training "
                             "images, without their labels")
    parser.add_validation_option()
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(threads=1)
    models = common.summarise(common.run_seeds(args, run_seed), population=True)
    for row in models.values():
        row["parameters"] = count_parameters(mlp(args.hidden))
    title = f"test accuracy (mean ± std over seeds {args.seeds})"
    common.print_accuracies(models, f"\n{'model':<16}{title:>48}", 16, 38)
    results = {"models": models, "scheme": "mutual",
               "run": common.run_record(args, started, ["seeds", "epochs", "lr", "alone_lr",
                                                        "train_size", "transfer", "validation",
                                                        "hidden",
                                                        "batch_size", "quick"])}
    path = common.write_results(args.output_dir, results)
    print(f"{results['run']['seconds']:.0f} s; wrote {path}")
    return results


if __name__ == "__main__":
    main()
