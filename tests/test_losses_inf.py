"""-inf in the inputs of every registered loss (issue 14): masked classes in logits, masked
scores in attention maps, garbage in hidden states.

The reference is always computed another way: a KD loss on logits whose masked columns are
-inf on both sides is compared with the same loss on the logits with those columns removed
(values, and gradients wrt the student's logits: equal on the kept columns, exactly 0 on the
masked ones), in float32 and bfloat16, with ordinary and with ±1e4 logits. Attention
losses are compared with the same loss on the unmasked part of the map. Hidden-state losses
must say which loss and which side hold the non-finite values. Parametrised over the
registries, so a loss registered later is checked the day it lands.
"""
import inspect
import math

import pytest
import torch
from torch.testing import assert_close

import textbrewer  # noqa: F401  (fills the registries)
from textbrewer.losses import _masking, kd_jsd_loss, kd_reverse_kl_loss, token
from textbrewer.registry import KD_LOSSES, LOSS_MODULES, MATCH_LOSSES, TOKEN_LOSSES

INF = float("-inf")
MASKED = [1, 5]                 # masked classes of a (…, 6) batch
KEPT = [0, 2, 3, 4]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ELEMENTWISE = {"mse", "bce"}    # -inf teacher entries are left out of the mean
ROWWISE = {"ce", "kl", "reverse_kl", "jsd", "dkd", "logit_std", "bce"}  # mean of per-row terms


@pytest.fixture(autouse=True, params=["plain_first", "guarded"])
def path(request, monkeypatch):
    """Every test twice: as on the CPU (the plain formula first, the guarded one when that is
    not finite) and as on an accelerator (the guarded formula always)."""
    monkeypatch.setattr(_masking, "PLAIN_FIRST_ON_CPU", request.param == "plain_first")
    return request.param


def _randn(*shape, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def _needs_labels(loss_fn):
    return "labels" in inspect.signature(loss_fn).parameters


def _tolerance(dtype, reference):
    """Absolute and relative tolerance: tight in float32, bf16's 8 bits otherwise."""
    rtol = 1e-5 if dtype == torch.float32 else 3e-2
    size = float(reference.detach().double().abs().max()) if reference.numel() else 0.0
    return dict(rtol=rtol, atol=rtol * max(1.0, size))


def _value_and_grad(loss_fn, logits_S, logits_T, *args, **kwargs):
    student = logits_S.detach().clone().requires_grad_(True)
    loss = loss_fn(student, logits_T, *args, **kwargs)
    loss.backward()
    return loss.detach(), student.grad


def _masked_batch(shape, dtype, scale, seed, student_masked=True):
    """(student, teacher) logits with -inf in the MASKED columns (the student's too, or not),
    and the same logits with those columns removed."""
    teacher = _randn(*shape, seed=seed, scale=scale)
    student = teacher + _randn(*shape, seed=seed + 1, scale=scale)
    full_T, full_S = teacher.clone(), student.clone()
    full_T[..., MASKED] = INF
    if student_masked:
        full_S[..., MASKED] = INF
    return (full_S.to(dtype), full_T.to(dtype), student[..., KEPT].to(dtype),
            teacher[..., KEPT].to(dtype))


def _labels(shape, seed):
    """Gold classes among the kept ones: (full-width labels, the same in the kept columns)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, len(KEPT), shape[:-1], generator=generator)
    return torch.tensor(KEPT)[index], index


# ============================================================ every registered KD loss
@pytest.mark.parametrize("name", KD_LOSSES.names())
class TestEveryKDLossOnMaskedClasses:
    @pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
    @pytest.mark.parametrize("scale", [1.0, 1e4], ids=["logits", "large_logits"])
    @pytest.mark.parametrize("shape, temperature", [((4, 6), 2.0), ((2, 3, 6), 1.0),
                                                    ((4, 6), "per_row")],
                             ids=["2d", "3d", "per_row_tau"])
    def test_equals_the_loss_without_the_masked_columns(self, name, dtype, scale, shape,
                                                        temperature):
        loss_fn = KD_LOSSES[name]
        full_S, full_T, sub_S, sub_T = _masked_batch(shape, dtype, scale, seed=3)
        tau = 1 + torch.rand(shape[:-1], generator=torch.Generator().manual_seed(5)) \
            if temperature == "per_row" else temperature
        full_extra, sub_extra = {}, {}
        if _needs_labels(loss_fn):
            full_labels, sub_labels = _labels(shape, seed=7)
            full_extra, sub_extra = {"labels": full_labels}, {"labels": sub_labels}
        loss, grad = _value_and_grad(loss_fn, full_S, full_T, tau, **full_extra)
        expected, expected_grad = _value_and_grad(loss_fn, sub_S, sub_T, tau, **sub_extra)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert_close(loss.double(), expected.double(), **_tolerance(dtype, expected))
        assert_close(grad[..., KEPT].double(), expected_grad.double(),
                     **_tolerance(dtype, expected_grad))
        assert (grad[..., MASKED] == 0).all()

    def test_teacher_masked_alone_is_finite_or_a_clear_error(self, name):
        """The student finite where the teacher is -inf: finite (the KL-type losses push the
        student's mass off those classes), except reverse KL, infinite by definition there,
        which says so."""
        loss_fn = KD_LOSSES[name]
        full_S, full_T, sub_S, sub_T = _masked_batch((4, 6), torch.float32, 1.0, seed=11,
                                                     student_masked=False)
        extra = {"labels": _labels((4, 6), seed=12)[0]} if _needs_labels(loss_fn) else {}
        if name == "reverse_kl":  # KL(q‖p) is infinite there: an error that says what to do
            with pytest.raises(ValueError, match=r"^reverse_kl: the teacher's logits are -inf "
                                                 r"\(a masked class\) at 8 entries where the "
                                                 r"student's are finite.*Mask the student's"):
                loss_fn(full_S, full_T, 2.0)
            return
        loss, grad = _value_and_grad(loss_fn, full_S, full_T, 2.0, **extra)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        if name in ELEMENTWISE:  # the student's entries there are left out entirely
            assert_close(loss, loss_fn(sub_S, sub_T, 2.0))
            assert (grad[..., MASKED] == 0).all()
        elif name in ("ce", "kl", "jsd", "dkd"):  # mass on a masked class costs: pushed off
            assert (grad[..., MASKED] > 0).all()

    def test_per_row_masks_equal_row_by_row_losses(self, name):
        """A label mask written as -inf: different classes masked in different rows."""
        loss_fn = KD_LOSSES[name]
        teacher = _randn(4, 6, seed=21).float()
        student = (teacher + _randn(4, 6, seed=22).float())
        row_masks = [[1], [0, 5], [2, 3, 4], []]
        full_S, full_T = student.clone(), teacher.clone()
        for row, masked in enumerate(row_masks):
            full_S[row, masked] = INF
            full_T[row, masked] = INF
        labels = torch.tensor([0, 1, 5, 3])
        extra = {"labels": labels} if _needs_labels(loss_fn) else {}
        loss, grad = _value_and_grad(loss_fn, full_S, full_T, 2.0, **extra)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert (grad[torch.isinf(full_S)] == 0).all()
        if name not in ROWWISE:
            return
        per_row = []
        for row, masked in enumerate(row_masks):
            kept = [c for c in range(6) if c not in masked]
            row_extra = {"labels": torch.tensor([kept.index(int(labels[row]))])} if extra \
                else {}
            per_row.append(loss_fn(student[row:row + 1, kept], teacher[row:row + 1, kept], 2.0,
                                   **row_extra))
        assert_close(loss, torch.stack(per_row).mean())

    def test_student_masked_where_the_teacher_has_mass_is_inf_or_finite_never_nan(self, name):
        loss_fn = KD_LOSSES[name]
        teacher = _randn(4, 6, seed=31).float()
        student = teacher + _randn(4, 6, seed=32).float()
        student[:, 2] = INF
        extra = {"labels": torch.tensor([0, 1, 3, 4])} if _needs_labels(loss_fn) else {}
        loss = loss_fn(student, teacher, 2.0, **extra)
        assert not torch.isnan(loss)
        if name in ("jsd", "dist"):  # bounded divergences / correlations
            assert torch.isfinite(loss)

    @pytest.mark.parametrize("temperature", [1.0, 4.0])
    def test_large_logits_in_float32_match_float64(self, name, temperature):
        """±1e4 logits, nothing masked: finite, and what float64 computes."""
        loss_fn = KD_LOSSES[name]
        teacher = _randn(4, 6, seed=41, scale=1e4)
        student = teacher + _randn(4, 6, seed=42, scale=1e4)
        extra = {"labels": torch.tensor([0, 1, 3, 4])} if _needs_labels(loss_fn) else {}
        loss, grad = _value_and_grad(loss_fn, student.float(), teacher.float(), temperature,
                                     **extra)
        expected, expected_grad = _value_and_grad(loss_fn, student, teacher, temperature,
                                                  **extra)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert_close(loss.double(), expected, rtol=1e-4, atol=1e-4 * max(1, float(expected)))
        assert_close(grad.double(), expected_grad, rtol=1e-3,
                     atol=1e-4 * max(1.0, float(expected_grad.abs().max())))


def test_the_issue_batch_is_finite_for_every_kd_loss_but_reverse_kl_which_says_why():
    """Issue 14's report: a (4, 6) batch whose last teacher column is -inf (the student's
    finite): NaN for kl, jsd, dkd, logit_std and inf for mse before."""
    teacher = _randn(4, 6, seed=0).float()
    teacher[:, -1] = INF
    student = _randn(4, 6, seed=1).float().requires_grad_(True)
    for name in KD_LOSSES.names():
        loss_fn = KD_LOSSES[name]
        extra = {"labels": torch.tensor([0, 1, 2, 3])} if _needs_labels(loss_fn) else {}
        if name == "reverse_kl":
            with pytest.raises(ValueError, match="^reverse_kl: "):
                loss_fn(student, teacher, 1.0)
            continue
        loss = loss_fn(student, teacher, 1.0, **extra)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss), name
        assert torch.isfinite(grad).all(), name


@pytest.mark.parametrize("spec", [["logit_std", "mse"], ["logit_std", "dist"],
                                  ["logit_std", ["dkd", 1.0, 2.0]], ["dkd", 2.0, 4.0],
                                  ["dist", 2.0, 0.5]], ids=str)
def test_builders_equal_the_loss_without_the_masked_columns(spec):
    loss_fn = KD_LOSSES.resolve(spec)
    full_S, full_T, sub_S, sub_T = _masked_batch((4, 6), torch.float32, 1.0, seed=51)
    full_extra, sub_extra = {}, {}
    if _needs_labels(loss_fn):
        full_labels, sub_labels = _labels((4, 6), seed=52)
        full_extra, sub_extra = {"labels": full_labels}, {"labels": sub_labels}
    loss, grad = _value_and_grad(loss_fn, full_S, full_T, 2.0, **full_extra)
    expected, expected_grad = _value_and_grad(loss_fn, sub_S, sub_T, 2.0, **sub_extra)
    assert_close(loss, expected)
    assert_close(grad[..., KEPT], expected_grad)
    assert (grad[..., MASKED] == 0).all()


def test_dkd_with_no_non_target_mass_is_finite():
    """Every class but the gold one masked (on both sides): TCKD and NCKD are 0, not NaN."""
    logits = _randn(3, 4, seed=61).float()
    masked = logits.clone()
    masked[:, 1:] = INF
    student = masked.clone().requires_grad_(True)
    loss = KD_LOSSES["dkd"](student, masked, 1.0, labels=torch.zeros(3, dtype=torch.long))
    loss.backward()
    assert loss == 0 and torch.isfinite(student.grad).all()


# ============================================================ unchanged on finite inputs
def test_finite_inputs_keep_the_previous_arithmetic_bit_for_bit(path):
    """The guards change nothing on finite logits: the previous formulas, written out (with
    ``path == 'guarded'``, this checks the guarded formulas themselves)."""
    import torch.nn.functional as F
    from textbrewer.losses import kd_ce_loss, kd_kl_loss, kd_mse_loss, logit_standardization
    for seed, scale in ((0, 1.0), (1, 30.0), (2, 1e4)):
        logits_T = _randn(2, 3, 7, seed=seed, scale=scale).float()
        logits_S = _randn(2, 3, 7, seed=seed + 10, scale=scale).float()
        log_p, log_q = F.log_softmax(logits_T / 2, -1), F.log_softmax(logits_S / 2, -1)
        ce = -(F.softmax(logits_T / 2, -1) * log_q).sum(-1).mean()
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * 4
        reverse = (log_q.exp() * (log_q - log_p)).sum(-1).mean() * 4
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2)
        jsd = (0.5 * (log_p.exp() * (log_p - log_m)).sum(-1)
               + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)).mean() * 4
        centred = logits_S - logits_S.mean(-1, keepdim=True)
        zscore = centred / ((centred * centred).sum(-1, keepdim=True) / 6).clamp(
            min=1e-14).sqrt()
        for ours, theirs in ((kd_ce_loss(logits_S, logits_T, 2), ce),
                             (kd_mse_loss(logits_S, logits_T, 2),
                              F.mse_loss(logits_S / 2, logits_T / 2)),
                             (kd_kl_loss(logits_S, logits_T, 2), kl),
                             (kd_reverse_kl_loss(logits_S, logits_T, 2), reverse),
                             (kd_jsd_loss(logits_S, logits_T, 2), jsd),
                             (logit_standardization(logits_S), zscore)):
            assert torch.equal(ours, theirs)


# ============================================================ token losses
@pytest.mark.parametrize("name", [n for n in TOKEN_LOSSES.names() if n != "topk_kl"])
@pytest.mark.parametrize("chunk_size", [None, 3], ids=["dense", "chunked"])
def test_token_losses_equal_the_loss_without_the_masked_columns(name, chunk_size):
    full_S, full_T, sub_S, sub_T = _masked_batch((2, 3, 6), torch.float32, 1.0, seed=71)
    loss_fn = TOKEN_LOSSES[name]
    loss, grad = _value_and_grad(loss_fn, full_S, full_T, chunk_size=chunk_size)
    expected, expected_grad = _value_and_grad(loss_fn, sub_S, sub_T, chunk_size=chunk_size)
    assert_close(loss, expected)
    assert_close(grad[..., KEPT], expected_grad)
    assert (grad[..., MASKED] == 0).all()


# ============================================================ attention match losses
ATTENTION = [name for name in MATCH_LOSSES.names() if name.startswith("attention")]


def _scores(seed, heads=2, length=4):
    return _randn(2, heads, length, length, seed=seed).float()


@pytest.mark.parametrize("name", ATTENTION)
class TestAttentionScoresMaskedWithInf:
    def test_padded_keys_with_a_mask_equal_the_unpadded_map(self, name):
        """Keys 3 padded (scores -inf on both sides) and dropped by the mask: the loss and
        its gradient are those of the 3×3 map without them."""
        teacher, student = _scores(1), _scores(2)
        full_T, full_S = teacher.clone(), student.clone()
        full_T[..., 3] = INF
        full_S[..., 3] = INF
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
        loss, grad = _value_and_grad(MATCH_LOSSES[name], full_S, full_T, mask)
        expected, expected_grad = _value_and_grad(MATCH_LOSSES[name], student[..., :3, :3],
                                                  teacher[..., :3, :3], torch.ones(2, 3))
        assert_close(loss, expected)
        assert_close(grad[..., :3, :3], expected_grad)
        assert (grad[..., 3] == 0).all() and (grad[..., 3, :] == 0).all()

    @pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
    def test_causal_inf_on_both_sides_adds_nothing(self, name, use_mask):
        """-inf above the diagonal on both sides (a causal mask) equals the same map with
        those entries at -1e30 (zero probability, finite), whose terms are 0 there."""
        teacher, student = _scores(3), _scores(4)
        future = torch.ones(4, 4, dtype=torch.bool).triu(1)
        mask = torch.ones(2, 4) if use_mask else None
        with_inf = _value_and_grad(MATCH_LOSSES[name], student.masked_fill(future, INF),
                                   teacher.masked_fill(future, INF), mask)
        if "mse" in name:  # both sides equal there: a difference of 0
            reference = (student.masked_fill(future, 0.0), teacher.masked_fill(future, 0.0))
        else:
            reference = (student.masked_fill(future, -1e30), teacher.masked_fill(future, -1e30))
        expected = _value_and_grad(MATCH_LOSSES[name], *reference, mask)
        assert torch.isfinite(with_inf[0]) and torch.isfinite(with_inf[1]).all()
        assert_close(with_inf[0], expected[0])
        if "sum" not in name and "mean" not in name:  # one head's gradient per entry
            assert (with_inf[1][..., future] == 0).all()
        assert_close(with_inf[1], expected[1])

    @pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
    def test_a_row_of_inf_only_is_finite(self, name, use_mask):
        """A query that attends to nothing (all its scores -inf, both sides)."""
        teacher, student = _scores(5), _scores(6)
        teacher[:, :, 3] = INF
        student[:, :, 3] = INF
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]) if use_mask else None
        loss, grad = _value_and_grad(MATCH_LOSSES[name], student, teacher, mask)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_inf_on_one_side_only_is_inf_or_finite_never_nan(name):
    """The student's score -inf where the teacher's is finite: an infinite error for the
    squared losses and where the teacher attends; the teacher's -inf alone is probability 0."""
    teacher, student = _scores(7), _scores(8)
    student_inf = student.clone()
    student_inf[..., 1] = INF
    teacher_inf = teacher.clone()
    teacher_inf[..., 1] = INF
    mask = torch.ones(2, 4)
    assert MATCH_LOSSES[name](student_inf, teacher, mask) == math.inf
    with_teacher_inf = MATCH_LOSSES[name](student, teacher_inf, mask)
    if "ce" in name:
        assert torch.isfinite(with_teacher_inf)
    else:
        assert with_teacher_inf == math.inf


# ============================================================ hidden-state match losses
FEATURES = [name for name in MATCH_LOSSES.names() if not name.startswith("attention")]
RELATION = {"fsp", "gram", "mmd", "nst", "mmd_normalized", "nst_normalized"}


def _features(name, seed):
    if name in RELATION:
        return [_randn(2, 4, 3, seed=seed).float(), _randn(2, 4, 3, seed=seed + 1).float()]
    return _randn(2, 4, 3, seed=seed).float()


def _poison(features, value):
    """A copy with one entry at ``value``, at position 0 (pkd only reads position 0)."""
    copy = [f.clone() for f in features] if isinstance(features, list) else features.clone()
    target = copy[0] if isinstance(copy, list) else copy
    target[1, 0, 2] = value
    return copy


@pytest.mark.parametrize("name", FEATURES)
class TestNonFiniteHiddenStatesAreAClearError:
    @pytest.mark.parametrize("value", [INF, math.inf], ids=["-inf", "inf"])
    @pytest.mark.parametrize("side", ["student", "teacher"])
    def test_the_error_names_the_loss_and_the_side(self, name, value, side):
        student, teacher = _features(name, 1), _features(name, 3)
        if side == "student":
            student = _poison(student, value)
        else:
            teacher = _poison(teacher, value)
        with pytest.raises(ValueError) as info:
            MATCH_LOSSES[name](student, teacher)
        message = str(info.value)
        assert message.startswith(name) or f"/{name}" in message.split(":")[0]
        assert f"the {side}'s features" in message
        assert f"contain {'-inf' if value < 0 else 'inf'} (1 of " in message
        assert "must be finite" in message

    def test_nan_is_left_to_the_training_loops_check(self, name):
        """A diverged model's NaN: no error here (the loop's non-finite check stops every
        process together), and the NaN is not hidden either."""
        student = _poison(_features(name, 1), math.nan)
        assert torch.isnan(MATCH_LOSSES[name](student, _features(name, 3)))

    def test_inf_at_a_masked_position_is_an_error_too(self, name):
        if name == "pkd":
            pytest.skip("pkd reads position 0 only")
        student, teacher = _features(name, 1), _features(name, 3)
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
        target = teacher[0] if isinstance(teacher, list) else teacher
        target[1, 3] = INF  # example 1, padded position 3
        with pytest.raises(ValueError, match="padded positions included"):
            MATCH_LOSSES[name](student, teacher, mask)


def test_pkd_ignores_inf_beyond_position_zero():
    student, teacher = _randn(2, 4, 3, seed=1).float(), _randn(2, 4, 3, seed=2).float()
    teacher[:, 2] = INF
    assert torch.isfinite(MATCH_LOSSES["pkd"](student, teacher))


@pytest.mark.parametrize("name", LOSS_MODULES.names())
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_loss_modules_name_themselves_and_the_side(name, side):
    torch.manual_seed(0)  # (VID's ReLUs could turn the student's -inf into a finite loss)
    module = LOSS_MODULES[name](3, 5)
    student, teacher = _randn(4, 3, seed=1).float(), _randn(4, 5, seed=2).float()
    (student if side == "student" else teacher)[2, 1] = INF
    with pytest.raises(ValueError, match=rf"^{name}: the {side}'s features contain -inf"):
        module(student, teacher)
    if name == "crd":  # nothing non-finite entered the negative queue
        assert int(module.queue_length) == 0


# ============================================================ names (issue 14, item 3)
def test_response_and_token_losses_have_distinct_names_and_documented_aliases():
    from textbrewer import losses
    assert KD_LOSSES["jsd"] is losses.kd_jsd_loss
    assert KD_LOSSES["reverse_kl"] is losses.kd_reverse_kl_loss
    assert TOKEN_LOSSES["jsd"] is token.token_jsd_loss
    assert TOKEN_LOSSES["reverse_kl"] is token.token_reverse_kl_loss
    for alias, target in ((losses.jsd_loss, "kd_jsd_loss"),
                          (losses.reverse_kl_loss, "kd_reverse_kl_loss"),
                          (token.jsd_loss, "token_jsd_loss"),
                          (token.reverse_kl_loss, "token_reverse_kl_loss")):
        assert inspect.getdoc(alias).startswith(f"Alias of :func:`{target}`")
        assert "Kept because" in inspect.getdoc(alias)
    logits_S, logits_T = _randn(4, 6, seed=1), _randn(4, 6, seed=2)
    assert torch.equal(losses.jsd_loss(logits_S, logits_T, 2.0),
                       losses.kd_jsd_loss(logits_S, logits_T, 2.0))
    assert torch.equal(losses.reverse_kl_loss(logits_S, logits_T, 2.0),
                       losses.kd_reverse_kl_loss(logits_S, logits_T, 2.0))
    assert torch.equal(token.jsd_loss(logits_S, logits_T, beta=0.3),
                       token.token_jsd_loss(logits_S, logits_T, beta=0.3))
    assert torch.equal(token.reverse_kl_loss(logits_S, logits_T),
                       token.token_reverse_kl_loss(logits_S, logits_T))
    # the two conventions really differ: τ² and the β-JSD's weights
    assert not torch.allclose(losses.kd_reverse_kl_loss(logits_S, logits_T, 2.0),
                              token.token_reverse_kl_loss(logits_S, logits_T, temperature=2.0))
