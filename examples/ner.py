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
``{output_dir}/results.json``. With ``--seeds`` S1 S2 ... each seed is one whole run
(teacher included) in ``{output_dir}/seed{S}``, then the mean ± std over the seeds and
the seeds on which the distilled student beat the student alone.

Run:
    python examples/ner.py                   # minutes on 2 CPU cores
    python examples/ner.py --seeds 0 1 2 3 4 # the table of examples/README.md
    python examples/ner.py --quick           # seconds (used by the tests)
    python examples/ner.py --data conll2003 --max-length 128
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)
import _text_data as data_lib  # noqa: E402  (the text examples' data and training helpers)


try:
    from transformers import BertConfig, BertForTokenClassification
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs transformers: pip install -e '.[transformers]'")

IGNORE = -100  # the label of positions without a tag (transformers' ignore_index)
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
        splits = data_lib.train_and_test(built["sentences"])
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
    correct = tokens = true_positives = predicted = gold = 0
    for batch in batches:
        inputs = data_lib.to_device({k: v for k, v in batch.items() if k != "labels"}, device)
        with common.evaluating(model):  # eval mode for the forward pass, restored after
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


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = data_lib.parser(__doc__, "./output_ner",
                             "a directory with CoNLL-2003 train.txt and test.txt; default: "
                             "the offline stdlib-source tagging task",
                             epochs=(1, 4), teacher_epochs=(1, 5))
    parser.add_quick_argument("--student-layers", "2", "4", "comma-separated student depths",
                              type=str)
    parser.add_quick_argument("--max-files", 4, 40, "stdlib modules read")
    parser.add_quick_argument("--max-sentences", 200, 4000,
                              "training sentences kept (test: a quarter)")
    parser.add_quick_argument("--max-length", 16, 32,
                              "tokens per sentence with [CLS] and [SEP]", positive=False)
    return data_lib.parse_args(parser, argv, min_length=4)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    return data_lib.over_seeds(args, run_seed, ["f1", "token_accuracy"])


def run_seed(args: argparse.Namespace) -> Dict[str, Any]:
    """The teacher and the students of seed ``args.seed``: their table and results.json in
    ``args.output_dir``."""
    started, device = data_lib.start(args)
    data = load_data(args)
    splits, vocabulary, tags = data["splits"], data["vocabulary"], data["tags"]
    collate = Collator(vocabulary, tags)
    setup = {"vocab_size": len(vocabulary), "num_labels": len(tags),
             "max_length": args.max_length}
    test_batches = data_lib.batches_of(splits["test"], collate, 64)
    print(f"{data['source']}: {len(splits['train'])} training and {len(splits['test'])} test "
          f"sentences, tags {tags}, vocabulary {len(vocabulary)}, device {device}")

    teacher = data_lib.train_teacher(build, adaptor, setup, splits["train"], collate, args,
                                     device)
    models: Dict[str, torch.nn.Module] = {"teacher": teacher}
    for layers in args.student_layers:
        models.update(data_lib.alone_and_distilled(teacher, build, adaptor, layers, setup,
                                                   splits["train"], collate, args, device)[1])

    results: Dict[str, Any] = {"models": data_lib.score(
        models, test_batches, lambda model: evaluate(model, test_batches, tags, device), device)}
    results["data"] = {"source": data["source"], "tags": tags, "train": len(splits["train"]),
                       "test": len(splits["test"]), "vocabulary": len(vocabulary)}
    results["configs"] = {"teacher": args.teacher_config, "student": args.student_config,
                          **setup}
    results["run"] = common.run_record(args, started, [
        "epochs", "teacher_epochs", "student_layers", "lr", "temperature", "batch_size",
        "quick", "seed"], settings={"device": str(device)})
    data_lib.report(results, ["f1", "token_accuracy"], args.output_dir)
    return results


if __name__ == "__main__":
    main()
