"""Span extraction (SQuAD-style QA): two logits heads, start and end, distilled together.

Offline data (the default): **"which function does this docstring describe?"**, built
from Python's standard library. For every single-file stdlib module, its documented
functions and methods (not dunders) are taken in source order, in groups of
``--candidates`` (default 4). For each function of a group there is one example: the
*question* is the summary of its docstring (the first sentence of the first paragraph,
at most 16 words); the *context* lists the group's functions in a shuffled order, each
as ``def <name> ( <arguments> ) : <summary> ;``; the *answer* is the function's name,
split at underscores (``get _ config _ var``), so answers are spans of 1 to 10 or so
tokens. The model has to find which summary matches the question and point at the name
before it. Each *file* goes to train (80 %), validation (10 %) or test (10 %) by a CRC-32
of its path. Everything is read with ``ast``; nothing is imported or downloaded.

Real data: ``--data DIR`` reads SQuAD v1.1 JSON (``DIR/train-v1.1.json`` to train,
``DIR/dev-v1.1.json`` to test), tokenized by the same word-level tokenizer; answers are
word spans, examples whose answer falls outside the first ``--max-length`` tokens are
left out, and EM / F1 are computed over our word tokens (close to, not identical with,
the official script's).

Two heads and KD. The adaptor returns ``logits = [start_logits, end_logits]``, each
(batch, length), a distribution over positions, set to -1e4 outside the context in
both models (the answer is always in the context, so KD compares the distributions over
the context). TextBrewer
0.2.1's GeneralDistiller kept only the **last head's** KD loss (it overwrote the sum at
each head): here that is ``DistillationConfig(kd_over_heads='last')``. TextBrewer
0.2.1.post1, the release ``pip install textbrewer`` gives, sums over the heads, and so
does our default, ``kd_over_heads='sum'``: the start head is then taught by the teacher
too, not only by the hard labels, which is what span-extraction KD means. ``--kd-over-heads both`` trains one student each way and
shows the difference.

Runs (``transformers.BertForQuestionAnswering`` from a ``BertConfig``, from scratch,
``attn_implementation='eager'``): the teacher (width 64, 12 layers, 4 heads), the
student alone (width 32, 4 layers, 4 heads), and the same student distilled with
``GeneralDistiller``: KD (``ce``, temperature 4) on both heads over the context
positions, the hard labels (the model's own start/end loss), and TinyBERT's layer
mapping (``tinybert_layer_mapping``: ``hidden_mse`` through a projection 32 -> 64,
``attention_mse``).

It prints exact match, F1, parameters and speed-up, and writes
``{output_dir}/results.json``.

Run:
    python examples/span_extraction.py                     # minutes on 2 CPU cores
    python examples/span_extraction.py --quick             # seconds (used by the tests)
    python examples/span_extraction.py --kd-over-heads both
    python examples/span_extraction.py --data squad --max-length 256
"""
from __future__ import annotations

import argparse
import collections
import copy
import os
import sys
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)
import _text_data as data_lib  # noqa: E402  (the text examples' data and training helpers)


try:
    from transformers import BertConfig, BertForQuestionAnswering
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs transformers: pip install -e '.[transformers]'")

QUESTION_LENGTH = 16
MAX_ANSWER_LENGTH = 16


# ---------------------------------------------------------------------------------- data
def fit(examples: List[Dict[str, Any]], max_length: int) -> List[Dict[str, Any]]:
    """Cuts each context to fit ``[CLS] question [SEP] context [SEP]`` in ``max_length``;
    drops the examples whose answer would be cut off."""
    kept = []
    for example in examples:
        question = example["question"][:QUESTION_LENGTH]
        room = max_length - len(question) - 3
        if example["end"] < room:
            kept.append({**example, "question": question, "context": example["context"][:room]})
    return kept


def load_data(args) -> Dict[str, Any]:
    if args.data:
        splits = {"train": data_lib.read_squad(os.path.join(args.data, "train-v1.1.json")),
                  "test": data_lib.read_squad(os.path.join(args.data, "dev-v1.1.json"))}
        source = f"SQuAD JSON from {args.data}"
    else:
        built = data_lib.stdlib_spans(args.candidates, args.max_files, QUESTION_LENGTH,
                                      seed=args.seed)
        splits = data_lib.train_and_test(built["examples"])
        source = "stdlib: which function does this docstring describe"
    dropped = {}
    for name in splits:
        before = len(splits[name])
        splits[name] = fit(splits[name], args.max_length)
        dropped[name] = before - len(splits[name])
        if not splits[name]:
            raise SystemExit(f"no {name} examples left from {source} (with --max-files "
                             f"{args.max_files}, --max-length {args.max_length})")
    if len(splits["train"]) > args.max_examples:  # a fixed, spread-out subset
        step = len(splits["train"]) // args.max_examples
        splits["train"] = splits["train"][::step][:args.max_examples]
    vocabulary = data_lib.Vocabulary((e["question"] + e["context"] for e in splits["train"]),
                                     args.vocab_size)
    return {"splits": splits, "vocabulary": vocabulary, "source": source, "dropped": dropped}


class Collator:
    """Examples -> ``{'input_ids', 'token_type_ids', 'attention_mask', 'start_positions',
    'end_positions'}``; positions count from the start of the whole sequence."""

    def __init__(self, vocabulary: data_lib.Vocabulary):
        self.vocabulary = vocabulary

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        rows, types, starts, ends = [], [], [], []
        for e in examples:
            question = [data_lib.CLS] + self.vocabulary.encode(e["question"]) + [data_lib.SEP]
            context = self.vocabulary.encode(e["context"]) + [data_lib.SEP]
            rows.append(question + context)
            types.append([0] * len(question) + [1] * (len(context) - 1) + [0])
            starts.append(len(question) + e["start"])
            ends.append(len(question) + e["end"])
        length = max(len(r) for r in rows)
        input_ids = data_lib.pad(rows, length)
        return {"input_ids": input_ids, "token_type_ids": data_lib.pad(types, length, 0),
                "attention_mask": (input_ids != data_lib.PAD).long(),
                "start_positions": torch.tensor(starts), "end_positions": torch.tensor(ends)}


def best_spans(start_logits, end_logits, context_mask) -> List[tuple]:
    """Per example, the (start, end) in the context maximising start + end logits, with
    start <= end < start + MAX_ANSWER_LENGTH."""
    very_negative = torch.finfo(start_logits.dtype).min / 4
    start_logits = start_logits.masked_fill(~context_mask, very_negative)
    end_logits = end_logits.masked_fill(~context_mask, very_negative)
    scores = start_logits[:, :, None] + end_logits[:, None, :]  # (B, start, end)
    length = scores.size(-1)
    allowed = torch.ones(length, length, dtype=torch.bool).triu().tril(MAX_ANSWER_LENGTH - 1)
    scores = scores.masked_fill(~allowed, very_negative)
    flat = scores.flatten(1).argmax(-1)
    return [(int(i) // length, int(i) % length) for i in flat]


def token_f1(predicted: List[int], gold: List[int]) -> float:
    shared = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def evaluate(model, batches, device) -> Dict[str, float]:
    """Exact match and token F1 (SQuAD's, over our word tokens), in [0, 1]."""
    exact = f1 = count = 0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if not k.endswith("_positions")}
        with common.evaluating(model):  # eval mode for the forward pass, restored after
            outputs = model(**data_lib.to_device(inputs, device))
        spans = best_spans(outputs.start_logits.cpu(), outputs.end_logits.cpu(),
                           context_mask(batch))
        for row, (start, end) in enumerate(spans):
            gold_start = int(batch["start_positions"][row])
            gold_end = int(batch["end_positions"][row])
            predicted = batch["input_ids"][row, start:end + 1].tolist()
            gold = batch["input_ids"][row, gold_start:gold_end + 1].tolist()
            exact += int((start, end) == (gold_start, gold_end))
            f1 += token_f1(predicted, gold)
            count += 1
    return {"exact_match": exact / count, "f1": f1 / count}


def context_mask(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L) True at the context's tokens (segment 1; the final [SEP] is segment 0)."""
    return batch["token_type_ids"] == 1


# ---------------------------------------------------------------------------------- models
def build(config: Dict[str, Any], layers: int, setup: Dict[str, Any]):
    if "num_hidden_layers" not in config:
        config = dict(config, num_hidden_layers=layers)
    return BertForQuestionAnswering(BertConfig(
        **config, vocab_size=setup["vocab_size"], max_position_embeddings=setup["max_length"],
        attn_implementation="eager"))  # sdpa (the default) returns no attention maps


def adaptor(batch: Dict[str, torch.Tensor], outputs) -> Dict[str, Any]:
    # Two heads, each (B, L): a distribution over positions. The answer is always in the
    # context, so both models' logits get -1e4 elsewhere and the KD term (a softmax over
    # positions) compares the distributions over the context only. (logits_mask selects
    # positions of 3-D (B, L, C) logits; these heads are 2-D, so it does not apply.)
    return {"logits": [outputs.start_logits.masked_fill(~context_mask(batch), -1e4),
                       outputs.end_logits.masked_fill(~context_mask(batch), -1e4)],
            "hidden": outputs.hidden_states, "attention": outputs.attentions,
            "inputs_mask": batch["attention_mask"], "losses": outputs.loss}


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = data_lib.parser(__doc__, "./output_span_extraction",
                             "a directory with SQuAD v1.1 train-v1.1.json and dev-v1.1.json; "
                             "default: the offline stdlib task",
                             epochs=(1, 5), teacher_epochs=(1, 6))
    parser.add_quick_argument("--student-layers", 2, 4, "the student's depth")
    parser.add_argument("--kd-over-heads", choices=["sum", "last", "both"],
                        default="sum",
                        help="'sum': KD on both heads (default); 'last': TextBrewer "
                             "0.2.1's last head only; 'both': one student each way")
    parser.add_argument("--candidates", type=int, default=4,
                        help="functions listed in each context (the stdlib task)")
    parser.add_quick_argument("--max-files", 40, None, "stdlib modules read")
    parser.add_quick_argument("--max-examples", 200, 1200,
                              "training examples kept, spread over the split")
    parser.add_quick_argument("--max-length", 64, 112, "tokens per example", positive=False)
    # two segments (question, context): type_vocab_size 2
    args = data_lib.parse_args(parser, argv, min_length=QUESTION_LENGTH + 8, type_vocab_size=2)
    if args.candidates < 2:
        parser.error(f"--candidates must be at least 2, got {args.candidates}")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started, device = data_lib.start(args)
    data = load_data(args)
    splits, vocabulary = data["splits"], data["vocabulary"]
    collate = Collator(vocabulary)
    setup = {"vocab_size": len(vocabulary), "max_length": args.max_length}
    test_batches = data_lib.batches_of(splits["test"], collate, 64)
    print(f"{data['source']}: {len(splits['train'])} training and {len(splits['test'])} test "
          f"examples ({data['dropped']} left out: answer past --max-length), vocabulary "
          f"{len(vocabulary)}, device {device}")

    teacher = data_lib.train_teacher(build, adaptor, setup, splits["train"], collate, args,
                                     device)
    layers = args.student_layers
    initial = data_lib.initial_student(build, layers, setup, args)
    print(f"{layers}-layer student alone ({args.epochs} epochs)")
    alone = copy.deepcopy(initial).to(device)
    data_lib.train_alone("student_alone", alone, adaptor, splits["train"], collate, args,
                         device, args.epochs)
    models: Dict[str, torch.nn.Module] = {"teacher": teacher, "student_alone": alone}
    ways = ["sum", "last"] if args.kd_over_heads == "both" else [args.kd_over_heads]
    for way in ways:
        name = "distilled_student" if way == "sum" else "distilled_student_last_head"
        print(f"{layers}-layer student distilled, kd_over_heads={way!r} ({args.epochs} epochs)")
        models[name] = copy.deepcopy(initial).to(device)
        data_lib.distil(name, teacher, models[name], layers, adaptor, splits["train"], collate,
                        args, device, kd_over_heads=way)

    results: Dict[str, Any] = {"models": data_lib.score(
        models, test_batches, lambda model: evaluate(model, test_batches, device), device,
        label_keys=("start_positions", "end_positions"))}
    results["data"] = {"source": data["source"], "train": len(splits["train"]),
                       "test": len(splits["test"]), "dropped": data["dropped"],
                       "vocabulary": len(vocabulary)}
    results["configs"] = {"teacher": args.teacher_config,
                          "student": dict(args.student_config, num_hidden_layers=layers),
                          **setup}
    results["run"] = common.run_record(args, started, [
        "epochs", "teacher_epochs", "kd_over_heads", "lr", "temperature", "batch_size",
        "quick", "seed"], settings={"device": str(device)})
    data_lib.report(results, ["exact_match", "f1"], args.output_dir)
    return results


if __name__ == "__main__":
    main()
