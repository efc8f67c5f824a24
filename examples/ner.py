"""Token classification (NER-style): a 12-layer BERT tagger into a 4-layer one, with logits_mask.

Offline data (the default): **lines of Python's standard-library source, each token
tagged by its role**. The single-file modules of the stdlib (``os.py``, ``argparse.py``,
..., ``--max-files`` of them spread over the sorted list) are cut into logical lines by
Python's own ``tokenize``; each line is a sentence, its tokens the words. A name (not a
keyword) is tagged ``B-DEF`` right after ``def``, ``B-CLASS`` right after ``class``, else
``B-CALL`` right before ``(``, else ``B-ATTR`` right after ``.``; every other token is
``O``. The tags are rules on the neighbouring tokens, so they are exactly right, and a
model has to read the context: most identifiers are rare, and words outside the
vocabulary keep only their kind (``[UNK-NAME]``, ``[UNK-NUM]``, ``[UNK-STR]``,
``[UNK-OP]``; string literals are always ``[UNK-STR]``). Each *file* goes to train
(80 %), validation (10 %) or test (10 %) by a CRC-32 of its path, so test lines come from
modules never seen in training.

Real data: ``--data DIR`` reads CoNLL-2003 (``DIR/train.txt`` to train, ``DIR/test.txt``
to test; a word per line with its tag in the last column, blank lines between sentences,
``-DOCSTART-`` skipped; IOB1 or IOB2 tags).

The metric is entity-level micro F1 (a chunk counts when its type, start and end are all
right, as ``conlleval``), plus token accuracy.

Runs (``transformers.BertForTokenClassification`` from a ``BertConfig``, from scratch,
``attn_implementation='eager'``):

1. the teacher: width 64, 12 layers, 4 heads, with ``BasicTrainer``;
2. per student depth (``--student-layers``, default 4; width 32, 4 heads): alone, on
   the tags;
3. the same student, from the same initial weights, with ``GeneralDistiller``: KD on the
   per-token logits (``ce``, temperature 4) **only at real tokens**: the adaptor returns
   ``logits_mask`` = the positions that carry a tag (not [CLS], [SEP] nor padding), and the
   distiller keeps those rows of the (batch, length, tags) logits; + the hard tags; +
   TinyBERT's layer mapping (``tinybert_layer_mapping``: ``hidden_mse`` through a
   projection 32 -> 64 and ``attention_mse``), whose losses skip padding through
   ``inputs_mask``.

It prints F1, token accuracy, parameters and speed-up, and writes
``{output_dir}/results.json``.

Run:
    python examples/ner.py                   # minutes on 2 CPU cores
    python examples/ner.py --quick           # seconds (used by the tests)
    python examples/ner.py --data conll2003 --max-length 128
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _text_data as data_lib  # noqa: E402  (the examples' shared data helpers)

import textbrewer  # noqa: E402
from textbrewer import DistillationConfig, GeneralDistiller  # noqa: E402
from textbrewer.recipes import tinybert_layer_mapping  # noqa: E402
from textbrewer.utils import count_parameters, seed_everything  # noqa: E402

try:
    from transformers import BertConfig, BertForTokenClassification
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs transformers: pip install -e '.[transformers]'")

IGNORE = -100  # the label of positions without a tag (transformers' ignore_index)
TEACHER_CONFIG = dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=4,
                      intermediate_size=128, hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1, type_vocab_size=1)
STUDENT_CONFIG = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                      type_vocab_size=1)
QUICK_TEACHER_CONFIG = dict(TEACHER_CONFIG, hidden_size=32, num_hidden_layers=4,
                            num_attention_heads=2, intermediate_size=64)
QUICK_STUDENT_CONFIG = dict(STUDENT_CONFIG, hidden_size=16, num_attention_heads=2,
                            intermediate_size=32)
UNKNOWN_KINDS = data_lib.UNKNOWN_KINDS + ["[UNK-CAP]"]


# ---------------------------------------------------------------------------------- data
def word_kind(word: str) -> str:
    """What an out-of-vocabulary CoNLL word keeps: capitalised, a number, or neither."""
    if word[:1].isupper():
        return "[UNK-CAP]"
    return "[UNK-NUM]" if word[:1].isdigit() else "[UNK-NAME]"


def load_data(args) -> Dict[str, Any]:
    room = args.max_length - 2
    if args.data:
        splits = {}
        for split, name in (("train", "train.txt"), ("test", "test.txt")):
            sentences = data_lib.read_conll(os.path.join(args.data, name))
            splits[split] = [{"tokens": s["tokens"][:room], "tags": s["tags"][:room],
                              "kinds": [word_kind(w) for w in s["tokens"][:room]]}
                             for s in sentences]
        tags = sorted({t for s in splits["train"] for t in s["tags"]} - {"O"})
        tags = ["O"] + tags
        source = f"CoNLL from {args.data}"
    else:
        built = data_lib.stdlib_tagging(max_files=args.max_files, length=room)
        tags = built["tags"]
        splits = {name: [s for s in built["sentences"] if s["split"] == name]
                  for name in ("train", "test")}
        source = "stdlib source lines, tokens tagged by role"
    # a fixed, spread-out subset when capped
    for name, cap in (("train", args.max_sentences), ("test", args.max_sentences // 4)):
        if len(splits[name]) > cap:
            splits[name] = splits[name][::len(splits[name]) // cap][:cap]
    vocabulary = data_lib.Vocabulary((s["tokens"] for s in splits["train"]), args.vocab_size,
                                     extra=UNKNOWN_KINDS)
    return {"splits": splits, "tags": tags, "vocabulary": vocabulary, "source": source}


class Collator:
    """Sentences -> ``{'input_ids', 'attention_mask', 'labels'}``; labels are the tag ids at
    the words and -100 at [CLS], [SEP] and padding."""

    def __init__(self, vocabulary: data_lib.Vocabulary, tags: List[str]):
        self.vocabulary, self.tag_index = vocabulary, {t: i for i, t in enumerate(tags)}

    def __call__(self, sentences: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        rows = [[data_lib.CLS] + self.vocabulary.encode(s["tokens"], s["kinds"])
                + [data_lib.SEP] for s in sentences]
        labels = [[IGNORE] + [self.tag_index.get(t, 0) for t in s["tags"]] + [IGNORE]
                  for s in sentences]
        length = max(len(r) for r in rows)
        input_ids = data_lib.pad(rows, length)
        return {"input_ids": input_ids, "attention_mask": (input_ids != data_lib.PAD).long(),
                "labels": data_lib.pad(labels, length, IGNORE)}


@torch.no_grad()
def evaluate(model, batches, tags: List[str], device) -> Dict[str, float]:
    """Entity-level micro F1 (conlleval's chunks) and token accuracy over the tagged tokens."""
    was_training = model.training
    model.eval()
    correct = tokens = true_positives = predicted = gold = 0
    for batch in batches:
        inputs = data_lib.to_device({k: v for k, v in batch.items() if k != "labels"}, device)
        predictions = model(**inputs).logits.argmax(-1).cpu()
        for row_predicted, row_gold in zip(predictions, batch["labels"]):
            keep = row_gold != IGNORE
            p, g = row_predicted[keep].tolist(), row_gold[keep].tolist()
            correct += sum(a == b for a, b in zip(p, g))
            tokens += len(g)
            chunks_p = data_lib.chunks([tags[i] for i in p])
            chunks_g = data_lib.chunks([tags[i] for i in g])
            true_positives += len(chunks_p & chunks_g)
            predicted += len(chunks_p)
            gold += len(chunks_g)
    model.train(was_training)
    precision = true_positives / max(predicted, 1)
    recall = true_positives / max(gold, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"f1": f1, "precision": precision, "recall": recall,
            "token_accuracy": correct / max(tokens, 1)}


# ---------------------------------------------------------------------------------- models
def build(config: Dict[str, Any], layers: int, setup: Dict[str, Any]):
    if "num_hidden_layers" not in config:
        config = dict(config, num_hidden_layers=layers)
    return BertForTokenClassification(BertConfig(
        **config, vocab_size=setup["vocab_size"], num_labels=setup["num_labels"],
        max_position_embeddings=setup["max_length"],
        attn_implementation="eager"))  # sdpa (the default) returns no attention maps


def adaptor(batch: Dict[str, torch.Tensor], outputs) -> Dict[str, Any]:
    # KD only where a tag is predicted: the (B, L, tags) logits keep the rows where
    # logits_mask is True, so [CLS], [SEP] and padding add nothing to the KD loss
    return {"logits": outputs.logits, "logits_mask": batch["labels"] != IGNORE,
            "hidden": outputs.hidden_states, "attention": outputs.attentions,
            "inputs_mask": batch["attention_mask"], "losses": outputs.loss}


def distil(name, teacher, student, layers, train_examples, collate, args, device) -> None:
    matches = tinybert_layer_mapping(args.teacher_config["num_hidden_layers"], layers,
                                     args.teacher_config["hidden_size"],
                                     args.student_config["hidden_size"],
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
        distiller.train(optimizer, data, num_epochs=args.epochs, **scheduler,
                        output_hidden_states=True, output_attentions=True)


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="./output_ner")
    parser.add_argument("--data", default=None,
                        help="a directory with CoNLL-2003 train.txt and test.txt; default: "
                             "the offline stdlib-source tagging task")
    parser.add_argument("--quick", action="store_true", help="a tiny run, for tests")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default 4)")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help="teacher epochs (default 5)")
    parser.add_argument("--student-layers", default=None,
                        help="comma-separated student depths (default 4; 2 with --quick)")
    parser.add_argument("--max-files", type=int, default=None,
                        help="stdlib modules read (default 40; 4 with --quick)")
    parser.add_argument("--max-sentences", type=int, default=None,
                        help="training sentences kept (test: a quarter) (default 4000; 200 "
                             "with --quick)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per sentence with [CLS] and [SEP] (default 32; 16 quick)")
    parser.add_argument("--vocab-size", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    defaults = dict(epochs=(1, 4), teacher_epochs=(1, 5), student_layers=("2", "4"),
                    max_files=(4, 40), max_sentences=(200, 4000), max_length=(16, 32))
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
            parser.error(f"--student-layers: {layers} is not in 1..{depth} (the teacher's)")
    for name in ("epochs", "teacher_epochs", "max_files", "max_sentences"):
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
    splits, vocabulary, tags = data["splits"], data["vocabulary"], data["tags"]
    collate = Collator(vocabulary, tags)
    setup = {"vocab_size": len(vocabulary), "num_labels": len(tags),
             "max_length": args.max_length}
    test_batches = data_lib.batches_of(splits["test"], collate, 64)
    print(f"{data['source']}: {len(splits['train'])} training and {len(splits['test'])} test "
          f"sentences, tags {tags}, vocabulary {len(vocabulary)}, device {device}")

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

    timing_batches = [data_lib.to_device({k: v for k, v in b.items() if k != "labels"}, device)
                      for b in test_batches[:8]]
    seconds = data_lib.seconds_per_batch(models, timing_batches)
    results: Dict[str, Any] = {"models": {}}
    for name, model in models.items():
        results["models"][name] = {**evaluate(model, test_batches, tags, device),
                                   "parameters": count_parameters(model),
                                   "seconds_per_batch": seconds[name],
                                   "speedup": seconds["teacher"] / seconds[name]}
    results["data"] = {"source": data["source"], "tags": tags, "train": len(splits["train"]),
                       "test": len(splits["test"]), "vocabulary": len(vocabulary)}
    results["configs"] = {"teacher": args.teacher_config, "student": args.student_config,
                          **setup}
    results["run"] = {"epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                      "student_layers": args.student_layers, "lr": args.lr,
                      "temperature": args.temperature, "batch_size": args.batch_size,
                      "quick": args.quick, "seed": args.seed, "device": str(device),
                      "textbrewer": textbrewer.__version__,
                      "seconds": round(time.perf_counter() - started, 1)}
    print()
    data_lib.print_table(results["models"], ["f1", "token_accuracy"])
    print(f"{results['run']['seconds']:.0f} s")
    print(f"wrote {data_lib.write_results(args.output_dir, results)}")
    return results


if __name__ == "__main__":
    main()
