"""Token-level LM distillation losses (textbrewer/losses/token.py).

Every expected value comes from a float64 reference written here from the formulas
(probabilities built with exp / sum, KL via torch.distributions or an explicit Σ p log(p/m),
a Python loop over tokens), never from the module under test. The dense, chunked and fused
paths are each checked against it, in value and in gradient.
"""
import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence
from torch.testing import assert_close

import textbrewer  # noqa: F401  (fills the registries)
from textbrewer.losses.token import (DIVERGENCES, TokenDistillationLoss, TopKTeacher,
                                     count_valid_tokens, fused_token_distillation_loss,
                                     token_distillation_loss)
from textbrewer.registry import TOKEN_LOSSES

DOUBLE = torch.float64
B, L, V, HS, HT = 2, 7, 11, 6, 5  # N = 14 tokens; chunk 5 does not divide it
CHUNK = 5
DENSE_DIVERGENCES = [d for d in DIVERGENCES if d != "topk_kl"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=_gen(seed), dtype=DOUBLE) * scale


def _labels(seed=0):
    labels = torch.randint(0, V, (B, L), generator=_gen(seed))
    labels[0, 2] = labels[1, 5] = -100
    return labels


MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]])


# ---------------------------------------------------------------------------------------
# float64 reference, token by token
# ---------------------------------------------------------------------------------------
def _probs(z, tau):
    e = torch.exp(z / tau - (z / tau).max())
    return e / e.sum()


def _kl(a, b):
    """Σ a log(a / b) over a > 0."""
    keep = a > 0
    return (a[keep] * torch.log(a[keep] / b[keep])).sum()


def _ref_token(name, zs, zt, tau, beta, alpha):
    p, q = _probs(zt, tau), _probs(zs, tau)
    if name == "forward_kl":
        return kl_divergence(Categorical(probs=p), Categorical(probs=q))
    if name == "reverse_kl":
        return kl_divergence(Categorical(probs=q), Categorical(probs=p))
    if name == "jsd":
        if beta == 0:
            return _kl(p, q)
        if beta == 1:
            return _kl(q, p)
        m = (1 - beta) * q + beta * p
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if name == "skew_kl":
        return _kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_reverse_kl":
        return _kl(q, alpha * q + (1 - alpha) * p)
    if name == "tv":
        return 0.5 * (p - q).abs().sum()
    raise AssertionError(name)


def _topk_full_teacher(ids, logprobs, vocab, tau, tail):
    """The teacher's V-entry distribution rebuilt from its top-k, by hand."""
    p1 = torch.zeros(vocab, dtype=DOUBLE)
    if tail == "uniform" and len(ids) < vocab:
        rest = 1 - logprobs.exp().sum()
        p1[:] = rest / (vocab - len(ids))
        p1[ids] = logprobs.exp()
    else:
        p1[ids] = torch.softmax(logprobs, 0)
    tempered = torch.where(p1 > 0, p1 ** (1 / tau), torch.zeros_like(p1))
    return tempered / tempered.sum()


def _reference(name, logits_S, teacher, labels=None, mask=None, tau=1.0, beta=0.5, alpha=0.1,
               ce_weight=0.0, tail="renormalize", num_tokens=None, tau2=False):
    """Σ over valid tokens of the per-token value (+ ce_weight·CE) / count, in a loop."""
    zs = logits_S.reshape(-1, logits_S.shape[-1])
    n = zs.shape[0]
    valid = torch.ones(n, dtype=torch.bool)
    if labels is not None:
        valid &= labels.reshape(-1) != -100
    if mask is not None:
        valid &= mask.reshape(-1) != 0
    total = zs.sum() * 0
    for i in range(n):
        if not valid[i]:
            continue
        if name == "topk_kl":
            ids, lps = teacher
            p = _topk_full_teacher(ids.reshape(n, -1)[i], lps.reshape(n, -1)[i], zs.shape[-1],
                                   tau, tail)
            value = _kl(p, _probs(zs[i], tau))
        else:
            value = _ref_token(name, zs[i], teacher.reshape(n, -1)[i], tau, beta, alpha)
        total = total + value * (tau ** 2 if tau2 else 1)
        if ce_weight:
            total = total - ce_weight * torch.log(_probs(zs[i], 1.0)[labels.reshape(-1)[i]])
    count = valid.sum() if num_tokens is None else torch.as_tensor(num_tokens)
    return total / max(int(count), 1)


def _check(value, grads, ref_value, ref_grads, atol=1e-5):
    assert_close(value.double(), ref_value, atol=atol, rtol=atol)
    for got, want in zip(grads, ref_grads):
        assert_close(got.double(), want, atol=atol, rtol=atol)


# ---------------------------------------------------------------------------------------
# every divergence, every path, against the reference
# ---------------------------------------------------------------------------------------
CASES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.3}),
         ("jsd", {"beta": 1.0}), ("skew_kl", {"alpha": 0.1}), ("skew_kl", {"alpha": 0.0}),
         ("skew_reverse_kl", {"alpha": 0.25}), ("tv", {})]


@pytest.mark.parametrize("path", ["dense", "chunked"])
@pytest.mark.parametrize("name,params", CASES)
def test_logits_paths_match_reference(name, params, path):
    logits_S = _randn(B, L, V, seed=1, scale=2).requires_grad_()
    logits_T = _randn(B, L, V, seed=2, scale=2)
    labels = _labels()
    options = dict(divergence=name, temperature=1.7, ce_weight=0.3, **params)
    loss = token_distillation_loss(logits_S, logits_T, labels, MASK,
                                   chunk_size=None if path == "dense" else CHUNK, **options)
    (grad,) = torch.autograd.grad(loss, logits_S)
    ref_S = logits_S.detach().clone().requires_grad_()
    ref = _reference(name, ref_S, logits_T, labels, MASK, tau=1.7, ce_weight=0.3,
                     beta=params.get("beta", 0.5), alpha=params.get("alpha", 0.1))
    (ref_grad,) = torch.autograd.grad(ref, ref_S)
    _check(loss, [grad], ref, [ref_grad])


def _heads(seed=0, bias=True):
    hidden_S = _randn(B, L, HS, seed=seed + 10).requires_grad_()
    weight_S = _randn(V, HS, seed=seed + 11, scale=0.7).requires_grad_()
    bias_S = _randn(V, seed=seed + 12).requires_grad_() if bias else None
    hidden_T = _randn(B, L, HT, seed=seed + 13).requires_grad_()
    weight_T = _randn(V, HT, seed=seed + 14, scale=0.7)
    bias_T = _randn(V, seed=seed + 15) if bias else None
    return hidden_S, weight_S, bias_S, hidden_T, weight_T, bias_T


@pytest.mark.parametrize("name,params", CASES)
def test_fused_path_matches_reference(name, params):
    hidden_S, weight_S, bias_S, hidden_T, weight_T, bias_T = _heads()
    labels = _labels()
    loss = fused_token_distillation_loss(hidden_S, weight_S, hidden_T, weight_T, labels, MASK,
                                         bias_S=bias_S, bias_T=bias_T, divergence=name,
                                         temperature=1.7, ce_weight=0.3, chunk_size=CHUNK,
                                         **params)
    inputs = [hidden_S, weight_S, bias_S]
    grads = torch.autograd.grad(loss, inputs)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    logits_S = ref_inputs[0] @ ref_inputs[1].T + ref_inputs[2]
    logits_T = hidden_T.detach() @ weight_T.T + bias_T
    ref = _reference(name, logits_S, logits_T, labels, MASK, tau=1.7, ce_weight=0.3,
                     beta=params.get("beta", 0.5), alpha=params.get("alpha", 0.1))
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    _check(loss, grads, ref, ref_grads)
    assert hidden_T.grad is None  # the teacher gets no gradient


@pytest.mark.parametrize("path", ["dense", "chunked", "fused"])
def test_jsd_ends_are_forward_and_reverse_kl(path):
    hidden_S, weight_S, _, hidden_T, weight_T, _ = _heads(bias=False)
    labels = _labels()

    def run(divergence, **params):
        if path == "fused":
            return fused_token_distillation_loss(hidden_S, weight_S, hidden_T, weight_T, labels,
                                                 divergence=divergence, chunk_size=CHUNK,
                                                 **params)
        return token_distillation_loss(hidden_S @ weight_S.T, hidden_T @ weight_T.T, labels,
                                       divergence=divergence,
                                       chunk_size=CHUNK if path == "chunked" else None, **params)

    assert_close(run("jsd", beta=0.0), run("forward_kl"), atol=1e-12, rtol=0)
    assert_close(run("jsd", beta=1.0), run("reverse_kl"), atol=1e-12, rtol=0)
    middle = run("jsd", beta=0.5)
    assert 0 < middle < math.log(2)  # JSD_0.5 ≤ log 2, and it is not either end


@pytest.mark.parametrize("path", ["dense", "chunked", "fused"])
@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
def test_topk_matches_reference(tail, path):
    k = 4
    logits_S = _randn(B, L, V, seed=1, scale=2).requires_grad_()
    full_T = torch.log_softmax(_randn(B, L, V, seed=2, scale=2), -1)
    logprobs, ids = full_T.topk(k, dim=-1)
    teacher = TopKTeacher(ids, logprobs)
    labels = _labels()
    options = dict(divergence="topk_kl", temperature=1.5, tail=tail, ce_weight=0.2)
    if path == "fused":
        hidden_S, weight_S = _randn(B, L, HS, seed=3).requires_grad_(), _randn(V, HS, seed=4)
        weight_S.requires_grad_()
        loss = fused_token_distillation_loss(hidden_S, weight_S, teacher, None, labels, MASK,
                                             chunk_size=CHUNK, **options)
        inputs = [hidden_S, weight_S]
    else:
        loss = token_distillation_loss(logits_S, teacher, labels, MASK,
                                       chunk_size=CHUNK if path == "chunked" else None, **options)
        inputs = [logits_S]
    grads = torch.autograd.grad(loss, inputs)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref_logits = ref_inputs[0] @ ref_inputs[1].T if path == "fused" else ref_inputs[0]
    ref = _reference("topk_kl", ref_logits, teacher, labels, MASK, tau=1.5, tail=tail,
                     ce_weight=0.2)
    _check(loss, grads, ref, torch.autograd.grad(ref, ref_inputs))


@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
@pytest.mark.parametrize("chunk_size", [None, CHUNK])
def test_topk_with_k_equal_vocab_is_forward_kl(tail, chunk_size):
    logits_S = _randn(B, L, V, seed=1, scale=2)
    logits_T = _randn(B, L, V, seed=2, scale=2)
    logprobs, ids = torch.log_softmax(logits_T, -1).topk(V, dim=-1)
    labels = _labels()
    got = token_distillation_loss(logits_S, TopKTeacher(ids, logprobs), labels,
                                  divergence="topk_kl", tail=tail, temperature=2.0,
                                  chunk_size=chunk_size)
    want = token_distillation_loss(logits_S, logits_T, labels, divergence="forward_kl",
                                   temperature=2.0)
    assert_close(got, want, atol=1e-10, rtol=0)


def test_topk_uniform_tail_by_hand():
    # V = 4, k = 2: teacher keeps ids 2 and 0 with p = 0.5 and 0.3; the tail 0.2 is spread
    # over ids 1 and 3 (0.1 each). Student q = softmax(0, log 2, log 3, log 4) = (1,2,3,4)/10.
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DOUBLE)
    logits_S = q.log().reshape(1, 4)
    teacher = TopKTeacher(torch.tensor([[2, 0]]), torch.tensor([[0.5, 0.3]], dtype=DOUBLE).log())
    want = (0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.1)
            + 0.1 * math.log(0.1 / 0.2) + 0.1 * math.log(0.1 / 0.4))
    for chunk_size in (None, 1):
        got = token_distillation_loss(logits_S, teacher, divergence="topk_kl", tail="uniform",
                                      chunk_size=chunk_size)
        assert_close(got, torch.tensor(want, dtype=DOUBLE), atol=1e-12, rtol=0)
    # 'renormalize': p̂ = (0.375, 0, 0.625, 0), zero outside the top-k.
    want = 0.625 * math.log(0.625 / 0.3) + 0.375 * math.log(0.375 / 0.1)
    got = token_distillation_loss(logits_S, teacher, divergence="topk_kl", tail="renormalize")
    assert_close(got, torch.tensor(want, dtype=DOUBLE), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------
# registry-wide properties
# ---------------------------------------------------------------------------------------
def test_every_divergence_is_registered():
    assert set(DIVERGENCES) <= set(TOKEN_LOSSES.names())


@pytest.mark.parametrize("name", DENSE_DIVERGENCES)
def test_registered_loss_is_zero_when_student_equals_teacher(name):
    logits = _randn(B, L, V, seed=5, scale=3).requires_grad_()
    loss = TOKEN_LOSSES[name](logits, logits.detach(), mask=MASK, temperature=2.0)
    assert abs(loss.item()) < 1e-12
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all()


def _all_paths(name, logits_S, logits_T, hidden=None, **options):
    """(value, grads) from dense, chunked, fused for the same objective."""
    out = {}
    for path in ("dense", "chunked"):
        loss = token_distillation_loss(logits_S, logits_T, divergence=name,
                                       chunk_size=None if path == "dense" else CHUNK, **options)
        out[path] = (loss, torch.autograd.grad(loss, logits_S))
    if hidden is not None:
        hidden_S, weight_S, hidden_T, weight_T = hidden
        loss = fused_token_distillation_loss(hidden_S, weight_S, hidden_T, weight_T,
                                             divergence=name, chunk_size=CHUNK, **options)
        out["fused"] = (loss, torch.autograd.grad(loss, [hidden_S, weight_S]))
    return out


@pytest.mark.parametrize("name", DENSE_DIVERGENCES)
def test_extreme_logits_give_no_nan(name):
    # ±1e4 logits: probabilities underflow to exactly 0 in fp32.
    gen = _gen(7)
    logits_S = (torch.randint(-1, 2, (B, L, V), generator=gen) * 1e4).float().requires_grad_()
    logits_T = (torch.randint(-1, 2, (B, L, V), generator=gen) * 1e4).float()
    # The fused path sees the same logits: hidden = logits, head = identity.
    hidden_S = logits_S.detach().clone().requires_grad_()
    weight_S = torch.eye(V).requires_grad_()
    for path, (loss, grads) in _all_paths(name, logits_S, logits_T, labels=_labels(),
                                          hidden=(hidden_S, weight_S, logits_T,
                                                  torch.eye(V)), beta=0.5).items():
        assert torch.isfinite(loss), (path, loss)
        assert all(torch.isfinite(g).all() for g in grads), path


@pytest.mark.parametrize("name", DIVERGENCES)
def test_all_masked_batch_gives_zero_and_zero_grads(name):
    hidden_S, weight_S, _, hidden_T, weight_T, _ = _heads(bias=False)
    logits_S = (hidden_S @ weight_S.T).detach().requires_grad_()
    teacher = hidden_T.detach() @ weight_T.T
    hidden = (hidden_S, weight_S, hidden_T, weight_T)
    if name == "topk_kl":
        logprobs, ids = torch.log_softmax(teacher, -1).topk(3, dim=-1)
        teacher = TopKTeacher(ids, logprobs)
        hidden = (hidden_S, weight_S, teacher, None)
    labels = torch.full((B, L), -100)
    results = _all_paths(name, logits_S, teacher, hidden=hidden, labels=labels, ce_weight=0.5)
    for path, (loss, grads) in results.items():
        assert loss.item() == 0.0, path
        assert all(torch.count_nonzero(g) == 0 for g in grads), path


@pytest.mark.parametrize("path", ["dense", "chunked", "fused"])
@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_accumulation_over_micro_batches_is_exact(name, path):
    # 8 sequences of different valid lengths: one batch of 8 == k micro-batches of 8/k,
    # each divided by the whole window's token count.
    batch, length = 8, 5
    hidden_S = torch.randn(batch, length, HS, generator=_gen(1)).requires_grad_()
    weight_S = torch.randn(V, HS, generator=_gen(2)).requires_grad_()
    hidden_T = torch.randn(batch, length, HT, generator=_gen(3))
    weight_T = torch.randn(V, HT, generator=_gen(4))
    labels = torch.randint(0, V, (batch, length), generator=_gen(5))
    for row in range(batch):
        if row % 3:  # uneven valid lengths (row 5 has none)
            labels[row, row % length:] = -100
    window = count_valid_tokens(labels)

    def loss_and_grads(rows, num_tokens):
        options = dict(divergence=name, num_tokens=num_tokens, ce_weight=0.25)
        if path == "fused":
            loss = fused_token_distillation_loss(hidden_S[rows], weight_S, hidden_T[rows],
                                                 weight_T, labels[rows], chunk_size=3, **options)
        else:
            loss = token_distillation_loss(hidden_S[rows] @ weight_S.T,
                                           hidden_T[rows] @ weight_T.T, labels[rows],
                                           chunk_size=3 if path == "chunked" else None,
                                           **options)
        return loss, torch.autograd.grad(loss, [hidden_S, weight_S])

    whole, whole_grads = loss_and_grads(slice(0, batch), None)
    for k in (2, 4):
        size = batch // k
        parts = [loss_and_grads(slice(i * size, (i + 1) * size), window) for i in range(k)]
        assert_close(sum(p[0] for p in parts), whole, atol=1e-6, rtol=0)
        for j in range(2):
            assert_close(sum(p[1][j] for p in parts), whole_grads[j], atol=1e-6, rtol=0)


def test_fused_path_honours_ignore_index():
    hidden_S, weight_S, bias_S, hidden_T, weight_T, bias_T = _heads()
    labels = _labels()
    loss = fused_token_distillation_loss(hidden_S, weight_S, hidden_T, weight_T, labels,
                                         bias_S=bias_S, bias_T=bias_T, chunk_size=CHUNK,
                                         ce_weight=0.5)
    (grad,) = torch.autograd.grad(loss, hidden_S)
    ignored = labels == -100
    assert torch.count_nonzero(grad[ignored]) == 0
    assert torch.count_nonzero(grad[~ignored].abs().sum(-1)) == int((~ignored).sum())
    # What the teacher says at an ignored token does not matter either.
    changed = hidden_T.detach().clone()
    changed[ignored] = 100.0
    again = fused_token_distillation_loss(hidden_S, weight_S, changed, weight_T, labels,
                                          bias_S=bias_S, bias_T=bias_T, chunk_size=CHUNK,
                                          ce_weight=0.5)
    assert_close(again, loss, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------------------
def test_vocab_mismatch_error_names_both_sizes():
    logits_S, logits_T = torch.randn(4, 32064), torch.randn(4, 32000)
    for chunk_size in (None, 2):
        with pytest.raises(ValueError, match="32064.*32000"):
            token_distillation_loss(logits_S, logits_T, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="32064.*32000"):
        fused_token_distillation_loss(torch.randn(4, 8), torch.randn(32064, 8),
                                      torch.randn(4, 8), torch.randn(32000, 8))


@pytest.mark.parametrize("name", DENSE_DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [None, CHUNK])
def test_padded_vocab_equals_truncated_vocab(name, chunk_size):
    pad = 3
    logits_T = _randn(B, L, V, seed=2, scale=2)
    core = _randn(B, L, V, seed=1, scale=2)
    padded = torch.cat([core, torch.full((B, L, pad), float("-inf"), dtype=DOUBLE)], -1)
    padded.requires_grad_()
    core.requires_grad_()
    labels = _labels()
    got = token_distillation_loss(padded, logits_T, labels, divergence=name, temperature=1.3,
                                  vocab_alignment="pad", chunk_size=chunk_size, ce_weight=0.2)
    want = token_distillation_loss(core, logits_T, labels, divergence=name, temperature=1.3,
                                   ce_weight=0.2)
    assert_close(got, want, atol=1e-10, rtol=0)
    (grad,) = torch.autograd.grad(got, padded)
    (want_grad,) = torch.autograd.grad(want, core)
    assert torch.isfinite(grad).all()
    assert_close(grad[..., :V], want_grad, atol=1e-10, rtol=0)
    assert torch.count_nonzero(grad[..., V:]) == 0


def test_padded_vocab_in_fused_path_with_minus_inf_bias():
    hidden_S, weight_S, bias_S, hidden_T, weight_T, bias_T = _heads()
    extra_w = torch.zeros(2, HS, dtype=DOUBLE)
    extra_b = torch.full((2,), float("-inf"), dtype=DOUBLE)
    weight_pad = torch.cat([weight_S.detach(), extra_w]).requires_grad_()
    bias_pad = torch.cat([bias_S.detach(), extra_b])
    labels = _labels()
    got = fused_token_distillation_loss(hidden_S, weight_pad, hidden_T, weight_T, labels,
                                        bias_S=bias_pad, bias_T=bias_T, divergence="jsd",
                                        vocab_alignment="pad", chunk_size=CHUNK)
    want = fused_token_distillation_loss(hidden_S, weight_S, hidden_T, weight_T, labels,
                                         bias_S=bias_S, bias_T=bias_T, divergence="jsd",
                                         chunk_size=CHUNK)
    assert_close(got, want, atol=1e-10, rtol=0)
    (grad,) = torch.autograd.grad(got, weight_pad)
    assert torch.isfinite(grad).all()


def test_truncate_alignment_uses_shared_ids():
    logits_S, logits_T = _randn(5, V + 2, seed=1), _randn(5, V, seed=2)
    got = token_distillation_loss(logits_S, logits_T, vocab_alignment="truncate")
    assert_close(got, token_distillation_loss(logits_S[:, :V], logits_T), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------
# precision, compile, options
# ---------------------------------------------------------------------------------------
def test_bf16_autocast_close_to_fp32():
    """Stated tolerance: bf16 matmuls under autocast stay within 5e-2 relative of fp32."""
    torch.manual_seed(0)
    n, vocab, hs, ht = 64, 300, 32, 48
    hidden_S = torch.randn(n, hs, requires_grad=True)
    weight_S = (torch.randn(vocab, hs) * 0.2).requires_grad_()
    hidden_T, weight_T = torch.randn(n, ht), torch.randn(vocab, ht) * 0.2
    labels = torch.randint(0, vocab, (n,))
    labels[::7] = -100

    def run():
        loss = fused_token_distillation_loss(hidden_S, weight_S, hidden_T, weight_T, labels,
                                             divergence="jsd", chunk_size=24, ce_weight=0.5)
        return loss, torch.autograd.grad(loss, [hidden_S, weight_S])

    loss32, grads32 = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, grads16 = run()
    assert loss16.dtype == torch.float32
    assert_close(loss16, loss32, rtol=5e-2, atol=0)
    for got, want in zip(grads16, grads32):
        assert got.dtype == torch.float32  # the inputs' dtype
        assert (got - want).norm() <= 5e-2 * want.norm()
    # bf16 inputs without autocast: gradients come back in bf16.
    h16, w16 = hidden_S.detach().bfloat16().requires_grad_(), weight_S.detach().bfloat16()
    w16.requires_grad_()
    loss = fused_token_distillation_loss(h16, w16, hidden_T.bfloat16(), weight_T.bfloat16(),
                                         labels, divergence="jsd", chunk_size=24)
    grads = torch.autograd.grad(loss, [h16, w16])
    assert all(g.dtype == torch.bfloat16 for g in grads)
    # bf16 logits through the chunked path.
    logits_S = (hidden_S @ weight_S.T).detach().bfloat16().requires_grad_()
    loss = token_distillation_loss(logits_S, (hidden_T @ weight_T.T).bfloat16(), labels,
                                   divergence="jsd", chunk_size=24)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.autograd.grad(loss, logits_S)[0].dtype == torch.bfloat16


class _TinyLM(torch.nn.Module):
    def __init__(self, hidden, vocab):
        super().__init__()
        gen = _gen(0)
        self.body = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.loss = TokenDistillationLoss("jsd", beta=0.4, chunk_size=CHUNK, ce_weight=0.3,
                                          return_dict=True)

    def forward(self, x, hidden_T, weight_T, labels, fused):
        hidden = torch.tanh(self.body(x))
        if fused:
            return self.loss.fused(hidden, self.head.weight, hidden_T, weight_T, labels,
                                   bias_S=self.head.bias)["loss"]
        return self.loss(self.head(hidden), hidden_T @ weight_T.T, labels)["loss"]


@pytest.mark.parametrize("fused", [False, True])
def test_compiled_caller_equals_eager(fused):
    torch._dynamo.reset()
    model = _TinyLM(HS, V)
    x, hidden_T, weight_T = torch.randn(B, L, HS), torch.randn(B, L, HT), torch.randn(V, HT)
    labels = _labels()
    eager = model(x, hidden_T, weight_T, labels, fused)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model, backend="aot_eager")
    got = compiled(x, hidden_T, weight_T, labels, fused)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    assert_close(got, eager, atol=1e-6, rtol=1e-6)
    for a, b in zip(got_grads, eager_grads):
        assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_module_front_reaches_all_three_paths():
    hidden_S, weight_S, bias_S, hidden_T, weight_T, bias_T = _heads()
    logits_S, logits_T = hidden_S @ weight_S.T + bias_S, hidden_T @ weight_T.T + bias_T
    labels = _labels()
    dense = TokenDistillationLoss("skew_kl", alpha=0.2, temperature=2.0)
    chunked = TokenDistillationLoss("skew_kl", alpha=0.2, temperature=2.0, chunk_size=CHUNK)
    want = dense(logits_S, logits_T, labels=labels)
    assert_close(chunked(logits_S, logits_T, labels=labels), want, atol=1e-12, rtol=0)
    for module in (dense, chunked):  # fused: chunk_size or the 1024 default
        got = module.fused(hidden_S, weight_S, hidden_T, weight_T, labels=labels,
                           bias_S=bias_S, bias_T=bias_T)
        assert_close(got, want, atol=1e-12, rtol=0)
    assert "skew_kl" in repr(dense)


@pytest.mark.parametrize("chunk_size", [None, CHUNK])
def test_parts_temperature_scaling_and_reductions(chunk_size):
    logits_S = _randn(B, L, V, seed=1).requires_grad_()
    logits_T = _randn(B, L, V, seed=2)
    labels = _labels()
    common = dict(divergence="forward_kl", temperature=3.0, chunk_size=chunk_size)
    plain = token_distillation_loss(logits_S, logits_T, labels, **common)
    parts = token_distillation_loss(logits_S, logits_T, labels, scale_by_temperature_squared=True,
                                    ce_weight=0.4, return_dict=True, **common)
    assert_close(parts["kd"], 9.0 * plain.detach(), atol=1e-12, rtol=0)
    assert_close(parts["loss"], parts["kd"] + 0.4 * parts["ce"], atol=1e-12, rtol=0)
    assert not parts["kd"].requires_grad and not parts["ce"].requires_grad
    assert parts["loss"].requires_grad
    ce_ref = torch.nn.functional.cross_entropy(logits_S.reshape(-1, V), labels.reshape(-1))
    assert_close(parts["ce"], ce_ref.detach(), atol=1e-12, rtol=0)
    assert "ce" not in token_distillation_loss(logits_S, logits_T, labels, return_dict=True,
                                               **common)
    total = token_distillation_loss(logits_S, logits_T, labels, reduction="sum", **common)
    assert_close(total, plain * int((labels != -100).sum()), atol=1e-10, rtol=0)
    if chunk_size is None:
        rows = token_distillation_loss(logits_S, logits_T, labels, reduction="none", **common)
        assert rows.shape == (B, L) and (rows[labels == -100] == 0).all()
        assert_close(rows.sum(), total, atol=1e-12, rtol=0)


def test_no_grad_and_inference_mode():
    hidden_S, weight_S, bias_S, hidden_T, weight_T, bias_T = _heads()
    labels = _labels()
    want = fused_token_distillation_loss(hidden_S, weight_S, hidden_T, weight_T, labels,
                                         divergence="tv", chunk_size=CHUNK).detach()
    with torch.inference_mode():
        got = fused_token_distillation_loss(hidden_S, weight_S, hidden_T, weight_T, labels,
                                            divergence="tv", chunk_size=CHUNK)
        chunked = token_distillation_loss(hidden_S @ weight_S.T, hidden_T @ weight_T.T, labels,
                                          divergence="tv", chunk_size=CHUNK)
    assert_close(got, want, atol=1e-12, rtol=0)
    assert_close(chunked, want, atol=1e-12, rtol=0)


def test_count_valid_tokens():
    assert count_valid_tokens(_labels(), MASK).item() == int(((_labels() != -100) & (MASK > 0))
                                                                .sum())
    assert count_valid_tokens(mask=MASK).item() == 11
    with pytest.raises(ValueError, match="labels or mask"):
        count_valid_tokens()


@pytest.mark.parametrize("kwargs,match", [
    (dict(divergence="kl"), "divergence"),
    (dict(temperature=0.0), "temperature"),
    (dict(divergence="jsd", beta=1.5), "beta"),
    (dict(divergence="skew_kl", alpha=-0.1), "alpha"),
    (dict(tail="zeros"), "tail"),
    (dict(vocab_alignment="zeros"), "vocab_alignment"),
    (dict(reduction="none", chunk_size=4), "reduction='none'"),
    (dict(reduction="avg"), "reduction"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(reduction="sum", num_tokens=3), "num_tokens"),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_distillation_loss(torch.randn(4, V), torch.randn(4, V), torch.zeros(4).long(),
                                **kwargs)


def test_bad_inputs_raise_value_error():
    logits = torch.randn(B, L, V)
    with pytest.raises(ValueError, match="labels has shape"):
        token_distillation_loss(logits, logits, torch.zeros(B, L + 1).long())
    with pytest.raises(ValueError, match="ce_weight"):
        token_distillation_loss(logits, logits, ce_weight=1.0)
    with pytest.raises(ValueError, match="TopKTeacher"):
        token_distillation_loss(logits, logits, divergence="topk_kl")
    with pytest.raises(ValueError, match="weight_S"):
        fused_token_distillation_loss(torch.randn(4, 8), torch.randn(V, 7), torch.randn(4, 8),
                                      torch.randn(V, 8))
    with pytest.raises(ValueError, match="unknown divergence"):
        TokenDistillationLoss("nope")


def test_empty_input_gives_zero():
    hidden_S, weight_S = torch.randn(0, HS, requires_grad=True), torch.randn(V, HS)
    for chunk_size in (None, CHUNK):
        logits = torch.randn(0, V, requires_grad=True)
        loss = token_distillation_loss(logits, torch.randn(0, V), chunk_size=chunk_size)
        assert loss.item() == 0.0
    loss = fused_token_distillation_loss(hidden_S, weight_S, torch.randn(0, HT),
                                         torch.randn(V, HT))
    assert loss.item() == 0.0


def test_user_registered_token_loss_runs_on_the_dense_path():
    def squared_error(logits_S, logits_T, mask=None):
        rows = ((logits_S - logits_T) ** 2).sum(-1)
        return (rows * mask).sum() / mask.sum().clamp(min=1)

    TOKEN_LOSSES["_test_squared_error"] = squared_error
    try:
        loss_fn = TokenDistillationLoss("_test_squared_error")
        logits_S, logits_T = torch.zeros(B, L, V), torch.ones(B, L, V)
        assert loss_fn(logits_S, logits_T, labels=_labels()).item() == V
        with pytest.raises(ValueError, match="dense path"):
            TokenDistillationLoss("_test_squared_error", chunk_size=4)(logits_S, logits_T)
    finally:
        del TOKEN_LOSSES["_test_squared_error"]


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "reverse_kl"])
def test_kd_weight_equals_weighting_the_divergence_by_hand(name):
    """kd_weight · kd + ce_weight · ce, on every path, equals the two terms computed apart
    and weighted afterwards (values and gradients), and kd_weight=1 is the plain loss."""
    logits_S = _randn(B, L, V, seed=1).requires_grad_()
    logits_T = _randn(B, L, V, seed=2)
    hidden_S = _randn(B, L, HS, seed=3).requires_grad_()
    weight_S = _randn(V, HS, seed=4).requires_grad_()
    hidden_T, weight_T = _randn(B, L, HT, seed=5), _randn(V, HT, seed=6)
    hidden = (hidden_S, weight_S, hidden_T, weight_T)
    common = dict(labels=_labels(), mask=MASK, temperature=2.0)
    weighted = _all_paths(name, logits_S, logits_T, hidden, kd_weight=0.3, ce_weight=0.7,
                          **common)
    kd_only = _all_paths(name, logits_S, logits_T, hidden, **common)
    ce_only = _all_paths("forward_kl", logits_S, logits_S.detach(),
                         (hidden_S, weight_S, hidden_S.detach(), weight_S.detach()),
                         kd_weight=0.0, ce_weight=1.0, **common)
    for path in weighted:
        loss, grads = weighted[path]
        expected = 0.3 * kd_only[path][0] + 0.7 * ce_only[path][0]
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12, msg=path)
        for grad, kd_grad, ce_grad in zip(grads, kd_only[path][1], ce_only[path][1]):
            torch.testing.assert_close(grad, 0.3 * kd_grad + 0.7 * ce_grad, rtol=1e-9,
                                       atol=1e-12, msg=path)
    plain = token_distillation_loss(logits_S, logits_T, divergence=name, **common)
    assert torch.equal(token_distillation_loss(logits_S, logits_T, divergence=name,
                                               kd_weight=1.0, **common), plain)
    with pytest.raises(ValueError, match="kd_weight must be a finite number >= 0"):
        token_distillation_loss(logits_S, logits_T, kd_weight=-1.0, **common)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "topk"])
@pytest.mark.parametrize("path", ["dense", "chunked", "fused"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_hard_label_term_is_cross_entropy_in_value_and_gradient(divergence, path, tau):
    # At τ = 1 the CE is read off the divergence's student log-softmax, at τ = 2 from its own
    # logsumexp: both must be F.cross_entropy over the valid tokens, and adding it must add
    # exactly its gradient to the KD term's.
    hidden_S, weight_S, bias_S, hidden_T, weight_T, bias_T = _heads()
    labels = _labels()
    with torch.no_grad():
        logits_T = hidden_T @ weight_T.T + bias_T
    teacher_logits = logits_T
    name = divergence
    if divergence == "topk":
        top = torch.log_softmax(logits_T, -1).topk(4, dim=-1)
        teacher_logits, name = TopKTeacher(top.indices, top.values), "forward_kl"

    def loss(ce_weight):
        options = dict(divergence=name, temperature=tau, ce_weight=ce_weight,
                       return_dict=True)
        if divergence == "topk":
            options["tail"] = "bucket"
        if path == "fused":
            teacher = teacher_logits if divergence == "topk" else hidden_T.detach()
            return fused_token_distillation_loss(
                hidden_S, weight_S, teacher, None if divergence == "topk" else weight_T,
                labels, bias_S=bias_S, bias_T=None if divergence == "topk" else bias_T,
                chunk_size=CHUNK, **options)
        logits_S = hidden_S @ weight_S.T + bias_S
        return token_distillation_loss(logits_S, teacher_logits, labels,
                                       chunk_size=CHUNK if path == "chunked" else None,
                                       **options)

    inputs = (hidden_S, weight_S, bias_S)
    with_ce = loss(0.6)
    grads = torch.autograd.grad(with_ce["loss"], inputs)
    kd_only = loss(0.0)
    kd_grads = torch.autograd.grad(kd_only["loss"], inputs)
    ce_ref = torch.nn.functional.cross_entropy((hidden_S @ weight_S.T + bias_S).reshape(-1, V),
                                               labels.reshape(-1))
    ce_grads = torch.autograd.grad(ce_ref, inputs)
    assert_close(with_ce["ce"], ce_ref.detach(), atol=1e-12, rtol=0)
    assert_close(with_ce["kd"], kd_only["kd"], atol=1e-12, rtol=0)
    for got, kd, ce in zip(grads, kd_grads, ce_grads):
        assert_close(got, kd + 0.6 * ce, atol=1e-12, rtol=0)
