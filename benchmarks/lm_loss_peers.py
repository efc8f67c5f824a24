"""Token-level forward KL (and JSD) against peers: ours vs torchtune, TRL and plain PyTorch.

Every implementation starts from the same inputs and does the same work: student hidden
states (B, L, Hs) and head (V, Hs) with gradients, teacher hidden states (B, L, Ht) and
head (V, Ht) frozen, labels with ~5% ``-100``; the loss is the mean over valid tokens, and
one step is forward (both heads included) + backward to the student's hidden states and
head. Implementations (``--impls``):

* ``plain``: hand-written PyTorch: both full logits, fp32 ``log_softmax``, ``F.kl_div``
  (JSD: log m as a ``logaddexp``, then two ``kl_div``).
* ``torchtune``: ``torchtune.modules.loss.ForwardKLWithChunkedOutputLoss`` (8 chunks), the
  logits computed per chunk of hidden states as its docstring shows. It returns the soft
  cross-entropy −Σ p log q, so its ``loss`` is the KL plus the teacher's entropy; the JSON
  gives both ``loss`` and ``loss_as_kl`` (= loss − H(p), the entropy from the reference).
  Forward KL only: torchtune 0.6.1 has no JSD, and a JSD case lists it as skipped with
  that reason (so does ``ours_topk``, which is ``topk_kl`` only).
* ``trl``: TRL's ``GKDTrainer.generalized_jsd_loss`` (β = 0 is the forward KL) on the full
  logits, in the logits' dtype (TRL does not up-cast bf16).
* ``ours_dense``, ``ours_chunked``: ``token_distillation_loss`` on the full logits
  (``chunk_size`` None, then ``--chunk-size``).
* ``ours_fused``: ``fused_token_distillation_loss`` on hidden states and heads (no [N, V]
  tensor), its default chunk size.
* ``ours_topk``: the teacher-cache path: ``fused_token_distillation_loss`` against a
  ``TopKTeacher`` (the teacher's ``--topk`` largest log-probs, computed before the
  measurement, as a cache would hold them). A DIFFERENT objective (KL against the
  renormalised top-k), so its value is not expected to equal the others'.

Peers are never dependencies of textbrewer: install them in a separate environment that
sees the main one's torch, and run this script with that environment's python::

    python -m venv --system-site-packages /tmp/peers
    /tmp/peers/bin/pip install --no-deps torchtune trl
    OMP_NUM_THREADS=1 /tmp/peers/bin/python benchmarks/lm_loss_peers.py --table

A peer that cannot be imported is skipped with the reason in the JSON. torchtune's package
``__init__`` imports torchao and Hugging Face ``datasets``; TRL's GKD module imports
``datasets`` too. When a normal import fails, the loss is loaded from the installed
package's own file instead: torchtune's ``modules/loss/kd_losses.py`` (which imports only
torch) by path, and TRL's ``generalized_jsd_loss`` by compiling that one function's source
from the installed ``gkd_trainer.py`` (the peer's code, unmodified; ``how`` in the JSON says
which way each peer was loaded).

Measurement. Each (case, implementation) runs in fresh subprocesses:

* memory: one step in a process started with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc's
  initial threshold, made fixed, so that every tensor above 128 KiB is its own mapping and
  freed memory goes back to the OS: RSS then tracks live tensors for every implementation
  alike). Once torch, the peer and the inputs are loaded (the inputs made in place, the
  top-k cache in small blocks), the kernel's resident high-water mark is reset
  (``/proc/self/clear_refs`` ← 5) and the resident set read as the baseline (``VmRSS``);
  ``peak_extra_mib`` = ``VmHWM`` after the step − that baseline. ``rss_resolved`` is false
  if the reset failed (the figure would then include the import's own peak).
* time: one long-lived process per implementation with the default malloc, a warm-up step,
  then ``--repeats`` steps driven round-robin over the implementations (the order rotated
  each round), so that all of them share the noise of a busy machine. ``seconds`` is the
  median wall time of a step, ``cpu_seconds`` the median process CPU time.

A case whose estimated peak resident set exceeds ``--memory-cap-mib`` is skipped for that
implementation, with the estimate in the reason (from the bytes per logit measured on a
smaller case of the same implementation, dtype and divergence, in this run or in the
JSON outputs named by ``--estimates-from``; untried implementations are run).
Every worker also runs under an address-space limit (``RLIMIT_AS``,
``--address-space-limit-mib``, default the cap + 4,096 MiB for the libraries' mappings): an
estimate that was too low makes that worker fail (``skipped``: "memory run failed"), never
the machine run out of memory. ``ratio_*_to_best_peer`` divide by the best peer
(``plain``, ``torchtune``, ``trl``) that ran in the same case: below 1 is better than every
peer. Losses are compared with a float64
reference computed in 128-token blocks (``abs_err_vs_ref``).

Output: one JSON document on stdout; ``--table`` also prints a Markdown table on stderr.
"""
from __future__ import annotations

import argparse
import ast
import ctypes
import importlib
import importlib.metadata
import importlib.util
import json
import math
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

from textbrewer.losses.token import (TopKTeacher, fused_token_distillation_loss,  # noqa: E402
                                     token_distillation_loss)

PEERS = ("plain", "torchtune", "trl")
OURS = ("ours_dense", "ours_chunked", "ours_fused", "ours_topk")
IMPLS = PEERS + OURS
#: Implementations that have each divergence.
HAS = {"forward_kl": IMPLS, "jsd": ("plain", "trl", "ours_dense", "ours_chunked", "ours_fused")}
#: Why an implementation lacks a divergence (an entry in the JSON and the table, not a gap).
LACKS = {("torchtune", "jsd"): "torchtune 0.6.1 has no JSD loss (modules/loss/kd_losses.py: "
                               "forward, reverse and symmetric KL only)",
         ("ours_topk", "jsd"): "the cache path is topk_kl only (a different objective)"}
#: Peak extra bytes per logit measured here (fp32, V 128,256, N 2,048) for the
#: implementations that hold full logits: the estimate before a smaller case has been run.
PRIOR_BYTES_PER_LOGIT = {"plain": 28.0, "torchtune": 18.0, "trl": 36.0, "ours_dense": 29.0,
                         "ours_chunked": 19.0}
PRIOR_BASELINE_MIB = 520.0
BATCH = 2  # sequences per batch: inputs are (BATCH, tokens / BATCH, ·)


# ---------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------
def _version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_torchtune():
    """(ForwardKLWithChunkedOutputLoss class, how) or raises ImportError with the reason."""
    if _version("torchtune") is None:
        raise ImportError("torchtune is not installed in this environment")
    try:
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss
        return ForwardKLWithChunkedOutputLoss, "import torchtune.modules.loss"
    except ImportError as error:  # its package __init__ needs torchao, datasets, ...
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    spec = importlib.util.find_spec("torchtune")  # locates the package without running it
    path = os.path.join(spec.submodule_search_locations[0], "modules", "loss", "kd_losses.py")
    if not os.path.exists(path):
        raise ImportError(f"import failed ({reason}) and {path} does not exist")
    module_spec = importlib.util.spec_from_file_location("_torchtune_kd_losses", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ForwardKLWithChunkedOutputLoss, (
        f"loaded torchtune/modules/loss/kd_losses.py by path (import torchtune failed: {reason})")


def load_trl():
    """(generalized_jsd_loss function, how) or raises ImportError with the reason."""
    if _version("trl") is None:
        raise ImportError("trl is not installed in this environment")
    reasons = []
    for module_name in ("trl.experimental.gkd", "trl"):
        try:
            module = importlib.import_module(module_name)
            return module.GKDTrainer.generalized_jsd_loss, f"import {module_name}.GKDTrainer"
        except (ImportError, AttributeError) as error:
            reasons.append(f"{module_name}: {type(error).__name__}: "
                           f"{str(error).strip().splitlines()[0]}")
    # The GKD module imports `datasets` and the trainer stack; the loss itself needs torch
    # only. Compile that one staticmethod from the installed file, unmodified.
    spec = importlib.util.find_spec("trl")
    root = spec.submodule_search_locations[0]
    for relative in (("experimental", "gkd", "gkd_trainer.py"), ("trainer", "gkd_trainer.py")):
        path = os.path.join(root, *relative)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "GKDTrainer":
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "generalized_jsd_loss":
                        item.decorator_list = []  # the @staticmethod
                        module = ast.fix_missing_locations(ast.Module([item], type_ignores=[]))
                        namespace = {"torch": torch, "F": F}
                        exec(compile(module, path, "exec"), namespace)
                        return namespace["generalized_jsd_loss"], (
                            f"compiled GKDTrainer.generalized_jsd_loss from trl/"
                            f"{'/'.join(relative)} (imports failed: {'; '.join(reasons)})")
    raise ImportError(f"no GKDTrainer.generalized_jsd_loss found ({'; '.join(reasons)})")


LOADERS = {"torchtune": load_torchtune, "trl": load_trl}


def peer_status() -> dict:
    status = {"plain": {"available": True, "version": torch.__version__, "how": "torch"}}
    for name, loader in LOADERS.items():
        try:
            _, how = loader()
            status[name] = {"available": True, "version": _version(name), "how": how}
        except Exception as error:  # any failure makes the peer unavailable, with why
            status[name] = {"available": False, "version": _version(name),
                            "reason": f"{type(error).__name__}: {error}"}
    return status


# ---------------------------------------------------------------------------------------
# inputs and one step of each implementation
# ---------------------------------------------------------------------------------------
def make_inputs(args, dtype: torch.dtype) -> dict:
    """Deterministic inputs, made in place (no temporaries above the baseline)."""
    gen = torch.Generator().manual_seed(args.seed)
    n, v = args.tokens, args.vocab
    length = n // BATCH

    def randn(*shape, scale=1.0):
        return torch.empty(*shape, dtype=dtype).normal_(0, scale, generator=gen)

    inputs = dict(hidden_S=randn(BATCH, length, args.hidden_student).requires_grad_(),
                  weight_S=randn(v, args.hidden_student,
                                 scale=args.scale / args.hidden_student ** 0.5).requires_grad_(),
                  hidden_T=randn(BATCH, length, args.hidden_teacher),
                  weight_T=randn(v, args.hidden_teacher,
                                 scale=args.scale / args.hidden_teacher ** 0.5))
    labels = torch.randint(0, v, (BATCH, length), generator=gen)
    labels.view(-1)[::20] = -100
    inputs["labels"] = labels
    return inputs


def topk_cache(inputs: dict, k: int, block: int = 128) -> TopKTeacher:
    """The teacher's k largest log-probs (temperature 1), computed block by block."""
    hidden_T, weight_T = inputs["hidden_T"], inputs["weight_T"]
    rows = hidden_T.reshape(-1, hidden_T.shape[-1])
    ids, logprobs = [], []
    with torch.no_grad():
        for start in range(0, rows.shape[0], block):
            log_p = torch.log_softmax((rows[start:start + block] @ weight_T.T).float(), -1)
            top = log_p.topk(k, dim=-1)
            ids.append(top.indices)
            logprobs.append(top.values)
    shape = hidden_T.shape[:-1] + (k,)
    return TopKTeacher(torch.cat(ids).reshape(shape), torch.cat(logprobs).reshape(shape))


def head_logits(inputs: dict):
    """A function returning (student logits with a graph, teacher logits without one), both
    (N, V), from the inputs' hidden states and heads."""
    def logits():
        logits_S = inputs["hidden_S"] @ inputs["weight_S"].T
        with torch.no_grad():
            logits_T = inputs["hidden_T"] @ inputs["weight_T"].T
        return logits_S, logits_T
    return logits


def plain_rows(divergence: str, log_q: torch.Tensor, log_p: torch.Tensor, beta: float):
    """The hand-written PyTorch divergence per token, (N,), from (N, V) log-probabilities:
    forward KL, or JSD(β) with log m as a ``logaddexp`` and two ``F.kl_div``."""
    if divergence == "forward_kl":
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
    return (beta * F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
            + (1 - beta) * F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1))


def make_step(impl: str, args, inputs: dict):
    """A function running one forward + backward of ``impl``, returning the loss value."""
    hidden_S, weight_S = inputs["hidden_S"], inputs["weight_S"]
    hidden_T, weight_T, labels = inputs["hidden_T"], inputs["weight_T"], inputs["labels"]
    beta = 0.0 if args.divergence == "forward_kl" else args.beta
    options = dict(divergence=args.divergence, beta=args.beta)

    logits = head_logits(inputs)

    if impl == "plain":
        def loss_fn():
            logits_S, logits_T = logits()
            rows = plain_rows(args.divergence, F.log_softmax(logits_S.float(), -1),
                              F.log_softmax(logits_T.float(), -1), beta)
            valid = labels != -100
            return (rows * valid).sum() / valid.sum().clamp(min=1)
    elif impl == "torchtune":
        loss_class, _ = load_torchtune()
        chunks = 8
        peer = loss_class(num_output_chunks=chunks)

        def loss_fn():
            student = [h @ weight_S.T for h in hidden_S.chunk(chunks, dim=1)]
            with torch.no_grad():
                teacher = [h @ weight_T.T for h in hidden_T.chunk(chunks, dim=1)]
            return peer(student, teacher, labels)
    elif impl == "trl":
        jsd, _ = load_trl()

        def loss_fn():
            logits_S, logits_T = logits()
            return jsd(logits_S, logits_T, labels=labels, beta=beta)
    elif impl == "ours_dense":
        def loss_fn():
            return token_distillation_loss(*logits(), labels, **options)
    elif impl == "ours_chunked":
        def loss_fn():
            return token_distillation_loss(*logits(), labels, chunk_size=args.chunk_size,
                                           **options)
    elif impl == "ours_fused":
        def loss_fn():
            return fused_token_distillation_loss(hidden_S, weight_S, hidden_T, weight_T, labels,
                                                 **options)
    elif impl == "ours_topk":
        cache = topk_cache(inputs, args.topk)

        def loss_fn():
            return fused_token_distillation_loss(hidden_S, weight_S, cache, labels=labels,
                                                 divergence="topk_kl")
    else:
        raise ValueError(f"unknown implementation {impl!r}; valid: {list(IMPLS)}")

    def step() -> float:
        loss = loss_fn()
        loss.backward()
        value = float(loss.detach())
        hidden_S.grad = weight_S.grad = None
        return value
    return step


def reference(args, inputs: dict, block: int = 128) -> dict:
    """float64 forward KL, JSD(β) and teacher entropy, means over valid tokens."""
    hs = inputs["hidden_S"].detach().reshape(-1, args.hidden_student).double()
    ht = inputs["hidden_T"].reshape(-1, args.hidden_teacher).double()
    ws, wt = inputs["weight_S"].detach().double(), inputs["weight_T"].double()
    valid = (inputs["labels"] != -100).reshape(-1)
    sums = dict(forward_kl=0.0, jsd=0.0, teacher_entropy=0.0)
    beta = args.beta
    for start in range(0, hs.shape[0], block):
        rows = slice(start, start + block)
        log_q = torch.log_softmax(hs[rows] @ ws.T, -1)
        log_p = torch.log_softmax(ht[rows] @ wt.T, -1)
        p, q = log_p.exp(), log_q.exp()
        keep = valid[rows]
        log_m = torch.log(beta * p + (1 - beta) * q)
        values = dict(forward_kl=(p * (log_p - log_q)).sum(-1),
                      jsd=beta * (p * (log_p - log_m)).sum(-1)
                      + (1 - beta) * (q * (log_q - log_m)).sum(-1),
                      teacher_entropy=-(p * log_p).sum(-1))
        for key, value in values.items():
            sums[key] += float(value[keep].sum())
    count = max(int(valid.sum()), 1)
    return {key: value / count for key, value in sums.items()}


# ---------------------------------------------------------------------------------------
# worker processes
# ---------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) to the current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    """Give freed heap memory back to the OS (idle timing workers then hold little)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def worker(args) -> None:
    inputs = make_inputs(args, getattr(torch, args.dtype))
    if args.role == "reference":
        print(json.dumps(reference(args, inputs)), flush=True)
        return
    step = make_step(args.impl, args, inputs)
    _trim()
    if args.role == "memory":
        reset = _reset_peak()  # else the peak of importing torch would hide the step's
        baseline = _status_kib("VmRSS") * 1024
        value = step()
        peak = _status_kib("VmHWM") * 1024
        print(json.dumps(dict(loss=value, peak_extra_mib=round((peak - baseline) / 2 ** 20, 1),
                              baseline_rss_mib=round(baseline / 2 ** 20, 1),
                              peak_rss_mib=round(peak / 2 ** 20, 1),
                              rss_resolved=reset and peak > baseline)), flush=True)
        return
    step()  # warm-up
    _trim()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:  # one command per line from the driver: 'step' or 'quit'
        if line.strip() != "step":
            break
        start, cpu_start = time.perf_counter(), time.process_time()
        value = step()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        _trim()
        print(json.dumps(dict(loss=value, seconds=seconds, cpu_seconds=cpu)), flush=True)


# ---------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------
def _command(args, case: dict, role: str, impl: str = "") -> list:
    return [sys.executable, os.path.abspath(__file__), "--role", role, "--impl", impl,
            "--divergence", case["divergence"], "--vocab", str(case["vocab"]),
            "--tokens", str(case["tokens"]), "--dtype", case["dtype"],
            "--hidden-student", str(args.hidden_student),
            "--hidden-teacher", str(args.hidden_teacher), "--beta", str(args.beta),
            "--chunk-size", str(args.chunk_size), "--topk", str(args.topk),
            "--seed", str(args.seed), "--scale", str(args.scale)]


def _limit(mib: int):
    """A ``preexec_fn`` capping the child's address space (an allocation past it fails in
    the child, which exits non-zero, instead of the machine running out of memory)."""
    def apply() -> None:
        if mib > 0:
            resource.setrlimit(resource.RLIMIT_AS, (mib * 2 ** 20, mib * 2 ** 20))
    return apply


def _run_once(command: list, env: dict, limit_mib: int = 0) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False,
                            preexec_fn=_limit(limit_mib))
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise RuntimeError(f"exit {result.returncode}: {tail}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _remember(per_logit: dict, key: tuple, vocab: int, record: dict, logits: int) -> None:
    """Keep the largest bytes per logit measured, per key and per (key, vocabulary)."""
    for k in (key, key + (vocab,)):
        per_logit[k] = (record["baseline_rss_mib"],
                        max(per_logit.get(k, (0, 0.0))[1],
                            record["peak_extra_mib"] * 2 ** 20 / logits))


def run_case(args, case: dict, impls: list, per_logit: dict, log) -> dict:
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1")
    memory_env = dict(env, MALLOC_MMAP_THRESHOLD_="131072")
    logits = case["vocab"] * case["tokens"]
    ref = _run_once(_command(args, case, "reference"), env)
    results, runnable = {}, []
    for impl in impls:
        key = (impl, case["dtype"], case["divergence"])
        same_vocab = key + (case["vocab"],)  # preferred: a fixed part scales with V only
        if same_vocab in per_logit or key in per_logit or impl in PRIOR_BYTES_PER_LOGIT:
            baseline, bytes_per_logit = per_logit.get(same_vocab, per_logit.get(key, (
                PRIOR_BASELINE_MIB, PRIOR_BYTES_PER_LOGIT.get(impl))))
            estimate = baseline + bytes_per_logit * logits / 2 ** 20
            if estimate > args.memory_cap_mib:
                results[impl] = {"impl": impl, "skipped": (
                    f"estimated peak RSS {estimate:,.0f} MiB > cap {args.memory_cap_mib:,} MiB "
                    f"({bytes_per_logit:.1f} bytes per logit, measured on a smaller case or "
                    f"else the prior)")}
                log(f"  {impl}: skipped ({results[impl]['skipped']})")
                continue
        try:
            record = _run_once(_command(args, case, "memory", impl), memory_env,
                               args.address_space_limit_mib)
        except RuntimeError as error:
            results[impl] = {"impl": impl, "skipped": f"memory run failed: {error}"}
            log(f"  {impl}: {results[impl]['skipped']}")
            continue
        _remember(per_logit, key, case["vocab"], record, logits)
        results[impl] = {"impl": impl, "memory_loss": record.pop("loss"), **record}
        runnable.append(impl)
        log(f"  {impl}: peak extra {record['peak_extra_mib']:,.1f} MiB")
    workers = {}
    try:
        for impl in runnable:  # started one at a time: each warm-up runs alone
            proc = subprocess.Popen(_command(args, case, "time", impl), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env,
                                    preexec_fn=_limit(args.address_space_limit_mib))
            line = proc.stdout.readline()
            if not line:
                results[impl]["skipped"] = f"timing worker died (exit {proc.wait()})"
                continue
            workers[impl] = proc
        samples = {impl: [] for impl in workers}
        order = list(workers)
        for round_ in range(args.repeats):
            shift = round_ % max(len(order), 1)
            for impl in order[shift:] + order[:shift]:
                proc = workers[impl]
                proc.stdin.write("step\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    results[impl]["skipped"] = f"timing worker died (exit {proc.wait()})"
                    order.remove(impl)
                    break
                samples[impl].append(json.loads(line))
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.stdin.write("quit\n")
                proc.stdin.flush()
            proc.wait()
    for impl, runs in samples.items():
        if not runs or "skipped" in results[impl]:
            continue
        loss = runs[-1]["loss"]
        entry = results[impl]
        entry.update(loss=loss, seconds=round(statistics.median(r["seconds"] for r in runs), 3),
                     cpu_seconds=round(statistics.median(r["cpu_seconds"] for r in runs), 3),
                     seconds_all=[round(r["seconds"], 3) for r in runs])
        as_kl = loss - ref["teacher_entropy"] if impl == "torchtune" else loss
        if impl != "ours_topk":  # another objective: no reference
            entry["loss_as_kl"] = as_kl if impl == "torchtune" else loss
            entry["abs_err_vs_ref"] = abs(as_kl - ref[case["divergence"]])
    ran = [results[p] for p in PEERS if p in results and "seconds" in results[p]]
    for entry in results.values():
        for what in ("seconds", "peak_extra_mib"):
            best = min((p[what] for p in ran), default=None)
            if what in entry and best:
                entry[f"ratio_{'time' if what == 'seconds' else 'memory'}_to_best_peer"] = round(
                    entry[what] / best, 3)
    return dict(case, reference=ref, results=[results[i] for i in impls if i in results])


def table(document: dict) -> str:
    lines = ["| divergence | V | N | dtype | impl | s/step (median) | CPU s | peak extra MiB "
             "| time / best peer | memory / best peer | loss | \\|err\\| vs fp64 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case in document["cases"]:
        head = f"| {case['divergence']} | {case['vocab']:,} | {case['tokens']:,} | {case['dtype']}"
        for entry in case["results"]:
            if "skipped" in entry:
                lines.append(f"{head} | {entry['impl']} | skipped: {entry['skipped']} "
                             f"| | | | | | |")
                continue
            loss = f"{entry['loss']:.6f}"
            if entry["impl"] == "torchtune":
                loss += f" (as KL {entry['loss_as_kl']:.6f})"
            err = entry.get("abs_err_vs_ref")
            lines.append(
                f"{head} | {entry['impl']} | {entry['seconds']:.3f} | {entry['cpu_seconds']:.3f} "
                f"| {entry['peak_extra_mib']:,.1f} | {entry.get('ratio_time_to_best_peer', '')} "
                f"| {entry.get('ratio_memory_to_best_peer', '')} | {loss} "
                f"| {'top-k objective' if err is None else f'{err:.1e}'} |")
        ref = case["reference"]
        lines.append(f"{head} | fp64 reference | | | | | | {ref[case['divergence']]:.6f} "
                     f"(teacher entropy {ref['teacher_entropy']:.4f}) | |")
    return "\n".join(lines)


def _machine() -> dict:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=model, cores=os.cpu_count(), torch=torch.__version__,
                threads=torch.get_num_threads(), python=sys.version.split()[0],
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                load_average=os.getloadavg())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocabs", default="32000,128256")
    parser.add_argument("--token-counts", default="2048,8192")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--divergences", default="forward_kl,jsd")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--hidden-student", type=int, default=64)
    parser.add_argument("--hidden-teacher", type=int, default=128)
    parser.add_argument("--beta", type=float, default=0.5, help="JSD's β (forward KL: β = 0)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="ours_chunked's chunk")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-cap-mib", type=int, default=6144,
                        help="skip an implementation whose estimated peak RSS exceeds this")
    parser.add_argument("--estimates-from", default="",
                        help="comma-separated JSON outputs of earlier runs: their measured "
                             "bytes per logit seed the memory estimates")
    parser.add_argument("--address-space-limit-mib", type=int, default=None,
                        help="RLIMIT_AS of every worker (0: none; default: the memory cap "
                             "+ 4,096 MiB for the libraries' mappings), so that an "
                             "underestimate fails that worker, never the machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=4.0,
                        help="logit scale: head weights ~ N(0, scale² / H)")
    parser.add_argument("--table", action="store_true", help="Markdown table on stderr")
    parser.add_argument("--role", help=argparse.SUPPRESS)  # set in the worker subprocesses
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--divergence", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.address_space_limit_mib is None:
        args.address_space_limit_mib = args.memory_cap_mib + 4096
    if args.role is not None:
        worker(args)
        return

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    peers = peer_status()
    for name, status in peers.items():
        log(f"peer {name}: " + (f"{status['version']} ({status['how']})" if status["available"]
                                else f"unavailable: {status['reason']}"))
    wanted = args.impls.split(",")
    for impl in wanted:
        if impl not in IMPLS:
            raise SystemExit(f"--impls: unknown {impl!r}; valid: {list(IMPLS)}")
    cases = [dict(divergence=d, vocab=int(v), tokens=int(n), dtype=t)
             for d in args.divergences.split(",") for t in args.dtypes.split(",")
             for v, n in sorted(((int(v), int(n)) for v in args.vocabs.split(",")
                                 for n in args.token_counts.split(",")),
                                key=lambda vn: vn[0] * vn[1])]
    per_logit, done = {}, []
    for path in filter(None, args.estimates_from.split(",")):
        with open(path) as f:
            for case in json.load(f)["cases"]:
                logits = case["vocab"] * case["tokens"]
                for entry in case["results"]:
                    if "peak_extra_mib" in entry:
                        _remember(per_logit, (entry["impl"], case["dtype"], case["divergence"]),
                                  case["vocab"], entry, logits)
    for case in cases:
        log(f"case {case}")
        impls = [i for i in wanted if i in HAS[case["divergence"]]]
        unavailable = [i for i in impls if i in peers and not peers[i]["available"]]
        result = run_case(args, case, [i for i in impls if i not in unavailable], per_logit, log)
        result["results"] += [{"impl": i, "skipped": f"peer unavailable: {peers[i]['reason']}"}
                              for i in unavailable]
        result["results"] += [{"impl": i, "skipped": LACKS[i, case["divergence"]]}
                              for i in wanted if (i, case["divergence"]) in LACKS]
        done.append(result)
    document = dict(benchmark="lm_loss_peers", machine=_machine(), peers=peers,
                    settings=dict(hidden_student=args.hidden_student,
                                  hidden_teacher=args.hidden_teacher, batch=BATCH,
                                  beta=args.beta, chunk_size=args.chunk_size, topk=args.topk,
                                  repeats=args.repeats, memory_cap_mib=args.memory_cap_mib,
                                  address_space_limit_mib=args.address_space_limit_mib,
                                  scale=args.scale, seed=args.seed),
                    cases=done)
    print(json.dumps(document, indent=1))
    if args.table:
        log(table(document))


if __name__ == "__main__":
    main()
