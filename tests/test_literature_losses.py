"""Losses from the KD literature (issue 8), each against its paper's formula.

Expected values are computed another way: pure-Python loops over rows, pairs and triplets
written from the papers' equations (or ``torch.distributions`` for VID), never by the
function under test. Special cases worked out by hand: the DKD decomposition
KL = TCKD + (1 − p_t^T)·NCKD, RKD / SP / PKT zero at S == T, AT invariant to a positive
per-example scale, DIST zero under an affine transform, BCE minimal at S == T, CRD's queue
bounded and FIFO. Every new loss passes ``torch.autograd.gradcheck`` in float64.
"""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import textbrewer  # noqa: F401  (fills the registries)
from textbrewer.losses import (CRDLoss, VIDLoss, attention_transfer_loss, bce_loss, cc_loss,
                               dist_loss, dkd_loss, fitnet_loss, kd_jsd_loss, kd_kl_loss,
                               kd_reverse_kl_loss, logit_standardization, pkt_loss,
                               rkd_angle_loss, rkd_distance_loss, sp_loss)
from textbrewer.registry import (KD_LOSSES, LOSS_MODULES, MATCH_LOSSES, PROJECTIONS,
                                 WEIGHT_SCHEDULERS, RegistryError)

DOUBLE = torch.float64
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def _randn(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=DOUBLE)


def _rand(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=generator, dtype=DOUBLE)


def _scalar(value):
    return torch.tensor(value, dtype=DOUBLE)


# ------------------------------------------------------------------ pure-Python helpers
def _softmax(row):
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    return [e / sum(exps) for e in exps]


def _rows(tensor):
    return tensor.reshape(-1, tensor.shape[-1]).tolist()


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _norm(a):
    return math.sqrt(_dot(a, a))


def _pearson(a, b):
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    a = [x - mean_a for x in a]
    b = [x - mean_b for x in b]
    return _dot(a, b) / (_norm(a) * _norm(b))


# ------------------------------------------------------------------ response references
def _ref_reverse_kl(logits_S, logits_T, taus):
    total = 0.0
    for s, t, tau in zip(_rows(logits_S), _rows(logits_T), taus):
        q, p = _softmax([x / tau for x in s]), _softmax([x / tau for x in t])
        total += tau ** 2 * _kl(q, p)
    return total / len(taus)


def _ref_jsd(logits_S, logits_T, taus):
    total = 0.0
    for s, t, tau in zip(_rows(logits_S), _rows(logits_T), taus):
        q, p = _softmax([x / tau for x in s]), _softmax([x / tau for x in t])
        m = [(a + b) / 2 for a, b in zip(p, q)]
        total += tau ** 2 * (0.5 * _kl(p, m) + 0.5 * _kl(q, m))
    return total / len(taus)


def _dkd_parts(s, t, label, tau):
    """TCKD and NCKD of one row, from the paper's definitions (Zhao et al., 2022, Eq. 1-4)."""
    p, q = _softmax([x / tau for x in t]), _softmax([x / tau for x in s])
    b_T, b_S = [p[label], 1 - p[label]], [q[label], 1 - q[label]]
    hat_T = [pc / (1 - p[label]) for c, pc in enumerate(p) if c != label]
    hat_S = [qc / (1 - q[label]) for c, qc in enumerate(q) if c != label]
    return _kl(b_T, b_S), _kl(hat_T, hat_S), p, q


def _ref_dkd(logits_S, logits_T, labels, taus, alpha, beta):
    total, count = 0.0, 0
    for s, t, label, tau in zip(_rows(logits_S), _rows(logits_T), labels, taus):
        if label < 0:
            continue
        tckd, nckd, _, _ = _dkd_parts(s, t, label, tau)
        total += tau ** 2 * (alpha * tckd + beta * nckd)
        count += 1
    return total / max(count, 1)


def _ref_dist(logits_S, logits_T, tau, beta, gamma):
    Y_S = [_softmax([x / tau for x in s]) for s in _rows(logits_S)]
    Y_T = [_softmax([x / tau for x in t]) for t in _rows(logits_T)]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(Y_S, Y_T)) / len(Y_S)
    columns = range(len(Y_S[0]))
    intra = 1 - sum(_pearson([row[c] for row in Y_S], [row[c] for row in Y_T])
                    for c in columns) / len(Y_S[0])
    return tau ** 2 * (beta * inter + gamma * intra)


def _ref_bce(logits_S, logits_T, taus):
    total, count = 0.0, 0
    for s, t, tau in zip(_rows(logits_S), _rows(logits_T), taus):
        for a, b in zip(s, t):
            target, prediction = _sigmoid(b / tau), _sigmoid(a / tau)
            total += -tau ** 2 * (target * math.log(prediction)
                                  + (1 - target) * math.log(1 - prediction))
            count += 1
    return total / count


def _zscore(row):
    mean = sum(row) / len(row)
    std = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))
    return [(x - mean) / std for x in row]


# ============================================================ reverse KL, JSD, BCE
@pytest.mark.parametrize("loss_fn, reference", [
    (kd_reverse_kl_loss, _ref_reverse_kl), (kd_jsd_loss, _ref_jsd), (bce_loss, _ref_bce)],
    ids=["reverse_kl", "jsd", "bce"])
class TestAgainstLoops:
    def test_2d_float_temperature(self, loss_fn, reference):
        logits_S, logits_T = _randn(4, 5, seed=1), _randn(4, 5, seed=2)
        assert_close(loss_fn(logits_S, logits_T, 3.0),
                     _scalar(reference(logits_S, logits_T, [3.0] * 4)))

    def test_3d_per_position_temperature(self, loss_fn, reference):
        logits_S, logits_T = _randn(2, 3, 4, seed=3), _randn(2, 3, 4, seed=4)
        taus = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.5, 4.0]], dtype=DOUBLE)
        assert_close(loss_fn(logits_S, logits_T, taus),
                     _scalar(reference(logits_S, logits_T, taus.flatten().tolist())))

    def test_wrong_temperature_shape_is_a_value_error(self, loss_fn, reference):
        with pytest.raises(ValueError, match="without the class dimension"):
            loss_fn(_randn(4, 5), _randn(4, 5), torch.ones(3, dtype=DOUBLE))


def test_reverse_kl_is_kl_with_the_sides_swapped():
    logits_S, logits_T = _randn(6, 4, seed=5), _randn(6, 4, seed=6)
    assert_close(kd_reverse_kl_loss(logits_S, logits_T, 2.0),
                 kd_kl_loss(logits_T, logits_S, 2.0))


def test_jsd_is_symmetric_and_bounded_by_tau_squared_ln2():
    logits_S, logits_T = _randn(6, 4, seed=7), _randn(6, 4, seed=8)
    assert_close(kd_jsd_loss(logits_S, logits_T, 2.0), kd_jsd_loss(logits_T, logits_S, 2.0))
    # disjoint supports: JSD = ln 2 exactly
    far_S = torch.tensor([[100.0, -100.0]], dtype=DOUBLE)
    far_T = torch.tensor([[-100.0, 100.0]], dtype=DOUBLE)
    assert_close(kd_jsd_loss(far_S, far_T, 1.0), _scalar(math.log(2)))
    assert kd_jsd_loss(far_S * 50, far_T * 50, 3.0) <= 9 * math.log(2) + 1e-9


def test_bce_is_minimal_at_the_teacher():
    logits_T = _randn(3, 4, seed=9)
    at_teacher = logits_T.clone().requires_grad_(True)
    loss = bce_loss(at_teacher, logits_T, 2.0)
    loss.backward()
    assert_close(at_teacher.grad, torch.zeros_like(logits_T))   # stationary point
    for seed in range(5):
        assert bce_loss(logits_T + 0.3 * _randn(3, 4, seed=seed), logits_T, 2.0) > loss
    # the minimum is the teacher's binary entropy per label, times τ²
    probs = torch.sigmoid(logits_T / 2)
    entropy = -(probs * probs.log() + (1 - probs) * (1 - probs).log()).mean()
    assert_close(loss.detach(), 4 * entropy)


def test_bce_treats_labels_independently_not_as_a_softmax():
    # a shift of one row's logits changes BCE (it would not change any softmax loss)
    logits_S, logits_T = _randn(2, 3, seed=10), _randn(2, 3, seed=11)
    assert not torch.allclose(bce_loss(logits_S + 1, logits_T), bce_loss(logits_S, logits_T))


# ============================================================ DKD
class TestDKD:
    def test_against_loop(self):
        logits_S, logits_T = _randn(5, 4, seed=1), _randn(5, 4, seed=2)
        labels = torch.tensor([0, 3, 1, 2, 3])
        expected = _ref_dkd(logits_S, logits_T, labels.tolist(), [2.0] * 5, 1.0, 8.0)
        assert_close(dkd_loss(logits_S, logits_T, 2.0, labels=labels), _scalar(expected))
        expected = _ref_dkd(logits_S, logits_T, labels.tolist(), [2.0] * 5, 0.5, 3.0)
        assert_close(dkd_loss(logits_S, logits_T, 2.0, labels=labels, alpha=0.5, beta=3.0),
                     _scalar(expected))

    def test_3d_with_per_position_temperature_and_ignored_labels(self):
        logits_S, logits_T = _randn(2, 3, 4, seed=3), _randn(2, 3, 4, seed=4)
        labels = torch.tensor([[0, 1, -100], [3, -100, 2]])
        taus = _rand(2, 3, seed=5) + 1
        expected = _ref_dkd(logits_S, logits_T, labels.flatten().tolist(),
                            taus.flatten().tolist(), 1.0, 8.0)
        assert_close(dkd_loss(logits_S, logits_T, taus, labels=labels), _scalar(expected))

    def test_all_labels_ignored_gives_zero(self):
        student = _randn(3, 4, seed=6).requires_grad_(True)
        loss = dkd_loss(student, _randn(3, 4, seed=7), 2.0, labels=torch.full((3,), -100))
        assert_close(loss, _scalar(0.0))
        loss.backward()
        assert torch.isfinite(student.grad).all()

    @pytest.mark.parametrize("seed", range(4))
    def test_kl_decomposes_into_tckd_plus_teacher_weighted_nckd(self, seed):
        """Per sample, KL(p^T ‖ p^S) = TCKD + (1 − p_t^T)·NCKD (Zhao et al., 2022, Eq. 5)."""
        logits_S, logits_T = _randn(1, 6, seed=seed), _randn(1, 6, seed=seed + 10)
        label, tau = seed % 6, 1.5
        labels = torch.tensor([label])
        tckd = dkd_loss(logits_S, logits_T, tau, labels=labels, alpha=1.0, beta=0.0) / tau ** 2
        nckd = dkd_loss(logits_S, logits_T, tau, labels=labels, alpha=0.0, beta=1.0) / tau ** 2
        p_T = F.softmax(logits_T / tau, dim=-1)[0, label]
        p_S = F.softmax(logits_S / tau, dim=-1)[0, label]
        kl = kd_kl_loss(logits_S, logits_T, tau) / tau ** 2
        assert_close(tckd + (1 - p_T) * nckd, kl)
        # it is the teacher's target probability, not the student's
        assert not torch.allclose(tckd + (1 - p_S) * nckd, kl)

    def test_zero_at_the_teacher_and_passes_gradients(self):
        logits_T = _randn(2, 3, 5, seed=8)
        labels = torch.tensor([[0, 4, 2], [1, 1, 3]])
        assert_close(dkd_loss(logits_T, logits_T, 2.0, labels=labels), _scalar(0.0))
        student = (logits_T + _randn(2, 3, 5, seed=9)).requires_grad_(True)
        loss = dkd_loss(student, logits_T, 2.0, labels=labels)
        assert loss > 0
        loss.backward()
        assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0

    def test_missing_labels_is_a_clear_value_error(self):
        with pytest.raises(ValueError, match="needs the gold labels"):
            KD_LOSSES["dkd"](_randn(2, 3), _randn(2, 3), 1.0)
        with pytest.raises(ValueError, match="3 labels .* for 2 rows"):
            dkd_loss(_randn(2, 3), _randn(2, 3), labels=torch.tensor([0, 1, 2]))

    def test_registry_forms_and_the_labels_parameter(self):
        logits_S, logits_T = _randn(4, 3, seed=10), _randn(4, 3, seed=11)
        labels = torch.tensor([0, 2, 1, 1])
        plain = KD_LOSSES.resolve("dkd")
        built = KD_LOSSES.resolve(["dkd", 2.0, 4.0])
        keyword = KD_LOSSES.resolve(["dkd", {"alpha": 2.0, "beta": 4.0}])
        for loss_fn in (plain, built, keyword):
            assert "labels" in inspect.signature(loss_fn).parameters
        assert_close(plain(logits_S, logits_T, 2.0, labels=labels),
                     dkd_loss(logits_S, logits_T, 2.0, labels=labels))
        expected = _scalar(_ref_dkd(logits_S, logits_T, labels.tolist(), [2.0] * 4, 2.0, 4.0))
        assert_close(built(logits_S, logits_T, 2.0, labels=labels), expected)
        assert_close(keyword(logits_S, logits_T, 2.0, labels=labels), expected)


# ============================================================ DIST
class TestDIST:
    @pytest.mark.parametrize("beta, gamma", [(1.0, 1.0), (2.0, 0.5)])
    def test_against_loop(self, beta, gamma):
        logits_S, logits_T = _randn(5, 4, seed=1), _randn(5, 4, seed=2)
        expected = _ref_dist(logits_S, logits_T, 2.0, beta, gamma)
        assert_close(dist_loss(logits_S, logits_T, 2.0, beta=beta, gamma=gamma),
                     _scalar(expected))
        assert_close(KD_LOSSES.resolve(["dist", beta, gamma])(logits_S, logits_T, 2.0),
                     _scalar(expected))

    def test_3d_logits_are_rows(self):
        logits_S, logits_T = _randn(2, 3, 4, seed=3), _randn(2, 3, 4, seed=4)
        assert_close(dist_loss(logits_S, logits_T, 1.5),
                     _scalar(_ref_dist(logits_S.reshape(6, 4), logits_T.reshape(6, 4),
                                       1.5, 1.0, 1.0)))

    def test_zero_when_logits_are_shifted_per_row(self):
        logits_T = _randn(5, 4, seed=5)
        shifts = _randn(5, 1, seed=6) * 10
        assert_close(dist_loss(logits_T + shifts, logits_T, 3.0), _scalar(0.0))

    def test_zero_when_probabilities_are_an_affine_transform_of_the_teacher(self):
        # Y_S = a·Y_T + (1 − a)/C (a positive scale and a shift, same for all rows): every
        # row and every column is an affine image of the teacher's, so both Pearson
        # correlations are 1 although the distributions differ.
        tau, classes = 2.0, 4
        logits_T = _randn(5, classes, seed=7)
        probs_S = 0.3 * F.softmax(logits_T / tau, dim=-1) + 0.7 / classes
        logits_S = tau * probs_S.log() + _randn(5, 1, seed=8)
        assert kd_kl_loss(logits_S, logits_T, tau) > 1e-3
        assert_close(dist_loss(logits_S, logits_T, tau), _scalar(0.0))

    def test_inter_class_term_ignores_a_per_row_affine_transform(self):
        tau, classes = 1.0, 4
        logits_T = _randn(5, classes, seed=9)
        scale = _rand(5, 1, seed=10) * 0.5 + 0.2
        probs_S = scale * F.softmax(logits_T / tau, dim=-1) + (1 - scale) / classes
        logits_S = tau * probs_S.log()
        inter_only = dist_loss(logits_S, logits_T, tau, beta=1.0, gamma=0.0)
        assert_close(inter_only, _scalar(0.0))
        assert dist_loss(logits_S, logits_T, tau, beta=0.0, gamma=1.0) > 1e-6


# ============================================================ logit standardisation
class TestLogitStandardization:
    def test_zscore_against_loop(self):
        logits = _randn(3, 5, seed=1)
        expected = torch.tensor([_zscore(row) for row in logits.tolist()], dtype=DOUBLE)
        assert_close(logit_standardization(logits), expected)

    def test_standardized_kl_is_kl_on_zscored_logits(self):
        logits_S, logits_T = _randn(2, 3, 5, seed=2), _randn(2, 3, 5, seed=3)
        z_S = torch.tensor([_zscore(r) for r in _rows(logits_S)], dtype=DOUBLE).reshape(2, 3, 5)
        z_T = torch.tensor([_zscore(r) for r in _rows(logits_T)], dtype=DOUBLE).reshape(2, 3, 5)
        expected = kd_kl_loss(z_S, z_T, 2.0)
        for spec in ("logit_std", ["logit_std", "kl"]):
            assert_close(KD_LOSSES.resolve(spec)(logits_S, logits_T, 2.0), expected)

    def test_invariant_to_a_positive_scale_and_shift_of_each_row(self):
        logits_S, logits_T = _randn(4, 5, seed=4), _randn(4, 5, seed=5)
        scale, shift = _rand(4, 1, seed=6) * 3 + 0.1, _randn(4, 1, seed=7)
        loss_fn = KD_LOSSES.resolve(["logit_std", "reverse_kl"])
        assert_close(loss_fn(logits_S * scale + shift, logits_T),
                     loss_fn(logits_S, logits_T))
        # whereas plain reverse KL changes
        assert not torch.allclose(kd_reverse_kl_loss(logits_S * scale + shift, logits_T, 1.0),
                                  kd_reverse_kl_loss(logits_S, logits_T, 1.0))

    def test_wraps_dkd_and_passes_labels(self):
        logits_S, logits_T = _randn(4, 5, seed=8), _randn(4, 5, seed=9)
        labels = torch.tensor([0, 1, 4, 2])
        loss_fn = KD_LOSSES.resolve(["logit_std", ["dkd", 1.0, 2.0]])
        assert "labels" in inspect.signature(loss_fn).parameters
        expected = dkd_loss(logit_standardization(logits_S), logit_standardization(logits_T),
                            2.0, labels=labels, alpha=1.0, beta=2.0)
        assert_close(loss_fn(logits_S, logits_T, 2.0, labels=labels), expected)

    def test_unknown_base_loss_is_a_registry_error(self):
        with pytest.raises(RegistryError, match="did you mean 'kl'"):
            KD_LOSSES.resolve(["logit_std", "kll"])

    def test_constant_row_gives_zeros_not_nan(self):
        logits = torch.ones(2, 4, dtype=DOUBLE, requires_grad=True)
        standardized = logit_standardization(logits)
        assert_close(standardized, torch.zeros(2, 4, dtype=DOUBLE))
        standardized.sum().backward()
        assert torch.isfinite(logits.grad).all()


# ============================================================ feature: FitNets, AT
class TestFitNet:
    def test_4d_is_the_mean_squared_error(self):
        feature_S, feature_T = _randn(2, 3, 4, 5, seed=1), _randn(2, 3, 4, 5, seed=2)
        expected = sum((a - b) ** 2 for a, b in zip(feature_S.flatten().tolist(),
                                                    feature_T.flatten().tolist())) / 120
        assert_close(fitnet_loss(feature_S, feature_T), _scalar(expected))

    def test_3d_masked_against_loop(self):
        feature_S, feature_T = _randn(2, 4, 3, seed=3), _randn(2, 4, 3, seed=4)
        total, count = 0.0, 0
        for b in range(2):
            for l in range(4):
                if MASK[b, l]:
                    total += sum((feature_S[b, l, d].item() - feature_T[b, l, d].item()) ** 2
                                 for d in range(3))
                    count += 3
        assert_close(fitnet_loss(feature_S, feature_T, MASK), _scalar(total / count))

    def test_4d_with_a_spatial_mask(self):
        feature_S, feature_T = _randn(2, 3, 2, 2, seed=5), _randn(2, 3, 2, 2, seed=6)
        spatial = torch.tensor([[[1, 0], [1, 1]], [[0, 0], [0, 1]]])
        keep = spatial.bool().unsqueeze(1).expand_as(feature_S)
        expected = (feature_S - feature_T)[keep].pow(2).mean()
        assert_close(fitnet_loss(feature_S, feature_T, spatial), expected)
        assert_close(fitnet_loss(feature_S, feature_T, spatial.reshape(2, 4)), expected)

    def test_with_the_conv1x1_regressor(self):
        torch.manual_seed(0)
        regressor = PROJECTIONS["conv1x1"](3, 5)
        assert isinstance(regressor[0], nn.Conv2d) and isinstance(regressor[1], nn.BatchNorm2d)
        feature_S, feature_T = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
        loss = fitnet_loss(regressor(feature_S), feature_T)
        loss.backward()
        assert regressor[0].weight.grad.abs().sum() > 0

    def test_shape_mismatch_names_the_projection(self):
        with pytest.raises(ValueError, match="conv1x1"):
            fitnet_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))


def _ref_at(feature_S, feature_T, mask=None):
    """Per example: q = Σ_c a_c² per position (masked), q / ‖q‖₂; mean of squared differences."""
    def maps(feature):
        result = []
        for n, example in enumerate(feature):
            if feature.dim() == 4:
                positions = example.flatten(1).t().tolist()          # (HW, C)
            else:
                positions = example.tolist()                        # (L, D)
            q = [sum(a * a for a in vector) for vector in positions]
            if mask is not None:
                q = [v * m for v, m in zip(q, mask[n])]
            norm = math.sqrt(sum(v * v for v in q)) or 1.0
            result.append([v / norm for v in q])
        return result

    total, count = 0.0, 0
    for n, (q_S, q_T) in enumerate(zip(maps(feature_S), maps(feature_T))):
        for j, (a, b) in enumerate(zip(q_S, q_T)):
            keep = 1 if mask is None else mask[n][j]
            total += keep * (a - b) ** 2
            count += keep
    return total / max(count, 1)


class TestAttentionTransfer:
    def test_4d_against_loop_with_different_channel_counts(self):
        feature_S, feature_T = _randn(2, 3, 4, 5, seed=1), _randn(2, 6, 4, 5, seed=2)
        assert_close(attention_transfer_loss(feature_S, feature_T),
                     _scalar(_ref_at(feature_S, feature_T)))

    def test_3d_masked_against_loop(self):
        feature_S, feature_T = _randn(2, 4, 3, seed=3), _randn(2, 4, 5, seed=4)
        assert_close(attention_transfer_loss(feature_S, feature_T, MASK),
                     _scalar(_ref_at(feature_S, feature_T, MASK.tolist())))

    def test_invariant_to_a_positive_per_example_scale(self):
        feature_S, feature_T = _randn(3, 2, 4, 4, seed=5), _randn(3, 4, 4, 4, seed=6)
        scale = (_rand(3, 1, 1, 1, seed=7) + 0.1) * 10
        expected = attention_transfer_loss(feature_S, feature_T)
        assert_close(attention_transfer_loss(feature_S * scale, feature_T), expected)
        assert_close(attention_transfer_loss(feature_S, feature_T * scale), expected)
        assert_close(attention_transfer_loss(feature_T * scale, feature_T), _scalar(0.0))

    def test_mismatched_positions_is_a_value_error(self):
        with pytest.raises(ValueError, match="positions"):
            attention_transfer_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))


# ============================================================ relation references
def _distance_matrix(samples):
    return [[_norm([a - b for a, b in zip(x, y)]) for y in samples] for x in samples]


def _ref_rkd_distance(samples_S, samples_T):
    def psi(samples):
        d = _distance_matrix(samples)
        m = len(samples)
        mean = sum(d[i][j] for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        return [[v / mean for v in row] for row in d]

    psi_S, psi_T = psi(samples_S), psi(samples_T)
    m = len(samples_S)
    return sum(_huber(psi_S[i][j] - psi_T[i][j]) for i in range(m) for j in range(m)) / m ** 2


def _ref_rkd_angle(samples_S, samples_T):
    def cosine(samples, i, j, k):
        e_ij = [a - b for a, b in zip(samples[j], samples[i])]
        e_ik = [a - b for a, b in zip(samples[k], samples[i])]
        if _norm(e_ij) == 0 or _norm(e_ik) == 0:
            return 0.0
        return _dot(e_ij, e_ik) / (_norm(e_ij) * _norm(e_ik))

    m = len(samples_S)
    total = sum(_huber(cosine(samples_S, i, j, k) - cosine(samples_T, i, j, k))
                for i in range(m) for j in range(m) for k in range(m))
    return total / m ** 3


def _ref_pkt(samples_S, samples_T):
    def conditionals(samples):
        m = len(samples)
        kernel = [[(_dot(samples[i], samples[j]) / (_norm(samples[i]) * _norm(samples[j]))
                    + 1) / 2 for j in range(m)] for i in range(m)]
        return [[kernel[i][j] / sum(kernel[i][k] for k in range(m) if k != i)
                 for j in range(m)] for i in range(m)]

    p, q = conditionals(samples_T), conditionals(samples_S)
    m = len(samples_S)
    return sum(p[i][j] * math.log(p[i][j] / q[i][j])
               for i in range(m) for j in range(m) if j != i) / m


def _ref_sp(samples_S, samples_T):
    def similarity(samples):
        gram = [[_dot(x, y) for y in samples] for x in samples]
        return [[v / _norm(row) for v in row] for row in gram]

    G_S, G_T = similarity(samples_S), similarity(samples_T)
    b = len(samples_S)
    return sum((G_T[i][j] - G_S[i][j]) ** 2 for i in range(b) for j in range(b)) / b ** 2


def _ref_cc(samples_S, samples_T, gamma=0.4, order=2):
    def correlation(samples):
        unit = [[v / _norm(x) for v in x] for x in samples]
        return [[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p)
                     * _dot(a, b) ** p for p in range(order + 1)) for b in unit] for a in unit]

    C_S, C_T = correlation(samples_S), correlation(samples_T)
    n = len(samples_S)
    return sum((C_S[i][j] - C_T[i][j]) ** 2 for i in range(n) for j in range(n)) / n ** 2


RELATION_CASES = [(rkd_distance_loss, _ref_rkd_distance), (rkd_angle_loss, _ref_rkd_angle),
                  (pkt_loss, _ref_pkt), (sp_loss, _ref_sp), (cc_loss, _ref_cc)]
RELATION_IDS = ["rkd_distance", "rkd_angle", "pkt", "sp", "cc"]


@pytest.mark.parametrize("loss_fn, reference", RELATION_CASES, ids=RELATION_IDS)
class TestRelationLosses:
    def test_2d_against_loop_with_different_widths(self, loss_fn, reference):
        feature_S, feature_T = _randn(5, 3, seed=1), _randn(5, 7, seed=2)
        assert_close(loss_fn(feature_S, feature_T),
                     _scalar(reference(feature_S.tolist(), feature_T.tolist())))

    def test_3d_flattens_tokens_and_the_mask_keeps_tokens(self, loss_fn, reference):
        feature_S, feature_T = _randn(2, 4, 3, seed=3), _randn(2, 4, 5, seed=4)
        keep = MASK.bool()
        expected = reference(feature_S[keep].tolist(), feature_T[keep].tolist())
        assert_close(loss_fn(feature_S, feature_T, MASK), _scalar(expected))
        expected = reference(feature_S.reshape(8, 3).tolist(), feature_T.reshape(8, 5).tolist())
        assert_close(loss_fn(feature_S, feature_T), _scalar(expected))

    def test_4d_maps_are_flattened_per_example(self, loss_fn, reference):
        feature_S, feature_T = _randn(4, 2, 3, 3, seed=5), _randn(4, 3, 2, 2, seed=6)
        expected = reference(feature_S.reshape(4, -1).tolist(), feature_T.reshape(4, -1).tolist())
        assert_close(loss_fn(feature_S, feature_T), _scalar(expected))

    def test_sample_mask_on_2d(self, loss_fn, reference):
        feature_S, feature_T = _randn(5, 3, seed=7), _randn(5, 4, seed=8)
        keep = torch.tensor([1, 0, 1, 1, 1])
        expected = reference(feature_S[keep.bool()].tolist(), feature_T[keep.bool()].tolist())
        assert_close(loss_fn(feature_S, feature_T, keep), _scalar(expected))

    def test_zero_for_identical_embeddings(self, loss_fn, reference):
        feature = _randn(6, 4, seed=9)
        assert_close(loss_fn(feature, feature), _scalar(0.0))
        assert_close(loss_fn(feature.reshape(2, 3, 4), feature.reshape(2, 3, 4),
                             torch.tensor([[1, 1, 0], [1, 0, 1]])), _scalar(0.0))

    def test_all_masked_gives_zero_and_finite_gradients(self, loss_fn, reference):
        student = _randn(2, 4, 3, seed=10).requires_grad_(True)
        loss = loss_fn(student, _randn(2, 4, 5, seed=11), torch.zeros(2, 4))
        assert_close(loss, _scalar(0.0))
        loss.backward()
        assert torch.isfinite(student.grad).all()

    def test_different_sample_counts_is_a_value_error(self, loss_fn, reference):
        with pytest.raises(ValueError, match="different numbers of samples"):
            loss_fn(torch.zeros(4, 3), torch.zeros(5, 3))

    def test_wrong_mask_shape_is_a_value_error(self, loss_fn, reference):
        with pytest.raises(ValueError, match="does not fit"):
            loss_fn(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.ones(2, 5))


@pytest.mark.parametrize("loss_fn", [rkd_distance_loss, rkd_angle_loss, sp_loss, cc_loss,
                                     pkt_loss], ids=RELATION_IDS[:2] + ["sp", "cc", "pkt"])
def test_relation_losses_ignore_a_global_scale_of_the_student(loss_fn):
    # RKD normalises distances by their mean, angles are scale-free, SP / CC / PKT use
    # normalised similarities: a uniform positive scale of all embeddings changes nothing.
    feature = _randn(5, 4, seed=12)
    assert_close(loss_fn(feature * 3.7, feature), _scalar(0.0))


def test_rkd_distance_huber_switches_to_linear_beyond_one():
    # two 1-D samples and a third: distances S = [1, 1, 2] pattern vs T collapsed
    samples_S = torch.tensor([[0.0], [1.0], [10.0]], dtype=DOUBLE)
    samples_T = torch.tensor([[0.0], [1.0], [2.0]], dtype=DOUBLE)
    assert_close(rkd_distance_loss(samples_S, samples_T),
                 _scalar(_ref_rkd_distance(samples_S.tolist(), samples_T.tolist())))


def test_cc_taylor_expansion_tends_to_the_gaussian_rbf():
    feature_S, feature_T = _randn(4, 3, seed=13), _randn(4, 5, seed=14)
    gamma = 0.4

    def rbf(samples):
        unit = F.normalize(samples, dim=-1)
        return torch.exp(-gamma * torch.cdist(unit, unit) ** 2)

    expected = (rbf(feature_S) - rbf(feature_T)).pow(2).mean()
    assert_close(cc_loss(feature_S, feature_T, gamma=gamma, order=20), expected)


# ============================================================ gradcheck
def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "dist", "logit_std", "bce"])
def test_gradcheck_response(name):
    loss_fn = KD_LOSSES[name]
    logits_S = _randn(3, 4, seed=1).requires_grad_(True)
    logits_T = _randn(3, 4, seed=2).requires_grad_(True)
    _gradcheck(lambda s, t: loss_fn(s, t, 2.0), logits_S, logits_T)


def test_gradcheck_dkd():
    logits_S = _randn(3, 4, seed=1).requires_grad_(True)
    logits_T = _randn(3, 4, seed=2).requires_grad_(True)
    labels = torch.tensor([0, 3, -100])
    _gradcheck(lambda s, t: dkd_loss(s, t, 2.0, labels=labels), logits_S, logits_T)


@pytest.mark.parametrize("name", ["fitnet", "at", "rkd_distance", "rkd_angle", "pkt", "sp",
                                  "cc"])
@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
def test_gradcheck_match(name, use_mask):
    loss_fn = MATCH_LOSSES[name]
    feature_S = _randn(2, 4, 3, seed=3).requires_grad_(True)
    feature_T = _randn(2, 4, 3, seed=4).requires_grad_(True)
    mask = MASK if use_mask else None
    _gradcheck(lambda s, t: loss_fn(s, t, mask), feature_S, feature_T)


def test_gradcheck_at_on_maps():
    feature_S = _randn(2, 2, 3, 3, seed=5).requires_grad_(True)
    feature_T = _randn(2, 3, 3, 3, seed=6).requires_grad_(True)
    _gradcheck(attention_transfer_loss, feature_S, feature_T)


def test_gradcheck_vid_and_crd():
    torch.manual_seed(0)
    vid = VIDLoss(3, 4, hidden_dim=5).double()
    feature_S = _randn(2, 3, 2, 2, seed=7).requires_grad_(True)
    feature_T = _randn(2, 4, 2, 2, seed=8).requires_grad_(True)
    _gradcheck(vid, feature_S, feature_T)
    crd = CRDLoss(3, 4, feat_dim=5, queue_size=6).double().eval()
    crd.enqueue(F.normalize(_randn(4, 5, seed=9), dim=-1))
    _gradcheck(crd, _randn(3, 3, seed=10).requires_grad_(True),
               _randn(3, 4, seed=11).requires_grad_(True))


# ============================================================ VID
class TestVID:
    def test_is_the_gaussian_negative_log_likelihood(self):
        torch.manual_seed(0)
        vid = VIDLoss(3, 4).double()
        with torch.no_grad():
            vid.log_scale.copy_(_randn(4, seed=1))
        feature_S, feature_T = _randn(2, 3, 2, 2, seed=2), _randn(2, 4, 2, 2, seed=3)
        mean = vid.regressor(feature_S.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        std = (F.softplus(vid.log_scale) + vid.eps).sqrt().view(1, 4, 1, 1)
        log_prob = torch.distributions.Normal(mean, std).log_prob(feature_T)
        expected = (-log_prob - 0.5 * math.log(2 * math.pi)).mean()
        assert_close(vid(feature_S, feature_T), expected)

    def test_initial_variance_and_registry(self):
        vid = LOSS_MODULES["vid"](3, 4, init_variance=5.0)
        assert isinstance(vid, VIDLoss)
        assert_close(vid.variance(), torch.full((4,), 5.0))

    def test_3d_masked_against_loop(self):
        torch.manual_seed(1)
        vid = VIDLoss(3, 2).double()
        feature_S, feature_T = _randn(2, 4, 3, seed=4), _randn(2, 4, 2, seed=5)
        mean = vid.regressor(feature_S).tolist()
        variance = vid.variance().tolist()
        total, count = 0.0, 0
        for b in range(2):
            for l in range(4):
                if not MASK[b, l]:
                    continue
                for c in range(2):
                    total += 0.5 * ((mean[b][l][c] - feature_T[b, l, c].item()) ** 2
                                    / variance[c] + math.log(variance[c]))
                    count += 1
        assert_close(vid(feature_S, feature_T, MASK), _scalar(total / count))
        assert_close(vid(feature_S, feature_T, torch.zeros(2, 4)), _scalar(0.0))

    def test_student_map_is_pooled_to_the_teacher_size(self):
        vid = VIDLoss(3, 4)
        loss = vid(torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4))
        assert loss.dim() == 0 and torch.isfinite(loss)

    def test_trains_regressor_and_variance(self):
        vid = VIDLoss(3, 4)
        vid(torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2)).backward()
        assert vid.log_scale.grad.abs().sum() > 0
        assert all(p.grad is not None for p in vid.regressor.parameters())


# ============================================================ CRD
def _ref_crd(student, teacher, queue, tau):
    """InfoNCE per anchor: positive t_i, negatives t_j (j ≠ i) and the queue."""
    S, T, Q = student.tolist(), teacher.tolist(), queue.tolist()
    total = 0.0
    for i, s in enumerate(S):
        positive = math.exp(_dot(s, T[i]) / tau)
        denominator = sum(math.exp(_dot(s, t) / tau) for t in T) \
            + sum(math.exp(_dot(s, q) / tau) for q in Q)
        total += -math.log(positive / denominator)
    return total / len(S)


class TestCRD:
    def _module(self, **options):
        torch.manual_seed(0)
        return CRDLoss(3, 4, feat_dim=5, temperature=0.5, **options).double()

    def test_against_loop_with_an_empty_then_filled_queue(self):
        crd = self._module(queue_size=6)
        feature_S, feature_T = _randn(4, 3, seed=1), _randn(4, 4, seed=2)
        student, teacher = crd.embed(feature_S, feature_T)
        loss = crd(feature_S, feature_T)
        assert_close(loss, _scalar(_ref_crd(student, teacher, torch.zeros(0, 5), 0.5)))
        queued = crd.negatives()
        assert_close(queued, teacher.detach())
        feature_S, feature_T = _randn(4, 3, seed=3), _randn(4, 4, seed=4)
        student, teacher = crd.embed(feature_S, feature_T)
        assert_close(crd(feature_S, feature_T),
                     _scalar(_ref_crd(student, teacher, queued, 0.5)))

    def test_queue_is_bounded_and_fifo(self):
        crd = self._module(queue_size=5)
        seen = []
        for step in range(6):
            feature_S, feature_T = _randn(3, 3, seed=step), _randn(3, 4, seed=step + 50)
            crd(feature_S, feature_T)
            seen.append(crd.embed(feature_S, feature_T)[1].detach())
            assert crd.queue.shape == (5, 5)
            assert int(crd.queue_length) == min(3 * (step + 1), 5)
            expected = torch.cat(seen)[-5:]
            assert_close(crd.negatives(), expected)

    def test_a_batch_larger_than_the_queue_keeps_its_last_k(self):
        crd = self._module(queue_size=2)
        embeddings = F.normalize(_randn(5, 5, seed=1), dim=-1)
        crd.enqueue(embeddings)
        assert_close(crd.negatives(), embeddings[-2:])

    def test_eval_mode_does_not_enqueue(self):
        crd = self._module(queue_size=4).eval()
        crd(_randn(3, 3, seed=1), _randn(3, 4, seed=2))
        assert int(crd.queue_length) == 0

    def test_state_dict_carries_the_queue_for_exact_resume(self):
        batches = [(_randn(3, 3, seed=s), _randn(3, 4, seed=s + 9)) for s in range(4)]
        first = self._module(queue_size=4)
        for feature_S, feature_T in batches[:2]:
            first(feature_S, feature_T)
        state = first.state_dict()
        assert {"queue", "queue_pointer", "queue_length"} <= set(state)
        resumed = CRDLoss(3, 4, feat_dim=5, temperature=0.5, queue_size=4).double()
        resumed.load_state_dict(state)
        for feature_S, feature_T in batches[2:]:
            assert_close(resumed(feature_S, feature_T), first(feature_S, feature_T))
        assert_close(resumed.negatives(), first.negatives())

    def test_masked_3d_pools_and_skips_empty_examples(self):
        crd = self._module(queue_size=8)
        feature_S, feature_T = _randn(3, 4, 3, seed=5), _randn(3, 4, 4, seed=6)
        mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
        student, teacher = crd.embed(feature_S, feature_T, mask)
        keep = [0, 2]
        expected = _ref_crd(student[keep], teacher[keep], torch.zeros(0, 5), 0.5)
        assert_close(crd(feature_S, feature_T, mask), _scalar(expected))
        assert int(crd.queue_length) == 2
        pooled = (feature_S[0, :2].mean(dim=0))
        assert_close(student[0], F.normalize(crd.embed_S(pooled), dim=-1))

    def test_all_masked_gives_zero_and_enqueues_nothing(self):
        crd = self._module(queue_size=8)
        feature_S = _randn(2, 4, 3, seed=7).requires_grad_(True)
        loss = crd(feature_S, _randn(2, 4, 4, seed=8), torch.zeros(2, 4))
        assert_close(loss, _scalar(0.0))
        loss.backward()
        assert torch.isfinite(feature_S.grad).all()
        assert int(crd.queue_length) == 0

    def test_trains_both_heads_and_is_registered(self):
        crd = LOSS_MODULES["crd"](3, 4, feat_dim=5, queue_size=4)
        crd(torch.randn(4, 3), torch.randn(4, 4)).backward()
        assert crd.embed_S.weight.grad.abs().sum() > 0
        assert crd.embed_T.weight.grad.abs().sum() > 0
        assert crd.queue.grad is None and not crd.queue.requires_grad


# ============================================================ schedules, registry
@pytest.mark.parametrize("progress, expected", [(0.0, 0.0), (0.1, 0.5), (0.2, 1.0), (0.7, 1.0),
                                                (1.0, 1.0)])
def test_warmup_weight_schedule(progress, expected):
    schedule = WEIGHT_SCHEDULERS.resolve(["warmup", 0.2])
    assert schedule(progress) == pytest.approx(expected)


def test_warmup_needs_its_fraction():
    assert WEIGHT_SCHEDULERS.is_builder("warmup")
    with pytest.raises(RegistryError, match="takes parameters"):
        WEIGHT_SCHEDULERS.resolve("warmup")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        WEIGHT_SCHEDULERS.resolve(["warmup", 0])


def test_registered_names():
    assert {"reverse_kl", "jsd", "dkd", "dist", "logit_std", "bce"} <= set(KD_LOSSES)
    assert {"fitnet", "at", "rkd_distance", "rkd_angle", "pkt", "sp", "cc"} <= set(MATCH_LOSSES)
    assert {"vid", "crd"} <= set(LOSS_MODULES)
    assert "conv1x1" in PROJECTIONS and "warmup" in WEIGHT_SCHEDULERS


def test_dkd_and_dist_accept_their_configured_forms():
    from textbrewer.configurations import DistillationConfig
    for spec in ("dkd", ["dkd", 1.0, 8.0], ["dist", 2.0, 2.0], ["logit_std", "kl"]):
        DistillationConfig(kd_loss_type=spec)
