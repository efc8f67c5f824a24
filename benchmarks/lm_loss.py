"""Token-level LM distillation loss: naive vs chunked vs fused, time and peak extra memory.

The three paths compute the same objective on the same inputs (student hidden states
(N, Hs) and head (V, Hs) with gradients, teacher hidden states (N, Ht) and head (V, Ht)
frozen, labels with ~5% ignored tokens, mean over valid tokens):

* ``naive``: plain PyTorch: both models' full logits, log_softmax, the divergence, backward;
* ``chunked``: both full logits, then ``token_distillation_loss(..., chunk_size=C)``;
* ``fused``: ``fused_token_distillation_loss`` on hidden states and heads (no [N, V] tensor).

``seconds`` is forward + backward wall time (teacher head included), median over
``--repeats`` runs after one warm-up run; ``cpu_seconds`` the process's CPU time for the
same runs (a check when other processes share the cores). ``peak_extra_mib`` is the peak memory above a baseline taken once
the inputs exist:

* CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at the baseline.
* CPU: each path runs in a fresh subprocess. The baseline is the process's current resident
  set (``/proc/self/statm``) after the inputs are allocated (in place, no temporaries); the
  peak is the kernel's high-water mark ``ru_maxrss`` after the warm-up run. PyTorch's CPU
  allocator has no cache, but glibc's malloc raises its mmap threshold dynamically (up to
  32 MiB) and then keeps freed blocks of chunk size in its heap, so RSS would count dead
  chunk buffers by chance (we saw ±40% run to run). The worker therefore runs with
  ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc's initial value, made fixed): every tensor
  above 128 KiB is its own mapping, returned to the OS when freed, and RSS tracks live
  tensors for every path alike. That setting makes each chunk's allocation fault in fresh
  pages, so the timing runs in a second subprocess with the default malloc.
  ``rss_resolved`` is false if the high-water mark before the run was already above the
  run's peak (the figure is then only an upper bound).

One JSON object per line on stdout:

    python benchmarks/lm_loss.py --vocab 32000 --tokens 2048 --hidden-student 256 \\
        --hidden-teacher 512 --chunk-size 256
    python benchmarks/lm_loss.py --device cuda --vocab 128256 --tokens 8192 \\
        --hidden-student 2048 --hidden-teacher 4096 --dtype bfloat16 --chunk-size 1024
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from textbrewer.losses.token import (fused_token_distillation_loss,  # noqa: E402
                                     token_distillation_loss)

PATHS = ("naive", "chunked", "fused")
NAIVE = ("forward_kl", "reverse_kl", "jsd", "tv")


def _naive_rows(divergence: str, log_q: torch.Tensor, log_p: torch.Tensor,
                beta: float) -> torch.Tensor:
    """What a user writes by hand, on full (N, V) fp32 log-probabilities."""
    if divergence == "forward_kl":
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    if divergence == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    log_m = torch.logsumexp(torch.stack([log_q + torch.log1p(torch.tensor(-beta)),
                                         log_p + torch.log(torch.tensor(beta))]), dim=0)
    return (beta * F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
            + (1 - beta) * F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1))


def _step(path: str, args, inputs) -> None:
    hidden_S, weight_S, hidden_T, weight_T, labels = inputs
    options = dict(divergence=args.divergence, beta=args.beta)
    if path == "fused":
        loss = fused_token_distillation_loss(hidden_S, weight_S, hidden_T, weight_T, labels,
                                             chunk_size=args.chunk_size, **options)
    else:
        logits_S = hidden_S @ weight_S.T
        with torch.no_grad():
            logits_T = hidden_T @ weight_T.T
        if path == "chunked":
            loss = token_distillation_loss(logits_S, logits_T, labels,
                                           chunk_size=args.chunk_size, **options)
        elif args.divergence in NAIVE:
            valid = labels != -100
            rows = _naive_rows(args.divergence, F.log_softmax(logits_S.float(), -1),
                               F.log_softmax(logits_T.float(), -1), args.beta)
            loss = (rows * valid).sum() / valid.sum().clamp(min=1)
        else:  # no hand-written version: the library's dense path
            loss = token_distillation_loss(logits_S, logits_T, labels, **options)
    loss.backward()
    hidden_S.grad = weight_S.grad = None


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        x = torch.empty(*shape, device=device, dtype=dtype)
        return x.normal_(0, scale, generator=gen)  # in place: no temporaries before baseline

    n, v = args.tokens, args.vocab
    hidden_S = randn(n, args.hidden_student).requires_grad_()
    weight_S = randn(v, args.hidden_student, scale=args.hidden_student ** -0.5).requires_grad_()
    hidden_T = randn(n, args.hidden_teacher)
    weight_T = randn(v, args.hidden_teacher, scale=args.hidden_teacher ** -0.5)
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    labels[torch.arange(0, n, 20, device=device)] = -100
    inputs = (hidden_S, weight_S, hidden_T, weight_T, labels)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    record = {}
    if args.measure in ("memory", "both"):
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        else:
            baseline = _current_rss_bytes()
            high_before = _max_rss_bytes()
        _step(args.path, args, inputs)
        sync()
        if cuda:
            record["peak_extra_mib"] = round(
                (torch.cuda.max_memory_allocated() - baseline) / 2 ** 20, 1)
        else:
            peak = _max_rss_bytes()
            record["peak_extra_mib"] = round((peak - baseline) / 2 ** 20, 1)
            record["rss_resolved"] = peak > high_before
            record["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if args.measure in ("time", "both"):
        if args.measure == "time":
            _step(args.path, args, inputs)  # warm-up
        times, cpu_times = [], []
        for _ in range(args.repeats):
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            _step(args.path, args, inputs)
            sync()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        record["seconds"] = round(statistics.median(times), 4)
        # CPU time of the process (all threads): less sensitive than wall time to other
        # processes competing for the cores, which shared CPU machines often have.
        record["cpu_seconds"] = round(statistics.median(cpu_times), 4)
    return dict(path=args.path, vocab=v, tokens=n, device=args.device,
                divergence=args.divergence, hidden_student=args.hidden_student,
                hidden_teacher=args.hidden_teacher, dtype=args.dtype,
                chunk_size=args.chunk_size if args.path != "naive" else None,
                repeats=args.repeats, threads=torch.get_num_threads(), **record)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden-student", type=int, default=256)
    parser.add_argument("--hidden-teacher", type=int, default=512)
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--beta", type=float, default=0.5, help="jsd's beta")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset")
    parser.add_argument("--path", help=argparse.SUPPRESS)  # set in the worker subprocess
    parser.add_argument("--measure", default="both", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.path is not None:
        print(json.dumps(worker(args)), flush=True)
        return
    for path in args.paths.split(","):
        if path not in PATHS:
            raise ValueError(f"--paths: unknown path {path!r}; valid: {list(PATHS)}")
        # Fresh processes per path: clean peak-memory figures (see the module docstring).
        own = list(argv if argv is not None else sys.argv[1:])
        record = {}
        for measure in ("memory", "time"):
            env = dict(os.environ)
            if measure == "memory" and args.device == "cpu":
                env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
            command = [sys.executable, os.path.abspath(__file__), "--path", path,
                       "--measure", measure] + own
            result = subprocess.run(command, capture_output=True, text=True, check=False,
                                    env=env)
            if result.returncode != 0:
                sys.stderr.write(result.stderr)
                raise SystemExit(f"path {path!r} ({measure}) failed (exit {result.returncode})")
            record.update(json.loads(result.stdout.strip().splitlines()[-1]))
        keys = ["path", "vocab", "tokens", "device", "seconds", "peak_extra_mib"]
        ordered = {k: record[k] for k in keys}
        ordered.update((k, v) for k, v in record.items() if k not in ordered)
        print(json.dumps(ordered), flush=True)


if __name__ == "__main__":
    main()
