"""Teacher assistants: a tiny student taught through a mid-size assistant, on handwritten digits.

scikit-learn's bundled digits (64 pixels, no download), a fixed stratified split per seed:
1347 training images and 450 test images (``--holdout``: 20% of the training images
instead of the test images, to choose settings). The teacher, an MLP 64 -> 256 -> 256 -> 10,
is trained on all training images; the students see the first ``--train-size`` (default
300), for ``--steps`` optimizer steps each, from the same initial weights:

1. ``student_alone``: the student (64 -> ``--student-width`` -> 10) on the labels;
2. ``kd_direct``: the student distilled from the teacher (τ²-scaled KL at ``--temperature``
   plus the labels, GeneralDistiller);
3. ``assistant``: the assistant (64 -> ``--assistant-width`` -> 10) distilled from the
   teacher, then ``via_assistant``: the student distilled from the assistant, the same
   loss (``textbrewer.schemes.distil_through_assistants``; Mirzadeh et al., AAAI 2020).

It prints the accuracies, mean ± std over ``--seeds`` with each row's better / tied / worse
seeds against ``student_alone``, and writes ``{output_dir}/results.json``.

Run:
    python examples/teacher_assistant.py            # 5 seeds
    python examples/teacher_assistant.py --quick    # seconds (the tests' run)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any, Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)

from textbrewer import BasicTrainer, DistillationConfig, GeneralDistiller  # noqa: E402
from textbrewer.schemes import distil_through_assistants  # noqa: E402

ROWS = ("teacher", "student_alone", "kd_direct", "assistant", "via_assistant")


HOLDOUT_IMAGES = 270  # --holdout: the last 20% of the 1347 training images


def run_seed(args: argparse.Namespace, seed: int) -> Dict[str, float]:
    data = common.transfer_split(seed, args.train_size,
                                 HOLDOUT_IMAGES if args.holdout else 0, key="x", flat=True)
    train = data["labelled"]
    runs = common.SeedRuns(args, seed, log_steps=10_000)
    adaptor = common.loss_adaptor
    score = lambda model: common.accuracy(model, data["test"], key="x")  # noqa: E731

    torch.manual_seed(seed)
    teacher = common.MLP([256, 256], dropout=0.1)
    runs.train_steps(BasicTrainer(runs.config("teacher"), teacher, adaptor), teacher,
                     runs.loader(data["teacher_train"]), args.teacher_steps)
    teacher.eval()
    torch.manual_seed(seed + 1)
    initial_student = common.MLP([args.student_width])
    initial_assistant = common.MLP([args.assistant_width])
    result = {"teacher": score(teacher)}

    alone = copy.deepcopy(initial_student)
    runs.train_steps(BasicTrainer(runs.config("student_alone"), alone, adaptor), alone,
                     runs.loader(train), args.steps)
    result["student_alone"] = score(alone)

    distill_config = DistillationConfig(kd_loss_type="kl", temperature=args.temperature,
                                        hard_label_weight=1.0, kd_loss_weight=1.0)
    direct = copy.deepcopy(initial_student)
    runs.train_steps(GeneralDistiller(runs.config("kd_direct"), distill_config, teacher, direct,
                                      adaptor, adaptor), direct, runs.loader(train), args.steps)
    result["kd_direct"] = score(direct)

    assistant, student = copy.deepcopy(initial_assistant), copy.deepcopy(initial_student)
    stages = distil_through_assistants(
        runs.config("via_assistant"), distill_config,
        [(teacher, adaptor), (assistant, adaptor), (student, adaptor)],
        lambda model: torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01),
        runs.loader(train), evaluate=score, num_steps=args.steps)
    result["assistant"], result["via_assistant"] = stages[0].metric, stages[1].metric
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.ExampleParser(__doc__, "./output_teacher_assistant",
                                  quick_help="one seed, few steps (tests)")
    parser.add_seeds(full=(0, 1, 2, 3, 4))
    parser.add_quick_argument("--steps", 40, 1200, "optimizer steps of each student")
    parser.add_quick_argument("--teacher-steps", 60, 1000, "optimizer steps of the teacher")
    parser.add_argument("--train-size", type=int, default=300)
    parser.add_argument("--student-width", type=int, default=8)
    parser.add_argument("--assistant-width", type=int, default=32)
    parser.add_argument("--holdout", action="store_true",
                        help="score on 20%% of the training images (to choose settings)")
    parser.add_training_options(lr=1e-2, temperature=4.0)
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(threads=1, quiet=True)
    runs = common.run_seeds(args, run_seed)
    models = common.summarise(runs, ROWS)
    baseline = models["student_alone"]["per_seed"]
    for name in ("kd_direct", "via_assistant"):
        models[name]["better_tied_worse"] = common.better_tied_worse(
            models[name]["per_seed"], baseline)
    results: Dict[str, Any] = {"models": models, "run": common.run_record(args, started)}
    where = "held-out training images" if args.holdout else "test images"
    print(f"\naccuracy on {where}, mean ± std over seeds {args.seeds} ({args.train_size} "
          f"labelled images for the students, {args.steps} steps each; student width "
          f"{args.student_width}, assistant width {args.assistant_width})")
    print(f"{'model':<16}{'accuracy':>18}  better/tied/worse vs alone")
    for name, row in models.items():
        versus = "/".join(map(str, row.get("better_tied_worse", []))) or ""
        print(f"{name:<16}{common.pm(row['accuracy'], row['std'], 9)}  {versus}")
    path = common.write_results(args.output_dir, results)
    print(f"wrote {path} ({results['run']['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
