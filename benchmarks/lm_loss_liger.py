"""Token-level JSD against Liger-Kernel (CUDA): ours vs Liger-Kernel vs plain PyTorch.

The default size is that of Liger-Kernel's published ``distill_jsd_loss`` benchmark:
teacher hidden size H = 4,096, student hidden size H / 2 = 2,048, vocabulary 128,256,
8,192 tokens, bf16, β = 0.5. Every implementation starts from the same inputs: student
hidden states (N, Hs) and head (V, Hs) with gradients, teacher hidden states (N, Ht) and
head (V, Ht) frozen, labels (N,) with every 20th ``-100``; the loss is the mean over valid
tokens, and one step is forward (both heads included) + backward to the student's hidden
states and head. Implementations (``--impls``):

* ``plain``: hand-written PyTorch: both full logits, fp32 ``log_softmax``, log m as a
  ``logaddexp``, two ``F.kl_div``, masked mean.
* ``ours_fused``: ``textbrewer.losses.token.fused_token_distillation_loss`` with
  ``divergence='jsd'`` on hidden states and heads (no [N, V] tensor), its default chunk.
* ``ours_chunked``: ``token_distillation_loss`` on the full logits, ``--chunk-size``.
* ``liger_jsd``: ``liger_kernel.transformers.LigerJSD`` (Liger's per-row Triton kernel)
  on the fp32 log-softmax of the full logits, as its docstring shows (it takes log-probs).
* ``liger_fused_linear_jsd``: ``liger_kernel.transformers.LigerFusedLinearJSD`` (heads
  fused, Triton, chunked over tokens).
* ``liger_chunked_jsd``: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (heads fused,
  ``torch.compile``-d chunks of 1,024 tokens; not compiled on the CPU), run with
  ``weight_hard_loss=0`` and ``weight_soft_loss=1``: the same objective as the others.
  Liger's published figure (11,109.6 MB, 60.7 ms, printed as ``published_reference``) used
  0.5 / 0.5, half JSD plus half the hard-label cross-entropy; ``--liger-hard-weight 0.5``
  runs that.

Conventions, read in Liger-Kernel's source (``ops/jsd.py``, ``chunked_loss/jsd_loss.py``):
the first argument is the student (log q), the second the teacher (log p); the mixture is
m = β·p + (1−β)·q and the loss β·KL(p‖m) + (1−β)·KL(q‖m), with β = 0 the forward KL and
β = 1 the reverse KL. That is our convention (docs/lm_distillation.md), so β is passed
unchanged. Liger divides by the number of tokens whose label is not ``ignore_index``, as we
do. The JSON gives each loss, its difference from a float64 reference computed in blocks
from the same (bf16) inputs (the implementations round the logits to bf16, the reference
does not, so expect ~1e-3 relative in bf16) and the relative difference of the student
gradients from ``plain``'s.

Measurement (CUDA): one process, the implementations one after another on the same inputs.
Per implementation: ``--warmup`` steps (compilation and autotuning happen there), then
``gc.collect()``, ``torch.cuda.empty_cache()``, ``reset_peak_memory_stats()`` and one step:
``peak_allocated_mib`` is ``max_memory_allocated()`` (inputs included, as Liger's memory
benchmark reports), ``peak_extra_mib`` the same minus ``memory_allocated()`` before the
step. Then ``--repeats`` steps, each timed with CUDA events; ``ms`` is the median. An
out-of-memory error is caught and recorded; the next implementation still runs.

Liger-Kernel is not a dependency of textbrewer and has no CPU path: when it cannot be
imported, or the device is not CUDA, its implementations are skipped with the reason in
the JSON. ``--device cpu --tiny`` is a smoke test of the script (small sizes, wall time
from ``time.perf_counter``, no memory figures)::

    python benchmarks/lm_loss_liger.py --table                      # CUDA, the default size
    OMP_NUM_THREADS=1 python benchmarks/lm_loss_liger.py --device cpu --tiny --table
    # + Liger in Triton's interpreter (calls and conventions only; liger-kernel installed):
    OMP_NUM_THREADS=1 python benchmarks/lm_loss_liger.py --device cpu --tiny --liger-on-cpu \\
        --beta 0.3

Output: one JSON document on stdout; ``--table`` also prints a Markdown table on stderr.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from lm_loss_peers import head_logits, plain_rows  # noqa: E402  (the same plain JSD)
from textbrewer.losses.token import (fused_token_distillation_loss,  # noqa: E402
                                     token_distillation_loss)

OURS = ("ours_fused", "ours_chunked")
LIGER = ("liger_jsd", "liger_fused_linear_jsd", "liger_chunked_jsd")
IMPLS = ("plain",) + OURS + LIGER

#: Liger-Kernel's own figures at this size, from benchmark/data/all_benchmark_data.csv in
#: github.com/linkedin/Liger-Kernel (read at commit ead96b6); "full" = forward + backward.
PUBLISHED = {
    "liger_chunked_jsd": dict(
        kernel="distill_jsd_loss (chunked_loss.LigerFusedLinearJSDFunction)", ms=60.706,
        memory_mb=11109.6, torch_ms=213.160, torch_memory_mb=68947.1,
        config="BT 8192, teacher H 4096, student H 2048, V 128256, bf16, "
               "weight_hard_loss 0.5, weight_soft_loss 0.5", gpu="NVIDIA H100 80GB HBM3",
        liger_version="0.4.2"),
    "liger_fused_linear_jsd": dict(
        kernel="fused_linear_jsd (transformers.LigerFusedLinearJSD)", ms=182.583,
        memory_mb=8711.75, torch_ms=195.295, torch_memory_mb=56368.0,
        config="BT 8192, H 4096 (student and teacher), V 128256, bf16",
        gpu="NVIDIA H100 80GB HBM3", liger_version="0.3.1"),
}
TINY = dict(hidden=64, vocab=1000, tokens=256)


def _version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def liger_status(device: torch.device, on_cpu: bool = False) -> dict:
    """Whether Liger-Kernel can run here, with its version or the reason it cannot.

    ``on_cpu`` (the smoke test's ``--liger-on-cpu``) runs its Triton kernels in Triton's
    interpreter (``TRITON_INTERPRET=1``, set before Liger is imported): slow, tiny sizes
    only, for checking the calls and the conventions, never for timing."""
    if device.type != "cuda" and not on_cpu:
        return {"available": False, "version": _version("liger-kernel"),
                "reason": f"device {device.type}: Liger-Kernel's kernels are Triton, CUDA only "
                          f"(--liger-on-cpu runs them in Triton's interpreter)"}
    if device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import liger_kernel.chunked_loss  # noqa: F401
        import liger_kernel.transformers  # noqa: F401
    except Exception as error:  # ImportError, or triton failing to initialise
        return {"available": False, "version": _version("liger-kernel"),
                "reason": f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"}
    return {"available": True, "version": _version("liger-kernel"),
            "triton_interpreter": device.type != "cuda"}


def make_inputs(args, device: torch.device, dtype: torch.dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def randn(*shape, scale=1.0):
        return torch.empty(*shape, device=device, dtype=dtype).normal_(0, scale, generator=gen)

    n, v, hs, ht = args.tokens, args.vocab, args.hidden_student, args.hidden
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    labels[::20] = -100
    return dict(hidden_S=randn(n, hs).requires_grad_(),
                weight_S=randn(v, hs, scale=args.scale / hs ** 0.5).requires_grad_(),
                hidden_T=randn(n, ht), weight_T=randn(v, ht, scale=args.scale / ht ** 0.5),
                labels=labels)


def make_loss(impl: str, args, inputs: dict):
    """A function computing ``impl``'s loss (a scalar tensor with a graph to the student)."""
    hidden_S, weight_S = inputs["hidden_S"], inputs["weight_S"]
    hidden_T, weight_T, labels = inputs["hidden_T"], inputs["weight_T"], inputs["labels"]
    beta = args.beta

    logits = head_logits(inputs)

    if impl == "plain":
        def loss_fn():
            logits_S, logits_T = logits()
            rows = plain_rows("jsd", F.log_softmax(logits_S.float(), -1),
                              F.log_softmax(logits_T.float(), -1), beta)
            valid = labels != -100
            return (rows * valid).sum() / valid.sum().clamp(min=1)
        return loss_fn
    if impl == "ours_fused":
        return lambda: fused_token_distillation_loss(hidden_S, weight_S, hidden_T, weight_T,
                                                     labels, divergence="jsd", beta=beta)
    if impl == "ours_chunked":
        return lambda: token_distillation_loss(*logits(), labels, divergence="jsd", beta=beta,
                                               chunk_size=args.chunk_size)
    if impl == "liger_jsd":
        from liger_kernel.transformers import LigerJSD
        peer = LigerJSD(beta=beta, ignore_index=-100)

        def loss_fn():
            logits_S, logits_T = logits()
            return peer(F.log_softmax(logits_S.float(), -1),
                        F.log_softmax(logits_T.float(), -1), labels)
        return loss_fn
    if impl == "liger_fused_linear_jsd":
        from liger_kernel.transformers import LigerFusedLinearJSD
        peer = LigerFusedLinearJSD(jsd_beta=beta, ignore_index=-100, temperature=1.0)
        return lambda: peer(hidden_S, weight_S, hidden_T, weight_T, labels)
    if impl == "liger_chunked_jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        peer = LigerFusedLinearJSDLoss(weight_hard_loss=args.liger_hard_weight,
                                       weight_soft_loss=1.0 - args.liger_hard_weight,
                                       beta=beta, ignore_index=-100, temperature=1.0,
                                       compiled=hidden_S.is_cuda)  # no compiler on the CPU
        return lambda: peer(hidden_S, weight_S, hidden_T, weight_T, labels)
    raise ValueError(f"unknown implementation {impl!r}; valid: {list(IMPLS)}")


def reference(args, inputs: dict, block: int = 256) -> float:
    """float64 JSD(β), the mean over valid tokens, from the same inputs."""
    hs = inputs["hidden_S"].detach().double()
    ht = inputs["hidden_T"].double()
    ws, wt = inputs["weight_S"].detach().double(), inputs["weight_T"].double()
    valid = inputs["labels"] != -100
    beta, total = args.beta, 0.0
    for start in range(0, hs.shape[0], block):
        rows = slice(start, start + block)
        log_q = torch.log_softmax(hs[rows] @ ws.T, -1)
        log_p = torch.log_softmax(ht[rows] @ wt.T, -1)
        p, q = log_p.exp(), log_q.exp()
        log_m = torch.log(beta * p + (1 - beta) * q)
        values = (beta * (p * (log_p - log_m)).sum(-1)
                  + (1 - beta) * (q * (log_q - log_m)).sum(-1))
        total += float(values[valid[rows]].sum())
    return total / max(int(valid.sum()), 1)


class Clock:
    """Wall time of a step: CUDA events on CUDA, ``time.perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def run_impl(impl: str, args, inputs: dict, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    loss_fn = make_loss(impl, args, inputs)
    hidden_S, weight_S = inputs["hidden_S"], inputs["weight_S"]
    last = {}

    def step() -> None:
        loss = loss_fn()
        loss.backward()
        last["loss"] = loss.detach()

    def clear() -> None:
        hidden_S.grad = weight_S.grad = None

    clock = Clock(device)
    for _ in range(args.warmup):
        step()
        clear()
    record = {"impl": impl}
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        record.update(peak_allocated_mib=round(torch.cuda.max_memory_allocated() / 2 ** 20, 1),
                      peak_extra_mib=round((torch.cuda.max_memory_allocated() - before)
                                           / 2 ** 20, 1),
                      baseline_allocated_mib=round(before / 2 ** 20, 1))
    else:
        step()
        record["memory"] = "not measured on the CPU (see benchmarks/lm_loss_peers.py)"
    # kept on the host, so that no implementation's peak includes another's gradients
    grads = (hidden_S.grad.detach().cpu(), weight_S.grad.detach().cpu())
    clear()
    times = []
    for _ in range(args.repeats):
        times.append(clock.time(step))
        clear()
    record.update(loss=float(last["loss"]), ms=round(statistics.median(times), 3),
                  ms_all=[round(t, 3) for t in times])
    return record, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _grad_cell(diff) -> str:
    return "" if diff is None else f"h {diff['hidden_S']:.1e}, W {diff['weight_S']:.1e}"


def table(document: dict) -> str:
    best = document.get("best_peer")
    lines = [f"best peer: {best}",
             "| impl | ms (median) | peak allocated MiB | peak extra MiB | time / best peer "
             "| memory / best peer | loss | \\|err\\| vs fp64 | grad rel. diff vs plain |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for entry in document["results"]:
        if "skipped" in entry:
            lines.append(f"| {entry['impl']} | skipped: {entry['skipped']} | | | | | | | |")
            continue
        err = entry.get("abs_err_vs_ref")
        lines.append(
            f"| {entry['impl']} | {entry['ms']:.2f} | {entry.get('peak_allocated_mib', '—')} "
            f"| {entry.get('peak_extra_mib', '—')} | {entry.get('ratio_time_to_best_peer', '')} "
            f"| {entry.get('ratio_memory_to_best_peer', '')} | {entry['loss']:.6f} "
            f"| {'' if err is None else f'{err:.1e}'} "
            f"| {_grad_cell(entry.get('grad_rel_diff_vs_plain'))} |")
    ref = document.get("reference")
    if ref is not None:
        lines.append(f"| fp64 reference | | | | | | {ref:.6f} | | |")
    for name, figures in document["published_reference"].items():
        lines.append(f"published {name}: {figures['ms']} ms, {figures['memory_mb']:,} MB "
                     f"({figures['config']}; {figures['gpu']}, Liger {figures['liger_version']})")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help=f"smoke-test sizes {TINY} (student hidden = hidden / 2)")
    parser.add_argument("--hidden", type=int, default=4096, help="the teacher's hidden size")
    parser.add_argument("--hidden-student", type=int, default=None,
                        help="default: --hidden / 2, as in Liger's benchmark")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dtype", default=None,
                        help="default bfloat16 (float32 with --tiny on the CPU)")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--chunk-size", type=int, default=1024, help="ours_chunked's chunk")
    parser.add_argument("--liger-hard-weight", type=float, default=0.0,
                        help="liger_chunked_jsd's weight_hard_loss (its published figure: 0.5)")
    parser.add_argument("--liger-on-cpu", action="store_true",
                        help="with --device cpu: run Liger's kernels in Triton's interpreter "
                             "(a check of the calls and conventions at tiny sizes, not a timing)")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--scale", type=float, default=4.0,
                        help="logit scale: head weights ~ N(0, scale² / H)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true", help="skip the fp64 reference")
    parser.add_argument("--table", action="store_true", help="Markdown table on stderr")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    if args.hidden_student is None:
        args.hidden_student = args.hidden // 2
    if not 0.0 < args.beta < 1.0:
        parser.error("--beta must be in (0, 1): the ends are KL divergences, not JSD")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False "
                         "(use --device cpu --tiny for the smoke test)")
    if args.dtype is None:
        args.dtype = "float32" if device.type == "cpu" else "bfloat16"
    dtype = getattr(torch, args.dtype)
    wanted = args.impls.split(",")
    for impl in wanted:
        if impl not in IMPLS:
            parser.error(f"--impls: unknown {impl!r}; valid: {list(IMPLS)}")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    liger = liger_status(device, args.liger_on_cpu)
    log("liger-kernel: " + (liger["version"] if liger["available"]
                            else f"unavailable ({liger['reason']})"))
    inputs = make_inputs(args, device, dtype)
    results, grads = [], {}
    for impl in wanted:
        if impl in LIGER and not liger["available"]:
            results.append({"impl": impl, "skipped": f"Liger-Kernel unavailable: "
                                                     f"{liger['reason']}"})
            log(f"{impl}: skipped")
            continue
        try:
            record, grads[impl] = run_impl(impl, args, inputs, device)
        except torch.cuda.OutOfMemoryError as error:
            record = {"impl": impl,
                      "skipped": f"out of memory: {str(error).strip().splitlines()[0]}"}
        except Exception as error:  # a peer's failure is a result, not the end of the run
            record = {"impl": impl, "skipped": f"{type(error).__name__}: "
                                               f"{str(error).strip().splitlines()[0][:300]}"}
        finally:
            inputs["hidden_S"].grad = inputs["weight_S"].grad = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(record)
        log(f"{impl}: " + (f"skipped ({record['skipped']})" if "skipped" in record
                           else f"{record['ms']:.2f} ms, loss {record['loss']:.6f}"))
    ref = None if args.no_reference else reference(args, inputs)
    peers = [r for r in results if r["impl"] not in OURS and "ms" in r]
    best_peer = min(peers, key=lambda r: r["ms"], default=None)
    for record in results:
        if "loss" not in record:
            continue
        if ref is not None and not (record["impl"] == "liger_chunked_jsd"
                                    and args.liger_hard_weight):
            record["abs_err_vs_ref"] = abs(record["loss"] - ref)
        if "plain" in grads and record["impl"] != "plain":
            record["grad_rel_diff_vs_plain"] = {
                "hidden_S": round(_rel(grads[record["impl"]][0], grads["plain"][0]), 6),
                "weight_S": round(_rel(grads[record["impl"]][1], grads["plain"][1]), 6)}
        if peers:
            record["ratio_time_to_best_peer"] = round(
                record["ms"] / min(r["ms"] for r in peers), 3)
            if "peak_allocated_mib" in record:
                record["ratio_memory_to_best_peer"] = round(
                    record["peak_allocated_mib"] / min(r["peak_allocated_mib"] for r in peers), 3)
    machine = dict(device=(torch.cuda.get_device_name(device) if device.type == "cuda"
                           else "cpu"), torch=torch.__version__, cuda=torch.version.cuda,
                   python=sys.version.split()[0], cpu_count=os.cpu_count(),
                   threads=torch.get_num_threads(), load_average=os.getloadavg())
    document = dict(benchmark="lm_loss_liger", machine=machine, liger=liger,
                    settings=dict(hidden_teacher=args.hidden, hidden_student=args.hidden_student,
                                  vocab=args.vocab, tokens=args.tokens, dtype=args.dtype,
                                  beta=args.beta, chunk_size=args.chunk_size,
                                  liger_hard_weight=args.liger_hard_weight, warmup=args.warmup,
                                  repeats=args.repeats, scale=args.scale, seed=args.seed,
                                  tiny=args.tiny),
                    reference=ref, best_peer=None if best_peer is None else best_peer["impl"],
                    results=results, published_reference=PUBLISHED)
    if device.type != "cuda":
        document["note"] = ("CPU smoke test: the times check the plumbing, not the speed "
                            "(Liger's kernels, if run, ran in Triton's interpreter)")
    print(json.dumps(document, indent=1))
    if args.table:
        log(table(document))


if __name__ == "__main__":
    main()
