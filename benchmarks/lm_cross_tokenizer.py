"""Step time of cross-tokenizer distillation against same-tokenizer distillation.

On the LM examples' corpus (the standard library's docstrings, cut into pieces as in
examples/lm_cross_tokenizer.py) and its two real trained tokenizers (byte-level BPE for
the teacher, SentencePiece BPE for the student), per optimizer step of the same student:

* ``hand_written``: a plain PyTorch loop, one tokenizer: teacher forward under
  ``no_grad``, student forward, forward KL (τ = 1) + cross-entropy over the target
  tokens, backward, clipping at 1.0, AdamW step;
* ``same_tokenizer``: ``CausalLMDistiller`` doing that work (the teacher built on the
  student's vocabulary, so both see the student's ids);
* ``span`` and ``uld``: ``CausalLMDistiller`` with ``token_alignment='span'`` / ``'uld'``,
  the teacher on its own tokenizer and vocabulary, batches from ``CrossTokenizerCollator``.

Batches are collated before the clock starts (the collation, which a ``DataLoader``'s
workers would do, is timed on its own: ``collate_seconds`` per batch for each side). The
sides run interleaved, ``--repeats`` rounds of ``--steps`` steps after a warm-up, and the
median seconds per step is reported with every round's figure, so the noise of a busy
machine falls on all sides alike. The issue's bar: span and ULD at most 1.3× the
same-tokenizer step.

    python benchmarks/lm_cross_tokenizer.py              # one JSON object on stdout
    python benchmarks/lm_cross_tokenizer.py --threads 2 --batch-size 32 --max-tokens 256
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

SIDES = ("hand_written", "same_tokenizer", "span", "uld")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per piece, per side")
    parser.add_argument("--steps", type=int, default=10, help="steps per round (>= 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--teacher-vocab", type=int, default=2000)
    parser.add_argument("--student-vocab", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def hand_written_step(teacher, student, optimizer, batch):
    """One same-tokenizer step in plain PyTorch: KL(p_T‖q_S) + CE over the target tokens."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    valid = targets.reshape(-1) != -100
    with torch.no_grad():
        logits_T = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logits_S = student(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    flat_S = logits_S.reshape(-1, logits_S.size(-1))[valid]
    flat_T = logits_T.reshape(-1, logits_T.size(-1))[valid]
    log_q = F.log_softmax(flat_S, -1)
    kd = F.kl_div(log_q, F.log_softmax(flat_T, -1), log_target=True, reduction="sum")
    ce = F.nll_loss(log_q, targets.reshape(-1)[valid], reduction="sum")
    loss = (kd + ce) / valid.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import lm_cross_tokenizer as example
    from textbrewer import (CausalLMDistiller, DistillationConfig, LMDistillationConfig,
                            TrainingConfig, set_verbosity)
    from textbrewer.distillers.lm.cross_tokenizer import CrossTokenizerCollator, vocabulary_map
    from textbrewer.testing import train_tokenizer
    set_verbosity("warning")

    data = example.load_data(240)
    texts = data["train"]
    tokenizer_T = train_tokenizer("byte_bpe", texts, args.teacher_vocab)
    tokenizer_S = train_tokenizer(example.STUDENT_TOKENIZER, texts, args.student_vocab)
    mapping = vocabulary_map(tokenizer_T, tokenizer_S)
    collate = CrossTokenizerCollator(tokenizer_T, tokenizer_S, max_length=args.max_tokens,
                                     pad_id_T=example.PAD, pad_id_S=example.PAD)
    rounds = args.warmup + args.steps
    chunks = [texts[i * args.batch_size:(i + 1) * args.batch_size] for i in range(rounds)]
    timed = {}
    clock = time.perf_counter()
    cross_batches = [collate(chunk) for chunk in chunks]
    timed["cross"] = (time.perf_counter() - clock) / rounds
    clock = time.perf_counter()
    student_batches = [collate.one_side(chunk, "student") for chunk in chunks]
    timed["student_only"] = (time.perf_counter() - clock) / rounds

    vocab_T, vocab_S = tokenizer_T.get_vocab_size(), tokenizer_S.get_vocab_size()
    student_init = example.gpt2(example.STUDENT_CONFIG, vocab_S, args.max_tokens, 0)
    teachers = {"same": example.gpt2(example.TEACHER_CONFIG, vocab_S, args.max_tokens, 1000),
                "cross": example.gpt2(example.TEACHER_CONFIG, vocab_T, args.max_tokens, 1000)}
    for teacher in teachers.values():
        teacher.eval().requires_grad_(False)

    def run(side, output_dir):
        """Seconds per step of ``args.steps`` steps after ``args.warmup`` (fresh student)."""
        student = copy.deepcopy(student_init)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        if side == "hand_written":
            teacher = teachers["same"]
            for batch in student_batches[:args.warmup]:
                hand_written_step(teacher, student, optimizer, batch)
            clock = time.perf_counter()
            for batch in student_batches[args.warmup:-1]:  # as many steps as the library's
                hand_written_step(teacher, student, optimizer, batch)
            return (time.perf_counter() - clock) / (args.steps - 1)
        cross = side in ("span", "uld")
        distiller = CausalLMDistiller(
            TrainingConfig(device="cpu", output_dir=output_dir, log_dir=None,
                           log_steps=rounds, ckpt_steps=None),
            DistillationConfig(temperature=1.0, kd_loss_weight=1.0, hard_label_weight=1.0),
            model_T=teachers["cross" if cross else "same"], model_S=student,
            lm_config=LMDistillationConfig(token_alignment=side if cross else None,
                                           path="dense"),
            vocabulary_map=mapping if side == "span" else None)
        batches = cross_batches if cross else student_batches
        marks = []

        class Clock:
            """Marks when the first timed batch and the last batch are asked for: the
            steps in between (``steps - 1`` of them) are timed, the final checkpoint not."""
            def __iter__(self):
                for index, batch in enumerate(batches):
                    if index in (args.warmup, rounds - 1):
                        marks.append(time.perf_counter())
                    yield batch
        with distiller:
            distiller.train(optimizer, Clock(), num_steps=rounds, max_grad_norm=1.0)
        return (marks[1] - marks[0]) / (args.steps - 1)

    import tempfile
    seconds = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for side in SIDES:
                seconds[side].append(run(side, os.path.join(folder, f"{side}{repeat}")))
    median = {side: statistics.median(values) for side, values in seconds.items()}
    result = {
        "benchmark": "lm_cross_tokenizer", "torch": torch.__version__, "threads": args.threads,
        "batch_size": args.batch_size, "max_tokens": args.max_tokens,
        "vocab_teacher": vocab_T, "vocab_student": vocab_S,
        "seconds_per_step": median, "rounds": seconds,
        "ratio_to_same_tokenizer": {side: median[side] / median["same_tokenizer"]
                                    for side in SIDES},
        "library_over_hand_written": median["same_tokenizer"] / median["hand_written"],
        "collate_seconds_per_batch": timed,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
