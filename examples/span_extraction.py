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
the context). TextBrewer 0.2.1's GeneralDistiller kept only the **last head's** KD loss
(it overwrote the sum at each head): here that is ``DistillationConfig(kd_over_heads=
'last')``. TextBrewer 0.2.1.post1, the release ``pip install textbrewer`` gives, sums over
the heads, and so does our default, ``kd_over_heads='sum'``: the start head is then taught
by the teacher too, not only by the hard labels, which is what span-extraction KD means.
``--kd-over-heads both`` trains one student each way and shows the difference.

Runs (``transformers.BertForQuestionAnswering`` from a ``BertConfig``, from scratch,
``attn_implementation='eager'``, no dropout, ``initializer_range`` 1/sqrt(width)): the
teacher (width 64, 4 layers, 2 heads, 10 epochs), then per ``--seeds`` seed the student
alone (width 32, 4 layers, 2 heads, 3 epochs) and the same student distilled with
``GeneralDistiller`` (3 epochs, from the same initial weights, the same batches): KD
(``ce``, temperature 4) on both heads over the context positions, the hard labels (the
model's own start/end loss), and TinyBERT's layer mapping (``tinybert_layer_mapping``:
``hidden_mse`` through a projection 32 -> 64, ``attention_mse``). AdamW, a linear warm-up
over the first 10 % of the steps, then a linear decay to zero.

The training recipe, and why (measured on the validation split, examples/README.md):

- ``initializer_range`` 1/sqrt(width), not BERT's 0.02 (sized for width 768): at width
  64 the queries and keys start so small that attention stays uniform; with 0.02 no model
  learnt even "the answer starts after ``def``" in 700 steps, with 0.125 in 500.
- ``--relabel 1``: each training example's words are renamed at random (:class:`Collator`).
  Without it the models learnt the training set's *names* (train loss 0.3) and on
  validation still started their answer after ``def`` only 37 % of the time; renamed,
  the only way to the answer is the structure and the matching, which carry over.
- ``--train-shuffles 4``: each training example four times, its group in other orders;
  all the training examples (``--max-examples``: all).

It prints exact match, F1, parameters and speed-up (the students' scores: means over the
seeds), each seed's F1 and how many seeds the distilled student beat the student alone
on, and writes ``{output_dir}/results.json``. ``--split validation`` scores the
validation split instead of the test split (to choose settings).

Run:
    python examples/span_extraction.py                     # ~15 min on one CPU thread
    python examples/span_extraction.py --quick             # seconds (used by the tests)
    python examples/span_extraction.py --seeds 0 1 2 3 4   # the teacher once, 5 students each
    python examples/span_extraction.py --split validation --lr 3e-3   # tuning: no test example
    python examples/span_extraction.py --data squad --max-length 256
"""
from __future__ import annotations

import argparse
import collections
import copy
import os
import random
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
# The full run's recipe, chosen on the validation split (examples/README.md).
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TEACHER = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
               intermediate_size=128, **NO_DROPOUT)
TEACHER_LR = 1e-3
TEACHER_EPOCHS = 10
EPOCHS = 3
TRAIN_SHUFFLES = 4
WARMUP = 0.1
RELABEL = 1.0
STUDENT = dict(num_attention_heads=2, **NO_DROPOUT)  # as many heads as the teacher: attention_mse


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
    """``{'splits': {'train', 'test'}, 'vocabulary', 'source', 'dropped'}``; with
    ``--split validation`` the ``'test'`` examples are the validation split's (the stdlib
    task only: SQuAD's dev set is its test set)."""
    if args.data:
        if args.split == "validation":
            raise SystemExit("--split validation: only with the stdlib task (the SQuAD "
                             "reader has train and dev files only)")
        splits = {"train": data_lib.read_squad(os.path.join(args.data, "train-v1.1.json")),
                  "test": data_lib.read_squad(os.path.join(args.data, "dev-v1.1.json"))}
        source = f"SQuAD JSON from {args.data}"
    else:
        built = data_lib.stdlib_spans(args.candidates, args.max_files, QUESTION_LENGTH,
                                      seed=args.seed, train_shuffles=args.train_shuffles)
        splits = data_lib.train_and_scored(built["examples"], args.split)
        source = "stdlib: which function does this docstring describe"
        if args.split == "validation":
            source += " (validation split)"
    dropped = {}
    for name in splits:
        before = len(splits[name])
        splits[name] = fit(splits[name], args.max_length)
        dropped[name] = before - len(splits[name])
        if not splits[name]:
            raise SystemExit(f"no {name} examples left from {source} (with --max-files "
                             f"{args.max_files}, --max-length {args.max_length})")
    if args.max_examples is not None and len(splits["train"]) > args.max_examples:
        # a fixed, spread-out subset
        step = len(splits["train"]) // args.max_examples
        splits["train"] = splits["train"][::step][:args.max_examples]
    vocabulary = data_lib.Vocabulary((e["question"] + e["context"] for e in splits["train"]),
                                     args.vocab_size)
    return {"splits": splits, "vocabulary": vocabulary, "source": source, "dropped": dropped}


class Collator:
    """Examples -> ``{'input_ids', 'token_type_ids', 'attention_mask', 'start_positions',
    'end_positions'}``, each (B, L) or (B,); positions count from the start of the whole
    sequence.

    ``relabel`` (training only): the fraction of examples whose words are renamed, each
    word (a token of letters or digits, not ``def``) to another word of the vocabulary
    drawn at random, the same one wherever it occurs in that example (question and context),
    different words to different words; punctuation, ``def`` and [UNK] stay. The answer is
    still the same span: the renamed example is the same puzzle in other words.
    """

    def __init__(self, vocabulary: data_lib.Vocabulary, relabel: float = 0.0, seed: int = 0):
        self.vocabulary = vocabulary
        self.relabel = relabel
        self.rng = random.Random(seed)
        self.words = [i for i, token in enumerate(vocabulary.tokens)
                      if i >= len(data_lib.SPECIALS) and token.isalnum() and token != "def"]
        self.renamed = set(self.words)

    def rename(self, question: List[int], context: List[int]):
        """``question`` and ``context`` (ids) with their words renamed consistently."""
        present = sorted({i for i in question + context if i in self.renamed})
        mapping = dict(zip(present, self.rng.sample(self.words, len(present))))
        return ([mapping.get(i, i) for i in question], [mapping.get(i, i) for i in context])

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        rows, types, starts, ends = [], [], [], []
        for e in examples:
            question = self.vocabulary.encode(e["question"])
            context = self.vocabulary.encode(e["context"])
            if self.relabel and self.rng.random() < self.relabel:
                question, context = self.rename(question, context)
            question = [data_lib.CLS] + question + [data_lib.SEP]
            context = context + [data_lib.SEP]
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
    """A ``BertForQuestionAnswering`` of ``config``, ``layers`` deep unless it says."""
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
                             epochs=(1, EPOCHS), teacher_epochs=(1, TEACHER_EPOCHS))
    parser.add_quick_argument("--student-layers", 2, 4, "the student's depth")
    parser.add_argument("--kd-over-heads", choices=["sum", "last", "both"],
                        default="sum",
                        help="'sum': KD on both heads (default); 'last': TextBrewer "
                             "0.2.1's last head only; 'both': one student each way")
    parser.add_argument("--candidates", type=int, default=4,
                        help="functions listed in each context (the stdlib task)")
    parser.add_quick_argument("--max-files", 40, None, "stdlib modules read")
    parser.add_quick_argument("--train-shuffles", 1, TRAIN_SHUFFLES,
                              "orders of each training context (augmentation, stdlib task)")
    parser.add_quick_argument("--max-examples", 200, None,
                              "training examples kept, spread over the split")
    parser.add_quick_argument("--max-length", 64, 112, "tokens per example", positive=False)
    parser.add_argument("--teacher-lr", type=float, default=TEACHER_LR,
                        help=f"the teacher's peak learning rate (default {TEACHER_LR})")
    parser.add_argument("--distil-lr", type=float, default=None,
                        help="the distilled students' peak learning rate (default: --lr, "
                             "the student alone's)")
    parser.add_argument("--warmup", type=float, default=WARMUP,
                        help="fraction of each run's steps with a linear warm-up, before "
                             f"the linear decay to zero (default {WARMUP})")
    parser.add_argument("--relabel", type=float, default=RELABEL,
                        help="fraction of training examples whose words are renamed at "
                             f"random (Collator; default {RELABEL})")
    data_lib.add_split_option(parser)
    parser.add_seeds(full=(0,), help="the students' seeds (initial weights, data order): "
                                     "each gets a student alone and distilled students; "
                                     "the teacher is trained once, with --seed")
    # two segments (question, context): type_vocab_size 2
    args = data_lib.parse_args(parser, argv, min_length=QUESTION_LENGTH + 8, run_seeds=False,
                               type_vocab_size=2)
    if args.candidates < 2:
        parser.error(f"--candidates must be at least 2, got {args.candidates}")
    if not args.quick:  # this example's teacher: shallower and wider (see the docstring)
        args.teacher_config = dict(args.teacher_config, **TEACHER)
    args.teacher_config = dict(args.teacher_config, **NO_DROPOUT)
    args.student_config = dict(args.student_config, **STUDENT)
    for name in ("teacher_config", "student_config"):
        # BERT's initializer_range, 0.02, is sized for width 768: at width 32..128 the
        # query and key start so small that attention stays uniform for hundreds of steps
        # (measured: no positional pattern learnt in 700 steps). 1/sqrt(width) instead.
        config = getattr(args, name)
        setattr(args, name, dict(config, initializer_range=round(
            config["hidden_size"] ** -0.5, 4)))
    if args.distil_lr is None:
        args.distil_lr = args.lr
    return args


def train_students(teacher, initial, examples, vocabulary, args, device
                   ) -> Dict[str, torch.nn.Module]:
    """The student alone and the distilled student(s) of ``args.seed``, from copies of
    ``initial``, ``args.epochs`` each: ``{'student_alone': ..., 'distilled_student': ...,
    'distilled_student_last_head': ...}`` (the last with ``--kd-over-heads`` last or both)."""
    layers = args.student_layers
    print(f"{layers}-layer student alone, seed {args.seed} ({args.epochs} epochs)")
    alone = copy.deepcopy(initial).to(device)
    # each run its own Collator of the same seed: the same renamings for every student
    data_lib.train_alone("student_alone", alone, adaptor, examples,
                         Collator(vocabulary, args.relabel, args.seed), args, device,
                         args.epochs, warmup=args.warmup)
    models: Dict[str, torch.nn.Module] = {"student_alone": alone}
    ways = ["sum", "last"] if args.kd_over_heads == "both" else [args.kd_over_heads]
    for way in ways:
        name = "distilled_student" if way == "sum" else "distilled_student_last_head"
        print(f"{layers}-layer student distilled, kd_over_heads={way!r}, seed {args.seed} "
              f"({args.epochs} epochs)")
        models[name] = copy.deepcopy(initial).to(device)
        data_lib.distil(name, teacher, models[name], layers, adaptor, examples,
                        Collator(vocabulary, args.relabel, args.seed), args, device,
                        lr=args.distil_lr, warmup=args.warmup, kd_over_heads=way)
    return models


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started, device = data_lib.start(args)
    data = load_data(args)
    splits, vocabulary = data["splits"], data["vocabulary"]
    collate = Collator(vocabulary)
    setup = {"vocab_size": len(vocabulary), "max_length": args.max_length}
    test_batches = data_lib.batches_of(splits["test"], collate, 64)
    print(f"{data['source']}: {len(splits['train'])} training and {len(splits['test'])} "
          f"{args.split} examples ({data['dropped']} left out: answer past --max-length), "
          f"vocabulary {len(vocabulary)}, device {device}")

    torch.manual_seed(args.seed)
    teacher = build(args.teacher_config, 0, setup).to(device)
    print(f"teacher ({args.teacher_epochs} epochs)")
    data_lib.train_alone("teacher", teacher, adaptor, splits["train"],
                         Collator(vocabulary, args.relabel, args.seed), args, device,
                         args.teacher_epochs, lr=args.teacher_lr, warmup=args.warmup)
    scores = lambda model: evaluate(model, test_batches, device)  # noqa: E731
    per_seed: Dict[int, Dict[str, Dict[str, float]]] = {}
    results: Dict[str, Any] = {}
    for seed in args.seeds:
        run = copy.copy(args)
        run.seed = seed
        if len(args.seeds) > 1:
            run.output_dir = os.path.join(args.output_dir, f"seed{seed}")
        initial = data_lib.initial_student(build, args.student_layers, setup, run)
        students = train_students(teacher, initial, splits["train"], vocabulary, run, device)
        if not results:  # sizes and speed: once, from the first seed's students
            results["models"] = data_lib.score(
                {"teacher": teacher, **students}, test_batches, scores, device,
                label_keys=("start_positions", "end_positions"))
        per_seed[seed] = {name: scores(model) for name, model in students.items()}
        print(f"seed {seed}: " + ", ".join(f"{name} F1 {row['f1']:.4f}"
                                           for name, row in per_seed[seed].items()),
              flush=True)
    for name, row in results["models"].items():
        if name == "teacher":
            continue
        for metric in ("exact_match", "f1"):  # the mean over the seeds, and its spread
            row[metric], row[f"{metric}_std"] = common.mean_std(
                [per_seed[seed][name][metric] for seed in args.seeds])
        row["per_seed"] = {str(seed): per_seed[seed][name] for seed in args.seeds}
    wins = {}
    for name in results["models"]:
        if name.startswith("distilled"):
            wins[name] = common.better_tied_worse(
                [per_seed[seed][name]["f1"] for seed in args.seeds],
                [per_seed[seed]["student_alone"]["f1"] for seed in args.seeds])
    results["f1_better_tied_worse_than_alone"] = wins
    results["data"] = {"source": data["source"], "train": len(splits["train"]),
                       "test": len(splits["test"]), "split": args.split,
                       "dropped": data["dropped"], "vocabulary": len(vocabulary)}
    results["configs"] = {"teacher": args.teacher_config,
                          "student": dict(args.student_config,
                                          num_hidden_layers=args.student_layers),
                          **setup}
    results["run"] = common.run_record(args, started, [
        "epochs", "teacher_epochs", "kd_over_heads", "lr", "distil_lr", "teacher_lr",
        "warmup", "relabel", "temperature", "batch_size", "train_shuffles", "max_examples", "split",
        "quick", "seed", "seeds"], settings={"device": str(device)})
    if len(args.seeds) > 1:
        print(f"\n{args.split} F1 per seed {args.seeds}:")
        for name, row in results["models"].items():
            if "per_seed" in row:
                print(f"{name:<28}" + " ".join(f"{v['f1']:.4f}" for v in row["per_seed"].values())
                      + f"   mean {common.pm(row['f1'], row['f1_std'])}, EM "
                      f"{common.pm(row['exact_match'], row['exact_match_std'])}")
    for name, (better, tied, worse) in wins.items():
        print(f"{name} vs student_alone (F1): better/tied/worse on {better}/{tied}/{worse} "
              f"seeds")
    if len(args.seeds) > 1:
        print("(the table's students: means over the seeds)")
    data_lib.report(results, ["exact_match", "f1"], args.output_dir)
    return results


if __name__ == "__main__":
    main()
