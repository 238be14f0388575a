"""Multi-label losses on 19 logits: BCE (default), focal, and BCE + batch-hard triplet.

Every loss here is called as ``loss(logits, targets, embedding=None)`` with ``logits`` B x 19
(float), ``targets`` B x 19 multi-hot (float, weak labels: the image's labels for each of its
cells) and ``embedding`` B x D (only used by the triplet loss; ``loss.needs_embedding`` says whether
the model must return it). Each returns a scalar tensor (mean over the batch).

Triplet (the seed's proposal): for each anchor, a positive is another sample sharing at least one
label and a negative one sharing none; batch-hard mining takes the farthest positive and the nearest
negative (Hermans et al. 2017); loss = mean over anchors having both of
``max(0, d(a, p) - d(a, n) + margin)`` on L2-normalised embeddings (Euclidean distance in [0, 2]).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.errors import ConfigError, clip


class BCELoss(nn.Module):
    """Binary cross-entropy on logits, optionally with per-class positive weights."""

    needs_embedding = False

    def __init__(self, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits, targets, embedding=None):
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=self.pos_weight)


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al. 2017): BCE scaled by ``(1 - p_t) ** gamma``; mean over elements.

    `pos_weight` (optional) weights the positive term per class like BCE's.
    """

    needs_embedding = False

    def __init__(self, gamma: float = 2.0, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits, targets, embedding=None):
        logits, targets = logits.float(), targets.float()
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none", pos_weight=self.pos_weight)
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        return ((1 - p_t).pow(self.gamma) * bce).mean()


def batch_hard_triplet_loss(
    embedding: torch.Tensor, targets: torch.Tensor, margin: float = 0.3, normalize: bool = True
) -> torch.Tensor:
    """Batch-hard triplet loss for multi-label targets (see module doc); 0 when no anchor has both
    a positive and a negative in the batch."""
    emb = embedding.float()
    if normalize:
        emb = F.normalize(emb, dim=1)
    t = targets.float()
    # Squared distances via the Gram matrix; clamp before sqrt (and add eps) for a finite gradient.
    sq = (emb * emb).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * emb @ emb.T).clamp_min(0.0)
    dist = torch.sqrt(d2 + 1e-12)
    shared = (t @ t.T) > 0
    eye = torch.eye(len(t), dtype=torch.bool, device=t.device)
    pos = shared & ~eye
    neg = ~shared
    valid = pos.any(1) & neg.any(1)
    if not bool(valid.any()):
        return emb.sum() * 0.0  # keeps the graph (DDP needs every parameter used)
    hardest_pos = torch.where(pos, dist, torch.zeros_like(dist)).amax(1)
    hardest_neg = torch.where(neg, dist, torch.full_like(dist, float("inf"))).amin(1)
    loss = F.relu(hardest_pos - hardest_neg + margin)
    return loss[valid].mean()


class CETripletLoss(nn.Module):
    """Cross-entropy (binary, multi-label) + weight x batch-hard triplet loss on the embedding."""

    needs_embedding = True

    def __init__(self, weight: float = 1.0, margin: float = 0.3, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.ce = BCELoss(pos_weight)
        self.weight = weight
        self.margin = margin

    def forward(self, logits, targets, embedding=None):
        if embedding is None:
            raise ValueError("ce_triplet loss needs the model's embedding (return_embedding=True)")
        return self.ce(logits, targets) + self.weight * batch_hard_triplet_loss(embedding, targets, self.margin)


def pos_weight_from_targets(targets, max_weight: float = 10.0) -> torch.Tensor:
    """Per-class negatives/positives ratio from an N x 19 multi-hot array, clipped to [1, max_weight]
    (classes without positives get 1)."""
    t = torch.as_tensor(targets, dtype=torch.float64)
    pos = t.sum(0)
    neg = len(t) - pos
    w = torch.where(pos > 0, neg / pos.clamp_min(1), torch.ones_like(pos))
    return w.clamp(1.0, max_weight).float()


def build_loss(tcfg, pos_weight: torch.Tensor | None = None) -> nn.Module:
    """The loss named by a kit.config.TrainConfig (``loss``, ``focal_gamma``, ``triplet_*``)."""
    if tcfg.loss == "bce":
        return BCELoss(pos_weight)
    if tcfg.loss == "focal":
        return FocalLoss(tcfg.focal_gamma, pos_weight)
    if tcfg.loss == "ce_triplet":
        return CETripletLoss(tcfg.triplet_weight, tcfg.triplet_margin, pos_weight)
    raise ConfigError(f"config key train.loss: unknown loss {clip(tcfg.loss)} (bce, focal, ce_triplet)")
