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
time of the same test batches), and writes them to ``{output_dir}/results.json``.

Run:
    python examples/text_classification.py                 # minutes on 2 CPU cores
    python examples/text_classification.py --quick         # seconds (used by the tests)
    python examples/text_classification.py --augment --student-layers 4
    python examples/text_classification.py --data glue_data/SST-2 --max-length 66
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any, Callable, Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _text_data as data_lib  # noqa: E402  (the examples' shared data helpers)

import textbrewer  # noqa: E402
from textbrewer import DistillationConfig, GeneralDistiller  # noqa: E402
from textbrewer.data_utils import masking, short_disorder  # noqa: E402
from textbrewer.recipes import tinybert_layer_mapping  # noqa: E402
from textbrewer.utils import count_parameters, seed_everything  # noqa: E402

try:
    from transformers import BertConfig, BertForSequenceClassification
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs transformers: pip install -e '.[transformers]'")

# num_labels, vocab_size and max_position_embeddings are added at run time.
TEACHER_CONFIG = dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=4,
                      intermediate_size=128, hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1, type_vocab_size=1)
STUDENT_CONFIG = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                      type_vocab_size=1)
# --quick: the same shapes, scaled down so that the tests take seconds (4-layer teacher)
QUICK_TEACHER_CONFIG = dict(TEACHER_CONFIG, hidden_size=32, num_hidden_layers=4,
                            num_attention_heads=2, intermediate_size=64)
QUICK_STUDENT_CONFIG = dict(STUDENT_CONFIG, hidden_size=16, num_attention_heads=2,
                            intermediate_size=32)


# ---------------------------------------------------------------------------------- data
def load_data(args) -> Dict[str, Any]:
    """Splits as lists of ``{'tokens': [...], 'label': int}``, the label names, the vocabulary."""
    room = args.max_length - 2  # [CLS] ... [SEP]
    if args.data:
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
        splits = {name: [e for e in built["examples"] if e["split"] == name]
                  for name in ("train", "test")}
        source = "stdlib docstrings by package family"
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
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in batches:
        logits = model(**data_lib.to_device({k: v for k, v in batch.items() if k != "labels"},
                                   device)).logits
        correct += (logits.argmax(-1).cpu() == batch["labels"]).sum().item()
        total += len(batch["labels"])
    model.train(was_training)
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


# ---------------------------------------------------------------------------------- training
def distil(name, teacher, student, layers, train_examples, collate, args, device,
           batch_postprocessor=None) -> None:
    teacher_config, student_config = args.teacher_config, args.student_config
    matches = tinybert_layer_mapping(teacher_config["num_hidden_layers"], layers,
                                     teacher_config["hidden_size"], student_config["hidden_size"],
                                     features=("hidden", "attention"))
    config = DistillationConfig(temperature=args.temperature, kd_loss_type="ce",
                                kd_loss_weight=1.0, hard_label_weight=1.0,
                                intermediate_matches=matches)
    data = data_lib.loader(train_examples, collate, args)
    optimizer, scheduler = data_lib.optimizer_and_schedule(student, args.lr,
                                                           args.epochs * len(data))
    distiller = GeneralDistiller(data_lib.train_config(args, name, device, args.epochs), config,
                                 model_T=teacher, model_S=student, adaptor_T=adaptor,
                                 adaptor_S=adaptor)
    with distiller:
        # the hidden states and attentions are asked of both models for every batch
        distiller.train(optimizer, data, num_epochs=args.epochs, **scheduler,
                        batch_postprocessor=batch_postprocessor,
                        output_hidden_states=True, output_attentions=True)


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="./output_text_classification",
                        help="checkpoints (gs*.pkl) and results.json go here")
    parser.add_argument("--data", default=None,
                        help="a directory with train.tsv and dev.tsv (GLUE SST-2 format); "
                             "default: the offline stdlib-docstring task")
    parser.add_argument("--quick", action="store_true", help="a tiny run, for tests")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of each student run (default 5; 1 with --quick)")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help="epochs of the teacher (default 6; 2 with --quick)")
    parser.add_argument("--student-layers", default=None,
                        help="comma-separated student depths (default 3,4,6; 2 with --quick)")
    parser.add_argument("--augment", action="store_true",
                        help="also distil each student on batches augmented with "
                             "textbrewer.data_utils (masking + short_disorder)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per example with [CLS] and [SEP] (default 48; 16 quick)")
    parser.add_argument("--max-per-class", type=int, default=None,
                        help="stdlib docstrings kept per class (default 250; 40 quick)")
    parser.add_argument("--vocab-size", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    defaults = dict(epochs=(1, 5), teacher_epochs=(2, 6), student_layers=("2", "3,4,6"),
                    max_length=(16, 48), max_per_class=(40, 250))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    try:
        args.student_layers = [int(x) for x in str(args.student_layers).split(",")]
    except ValueError:
        parser.error(f"--student-layers must be comma-separated ints, got {args.student_layers!r}")
    args.teacher_config = QUICK_TEACHER_CONFIG if args.quick else TEACHER_CONFIG
    args.student_config = QUICK_STUDENT_CONFIG if args.quick else STUDENT_CONFIG
    depth = args.teacher_config["num_hidden_layers"]
    for layers in args.student_layers:
        if not 1 <= layers <= depth:
            parser.error(f"--student-layers: {layers} is not in 1..{depth} (the teacher's "
                         f"layers)")
    for name in ("epochs", "teacher_epochs", "max_per_class"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_length < 4:
        parser.error(f"--max-length must be at least 4, got {args.max_length}")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    seed_everything(args.seed)
    device = torch.device(args.device)
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

    torch.manual_seed(args.seed)
    teacher = build(args.teacher_config, 0, setup).to(device)
    print(f"teacher ({args.teacher_epochs} epochs)")
    data_lib.train_alone("teacher", teacher, adaptor, splits["train"], collate, args, device,
                         args.teacher_epochs)
    models: Dict[str, torch.nn.Module] = {"teacher": teacher}
    for layers in args.student_layers:
        torch.manual_seed(args.seed + layers)
        initial = build(args.student_config, layers, setup)
        print(f"{layers}-layer student alone ({args.epochs} epochs)")
        alone = copy.deepcopy(initial).to(device)
        data_lib.train_alone(f"student_alone_L{layers}", alone, adaptor, splits["train"],
                             collate, args, device, args.epochs)
        print(f"{layers}-layer student distilled ({args.epochs} epochs)")
        distilled = copy.deepcopy(initial).to(device)
        distil(f"distilled_student_L{layers}", teacher, distilled, layers, splits["train"],
               collate, args, device)
        models[f"student_alone_L{layers}"] = alone
        models[f"distilled_student_L{layers}"] = distilled
        if args.augment:
            print(f"{layers}-layer student distilled on augmented batches")
            augmented = copy.deepcopy(initial).to(device)
            distil(f"distilled_augmented_L{layers}", teacher, augmented, layers,
                   splits["train"], collate, args, device,
                   batch_postprocessor=augmenter(args.seed))
            models[f"distilled_augmented_L{layers}"] = augmented

    timing_batches = [data_lib.to_device({k: v for k, v in b.items() if k != "labels"}, device)
                      for b in test_batches[:8]]
    seconds = data_lib.seconds_per_batch(models, timing_batches)
    results: Dict[str, Any] = {"models": {}}
    for name, model in models.items():
        results["models"][name] = {"accuracy": accuracy(model, test_batches, device),
                                   "parameters": count_parameters(model),
                                   "seconds_per_batch": seconds[name],
                                   "speedup": seconds["teacher"] / seconds[name]}
    results["data"] = {"source": data["source"], "labels": data["labels"],
                       "train": len(splits["train"]), "test": len(splits["test"]),
                       "majority_class_accuracy": float(majority),
                       "vocabulary": len(vocabulary)}
    results["configs"] = {"teacher": args.teacher_config, "student": args.student_config,
                          **setup}
    results["run"] = {"epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                      "student_layers": args.student_layers, "augment": args.augment,
                      "lr": args.lr, "temperature": args.temperature,
                      "batch_size": args.batch_size, "quick": args.quick, "seed": args.seed,
                      "device": str(device), "textbrewer": textbrewer.__version__,
                      "seconds": round(time.perf_counter() - started, 1)}
    print()
    data_lib.print_table(results["models"], ["accuracy"])
    print(f"{results['run']['seconds']:.0f} s")
    print(f"wrote {data_lib.write_results(args.output_dir, results)}")
    return results


if __name__ == "__main__":
    main()
