"""Distil a causal language model into a student with a DIFFERENT tokenizer.

The text is the standard library's docstrings (as in examples/lm_distillation.py: split by
top-level package into train / validation / test, 80 / 10 / 10 %), cut into pieces of at
most ``--piece-characters`` characters at line ends. Two real tokenizers are trained here
on the training split with the ``tokenizers`` library (seconds, offline):

* the teacher's: GPT-2-style **byte-level BPE** (``--teacher-vocab`` entries,
  ``<s> … </s>`` around each piece);
* the student's: Llama-style **SentencePiece BPE** (``--student-vocab`` entries, words
  marked with ``▁``, characters it never saw as ``<unk>``, ``<s>`` in front).

So the two models never share a token id, a vocabulary size or a segmentation. Runs:

1. the teacher: a GPT-2 (width 128, 3 layers) trained on next-token cross-entropy over
   its own tokens for ``--teacher-steps`` steps;
2. per seed, the student alone: a GPT-2 (width 64, 2 layers) over its own tokens,
   cross-entropy only, ``--steps`` steps: the baseline;
3. per seed and per mode (``--modes``), the distilled student: the same initial weights,
   data order and steps, ``CausalLMDistiller`` with
   ``LMDistillationConfig(token_alignment=mode)`` on batches of
   ``CrossTokenizerCollator`` (both tokenisations of each piece, aligned on characters):
   ``'span'`` (the teacher's merged next-text distribution carried onto the student's
   vocabulary by ``vocabulary_map``: identical strings, else minimum edit distance; forward
   KL) or ``'uld'`` (sorted-probability L1), plus ``--hard-label-weight`` · CE.

The score is the **perplexity per byte** on the held-out split: exp of the student's summed
next-token cross-entropy over the pieces' tokens divided by the pieces' UTF-8 bytes, so
models with different tokenizers are on one scale (the teacher's row uses its own tokens).
It prints the table (mean ± std over seeds, better/tied/worse per seed against the student
alone), how much of the text the alignment pairs, and writes ``{output_dir}/results.json``.

Run:
    python examples/lm_cross_tokenizer.py            # 3 seeds, a few minutes on one core
    python examples/lm_cross_tokenizer.py --quick    # seconds (used by the tests)
    python examples/lm_cross_tokenizer.py --split validation --seeds 0   # choose settings
"""
from __future__ import annotations

import collections
import copy
import functools
import math
import os
import sys
import time
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)
import _text_data as data_lib  # noqa: E402  (split_of)
import lm_distillation as byte_lm  # noqa: E402  (the docstring corpus, GPT-2 helpers)

from textbrewer import (CausalLMDistiller, DistillationConfig,  # noqa: E402
                        LMDistillationConfig)
from textbrewer.distillers.lm.cross_tokenizer import (CrossTokenizerCollator,  # noqa: E402
                                                      token_strings, vocabulary_map)
from textbrewer.testing import train_tokenizer  # noqa: E402
from textbrewer.utils import count_parameters  # noqa: E402

TEACHER_CONFIG = dict(n_embd=128, n_layer=3, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0)
STUDENT_CONFIG = dict(n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0)
PAD = 0  # '<pad>' in both trained tokenizers
STUDENT_TOKENIZER = "sentencepiece_bpe"  # trains the same on every run (Unigram does not)


def pieces(texts: List[str], characters: int) -> List[str]:
    """The texts cut at line ends into pieces of at most ``characters`` (a longer line is
    cut where it reaches the limit)."""
    out = []
    for text in texts:
        current = ""
        for line in text.splitlines(keepends=True):
            while len(line) > characters:
                if current:
                    out.append(current)
                    current = ""
                out.append(line[:characters])
                line = line[characters:]
            if len(current) + len(line) > characters:
                out.append(current)
                current = ""
            current += line
        if current.strip():
            out.append(current)
    return [piece for piece in out if piece.strip()]


def load_data(characters: int) -> Dict[str, List[str]]:
    """``{split: [piece, ...]}`` from the standard library's docstrings."""
    splits: Dict[str, List[str]] = {"train": [], "validation": [], "test": []}
    for package, texts in sorted(byte_lm.stdlib_docstrings().items()):
        splits[data_lib.split_of(package)] += pieces(texts, characters)
    return splits


def side_batches(collate: CrossTokenizerCollator, role: str):
    """One model's half of the cross-tokenizer batches (for the runs without the other)."""
    return functools.partial(collate.one_side, role=role)


def gpt2(config: Dict[str, Any], vocab_size: int, positions: int, seed: int):
    torch.manual_seed(seed)
    return byte_lm.GPT2LMHeadModel(byte_lm.GPT2Config(
        vocab_size=vocab_size, n_positions=positions, bos_token_id=None, eos_token_id=None,
        pad_token_id=PAD, **config))


@torch.no_grad()
def perplexity_per_byte(model, texts: List[str], collate, side: str, device,
                        batch_size: int = 32) -> float:
    """exp(Σ next-token cross-entropy / Σ UTF-8 bytes) over ``texts`` tokenised for
    ``side`` ('teacher' or 'student')."""
    loss_sum, total_bytes = 0.0, 0
    with common.evaluating(model):
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            batch = collate.one_side(chunk, side)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss_sum += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                reduction="sum").item()
            total_bytes += sum(len(text.encode("utf-8")) for text in chunk)
    return math.exp(loss_sum / max(total_bytes, 1))


def alignment_summary(collate: CrossTokenizerCollator, texts: List[str]) -> Dict[str, float]:
    """How much of the student's text the aligned groups reach, and their shapes."""
    batch = collate(texts)
    groups = batch["token_groups"]
    tokens_S = int((batch["student"]["attention_mask"][:, 1:] != 0).sum())
    size_T = (groups.teacher >= 0).sum(1)
    size_S = (groups.student >= 0).sum(1)
    return {"student_tokens": tokens_S, "groups": int(groups.batch.numel()),
            "student_tokens_in_groups": int(size_S.sum()),
            "one_to_one": float(((size_T == 1) & (size_S == 1)).float().mean()),
            "teacher_tokens_per_group": float(size_T.float().mean()),
            "student_tokens_per_group": float(size_S.float().mean())}


def train(model, teacher, loader, args, device, steps, lr, seed, output_dir, mode=None,
          mapping=None) -> None:
    """One ``CausalLMDistiller`` run: cross-entropy alone without a teacher, else
    ``1 · KD + hard_label_weight · CE`` with ``token_alignment=mode``."""
    distilling = teacher is not None
    distill_config = DistillationConfig(
        temperature=args.temperature, kd_loss_weight=1.0 if distilling else 0.0,
        hard_label_weight=args.hard_label_weight if distilling else 1.0)
    lm_config = LMDistillationConfig(token_alignment=mode if distilling else None)
    optimizer, schedule = byte_lm.optimizer_and_schedule(model, lr, steps)
    distiller = CausalLMDistiller(byte_lm.train_config(output_dir, device, steps, seed),
                                  distill_config, model_T=teacher, model_S=model,
                                  lm_config=lm_config,
                                  vocabulary_map=mapping if mode == "span" else None)
    common.fit(distiller, optimizer, loader, num_steps=steps, max_grad_norm=1.0, **schedule)


def parse_args(argv=None):
    parser = common.ExampleParser(__doc__, "./output_lm_cross_tokenizer",
                                  quick_help="a much smaller run, for tests (seconds)",
                                  output_help="checkpoints (gs*.pkl) and results.json go here")
    parser.add_quick_argument("--steps", 8, 300, "optimizer steps of each student run, alone "
                              "and distilled: the same budget for both")
    parser.add_quick_argument("--teacher-steps", 16, 600, "optimizer steps of the teacher")
    parser.add_quick_argument("--scored-pieces", 24, 600, "held-out pieces scored")
    parser.add_seeds(help="student seeds (initial weights, data order)")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="the split the table scores: choose settings on 'validation'")
    parser.add_argument("--modes", nargs="+", choices=("span", "uld"), default=["span", "uld"],
                        help="token_alignment modes, one distilled student each")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--hard-label-weight", type=float, default=1.0,
                        help="weight of the cross-entropy next to the KD term (weight 1)")
    parser.add_argument("--teacher-vocab", type=int, default=2000)
    parser.add_argument("--student-vocab", type=int, default=1000)
    parser.add_argument("--piece-characters", type=int, default=240)
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="tokens kept per piece on each side")
    parser.add_training_options(lr=3e-3, batch_size=16, lr_help="students' learning rate")
    parser.add_argument("--alone-lr", type=float, default=None,
                        help="learning rate of the student-alone runs (default: --lr), so "
                             "each side can use the setting its own search chose")
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    parser.add_argument("--teacher-weights", default=None,
                        help="load the teacher from this gs{N}.pkl (a previous run's "
                             "OUTPUT/teacher/gs{teacher_steps}.pkl with the same tokenizer "
                             "and data settings) instead of training it")
    parser.add_threads("torch CPU threads (default 1)")
    parser.add_device()
    parser.require_positive("batch_size", "teacher_vocab", "student_vocab", "piece_characters")
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    cpu_started = time.process_time()
    started = common.start(args.threads, quiet=True)
    device = torch.device(args.device)
    data = load_data(args.piece_characters)
    if args.quick:
        data["train"] = data["train"][:400]
    scored = data[args.split][:args.scored_pieces]
    clock = time.perf_counter()
    tokenizer_T = train_tokenizer("byte_bpe", data["train"], args.teacher_vocab)
    tokenizer_S = train_tokenizer(STUDENT_TOKENIZER, data["train"], args.student_vocab)
    mapping = vocabulary_map(tokenizer_T, tokenizer_S)
    strings_T, strings_S = token_strings(tokenizer_T), token_strings(tokenizer_S)
    exact = sum(1 for i, j in enumerate(mapping.tolist())
                if j >= 0 and strings_T[i] == strings_S[j])
    collate = CrossTokenizerCollator(tokenizer_T, tokenizer_S, max_length=args.max_tokens,
                                     pad_id_T=PAD, pad_id_S=PAD)
    summary = alignment_summary(collate, scored)
    print(f"standard-library docstrings: {len(data['train']):,} / {len(data['validation']):,} "
          f"/ {len(data['test']):,} pieces (train / validation / test), scoring "
          f"{len(scored)} {args.split} pieces; tokenizers: byte-level BPE "
          f"{tokenizer_T.get_vocab_size()} (teacher) and SentencePiece BPE "
          f"{tokenizer_S.get_vocab_size()} (student), {exact} teacher tokens with an "
          f"identical student string, the rest by edit distance "
          f"({time.perf_counter() - clock:.1f} s)")
    print(f"alignment on the scored pieces: {summary['groups']:,} groups cover "
          f"{summary['student_tokens_in_groups']:,} of {summary['student_tokens']:,} student "
          f"target tokens; {summary['one_to_one']:.0%} one token to one token", flush=True)

    positions = args.max_tokens
    teacher = gpt2(TEACHER_CONFIG, tokenizer_T.get_vocab_size(), positions, 1000).to(device)
    teacher_loader = common.shuffled(data["train"], args.batch_size, 1000,
                                     side_batches(collate, "teacher"), drop_last=True)
    clock = time.perf_counter()
    if args.teacher_weights:
        teacher.load_state_dict(torch.load(args.teacher_weights, map_location=device,
                                           weights_only=True))
    else:
        train(teacher, None, teacher_loader, args, device, args.teacher_steps,
              args.teacher_lr, 1000, os.path.join(args.output_dir, "teacher"))
    teacher.eval()
    scores: Dict[str, List[float]] = collections.defaultdict(list)
    scores["teacher"].append(perplexity_per_byte(teacher, scored, collate, "teacher", device))
    print(f"  teacher: perplexity per byte {scores['teacher'][0]:.3f} "
          f"({time.perf_counter() - clock:.0f} s)", flush=True)

    methods = ["student_alone"] + [f"distilled_{mode}" for mode in args.modes]
    students = {}
    for seed in args.seeds:
        initial = gpt2(STUDENT_CONFIG, tokenizer_S.get_vocab_size(), positions, seed)
        for method in methods:
            clock = time.perf_counter()
            student = copy.deepcopy(initial).to(device)
            run_dir = os.path.join(args.output_dir, method, f"seed{seed}")
            alone = method == "student_alone"
            loader = common.shuffled(data["train"], args.batch_size, seed,
                                     side_batches(collate, "student") if alone else collate,
                                     drop_last=True)
            lr = args.alone_lr if alone and args.alone_lr is not None else args.lr
            train(student, None if alone else teacher, loader, args, device, args.steps,
                  lr, seed, run_dir, mode=None if alone else method.split("_")[1],
                  mapping=mapping)
            scores[method].append(perplexity_per_byte(student, scored, collate, "student",
                                                      device))
            students[method] = student
            print(f"  seed {seed} {method}: perplexity per byte {scores[method][-1]:.4f} "
                  f"({time.perf_counter() - clock:.0f} s)", flush=True)

    results: Dict[str, Any] = {"models": {}}
    for name in ["teacher"] + methods:
        model = teacher if name == "teacher" else students[name]
        mean, std = common.mean_std(scores[name])
        row = {"perplexity_per_byte": mean, "perplexity_per_byte_std": std,
               "per_seed": scores[name], "parameters": count_parameters(model)}
        if name.startswith("distilled_"):
            row["better_tied_worse"] = common.better_tied_worse(
                scores[name], scores["student_alone"], higher_is_better=False)
        results["models"][name] = row
    results["alignment"] = summary
    results["tokenizers"] = {"teacher": {"kind": "byte_bpe",
                                         "vocab_size": tokenizer_T.get_vocab_size()},
                             "student": {"kind": STUDENT_TOKENIZER,
                                         "vocab_size": tokenizer_S.get_vocab_size()},
                             "identical_strings": exact}
    results["configs"] = {"teacher": dict(TEACHER_CONFIG, n_positions=positions),
                          "student": dict(STUDENT_CONFIG, n_positions=positions)}
    results["data"] = {"split": args.split, "pieces": {s: len(v) for s, v in data.items()},
                       "scored_pieces": len(scored), "python": sys.version.split()[0]}
    results["run"] = common.run_record(args, started, [
        "steps", "teacher_steps", "seeds", "modes", "temperature", "hard_label_weight", "lr",
        "alone_lr", "teacher_lr", "teacher_weights", "batch_size", "max_tokens", "threads",
        "quick"],
        settings={"device": str(device), "torch": torch.__version__})
    results["run"]["cpu_seconds"] = round(time.process_time() - cpu_started, 1)

    print()
    seeds = (f"mean ± std over seeds {args.seeds}" if len(args.seeds) > 1
             else f"seed {args.seeds[0]}")
    print(f"{args.split} split, perplexity per byte (lower is better), {seeds}:")
    print(f"{'model':<20}{'perplexity/byte':>20}{'parameters':>13}{'vs alone':>12}"
          f"{'better/tied/worse':>20}")
    alone = results["models"]["student_alone"]["perplexity_per_byte"]
    for name, row in results["models"].items():
        change = "" if name in ("teacher", "student_alone") else \
            f"{row['perplexity_per_byte'] - alone:+.4f}"
        wins = "/".join(map(str, row.get("better_tied_worse", ()))) or ""
        score = common.pm(row["perplexity_per_byte"], row["perplexity_per_byte_std"], 12, 4)
        print(f"{name:<20}{score}{row['parameters']:>13,d}{change:>12}{wins:>20}")
    print(f"{results['run']['seconds']:.0f} s; wrote "
          f"{common.write_results(args.output_dir, results)}")
    return results


if __name__ == "__main__":
    main()
