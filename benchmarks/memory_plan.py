"""The memory planner's error: ``plan_lm_memory``'s estimate against a measured CPU peak.

For each GPT-2 configuration (``transformers.GPT2Config``, teacher and student) and each
loss path (dense, chunked, fused, cache), a fresh subprocess runs ``--steps`` real
training steps of ``CausalLMDistiller`` on the CPU (``train_on_batch``, ``backward``,
``AdamW.step``, ``zero_grad``; teacher in eval mode, student in training mode, as the loop
runs them) and measures the peak resident memory those steps add:

* first a warm-up: the same path on tiny models (vocabulary 256, one layer, 16 tokens), so
  that what a first call costs once per process (kernels' code pages, oneDNN and thread
  pools, lazily imported modules such as ``torch._dynamo``) is paid before the baseline;
* then ``gc.collect()``, ``malloc_trim(0)``, and the baseline: the resident set
  (``/proc/self/statm``) *before the models are built*, because the plan counts the
  models' parameters too. The kernel's high-water mark is reset there (``echo 5 >
  /proc/self/clear_refs``) so that the warm-up's peak cannot mask a smaller one;
* the models are built, the steps run, and the measured peak is ``VmHWM`` (the resident
  high-water mark since the reset) minus the baseline. ``ru_maxrss`` minus the baseline is
  reported beside it (it is the same figure when the reset worked and the warm-up was
  smaller).

Allocator: the child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (``--malloc default``
leaves glibc alone). With glibc's default, the mmap threshold grows after the first freed
large block (up to 32 MiB), later tensors below it come from the heap, and freed heap
memory is not always given back: the resident set then keeps memory that no tensor holds,
and depends on the order of frees. A fixed threshold puts every tensor of 64 KiB or more
in its own mapping, returned when freed, so the resident set follows the live tensors.

One JSON object per (configuration, path) on stdout, then a summary line:

    python benchmarks/memory_plan.py                      # all configurations
    python benchmarks/memory_plan.py --configs tiny small --paths dense fused
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

PATHS = ("dense", "chunked", "fused", "cache")
#: name -> vocabulary, sequence length, batch size, (teacher width, layers), (student ...)
CONFIGS = {
    "tiny": dict(vocab=8000, length=128, batch=4, teacher=(128, 2), student=(64, 1)),
    "small": dict(vocab=16000, length=256, batch=4, teacher=(256, 4), student=(128, 2)),
    "medium": dict(vocab=32000, length=512, batch=4, teacher=(512, 4), student=(256, 2)),
}


def gpt2(vocab, length, hidden, layers, device=None):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=vocab, n_positions=length, n_embd=hidden, n_layer=layers,
                        n_head=max(1, hidden // 64), bos_token_id=0, eos_token_id=0)
    if device is None:
        return GPT2LMHeadModel(config)
    with device:
        return GPT2LMHeadModel(config)


def batches(config, path, k, count=2):
    import torch
    generator = torch.Generator().manual_seed(0)
    result = []
    for _ in range(count):
        ids = torch.randint(0, config["vocab"], (config["batch"], config["length"]),
                            generator=generator)
        batch = {"input_ids": ids}
        if path == "cache":  # CachedTeacherCollator's dict: distinct ids, log-probs < 0
            shape = (config["batch"], config["length"], k)
            batch["teacher_topk"] = {
                "topk_ids": (torch.arange(k) * 7 % config["vocab"]).expand(shape).clone(),
                "topk_logprobs": torch.full(shape, -math.log(k) - 0.01),
                "tail_mass": torch.full(shape[:2], 0.01),
                "mask": torch.ones(shape[:2], dtype=torch.bool)}
        result.append(batch)
    return result


def train_steps(config, path, k, chunk_size, steps, scratch):
    """``steps`` optimizer steps of the distiller on ``config``; returns the models."""
    import torch
    from textbrewer import DistillationConfig, TrainingConfig
    from textbrewer.distillers.lm import CausalLMDistiller, LMDistillationConfig

    torch.manual_seed(0)
    teacher = None if path == "cache" else gpt2(config["vocab"], config["length"],
                                                 *config["teacher"])
    student = gpt2(config["vocab"], config["length"], *config["student"])
    distiller = CausalLMDistiller(
        TrainingConfig(device="cpu", output_dir=scratch),
        DistillationConfig(temperature=1.0, kd_loss_weight=1.0, hard_label_weight=0.0),
        teacher, student, lm_config=LMDistillationConfig(
            path="fused" if path == "cache" else path, chunk_size=chunk_size))
    if teacher is not None:
        teacher.eval()
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    data = batches(config, path, k)
    for index in range(steps):
        loss, _ = distiller.train_on_batch(data[index % len(data)], {})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    return teacher, student


def rss_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args):
    import torch
    from textbrewer.training.memory import plan_lm_memory

    logging.disable(logging.WARNING)  # transformers' config remarks
    torch.set_num_threads(1)
    config = CONFIGS[args.config]
    tiny = dict(vocab=256, length=16, batch=1, teacher=(32, 1), student=(32, 1))
    with tempfile.TemporaryDirectory() as scratch:
        train_steps(tiny, args.path, min(args.k, 16), args.chunk_size, 2, scratch)
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        baseline = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            reset = True
        except OSError:
            reset = False
        teacher, student = train_steps(config, args.path, args.k, args.chunk_size, args.steps,
                                       scratch)
        measured = hwm_bytes() - baseline
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    plan = plan_lm_memory(student, teacher, batch_size=config["batch"],
                          sequence_length=config["length"],
                          path="auto" if args.path == "cache" else args.path,
                          chunk_size=args.chunk_size,
                          cache_k=args.k if args.path == "cache" else None)
    if not reset:
        measured = maxrss
    estimate = plan.total_peak
    print(json.dumps({
        "config": args.config, "path": args.path, "method": plan.method,
        "parameters_teacher": 0 if teacher is None else sum(
            p.numel() for p in teacher.parameters()),
        "parameters_student": sum(p.numel() for p in student.parameters()),
        "tokens": config["batch"] * config["length"], "vocab": config["vocab"],
        "estimate_mib": round(estimate / 2 ** 20, 1),
        "measured_mib": round(measured / 2 ** 20, 1),
        "ru_maxrss_delta_mib": round(maxrss / 2 ** 20, 1),
        "relative_error": round((estimate - measured) / measured, 4),
        "baseline_rss_mib": round(baseline / 2 ** 20, 1), "hwm_reset": reset,
        "malloc": os.environ.get("MALLOC_MMAP_THRESHOLD_", "default"),
        "plan": {key: value for key, value in plan.as_dict().items()
                 if isinstance(value, int)}}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--k", type=int, default=64, help="top-k entries of the cache path")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps measured "
                        "(>= 2: from step 2 on, AdamW's state exists during the forward)")
    parser.add_argument("--malloc", default="mmap64k", choices=["mmap64k", "default"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if args.malloc == "mmap64k":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    errors = []
    for name in args.configs:
        for path in args.paths:
            command = [sys.executable, os.path.abspath(__file__), "--child", "--config", name,
                       "--path", path, "--chunk-size", str(args.chunk_size), "--k",
                       str(args.k), "--steps", str(args.steps)]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stderr)
                raise SystemExit(f"{name}/{path} failed ({done.returncode})")
            line = done.stdout.strip().splitlines()[-1]
            print(line, flush=True)
            errors.append(abs(json.loads(line)["relative_error"]))
    print(json.dumps({"summary": True, "runs": len(errors),
                      "max_abs_relative_error": max(errors),
                      "within_25_percent": sum(error <= 0.25 for error in errors)}))


if __name__ == "__main__":
    main()
