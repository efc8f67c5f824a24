"""Shared parts of the examples: the digits data, seeded loaders, the runs of one seed,
mean ± std over seeds, results.json and the command-line boilerplate.

Each example keeps what is particular to it (its models, its distillation, its table);
what they all do the same way is written once, here. The helpers make the random draws
of the code they replaced, in the same order (loaders shuffle with generators of their
own; only building a model draws from torch's global generator, where the example seeds
it), so an example moved onto them prints the same numbers. (``_text_data.py`` beside it
holds the text examples' data, tokenizer, BERT sizes and training helpers.)

Examples import it from their own folder, so they run from the repository root and
from inside ``examples/`` alike::

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as common  # noqa: E402
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

import textbrewer
from textbrewer import TrainingConfig

Examples = List[Dict[str, torch.Tensor]]


# ------------------------------------------------------------------------- command line
def _shown(value: Any) -> str:
    if value is None:
        return "all"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def at_least_one(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 *names: str) -> None:
    """Exits with ``--name must be at least 1`` for the first of ``names`` below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


class ExampleParser(argparse.ArgumentParser):
    """The examples' command line: described by the first line of ``doc``, with
    ``--output-dir`` (default ``output_dir``) and ``--quick`` first, and options whose
    default follows ``--quick`` (:meth:`add_quick_argument`), filled in and checked by
    :meth:`parse_args`. The options keep the order they are added in: so does
    ``vars(args)``, and the results.json that records it.

    Example::

        parser = ExampleParser(__doc__, "./output_example")
        parser.add_seeds()                      # --seeds: 0 1 2, or 0 with --quick
        parser.add_quick_argument("--steps", 60, 600, "optimizer steps of each student")
        args = parser.parse_args(["--quick"])   # args.seeds == [0], args.steps == 60
    """

    def __init__(self, doc: str, output_dir: str,
                 quick_help: str = "a much smaller run, for tests",
                 output_help: str = "checkpoints (gs*.pkl) and results.json go here"):
        super().__init__(description=doc.split("\n")[0])
        self._quick_defaults: Dict[str, Tuple[Any, Any]] = {}
        self._positive: List[str] = []
        self._seeds = False
        self.add_argument("--output-dir", default=output_dir, help=output_help)
        self.add_argument("--quick", action="store_true", help=quick_help)

    def add_quick_argument(self, flag: str, quick: Any, full: Any, help: str = "",
                           type: Callable = int, positive: Optional[bool] = None,
                           **options: Any) -> None:
        """``flag``, None unless given: then ``full``, or ``quick`` with ``--quick`` (the
        help says both; None shows as "all"). ``positive`` (default: for ``int`` options)
        requires a value of at least 1."""
        defaults = f"default {_shown(full)}; {_shown(quick)} with --quick"
        action = self.add_argument(flag, type=type, default=None,
                                   help=f"{help} ({defaults})" if help else defaults, **options)
        self._quick_defaults[action.dest] = (quick, full)
        if positive is None:
            positive = type is int
        if positive:
            self._positive.append(action.dest)

    def add_seeds(self, full: Sequence[int] = (0, 1, 2), help: str = "") -> None:
        """``--seeds S [S ...]``: ``full``, or 0 alone with ``--quick``; non-negative."""
        self.add_quick_argument("--seeds", [0], list(full), help, nargs="+", positive=False)
        self._seeds = True

    def add_threads(self, help: str) -> None:
        """``--threads N`` (default 1, at least 1): torch's CPU threads (:func:`start`)."""
        self.add_argument("--threads", type=int, default=1, help=help)
        self._positive.append("threads")

    def require_positive(self, *names: str) -> None:
        """Options (by their ``dest``) that :meth:`parse_args` requires to be at least 1."""
        self._positive.extend(names)

    def add_training_options(self, lr: float, batch_size: int = 32,
                             temperature: Optional[float] = None,
                             lr_help: Optional[str] = None) -> None:
        """``--lr``, ``--batch-size`` and (when given a default) ``--temperature``."""
        self.add_argument("--lr", type=float, default=lr, help=lr_help)
        self.add_argument("--batch-size", type=int, default=batch_size)
        if temperature is not None:
            self.add_argument("--temperature", type=float, default=temperature)

    def add_transfer_options(self, train_size: int = 300,
                             train_size_help: str = "labelled training images of the students"
                             ) -> None:
        """``--train-size``, ``--no-transfer`` and ``--validation``, passed to
        :func:`transfer_split`."""
        self.add_argument("--train-size", type=int, default=train_size,
                          help=f"{train_size_help} (default {train_size})")
        self.add_argument("--no-transfer", dest="transfer", action="store_false",
                          help="distil on the labelled images only (no unlabelled transfer "
                               "data)")
        self.add_validation_option()

    def add_validation_option(self) -> None:
        """``--validation N``: score the last N training images, held out of all training."""
        self.add_argument("--validation", type=int, default=0,
                          help="tuning: score the last N training images, held out of all "
                               "training, instead of the test split (default 0: the test "
                               "split)")

    def add_device(self) -> None:
        """``--device``: CUDA when there is one, else the CPU."""
        self.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    def parse_args(self, args: Optional[Sequence[str]] = None,
                   namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
        """Parses, then fills the ``--quick`` defaults and checks the values."""
        result = super().parse_args(args, namespace)
        for name, (quick, full) in self._quick_defaults.items():
            if getattr(result, name) is None:
                value = quick if result.quick else full
                setattr(result, name, list(value) if isinstance(value, list) else value)
        at_least_one(self, result, *(name for name in self._positive
                                     if getattr(result, name) is not None))
        if self._seeds and any(seed < 0 for seed in result.seeds):
            self.error("--seeds must be non-negative")
        return result


def start(threads: Optional[int] = 1, quiet: bool = False) -> float:
    """The start of a run: torch's CPU threads (None: torch's default; the digits models
    are tiny, and on a busy machine extra threads only wait on each other), the library's
    progress lines off with ``quiet`` (warnings still show), and the clock: returns
    ``time.perf_counter()``."""
    if threads is not None:
        torch.set_num_threads(threads)
    if quiet:
        textbrewer.logs.set_verbosity("warning")
    return time.perf_counter()


def run_record(args: argparse.Namespace, started: float, names: Optional[Sequence[str]] = None,
               settings: Optional[Dict[str, Any]] = None, **extra: Any) -> Dict[str, Any]:
    """``results['run']``: the options ``names`` (default: all but ``--output-dir``), then
    ``settings``, the textbrewer version, ``extra``, and the seconds since ``started``."""
    if names is None:
        names = [name for name in vars(args) if name != "output_dir"]
    return {**{name: getattr(args, name) for name in names}, **(settings or {}),
            "textbrewer": textbrewer.__version__, **extra,
            "seconds": round(time.perf_counter() - started, 1)}


def write_results(output_dir: str, results: Dict[str, Any]) -> str:
    """Writes ``{output_dir}/results.json`` (indent 2) atomically: into a temporary file
    beside it, then renamed over it, so a reader never sees half a file. Returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "results.json")
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


# ------------------------------------------------------------------------- the digits
def digits_split(seed: int, flat: bool = False,
                 test_size: float = 0.25) -> Tuple[np.ndarray, np.ndarray, np.ndarray,
                                                   np.ndarray]:
    """scikit-learn's bundled digits (1797 images of 8x8 pixels, no download), pixels
    scaled to [0, 1], split stratified and seeded (1347 / 450 images with the default
    ``test_size``).

    Returns:
        ``(train_x, test_x, train_y, test_y)``: float32 images (N, 8, 8), or (N, 64) with
        ``flat``, and int64 digits (N,).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    pixels = ((digits.data if flat else digits.images) / 16.0).astype(np.float32)
    return train_test_split(pixels, digits.target, test_size=test_size, random_state=seed,
                            stratify=digits.target)


def digit_examples(pixels: np.ndarray, digits: np.ndarray, key: str = "image",
                   label_of: Callable[[int], int] = int) -> Examples:
    """One example ``{key: (8, 8) or (64,) float, 'labels': () long}`` per image (sharing
    memory with ``pixels``); ``label_of`` maps a digit to the task's label."""
    return [{key: torch.from_numpy(x), "labels": torch.tensor(label_of(int(y)))}
            for x, y in zip(pixels, digits)]


def digits_data(seed: int, key: str = "image", flat: bool = False,
                train_size: Optional[int] = None) -> Dict[str, Examples]:
    """The split of :func:`digits_split` as examples (:func:`digit_examples`):
    ``teacher_train`` (all 1347 training images), ``train`` (their first ``train_size``,
    all when None or 0: the students' data) and ``test`` (450)."""
    train_x, test_x, train_y, test_y = digits_split(seed, flat)
    teacher_train = digit_examples(train_x, train_y, key)
    return {"teacher_train": teacher_train, "train": teacher_train[:train_size or None],
            "test": digit_examples(test_x, test_y, key)}


UNLABELLED = -100  # the label of a transfer image: ignored by the hard-label term


def without_labels(examples: Examples, key: str = "image") -> Examples:
    """The examples' ``key`` with label :data:`UNLABELLED`: transfer data for KD."""
    return [{key: example[key], "labels": torch.tensor(UNLABELLED)} for example in examples]


def transfer_split(seed: int, train_size: int, validation: int = 0, transfer: bool = True,
                   key: str = "image", flat: bool = False) -> Dict[str, Any]:
    """The digits for students with few labels and an unlabelled transfer set.

    ``teacher_train`` (all training images, labelled), ``labelled`` (their first
    ``train_size``: the students' labels), ``transfer`` (those plus the other training
    images with label :data:`UNLABELLED`, for KD; ``labelled`` without ``transfer``) and
    ``test`` (stacked): the test split, or with ``validation = N`` the last N training
    images, then held out of all training. Command-line options:
    :meth:`ExampleParser.add_transfer_options`.
    """
    data = digits_data(seed, key=key, flat=flat)
    train, test = hold_out(data["teacher_train"], data["test"], validation)
    labelled, transfer_examples = labelled_and_transfer(train, train_size, transfer, key)
    return {"teacher_train": train, "labelled": labelled, "transfer": transfer_examples,
            "test": stack(test)}


def hold_out(train: Sequence, test: Sequence, validation: int = 0) -> Tuple[Sequence, Sequence]:
    """``(train, test)`` as given, or with ``validation = N`` the training rows but the last
    N, and those N in place of the test rows (lists or arrays alike)."""
    if not validation:
        return train, test
    return train[:-validation], train[-validation:]


def labelled_and_transfer(examples: Examples, train_size: Optional[int], transfer: bool = True,
                          key: str = "image") -> Tuple[Examples, Examples]:
    """``(labelled, transfer)``: the first ``train_size`` examples (all with ``None``), and
    those plus the rest under label :data:`UNLABELLED`, the KD data (without ``transfer``
    the labelled examples alone)."""
    labelled = examples[:train_size]
    if not transfer:
        return labelled, labelled
    return labelled, labelled + without_labels(examples[len(labelled):], key)


def scored_split(validation: int) -> str:
    """What the accuracies are measured on, for a printed title: ``'test'``, or the held-out
    training images of ``--validation``."""
    return f"the last {validation} training images" if validation else "test"


def stack(examples: Examples) -> Dict[str, torch.Tensor]:
    """Examples as one batch: each key's tensors stacked, (N, ...)."""
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def shuffled(examples: Any, batch_size: int, seed: int, collate_fn: Optional[Callable] = None,
             **options: Any) -> torch.utils.data.DataLoader:
    """Shuffled batches from a generator of their own, seeded with ``seed``: the same
    batches in the same order on every run and for every model, and torch's global
    generator untouched. ``options`` go to the ``DataLoader`` (e.g. ``drop_last``)."""
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed),
                                       collate_fn=collate_fn, **options)


# ------------------------------------------------------------------------- models
class MLP(torch.nn.Module):
    """``x`` (B, in_features) -> ``{'logits': (B, num_labels)}``, plus ``'loss'`` (the
    cross-entropy) when ``labels`` (B,) are given.

    Each hidden width adds ``Linear``, then ``BatchNorm1d`` with ``batch_norm``, ``ReLU``,
    and ``Dropout`` when ``dropout`` > 0.
    """

    def __init__(self, hidden: Sequence[int], dropout: float = 0.0, batch_norm: bool = False,
                 in_features: int = 64, num_labels: int = 10):
        super().__init__()
        layers: List[torch.nn.Module] = []
        width = in_features
        for size in hidden:
            layers.append(torch.nn.Linear(width, size))
            layers += [torch.nn.BatchNorm1d(size)] if batch_norm else []
            layers.append(torch.nn.ReLU())
            layers += [torch.nn.Dropout(dropout)] if dropout > 0 else []
            width = size
        layers.append(torch.nn.Linear(width, num_labels))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


class ConvNet(torch.nn.Module):
    """``images`` (N, 1, H, W) -> ``{'logits': (N, num_classes)}``, plus ``'loss'``
    (:func:`labelled_cross_entropy`) when ``labels`` (N,) are given.

    Three conv blocks (3x3 conv, batch norm, ReLU; 2x2 max-pool after the first two),
    global average pooling, a linear classifier. The submodule names are what the
    distillation configs refer to: ``layer1`` (N, C1, H/2, W/2), ``layer2`` (N, C2, H/4,
    W/4), ``layer3`` (N, C3, H/4, W/4) and ``classifier``, whose input is the (N, C3)
    penultimate embedding.
    """

    def __init__(self, widths: Sequence[int], num_classes: int = 10):
        super().__init__()
        nn = torch.nn

        def block(c_in: int, c_out: int, pool: bool) -> torch.nn.Sequential:
            layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                      nn.ReLU(inplace=True)]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

        self.layer1 = block(1, widths[0], pool=True)
        self.layer2 = block(widths[0], widths[1], pool=True)
        self.layer3 = block(widths[1], widths[2], pool=False)
        self.classifier = nn.Linear(widths[2], num_classes)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``targets`` are for an adaptor (vision.py's Decoupled KD), not used here."""
        features = self.layer3(self.layer2(self.layer1(images)))
        logits = self.classifier(features.mean(dim=(2, 3)))
        outputs = {"logits": logits}
        if labels is not None:
            outputs["loss"] = labelled_cross_entropy(logits, labels)
        return outputs


def loss_adaptor(batch: Any, outputs: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """For models that return ``{'logits'}`` and, given labels, ``'loss'``: the logits for
    KD and the loss for the hard-label term."""
    result = {"logits": outputs["logits"]}
    if "loss" in outputs:
        result["losses"] = [outputs["loss"]]
    return result


def labels_adaptor(batch: Dict[str, torch.Tensor],
                   outputs: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """For models that return ``{'logits'}`` only: the logits, the batch's labels and
    their cross-entropy (the hard-label term)."""
    return {"logits": outputs["logits"], "labels": batch["labels"],
            "losses": torch.nn.functional.cross_entropy(outputs["logits"], batch["labels"])}


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of ``logits`` (B, C) over the rows whose label (B,) is not
    :data:`UNLABELLED`; 0 for a batch without any (a plain mean would be 0 / 0)."""
    labelled = labels != UNLABELLED
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=UNLABELLED,
                                             reduction="sum") / labelled.sum().clamp(min=1)


def masked_adaptor(batch: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor]
                   ) -> Dict[str, Any]:
    """The student's logits for KD and the cross-entropy over the batch's labelled rows only
    (0 for a batch without any): the unlabelled transfer rows learn from the teacher alone."""
    return {"logits": outputs["logits"],
            "losses": [labelled_cross_entropy(outputs["logits"], batch["labels"])]}


def logits_adaptor(batch: Any, outputs: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """The logits only (a teacher's adaptor: no hard-label term)."""
    return {"logits": outputs["logits"]}


@contextlib.contextmanager
def evaluating(*models: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside the block (dropout off, batch norm on its running statistics);
    each model's own mode is restored after."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


@torch.no_grad()
def accuracy(model: torch.nn.Module, batch: Dict[str, torch.Tensor], key: str = "image",
             device: Any = "cpu") -> float:
    """Share of ``batch`` (:func:`stack`'s, ``labels`` (N,)) classified correctly, from
    one forward pass ``model(**{key: batch[key]})['logits']`` (N, C) in eval mode (restored
    after): ``(argmax == labels).float().mean()``."""
    with evaluating(model):
        logits = model(**{key: batch[key].to(device)})["logits"]
    return (logits.argmax(-1).cpu() == batch["labels"]).float().mean().item()


# ------------------------------------------------------------------------- training
def optimizer_and_schedule(model: torch.nn.Module, lr: float, total_steps: int,
                           weight_decay: float = 0.01) -> Tuple[torch.optim.Optimizer,
                                                                 Dict[str, Any]]:
    """AdamW and a linear decay to zero over ``total_steps``, the schedule passed to the
    trainer as ``scheduler_class`` (so the projections and loss modules a distiller adds
    to the optimizer are scheduled too): ``trainer.train(optimizer, data, **schedule)``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = dict(scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                    scheduler_args={"lr_lambda": lambda step: max(0.0, 1 - step / total_steps)})
    return optimizer, schedule


def fit(trainer: Any, optimizer: torch.optim.Optimizer, data: Any, **options: Any) -> None:
    """``trainer.train(optimizer, data, **options)`` inside ``with trainer:`` (the teacher
    in eval mode, the student in train mode, both restored after)."""
    with trainer:
        trainer.train(optimizer, data, **options)


class SeedRuns:
    """The runs of one seed: their ``TrainingConfig`` (on the CPU, seeded, checkpoints in
    ``{output_dir}/seed{seed}/{name}``), their data (shuffled by the seed) and AdamW at
    ``args.lr`` (weight decay 0.01).

    Args:
        args: the options; ``output_dir``, ``batch_size`` and ``lr`` are read.
        seed: the seed of the runs.
        config_options: ``TrainingConfig`` arguments of every run (e.g. ``log_steps``).
    """

    def __init__(self, args: argparse.Namespace, seed: int, **config_options: Any):
        self.args, self.seed, self.config_options = args, seed, config_options

    def output_dir(self, name: str) -> str:
        """``{output_dir}/seed{seed}/{name}``."""
        return os.path.join(self.args.output_dir, f"seed{self.seed}", name)

    def config(self, name: str, **options: Any) -> TrainingConfig:
        """The run ``name``'s config; ``options`` override the common ones."""
        return TrainingConfig(device="cpu", output_dir=self.output_dir(name), seed=self.seed,
                              **{**self.config_options, **options})

    def loader(self, examples: Any, collate_fn: Optional[Callable] = None
               ) -> torch.utils.data.DataLoader:
        return shuffled(examples, self.args.batch_size, self.seed, collate_fn)

    def train_steps(self, trainer: Any, model: torch.nn.Module, data: Any, steps: int,
                    lr: Optional[float] = None) -> None:
        """``steps`` optimizer steps of AdamW (at ``lr``, default ``args.lr``) over
        ``model``'s parameters on ``data`` (a DataLoader, or a dict of them for
        ``MultiTaskDistiller``)."""
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.args.lr if lr is None else lr,
                                      weight_decay=0.01)
        fit(trainer, optimizer, data, num_steps=steps)


# ------------------------------------------------------------------------- seeds and tables
def float_line(row: Dict[str, Any]) -> str:
    """``'name 0.1234, ...'`` of a row's float values."""
    return ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))


def run_seeds(args: argparse.Namespace, run_seed: Callable[[argparse.Namespace, int], Any],
              line: Callable[[Any], str] = float_line) -> List[Any]:
    """``run_seed(args, seed)`` for each of ``args.seeds``, in order; prints
    ``seed S: {line(result)}`` as each ends. Returns the results."""
    results = []
    for seed in args.seeds:
        results.append(run_seed(args, seed))
        print(f"seed {seed}: " + line(results[-1]), flush=True)
    return results


def mean_std(values: Sequence[float], population: bool = False) -> Tuple[float, float]:
    """Mean and standard deviation over seeds: ``statistics.fmean`` and the sample
    ``stdev`` (0 for one value), or with ``population`` ``statistics.mean`` and
    ``pstdev``. (Each example keeps the pair it has always reported.)"""
    if population:
        return statistics.mean(values), statistics.pstdev(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: Sequence[Dict[str, float]], names: Optional[Sequence[str]] = None,
              population: bool = False) -> Dict[str, Dict[str, Any]]:
    """``{name: {'accuracy': mean, 'std': std, 'per_seed': [...]}}`` from one
    ``{name: accuracy}`` per seed (``names``: which, default all of the first)."""
    models = {}
    for name in (runs[0] if names is None else names):
        values = [run[name] for run in runs]
        mean, std = mean_std(values, population)
        models[name] = {"accuracy": mean, "std": std, "per_seed": values}
    return models


def pm(mean: float, std: float, width: int = 0, digits: int = 4) -> str:
    """``'mean ± std'``, the mean right-aligned in ``width``."""
    return f"{mean:>{width}.{digits}f} ± {std:.{digits}f}"


def print_accuracies(models: Dict[str, Dict[str, Any]], header: str, name_width: int,
                     width: int = 0) -> None:
    """``header``, then per model its name and ``accuracy ± std`` (:func:`summarise`)."""
    print(header)
    for name, row in models.items():
        print(f"{name:<{name_width}}{pm(row['accuracy'], row['std'], width)}")


def better_tied_worse(values: Sequence[float], baseline: Sequence[float],
                      higher_is_better: bool = True) -> List[int]:
    """How many seeds a method beat, tied and lost to the baseline, seed by seed."""
    if not higher_is_better:
        values, baseline = baseline, values
    pairs = list(zip(values, baseline))
    return [sum(v > b for v, b in pairs), sum(v == b for v, b in pairs),
            sum(v < b for v, b in pairs)]
