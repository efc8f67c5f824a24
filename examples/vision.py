"""Vision: distil a CNN into a 14x smaller CNN on handwritten digits, eight ways.

The data is scikit-learn's bundled copy of the UCI optical-recognition digits (1797
grey-scale images of 8x8 pixels, no download), upscaled bilinearly to 16x16 so that the
convolutional feature maps keep some spatial extent (16 -> 8 -> 4).

One teacher CNN (widths 16-32-64) is trained once with ``BasicTrainer`` on all the
training images and their labels. The students get few labels (``--train-size``, 150 of
the 1347, stratified): the student alone trains on those only; a distilled student also
sees the other training images without their labels (an unlabelled *transfer set*, Hinton
et al. 2015), where only the teacher's terms apply. Every student run takes the same
number of optimizer steps: 15 passes over all training images (330 steps of 64; the long
runs 180), whatever its own data. For each seed, the student CNN (widths 4-8-16, same
layout) starts from the same initial weights and is trained in these ways:

====================  ====================================================================
student_alone         the labels only (``BasicTrainer``): the baseline of the rows below
kd                    labels + Hinton KD on the logits (``kd_loss_type='kl'``, temperature
                      4, weight 1)
dkd                   labels + Decoupled KD (``['dkd', 1, 1]``, temperature 4), warm-up
                      ``['warmup', 0.2]``; its target class on an unlabelled image is the
                      teacher's top class
fitnets               labels + a hint: student ``layer2`` (8 channels) through a learned
                      1x1 conv to teacher ``layer2`` (32 channels), ``'fitnet'`` loss
at                    labels + attention transfer (``'at'``) on ``layer1``-``layer3``
rkd                   labels + ``'rkd_distance'`` and ``'rkd_angle'`` on the penultimate
                      embeddings (the input of ``classifier``, ``capture='input'``)
crd                   labels + contrastive representation distillation (the ``'crd'``
                      loss module, with a queue of negatives) on the same embeddings
student_alone_mixup   the labels, with mixup of images and labels (``MixupLabels``): the
                      baseline of kd_function_matching
kd_function_matching  KD only (temperature 1, weight 1, no labels) with
                      ``teaching.FunctionMatching``: half the batches mixed (mixup), the
                      teacher and the student on the same mixed images
student_alone_long    the labels, ``long_epochs`` with warm-up + cosine: the baseline of
                      patient_kd (same epochs, same schedule; mixup or not chosen on the
                      held-out images)
patient_kd            ``recipes.PatientTeacher``: KD only (temperature 4), mixup function
                      matching on every batch, ``long_epochs``, warm-up + cosine
====================  ====================================================================

Every distilled run uses ``GeneralDistiller`` and a ``DistillationConfig``; features are
named by submodule (``module_T`` / ``module_S``), so the models need no adaptor for them.
The table reports, per method, the test accuracy after the LAST step (no checkpoint is
picked), mean and standard deviation over the seeds, and the change against the row's
baseline: the student alone with the same steps and augmentation (added to the runs
when its row is asked for). Results also go to ``{output_dir}/results.json``.

Run:
    python examples/vision.py                          # 5 seeds: about 3 minutes of CPU time
    python examples/vision.py --quick                  # about 8 s of CPU (used by the tests)
    python examples/vision.py --seeds 0 1 --methods student_alone kd crd
    python examples/vision.py --holdout                # score on a held-out part of the
                                                       # training images (for tuning)
    python examples/vision.py --train-size 0           # every label, no transfer set (the
                                                       # previous version's setting)
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)

import textbrewer  # noqa: E402
from textbrewer import (BasicTrainer, CustomMatch, DistillationConfig,  # noqa: E402
                        GeneralDistiller, TrainingConfig)
from textbrewer.recipes import PatientTeacher, WarmupCosine  # noqa: E402
from textbrewer.teaching import FunctionMatching, mixup  # noqa: E402
from textbrewer.utils import count_parameters  # noqa: E402

IMAGE_SIZE = 16
TRAIN_SIZE = 150  # labelled images of the students; the teacher has all the training labels
TEACHER_CONFIG = dict(widths=[16, 32, 64], num_classes=10)
STUDENT_CONFIG = dict(widths=[4, 8, 16], num_classes=10)
METHODS = ("student_alone", "kd", "dkd", "fitnets", "fitnets_kd", "at", "at_kd", "rkd", "crd",
           "student_alone_mixup", "kd_function_matching", "student_alone_long", "patient_kd")
# Not in the default table: the two losses of "Combining methods" in docs/methods.md.
EXTRA_METHODS = ("crd_kd",)


# ---------------------------------------------------------------------------------- data
def load_data(holdout: bool, train_size: int = 0, transfer: bool = True,
              split_seed: int = 0) -> Dict[str, Dict[str, torch.Tensor]]:
    """The splits, each ``{'images', 'labels'}``; images (N, 1, 16, 16) in [0, 1].

    - ``train``: every training image, labelled: the teacher's data;
    - ``labelled``: ``train_size`` of them (stratified; all when 0): the students' labels,
      and all the student alone trains on;
    - ``transfer``: those, plus the other training images with the label
      ``common.UNLABELLED`` (-100): what the distilled students train on (the hard-label
      term sees the labelled rows only, the teacher's terms every row). Without
      ``transfer`` (or with ``train_size`` 0) it is ``labelled``;
    - ``eval``: the test images.

    The split is fixed (``split_seed``), so the teacher is trained once and every seed
    of every method is scored on the same images: seeds vary the student's initial
    weights and the order of the batches, nothing else.

    With ``holdout`` the test images are not touched: 20% of the training images are
    held out and scored instead. That is the split to choose settings on.
    """
    digits = load_digits()
    images = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    # Bilinear upscaling: smoother than nearest, and the 3x3 convolutions see strokes
    # two pixels wide instead of one.
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                           align_corners=False)
    labels = torch.from_numpy(digits.target).long()
    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=0.25, random_state=split_seed,
                                   stratify=digits.target)
    if holdout:
        train, test = train_test_split(train, test_size=0.2, random_state=split_seed,
                                       stratify=digits.target[train])
    data = {"train": {"images": images[train], "labels": labels[train]},
            "eval": {"images": images[test], "labels": labels[test]}}
    if not train_size or train_size >= len(train):
        data["labelled"] = data["transfer"] = data["train"]
        return data
    labelled, unlabelled = train_test_split(train, train_size=train_size,
                                            random_state=split_seed,
                                            stratify=digits.target[train])
    data["labelled"] = {"images": images[labelled], "labels": labels[labelled]}
    if not transfer:
        data["transfer"] = data["labelled"]
        return data
    hidden = torch.full((len(unlabelled),), common.UNLABELLED, dtype=torch.long)
    data["transfer"] = {"images": torch.cat([images[labelled], images[unlabelled]]),
                        "labels": torch.cat([labels[labelled], hidden])}
    return data


@torch.no_grad()
def with_teacher_targets(split: Dict[str, torch.Tensor],
                         teacher: nn.Module) -> Dict[str, torch.Tensor]:
    """``split`` plus ``targets`` (N,): the gold label of a labelled image, the teacher's
    top class of an unlabelled one. Decoupled KD splits the distributions into a target
    class and the rest, so it needs one per row; on the transfer images the teacher's
    prediction is the only one there is."""
    with common.evaluating(teacher):
        device = next(teacher.parameters()).device
        predicted = teacher(split["images"].to(device))["logits"].argmax(-1).cpu()
    labelled = split["labels"] != common.UNLABELLED
    return {**split, "targets": torch.where(labelled, split["labels"], predicted)}


class DictDataset(torch.utils.data.Dataset):
    """Examples as dicts, so batches are dicts and reach the model as keyword arguments."""

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {key: value[i] for key, value in self.tensors.items()}


def train_loader(split: Dict[str, torch.Tensor], batch_size: int,
                 seed: int) -> torch.utils.data.DataLoader:
    # A seeded generator: the shuffles are the same on every run of the same seed.
    return common.shuffled(DictDataset(split), batch_size, seed)


# ---------------------------------------------------------------------------------- models
ConvNet = common.ConvNet  # layer1 (C1, 8, 8), layer2 (C2, 4, 4), layer3 (C3, 4, 4) at 16x16


def adaptor(batch: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Logits for the KD term, the loss for the hard-label term, and the labels, which
    Decoupled KD needs (it splits the distribution into the gold class and the rest): the
    batch's ``targets`` where it has them (:func:`with_teacher_targets`), else its
    ``labels``. Intermediate features are captured by module name, so they are not listed.

    A batch mixed by ``FunctionMatching`` (``labels='drop'``) has no labels: then only the
    logits are returned, and that batch trains on the teacher alone."""
    if "labels" not in batch:
        return {"logits": outputs["logits"]}
    return {"logits": outputs["logits"], "losses": outputs["loss"],
            "labels": batch.get("targets", batch["labels"])}


class MixupLabels:
    """The baseline's mixup (Zhang et al., 2018): a ``batch_postprocessor`` that mixes the
    images like ``FunctionMatching`` and the labels with the same weight, as soft targets
    (B, 10) (``F.cross_entropy`` takes class probabilities). ``FunctionMatching`` itself
    can only drop the labels or keep the unmixed ones, so the student alone gets this."""

    def __init__(self, alpha: float = 1.0, seed: int = 0, num_classes: int = 10):
        self.alpha, self.num_classes = alpha, num_classes
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        images, labels = batch["images"], batch["labels"]
        partner = torch.randperm(images.size(0), generator=self.generator)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator))
        weight = float(np.random.default_rng(seed).beta(self.alpha, self.alpha))
        targets = F.one_hot(labels, self.num_classes).float()
        return {"images": mixup(images, partner, weight),
                "labels": targets * weight + targets[partner] * (1 - weight)}


# ---------------------------------------------------------------------------------- methods
# Settings chosen with --holdout (validation images carved out of the training split),
# never on the test images; the grids tried are in examples/README.md. Each can be
# overridden on the command line (the search used those options).
SETTINGS = dict(
    temperature=4.0,        # kd (and crd_kd); from 1, 2, 4 x weight 0.5, 1 x lr 3e-2, 1e-1
    kd_weight=1.0,          # with 'kl' (T^2-scaled), CE + kd_weight x KD
    dkd_temperature=4.0,    # dkd: the paper's
    dkd_beta=1.0,           # DKD: alpha 1 (target vs rest), beta (among the non-targets);
                            # from 1, 2, 8 x temperature 1, 4 x lr 3e-2, 1e-1
    dkd_warmup=0.2,         # DKD's weight ramps 0 -> 1 over this fraction of training
    fm_temperature=1.0,     # kd_function_matching: KD only (weight 1) at this temperature,
    fm_probability=0.5,     # with this fraction of the batches mixed
    long_epochs=180,        # student_alone_long and patient_kd: 12x the budget
    alone_long_mix="mixup",  # student_alone_long: 'mixup' (images and labels) or 'none'
    patient_temperature=4.0,  # patient_kd
    fitnet_weight=1.0,      # fitnets, fitnets_kd: the hint's weight; from 0.3, 1, 3, 10
    at_weight=1.0,          # at, at_kd: per layer; from 1, 3, 10, 30 (and 100, far worse)
    crd_weight=0.8,         # crd, crd_kd: the paper's beta; from 0.2, 0.8, 3.2
)
RKD_WEIGHTS = (25.0, 50.0)  # distance, angle: the paper's
CRD_OPTIONS = dict(feat_dim=64, queue_size=512, temperature=0.1)
# Each row's baseline: the student alone with the same number of epochs.
BASELINES = {"kd_function_matching": "student_alone_mixup",
             "patient_kd": "student_alone_long"}


def method_config(method: str, teacher: nn.Module,
                  student: nn.Module) -> Tuple[DistillationConfig, List[CustomMatch]]:
    """The ``DistillationConfig`` (and custom matches) of one method.

    Every method keeps the hard labels (``hard_label_weight=1``): it adds a term to the
    student's own cross-entropy. ``kd_loss_weight=0`` switches the logits term off.
    (``patient_kd``'s config comes from ``PatientTeacher``, in ``distil``.)
    """
    width_T, width_S = TEACHER_CONFIG["widths"], STUDENT_CONFIG["widths"]
    common = dict(hard_label_weight=1.0, temperature=SETTINGS["temperature"],
                  kd_loss_type="kl")
    # The penultimate embedding: what the classifier receives (N, C3). No adaptor and no
    # change to forward() is needed to get it: a forward pre-hook records the input.
    embedding = dict(module_T="classifier", module_S="classifier", capture="input")
    crd = dict(loss="crd", weight=SETTINGS["crd_weight"], **embedding,
               loss_options=dict(dim_in=width_S[2], dim_out=width_T[2], **CRD_OPTIONS))
    if method == "kd":
        return DistillationConfig(kd_loss_weight=SETTINGS["kd_weight"], **common), []
    if method == "kd_function_matching":
        # KD alone (weight 1): FunctionMatching(labels='drop') removes the labels from
        # every batch, mixed or not, so there is no hard-label term to weigh.
        return DistillationConfig(kd_loss_weight=1.0, **{
            **common, "temperature": SETTINGS["fm_temperature"], "hard_label_weight": 0.0}), []
    if method == "dkd":
        # DKD's NCKD term is strong early on, when the student's logits are still
        # random: the paper ramps the whole term up linearly (here over 20% of training).
        # A weight schedule's value replaces kd_loss_weight (0 -> 1).
        return DistillationConfig(**{**common, "kd_loss_type": ["dkd", 1.0, SETTINGS["dkd_beta"]],
                                     "temperature": SETTINGS["dkd_temperature"]},
                                  kd_loss_weight_scheduler=["warmup", SETTINGS["dkd_warmup"]]), []
    if method in ("fitnets", "fitnets_kd"):
        # The hint: student layer2 (N, 8, 4, 4), through a learned 1x1 conv + batch norm,
        # regresses teacher layer2 (N, 32, 4, 4). The same match in the config form is
        #   {"module_T": "layer2", "module_S": "layer2", "loss": "fitnet",
        #    "proj": ["conv1x1", 8, 32]}
        # (its regressor is then drawn when the distiller is built, so the numbers differ
        # slightly from the table in examples/README.md, which was measured with this
        # CustomMatch).
        # fitnets_kd adds KD on the logits in the same stage: the hint alone gives the
        # unlabelled images no class information (FitNets' own second stage is KD).
        hint = CustomMatch(module_T=teacher.layer2, module_S=student.layer2,
                           weight=SETTINGS["fitnet_weight"], loss="fitnet",
                           proj_func=textbrewer.PROJ_MAP["conv1x1"](width_S[1], width_T[1]))
        kd_weight = SETTINGS["kd_weight"] if method == "fitnets_kd" else 0.0
        return DistillationConfig(kd_loss_weight=kd_weight, **common), [hint]
    if method in ("at", "at_kd"):
        # Spatial attention maps need equal H x W on both sides, not equal channels.
        # at_kd: AT + KD, the combination the AT paper reports best.
        matches = [dict(module_T=name, module_S=name, loss="at", weight=SETTINGS["at_weight"])
                   for name in ("layer1", "layer2", "layer3")]
        kd_weight = SETTINGS["kd_weight"] if method == "at_kd" else 0.0
        return DistillationConfig(kd_loss_weight=kd_weight, intermediate_matches=matches,
                                  **common), []
    if method == "rkd":
        # Relations between the examples of a batch: widths 16 and 64 need no projection.
        matches = [dict(loss="rkd_distance", weight=RKD_WEIGHTS[0], **embedding),
                   dict(loss="rkd_angle", weight=RKD_WEIGHTS[1], **embedding)]
        return DistillationConfig(kd_loss_weight=0.0, intermediate_matches=matches,
                                  **common), []
    if method == "crd":
        # The CRD module (two embedding heads and the queue) is built from loss_options
        # and trained with the student.
        return DistillationConfig(kd_loss_weight=0.0, intermediate_matches=[crd], **common), []
    if method == "crd_kd":
        return DistillationConfig(kd_loss_weight=SETTINGS["kd_weight"], intermediate_matches=[crd],
                                  **common), []
    raise ValueError(f"unknown method {method!r}; choose from {METHODS + EXTRA_METHODS}")


# ---------------------------------------------------------------------------------- training
def train_config(output_dir: str, device: torch.device, epochs: int, seed: int) -> TrainingConfig:
    # One checkpoint, after the last epoch: the table scores the final model.
    return TrainingConfig(device=device, output_dir=output_dir, ckpt_epoch_frequency=epochs,
                          seed=seed, log_steps=100)


def cosine_schedule(total_steps: int) -> Dict[str, Any]:
    """The long runs' schedule: PatientTeacher's (5% linear warm-up, cosine decay)."""
    return dict(scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                scheduler_args={"lr_lambda": WarmupCosine(total_steps,
                                                          int(0.05 * total_steps))})


def budget(data, args: argparse.Namespace, epochs: int) -> int:
    """Optimizer steps of every student run: ``epochs`` passes over all the training
    images (``train``), whatever a run's own data. The student alone on a few labels
    takes as many steps as a distilled student on the whole transfer set."""
    return epochs * math.ceil(len(data["train"]["labels"]) / args.batch_size)


def train_alone(model: nn.Module, data, args: argparse.Namespace, device: torch.device,
                epochs: int, seed: int, output_dir: str, mix: str = "none",
                long: bool = False, split: str = "labelled") -> None:
    """Supervised training on the labels of ``split``: the teacher (``train``), or the
    student baseline (``labelled``, for :func:`budget` steps). ``mix`` 'mixup' mixes
    images and labels (``MixupLabels``); ``long`` uses the cosine schedule of the long
    runs instead of the linear decay."""
    loader = train_loader(data[split], args.batch_size, seed)
    steps = budget(data, args, epochs)
    optimizer, schedule = common.optimizer_and_schedule(model, args.lr, steps,
                                                        weight_decay=5e-4)
    if long:
        schedule = cosine_schedule(steps)
    if mix == "mixup":
        schedule["batch_postprocessor"] = MixupLabels(seed=seed)
    trainer = BasicTrainer(train_config(output_dir, device, epochs, seed), model, adaptor)
    common.fit(trainer, optimizer, loader, num_steps=steps, **schedule)


def distil(method: str, teacher: nn.Module, student: nn.Module, data,
           args: argparse.Namespace, device: torch.device, seed: int,
           output_dir: str) -> DistillationConfig:
    """The student learns from the teacher with ``method``'s losses on the transfer set,
    for :func:`budget` steps of ``args.epochs`` (``patient_kd``: ``long_epochs``)."""
    # Projections and loss modules draw their initial weights when the distiller is
    # built: seed first, so each (method, seed) run is reproducible.
    torch.manual_seed(seed)
    split = data["transfer_targets"] if method == "dkd" else data["transfer"]
    loader = train_loader(split, args.batch_size, seed)
    epochs = args.long_epochs if method == "patient_kd" else args.epochs
    steps = budget(data, args, epochs)
    optimizer, schedule = common.optimizer_and_schedule(student, args.lr, steps,
                                                        weight_decay=5e-4)
    custom_matches: List[CustomMatch] = []
    if method == "patient_kd":
        # Beyer et al.: KD only (no labels), mixup on the one view both models see,
        # a long warm-up + cosine schedule.
        recipe = PatientTeacher(steps, input_key="images", mix="mixup",
                                temperature=SETTINGS["patient_temperature"],
                                warmup_fraction=0.05, seed=seed)
        distill_config, schedule = recipe.distill_config, recipe.train_options()
    else:
        distill_config, custom_matches = method_config(method, teacher, student)
    if method == "kd_function_matching":
        # The teacher labels the very mixed images the student sees; a fraction
        # fm_probability of the batches is mixed, the others are the clean images.
        schedule["batch_postprocessor"] = FunctionMatching(
            "images", mode="mixup", alpha=1.0, probability=SETTINGS["fm_probability"],
            labels="drop", seed=seed)
    distiller = GeneralDistiller(train_config(output_dir, device, epochs, seed),
                                 distill_config, model_T=teacher, model_S=student,
                                 adaptor_T=adaptor, adaptor_S=adaptor,
                                 custom_matches=custom_matches)
    common.fit(distiller, optimizer, loader, num_steps=steps, **schedule)
    distiller.remove_hooks()  # the teacher is shared by the next runs
    return distill_config


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = common.ExampleParser(__doc__, "./output_vision",
                                  quick_help="a much smaller run, for tests (seconds)")
    parser.add_quick_argument("--epochs", 2, 15, "the budget of every student run, alone or "
                              "distilled, in passes over all the training images (the "
                              "same number of steps for all, whatever a run's data)")
    parser.add_quick_argument("--teacher-epochs", 4, 30, "epochs of the teacher")
    parser.add_seeds((0, 1, 2, 3, 4), "student seeds: initial weights and batch order")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=list(METHODS + EXTRA_METHODS),
                        help="which runs (student_alone is always added: it is the baseline)")
    parser.add_argument("--train-size", type=int, default=TRAIN_SIZE,
                        help=f"labelled training images of the students (default {TRAIN_SIZE},"
                             f" stratified; 0: all); the teacher has every label")
    parser.add_argument("--no-transfer", dest="transfer", action="store_false",
                        help="distil on the labelled images only (no unlabelled transfer "
                             "images)")
    parser.add_argument("--holdout", action="store_true",
                        help="score on 20%% of the training images held out, not on the "
                             "test images: use it to choose settings")
    for name, value in SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, str):
            parser.add_argument(flag, default=value, choices=["mixup", "none"],
                                help=f"(default {value}; chosen with --holdout)")
        else:
            parser.add_argument(flag, type=type(value), default=value,
                                help=f"(default {value}; chosen with --holdout)")
    # 3e-2: the student alone's best at the full budget (1e-1 tied it), for every student
    parser.add_training_options(lr=3e-2, batch_size=64)
    parser.add_device()
    parser.add_threads("torch CPU threads (default 1: these convolutions are too small to gain "
                       "from more, and on a busy machine extra threads wait on each other)")
    args = parser.parse_args(argv)
    if args.quick:
        args.long_epochs = 3
    SETTINGS.update({name: getattr(args, name) for name in SETTINGS})
    # The baseline first: every other row is compared with it.
    wanted = [BASELINES.get(m) for m in args.methods if m in BASELINES] + args.methods
    args.methods = ["student_alone"] + [m for m in METHODS + EXTRA_METHODS
                                        if m in wanted and m != "student_alone"]
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(args.threads, quiet=True)  # 7 x seeds runs: the console shows the table
    device = torch.device(args.device)
    data = load_data(args.holdout, args.train_size, args.transfer)
    scored_on = "held-out training images" if args.holdout else "test images"
    print(f"digits {IMAGE_SIZE}x{IMAGE_SIZE}: {len(data['train']['labels'])} training images "
          f"(students: {len(data['labelled']['labels'])} labelled, distilled on "
          f"{len(data['transfer']['labels'])}), "
          f"{len(data['eval']['labels'])} {scored_on}; device {device}; teacher "
          f"{args.teacher_epochs} epochs, students {args.epochs} epochs; seeds {args.seeds}")

    torch.manual_seed(1000)  # the teacher: one fixed seed, apart from the students'
    teacher = ConvNet(**TEACHER_CONFIG).to(device)
    train_alone(teacher, data, args, device, args.teacher_epochs, seed=1000,
                output_dir=os.path.join(args.output_dir, "teacher"), split="train")
    teacher_accuracy = common.accuracy(teacher, data["eval"], "images", device)
    print(f"teacher: {teacher_accuracy:.4f}")
    if "dkd" in args.methods:
        data["transfer_targets"] = with_teacher_targets(data["transfer"], teacher)

    accuracies: Dict[str, List[float]] = {method: [] for method in args.methods}
    configs: Dict[str, Any] = {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        student_init = ConvNet(**STUDENT_CONFIG)  # every method starts from these weights
        for method in args.methods:
            student = copy.deepcopy(student_init).to(device)
            run_dir = os.path.join(args.output_dir, method, f"seed{seed}")
            if method == "student_alone":
                train_alone(student, data, args, device, args.epochs, seed, run_dir)
                configs[method] = None
            elif method == "student_alone_mixup":
                train_alone(student, data, args, device, args.epochs, seed, run_dir,
                            mix="mixup")
                configs[method] = None
            elif method == "student_alone_long":
                train_alone(student, data, args, device, args.long_epochs, seed, run_dir,
                            mix=args.alone_long_mix, long=True)
                configs[method] = None
            else:
                configs[method] = distil(method, teacher, student, data, args, device, seed,
                                         run_dir).to_dict()
            accuracies[method].append(common.accuracy(student, data["eval"], "images", device))
            print(f"  seed {seed} {method:<22}{accuracies[method][-1]:.4f}", flush=True)

    parameters_S = count_parameters(ConvNet(**STUDENT_CONFIG))
    results: Dict[str, Any] = {"models": {"teacher": {"accuracy": teacher_accuracy,
                                                      "parameters": count_parameters(teacher)}}}
    for method in args.methods:
        mean, std = common.mean_std(accuracies[method])
        base_name = BASELINES.get(method, "student_alone")
        if base_name not in accuracies:
            base_name = "student_alone"
        baseline = accuracies[base_name]
        deltas = [a - b for a, b in zip(accuracies[method], baseline)]
        alone = [a - b for a, b in zip(accuracies[method], accuracies["student_alone"])]
        results["models"][method] = {
            "accuracy_mean": mean, "accuracy_std": std, "seeds": list(args.seeds),
            "accuracies": accuracies[method], "parameters": parameters_S,
            "delta_vs_student_alone": statistics.fmean(alone), "baseline": base_name,
            "delta_vs_baseline": statistics.fmean(deltas),
            "better_tied_worse": common.better_tied_worse(accuracies[method], baseline),
            "distill_config": configs[method]}
    results["size_ratio"] = results["models"]["teacher"]["parameters"] / parameters_S
    results["configs"] = {"teacher": TEACHER_CONFIG, "student": STUDENT_CONFIG,
                          "image_size": IMAGE_SIZE}
    results["run"] = common.run_record(
        args, started, ["epochs", "teacher_epochs", "seeds", "methods", "lr", "batch_size",
                        "quick", "holdout", "train_size", "transfer"],
        settings={"scored_on": scored_on, "device": str(device), **SETTINGS},
        torch=torch.__version__)

    count = len(args.seeds)
    print()
    print(f"{'method':<22}{'accuracy (mean ± std)':>24}{'Δ vs baseline':>15}"
          f"{'better/tied/worse':>19}  baseline (same epochs)")
    print(f"{'teacher':<22}{teacher_accuracy:>24.4f}")
    for method in args.methods:
        row = results["models"][method]
        spread = common.pm(row["accuracy_mean"], row["accuracy_std"])
        own = method == row["baseline"]
        delta = "" if own else f"{100 * row['delta_vs_baseline']:+.2f}"
        wins = "" if own else "/".join(map(str, row["better_tied_worse"]))
        print(f"{method:<22}{spread:>24}{delta:>15}{wins:>19}  {'' if own else row['baseline']}")
    print(f"{scored_on}, last epoch, {count} seed{'s' * (count > 1)}; Δ in points. Teacher "
          f"{results['models']['teacher']['parameters']:,d} parameters, students "
          f"{parameters_S:,d} ({results['size_ratio']:.1f}x smaller); "
          f"{results['run']['seconds']:.0f} s")
    print(f"wrote {common.write_results(args.output_dir, results)}")
    return results


if __name__ == "__main__":
    main()
