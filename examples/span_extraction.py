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
each head): here that is ``DistillationConfig(kd_over_heads='compatible')``, the default,
so that published recipes give their numbers. This example uses ``kd_over_heads='sum'``:
the start head is then taught by the teacher too, not only by the hard labels, which is
what span-extraction KD means. ``--kd-over-heads both`` trains one student each way and
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
    from transformers import BertConfig, BertForQuestionAnswering
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs transformers: pip install -e '.[transformers]'")

QUESTION_LENGTH = 16
MAX_ANSWER_LENGTH = 16
TEACHER_CONFIG = dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=4,
                      intermediate_size=128, hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1, type_vocab_size=2)
STUDENT_CONFIG = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                      type_vocab_size=2)
QUICK_TEACHER_CONFIG = dict(TEACHER_CONFIG, hidden_size=32, num_hidden_layers=4,
                            num_attention_heads=2, intermediate_size=64)
QUICK_STUDENT_CONFIG = dict(STUDENT_CONFIG, hidden_size=16, num_attention_heads=2,
                            intermediate_size=32)


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
        splits = {name: [e for e in built["examples"] if e["split"] == name]
                  for name in ("train", "test")}
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
    common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def evaluate(model, batches, device) -> Dict[str, float]:
    """Exact match and token F1 (SQuAD's, over our word tokens), in [0, 1]."""
    was_training = model.training
    model.eval()
    exact = f1 = count = 0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if not k.endswith("_positions")}
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
    model.train(was_training)
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


def distil(name, teacher, student, layers, kd_over_heads, train_examples, collate, args,
           device) -> None:
    matches = tinybert_layer_mapping(args.teacher_config["num_hidden_layers"], layers,
                                     args.teacher_config["hidden_size"],
                                     args.student_config["hidden_size"],
                                     features=("hidden", "attention"))
    config = DistillationConfig(temperature=args.temperature, kd_loss_type="ce",
                                kd_loss_weight=1.0, hard_label_weight=1.0,
                                kd_over_heads=kd_over_heads, intermediate_matches=matches)
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
    parser.add_argument("--output-dir", default="./output_span_extraction")
    parser.add_argument("--data", default=None,
                        help="a directory with SQuAD v1.1 train-v1.1.json and dev-v1.1.json; "
                             "default: the offline stdlib task")
    parser.add_argument("--quick", action="store_true", help="a tiny run, for tests")
    parser.add_argument("--epochs", type=int, default=None,
                        help="student epochs (default 5; 1 with --quick)")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help="teacher epochs (default 6; 1 with --quick)")
    parser.add_argument("--student-layers", type=int, default=None,
                        help="the student's depth (default 4; 2 with --quick)")
    parser.add_argument("--kd-over-heads", choices=["sum", "compatible", "both"],
                        default="sum",
                        help="'sum': KD on both heads (default); 'compatible': TextBrewer "
                             "0.2.1's last head only; 'both': one student each way")
    parser.add_argument("--candidates", type=int, default=4,
                        help="functions listed in each context (the stdlib task)")
    parser.add_argument("--max-files", type=int, default=None,
                        help="stdlib modules read (default all; 40 with --quick)")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="training examples kept, spread over the split (default 1200; "
                             "200 with --quick)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per example (default 112; 64 with --quick)")
    parser.add_argument("--vocab-size", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    defaults = dict(epochs=(1, 5), teacher_epochs=(1, 6), student_layers=(2, 4),
                    max_files=(40, None), max_length=(64, 112),
                    max_examples=(200, 1200))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.teacher_config = QUICK_TEACHER_CONFIG if args.quick else TEACHER_CONFIG
    args.student_config = QUICK_STUDENT_CONFIG if args.quick else STUDENT_CONFIG
    depth = args.teacher_config["num_hidden_layers"]
    if not 1 <= args.student_layers <= depth:
        parser.error(f"--student-layers must be in 1..{depth} (the teacher's), got "
                     f"{args.student_layers}")
    for name in ("epochs", "teacher_epochs", "max_examples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.candidates < 2:
        parser.error(f"--candidates must be at least 2, got {args.candidates}")
    if args.max_length < QUESTION_LENGTH + 8:
        parser.error(f"--max-length must be at least {QUESTION_LENGTH + 8}, got "
                     f"{args.max_length}")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    seed_everything(args.seed)
    device = torch.device(args.device)
    data = load_data(args)
    splits, vocabulary = data["splits"], data["vocabulary"]
    collate = Collator(vocabulary)
    setup = {"vocab_size": len(vocabulary), "max_length": args.max_length}
    test_batches = data_lib.batches_of(splits["test"], collate, 64)
    print(f"{data['source']}: {len(splits['train'])} training and {len(splits['test'])} test "
          f"examples ({data['dropped']} left out: answer past --max-length), vocabulary "
          f"{len(vocabulary)}, device {device}")

    torch.manual_seed(args.seed)
    teacher = build(args.teacher_config, 0, setup).to(device)
    print(f"teacher ({args.teacher_epochs} epochs)")
    data_lib.train_alone("teacher", teacher, adaptor, splits["train"], collate, args, device,
                         args.teacher_epochs)
    layers = args.student_layers
    torch.manual_seed(args.seed + layers)
    initial = build(args.student_config, layers, setup)
    print(f"{layers}-layer student alone ({args.epochs} epochs)")
    alone = copy.deepcopy(initial).to(device)
    data_lib.train_alone("student_alone", alone, adaptor, splits["train"], collate, args,
                         device, args.epochs)
    models: Dict[str, torch.nn.Module] = {"teacher": teacher, "student_alone": alone}
    ways = ["sum", "compatible"] if args.kd_over_heads == "both" else [args.kd_over_heads]
    for way in ways:
        name = "distilled_student" if way == "sum" else "distilled_student_last_head"
        print(f"{layers}-layer student distilled, kd_over_heads={way!r} ({args.epochs} epochs)")
        models[name] = copy.deepcopy(initial).to(device)
        distil(name, teacher, models[name], layers, way, splits["train"], collate, args,
               device)

    timing_batches = [data_lib.to_device({k: v for k, v in b.items()
                                          if not k.endswith("_positions")}, device)
                      for b in test_batches[:8]]
    seconds = data_lib.seconds_per_batch(models, timing_batches)
    results: Dict[str, Any] = {"models": {}}
    for name, model in models.items():
        results["models"][name] = {**evaluate(model, test_batches, device),
                                   "parameters": count_parameters(model),
                                   "seconds_per_batch": seconds[name],
                                   "speedup": seconds["teacher"] / seconds[name]}
    results["data"] = {"source": data["source"], "train": len(splits["train"]),
                       "test": len(splits["test"]), "dropped": data["dropped"],
                       "vocabulary": len(vocabulary)}
    results["configs"] = {"teacher": args.teacher_config,
                          "student": dict(args.student_config, num_hidden_layers=layers),
                          **setup}
    results["run"] = {"epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                      "kd_over_heads": args.kd_over_heads, "lr": args.lr,
                      "temperature": args.temperature, "batch_size": args.batch_size,
                      "quick": args.quick, "seed": args.seed, "device": str(device),
                      "textbrewer": textbrewer.__version__,
                      "seconds": round(time.perf_counter() - started, 1)}
    print()
    data_lib.print_table(results["models"], ["exact_match", "f1"])
    print(f"{results['run']['seconds']:.0f} s")
    print(f"wrote {data_lib.write_results(args.output_dir, results)}")
    return results


if __name__ == "__main__":
    main()
