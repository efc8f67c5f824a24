"""Relation-based losses: relations between two layers, compared across models.

Interface: ``loss([state_S_0, state_S_1], [state_T_0, state_T_1], mask=None)``, each state
(B, L, D). The student's and the teacher's widths may differ for the MMD/NST loss (the
relation matrices are L×L); for FSP/Gram they must agree (D×D), which a projection gives.

Features must be finite: every loss here raises a ``ValueError`` naming the loss and the
side when a -inf or inf feature makes the loss non-finite (one host sync per call; NaN is
left to the training loop's check; see ``finite_features`` in
``textbrewer/losses/_masking.py``).
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..registry import MATCH_LOSSES
from ._masking import as_weights, finite_features, safe_divide

__all__ = ["fsp_loss", "mmd_loss", "mmd_normalized_loss"]


def _two_layers(states: Sequence[torch.Tensor], side: str):
    if not isinstance(states, (list, tuple)) or len(states) != 2:
        raise ValueError(f"{side}: relation losses take a list of two layers' states, "
                         f"got {type(states).__name__}"
                         f"{'' if not isinstance(states, (list, tuple)) else f' of {len(states)}'}")
    return states


def _fsp_matrix(first: torch.Tensor, second: torch.Tensor,
                weights: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, L, D) × (B, L, D) -> (B, D, D) = firstᵀ·second / length."""
    if weights is None:
        return torch.bmm(first.transpose(1, 2), second) / second.size(1)
    weights = weights.unsqueeze(-1)
    lengths = weights.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.bmm((first * weights).transpose(1, 2), second * weights) / lengths


@MATCH_LOSSES.register("fsp")
@MATCH_LOSSES.register("gram")
def fsp_loss(state_S: Sequence[torch.Tensor], state_T: Sequence[torch.Tensor],
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flow-of-solution-procedure loss (Yim et al., 2017): MSE between Gram matrices.

    G = X0ᵀ·X1 / length, shape (B, D, D), for each side; loss = mse(G_S, G_T).

    Args:
        state_S: two student states, each (B, L, D).
        state_T: two teacher states, each (B, L, D) (same D as the student, after projection).
        mask: (B, L), 1 = keep; states are multiplied by it and each example's Gram matrix
            divided by its own length.

    Returns:
        Scalar tensor.
    """
    s0, s1 = _two_layers(state_S, "student")
    t0, t1 = _two_layers(state_T, "teacher")
    weights = as_weights(mask, s0)
    loss = F.mse_loss(_fsp_matrix(s0, s1, weights), _fsp_matrix(t0, t1, weights))
    return finite_features(loss, "fsp/gram", state_S, state_T)


def _masked_gram_mse(gram_S: torch.Tensor, gram_T: torch.Tensor,
                     mask: Optional[torch.Tensor]) -> torch.Tensor:
    """MSE between (B, L, L) relation matrices; with a mask, over kept (i, j) pairs / Σ_b len_b²."""
    if mask is None:
        return F.mse_loss(gram_S, gram_T)
    weights = as_weights(mask, gram_S)
    pair_weights = weights.unsqueeze(-1) * weights.unsqueeze(1)
    squared = (gram_S - gram_T).pow(2) * pair_weights
    return safe_divide(squared.sum(), pair_weights.sum())


def _token_gram(first: torch.Tensor, second: torch.Tensor, divisor: int) -> torch.Tensor:
    """(B, L, D) × (B, L, D) -> (B, L, L) = first·secondᵀ / divisor."""
    return torch.bmm(first, second.transpose(1, 2)) / divisor


@MATCH_LOSSES.register("mmd")
@MATCH_LOSSES.register("nst")
def mmd_loss(state_S: Sequence[torch.Tensor], state_T: Sequence[torch.Tensor],
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Neuron-selectivity-transfer style loss: MSE between token-similarity matrices,
    exactly as TextBrewer 0.2.1 computes it.

    Without a mask, G = X0·X1ᵀ / D (D is that side's width, so student and teacher widths
    may differ) and loss = mse(G_S, G_T). With a mask, TextBrewer 0.2.1 divides G by the
    length L instead of D, and the squared errors of kept (i, j) pairs are divided by
    Σ_b len_b². The published ``*_smmd`` recipes are tuned to that, so it is kept here;
    :func:`mmd_normalized_loss` (``'mmd_normalized'`` / ``'nst_normalized'``) divides by D
    in both cases (see docs/differences.md).

    Args:
        state_S: two student states, each (B, L, D_S).
        state_T: two teacher states, each (B, L, D_T).
        mask: (B, L), 1 = keep.

    Returns:
        Scalar tensor.
    """
    s0, s1 = _two_layers(state_S, "student")
    t0, t1 = _two_layers(state_T, "teacher")
    # 0.2.1's size(1) with a mask (the length), size(2) without (the width)
    divisor_dim = 2 if mask is None else 1
    loss = _masked_gram_mse(_token_gram(s0, s1, s1.size(divisor_dim)),
                            _token_gram(t0, t1, t1.size(divisor_dim)), mask)
    return finite_features(loss, "mmd/nst", state_S, state_T)


@MATCH_LOSSES.register("mmd_normalized")
@MATCH_LOSSES.register("nst_normalized")
def mmd_normalized_loss(state_S: Sequence[torch.Tensor], state_T: Sequence[torch.Tensor],
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """As :func:`mmd_loss`, with G = X0·X1ᵀ / D whether or not a mask is given.

    With a mask, :func:`mmd_loss` (TextBrewer 0.2.1) divides by the length L, which scales
    the term by (D/L)² relative to the unmasked one; this variant does not, so an all-ones
    mask gives the unmasked value.

    Args:
        state_S: two student states, each (B, L, D_S).
        state_T: two teacher states, each (B, L, D_T).
        mask: (B, L), 1 = keep; squared errors of kept (i, j) pairs / Σ_b len_b².

    Returns:
        Scalar tensor.
    """
    s0, s1 = _two_layers(state_S, "student")
    t0, t1 = _two_layers(state_T, "teacher")
    loss = _masked_gram_mse(_token_gram(s0, s1, s1.size(2)), _token_gram(t0, t1, t1.size(2)),
                            mask)
    return finite_features(loss, "mmd_normalized/nst_normalized", state_S, state_T)


# ============================================================================ literature
# Relations between samples (Park et al. 2019 and after). Interface:
# ``loss(feature_S, feature_T, mask=None)`` on ONE layer per side, and the samples are:
#
# - (N, D): the N rows (e.g. pooled or [CLS] embeddings); mask (N,) keeps samples;
# - (N, L, D): **flattened**: each of the N·L token states is a sample (relations among
#   all tokens of the batch); mask (N, L) drops padded tokens from every pair / triplet.
#   For sample-level relations of a transformer, have the adaptor return pooled (N, D)
#   states. Cost: O((N·L)²) memory (O((N·L)²·D) for 'rkd_angle').
# - (N, C, H, W): each example's map flattened to one vector (N, C·H·W), as in SP.
#
# Student and teacher widths may differ (the relation matrices are M×M, M = the number of
# samples). Masked samples get weight 0: an all-masked batch gives 0.

import math  # noqa: E402  (appended section)

__all__ += ["rkd_distance_loss", "rkd_angle_loss", "pkt_loss", "sp_loss", "cc_loss"]


def _samples(feature: torch.Tensor, mask: Optional[torch.Tensor], name: str, side: str):
    """-> ((M, D) samples, (M,) weights or None) under the conventions above."""
    if feature.dim() == 2:
        samples = feature
    elif feature.dim() == 3:
        samples = feature.reshape(-1, feature.size(-1))
    elif feature.dim() == 4:
        samples = feature.reshape(feature.size(0), -1)
    else:
        raise ValueError(f"{name}: {side} features must be (N, D), (N, L, D) or (N, C, H, W), "
                         f"got shape {tuple(feature.shape)}")
    if mask is None:
        return samples, None
    expected = tuple(feature.shape[:2]) if feature.dim() == 3 else (feature.size(0),)
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name}: a mask of shape {tuple(mask.shape)} does not fit {side} "
                         f"features {tuple(feature.shape)} (expected {expected})")
    return samples, as_weights(mask, samples).reshape(-1)


def _sample_pair(feature_S, feature_T, mask, name):
    samples_S, weights = _samples(feature_S, mask, name, "student")
    samples_T, _ = _samples(feature_T, None, name, "teacher")
    if samples_S.size(0) != samples_T.size(0):
        raise ValueError(f"{name}: student features {tuple(feature_S.shape)} and teacher "
                         f"features {tuple(feature_T.shape)} give different numbers of samples "
                         f"({samples_S.size(0)} and {samples_T.size(0)})")
    return samples_S, samples_T, weights


def _pair_weights(weights: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """(M,) sample weights (or None) -> (M, M) pair weights w_i·w_j."""
    if weights is None:
        return torch.ones_like(like)
    return weights.unsqueeze(1) * weights.unsqueeze(0)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return safe_divide((values * weights).sum(), weights.sum())


def _huber(difference: torch.Tensor) -> torch.Tensor:
    """Huber loss with δ = 1, elementwise (``F.smooth_l1_loss``, reduction='none')."""
    return F.smooth_l1_loss(difference, torch.zeros_like(difference), reduction="none")


_DISTANCE_EPS = 1e-12


def _distances(samples: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M, M) Euclidean distances, 0 on the diagonal.

    Through the Gram matrix (no (M, M, D) tensor); the squared distance is clamped at 1e-12
    before the square root, so coinciding samples pass finite gradients.
    """
    squares = (samples * samples).sum(dim=-1)
    squared = squares.unsqueeze(1) + squares.unsqueeze(0) - 2 * samples @ samples.t()
    off_diagonal = 1 - torch.eye(samples.size(0), dtype=samples.dtype, device=samples.device)
    return squared.clamp(min=_DISTANCE_EPS).sqrt() * off_diagonal


def _normalised_distances(samples: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """ψ_D = d_ij / μ, μ the mean distance over kept pairs i ≠ j."""
    distances = _distances(samples)
    off_diagonal = pairs * (1 - torch.eye(samples.size(0), dtype=pairs.dtype,
                                          device=pairs.device))
    mean = _weighted_mean(distances, off_diagonal).clamp(min=_DISTANCE_EPS)
    return distances / mean


@MATCH_LOSSES.register("rkd_distance")
def rkd_distance_loss(feature_S: torch.Tensor, feature_T: torch.Tensor,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RKD distance-wise loss (Park, Kim, Lu, Cho, 2019, arXiv:1904.05068).

    ``ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ`` with μ the mean distance over the pairs i ≠ j of
    the batch (each side normalised by its own μ, so the widths may differ);
    ``loss = mean_{i, j} huber(ψ_D(s_i, s_j) − ψ_D(t_i, t_j))`` with the Huber loss at
    δ = 1. The mean runs over all M² ordered pairs, i = j included (0 on both sides), as
    in the authors' code; the paper writes the sum. Samples: see the section comment
    (2-D rows, 3-D tokens flattened, 4-D maps flattened per example).

    Args:
        feature_S: (N, D_S), (N, L, D_S) or (N, C_S, H, W).
        feature_T: (N, D_T), (N, L, D_T) or (N, C_T, H, W), the same number of samples.
        mask: (N,) for 2-D/4-D features, (N, L) for 3-D, 1 = keep.

    Returns:
        Scalar tensor; 0 when the two sides' distances agree up to a scale.
    """
    samples_S, samples_T, weights = _sample_pair(feature_S, feature_T, mask, "rkd_distance")
    pairs = _pair_weights(weights, samples_S.new_empty(samples_S.size(0), samples_S.size(0)))
    difference = _normalised_distances(samples_S, pairs) - _normalised_distances(
        samples_T.to(samples_S.dtype), pairs)
    return finite_features(_weighted_mean(_huber(difference), pairs), "rkd_distance",
                           feature_S, feature_T)


def _angles(samples: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M, M, M): cos[i, j, k] = ⟨e_ij, e_ik⟩, e_ij = (x_j − x_i)/‖x_j − x_i‖.

    The vertex is i; a zero difference (j = i) normalises to 0, giving cos 0.
    """
    directions = F.normalize(samples.unsqueeze(0) - samples.unsqueeze(1), p=2.0, dim=-1)
    return torch.bmm(directions, directions.transpose(1, 2))


@MATCH_LOSSES.register("rkd_angle")
def rkd_angle_loss(feature_S: torch.Tensor, feature_T: torch.Tensor,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RKD angle-wise loss (Park, Kim, Lu, Cho, 2019, arXiv:1904.05068).

    ``ψ_A(t_i, t_j, t_k) = cos ∠t_j t_i t_k = ⟨e_ij, e_ik⟩``, ``e_ij = (t_j − t_i) /
    ‖t_j − t_i‖`` (vertex t_i); ``loss = mean_{i, j, k} huber(ψ_A(s) − ψ_A(t))``, δ = 1.
    The mean runs over all M³ ordered triplets, degenerate ones (j = i or k = i, cos 0 on
    both sides) included, as in the authors' code; the paper writes the sum. Memory is
    O(M²·D + M³): use it on pooled (N, D) embeddings, not on all tokens of a long batch.

    Args:
        feature_S: (N, D_S), (N, L, D_S) or (N, C_S, H, W).
        feature_T: (N, D_T), (N, L, D_T) or (N, C_T, H, W), the same number of samples.
        mask: (N,) for 2-D/4-D features, (N, L) for 3-D, 1 = keep; triplet weight
            w_i·w_j·w_k.

    Returns:
        Scalar tensor; 0 for identical embeddings.
    """
    samples_S, samples_T, weights = _sample_pair(feature_S, feature_T, mask, "rkd_angle")
    angles_S = _angles(samples_S)
    angles_T = _angles(samples_T.to(samples_S.dtype))
    if weights is None:
        triplets = torch.ones_like(angles_S)
    else:
        triplets = weights.view(-1, 1, 1) * weights.view(1, -1, 1) * weights.view(1, 1, -1)
    return finite_features(_weighted_mean(_huber(angles_S - angles_T), triplets), "rkd_angle",
                           feature_S, feature_T)


def _cosine_similarities(samples: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M, M) cosine similarities (a zero sample has similarity 0 to all)."""
    unit = F.normalize(samples, p=2.0, dim=-1)
    return unit @ unit.t()


def _pkt_conditionals(samples: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """P[i, j] = K(x_i, x_j) / Σ_{k ≠ i} K(x_i, x_k) for j ≠ i (0 on the diagonal),
    K = (cos + 1) / 2; ``columns`` (M, M) zeroes the diagonal and masked samples."""
    kernel = (_cosine_similarities(samples) + 1) / 2 * columns
    tiny = torch.finfo(kernel.dtype).tiny
    return kernel / kernel.sum(dim=-1, keepdim=True).clamp(min=tiny)


@MATCH_LOSSES.register("pkt")
def pkt_loss(feature_S: torch.Tensor, feature_T: torch.Tensor,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, 2018, arXiv:1803.10837).

    Cosine kernel ``K(a, b) = ½ (aᵀb / (‖a‖‖b‖) + 1)``; conditional probabilities
    ``p_{j|i} = K(t_i, t_j) / Σ_{k ≠ i} K(t_i, t_k)`` for j ≠ i (same q from the student);
    ``loss = (1/M) Σ_i Σ_{j ≠ i} p_{j|i} log(p_{j|i} / q_{j|i})``, i.e. the mean over
    anchors i of ``KL(p_{·|i} ‖ q_{·|i})`` (the paper writes the sum over i; dividing by M
    keeps the scale independent of the batch size). No ε is added inside the logarithm.

    Args:
        feature_S: (N, D_S), (N, L, D_S) or (N, C_S, H, W).
        feature_T: (N, D_T), (N, L, D_T) or (N, C_T, H, W), the same number of samples.
        mask: (N,) for 2-D/4-D features, (N, L) for 3-D, 1 = keep: masked samples are
            neither anchors nor neighbours.

    Returns:
        Scalar tensor; 0 when S == T.
    """
    samples_S, samples_T, weights = _sample_pair(feature_S, feature_T, mask, "pkt")
    count = samples_S.size(0)
    columns = 1 - torch.eye(count, dtype=samples_S.dtype, device=samples_S.device)
    anchors = torch.ones(count, dtype=samples_S.dtype, device=samples_S.device)
    if weights is not None:
        columns = columns * weights.unsqueeze(0)
        anchors = weights
    p = _pkt_conditionals(samples_T.to(samples_S.dtype), columns)
    q = _pkt_conditionals(samples_S, columns)
    tiny = torch.finfo(p.dtype).tiny
    per_anchor = (p * (p.clamp(min=tiny).log() - q.clamp(min=tiny).log())).sum(dim=-1)
    return finite_features(_weighted_mean(per_anchor, anchors), "pkt", feature_S, feature_T)


def _sp_similarity(samples: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """G = row-L2-normalised Q·Qᵀ, masked samples zeroed first."""
    if weights is not None:
        samples = samples * weights.unsqueeze(-1)
    return F.normalize(samples @ samples.t(), p=2.0, dim=1)


@MATCH_LOSSES.register("sp")
def sp_loss(feature_S: torch.Tensor, feature_T: torch.Tensor,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, 2019, arXiv:1907.09682).

    ``Q`` = each sample flattened (b × chw for a map), ``G̃ = Q·Qᵀ``, ``G[i] = G̃[i] /
    ‖G̃[i]‖₂`` (row-wise L2), ``loss = ‖G_T − G_S‖²_F / b²`` with b the number of (kept)
    samples.

    Args:
        feature_S: (N, C_S, H, W), (N, D_S) or (N, L, D_S).
        feature_T: (N, C_T, H, W), (N, D_T) or (N, L, D_T), the same number of samples.
        mask: (N,) for 2-D/4-D features, (N, L) for 3-D, 1 = keep.

    Returns:
        Scalar tensor; 0 when S == T.
    """
    samples_S, samples_T, weights = _sample_pair(feature_S, feature_T, mask, "sp")
    squared = (_sp_similarity(samples_S, weights)
               - _sp_similarity(samples_T.to(samples_S.dtype), weights)).pow(2).sum()
    kept = samples_S.new_tensor(samples_S.size(0)) if weights is None else weights.sum()
    return finite_features(safe_divide(squared, kept * kept), "sp", feature_S, feature_T)


def _cc_correlation(samples: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """Σ_{p=0}^{P} e^{−2γ} (2γ)^p / p! · (f_i·f_j)^p on L2-normalised samples."""
    similarity = _cosine_similarities(samples)
    total = torch.zeros_like(similarity)
    power = torch.ones_like(similarity)
    for p in range(order + 1):
        if p > 0:
            power = power * similarity
        total = total + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * power
    return total


@MATCH_LOSSES.register("cc")
def cc_loss(feature_S: torch.Tensor, feature_T: torch.Tensor,
            mask: Optional[torch.Tensor] = None, gamma: float = 0.4,
            order: int = 2) -> torch.Tensor:
    """Correlation congruence (Peng, Jin, Liu, Zhou, Wu, Liu, Li, Zhang, 2019, arXiv:1904.01802).

    The correlation between samples is the Gaussian RBF kernel
    ``k(f_i, f_j) = exp(−γ ‖f_i − f_j‖²)`` on L2-normalised embeddings, approximated (as in
    the paper) by its order-P Taylor expansion in the inner product:
    ``k ≈ Σ_{p=0}^{P} e^{−2γ} (2γ)^p / p! · (f_i·f_j)^p`` (exact as P → ∞, since
    ‖f_i − f_j‖² = 2 − 2 f_i·f_j). ``loss = ‖C_S − C_T‖²_F / n²``. Defaults γ = 0.4,
    P = 2 (the authors' settings).

    Args:
        feature_S: (N, D_S), (N, L, D_S) or (N, C_S, H, W).
        feature_T: (N, D_T), (N, L, D_T) or (N, C_T, H, W), the same number of samples.
        mask: (N,) for 2-D/4-D features, (N, L) for 3-D, 1 = keep; kept pairs / (Σ mask)².
        gamma: the RBF's γ.
        order: P, the order of the expansion.

    Returns:
        Scalar tensor; 0 when S == T.
    """
    samples_S, samples_T, weights = _sample_pair(feature_S, feature_T, mask, "cc")
    correlation_S = _cc_correlation(samples_S, gamma, order)
    correlation_T = _cc_correlation(samples_T.to(samples_S.dtype), gamma, order)
    pairs = _pair_weights(weights, correlation_S)
    return finite_features(_weighted_mean((correlation_S - correlation_T).pow(2), pairs), "cc",
                           feature_S, feature_T)
