"""Divergences against a top-k teacher (a cache, a served teacher, ``topk=``): every
divergence, the three tails, the guard for the reverse KL, and the LM distillers' use."""
import math

import pytest
import torch

from textbrewer import DistillationConfig, TrainingConfig
from textbrewer.cache import pad_collate
from textbrewer.distillers.lm import CausalLMDistiller, LMDistillationConfig
from textbrewer.losses.token import (TOPK_TAIL_FLOOR, TopKTeacher, check_topk_divergence,
                                     fused_token_distillation_loss, token_distillation_loss)
from textbrewer.teachers import LocalTeacher, TeacherSourceCollator
from textbrewer.testing import TinyTransformer

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"]


def _kl(a, b):
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)


def _softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def test_bucketed_reverse_kl_by_hand():
    """V = 4, k = 2: the teacher (0.5, 0.3 | 0.15, 0.05) becomes (0.5, 0.3, 0.2) and the
    student its own mass on ids 0, 1 and the rest; then KL(q_b ‖ p_b), at τ = 1 and 2."""
    student = [0.2, -0.4, 1.1, 0.3]
    teacher = TopKTeacher(torch.tensor([[0, 1]]),
                          torch.tensor([[0.5, 0.3]], dtype=torch.float64).log())
    q = _softmax(student)
    q_b = [q[0], q[1], q[2] + q[3]]
    p_b = [0.5, 0.3, 0.2]
    value = token_distillation_loss(torch.tensor([student], dtype=torch.float64), teacher,
                                    divergence="reverse_kl", tail="bucket")
    assert value.item() == pytest.approx(_kl(q_b, p_b), rel=1e-12)
    # τ = 2: both sides bucketed at τ = 1, then tempered as 3-outcome distributions
    q2_b = _softmax([math.log(q) / 2 for q in q_b])
    p2_b = _softmax([math.log(p) / 2 for p in p_b])
    value = token_distillation_loss(torch.tensor([student], dtype=torch.float64), teacher,
                                    divergence="reverse_kl", tail="bucket", temperature=2.0)
    assert value.item() == pytest.approx(_kl(q2_b, p2_b), rel=1e-12)
    # the uniform tail spreads 0.2 over ids 2 and 3: KL over all four outcomes
    value = token_distillation_loss(torch.tensor([student], dtype=torch.float64), teacher,
                                    divergence="reverse_kl", tail="uniform")
    assert value.item() == pytest.approx(_kl(q, [0.5, 0.3, 0.1, 0.1]), rel=1e-12)


def _inputs(seed=0, n=7, vocab=11, k=4, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    z_S = torch.randn(n, vocab, generator=generator, dtype=torch.float64)
    z_T = torch.randn(n, vocab, generator=generator, dtype=torch.float64) * scale
    logprobs, ids = z_T.log_softmax(-1).topk(k, dim=-1)
    return z_S, z_T, TopKTeacher(ids, logprobs)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", ["renormalize", "uniform", "bucket"])
def test_with_every_id_kept_each_tail_is_the_full_teacher(divergence, tail):
    """k = V leaves no tail: every divergence equals the one against the full logits."""
    z_S, z_T, _ = _inputs()
    logprobs, ids = z_T.log_softmax(-1).topk(z_T.shape[-1], dim=-1)
    if tail == "renormalize" and divergence == "reverse_kl":  # refused whatever k is
        with pytest.raises(ValueError, match="infinite"):
            token_distillation_loss(z_S, TopKTeacher(ids, logprobs), divergence=divergence,
                                    tail=tail)
        return
    for tau in (1.0, 2.0):
        full = token_distillation_loss(z_S, z_T, divergence=divergence, temperature=tau)
        topk = token_distillation_loss(z_S, TopKTeacher(ids, logprobs), divergence=divergence,
                                       temperature=tau, tail=tail)
        torch.testing.assert_close(topk, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_buckets_never_exceed_the_divergence_over_the_vocabulary(divergence):
    """Merging outcomes never increases an f-divergence: against the same teacher (the
    uniform tail's, whose tail mass is the bucket's), bucketed ≤ over V; equal when the
    student, too, spreads its mass outside the k ids evenly."""
    z_S, _, teacher = _inputs(seed=1)
    bucket = token_distillation_loss(z_S, teacher, divergence=divergence, tail="bucket",
                                     reduction="none")
    spread = token_distillation_loss(z_S, teacher, divergence=divergence, tail="uniform",
                                     reduction="none")
    assert (bucket <= spread + 1e-12).all() and (bucket < spread - 1e-6).any()
    even = torch.zeros_like(z_S).scatter_(-1, teacher.ids, z_S.gather(-1, teacher.ids))
    bucket = token_distillation_loss(even, teacher, divergence=divergence, tail="bucket",
                                     reduction="none")
    spread = token_distillation_loss(even, teacher, divergence=divergence, tail="uniform",
                                     reduction="none")
    torch.testing.assert_close(bucket, spread, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_a_student_equal_to_the_teacher_has_no_bucketed_divergence(divergence):
    """At every temperature: both sides are bucketed at τ = 1 before they are tempered."""
    _, z_T, teacher = _inputs(seed=6)
    for tau in (1.0, 2.0, 4.0):
        value = token_distillation_loss(z_T, teacher, divergence=divergence, tail="bucket",
                                        temperature=tau)
        assert abs(value.item()) < 1e-12, (tau, value.item())


def test_the_general_uniform_path_is_the_forward_kls_own():
    """The forward KL against a uniform tail has its own closed form (no autograd); the
    general top-k path that the other divergences use gives the same value."""
    from textbrewer.losses.token.spec import _make_spec, _topk_divergence_rows, _topk_rows
    z_S, _, teacher = _inputs(seed=2)
    for tau in (1.0, 3.0):
        spec = _make_spec("topk_kl", tau, 0.5, 0.1, "uniform", False, 0.0, None)
        log_q = torch.log_softmax(z_S / tau, dim=-1)
        closed, _ = _topk_rows(spec, log_q, *teacher, want_target=False)
        general = _topk_divergence_rows(spec, log_q, *teacher)
        torch.testing.assert_close(general, closed, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", ["uniform", "bucket"])
def test_dense_chunked_and_fused_agree(divergence, tail):
    """Value and gradients (student hidden states and head) on the three paths, with a
    hard-label term and an ignored token."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 6, generator=generator, dtype=torch.float64)
    head = torch.randn(11, 6, generator=generator, dtype=torch.float64)
    logprobs, ids = (torch.randn(2, 5, 11, generator=generator, dtype=torch.float64) * 2
                     ).log_softmax(-1).topk(4, dim=-1)
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    labels[0, 1] = -100
    options = dict(divergence=divergence, tail=tail, temperature=2.0, ce_weight=0.5)
    results = []
    for path in ("dense", "chunked", "fused"):
        h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
        if path == "fused":
            loss = fused_token_distillation_loss(h, w, TopKTeacher(ids, logprobs), labels=labels,
                                                 chunk_size=3, **options)
        else:
            loss = token_distillation_loss(h @ w.T, TopKTeacher(ids, logprobs), labels,
                                           chunk_size=None if path == "dense" else 3, **options)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(results[0][0])


def test_topk_kl_is_the_forward_kl_against_a_top_k_teacher():
    z_S, _, teacher = _inputs(seed=4)
    for tail in ("renormalize", "uniform", "bucket"):
        torch.testing.assert_close(
            token_distillation_loss(z_S, teacher, divergence="forward_kl", tail=tail),
            token_distillation_loss(z_S, teacher, divergence="topk_kl", tail=tail))


def test_the_reverse_kl_against_a_renormalised_teacher_is_refused():
    z_S, _, teacher = _inputs(seed=5)
    for options, shown in ((dict(divergence="reverse_kl"), "divergence='reverse_kl'"),
                           (dict(divergence="jsd", beta=1.0), "with beta=1.0"),
                           (dict(divergence="skew_reverse_kl", alpha=0.0), "with alpha=0.0")):
        with pytest.raises(ValueError, match=f"{shown}.*infinite.*tail='bucket'"):
            token_distillation_loss(z_S, teacher, tail="renormalize", **options)
        with pytest.raises(ValueError, match="infinite"):
            check_topk_divergence(tail="renormalize", **options)
    # the same divergences weighted away from the edge are finite there
    for options in (dict(divergence="jsd", beta=0.9), dict(divergence="skew_reverse_kl")):
        assert torch.isfinite(token_distillation_loss(z_S, teacher, tail="renormalize",
                                                      **options))
    with pytest.raises(ValueError, match=r"tail must be one of \['renormalize', 'uniform', "
                                         r"'bucket'\]"):
        check_topk_divergence("forward_kl", "spread")


def test_an_over_full_rounded_top_k_gets_the_floor_as_its_tail():
    """fp16 rounding can make a peaked top-k sum to 1 or more: the tail counts as
    TOPK_TAIL_FLOOR, and the bucketed reverse KL is that formula, finite."""
    student = torch.tensor([[0.0, 1.0, -1.0, 0.5]], dtype=torch.float64)
    logprobs = torch.tensor([[math.log(0.7), math.log(0.3005)]], dtype=torch.float64)
    value = token_distillation_loss(student, TopKTeacher(torch.tensor([[1, 3]]), logprobs),
                                    divergence="reverse_kl", tail="bucket")
    q = _softmax(student[0].tolist())
    p_b = _softmax([math.log(0.7), math.log(0.3005), math.log(TOPK_TAIL_FLOOR)])
    assert value.item() == pytest.approx(_kl([q[1], q[3], q[0] + q[2]], p_b), rel=1e-12)


def test_masked_teacher_entries_and_padded_rows_stay_finite():
    """A valid row whose top k holds a −inf entry (a masked logit) gets the floor there;
    an invalid row padded with −inf gives no NaN in any path's gradient."""
    z_S, _, teacher = _inputs(seed=7, n=4)
    logprobs = teacher.logprobs.clone()
    logprobs[0, -1] = float("-inf")
    padded = teacher.logprobs.clone()
    padded[3] = float("-inf")
    mask = torch.tensor([1, 1, 1, 0])
    for chunk_size in (None, 2):
        for tail in ("uniform", "bucket"):
            for rows, valid in ((logprobs, None), (padded, mask)):
                logits = z_S.clone().requires_grad_()
                loss = token_distillation_loss(logits, TopKTeacher(teacher.ids, rows),
                                               mask=valid, divergence="reverse_kl", tail=tail,
                                               chunk_size=chunk_size)
                loss.backward()
                assert torch.isfinite(loss) and torch.isfinite(logits.grad).all(), (
                    chunk_size, tail)


def test_the_bucketed_reverse_kl_pulls_the_students_outside_mass_to_the_tail():
    """The guard at work: minimising the bucketed reverse KL from a student that puts most
    of its mass outside the teacher's top k brings that mass to the teacher's tail mass,
    and the top-k share to the teacher's (the minimum is q_b = p_b)."""
    torch.manual_seed(0)
    vocab, k = 12, 3
    teacher_probs = torch.tensor([0.5, 0.25, 0.15] + [0.1 / 9] * 9, dtype=torch.float64)
    teacher = TopKTeacher(torch.arange(k).unsqueeze(0), teacher_probs[:k].log().unsqueeze(0))
    logits = torch.zeros(1, vocab, dtype=torch.float64)
    logits[0, 7] = 6.0  # 90 % of the student's mass on one id outside the top k
    for tau in (1.0, 2.0):  # the minimum is the teacher's buckets at any temperature
        start = logits.clone().requires_grad_()
        optimizer = torch.optim.Adam([start], lr=0.05)
        for _ in range(800):
            optimizer.zero_grad()
            token_distillation_loss(start, teacher, divergence="reverse_kl", tail="bucket",
                                    temperature=tau, chunk_size=4).backward()
            optimizer.step()
        q = start.detach().softmax(-1)[0]
        assert q[k:].sum().item() == pytest.approx(0.1, abs=2e-3), tau
        torch.testing.assert_close(q[:k], teacher_probs[:k], atol=2e-3, rtol=0)


# ---------------------------------------------------------------------------------- distillers
VOCAB = 13


def _data(count=6):
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (length,), generator=generator)}
            for length in [5, 3, 6, 4, 6, 2][:count]]


def _model(seed, hidden=8):
    torch.manual_seed(seed)
    return TinyTransformer(vocab_size=VOCAB, hidden_size=hidden, num_layers=1,
                           num_labels=VOCAB, token_level=True)


def _train(tmp_path, name, model_T, collate, lm_config, steps_check=None):
    student = _model(5, hidden=6)
    loader = torch.utils.data.DataLoader(_data(), batch_size=3, collate_fn=collate)
    distiller = CausalLMDistiller(
        TrainingConfig(device="cpu", output_dir=str(tmp_path / name), log_dir=None),
        DistillationConfig(temperature=1.0, hard_label_weight=0.5), model_T=model_T,
        model_S=student, lm_config=lm_config)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    with distiller:
        distiller.train(optimizer, loader, num_epochs=2)
    return student.state_dict()


def test_the_reverse_kl_against_cached_rows_is_the_live_top_k_teachers(tmp_path):
    """The distiller takes the configured divergence against cached rows (it used to swap
    in the forward KL): training from a top-k source with the bucketed reverse KL equals
    training against the live teacher cut to its top k, and differs from the forward KL."""
    teacher = _model(0).eval()
    config = LMDistillationConfig(divergence="reverse_kl", topk=4, topk_tail="bucket",
                                  path="dense")
    live = _train(tmp_path, "live", teacher, pad_collate, config)
    sourced = _train(tmp_path, "source", None, TeacherSourceCollator(LocalTeacher(teacher, k=4)),
                     config)
    forward = _train(tmp_path, "forward", None,
                     TeacherSourceCollator(LocalTeacher(teacher, k=4)),
                     LMDistillationConfig(divergence="forward_kl", topk_tail="bucket",
                                          path="dense"))
    for key in live:
        torch.testing.assert_close(sourced[key], live[key], rtol=1e-6, atol=1e-7, msg=key)
    assert any(not torch.allclose(forward[key], live[key]) for key in live)


def test_one_step_against_cached_rows_is_the_loss_by_hand(tmp_path):
    """One SGD step of the distiller from cached rows = one step of a hand loop with
    token_distillation_loss(..., TopKTeacher, divergence='jsd', tail='bucket')."""
    teacher = _model(0).eval()
    batch = pad_collate(_data(3))
    rows = LocalTeacher(teacher, k=4).rows(batch, list(range(3)))
    config = LMDistillationConfig(divergence="jsd", beta=0.3, topk_tail="bucket", path="dense")
    collate = TeacherSourceCollator(LocalTeacher(teacher, k=4))
    student = _model(5, hidden=6)
    reference = _model(5, hidden=6)
    loader = torch.utils.data.DataLoader(_data(3), batch_size=3, collate_fn=collate)
    distiller = CausalLMDistiller(
        TrainingConfig(device="cpu", output_dir=str(tmp_path), log_dir=None),
        DistillationConfig(temperature=2.0, hard_label_weight=0.5), model_T=None,
        model_S=student, lm_config=config)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.5), loader, num_epochs=1)
    # by hand: predict token t+1 at position t; the rows are already in those positions
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = logits["logits"] if isinstance(logits, dict) else logits[0]
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    ids, logprobs = rows["topk_ids"][:, :-1], rows["topk_logprobs"][:, :-1]
    loss = token_distillation_loss(logits[:, :-1], TopKTeacher(ids, logprobs), labels,
                                   divergence="jsd", beta=0.3, tail="bucket", temperature=2.0,
                                   ce_weight=0.5)
    loss.backward()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter -= 0.5 * parameter.grad
    for (key, got), want in zip(student.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)


def test_the_distillers_refuse_what_a_top_k_teacher_cannot_give(tmp_path):
    def build(model_T, **options):
        return CausalLMDistiller(
            TrainingConfig(device="cpu", output_dir=str(tmp_path), log_dir=None),
            DistillationConfig(temperature=1.0), model_T=model_T, model_S=_model(1),
            lm_config=LMDistillationConfig(**options))
    with pytest.raises(ValueError, match=r"reverse_kl.*infinite.*LMDistillationConfig"
                                         r"\.topk_tail.*model_T is None"):
        build(None, divergence="reverse_kl")
    with pytest.raises(ValueError, match=r"divergence='taid' needs the teacher's full logits"
                                         r".*model_T is None"):
        build(None, divergence="taid")
    with pytest.raises(ValueError, match=r"divergence='akl' needs the teacher's full logits, "
                                         r"not a top-k teacher \(topk\)"):
        LMDistillationConfig(divergence="akl", topk=4)
    with pytest.raises(ValueError, match=r"skew_reverse_kl' with alpha=0.0.*infinite"):
        LMDistillationConfig(divergence="skew_reverse_kl", alpha=0.0, topk=4)
    with pytest.raises(ValueError, match=r"topk_tail must be one of \['renormalize', "
                                         r"'uniform', 'bucket'\]"):
        LMDistillationConfig(topk_tail="spread")
    build(None, divergence="reverse_kl", topk_tail="bucket")
    build(_model(0), divergence="reverse_kl")  # a full live teacher: no tail to guard
    # the cross-entropy alone needs no teacher at all, whatever the divergence says
    CausalLMDistiller(TrainingConfig(device="cpu", output_dir=str(tmp_path), log_dir=None),
                      DistillationConfig(temperature=1.0, kd_loss_weight=0), model_T=None,
                      model_S=_model(1), lm_config=LMDistillationConfig(divergence="taid"))


def test_a_live_teacher_with_cached_batches_refuses_an_objective_at_the_first(tmp_path):
    teacher = _model(0).eval()
    with pytest.raises(ValueError, match=r"divergence='akl' needs the teacher's full logits, "
                                         r"not a top-k teacher \(the batch's cached"):
        _train(tmp_path, "akl", teacher, TeacherSourceCollator(LocalTeacher(teacher, k=4)),
               LMDistillationConfig(divergence="akl", path="dense"))
