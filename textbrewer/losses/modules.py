"""Losses that own trainable weights: regressors, variances, embedding heads, queues.

Each is an ``nn.Module`` registered in :data:`textbrewer.registry.LOSS_MODULES`, built as
``cls(dim_in, dim_out, **options)`` (the student's and the teacher's feature widths) and
called as ``module(feature_S, feature_T, mask=None) -> scalar``. Its parameters must be
trained with the student's (put it in the optimizer, and in the checkpoint: buffers such as
CRD's negative queue live in its ``state_dict``).

Features must be finite: a -inf or inf feature that makes the loss non-finite is a
``ValueError`` naming the loss and the side (one host sync per call; NaN is left to the
training loop's check; see ``finite_features`` in ``textbrewer/losses/_masking.py``).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import LOSS_MODULES
from ._masking import as_weights, finite_features, safe_divide

__all__ = ["VIDLoss", "CRDLoss"]


def _channels_last(feature: torch.Tensor, name: str, side: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W, C); (N, L, D) and (N, D) unchanged."""
    if feature.dim() == 4:
        return feature.permute(0, 2, 3, 1)
    if feature.dim() in (2, 3):
        return feature
    raise ValueError(f"{name}: {side} features must be (N, C, H, W), (N, L, D) or (N, D), "
                     f"got shape {tuple(feature.shape)}")


@LOSS_MODULES.register("vid")
class VIDLoss(nn.Module):
    """Variational information distillation (Ahn, Hu, Damianou, Lawrence, Dai, 2019,
    arXiv:1904.05835).

    Maximises a variational lower bound of the mutual information between teacher and
    student features with a Gaussian ``q(t | s) = N(t; μ(s), diag σ²)``: μ is a small
    regressor (1×1 convolutions for maps, i.e. Linear layers over channels:
    Linear–ReLU–Linear–ReLU–Linear), σ² a learned per-channel variance
    ``σ_c² = softplus(α_c) + ε``, constant over positions. The loss is the negative
    log-likelihood without its constant,

    ``loss = mean_{n, position, c} ½ [ (t − μ(s))² / σ_c² + log σ_c² ]``,

    as in the authors' code. Not 0 at the optimum (the log σ² term remains).

    Args:
        dim_in: the student's channels / width.
        dim_out: the teacher's channels / width.
        hidden_dim: the regressor's hidden width (default ``dim_out``).
        init_variance: σ² at initialisation (the paper's code: 5.0).
        eps: the variance floor ε.

    Shapes:
        ``forward(feature_S, feature_T, mask=None)``: (N, C_S, H_S, W_S) with
        (N, C_T, H, W) (the student's map is average-pooled to the teacher's size if they
        differ), (N, L, D_S) with (N, L, D_T) and a (N, L) mask, or (N, D_S) with (N, D_T).
        Returns a scalar; a mask divides the kept positions' sum by Σ mask · C_T.
    """

    def __init__(self, dim_in: int, dim_out: int, *, hidden_dim: Optional[int] = None,
                 init_variance: float = 5.0, eps: float = 1e-5):
        super().__init__()
        if init_variance <= eps:
            raise ValueError(f"vid: init_variance must exceed eps={eps}, got {init_variance}")
        hidden_dim = hidden_dim or dim_out
        self.regressor = nn.Sequential(
            nn.Linear(dim_in, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, dim_out))
        self.log_scale = nn.Parameter(
            torch.full((dim_out,), math.log(math.expm1(init_variance - eps))))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        """σ² per teacher channel, (dim_out,)."""
        return F.softplus(self.log_scale) + self.eps

    def forward(self, feature_S: torch.Tensor, feature_T: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if feature_S.dim() == 4 and feature_T.dim() == 4 \
                and feature_S.shape[2:] != feature_T.shape[2:]:
            feature_S = F.adaptive_avg_pool2d(feature_S, feature_T.shape[2:])
        student = _channels_last(feature_S, "vid", "student")
        teacher = _channels_last(feature_T, "vid", "teacher")
        mean = self.regressor(student)
        if mean.shape != teacher.shape:
            raise ValueError(f"vid: the regressor maps student features "
                             f"{tuple(feature_S.shape)} to {tuple(mean.shape)} (channels last), "
                             f"which does not match the teacher's {tuple(teacher.shape)}")
        variance = self.variance().to(mean.dtype)
        nll = 0.5 * ((mean - teacher).pow(2) / variance + variance.log())
        if mask is None:
            return finite_features(nll.mean(), "vid", feature_S, feature_T)
        weights = as_weights(mask, nll)
        if weights.shape != nll.shape[:-1]:
            raise ValueError(f"vid: a mask of shape {tuple(mask.shape)} does not fit features "
                             f"with positions {tuple(nll.shape[:-1])}")
        loss = safe_divide((nll * weights.unsqueeze(-1)).sum(), weights.sum() * nll.size(-1))
        return finite_features(loss, "vid", feature_S, feature_T)


def _pooled(feature: torch.Tensor, mask: Optional[torch.Tensor], side: str) -> torch.Tensor:
    """(N, D) as is; (N, L, D) masked mean over L; (N, C, H, W) mean over H, W -> (N, ·)."""
    if feature.dim() == 2:
        return feature
    if feature.dim() == 4:
        return feature.mean(dim=(2, 3))
    if feature.dim() == 3:
        if mask is None:
            return feature.mean(dim=1)
        weights = as_weights(mask, feature).unsqueeze(-1)
        return (feature * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    raise ValueError(f"crd: {side} features must be (N, D), (N, L, D) or (N, C, H, W), got "
                     f"shape {tuple(feature.shape)}")


@LOSS_MODULES.register("crd")
class CRDLoss(nn.Module):
    """Contrastive representation distillation (Tian, Krishnan, Isola, 2020, arXiv:1910.10699)
    with a bounded, MoCo-style negative queue (He et al., 2020, arXiv:1911.05722).

    Embedding heads map each side to a shared space and L2-normalise:
    ``s_i = normalize(W_S f^S_i)``, ``t_i = normalize(W_T f^T_i)``. For each student
    anchor the positive is the teacher embedding of the same example; the negatives are the
    other examples' teacher embeddings in the batch and the K teacher embeddings of earlier
    batches held in the queue. The objective is InfoNCE with temperature τ:

    ``loss = −mean_i log [ exp(s_i·t_i/τ) / (Σ_j exp(s_i·t_j/τ) + Σ_{k ∈ queue}
    exp(s_i·q_k/τ)) ]``.

    The paper's NCE over an O(N·d) memory bank of the whole data set is replaced by this
    InfoNCE over a fixed-size FIFO (K independent of the data set): after each training
    forward the batch's teacher embeddings (detached) are enqueued and the oldest dropped.
    The queue, its write pointer and fill count are buffers, so ``state_dict`` carries
    them and a resumed run continues exactly. In eval mode nothing is enqueued. Under DDP
    each process keeps its own queue (no all-gather).

    Args:
        dim_in: the student's feature width (channels for maps).
        dim_out: the teacher's feature width.
        feat_dim: the embedding width (paper: 128).
        queue_size: K, the number of queued negatives.
        temperature: τ (paper: 0.07).
        in_batch_negatives: also use the other examples of the batch as negatives.

    Shapes:
        ``forward(feature_S, feature_T, mask=None)``: (N, D_S) with (N, D_T); or (N, L, D)
        pooled by the masked mean over L with a (N, L) mask (examples with no kept token
        are left out: not anchors, not negatives, not enqueued); or (N, C, H, W) pooled
        over H, W. Returns a scalar.
    """

    def __init__(self, dim_in: int, dim_out: int, *, feat_dim: int = 128,
                 queue_size: int = 4096, temperature: float = 0.07,
                 in_batch_negatives: bool = True):
        super().__init__()
        if queue_size < 0:
            raise ValueError(f"crd: queue_size must be >= 0, got {queue_size}")
        if temperature <= 0:
            raise ValueError(f"crd: temperature must be > 0, got {temperature}")
        self.embed_S = nn.Linear(dim_in, feat_dim)
        self.embed_T = nn.Linear(dim_out, feat_dim)
        self.temperature = temperature
        self.in_batch_negatives = in_batch_negatives
        self.register_buffer("queue", torch.zeros(queue_size, feat_dim))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_length", torch.zeros((), dtype=torch.long))

    @property
    def queue_size(self) -> int:
        """K, the queue's capacity."""
        return self.queue.size(0)

    def embed(self, feature_S: torch.Tensor, feature_T: torch.Tensor,
              mask: Optional[torch.Tensor] = None):
        """The normalised embeddings ``(s, t)``, each (N, feat_dim)."""
        student = F.normalize(self.embed_S(_pooled(feature_S, mask, "student")), dim=-1)
        teacher = F.normalize(self.embed_T(_pooled(feature_T, mask, "teacher")), dim=-1)
        return student, teacher

    def negatives(self) -> torch.Tensor:
        """A copy of the queued teacher embeddings, oldest first, (min(seen, K), feat_dim)."""
        length = int(self.queue_length)
        if length < self.queue_size:
            return self.queue[:length].clone()
        return torch.roll(self.queue, shifts=-int(self.queue_pointer), dims=0)

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor) -> None:
        """Adds (n, feat_dim) embeddings at the queue's tail, dropping the oldest past K."""
        capacity = self.queue_size
        if capacity == 0 or embeddings.size(0) == 0:
            return
        embeddings = embeddings.detach()[-capacity:].to(self.queue.dtype)
        count = embeddings.size(0)
        slots = (self.queue_pointer + torch.arange(count, device=self.queue.device)) % capacity
        self.queue.index_copy_(0, slots, embeddings)
        self.queue_pointer.copy_((self.queue_pointer + count) % capacity)
        self.queue_length.copy_((self.queue_length + count).clamp(max=capacity))

    def forward(self, feature_S: torch.Tensor, feature_T: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if feature_S.size(0) != feature_T.size(0):
            raise ValueError(f"crd: student features {tuple(feature_S.shape)} and teacher "
                             f"features {tuple(feature_T.shape)} differ in batch size")
        student, teacher = self.embed(feature_S, feature_T, mask)
        batch = student.size(0)
        eye = torch.eye(batch, dtype=torch.bool, device=student.device)
        batch_logits = student @ teacher.t() / self.temperature
        blocked = ~eye if not self.in_batch_negatives else torch.zeros_like(eye)
        kept = None
        if mask is not None and feature_S.dim() == 3:
            kept = as_weights(mask, student).sum(dim=1) > 0
            blocked = blocked | (~kept.unsqueeze(0) & ~eye)
        batch_logits = batch_logits.masked_fill(blocked, float("-inf"))
        # a copy: the enqueue below writes into the buffer before backward runs
        queue = self.queue.to(student.dtype, copy=True)
        filled = torch.arange(self.queue_size, device=student.device) < self.queue_length
        queue_logits = (student @ queue.t() / self.temperature).masked_fill(
            ~filled.unsqueeze(0), float("-inf"))
        logits = torch.cat([batch_logits, queue_logits], dim=1)
        per_anchor = F.cross_entropy(logits, torch.arange(batch, device=student.device),
                                     reduction="none")
        if kept is None:
            loss = per_anchor.mean()
        else:
            weights = kept.to(per_anchor.dtype)
            loss = safe_divide((per_anchor * weights).sum(), weights.sum())
        # checked before the enqueue, so that non-finite embeddings never enter the queue
        loss = finite_features(loss, "crd", feature_S, feature_T)
        if self.training:
            self.enqueue(teacher if kept is None else teacher[kept])
        return loss
