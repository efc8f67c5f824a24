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

import copy
import os
import sys
from typing import Any, Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)

from textbrewer import BasicDistiller, BasicTrainer, DistillationConfig  # noqa: E402
from textbrewer.schemes import (DFADDistiller, MLPGenerator, NoiseBatches,  # noqa: E402
                                synthesize_deep_inversion)
from textbrewer.utils import count_parameters, seed_everything  # noqa: E402


def run_seed(args, seed: int) -> Dict[str, float]:
    seed_everything(seed)
    data = common.digits_data(seed, key="x", flat=True)
    test = common.stack(data["test"])
    runs = common.SeedRuns(args, seed, log_steps=200)
    batch = 64
    real = common.shuffled(data["train"], batch, seed)
    torch.manual_seed(seed)
    teacher = common.MLP([256, 256], batch_norm=True)
    common.fit(BasicTrainer(runs.config("teacher"), teacher, common.loss_adaptor),
               torch.optim.Adam(teacher.parameters(), lr=1e-3), real,
               num_steps=args.teacher_steps)
    teacher.eval()

    torch.manual_seed(seed + 1)
    init = common.MLP([args.hidden])
    alone, noise_kd, dfad, inverted = (copy.deepcopy(init) for _ in range(4))
    common.fit(BasicTrainer(runs.config("student_alone"), alone, common.loss_adaptor),
               torch.optim.Adam(alone.parameters(), lr=args.lr), real, num_steps=args.steps)

    kd_config = DistillationConfig(kd_loss_type="kl", temperature=4.0, hard_label_weight=0)
    # 3. KD on uniform noise images: NoiseBatches' normal draws through the normal CDF
    noise = NoiseBatches(batch, 64, num_batches=1, seed=seed)
    common.fit(BasicDistiller(runs.config("noise_kd_student"), kd_config, teacher, noise_kd,
                              common.loss_adaptor, common.loss_adaptor),
               torch.optim.Adam(noise_kd.parameters(), lr=args.lr), noise,
               num_steps=args.steps,
               batch_postprocessor=lambda z: (0.5 * (1 + torch.erf(z / 2 ** 0.5)),))

    # 4. DFAD
    torch.manual_seed(seed + 2)
    generator = MLPGenerator(noise_dim=32, output_shape=64, hidden_size=128,
                             output_activation="sigmoid")
    distiller = DFADDistiller(runs.config("dfad_student"), kd_config, teacher, dfad,
                              generator=generator, noise_shape=32, batch_size=batch,
                              generator_lr=args.generator_lr)
    with distiller:
        distiller.train(torch.optim.Adam(dfad.parameters(), lr=args.lr), num_steps=args.steps)

    # 5. DeepInversion, then KD on the synthesised images
    images, _ = synthesize_deep_inversion(
        teacher, 64, num_classes=10, num_batches=args.di_batches, batch_size=batch,
        iterations=args.di_iterations, output_dir=runs.output_dir("deepinversion"), lr=0.05,
        seed=seed, init=lambda shape, g: torch.rand(shape, generator=g), bn_weight=1.0,
        ce_weight=1.0, tv_weight=0.05, l2_weight=0.01, image_shape=(8, 8))
    synthetic = common.shuffled([(image,) for image in images.clamp(0, 1)], batch, seed)
    common.fit(BasicDistiller(runs.config("deepinversion_student"), kd_config, teacher,
                              inverted, common.loss_adaptor, common.loss_adaptor),
               torch.optim.Adam(inverted.parameters(), lr=args.lr), synthetic,
               num_steps=args.steps)
    return {name: common.accuracy(model, test, "x") for name, model in (
        ("teacher", teacher), ("student_alone", alone), ("noise_kd_student", noise_kd),
        ("dfad_student", dfad), ("deepinversion_student", inverted))}


def parse_args(argv=None):
    parser = common.ExampleParser(__doc__, "./output_data_free", quick_help="one seed, small")
    parser.add_seeds()
    parser.add_quick_argument("--steps", 150, 1500, "optimizer steps of every student")
    parser.add_quick_argument("--teacher-steps", 300, 800)
    parser.add_quick_argument("--di-batches", 4, 16, "DeepInversion batches of 64 images")
    parser.add_quick_argument("--di-iterations", 60, 200, "Adam steps per DeepInversion batch")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--generator-lr", type=float, default=1e-3)
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(threads=1)
    models = common.summarise(common.run_seeds(args, run_seed), population=True)
    for name, row in models.items():
        row["parameters"] = count_parameters(common.MLP([256, 256], batch_norm=True)
                                             if name == "teacher" else common.MLP([args.hidden]))
    common.print_accuracies(models, f"\n{'model':<24}test accuracy, mean ± std over seeds "
                                    f"{args.seeds}", 24)
    results = {"models": models, "scheme": "data_free",
               "run": common.run_record(args, started)}
    path = common.write_results(args.output_dir, results)
    print(f"{results['run']['seconds']:.0f} s; wrote {path}")
    return results


if __name__ == "__main__":
    main()
