"""Adversarial distillation on handwritten digits: a discriminator tells the teacher's
predictions from the student's, and the student learns to fool it on top of KD.

scikit-learn's bundled digits (1797 images of 8x8 pixels, no download), flattened to 64
features in [0, 1]. For each seed, on one fixed, seeded train/test split (1347 / 450):
the teacher learns from all 1347 labelled training images; the students have the labels
of the first ``--train-size`` (default 300: a small-data regime, as in the single-model
scheme examples) and, for distillation, the other training images *without* their labels
(transfer data: the teacher's soft targets are all the student learns from them).

1. ``teacher``: an MLP 64 -> 256 -> 256 -> 10, trained on the labels (``BasicTrainer``);
2. ``student_alone``: an MLP 64 -> 16 -> 10 trained on the labelled images alone, the
   baseline;
3. ``kd_student``: the same student (same initial weights) with ``GeneralDistiller`` on all
   training images: KD (``kd_loss_type='kl'``, τ²-scaled, temperature ``--temperature``)
   on every row, the hard-label cross-entropy on the labelled rows only (the unlabelled
   rows carry label -100 and are masked out): the ablation without the discriminator;
4. ``adversarial_student``: the same with ``AdversarialDistiller``: those terms plus
   ``adversarial_weight · BCE(D(softmax(s)), 1)``, D an
   :class:`~textbrewer.schemes.MLPDiscriminator` (10 -> 64 -> 1) trained in its own phase
   to tell ``softmax(t)`` from ``softmax(s)``;

the student alone ``--alone-steps`` optimizer steps at ``--alone-lr``, the distilled ones
``--steps`` at ``--lr`` (Adam, constant learning rate). The settings were
tuned on a validation split held out of the training images (``--validation``; see
docs/schemes/adversarial.md), the same budget for the baseline and the distilled students.

It prints the test accuracy of each model, per seed and as mean ± std over the seeds, the
seeds each distilled student beat / tied / lost to the student alone (and the adversarial
student to the KD student), and writes them to ``{output_dir}/results.json``.

Run:
    python examples/adversarial.py                  # 5 seeds
    python examples/adversarial.py --quick          # 1 seed, a few steps (the tests)
    python examples/adversarial.py --seeds 0 1 2 --validation 247   # tuning: no test image
"""
from __future__ import annotations

import copy
import os
import sys
from typing import Any, Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)

from textbrewer import BasicTrainer, DistillationConfig, GeneralDistiller  # noqa: E402
from textbrewer.schemes import AdversarialDistiller  # noqa: E402
from textbrewer.utils import count_parameters, seed_everything  # noqa: E402

class Student(common.MLP):
    """The MLP student; its forward ignores the labels (the adaptor scores them)."""

    def forward(self, x: torch.Tensor, labels: Any = None) -> Dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


def run_seed(args, seed: int, curves: Dict[str, Dict[int, float]] = None,
             only: Any = None) -> Dict[str, float]:
    """One seed's test (or validation) accuracies; with ``curves`` (a dict, for tuning)
    also each student's accuracy every ``--eval-steps`` steps, ``curves[name][step]``;
    ``only``: the students to train (default all; tuning)."""
    seed_everything(seed)
    data = common.transfer_split(seed, args.train_size, args.validation, args.transfer,
                                 key="x", flat=True)
    test = data["test"]
    eval_steps = args.eval_steps if curves is not None else None
    runs = common.SeedRuns(args, seed, log_steps=1000,
                           ckpt_steps=eval_steps or max(args.steps, args.alone_steps))

    def fit(name, trainer, model, lr, loader, steps):
        callback = None
        if curves is not None:
            curves[name] = {}

            def callback(model, step):
                curves[name][step] = common.accuracy(model, test, "x")
        with trainer:
            trainer.train(torch.optim.Adam(model.parameters(), lr=lr), loader,
                          num_steps=steps, callback=callback)

    torch.manual_seed(seed)
    teacher = common.MLP([256, 256], dropout=0.1)
    common.fit(BasicTrainer(runs.config("teacher", ckpt_steps=None, ckpt_epoch_frequency=
                                        max(1, args.teacher_epochs // 3)),
                            teacher, common.loss_adaptor),
               torch.optim.Adam(teacher.parameters(), lr=1e-3),
               runs.loader(data["teacher_train"]), num_epochs=args.teacher_epochs)
    teacher.eval()

    torch.manual_seed(seed + 1)
    init = Student([args.hidden], dropout=0.1)
    alone, kd, adversarial = (copy.deepcopy(init) for _ in range(3))
    for module in alone.modules():  # the same weights; the baseline's own (tuned) dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = args.alone_dropout
    result = {"teacher": common.accuracy(teacher, test, "x")}
    wanted = (lambda name: only is None or name in only)
    if wanted("student_alone"):
        fit("student_alone",
            BasicTrainer(runs.config("student_alone"), alone, common.masked_adaptor), alone,
            args.alone_lr, runs.loader(data["labelled"]), args.alone_steps)
        result["student_alone"] = common.accuracy(alone, test, "x")

    distill_config = DistillationConfig(kd_loss_type="kl", temperature=args.temperature,
                                        kd_loss_weight=args.kd_weight, hard_label_weight=1.0)
    if wanted("kd_student"):
        fit("kd_student", GeneralDistiller(runs.config("kd_student"), distill_config, teacher,
                                           kd, common.logits_adaptor, common.masked_adaptor),
            kd, args.lr, runs.loader(data["transfer"]), args.steps)
        result["kd_student"] = common.accuracy(kd, test, "x")

    if wanted("adversarial_student"):
        torch.manual_seed(seed + 2)
        distiller = AdversarialDistiller(
            runs.config("adversarial_student"), distill_config, teacher, adversarial,
            common.logits_adaptor, common.masked_adaptor,
            adversarial_weight=args.adversarial_weight,
            feature="logits", temperature=1.0, input_dim=10, hidden_size=64,
            discriminator_lr=args.discriminator_lr)
        fit("adversarial_student", distiller, adversarial, args.lr,
            runs.loader(data["transfer"]), args.steps)
        result["adversarial_student"] = common.accuracy(adversarial, test, "x")
    return result


def parse_args(argv=None):
    parser = common.ExampleParser(__doc__, "./output_adversarial",
                                  quick_help="one seed, a few steps")
    parser.add_seeds(full=(0, 1, 2, 3, 4))
    parser.add_quick_argument("--steps", 100, 5000, "optimizer steps of the distilled students")
    parser.add_quick_argument("--alone-steps", 100, 4000,
                              "optimizer steps of the student alone")
    parser.add_quick_argument("--teacher-epochs", 3, 20)
    parser.add_transfer_options()
    parser.add_argument("--eval-steps", type=int, default=500,
                        help="tuning curves: score every N steps (run_seed's curves)")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--alone-lr", type=float, default=1e-3,
                        help="learning rate of the student alone")
    parser.add_argument("--alone-dropout", type=float, default=0.1,
                        help="dropout of the student alone (the distilled students: 0.1)")
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="learning rate of the distilled students")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--kd-weight", type=float, default=1.0)
    parser.add_argument("--adversarial-weight", type=float, default=0.1)
    parser.add_argument("--discriminator-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    common.at_least_one(parser, args, "train_size", "eval_steps")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(threads=1)
    models = common.summarise(common.run_seeds(args, run_seed), population=True)
    models["teacher"]["parameters"] = count_parameters(common.MLP([256, 256], dropout=0.1))
    for name in ("student_alone", "kd_student", "adversarial_student"):
        models[name]["parameters"] = count_parameters(common.MLP([args.hidden], dropout=0.1))
    scored = f"validation ({args.validation} held-out training images)" if args.validation \
        else "test accuracy"
    common.print_accuracies(models, f"\n{'model':<22}{scored}, mean ± std over seeds "
                                    f"{args.seeds}", 22)
    comparisons = {}
    for name, baseline in (("kd_student", "student_alone"),
                           ("adversarial_student", "student_alone"),
                           ("adversarial_student", "kd_student")):
        btw = common.better_tied_worse(models[name]["per_seed"], models[baseline]["per_seed"])
        comparisons[f"{name} vs {baseline}"] = btw
        print(f"{name} vs {baseline}: better/tied/worse on {btw[0]}/{btw[1]}/{btw[2]} seeds")
    results = {"models": models, "scheme": "adversarial", "better_tied_worse": comparisons,
               "run": common.run_record(args, started, [
                   "seeds", "steps", "alone_steps", "teacher_epochs", "train_size",
                   "transfer", "validation",
                   "alone_lr", "alone_dropout", "lr", "temperature", "kd_weight", "hidden",
                   "adversarial_weight", "discriminator_lr", "batch_size", "quick"],
                   torch=torch.__version__)}
    path = common.write_results(args.output_dir, results)
    print(f"{results['run']['seconds']:.0f} s; wrote {path}")
    return results


if __name__ == "__main__":
    main()
