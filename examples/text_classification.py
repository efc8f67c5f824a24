"""Text classification: a 12-layer BERT into 3-, 4- and 6-layer students, TinyBERT-style.

Offline data (the default): **docstrings of Python's standard library, labelled by the
family of the package they document** (8 classes: asyncio; email = email, mailbox,
smtplib, imaplib, poplib; importlib = importlib, pkgutil, zipimport, runpy, modulefinder;
multiprocessing = multiprocessing, concurrent, threading, queue; tkinter; unittest =
unittest, doctest; web = http, urllib, wsgiref, xmlrpc; xml = xml, html). Every module,
class and function docstring of those packages' ``.py`` files is read with ``ast`` (nothing
imported, nothing downloaded), lower-cased and cut into words (its first ``--max-length``
- 2), at most ``--max-per-class`` (250) per class, picked by a hash, so a fixed set;
each docstring goes to train (80 %), validation (10 %) or test (10 %) by a CRC-32 of
``path:line``. The text follows the Python version.

Real data: ``--data DIR`` reads GLUE's SST-2 (``DIR/train.tsv`` to train, ``DIR/dev.tsv``
to test; tab-separated with a ``sentence`` and a ``label`` header), or any TSV with those
two columns.

Tokenizer (built here): word level, the ``--vocab-size`` most frequent training words.

Runs (all ``transformers.BertForSequenceClassification`` built from a ``BertConfig``,
from scratch, ``attn_implementation='eager'`` so attention maps come back):

1. the teacher: width 64, 12 layers, 4 heads, with ``BasicTrainer``;
2. per student depth (``--student-layers``, default 3, 4, 6; width 32, 4 heads): the
   student alone, on the labels, ``--epochs`` epochs;
3. the same student, from the same initial weights, with ``GeneralDistiller``: KD on the
   logits (``ce``, temperature 4) + the hard labels + TinyBERT's layer mapping
   (``textbrewer.recipes.tinybert_layer_mapping``: student layer m learns from teacher
   layer m·12/M; ``hidden_mse`` on the hidden states through a learned projection 32 ->
   64, embeddings included, and ``attention_mse`` on the attention probabilities). One
   stage (TinyBERT trains the intermediate layers first, then the logits): here all
   terms are summed from the start.
4. with ``--augment``, also a distilled student trained on augmented batches: each
   training docstring is changed on the fly by ``textbrewer.data_utils`` (``masking``
   p=0.1 with [MASK], then ``short_disorder``) in a ``batch_postprocessor``; the teacher
   labels the augmented text (its soft targets), so the student sees more varied inputs.

It prints test accuracy, parameters and the inference speed-up over the teacher (CPU
time of the same test batches), and writes them to ``{output_dir}/results.json``. With
``--seeds`` S1 S2 ... each seed is one whole run (teacher included) in
``{output_dir}/seed{S}``, then the mean ± std over the seeds and, per distilled student,
the seeds on which it beat the student alone of its depth. ``--alone-lr`` and
``--distil-lr`` set the students' learning rates (default ``--lr``); ``--split
validation`` scores the validation docstrings instead of the test ones, for choosing them.

Run:
    python examples/text_classification.py                 # minutes on 2 CPU cores
    python examples/text_classification.py --seeds 0 1 2 3 4 --alone-lr 4e-3 --distil-lr 4e-3
    python examples/text_classification.py --quick         # seconds (used by the tests)
    python examples/text_classification.py --augment --student-layers 4
    python examples/text_classification.py --data glue_data/SST-2 --max-length 66
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any, Callable, Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)
import _text_data as data_lib  # noqa: E402  (the text examples' data and training helpers)

from textbrewer.data_utils import masking, short_disorder  # noqa: E402

try:
    from transformers import BertConfig, BertForSequenceClassification
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs transformers: pip install -e '.[transformers]'")

# ---------------------------------------------------------------------------------- data
def load_data(args) -> Dict[str, Any]:
    """Splits as lists of ``{'tokens': [...], 'label': int}``, the label names, the vocabulary."""
    room = args.max_length - 2  # [CLS] ... [SEP]
    if args.data:
        if args.split == "validation":
            raise SystemExit("--split validation: only with the stdlib task (a TSV directory "
                             "has train.tsv and dev.tsv, no validation split)")
        train = data_lib.read_tsv_classification(os.path.join(args.data, "train.tsv"))["rows"]
        test = data_lib.read_tsv_classification(os.path.join(args.data, "dev.tsv"))["rows"]
        labels = sorted({label for _, label in train})
        splits = {"train": [{"tokens": data_lib.words(t)[:room], "label": labels.index(l)}
                            for t, l in train],
                  "test": [{"tokens": data_lib.words(t)[:room], "label": labels.index(l)}
                           for t, l in test if l in labels]}
        source = f"TSV from {args.data}"
    else:
        built = data_lib.stdlib_classification(max_per_class=args.max_per_class, length=room)
        labels = built["labels"]
        splits = data_lib.train_and_scored(built["examples"], args.split)
        source = "stdlib docstrings by package family" + (
            " (validation split)" if args.split == "validation" else "")
    vocabulary = data_lib.Vocabulary((e["tokens"] for e in splits["train"]), args.vocab_size)
    return {"splits": splits, "labels": labels, "vocabulary": vocabulary, "source": source}


class Collator:
    """Token lists -> ``{'input_ids', 'attention_mask', 'labels'}``, padded to the longest
    in the batch (not to max_length: shorter batches are faster)."""

    def __init__(self, vocabulary: data_lib.Vocabulary):
        self.vocabulary = vocabulary

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        rows = [[data_lib.CLS] + self.vocabulary.encode(e["tokens"]) + [data_lib.SEP]
                for e in examples]
        input_ids = data_lib.pad(rows, max(len(r) for r in rows))
        return {"input_ids": input_ids, "attention_mask": (input_ids != data_lib.PAD).long(),
                "labels": torch.tensor([e["label"] for e in examples])}


def augmenter(seed: int) -> Callable:
    """A ``batch_postprocessor``: masks (p=0.1) then locally reorders each example's words.

    ``textbrewer.data_utils`` draws from NumPy's global generator, seeded here once.
    """
    np.random.seed(seed)

    def augment(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        input_ids = batch["input_ids"].clone()
        for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            words = input_ids[row, 1:length - 1].tolist()  # keep [CLS] and [SEP] in place
            words = short_disorder(masking(words, p=0.1, mask=data_lib.MASK))
            input_ids[row, 1:length - 1] = torch.tensor(words, dtype=torch.long)
        return {**batch, "input_ids": input_ids}
    return augment


@torch.no_grad()
def accuracy(model, batches, device) -> float:
    correct = total = 0
    with common.evaluating(model):
        for batch in batches:
            inputs = data_lib.to_device({k: v for k, v in batch.items() if k != "labels"},
                                        device)
            correct += (model(**inputs).logits.argmax(-1).cpu() == batch["labels"]).sum().item()
            total += len(batch["labels"])
    return correct / total


# ---------------------------------------------------------------------------------- models
def build(config: Dict[str, Any], layers: int, setup: Dict[str, Any]):
    return BertForSequenceClassification(BertConfig(
        **config, **({} if "num_hidden_layers" in config else {"num_hidden_layers": layers}),
        vocab_size=setup["vocab_size"], num_labels=setup["num_labels"],
        max_position_embeddings=setup["max_length"],
        # sdpa (the default) returns no attention maps; the attention matches need them
        attn_implementation="eager"))


def adaptor(batch: Dict[str, torch.Tensor], outputs) -> Dict[str, Any]:
    """Everything from the model's outputs (hidden/attention are None unless asked for)."""
    return {"logits": outputs.logits, "hidden": outputs.hidden_states,
            "attention": outputs.attentions, "inputs_mask": batch["attention_mask"],
            "losses": outputs.loss}


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = data_lib.parser(__doc__, "./output_text_classification",
                             "a directory with train.tsv and dev.tsv (GLUE SST-2 format); "
                             "default: the offline stdlib-docstring task",
                             epochs=(1, 5), teacher_epochs=(2, 6))
    parser.add_quick_argument("--student-layers", "2", "3,4,6", "comma-separated student depths",
                              type=str)
    parser.add_argument("--augment", action="store_true",
                        help="also distil each student on batches augmented with "
                             "textbrewer.data_utils (masking + short_disorder)")
    parser.add_quick_argument("--max-length", 16, 48,
                              "tokens per example with [CLS] and [SEP]", positive=False)
    parser.add_quick_argument("--max-per-class", 40, 250, "stdlib docstrings kept per class")
    parser.add_argument("--alone-lr", type=float, default=None,
                        help="the students alone's peak learning rate (default: --lr)")
    parser.add_argument("--distil-lr", type=float, default=None,
                        help="the distilled students' peak learning rate (default: --lr)")
    data_lib.add_split_option(parser)
    args = data_lib.parse_args(parser, argv, min_length=4)
    for name in ("alone_lr", "distil_lr"):
        if getattr(args, name) is None:
            setattr(args, name, args.lr)
        elif getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got "
                         f"{getattr(args, name)}")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    return data_lib.over_seeds(args, run_seed, ["accuracy"])


def run_seed(args: argparse.Namespace) -> Dict[str, Any]:
    """The teacher and the students of seed ``args.seed``: their table and results.json in
    ``args.output_dir``."""
    started, device = data_lib.start(args)
    data = load_data(args)
    splits, vocabulary = data["splits"], data["vocabulary"]
    collate = Collator(vocabulary)
    setup = {"vocab_size": len(vocabulary), "num_labels": len(data["labels"]),
             "max_length": args.max_length}
    test_batches = data_lib.batches_of(splits["test"], collate, 64)
    majority = max(np.bincount([e["label"] for e in splits["test"]])) / len(splits["test"])
    print(f"{data['source']}: {len(splits['train'])} training and {len(splits['test'])} test "
          f"examples, {len(data['labels'])} classes {data['labels']} (majority class "
          f"{majority:.3f}), vocabulary {len(vocabulary)}, device {device}")

    teacher = data_lib.train_teacher(build, adaptor, setup, splits["train"], collate, args,
                                     device)
    models: Dict[str, torch.nn.Module] = {"teacher": teacher}
    for layers in args.student_layers:
        initial, students = data_lib.alone_and_distilled(teacher, build, adaptor, layers, setup,
                                                         splits["train"], collate, args, device,
                                                         args.alone_lr, args.distil_lr)
        models.update(students)
        if args.augment:
            print(f"{layers}-layer student distilled on augmented batches")
            augmented = copy.deepcopy(initial).to(device)
            data_lib.distil(f"distilled_augmented_L{layers}", teacher, augmented, layers,
                            adaptor, splits["train"], collate, args, device,
                            batch_postprocessor=augmenter(args.seed), lr=args.distil_lr)
            models[f"distilled_augmented_L{layers}"] = augmented

    results: Dict[str, Any] = {"models": data_lib.score(
        models, test_batches, lambda model: {"accuracy": accuracy(model, test_batches, device)},
        device)}
    results["data"] = {"source": data["source"], "labels": data["labels"],
                       "train": len(splits["train"]), "test": len(splits["test"]),
                       "majority_class_accuracy": float(majority),
                       "vocabulary": len(vocabulary)}
    results["configs"] = {"teacher": args.teacher_config, "student": args.student_config,
                          **setup}
    results["run"] = common.run_record(args, started, [
        "epochs", "teacher_epochs", "student_layers", "augment", "lr", "alone_lr", "distil_lr",
        "temperature", "batch_size", "split", "quick", "seed"], settings={"device": str(device)})
    data_lib.report(results, ["accuracy"], args.output_dir)
    return results


if __name__ == "__main__":
    main()
