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


def run_seed(args, seed: int) -> Dict[str, float]:
    seed_everything(seed)
    data = common.digits_data(seed, key="x", flat=True)
    train, test = data["train"], common.stack(data["test"])
    runs = common.SeedRuns(args, seed, log_steps=100,
                           ckpt_epoch_frequency=max(1, args.epochs // 3))
    torch.manual_seed(seed)
    teacher = common.MLP([256, 256], dropout=0.1)
    common.fit(BasicTrainer(runs.config("teacher",
                                        ckpt_epoch_frequency=max(1, args.teacher_epochs // 3)),
                            teacher, common.loss_adaptor),
               torch.optim.Adam(teacher.parameters(), lr=1e-3), runs.loader(train),
               num_epochs=args.teacher_epochs)
    teacher.eval()

    torch.manual_seed(seed + 1)
    init = common.MLP([args.hidden], dropout=0.1)
    alone, kd, adversarial = (copy.deepcopy(init) for _ in range(3))
    common.fit(BasicTrainer(runs.config("student_alone"), alone, common.loss_adaptor),
               torch.optim.Adam(alone.parameters(), lr=args.lr), runs.loader(train),
               num_epochs=args.epochs)

    distill_config = DistillationConfig(kd_loss_type="kl", temperature=args.temperature,
                                        kd_loss_weight=1.0, hard_label_weight=1.0)
    common.fit(GeneralDistiller(runs.config("kd_student"), distill_config, teacher, kd,
                                common.loss_adaptor, common.loss_adaptor),
               torch.optim.Adam(kd.parameters(), lr=args.lr), runs.loader(train),
               num_epochs=args.epochs)

    torch.manual_seed(seed + 2)
    distiller = AdversarialDistiller(
        runs.config("adversarial_student"), distill_config, teacher, adversarial,
        common.loss_adaptor, common.loss_adaptor, adversarial_weight=args.adversarial_weight,
        feature="logits", temperature=1.0, input_dim=10, hidden_size=64,
        discriminator_lr=args.discriminator_lr)
    common.fit(distiller, torch.optim.Adam(adversarial.parameters(), lr=args.lr),
               runs.loader(train), num_epochs=args.epochs)
    return {"teacher": common.accuracy(teacher, test, "x"),
            "student_alone": common.accuracy(alone, test, "x"),
            "kd_student": common.accuracy(kd, test, "x"),
            "adversarial_student": common.accuracy(adversarial, test, "x")}


def parse_args(argv=None):
    parser = common.ExampleParser(__doc__, "./output_adversarial",
                                  quick_help="one seed, a few epochs")
    parser.add_seeds()
    parser.add_quick_argument("--epochs", 2, 20, "epochs of each student")
    parser.add_quick_argument("--teacher-epochs", 3, 20)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--adversarial-weight", type=float, default=0.1)
    parser.add_argument("--discriminator-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(threads=1)
    models = common.summarise(common.run_seeds(args, run_seed), population=True)
    models["teacher"]["parameters"] = count_parameters(common.MLP([256, 256], dropout=0.1))
    for name in ("student_alone", "kd_student", "adversarial_student"):
        models[name]["parameters"] = count_parameters(common.MLP([args.hidden], dropout=0.1))
    common.print_accuracies(models, f"\n{'model':<22}test accuracy, mean ± std over seeds "
                                    f"{args.seeds}", 22)
    results = {"models": models, "scheme": "adversarial",
               "run": common.run_record(args, started, [
                   "seeds", "epochs", "teacher_epochs", "lr", "temperature", "hidden",
                   "adversarial_weight", "discriminator_lr", "batch_size", "quick"])}
    path = common.write_results(args.output_dir, results)
    print(f"{results['run']['seconds']:.0f} s; wrote {path}")
    return results


if __name__ == "__main__":
    main()
