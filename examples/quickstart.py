"""Quickstart: distil a 4-layer transformer into a 2-layer one on handwritten digits.

The data is scikit-learn's bundled copy of the UCI optical-recognition digits (1797
images of 8x8 pixels, no download). Each image is read as a sequence of 8 tokens (its
rows), each token 8 pixel intensities scaled to [0, 1], and classified into 10 digits
by :class:`textbrewer.testing.TinyTransformer`.

Three runs on one fixed, seeded train/test split (1347 / 450 images):

1. the teacher (width 64, 4 layers, 4 heads), trained with ``BasicTrainer``;
2. the student (width 16, 2 layers, 2 heads) trained alone for ``--epochs``, the baseline;
3. the same student, from the same initial weights, distilled from the teacher with
   ``GeneralDistiller``: KD on the logits (temperature 4), the hard labels, the
   student's hidden states 0, 1, 2 matched (through a learned linear projection 16 -> 64)
   to the teacher's 0, 2, 4, and the last layers' attention distributions matched;
   the same number of epochs as the baseline.

It prints the held-out test accuracy of each model with the parameter counts, and
writes the same numbers to ``{output_dir}/results.json``.

Run:
    python examples/quickstart.py                     # about 45 s on 2 CPU cores
    python examples/quickstart.py --quick             # about 8 s (used by the tests)
    python examples/quickstart.py --epochs 60 --output-dir runs/digits
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any, Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)

from textbrewer import (BasicTrainer, DistillationConfig, GeneralDistiller,  # noqa: E402
                        TrainingConfig)
from textbrewer.testing import TinyTransformer, tiny_adaptor  # noqa: E402
from textbrewer.utils import count_parameters, seed_everything  # noqa: E402

# The two architectures. The tests build models from these same dicts (via results.json).
TEACHER_CONFIG = dict(input_dim=8, hidden_size=64, num_layers=4, num_heads=4, num_labels=10,
                      max_length=8, dropout=0.1)
STUDENT_CONFIG = dict(input_dim=8, hidden_size=16, num_layers=2, num_heads=2, num_labels=10,
                      max_length=8, dropout=0.1)


# ---------------------------------------------------------------------------------- data
def load_data(seed: int) -> Dict[str, List[Dict[str, torch.Tensor]]]:
    """The digits as lists of examples ``{'features': (8, 8) float, 'labels': () long}``:
    ``train`` (1347) and ``test`` (450)."""
    return common.digits_data(seed, key="features")


@torch.no_grad()
def accuracy(model: torch.nn.Module, examples, device: torch.device,
             batch_size: int = 256) -> float:
    """Share of ``examples`` the model classifies correctly (eval mode, restored after).

    Plain slicing rather than a DataLoader: a DataLoader iterator draws from torch's global
    random generator, so evaluating in a callback would change the rest of training.
    """
    batch = common.stack(examples)
    correct = 0
    with common.evaluating(model):
        for start in range(0, len(examples), batch_size):
            logits = model(features=batch["features"][start:start + batch_size].to(device))
            correct += (logits["logits"].argmax(-1).cpu()
                        == batch["labels"][start:start + batch_size]).sum().item()
    return correct / len(examples)


# ---------------------------------------------------------------------------------- training
def make_callback(name: str, test_set, device, history: List[Dict[str, Any]]) -> Callable:
    """``callback(model, step)``: the distiller calls it after saving each checkpoint.

    It only reports progress; no checkpoint is selected by it (that would be tuning on the
    test set): the table shows the final models.
    """
    def callback(model, step):
        score = accuracy(model, test_set, device)
        history.append({"step": step, "accuracy": score})
        print(f"  [{name}] step {step:4d}: test accuracy {score:.4f}", flush=True)
    return callback


def train_config(args: argparse.Namespace, name: str, device: torch.device,
                 epochs: int, log_dir=None) -> TrainingConfig:
    """Checkpoints (``gs{step}.pkl``) three times per run, so the callback reports thrice."""
    return TrainingConfig(device=device, output_dir=os.path.join(args.output_dir, name),
                          ckpt_epoch_frequency=max(1, epochs // 3), seed=args.seed,
                          log_steps=50, log_dir=log_dir)


def train_alone(name, model, data, args, device, epochs, history) -> None:
    """Supervised training on the hard labels: the teacher, or the student baseline."""
    loader = common.shuffled(data["train"], args.batch_size, args.seed)
    optimizer, schedule = common.optimizer_and_schedule(model, args.lr, epochs * len(loader))
    trainer = BasicTrainer(train_config(args, name, device, epochs), model, tiny_adaptor)
    common.fit(trainer, optimizer, loader, num_epochs=epochs, **schedule,
               callback=make_callback(name, data["test"], device, history))


def distil(teacher, student, data, args, device, history) -> None:
    """The student learns from the teacher's logits, hidden states and attentions."""
    width_S, width_T = STUDENT_CONFIG["hidden_size"], TEACHER_CONFIG["hidden_size"]
    distill_config = DistillationConfig(
        temperature=args.temperature,
        kd_loss_type="ce",
        kd_loss_weight=1.0,
        hard_label_weight=1.0,
        intermediate_matches=[
            # Student layer i (0 = embeddings) imitates teacher layer 2i, through a
            # learned projection from the student's width to the teacher's.
            *({"layer_T": 2 * i, "layer_S": i, "feature": "hidden", "loss": "hidden_mse",
               "weight": 1.0, "proj": ["linear", width_S, width_T]} for i in range(3)),
            # Last layers' attention distributions (2 vs 4 heads: averaged over heads).
            {"layer_T": TEACHER_CONFIG["num_layers"] - 1,
             "layer_S": STUDENT_CONFIG["num_layers"] - 1,
             "feature": "attention", "loss": "attention_ce_mean", "weight": 1.0},
        ])
    loader = common.shuffled(data["train"], args.batch_size, args.seed)
    optimizer, schedule = common.optimizer_and_schedule(student, args.lr,
                                                        args.epochs * len(loader))
    # TensorBoard logs (losses, scheduled weights, temperature, learning rate, samples/s)
    # when --curves asks for a picture of them
    log_dir = os.path.join(args.output_dir, "tensorboard") if args.curves else None
    distiller = GeneralDistiller(train_config(args, "distilled_student", device, args.epochs,
                                              log_dir),
                                 distill_config, model_T=teacher, model_S=student,
                                 adaptor_T=tiny_adaptor, adaptor_S=tiny_adaptor)
    common.fit(distiller, optimizer, loader, num_epochs=args.epochs, **schedule,
               callback=make_callback("distilled", data["test"], device, history))


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = common.ExampleParser(__doc__, "./output_quickstart",
                                  quick_help="a much smaller run, for tests (seconds)")
    parser.add_quick_argument("--epochs", 3, 30, "epochs of each student run, alone and "
                              "distilled: the same budget for both")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help="epochs of the teacher (default twice --epochs)")
    parser.add_training_options(lr=2e-3, temperature=4.0)
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the split, the initial weights and the shuffles")
    parser.add_device()
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these models are tiny, and on a "
                             "busy machine extra threads wait on each other)")
    parser.add_argument("--curves", action="store_true",
                        help="log the distillation to TensorBoard ({output-dir}/tensorboard) "
                             "and draw its curves into {output-dir}/curves.png (matplotlib)")
    parser.require_positive("threads")
    args = parser.parse_args(argv)
    if args.teacher_epochs is None:
        args.teacher_epochs = 2 * args.epochs
    common.at_least_one(parser, args, "teacher_epochs")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(args.threads)
    seed_everything(args.seed)
    device = torch.device(args.device)
    data = load_data(args.seed)
    print(f"digits: {len(data['train'])} training and {len(data['test'])} test images, "
          f"device {device}, {args.threads} threads; teacher {args.teacher_epochs} epochs, "
          f"students {args.epochs} epochs each")

    torch.manual_seed(args.seed)
    teacher = TinyTransformer(**TEACHER_CONFIG).to(device)
    torch.manual_seed(args.seed + 1)
    student_init = TinyTransformer(**STUDENT_CONFIG)
    student_alone = copy.deepcopy(student_init).to(device)   # identical starting weights
    student_distilled = copy.deepcopy(student_init).to(device)

    history: Dict[str, List[Dict[str, Any]]] = {"teacher": [], "student_alone": [],
                                                "distilled_student": []}
    print("1/3 teacher, trained on the labels")
    train_alone("teacher", teacher, data, args, device, args.teacher_epochs,
                history["teacher"])
    print("2/3 student alone, trained on the labels")
    train_alone("student_alone", student_alone, data, args, device, args.epochs,
                history["student_alone"])
    print("3/3 student distilled from the teacher")
    distil(teacher, student_distilled, data, args, device, history["distilled_student"])

    models = {"teacher": teacher, "student_alone": student_alone,
              "distilled_student": student_distilled}
    results: Dict[str, Any] = {"models": {}}
    for name, model in models.items():
        results["models"][name] = {"accuracy": accuracy(model, data["test"], device),
                                   "parameters": count_parameters(model)}
    results["size_ratio"] = (results["models"]["teacher"]["parameters"]
                             / results["models"]["student_alone"]["parameters"])
    results["configs"] = {"teacher": TEACHER_CONFIG, "student": STUDENT_CONFIG}
    results["run"] = common.run_record(args, started, ["epochs", "teacher_epochs", "lr",
                                                       "temperature", "batch_size", "quick",
                                                       "seed"], settings={"device": str(device)})
    results["history"] = history

    print()
    print(f"{'model':<20}{'test accuracy':>15}{'parameters':>13}")
    for name, row in results["models"].items():
        print(f"{name:<20}{row['accuracy']:>15.4f}{row['parameters']:>13,d}")
    gain = (results["models"]["distilled_student"]["accuracy"]
            - results["models"]["student_alone"]["accuracy"])
    print(f"the student is {results['size_ratio']:.1f}x smaller than the teacher; distillation "
          f"changed its accuracy by {100 * gain:+.1f} points; {results['run']['seconds']:.0f} s")
    print(f"wrote {common.write_results(args.output_dir, results)}")
    if args.curves:
        from textbrewer.logs import plot_curves
        picture = os.path.join(args.output_dir, "curves.png")
        plot_curves(os.path.join(args.output_dir, "tensorboard"), picture)
        print(f"wrote {picture}")
    return results


if __name__ == "__main__":
    main()
