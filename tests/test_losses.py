"""kit.losses: BCE, focal, batch-hard triplet (zero when separated, positive otherwise)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kit.config import TrainConfig
from kit.losses import (
    BCELoss,
    CETripletLoss,
    FocalLoss,
    batch_hard_triplet_loss,
    build_loss,
    pos_weight_from_targets,
)


def _targets(rows):
    t = torch.zeros(len(rows), 19)
    for i, labels in enumerate(rows):
        t[i, labels] = 1
    return t


def test_triplet_zero_for_separated_embeddings():
    # two label groups on orthogonal directions, tight within a group: d(a,p)~0, d(a,n)=sqrt(2)
    t = _targets([[0], [0], [0], [3], [3, 4], [3]])
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.99, 0.0], [0.0, 1.0], [0.01, 1.0], [0.0, 0.98]])
    assert float(batch_hard_triplet_loss(emb, t, margin=0.3)) == 0.0


def test_triplet_positive_when_classes_mix():
    t = _targets([[0], [0], [3], [3]])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.05], [0.05, 1.0]])  # a negative is nearer
    loss = batch_hard_triplet_loss(emb, t, margin=0.3)
    assert float(loss) > 0.3
    # within the margin only: still positive
    emb2 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.25], [1.0, 0.25]])
    assert 0.0 < float(batch_hard_triplet_loss(emb2, t, margin=0.3)) < 0.3


def test_triplet_shared_label_counts_as_positive_and_gradient_is_finite():
    # sample 1 shares label 4 with sample 2 (positive), shares nothing with sample 0 (negative)
    t = _targets([[0], [4, 7], [4]])
    emb = torch.randn(3, 8, requires_grad=True)
    loss = batch_hard_triplet_loss(emb, t)
    loss.backward()
    assert torch.isfinite(emb.grad).all()
    # identical embeddings: distance 0 everywhere, loss = margin, gradient still finite (eps in sqrt)
    same = torch.ones(3, 8, requires_grad=True)
    loss = batch_hard_triplet_loss(same, t, margin=0.3)
    loss.backward()
    assert loss.item() == pytest.approx(0.3, abs=1e-4) and torch.isfinite(same.grad).all()


def test_triplet_without_valid_anchor_is_zero():
    t = _targets([[1], [1], [1]])  # nobody has a negative
    assert float(batch_hard_triplet_loss(torch.randn(3, 4), t)) == 0.0


def test_bce_and_focal():
    torch.manual_seed(0)
    logits, t = torch.randn(6, 19), (torch.rand(6, 19) > 0.8).float()
    assert torch.allclose(BCELoss()(logits, t), F.binary_cross_entropy_with_logits(logits, t))
    focal = FocalLoss(gamma=2.0)(logits, t)
    assert 0 < float(focal) < float(BCELoss()(logits, t))  # down-weights easy examples
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, t), BCELoss()(logits, t))
    # confident correct predictions cost far less under focal than BCE
    easy = (t * 2 - 1) * 6
    assert float(FocalLoss()(easy, t)) < 0.01 * float(BCELoss()(easy, t))


def test_ce_triplet_combines_and_needs_embedding():
    t = _targets([[0], [0], [3], [3]])
    logits = torch.zeros(4, 19)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.05], [0.05, 1.0]])
    loss = CETripletLoss(weight=2.0, margin=0.3)
    expected = BCELoss()(logits, t) + 2.0 * batch_hard_triplet_loss(emb, t, 0.3)
    assert torch.allclose(loss(logits, t, emb), expected)
    with pytest.raises(ValueError, match="embedding"):
        loss(logits, t)


def test_build_loss_and_pos_weight():
    assert isinstance(build_loss(TrainConfig(loss="bce")), BCELoss)
    assert isinstance(build_loss(TrainConfig(loss="focal")), FocalLoss)
    assert build_loss(TrainConfig(loss="ce_triplet")).needs_embedding
    t = _targets([[0], [0], [0], [1]]).numpy()
    w = pos_weight_from_targets(t, max_weight=2.0)
    assert float(w[0]) == 1.0  # 1 negative / 3 positives -> clipped up to 1
    assert float(w[1]) == 2.0  # 3 / 1 -> clipped to 2
    assert float(w[5]) == 1.0  # absent class
