"""The 2024–2025 token-level objectives (textbrewer.losses.token.objectives) and their
generation helpers (textbrewer.distillers.lm.generation), each against a plain hand-written
implementation of its paper's formula (float64, small vocabularies), and their use by the
LM distillers (TAID's t through extra_state and a resumed run, the off-policy schedule,
Speculative KD in the sampling loop)."""

import json
import math
import os
import socket

import pytest
import torch
from torch import nn

from textbrewer.losses.token import (OBJECTIVES, TAIDSchedule, TokenDistillationLoss,
                                     akl_loss, akl_weights, distillm2_loss, skew_kl_loss,
                                     skew_reverse_kl_loss, taid_loss, token_distillation_loss)
from textbrewer.registry import TOKEN_LOSSES

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from textbrewer import DistillationConfig, TrainingConfig  # noqa: E402
from textbrewer.distillers import CausalLMDistiller, LMDistillationConfig  # noqa: E402
from textbrewer.distillers.lm.generation import (AdaptiveOffPolicySchedule,  # noqa: E402
                                                 speculative_replace)

transformers.utils.logging.set_verbosity_error()
VOCAB = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) * scale


def _softmax(row):
    """softmax of a list of floats, by hand."""
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(a, b):
    """Σ a (log a − log b) over lists of probabilities (0·log 0 = 0)."""
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)


# valid tokens: rows 0, 2, 4, 5 of six (row 1 masked, row 3 an ignored label)
MASK = torch.tensor([1, 0, 1, 1, 1, 1])
LABELS = torch.tensor([0, 1, 2, -100, 3, 4])
VALID = [0, 2, 4, 5]


# ============================================================================ TAID
def _taid_reference(z_S, z_T, t, tau, valid):
    total = 0.0
    for row in valid:
        s, z = z_S[row].tolist(), z_T[row].tolist()
        target = _softmax([((1 - t) * a + t * b) / tau for a, b in zip(s, z)])
        total += _kl(target, _softmax([a / tau for a in s]))
    return total / len(valid)


def test_taid_value_and_gradient_equal_the_papers_formula():
    """KL(p_t ‖ q) with p_t = softmax(((1−t) sg(z_S) + t z_T) / τ); as p_t is a constant,
    the gradient wrt z_S is (q − p_t) / τ per valid token over the count."""
    z_S, z_T = _randn(6, 5, seed=1, scale=2).requires_grad_(), _randn(6, 5, seed=2, scale=2)
    t, tau = 0.3, 2.0
    loss = taid_loss(z_S, z_T, LABELS, MASK, t=t, temperature=tau)
    expected = _taid_reference(z_S.detach(), z_T, t, tau, VALID)
    assert abs(loss.item() - expected) < 1e-12
    (grad,) = torch.autograd.grad(loss, z_S)
    q = torch.softmax(z_S.detach() / tau, -1)
    p_t = torch.softmax(((1 - t) * z_S.detach() + t * z_T) / tau, -1)
    manual = torch.zeros_like(grad)
    manual[VALID] = (q - p_t)[VALID] / tau / len(VALID)
    torch.testing.assert_close(grad, manual, rtol=0, atol=1e-14)


def test_taid_ends_chunks_reductions_and_registry():
    z_S, z_T = _randn(2, 3, 7, seed=3).requires_grad_(), _randn(2, 3, 7, seed=4)
    # t = 1: the forward KL; t = 0: the student is its own target
    forward = token_distillation_loss(z_S, z_T, temperature=1.5)
    torch.testing.assert_close(taid_loss(z_S, z_T, t=1.0, temperature=1.5), forward)
    assert taid_loss(z_S, z_T, t=0.0).item() == 0.0
    # checkpointed chunks: the same value and gradient as dense
    dense = taid_loss(z_S, z_T, t=0.6, ce_weight=0.5, labels=torch.ones(2, 3).long())
    chunked = taid_loss(z_S, z_T, t=0.6, ce_weight=0.5, labels=torch.ones(2, 3).long(),
                        chunk_size=2)
    torch.testing.assert_close(chunked, dense, rtol=0, atol=1e-14)
    g_dense, = torch.autograd.grad(dense, z_S)
    g_chunked, = torch.autograd.grad(chunked, z_S)
    torch.testing.assert_close(g_chunked, g_dense, rtol=0, atol=1e-14)
    per_token = taid_loss(z_S, z_T, t=0.6, reduction="none")
    assert per_token.shape == (2, 3)
    torch.testing.assert_close(per_token.sum() / 6, taid_loss(z_S, z_T, t=0.6))
    # the registry entry (default t: the paper's t_start 0.4) and the module front
    torch.testing.assert_close(TOKEN_LOSSES["taid"](z_S, z_T), taid_loss(z_S, z_T, t=0.4))
    torch.testing.assert_close(TokenDistillationLoss("akl")(z_S, z_T), akl_loss(z_S, z_T))
    assert set(OBJECTIVES) <= set(TOKEN_LOSSES.names())


def test_taid_schedule_adaptive_values_step_by_step():
    """The paper's update with α = 0.5, β = 0.5 (large, so each step shows), 10 steps."""
    schedule = TAIDSchedule(t_start=0.4, t_end=1.0, alpha=0.5, beta=0.5)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # step 1: the loss is only recorded
    assert schedule.update(2.0, 0.1) == 0.4
    # step 2: δ = (2 − 1.5)/2 = 0.25, m = 0.125, t = max(0.52, 0.4 + 0.5σ(m)(1 − 0.4))
    t2 = 0.4 + 0.5 * sigmoid(0.125) * 0.6
    assert t2 > 0.52
    assert abs(schedule.update(1.5, 0.2) - t2) < 1e-15
    # step 3: δ = 0.3/1.5 = 0.2, m = 0.5·0.125 + 0.5·0.2 = 0.1625
    t3 = t2 + 0.5 * sigmoid(0.1625) * (1 - t2)
    assert abs(schedule.update(1.2, 0.3) - t3) < 1e-15
    # step 4: the loss rises: δ = −0.1/1.2, m = 0.5·0.1625 + 0.5·δ
    m4 = 0.5 * 0.1625 + 0.5 * (-0.1 / 1.2)
    t4 = t3 + 0.5 * sigmoid(m4) * (1 - t3)
    assert abs(schedule.update(1.3, 0.4) - t4) < 1e-15
    assert abs(schedule.momentum - m4) < 1e-15 and schedule.prev_loss == 1.3
    # a tiny α: t follows the linear schedule (max with t_linear), and never passes t_end
    slow = TAIDSchedule(alpha=1e-6, beta=0.99)
    slow.update(1.0, 0.0)
    for step, loss in zip(range(1, 11), [0.9, 0.8, 0.85, 0.7, 0.6, 0.6, 0.5, 0.5, 0.4, 0.4]):
        t = slow.update(loss, step / 8)
        assert t == min(1.0, max(0.4 + 0.6 * min(step / 8, 1.0), t))
        assert t <= 1.0
    assert slow.t == 1.0
    linear = TAIDSchedule(t_start=0.2, t_end=0.8, mode="linear")
    assert [linear.update(None, p) for p in (0.0, 0.25, 0.5, 1.0)] == \
        pytest.approx([0.2, 0.2 + 0.6 * 0.25, 0.2 + 0.6 * 0.5, 0.8], abs=1e-15)


def test_taid_schedule_state_round_trip_and_errors():
    schedule = TAIDSchedule(alpha=0.3, beta=0.5)
    for step, loss in enumerate([3.0, 2.0, 1.5], start=1):
        schedule.update(loss, step / 100)
    copy = TAIDSchedule(alpha=0.3, beta=0.5)
    copy.load_state_dict(schedule.state_dict())
    assert copy.state_dict() == schedule.state_dict()
    assert copy.update(1.4, 0.04) == schedule.update(1.4, 0.04)
    schedule.reset()
    assert schedule.state_dict() == {"t": 0.4, "prev_loss": None, "momentum": 0.0}
    for bad, word in ((dict(t_start=0.9, t_end=0.5), "t_start must be < t_end"),
                      (dict(alpha=2.0), "alpha"), (dict(beta=1.0), "beta"),
                      (dict(mode="cosine"), "mode must be one of")):
        with pytest.raises(ValueError, match=word):
            TAIDSchedule(**bad)
    with pytest.raises(ValueError, match=r"t \(taid\) must be a number in \[0, 1\]"):
        taid_loss(torch.zeros(2, 3), torch.zeros(2, 3), t=1.5)
    with pytest.raises(ValueError, match="token dimensions"):
        taid_loss(torch.zeros(2, 3), torch.zeros(3, 3), t=0.5)


# ============================================================================ AKL
def test_akl_weights_hand_computed_on_a_4_token_vocabulary():
    """p = (0.1, 0.4, 0.3, 0.2), q = (0.05, 0.15, 0.2, 0.6). Sorted by p: ids 1, 2, 3, 0 with
    the mass before them 0, 0.4, 0.7, 0.9. μ = 0.5: head {1, 2} (0.4 < 0.5 ≤ 0.7);
    g_head = |.4−.15| + |.3−.2| = 0.35, g_tail = |.2−.6| + |.1−.05| = 0.45."""
    p = torch.tensor([[0.1, 0.4, 0.3, 0.2]], dtype=torch.float64)
    q = torch.tensor([[0.05, 0.15, 0.2, 0.6]], dtype=torch.float64)
    z_S, z_T = q.log().requires_grad_(), p.log()
    w_head, w_tail = akl_weights(z_S, z_T, mu=0.5)
    assert abs(w_head.item() - 0.35 / 0.8) < 1e-12 and abs(w_tail.item() - 0.45 / 0.8) < 1e-12
    # μ = 0.35: head {1} alone; g_head = 0.25, g_tail = 0.1 + 0.4 + 0.05 = 0.55
    w_head, w_tail = akl_weights(z_S, z_T, mu=0.35)
    assert abs(w_head.item() - 0.25 / 0.8) < 1e-12 and abs(w_tail.item() - 0.55 / 0.8) < 1e-12
    # μ = 1: everything is head (pure forward KL)
    assert akl_weights(z_S, z_T, mu=1.0)[0].item() == 1.0
    # the loss: w_head · KL(p‖q) + w_tail · KL(q‖p)
    pl, ql = p[0].tolist(), q[0].tolist()
    expected = 0.35 / 0.8 * _kl(pl, ql) + 0.45 / 0.8 * _kl(ql, pl)
    assert abs(akl_loss(z_S, z_T).item() - expected) < 1e-12
    # q = p: both gaps 0 -> weights 0.5, 0.5 and a loss of 0
    assert [w.item() for w in akl_weights(z_T, z_T)] == [0.5, 0.5]
    assert akl_loss(z_T.clone().requires_grad_(), z_T).item() == 0.0


def _akl_reference(z_S, z_T, mu, tau, valid):
    """By hand: Python sorts, lists, the paper's head/tail gaps and the two KLs."""
    total = 0.0
    for row in valid:
        p = _softmax([x / tau for x in z_T[row].tolist()])
        q = _softmax([x / tau for x in z_S[row].tolist()])
        order = sorted(range(len(p)), key=lambda i: -p[i])
        g_head = g_tail = before = 0.0
        for i in order:
            if before < mu:
                g_head += abs(p[i] - q[i])
            else:
                g_tail += abs(p[i] - q[i])
            before += p[i]
        w = g_head / (g_head + g_tail)
        total += w * _kl(p, q) + (1 - w) * _kl(q, p)
    return total / len(valid)


def test_akl_value_and_gradient_equal_the_papers_formula():
    z_S, z_T = _randn(6, 6, seed=5, scale=2).requires_grad_(), _randn(6, 6, seed=6, scale=2)
    loss = akl_loss(z_S, z_T, LABELS, MASK, mu=0.5, temperature=1.5)
    assert abs(loss.item() - _akl_reference(z_S.detach(), z_T, 0.5, 1.5, VALID)) < 1e-12
    # the gradient treats the weights as constants: that of the weighted FKL + RKL
    (grad,) = torch.autograd.grad(loss, z_S)
    w_head, w_tail = akl_weights(z_S, z_T, mu=0.5, temperature=1.5)
    leaf = z_S.detach().requires_grad_()
    log_q, log_p = torch.log_softmax(leaf / 1.5, -1), torch.log_softmax(z_T / 1.5, -1)
    fkl = (log_p.exp() * (log_p - log_q)).sum(-1)
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1)
    (manual,) = torch.autograd.grad(((w_head * fkl + w_tail * rkl)[VALID]).sum() / 4, leaf)
    torch.testing.assert_close(grad, manual, rtol=0, atol=1e-14)
    assert (grad[[1, 3]] == 0).all()
    chunked = akl_loss(z_S, z_T, LABELS, MASK, mu=0.5, temperature=1.5, chunk_size=4)
    torch.testing.assert_close(chunked, loss, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match=r"mu \(akl\) must be a number in \(0, 1\]"):
        akl_loss(z_S, z_T, mu=0.0)


# ============================================================================ DistiLLM-2
def test_distillm2_equals_the_skew_kls_on_the_two_batches():
    """loss = mean over y_t of KL(p ‖ α₁p + (1−α₁)q) + mean over y_s of KL(q ‖ α₂q + (1−α₂)p)."""
    s1, t1 = _randn(2, 3, 5, seed=7, scale=2).requires_grad_(), _randn(2, 3, 5, seed=8, scale=2)
    s2, t2 = _randn(3, 2, 5, seed=9, scale=2).requires_grad_(), _randn(3, 2, 5, seed=10, scale=2)
    m1 = torch.tensor([[1, 1, 0], [1, 0, 0]])
    m2 = torch.tensor([[1, 1], [0, 1], [1, 0]])
    parts = distillm2_loss(s1, t1, s2, t2, m1, m2, alpha_teacher=0.2, alpha_student=0.3,
                           weight_student=0.5, return_dict=True)
    # by hand, from lists
    pull = push = 0.0
    for b, l in [(0, 0), (0, 1), (1, 0)]:
        p, q = _softmax(t1[b, l].tolist()), _softmax(s1[b, l].tolist())
        pull += _kl(p, [0.2 * x + 0.8 * y for x, y in zip(p, q)]) / 3
    for b, l in [(0, 0), (0, 1), (1, 1), (2, 0)]:
        p, q = _softmax(t2[b, l].tolist()), _softmax(s2[b, l].tolist())
        push += _kl(q, [0.3 * y + 0.7 * x for x, y in zip(p, q)]) / 4
    assert abs(parts["teacher_responses"].item() - pull) < 1e-12
    assert abs(parts["student_responses"].item() - push) < 1e-12
    assert abs(parts["loss"].item() - (pull + 0.5 * push)) < 1e-12
    # without the detach, the library's skew KL / skew reverse KL, values and gradients
    loss = distillm2_loss(s1, t1, s2, t2, m1, m2, alpha_teacher=0.2, alpha_student=0.3,
                          detach_mixture=False)
    reference = skew_kl_loss(s1, t1, mask=m1, alpha=0.2) + \
        skew_reverse_kl_loss(s2, t2, mask=m2, alpha=0.3)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-14)
    for ours, theirs in zip(torch.autograd.grad(loss, (s1, s2)),
                            torch.autograd.grad(reference, (s1, s2))):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-14)
    # the official code's detach: the skew reverse KL's mixture share α₂q is a constant
    # (the skew KL's gradient is unchanged)
    detached = distillm2_loss(s1, t1, s2, t2, m1, m2, alpha_teacher=0.2, alpha_student=0.3)
    g1, g2 = torch.autograd.grad(detached, (s1, s2))
    torch.testing.assert_close(g1, torch.autograd.grad(skew_kl_loss(s1, t1, mask=m1, alpha=0.2),
                                                       s1)[0], rtol=0, atol=1e-14)
    leaf2 = s2.detach().requires_grad_()
    lq2, p2 = torch.log_softmax(leaf2, -1), torch.softmax(t2, -1)
    mix2 = 0.3 * torch.softmax(s2.detach(), -1) + 0.7 * p2
    rows = (lq2.exp() * (lq2 - mix2.log())).sum(-1)
    (manual2,) = torch.autograd.grad((rows * m2).sum() / 4, leaf2)
    torch.testing.assert_close(g2, manual2, rtol=0, atol=1e-14)
    assert not torch.allclose(g2, torch.autograd.grad(
        skew_reverse_kl_loss(s2, t2, mask=m2, alpha=0.3), s2)[0])
    for bad, word in ((dict(alpha_teacher=1.5), "alpha_teacher"),
                      (dict(weight_student=-1.0), "weight_student")):
        with pytest.raises(ValueError, match=word):
            distillm2_loss(s1, t1, s2, t2, **bad)


# ============================================================================ Speculative KD
def test_speculative_replace_keeps_top_k_tokens_and_replaces_the_others():
    teacher = torch.tensor([[0.0, 10.0, 50.0, 10.0],    # top-2: id 2, then 1 and 3 tied
                            [0.0, 10.0, 50.0, 10.0],
                            [5.0, 1.0, 5.0, 0.0],       # top-2: ids 0 and 2
                            [1.0, 2.0, 3.0, 4.0]])
    proposed = torch.tensor([2, 0, 0, 1])
    tokens, accepted = speculative_replace(proposed, teacher, 2,
                                           generator=torch.Generator().manual_seed(0))
    # row 0 kept (its top-1), row 1 replaced by id 2 (all the teacher's mass: e^-40 for
    # the others), row 2 kept (tied first), row 3 (logit 2 < the 2nd largest 3) replaced
    assert accepted.tolist() == [True, False, True, False]
    assert tokens[:3].tolist() == [2, 2, 0]
    # the replacement is the seeded draw from softmax(teacher) (drawn for every row)
    drawn = torch.multinomial(teacher.softmax(-1), 1,
                              generator=torch.Generator().manual_seed(0)).squeeze(-1)
    assert tokens[3] == drawn[3]
    again, _ = speculative_replace(proposed, teacher, 2,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, tokens)
    # a token tied with the k-th logit is kept; K = V keeps everything
    assert speculative_replace(torch.tensor([3]), teacher[:1], 2)[1].item()
    assert speculative_replace(proposed, teacher, 4)[1].all()
    # an id beyond the teacher's vocabulary (a padded student vocabulary) is replaced
    tokens, accepted = speculative_replace(torch.tensor([9]), teacher[:1], 4)
    assert not accepted.item() and tokens.item() == 2
    for args, word in (((proposed, teacher, 0), "top_k"), ((proposed, teacher, 5), "top_k"),
                       ((torch.tensor([0, 1, 2, -1]), teacher, 2), ">= 0"),
                       ((proposed[:2], teacher, 2), "needs proposed")):
        with pytest.raises(ValueError, match=word):
            speculative_replace(*args)


class Successor(nn.Module):
    """A plain causal module whose logits at t put all mass on (input[t] + shift) % VOCAB."""

    def __init__(self, shift):
        super().__init__()
        self.shift = shift
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        following = (input_ids + self.shift) % VOCAB
        return {"logits": 60.0 * nn.functional.one_hot(following, VOCAB).float()}


def _batch():
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    return {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
            "labels": torch.tensor([[-100, -100, 7, 8], [-100, 10, -100, -100]])}


def _speculative_distiller(tmp_path, top_k, schedule=None, lmbda=1.0):
    lm = LMDistillationConfig(lmbda=lmbda, do_sample=False, max_new_tokens=3,
                              speculative_top_k=top_k)
    return CausalLMDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                             DistillationConfig(temperature=1.0), Successor(1), Successor(2),
                             lm_config=lm, off_policy_schedule=schedule)


def test_speculative_kd_in_the_on_policy_generation(tmp_path):
    """The student (greedy) proposes x + 2; the teacher's top-1 is x + 1. K = 1: every token
    is replaced by the teacher's (x + 1 with all its mass); K = V: the student's own."""
    prompts_last = [6, 9]  # the prompts are [5, 6] and [9]
    verified = _speculative_distiller(tmp_path, 1).prepare_batch(_batch())
    free = _speculative_distiller(tmp_path, VOCAB).prepare_batch(_batch())
    assert verified.source == free.source == "student"
    for row, (last, length) in enumerate(zip(prompts_last, [2, 1])):
        new = verified.student["input_ids"][row, length:length + 3].tolist()
        assert new == [(last + 1 + i) % VOCAB for i in range(3)]
        own = free.student["input_ids"][row, length:length + 3].tolist()
        assert own == [(last + 2 * (1 + i)) % VOCAB for i in range(3)]
    with pytest.raises(ValueError, match="no batch is student-generated"):
        _speculative_distiller(tmp_path, 1, lmbda=0.0)
    with pytest.raises(ValueError, match="speculative_top_k must be None or an integer"):
        LMDistillationConfig(speculative_top_k=0)


def test_speculative_kd_with_transformers_models_follows_the_teacher(tmp_path):
    """GPT-2 teacher and student, K = 1 and a near-zero generation temperature: every
    student token that is not the teacher's argmax is replaced by the teacher's (nearly
    greedy) draw, so the continuation is the teacher's greedy one."""
    teacher, student = gpt2(2, 32, seed=1), gpt2(seed=2)
    lm = LMDistillationConfig(lmbda=1.0, max_new_tokens=4, speculative_top_k=1,
                              generation_temperature=1e-4, seed=5)
    d = CausalLMDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                          DistillationConfig(temperature=1.0), teacher, student, lm_config=lm)
    batch = _collate(_examples(3))
    prepared = d.prepare_batch(batch)
    assert prepared.source == "student"
    lengths = [2, 1, 2]  # the tokens before the first label (examples of 7, 2, 5 tokens)
    prompts = [batch["input_ids"][row, :n] for row, n in enumerate(lengths)]
    greedy = CausalLMDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                               DistillationConfig(temperature=1.0), teacher, student,
                               lm_config=LMDistillationConfig(lmbda=1.0, max_new_tokens=4,
                                                              do_sample=False))
    with torch.no_grad():
        expected = greedy.sampler.sample_loop(teacher, prompts, with_mask=True)
    generated = [prepared.student["input_ids"][row, n:n + 4] for row, n in enumerate(lengths)]
    assert torch.equal(torch.stack(generated), expected)
    # without verification the student's own samples differ
    own = CausalLMDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path)),
                            DistillationConfig(temperature=1.0), teacher, student,
                            lm_config=LMDistillationConfig(lmbda=1.0, max_new_tokens=4,
                                                           generation_temperature=1e-4,
                                                           seed=5)).prepare_batch(batch)
    mine = [own.student["input_ids"][row, n:n + 4] for row, n in enumerate(lengths)]
    assert not torch.equal(torch.stack(mine), expected)


# ============================================================================ DistiLLM schedule
def test_adaptive_off_policy_schedule_rises_with_the_validation_loss():
    schedule = AdaptiveOffPolicySchedule(initial=0.0, step=0.1, maximum=0.25, loss_eps=0.1)
    values = [schedule.update(loss) for loss in (2.0, 1.9, 2.05, 2.2, 2.2, 2.35, 2.5)]
    # 2.0 is the reference; 2.2 >= 2.0 + 0.1 raises φ (reference 2.2); 2.35 >= 2.3 raises it
    # again (reference 2.35); 2.5 >= 2.45 would, but φ stops at maximum
    assert values == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.1, 0.2, 0.25], abs=1e-15)
    assert schedule.reference == 2.5
    copy = AdaptiveOffPolicySchedule()
    copy.load_state_dict(schedule.state_dict())
    assert copy.state_dict() == schedule.state_dict()
    for bad, word in ((dict(step=0.0), "step"), (dict(initial=0.5, maximum=0.2), "initial"),
                      (dict(loss_eps=-1.0), "loss_eps")):
        with pytest.raises(ValueError, match=word):
            AdaptiveOffPolicySchedule(**bad)
    with pytest.raises(ValueError, match="finite"):
        schedule.update(float("nan"))


def test_the_off_policy_schedule_replaces_lmbda_in_the_distiller(tmp_path):
    always = AdaptiveOffPolicySchedule(initial=1.0)
    d = _speculative_distiller(tmp_path, None, schedule=always, lmbda=0.0)
    assert d.prepare_batch(_batch()).source == "student"
    never = _speculative_distiller(tmp_path, None, schedule=AdaptiveOffPolicySchedule(),
                                   lmbda=0.0)
    assert never.prepare_batch(_batch()).source == "data"
    never.off_policy_schedule.update(1.0)
    never.off_policy_schedule.update(2.0)
    state = never.extra_state()
    assert state["off_policy_schedule"] == {"probability": 0.1, "reference": 2.0}
    fresh = _speculative_distiller(tmp_path, None, schedule=AdaptiveOffPolicySchedule(),
                                   lmbda=0.0)
    fresh.load_extra_state(state)
    assert fresh.off_policy_schedule.state_dict() == never.off_policy_schedule.state_dict()
    assert fresh.observed_values()["off_policy_probability"] == 0.1
    with pytest.raises(TypeError, match="AdaptiveOffPolicySchedule"):
        _speculative_distiller(tmp_path, None, schedule=0.5)


# ============================================================================ the distillers
def gpt2(n_layer=1, n_embd=16, seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=VOCAB,
                                      n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=1))


def _examples(count=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    result = []
    for length in [7, 2, 5, 3, 7, 4, 6, 2][:count]:
        ids = torch.randint(2, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[:min(2, length - 1)] = -100
        result.append({"input_ids": ids, "labels": labels})
    return result


def _collate(items):
    from textbrewer.cache import pad_collate
    return pad_collate(items)


def _lm_distiller(tmp_path, lm, accumulation=1, **train):
    return CausalLMDistiller(
        TrainingConfig(device="cpu", output_dir=str(tmp_path),
                       gradient_accumulation_steps=accumulation, **train),
        DistillationConfig(temperature=2.0, kd_loss_weight=0.7, hard_label_weight=0.3),
        gpt2(2, 32, seed=1), gpt2(seed=2), lm_config=lm)


@pytest.mark.parametrize("divergence", OBJECTIVES)
def test_distiller_loss_equals_the_objective_by_hand(tmp_path, divergence):
    batch = _collate(_examples(4))
    results = {}
    for path in ("dense", "chunked", "auto"):
        d = _lm_distiller(tmp_path, LMDistillationConfig(divergence=divergence, path=path,
                                                         chunk_size=5, akl_mu=0.4))
        assert d.path == ("chunked" if path == "auto" else path)
        total, parts = d.train_on_batch(batch, {})
        results[path] = (total.detach(), parts)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        logits_T = d.model_T(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logits_S = d.model_S(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    valid = (targets != -100) & (mask[:, 1:] == 1)
    options = dict(temperature=2.0, ce_weight=0.3 / 0.7, return_dict=True)
    if divergence == "taid":
        expected = taid_loss(logits_S, logits_T, targets, valid, t=0.4, **options)
    else:
        expected = akl_loss(logits_S, logits_T, targets, valid, mu=0.4, **options)
    for path, (total, parts) in results.items():
        torch.testing.assert_close(total, 0.7 * expected["loss"], msg=path)
        torch.testing.assert_close(parts["unweighted_kd_loss"], expected["kd"], msg=path)


def test_taid_t_is_updated_per_window_and_survives_checkpoint_resume(tmp_path):
    data = _examples(8)
    lm = LMDistillationConfig(divergence="taid", taid_alpha=1.0, taid_beta=0.5, path="dense")
    # the first update records the window's loss: the whole batch's TAID loss at t_start,
    # whatever the split into micro-batches
    d = _lm_distiller(tmp_path / "split", lm, accumulation=2)
    whole = _collate(data[:4])
    ids, mask, labels = whole["input_ids"], whole["attention_mask"], whole["labels"]
    with torch.no_grad():
        logits_T = d.model_T(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logits_S = d.model_S(input_ids=ids, attention_mask=mask).logits[:, :-1]
    valid = (labels[:, 1:] != -100) & (mask[:, 1:] == 1)
    first = taid_loss(logits_S, logits_T, labels[:, 1:], valid, t=0.4, temperature=2.0)
    loader = torch.utils.data.DataLoader(data[:4], batch_size=2, collate_fn=_collate)
    with d:
        d.train(torch.optim.SGD(d.model_S.parameters(), lr=0.1), loader, num_steps=1)
    assert d.taid.t == 0.4 and abs(d.taid.prev_loss - first.item()) < 1e-6

    def run(name, resume=None, stop_at=None):
        d = _lm_distiller(tmp_path / name, lm, ckpt_steps=2, resume_from=resume, seed=3)
        loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=_collate)
        seen = []

        def callback(model, step):
            seen.append(d.taid.t)
            if step == stop_at:
                raise KeyboardInterrupt  # after gs{step}.pkl, before its training state

        with d:
            try:
                d.train(torch.optim.SGD(d.model_S.parameters(), lr=0.3), loader, num_steps=8,
                        callback=callback)
            except KeyboardInterrupt:
                pass
        return d, seen

    whole_run, ts = run("whole")  # t after steps 2, 4, 6, 8 (the checkpoint callbacks)
    assert len(ts) == 4 and all(b >= a for a, b in zip(ts, ts[1:]))
    assert ts[0] > 0.4 + 0.6 * 2 / 8 and ts[1] > 0.4 + 0.6 * 4 / 8  # ahead of linear
    assert whole_run.observed_values()["taid_t"] == ts[-1]
    state = whole_run.extra_state()["taid"]
    assert state == whole_run.taid.state_dict() and state["prev_loss"] is not None
    fresh = _lm_distiller(tmp_path / "fresh", lm)
    assert fresh.taid.state_dict() == {"t": 0.4, "prev_loss": None, "momentum": 0.0}
    fresh.load_extra_state(whole_run.extra_state())
    assert fresh.taid.state_dict() == state
    run("resumed", stop_at=4)
    resumed, later = run("resumed", resume="latest")
    assert later == ts[1:]
    assert resumed.taid.state_dict() == whole_run.taid.state_dict()
    for key, value in whole_run.model_S.state_dict().items():
        assert torch.equal(resumed.model_S.state_dict()[key], value), key


def _ddp_child(rank, port, out_dir):
    """One of two gloo ranks: one TAID step on this rank's 4 examples (different lengths)."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    lm = LMDistillationConfig(divergence="taid", taid_alpha=1.0, taid_beta=0.5, path="dense")
    d = _lm_distiller(out_dir, lm)
    loader = torch.utils.data.DataLoader(_examples(8)[4 * rank:4 * rank + 4], batch_size=4,
                                         collate_fn=_collate)
    with d:
        d.train(torch.optim.SGD(d.model_S.parameters(), lr=0.1), loader, num_steps=1)
    with open(os.path.join(out_dir, f"taid{rank}.json"), "w") as handle:
        json.dump(d.taid.state_dict(), handle)


@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(), reason="no gloo")
def test_taid_loss_of_a_step_is_reduced_over_ddp_ranks(tmp_path):
    """Both ranks record the same loss: the TAID loss of the global batch (the two ranks'
    token sums over the tokens of both)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_child, args=(port, str(tmp_path)), nprocs=2, join=True)
    states = [json.load(open(tmp_path / f"taid{rank}.json")) for rank in range(2)]
    assert states[0] == states[1]
    d = _lm_distiller(tmp_path / "single", LMDistillationConfig(divergence="taid"))
    total = count = 0.0
    for rank in range(2):
        batch = _collate(_examples(8)[4 * rank:4 * rank + 4])
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        with torch.no_grad():
            logits_T = d.model_T(input_ids=ids, attention_mask=mask).logits[:, :-1]
            logits_S = d.model_S(input_ids=ids, attention_mask=mask).logits[:, :-1]
        valid = (labels[:, 1:] != -100) & (mask[:, 1:] == 1)
        total += taid_loss(logits_S, logits_T, labels[:, 1:], valid, t=0.4, temperature=2.0,
                           reduction="sum").item()
        count += int(valid.sum())
    assert abs(states[0]["prev_loss"] - total / count) < 1e-6


def test_config_names_the_valid_divergences_and_paths():
    with pytest.raises(ValueError, match=r"divergence must be one of \[.*'taid', 'akl'\]"):
        LMDistillationConfig(divergence="tiad")
    with pytest.raises(ValueError, match="has no fused path; use path='dense', 'chunked'"):
        LMDistillationConfig(divergence="akl", path="fused")
    for bad, word in ((dict(taid_t_start=0.8, taid_t_end=0.5), "taid_t_start must be <"),
                      (dict(taid_schedule="cosine"), "taid_schedule must be one of"),
                      (dict(akl_mu=0.0), "akl_mu must be > 0"),
                      (dict(taid_beta=1.0), "taid_beta must be < 1"),
                      (dict(akl_mu=1.5), "akl_mu must be a number")):
        with pytest.raises(ValueError, match=word):
            LMDistillationConfig(**bad)
    config = LMDistillationConfig(divergence="taid", taid_schedule="linear", akl_mu=0.3)
    assert LMDistillationConfig.from_dict(config.to_dict()) == config


def test_speculative_replacement_given_by_the_caller():
    """The distillers draw the teacher's replacement with the run's decoding settings and
    pass it in: rejected rows take it, accepted rows keep the student's token."""
    from textbrewer.distillers.lm.generation import speculative_replace
    teacher_logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    proposed = torch.tensor([1, 0])             # row 0: in the top 2; row 1: not
    greedy = teacher_logits.argmax(-1)          # what do_sample=False draws: [0, 3]
    tokens, accepted = speculative_replace(proposed, teacher_logits, 2, replacement=greedy)
    assert tokens.tolist() == [1, 3] and accepted.tolist() == [True, False]
    with pytest.raises(ValueError, match=r"replacement must be \(B,\)"):
        speculative_replace(proposed, teacher_logits, 2, replacement=greedy[:1])


def test_a_window_without_a_step_leaves_no_taid_loss_behind(tmp_path):
    """An epoch's short last window runs the loss but takes no step: its TAID loss must not
    be added to the next window's (prepare_window starts each window afresh)."""
    from textbrewer.distillers.lm import CausalLMDistiller
    distiller = CausalLMDistiller(
        TrainingConfig(device="cpu", output_dir=str(tmp_path), log_dir=None),
        DistillationConfig(temperature=1.0), model_T=torch.nn.Linear(2, 2),
        model_S=torch.nn.Linear(2, 2), lm_config=LMDistillationConfig(divergence="taid"))
    distiller._taid_window = torch.tensor(5.0)  # what the short window left
    distiller.prepare_window([])
    assert distiller._taid_window is None


def _gpt2_with_eos(eos, positions=64, seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=positions, n_embd=8,
                                      n_layer=1, n_head=2, eos_token_id=eos, bos_token_id=eos))


def test_on_policy_start_checks_the_end_of_sequence_and_the_room(tmp_path):
    """Before any generation: the generation's EOS is the student's, both models end with
    the same token, and the student has room for a prompt; a default EOS outside the
    vocabulary (GPT-2's 50256 in a 32-token model) names nothing."""
    def build(student, teacher, **options):
        return CausalLMDistiller(
            TrainingConfig(device="cpu", output_dir=str(tmp_path), log_dir=None),
            DistillationConfig(temperature=1.0), model_T=teacher, model_S=student,
            lm_config=LMDistillationConfig(lmbda=0.5, **options))
    with pytest.raises(ValueError, match=r"the student ends sequences with token \[5\] and "
                                         r"the teacher with \[6\]"):
        build(_gpt2_with_eos(5), _gpt2_with_eos(6))
    with pytest.raises(ValueError, match=r"eos_token_id=7 but the student's config ends "
                                         r"sequences with \[5\]"):
        build(_gpt2_with_eos(5), _gpt2_with_eos(5), eos_token_id=7)
    with pytest.raises(ValueError, match=r"max_new_tokens=64 leaves no room for a prompt in "
                                         r"the student's 64 positions"):
        build(_gpt2_with_eos(5), _gpt2_with_eos(5), max_new_tokens=64, eos_token_id=5)
    build(_gpt2_with_eos(5), _gpt2_with_eos(5), eos_token_id=5)
    build(_gpt2_with_eos(50256), _gpt2_with_eos(6), eos_token_id=3)  # outside: not checked
    # off-policy runs generate nothing: nothing to check
    CausalLMDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path), log_dir=None),
                      DistillationConfig(temperature=1.0), model_T=_gpt2_with_eos(6),
                      model_S=_gpt2_with_eos(5))


def test_on_policy_telemetry_counts_the_generated_tokens_and_the_ends(tmp_path):
    """Per step, for the student-generated rows: their mean generated length and the share
    that reached the EOS, counted from the batches the student generated; in TensorBoard
    as on_policy/generated_length and on_policy/eos_rate."""
    from textbrewer.logs import read_scalars
    student, teacher = _gpt2_with_eos(5, seed=1), _gpt2_with_eos(5, seed=2)
    config = LMDistillationConfig(lmbda=1.0, eos_token_id=5, max_new_tokens=6, seed=3,
                                  top_k=8)
    distiller = CausalLMDistiller(
        TrainingConfig(device="cpu", output_dir=str(tmp_path / "a"), log_dir=None),
        DistillationConfig(temperature=1.0), model_T=teacher, model_S=student,
        lm_config=config)
    prompts = {"input_ids": torch.tensor([[7, 8, 9], [10, 11, 12], [13, 14, 15]]),
               "labels": torch.full((3, 3), -100)}
    with distiller:  # generation runs on the started distiller's runtime
        generated = [distiller.generated_batch(student, prompts, seed) for seed in (0, 1)]
        for batch in generated:
            distiller._record_generation(batch)
    tokens = sum(int((b["labels"] != -100).sum()) for b in generated)
    ended = sum(int((b["labels"] == 5).any(1).sum()) for b in generated)
    values = distiller.observed_values()
    assert values["on_policy/generated_length"] == tokens / 6
    assert values["on_policy/eos_rate"] == ended / 6
    assert "on_policy/generated_length" not in distiller.observed_values()  # read once
    # a real run writes them to TensorBoard once per optimizer step
    run = CausalLMDistiller(
        TrainingConfig(device="cpu", output_dir=str(tmp_path / "b"),
                       log_dir=str(tmp_path / "tb")),
        DistillationConfig(temperature=1.0), model_T=teacher, model_S=student,
        lm_config=config)
    with run:
        run.train(torch.optim.SGD(student.parameters(), lr=0.1), [prompts] * 3, num_steps=3)
    scalars = read_scalars(str(tmp_path / "tb"))
    lengths = [value for _, value in scalars["scalar/on_policy/generated_length"]]
    rates = [value for _, value in scalars["scalar/on_policy/eos_rate"]]
    assert len(lengths) == len(rates) == 3
    assert all(1 <= length <= 6 for length in lengths) and all(0 <= r <= 1 for r in rates)
