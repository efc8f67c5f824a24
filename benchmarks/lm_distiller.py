"""Throughput and peak memory: ``CausalLMDistiller`` against a hand-written PyTorch loop.

Both sides do the same work per optimizer step on the same GPT-2 models (built from
``transformers.GPT2Config``, same seeds, same batches): teacher forward under
``torch.no_grad``, student forward, forward KL(p_T ‖ q_S) at τ = 1 summed over the valid
target tokens (every position but the last of each row: the logits at t predict t + 1)
and divided by their number, backward, gradient clipping at 1.0, AdamW step, zero_grad.

The token loss is computed the same way on both sides, by ``--path``:

* ``dense``: the hand-written loop is plain PyTorch (full fp32 ``log_softmax`` of both
  models' logits, ``F.kl_div``); the library's dense path is its own autograd formula;
* ``chunked``: both sides get full logits from the models and call
  ``textbrewer.losses.token.token_distillation_loss(..., chunk_size=C)``;
* ``fused``: the hand-written loop runs ``model.transformer`` (the GPT-2 body, no LM head)
  and calls ``fused_token_distillation_loss`` on the final hidden states and the heads'
  weights; the library swaps each model's head for a capture during the forward pass and
  calls the same function. No [tokens, vocab] logits exist on either side.

So the figures measure what the distiller adds (its loop, batch preparation and token
counting, the head capture) and, for ``dense``, the library's loss against a plain one.

Each (side, repeat) runs in its own subprocess: ``--warmup`` steps, then ``--steps``
timed steps. Memory is the process's peak resident set (``ru_maxrss``) on CPU, which
includes the interpreter, torch and the models; ``torch.cuda.max_memory_allocated`` on
CUDA (reset after the warm-up). One JSON object per line on stdout, one per side (the
fastest of ``--repeats`` runs, with every run's seconds per step), then a summary line.

    python benchmarks/lm_distiller.py --device cpu --vocab 32000 --tokens 2048 --steps 5
    python benchmarks/lm_distiller.py --device cuda --vocab 128256 --tokens 8192 \\
        --hidden-teacher 1024 --hidden-student 512 --layers-teacher 8 --layers-student 4 \\
        --dtype bfloat16 --path fused
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

PATHS = ("dense", "chunked", "fused")
SIDES = ("library", "hand_written")


def build(args, device):
    """Teacher, student (seeded) and the batches, the same on both sides."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(hidden, layers, seed):
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=args.vocab, n_positions=args.length, n_embd=hidden,
                            n_layer=layers, n_head=max(1, hidden // 64), bos_token_id=0,
                            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(config).to(device)

    teacher = gpt2(args.hidden_teacher, args.layers_teacher, 0)
    student = gpt2(args.hidden_student, args.layers_student, 1)
    generator = torch.Generator().manual_seed(2)
    batch_size = args.tokens // args.length
    batches = [{"input_ids": torch.randint(0, args.vocab, (batch_size, args.length),
                                           generator=generator)} for _ in range(4)]
    return teacher, student, batches


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_library(args, device):
    from textbrewer import DistillationConfig, TrainingConfig
    from textbrewer.distillers.lm import CausalLMDistiller, LMDistillationConfig

    teacher, student, batches = build(args, device)
    precision = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]
    config = TrainingConfig(device=str(device), output_dir=args.scratch,
                            mixed_precision=precision, log_steps=10 ** 9, ckpt_steps=10 ** 9)
    distiller = CausalLMDistiller(
        config, DistillationConfig(temperature=1.0, kd_loss_weight=1.0, hard_label_weight=0.0),
        teacher, student, lm_config=LMDistillationConfig(
            divergence="forward_kl", path=args.path, chunk_size=args.chunk_size))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    total = args.warmup + args.steps + 1
    marks = {}

    def timestamp(batch):
        # The clock runs from the request of batch `warmup` to that of `warmup + steps`:
        # exactly `steps` optimizer steps, no start-up, no final checkpoint.
        index = marks.setdefault("count", 0)
        if index in (args.warmup, args.warmup + args.steps):
            _synchronize(device)
            marks[index] = time.perf_counter()
            if device.type == "cuda" and index == args.warmup:
                torch.cuda.reset_peak_memory_stats()
        marks["count"] = index + 1
        return batch

    class Cycle:
        def __iter__(self):
            for index in range(total):
                yield batches[index % len(batches)]

    with distiller:
        distiller.train(optimizer, Cycle(), num_steps=total, max_grad_norm=1.0,
                        batch_postprocessor=timestamp)
    return marks[args.warmup + args.steps] - marks[args.warmup]


def run_hand_written(args, device):
    from textbrewer.losses.token import fused_token_distillation_loss, token_distillation_loss

    teacher, student, batches = build(args, device)
    teacher.eval()
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    dtype = getattr(torch, args.dtype)
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(batch):
        ids = batch["input_ids"].to(device, non_blocking=True)
        # the logits at t predict the token at t + 1; the last position has no target
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
        with torch.autocast(**autocast):
            if args.path == "fused":
                with torch.no_grad():
                    hidden_T = teacher.transformer(input_ids=ids).last_hidden_state
                hidden_S = student.transformer(input_ids=ids).last_hidden_state
                loss = fused_token_distillation_loss(
                    hidden_S, student.lm_head.weight, hidden_T, teacher.lm_head.weight,
                    targets, chunk_size=args.chunk_size)
            else:
                with torch.no_grad():
                    logits_T = teacher(input_ids=ids).logits
                logits_S = student(input_ids=ids).logits
                if args.path == "chunked":
                    loss = token_distillation_loss(logits_S, logits_T, targets,
                                                   chunk_size=args.chunk_size)
                else:
                    valid = (targets != -100).to(torch.float32)
                    log_q = F.log_softmax(logits_S.float(), -1)
                    log_p = F.log_softmax(logits_T.float(), -1)
                    rows = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
                    loss = (rows * valid).sum() / valid.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    for index in range(args.warmup):
        step(batches[index % len(batches)])
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for index in range(args.steps):
        step(batches[(args.warmup + index) % len(batches)])
    _synchronize(device)
    return time.perf_counter() - start


def single(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    cpu_start = time.process_time()
    seconds = (run_library if args.side == "library" else run_hand_written)(args, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    batch_size = args.tokens // args.length
    return {"path": args.side, "seconds_per_step": seconds / args.steps,
            "tokens_per_s": args.steps * batch_size * args.length / seconds,
            "samples_per_s": args.steps * batch_size / seconds,
            "peak_memory_mib": round(peak, 1),
            "process_cpu_seconds": round(time.process_time() - cpu_start, 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per optimizer step")
    parser.add_argument("--length", type=int, default=256, help="sequence length")
    parser.add_argument("--hidden-teacher", type=int, default=256)
    parser.add_argument("--hidden-student", type=int, default=128)
    parser.add_argument("--layers-teacher", type=int, default=4)
    parser.add_argument("--layers-student", type=int, default=2)
    parser.add_argument("--path", default="fused", choices=PATHS)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate library / hand-written runs this many times; each "
                             "side's fastest run is reported")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--scratch", default=os.path.join("/tmp", "textbrewer-bench-lm"))
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # in the worker
    args = parser.parse_args(argv)
    if args.tokens % args.length:
        parser.error(f"--tokens ({args.tokens}) must be a multiple of --length ({args.length})")
    if args.side is not None:
        print(json.dumps(single(args)), flush=True)
        return
    own = list(argv if argv is not None else sys.argv[1:])
    runs = {side: [] for side in SIDES}
    for _ in range(args.repeats):
        for side in SIDES:
            command = [sys.executable, os.path.abspath(__file__), "--side", side] + own
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                sys.stderr.write(result.stderr[-4000:])
                raise SystemExit(f"{side} ({args.path}) failed (exit {result.returncode})")
            runs[side].append(json.loads(result.stdout.strip().splitlines()[-1]))
    device = args.device if args.device == "cpu" else torch.cuda.get_device_name(0)
    sizes = {"vocab": args.vocab, "tokens": args.tokens, "length": args.length,
             "hidden_teacher": args.hidden_teacher, "hidden_student": args.hidden_student,
             "layers_teacher": args.layers_teacher, "layers_student": args.layers_student}
    best = {}
    for side in SIDES:
        best[side] = min(runs[side], key=lambda run: run["seconds_per_step"])
        record = {"path": side, "loss_path": args.path, "device": device,
                  "samples_per_s": round(best[side]["samples_per_s"], 2),
                  "tokens_per_s": round(best[side]["tokens_per_s"], 1),
                  "seconds_per_step": round(best[side]["seconds_per_step"], 4),
                  "peak_memory_mib": best[side]["peak_memory_mib"],
                  "memory": "peak RSS" if args.device == "cpu" else "max_memory_allocated",
                  "process_cpu_seconds": best[side]["process_cpu_seconds"],
                  "all_seconds_per_step": [round(r["seconds_per_step"], 4) for r in runs[side]],
                  **sizes, "dtype": args.dtype, "chunk_size": args.chunk_size,
                  "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                  "torch": torch.__version__, "cpu_count": os.cpu_count(),
                  "load_average_1min": round(os.getloadavg()[0], 2)}
        print(json.dumps(record), flush=True)
    overhead = (best["library"]["seconds_per_step"] / best["hand_written"]["seconds_per_step"]
                - 1)
    print(json.dumps({"summary": True, "loss_path": args.path, "device": device,
                      "library_overhead_percent": round(100 * overhead, 2)}), flush=True)


if __name__ == "__main__":
    main()
