"""Padding and the token loss: the distiller's loss over the valid rows only, gathered, against
the full layout with padded rows zeroed, and against a hand-written PyTorch loss.

A causal LM's batch has invalid target positions: padding after the shorter sequences,
prompt tokens with label −100, and always the last position. ``CausalLMDistiller`` hands
the loss either every position, invalid ones zeroed, or only the valid rows, gathered with
the batch's host-side indices (``textbrewer.distillers.lm.alignment.valid_row_index``): the
fused path always gathers (hidden states, cheap), the dense and chunked paths only when
fewer than ``GATHER_BELOW[path]`` of the positions are valid. This script measures where
those thresholds pay, on one step's loss (forward + backward, forward KL + 1 · CE at τ = 1, the
LM example's setting), for valid shares from 1.0 down to 0.5:

* ``hand``: plain PyTorch: the valid rows by boolean indexing, ``log_softmax``,
  ``F.kl_div(log_target=True)``, ``F.nll_loss``, divided by the valid count;
* ``dense``, ``chunked``: ``token_distillation_loss`` on the full (B, L, V) logits with the
  valid mask, and ``*_gathered`` on the rows that ``gather_rows`` selects;
* ``fused``, ``fused_gathered``: ``fused_token_distillation_loss`` on (B, L, H) hidden
  states and the heads, all positions or the gathered valid ones.

Every side gets the same tensors; the loss values are printed (they agree to float
rounding). Sides run interleaved, ``--repeats`` rounds, median milliseconds per step:

    OMP_NUM_THREADS=1 python benchmarks/lm_padding.py            # JSON on stdout
    OMP_NUM_THREADS=1 python benchmarks/lm_padding.py --vocab 32000 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from textbrewer.distillers.lm.alignment import (GATHER_BELOW, gather_rows,  # noqa: E402
                                                valid_row_index)
from textbrewer.losses.token import (fused_token_distillation_loss,  # noqa: E402
                                     token_distillation_loss)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--shares", type=float, nargs="+",
                        default=[1.0, 0.95, 0.85, 0.75, 0.65, 0.5],
                        help="valid shares of the (B, L) positions")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.length, args.vocab, args.hidden = 4, 16, 64, 8
        args.repeats, args.shares = 2, [1.0, 0.5]
    return args


def valid_mask(batch: int, length: int, share: float, generator: torch.Generator):
    """(B, L) bool: sequences of random lengths whose valid share is ``share`` (padding at
    the end of a row, as a padded batch has), the last position always invalid."""
    keep = round(share * batch * length)
    lengths = torch.full((batch,), keep // batch)
    lengths[:keep % batch] += 1
    lengths = lengths[torch.randperm(batch, generator=generator)].clamp(max=length)
    valid = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    if share < 1.0:
        valid[:, -1] = False
    return valid


def hand_step(logits_S, logits_T, labels, valid):
    """Forward KL + CE over the valid rows, plain PyTorch."""
    z_S = logits_S.clone().requires_grad_()
    flat = valid.reshape(-1)
    v = logits_S.shape[-1]
    log_q = F.log_softmax(z_S.reshape(-1, v)[flat], -1)
    log_p = F.log_softmax(logits_T.reshape(-1, v)[flat], -1)
    kd = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    ce = F.nll_loss(log_q, labels.reshape(-1)[flat], reduction="sum")
    loss = (kd + ce) / flat.sum()
    loss.backward()
    return float(loss.detach())


def loss_inputs(student, teacher, labels, valid, gathered):
    """The loss's (student, teacher, labels, mask): as given, or gathered at the valid rows
    as the distiller gathers them (``valid_row_index``, ``gather_rows``)."""
    index = valid_row_index(valid, int(valid.sum()), "fused") if gathered else None
    if index is None:
        return student, teacher, labels, valid
    return tuple(gather_rows(x, index, valid.shape, name) for x, name in (
        (student, "student"), (teacher, "teacher"), (labels, "labels"), (valid, "valid")))


def library_step(logits_S, logits_T, labels, valid, chunk_size, gathered):
    z_S = logits_S.clone().requires_grad_()
    loss = token_distillation_loss(*loss_inputs(z_S, logits_T, labels, valid, gathered),
                                   ce_weight=1.0, chunk_size=chunk_size,
                                   num_tokens=int(valid.sum()))
    loss.backward()
    return float(loss.detach())


def fused_step(hidden_S, weight_S, hidden_T, weight_T, labels, valid, gathered):
    h_S = hidden_S.clone().requires_grad_()
    w_S = weight_S.clone().requires_grad_()
    s, t, y, m = loss_inputs(h_S, hidden_T, labels, valid, gathered)
    loss = fused_token_distillation_loss(s, w_S, t, weight_T, y, m, ce_weight=1.0,
                                         num_tokens=int(valid.sum()))
    loss.backward()
    return float(loss.detach())


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    b, n, v, h = args.batch_size, args.length, args.vocab, args.hidden
    hidden_S = torch.randn(b, n, h, generator=generator)
    hidden_T = torch.randn(b, n, h, generator=generator)
    weight_S = torch.randn(v, h, generator=generator) / h ** 0.5
    weight_T = torch.randn(v, h, generator=generator) / h ** 0.5
    logits_S, logits_T = hidden_S @ weight_S.T, hidden_T @ weight_T.T
    labels = torch.randint(0, v, (b, n), generator=generator)
    results = []
    for share in args.shares:
        valid = valid_mask(b, n, share, generator)
        masked = labels.masked_fill(~valid, -100)
        sides = {
            "hand": lambda: hand_step(logits_S, logits_T, masked, valid),
            "dense": lambda: library_step(logits_S, logits_T, masked, valid, None, False),
            "dense_gathered": lambda: library_step(logits_S, logits_T, masked, valid, None,
                                                   True),
            "chunked": lambda: library_step(logits_S, logits_T, masked, valid,
                                            args.chunk_size, False),
            "chunked_gathered": lambda: library_step(logits_S, logits_T, masked, valid,
                                                     args.chunk_size, True),
            "fused": lambda: fused_step(hidden_S, weight_S, hidden_T, weight_T, masked, valid,
                                        False),
            "fused_gathered": lambda: fused_step(hidden_S, weight_S, hidden_T, weight_T,
                                                 masked, valid, True),
        }
        seconds = {side: [] for side in sides}
        losses = {}
        for _ in range(2):  # warm-up (the allocator's first requests of each size), values
            for side, step in sides.items():
                losses[side] = step()
        for _ in range(args.repeats):
            for side, step in sides.items():
                clock = time.perf_counter()
                step()
                seconds[side].append(time.perf_counter() - clock)
        median = {side: statistics.median(values) * 1e3 for side, values in seconds.items()}
        results.append({
            "valid_share": round(float(valid.float().mean()), 4),
            "ms_per_step": {side: round(value, 2) for side, value in median.items()},
            "over_hand": {side: round(value / median["hand"], 3)
                          for side, value in median.items()},
            "gathered_over_full": {path: round(median[f"{path}_gathered"] / median[path], 3)
                                   for path in ("dense", "chunked", "fused")},
            "loss": {side: round(value, 6) for side, value in losses.items()},
        })
    print(json.dumps({
        "benchmark": "lm_padding", "torch": torch.__version__, "threads": args.threads,
        "machine": platform.machine(), "processor": platform.processor(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "batch_size": b, "length": n, "vocab": v, "hidden": h, "chunk_size": args.chunk_size,
        "gather_below": GATHER_BELOW, "repeats": args.repeats, "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
