"""Throughput and peak memory: textbrewer's GeneralDistiller against a hand-written loop.

Both sides do the same work per optimizer step: teacher forward (no grad), student
forward, KD cross-entropy on logits (τ = 4) + hard-label loss, and, for the ``full`` job,
hidden-MSE matches through linear projections and attention-MSE matches (the TinyBERT
mapping: 5 hidden layers, 4 attention layers), backward, clip, AdamW step, zero_grad.

Each measurement runs in its own subprocess (clean peak-memory figures). Prints one JSON
document: per (job, precision) the samples/s and peak memory of both sides and the
library's overhead in percent.

    python benchmarks/throughput.py                 # CPU, small BERTs
    python benchmarks/throughput.py --device cuda   # the TinyBERT-sized job

Models are ``transformers`` BERTs built from configs (no downloads); without transformers
the CPU run falls back to textbrewer.testing.TinyTransformer.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SIZES = {
    # teacher layers x width, student layers x width, heads, batch, sequence length
    "cuda": dict(layers_T=12, hidden_T=768, layers_S=4, hidden_S=312, heads=12, batch=128,
                 length=128, intermediate_S=1200),
    "cpu": dict(layers_T=4, hidden_T=256, layers_S=2, hidden_S=128, heads=4, batch=16,
                length=64, intermediate_S=512),
}


def _layer_map(layers_T: int, layers_S: int):
    stride = layers_T // layers_S
    hidden = [(s, s * stride) for s in range(layers_S + 1)]  # embeddings are 0 on both sides
    attention = [(s, (s + 1) * stride - 1) for s in range(layers_S)]
    return hidden, attention


def build_models(size, device, use_transformers=True):
    """Teacher, student, and an adaptor that returns the dict textbrewer expects."""
    torch.manual_seed(0)
    try:
        if not use_transformers:
            raise ImportError
        from transformers import BertConfig, BertForSequenceClassification

        def bert(layers, hidden, intermediate):
            config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=size["heads"], intermediate_size=intermediate,
                                max_position_embeddings=512, num_labels=2,
                                attn_implementation="eager")
            return BertForSequenceClassification(config)

        teacher = bert(size["layers_T"], size["hidden_T"], 4 * size["hidden_T"])
        student = bert(size["layers_S"], size["hidden_S"], size["intermediate_S"])

        def adaptor(batch, outputs):
            return {"logits": outputs.logits, "losses": outputs.loss,
                    "hidden": outputs.hidden_states, "attention": outputs.attentions,
                    "inputs_mask": batch["attention_mask"]}

        kind = "transformers.BertForSequenceClassification"
    except ImportError:
        from textbrewer.testing import TinyTransformer, tiny_adaptor
        teacher = TinyTransformer(vocab_size=1000, hidden_size=size["hidden_T"],
                                  num_layers=size["layers_T"], num_heads=size["heads"],
                                  num_labels=2, max_length=size["length"])
        student = TinyTransformer(vocab_size=1000, hidden_size=size["hidden_S"],
                                  num_layers=size["layers_S"], num_heads=size["heads"],
                                  num_labels=2, max_length=size["length"])
        adaptor = tiny_adaptor
        kind = "textbrewer.testing.TinyTransformer"
    return teacher.to(device), student.to(device), adaptor, kind


def make_batches(size, device, count, vocab):
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        batch = {"input_ids": torch.randint(0, vocab, (size["batch"], size["length"]),
                                            generator=generator),
                 "attention_mask": torch.ones(size["batch"], size["length"], dtype=torch.long),
                 "labels": torch.randint(0, 2, (size["batch"],), generator=generator)}
        if device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        batches.append(batch)
    return batches


def _uses_token_ids(model):
    return not hasattr(model, "embed") or isinstance(model.embed, torch.nn.Embedding)


def run_library(args, size, device):
    import textbrewer
    teacher, student, adaptor, kind = build_models(size, device, not args.no_transformers)
    hidden, attention = _layer_map(size["layers_T"], size["layers_S"])
    matches = []
    if args.job == "full":
        matches += [{"layer_T": t, "layer_S": s, "feature": "hidden", "loss": "hidden_mse",
                     "weight": 1, "proj": ["linear", size["hidden_S"], size["hidden_T"]]}
                    for s, t in hidden]
        matches += [{"layer_T": t, "layer_S": s, "feature": "attention", "loss": "attention_mse",
                     "weight": 1} for s, t in attention]
    precision = "no" if args.precision == "fp32" else "bf16"
    config = textbrewer.TrainingConfig(device=str(device), output_dir=args.scratch,
                                       mixed_precision=precision, compile=args.compile,
                                       log_steps=10 ** 9, ckpt_steps=10 ** 9)
    distiller = textbrewer.GeneralDistiller(
        config, textbrewer.DistillationConfig(temperature=4, hard_label_weight=1,
                                              intermediate_matches=matches),
        teacher, student, adaptor, adaptor)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    vocab = 30522 if kind.startswith("transformers") else 1000
    batches = make_batches(size, device, 4, vocab)
    # The clock runs from the request of batch `warmup` to the request of batch
    # `warmup + steps`: exactly `steps` optimizer steps, without start-up or the final
    # checkpoint (the hand-written loop saves none).
    steps = args.warmup + args.steps + 1
    marks = {}

    def timestamp(batch):
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
            for index in range(steps):
                yield batches[index % len(batches)]

    with distiller:
        distiller.train(optimizer, Cycle(), num_steps=steps, max_grad_norm=1.0,
                        batch_postprocessor=timestamp, **model_arguments(args, kind))
    elapsed = marks[args.warmup + args.steps] - marks[args.warmup]
    return kind, args.steps * size["batch"] / elapsed


def model_arguments(args, kind):
    """Keyword arguments for every model call: ask for features only when they are matched."""
    if args.job == "full" and kind.startswith("transformers"):
        return {"output_hidden_states": True, "output_attentions": True}
    return {}


def run_hand_written(args, size, device):
    teacher, student, adaptor, kind = build_models(size, device, not args.no_transformers)
    hidden, attention = _layer_map(size["layers_T"], size["layers_S"])
    projections = torch.nn.ModuleList()
    if args.job == "full":
        torch.manual_seed(1)
        projections = torch.nn.ModuleList(torch.nn.Linear(size["hidden_S"], size["hidden_T"])
                                          for _ in hidden).to(device)
    teacher.eval()
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    optimizer.add_param_group({"params": projections.parameters()})
    teacher_forward, student_forward = teacher, student
    if args.compile:
        teacher_forward, student_forward = torch.compile(teacher), torch.compile(student)
    autocast_dtype = torch.bfloat16 if args.precision != "fp32" else None
    vocab = 30522 if kind.startswith("transformers") else 1000
    batches = make_batches(size, device, 4, vocab)
    temperature = 4.0
    extra = model_arguments(args, kind)

    def step(batch):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            with torch.no_grad():
                out_T = adaptor(batch, teacher_forward(**batch, **extra))
            out_S = adaptor(batch, student_forward(**batch, **extra))
            p_T = F.softmax(out_T["logits"] / temperature, dim=-1)
            loss = -(p_T * F.log_softmax(out_S["logits"] / temperature, dim=-1)).sum(-1).mean()
            loss = loss + out_S["losses"].mean()
            if args.job == "full":
                mask = batch["attention_mask"]
                for projection, (s, t) in zip(projections, hidden):
                    diff = projection(out_S["hidden"][s]) - out_T["hidden"][t]
                    weights = mask.to(diff.dtype)  # the features' dtype: no mixed-dtype ops
                    loss = loss + (diff.pow(2) * weights.unsqueeze(-1)).sum() / \
                        (weights.sum() * size["hidden_T"]).clamp(min=1)
                for s, t in attention:
                    diff = out_S["attention"][s] - out_T["attention"][t]
                    weights = mask.to(diff.dtype)
                    pair = weights[:, None, :, None] * weights[:, None, None, :]
                    loss = loss + (diff.pow(2) * pair).sum() / \
                        (pair.sum() * size["heads"]).clamp(min=1)
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
        step(batches[index % len(batches)])
    _synchronize(device)
    return kind, args.steps * size["batch"] / (time.perf_counter() - start)


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def single(args):
    device = torch.device(args.device)
    size = SIZES["cuda" if device.type == "cuda" else "cpu"]
    runner = run_library if args.side == "library" else run_hand_written
    kind, samples_per_second = runner(args, size, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    print(json.dumps({"samples_per_s": samples_per_second, "peak_memory_mib": peak,
                      "models": kind, "size": size}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", default="logits,full")
    parser.add_argument("--precisions", default="fp32,bf16,bf16+compile")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate library/hand-written runs this many times, keep the best")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=os.path.join("/tmp", "textbrewer-bench"))
    args = parser.parse_args()
    if args.single:
        args.compile = args.precision.endswith("+compile")
        single(args)
        return
    results = []
    for job in args.jobs.split(","):
        for precision in args.precisions.split(","):
            figures = {}
            for _ in range(args.repeats):
                for side in ("library", "hand_written"):
                    command = [sys.executable, __file__, "--single", "--side", side, "--job", job,
                               "--precision", precision, "--device", args.device,
                               "--steps", str(args.steps), "--warmup", str(args.warmup),
                               "--scratch", args.scratch]
                    if args.no_transformers:
                        command.append("--no-transformers")
                    output = subprocess.run(command, capture_output=True, text=True, check=False)
                    if output.returncode != 0:
                        raise SystemExit(f"{side} {job} {precision} failed:\n{output.stderr[-4000:]}")
                    figure = json.loads(output.stdout.strip().splitlines()[-1])
                    best = figures.get(side)
                    if best is None or figure["samples_per_s"] > best["samples_per_s"]:
                        figures[side] = figure
            library, hand = figures["library"], figures["hand_written"]
            results.append({
                "job": job, "precision": precision,
                "library_samples_per_s": round(library["samples_per_s"], 2),
                "hand_written_samples_per_s": round(hand["samples_per_s"], 2),
                "library_overhead_percent": round(
                    100 * (hand["samples_per_s"] / library["samples_per_s"] - 1), 2),
                "library_peak_memory_mib": round(library["peak_memory_mib"], 1),
                "hand_written_peak_memory_mib": round(hand["peak_memory_mib"], 1),
            })
    print(json.dumps({
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "models": library["models"], "size": library["size"], "steps": args.steps,
        "warmup": args.warmup, "results": results}, indent=2))


if __name__ == "__main__":
    main()
